//! The store's stories, told once and run on every backend: SQLite in a temporary data dir,
//! and PostgreSQL in a fresh database of the shared test cluster. Each story is a function of
//! the [`Backend`]; `stories!` makes one test of it per backend (`on_sqlite::…`,
//! `on_postgres::…`), so that a failure names both.
//!
//! Stories of the API go through the real hub over HTTP. Stories of the store go through the
//! `Store` trait with a clock the test sets, and stories of a rule that counts by the day
//! (the credit ceiling) through the `Domain` over such a store. Every story reads the audit
//! ledger straight from the database, behind the store's back.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use hub::config::Config;
use hub::domain::{Caller, Ceilings, Domain};
use hub::store::sqlite::{SqliteOptions, SqliteStore};
use hub::store::{
    Change, Current, Mutation, Record, Rejection, Stamp, Store, StoreError, StoreMetrics, Write, WriteOutcome,
};
use protocol::{DataType, Scopes, SiteId};
use serde_json::{Value, json};
use support::postgres::Cluster;
use support::store::{
    DAY, LedgerRow, RETENTION, T, TestClock, add, applied, assert_ledger_adds_up_to, open_postgres,
    over_ceiling, postgres_ledger, user, uuid7,
};
use support::{Reply, SiteClient, TestHub};
use tempfile::TempDir;
use tokio::task::JoinSet;

const USER: &str = "8-evans";
const OTHER: &str = "9-grant";

/// Makes one test of each story per backend.
macro_rules! stories {
    ($($story:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $story() {
                    super::$story(super::Backend::Sqlite).await
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $story() {
                    super::$story(super::Backend::Postgres).await
                }
            )*
        }
    };
}

stories!(
    a_delta_is_applied_once_per_op_id,
    a_replay_answers_the_first_answer,
    an_op_id_reused_for_another_request_is_refused,
    a_kept_refusal_stays_the_ops_answer_after_the_record_changes,
    a_balance_never_goes_below_zero,
    the_version_moves_only_when_the_data_changes,
    stamps_move_forward_even_when_the_clock_goes_back,
    the_hub_answers_with_its_stores_stamps,
    the_ledger_equals_the_balance,
    an_op_dated_before_the_horizon_is_refused_and_never_applied,
    stamps_and_records_read_back_what_was_written,
    concurrent_writes_to_one_record_apply_each_op_exactly_once,
    the_daily_credit_ceiling_counts_credits_exactly,
);

/// The backends every story runs on.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A store opened for one story.
struct Opened {
    store: Arc<dyn Store>,
    rows: Rows,
    /// SQLite's data dir, removed when the story ends.
    _dir: Option<TempDir>,
}

/// The real hub serving one story over HTTP.
struct Served {
    hub: TestHub,
    rows: Rows,
}

impl Backend {
    /// An empty store of this backend reading the time from `clock`.
    fn open(self, clock: &Arc<TestClock>) -> Opened {
        match self {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let options = SqliteOptions {
                    op_retention: RETENTION,
                    max_batch: hub::store::sqlite::MAX_BATCH,
                    op_log_capacity: 10_000,
                    metrics: StoreMetrics::default(),
                    clock: clock.clone(),
                };
                let store = SqliteStore::open(dir.path(), options).unwrap();
                let rows = Rows::Sqlite(dir.path().join(hub::store::sqlite::DB_FILE));
                Opened { store: Arc::new(store), rows, _dir: Some(dir) }
            }
            Backend::Postgres => {
                let url = Cluster::shared().database();
                Opened { store: open_postgres(&url, clock), rows: Rows::Postgres(url), _dir: None }
            }
        }
    }

    /// The test hub (see `support::test_config`) on an empty store of this backend, with a
    /// rate limit that never gets in the way.
    async fn serve(self) -> Served {
        let url = matches!(self, Backend::Postgres).then(|| Cluster::shared().database());
        let store_url = url.clone();
        let hub = TestHub::start_with(|c: &mut Config| {
            c.limits.requests_per_minute = 1_000_000;
            if let Some(url) = store_url {
                c.store.backend = hub::config::Backend::Postgres;
                c.store.url = Some(url);
            }
        })
        .await;
        let rows = match url {
            Some(url) => Rows::Postgres(url),
            None => Rows::Sqlite(hub.dir.path().join(hub::store::sqlite::DB_FILE)),
        };
        Served { hub, rows }
    }
}

