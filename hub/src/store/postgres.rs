//! The shared store: one PostgreSQL database that several hub instances serve at once.
//!
//! The database is the authority for every rule that spans instances. An op id is unique per
//! user in `ops`, so two instances applying the same op race on one row and the loser's
//! transaction is rolled back and run again, finding the winner's answer. A record is read
//! `FOR UPDATE`, so writes to it from any instance apply one after the other, each to what
//! the last one committed; its version and stamp come from that row, not from an instance's
//! clock.
//!
//! Each instance has [`WRITERS`] writers, each a connection on a thread of its own that
//! gathers the writes waiting into one transaction and one durable commit (group commit),
//! taking records in one order across instances so that two batches never wait on each other
//! in a circle. A write that fails for its own reason is taken out and the batch run again
//! without it; nothing is answered before the commit. Reads go through a pool of other connections, straight to the
//! database: no instance keeps stamps in memory, so none answers from behind another's write.
//!
//! Each batch also writes its changes into the change log, from which every instance's event
//! streams learn of them (`change_log.rs`), and stamps each record it writes with its position
//! in the feed and the site whose backend wrote it, from which the webhook queues are fed
//! (`feed.rs`).
//!
//! Every table holding users' data is keyed by user id first, and every query on it names one
//! user, except two sweeps every few minutes: forgetting expired op ids (`DELETE FROM ops
//! WHERE created_ms < …`) and the rate-limit state of users whose quota has recovered
//! (`rate.rs`); the change log, read and pruned by position across users; and the feed, read
//! by position across users (`records_by_feed`). The webhook queues are keyed by site first.
//! `meta` holds the database's own settings.

mod change_log;
mod client;
mod feed;
mod rate;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use protocol::{DataType, OpId, SiteId, UserId};
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use super::queue::{Queue, Writes, next_batch, queue};
use super::rules::{self, Horizon, LedgerRow, SeenOp, Tx};
use super::{
    ChangeEvent, Changes, Credits, FeedChange, FeedPosition, LedgerEntry, OpKey, Pending, Position,
    QueueStats, Record, Settled, Stamp, Store, StoreError, StoreMetrics, Write, WriteOutcome,
};
use crate::time::Clock;

use change_log::{ChangeLog, Retention, Signal};
pub use change_log::{KEEP_FOR, KEEP_ROWS, LOG_READER_NAME, READ_EVERY};
use client::Client;
pub use client::Database;

/// Writes gathered into one transaction at most, with group commit on.
pub const MAX_BATCH: usize = 256;
/// Writers of one instance, each with a connection of its own: while one batch waits for its
/// COMMIT to be durable, another runs. They take records in the same order as every
/// instance's, and are kept apart by the database as instances are.
pub const WRITERS: usize = 2;
/// Runs of one batch that lost to another transaction (a deadlock, or an op id another
/// instance remembered first) before its writes are answered `503`.
const TRIES: usize = 8;
/// How often remembered op ids older than the retention are forgotten.
const PRUNE_EVERY_MS: u64 = 10 * 60 * 1000;
/// After the writer failed to reach the database, how long it answers `503` before trying
/// again, so that a database that is away is not called for every write.
const RECONNECT_AFTER: Duration = Duration::from_millis(250);
/// How long moving the op-id horizon waits for the batches in flight, which hold its lock
/// shared; new batches wait behind it meanwhile.
const HORIZON_WAIT: Duration = Duration::from_millis(50);
/// After moving the op-id horizon failed, or waited for a batch longer than
/// [`HORIZON_WAIT`], how long until this instance tries again.
const PRUNE_RETRY_MS: u64 = 30 * 1000;
/// Expired op ids, or old changes, deleted at most between two batches, so that forgetting
/// many never holds the writer long.
const SWEEP_CHUNK: i64 = 2000;
/// How long a migration may wait for another instance's, and take: far beyond a statement.
const MIGRATION_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// The advisory lock (a 64-bit key of the hub's own) that every write batch holds shared and
/// moving the op-id horizon holds alone: a batch sees one horizon from its start to its
/// commit, and no op id it may still look for is forgotten under it.
pub const HORIZON_LOCK: i64 = 0x6875_625f_686f_7231;
/// The advisory lock held while the schema is migrated, so that instances starting together
/// migrate one after the other.
const MIGRATION_LOCK: i64 = 0x6875_625f_6d69_6772;

/// The schema, one migration per step; never edit a published step, add one. Public so that
/// a test can make a database of an earlier version: the steps up to it.
pub const STEPS: &[&str] = &[
    "CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE records (
        user_id TEXT NOT NULL,
        data_type TEXT NOT NULL,
        data TEXT NOT NULL,
        version BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        credits TEXT,
        PRIMARY KEY (user_id, data_type)
    );
    CREATE TABLE ops (
        user_id TEXT NOT NULL,
        op_id TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        data TEXT NOT NULL,
        version BIGINT NOT NULL,
        updated_ms BIGINT,
        created_ms BIGINT NOT NULL,
        refusal TEXT,
        PRIMARY KEY (user_id, op_id)
    );
    CREATE INDEX ops_by_age ON ops (created_ms);
    CREATE TABLE ledger (
        user_id TEXT NOT NULL,
        id BIGINT GENERATED ALWAYS AS IDENTITY,
        data_type TEXT NOT NULL,
        site_id TEXT NOT NULL,
        op_id TEXT,
        delta BIGINT NOT NULL,
        result BIGINT NOT NULL,
        version BIGINT NOT NULL,
        reason TEXT,
        at_ms BIGINT NOT NULL,
        PRIMARY KEY (user_id, id)
    );",
    // The users' rate limit the instances share (rate.rs). UNLOGGED: a crash that empties it
    // gives each user a full minute's quota again, which is not worth a write-ahead log.
    "CREATE UNLOGGED TABLE rate_limits (
        user_id TEXT PRIMARY KEY,
        tat_us BIGINT NOT NULL
    );",
    // Each committed change of a record, for every instance's event streams (change_log.rs):
    // the id of the transaction that wrote it and a position drawn at its insert. Read by
    // (xid, position) across users, and by user for a resume (a hash index: a user's changes
    // in the log are few, and it costs the writers half of what a B-tree by user, xid and
    // position does); kept from the transaction id in meta.change_log_kept_from on.
    "CREATE TABLE change_log (
        xid BIGINT NOT NULL,
        position BIGINT GENERATED ALWAYS AS IDENTITY,
        user_id TEXT NOT NULL,
        data_type TEXT NOT NULL,
        version BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        data TEXT,
        PRIMARY KEY (xid, position)
    );
    CREATE INDEX change_log_by_user ON change_log USING HASH (user_id);
    INSERT INTO meta (key, value) VALUES ('change_log_kept_from', '0');",
    // The feed (feed.rs): each record at the position of its latest change, the id of the
    // transaction that wrote it and a number drawn then, with the site whose backend made it.
    // The records already there take positions in the order they were last changed, before
    // every later change's (transaction id 0). A hub of the schema before, still serving while
    // a release rolls out, writes records without a position: the triggers give its writes
    // one (not an origin), and never fire for this hub's writes, which always set both. Then
    // the webhooks' cursors in the feed and queues.
    "CREATE SEQUENCE records_feed_seq;
    ALTER TABLE records
        ADD COLUMN feed_xid BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN feed_seq BIGINT NOT NULL DEFAULT 0,
        ADD COLUMN origin TEXT;
    UPDATE records AS r SET feed_seq = o.n
    FROM (SELECT user_id, data_type, row_number() OVER (ORDER BY updated_ms, user_id, data_type) AS n
          FROM records) AS o
    WHERE r.user_id = o.user_id AND r.data_type = o.data_type;
    CREATE INDEX records_by_feed ON records (feed_xid, feed_seq);
    CREATE FUNCTION records_feed_position() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.feed_xid := pg_current_xact_id()::TEXT::BIGINT;
        NEW.feed_seq := nextval('records_feed_seq');
        NEW.origin := NULL;
        RETURN NEW;
    END $$;
    CREATE TRIGGER records_inserted_without_position BEFORE INSERT ON records
        FOR EACH ROW WHEN (NEW.feed_seq = 0) EXECUTE FUNCTION records_feed_position();
    CREATE TRIGGER records_updated_without_position BEFORE UPDATE ON records
        FOR EACH ROW WHEN (NEW.feed_xid = OLD.feed_xid AND NEW.feed_seq = OLD.feed_seq)
        EXECUTE FUNCTION records_feed_position();
    CREATE TABLE webhook_cursors (
        site TEXT PRIMARY KEY,
        xid BIGINT NOT NULL,
        seq BIGINT NOT NULL
    );
    CREATE TABLE webhook_queue (
        site TEXT NOT NULL,
        user_id TEXT NOT NULL,
        data_type TEXT NOT NULL,
        version BIGINT NOT NULL,
        queued_ms BIGINT NOT NULL,
        attempts INTEGER NOT NULL,
        due_ms BIGINT NOT NULL,
        lease_until_ms BIGINT NOT NULL,
        PRIMARY KEY (site, user_id, data_type)
    );
    CREATE INDEX webhook_queue_by_due ON webhook_queue (site, due_ms);",
];

