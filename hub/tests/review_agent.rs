//! Review tests of `hub agent` both ways (issue 21), the real binary beside a folder of
//! balance files on a real hub, written the ways a legacy PHP site writes them: a file caught
//! empty or gone at the moment the change feed brings another site's change, a user whose
//! file appears after the feed told of them, amounts written as text, several changes of one
//! user read at once, a state file deleted, the hub down when the agent starts, a temporary
//! file left by a kill, a local spend racing another site's change.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::agent::{Agent, Files, PATIENCE, config_file};
use support::{Deployment, SiteClient, TestHub};
use tempfile::TempDir;

const A: &str = "roflfaucet";
const API: &str = "wrc";
const USER: &str = "8-evans";

fn generous_limits(config: &mut hub::config::Config) {
    config.limits.requests_per_minute = 1_000_000;
}

/// A hub, the agent's configuration and the site's folder.
struct Site {
    hub: TestHub,
    _config_dir: TempDir,
    config: PathBuf,
    files: Files,
}

impl Site {
    async fn new() -> Site {
        let hub = TestHub::start_with(generous_limits).await;
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_file(&config_dir);
        Site { hub, _config_dir: config_dir, config, files: Files::new() }
    }

    async fn start(&self) -> Agent {
        Agent::start_for(A, &self.hub.url, &self.config, &self.files, &[]).await
    }

    fn api(&self, user: &str) -> SiteClient {
        self.hub.site(API, user)
    }

    fn database(&self) -> PathBuf {
        self.hub.dir.path().join("hub.sqlite3")
    }
}

