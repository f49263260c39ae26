//! `hub agent` both ways, the real binary: two sites' folders of balance files, each with its
//! agent, on one real hub, and a third site changing balances through the API. A change in
//! either folder reaches the other folder, and one through the API reaches both; changes made
//! at once in both folders and through the API end in one balance in both files and the hub,
//! the initial one plus every change; an agent killed at any point and restarted loses and
//! doubles nothing, and catches up from its cursor with what changed while it was down; a
//! write cut short by a kill is settled at the next start, never read back as a local change;
//! the agent's own writes are never pushed back; a local change made while the agent writes
//! is reconciled, not overwritten; a refused local change leaves the hub's balance in the
//! file; a rewritten file keeps its permissions, owner and other keys;
//! a user without a file gets none; `--push-only` never writes a file, and only it runs for a
//! site that may not read the change feed.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use support::agent::{Agent, Files, PATIENCE, config_file};
use support::{SiteClient, TestHub, test_config};
use tempfile::TempDir;

/// The two sites whose folders the agents keep, and a third that writes through the API.
const A: &str = "roflfaucet";
const B: &str = "clickforcharity";
const API: &str = "wrc";
const USER: &str = "8-evans";

/// Tests read balances often; the per-user limit must not slow the agents down.
fn generous_limits(config: &mut hub::config::Config) {
    config.limits.requests_per_minute = 1_000_000;
}

/// A hub, the agents' configuration, and the two sites' folders.
struct TwoSites {
    hub: TestHub,
    _config_dir: TempDir,
    config: PathBuf,
    a: Files,
    b: Files,
}

impl TwoSites {
    async fn new() -> TwoSites {
        let hub = TestHub::start_with(generous_limits).await;
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_file(&config_dir);
        TwoSites { hub, _config_dir: config_dir, config, a: Files::new(), b: Files::new() }
    }

    /// Starts site A's agent, two-way, and waits for its first check.
    async fn start_a(&self) -> Agent {
        Agent::start_for(A, &self.hub.url, &self.config, &self.a, &[]).await
    }

    async fn start_b(&self) -> Agent {
        Agent::start_for(B, &self.hub.url, &self.config, &self.b, &[]).await
    }

    /// The user's balance as the third site's backend sees it through the API.
    fn api(&self, user: &str) -> SiteClient {
        self.hub.site(API, user)
    }

    fn database(&self) -> PathBuf {
        self.hub.dir.path().join("hub.sqlite3")
    }
}

/// The logs of `agents`, for a failure's message.
fn logs(agents: &[&Agent]) -> String {
    agents.iter().map(|agent| agent.log()).collect::<Vec<_>>().join("\n----\n")
}

