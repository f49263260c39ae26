//! The feed and the webhook queues of the PostgreSQL store: the stories of `support::feed`,
//! each on a database of its own in the shared cluster, and what only several instances on one
//! database, and the database's own history, have to show:
//! - a reader paging the feed while two instances write sees every record's final version,
//!   and nothing is skipped when the transaction that drew its position first commits last;
//! - two instances moving one site's feed into its queue and sending from it at once: each
//!   change is queued once, each notification taken by one instance at a time, each record's
//!   final version delivered, nothing delivered twice;
//! - a settle through one instance of what the other queued a newer version of meanwhile;
//! - the queues and cursors outlive both instances;
//! - a database of the schema before, with records: they get positions and show in the feed;
//!   and a hub of the schema before, still writing during a rollout, reaches the feed;
//! - a new epoch (a restore from a dump, maybe of another cluster) numbers the feed afresh in
//!   the same order, the cursors with it, so that later writes are read after it.
//!
//! Instances are `PostgresStore`s on one database. The test that holds a transaction open has
//! a cluster of its own: an open transaction holds back every database's feed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hub::store::postgres::{Database, PostgresStore, SCHEMA_VERSION, STEPS, renew_epoch};
use hub::store::{FeedChange, FeedPosition, Settle, Settled, Store};
use protocol::{DataType, SiteId};
use serde_json::json;
use support::feed::{Open, feed_until, put, site, transfer_all};
use support::postgres::Cluster;
use support::store::{T, TestClock, add, applied, open_postgres, user};
use tokio::task::JoinSet;

/// How long a test waits for what it expects.
const DEADLINE: Duration = Duration::from_secs(60);
const ALL: &[DataType] = &DataType::ALL;
/// A lease longer than any test.
const LEASE_MS: i64 = 600_000;

/// What opens a store on a new database of the shared cluster, again after it was closed.
fn postgres() -> Box<Open> {
    let url = Cluster::shared().database();
    let clock = TestClock::at(T);
    Box::new(move || -> Arc<dyn Store> { open_postgres(&url, &clock) })
}

// Every story of `support::feed`, one test each.
support::feed::every_story!(((), postgres()));

/// Two instances on one new database of the shared cluster, and its URL.
fn two_instances() -> (Arc<PostgresStore>, Arc<PostgresStore>, String) {
    let url = Cluster::shared().database();
    let clock = TestClock::at(T);
    (open_postgres(&url, &clock), open_postgres(&url, &clock), url)
}

type Key = (String, DataType);

fn key(change: &FeedChange) -> Key {
    (change.user.as_str().to_owned(), change.data_type)
}

/// Each record's version now.
async fn versions_now(store: &dyn Store, keys: &BTreeSet<Key>) -> BTreeMap<Key, u64> {
    let mut now = BTreeMap::new();
    for (u, t) in keys {
        now.insert((u.clone(), *t), store.records(&user(u), &[*t]).await.unwrap()[0].version);
    }
    now
}

