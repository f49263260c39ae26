//! What the tests of the `Store` trait share: a clock the test sets, the writes they send,
//! UUIDv7 op ids of a chosen date, a PostgreSQL store opened on that clock, credits through
//! the `Domain` over such a store (for the daily ceiling), and the audit ledger read behind
//! the store's back. Starts no hub and no database: the tests take theirs from
//! [`super::postgres::Cluster`].

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use hub::domain::{Caller, Domain, DomainError, Written};
use hub::store::postgres::{PostgresOptions, PostgresStore};
use hub::store::{
    Change, Current, LedgerEntry, Mutation, OpKey, Record, Rejection, StoreError, StoreMetrics, Write,
    WriteOutcome,
};
use hub::time::Clock;
use protocol::{DataType, DeltaRequest, OpId, SiteId, UserId};
use serde_json::json;

use super::postgres::Cluster;

/// 2026-12-06T00:00:00Z: where the test clocks start.
pub const T: i64 = 1_796_515_200_000;
pub const DAY: i64 = 86_400_000;
/// How long the stores opened here remember an op id: the hub's default.
pub const RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// A clock the test sets: the wall clock, and the time that passed, apart.
#[derive(Debug, Default)]
pub struct TestClock {
    wall: AtomicI64,
    passed: AtomicU64,
}

impl TestClock {
    pub fn at(wall: i64) -> Arc<TestClock> {
        let clock = TestClock::default();
        clock.wall.store(wall, Ordering::SeqCst);
        Arc::new(clock)
    }

    /// Time passes: both clocks move.
    pub fn pass(&self, ms: i64) {
        self.wall.fetch_add(ms, Ordering::SeqCst);
        self.passed.fetch_add(u64::try_from(ms).unwrap(), Ordering::SeqCst);
    }

    /// Time passes and the wall clock stays (someone set it back as far): only what the
    /// store times by the time that passed comes due (its next prune, say).
    pub fn pass_monotonic(&self, ms: u64) {
        self.passed.fetch_add(ms, Ordering::SeqCst);
    }

    /// Someone sets the wall clock; no time passes.
    pub fn set_wall(&self, ms: i64) {
        self.wall.store(ms, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.wall.load(Ordering::SeqCst)
    }

    fn monotonic_ms(&self) -> u64 {
        self.passed.load(Ordering::SeqCst)
    }
}

/// A UUIDv7 op id dated `ms`, told apart by `n`.
pub fn uuid7(ms: i64, n: u16) -> String {
    let hex = format!("{ms:012x}");
    format!("{}-{}-7000-8000-{n:012x}", &hex[..8], &hex[8..])
}

pub fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

/// Op `op_id` adding `amount` coins to `user`'s balance, refused below zero, with a ledger row.
pub fn add(user_id: &str, op_id: &str, amount: i64) -> Write {
    let mutation: Mutation = Arc::new(move |current: Current<'_>| {
        let result = current.record.data["coins"].as_i64().unwrap_or(0) + amount;
        if result < 0 {
            return Err(Rejection::InsufficientFunds(current.record.clone()));
        }
        Ok(Change {
            data: json!({ "coins": result }),
            ledger: Some(LedgerEntry { delta: amount, result, reason: None }),
            credits: None,
        })
    });
    Write {
        user: user(user_id),
        data_type: DataType::Balance,
        site: SiteId::parse("wrc").unwrap(),
        origin: None,
        op: Some(OpKey { op_id: OpId::parse(op_id).unwrap(), fingerprint: format!("add {amount}") }),
        mutation,
    }
}

/// The record a write applied; panics on any other outcome.
#[track_caller]
pub fn applied(outcome: Result<WriteOutcome, StoreError>) -> Record {
    match outcome {
        Ok(WriteOutcome::Applied(record)) => record,
        other => panic!("expected the write applied, got {other:?}"),
    }
}

/// `caller`'s delta of `coins` to its user's balance under op `op_id`, through `domain`, as the
/// API hands it on; the future owns what it needs, to be spawned.
pub fn delta(
    domain: &Domain,
    caller: &Caller,
    op_id: &str,
    coins: i64,
) -> impl Future<Output = Result<Written, DomainError>> + Send + use<> {
    let (domain, caller) = (domain.clone(), caller.clone());
    let request = DeltaRequest {
        user_id: caller.user.as_str().into(),
        site_id: caller.site.as_str().into(),
        data_type: "balance".into(),
        delta: json!({ "coins": coins }).as_object().unwrap().clone(),
        op_id: op_id.into(),
        reason: None,
        grant: None,
    };
    async move { domain.delta(&caller, request, None).await }
}

/// Whether the domain refused a credit for the caller's daily credit ceiling.
pub fn over_ceiling(result: &Result<Written, DomainError>) -> bool {
    matches!(result, Err(DomainError::Rejected(Rejection::CreditLimit(..))))
}

/// What a test opens a PostgreSQL store on the database at `url` with: a pool of four, a
/// statement timeout of 30 s, [`RETENTION`], the time read from `clock`.
pub fn postgres_options(url: &str, clock: &Arc<TestClock>) -> PostgresOptions {
    PostgresOptions {
        url: url.to_owned(),
        ca_file: None,
        pool: 4,
        statement_timeout: Duration::from_secs(30),
        op_retention: RETENTION,
        max_batch: hub::store::postgres::MAX_BATCH,
        metrics: StoreMetrics::default(),
        clock: clock.clone(),
    }
}

/// A store on the PostgreSQL database at `url` with [`postgres_options`].
pub fn open_postgres(url: &str, clock: &Arc<TestClock>) -> Arc<PostgresStore> {
    Arc::new(PostgresStore::open(postgres_options(url, clock)).unwrap())
}

/// One audit ledger row.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRow {
    pub op_id: Option<String>,
    pub delta: i64,
    pub result: i64,
    pub version: u64,
}

/// The ledger of `user`'s `data_type` in the database at `url` of `cluster`, oldest first.
pub fn postgres_ledger(cluster: &Cluster, url: &str, user: &str, data_type: &str) -> Vec<LedgerRow> {
    let printed = cluster.psql(
        url,
        &format!(
            "SELECT coalesce(op_id, ''), delta, result, version FROM ledger
             WHERE user_id = '{user}' AND data_type = '{data_type}' ORDER BY id"
        ),
    );
    printed
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('|').collect();
            LedgerRow {
                op_id: Some(fields[0].to_owned()).filter(|op| !op.is_empty()),
                delta: fields[1].parse().unwrap(),
                result: fields[2].parse().unwrap(),
                version: fields[3].parse().unwrap(),
            }
        })
        .collect()
}

/// Asserts that `ledger` is a running sum that never goes below zero and ends at `amount`,
/// one row per version: every change of the amount left exactly one row.
#[track_caller]
pub fn assert_ledger_adds_up_to(ledger: &[LedgerRow], amount: i64) {
    let mut running = 0;
    for (i, row) in ledger.iter().enumerate() {
        running += row.delta;
        assert_eq!(row.result, running, "ledger row {i} does not follow from the rows before it: {ledger:?}");
        assert!(row.result >= 0, "ledger row {i} went below zero: {ledger:?}");
        assert_eq!(row.version, u64::try_from(i).unwrap() + 1, "ledger row {i} skips a version: {ledger:?}");
    }
    assert_eq!(running, amount, "the ledger sums to {running} but the amount is {amount}: {ledger:?}");
}
