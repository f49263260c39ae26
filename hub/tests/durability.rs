//! Crash safety of the real `hub` binary: a delta the hub acknowledged is still applied
//! after `kill -9` or a graceful stop in the middle of a stream of writes, a retry of any
//! delta is applied exactly once, the audit ledger agrees with the balance, and the SQLite
//! file stays intact. Every wait is bounded; nothing asserts how fast anything is.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hub::auth::Keys;
use serde_json::json;
use support::{Reply, SITES, SiteClient};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

const USER: &str = "8-evans";
/// Tasks sending deltas at once.
const WRITERS: usize = 8;
/// Deltas one writer sends at most per burst, so a burst ends even if the hub never stops.
const MAX_DELTAS_PER_WRITER: usize = 5_000;
/// How long a hub may take to come up, or to stop after SIGTERM, before the test fails.
const PATIENCE: Duration = Duration::from_secs(15);

/// A hub's home: config file, data dir, log and port, which outlive each of its processes.
struct Deployment {
    dir: TempDir,
    data_dir: PathBuf,
    port: u16,
    /// The sites' keys, to mint tokens as their backends would.
    keys: Keys,
}

impl Deployment {
    fn new() -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let mut config = support::test_config(&data_dir);
        config.limits.requests_per_minute = 1_000_000;
        std::fs::write(dir.path().join("hub.toml"), toml::to_string(&config).unwrap()).unwrap();
        let keys = Keys::from_config(&config).unwrap();
        Deployment { dir, data_dir, port: free_port(), keys }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("hub.log")
    }

    /// Everything every hub process of this deployment wrote to stderr.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `hub serve` on the deployment's port and data dir, and waits until it answers
    /// `/healthz`.
    async fn start(&self) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_hub"));
        command
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("hub.toml"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("HUB_") {
                command.env_remove(name);
            }
        }
        let mut child = command.spawn().unwrap();
        let probe = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the hub exited ({status}) before answering /healthz; its log:\n{}", self.log());
            }
            let health = probe.get(format!("{}/healthz", self.url())).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return child;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the hub did not answer /healthz within {PATIENCE:?}; its log:\n{}", self.log());
    }

    /// A page of `site` signed in as the test's user.
    fn page(&self, site: &str) -> SiteClient {
        SiteClient {
            url: self.url(),
            client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
            token: Some(self.keys.mint(site, USER, 600, false).unwrap()),
            site: site.into(),
            user: USER.into(),
        }
    }
}

