//! `hub backup` and `hub restore`, run by an operator on the real binary. A backup taken while
//! the hub acknowledges writes holds every write acknowledged before it began and is
//! consistent; it never overwrites a file unless forced. A restore refuses a file that is not
//! a hub database, or not exactly one (a trigger, a view, an index more or less, an index
//! that does not hold its table's rows), and a data dir a hub serves, changing nothing; it
//! keeps the database it replaces (with the log a killed hub left), replaces it in one rename
//! (a hub refuses the database an interrupted restore was keeping aside), and gives the
//! restored one a new epoch, under which the ops the backup remembers replay, later ones apply
//! again, and the op horizon still refuses ops older than the hub remembers. Run by root, a
//! backup or a restore follows no link the hub's user put in the data dir, and a restore gives
//! that user no file but its own.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension};
use serde_json::json;
use support::{Deployment, SiteClient, hub_command, snapshot};
use tokio::process::Command;
use tokio::sync::{Mutex, watch};

const SITE: &str = "roflfaucet";
const DAY_MS: u64 = 86_400_000;

/// `hub <command> --config … --data-dir … ARGS…` for `deployment`'s data.
fn hub_for(deployment: &Deployment, command: &str, args: &[&str]) -> Command {
    let mut hub = hub_command();
    hub.arg(command)
        .arg("--config")
        .arg(deployment.dir.path().join("hub.toml"))
        .arg("--data-dir")
        .arg(&deployment.data_dir)
        .args(args)
        .env("RUST_LOG", "warn");
    hub
}

/// Runs `hub <command> … ARGS…` for `deployment`'s data to its end.
async fn hub(deployment: &Deployment, command: &str, args: &[&str]) -> Output {
    hub_for(deployment, command, args).output().await.unwrap()
}

/// A backup of `deployment`'s database holding 10 coins of 8-evans's, taken while the hub
/// served; the hub is stopped after it.
async fn backup_of_ten_coins(deployment: &Deployment) -> PathBuf {
    let mut server = deployment.start().await;
    backend(deployment, "8-evans").delta("balance", 10, "first").await.assert_ok();
    let backup = deployment.dir.path().join("backup.sqlite3");
    let out = hub(deployment, "backup", &["--to", path_str(&backup)]).await;
    assert!(out.status.success(), "{}", text(&out));
    server.kill().await.unwrap();
    backup
}

