//! How a change committed through one hub instance on PostgreSQL reaches the event streams of
//! another: through the change log, read by each instance's reader. At the store: a change
//! written through instance A arrives at instance B's reader with its data, version and stamp,
//! in order; a transaction that took its id before another but commits after it is delivered,
//! not skipped; changes written while B's connection to the log is cut arrive once it is back;
//! a change no instance notified arrives with the periodic read; a resume reads exactly a
//! user's changes in a range, and nothing from before what the log keeps; a refused, failing,
//! unchanged or rolled-back write publishes nothing. Over HTTP, with two hubs on one database:
//! a stream open on one instance gets a change written through the other, and a
//! `Last-Event-ID` one instance sent resumes on the other with what was missed.
//!
//! Instances are `PostgresStore`s, or `TestHub`s (the real hub over HTTP), on one database of
//! the shared test cluster (the test that holds a transaction open has a cluster of its own: an
//! open transaction holds back every database's changes).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hub::store::postgres::{KEEP_FOR, KEEP_ROWS, LOG_READER_NAME, PostgresStore, READ_EVERY};
use hub::store::{
    Change, ChangeEvent, Changes, Current, Mutation, OpKey, Position, Rejection, Store, StoreError, Write,
    WriteOutcome,
};
use protocol::{DataType, OpId, SiteId};
use serde_json::{Value, json};
use support::TestHub;
use support::events::{EventStream, accepted, assert_change, changes, resume, stream_client, stream_request};
use support::postgres::{Cluster, hub_on};
use support::store::{T, TestClock, add, applied, open_postgres, user};

/// How long a change notified may take to arrive, well below [`READ_EVERY`]: one that arrives
/// within it came by a notification (or a reconnect's read), not by the periodic read.
const NOTIFIED_WITHIN: Duration = Duration::from_secs(3);