/// The schema version this hub brings a database to: a database beyond it was migrated by a
/// newer hub, and this one refuses it.
pub const SCHEMA_VERSION: i32 = STEPS.len() as i32;

/// How the PostgreSQL store connects and writes.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgres://…`; never logged.
    pub url: String,
    /// Authorities (PEM) to trust for the database's certificate, beside the system's.
    pub ca_file: Option<PathBuf>,
    /// Connections this instance opens at most: its [`WRITERS`], the rest for reads.
    pub pool: usize,
    /// How long one statement may run before the database cancels it.
    pub statement_timeout: Duration,
    /// How long an op id is remembered.
    pub op_retention: Duration,
    /// Writes committed together at most: 1 gives one transaction per write.
    pub max_batch: usize,
    pub metrics: StoreMetrics,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("pool", &self.pool)
            .field("statement_timeout", &self.statement_timeout)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

/// What only the PostgreSQL store reports to `/metrics`.
#[derive(Debug, Clone, Default)]
struct PostgresMetrics {
    /// Batches run again after losing to another transaction.
    batch_retries: Counter,
    /// Times the writer opened a connection after losing one.
    reconnects: Counter,
}

/// PostgreSQL behind the [`Store`] trait.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: String,
    writes: Queue,
    writer_threads: Mutex<Vec<JoinHandle<()>>>,
    /// The change log's reader, which publishes every instance's committed changes.
    change_log: ChangeLog,
    readers: Pool,
    /// How long a read waits for the database's answer.
    answer_deadline: Duration,
    metrics: PostgresMetrics,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").field("epoch", &self.inner.epoch).finish()
    }
}

impl PostgresStore {
    /// Connects, brings the schema up to date (waiting for another instance doing the same)
    /// and starts the writer. Fails when the database cannot be reached: a hub does not start
    /// without knowing its database's epoch.
    pub fn open(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        let database = Database::new(&options.url, options.statement_timeout, options.ca_file.as_deref())?;
        let readers = Pool::builder(Manager::from_config(
            database.config.clone(),
            database.tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        ))
        .max_size(options.pool.saturating_sub(WRITERS).max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(options.statement_timeout))
        .create_timeout(Some(database.answer_deadline()))
        .build()
        .map_err(|e| StoreError::Open(format!("cannot make the PostgreSQL connection pool: {e}")))?;

        let metrics = PostgresMetrics::default();
        let answer_deadline = database.answer_deadline();
        let (queue, rx) = queue();
        let rx = Arc::new(Mutex::new(rx));
        // Each writer's client runs a runtime of its own, which must not be started from inside
        // the hub's: everything a writer does happens on its thread. The first migrates the
        // database; the others start once it has.
        let mut threads = Vec::with_capacity(WRITERS);
        let mut epoch = None;
        let mut pruning = None;
        let unreachable_since = Arc::new(Mutex::new(None));
        let signal = Arc::new(Signal::default());
        for n in 0..WRITERS {
            let (opened, open_result) = std::sync::mpsc::channel();
            let (database, options, metrics, rx) =
                (database.clone(), options.clone(), metrics.clone(), rx.clone());
            let (shared, unreachable_since) = (pruning.clone(), unreachable_since.clone());
            let signal = signal.clone();
            let thread = std::thread::Builder::new()
                .name(format!("store-writer-{n}"))
                .spawn(move || {
                    match Writer::start(database, options, metrics, shared, unreachable_since, signal) {
                        Ok((writer, epoch)) => {
                            let _ = opened.send(Ok((epoch, writer.pruning.clone())));
                            writer.run(&rx);
                        }
                        Err(e) => {
                            let _ = opened.send(Err(e));
                        }
                    }
                })
                .map_err(|e| StoreError::Open(format!("cannot start a writer: {e}")))?;
            threads.push(thread);
            let opened =
                open_result.recv().map_err(|_| StoreError::Open("a writer stopped while opening".into()))?;
            match opened {
                Ok((found, shared)) => {
                    epoch = epoch.or(found);
                    pruning = Some(shared);
                }
                Err(e) => {
                    queue.close();
                    for thread in threads {
                        let _ = thread.join();
                    }
                    return Err(e);
                }
            }
        }
        // The change log's reader starts once the writers have brought the schema up to date.
        let opened = match epoch {
            Some(epoch) => ChangeLog::start(database, signal).map(|change_log| (epoch, change_log)),
            None => Err(StoreError::Open("no writer read the epoch".into())),
        };
        let (epoch, change_log) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                queue.close();
                for thread in threads {
                    let _ = thread.join();
                }
                return Err(e);
            }
        };
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                epoch,
                writes: queue,
                writer_threads: Mutex::new(threads),
                change_log,
                readers,
                answer_deadline,
                metrics,
            }),
        })
    }

    /// Runs `read` on the pool, waiting at most as long as the database is given to answer.
    async fn within<T>(&self, read: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let deadline = self.inner.answer_deadline;
        tokio::time::timeout(deadline, read).await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "the database did not answer within {:.1} s",
                deadline.as_secs_f64()
            )))
        })
    }

    async fn reader(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner.readers.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::from(e),
            other => StoreError::Unavailable(other.to_string()),
        })
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn epoch(&self) -> &str {
        &self.inner.epoch
    }

    async fn stamps(&self, user: &UserId, types: &[DataType]) -> Result<Vec<Stamp>, StoreError> {
        self.within(async {
            let client = self.reader().await?;
            let stmt = client
                .prepare_cached("SELECT data_type, version, updated_ms FROM records WHERE user_id = $1")
                .await?;
            let mut stored = DataType::ALL.map(|_| Stamp { version: 0, updated_ms: None });
            for row in client.query(&stmt, &[&user.as_str()]).await? {
                let data_type = data_type_of(row.get(0))?;
                stored[data_type.index()] =
                    Stamp { version: version_of(row.get(1)), updated_ms: Some(row.get(2)) };
            }
            Ok(types.iter().map(|t| stored[t.index()]).collect())
        })
        .await
    }

    async fn records(&self, user: &UserId, types: &[DataType]) -> Result<Vec<Record>, StoreError> {
        self.within(async {
            let client = self.reader().await?;
            let stmt = client
                .prepare_cached("SELECT data_type, data, version, updated_ms FROM records WHERE user_id = $1")
                .await?;
            let mut stored: [Option<Record>; DataType::ALL.len()] = Default::default();
            for row in client.query(&stmt, &[&user.as_str()]).await? {
                let data_type = data_type_of(row.get(0))?;
                if types.contains(&data_type) {
                    stored[data_type.index()] = Some(Record {
                        data: parse_data(row.get(1))?,
                        version: version_of(row.get(2)),
                        updated_ms: Some(row.get(3)),
                    });
                }
            }
            Ok(types.iter().map(|t| stored[t.index()].clone().unwrap_or_else(|| Record::empty(*t))).collect())
        })
        .await
    }

    async fn write(&self, write: Write) -> Result<WriteOutcome, StoreError> {
        self.inner.writes.write(write).await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.inner.writes.check()?;
        self.within(async { Ok(self.reader().await?.simple_query("SELECT 1").await.map(|_| ())?) }).await
    }

    async fn close(&self) {
        self.inner.writes.close();
        let threads = std::mem::take(&mut *self.inner.writer_threads.lock().expect("writer threads"));
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        self.inner.change_log.close().await;
        self.inner.readers.close();
    }

    fn take_changes(&self) -> Option<Changes> {
        self.inner.change_log.take()
    }

    async fn changes_between(
        &self,
        user: &UserId,
        after: Position,
        upto: Position,
    ) -> Result<Option<Vec<ChangeEvent>>, StoreError> {
        self.within(async { change_log::between(&self.reader().await?, user, after, upto).await }).await
    }

    async fn feed(
        &self,
        after: FeedPosition,
        types: &[DataType],
        limit: usize,
    ) -> Result<Vec<FeedChange>, StoreError> {
        self.within(async { feed::read(&self.reader().await?, after, types, limit).await }).await
    }

    async fn feed_end(&self) -> Result<FeedPosition, StoreError> {
        self.within(async { feed::end(&self.reader().await?).await }).await
    }

    async fn webhook_transfer(
        &self,
        site: &SiteId,
        types: &[DataType],
        now_ms: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.within(async { feed::transfer(&mut self.reader().await?, site, types, now_ms, limit).await })
            .await
    }

    async fn webhook_claim(
        &self,
        site: &SiteId,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        self.within(async { feed::claim(&self.reader().await?, site, now_ms, lease_ms, limit).await }).await
    }

    async fn webhook_settle(
        &self,
        site: &SiteId,
        now_ms: i64,
        settled: &[Settled],
    ) -> Result<(), StoreError> {
        self.within(async { feed::settle(&self.reader().await?, site, now_ms, settled).await }).await
    }

    async fn webhook_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        self.within(async { feed::stats(&self.reader().await?).await }).await
    }

    fn register_metrics(&self, registry: &mut Registry) {
        let metrics = &self.inner.metrics;
        registry.register(
            "store_batch_retries",
            "Write batches run again after losing to another transaction: a deadlock, or an op id another hub instance remembered first",
            metrics.batch_retries.clone(),
        );
        registry.register(
            "store_reconnects",
            "Times the writer opened a new connection to the database after losing one",
            metrics.reconnects.clone(),
        );
    }

    fn shared_rate_limit(&self) -> Option<Arc<dyn super::SharedQuota>> {
        Some(Arc::new(rate::UserQuotas(self.clone())))
    }
}

