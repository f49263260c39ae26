//! `hub import`, run as an operator moving from per-user balance files: it takes the seed's
//! file shapes, refuses unusable files by name and reason, writes nothing on a dry run, is
//! safe to run twice, never overwrites a balance the hub already has, will not run while a
//! hub serves the same data dir, and needs none of the hub's secrets. A balance of 0 is
//! written like any other; an amount written as text of digits, spaces or a line break
//! around them aside, is read, and the report says so; other text is refused.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::{Deployment, snapshot, test_config};

fn hub_import(config: &Path, data_dir: &Path, from: &Path, dry_run: bool) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hub"));
    command.arg("import").arg("--config").arg(config).arg("--data-dir").arg(data_dir).arg("--from").arg(from);
    if dry_run {
        command.arg("--dry-run");
    }
    command.env_remove("HUB_CONFIG").env("RUST_LOG", "warn").output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The seed's balance files, two of them unusable, and a file that is not one.
fn balance_files(dir: &Path) {
    for (name, body) in [
        ("8-evans.json", r#"{"coins": 150, "last_updated": "2025-11-09 18:45:30"}"#),
        ("alice.json", r#"{"balance": "40"}"#),
        ("bob.json", r#"{"coins": -5}"#),
        ("carol.json", r#"{"coins": 2.5}"#),
    ] {
        std::fs::write(dir.join(name), body).unwrap();
    }
    std::fs::write(dir.join("README.txt"), "not a balance").unwrap();
}

/// Rows of three columns: (user, data, version) for records, (user, site, delta) for the ledger.
type Rows = Vec<(String, String, i64)>;

/// Each user's balance record, and the ledger.
fn balances(data_dir: &Path) -> (Rows, Rows) {
    let conn = rusqlite::Connection::open(data_dir.join("hub.sqlite3")).unwrap();
    let records = conn
        .prepare("SELECT user_id, data, version FROM records WHERE data_type = 'balance' ORDER BY user_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let ledger = conn
        .prepare("SELECT user_id, site_id, delta FROM ledger ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (records, ledger)
}

#[test]
fn an_import_takes_good_files_refuses_bad_ones_and_a_second_run_changes_nothing() {
    let deployment = Deployment::new(|_| {});
    let config = deployment.dir.path().join("hub.toml");
    let from = tempfile::tempdir().unwrap();
    balance_files(from.path());

    let first = hub_import(&config, &deployment.data_dir, from.path(), false);
    let report = text(&first);
    assert!(!first.status.success(), "refused files make the import fail: {report}");
    assert!(report.contains("imported 8-evans.json: 150 coins"), "{report}");
    assert!(report.contains("imported alice.json: 40 coins"), "{report}");
    assert!(report.contains("refused bob.json: coins is not a whole number of at least 0"), "{report}");
    assert!(report.contains("refused carol.json:"), "{report}");
    assert!(!report.contains("README"), "{report}");
    let expected_records = vec![
        ("8-evans".to_owned(), r#"{"coins":150}"#.to_owned(), 1),
        ("alice".to_owned(), r#"{"coins":40}"#.to_owned(), 1),
    ];
    let expected_ledger =
        vec![("8-evans".to_owned(), "import".to_owned(), 150), ("alice".to_owned(), "import".to_owned(), 40)];
    assert_eq!(balances(&deployment.data_dir), (expected_records.clone(), expected_ledger.clone()));
    let before = snapshot(&deployment.data_dir);

    // The old site wrote alice's file once more: the hub's balance is the one that counts now.
    std::fs::write(from.path().join("alice.json"), r#"{"coins": 999}"#).unwrap();
    let second = hub_import(&config, &deployment.data_dir, from.path(), false);
    let report = text(&second);
    assert!(
        report.contains("skipped alice.json: alice already has a balance (40 coins, version 1)"),
        "{report}"
    );
    assert!(report.contains("0 imported, 2 already had a balance, 2 refused"), "{report}");
    assert_eq!(snapshot(&deployment.data_dir), before);
}

#[test]
fn a_dry_run_reports_and_writes_nothing() {
    let deployment = Deployment::new(|_| {});
    let config = deployment.dir.path().join("hub.toml");
    let from = tempfile::tempdir().unwrap();
    balance_files(from.path());

    let fresh = hub_import(&config, &deployment.data_dir, from.path(), true);
    let report = text(&fresh);
    assert!(report.contains("would import 8-evans.json: 150 coins"), "{report}");
    assert!(report.contains("(dry run: nothing was written)"), "{report}");
    assert!(!deployment.data_dir.join("hub.sqlite3").exists(), "a dry run created the database");

    std::fs::remove_file(from.path().join("bob.json")).unwrap();
    std::fs::remove_file(from.path().join("carol.json")).unwrap();
    assert!(hub_import(&config, &deployment.data_dir, from.path(), false).status.success());
    let before = snapshot(&deployment.data_dir);
    std::fs::write(from.path().join("dave.json"), r#"{"coins": 5}"#).unwrap();
    let again = hub_import(&config, &deployment.data_dir, from.path(), true);
    let report = text(&again);
    assert!(again.status.success(), "{report}");
    assert!(report.contains("would import dave.json: 5 coins"), "{report}");
    assert!(report.contains("it would be kept"), "{report}");
    assert_eq!(snapshot(&deployment.data_dir), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_will_not_run_while_a_hub_serves_the_data_dir() {
    let deployment = Deployment::new(|_| {});
    let config = deployment.dir.path().join("hub.toml");
    let from = tempfile::tempdir().unwrap();
    std::fs::write(from.path().join("8-evans.json"), r#"{"coins": 150}"#).unwrap();

    let mut hub = deployment.start().await;
    let blocked = hub_import(&config, &deployment.data_dir, from.path(), false);
    hub.kill().await.unwrap();
    let report = text(&blocked);
    assert!(!blocked.status.success(), "{report}");
    assert!(report.contains("another hub process is using"), "{report}");
    assert_eq!(balances(&deployment.data_dir).0, vec![]);
    // Once the hub is gone, the same import goes through.
    assert!(hub_import(&config, &deployment.data_dir, from.path(), false).status.success());
}

#[test]
fn an_import_reads_no_site_key_certificate_or_metrics_token() {
    // The hub's configuration as an operator's shell sees it: the secrets it names live in
    // the service's environment and files, which the shell has not.
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut config = test_config(&data_dir);
    for site in &mut config.sites {
        site.secret = None;
        site.secret_env = Some(format!("IMPORT_TEST_UNSET_{}_SECRET", site.id.to_uppercase()));
    }
    config.tls_cert = Some(dir.path().join("missing-cert.pem"));
    config.tls_key = Some(dir.path().join("missing-key.pem"));
    config.metrics.token_env = Some("IMPORT_TEST_UNSET_METRICS_TOKEN".into());
    let path = dir.path().join("hub.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let from = tempfile::tempdir().unwrap();
    std::fs::write(from.path().join("8-evans.json"), r#"{"coins": 150}"#).unwrap();

    let out = hub_import(&path, &data_dir, from.path(), false);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("imported 8-evans.json: 150 coins"), "{report}");
    assert_eq!(balances(&data_dir).0, vec![("8-evans".to_owned(), r#"{"coins":150}"#.to_owned(), 1)]);
}

#[test]
fn a_balance_of_0_is_written_and_a_later_import_keeps_it() {
    let deployment = Deployment::new(|_| {});
    let config = deployment.dir.path().join("hub.toml");
    let from = tempfile::tempdir().unwrap();
    std::fs::write(from.path().join("zero.json"), r#"{"coins": 0}"#).unwrap();

    let out = hub_import(&config, &deployment.data_dir, from.path(), false);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("imported zero.json: 0 coins for zero"), "{report}");
    assert_eq!(
        balances(&deployment.data_dir),
        (
            vec![("zero".to_owned(), r#"{"coins":0}"#.to_owned(), 1)],
            vec![("zero".to_owned(), "import".to_owned(), 0)]
        )
    );
    let before = snapshot(&deployment.data_dir);

    // The zero is the user's balance now: a file that says otherwise does not replace it.
    std::fs::write(from.path().join("zero.json"), r#"{"coins": 50}"#).unwrap();
    let again = hub_import(&config, &deployment.data_dir, from.path(), false);
    let report = text(&again);
    assert!(again.status.success(), "{report}");
    assert!(
        report.contains("skipped zero.json: zero already has a balance (0 coins, version 1)"),
        "{report}"
    );
    assert_eq!(snapshot(&deployment.data_dir), before);
}

#[test]
fn an_amount_written_as_digits_is_read_and_said_so_and_other_text_is_refused() {
    let deployment = Deployment::new(|_| {});
    let config = deployment.dir.path().join("hub.toml");
    let from = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("hundred.json", r#"{"coins": "100"}"#),
        // As PHP writes an amount it read from a file with fgets, line break and all.
        ("read-line.json", r#"{"coins": "100\n"}"#),
        ("spaced.json", r#"{"coins": " 100 "}"#),
        ("exponent.json", r#"{"coins": "1e3"}"#),
        ("signed.json", r#"{"balance": "+100"}"#),
        ("empty.json", r#"{"coins": ""}"#),
        ("decimal.json", r#"{"coins": "10.5"}"#),
    ] {
        std::fs::write(from.path().join(name), body).unwrap();
    }
    let out = hub_import(&config, &deployment.data_dir, from.path(), false);
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    for (name, user, text) in [
        ("hundred.json", "hundred", r#""100""#),
        ("read-line.json", "read-line", r#""100\n""#),
        ("spaced.json", "spaced", r#"" 100 ""#),
    ] {
        let line = format!(
            "imported {name}: 100 coins for {user} (the file writes it as the text {text}, read as a number)"
        );
        assert!(report.contains(&line), "{line} in:\n{report}");
    }
    for (name, text) in [
        ("exponent.json", r#"coins is the text "1e3""#),
        ("signed.json", r#"balance is the text "+100""#),
        ("empty.json", r#"coins is the text """#),
        ("decimal.json", r#"coins is the text "10.5""#),
    ] {
        assert!(
            report.contains(&format!(
                "refused {name}: {text}, which is not a whole number written in digits only (spaces or \
                 line breaks around them aside)"
            )),
            "{name}: {report}"
        );
    }
    assert!(report.contains("3 imported, 0 already had a balance, 4 refused"), "{report}");
    let hundred = |user: &str| (user.to_owned(), r#"{"coins":100}"#.to_owned(), 1);
    assert_eq!(
        balances(&deployment.data_dir).0,
        vec![hundred("hundred"), hundred("read-line"), hundred("spaced")]
    );
}

#[test]
fn an_import_refuses_amounts_beyond_what_every_client_shows_exactly() {
    let deployment = Deployment::new(|_| {});
    let config = deployment.dir.path().join("hub.toml");
    let from = tempfile::tempdir().unwrap();
    for (name, coins) in [
        ("max.json", "9007199254740991"),
        ("over.json", "9007199254740992"),
        ("i64.json", "9223372036854775807"),
    ] {
        std::fs::write(from.path().join(name), format!(r#"{{"coins": {coins}}}"#)).unwrap();
    }
    let out = hub_import(&config, &deployment.data_dir, from.path(), false);
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("imported max.json: 9007199254740991 coins"), "{report}");
    for name in ["over.json", "i64.json"] {
        assert!(report.contains(&format!("refused {name}: coins is beyond ±9007199254740991")), "{report}");
    }
    assert_eq!(
        balances(&deployment.data_dir).0,
        vec![("max".to_owned(), r#"{"coins":9007199254740991}"#.to_owned(), 1)]
    );
}
