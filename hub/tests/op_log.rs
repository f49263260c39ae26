//! Where remembered op ids live: in the op log, indexed in memory, while it has room; in the
//! table by user once it is full. A retry gets its first answer wherever its op id is, after
//! a restart too, and op ids past their retention are forgotten from both places.

mod support;

use std::time::Duration;

use reqwest::Method;
use rusqlite::Connection;
use serde_json::json;
use support::{Deployment, TestHub, sample};

fn count(conn: &Connection, table: &str) -> i64 {
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).unwrap()
}

#[tokio::test]
async fn op_ids_beyond_the_logs_capacity_go_to_the_table_and_still_get_their_first_answer() {
    let hub = TestHub::start_with(|config| config.store.op_ids_in_memory = 3).await;
    let faucet = hub.site("roflfaucet", "8-evans");
    for n in 1..=10 {
        let reply = faucet.delta("balance", n, &format!("op-{n}")).await;
        assert_eq!(reply.assert_ok()["version"], json!(n));
    }
    let total: i64 = (1..=10).sum();

    let again = faucet.delta("balance", 1, "op-1").await;
    assert_eq!(again.assert_ok()["replayed"], true);
    assert_eq!((again.body["version"].clone(), again.body["data"].clone()), (json!(1), json!({"coins": 1})));
    faucet.delta("balance", 3, "op-2").await.assert_refused(422, "op_id_reused");
    let recent = faucet.delta("balance", 10, "op-10").await;
    assert_eq!(recent.assert_ok()["replayed"], true);
    assert_eq!(faucet.coins().await, total);
    let metrics = hub.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert_eq!(sample(&metrics, "hub_store_op_log_ids"), Some(3.0), "{metrics}");

    let dir = hub.stop().await;
    let conn = Connection::open(dir.path().join("hub.sqlite3")).unwrap();
    assert_eq!(count(&conn, "op_log"), 3, "the log holds more op ids than configured");
    assert_eq!(count(&conn, "ops"), 7, "the op ids beyond the log's capacity are not in the table by user");
}

#[tokio::test(flavor = "multi_thread")]
async fn op_ids_in_the_log_are_found_again_after_a_kill() {
    let deployment = Deployment::new(|_| {});
    let mut hub = deployment.start().await;
    let page = deployment.backend("roflfaucet", "8-evans", Duration::from_secs(10));
    page.delta("balance", 7, "before-kill").await.assert_ok();
    hub.kill().await.unwrap();

    let mut hub = deployment.start().await;
    let again = page.delta("balance", 7, "before-kill").await;
    assert_eq!(again.assert_ok()["replayed"], true);
    page.delta("balance", 8, "before-kill").await.assert_refused(422, "op_id_reused");
    assert_eq!(page.coins().await, 7);
    hub.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn op_ids_past_their_retention_are_forgotten_from_the_log_and_the_table() {
    let deployment = Deployment::new(|config| config.limits.op_retention_days = 7);
    let mut hub = deployment.start().await;
    hub.kill().await.unwrap();
    // Op ids remembered eight days ago, in both places, and one from an hour ago.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let (old, recent) = (now - 8 * 86_400_000, now - 3_600_000);
    let conn = Connection::open(deployment.database()).unwrap();
    for (table, op_id, created) in
        [("op_log", "old-in-log", old), ("ops", "old-in-table", old), ("op_log", "recent", recent)]
    {
        conn.execute(
            &format!(
                "INSERT INTO {table} (user_id, op_id, fingerprint, data, version, updated_ms, created_ms)
                 VALUES ('8-evans', ?1, 'earlier', '{{}}', 1, ?2, ?2)"
            ),
            rusqlite::params![op_id, created],
        )
        .unwrap();
    }
    drop(conn);

    // The first batch after a start prunes.
    let mut hub = deployment.start().await;
    let page = deployment.backend("roflfaucet", "8-evans", Duration::from_secs(10));
    page.delta("balance", 5, "fresh").await.assert_ok();
    page.delta("balance", 5, "recent").await.assert_refused(422, "op_id_reused");
    let forgotten = page.delta("balance", 5, "old-in-log").await;
    assert!(forgotten.assert_ok().get("replayed").is_none(), "an op id past its retention was replayed");
    hub.kill().await.unwrap();

    let conn = Connection::open(deployment.database()).unwrap();
    let remembered: Vec<String> = conn
        .prepare("SELECT op_id FROM remembered_ops ORDER BY op_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(remembered, ["fresh", "old-in-log", "recent"]);
    let old_in_log: i64 =
        conn.query_row("SELECT created_ms FROM op_log WHERE op_id = 'old-in-log'", [], |r| r.get(0)).unwrap();
    assert!(old_in_log > old, "the op id past its retention is still the old row");
}
