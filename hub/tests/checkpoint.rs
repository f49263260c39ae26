//! The store copies its WAL back into the database file while the hub runs, between
//! batches, rather than leaving it to grow until the hub stops.

mod support;

use reqwest::Method;
use support::{TestHub, sample};

/// Ledger rows in the database file alone, read from a copy made without its WAL (0 when
/// not even the schema has been copied there yet).
fn ledger_rows_in_database_file(hub: &TestHub) -> i64 {
    let copy = tempfile::tempdir().unwrap();
    let path = copy.path().join("hub.sqlite3");
    std::fs::copy(hub.dir.path().join("hub.sqlite3"), &path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0)).unwrap_or(0)
}

#[tokio::test]
async fn answered_writes_reach_the_database_file_while_the_hub_runs() {
    let hub = TestHub::start_with(|config| config.limits.requests_per_minute = 10_000).await;
    let faucet = hub.site("roflfaucet", "8-evans");
    for i in 0..100 {
        faucet.delta("balance", 1, &format!("op-{i}")).await.assert_ok();
    }
    let copied = ledger_rows_in_database_file(&hub);
    assert!(copied >= 64, "only {copied} of 100 ledger rows are in the database file itself");
    assert_eq!(faucet.coins().await, 100);
    let metrics = hub.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(sample(&metrics, "hub_store_checkpoint_seconds_count").is_some_and(|n| n >= 1.0), "{metrics}");
    hub.stop().await;
}
