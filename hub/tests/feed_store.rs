//! The feed and the webhook queues of the SQLite store, through the `Store` trait: the
//! stories of `support::feed` (which the PostgreSQL suite runs too), each on a store in a
//! data dir of its own, and what only SQLite has to show: its webhook queues are written
//! beside the writer, on a connection of their own, and a user's write waits for that lock
//! rather than fail.

mod support;

use std::sync::Arc;

use hub::store::sqlite::{DB_FILE, MAX_BATCH, SqliteOptions, SqliteStore};
use hub::store::{Store, StoreMetrics, WriteOutcome};
use support::feed::Open;
use support::store::{RETENTION, T, TestClock, add};
use tempfile::TempDir;
use tokio::task::JoinSet;

/// A data dir and what opens the SQLite store in it, again after it was closed.
fn sqlite() -> (TempDir, Box<Open>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let clock = TestClock::at(T);
    let open = move || -> Arc<dyn Store> {
        let options = SqliteOptions {
            op_retention: RETENTION,
            max_batch: MAX_BATCH,
            op_log_capacity: 10_000,
            metrics: StoreMetrics::default(),
            clock: clock.clone(),
        };
        Arc::new(SqliteStore::open(&path, options).unwrap())
    };
    (dir, Box::new(open))
}

// Every story of `support::feed`, one test each.
support::feed::every_story!(sqlite());

/// Another connection holding the database's write lock for a while — as the webhook
/// queues' connection does for the length of a transfer — delays the users' writes, and
/// fails none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_waits_for_another_connections_lock_rather_than_fail() {
    let (dir, open) = sqlite();
    let store = open();
    let mut other = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let lock = other.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
    let mut writes = JoinSet::new();
    for n in 0..50 {
        let store = store.clone();
        writes.spawn(async move { store.write(add(&format!("u{}", n % 5), &format!("op-{n}"), 1)).await });
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !writes.is_empty() && writes.try_join_next().is_none(),
        "a write was answered while the lock was held"
    );
    lock.commit().unwrap();
    while let Some(outcome) = writes.join_next().await {
        let outcome = outcome.unwrap();
        assert!(matches!(outcome, Ok(WriteOutcome::Applied(_))), "{outcome:?}");
    }
}
