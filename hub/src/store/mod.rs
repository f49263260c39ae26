//! Durable records behind one trait. A store keeps records, remembered `op_id`s and the
//! audit ledger, and applies each write atomically and durably; it knows nothing about HTTP
//! and decides no rule: the domain hands it a mutation to run against the current record.
//!
//! A write is acknowledged only after it is durable. Implementations may gather concurrent
//! writes into one transaction (group commit) as long as each write sees the effects of the
//! writes ordered before it.

mod changes;
mod feed;
mod op_index;
pub mod postgres;
mod queue;
pub mod rules;
pub mod sqlite;
pub mod stamps;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use protocol::{DataType, OpId, Refusal, SiteId, UserId};
use serde_json::Value;

use crate::config::{Backend, StoreConfig};

pub(crate) use changes::Publisher;
pub use changes::{ChangeEvent, Changes, INLINE_DATA_BYTES, Position};
pub use feed::{FeedChange, FeedPosition, Pending, QueueStats, Settle, Settled};

/// Opens the store `config` names, with its settings; SQLite's database lives in
/// `data_dir`. An op id is remembered for `op_retention`. The store records its commits in
/// `metrics`.
pub fn open(
    config: &StoreConfig,
    data_dir: &Path,
    op_retention: Duration,
    metrics: StoreMetrics,
) -> anyhow::Result<Arc<dyn Store>> {
    config.validate()?;
    let clock = Arc::new(crate::time::SystemClock::default());
    Ok(match config.backend {
        Backend::Sqlite => {
            let options = sqlite::SqliteOptions {
                op_retention,
                max_batch: if config.group_commit { sqlite::MAX_BATCH } else { 1 },
                op_log_capacity: config.op_ids_in_memory,
                metrics,
                clock,
            };
            Arc::new(sqlite::SqliteStore::open(data_dir, options)?)
        }
        Backend::Postgres => {
            let options = postgres::PostgresOptions {
                url: config.postgres_url()?,
                ca_file: config.ca_file.clone(),
                pool: config.pool,
                statement_timeout: Duration::from_millis(config.statement_timeout_ms),
                op_retention,
                max_batch: if config.group_commit { postgres::MAX_BATCH } else { 1 },
                metrics,
                clock,
            };
            Arc::new(postgres::PostgresStore::open(options)?)
        }
    })
}

/// One `(user, data_type)` record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub data: Value,
    /// Bumped on every accepted change; clients compare it instead of clocks.
    pub version: u64,
    /// Milliseconds since the Unix epoch of the last change, strictly increasing per record;
    /// `None` until the first write.
    pub updated_ms: Option<i64>,
}

impl Record {
    /// A record that was never written.
    pub fn empty(data_type: DataType) -> Record {
        Record { data: data_type.empty_data(), version: 0, updated_ms: None }
    }
}

/// A record's version without its data: what a timestamp check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub version: u64,
    pub updated_ms: Option<i64>,
}

/// What a mutation asks the store to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The record's new data. Equal to the current data, without a ledger row, means
    /// "nothing to change": the version stays.
    pub data: Value,
    /// An audit ledger row, for changes to balance or points. A change with one is always
    /// written as a new version, the row naming it, even when the data stays the same: a
    /// balance of 0 that `hub import` sets over a user's empty record.
    pub ledger: Option<LedgerEntry>,
    /// The record's credit count after this change, when it credits; kept with the record.
    pub credits: Option<Credits>,
}

/// What a record's amount was credited on one UTC day, by site: what the sites' daily
/// credit ceilings count. Kept beside the record, never shown to clients.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credits {
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    /// Credited that day, by site id.
    pub by_site: std::collections::BTreeMap<String, i64>,
}

impl Credits {
    /// Nothing credited yet on `day`.
    pub fn on(day: i64) -> Credits {
        Credits { day, by_site: Default::default() }
    }
}

/// What a mutation decides on, inside the store's transaction.
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    pub record: &'a Record,
    /// The record's credit count, as the last credit left it (an older day counts nothing).
    pub credits: &'a Credits,
    /// The store's clock for this write, in milliseconds since the Unix epoch: the record's
    /// new stamp is taken from it.
    pub now_ms: i64,
}

/// One audit ledger row: how much an amount moved, and to what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub delta: i64,
    pub result: i64,
    pub reason: Option<String>,
}

/// Why a mutation declined to write. The three that depend on the record's state are the
/// op's answer for good: the store remembers them with the op id ([`Rejection::code`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The write breaks a rule: a data rule, a scope, its grant.
    #[error("{0}")]
    Refused(Refusal),
    #[error("the record is at version {}, not the base_version given", .0.version)]
    VersionConflict(Record),
    #[error("the balance would go below zero")]
    InsufficientFunds(Record),
    /// Over one of the site's credit ceilings; the message says which.
    #[error("{1}")]
    CreditLimit(Record, String),
    #[error("the grant has expired; ask the site's backend for a new one for the same op")]
    GrantExpired,
    /// An op id dated before what the store still remembers: it may have been applied long
    /// ago, so it is never applied now.
    #[error(
        "this op is older than the hub remembers op ids; it may have been applied already, so it is not applied now"
    )]
    OpExpired,
}