fn data_type_of(s: &str) -> Result<DataType, StoreError> {
    DataType::parse(s).map_err(|_| StoreError::Malformed(format!("unknown data_type {s:?} in records")))
}

fn parse_data(text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Malformed(format!("record data is not JSON: {e}")))
}

fn version_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn stored_version(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A new database's id: pages that held another drop their cache when they see it.
fn new_epoch() -> String {
    crate::config::random_secret()[..16].to_owned()
}

/// Brings the schema of the database `client` is connected to up to date, one instance at
/// a time, and gives a new database its epoch and op-id horizon. Returns the epoch. Neither
/// waiting for another instance's migration nor a step is bound by the statement timeout.
fn migrate(client: &Client, horizon_ms: i64) -> Result<String, StoreError> {
    client.batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let migrated = (|| -> Result<String, StoreError> {
        client.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                applied_ms BIGINT NOT NULL
            )",
        )?;
        let at: i32 = client
            .query_one("SELECT COALESCE(MAX(version), 0)::INTEGER FROM schema_migrations", &[])?
            .try_get(0)
            .map_err(|e| StoreError::Open(format!("schema_migrations is not the hub's: {e}")))?;
        if at > SCHEMA_VERSION {
            return Err(StoreError::Open(format!(
                "the database's schema is at version {at}, newer than this hub's {SCHEMA_VERSION}: \
                 a newer hub migrated it; run that version"
            )));
        }
        for (version, step) in (1..).zip(STEPS).skip(usize::try_from(at).unwrap_or(0)) {
            client.batch_execute("BEGIN")?;
            let stepped = client.batch_execute(step).and_then(|()| {
                client.execute(
                    "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                    &[&version, &crate::time::now_ms()],
                )
            });
            if let Err(e) = stepped {
                let _ = client.batch_execute("ROLLBACK");
                return Err(e);
            }
            client.batch_execute("COMMIT")?;
            tracing::info!(version, "PostgreSQL schema migrated");
        }
        client.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', $1), ('op_horizon_ms', $2) ON CONFLICT (key) DO NOTHING",
            &[&new_epoch(), &horizon_ms.to_string()],
        )?;
        Ok(client.query_one("SELECT value FROM meta WHERE key = 'epoch'", &[])?.get(0))
    })();
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])?;
    migrated
}

