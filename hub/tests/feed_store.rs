//! The feed of the SQLite store, through the `Store` trait: the stories of `support::feed`
//! (which the PostgreSQL suite runs too), each on a store in a data dir of its own.

mod support;

use std::sync::Arc;

use hub::store::sqlite::{MAX_BATCH, SqliteOptions, SqliteStore};
use hub::store::{Store, StoreMetrics};
use support::feed::Open;
use support::store::{RETENTION, T, TestClock};
use tempfile::TempDir;

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
);