impl From<Refusal> for Rejection {
    fn from(r: Refusal) -> Self {
        Rejection::Refused(r)
    }
}

impl Rejection {
    /// The code an op id keeps for good, for a rejection that depends on the record's state:
    /// a copy of the op still on its way must not be applied after its client was told no.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Rejection::InsufficientFunds(_) => Some("insufficient_funds"),
            Rejection::VersionConflict(_) => Some("version_conflict"),
            Rejection::CreditLimit(..) => Some("credit_limit"),
            Rejection::Refused(_) | Rejection::GrantExpired | Rejection::OpExpired => None,
        }
    }

    /// The rejection an op id kept for good, rebuilt from its code, with the record as it
    /// stood then.
    pub fn kept(code: &str, record: Record) -> Option<Rejection> {
        Some(match code {
            "insufficient_funds" => Rejection::InsufficientFunds(record),
            "version_conflict" => Rejection::VersionConflict(record),
            "credit_limit" => Rejection::CreditLimit(
                record,
                "this op was refused for a credit ceiling of its site, for good; a new credit is a new op"
                    .into(),
            ),
            _ => return None,
        })
    }
}

/// The domain's decision, run by the store against the current record inside its
/// transaction, so that no other write can come between reading and writing. A store may run
/// it more than once for one write, when a transaction is rolled back and tried again: only
/// the last run's decision is kept.
pub type Mutation = Arc<dyn Fn(Current<'_>) -> Result<Change, Rejection> + Send + Sync>;

/// A write to one record.
pub struct Write {
    pub user: UserId,
    pub data_type: DataType,
    pub site: SiteId,
    /// The site whose backend makes this write (a token of `site` with a scope beyond
    /// [`Scopes::PAGE`](protocol::Scopes::PAGE), an admin token, its agent, an import);
    /// `None` for a page's write. Kept with the version it makes: that site's webhook is not
    /// told of it.
    pub origin: Option<SiteId>,
    /// With an op id, a second write carrying the same id is not applied again.
    pub op: Option<OpKey>,
    pub mutation: Mutation,
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Write")
            .field("user", &self.user)
            .field("data_type", &self.data_type)
            .field("site", &self.site)
            .field("origin", &self.origin)
            .field("op", &self.op)
            .finish_non_exhaustive()
    }
}

/// An op id and a fingerprint of the request that carried it, to tell a retry (same
/// fingerprint) from a reuse of the id for something else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpKey {
    pub op_id: OpId,
    pub fingerprint: String,
}

/// How a write ended. Only `Applied` changed anything.
#[derive(Debug)]
pub enum WriteOutcome {
    /// The mutation ran; the record as it now stands (unchanged if the mutation changed nothing).
    Applied(Record),
    /// The op id was seen before with the same fingerprint: the record as that first write left it.
    Replayed(Record),
    /// The op id was seen before with another fingerprint.
    OpIdReused,
    /// The mutation refused the write.
    Rejected(Rejection),
}

/// What every store reports about its commits, for `/metrics`. Clones record into the same
/// histograms. A backend registers what only it has through [`Store::register_metrics`].
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// Writes committed together: how much group commit gathers.
    pub batch_writes: Histogram,
    /// Seconds a COMMIT takes, until it is durable.
    pub commit_seconds: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            batch_writes: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
        }
    }
}

/// Failures of the storage itself. None of them means a write was applied, except where
/// [`StoreError::Unavailable`] says the outcome is unknown.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot serve now: unreachable, restarting, or out of time. Passing: the
    /// request may be retried. A write cut off this way may or may not have been applied; a
    /// retry with its op id answers which.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A record the write needs is held by another transaction for longer than the store
    /// waits. Passing: the request may be retried; the store fails only the writes to it.
    #[error("a record is busy: {0}")]
    Busy(String),
    /// Another transaction came first: a serialization failure, a deadlock, or another hub
    /// instance remembering the same op id. Running the write again decides it.
    #[error("another write came first: {0}")]
    Conflict(String),
    /// The database refused the work for a reason a retry does not remove.
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data is malformed: {0}")]
    Malformed(String),
    #[error("the store is closed")]
    Closed,
    /// The store will not open; the message says what and how to fix it.
    #[error("{0}")]
    Open(String),
}