/// Gives the database of `url` a new epoch, as a restore from a dump needs: pages that cached
/// records of the database as it was drop their cache. The change log is emptied: its changes
/// are of the epoch before, and its transaction ids of the cluster the dump was taken from.
/// The feed's positions are numbered afresh, in the same order, at transaction id 0, before
/// every change this cluster will write (whose ids may be below the other cluster's), and
/// the webhooks' cursors with them. Returns the new epoch.
pub fn renew_epoch(database: Database) -> Result<String, StoreError> {
    let epoch = new_epoch();
    let url_epoch = epoch.clone();
    std::thread::spawn(move || -> Result<(), StoreError> {
        let client = Client::connect(&database, database.answer_deadline())?;
        let hub_tables = client.query_one("SELECT to_regclass('meta') IS NOT NULL", &[])?.get::<_, bool>(0);
        let updated = if hub_tables {
            client.execute("UPDATE meta SET value = $1 WHERE key = 'epoch'", &[&url_epoch])?
        } else {
            0
        };
        if updated == 0 {
            return Err(StoreError::Open(
                "the database holds no hub epoch: it is not a hub's database".into(),
            ));
        }
        let change_log =
            client.query_one("SELECT to_regclass('change_log') IS NOT NULL", &[])?.get::<_, bool>(0);
        if change_log {
            client.batch_execute(
                "BEGIN; TRUNCATE change_log; \
                 UPDATE meta SET value = '0' WHERE key = 'change_log_kept_from'; COMMIT",
            )?;
        }
        let feed = client.query_one("SELECT to_regclass('webhook_cursors') IS NOT NULL", &[])?.get::<_, bool>(0);
        if feed {
            // A cursor goes where the records it has passed end. A record that keeps its
            // position is not written (it would look, to the triggers of the schema's feed
            // step, like an older hub's write).
            client.batch_execute(
                "BEGIN;
                 UPDATE webhook_cursors AS c SET xid = 0,
                     seq = (SELECT count(*) FROM records AS r WHERE (r.feed_xid, r.feed_seq) <= (c.xid, c.seq));
                 UPDATE records AS r SET feed_xid = 0, feed_seq = o.n
                 FROM (SELECT user_id, data_type, row_number() OVER (ORDER BY feed_xid, feed_seq) AS n
                       FROM records) AS o
                 WHERE r.user_id = o.user_id AND r.data_type = o.data_type
                     AND (r.feed_xid, r.feed_seq) <> (0, o.n);
                 COMMIT",
            )?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| StoreError::Open("the epoch could not be set".into()))??;
    Ok(epoch)
}

/// What `hub check` says of the database at `url`: reachable, and of a schema this hub
/// knows. Reads only.
pub fn schema_status(database: Database) -> Result<String, String> {
    std::thread::spawn(move || -> Result<String, String> {
        let client =
            Client::connect(&database, database.answer_deadline()).map_err(|e| format!("cannot connect: {e}"))?;
        let row = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .map_err(|e| e.to_string())?;
        if !row.get::<_, bool>(0) {
            return Ok(format!("reachable, empty: the hub creates its schema (version {SCHEMA_VERSION}) at start"));
        }
        let at: i32 = client
            .query_one("SELECT COALESCE(MAX(version), 0)::INTEGER FROM schema_migrations", &[])
            .map_err(|e| e.to_string())?
            .try_get(0)
            .map_err(|e| format!("schema_migrations is not the hub's: {e}"))?;
        match at.cmp(&SCHEMA_VERSION) {
            std::cmp::Ordering::Greater => Err(format!(
                "its schema version is {at}, newer than this hub's ({SCHEMA_VERSION}): a newer hub migrated it; run that release"
            )),
            std::cmp::Ordering::Equal => Ok(format!("reachable, schema version {at}, this hub's")),
            std::cmp::Ordering::Less => Ok(format!(
                "reachable, schema version {at}; the hub brings it to {SCHEMA_VERSION} at start (`hub migrate` does it alone; back it up first with pg_dump)"
            )),
        }
    })
    .join()
    .unwrap_or_else(|_| Err("the check stopped".into()))
}

/// A connection of the writer, with its statements prepared. Each takes the whole batch at
/// once, in arrays: a batch costs the same few round trips whatever its size.
struct Connection {
    client: Client,
    lock_records: Statement,
    find_ops: Statement,
    insert_records: Statement,
    update_records: Statement,
    append_ledger: Statement,
    remember_ops: Statement,
    append_changes: Statement,
}

impl Connection {
    fn open(database: &Database) -> Result<Connection, StoreError> {
        let client = Client::connect(database, database.answer_deadline())?;
        // Each batch's statements are planned for the tables as they are: a plan kept from
        // when they were nearly empty (a new deployment, until autovacuum analyzes them) reads
        // them whole on every batch. Planning costs a batch far less than such a read.
        client.batch_execute("SET plan_cache_mode = force_custom_plan")?;
        Ok(Connection {
            // Locked in one order, the same in every instance's batches: two batches never
            // wait on each other in a circle.
            lock_records: client.prepare(
                "SELECT user_id, data_type, data, version, updated_ms, credits FROM records
                 WHERE (user_id, data_type) IN (SELECT * FROM unnest($1::TEXT[], $2::TEXT[]))
                 ORDER BY user_id, data_type FOR UPDATE",
            )?,
            find_ops: client.prepare(
                "SELECT user_id, op_id, fingerprint, data, version, updated_ms, refusal FROM ops
                 WHERE (user_id, op_id) IN (SELECT * FROM unnest($1::TEXT[], $2::TEXT[]))",
            )?,
            // A record's first version: a row another transaction is inserting waits for it,
            // and is not overwritten once it commits (the batch then runs again). Here and in
            // `update_records`, each record written takes its next position in the feed
            // (feed.rs): the batch's transaction id and a number drawn now.
            insert_records: client.prepare(
                "INSERT INTO records (user_id, data_type, data, version, updated_ms, credits, origin, feed_xid, feed_seq)
                 SELECT user_id, data_type, data, version, updated_ms, credits, origin,
                     pg_current_xact_id()::TEXT::BIGINT, nextval('records_feed_seq')
                 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[], $6::TEXT[], $7::TEXT[])
                     AS k (user_id, data_type, data, version, updated_ms, credits, origin)
                 ON CONFLICT (user_id, data_type) DO NOTHING",
            )?,
            update_records: client.prepare(
                "UPDATE records AS r SET data = k.data, version = k.version, updated_ms = k.updated_ms,
                     credits = k.credits, origin = k.origin,
                     feed_xid = pg_current_xact_id()::TEXT::BIGINT, feed_seq = nextval('records_feed_seq')
                 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[], $6::TEXT[], $7::TEXT[],
                             $8::BIGINT[])
                     AS k (user_id, data_type, data, version, updated_ms, credits, origin, was)
                 WHERE r.user_id = k.user_id AND r.data_type = k.data_type AND r.version = k.was",
            )?,
            // In the order the rules appended them: a user's rows number its versions.
            append_ledger: client.prepare(
                "INSERT INTO ledger (user_id, data_type, site_id, op_id, delta, result, version, reason, at_ms)
                 SELECT user_id, data_type, site_id, op_id, delta, result, version, reason, at_ms
                 FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[],
                             $7::BIGINT[], $8::TEXT[], $9::BIGINT[])
                     WITH ORDINALITY AS k (user_id, data_type, site_id, op_id, delta, result, version, reason, at_ms, n)
                 ORDER BY n",
            )?,
            // Unique per user: an op id another transaction is remembering waits for it, and
            // is not remembered again once it commits (the batch then runs again, and finds it).
            remember_ops: client.prepare(
                "INSERT INTO ops (user_id, op_id, fingerprint, data, version, updated_ms, created_ms, refusal)
                 SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[],
                                      $6::BIGINT[], $7::BIGINT[], $8::TEXT[])
                 ON CONFLICT (user_id, op_id) DO NOTHING",
            )?,
            // In the order the rules made them: a record's versions take increasing positions.
            append_changes: client.prepare(
                "INSERT INTO change_log (xid, user_id, data_type, version, updated_ms, data)
                 SELECT pg_current_xact_id()::TEXT::BIGINT, user_id, data_type, version, updated_ms, data
                 FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[])
                     WITH ORDINALITY AS k (user_id, data_type, version, updated_ms, data, n)
                 ORDER BY n",
            )?,
            client,
        })
    }
}

/// A record as the batch holds it.
struct Held {
    record: Record,
    credits: Option<Credits>,
    /// The version the database holds, locked by the batch; 0 when it holds no row.
    stored: u64,
    /// Whether the batch changed it.
    written: bool,
    /// The site whose backend made the batch's last change of it; `None`: a page.
    origin: Option<String>,
}