async fn until_file(files: &Files, user: &str, expected: i64, agent: &Agent) {
    let start = Instant::now();
    loop {
        let now = files.coins(user);
        if now == Some(expected) {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{user}.json shows {now:?} coins (content {:?}), not {expected}, after {PATIENCE:?}; the agent's log:\n{}",
            std::fs::read_to_string(files.file(user)).ok(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn until_hub(page: &SiteClient, expected: i64, agent: &Agent) {
    let start = Instant::now();
    loop {
        let now = page.get("balance").await.assert_ok()["data"]["coins"].as_i64();
        if now == Some(expected) {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the hub has {now:?} coins, not {expected}, after {PATIENCE:?}; the agent's log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the agent's state file holds a feed cursor other than `old`; returns it.
async fn until_cursor_other_than(files: &Files, old: &Value, agent: &Agent) -> Value {
    let start = Instant::now();
    loop {
        let now = files.state().get("cursor").cloned().unwrap_or(Value::Null);
        if now.is_string() && now != *old {
            return now;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the state's cursor stayed {now}; state {}; the agent's log:\n{}",
            files.state(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ledger(database: &Path, user: &str) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open(database).unwrap();
    let mut stmt = conn.prepare("SELECT delta, result FROM ledger WHERE user_id = ?1 ORDER BY id").unwrap();
    stmt.query_map([user], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

/// A balance of 100 in the file and the hub; then, while `unreadable` has made the file
/// unreadable, another site spends 80 and the agent reads that change from the feed; then the
/// site's PHP writes the file again with the 100 it showed. The file must come to 20, with
/// nothing pushed back.
async fn a_change_while_the_file_cannot_be_read_reaches_it(unreadable: impl FnOnce(&Path)) {
    let site = Site::new().await;
    site.files.write(USER, 100);
    let agent = site.start().await;
    until_hub(&site.api(USER), 100, &agent).await;
    let cursor = until_cursor_other_than(&site.files, &Value::Null, &agent).await;

    unreadable(&site.files.file(USER));
    site.api(USER).delta("balance", -80, "spent-elsewhere").await.assert_ok();
    // The agent has read the feed's page with that change (and moved its cursor past it).
    until_cursor_other_than(&site.files, &cursor, &agent).await;
    site.files.write(USER, 100);

    until_file(&site.files, USER, 20, &agent).await;
    until_hub(&site.api(USER), 20, &agent).await;
    agent.stop().await;
    assert_eq!(ledger(&site.database(), USER), vec![(100, 100), (-80, 20)]);
}

/// deployment.md, two-way mode: the agent writes what changed elsewhere "so the site's PHP
/// shows and decides on the hub's balance". A PHP `file_put_contents` without a lock
/// truncates the file before it writes: the feed's change that arrives in that moment must
/// still reach the file once PHP's write (of the coins it showed, say a login stamping
/// `last_updated`) is complete. A file left at 100 would let the site's PHP spend coins the
/// user no longer has.
#[tokio::test]
async fn a_change_from_elsewhere_that_comes_while_the_file_is_half_written_still_reaches_the_file() {
    a_change_while_the_file_cannot_be_read_reaches_it(|file| std::fs::write(file, b"").unwrap()).await;
}

/// The same promise for a file that PHP deletes and creates again (`unlink`, then
/// `file_put_contents`): a change made elsewhere while it was gone must reach it.
#[tokio::test]
async fn a_file_deleted_and_created_again_gets_what_changed_elsewhere_while_it_was_gone() {
    a_change_while_the_file_cannot_be_read_reaches_it(|file| std::fs::remove_file(file).unwrap()).await;
}

/// deployment.md: "Once the site creates a user's file, the agent compares it with the hub as
/// at first sight, and writes the hub's balance into it if they differ" — also for a user
/// the feed already told the agent of.
#[tokio::test]
async fn a_file_created_after_the_feed_told_of_its_user_gets_the_hubs_balance() {
    let site = Site::new().await;
    site.files.write(USER, 10);
    let agent = site.start().await;
    until_hub(&site.api(USER), 10, &agent).await;
    let cursor = until_cursor_other_than(&site.files, &Value::Null, &agent).await;
    site.api("carol").delta("balance", 40, "carol-bonus").await.assert_ok();
    until_cursor_other_than(&site.files, &cursor, &agent).await;
    assert!(!site.files.file("carol").exists());

    site.files.write("carol", 0);
    until_file(&site.files, "carol", 40, &agent).await;
    until_hub(&site.api("carol"), 40, &agent).await;
    agent.stop().await;
    assert_eq!(ledger(&site.database(), "carol"), vec![(40, 40)]);
}

/// A `balance` written as text with PHP's line break ("40\n") is read, and the hub's change
/// is written back as text.
#[tokio::test]
async fn a_balance_written_as_text_gets_the_change_as_text() {
    let site = Site::new().await;
    std::fs::write(site.files.file(USER), json!({ "balance": "40\n" }).to_string()).unwrap();
    let agent = site.start().await;
    until_hub(&site.api(USER), 40, &agent).await;
    site.api(USER).delta("balance", 2, "bonus").await.assert_ok();
    until_file(&site.files, USER, 42, &agent).await;
    agent.stop().await;
    assert_eq!(site.files.json(USER)["balance"], json!("42"));
    assert_eq!(ledger(&site.database(), USER), vec![(40, 40), (2, 42)]);
}

/// Several changes of one user, read in one page after the agent's downtime, end in the
/// last, pushing nothing back.
#[tokio::test]
async fn several_changes_of_one_user_in_one_feed_page_end_in_the_last() {
    let site = Site::new().await;
    site.files.write(USER, 100);
    let agent = site.start().await;
    until_hub(&site.api(USER), 100, &agent).await;
    until_cursor_other_than(&site.files, &Value::Null, &agent).await;
    agent.stop().await;
    for (i, change) in [10, -30, 7, 1].into_iter().enumerate() {
        site.api(USER).delta("balance", change, &format!("down-{i}")).await.assert_ok();
    }
    let agent = site.start().await;
    until_file(&site.files, USER, 88, &agent).await;
    agent.stop().await;
    assert_eq!(ledger(&site.database(), USER), vec![(100, 100), (10, 110), (-30, 80), (7, 87), (1, 88)]);
}

/// deployment.md: "Deleting the state file is safe: every file is then compared with the hub
/// as at a first start" — nothing is pushed again, and changes flow both ways afterwards.
#[tokio::test]
async fn a_deleted_state_file_pushes_nothing_again() {
    let site = Site::new().await;
    site.files.write(USER, 100);
    let agent = site.start().await;
    until_hub(&site.api(USER), 100, &agent).await;
    site.api(USER).delta("balance", 5, "bonus").await.assert_ok();
    until_file(&site.files, USER, 105, &agent).await;
    agent.stop().await;
    std::fs::remove_file(site.files.state_file()).unwrap();
    let stored = site.hub.snapshot();
    let agent = site.start().await;
    assert_eq!(site.hub.snapshot(), stored, "{}", agent.log());
    site.files.add(USER, -5);
    until_hub(&site.api(USER), 100, &agent).await;
    site.api(USER).delta("balance", 3, "bonus-2").await.assert_ok();
    until_file(&site.files, USER, 103, &agent).await;
    agent.stop().await;
    assert_eq!(ledger(&site.database(), USER), vec![(100, 100), (5, 105), (-5, 100), (3, 103)]);
}

/// An agent started while the hub is down pushes the files and reads the feed once the hub
/// is up.
#[tokio::test]
async fn an_agent_started_while_the_hub_is_down_syncs_once_it_is_up() {
    let deployment = Deployment::new(generous_limits);
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(&config_dir);
    let files = Files::new();
    files.write(USER, 30);
    let agent = Agent::spawn_for(A, &deployment.url(), &config, &files, &[]);
    agent.wait_for_log("no answer from the hub").await;
    let mut hub = deployment.start().await;
    let api = deployment.backend(API, USER, Duration::from_secs(10));
    until_hub(&api, 30, &agent).await;
    api.delta("balance", 5, "bonus").await.assert_ok();
    until_file(&files, USER, 35, &agent).await;
    agent.stop().await;
    hub.kill().await.unwrap();
}

/// A temporary file of the agent's left by a kill (with no write noted) is removed at the
/// next start, and the balance file is left as it is.
#[tokio::test]
async fn a_temporary_file_left_by_a_kill_is_removed_and_the_file_kept() {
    let site = Site::new().await;
    site.files.write(USER, 100);
    let agent = site.start().await;
    until_hub(&site.api(USER), 100, &agent).await;
    agent.stop().await;
    let temp = site.files.path(&format!(".{USER}.json{}", hub_agent::TEMP_SUFFIX));
    std::fs::write(&temp, json!({ "coins": 999 }).to_string()).unwrap();
    let agent = site.start().await;
    assert!(!temp.exists(), "{}", agent.log());
    assert_eq!(site.files.coins(USER), Some(100));
    agent.stop().await;
    assert_eq!(ledger(&site.database(), USER), vec![(100, 100)]);
}

/// A local spend to 0 racing another site's credit: the spend is added to the credit, and
/// the file shows the sum.
#[tokio::test]
async fn a_local_spend_to_zero_racing_a_credit_elsewhere_ends_in_their_sum() {
    let site = Site::new().await;
    site.files.write(USER, 10);
    let agent = site.start().await;
    until_hub(&site.api(USER), 10, &agent).await;
    agent.stop().await;
    site.api(USER).delta("balance", 50, "credit-elsewhere").await.assert_ok();
    site.files.write(USER, 0);
    let agent = site.start().await;
    until_file(&site.files, USER, 50, &agent).await;
    until_hub(&site.api(USER), 50, &agent).await;
    agent.stop().await;
    assert_eq!(ledger(&site.database(), USER), vec![(10, 10), (50, 60), (-10, 50)]);
}
