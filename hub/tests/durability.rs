//! Crash safety of the real `hub` binary under clients that behave like pages on a bad
//! network. Sixteen clients, four users spread over the three sites, send deltas — gains
//! and spends — with op ids they made themselves; they send about a fifth of their
//! requests twice (half the time both copies at once), and send again, same op id and
//! body, after every timeout or lost connection — their timeouts are short, so resends
//! often overlap a copy the hub is still working on. Meanwhile the hub is killed with
//! SIGKILL at random moments (`HUB_CRASH_KILLS` times, default 3) and restarted on the same
//! data dir, or stopped with SIGTERM (then the clients wait for every answer). Afterwards
//! every delta the clients never saw acknowledged is sent once more.
//!
//! What an answer tells a client: a 200 acknowledges the delta (applied now, or earlier
//! when it says `replayed`); a `409 insufficient_funds` refuses it for good — the hub
//! remembers the refusal, so no other copy still on its way, and no later resend, is ever
//! applied; no answer tells nothing.
//!
//! Checked on the database file after every kill (with the hub down) and at the end: the
//! SQLite integrity check passes; each user's ledger is a running sum that never goes below
//! zero, one row per version, ending at the balance and version of the user's record; no
//! op id is in the ledger twice, and each has its remembered op; every ledger row is a
//! delta a client sent, with its user, site and amount; every delta acknowledged before the
//! hub died is in the ledger. At the end, when nothing is in flight and every delta has had
//! an answer: the ledger holds exactly the acknowledged deltas, no delta was answered as
//! freshly applied twice, and each user's balance as the hub serves it is the sum of that
//! user's acknowledged deltas. A graceful stop, besides, applies nothing it did not answer.
//!
//! Every wait is bounded; nothing asserts how fast anything is.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Deployment, PATIENCE, SITES, SiteClient};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// Clients sending deltas at once; client `i` is a page of `SITES[i % 3]` for `USERS[i % 4]`,
/// so every user is written from every site.
const CLIENTS: usize = 16;
const USERS: [&str; 4] = ["8-evans", "12-okafor", "31-lindqvist", "47-moreau"];
/// Share of sends that go out twice.
const DUPLICATED: f64 = 0.2;
/// Share of deltas that spend. Spends are rarer than gains but larger, so balances hover
/// near zero and the hub refuses overdrafts often.
const SPENDS: f64 = 0.4;
/// How long a client waits before sending again after no answer.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Kills of the hub in one run of the SIGKILL test unless `HUB_CRASH_KILLS` says otherwise.
const DEFAULT_KILLS: usize = 3;

/// One delta as a client made it: what every copy and every resend of it carries.
#[derive(Debug, Clone)]
struct Delta {
    client: usize,
    user: &'static str,
    site: &'static str,
    op_id: String,
    amount: i64,
}

/// What a client knows of one of its deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// No answer came yet.
    Unanswered,
    /// Every answer was `insufficient_funds`.
    Refused,
    /// An answer was 200: the hub applied it.
    Acknowledged,
}

/// One full answer of the hub to one copy of a delta.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// 200; `fresh` unless the answer says `replayed`.
    Applied { fresh: bool },
    /// `409 insufficient_funds`.
    Refused,
}

#[derive(Debug, Clone)]
struct Tracked {
    delta: Delta,
    outcome: Outcome,
    /// Answers that applied the delta rather than replaying an earlier application.
    fresh_answers: u32,
}

/// Every delta the clients made and what they heard about it, by op id (op ids sort in the
/// order each client made its deltas).
#[derive(Debug, Clone, Default)]
struct Journal {
    deltas: BTreeMap<String, Tracked>,
    acknowledged: usize,
    refusals: usize,
}

impl Journal {
    fn issue(&mut self, delta: Delta) {
        let op_id = delta.op_id.clone();
        self.deltas.insert(op_id, Tracked { delta, outcome: Outcome::Unanswered, fresh_answers: 0 });
    }

