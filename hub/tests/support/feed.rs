//! The feed's and the webhook queues' stories, told once through the `Store` trait for every
//! backend: `tests/feed_store.rs` runs them on SQLite, the PostgreSQL suite on PostgreSQL.
//! Each story takes an [`Open`], which opens the story's store, and again on the same
//! database after the story closed it (a restart).
//!
//! A change shows in the feed once no change can commit before it any more: on SQLite at
//! once, on PostgreSQL once no transaction older than its own is running anywhere in the
//! cluster. So a story never asserts that a change is absent right after a write: it waits
//! for the changes it expects ([`feed_until`]), and asserts what else came
//! once a later change has shown.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hub::store::{
    Change, Current, FeedChange, FeedPosition, Mutation, Record, Rejection, Store, Write, WriteOutcome,
};
use protocol::{DataType, SiteId};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::store::{add, applied, user};

/// Opens a story's store; called again after the story closed it, it opens the same database.
pub type Open = dyn Fn() -> Arc<dyn Store> + Send + Sync;

/// How long a story waits for a change to show.
const DEADLINE: Duration = Duration::from_secs(30);
/// Every data type: what a site with a webhook on every type reads.
const ALL: &[DataType] = &DataType::ALL;

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