/// Where a backend keeps its rows, to read them behind the store's back.
enum Rows {
    /// The database file.
    Sqlite(PathBuf),
    /// The database's URL on the shared cluster.
    Postgres(String),
}

impl Rows {
    /// The ledger of `user`'s `data_type`, oldest first.
    fn ledger(&self, user: &str, data_type: &str) -> Vec<LedgerRow> {
        match self {
            Rows::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                let mut stmt = conn
                    .prepare(
                        "SELECT op_id, delta, result, version FROM ledger
                         WHERE user_id = ?1 AND data_type = ?2 ORDER BY id",
                    )
                    .unwrap();
                stmt.query_map([user, data_type], |r| {
                    let version: i64 = r.get(3)?;
                    Ok(LedgerRow {
                        op_id: r.get(0)?,
                        delta: r.get(1)?,
                        result: r.get(2)?,
                        version: u64::try_from(version).unwrap(),
                    })
                })
                .unwrap()
                .map(Result::unwrap)
                .collect()
            }
            Rows::Postgres(url) => postgres_ledger(Cluster::shared(), url, user, data_type),
        }
    }
}

/// The op ids of `ledger`'s rows, each as often as it appears.
fn op_ids(ledger: &[LedgerRow]) -> Vec<String> {
    let mut ops: Vec<String> = ledger.iter().filter_map(|row| row.op_id.clone()).collect();
    ops.sort();
    ops
}