/// Asserts that `read` is in position order, reads each record's versions in order, and ends
/// with each record of `finals` at its final version (and no other record).
#[track_caller]
fn assert_read_up_to(read: &[FeedChange], finals: &BTreeMap<Key, u64>) {
    for pair in read.windows(2) {
        assert!(pair[0].position < pair[1].position, "positions out of order: {pair:?}");
    }
    let mut last: BTreeMap<Key, u64> = BTreeMap::new();
    for change in read {
        let before = last.insert(key(change), change.version);
        assert!(before < Some(change.version), "{change:?} read after version {before:?}");
    }
    assert_eq!(&last, finals, "the records' last versions read are not their final ones");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paging_while_two_instances_write_skips_nothing_behind_a_transaction_that_commits_last() {
    let cluster = Cluster::start();
    let url = cluster.database();
    let clock = TestClock::at(T);
    let (a, b) = (open_postgres(&url, &clock), open_postgres(&url, &clock));

    // A transaction draws its position and writes a record, and stays open while the
    // instances write and a reader pages the feed.
    let (held, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    held.batch_execute(
        "BEGIN;
         INSERT INTO records (user_id, data_type, data, version, updated_ms, feed_xid, feed_seq)
         VALUES ('early', 'balance', '{\"coins\":1}', 1, 1, pg_current_xact_id()::TEXT::BIGINT,
                 nextval('records_feed_seq'))",
    )
    .await
    .unwrap();
    let committing = Arc::new(AtomicBool::new(false));
    let writing = Arc::new(AtomicBool::new(true));
    let reader = {
        let (store, committing, writing) = (a.clone(), committing.clone(), writing.clone());
        tokio::spawn(async move {
            let mut read: Vec<FeedChange> = Vec::new();
            while writing.load(Ordering::SeqCst) {
                let from = read.last().map_or(FeedPosition::default(), |c| c.position);
                let page = store.feed(from, ALL, 7).await.unwrap();
                if read.is_empty() && !page.is_empty() {
                    assert!(
                        committing.load(Ordering::SeqCst),
                        "read {page:?} while the earlier transaction was open"
                    );
                    assert_eq!(
                        page[0].user.as_str(),
                        "early",
                        "the earlier transaction's record comes first"
                    );
                }
                read.extend(page);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            read
        })
    };
    const WRITES: usize = 120;
    let written = Arc::new(AtomicUsize::new(0));
    let mut writers = JoinSet::new();
    for (name, store) in [("a", a.clone()), ("b", b.clone())] {
        let written = written.clone();
        writers.spawn(async move {
            for n in 0..WRITES {
                applied(store.write(add(&format!("u{}", n % 12), &format!("{name}-{n}"), 1)).await);
                written.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let deadline = Instant::now() + DEADLINE;
    while written.load(Ordering::SeqCst) < WRITES / 2 {
        assert!(Instant::now() < deadline, "the instances did not write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        a.feed(FeedPosition::default(), ALL, 100).await.unwrap(),
        vec![],
        "held back by the open transaction"
    );
    committing.store(true, Ordering::SeqCst);
    held.batch_execute("COMMIT").await.unwrap();
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    writing.store(false, Ordering::SeqCst);
    let mut read = reader.await.unwrap();

    let keys: BTreeSet<Key> = (0..12).map(|u| (format!("u{u}"), DataType::Balance)).collect();
    let mut finals = versions_now(&*b, &keys).await;
    assert_eq!(finals.values().sum::<u64>(), 2 * WRITES as u64);
    finals.insert(("early".into(), DataType::Balance), 1);
    let after = read.last().map_or(FeedPosition::default(), |c| c.position);
    let rest = feed_until(&*b, after, ALL, 7, |rest| {
        let mut last: BTreeMap<Key, u64> = read.iter().map(|c| (key(c), c.version)).collect();
        last.extend(rest.iter().map(|c| (key(c), c.version)));
        last == finals
    })
    .await;
    read.extend(rest);
    assert_eq!(read[0].user.as_str(), "early");
    assert_read_up_to(&read, &finals);
    a.close().await;
    b.close().await;
}

/// One instance's round of a site's webhook, as the dispatcher runs it: the feed moved into
/// the queue, then what is due taken and delivered. `in_flight` holds what any instance has
/// taken and not settled: nothing is taken twice at once. Returns what was read and delivered.
async fn webhook_round(
    store: &dyn Store,
    rofl: &SiteId,
    in_flight: &Mutex<BTreeSet<Key>>,
) -> (usize, Vec<(Key, u64)>) {
    let mut read = 0;
    loop {
        let moved = store.webhook_transfer(rofl, ALL, T, 3).await.unwrap();
        read += moved;
        if moved < 3 {
            break;
        }
    }
    let claimed = store.webhook_claim(rofl, T, LEASE_MS, 4).await.unwrap();
    let mut delivered = Vec::new();
    for pending in &claimed {
        let key = (pending.user.as_str().to_owned(), pending.data_type);
        assert!(in_flight.lock().unwrap().insert(key.clone()), "{key:?} taken by two instances at once");
        delivered.push((key, pending.version));
    }
    tokio::task::yield_now().await;
    // Out of flight before it is settled: once settled, the other instance may take it again.
    for (key, _) in &delivered {
        in_flight.lock().unwrap().remove(key);
    }
    let settled: Vec<Settled> = claimed
        .iter()
        .map(|p| Settled {
            user: p.user.clone(),
            data_type: p.data_type,
            version: p.version,
            settle: Settle::Delivered,
        })
        .collect();
    store.webhook_settle(rofl, T, &settled).await.unwrap();
    (read, delivered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sending_one_sites_webhook_queue_each_change_once_and_deliver_every_final_version() {
    let (a, b, _) = two_instances();
    let rofl = site("roflfaucet");
    assert_eq!(a.webhook_transfer(&rofl, ALL, T, 100).await.unwrap(), 0, "the site starts at the feed's end");

    const WRITES: usize = 150;
    let writing = Arc::new(AtomicBool::new(true));
    let mut writers = JoinSet::new();
    for (name, store) in [("a", a.clone()), ("b", b.clone())] {
        writers.spawn(async move {
            for n in 0..WRITES {
                let (u, t) = (format!("u{}", n % 10), DataType::ALL[n % 2]);
                // Every fifth of the site's own backend: not sent to it, but read all the same.
                let origin = (n % 5 == 0).then_some("roflfaucet");
                put(&*store, &u, t, json!({"by": name, "n": n}), origin).await;
            }
        });
    }
    let in_flight = Arc::new(Mutex::new(BTreeSet::new()));
    let mut dispatchers = JoinSet::new();
    for store in [a.clone(), b.clone()] {
        let (rofl, writing, in_flight) = (rofl.clone(), writing.clone(), in_flight.clone());
        dispatchers.spawn(async move {
            let (mut read, mut delivered) = (0, Vec::new());
            while writing.load(Ordering::SeqCst) {
                let (r, d) = webhook_round(&*store, &rofl, &in_flight).await;
                (read, delivered) = (read + r, [delivered, d].concat());
            }
            (read, delivered)
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    writing.store(false, Ordering::SeqCst);
    let (mut read, mut delivered) = (0, Vec::new());
    while let Some(done) = dispatchers.join_next().await {
        let (r, d) = done.unwrap();
        (read, delivered) = (read + r, [delivered, d].concat());
    }

    // The changes not read yet are read by one more round of each, once they all show.
    let keys: BTreeSet<Key> = (0..WRITES).map(|n| (format!("u{}", n % 10), DataType::ALL[n % 2])).collect();
    let finals = versions_now(&*a, &keys).await;
    let feed = feed_until(&*a, FeedPosition::default(), ALL, 100, |feed| {
        feed.iter().map(|c| (key(c), c.version)).collect::<BTreeMap<_, _>>() == finals
    })
    .await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (r, d) = webhook_round(&*a, &rofl, &in_flight).await;
        let (r2, d2) = webhook_round(&*b, &rofl, &in_flight).await;
        (read, delivered) = (read + r + r2, [delivered, d, d2].concat());
        if a.webhook_stats().await.unwrap().is_empty() && r + r2 == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the queue never emptied");
    }

    // Each change was read by one transfer: as many reads as the feed's positions since the
    // start, each record's latest counted once, and the earlier ones each read before it moved.
    let unique: BTreeSet<&(Key, u64)> = delivered.iter().collect();
    assert_eq!(unique.len(), delivered.len(), "a version was delivered twice: {delivered:?}");
    for (key, version) in &finals {
        let last = feed.iter().find(|c| &self::key(c) == key).unwrap();
        let own = last.origin.as_ref().is_some_and(|o| o == &rofl);
        assert_eq!(
            delivered.iter().any(|(k, v)| k == key && v == version),
            !own,
            "{key:?} at its final version {version} (by {:?}): delivered unless the site's own",
            last.origin
        );
    }
    assert!(read >= finals.len() && read <= 2 * WRITES, "{read} changes read");
    assert_eq!(a.webhook_transfer(&rofl, ALL, T, 100).await.unwrap(), 0, "nothing is read twice");
    assert_eq!(
        b.webhook_claim(&rofl, T + LEASE_MS, LEASE_MS, 100).await.unwrap(),
        vec![],
        "nothing queued twice"
    );
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_transferring_at_once_read_each_change_once_and_claim_each_notification_once() {
    let (a, b, _) = two_instances();
    let rofl = site("roflfaucet");
    assert_eq!(b.webhook_transfer(&rofl, ALL, T, 100).await.unwrap(), 0);
    const RECORDS: usize = 90;
    let mut expected = Vec::new();
    for n in 0..RECORDS {
        let store = if n % 2 == 0 { &a } else { &b };
        let (u, t) = (format!("u{}", n / 3), DataType::ALL[n % 3]);
        expected.push((u.clone(), t, put(&**store, &u, t, json!({"n": n}), None).await.version));
    }
    let holds_all = |feed: &[FeedChange]| feed.len() == RECORDS;
    feed_until(&*a, FeedPosition::default(), ALL, 100, holds_all).await;

    // Both move the feed into the queue at once, a few changes at a time.
    let read = Arc::new(AtomicUsize::new(0));
    let mut transfers = JoinSet::new();
    for store in [a.clone(), b.clone(), a.clone(), b.clone()] {
        let (rofl, read) = (rofl.clone(), read.clone());
        transfers.spawn(async move {
            while read.load(Ordering::SeqCst) < RECORDS {
                read.fetch_add(store.webhook_transfer(&rofl, ALL, T, 4).await.unwrap(), Ordering::SeqCst);
            }
        });
    }
    while let Some(done) = transfers.join_next().await {
        done.unwrap();
    }
    assert_eq!(read.load(Ordering::SeqCst), RECORDS, "a change was read by two transfers");
    assert_eq!(a.webhook_stats().await.unwrap()[0].queued, RECORDS as u64);

    // Both take the queue at once, a few at a time: each notification is taken once.
    let mut claims = JoinSet::new();
    for store in [a.clone(), b.clone(), a.clone(), b.clone()] {
        let rofl = rofl.clone();
        claims.spawn(async move {
            let mut taken = Vec::new();
            loop {
                let claimed = store.webhook_claim(&rofl, T, LEASE_MS, 3).await.unwrap();
                if claimed.is_empty() {
                    return taken;
                }
                taken.extend(
                    claimed.into_iter().map(|p| (p.user.as_str().to_owned(), p.data_type, p.version)),
                );
            }
        });
    }
    let mut taken = Vec::new();
    while let Some(done) = claims.join_next().await {
        taken.extend(done.unwrap());
    }
    taken.sort();
    expected.sort();
    assert_eq!(taken, expected, "each notification taken once");
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn settling_through_one_instance_a_version_the_other_replaced_keeps_the_newer_due() {
    let (a, b, _) = two_instances();
    let rofl = site("roflfaucet");
    assert_eq!(a.webhook_transfer(&rofl, ALL, T, 100).await.unwrap(), 0);
    put(&*a, "ann", DataType::Balance, json!({"coins": 1}), None).await;
    put(&*a, "bob", DataType::Balance, json!({"coins": 1}), None).await;
    transfer_all(&*a, &rofl, ALL, T, 2).await;
    let claimed = a.webhook_claim(&rofl, T, LEASE_MS, 10).await.unwrap();
    assert_eq!(claimed.len(), 2);
    assert_eq!(b.webhook_claim(&rofl, T, LEASE_MS, 10).await.unwrap(), vec![], "both leased to A");

    // While A sends them, ann's record changes and B queues the newer version.
    put(&*b, "ann", DataType::Balance, json!({"coins": 2}), None).await;
    transfer_all(&*b, &rofl, ALL, T + 5, 1).await;
    assert_eq!(b.webhook_claim(&rofl, T + 10, LEASE_MS, 10).await.unwrap(), vec![], "still leased to A");
    let settled = [
        Settled { user: user("ann"), data_type: DataType::Balance, version: 1, settle: Settle::Delivered },
        Settled {
            user: user("bob"),
            data_type: DataType::Balance,
            version: 1,
            settle: Settle::Retry { at_ms: T + 1000 },
        },
    ];
    a.webhook_settle(&rofl, T + 20, &settled).await.unwrap();

    let due = b.webhook_claim(&rofl, T + 20, LEASE_MS, 10).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(
        (due[0].user.as_str(), due[0].version, due[0].attempts),
        ("ann", 2, 0),
        "the newer version, due at once"
    );
    assert_eq!(due[0].queued_ms, T + 5, "its wait counted from when it was queued");
    assert_eq!(a.webhook_claim(&rofl, T + 999, LEASE_MS, 10).await.unwrap(), vec![], "bob is retried later");
    let retried = a.webhook_claim(&rofl, T + 1000, LEASE_MS, 10).await.unwrap();
    assert_eq!((retried[0].user.as_str(), retried[0].version, retried[0].attempts), ("bob", 1, 1));
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queue_and_cursor_outlive_both_instances() {
    let (a, b, url) = two_instances();
    let rofl = site("roflfaucet");
    assert_eq!(a.webhook_transfer(&rofl, ALL, T, 100).await.unwrap(), 0);
    for n in 0..6 {
        put(&*b, &format!("u{n}"), DataType::Balance, json!({"coins": n + 1}), None).await;
    }
    feed_until(&*a, FeedPosition::default(), ALL, 100, |feed| feed.len() == 6).await;
    assert_eq!(a.webhook_transfer(&rofl, ALL, T, 4).await.unwrap(), 4, "four of six moved");
    let leased = b.webhook_claim(&rofl, T, 1000, 2).await.unwrap();
    assert_eq!(leased.len(), 2);
    a.close().await;
    b.close().await;
    drop((a, b));

    let clock = TestClock::at(T);
    let (a, b) = (open_postgres(&url, &clock), open_postgres(&url, &clock));
    assert_eq!(a.webhook_stats().await.unwrap()[0].queued, 4);
    assert_eq!(b.webhook_claim(&rofl, T, LEASE_MS, 10).await.unwrap().len(), 2, "the two not leased");
    transfer_all(&*b, &rofl, ALL, T, 2).await;
    assert_eq!(a.webhook_transfer(&rofl, ALL, T, 100).await.unwrap(), 0, "the cursor kept its place");
    let after_lease = a.webhook_claim(&rofl, T + 1000, 1000, 10).await.unwrap();
    let mut users: Vec<&str> = after_lease.iter().map(|p| p.user.as_str()).collect();
    users.sort();
    let mut expected: Vec<&str> = leased.iter().map(|p| p.user.as_str()).collect();
    expected.extend(["u4", "u5"]);
    expected.sort();
    assert_eq!(users, expected, "the leased two once their lease ended, and the last two moved");
    a.close().await;
    b.close().await;
}

/// A database made by the hub of the schema before this one's, with `sql` run in it.
fn database_of_the_schema_before(cluster: &Cluster, sql: &str) -> String {
    let url = cluster.database();
    let before = usize::try_from(SCHEMA_VERSION - 1).unwrap();
    let mut setup = String::from(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_ms BIGINT NOT NULL);",
    );
    for (version, step) in STEPS[..before].iter().enumerate() {
        setup.push_str(step);
        setup.push_str(&format!(";\nINSERT INTO schema_migrations VALUES ({}, 0);", version + 1));
    }
    setup.push_str(&format!(
        "INSERT INTO meta (key, value) VALUES ('epoch', 'before'), ('op_horizon_ms', '{}');",
        T - 30 * 86_400_000
    ));
    setup.push_str(sql);
    cluster.psql(&url, &setup);
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn records_of_a_database_of_the_schema_before_get_positions_and_show_in_the_feed() {
    let cluster = Cluster::shared();
    let url = database_of_the_schema_before(
        cluster,
        "INSERT INTO records (user_id, data_type, data, version, updated_ms) VALUES
             ('cid', 'balance', '{\"coins\":3}', 3, 3000),
             ('ann', 'balance', '{\"coins\":1}', 1, 1000),
             ('bob', 'profile', '{\"name\":\"Bob\"}', 2, 2000),
             ('ann', 'profile', '{\"name\":\"Ann\"}', 1, 2000);",
    );
    let clock = TestClock::at(T);
    let (a, b) = (open_postgres(&url, &clock), open_postgres(&url, &clock));
    assert_eq!(a.epoch(), "before");
    let migrated = cluster.psql(&url, "SELECT max(version) FROM schema_migrations");
    assert_eq!(migrated, SCHEMA_VERSION.to_string());

    let feed = b.feed(FeedPosition::default(), ALL, 100).await.unwrap();
    let listed: Vec<(&str, DataType, u64, i64)> =
        feed.iter().map(|c| (c.user.as_str(), c.data_type, c.version, c.updated_ms)).collect();
    assert_eq!(
        listed,
        [
            ("ann", DataType::Balance, 1, 1000),
            ("ann", DataType::Profile, 1, 2000),
            ("bob", DataType::Profile, 2, 2000),
            ("cid", DataType::Balance, 3, 3000),
        ],
        "each record once, in the order they were last changed"
    );
    assert_eq!(feed[3].data.as_deref(), Some("{\"coins\":3}"));
    assert!(feed.iter().all(|c| c.origin.is_none()));

    // A site met now starts after them; a change of one moves it after them all.
    let rofl = site("roflfaucet");
    assert_eq!(a.webhook_transfer(&rofl, ALL, T, 100).await.unwrap(), 0);
    applied(a.write(add("ann", "op-1", 1)).await);
    transfer_all(&*b, &rofl, ALL, T, 1).await;
    let claimed = b.webhook_claim(&rofl, T, LEASE_MS, 10).await.unwrap();
    assert_eq!((claimed[0].user.as_str(), claimed[0].version), ("ann", 2));
    let after = feed_until(&*a, feed[3].position, ALL, 100, |rest| !rest.is_empty()).await;
    assert_eq!((after[0].user.as_str(), after[0].version), ("ann", 2));
    let from_start = a.feed(FeedPosition::default(), ALL, 100).await.unwrap();
    assert_eq!(from_start.len(), 4, "still each record once: {from_start:?}");
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_hubs_writes_during_a_rollout_reach_the_feed() {
    let cluster = Cluster::shared();
    let (a, b, url) = two_instances();
    put(&*a, "ann", DataType::Balance, json!({"coins": 1}), Some("wrc")).await;
    let before = feed_until(&*a, FeedPosition::default(), ALL, 100, |feed| feed.len() == 1).await;

    // A hub of the schema before writes as it did: without a position or an origin.
    cluster.psql(
        &url,
        "UPDATE records SET data = '{\"coins\":2}', version = 2, updated_ms = updated_ms + 1
             WHERE user_id = 'ann' AND data_type = 'balance';
         INSERT INTO records (user_id, data_type, data, version, updated_ms, credits)
             VALUES ('bob', 'balance', '{\"coins\":5}', 1, 5, NULL);",
    );
    let after = feed_until(&*b, before[0].position, ALL, 100, |feed| feed.len() == 2).await;
    let listed: Vec<(&str, u64, Option<&SiteId>)> =
        after.iter().map(|c| (c.user.as_str(), c.version, c.origin.as_ref())).collect();
    assert_eq!(listed, [("ann", 2, None), ("bob", 1, None)], "in the order written, made by no site known");
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_epoch_numbers_the_feed_afresh_in_order_with_the_cursors() {
    let cluster = Cluster::shared();
    let (a, b, url) = two_instances();
    let rofl = site("roflfaucet");
    assert_eq!(a.webhook_transfer(&rofl, ALL, T, 100).await.unwrap(), 0);
    for u in ["ann", "bob", "cid", "dee"] {
        put(&*a, u, DataType::Balance, json!({"coins": 1}), None).await;
    }
    put(&*b, "ann", DataType::Balance, json!({"coins": 2}), None).await;
    let feed = feed_until(&*a, FeedPosition::default(), ALL, 100, |feed| feed.len() == 4).await;
    transfer_all(&*a, &rofl, ALL, T, 2).await;
    a.close().await;
    b.close().await;
    drop((a, b));

    // As if restored from a dump of a cluster whose transaction ids were far ahead of this one's.
    cluster.psql(&url, "UPDATE records SET feed_xid = feed_xid + 1000000000; UPDATE webhook_cursors SET xid = xid + 1000000000");
    let database = Database::new(&url, Duration::from_secs(30), None).unwrap();
    tokio::task::spawn_blocking(move || renew_epoch(database)).await.unwrap().unwrap();
    let clock = TestClock::at(T);
    let (a, b) = (open_postgres(&url, &clock), open_postgres(&url, &clock));
    let renewed = a.feed(FeedPosition::default(), ALL, 100).await.unwrap();
    let order = |feed: &[FeedChange]| feed.iter().map(|c| (key(c), c.version)).collect::<Vec<_>>();
    assert_eq!(order(&renewed), order(&feed), "the same order");

    put(&*b, "eve", DataType::Balance, json!({"coins": 1}), None).await;
    let after = feed_until(&*a, renewed[3].position, ALL, 100, |rest| !rest.is_empty()).await;
    assert_eq!(after[0].user.as_str(), "eve", "a later write is read after the restored records");
    transfer_all(&*b, &rofl, ALL, T, 3).await;
    let mut queued: Vec<String> = b
        .webhook_claim(&rofl, T, LEASE_MS, 10)
        .await
        .unwrap()
        .iter()
        .map(|p| p.user.as_str().to_owned())
        .collect();
    queued.sort();
    let mut expected: Vec<String> =
        feed.iter().map(|c| c.user.as_str().to_owned()).chain(["eve".to_owned()]).collect();
    expected.sort();
    assert_eq!(queued, expected, "the cursor went on from the same place: the last two restored, and eve");
    a.close().await;
    b.close().await;
}
