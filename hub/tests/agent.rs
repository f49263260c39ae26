//! `hub agent`, the real binary, beside a site's folder of balance files and a real hub: a
//! change of a file reaches the hub, however it is written; an amount written as text of
//! digits is read, spaces or a line break around them aside; files that are not balances are
//! skipped, and counted in the lines that end the first check and the run; a change made
//! while the hub is down arrives when it is back; a change another site made meanwhile is
//! kept and the local change added to it; a restarted agent pushes nothing again and applies
//! nothing twice; at first sight the hub's balance is canonical; a hub on a new database gets
//! every file again; the hub accepts the agent's tokens however the site's key is configured;
//! a hub whose certificate a private authority signed is reached with `--ca-file`, and
//! refused, saying so, without it; and all of it works the same against a hub whose store is
//! PostgreSQL, the agent writing into the file what another site changed while it was down.
//!
//! The stories about a file's changes alone (a merge, a refusal, a restart from an older
//! state file, a push cut short) run the agent with `--push-only`: both ways, it would write
//! the hub's balance into the file between their steps, which the next local write would
//! start from. `agent_two_way.rs` tells the two-way stories.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use hub::auth::Keys;
use hub::config::{Site, SiteKey};
use protocol::{SiteId, UserId};
use rand_core::OsRng;
use serde_json::{Value, json};
use support::agent::{Agent, Files, PATIENCE, config_file};
use support::{Deployment, SiteClient, TestHub, site_secret, test_config, trusted_site};

/// The site whose files the agent pushes.
const SITE: &str = "roflfaucet";
/// Another site, changing the same balances through the API.
const OTHER: &str = "clickforcharity";
const USER: &str = "8-evans";

/// Tests read balances often; the per-user limit must not slow the agent down.
fn generous_limits(config: &mut hub::config::Config) {
    config.limits.requests_per_minute = 1_000_000;
}

/// The agent of [`SITE`]: its tests start it through these.
impl Agent {
    /// Starts the agent on `files`, and waits until it has compared every file with the hub.
    async fn start(hub_url: &str, config: &Path, files: &Files) -> Agent {
        Agent::start_for(SITE, hub_url, config, files, &[]).await
    }

    /// Starts the agent without waiting for anything.
    fn spawn(hub_url: &str, config: &Path, files: &Files) -> Agent {
        Agent::spawn_for(SITE, hub_url, config, files, &[])
    }

    /// Starts the agent with more arguments, without waiting for anything.
    fn spawn_with(hub_url: &str, config: &Path, files: &Files, more: &[&std::ffi::OsStr]) -> Agent {
        Agent::spawn_for(SITE, hub_url, config, files, more)
    }

    /// Starts the agent with `--push-only`, for a story about the files' changes alone: in
    /// two-way mode the agent would also write the hub's balance into the file meanwhile, which
    /// the story's next local write would then start from.
    async fn start_push_only(hub_url: &str, config: &Path, files: &Files) -> Agent {
        Agent::start_for(SITE, hub_url, config, files, &["--push-only".as_ref()]).await
    }
}

/// The user's coins as the hub has them.
async fn coins(page: &SiteClient) -> Option<i64> {
    page.get("balance").await.assert_ok()["data"]["coins"].as_i64()
}

