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

/// Makes one test of each story of `support::feed`, on SQLite.
macro_rules! stories {
    ($($story:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $story() {
                let (_dir, open) = sqlite();
                support::feed::$story(&*open).await
            }
        )*
    };
}

stories!(
    the_feed_lists_each_record_once_at_its_latest_change,
    the_feed_reads_only_the_types_asked,
    paging_the_feed_while_many_write_loses_and_repeats_nothing,
    the_feed_keeps_each_changes_origin,
    a_write_that_changes_nothing_moves_nothing,
    the_feed_end_is_where_later_changes_are_read_from,
    positions_survive_a_restart,
    a_site_met_for_the_first_time_starts_at_the_feeds_end,
    a_transfer_skips_the_sites_own_changes_and_other_types,
    a_transfer_coalesces_a_records_versions,
    a_claim_takes_due_notifications_once_until_settled_or_the_lease_ends,
    a_delivered_notification_leaves_unless_a_newer_version_came,
    a_retry_counts_the_attempt_and_moves_when_it_is_due,
    a_dropped_notification_leaves_the_queue,
    the_stats_count_each_sites_queue,
    the_queues_survive_a_restart,
    writes_succeed_while_the_webhooks_run,
);

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