/// An op id the batch remembers.
struct NewOp {
    user: String,
    op_id: String,
    seen: SeenOp,
    from_ms: i64,
}

/// A change the batch makes to a record, for the change log.
struct NewChange {
    user: String,
    data_type: DataType,
    version: u64,
    updated_ms: i64,
    /// The record's data, when short enough to send with the change.
    data: Option<String>,
}

/// A ledger row the batch appends.
struct NewLedgerRow {
    user: String,
    data_type: DataType,
    site: String,
    op_id: Option<String>,
    entry: LedgerEntry,
    version: u64,
    at_ms: i64,
}

/// A batch's transaction, as the rules see it: the batch's records (locked) and op ids read
/// in two statements at its start, its writes kept here and sent at its end
/// ([`BatchTx::flush`]), one statement per table.
#[derive(Default)]
struct BatchTx {
    records: HashMap<(String, DataType), Held>,
    /// Records whose stored row does not parse: a write to one fails, alone.
    damaged: HashSet<(String, DataType)>,
    ops: HashMap<(String, String), SeenOp>,
    new_ops: Vec<NewOp>,
    ledger: Vec<NewLedgerRow>,
    /// Every version the batch writes, in the order it writes them.
    changes: Vec<NewChange>,
}

impl BatchTx {
    /// The batch's records, as `lock_records` found (and locked) them, and its op ids, as
    /// `find_ops` found them.
    fn from_rows(
        locked: Vec<tokio_postgres::Row>,
        found: Vec<tokio_postgres::Row>,
    ) -> Result<BatchTx, StoreError> {
        let mut batch = BatchTx::default();
        for row in locked {
            let user: String = row.get(0);
            let data_type = data_type_of(row.get(1))?;
            let credits = row
                .get::<_, Option<&str>>(5)
                .map(|text| {
                    serde_json::from_str(text)
                        .map_err(|e| StoreError::Malformed(format!("credits of {user}'s {data_type}: {e}")))
                })
                .transpose();
            let held = credits.and_then(|credits| {
                let record = Record {
                    data: parse_data(row.get(2))?,
                    version: version_of(row.get(3)),
                    updated_ms: Some(row.get(4)),
                };
                Ok(Held { stored: record.version, record, credits, written: false, origin: None })
            });
            match held {
                Ok(held) => {
                    batch.records.insert((user, data_type), held);
                }
                // Only the writes to this record fail, when the rules read it.
                Err(e) => {
                    tracing::error!(error = %e, "a stored record is damaged");
                    batch.damaged.insert((user, data_type));
                }
            }
        }
        for row in found {
            let seen = SeenOp {
                fingerprint: row.get(2),
                record: Record {
                    data: parse_data(row.get(3))?,
                    version: version_of(row.get(4)),
                    updated_ms: row.get(5),
                },
                refusal: row.get(6),
            };
            batch.ops.insert((row.get(0), row.get(1)), seen);
        }
        Ok(batch)
    }

    /// Sends what the batch wrote, one statement per table, pipelined; returns whether it
    /// changed a record. A row another transaction wrote first (a record's first version, an op
    /// id) fails the batch with [`StoreError::Conflict`], to be run again.
    fn flush(self, conn: &Connection) -> Result<bool, StoreError> {
        let mut written: Vec<(&(String, DataType), &Held)> =
            self.records.iter().filter(|(_, h)| h.written).collect();
        written
            .sort_unstable_by(|a, b| (a.0.0.as_str(), a.0.1.as_str()).cmp(&(b.0.0.as_str(), b.0.1.as_str())));
        let (new, old): (Vec<_>, Vec<_>) = written.into_iter().partition(|(_, h)| h.stored == 0);
        let new_rows = RecordColumns::of(&new)?;
        let old_rows = RecordColumns::of(&old)?;
        let ledger = &self.ledger;
        let l_users: Vec<&str> = ledger.iter().map(|r| r.user.as_str()).collect();
        let l_types: Vec<&str> = ledger.iter().map(|r| r.data_type.as_str()).collect();
        let l_sites: Vec<&str> = ledger.iter().map(|r| r.site.as_str()).collect();
        let l_ops: Vec<Option<&str>> = ledger.iter().map(|r| r.op_id.as_deref()).collect();
        let l_deltas: Vec<i64> = ledger.iter().map(|r| r.entry.delta).collect();
        let l_results: Vec<i64> = ledger.iter().map(|r| r.entry.result).collect();
        let l_versions: Vec<i64> = ledger.iter().map(|r| stored_version(r.version)).collect();
        let l_reasons: Vec<Option<&str>> = ledger.iter().map(|r| r.entry.reason.as_deref()).collect();
        let l_at: Vec<i64> = ledger.iter().map(|r| r.at_ms).collect();
        let mut ops: Vec<&NewOp> = self.new_ops.iter().collect();
        ops.sort_unstable_by(|a, b| (&a.user, &a.op_id).cmp(&(&b.user, &b.op_id)));
        let o_users: Vec<&str> = ops.iter().map(|o| o.user.as_str()).collect();
        let o_ids: Vec<&str> = ops.iter().map(|o| o.op_id.as_str()).collect();
        let o_prints: Vec<&str> = ops.iter().map(|o| o.seen.fingerprint.as_str()).collect();
        let o_data: Vec<String> = ops.iter().map(|o| o.seen.record.data.to_string()).collect();
        let o_versions: Vec<i64> = ops.iter().map(|o| stored_version(o.seen.record.version)).collect();
        let o_updated: Vec<Option<i64>> = ops.iter().map(|o| o.seen.record.updated_ms).collect();
        let o_created: Vec<i64> = ops.iter().map(|o| o.from_ms).collect();
        let o_refusals: Vec<Option<&str>> = ops.iter().map(|o| o.seen.refusal.as_deref()).collect();
        let changes = &self.changes;
        let c_users: Vec<&str> = changes.iter().map(|c| c.user.as_str()).collect();
        let c_types: Vec<&str> = changes.iter().map(|c| c.data_type.as_str()).collect();
        let c_versions: Vec<i64> = changes.iter().map(|c| stored_version(c.version)).collect();
        let c_updated: Vec<i64> = changes.iter().map(|c| c.updated_ms).collect();
        let c_data: Vec<Option<&str>> = changes.iter().map(|c| c.data.as_deref()).collect();

        let (new_count, old_count, ops_count) = (new.len(), old.len(), ops.len());
        let (inserted, updated, appended, remembered, logged) =
            conn.client.pipeline(|client| async move {
                // A statement left out changes no row.
                tokio::join!(
                    async {
                        if new_count == 0 {
                            return Ok(0);
                        }
                        let c = &new_rows;
                        client
                            .execute(
                                &conn.insert_records,
                                &[
                                    &c.users,
                                    &c.types,
                                    &c.data,
                                    &c.versions,
                                    &c.updated,
                                    &c.credits,
                                    &c.origins,
                                ],
                            )
                            .await
                    },
                    async {
                        if old_count == 0 {
                            return Ok(0);
                        }
                        let c = &old_rows;
                        client
                            .execute(
                                &conn.update_records,
                                &[
                                    &c.users,
                                    &c.types,
                                    &c.data,
                                    &c.versions,
                                    &c.updated,
                                    &c.credits,
                                    &c.origins,
                                    &c.was,
                                ],
                            )
                            .await
                    },
                    async {
                        if ledger.is_empty() {
                            return Ok(0);
                        }
                        client
                            .execute(
                                &conn.append_ledger,
                                &[
                                    &l_users,
                                    &l_types,
                                    &l_sites,
                                    &l_ops,
                                    &l_deltas,
                                    &l_results,
                                    &l_versions,
                                    &l_reasons,
                                    &l_at,
                                ],
                            )
                            .await
                    },
                    async {
                        if ops_count == 0 {
                            return Ok(0);
                        }
                        client
                            .execute(
                                &conn.remember_ops,
                                &[
                                    &o_users,
                                    &o_ids,
                                    &o_prints,
                                    &o_data,
                                    &o_versions,
                                    &o_updated,
                                    &o_created,
                                    &o_refusals,
                                ],
                            )
                            .await
                    },
                    async {
                        if changes.is_empty() {
                            return Ok(0);
                        }
                        client
                            .execute(
                                &conn.append_changes,
                                &[&c_users, &c_types, &c_versions, &c_updated, &c_data],
                            )
                            .await
                    },
                )
            })?;
        let conflict = |what: &str| {
            StoreError::Conflict(format!("{what} of the batch was written by another transaction"))
        };
        if inserted? != new_count as u64 || updated? != old_count as u64 {
            return Err(conflict("a record"));
        }
        appended?;
        if remembered? != ops_count as u64 {
            return Err(conflict("an op id"));
        }
        Ok(logged? > 0)
    }
}