/// A port nothing listens on right now, to be reused by every restart of one hub.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Asks the hub to stop gracefully. `unsafe_code` is forbidden in this workspace, so the
/// signal goes through kill(1) rather than libc.
async fn terminate(hub: &Child) {
    let pid = hub.id().expect("the hub is running").to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// One delta a writer sent: the same op id and amount are what a retry must send.
#[derive(Debug, Clone)]
struct Sent {
    /// The site whose page sent it: part of the body a retry must repeat.
    site: &'static str,
    op_id: String,
    amount: i64,
    /// The hub answered 200 in full before it went away.
    acknowledged: bool,
}

/// [`WRITERS`] tasks sending deltas with fresh op ids as fast as the hub answers them.
struct Load {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicUsize>,
    writers: Vec<JoinHandle<Vec<Sent>>>,
}

impl Load {
    /// Starts the writers; op ids are `{label}-w{writer}-{n}`. A writer stops at the first
    /// request the hub does not answer (it went away), or when told to.
    fn start(deployment: &Deployment, label: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let writers = (0..WRITERS)
            .map(|w| {
                let site = SITES[w % SITES.len()].0;
                let page = deployment.page(site);
                let (stop, counter, label) = (stop.clone(), acknowledged.clone(), label.to_owned());
                tokio::spawn(async move {
                    let mut sent = Vec::new();
                    for n in 0..MAX_DELTAS_PER_WRITER {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let (op_id, amount) = (format!("{label}-w{w}-{n}"), rand::random_range(1..=5));
                        let answer = send_delta(&page, amount, &op_id).await;
                        let acknowledged = answer == Some(true);
                        sent.push(Sent { site, op_id, amount, acknowledged });
                        if acknowledged {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        if answer.is_none() {
                            break;
                        }
                    }
                    sent
                })
            })
            .collect();
        Load { stop, acknowledged, writers }
    }

    /// Waits until the hub has acknowledged at least one delta, so that what comes next
    /// lands in the middle of the stream.
    async fn until_acknowledged(&self) {
        let deadline = Instant::now() + PATIENCE;
        while self.acknowledged.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the hub acknowledged no delta within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the writers and returns every delta they sent.
    async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        let mut sent = Vec::new();
        for writer in self.writers {
            sent.extend(writer.await.unwrap());
        }
        sent
    }
}

/// Sends one delta: `Some(true)` when the hub answered 200 in full, `Some(false)` for any
/// other full answer, `None` when no full answer came (the hub went away mid-request).
async fn send_delta(page: &SiteClient, amount: i64, op_id: &str) -> Option<bool> {
    let body = json!({
        "action": "delta", "user_id": page.user, "site_id": page.site, "data_type": "balance",
        "delta": { "coins": amount }, "op_id": op_id,
    });
    let request = page.client.post(format!("{}/api/sync.php", page.url)).json(&body);
    let response = request.bearer_auth(page.token.as_deref().unwrap()).send().await.ok()?;
    let status = response.status();
    let bytes = response.bytes().await.ok()?;
    let answer: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let applied = status.is_success() && answer["success"] == true;
    assert!(!applied || answer.get("replayed").is_none(), "a fresh op id was replayed: {answer}");
    Some(applied)
}

/// Sends each delta again, same site, op id and amount, from several tasks at once.
async fn resend<'a>(deployment: &Deployment, deltas: impl Iterator<Item = &'a Sent>) -> Vec<(String, Reply)> {
    let mut shares: Vec<Vec<Sent>> = vec![Vec::new(); WRITERS];
    for (i, delta) in deltas.enumerate() {
        shares[i % WRITERS].push(delta.clone());
    }
    let tasks: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let pages: HashMap<&str, SiteClient> =
                SITES.iter().map(|(s, _)| (*s, deployment.page(s))).collect();
            tokio::spawn(async move {
                let mut replies = Vec::with_capacity(share.len());
                for delta in share {
                    let reply = pages[delta.site].delta("balance", delta.amount, &delta.op_id).await;
                    replies.push((delta.op_id, reply));
                }
                replies
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.extend(task.await.unwrap());
    }
    replies
}

/// Checks the database behind a running hub: the SQLite file is intact, and the balance
/// ledger is a running sum, one row per version and per op id, ending at the balance the
/// hub serves. Returns each ledger op id's delta.
async fn assert_consistent(deployment: &Deployment, page: &SiteClient) -> HashMap<String, i64> {
    let record = page.get("balance").await;
    let coins = record.assert_ok()["data"]["coins"].as_i64().unwrap_or(0);
    let version = record.body["version"].as_i64().unwrap();

    let conn = rusqlite::Connection::open(deployment.data_dir.join("hub.sqlite3")).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");
    let mut stmt = conn
        .prepare(
            "SELECT op_id, delta, result, version FROM ledger
             WHERE user_id = ?1 AND data_type = 'balance' ORDER BY id",
        )
        .unwrap();
    let rows = stmt
        .query_map([USER], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?))
        })
        .unwrap()
        .map(Result::unwrap);

    let (mut ledger, mut running, mut rows_seen) = (HashMap::new(), 0, 0);
    for (op_id, delta, result, row_version) in rows {
        running += delta;
        rows_seen += 1;
        assert_eq!(result, running, "ledger row of {op_id} does not follow from the rows before it");
        assert_eq!(row_version, rows_seen, "ledger row of {op_id} skips a version");
        assert!(ledger.insert(op_id.clone(), delta).is_none(), "{op_id} is twice in the ledger");
    }
    assert_eq!((running, rows_seen), (coins, version), "the ledger (sum, rows) disagrees with the balance");
    ledger
}

