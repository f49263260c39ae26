//! The feed's and the webhook queues' stories, told once through the `Store` trait for every
//! backend: `tests/feed_store.rs` runs them on SQLite, the PostgreSQL suite on PostgreSQL.
//! Each story takes an [`Open`], which opens the story's store, and again on the same
//! database after the story closed it (a restart).
//!
//! A change shows in the feed once no change can commit before it any more: on SQLite at
//! once, on PostgreSQL once no transaction older than its own is running anywhere in the
//! cluster. So a story never asserts that a change is absent right after a write: it waits
//! for the changes it expects ([`feed_until`], [`transfer_all`]), and asserts what else came
//! once a later change has shown.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hub::store::{
    Change, Current, FeedChange, FeedPosition, Mutation, Pending, QueueStats, Record, Rejection, Settle,
    Settled, Store, Write, WriteOutcome,
};
use protocol::{DataType, SiteId};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::store::{T, add, applied, user};

/// Opens a story's store; called again after the story closed it, it opens the same database.
pub type Open = dyn Fn() -> Arc<dyn Store> + Send + Sync;

/// Makes one test of each story of this module, in the test file that names it: `$open` gives
/// what the test keeps for its length (a data dir, or nothing) and the store's [`Open`].
// `support` is built into every test binary; the two stores' files use this.
#[allow(unused_macros)]
macro_rules! every_story {
    ($open:expr) => {
        $crate::support::feed::every_story!(@each $open;
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
    };
    (@each $open:expr; $($story:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $story() {
                let (_kept, open) = $open;
                $crate::support::feed::$story(&*open).await
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use every_story;

/// How long a story waits for a change to show.
const DEADLINE: Duration = Duration::from_secs(30);
/// Every data type: what a site with a webhook on every type reads.
const ALL: &[DataType] = &DataType::ALL;
/// The lease the stories' claims take: longer than any story.
const LEASE_MS: i64 = 60_000;

pub fn site(id: &str) -> SiteId {
    SiteId::parse(id).unwrap()
}

/// A write of `user_id`'s `data_type` setting it to `data`, made by `origin`'s backend
/// (`None`: a page).
pub fn set(user_id: &str, data_type: DataType, data: Value, origin: Option<&str>) -> Write {
    let mutation: Mutation =
        Arc::new(move |_: Current<'_>| Ok(Change { data: data.clone(), ledger: None, credits: None }));
    Write { user: user(user_id), data_type, site: site("wrc"), origin: origin.map(site), op: None, mutation }
}

/// Writes `data` into `user_id`'s `data_type` as `origin`'s backend; the record as it now stands.
pub async fn put(
    store: &dyn Store,
    user_id: &str,
    data_type: DataType,
    data: Value,
    origin: Option<&str>,
) -> Record {
    applied(store.write(set(user_id, data_type, data, origin)).await)
}

/// A record's key in the feed, to compare what was read.
fn key(change: &FeedChange) -> (String, DataType) {
    (change.user.as_str().to_owned(), change.data_type)
}

/// What the stories compare of a change: its record and version.
fn versions(changes: &[FeedChange]) -> Vec<(String, DataType, u64)> {
    changes.iter().map(|c| (c.user.as_str().to_owned(), c.data_type, c.version)).collect()
}

/// Every change of `types` after `after`, read a page of `page` at a time, until `done` holds
/// for what was read (read again as long as it does not, until the deadline).
pub async fn feed_until(
    store: &dyn Store,
    after: FeedPosition,
    types: &[DataType],
    page: usize,
    done: impl Fn(&[FeedChange]) -> bool,
) -> Vec<FeedChange> {
    let deadline = Instant::now() + DEADLINE;
    let mut read: Vec<FeedChange> = Vec::new();
    loop {
        let from = read.last().map_or(after, |c| c.position);
        let changes = store.feed(from, types, page).await.unwrap();
        assert!(changes.len() <= page, "a page of {page} held {}", changes.len());
        let full = changes.len() == page;
        read.extend(changes);
        if full {
            continue;
        }
        if done(&read) {
            return read;
        }
        assert!(Instant::now() < deadline, "the feed after {after:?} never held what was expected: {read:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `changes` hold each of `expected` records at that version.
fn holds(changes: &[FeedChange], expected: &[(&str, DataType, u64)]) -> bool {
    expected.iter().all(|(u, t, v)| {
        changes.iter().any(|c| c.user.as_str() == *u && c.data_type == *t && c.version == *v)
    })
}

/// Transfers `site`'s share of the feed into its queue until `expected` changes were read;
/// panics if more were.
pub async fn transfer_all(
    store: &dyn Store,
    site: &SiteId,
    types: &[DataType],
    now_ms: i64,
    expected: usize,
) {
    let deadline = Instant::now() + DEADLINE;
    let mut read = 0;
    while read < expected {
        read += store.webhook_transfer(site, types, now_ms, 2).await.unwrap();
        if read < expected {
            assert!(Instant::now() < deadline, "{site:?}'s transfers read {read} of {expected} changes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(read, expected, "{site:?}'s transfers read more changes than were written");
}

/// Makes `site` known to the queues, its cursor at the feed's end, once every change of the
/// story so far shows in the feed (so that none of them comes after that end).
async fn meet(store: &dyn Store, site: &SiteId, written: &[(&str, DataType, u64)]) {
    feed_until(store, FeedPosition::default(), ALL, 100, |read| holds(read, written)).await;
    assert_eq!(store.webhook_transfer(site, ALL, T, 100).await.unwrap(), 0, "a first transfer reads nothing");
}

/// `site`'s due notifications at `now_ms`, taken for [`LEASE_MS`], in the order claimed.
async fn claim(store: &dyn Store, site: &SiteId, now_ms: i64) -> Vec<(String, DataType, u64)> {
    pending(&store.webhook_claim(site, now_ms, LEASE_MS, 100).await.unwrap())
}

fn pending(claimed: &[Pending]) -> Vec<(String, DataType, u64)> {
    claimed.iter().map(|p| (p.user.as_str().to_owned(), p.data_type, p.version)).collect()
}

fn settled(user_id: &str, data_type: DataType, version: u64, settle: Settle) -> Settled {
    Settled { user: user(user_id), data_type, version, settle }
}

fn owned(expected: &[(&str, DataType, u64)]) -> Vec<(String, DataType, u64)> {
    expected.iter().map(|(u, t, v)| ((*u).to_owned(), *t, *v)).collect()
}

/// Asserts the positions of `changes` strictly increase.
#[track_caller]
fn assert_in_order(changes: &[FeedChange]) {
    for pair in changes.windows(2) {
        assert!(pair[0].position < pair[1].position, "positions out of order: {changes:?}");
    }
}

/// The feed read from its start lists each record once, at its latest change, in the order
/// of those changes, with the record's stamp and its data when small.
pub async fn the_feed_lists_each_record_once_at_its_latest_change(open: &Open) {
    let store = open();
    let store = &*store;
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    put(store, "bob", DataType::Balance, json!({"coins": 1}), None).await;
    put(store, "ann", DataType::Balance, json!({"coins": 2}), None).await;
    put(store, "cid", DataType::Profile, json!({"name": "Cid"}), None).await;
    put(store, "bob", DataType::Balance, json!({"coins": 2}), None).await;
    let large = json!({"name": "x".repeat(3000)});
    put(store, "dee", DataType::Profile, large, None).await;

    let expected = [
        ("ann", DataType::Balance, 2),
        ("cid", DataType::Profile, 1),
        ("bob", DataType::Balance, 2),
        ("dee", DataType::Profile, 1),
    ];
    let read = feed_until(store, FeedPosition::default(), ALL, 100, |read| holds(read, &expected)).await;
    assert_eq!(versions(&read), owned(&expected));
    assert_in_order(&read);
    for change in &read {
        let record = store.records(&change.user, &[change.data_type]).await.unwrap().remove(0);
        assert_eq!(Some(change.updated_ms), record.updated_ms, "{change:?}");
        let data = change.data.as_deref().map(|d| serde_json::from_str::<Value>(d).unwrap());
        let small = (change.user.as_str() != "dee").then_some(record.data);
        assert_eq!(data, small, "data is sent along up to 2 KiB only");
    }
}

/// A reader of some types reads only those, a page at a time.
pub async fn the_feed_reads_only_the_types_asked(open: &Open) {
    let store = open();
    let store = &*store;
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    put(store, "ann", DataType::Profile, json!({"name": "Ann"}), None).await;
    put(store, "bob", DataType::Settings, json!({"theme": "dark"}), None).await;
    put(store, "bob", DataType::Profile, json!({"name": "Bob"}), None).await;
    put(store, "cid", DataType::Balance, json!({"coins": 3}), None).await;

    let profiles = [("ann", DataType::Profile, 1), ("bob", DataType::Profile, 1)];
    let read =
        feed_until(store, FeedPosition::default(), &[DataType::Profile], 1, |read| holds(read, &profiles))
            .await;
    assert_eq!(versions(&read), owned(&profiles));
    let both = [DataType::Balance, DataType::Settings];
    let expected =
        [("ann", DataType::Balance, 1), ("bob", DataType::Settings, 1), ("cid", DataType::Balance, 1)];
    let read = feed_until(store, FeedPosition::default(), &both, 2, |read| holds(read, &expected)).await;
    assert_eq!(versions(&read), owned(&expected));
    assert_eq!(store.feed(FeedPosition::default(), &[], 100).await.unwrap(), vec![], "no type asked");
    assert_eq!(store.feed(FeedPosition::default(), ALL, 0).await.unwrap(), vec![], "a limit of 0");
}

/// Many writers and one reader reading pages while they write: the reader sees no position
/// twice, each record's versions in order, and every record's final version.
pub async fn paging_the_feed_while_many_write_loses_and_repeats_nothing(open: &Open) {
    let store = open();
    const WRITERS: usize = 6;
    const WRITES: usize = 60;
    const USERS: usize = 10;
    let writing = Arc::new(AtomicBool::new(true));
    let reader = {
        let (store, writing) = (store.clone(), writing.clone());
        tokio::spawn(async move {
            let mut read: Vec<FeedChange> = Vec::new();
            while writing.load(Ordering::SeqCst) {
                let from = read.last().map_or(FeedPosition::default(), |c| c.position);
                read.extend(store.feed(from, ALL, 7).await.unwrap());
                tokio::task::yield_now().await;
            }
            read
        })
    };
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.spawn(async move {
            for n in 0..WRITES {
                let (u, t) = (format!("u{}", (w + n) % USERS), DataType::ALL[n % 2]);
                put(&*store, &u, t, json!({"by": w, "n": n}), None).await;
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    writing.store(false, Ordering::SeqCst);
    let mut read = reader.await.unwrap();
    assert!(!read.is_empty(), "the reader read nothing while the writes ran");

    let mut finals = Vec::new();
    for u in 0..USERS {
        let u = format!("u{u}");
        for t in &DataType::ALL[..2] {
            finals.push((u.clone(), *t, store.records(&user(&u), &[*t]).await.unwrap()[0].version));
        }
    }
    let expected: Vec<(&str, DataType, u64)> = finals.iter().map(|(u, t, v)| (u.as_str(), *t, *v)).collect();
    let after = read.last().map_or(FeedPosition::default(), |c| c.position);
    let mut rest = feed_until(&*store, after, ALL, 7, |rest| {
        let mut all = read.clone();
        all.extend_from_slice(rest);
        expected.iter().all(|(u, t, v)| {
            all.iter()
                .rev()
                .find(|c| c.user.as_str() == *u && c.data_type == *t)
                .is_some_and(|c| c.version == *v)
        })
    })
    .await;
    read.append(&mut rest);
    assert_in_order(&read);
    let mut last: BTreeMap<(String, DataType), u64> = BTreeMap::new();
    for change in &read {
        let before = last.insert(key(change), change.version);
        assert!(before < Some(change.version), "{change:?} read after version {before:?}");
    }
    for (u, t, v) in &finals {
        assert_eq!(last.get(&(u.clone(), *t)), Some(v), "{u}'s {t} was not read at its final version");
    }
    assert_eq!(last.len(), finals.len());
}

/// Each change keeps the site whose backend made it; a page's change has none.
pub async fn the_feed_keeps_each_changes_origin(open: &Open) {
    let store = open();
    let store = &*store;
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    put(store, "bob", DataType::Balance, json!({"coins": 1}), Some("roflfaucet")).await;
    put(store, "cid", DataType::Balance, json!({"coins": 1}), Some("wrc")).await;
    put(store, "cid", DataType::Balance, json!({"coins": 2}), None).await;
    let expected =
        [("ann", DataType::Balance, 1), ("bob", DataType::Balance, 1), ("cid", DataType::Balance, 2)];
    let read = feed_until(store, FeedPosition::default(), ALL, 100, |read| holds(read, &expected)).await;
    let origins: Vec<_> = read.iter().map(|c| c.origin.as_ref().map(SiteId::as_str)).collect();
    assert_eq!(origins, [None, Some("roflfaucet"), None], "{read:?}");
}

/// A write that changes nothing — replayed, refused, its op id reused, or the same data —
/// moves its record nowhere in the feed.
pub async fn a_write_that_changes_nothing_moves_nothing(open: &Open) {
    let store = open();
    let store = &*store;
    applied(store.write(add("ann", "op-1", 5)).await);
    put(store, "bob", DataType::Profile, json!({"name": "Bob"}), None).await;
    let expected = [("ann", DataType::Balance, 1), ("bob", DataType::Profile, 1)];
    let before = feed_until(store, FeedPosition::default(), ALL, 100, |read| holds(read, &expected)).await;

    assert!(matches!(store.write(add("ann", "op-1", 5)).await, Ok(WriteOutcome::Replayed(_))));
    assert!(matches!(store.write(add("ann", "op-1", 6)).await, Ok(WriteOutcome::OpIdReused)));
    assert!(matches!(
        store.write(add("ann", "op-2", -100)).await,
        Ok(WriteOutcome::Rejected(Rejection::InsufficientFunds(_)))
    ));
    let same = put(store, "bob", DataType::Profile, json!({"name": "Bob"}), None).await;
    assert_eq!(same.version, 1, "the same data is no new version");
    put(store, "cid", DataType::Balance, json!({"coins": 1}), None).await;

    let end = before.last().unwrap().position;
    let after = feed_until(store, end, ALL, 100, |read| holds(read, &[("cid", DataType::Balance, 1)])).await;
    assert_eq!(
        versions(&after),
        owned(&[("cid", DataType::Balance, 1)]),
        "only the write that changed something"
    );
    let from_start = store.feed(FeedPosition::default(), ALL, 100).await.unwrap();
    assert_eq!(from_start[..2], before[..], "the records stayed where they were");
}

/// The feed's end: nothing after it yet; every change written from then on read from it.
pub async fn the_feed_end_is_where_later_changes_are_read_from(open: &Open) {
    let store = open();
    let store = &*store;
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    put(store, "bob", DataType::Balance, json!({"coins": 1}), None).await;
    let before = [("ann", DataType::Balance, 1), ("bob", DataType::Balance, 1)];
    let read = feed_until(store, FeedPosition::default(), ALL, 100, |read| holds(read, &before)).await;

    let end = store.feed_end().await.unwrap();
    assert!(end >= read.last().unwrap().position, "the end {end:?} is before a change read: {read:?}");
    assert_eq!(store.feed(end, ALL, 100).await.unwrap(), vec![], "nothing after the end yet");
    put(store, "ann", DataType::Balance, json!({"coins": 2}), None).await;
    put(store, "cid", DataType::Profile, json!({"name": "Cid"}), None).await;
    let later = [("ann", DataType::Balance, 2), ("cid", DataType::Profile, 1)];
    let read = feed_until(store, end, ALL, 100, |read| holds(read, &later)).await;
    assert_eq!(versions(&read), owned(&later));
}

/// Positions survive a restart: the feed reads the same after it, and new changes come after
/// every change before it.
pub async fn positions_survive_a_restart(open: &Open) {
    let store = open();
    put(&*store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    put(&*store, "bob", DataType::Balance, json!({"coins": 1}), Some("wrc")).await;
    put(&*store, "ann", DataType::Profile, json!({"name": "Ann"}), None).await;
    let expected =
        [("ann", DataType::Balance, 1), ("bob", DataType::Balance, 1), ("ann", DataType::Profile, 1)];
    let before = feed_until(&*store, FeedPosition::default(), ALL, 100, |read| holds(read, &expected)).await;
    store.close().await;
    drop(store);

    let store = open();
    assert_eq!(store.feed(FeedPosition::default(), ALL, 100).await.unwrap(), before, "the feed read again");
    let last = before.last().unwrap().position;
    assert!(store.feed_end().await.unwrap() >= last);
    put(&*store, "ann", DataType::Balance, json!({"coins": 2}), None).await;
    put(&*store, "cid", DataType::Balance, json!({"coins": 1}), None).await;
    let later = [("ann", DataType::Balance, 2), ("cid", DataType::Balance, 1)];
    let read = feed_until(&*store, last, ALL, 100, |read| holds(read, &later)).await;
    assert_eq!(versions(&read), owned(&later), "the changes after the restart, after the last before it");
    assert!(read[0].position > last);
    store.close().await;
}

/// A site met for the first time starts at the feed's end: it is told of what changes from
/// then on, not of what changed before.
pub async fn a_site_met_for_the_first_time_starts_at_the_feeds_end(open: &Open) {
    let store = open();
    let store = &*store;
    let rofl = site("roflfaucet");
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    meet(store, &rofl, &[("ann", DataType::Balance, 1)]).await;
    assert_eq!(claim(store, &rofl, T).await, vec![]);
    assert_eq!(store.webhook_stats().await.unwrap(), vec![]);

    put(store, "bob", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(store, &rofl, ALL, T, 1).await;
    assert_eq!(claim(store, &rofl, T).await, owned(&[("bob", DataType::Balance, 1)]));
}

/// A transfer queues each change of the site's types but its own backend's, and reads past
/// the ones it skips.
pub async fn a_transfer_skips_the_sites_own_changes_and_other_types(open: &Open) {
    let store = open();
    let store = &*store;
    let rofl = site("roflfaucet");
    meet(store, &rofl, &[]).await;
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    put(store, "bob", DataType::Balance, json!({"coins": 1}), Some("roflfaucet")).await;
    put(store, "cid", DataType::Profile, json!({"name": "Cid"}), None).await;
    put(store, "dee", DataType::Balance, json!({"coins": 1}), Some("wrc")).await;
    transfer_all(store, &rofl, &[DataType::Balance], T, 3).await;
    put(store, "eve", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(store, &rofl, &[DataType::Balance], T + 1, 1).await;
    let expected =
        [("ann", DataType::Balance, 1), ("dee", DataType::Balance, 1), ("eve", DataType::Balance, 1)];
    let mut claimed = claim(store, &rofl, T + 1).await;
    claimed.sort();
    assert_eq!(claimed, owned(&expected));
}

/// Versions of one record written while it waits are one notification, of the newest, that
/// keeps its place (a lease on it) and counts its wait from when it was queued.
pub async fn a_transfer_coalesces_a_records_versions(open: &Open) {
    let store = open();
    let store = &*store;
    let rofl = site("roflfaucet");
    meet(store, &rofl, &[]).await;
    for (n, at) in [(1, T + 10), (2, T + 20), (3, T + 30)] {
        put(store, "ann", DataType::Balance, json!({"coins": n}), None).await;
        transfer_all(store, &rofl, ALL, at, 1).await;
    }
    let claimed = store.webhook_claim(&rofl, T + 30, LEASE_MS, 100).await.unwrap();
    assert_eq!(
        claimed,
        vec![Pending {
            user: user("ann"),
            data_type: DataType::Balance,
            version: 3,
            attempts: 0,
            queued_ms: T + 30
        }]
    );

    put(store, "ann", DataType::Balance, json!({"coins": 4}), None).await;
    transfer_all(store, &rofl, ALL, T + 40, 1).await;
    assert_eq!(claim(store, &rofl, T + 40).await, vec![], "still leased");
    let again = store.webhook_claim(&rofl, T + 30 + LEASE_MS, LEASE_MS, 100).await.unwrap();
    assert_eq!(pending(&again), owned(&[("ann", DataType::Balance, 4)]), "the lease over");
    assert_eq!(again[0].queued_ms, T + 40);
}

/// A claim takes the notifications due and not leased, the longest due first, `limit` at
/// most; one taken is not taken again until settled or its lease is over.
pub async fn a_claim_takes_due_notifications_once_until_settled_or_the_lease_ends(open: &Open) {
    let store = open();
    let store = &*store;
    let rofl = site("roflfaucet");
    meet(store, &rofl, &[]).await;
    for (u, at) in [("ann", T + 10), ("bob", T + 20), ("cid", T + 30)] {
        put(store, u, DataType::Balance, json!({"coins": 1}), None).await;
        transfer_all(store, &rofl, ALL, at, 1).await;
    }
    assert_eq!(claim(store, &rofl, T + 5).await, vec![], "none due yet");
    let first = store.webhook_claim(&rofl, T + 25, 1000, 1).await.unwrap();
    assert_eq!(pending(&first), owned(&[("ann", DataType::Balance, 1)]), "the longest due, one");
    let rest = store.webhook_claim(&rofl, T + 25, 1000, 10).await.unwrap();
    assert_eq!(pending(&rest), owned(&[("bob", DataType::Balance, 1)]), "the other one due");
    assert_eq!(claim(store, &rofl, T + 30).await, owned(&[("cid", DataType::Balance, 1)]));
    assert_eq!(claim(store, &rofl, T + 1024).await, vec![], "every one leased");

    store
        .webhook_settle(&rofl, T + 1024, &[settled("ann", DataType::Balance, 1, Settle::Delivered)])
        .await
        .unwrap();
    assert_eq!(claim(store, &rofl, T + 1024).await, vec![], "ann's settled, the others leased");
    assert_eq!(
        claim(store, &rofl, T + 1025).await,
        owned(&[("bob", DataType::Balance, 1)]),
        "bob's lease over"
    );
    assert_eq!(claim(store, &rofl, T + 1025).await, vec![]);
}

/// A notification delivered leaves the queue, unless a newer version of its record came
/// meanwhile: that one is then due at once, its attempts counted from none.
pub async fn a_delivered_notification_leaves_unless_a_newer_version_came(open: &Open) {
    let store = open();
    let store = &*store;
    let rofl = site("roflfaucet");
    meet(store, &rofl, &[]).await;
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(store, &rofl, ALL, T, 1).await;
    assert_eq!(claim(store, &rofl, T).await.len(), 1);
    let retry = settled("ann", DataType::Balance, 1, Settle::Retry { at_ms: T + 100 });
    store.webhook_settle(&rofl, T + 1, &[retry]).await.unwrap();
    assert_eq!(claim(store, &rofl, T + 100).await.len(), 1);

    put(store, "ann", DataType::Balance, json!({"coins": 2}), None).await;
    transfer_all(store, &rofl, ALL, T + 150, 1).await;
    let delivered = settled("ann", DataType::Balance, 1, Settle::Delivered);
    store.webhook_settle(&rofl, T + 200, &[delivered]).await.unwrap();
    let newer = store.webhook_claim(&rofl, T + 200, LEASE_MS, 100).await.unwrap();
    assert_eq!(
        newer,
        vec![Pending {
            user: user("ann"),
            data_type: DataType::Balance,
            version: 2,
            attempts: 0,
            queued_ms: T + 150
        }]
    );
    let delivered = settled("ann", DataType::Balance, 2, Settle::Delivered);
    store.webhook_settle(&rofl, T + 300, &[delivered]).await.unwrap();
    assert_eq!(store.webhook_stats().await.unwrap(), vec![], "delivered: the queue is empty");
    assert_eq!(claim(store, &rofl, T + 10 * LEASE_MS).await, vec![]);
}

/// A failed attempt counts one more and comes due again when asked, not before.
pub async fn a_retry_counts_the_attempt_and_moves_when_it_is_due(open: &Open) {
    let store = open();
    let store = &*store;
    let rofl = site("roflfaucet");
    meet(store, &rofl, &[]).await;
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(store, &rofl, ALL, T, 1).await;
    let mut now = T;
    assert_eq!(claim(store, &rofl, now).await.len(), 1);
    for attempts in 1..=3 {
        let retry = settled("ann", DataType::Balance, 1, Settle::Retry { at_ms: now + 5000 });
        store.webhook_settle(&rofl, now, &[retry]).await.unwrap();
        assert_eq!(claim(store, &rofl, now + 4999).await, vec![], "not due before its time");
        now += 5000;
        let due = store.webhook_claim(&rofl, now, LEASE_MS, 100).await.unwrap();
        assert_eq!(
            due,
            vec![Pending {
                user: user("ann"),
                data_type: DataType::Balance,
                version: 1,
                attempts,
                queued_ms: T
            }]
        );
    }
}

/// A notification given up leaves the queue; a newer version of its record stays, due now.
pub async fn a_dropped_notification_leaves_the_queue(open: &Open) {
    let store = open();
    let store = &*store;
    let rofl = site("roflfaucet");
    meet(store, &rofl, &[]).await;
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    put(store, "bob", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(store, &rofl, ALL, T, 2).await;
    assert_eq!(claim(store, &rofl, T).await.len(), 2);
    put(store, "bob", DataType::Balance, json!({"coins": 2}), None).await;
    transfer_all(store, &rofl, ALL, T + 10, 1).await;
    let dropped = [
        settled("ann", DataType::Balance, 1, Settle::Dropped),
        settled("bob", DataType::Balance, 1, Settle::Dropped),
    ];
    store.webhook_settle(&rofl, T + 20, &dropped).await.unwrap();
    assert_eq!(claim(store, &rofl, T + 20).await, owned(&[("bob", DataType::Balance, 2)]));
    store
        .webhook_settle(&rofl, T + 30, &[settled("bob", DataType::Balance, 2, Settle::Dropped)])
        .await
        .unwrap();
    assert_eq!(store.webhook_stats().await.unwrap(), vec![]);
}

/// The queues count each site's notifications and when the longest-waiting was queued.
pub async fn the_stats_count_each_sites_queue(open: &Open) {
    let store = open();
    let store = &*store;
    let (rofl, wrc) = (site("roflfaucet"), site("wrc"));
    meet(store, &rofl, &[]).await;
    meet(store, &wrc, &[]).await;
    put(store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(store, &rofl, ALL, T + 10, 1).await;
    put(store, "bob", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(store, &rofl, ALL, T + 20, 1).await;
    transfer_all(store, &wrc, ALL, T + 30, 2).await;
    let mut stats = store.webhook_stats().await.unwrap();
    stats.sort_by(|a, b| a.site.as_str().cmp(b.site.as_str()));
    assert_eq!(
        stats,
        vec![
            QueueStats { site: rofl, queued: 2, oldest_queued_ms: Some(T + 10) },
            QueueStats { site: wrc, queued: 2, oldest_queued_ms: Some(T + 30) },
        ]
    );
}

/// The queues and cursors survive a restart, leases included.
pub async fn the_queues_survive_a_restart(open: &Open) {
    let store = open();
    let rofl = site("roflfaucet");
    meet(&*store, &rofl, &[]).await;
    put(&*store, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    put(&*store, "bob", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(&*store, &rofl, ALL, T, 2).await;
    let retry = settled("bob", DataType::Balance, 1, Settle::Retry { at_ms: T + 500 });
    assert_eq!(claim(&*store, &rofl, T).await.len(), 2);
    store.webhook_settle(&rofl, T, &[retry]).await.unwrap();
    store.close().await;
    drop(store);

    let store = open();
    assert_eq!(claim(&*store, &rofl, T + 500).await, owned(&[("bob", DataType::Balance, 1)]), "ann's leased");
    put(&*store, "cid", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(&*store, &rofl, ALL, T + 600, 1).await;
    assert_eq!(
        claim(&*store, &rofl, T + LEASE_MS).await,
        owned(&[("ann", DataType::Balance, 1), ("cid", DataType::Balance, 1)]),
        "the cursor kept its place: cid's change only"
    );
    store.close().await;
}

/// Many writes while one site's notifications are transferred, claimed and delivered as fast
/// as they come: every write succeeds, and every record's final version is delivered.
pub async fn writes_succeed_while_the_webhooks_run(open: &Open) {
    let store = open();
    let rofl = site("roflfaucet");
    meet(&*store, &rofl, &[]).await;
    const WRITERS: usize = 8;
    const WRITES: usize = 100;
    let writing = Arc::new(AtomicBool::new(true));
    let rounds = Arc::new(AtomicUsize::new(0));
    // One round of a site's webhook: what is due delivered, then the next few changes queued.
    let deliver = |store: Arc<dyn Store>, rofl: SiteId| async move {
        let claimed = store.webhook_claim(&rofl, T, LEASE_MS, 50).await.unwrap();
        let done: Vec<Settled> = claimed
            .iter()
            .map(|p| settled(p.user.as_str(), p.data_type, p.version, Settle::Delivered))
            .collect();
        store.webhook_settle(&rofl, T, &done).await.unwrap();
        let moved = store.webhook_transfer(&rofl, ALL, T, 5).await.unwrap();
        (moved, claimed)
    };
    let webhooks = {
        let (store, rofl, writing, rounds) = (store.clone(), rofl.clone(), writing.clone(), rounds.clone());
        tokio::spawn(async move {
            let mut delivered: Vec<Pending> = Vec::new();
            while writing.load(Ordering::SeqCst) {
                let (moved, claimed) = deliver(store.clone(), rofl.clone()).await;
                if moved > 0 {
                    rounds.fetch_add(1, Ordering::SeqCst);
                }
                delivered.extend(claimed);
            }
            delivered
        })
    };
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.spawn(async move {
            for n in 0..WRITES {
                let op = format!("w{w}-{n}");
                let outcome = store.write(add(&format!("u{}", n % 10), &op, 1)).await;
                assert!(matches!(outcome, Ok(WriteOutcome::Applied(_))), "{op}: {outcome:?}");
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    writing.store(false, Ordering::SeqCst);
    let mut delivered = webhooks.await.unwrap();
    assert!(rounds.load(Ordering::SeqCst) > 0, "no transfer moved anything while the writes ran");

    let finals: Vec<(String, u64)> = {
        let mut finals = Vec::new();
        for u in 0..10 {
            let u = format!("u{u}");
            finals
                .push((u.clone(), store.records(&user(&u), &[DataType::Balance]).await.unwrap()[0].version));
        }
        finals
    };
    assert!(finals.iter().all(|(_, v)| *v == (WRITERS * WRITES / 10) as u64), "{finals:?}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, claimed) = deliver(store.clone(), rofl.clone()).await;
        delivered.extend(claimed);
        let done =
            finals.iter().all(|(u, v)| delivered.iter().any(|p| p.user.as_str() == u && p.version == *v));
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "final versions not delivered: {finals:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.webhook_stats().await.unwrap(), vec![], "everything delivered");
}