/// The columns of records written by a batch, as arrays for one statement.
#[derive(Default)]
struct RecordColumns<'a> {
    users: Vec<&'a str>,
    types: Vec<&'static str>,
    data: Vec<String>,
    versions: Vec<i64>,
    updated: Vec<Option<i64>>,
    credits: Vec<Option<String>>,
    origins: Vec<Option<&'a str>>,
    was: Vec<i64>,
}

impl<'a> RecordColumns<'a> {
    fn of(rows: &[(&'a (String, DataType), &'a Held)]) -> Result<RecordColumns<'a>, StoreError> {
        let mut columns = RecordColumns::default();
        for ((user, data_type), held) in rows {
            columns.push(user, *data_type, held)?;
        }
        Ok(columns)
    }

    fn push(&mut self, user: &'a str, data_type: DataType, held: &'a Held) -> Result<(), StoreError> {
        self.users.push(user);
        self.types.push(data_type.as_str());
        self.data.push(held.record.data.to_string());
        self.versions.push(stored_version(held.record.version));
        self.updated.push(held.record.updated_ms);
        self.credits.push(
            held.credits
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| StoreError::Malformed(e.to_string()))?,
        );
        self.origins.push(held.origin.as_deref());
        self.was.push(stored_version(held.stored));
        Ok(())
    }
}

impl Tx for BatchTx {
    fn find_op(&mut self, user: &UserId, op_id: &OpId) -> Result<Option<SeenOp>, StoreError> {
        Ok(self.ops.get(&(user.as_str().to_owned(), op_id.as_str().to_owned())).cloned())
    }

    fn remember_op(
        &mut self,
        user: &UserId,
        op: &OpKey,
        record: &Record,
        refusal: Option<&str>,
        from_ms: i64,
    ) -> Result<(), StoreError> {
        let seen = SeenOp {
            fingerprint: op.fingerprint.clone(),
            record: record.clone(),
            refusal: refusal.map(str::to_owned),
        };
        let key = (user.as_str().to_owned(), op.op_id.as_str().to_owned());
        self.ops.insert(key.clone(), seen.clone());
        self.new_ops.push(NewOp { user: key.0, op_id: key.1, seen, from_ms });
        Ok(())
    }

    fn read_record(&mut self, user: &UserId, data_type: DataType) -> Result<(Record, Credits), StoreError> {
        match self.records.get(&(user.as_str().to_owned(), data_type)) {
            Some(held) => Ok((held.record.clone(), held.credits.clone().unwrap_or_default())),
            None if self.damaged.contains(&(user.as_str().to_owned(), data_type)) => {
                Err(StoreError::Malformed(format!("the stored {data_type} of {user} is damaged")))
            }
            None => Ok((Record::empty(data_type), Credits::default())),
        }
    }

    fn put_record(
        &mut self,
        user: &UserId,
        data_type: DataType,
        record: &Record,
        credits: Option<&Credits>,
        origin: Option<&SiteId>,
    ) -> Result<(), StoreError> {
        let held = self.records.entry((user.as_str().to_owned(), data_type)).or_insert_with(|| Held {
            record: Record::empty(data_type),
            credits: None,
            stored: 0,
            written: false,
            origin: None,
        });
        held.record = record.clone();
        held.origin = origin.map(|site| site.as_str().to_owned());
        if let Some(credits) = credits {
            held.credits = Some(credits.clone());
        }
        held.written = true;
        self.changes.push(NewChange {
            user: user.as_str().to_owned(),
            data_type,
            version: record.version,
            updated_ms: record.updated_ms.unwrap_or_default(),
            data: ChangeEvent::inline(record.data.to_string()),
        });
        Ok(())
    }

    fn append_ledger(&mut self, row: LedgerRow<'_>) -> Result<(), StoreError> {
        self.ledger.push(NewLedgerRow {
            user: row.user.as_str().to_owned(),
            data_type: row.data_type,
            site: row.site.as_str().to_owned(),
            op_id: row.op_id.map(|id| id.as_str().to_owned()),
            entry: row.entry.clone(),
            version: row.version,
            at_ms: row.at_ms,
        });
        Ok(())
    }
}

/// One of the instance's [`WRITERS`]: a connection that writes, on a thread of its own.
struct Writer {
    database: Database,
    conn: Option<Connection>,
    /// When a writer of the instance last failed to reach the database; cleared when one
    /// reaches it again, so that every writer tries again at once.
    unreachable_since: Arc<Mutex<Option<Instant>>>,
    /// Forgetting expired op ids, shared by the instance's writers.
    pruning: Arc<Mutex<Pruning>>,
    clock: Arc<dyn Clock>,
    max_batch: usize,
    metrics: StoreMetrics,
    own_metrics: PostgresMetrics,
    /// Wakes the instance's change log reader after a batch that changed records.
    change_log: Arc<Signal>,
    /// Whether the batches since the last wake changed a record.
    changed: bool,
}

/// How one run of a batch failed.
struct Failed {
    /// The write it failed on (its index in the batch), when a write failed.
    at: Option<usize>,
    error: StoreError,
    /// Whether the commit itself failed: the batch may or may not have been applied.
    in_commit: bool,
    /// Whether it failed at its first statement, before any of its writes was sent.
    at_begin: bool,
}