/// Polls the hub until the user has `expected` coins; returns how long that took.
async fn until_hub_has(page: &SiteClient, expected: i64, agent: &Agent) -> Duration {
    let start = Instant::now();
    loop {
        let now = coins(page).await;
        if now == Some(expected) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the hub has {now:?} coins, not {expected}, after {PATIENCE:?}; the agent's log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls the user's file until it shows `expected` coins.
async fn until_file_has(files: &Files, expected: i64, agent: &Agent) {
    let deadline = Instant::now() + PATIENCE;
    while files.coins(USER) != Some(expected) {
        assert!(
            Instant::now() < deadline,
            "the file shows {:?} coins, not {expected}, after {PATIENCE:?}; the agent's log:\n{}",
            files.coins(USER),
            agent.log()
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

fn state(files: &Files) -> Value {
    files.state()
}

#[tokio::test]
async fn the_agent_works_unchanged_against_a_hub_on_postgresql() {
    let url = support::postgres::Cluster::shared().database();
    let hub = TestHub::start_with(|config| {
        generous_limits(config);
        config.store.backend = hub::config::Backend::Postgres;
        config.store.url = Some(url.clone());
    })
    .await;
    let config_dir = tempfile::tempdir().unwrap();
    let files = Files::new();
    files.write(USER, 150);
    let page = hub.site(OTHER, USER);

    let agent = Agent::start(&hub.url, &config_file(&config_dir), &files).await;
    until_hub_has(&page, 150, &agent).await;
    files.replace(USER, 175);
    until_hub_has(&page, 175, &agent).await;
    agent.stop().await;
    // Another site spends meanwhile; the restarted agent writes it into the file, and pushes
    // the file's next change.
    page.delta("balance", -25, "spent-elsewhere").await.assert_ok();
    let agent = Agent::start(&hub.url, &config_file(&config_dir), &files).await;
    until_file_has(&files, 150, &agent).await;
    files.write(USER, 160);
    until_hub_has(&page, 160, &agent).await;
    agent.stop().await;
    let ledger = support::postgres::Cluster::shared().psql(
        &url,
        &format!("SELECT delta || ':' || result FROM ledger WHERE user_id = '{USER}' ORDER BY id"),
    );
    assert_eq!(ledger, "150:150\n25:175\n-25:150\n10:160");
}

#[tokio::test]
async fn a_changed_file_reaches_the_hub() {
    let hub = TestHub::start_with(generous_limits).await;
    let config_dir = tempfile::tempdir().unwrap();
    let files = Files::new();
    files.write(USER, 150);
    let page = hub.site(OTHER, USER);

    let agent = Agent::start(&hub.url, &config_file(&config_dir), &files).await;
    let took = until_hub_has(&page, 150, &agent).await;
    println!("a file found at start reached the empty hub {took:?} after the agent's first check");

    files.write(USER, 175);
    let took = until_hub_has(&page, 175, &agent).await;
    println!("a file written in place reached the hub in {took:?}");

    files.write(USER, 60);
    let took = until_hub_has(&page, 60, &agent).await;
    println!("a second change reached the hub in {took:?}");
    let log = agent.stop().await;
    assert!(log.contains(&format!("{USER}: pushed, the hub has 60 coins")), "{log}");
    let pushes: Vec<_> = ledger(&hub.dir.path().join("hub.sqlite3"), USER);
    assert_eq!(pushes, vec![(150, 150), (25, 175), (-115, 60)]);
}

#[tokio::test]
async fn a_temp_file_renamed_over_the_balance_file_is_picked_up() {
    let hub = TestHub::start_with(generous_limits).await;
    let config_dir = tempfile::tempdir().unwrap();
    let files = Files::new();
    let agent = Agent::start(&hub.url, &config_file(&config_dir), &files).await;

    // A user's first file, and a later one, each arriving by rename.
    files.replace(USER, 120);
    let took = until_hub_has(&hub.site(OTHER, USER), 120, &agent).await;
    println!("a new file renamed into place reached the hub in {took:?}");
    files.replace(USER, 95);
    let took = until_hub_has(&hub.site(OTHER, USER), 95, &agent).await;
    println!("a file renamed over the old one reached the hub in {took:?}");
    agent.stop().await;
}

#[tokio::test]
async fn malformed_and_misnamed_files_are_skipped_and_the_agent_goes_on() {
    let hub = TestHub::start_with(generous_limits).await;
    let config_dir = tempfile::tempdir().unwrap();
    let files = Files::new();
    std::fs::write(files.path("bad name.json"), r#"{"coins": 5}"#).unwrap();
    std::fs::write(files.path("notes.txt"), "not a balance").unwrap();
    std::fs::write(files.path("carol.json"), r#"{"coins": -1}"#).unwrap();
    let mut agent = Agent::start(&hub.url, &config_file(&config_dir), &files).await;
    let log = agent.log();
    assert!(log.contains("skipping bad name.json: the file name is not a user id"), "{log}");
    assert!(log.contains("skipping carol.json: coins is not a whole number of at least 0"), "{log}");
    assert!(!log.contains("notes.txt"), "{log}");
    // The line that ends the first check counts and names them.
    assert!(
        log.contains(
            "WARN hub_agent: checked 1 balance files against the hub; 2 files skipped and not synced until \
             fixed: bad name.json, carol.json; watching for changes"
        ),
        "{log}"
    );

    // A file caught half written is skipped; the complete write after it is pushed.
    std::fs::write(files.path(&format!("{USER}.json")), r#"{"coins": 4"#).unwrap();
    agent.wait_for_log(&format!("skipping {USER}.json: not JSON")).await;
    assert!(
        agent.log().contains("it is read again when it changes (3 files skipped in all)"),
        "{}",
        agent.log()
    );
    agent.assert_running();
    files.write(USER, 40);
    until_hub_has(&hub.site(OTHER, USER), 40, &agent).await;
    // The line the agent stops with counts what is still skipped: not a file that was fixed or
    // removed since.
    std::fs::remove_file(files.path("bad name.json")).unwrap();
    let log = agent.stop().await;
    assert!(
        log.contains("WARN hub_agent: agent stopped; 1 file skipped and not synced until fixed: carol.json"),
        "{log}"
    );
    let carol = hub.site(OTHER, "carol").get("balance").await;
    assert_eq!(carol.assert_ok()["version"], 0, "nothing was pushed for a bad file");
}

#[tokio::test]
async fn an_amount_written_as_text_with_spaces_or_a_line_break_is_pushed_and_other_text_skipped() {
    let hub = TestHub::start_with(generous_limits).await;
    let config_dir = tempfile::tempdir().unwrap();
    let files = Files::new();
    for (user, coins) in [
        // As PHP writes an amount it read from a file with fgets, line break and all.
        ("read-line", r#""100\n""#),
        ("spaced", r#"" 100 ""#),
        ("signed", r#""+100""#),
        ("exponent", r#""1e3""#),
        ("empty", r#""""#),
        ("decimal", r#""10.5""#),
    ] {
        std::fs::write(files.path(&format!("{user}.json")), format!(r#"{{"coins": {coins}}}"#)).unwrap();
    }
    let agent = Agent::start(&hub.url, &config_file(&config_dir), &files).await;
    until_hub_has(&hub.site(OTHER, "read-line"), 100, &agent).await;
    until_hub_has(&hub.site(OTHER, "spaced"), 100, &agent).await;
    let log = agent.stop().await;
    for (user, text) in [("signed", "+100"), ("exponent", "1e3"), ("empty", ""), ("decimal", "10.5")] {
        let skipped = format!(
            "skipping {user}.json: coins is the text {text:?}, which is not a whole number written in digits only"
        );
        assert!(log.contains(&skipped), "{skipped} in:\n{log}");
        let balance = hub.site(OTHER, user).get("balance").await;
        assert_eq!(balance.assert_ok()["version"], 0, "nothing was pushed for {user}");
    }
}

#[tokio::test]
async fn a_change_made_while_the_hub_is_down_arrives_after_it_restarts() {
    let deployment = Deployment::new(generous_limits);
    let config = deployment.dir.path().join("hub.toml");
    let files = Files::new();
    files.write(USER, 100);
    let mut hub = deployment.start().await;
    let page = deployment.backend(OTHER, USER, Duration::from_secs(10));
    let agent = Agent::start(&deployment.url(), &config, &files).await;
    until_hub_has(&page, 100, &agent).await;

    hub.kill().await.unwrap();
    files.write(USER, 130);
    agent.wait_for_log("no answer from the hub").await;
    let _hub = deployment.start().await;
    let took = until_hub_has(&page, 130, &agent).await;
    println!("the change made during the outage reached the hub {took:?} after it came back");
    agent.stop().await;
}

#[tokio::test]
async fn a_balance_another_site_changed_keeps_that_change_and_gets_the_local_one() {
    let hub = TestHub::start_with(generous_limits).await;
    let config_dir = tempfile::tempdir().unwrap();
    let files = Files::new();
    files.write(USER, 100);
    let other = hub.site(OTHER, USER);
    let agent = Agent::start_push_only(&hub.url, &config_file(&config_dir), &files).await;
    until_hub_has(&other, 100, &agent).await;

    other.delta("balance", 50, "other-site-bonus").await.assert_ok();
    files.write(USER, 90);
    until_hub_has(&other, 140, &agent).await;
    files.write(USER, 80);
    until_hub_has(&other, 130, &agent).await;
    let log = agent.stop().await;
    assert!(log.contains("the local change -10 was added to it: the hub has 140 coins"), "{log}");
    let results: Vec<i64> = ledger(&hub.dir.path().join("hub.sqlite3"), USER).iter().map(|r| r.1).collect();
    assert_eq!(results, vec![100, 150, 140, 130], "the file's stale values were never set");
}

#[tokio::test]
async fn a_refused_local_change_is_reported_and_later_changes_are_added_to_the_hubs_balance() {
    let hub = TestHub::start_with(generous_limits).await;
    let config_dir = tempfile::tempdir().unwrap();
    let files = Files::new();
    files.write(USER, 100);
    let other = hub.site(OTHER, USER);
    let agent = Agent::start_push_only(&hub.url, &config_file(&config_dir), &files).await;
    until_hub_has(&other, 100, &agent).await;

    other.delta("balance", -80, "spent-elsewhere").await.assert_ok();
    files.write(USER, 50);
    agent.wait_for_log("the hub refused the local change -50 (insufficient_funds").await;
    assert_eq!(coins(&other).await, Some(20));
    files.write(USER, 60);
    until_hub_has(&other, 30, &agent).await;
    agent.stop().await;
}

#[tokio::test]
async fn a_restarted_agent_pushes_nothing_again_even_from_an_older_state_file() {
    let hub = TestHub::start_with(generous_limits).await;
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(&config_dir);
    let files = Files::new();
    files.write(USER, 100);
    let other = hub.site(OTHER, USER);
    let agent = Agent::start_push_only(&hub.url, &config, &files).await;
    until_hub_has(&other, 100, &agent).await;
    let deadline = Instant::now() + PATIENCE;
    while state(&files)["users"][USER]["version"] != 1 {
        assert!(Instant::now() < deadline, "the state file never named version 1: {}", state(&files));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let older_state = std::fs::read(files.state_file()).unwrap();

    other.delta("balance", 50, "other-site-bonus").await.assert_ok();
    files.write(USER, 90);
    until_hub_has(&other, 140, &agent).await;
    agent.stop().await;
    let stored = hub.snapshot();

    let log = Agent::start_push_only(&hub.url, &config, &files).await.stop().await;
    assert_eq!(hub.snapshot(), stored, "a restart wrote to the hub; the agent's log:\n{log}");

    // As if the agent had died before writing down what its last push and delta did: it
    // sends them again, and the hub answers them from the first time.
    std::fs::write(files.state_file(), older_state).unwrap();
    let log = Agent::start_push_only(&hub.url, &config, &files).await.stop().await;
    assert_eq!(hub.snapshot(), stored, "a change was applied twice; the agent's log:\n{log}");
    assert_eq!(coins(&other).await, Some(140));
}

#[tokio::test]
async fn a_write_cut_short_by_a_stop_is_finished_at_the_next_start_and_applied_once() {
    let deployment = Deployment::new(generous_limits);
    let config = deployment.dir.path().join("hub.toml");
    let files = Files::new();
    files.write(USER, 100);
    let mut hub = deployment.start().await;
    let page = deployment.backend(OTHER, USER, Duration::from_secs(10));
    let agent = Agent::start_push_only(&deployment.url(), &config, &files).await;
    until_hub_has(&page, 100, &agent).await;
    page.delta("balance", 50, "other-site-bonus").await.assert_ok();

    // The agent records the write it is about to send, then cannot reach the hub.
    hub.kill().await.unwrap();
    files.write(USER, 90);
    agent.wait_for_log("no answer from the hub").await;
    assert_eq!(state(&files)["sending"]["file"], 90, "{}", state(&files));
    let state_while_sending = std::fs::read(files.state_file()).unwrap();
    let _hub = deployment.start().await;
    until_hub_has(&page, 140, &agent).await;
    agent.stop().await;

    // As if it had died after the hub applied the write, before it wrote that down; and the
    // file changed again while it was down.
    std::fs::write(files.state_file(), state_while_sending).unwrap();
    files.write(USER, 85);
    let agent = Agent::start_push_only(&deployment.url(), &config, &files).await;
    assert_eq!(coins(&page).await, Some(135), "the agent's log:\n{}", agent.log());
    let log = agent.stop().await;
    assert!(log.contains("finishing the push under way"), "{log}");
    let results: Vec<i64> = ledger(&deployment.database(), USER).iter().map(|r| r.1).collect();
    assert_eq!(results, vec![100, 150, 140, 135]);
}

#[tokio::test]
async fn at_first_sight_a_different_hub_balance_is_kept() {
    let hub = TestHub::start_with(generous_limits).await;
    let config_dir = tempfile::tempdir().unwrap();
    let files = Files::new();
    let other = hub.site(OTHER, USER);
    other.push("balance", json!({ "coins": 500 })).await.assert_ok();
    files.write(USER, 300);

    let agent = Agent::start(&hub.url, &config_file(&config_dir), &files).await;
    assert_eq!(coins(&other).await, Some(500));
    assert!(
        agent.log().contains("the file says 300 coins, the hub 500 coins (v1); the hub's balance is kept")
    );
    // Written into the file, which the site's next change starts from.
    assert_eq!(files.coins(USER), Some(500), "the agent's log:\n{}", agent.log());
    files.write(USER, 510);
    until_hub_has(&other, 510, &agent).await;
    agent.stop().await;
}

#[tokio::test]
async fn a_hub_on_a_new_database_gets_every_file_again() {
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(&config_dir);
    let files = Files::new();
    files.write(USER, 70);
    let old_hub = TestHub::start_with(generous_limits).await;
    let agent = Agent::start(&old_hub.url, &config, &files).await;
    until_hub_has(&old_hub.site(OTHER, USER), 70, &agent).await;
    agent.stop().await;

    // What the agent remembers about the old database means nothing to a new one.
    let new_hub = TestHub::start_with(generous_limits).await;
    let agent = Agent::start(&new_hub.url, &config, &files).await;
    assert_eq!(coins(&new_hub.site(OTHER, USER)).await, Some(70), "the agent's log:\n{}", agent.log());
    let log = agent.stop().await;
    assert!(log.contains("the hub has a new database"), "{log}");
}

#[test]
fn the_agent_refuses_to_start_without_a_key_a_usable_hub_url_folder_or_state_file() {
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(&config_dir);
    let files = Files::new();
    let run = |site: &str, hub_url: &str, dir: &Path, state: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hub"))
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .args(["--site", site, "--hub", hub_url, "--watch"])
            .arg(dir)
            .arg("--state")
            .arg(state)
            .env_remove("HUB_CONFIG")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (dir, state) = (files.dir.path(), files.state_file());
    let err = run("nosuchsite", "http://127.0.0.1:1", dir, &state);
    assert!(err.contains("no site nosuchsite is configured"), "{err}");
    let err = run(SITE, "ftp://hub.example.org", dir, &state);
    assert!(err.contains("must be an http:// or https:// URL"), "{err}");
    let err = run(SITE, "http://127.0.0.1:1", &files.path("missing"), &state);
    assert!(err.contains("cannot watch"), "{err}");
    let err = run(SITE, "http://127.0.0.1:1", dir, &files.path("missing/state.json"));
    assert!(err.contains("the state file's folder"), "{err}");
    std::fs::write(&state, "{not json").unwrap();
    let err = run(SITE, "http://127.0.0.1:1", dir, &state);
    assert!(err.contains("is damaged; remove it to start afresh"), "{err}");
    std::fs::remove_file(&state).unwrap();
    assert!(!files.state_file().exists(), "a refused start writes nothing");
}

#[test]
fn the_agent_refuses_to_start_for_a_site_that_may_not_set_balances() {
    let config_dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&config_dir.path().join("unused"));
    config.sites.iter_mut().find(|s| s.id == SITE).unwrap().scopes = Site::new(SITE).scopes;
    let path = config_dir.path().join("hub.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let files = Files::new();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hub"))
        .arg("agent")
        .arg("--config")
        .arg(&path)
        .args(["--site", SITE, "--hub", "http://127.0.0.1:1", "--watch"])
        .arg(files.dir.path())
        .env_remove("HUB_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("may not sign amounts:set"), "{err}");
    assert!(!files.state_file().exists(), "a refused start writes nothing");
}

/// The agent reads its site's key as the hub does, from the same configuration, whichever
/// way it is given and whatever else the configuration holds: the hub accepts its tokens,
/// with the agent's scopes, signed by the key the hub would sign with.
#[test]
// figment's `Jail`, which sets the secret's variable for this test alone, fixes the closure's
// error type to its own large `figment::Error`.
#[allow(clippy::result_large_err)]
fn the_hub_accepts_the_agents_tokens_however_the_sites_key_is_configured() {
    const SECRET_VAR: &str = "AGENT_TEST_ROFLFAUCET_SECRET";
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("roflfaucet.secret");
    std::fs::write(&secret_file, format!("{}\n", site_secret(SITE))).unwrap();
    let key = SigningKey::generate(&mut OsRng);
    let private = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let public = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    let trusted = || Site { secret: None, ..trusted_site(SITE, "https://roflfaucet.com") };
    let rotated =
        SiteKey { kid: "2026-12".into(), secret: Some(site_secret("rotated")), ..SiteKey::default() };
    let public_only =
        SiteKey { kid: "verify-only".into(), public_key_pem: Some(public.clone()), ..SiteKey::default() };
    let sites = [
        ("secret", None, Site { secret: Some(site_secret(SITE)), ..trusted() }),
        ("secret_env", None, Site { secret_env: Some(SECRET_VAR.into()), ..trusted() }),
        ("secret_file", None, Site { secret_file: Some(secret_file), ..trusted() }),
        (
            "an EdDSA key pair",
            None,
            Site { public_key_pem: Some(public), private_key_pem: Some(private), ..trusted() },
        ),
        ("[[sites.keys]]", Some("2026-12"), Site { keys: vec![rotated.clone()], ..trusted() }),
        ("a public key first", Some("2026-12"), Site { keys: vec![public_only, rotated], ..trusted() }),
    ];
    figment::Jail::expect_with(|jail| {
        jail.set_env(SECRET_VAR, site_secret(SITE));
        for (given, kid, site) in sites {
            let mut config = test_config(&dir.path().join("unused"));
            config.sites.retain(|s| s.id != SITE);
            config.sites.push(site);
            let keys = Keys::from_config(&config).unwrap();
            let text = toml::to_string(&config).unwrap();
            let read: [hub_agent::Config; 2] = [
                toml::from_str(&text).unwrap(),
                serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap(),
            ];
            for agent_config in read {
                let site = SiteId::parse(SITE).unwrap();
                let signer = hub_agent::Signer::new(&agent_config, site, hub_agent::SCOPES, 120).unwrap();
                let token = signer.mint(&UserId::parse(USER).unwrap()).unwrap();
                let verified = keys.verify(&token).unwrap_or_else(|e| panic!("{given}: {e}"));
                assert_eq!(
                    (verified.site.as_str(), verified.user.as_str(), verified.scopes, verified.admin),
                    (SITE, USER, hub_agent::SCOPES, false),
                    "{given}"
                );
                let header = jsonwebtoken::decode_header(&token).unwrap();
                assert_eq!(header.kid.as_deref(), kid, "{given}");
            }
        }
        Ok(())
    });
}

/// A hub serving HTTPS with a certificate of a private authority, the authority's certificate
/// in `ca.pem` beside its files.
async fn hub_of_a_private_authority(dir: &Path) -> TestHub {
    let issued = support::certs::loopback_signed_by("a private authority");
    std::fs::write(dir.join("ca.pem"), &issued.authority).unwrap();
    https_hub(dir, &issued.cert, &issued.key).await
}

/// A hub serving HTTPS with `cert` and `key` (PEM), written in `dir` as `cert.pem` and `key.pem`.
async fn https_hub(dir: &Path, cert: &str, key: &str) -> TestHub {
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    TestHub::start_with(|config| {
        generous_limits(config);
        config.tls_cert = Some(dir.join("cert.pem"));
        config.tls_key = Some(dir.join("key.pem"));
    })
    .await
}

#[tokio::test]
async fn a_hub_of_a_private_authority_is_reached_with_its_ca_file_and_refused_clearly_without() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_of_a_private_authority(dir.path()).await;
    let config = config_file(&dir);
    let authority =
        reqwest::Certificate::from_pem(&std::fs::read(dir.path().join("ca.pem")).unwrap()).unwrap();
    let page = SiteClient {
        client: reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(authority)
            .build()
            .unwrap(),
        ..hub.site(OTHER, USER)
    };

    // Without the authority, the agent says what is wrong and what to do, as an error, and
    // waits minutes before it tries again rather than spinning.
    let untrusting_files = Files::new();
    untrusting_files.write("carol", 30);
    let mut untrusting = Agent::spawn(&hub.url, &config, &untrusting_files);
    untrusting.wait_for_log("no TLS connection to the hub").await;
    let log = untrusting.log();
    let line = log.lines().find(|l| l.contains("no TLS connection to the hub")).unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert!(line.contains("give the agent that authority's certificate with --ca-file"), "{line}");
    let pause: f64 = line.rsplit_once("trying again in ").unwrap().1.trim_end_matches(" s").parse().unwrap();
    assert!(pause >= 240.0, "a TLS error is tried again after minutes, not {pause} s: {line}");

    // Given the authority's certificate, an agent pushes its files.
    let files = Files::new();
    files.write(USER, 40);
    let ca_file = dir.path().join("ca.pem");
    let trusting = Agent::spawn_with(&hub.url, &config, &files, &["--ca-file".as_ref(), ca_file.as_os_str()]);
    trusting.wait_for_log("balance files against the hub").await;
    until_hub_has(&page, 40, &trusting).await;
    trusting.stop().await;

    // Meanwhile the first agent tried once and is still waiting: its read of carol's balance,
    // and its read of the change feed.
    untrusting.assert_running();
    let log = untrusting.log();
    assert_eq!(log.matches("carol: no TLS connection to the hub").count(), 1, "{log}");
    assert!(log.matches("the change feed: no TLS connection to the hub").count() <= 1, "{log}");
    untrusting.stop().await;
    let carol = SiteClient { client: page.client.clone(), ..hub.site(OTHER, "carol") };
    assert_eq!(carol.get("balance").await.assert_ok()["version"], 0, "nothing reached the hub without TLS");
}

#[test]
fn an_unusable_ca_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&dir);
    let files = Files::new();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    for (ca_file, expected) in
        [(dir.path().join("missing.pem"), "cannot read --ca-file"), (empty, "holds no CERTIFICATE block")]
    {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_hub"))
            .args(["agent", "--site", SITE, "--hub", "https://127.0.0.1:1"])
            .arg("--config")
            .arg(&config)
            .arg("--watch")
            .arg(files.dir.path())
            .arg("--ca-file")
            .arg(&ca_file)
            .env_remove("HUB_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// A hub serving a self-signed certificate, in `dir` as `cert.pem`, marked as a certificate
/// authority's (as `openssl req -x509` makes by default) or as a server's.
async fn self_signed_hub(dir: &Path, authority: bool) -> TestHub {
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    if authority {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    https_hub(dir, &cert.pem(), &key.serialize_pem()).await
}

#[tokio::test]
async fn a_self_signed_certificate_given_as_ca_file_is_trusted_unless_it_is_marked_an_authority() {
    for authority in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let hub = self_signed_hub(dir.path(), authority).await;
        let config = config_file(&dir);
        let files = Files::new();
        files.write(USER, 12);
        let cert = dir.path().join("cert.pem");
        let agent = Agent::spawn_with(&hub.url, &config, &files, &["--ca-file".as_ref(), cert.as_os_str()]);
        if authority {
            agent.wait_for_log("no TLS connection to the hub").await;
            let log = agent.log();
            assert!(log.contains("CaUsedAsEndEntity"), "{log}");
            assert!(log.contains("basicConstraints=critical,CA:FALSE"), "{log}");
        } else {
            agent.wait_for_log("balance files against the hub").await;
            assert!(
                agent.log().contains(&format!("{USER}: pushed, the hub has 12 coins")),
                "{}",
                agent.log()
            );
        }
        agent.stop().await;
    }
}