/// A copy of `backup` named `name`, changed by `sql`.
fn altered(backup: &Path, name: &str, sql: &str) -> PathBuf {
    let copy = backup.with_file_name(format!("{name}.sqlite3"));
    std::fs::copy(backup, &copy).unwrap();
    Connection::open(&copy).unwrap().execute_batch(sql).unwrap();
    copy
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn backend(deployment: &Deployment, user: &str) -> SiteClient {
    deployment.backend(SITE, user, Duration::from_secs(30))
}

/// The deployment's hub serving 8-evans, whose 10 coins a backup holds (its path is
/// answered) and who has had 15 more credited since.
async fn serving_past_a_backup(deployment: &Deployment) -> (tokio::process::Child, SiteClient, PathBuf) {
    let server = deployment.start().await;
    let client = backend(deployment, "8-evans");
    client.delta("balance", 10, "first").await.assert_ok();
    let backup = deployment.dir.path().join("backup.sqlite3");
    assert!(hub(deployment, "backup", &["--to", path_str(&backup)]).await.status.success());
    client.delta("balance", 15, "second").await.assert_ok();
    (server, client, backup)
}

/// The epoch the hub answers a check with.
async fn epoch(client: &SiteClient) -> String {
    client.timestamp("balance").await.assert_ok()["epoch"].as_str().unwrap().to_owned()
}

/// A UUIDv7 op id dated `ms` (Unix milliseconds), the shape the hub can date.
fn uuid7(ms: u64, n: u16) -> String {
    let hex = format!("{ms:012x}");
    format!("{}-{}-7000-8000-{n:012x}", &hex[..8], &hex[8..])
}

fn now_ms() -> u64 {
    u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn query_one<T: rusqlite::types::FromSql>(conn: &Connection, sql: &str) -> T {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// The files of `dir` whose names contain `part`.
fn files_named(dir: &Path, part: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(part))
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_under_writes_holds_every_write_acknowledged_before_it_and_is_consistent() {
    let deployment = Deployment::new(|_| {});
    let mut server = deployment.start().await;
    let live_epoch = epoch(&backend(&deployment, "writer-0")).await;

    // Four writers, each adding 1 coin to its own balance again and again, one op at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let (count_tx, mut count) = watch::channel(0usize);
    let count_tx = Arc::new(count_tx);
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, stop, acked, count_tx) =
            (backend(&deployment, &format!("writer-{w}")), stop.clone(), acked.clone(), count_tx.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let op_id = format!("w{w}-{n}");
                client.delta("balance", 1, &op_id).await.assert_ok();
                acked.lock().await.push((op_id, Instant::now()));
                count_tx.send_modify(|c| *c += 1);
                n += 1;
            }
        }));
    }
    let wait = |count: &mut watch::Receiver<usize>, at_least: usize| {
        let mut count = count.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(60), count.wait_for(|c| *c >= at_least))
                .await
                .expect("the writers go on acknowledging")
                .unwrap();
        }
    };
    wait(&mut count, 40).await;

    let backup = deployment.dir.path().join("backup.sqlite3");
    let began = Instant::now();
    let out = hub(&deployment, "backup", &["--to", path_str(&backup)]).await;
    // The writers go on after the backup: the live database moves past it.
    let after = *count.borrow() + 8;
    wait(&mut count, after).await;
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    server.kill().await.unwrap();
    let report = text(&out);
    assert!(out.status.success(), "{report}");

    let conn = Connection::open(&backup).unwrap();
    assert_eq!(query_one::<String>(&conn, "PRAGMA integrity_check"), "ok");
    assert_eq!(query_one::<String>(&conn, "PRAGMA journal_mode"), "delete", "a backup is one file");
    assert_eq!(query_one::<String>(&conn, "SELECT value FROM meta WHERE key = 'epoch'"), live_epoch);
    let ops: Vec<String> = conn
        .prepare("SELECT op_id FROM remembered_ops")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let acked = acked.lock().await.clone();
    let missing: Vec<&String> =
        acked.iter().filter(|(op, at)| *at < began && !ops.contains(op)).map(|(op, _)| op).collect();
    assert!(missing.is_empty(), "acknowledged before the backup began, missing from it: {missing:?}");
    assert!(ops.len() < acked.len(), "the backup holds what the hub acknowledged after it");

    // One moment of the database: each writer's ops are a prefix of what it sent, and each
    // balance is the sum of its ledger.
    for w in 0..4 {
        let user = format!("writer-{w}");
        let held = ops.iter().filter(|op| op.starts_with(&format!("w{w}-"))).count();
        assert!((0..held).all(|n| ops.contains(&format!("w{w}-{n}"))), "writer {w}'s ops have gaps");
        let coins: Option<String> = conn
            .query_row("SELECT data FROM records WHERE user_id = ?1", [&user], |r| r.get(0))
            .optional()
            .unwrap();
        let ledger: i64 = conn
            .query_row("SELECT coalesce(sum(delta), 0) FROM ledger WHERE user_id = ?1", [&user], |r| r.get(0))
            .unwrap();
        let expected = (held > 0).then(|| json!({ "coins": held }).to_string());
        assert_eq!((coins, ledger), (expected, held as i64), "{user}");
    }
    let schema: i64 = query_one(&conn, "PRAGMA user_version");
    let records: i64 = query_one(&conn, "SELECT count(*) FROM records");
    let users: i64 = query_one(&conn, "SELECT count(DISTINCT user_id) FROM records");
    let ledger_rows: i64 = query_one(&conn, "SELECT count(*) FROM ledger");
    let bytes = std::fs::metadata(&backup).unwrap().len();
    let said = format!(
        "wrote {}: {bytes} bytes, epoch {live_epoch}, schema version {schema}, {records} records of {users} users, {ledger_rows} ledger rows",
        backup.display()
    );
    assert_eq!(report.trim(), said);
    assert!(!Path::new(&format!("{}-wal", backup.display())).exists());
    assert_eq!(files_named(deployment.dir.path(), ".partial"), Vec::<PathBuf>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_replaces_a_file_only_when_forced() {
    let deployment = Deployment::new(|_| {});
    let backup = deployment.dir.path().join("backup.sqlite3");
    let out = hub(&deployment, "backup", &["--to", path_str(&backup)]).await;
    assert!(!out.status.success());
    assert!(text(&out).contains("there is no database at"), "{}", text(&out));

    let mut server = deployment.start().await;
    backend(&deployment, "8-evans").delta("balance", 10, "first").await.assert_ok();
    std::fs::write(&backup, "an older backup").unwrap();
    let refused = hub(&deployment, "backup", &["--to", path_str(&backup)]).await;
    assert!(!refused.status.success());
    assert!(text(&refused).contains("exists; give --force to replace it"), "{}", text(&refused));
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), "an older backup");

    let forced = hub(&deployment, "backup", &["--to", path_str(&backup), "--force"]).await;
    server.kill().await.unwrap();
    assert!(forced.status.success(), "{}", text(&forced));
    let conn = Connection::open(&backup).unwrap();
    assert_eq!(query_one::<String>(&conn, "SELECT data FROM records"), r#"{"coins":10}"#);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_reads_no_database_through_a_symbolic_link_in_the_data_dir() {
    let deployment = Deployment::new(|_| {});
    // A database of root's elsewhere, which the hub's user links into the data dir.
    let other = deployment.dir.path().join("other.sqlite3");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE secrets (x); INSERT INTO secrets VALUES (1);")
        .unwrap();
    std::fs::create_dir_all(&deployment.data_dir).unwrap();
    std::os::unix::fs::symlink(&other, deployment.database()).unwrap();

    let copy = deployment.dir.path().join("copy.sqlite3");
    let out = hub(&deployment, "backup", &["--to", path_str(&copy)]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("cannot open {}", deployment.database().display())),
        "{}",
        text(&out)
    );
    assert!(!copy.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_refuses_a_file_that_is_not_a_hub_database_and_changes_nothing() {
    let deployment = Deployment::new(|_| {});
    let mut server = deployment.start().await;
    backend(&deployment, "8-evans").delta("balance", 10, "first").await.assert_ok();
    let backup = deployment.dir.path().join("backup.sqlite3");
    assert!(hub(&deployment, "backup", &["--to", path_str(&backup)]).await.status.success());
    server.kill().await.unwrap();
    let before = snapshot(&deployment.data_dir);
    let files_before = files_named(&deployment.data_dir, "");

    let text_file = deployment.dir.path().join("notes.txt");
    std::fs::write(&text_file, "not a database at all, but long enough to look like a header or two")
        .unwrap();
    let other_app = deployment.dir.path().join("other.sqlite3");
    Connection::open(&other_app)
        .unwrap()
        .execute_batch("CREATE TABLE things (x); INSERT INTO things VALUES (1);")
        .unwrap();
    let newer = deployment.dir.path().join("newer.sqlite3");
    std::fs::copy(&backup, &newer).unwrap();
    Connection::open(&newer).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let no_epoch = deployment.dir.path().join("no-epoch.sqlite3");
    std::fs::copy(&backup, &no_epoch).unwrap();
    Connection::open(&no_epoch).unwrap().execute("DELETE FROM meta WHERE key = 'epoch'", []).unwrap();
    let cut = deployment.dir.path().join("cut.sqlite3");
    let whole = std::fs::read(&backup).unwrap();
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();

    for (file, reason) in [
        (&text_file, "it is not an SQLite database, or a damaged one"),
        (&other_app, "it is not a hub database: it has no schema version"),
        (&newer, "it was made by a newer hub (schema version 99, beyond this hub's)"),
        (&no_epoch, "it is not a hub database: it has no epoch"),
        (&cut, "it is not an SQLite database, or a damaged one"),
        (&deployment.dir.path().join("missing.sqlite3"), "is not a file"),
    ] {
        let out = hub(&deployment, "restore", &["--from", path_str(file)]).await;
        let report = text(&out);
        assert!(!out.status.success(), "{report}");
        assert!(report.contains(reason), "{}: {report}", file.display());
        assert_eq!(snapshot(&deployment.data_dir), before, "{}", file.display());
        assert_eq!(files_named(&deployment.data_dir, ""), files_before, "{}", file.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_will_not_run_while_a_hub_serves_the_data_dir() {
    let deployment = Deployment::new(|_| {});
    let (mut server, client, backup) = serving_past_a_backup(&deployment).await;
    let served = epoch(&client).await;

    let out = hub(&deployment, "restore", &["--from", path_str(&backup)]).await;
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("another hub process is using"), "{report}");
    assert_eq!((epoch(&client).await, client.coins().await), (served, 25), "the hub serves on, untouched");
    assert_eq!(files_named(&deployment.data_dir, "before-restore"), Vec::<PathBuf>::new());
    server.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_keeps_the_replaced_database_and_gives_the_restored_one_a_new_epoch() {
    let deployment = Deployment::new(|_| {});
    let mut server = deployment.start().await;
    let client = backend(&deployment, "8-evans");
    let backed_up_op = uuid7(now_ms(), 1);
    client.delta("balance", 10, &backed_up_op).await.assert_ok();
    let backup = deployment.dir.path().join("backup.sqlite3");
    assert!(hub(&deployment, "backup", &["--to", path_str(&backup)]).await.status.success());
    let later_op = uuid7(now_ms(), 2);
    client.delta("balance", 15, &later_op).await.assert_ok();
    let old_epoch = epoch(&client).await;
    // Killed, the hub leaves its last writes in the write-ahead log beside the database.
    server.kill().await.unwrap();
    let wal = deployment.data_dir.join("hub.sqlite3-wal");
    assert!(wal.metadata().is_ok_and(|m| m.len() > 0), "the killed hub left no log");

    let out = hub(&deployment, "restore", &["--from", path_str(&backup)]).await;
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    let kept = report
        .lines()
        .find_map(|line| line.strip_prefix("the database it replaced is kept as "))
        .unwrap_or_else(|| panic!("the restore does not say where the old database is: {report}"));
    let kept = PathBuf::from(kept);
    assert_eq!(kept.parent(), Some(deployment.data_dir.as_path()));
    assert!(
        kept.file_name().unwrap().to_string_lossy().starts_with("hub.sqlite3.before-restore-"),
        "{report}"
    );
    // The replaced database, its log with it, holds everything it held.
    assert!(!wal.exists(), "the old log stayed beside the restored database");
    let old = Connection::open(&kept).unwrap();
    assert_eq!(query_one::<String>(&old, "SELECT data FROM records"), r#"{"coins":25}"#);
    assert_eq!(query_one::<String>(&old, "SELECT value FROM meta WHERE key = 'epoch'"), old_epoch);
    drop(old);
    assert!(
        report.contains(&format!("(epoch {old_epoch}) to {}", deployment.database().display())),
        "{report}"
    );

    let mut server = deployment.start().await;
    let new_epoch = epoch(&client).await;
    assert_ne!(new_epoch, old_epoch);
    let schema: i64 = query_one(&Connection::open(&backup).unwrap(), "PRAGMA user_version");
    let said = format!("epoch {new_epoch}, schema version {schema}, 1 records of 1 users");
    assert!(report.contains(&said), "{report}");
    let restored = client.get("balance").await;
    assert_eq!(
        (&restored.assert_ok()["data"], &restored.body["version"]),
        (&json!({"coins": 10}), &json!(1))
    );

    // The op the backup remembers replays; the one applied after it is applied again, to the
    // restored balance: the data went back to the backup's moment.
    let replayed = client.delta("balance", 10, &backed_up_op).await;
    assert_eq!(replayed.assert_ok()["replayed"], true);
    let again = client.delta("balance", 15, &later_op).await;
    assert_eq!(again.assert_ok().get("replayed"), None);
    assert_eq!(client.coins().await, 25);
    // The op horizon came back with the backup: an unknown op from within the retention is
    // applied, one from before it is still refused.
    client.delta("balance", 1, &uuid7(now_ms() - 29 * DAY_MS, 3)).await.assert_ok();
    client.delta("balance", 1, &uuid7(now_ms() - 31 * DAY_MS, 4)).await.assert_refused(422, "op_expired");
    assert_eq!(client.coins().await, 26);
    server.kill().await.unwrap();

    // A second restore keeps the first one's result under another name.
    let out = hub(&deployment, "restore", &["--from", path_str(&backup)]).await;
    assert!(out.status.success(), "{}", text(&out));
    let kept: Vec<PathBuf> = files_named(&deployment.data_dir, "before-restore")
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with("-wal") && !p.to_string_lossy().ends_with("-shm"))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_refuses_a_backup_whose_schema_is_not_the_hubs_and_changes_nothing() {
    let deployment = Deployment::new(|_| {});
    let backup = backup_of_ten_coins(&deployment).await;
    let before = snapshot(&deployment.data_dir);
    let files_before = files_named(&deployment.data_dir, "");

    // An index whose entry for a row holds a value the row no longer has: the index's
    // definition changed for a moment while the row did. Every page well formed and every
    // count right (`quick_check` passes); the index's contents wrong.
    let bad_index =
        altered(&backup, "bad-index", "INSERT INTO ops VALUES ('8-evans', 'op', 'f', '{}', 1, 1, 1, NULL);");
    let define = |sql: &str| {
        let conn = Connection::open(&bad_index).unwrap();
        conn.execute_batch("PRAGMA writable_schema = ON;").unwrap();
        conn.execute("UPDATE sqlite_schema SET sql = ?1 WHERE name = 'ops_by_age'", [sql]).unwrap();
    };
    define("CREATE INDEX ops_by_age ON ops (fingerprint)");
    Connection::open(&bad_index).unwrap().execute("UPDATE ops SET created_ms = 2", []).unwrap();
    define("CREATE INDEX ops_by_age ON ops (created_ms)");
    assert_eq!(query_one::<String>(&Connection::open(&bad_index).unwrap(), "PRAGMA quick_check"), "ok");

    let not_the_hubs =
        format!("its schema is not the hub's (schema version {})", hub::store::sqlite::SCHEMA_VERSION);
    for (file, reason) in [
        (
            altered(
                &backup,
                "wipes-the-ledger",
                "CREATE TRIGGER tidy AFTER INSERT ON ledger BEGIN DELETE FROM ledger; END;",
            ),
            format!("{not_the_hubs}: an extra trigger \"tidy\" on ledger"),
        ),
        (
            altered(
                &backup,
                "keeps-its-epoch",
                "CREATE TRIGGER same_epoch AFTER UPDATE ON meta BEGIN UPDATE meta SET value = old.value WHERE key = old.key; END;",
            ),
            "an extra trigger \"same_epoch\" on meta".to_owned(),
        ),
        (
            altered(&backup, "view", "CREATE VIEW balances AS SELECT user_id, data FROM records;"),
            format!("{not_the_hubs}: an extra view \"balances\""),
        ),
        (
            altered(&backup, "no-index", "DROP INDEX ops_by_age;"),
            format!("{not_the_hubs}: no index \"ops_by_age\" on ops"),
        ),
        (
            altered(&backup, "other-ledger", "ALTER TABLE ledger ADD COLUMN note TEXT;"),
            format!("{not_the_hubs}: the table \"ledger\" defined otherwise"),
        ),
        (bad_index, "a damaged one: SQLite's integrity_check: ".to_owned()),
    ] {
        let out = hub(&deployment, "restore", &["--from", path_str(&file)]).await;
        let report = text(&out);
        assert!(!out.status.success(), "{report}");
        assert!(report.contains(&format!("{} cannot be restored: ", file.display())), "{report}");
        assert!(report.contains(&reason), "{}: {report}", file.display());
        if file.ends_with("bad-index.sqlite3") {
            assert!(report.contains("ops_by_age"), "the damaged index is named: {report}");
        }
        assert_eq!(snapshot(&deployment.data_dir), before, "{}", file.display());
        assert_eq!(files_named(&deployment.data_dir, ""), files_before, "{}", file.display());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_follows_no_link_in_the_data_dir_and_gives_its_owner_no_file_of_anyone_else() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, symlink};
    let deployment = Deployment::new(|_| {});
    let backup = backup_of_ten_coins(&deployment).await;
    let data = &deployment.data_dir;
    // The hub's user owns the data dir and what is in it; run as root (as an operator's
    // `sudo hub restore` is), the test gives them to nobody.
    let me = deployment.dir.path().metadata().unwrap().uid();
    let hub_user = if me == 0 { 65534 } else { me };
    for path in std::iter::once(data.clone()).chain(files_named(data, "")) {
        chown(&path, Some(hub_user), Some(hub_user)).unwrap();
    }
    // A file of the restore's user, which the hub's user must not get: /etc/shadow, say.
    let shadow = deployment.dir.path().join("shadow");
    std::fs::write(&shadow, "root:$y$j9T$secret:20000:0:99999:7:::\n").unwrap();
    std::fs::set_permissions(&shadow, std::fs::Permissions::from_mode(0o600)).unwrap();
    let untouched = |what: &str| {
        let meta = shadow.metadata().unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (me, me, 0o600), "{what}");
        assert_eq!(
            std::fs::read_to_string(&shadow).unwrap(),
            "root:$y$j9T$secret:20000:0:99999:7:::\n",
            "{what}"
        );
    };
    let before = snapshot(data);
    let lock = data.join("hub.lock");

    std::fs::remove_file(&lock).unwrap();
    symlink(&shadow, &lock).unwrap();
    let out = hub(&deployment, "restore", &["--from", path_str(&backup)]).await;
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains(&format!(
            "cannot open {}: it is a symbolic link, which the hub does not follow",
            lock.display()
        )),
        "{report}"
    );
    untouched("a symbolic link as hub.lock");
    assert_eq!(snapshot(data), before);
    assert_eq!(files_named(data, "before-restore"), Vec::<PathBuf>::new());
    assert_eq!(files_named(data, ".restoring"), Vec::<PathBuf>::new());

    // A hard link: the same file under a name in the data dir. Given away only by a restore
    // that changes owners, which only root's does.
    std::fs::remove_file(&lock).unwrap();
    if me == 0 {
        std::fs::hard_link(&shadow, &lock).unwrap();
        let out = hub(&deployment, "restore", &["--from", path_str(&backup)]).await;
        let report = text(&out);
        assert!(!out.status.success(), "{report}");
        assert!(report.contains(&format!("{} has 2 names (hard links)", lock.display())), "{report}");
        untouched("a hard link as hub.lock");
        assert_eq!(snapshot(data), before);
        std::fs::remove_file(&lock).unwrap();
    }

    // With the link gone, the restore runs, from a backup only its user may read, and what it
    // made is the hub's user's.
    let out = hub_for(&deployment, "restore", &["--from", "-"])
        .stdin(std::fs::File::open(&backup).unwrap())
        .output()
        .await
        .unwrap();
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("restored the backup on standard input (epoch "), "{report}");
    for file in [lock, deployment.database()] {
        let meta = file.symlink_metadata().unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.is_file()),
            (hub_user, hub_user, true),
            "{}",
            file.display()
        );
    }
    untouched("after the restore");
    assert_eq!(snapshot(data)[0].split('|').nth(2), Some(r#"{"coins":10}"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_refuses_a_database_a_restore_was_interrupted_keeping_aside_and_the_next_restore_finishes_it() {
    let deployment = Deployment::new(|_| {});
    let (mut server, client, backup) = serving_past_a_backup(&deployment).await;
    let old_epoch = epoch(&client).await;
    server.kill().await.unwrap();
    let data = deployment.data_dir.canonicalize().unwrap();
    let db = data.join("hub.sqlite3");
    let wal = data.join("hub.sqlite3-wal");
    assert!(wal.metadata().is_ok_and(|m| m.len() > 0), "the killed hub left no log");

    // A restore killed after it gave the database its kept name and moved its log beside that
    // name: hub.sqlite3 is still the database, without the writes of its log.
    let kept = data.join("hub.sqlite3.before-restore-20261207T091500Z");
    std::fs::hard_link(&db, &kept).unwrap();
    std::fs::rename(&wal, data.join("hub.sqlite3.before-restore-20261207T091500Z-wal")).unwrap();

    let serve = hub_for(&deployment, "serve", &["--listen", &deployment.addr()])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), serve.wait_with_output())
        .await
        .expect("the hub refuses the database rather than serving it")
        .unwrap();
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains(&format!(
            "{} is also {}: a restore was interrupted while it kept this database aside; run the restore again to finish it",
            db.display(),
            kept.display()
        )),
        "{report}"
    );

    let out = hub(&deployment, "restore", &["--from", path_str(&backup)]).await;
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains(&format!("the database it replaced is kept as {}", kept.display())), "{report}");
    let kept_files = ["", "-shm", "-wal"].map(|suffix| PathBuf::from(format!("{}{suffix}", kept.display())));
    assert_eq!(files_named(&data, "before-restore"), kept_files, "the kept database and its log, no other");
    let old = Connection::open(&kept).unwrap();
    assert_eq!(query_one::<String>(&old, "SELECT data FROM records"), r#"{"coins":25}"#);
    assert_eq!(query_one::<String>(&old, "SELECT value FROM meta WHERE key = 'epoch'"), old_epoch);
    drop(old);

    let mut server = deployment.start().await;
    assert_ne!(epoch(&client).await, old_epoch);
    assert_eq!(client.coins().await, 10);
    server.kill().await.unwrap();
}
