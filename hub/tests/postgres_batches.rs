//! Group commit on PostgreSQL: the writes that wait while the writers are busy go into one
//! transaction, and a write that fails for a reason of its own fails alone — the others of
//! its batch are committed and answered, each once.

mod support;

use std::time::Duration;

use hub::config::{Backend, StoreConfig};
use hub::store::postgres::{HORIZON_LOCK, WRITERS};
use hub::store::{StoreError, StoreMetrics, WriteOutcome};
use prometheus_client::registry::Registry;
use serde_json::json;
use support::postgres::Cluster;
use support::store::add;

/// How many batches committed more than `writes` writes, read from the store's histogram as
/// `/metrics` shows it.
fn batches_larger_than(metrics: &StoreMetrics, writes: u32) -> u64 {
    let mut registry = Registry::default();
    registry.register("batch", "", metrics.batch_writes.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |prefix: &str| -> u64 {
        let line =
            text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    value("batch_count ") - value(&format!("batch_bucket{{le=\"{writes}.0\"}} "))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_failing_for_its_own_reason_fails_alone_and_the_rest_of_its_batch_commits() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let metrics = StoreMetrics::default();
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { backend: Backend::Postgres, url: Some(url.clone()), ..StoreConfig::default() };
    let store =
        hub::store::open(&config, dir.path(), Duration::from_secs(30 * 86_400), metrics.clone()).unwrap();

    // A user whose stored credit count is damaged: any write to that record fails, by itself.
    assert!(matches!(store.write(add("broken", "b-1", 10)).await, Ok(WriteOutcome::Applied(_))));
    cluster.psql(&url, "UPDATE records SET credits = 'not json' WHERE user_id = 'broken'");

    // The test holds the writer: it takes alone the lock every batch takes shared.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("BEGIN").await.unwrap();
    client.execute("SELECT pg_advisory_xact_lock($1)", &[&HORIZON_LOCK]).await.unwrap();
    // Every writer of the instance takes a write, one after the other, and waits on the lock.
    let mut firsts = Vec::new();
    for n in 0..WRITERS {
        let store = store.clone();
        firsts.push(tokio::spawn(async move { store.write(add(&format!("first-{n}"), "f-1", 1)).await }));
        let since = std::time::Instant::now();
        loop {
            let waiting: i64 = client
                .query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted", &[])
                .await
                .unwrap()
                .get(0);
            if waiting == n as i64 + 1 {
                break;
            }
            assert!(since.elapsed() < Duration::from_secs(30), "writer {n} never waited on the lock");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Twenty writes queue behind it, the damaged user's among them; then the writer goes on.
    let users: Vec<String> =
        (0..20).map(|i| if i == 7 { "broken".into() } else { format!("user-{i}") }).collect();
    let writes = futures_util::future::join_all(users.iter().map(|user| store.write(add(user, "c-1", 5))));
    let (answers, ()) = tokio::join!(writes, async { client.batch_execute("COMMIT").await.unwrap() });

    for first in firsts {
        assert!(matches!(first.await.unwrap(), Ok(WriteOutcome::Applied(_))));
    }
    for (user, answer) in users.iter().zip(&answers) {
        match (user.as_str(), answer) {
            ("broken", Err(StoreError::Malformed(_))) => {}
            ("broken", other) => panic!("the damaged record's write answered {other:?}"),
            (_, Ok(WriteOutcome::Applied(record))) => assert_eq!(record.data, json!({ "coins": 5 })),
            (user, other) => panic!("{user}'s write answered {other:?}"),
        }
    }
    assert!(batches_larger_than(&metrics, 16) >= 1, "the nineteen writes were not committed together");
    let ledger = cluster
        .psql(&url, "SELECT user_id, count(*), sum(delta) FROM ledger GROUP BY user_id ORDER BY user_id");
    let mut expected: Vec<String> = users
        .iter()
        .filter(|u| *u != "broken")
        .map(|u| format!("{u}|1|5"))
        .chain(["broken|1|10".to_owned()])
        .chain((0..WRITERS).map(|n| format!("first-{n}|1|1")))
        .collect();
    expected.sort();
    let mut rows: Vec<&str> = ledger.lines().collect();
    rows.sort_unstable();
    assert_eq!(rows, expected);
    store.close().await;
}