    /// Takes in the answers to one send (`None`: no full answer) and returns the outcome.
    fn hear(&mut self, op_id: &str, answers: impl IntoIterator<Item = Option<Answer>>) -> Outcome {
        let tracked = self.deltas.get_mut(op_id).expect("deltas are issued before they are sent");
        for answer in answers.into_iter().flatten() {
            match answer {
                Answer::Applied { fresh } => {
                    if tracked.outcome != Outcome::Acknowledged {
                        tracked.outcome = Outcome::Acknowledged;
                        self.acknowledged += 1;
                    }
                    tracked.fresh_answers += u32::from(fresh);
                    assert!(tracked.fresh_answers <= 1, "{op_id} was answered as freshly applied twice");
                }
                Answer::Refused => {
                    self.refusals += 1;
                    if tracked.outcome == Outcome::Unanswered {
                        tracked.outcome = Outcome::Refused;
                    }
                }
            }
        }
        tracked.outcome
    }

    fn with_outcome(&self, outcome: Outcome) -> impl Iterator<Item = &Delta> {
        self.deltas.values().filter(move |t| t.outcome == outcome).map(|t| &t.delta)
    }
}

/// How long a client waits for an answer before it sends again.
#[derive(Debug, Clone, Copy)]
enum Patience {
    /// A random 5 to 100 ms for each send: often less than the hub takes, so that resends
    /// overlap copies the hub is still working on.
    Short,
    /// [`PATIENCE`]: every answer the hub gives arrives.
    Full,
}

impl Patience {
    fn timeout(self) -> Duration {
        match self {
            Patience::Short => Duration::from_millis(rand::random_range(5..100)),
            Patience::Full => PATIENCE,
        }
    }
}

/// Sends one copy of `delta`: `None` when no full answer came within `patience` (or the
/// connection was lost or refused). Any answer but a 200 or a justified
/// `insufficient_funds` fails the test.
async fn send(page: &SiteClient, delta: &Delta, patience: Patience) -> Option<Answer> {
    let body = json!({
        "action": "delta", "user_id": delta.user, "site_id": delta.site, "data_type": "balance",
        "delta": { "coins": delta.amount }, "op_id": delta.op_id, "reason": "game",
    });
    let request =
        page.client.post(format!("{}/api/sync.php", page.url)).json(&body).timeout(patience.timeout());
    let response = request.bearer_auth(page.token.as_deref().unwrap()).send().await.ok()?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await.ok()?;
    let answer: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{} got a full answer that is not JSON ({e}): {bytes:?}", delta.op_id));
    match (status, answer["code"].as_str()) {
        (200, _) => {
            assert_eq!(answer["success"], true, "{}: {answer}", delta.op_id);
            let coins = answer["data"]["coins"].as_i64();
            assert!(coins.is_some_and(|c| c >= 0), "{} left the balance at {answer}", delta.op_id);
            Some(Answer::Applied { fresh: answer.get("replayed").is_none() })
        }
        (409, Some("insufficient_funds")) => {
            let coins = answer["current"]["data"]["coins"].as_i64().unwrap_or(0);
            assert!(coins + delta.amount < 0, "{} was refused at a balance of {coins}", delta.op_id);
            Some(Answer::Refused)
        }
        _ => panic!("{} was answered {status}: {answer}", delta.op_id),
    }
}

/// Sends `delta` once, or, for a [`DUPLICATED`] share of sends, twice: both copies at once
/// or one after the other.
async fn send_maybe_twice(page: &SiteClient, delta: &Delta, patience: Patience) -> Vec<Option<Answer>> {
    let send = || send(page, delta, patience);
    if !rand::random_bool(DUPLICATED) {
        return vec![send().await];
    }
    if rand::random_bool(0.5) {
        let (first, second) = tokio::join!(send(), send());
        vec![first, second]
    } else {
        vec![send().await, send().await]
    }
}