impl Writer {
    /// Connects a writer. The instance's first (no `pruning` yet) brings the schema up to
    /// date before, and returns the database's epoch; each writer shares the instance's
    /// forgetting of op ids with the next.
    fn start(
        database: Database,
        options: PostgresOptions,
        own_metrics: PostgresMetrics,
        pruning: Option<Arc<Mutex<Pruning>>>,
        unreachable_since: Arc<Mutex<Option<Instant>>>,
        change_log: Arc<Signal>,
    ) -> Result<(Writer, Option<String>), StoreError> {
        let retention_ms = i64::try_from(options.op_retention.as_millis()).unwrap_or(i64::MAX);
        let epoch = match pruning {
            None => {
                let client = Client::connect(&database, MIGRATION_DEADLINE)?;
                Some(migrate(&client, options.clock.now_ms().saturating_sub(retention_ms))?)
            }
            Some(_) => None,
        };
        let conn = Connection::open(&database)?;
        let pruning = match pruning {
            Some(pruning) => pruning,
            None => Arc::new(Mutex::new(Pruning {
                horizon: Horizon::new(
                    read_horizon(&conn.client)?,
                    retention_ms,
                    options.clock.monotonic_ms(),
                ),
                next: None,
                sweeping: false,
                changes: Retention::default(),
            })),
        };
        let writer = Writer {
            database,
            conn: Some(conn),
            unreachable_since,
            pruning,
            clock: options.clock,
            max_batch: options.max_batch.max(1),
            metrics: options.metrics,
            own_metrics,
            change_log,
            changed: false,
        };
        Ok((writer, epoch))
    }

    /// Takes the writes waiting, as many as a batch holds, while no other writer of this
    /// instance is taking them; commits them; and again, until the store closes.
    fn run(mut self, rx: &Mutex<Writes>) {
        loop {
            let batch = next_batch(&mut rx.lock().expect("the writers' queue"), self.max_batch);
            let Some((writes, replies)) = batch else { break };
            let results = self.commit_batch(&writes);
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
            if std::mem::take(&mut self.changed) {
                self.change_log.committed();
            }
            self.prune_if_due();
            // While no write waits, forgetting goes on a chunk at a time.
            // (A queue another writer holds is one it waits on: empty.)
            while self.sweeping() && rx.try_lock().map_or(true, |rx| rx.is_empty()) {
                self.prune_if_due();
            }
        }
    }