/// After a restart: every acknowledged delta of `burst` is applied (and a retry of it is
/// a replay), nothing was applied that was never sent, and everything of `earlier` bursts
/// is still there.
async fn assert_acknowledged_deltas_applied(
    deployment: &Deployment,
    page: &SiteClient,
    earlier: &[Sent],
    burst: &[Sent],
) {
    let ledger = assert_consistent(deployment, page).await;
    let sent: HashMap<&str, i64> =
        earlier.iter().chain(burst).map(|s| (s.op_id.as_str(), s.amount)).collect();
    for (op_id, delta) in &ledger {
        assert_eq!(
            sent.get(op_id.as_str()),
            Some(delta),
            "the ledger holds {op_id}, which was never sent so"
        );
    }
    for s in earlier.iter().chain(burst.iter().filter(|s| s.acknowledged)) {
        assert_eq!(ledger.get(&s.op_id), Some(&s.amount), "acknowledged {} was lost", s.op_id);
    }
    for (op_id, reply) in resend(deployment, burst.iter().filter(|s| s.acknowledged)).await {
        reply.assert_ok();
        assert_eq!(reply.body["replayed"], true, "acknowledged {op_id} was applied again");
    }
}

/// Retries every delta of `burst` the hub did not acknowledge, as a client would; returns
/// the op ids the hub had applied without its answer reaching the client.
async fn retry_unacknowledged(deployment: &Deployment, burst: &[Sent]) -> Vec<String> {
    let mut applied_unanswered = Vec::new();
    for (op_id, reply) in resend(deployment, burst.iter().filter(|s| !s.acknowledged)).await {
        if reply.assert_ok()["replayed"] == true {
            applied_unanswered.push(op_id);
        }
    }
    applied_unanswered
}

/// Every delta ever sent is applied, each exactly once.
async fn assert_every_delta_applied_once(deployment: &Deployment, page: &SiteClient, sent: &[Sent]) {
    let ledger = assert_consistent(deployment, page).await;
    assert_eq!(ledger.len(), sent.len(), "one ledger row per delta sent");
    for s in sent {
        assert_eq!(ledger.get(&s.op_id), Some(&s.amount), "{} is not applied once", s.op_id);
    }
    assert_eq!(page.coins().await, sent.iter().map(|s| s.amount).sum::<i64>());
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_deltas_survive_sigkill() {
    const ROUNDS: usize = 5;
    let deployment = Deployment::new();
    let mut hub = deployment.start().await;
    let mut history: Vec<Sent> = Vec::new();
    for round in 0..ROUNDS {
        let load = Load::start(&deployment, &format!("kill{round}"));
        load.until_acknowledged().await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(10..250))).await;
        // SIGKILL, then reap the process.
        hub.kill().await.unwrap();
        let burst = load.finish().await;

        hub = deployment.start().await;
        let page = deployment.page("roflfaucet");
        assert_acknowledged_deltas_applied(&deployment, &page, &history, &burst).await;
        retry_unacknowledged(&deployment, &burst).await;
        history.extend(burst);
        assert_every_delta_applied_once(&deployment, &page, &history).await;
    }
    hub.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_answered_before_a_graceful_stop_survive_it() {
    let deployment = Deployment::new();
    let mut hub = deployment.start().await;
    let load = Load::start(&deployment, "term");
    load.until_acknowledged().await;
    tokio::time::sleep(Duration::from_millis(rand::random_range(10..250))).await;
    terminate(&hub).await;
    let status = tokio::time::timeout(PATIENCE, hub.wait())
        .await
        .unwrap_or_else(|_| panic!("the hub did not stop within {PATIENCE:?} of SIGTERM"))
        .unwrap();
    assert!(status.success(), "the hub's graceful stop ended with {status}; its log:\n{}", deployment.log());
    let burst = load.finish().await;

    let mut hub = deployment.start().await;
    let page = deployment.page("wrc");
    assert_acknowledged_deltas_applied(&deployment, &page, &[], &burst).await;
    let applied_unanswered = retry_unacknowledged(&deployment, &burst).await;
    assert_eq!(applied_unanswered, Vec::<String>::new(), "a graceful stop applied writes it never answered");
    assert_every_delta_applied_once(&deployment, &page, &burst).await;
    hub.kill().await.unwrap();
}