/// A gain of 1..=10 coins or a spend of 1..=15.
fn random_amount() -> i64 {
    if rand::random_bool(SPENDS) { -rand::random_range(1..=15) } else { rand::random_range(1..=10) }
}

/// [`CLIENTS`] tasks making deltas one after the other, each sent until it has an answer.
struct Clients {
    journal: Arc<Mutex<Journal>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Clients {
    /// Starts the clients, each waiting as `patience` says for an answer before it sends
    /// again.
    fn start(deployment: &Deployment, patience: Patience) -> Clients {
        let journal = Arc::new(Mutex::new(Journal::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..CLIENTS)
            .map(|client| {
                let (user, site) = (USERS[client % USERS.len()], SITES[client % SITES.len()].0);
                let page = deployment.backend(site, user, PATIENCE);
                let (journal, stop) = (journal.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let op_id = format!("c{client:02}-{n:07}");
                        let delta = Delta { client, user, site, op_id, amount: random_amount() };
                        journal.lock().unwrap().issue(delta.clone());
                        while !stop.load(Ordering::Relaxed) {
                            let answers = send_maybe_twice(&page, &delta, patience).await;
                            let answered = answers.iter().any(Option::is_some);
                            if journal.lock().unwrap().hear(&delta.op_id, answers) != Outcome::Unanswered {
                                break;
                            }
                            if !answered {
                                tokio::time::sleep(RETRY_PAUSE).await;
                            }
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        Clients { journal, stop, tasks }
    }

    fn acknowledged(&self) -> usize {
        self.journal.lock().unwrap().acknowledged
    }

    /// Waits until the clients have heard more than `mark` acknowledgements in all.
    async fn until_acknowledged_beyond(&self, mark: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.acknowledged() <= mark {
            assert!(Instant::now() < deadline, "the hub acknowledged no delta within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the clients have heard so far.
    fn journal(&self) -> Journal {
        self.journal.lock().unwrap().clone()
    }

    /// Stops the clients (a delta still unanswered stays so) and returns what they heard.
    async fn finish(self) -> Journal {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.journal.lock().unwrap().clone()
    }
}

/// Lets the clients' stream run into the hub for a random moment, once it has acknowledged
/// more than `mark` deltas, then kills the hub with SIGKILL and reaps it.
async fn kill_mid_stream(hub: &mut Child, clients: &Clients, mark: usize) {
    clients.until_acknowledged_beyond(mark).await;
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..3000))).await;
    hub.kill().await.unwrap();
}

/// Sends once more every delta the clients never saw acknowledged — each client its own,
/// in the order it made them — and takes in the answers, which must all come.
async fn resend_unacknowledged(deployment: &Deployment, journal: &mut Journal) {
    let mut shares: Vec<Vec<Delta>> = vec![Vec::new(); CLIENTS];
    for delta in journal.deltas.values().filter(|t| t.outcome != Outcome::Acknowledged) {
        shares[delta.delta.client].push(delta.delta.clone());
    }
    let tasks: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(client, share)| {
            let (user, site) = (USERS[client % USERS.len()], SITES[client % SITES.len()].0);
            let page = deployment.backend(site, user, PATIENCE);
            tokio::spawn(async move {
                let mut answers = Vec::with_capacity(share.len());
                for delta in share {
                    let answer = send(&page, &delta, Patience::Full).await;
                    assert!(answer.is_some(), "the hub did not answer a resend of {}", delta.op_id);
                    answers.push((delta.op_id, answer));
                }
                answers
            })
        })
        .collect();
    for task in tasks {
        for (op_id, answer) in task.await.unwrap() {
            journal.hear(&op_id, [answer]);
        }
    }
}

/// One ledger row: a change to a user's balance.
#[derive(Debug)]
struct Entry {
    user: String,
    site: String,
    delta: i64,
}

/// Reads the database file and checks it on its own: SQLite's integrity check passes; each
/// user's ledger is a running sum that never goes below zero, one row per version, ending at
/// the record's balance and version; no op id is there twice and each has its remembered
/// op. Returns the ledger by op id.
fn read_ledger(deployment: &Deployment) -> HashMap<String, Entry> {
    let conn = rusqlite::Connection::open(deployment.database()).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");

    let mut records =
        conn.prepare("SELECT user_id, data, version FROM records WHERE data_type = 'balance'").unwrap();
    let balances: HashMap<String, (i64, i64)> = records
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
        .unwrap()
        .map(|row| {
            let (user, data, version) = row.unwrap();
            let data: Value = serde_json::from_str(&data).unwrap();
            (user, (data["coins"].as_i64().unwrap(), version))
        })
        .collect();

    let mut rows = conn
        .prepare(
            "SELECT user_id, site_id, op_id, delta, result, version FROM ledger
             WHERE data_type = 'balance' ORDER BY user_id, id",
        )
        .unwrap();
    let rows = rows
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap);
    let mut ledger = HashMap::new();
    let mut sums: HashMap<String, (i64, i64)> = HashMap::new();
    for (user, site, op_id, delta, result, version) in rows {
        let (running, count) = sums.entry(user.clone()).or_default();
        *running += delta;
        *count += 1;
        assert_eq!(
            result, *running,
            "{user}'s ledger row of {op_id} does not follow from the rows before it"
        );
        assert!(result >= 0, "{op_id} took {user}'s balance to {result}");
        assert_eq!(version, *count, "{user}'s ledger row of {op_id} skips a version");
        let twice = ledger.insert(op_id.clone(), Entry { user, site, delta });
        assert!(twice.is_none(), "{op_id} is twice in the ledger");
    }
    assert_eq!(sums, balances, "the ledger's (sum, rows) per user disagree with the balance records");

    let forgotten: i64 = conn
        .query_row(
            // A set difference: the op log has no index by op id to look each ledger row up in.
            "SELECT COUNT(*) FROM
             (SELECT user_id, op_id FROM ledger EXCEPT SELECT user_id, op_id FROM remembered_ops)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(forgotten, 0, "ledger rows whose op id the hub does not remember");
    ledger
}

/// Every ledger row is a delta some client sent, with its user, site and amount, and every
/// delta acknowledged in `journal` is in the ledger.
fn assert_acknowledged_applied(ledger: &HashMap<String, Entry>, journal: &Journal) {
    for (op_id, entry) in ledger {
        let sent = &journal.deltas.get(op_id).unwrap_or_else(|| panic!("{op_id} was never sent")).delta;
        assert_eq!(
            (entry.user.as_str(), entry.site.as_str(), entry.delta),
            (sent.user, sent.site, sent.amount),
            "{op_id} is in the ledger otherwise than it was sent"
        );
    }
    for delta in journal.with_outcome(Outcome::Acknowledged) {
        assert!(ledger.contains_key(&delta.op_id), "acknowledged {} was lost", delta.op_id);
    }
}

/// Once every delta has had an answer with nothing in flight: the ledger holds exactly the
/// acknowledged deltas, and each user's balance as the hub serves it is their sum.
async fn assert_settled(deployment: &Deployment, ledger: &HashMap<String, Entry>, journal: &Journal) {
    assert_acknowledged_applied(ledger, journal);
    let acknowledged: HashSet<&str> =
        journal.with_outcome(Outcome::Acknowledged).map(|d| d.op_id.as_str()).collect();
    let applied: HashSet<&str> = ledger.keys().map(String::as_str).collect();
    assert_eq!(applied, acknowledged, "the ledger holds other deltas than those acknowledged");
    for user in USERS {
        let sum: i64 =
            journal.with_outcome(Outcome::Acknowledged).filter(|d| d.user == user).map(|d| d.amount).sum();
        let page = deployment.backend("wrc", user, PATIENCE);
        let served = page.get("balance").await.assert_ok()["data"]["coins"].as_i64().unwrap_or(0);
        assert_eq!(served, sum, "{user}'s balance is not the sum of their acknowledged deltas");
    }
}

/// The number of kills: `HUB_CRASH_KILLS`, or [`DEFAULT_KILLS`].
fn kills() -> usize {
    let kills = std::env::var("HUB_CRASH_KILLS")
        .map_or(DEFAULT_KILLS, |v| v.parse().expect("HUB_CRASH_KILLS is a number of kills"));
    assert!(kills >= 1, "HUB_CRASH_KILLS must be at least 1");
    kills
}

fn deployment() -> Deployment {
    Deployment::new(|config| config.limits.requests_per_minute = 1_000_000)
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_deltas_survive_sigkill() {
    let deployment = deployment();
    let mut hub = deployment.start().await;
    let clients = Clients::start(&deployment, Patience::Short);
    let mut mark = 0;
    for _ in 1..kills() {
        kill_mid_stream(&mut hub, &clients, mark).await;
        assert_acknowledged_applied(&read_ledger(&deployment), &clients.journal());
        hub = deployment.start().await;
        mark = clients.acknowledged();
    }
    // The last kill also ends the clients, so that none of their requests is left inside a
    // hub when the final resends begin: each of those answers is then the last word.
    kill_mid_stream(&mut hub, &clients, mark).await;
    let mut journal = clients.finish().await;

    assert_acknowledged_applied(&read_ledger(&deployment), &journal);

    let mut hub = deployment.start().await;
    resend_unacknowledged(&deployment, &mut journal).await;
    let ledger = read_ledger(&deployment);
    assert_settled(&deployment, &ledger, &journal).await;
    // The run did test overdrafts: some spends were applied, some refused.
    assert!(ledger.values().any(|e| e.delta < 0), "no spend was applied");
    assert!(journal.refusals > 0, "no overdraft was refused");
    hub.kill().await.unwrap();
}

/// Asks the hub to stop gracefully. `unsafe_code` is forbidden in this workspace, so the
/// signal goes through kill(1) rather than libc.
async fn terminate(hub: &Child) {
    let pid = hub.id().expect("the hub is running").to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(status.success(), "kill -TERM {pid} failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_answered_before_a_graceful_stop_survive_it() {
    let deployment = deployment();
    let mut hub = deployment.start().await;
    // Patient clients: a graceful stop answers every request it took in.
    let clients = Clients::start(&deployment, Patience::Full);
    clients.until_acknowledged_beyond(0).await;
    tokio::time::sleep(Duration::from_millis(rand::random_range(10..1500))).await;
    terminate(&hub).await;
    let status = tokio::time::timeout(PATIENCE, hub.wait())
        .await
        .unwrap_or_else(|_| panic!("the hub did not stop within {PATIENCE:?} of SIGTERM"))
        .unwrap();
    assert!(status.success(), "the hub's graceful stop ended with {status}; its log:\n{}", deployment.log());
    let mut journal = clients.finish().await;
    let ledger = read_ledger(&deployment);
    assert_acknowledged_applied(&ledger, &journal);
    let acknowledged: HashSet<&str> =
        journal.with_outcome(Outcome::Acknowledged).map(|d| d.op_id.as_str()).collect();
    let unanswered: Vec<&String> =
        ledger.keys().filter(|op_id| !acknowledged.contains(op_id.as_str())).collect();
    assert!(unanswered.is_empty(), "a graceful stop applied writes it never answered: {unanswered:?}");

    let mut hub = deployment.start().await;
    resend_unacknowledged(&deployment, &mut journal).await;
    assert_settled(&deployment, &read_ledger(&deployment), &journal).await;
    hub.kill().await.unwrap();
}