/// A write, without an op id, setting `user`'s `data_type` to `data`.
fn set(user_id: &str, data_type: DataType, data: Value) -> Write {
    let mutation: Mutation =
        Arc::new(move |_: Current<'_>| Ok(Change { data: data.clone(), ledger: None, credits: None }));
    Write {
        user: user(user_id),
        data_type,
        site: SiteId::parse("wrc").unwrap(),
        origin: None,
        op: None,
        mutation,
    }
}

#[track_caller]
fn replayed(outcome: Result<WriteOutcome, StoreError>) -> Record {
    match outcome {
        Ok(WriteOutcome::Replayed(record)) => record,
        other => panic!("expected the first answer replayed, got {other:?}"),
    }
}

#[track_caller]
fn assert_expired(outcome: Result<WriteOutcome, StoreError>) {
    assert!(matches!(outcome, Ok(WriteOutcome::Rejected(Rejection::OpExpired))), "{outcome:?}");
}

/// The `version`, `data` and `last_updated` of an answer: what a replay must repeat.
fn answer(reply: &Reply) -> (Value, Value, Value) {
    let body = reply.assert_ok();
    (body["version"].clone(), body["data"].clone(), body["last_updated"].clone())
}

/// POSTs a push of `data` to `site`'s user's `data_type`, with `extra` fields (`op_id`,
/// `base_version`).
async fn push(site: &SiteClient, data_type: &str, data: Value, extra: Value) -> Reply {
    let mut body = json!({
        "action": "push", "user_id": site.user, "site_id": site.site, "data_type": data_type, "data": data,
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    site.post(&body).await
}

async fn a_delta_is_applied_once_per_op_id(backend: Backend) {
    let served = backend.serve().await;
    let site = served.hub.site("wrc", USER);
    let first = site.delta("balance", 10, "op-1").await;
    assert_eq!(answer(&first).0, 1);
    assert_eq!(first.body.get("replayed"), None, "{}", first.body);
    for _ in 0..3 {
        let again = site.delta("balance", 10, "op-1").await;
        assert_eq!(answer(&again), answer(&first));
        assert_eq!(again.body["replayed"], true);
    }
    assert_eq!(answer(&site.delta("balance", 5, "op-2").await).0, 2);

    // The same op sent many times at once: one copy applies it, the others replay it.
    let mut copies = JoinSet::new();
    for _ in 0..16 {
        let site = site.clone();
        copies.spawn(async move { site.delta("balance", 7, "op-3").await });
    }
    let copies: Vec<Reply> = copies.join_all().await;
    let first_answers: Vec<&Reply> = copies.iter().filter(|r| r.body.get("replayed").is_none()).collect();
    assert_eq!(first_answers.len(), 1, "op-3 applied {} times", first_answers.len());
    assert!(copies.iter().all(|r| answer(r) == answer(first_answers[0])), "{copies:?}");

    assert_eq!(site.coins().await, 22);
    let ledger = served.rows.ledger(USER, "balance");
    assert_ledger_adds_up_to(&ledger, 22);
    assert_eq!(op_ids(&ledger), ["op-1", "op-2", "op-3"]);
}

async fn a_replay_answers_the_first_answer(backend: Backend) {
    let clock = TestClock::at(T);
    let opened = backend.open(&clock);
    let store = &opened.store;
    let first = applied(store.write(add(USER, "op-1", 5)).await);
    clock.pass(1000);
    let spend = applied(store.write(add(USER, "op-2", -5)).await);
    clock.pass(1000);
    let credit = applied(store.write(add(USER, "op-3", 3)).await);
    clock.pass(1000);

    // Each op answers as it did the first time, whatever the record became since: op-2's
    // spend would now be refused, and is not run again.
    assert_eq!(replayed(store.write(add(USER, "op-1", 5)).await), first);
    assert_eq!(replayed(store.write(add(USER, "op-2", -5)).await), spend);
    assert_eq!(replayed(store.write(add(USER, "op-3", 3)).await), credit);
    assert_eq!((first.version, spend.version, credit.version), (1, 2, 3));
    assert_eq!(spend.data, json!({ "coins": 0 }));

    let now = store.records(&user(USER), &[DataType::Balance]).await.unwrap();
    assert_eq!(now, std::slice::from_ref(&credit), "a replay changed the record");
    let ledger = opened.rows.ledger(USER, "balance");
    assert_ledger_adds_up_to(&ledger, 3);
    assert_eq!(op_ids(&ledger), ["op-1", "op-2", "op-3"]);
}

async fn an_op_id_reused_for_another_request_is_refused(backend: Backend) {
    let served = backend.serve().await;
    let site = served.hub.site("wrc", USER);
    let first = site.delta("balance", 10, "op-1").await;
    first.assert_ok();

    site.delta("balance", 11, "op-1").await.assert_refused(422, "op_id_reused");
    site.delta("points", 10, "op-1").await.assert_refused(422, "op_id_reused");
    push(&site, "profile", json!({ "display_name": "Ann" }), json!({ "op_id": "op-1" }))
        .await
        .assert_refused(422, "op_id_reused");
    // The op id is the user's: another site sending it is another request too.
    served
        .hub
        .site("roflfaucet", USER)
        .delta("balance", 10, "op-1")
        .await
        .assert_refused(422, "op_id_reused");
    // And the first request's copy still replays.
    let again = site.delta("balance", 10, "op-1").await;
    assert_eq!((answer(&again), &again.body["replayed"]), (answer(&first), &json!(true)));

    let all = site.get("balance,points,profile").await;
    let records = &all.assert_ok()["records"];
    assert_eq!(
        (&records["balance"]["data"], &records["balance"]["version"]),
        (&json!({ "coins": 10 }), &json!(1))
    );
    assert_eq!(records["points"]["version"], 0, "{records}");
    assert_eq!(records["profile"]["version"], 0, "{records}");
    assert_ledger_adds_up_to(&served.rows.ledger(USER, "balance"), 10);
    assert_eq!(served.rows.ledger(USER, "points"), []);
}

async fn a_kept_refusal_stays_the_ops_answer_after_the_record_changes(backend: Backend) {
    let served = backend.serve().await;
    let site = served.hub.site("wrc", USER);

    // insufficient_funds: kept even once the balance would cover the spend.
    site.delta("balance", -10, "spend-1").await.assert_refused(409, "insufficient_funds");
    site.delta("balance", 50, "credit-1").await.assert_ok();
    let again = site.delta("balance", -10, "spend-1").await;
    again.assert_refused(409, "insufficient_funds");
    assert_eq!(again.body["current"]["version"], 0, "the record as the op was refused: {}", again.body);
    assert_eq!(site.coins().await, 50);

    // version_conflict: kept even once the record reached the base_version given.
    push(&site, "profile", json!({ "display_name": "Ann" }), json!({})).await.assert_ok();
    let stale = json!({ "base_version": 2, "op_id": "rename-1" });
    push(&site, "profile", json!({ "display_name": "Bob" }), stale.clone())
        .await
        .assert_refused(409, "version_conflict");
    let v2 = push(&site, "profile", json!({ "bio": "hello" }), json!({})).await;
    assert_eq!(v2.assert_ok()["version"], 2);
    push(&site, "profile", json!({ "display_name": "Bob" }), stale)
        .await
        .assert_refused(409, "version_conflict");
    // The same change under a new op id applies: only the op was refused for good.
    let renamed = push(
        &site,
        "profile",
        json!({ "display_name": "Bob" }),
        json!({ "base_version": 2, "op_id": "rename-2" }),
    )
    .await;
    assert_eq!(renamed.assert_ok()["version"], 3);

    let profile = site.get("profile").await;
    assert_eq!(profile.assert_ok()["data"], json!({ "display_name": "Bob", "bio": "hello" }));
    let ledger = served.rows.ledger(USER, "balance");
    assert_ledger_adds_up_to(&ledger, 50);
    assert_eq!(op_ids(&ledger), ["credit-1"]);
}

async fn a_balance_never_goes_below_zero(backend: Backend) {
    let served = backend.serve().await;
    let site = served.hub.site("wrc", USER);
    site.delta("balance", 20, "credit").await.assert_ok();
    site.delta("balance", -21, "too-much").await.assert_refused(409, "insufficient_funds");

    let mut spends = JoinSet::new();
    for i in 0..30 {
        let site = site.clone();
        spends.spawn(async move { site.delta("balance", -3, &format!("spend-{i}")).await });
    }
    let spends: Vec<Reply> = spends.join_all().await;
    let refused = spends.iter().filter(|r| r.code() == "insufficient_funds").count();
    let applied = spends.iter().filter(|r| r.status == 200).count();
    assert_eq!((applied, refused), (6, 24), "20 coins pay six spends of 3: {spends:?}");
    assert!(spends.iter().all(|r| r.status == 200 || r.status == 409), "{spends:?}");

    site.delta("balance", -2, "to-zero").await.assert_ok();
    site.delta("balance", -1, "below-zero").await.assert_refused(409, "insufficient_funds");
    assert_eq!(site.coins().await, 0);
    let ledger = served.rows.ledger(USER, "balance");
    assert_ledger_adds_up_to(&ledger, 0);
    assert_eq!(ledger.len(), 1 + 6 + 1);
}

async fn the_version_moves_only_when_the_data_changes(backend: Backend) {
    let served = backend.serve().await;
    let site = served.hub.site("wrc", USER);
    let named = push(&site, "profile", json!({ "display_name": "Ann" }), json!({})).await;
    assert_eq!(named.assert_ok()["version"], 1);
    let same = push(&site, "profile", json!({ "display_name": "Ann" }), json!({})).await;
    assert_eq!(answer(&same), answer(&named), "a push of the same data is a new version");
    // Removing a field the record does not have changes nothing either.
    let removed = push(&site, "profile", json!({ "location": null }), json!({})).await;
    assert_eq!(answer(&removed), answer(&named));
    let bio = push(&site, "profile", json!({ "bio": "hello" }), json!({})).await;
    assert_eq!(bio.assert_ok()["version"], 2);
    assert_ne!(bio.body["last_updated"], named.body["last_updated"]);

    let coins = push(&site, "balance", json!({ "coins": 10 }), json!({})).await;
    assert_eq!(coins.assert_ok()["version"], 1);
    let same = push(&site, "balance", json!({ "coins": 10 }), json!({})).await;
    assert_eq!(answer(&same), answer(&coins));

    let timestamps = site.timestamp("balance,profile").await;
    let stamps = &timestamps.assert_ok()["timestamps"];
    assert_eq!((&stamps["balance"]["version"], &stamps["profile"]["version"]), (&json!(1), &json!(2)));
    assert_eq!(stamps["profile"]["last_updated"], bio.body["last_updated"]);
    assert_ledger_adds_up_to(&served.rows.ledger(USER, "balance"), 10);
}

async fn stamps_move_forward_even_when_the_clock_goes_back(backend: Backend) {
    let clock = TestClock::at(T);
    let opened = backend.open(&clock);
    let store = &opened.store;
    let mut stamps = vec![applied(store.write(add(USER, "op-1", 1)).await).updated_ms];
    // Set back ten seconds, then two writes in one millisecond, then forward, then back an hour.
    clock.set_wall(T - 10_000);
    stamps.push(applied(store.write(add(USER, "op-2", 1)).await).updated_ms);
    stamps.push(applied(store.write(add(USER, "op-3", 1)).await).updated_ms);
    clock.set_wall(T + 60_000);
    stamps.push(applied(store.write(add(USER, "op-4", 1)).await).updated_ms);
    clock.set_wall(T - 3_600_000);
    stamps.push(applied(store.write(add(USER, "op-5", 1)).await).updated_ms);
    let expected = [T, T + 1, T + 2, T + 60_000, T + 60_001].map(Some);
    assert_eq!(stamps, expected, "each stamp after the last, whatever the clock says");

    // Each record goes by its own last stamp: a new one takes the clock's time.
    let profile = applied(store.write(set(USER, DataType::Profile, json!({ "bio": "hi" }))).await);
    assert_eq!(profile.updated_ms, Some(T - 3_600_000));
    let read = store.stamps(&user(USER), &[DataType::Balance, DataType::Profile]).await.unwrap();
    assert_eq!(
        read,
        [
            Stamp { version: 5, updated_ms: Some(T + 60_001) },
            Stamp { version: 1, updated_ms: Some(T - 3_600_000) }
        ]
    );
}

/// The hub over a store the test opened (`App::with_store`): what pages read as
/// `last_updated` is the store's stamp, which goes forward even when the store's clock goes
/// back.
async fn the_hub_answers_with_its_stores_stamps(backend: Backend) {
    let clock = TestClock::at(T);
    let opened = backend.open(&clock);
    let hub =
        TestHub::over(opened.store.clone(), |c: &mut Config| c.limits.requests_per_minute = 1_000_000).await;
    let site = hub.site("wrc", USER);
    let first = site.delta("balance", 5, "stamped-1").await;
    assert_eq!(first.assert_ok()["last_updated"], "2026-12-06T00:00:00.000Z");
    clock.set_wall(T - 5_000);
    let second = site.delta("balance", 5, "stamped-2").await;
    assert_eq!(second.assert_ok()["last_updated"], "2026-12-06T00:00:00.001Z");
    let checked = site.timestamp("balance").await;
    assert_eq!(checked.assert_ok()["last_updated"], "2026-12-06T00:00:00.001Z");
    assert_eq!(checked.assert_ok()["epoch"], opened.store.epoch());
    assert_ledger_adds_up_to(&opened.rows.ledger(USER, "balance"), 10);
}

async fn the_ledger_equals_the_balance(backend: Backend) {
    let served = backend.serve().await;
    let site = served.hub.site("wrc", USER);
    site.delta("balance", 100, "a").await.assert_ok();
    site.delta("balance", -30, "b").await.assert_ok();
    // Absolute sets count as the difference they make.
    push(&site, "balance", json!({ "coins": 50 }), json!({})).await.assert_ok();
    site.delta("balance", -60, "c").await.assert_refused(409, "insufficient_funds");
    push(&site, "balance", json!({ "coins": 120 }), json!({ "op_id": "set-120" })).await.assert_ok();
    push(&site, "balance", json!({ "coins": 120 }), json!({ "op_id": "set-120" })).await.assert_ok();
    site.delta("balance", 100, "a").await.assert_ok();
    site.delta("points", 5, "p").await.assert_ok();
    let mut credits = JoinSet::new();
    for i in 0..10 {
        let site = site.clone();
        credits.spawn(async move { site.delta("balance", 1, &format!("one-{i}")).await.status });
    }
    assert!(credits.join_all().await.iter().all(|s| *s == 200));

    let balance = site.get("balance").await;
    let body = balance.assert_ok();
    assert_eq!((&body["data"]["coins"], &body["version"]), (&json!(130), &json!(14)));
    let ledger = served.rows.ledger(USER, "balance");
    assert_ledger_adds_up_to(&ledger, 130);
    assert_eq!(ledger.len(), 14);
    assert_eq!(ledger.iter().filter(|r| r.op_id.as_deref() == Some("a")).count(), 1);
    assert_eq!(ledger.iter().filter(|r| r.op_id.as_deref() == Some("set-120")).count(), 1);
    assert_ledger_adds_up_to(&served.rows.ledger(USER, "points"), 5);
}

async fn an_op_dated_before_the_horizon_is_refused_and_never_applied(backend: Backend) {
    let clock = TestClock::at(T);
    let opened = backend.open(&clock);
    let store = &opened.store;
    // Made 29 days ago, arriving now: within the retention, applied.
    let late = uuid7(T - 29 * DAY, 1);
    let first = applied(store.write(add(USER, &late, 5)).await);
    // Made 31 days ago: it may have been applied and forgotten, so never applied now.
    let too_old = uuid7(T - i64::try_from(RETENTION.as_millis()).unwrap() - DAY, 2);
    assert_expired(store.write(add(USER, &too_old, 7)).await);
    assert_expired(store.write(add(USER, &too_old, 7)).await);
    // An id that carries no date is never expired.
    applied(store.write(add(USER, "undated", 1)).await);

    // Two days pass. Whichever write a backend moves its horizon at, the second goes by it.
    clock.pass(2 * DAY);
    applied(store.write(add(OTHER, "tick-1", 1)).await);
    applied(store.write(add(OTHER, "tick-2", 1)).await);
    // `late` is remembered from its arrival, so its copy still replays; an op of the same
    // age the store never saw is now before the horizon.
    assert_eq!(replayed(store.write(add(USER, &late, 5)).await), first);
    assert_expired(store.write(add(USER, &uuid7(T - 29 * DAY, 3), 9)).await);

    let balance = store.records(&user(USER), &[DataType::Balance]).await.unwrap().remove(0);
    assert_eq!((balance.data, balance.version), (json!({ "coins": 6 }), 2));
    let ledger = opened.rows.ledger(USER, "balance");
    assert_ledger_adds_up_to(&ledger, 6);
    assert_eq!(op_ids(&ledger), [late, "undated".to_owned()]);
}

async fn stamps_and_records_read_back_what_was_written(backend: Backend) {
    let clock = TestClock::at(T);
    let opened = backend.open(&clock);
    let store = &opened.store;
    let balance = applied(store.write(add(USER, "op-1", 42)).await);
    clock.pass(5);
    let profile_data = json!({ "display_name": "Ann", "bio": "a \"quoted\" line\nand ünïcode 🎲" });
    let profile = applied(store.write(set(USER, DataType::Profile, profile_data.clone())).await);
    clock.pass(5);
    let settings_data = json!({ "theme": "dark", "volume": 3, "muted": false });
    let settings = applied(store.write(set(USER, DataType::Settings, settings_data.clone())).await);
    assert_eq!((profile.data, profile.version, profile.updated_ms), (profile_data, 1, Some(T + 5)));
    assert_eq!((settings.data.clone(), settings.updated_ms), (settings_data, Some(T + 10)));
    let profile = applied(store.write(set(USER, DataType::Profile, json!({ "bio": "changed" }))).await);
    assert_eq!(profile.version, 2);

    // In the order asked, a record never written as empty at version 0.
    let types = [DataType::Roles, DataType::Settings, DataType::Balance, DataType::Points, DataType::Profile];
    let records = store.records(&user(USER), &types).await.unwrap();
    let expected =
        [Record::empty(DataType::Roles), settings, balance, Record::empty(DataType::Points), profile];
    assert_eq!(records, expected);
    let stamps = store.stamps(&user(USER), &types).await.unwrap();
    let expected: Vec<Stamp> =
        expected.iter().map(|r| Stamp { version: r.version, updated_ms: r.updated_ms }).collect();
    assert_eq!(stamps, expected);

    // Another user's records are apart.
    let others = store.records(&user(OTHER), &DataType::ALL).await.unwrap();
    assert_eq!(others, DataType::ALL.map(Record::empty));
    assert_eq!(store.stamps(&user(OTHER), &[DataType::Profile]).await.unwrap()[0].version, 0);
}

async fn concurrent_writes_to_one_record_apply_each_op_exactly_once(backend: Backend) {
    const OPS: i64 = 150;
    let clock = TestClock::at(T);
    let opened = backend.open(&clock);
    // Every op sent twice, all at once: a client retrying while its first send is in flight.
    let mut writes = JoinSet::new();
    for i in 0..OPS {
        for _ in 0..2 {
            let store = opened.store.clone();
            writes.spawn(async move { (i, store.write(add(USER, &format!("op-{i}"), i % 7 + 1)).await) });
        }
    }
    let mut by_op: BTreeMap<i64, Vec<WriteOutcome>> = BTreeMap::new();
    for (i, outcome) in writes.join_all().await {
        by_op.entry(i).or_default().push(outcome.unwrap());
    }
    let mut versions = Vec::new();
    for (i, outcomes) in &by_op {
        let (first, copy) = match &outcomes[..] {
            [WriteOutcome::Applied(a), WriteOutcome::Replayed(r)]
            | [WriteOutcome::Replayed(r), WriteOutcome::Applied(a)] => (a, r),
            other => panic!("op-{i} was not applied once and replayed once: {other:?}"),
        };
        assert_eq!(first, copy, "op-{i}'s copy did not answer the first answer");
        versions.push(first.version);
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=OPS as u64).collect::<Vec<_>>(), "each op gets a version of its own");

    let sum: i64 = (0..OPS).map(|i| i % 7 + 1).sum();
    let balance = opened.store.records(&user(USER), &[DataType::Balance]).await.unwrap().remove(0);
    assert_eq!((balance.data, balance.version), (json!({ "coins": sum }), OPS as u64));
    let ledger = opened.rows.ledger(USER, "balance");
    assert_ledger_adds_up_to(&ledger, sum);
    let mut expected: Vec<String> = (0..OPS).map(|i| format!("op-{i}")).collect();
    expected.sort();
    assert_eq!(op_ids(&ledger), expected);
}

async fn the_daily_credit_ceiling_counts_credits_exactly(backend: Backend) {
    // Noon, so that nothing here crosses a UTC day unless the test moves the clock.
    let clock = TestClock::at(T + DAY / 2);
    let opened = backend.open(&clock);
    let domain = Domain::new(opened.store.clone(), protocol::Limits::default());
    let ceilings = Ceilings { per_op: 50, per_user_per_day: 100 };
    let wrc = Caller {
        site: SiteId::parse("wrc").unwrap(),
        user: user(USER),
        admin: false,
        scopes: Scopes::ALL,
        ceilings,
        expires: None,
    };
    let faucet = Caller { site: SiteId::parse("roflfaucet").unwrap(), ..wrc.clone() };
    let delta =
        |caller: &Caller, op_id: &str, coins: i64| support::store::delta(&domain, caller, op_id, coins);

    // Thirty credits of 7 at once: fourteen fit in 100.
    let mut credits = JoinSet::new();
    for i in 0..30 {
        let credit = delta(&wrc, &format!("credit-{i}"), 7);
        credits.spawn(async move { (i, credit.await) });
    }
    let mut credits = credits.join_all().await;
    credits.sort_by_key(|(i, _)| *i);
    let credits: Vec<_> = credits.into_iter().map(|(_, result)| result).collect();
    let refused = credits.iter().filter(|r| over_ceiling(r)).count();
    let applied = credits.iter().filter(|r| r.is_ok()).count();
    assert_eq!((applied, refused), (14, 16), "{credits:?}");

    assert!(over_ceiling(&delta(&wrc, "three", 3).await));
    delta(&wrc, "two", 2).await.unwrap();
    assert!(over_ceiling(&delta(&wrc, "one", 1).await));
    // A spend gives no allowance back; another site has its own; a credit over the per-op
    // ceiling is refused whatever is left.
    delta(&wrc, "spend", -50).await.unwrap();
    assert!(over_ceiling(&delta(&wrc, "one-more", 1).await));
    assert!(over_ceiling(&delta(&faucet, "big", 51).await));
    delta(&faucet, "faucet", 40).await.unwrap();
    // Applied credits replay although the day's allowance is spent; refused ones stay refused.
    for (i, result) in credits.iter().enumerate() {
        let again = delta(&wrc, &format!("credit-{i}"), 7).await;
        match result {
            Ok(first) => assert_eq!(again.unwrap(), hub::domain::Written { replayed: true, ..first.clone() }),
            Err(_) => assert!(over_ceiling(&again), "credit-{i}: {again:?}"),
        }
    }

    // The next day: a new allowance for new ops; an op refused yesterday stays refused.
    clock.pass(DAY);
    delta(&wrc, "tomorrow", 7).await.unwrap();
    assert!(over_ceiling(&delta(&wrc, "one", 1).await));

    let balance = opened.store.records(&user(USER), &[DataType::Balance]).await.unwrap().remove(0);
    assert_eq!(balance.data, json!({ "coins": 98 + 2 - 50 + 40 + 7 }));
    let ledger = opened.rows.ledger(USER, "balance");
    assert_ledger_adds_up_to(&ledger, 97);
    assert_eq!(ledger.len(), 14 + 4);
}