impl StoreError {
    /// Whether the same request may succeed when tried again: by the store itself for a
    /// [`StoreError::Conflict`], by the client after a `503` for an
    /// [`StoreError::Unavailable`] or a [`StoreError::Busy`].
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Busy(_) | StoreError::Conflict(_))
    }
}

/// A per-user quota that every hub instance on one store takes its cells from: one GCRA
/// state per user (its theoretical arrival time), kept where every instance reaches it and
/// changed by one instance at a time.
#[async_trait]
pub trait SharedQuota: Send + Sync + 'static {
    /// Takes at least `need` and at most `want` cells of `user`'s quota of `per_minute`
    /// requests a minute, as many as it holds up to `want`; or none, with how long until it
    /// holds `need`. `need` is at most `per_minute` and at most `want`.
    async fn take(
        &self,
        user: &str,
        need: u32,
        want: u32,
        per_minute: NonZeroU32,
    ) -> Result<Taken, StoreError>;

    /// Forgets every user whose quota has fully recovered: they start again from a full one.
    async fn forget_recovered(&self) -> Result<(), StoreError>;
}

/// What a [`SharedQuota`] gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// This many cells, at least the number needed.
    Cells(u32),
    /// None: the cells needed are there after this long.
    Refused(Duration),
}

/// A durable home for records. The domain sees only this trait.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Id of this database, made when it was created; clients drop their cache when it changes.
    fn epoch(&self) -> &str;

    /// Version and time of each requested record.
    async fn stamps(&self, user: &UserId, types: &[DataType]) -> Result<Vec<Stamp>, StoreError>;

    /// Each requested record, in the order asked.
    async fn records(&self, user: &UserId, types: &[DataType]) -> Result<Vec<Record>, StoreError>;

    /// Runs one write atomically; returns once its outcome is durable.
    async fn write(&self, write: Write) -> Result<WriteOutcome, StoreError>;

    /// Whether the store can serve reads and writes now.
    async fn check(&self) -> Result<(), StoreError>;

    /// Finishes every accepted write, then refuses new ones.
    async fn close(&self);

    /// Adds what only this backend reports to `/metrics`, under the hub's prefix.
    fn register_metrics(&self, registry: &mut Registry);

    /// The users' rate limit that every hub instance on this store shares, for a backend that
    /// several instances serve at once; `None` (the default) when each instance counts its
    /// users alone.
    fn shared_rate_limit(&self) -> Option<Arc<dyn SharedQuota>> {
        None
    }

    /// The committed changes, in position order, for the one reader that takes them (the
    /// hub's event streams); `None` after the first call, and from a store that publishes
    /// none. A store publishes nothing until they are taken.
    fn take_changes(&self) -> Option<Changes> {
        None
    }

    /// `user`'s changes after `after` up to `upto`, both positions of this store, in position
    /// order, read from where the store keeps them; `None` when it does not keep them from that
    /// far back (a store that keeps none: always).
    async fn changes_between(
        &self,
        _user: &UserId,
        _after: Position,
        _upto: Position,
    ) -> Result<Option<Vec<ChangeEvent>>, StoreError> {
        Ok(None)
    }

    /// Records' latest changes after `after`, in feed order, of `types` only, `limit` at
    /// most. A record appears once, at its latest change; only changes whose position can no
    /// longer be overtaken by a change committing later are read.
    async fn feed(
        &self,
        after: FeedPosition,
        types: &[DataType],
        limit: usize,
    ) -> Result<Vec<FeedChange>, StoreError>;

    /// Where the feed ends now: reading from here gives every change committed from now on.
    async fn feed_end(&self) -> Result<FeedPosition, StoreError>;

    /// Moves `site`'s share of the feed after its cursor into its webhook queue: each change
    /// of `types` not made by `site`'s own backend is queued, replacing a waiting older
    /// version of its record (the newer one counts its wait from now, and keeps the older's
    /// attempts, due time and lease); then the cursor moves past what was read. A site met for the
    /// first time starts at the feed's end. Reads `limit` changes at most; returns how many
    /// it read (as many as `limit`: call again).
    async fn webhook_transfer(
        &self,
        site: &SiteId,
        types: &[DataType],
        now_ms: i64,
        limit: usize,
    ) -> Result<usize, StoreError>;

    /// Takes up to `limit` of `site`'s notifications that are due at `now_ms` and not taken,
    /// for `lease_ms`: no other instance takes them until they are settled or the lease ends.
    /// The longest-due first.
    async fn webhook_claim(
        &self,
        site: &SiteId,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError>;

    /// Records how taken notifications ended, and releases them.
    async fn webhook_settle(&self, site: &SiteId, now_ms: i64, settled: &[Settled])
    -> Result<(), StoreError>;

    /// Every site's queue, for those with one.
    async fn webhook_stats(&self) -> Result<Vec<QueueStats>, StoreError>;
}
