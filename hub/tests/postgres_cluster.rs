//! The throwaway PostgreSQL cluster the PostgreSQL store's tests run on
//! (`support::postgres`): its databases are apart, a committed row survives its crash, and
//! no cluster outlives the test that started it — dropped, or its test binary exiting or
//! killed. The last two run this binary again as a child (`cluster_of_a_child`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::postgres::Cluster;

#[test]
fn a_committed_row_survives_a_crash_and_a_clean_restart() {
    let mut cluster = Cluster::start();
    let ledger = cluster.database();
    let other = cluster.database();
    cluster.psql(&ledger, "CREATE TABLE ledger (op_id text PRIMARY KEY); INSERT INTO ledger VALUES ('op-1')");
    cluster.psql(&other, "CREATE TABLE ledger (op_id text PRIMARY KEY)");

    cluster.crash();
    cluster.start_again();
    assert!(cluster.log().contains("automatic recovery in progress"), "not a crash:\n{}", cluster.log());
    assert_eq!(cluster.psql(&ledger, "SELECT op_id FROM ledger"), "op-1");
    assert_eq!(cluster.psql(&other, "SELECT count(*) FROM ledger"), "0");

    cluster.psql(&ledger, "INSERT INTO ledger VALUES ('op-2')");
    cluster.stop();
    cluster.start_again();
    assert_eq!(cluster.psql(&ledger, "SELECT op_id FROM ledger ORDER BY 1"), "op-1\nop-2");

    let (port, dir) = (cluster.port, cluster.dir().to_owned());
    drop(cluster);
    assert_gone(port, &dir, Duration::ZERO);
}

#[test]
fn the_shared_cluster_gives_each_test_a_database_of_its_own() {
    let shared = Cluster::shared();
    let mine = shared.database();
    let yours = Cluster::shared().database();
    assert_ne!(mine, yours);
    shared.psql(
        &mine,
        "CREATE TABLE balances (user_id text, coins bigint); INSERT INTO balances VALUES ('u1', 10)",
    );
    assert_eq!(shared.psql(&mine, "SELECT user_id, coins FROM balances"), "u1|10");
    assert_eq!(shared.psql(&yours, "SELECT count(*) FROM pg_tables WHERE tablename = 'balances'"), "0");
}

#[test]
fn the_shared_cluster_stops_when_its_test_binary_exits() {
    let (mut child, report) = child_with_a_cluster("exit");
    let (port, dir) = read_report(&mut child, &report);
    assert!(child.wait().unwrap().success());
    assert_gone(port, &dir, Duration::from_secs(30));
}

#[test]
fn a_cluster_stops_when_its_test_binary_is_killed() {
    let (mut child, report) = child_with_a_cluster("wait");
    let (port, dir) = read_report(&mut child, &report);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_gone(port, &dir, Duration::from_secs(30));
}

/// The child's side of the two tests above: starts the shared cluster, writes its port and
/// directory to `$CLUSTER_REPORT`, then returns (`CLUSTER_THEN=exit`) or waits to be killed.
#[test]
#[ignore = "run as a child by the tests that watch its cluster stop"]
fn cluster_of_a_child() {
    let Some(report) = std::env::var_os("CLUSTER_REPORT") else { return };
    let cluster = Cluster::shared();
    let written = format!("{}\n{}", cluster.port, cluster.dir().display());
    std::fs::write(Path::new(&report).with_extension("tmp"), written).unwrap();
    std::fs::rename(Path::new(&report).with_extension("tmp"), &report).unwrap();
    if std::env::var("CLUSTER_THEN").unwrap() == "wait" {
        std::thread::sleep(Duration::from_secs(120));
    }
}

/// This test binary again, running only [`cluster_of_a_child`], and where it will report.
fn child_with_a_cluster(then: &str) -> (Child, tempfile::TempPath) {
    let report = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::remove_file(&report).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cluster_of_a_child", "--ignored", "--quiet"])
        .env("CLUSTER_REPORT", &report)
        .env("CLUSTER_THEN", then)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (child, report)
}

/// The port and directory the child reported, once it has.
fn read_report(child: &mut Child, report: &Path) -> (u16, PathBuf) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(report) {
            let (port, dir) = text.split_once('\n').unwrap();
            return (port.parse().unwrap(), dir.into());
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child exited ({status}) before reporting its cluster");
        }
        assert!(Instant::now() < deadline, "the child reported no cluster within a minute");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that within `patience` nothing listens on `port` any more and `dir` is removed.
fn assert_gone(port: u16, dir: &Path, patience: Duration) {
    let deadline = Instant::now() + patience;
    loop {
        let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if !listening && !dir.exists() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {patience:?} the cluster on port {port} is still there (listening: {listening}, {} exists: {})",
            dir.display(),
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
