//! The operator's commands on a hub whose store is PostgreSQL: `hub migrate`, `hub check`,
//! `hub import`, and the backup story (pg_dump and pg_restore, then `hub restore
//! --epoch-only`), run as an operator would against a real database. The database's URL,
//! password included, never shows in what they print.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::postgres::Cluster;
use support::site_secret;

/// The variable the settings name for the database's URL.
const URL_VAR: &str = "STORE_URL_FOR_TEST";

/// A settings file for a hub on the PostgreSQL database `url` is in `URL_VAR`, with one site.
fn settings(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("hub.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {data:?}\n\
             [store]\nbackend = \"postgres\"\nurl_env = \"{URL_VAR}\"\n\
             [[sites]]\nid = \"roflfaucet\"\norigins = [\"http://localhost:*\"]\nsecret = \"{secret}\"\n",
            data = dir.join("data"),
            secret = site_secret("roflfaucet"),
        ),
    )
    .unwrap();
    path
}

/// Runs `hub ARGS --config SETTINGS` with the database's URL in the environment, if given.
fn hub(settings: &Path, url: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hub"));
    command.args(args).arg("--config").arg(settings).env_remove("HUB_CONFIG").env("RUST_LOG", "warn");
    match url {
        Some(url) => command.env(URL_VAR, url),
        None => command.env_remove(URL_VAR),
    };
    command.output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A URL for `database` that carries a password (trust authentication ignores it): what
/// must never be printed.
fn with_password(url: &str) -> String {
    url.replacen("postgres://postgres@", "postgres://postgres:never-printed-s3cret@", 1)
}

#[test]
fn migrate_creates_the_schema_once_and_check_reports_it() {
    let cluster = Cluster::shared();
    let url = with_password(&cluster.database());
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());

    let before = hub(&settings, Some(&url), &["check"]);
    assert!(before.status.success(), "{}", text(&before));
    assert!(text(&before).contains("reachable, empty"), "{}", text(&before));

    for _ in 0..2 {
        let out = hub(&settings, Some(&url), &["migrate"]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("schema is at version"), "{}", text(&out));
    }
    let versions = cluster.psql(&url, "SELECT count(*), count(DISTINCT version) FROM schema_migrations");
    let (all, distinct) = versions.trim().split_once('|').unwrap();
    assert_eq!(all, distinct, "a migration step was recorded twice");
    assert_ne!(all, "0");

    let after = hub(&settings, Some(&url), &["check"]);
    assert!(after.status.success(), "{}", text(&after));
    assert!(text(&after).contains("this hub's"), "{}", text(&after));
    for out in [&before, &after] {
        assert!(!text(out).contains("never-printed-s3cret"), "the password was printed: {}", text(out));
    }
}

#[test]
fn check_fails_naming_the_variable_when_the_url_is_not_set_and_on_a_newer_schema() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());

    let unset = hub(&settings, None, &["check"]);
    assert!(!unset.status.success(), "{}", text(&unset));
    assert!(text(&unset).contains(URL_VAR), "{}", text(&unset));

    assert!(hub(&settings, Some(&url), &["migrate"]).status.success());
    cluster.psql(&url, "INSERT INTO schema_migrations (version, applied_ms) VALUES (999, 0)");
    let newer = hub(&settings, Some(&url), &["check"]);
    assert!(!newer.status.success(), "{}", text(&newer));
    assert!(text(&newer).contains("newer than this hub's"), "{}", text(&newer));
    let serve = hub(&settings, Some(&url), &["migrate"]);
    assert!(!serve.status.success(), "a newer schema was migrated: {}", text(&serve));
}

#[test]
fn import_writes_balances_into_postgres_and_a_second_run_changes_nothing() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let files = dir.path().join("balances");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("8-evans.json"), r#"{"coins": 150}"#).unwrap();
    std::fs::write(files.join("alice.json"), r#"{"balance": 40}"#).unwrap();
    let from = files.to_str().unwrap();

    let dry = hub(&settings, Some(&url), &["import", "--from", from, "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    let first = hub(&settings, Some(&url), &["import", "--from", from]);
    assert!(first.status.success(), "{}", text(&first));
    let records = |url: &str| {
        cluster.psql(url, "SELECT user_id, data, version FROM records ORDER BY user_id").trim().to_owned()
    };
    assert_eq!(records(&url), "8-evans|{\"coins\":150}|1\nalice|{\"coins\":40}|1");
    let ledger = cluster.psql(&url, "SELECT user_id, delta, site_id FROM ledger ORDER BY user_id");
    assert_eq!(ledger.trim(), "8-evans|150|import\nalice|40|import");

    std::fs::write(files.join("alice.json"), r#"{"balance": 99}"#).unwrap();
    let again = hub(&settings, Some(&url), &["import", "--from", from]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(records(&url), "8-evans|{\"coins\":150}|1\nalice|{\"coins\":40}|1", "{}", text(&again));
    // The dry run on a database that already had them says so too.
    let dry = hub(&settings, Some(&url), &["import", "--from", from, "--dry-run"]);
    assert!(!text(&dry).contains("would import 2"), "{}", text(&dry));
}

#[test]
fn a_restored_dump_gets_a_new_epoch_and_hub_backup_points_to_pg_dump() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    assert!(hub(&settings, Some(&url), &["migrate"]).status.success());
    let epoch = |url: &str| cluster.psql(url, "SELECT value FROM meta WHERE key = 'epoch'").trim().to_owned();
    let before = epoch(&url);

    let backup = hub(&settings, Some(&url), &["backup", "--to", dir.path().join("b").to_str().unwrap()]);
    assert!(!backup.status.success());
    assert!(text(&backup).contains("pg_dump"), "{}", text(&backup));
    let restore = hub(&settings, Some(&url), &["restore", "--from", "x"]);
    assert!(!restore.status.success());
    assert!(text(&restore).contains("--epoch-only"), "{}", text(&restore));

    let renewed = hub(&settings, Some(&url), &["restore", "--epoch-only"]);
    assert!(renewed.status.success(), "{}", text(&renewed));
    let after = epoch(&url);
    assert_ne!(after, before);
    assert!(text(&renewed).contains(&after), "{}", text(&renewed));

    // A database that is not a hub's is left alone.
    let other = cluster.database();
    let refused = hub(&settings, Some(&other), &["restore", "--epoch-only"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("not a hub's database"), "{}", text(&refused));
}