/// A write setting `user_id`'s `data_type` to `data`, under op `op_id`.
fn set(user_id: &str, op_id: &str, data_type: DataType, data: Value) -> Write {
    let mutation: Mutation =
        Arc::new(move |_: Current<'_>| Ok(Change { data: data.clone(), ledger: None, credits: None }));
    Write {
        user: user(user_id),
        data_type,
        site: SiteId::parse("wrc").unwrap(),
        origin: None,
        op: Some(OpKey { op_id: OpId::parse(op_id).unwrap(), fingerprint: format!("set {op_id}") }),
        mutation,
    }
}

/// Two instances on one new database of the shared cluster, B's changes taken, and the URL.
async fn two_instances() -> (Arc<PostgresStore>, Arc<PostgresStore>, Changes, String) {
    let url = Cluster::shared().database();
    let clock = TestClock::at(T);
    let a = open_postgres(&url, &clock);
    let b = open_postgres(&url, &clock);
    let changes = b.take_changes().expect("B's changes, taken once");
    assert!(b.take_changes().is_none(), "the changes are taken once");
    (a, b, changes, url)
}

/// The next `n` changes, arriving within `within` of the call; panics with those that did.
async fn receive(changes: &mut Changes, n: usize, within: Duration) -> Vec<ChangeEvent> {
    let deadline = tokio::time::Instant::now() + within;
    let mut received = Vec::new();
    while received.len() < n {
        match tokio::time::timeout_at(deadline, changes.batches.recv()).await {
            Ok(Some(batch)) => received.extend(batch),
            Ok(None) => panic!("the changes ended; received {received:?}"),
            Err(_) => panic!("{} of {n} changes arrived within {within:?}: {received:?}", received.len()),
        }
    }
    assert_eq!(received.len(), n, "more changes than written: {received:?}");
    received
}

/// Asserts that no change arrives for `wait`.
async fn assert_none_arrives(changes: &mut Changes, wait: Duration) {
    if let Ok(batch) = tokio::time::timeout(wait, changes.batches.recv()).await {
        panic!("a change arrived: {batch:?}");
    }
}

/// Asserts that `changes` are in position order, each after the one before.
#[track_caller]
fn assert_in_order(after: Position, changes: &[ChangeEvent]) {
    let mut last = after;
    for change in changes {
        assert!(change.position > last, "{:?} does not follow {last:?}: {changes:?}", change.position);
        last = change.position;
    }
}

/// `(user, data_type, version)` of each change.
fn summary(changes: &[ChangeEvent]) -> Vec<(String, DataType, u64)> {
    changes.iter().map(|c| (c.user.as_str().to_owned(), c.data_type, c.version)).collect()
}

/// The version a write applied or replayed.
fn version(outcome: Result<WriteOutcome, StoreError>) -> u64 {
    match outcome {
        Ok(WriteOutcome::Applied(record) | WriteOutcome::Replayed(record)) => record.version,
        other => panic!("expected the write applied or replayed, got {other:?}"),
    }
}

fn data(change: &ChangeEvent) -> Option<Value> {
    change.data.as_deref().map(|text| serde_json::from_str(text).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_written_through_one_instance_reaches_the_others_reader_in_order() {
    let (a, b, mut changes, _) = two_instances().await;
    let start = changes.start;

    let sent = Instant::now();
    let first = applied(a.write(add("ada", "op-1", 5)).await);
    let second = applied(a.write(add("ada", "op-2", 3)).await);
    let large = json!({ "bio": "x".repeat(hub::store::INLINE_DATA_BYTES) });
    let profile = applied(a.write(set("ada", "op-3", DataType::Profile, large)).await);
    let received = receive(&mut changes, 3, NOTIFIED_WITHIN).await;
    assert!(sent.elapsed() < NOTIFIED_WITHIN);

    assert_in_order(start, &received);
    assert_eq!(
        summary(&received),
        [
            ("ada".into(), DataType::Balance, 1),
            ("ada".into(), DataType::Balance, 2),
            ("ada".into(), DataType::Profile, 1)
        ]
    );
    assert_eq!(data(&received[0]), Some(json!({ "coins": 5 })));
    assert_eq!(data(&received[1]), Some(json!({ "coins": 8 })));
    assert_eq!(received[2].data, None, "a record longer than INLINE_DATA_BYTES is sent without its data");
    let stamps: Vec<i64> = [first, second, profile].iter().map(|r| r.updated_ms.unwrap()).collect();
    assert_eq!(received.iter().map(|c| c.updated_ms).collect::<Vec<_>>(), stamps);

    // A change written through B reaches B's own reader too.
    applied(b.write(add("ada", "op-4", 1)).await);
    let own = receive(&mut changes, 1, NOTIFIED_WITHIN).await;
    assert_in_order(received[2].position, &own);
    assert_eq!(summary(&own), [("ada".into(), DataType::Balance, 3)]);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_that_took_its_id_first_but_commits_later_is_delivered_not_skipped() {
    let cluster = Cluster::start();
    let url = cluster.database();
    let clock = TestClock::at(T);
    let a = open_postgres(&url, &clock);
    let b = open_postgres(&url, &clock);
    let mut changes = b.take_changes().unwrap();

    // A transaction takes its id and writes a change, and stays open; no instance will notify
    // its commit.
    let (held, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    held.batch_execute(
        "BEGIN;
         INSERT INTO change_log (xid, user_id, data_type, version, updated_ms, data)
         VALUES (pg_current_xact_id()::TEXT::BIGINT, 'early', 'balance', 1, 1, '{\"coins\":1}')",
    )
    .await
    .unwrap();
    // A later transaction commits a change first: its position is later, and it is not
    // delivered while the earlier one may still commit before it.
    applied(a.write(add("late", "op-1", 2)).await);
    assert_none_arrives(&mut changes, Duration::from_millis(500)).await;

    held.batch_execute("COMMIT").await.unwrap();
    let committed = Instant::now();
    let received = receive(&mut changes, 2, NOTIFIED_WITHIN).await;
    assert!(
        committed.elapsed() < NOTIFIED_WITHIN,
        "read again soon after the boundary moved, not at the next periodic read"
    );
    assert_eq!(
        summary(&received),
        [("early".into(), DataType::Balance, 1), ("late".into(), DataType::Balance, 1)],
        "the earlier transaction's change comes first"
    );
    assert_in_order(Position::default(), &received);
    a.close().await;
    b.close().await;
}

/// The backend pids of the connections to the change log of the database at `url`.
fn log_readers(cluster: &Cluster, url: &str) -> Vec<String> {
    let printed = cluster.psql(
        url,
        &format!(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = '{LOG_READER_NAME}' ORDER BY pid"
        ),
    );
    printed.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_written_while_the_readers_connection_is_cut_arrive_once_it_is_back() {
    let cluster = Cluster::shared();
    let (a, b, mut changes, url) = two_instances().await;
    applied(a.write(add("ada", "op-1", 1)).await);
    let before = receive(&mut changes, 1, NOTIFIED_WITHIN).await;

    // Every connection to the log is cut, B's listener and A's (which notifies): changes
    // written meanwhile are notified to no one.
    let cut = log_readers(cluster, &url);
    assert_eq!(cut.len(), 2, "one connection to the change log per instance");
    cluster.psql(
        &url,
        &format!("SELECT pg_terminate_backend(pid) FROM unnest(ARRAY[{}]) AS pid", cut.join(",")),
    );
    let written = Instant::now();
    applied(a.write(add("ada", "op-2", 2)).await);
    applied(a.write(add("ada", "op-3", 3)).await);

    let received = receive(&mut changes, 2, NOTIFIED_WITHIN).await;
    assert!(written.elapsed() < NOTIFIED_WITHIN, "read after the reconnect, not at the next periodic read");
    assert_eq!(
        summary(&received),
        [("ada".into(), DataType::Balance, 2), ("ada".into(), DataType::Balance, 3)]
    );
    assert_in_order(before[0].position, &received);
    let reconnected = log_readers(cluster, &url);
    assert!(reconnected.iter().all(|pid| !cut.contains(pid)), "{cut:?} then {reconnected:?}");
    assert!(!reconnected.is_empty(), "B's reader connected again");
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_no_instance_notified_arrives_with_the_periodic_read() {
    let cluster = Cluster::shared();
    let (a, b, mut changes, url) = two_instances().await;
    cluster.psql(
        &url,
        "INSERT INTO change_log (xid, user_id, data_type, version, updated_ms, data)
         VALUES (pg_current_xact_id()::TEXT::BIGINT, 'quiet', 'points', 4, 7, '{\"points\":9}')",
    );
    let received = receive(&mut changes, 1, READ_EVERY + Duration::from_secs(3)).await;
    assert_eq!(summary(&received), [("quiet".into(), DataType::Points, 4)]);
    assert_eq!((received[0].updated_ms, data(&received[0])), (7, Some(json!({ "points": 9 }))));
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_reads_exactly_one_users_changes_in_its_range() {
    let (a, b, mut changes, _) = two_instances().await;
    let users = ["ada", "bob", "ada", "ada", "bob", "ada"];
    for (i, name) in users.iter().enumerate() {
        applied(a.write(add(name, &format!("op-{i}"), 1)).await);
    }
    applied(a.write(set("ada", "op-p", DataType::Profile, json!({ "name": "Ada" }))).await);
    let all = receive(&mut changes, users.len() + 1, NOTIFIED_WITHIN).await;

    // After Ada's first change, up to her profile's: her later balance changes and the profile.
    let (after, upto) = (all[0].position, all[6].position);
    let between = b.changes_between(&user("ada"), after, upto).await.unwrap().expect("kept");
    let expected: Vec<ChangeEvent> = all
        .iter()
        .filter(|c| c.user.as_str() == "ada" && c.position > after && c.position <= upto)
        .cloned()
        .collect();
    assert_eq!(between, expected);
    assert_eq!(summary(&between).len(), 4);
    // From the reader's start, through either instance, up to a position in the middle.
    let upto = all[3].position;
    let from_start = a.changes_between(&user("bob"), changes.start, upto).await.unwrap().expect("kept");
    assert_eq!(summary(&from_start), [("bob".into(), DataType::Balance, 1)]);
    assert_eq!(b.changes_between(&user("carol"), changes.start, upto).await.unwrap(), Some(vec![]));
    a.close().await;
    b.close().await;
}

/// What `meta.change_log_kept_from` says in the database at `url`: the log keeps changes of
/// transactions from it on.
fn kept_from(cluster: &Cluster, url: &str) -> u64 {
    cluster.psql(url, "SELECT value FROM meta WHERE key = 'change_log_kept_from'").parse().unwrap()
}

/// Writes through `store`, after `ageing` the log each time, until the log keeps changes only
/// from a transaction id beyond `after` on; returns that id. (A mark of the log may find its
/// boundary held back by a transaction of another test's, in another database of the cluster:
/// later marks go past it.)
async fn until_kept_from_passes(
    cluster: &Cluster,
    url: &str,
    store: &PostgresStore,
    after: u64,
    ageing: impl Fn(),
) -> u64 {
    let since = Instant::now();
    loop {
        let kept = kept_from(cluster, url);
        if kept > after {
            return kept;
        }
        assert!(since.elapsed() < Duration::from_secs(30), "the log kept everything");
        ageing();
        applied(store.write(add("pruner", &format!("p-{}", since.elapsed().as_nanos()), 1)).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_from_before_what_the_log_keeps_gets_none_after_ten_minutes() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let clock = TestClock::at(T);
    let store = open_postgres(&url, &clock);
    let mut changes = store.take_changes().unwrap();
    applied(store.write(add("ada", "op-1", 1)).await);
    let old = receive(&mut changes, 1, NOTIFIED_WITHIN).await.remove(0);

    let keep_for = i64::try_from(KEEP_FOR.as_millis()).unwrap();
    clock.pass(keep_for);
    let kept =
        until_kept_from_passes(cluster, &url, &store, old.position.era, || clock.pass(keep_for / 10)).await;
    applied(store.write(add("ada", "op-2", 1)).await);

    assert_eq!(store.changes_between(&user("ada"), changes.start, old.position).await.unwrap(), None);
    let upto = Position { era: u64::MAX >> 1, seq: 0 };
    let recent = store.changes_between(&user("ada"), Position { era: kept, seq: 0 }, upto).await.unwrap();
    assert_eq!(summary(&recent.expect("kept")), [("ada".into(), DataType::Balance, 2)]);
    // The rows are deleted too, a chunk after each batch.
    let since = Instant::now();
    while cluster.psql(&url, &format!("SELECT count(*) FROM change_log WHERE xid < {kept}")) != "0" {
        assert!(since.elapsed() < Duration::from_secs(30), "the old changes were never deleted");
        applied(store.write(add("pruner", &format!("d-{}", since.elapsed().as_nanos()), 1)).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_from_before_what_the_log_keeps_gets_none_beyond_its_rows() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let clock = TestClock::at(T);
    let store = open_postgres(&url, &clock);
    let mut changes = store.take_changes().unwrap();
    applied(store.write(add("ada", "op-1", 1)).await);
    let old = receive(&mut changes, 1, NOTIFIED_WITHIN).await.remove(0);

    // As many positions drawn as the log keeps, in moments.
    let drawn = || {
        let last: i64 = cluster.psql(&url, "SELECT last_value FROM change_log_position_seq").parse().unwrap();
        cluster.psql(
            &url,
            &format!("ALTER TABLE change_log ALTER COLUMN position RESTART WITH {}", last + KEEP_ROWS),
        );
        clock.pass_monotonic(60_000);
    };
    until_kept_from_passes(cluster, &url, &store, old.position.era, drawn).await;
    assert_eq!(store.changes_between(&user("ada"), changes.start, old.position).await.unwrap(), None);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_failing_or_unchanged_write_publishes_no_change() {
    let cluster = Cluster::shared();
    let (a, b, mut changes, url) = two_instances().await;
    applied(a.write(set("zz-broken", "b-1", DataType::Settings, json!({ "theme": "dark" }))).await);
    applied(a.write(set("ada", "s-1", DataType::Settings, json!({ "theme": "dark" }))).await);
    receive(&mut changes, 2, NOTIFIED_WITHIN).await;
    cluster.psql(&url, "UPDATE records SET credits = 'not json' WHERE user_id = 'zz-broken'");

    // Sent at once, to be committed together: the damaged record's write fails alone, last
    // in its batch's order of records, after the others' changes were made.
    let writes = [
        add("ada", "a-1", 5),
        add("bob", "b-1", -1),
        set("ada", "s-2", DataType::Settings, json!({ "theme": "dark" })),
        set("zz-broken", "b-2", DataType::Settings, json!({ "theme": "light" })),
        add("cy", "c-1", 2),
    ];
    let answers = futures_util::future::join_all(writes.into_iter().map(|w| a.write(w))).await;
    assert!(matches!(answers[0], Ok(WriteOutcome::Applied(_))));
    assert!(
        matches!(answers[1], Ok(WriteOutcome::Rejected(Rejection::InsufficientFunds(_)))),
        "{:?}",
        answers[1]
    );
    assert!(
        matches!(&answers[2], Ok(WriteOutcome::Applied(record)) if record.version == 1),
        "the same data, no new version: {:?}",
        answers[2]
    );
    assert!(matches!(answers[3], Err(StoreError::Malformed(_))), "{:?}", answers[3]);
    assert!(matches!(answers[4], Ok(WriteOutcome::Applied(_))));

    applied(a.write(add("zed", "z-1", 1)).await);
    let received = receive(&mut changes, 3, NOTIFIED_WITHIN).await;
    let mut made = summary(&received);
    made.sort();
    assert_eq!(
        made,
        [
            ("ada".into(), DataType::Balance, 1),
            ("cy".into(), DataType::Balance, 1),
            ("zed".into(), DataType::Balance, 1)
        ]
    );
    assert_none_arrives(&mut changes, Duration::from_millis(300)).await;
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_ops_sent_to_two_instances_at_once_publish_each_change_once() {
    let cluster = Cluster::shared();
    let (a, b, mut changes, url) = two_instances().await;
    // Each op's batches race on its op id: the loser's transaction, its change logged, is
    // rolled back and run again, and finds the winner's answer.
    let mut pairs = Vec::new();
    for i in 0..30 {
        let (a, b) = (a.clone(), b.clone());
        pairs.push(tokio::spawn(async move {
            let op = format!("op-{i}");
            let (to_a, to_b) = tokio::join!(a.write(add("ada", &op, 1)), b.write(add("ada", &op, 1)));
            (version(to_a), version(to_b))
        }));
    }
    for pair in pairs {
        let (on_a, on_b) = pair.await.unwrap();
        assert_eq!(on_a, on_b);
    }
    let received = receive(&mut changes, 30, NOTIFIED_WITHIN).await;
    let mut versions: Vec<u64> = received.iter().map(|c| c.version).collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=30).collect::<Vec<u64>>());
    assert_eq!(cluster.psql(&url, "SELECT count(*) FROM change_log"), "30");
    assert_none_arrives(&mut changes, Duration::from_millis(300)).await;
    a.close().await;
    b.close().await;
}

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// [`USER`]'s stream on `hub`, opened by a page of [`SITE`], read up to its `ready` event.
async fn listen(hub: &TestHub) -> EventStream {
    let token = hub.token(SITE, USER);
    let mut stream =
        accepted(stream_request(&stream_client(), &hub.url, USER, "", Some(&token)), "a stream").await;
    stream.ready().await;
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_open_on_one_instance_gets_a_change_written_through_another() {
    let url = Cluster::shared().database();
    let (a, b) = (hub_on(&url).await, hub_on(&url).await);
    let mut on_b = listen(&b).await;

    let written = Instant::now();
    let answer = a.site(SITE, USER).delta("balance", 10, "op-1").await.assert_ok().clone();
    let event = on_b.change("the change written through A").await;
    assert!(written.elapsed() < NOTIFIED_WITHIN, "notified, not read by the periodic read");
    assert_change(&event, "balance", &answer);
    let answer = b.site(SITE, USER).push("profile", json!({ "bio": "both" })).await.assert_ok().clone();
    assert_change(&on_b.change("the change written through B").await, "profile", &answer);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_last_event_id_from_one_instance_resumes_on_another_with_what_was_missed() {
    let url = Cluster::shared().database();
    let a = hub_on(&url).await;
    let faucet = a.site(SITE, USER);
    let mut on_a = listen(&a).await;
    let first = faucet.delta("balance", 10, "op-1").await.assert_ok().clone();
    let seen = on_a.event("the first change").await;
    assert_change(&seen.json(), "balance", &first);
    drop(on_a);

    let missed = [
        ("balance", faucet.delta("balance", -3, "op-2").await.assert_ok().clone()),
        ("settings", faucet.push("settings", json!({ "theme": "dark" })).await.assert_ok().clone()),
    ];
    // B starts after the missed changes: it has them from the change log, not in memory.
    let b = hub_on(&url).await;
    let (mut on_b, between, ready) = resume(&b.url, &b.token(SITE, USER), USER, seen.id()).await;
    assert_eq!(changes(&between), [("balance".to_owned(), 2), ("settings".to_owned(), 1)], "{between:?}");
    for (frame, (data_type, answer)) in between.iter().zip(&missed) {
        assert_change(&frame.json(), data_type, answer);
    }
    assert_eq!(ready.json()["resumed"], true, "no resync: {ready:?}");

    let after = faucet.delta("balance", 1, "op-3").await.assert_ok().clone();
    assert_change(&on_b.change("the change after the resume").await, "balance", &after);
}