/// Waits until `files` shows `expected` coins for `user`; how long that took.
async fn until_file(files: &Files, user: &str, expected: i64, agents: &[&Agent]) -> Duration {
    let start = Instant::now();
    loop {
        let now = files.coins(user);
        if now == Some(expected) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{user}.json shows {now:?} coins, not {expected}, after {PATIENCE:?}; the agents' logs:\n{}",
            logs(agents)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the agent has prepared a write of the user's file and noted it in its state
/// file: it then waits for the file's lock, which the test holds.
async fn until_writing(files: &Files, agent: &Agent) {
    let deadline = Instant::now() + PATIENCE;
    while files.state().get("writing").is_none() {
        assert!(Instant::now() < deadline, "the agent never prepared its write; its log:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The user's coins as the hub has them.
async fn hub_coins(page: &SiteClient) -> Option<i64> {
    page.get("balance").await.assert_ok()["data"]["coins"].as_i64()
}

/// Waits until the hub has `expected` coins for the page's user.
async fn until_hub(page: &SiteClient, expected: i64, agents: &[&Agent]) {
    let start = Instant::now();
    loop {
        let now = hub_coins(page).await;
        if now == Some(expected) {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the hub has {now:?} coins, not {expected}, after {PATIENCE:?}; the agents' logs:\n{}",
            logs(agents)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The user's ledger as (delta, result) pairs.
fn ledger(database: &Path, user: &str) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open(database).unwrap();
    let mut stmt = conn.prepare("SELECT delta, result FROM ledger WHERE user_id = ?1 ORDER BY id").unwrap();
    stmt.query_map([user], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

/// Asserts that the hub, both files and the ledger all end at `expected`: the ledger's
/// changes add up to it, so nothing was applied twice or lost on the way.
async fn assert_everywhere(sites: &TwoSites, expected: i64, agents: &[&Agent]) {
    until_hub(&sites.api(USER), expected, agents).await;
    until_file(&sites.a, USER, expected, agents).await;
    until_file(&sites.b, USER, expected, agents).await;
    let ledger = ledger(&sites.database(), USER);
    let sum: i64 = ledger.iter().map(|(delta, _)| delta).sum();
    assert_eq!((sum, ledger.last().map(|(_, result)| *result)), (expected, Some(expected)), "{ledger:?}");
}

#[tokio::test]
async fn a_change_in_either_folder_reaches_the_other_and_is_never_pushed_back() {
    let sites = TwoSites::new().await;
    sites.a.write(USER, 100);
    sites.b.write(USER, 0);
    let a = sites.start_a().await;
    until_hub(&sites.api(USER), 100, &[&a]).await;
    // B sees the user for the first time: the hub's balance is kept and written into its file.
    let b = sites.start_b().await;
    until_file(&sites.b, USER, 100, &[&a, &b]).await;

    sites.a.add(USER, 25);
    let took = until_file(&sites.b, USER, 125, &[&a, &b]).await;
    println!("a change in A's folder reached B's folder in {took:?}");
    sites.b.add(USER, -40);
    let took = until_file(&sites.a, USER, 85, &[&a, &b]).await;
    println!("a change in B's folder reached A's folder in {took:?}");
    sites.a.add(USER, 3);
    let took = until_file(&sites.b, USER, 88, &[&a, &b]).await;
    println!("a second change in A's folder reached B's folder in {took:?}");

    let (log_a, log_b) = (a.stop().await, b.stop().await);
    assert!(log_b.contains(&format!("{USER}: wrote the hub's 125 coins")), "{log_b}");
    assert!(log_a.contains(&format!("{USER}: wrote the hub's 85 coins")), "{log_a}");
    // Each change is in the ledger once: no agent pushed back what it wrote.
    assert_eq!(ledger(&sites.database(), USER), vec![(100, 100), (25, 125), (-40, 85), (3, 88)]);
}

#[tokio::test]
async fn a_change_through_the_api_reaches_both_folders() {
    let sites = TwoSites::new().await;
    sites.a.write(USER, 50);
    sites.b.write(USER, 50);
    let a = sites.start_a().await;
    until_hub(&sites.api(USER), 50, &[&a]).await;
    let b = sites.start_b().await;

    let start = Instant::now();
    sites.api(USER).delta("balance", 30, "api-bonus").await.assert_ok();
    until_file(&sites.a, USER, 80, &[&a, &b]).await;
    until_file(&sites.b, USER, 80, &[&a, &b]).await;
    println!("a change through the API reached both folders in {:?}", start.elapsed());
    a.stop().await;
    b.stop().await;
    assert_eq!(ledger(&sites.database(), USER), vec![(50, 50), (30, 80)]);
}

/// `count` earnings and spendings of assorted sizes (-17 to +23 coins, never 0 or -1: the API
/// refuses a delta of 0, which some tests make of `change + 1`), differing by `seed`.
fn changes(seed: i64, count: i64) -> Vec<i64> {
    (0..count)
        .map(|i| match ((i * 37 + seed * 11) % 41) - 17 {
            0 | -1 => 20,
            change => change,
        })
        .collect()
}

/// Applies `list` to the user's file one change at a time, `pause_ms` apart, as the site's
/// PHP would.
async fn change_file(files: &Files, list: Vec<i64>, pause_ms: u64) {
    for change in list {
        files.add(USER, change);
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
}

#[tokio::test]
async fn changes_at_once_in_both_folders_and_through_the_api_end_in_one_balance_equal_to_their_sum() {
    const INITIAL: i64 = 1000;
    let sites = TwoSites::new().await;
    sites.a.write(USER, INITIAL);
    sites.b.write(USER, INITIAL);
    let a = sites.start_a().await;
    until_hub(&sites.api(USER), INITIAL, &[&a]).await;
    let b = sites.start_b().await;

    let (in_a, in_b, through_api) = (changes(1, 25), changes(2, 25), changes(3, 25));
    let expected = INITIAL + in_a.iter().chain(&in_b).chain(&through_api).sum::<i64>();
    let api = sites.api(USER);
    let through_api = async {
        for (i, change) in through_api.into_iter().enumerate() {
            api.delta("balance", change, &format!("api-{i}")).await.assert_ok();
            tokio::time::sleep(Duration::from_millis(13)).await;
        }
    };
    tokio::join!(change_file(&sites.a, in_a, 11), change_file(&sites.b, in_b, 17), through_api);

    assert_everywhere(&sites, expected, &[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_agent_killed_at_any_point_and_restarted_loses_and_doubles_nothing() {
    const INITIAL: i64 = 1000;
    let sites = TwoSites::new().await;
    sites.a.write(USER, INITIAL);
    sites.b.write(USER, INITIAL);
    let mut a = sites.start_a().await;
    until_hub(&sites.api(USER), INITIAL, &[&a]).await;
    let b = sites.start_b().await;

    let mut expected = INITIAL;
    let api = sites.api(USER);
    // Each round: changes in both folders and through the API while A's agent runs, A's
    // agent killed in the middle of them, more changes while it is down, then a restart.
    for round in 0..4 {
        for (i, change) in changes(round, 6).into_iter().enumerate() {
            let (in_b, through_api) = (-change / 2, change + 1);
            sites.a.add(USER, change);
            sites.b.add(USER, in_b);
            api.delta("balance", through_api, &format!("api-{round}-{i}")).await.assert_ok();
            expected += change + in_b + through_api;
            tokio::time::sleep(Duration::from_millis(3 * i as u64 + round as u64)).await;
        }
        a.kill().await;
        sites.a.add(USER, 5);
        sites.b.add(USER, -2);
        api.delta("balance", 7, &format!("api-{round}-down")).await.assert_ok();
        expected += 5 - 2 + 7;
        a = Agent::start_for(A, &sites.hub.url, &sites.config, &sites.a, &[]).await;
    }
    assert_everywhere(&sites, expected, &[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_restarted_agent_catches_up_from_its_cursor_with_what_changed_while_it_was_down() {
    let sites = TwoSites::new().await;
    sites.a.write(USER, 200);
    sites.b.write(USER, 200);
    let a = sites.start_a().await;
    until_hub(&sites.api(USER), 200, &[&a]).await;
    let b = sites.start_b().await;
    sites.api(USER).delta("balance", 1, "before").await.assert_ok();
    until_file(&sites.a, USER, 201, &[&a, &b]).await;
    a.stop().await;
    let cursor = sites.a.state()["cursor"].clone();
    assert!(cursor.is_string(), "the state file keeps the feed's cursor: {}", sites.a.state());

    // While A's agent is down: the API, B's folder, and A's own folder change.
    sites.api(USER).delta("balance", 30, "while-down").await.assert_ok();
    sites.b.add(USER, -10);
    until_hub(&sites.api(USER), 221, &[&b]).await;
    sites.a.add(USER, 4);

    let start = Instant::now();
    let a = sites.start_a().await;
    until_file(&sites.a, USER, 225, &[&a, &b]).await;
    println!("the restarted agent caught up in {:?}", start.elapsed());
    assert_everywhere(&sites, 225, &[&a, &b]).await;
    a.stop().await;
    b.stop().await;
    let moved = sites.a.state()["cursor"].clone();
    assert!(moved.is_string() && moved != cursor, "the cursor moved on: {cursor} → {moved}");
}

#[tokio::test]
async fn a_local_change_made_while_the_agent_writes_is_reconciled_not_overwritten() {
    let sites = TwoSites::new().await;
    sites.a.write(USER, 100);
    let a = sites.start_a().await;
    until_hub(&sites.api(USER), 100, &[&a]).await;

    // The site's PHP holds the file locked, as for a spend, while another site's change
    // arrives: the agent prepares its write and waits for the lock.
    let (mut file, _) = sites.a.lock(USER);
    sites.api(USER).delta("balance", 50, "elsewhere").await.assert_ok();
    let temp = sites.a.path(&format!(".{USER}.json{}", hub_agent::TEMP_SUFFIX));
    until_writing(&sites.a, &a).await;
    // The spend lands in the file, and the lock is let go.
    use std::io::{Seek, Write};
    file.set_len(0).unwrap();
    file.rewind().unwrap();
    file.write_all(json!({ "coins": 90 }).to_string().as_bytes()).unwrap();
    drop(file);

    // The spend reaches the hub, added to the other site's change; the file then shows that.
    until_hub(&sites.api(USER), 140, &[&a]).await;
    until_file(&sites.a, USER, 140, &[&a]).await;
    let log = a.stop().await;
    assert!(log.contains("the local change -10 was added to it"), "{log}");
    assert_eq!(ledger(&sites.database(), USER), vec![(100, 100), (50, 150), (-10, 140)]);
    assert!(!temp.exists());
}

#[tokio::test]
async fn a_write_cut_short_by_a_kill_is_settled_at_the_next_start_and_never_read_as_a_local_change() {
    let sites = TwoSites::new().await;
    sites.a.write(USER, 100);
    let a = sites.start_a().await;
    until_hub(&sites.api(USER), 100, &[&a]).await;

    // Killed while its write waits for the file's lock: the file was not replaced.
    let (file, _) = sites.a.lock(USER);
    sites.api(USER).delta("balance", 50, "elsewhere").await.assert_ok();
    let temp = sites.a.path(&format!(".{USER}.json{}", hub_agent::TEMP_SUFFIX));
    until_writing(&sites.a, &a).await;
    a.kill().await;
    drop(file);
    let killed_while_writing = std::fs::read(sites.a.state_file()).unwrap();
    assert_eq!(sites.a.state()["writing"]["to"]["file"], 150, "{}", sites.a.state());
    assert_eq!(sites.a.coins(USER), Some(100));

    // The next start writes it, and removes what the cut write left.
    let a = sites.start_a().await;
    until_file(&sites.a, USER, 150, &[&a]).await;
    a.stop().await;
    assert!(!temp.exists());

    // As if killed right after the rename, before the agreement was written down: the state
    // still names the write under way, and the file shows its coins. They are the agent's
    // own, not a local change of +50 to push.
    std::fs::write(sites.a.state_file(), &killed_while_writing).unwrap();
    let stored = sites.hub.snapshot();
    let a = sites.start_a().await;
    let log = a.stop().await;
    assert_eq!(sites.hub.snapshot(), stored, "the restart wrote to the hub; its log:\n{log}");
    assert_eq!(sites.a.coins(USER), Some(150));
    assert_eq!(ledger(&sites.database(), USER), vec![(100, 100), (50, 150)]);
}

#[tokio::test]
async fn a_refused_local_change_leaves_the_hubs_balance_in_the_file() {
    let sites = TwoSites::new().await;
    sites.a.write(USER, 100);
    let a = sites.start_a().await;
    until_hub(&sites.api(USER), 100, &[&a]).await;
    a.stop().await;

    // While the agent is down, another site spends 80 and the site's own PHP spends 50.
    sites.api(USER).delta("balance", -80, "spent-elsewhere").await.assert_ok();
    sites.a.write(USER, 50);
    let a = sites.start_a().await;
    until_file(&sites.a, USER, 20, &[&a]).await;
    assert!(a.log().contains("the hub refused the local change -50 (insufficient_funds"), "{}", a.log());
    // The site's next change starts from what the file shows.
    sites.a.add(USER, 10);
    until_hub(&sites.api(USER), 30, &[&a]).await;
    a.stop().await;
    assert_eq!(ledger(&sites.database(), USER), vec![(100, 100), (-80, 20), (10, 30)]);
}

#[tokio::test]
async fn a_rewritten_file_keeps_its_permissions_owner_and_other_keys() {
    let sites = TwoSites::new().await;
    let body = json!({ "coins": 60, "balance": "60", "last_updated": "2025-11-09 18:45:30", "streak": 4 });
    std::fs::write(sites.a.file(USER), body.to_string()).unwrap();
    std::fs::set_permissions(sites.a.file(USER), std::fs::Permissions::from_mode(0o640)).unwrap();
    // As root (the agent then may give the file to anyone), the file belongs to another user.
    let root = std::fs::metadata(sites.a.file(USER)).unwrap().uid() == 0;
    if root {
        std::os::unix::fs::chown(sites.a.file(USER), Some(4321), Some(4322)).unwrap();
    }
    let owner = std::fs::metadata(sites.a.file(USER)).map(|m| (m.uid(), m.gid())).unwrap();
    let a = sites.start_a().await;
    until_hub(&sites.api(USER), 60, &[&a]).await;

    sites.api(USER).delta("balance", 15, "elsewhere").await.assert_ok();
    until_file(&sites.a, USER, 75, &[&a]).await;
    a.stop().await;
    let meta = std::fs::metadata(sites.a.file(USER)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), owner, "the owner is kept (running as root: {root})");
    let written = sites.a.json(USER);
    assert_eq!((written["coins"].clone(), written["balance"].clone()), (json!(75), json!("75")));
    assert_eq!(written["streak"], 4);
    let stamp = written["last_updated"].as_str().unwrap();
    assert!(stamp != "2025-11-09 18:45:30" && stamp.len() == 19 && stamp.as_bytes()[10] == b' ', "{stamp}");
}

#[tokio::test]
async fn a_user_without_a_file_gets_none() {
    let sites = TwoSites::new().await;
    sites.a.write(USER, 10);
    let a = sites.start_a().await;
    until_hub(&sites.api(USER), 10, &[&a]).await;

    // Carol changes first: by the time the user's change is in the file, the agent has read
    // hers too, in the feed's order.
    sites.api("carol").delta("balance", 40, "carol-bonus").await.assert_ok();
    sites.api(USER).delta("balance", 5, "bonus").await.assert_ok();
    until_file(&sites.a, USER, 15, &[&a]).await;
    a.stop().await;
    let mut names: Vec<String> = std::fs::read_dir(sites.a.dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec![hub_agent::STATE_FILE.to_owned(), format!("{USER}.json")]);
}

#[tokio::test]
async fn push_only_never_writes_a_file() {
    let sites = TwoSites::new().await;
    sites.a.write(USER, 70);
    sites.b.write(USER, 70);
    let push_only = ["--push-only".as_ref()];
    let a = Agent::start_for(A, &sites.hub.url, &sites.config, &sites.a, &push_only).await;
    until_hub(&sites.api(USER), 70, &[&a]).await;
    let b = sites.start_b().await;
    let before = std::fs::read(sites.a.file(USER)).unwrap();

    sites.api(USER).delta("balance", 9, "elsewhere").await.assert_ok();
    until_file(&sites.b, USER, 79, &[&a, &b]).await;
    // A's agent still pushes: a change of its file is added to the hub's balance.
    sites.a.write(USER, 72);
    until_hub(&sites.api(USER), 81, &[&a, &b]).await;
    until_file(&sites.b, USER, 81, &[&a, &b]).await;
    let log = a.stop().await;
    b.stop().await;
    assert!(log.contains("only, state in"), "{log}");
    assert_eq!(sites.a.coins(USER), Some(72), "the push-only agent wrote its file:\n{log}");
    assert_ne!(std::fs::read(sites.a.file(USER)).unwrap(), before, "the test's own write is there");
    assert!(!log.contains("wrote the hub's"), "{log}");
    assert!(sites.a.state().get("cursor").is_none(), "{}", sites.a.state());
}

#[tokio::test]
async fn a_site_that_may_not_read_the_change_feed_runs_only_with_push_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("unused"));
    let site = config.sites.iter_mut().find(|s| s.id == A).unwrap();
    site.scopes.retain(|scope| scope != "changes:read");
    let path = dir.path().join("hub.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let files = Files::new();
    let hub_url = "http://127.0.0.1:1";

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_hub"))
        .arg("agent")
        .arg("--config")
        .arg(&path)
        .args(["--site", A, "--hub", hub_url, "--watch"])
        .arg(files.dir.path())
        .env_remove("HUB_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("may not sign changes:read") && err.contains("--push-only"), "{err}");

    let push_only = Agent::start_for(A, hub_url, &path, &files, &["--push-only".as_ref()]).await;
    push_only.stop().await;
}