    /// Opens the writer's connection again if it was lost.
    fn connect(&mut self) -> Result<(), StoreError> {
        if self.conn.as_ref().is_some_and(|conn| conn.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let failed_at = *self.unreachable_since.lock().expect("the writers' view of the database");
            if failed_at.is_some_and(|at| at.elapsed() < RECONNECT_AFTER) {
                return Err(StoreError::Unavailable("the database cannot be reached".into()));
            }
            match Connection::open(&self.database) {
                Ok(conn) => {
                    self.own_metrics.reconnects.inc();
                    *self.unreachable_since.lock().expect("the writers' view of the database") = None;
                    tracing::info!("the store's writer is connected to the database again");
                    self.conn = Some(conn);
                }
                Err(e) => {
                    *self.unreachable_since.lock().expect("the writers' view of the database") =
                        Some(Instant::now());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Runs every write in one transaction, in the order of their records, and answers each.
    /// A write failing for its own reason is answered with its error and the others run again
    /// without it; a batch that lost to another transaction runs again whole.
    fn commit_batch(&mut self, writes: &[Write]) -> Vec<Result<WriteOutcome, StoreError>> {
        let mut results: Vec<Option<Result<WriteOutcome, StoreError>>> =
            writes.iter().map(|_| None).collect();
        // One order of records for every instance's batches; a record's writes keep theirs.
        let mut pending: Vec<usize> = (0..writes.len()).collect();
        pending.sort_by(|&a, &b| {
            (writes[a].user.as_str(), writes[a].data_type.as_str())
                .cmp(&(writes[b].user.as_str(), writes[b].data_type.as_str()))
        });
        let mut tries = 0;
        let mut reconnected = false;
        while !pending.is_empty() {
            tries += 1;
            let outcome = match self.connect() {
                Ok(()) => {
                    let conn = self.conn.as_mut().expect("connected");
                    run_batch(conn, writes, &pending, self.clock.now_ms(), &self.metrics)
                }
                Err(error) => Err(Failed { at: None, error, in_commit: false, at_begin: false }),
            };
            match outcome {
                Ok((outcomes, changed)) => {
                    for (i, outcome) in pending.iter().zip(outcomes) {
                        results[*i] = Some(Ok(outcome));
                    }
                    self.changed |= changed;
                    break;
                }
                Err(failed) => {
                    if matches!(failed.error, StoreError::Unavailable(_)) {
                        self.conn = None;
                    } else if let Some(conn) = &mut self.conn {
                        let _ = conn.client.batch_execute("ROLLBACK");
                    }
                    if failed.at_begin && matches!(failed.error, StoreError::Unavailable(_)) && !reconnected {
                        // The connection was lost while idle (the server restarted, a proxy
                        // closed it): nothing of the batch was sent, so it runs on a new one.
                        reconnected = true;
                        continue;
                    }
                    let at = failed.at.filter(|_| !failed.error.retryable());
                    if let Some(at) = at {
                        tracing::warn!(error = %failed.error, "a write failed; the rest of its batch runs again");
                        results[pending[at]] = Some(Err(failed.error));
                        pending.remove(at);
                        continue;
                    }
                    if matches!(failed.error, StoreError::Conflict(_)) && tries < TRIES && !failed.in_commit {
                        self.own_metrics.batch_retries.inc();
                        continue;
                    }
                    let unpinned = !failed.error.retryable() || matches!(failed.error, StoreError::Busy(_));
                    if !failed.in_commit && unpinned && pending.len() > 1 {
                        // A failure the batch cannot pin on one write (a record another
                        // transaction holds among them): each runs alone, so that only the
                        // ones it belongs to fail.
                        tracing::warn!(error = %failed.error, "a batch failed; its {} writes run one by one", pending.len());
                        for i in pending.drain(..) {
                            results[i] = Some(self.commit_batch(std::slice::from_ref(&writes[i])).remove(0));
                        }
                        break;
                    }
                    let error = if failed.in_commit {
                        tracing::error!(error = %failed.error, "a batch's commit failed; its {} writes may or may not be applied", pending.len());
                        StoreError::Unavailable(format!("the commit's outcome is unknown: {}", failed.error))
                    } else {
                        tracing::warn!(error = %failed.error, "a batch failed; {} writes refused", pending.len());
                        failed.error
                    };
                    for i in pending.drain(..) {
                        results[i] = Some(Err(error.clone()));
                    }
                }
            }
        }
        results.into_iter().map(|r| r.expect("every write answered")).collect()
    }

    /// Forgets op ids older than the retention: every few minutes, moves the horizon while no
    /// batch runs (the exclusive side of [`HORIZON_LOCK`], waiting at most [`HORIZON_WAIT`] for
    /// the batches in flight, as batches queue behind it), then deletes what is behind it, one
    /// chunk between two batches; and changes older than the change log keeps, likewise. One
    /// writer of the instance at a time does it (two would delete the same rows, each waiting
    /// on the other's), whichever finds it free.
    fn prune_if_due(&mut self) {
        let pruning = self.pruning.clone();
        let Ok(mut pruning) = pruning.try_lock() else { return };
        if self.connect().is_err() {
            return;
        }
        self.forget_ops(&mut pruning);
        self.forget_changes(&mut pruning);
    }

    /// One step of forgetting expired op ids: a chunk deleted, or the horizon moved when due.
    fn forget_ops(&mut self, pruning: &mut Pruning) {
        let Some(conn) = &self.conn else { return };
        let client = &conn.client;
        if pruning.sweeping {
            let swept = client.execute(
                "DELETE FROM ops WHERE (user_id, op_id) IN
                     (SELECT user_id, op_id FROM ops WHERE created_ms < $1 LIMIT $2)",
                &[&pruning.horizon.ms, &SWEEP_CHUNK],
            );
            match swept {
                Ok(deleted) => pruning.sweeping = deleted == SWEEP_CHUNK as u64,
                Err(e) => self.pruning_failed(pruning, &e),
            }
            return;
        }
        let monotonic = self.clock.monotonic_ms();
        if pruning.next.is_some_and(|at| monotonic < at) {
            return;
        }
        let now = self.clock.now_ms();
        let horizon = &mut pruning.horizon;
        let moved = (|| -> Result<bool, StoreError> {
            // Batches in flight end within milliseconds; one that does not (stuck on a record,
            // or its instance cut off) is not waited for, as batches would queue behind.
            client.batch_execute(&format!("BEGIN; SET LOCAL lock_timeout = {}", HORIZON_WAIT.as_millis()))?;
            match client.execute("SELECT pg_advisory_xact_lock($1)", &[&HORIZON_LOCK]) {
                Ok(_) => {}
                Err(StoreError::Busy(_)) => {
                    client.batch_execute("ROLLBACK")?;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
            let stored = read_horizon(client)?;
            // Another instance may have moved it: this one goes on from there.
            horizon.move_to(stored, monotonic);
            let next = horizon.next(now, monotonic);
            client.execute("UPDATE meta SET value = $1 WHERE key = 'op_horizon_ms'", &[&next.to_string()])?;
            client.batch_execute("COMMIT")?;
            horizon.move_to(next, monotonic);
            Ok(true)
        })();
        match moved {
            Ok(true) => {
                pruning.next = Some(monotonic + PRUNE_EVERY_MS);
                pruning.sweeping = true;
            }
            Ok(false) => pruning.next = Some(monotonic + PRUNE_RETRY_MS),
            Err(e) => self.pruning_failed(pruning, &e),
        }
    }

    /// One step of keeping the change log short ([`Retention`]).
    fn forget_changes(&mut self, pruning: &mut Pruning) {
        let Some(conn) = &self.conn else { return };
        if let Err(e) = pruning.changes.step(&conn.client, self.clock.monotonic_ms()) {
            tracing::warn!(error = %e, "forgetting old changes failed; trying again later");
            pruning.changes.failed();
            self.step_failed(&e);
        }
    }

    /// Leaves forgetting op ids to a later try, and the connection too if it failed.
    fn pruning_failed(&mut self, pruning: &mut Pruning, error: &StoreError) {
        tracing::warn!(error = %error, "forgetting expired op ids failed; trying again in 30 s");
        pruning.sweeping = false;
        pruning.next = Some(self.clock.monotonic_ms() + PRUNE_RETRY_MS);
        self.step_failed(error);
    }

    /// After a step of forgetting failed: the connection is left if it is lost, or its
    /// transaction rolled back.
    fn step_failed(&mut self, error: &StoreError) {
        match error {
            StoreError::Unavailable(_) => self.conn = None,
            _ => {
                if let Some(conn) = &self.conn {
                    let _ = conn.client.batch_execute("ROLLBACK");
                }
            }
        }
    }

    /// Whether op ids behind the horizon, or old changes, are left to delete.
    fn sweeping(&self) -> bool {
        self.pruning.try_lock().is_ok_and(|pruning| pruning.sweeping || pruning.changes.sweeping())
    }
}

/// Forgetting expired op ids and old changes, one per instance, shared by its writers.
#[derive(Debug)]
struct Pruning {
    /// This instance's view of the time before which no op id is remembered; the database's
    /// (`meta.op_horizon_ms`) is the one batches go by.
    horizon: Horizon,
    /// When (on the monotonic clock) the horizon is to move next; `None`: at the first batch.
    next: Option<u64>,
    /// Whether op ids behind the horizon are left to delete, a chunk after each batch.
    sweeping: bool,
    /// Keeping the change log short.
    changes: Retention,
}

/// The horizon as the database keeps it.
fn read_horizon(client: &Client) -> Result<i64, StoreError> {
    let stored: String = client.query_one("SELECT value FROM meta WHERE key = 'op_horizon_ms'", &[])?.get(0);
    stored.parse().map_err(|_| StoreError::Malformed(format!("op_horizon_ms {stored:?}")))
}

/// One run of the writes `pending` (indexes into `writes`) in one transaction, committed; with
/// whether it changed a record.
fn run_batch(
    conn: &mut Connection,
    writes: &[Write],
    pending: &[usize],
    now: i64,
    metrics: &StoreMetrics,
) -> Result<(Vec<WriteOutcome>, bool), Failed> {
    let failed =
        |at: Option<usize>| move |error: StoreError| Failed { at, error, in_commit: false, at_begin: false };
    let batch: Vec<&Write> = pending.iter().map(|&i| &writes[i]).collect();
    let mut keys: Vec<(&str, &str)> = batch.iter().map(|w| (w.user.as_str(), w.data_type.as_str())).collect();
    keys.sort_unstable();
    keys.dedup();
    let (users, types): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    let (op_users, op_ids): (Vec<&str>, Vec<&str>) =
        batch.iter().filter_map(|w| w.op.as_ref().map(|op| (w.user.as_str(), op.op_id.as_str()))).unzip();
    // One round trip, run in this order: the transaction and the horizon's shared lock; the
    // horizon as it stands once the lock is held (a statement of its own, so it sees a move
    // just committed); the batch's records, locked; then their op ids, read once the locks are
    // held, so that an op another instance applied to one of them before is seen.
    let conn_ref: &Connection = conn;
    let begin = format!(
        "BEGIN; SELECT pg_advisory_xact_lock_shared({HORIZON_LOCK}); \
         SELECT value FROM meta WHERE key = 'op_horizon_ms'"
    );
    let lock_params: [&(dyn ToSql + Sync); 2] = [&users, &types];
    let ops_params: [&(dyn ToSql + Sync); 2] = [&op_users, &op_ids];
    let any_op = !op_ids.is_empty();
    let (begun, locked, found) = conn_ref
        .client
        .pipeline(|client| async move {
            tokio::join!(
                client.simple_query(&begin),
                client.query(&conn_ref.lock_records, &lock_params),
                async {
                    if !any_op {
                        return Ok(Vec::new());
                    }
                    client.query(&conn_ref.find_ops, &ops_params).await
                },
            )
        })
        .map_err(|error| Failed { at: None, error, in_commit: false, at_begin: true })?;
    let messages =
        begun.map_err(|e| Failed { at: None, error: e.into(), in_commit: false, at_begin: true })?;
    let horizon = messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        })
        .next_back()
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(|| failed(None)(StoreError::Malformed("meta holds no op_horizon_ms".into())))?;
    let locked = locked.map_err(|e| failed(None)(e.into()))?;
    let found = found.map_err(|e| failed(None)(e.into()))?;
    let mut tx = BatchTx::from_rows(locked, found).map_err(failed(None))?;
    let mut outcomes = Vec::with_capacity(pending.len());
    for (at, write) in batch.iter().enumerate() {
        let outcome = rules::apply(&mut tx, write, now, horizon).map_err(failed(Some(at)))?;
        outcomes.push(outcome);
    }
    let changed = tx.flush(conn_ref).map_err(failed(None))?;
    let commit = Instant::now();
    conn.client.batch_execute("COMMIT").map_err(|error| Failed {
        at: None,
        error,
        in_commit: true,
        at_begin: false,
    })?;
    metrics.commit_seconds.observe(commit.elapsed().as_secs_f64());
    metrics.batch_writes.observe(pending.len() as f64);
    Ok((outcomes, changed))
}
