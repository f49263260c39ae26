//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so an
//! acknowledged write survives `kill -9` and power loss.
//!
//! All writes go through one writer thread that gathers whatever writes are waiting into one
//! transaction and one fsync (group commit), each inside its own savepoint so that one
//! failing write cannot undo another. Replies go out only after the commit. Reads use a
//! pool of separate connections and never wait behind the writer. The writer stamps each
//! record it writes with its place in the feed; the webhook queues fed from the feed are
//! written beside the writer, on a connection of their own (`sqlite/feed.rs`).

pub mod backup;
mod feed;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use protocol::{DataType, OpId, SiteId, UserId};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use rusqlite_migration::{M, Migrations};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::op_index::OpIndex;
use super::queue::{Queue, Writes, next_batch, queue};
use super::rules::{self, Horizon, LedgerRow, SeenOp, Tx};
use super::stamps::StampCache;
use super::{
    ChangeEvent, Changes, Credits, FeedChange, FeedPosition, OpKey, Pending, Position, Publisher, QueueStats,
    Record, Settled, Stamp, Store, StoreError, StoreMetrics, Write, WriteOutcome,
};
use crate::time::Clock;

/// The database file inside the data dir.
pub const DB_FILE: &str = "hub.sqlite3";
/// Held locked by the process that has the store open.
pub const LOCK_FILE: &str = "hub.lock";
/// Writes gathered into one transaction at most, with group commit on.
pub const MAX_BATCH: usize = 512;
/// Users whose stamps are kept in memory (about 200 bytes each).
const CACHED_USERS: usize = 200_000;
/// Idle read connections kept open.
const MAX_IDLE_READERS: usize = 16;
/// How often remembered op ids older than the retention are deleted.
const PRUNE_EVERY_MS: u64 = 10 * 60 * 1000;
/// Writes since the last checkpoint after which the writer checkpoints as soon as no write
/// is waiting.
const CHECKPOINT_WHEN_IDLE: usize = 64;
/// Writes since the last checkpoint after which the writer checkpoints even with writes
/// waiting, so the WAL stays bounded under unbroken load.
const CHECKPOINT_AT_MOST: usize = 2048;

/// The schema version this hub brings a database to (its `user_version`): a database beyond
/// it was migrated by a newer hub, and this one refuses it.
pub const SCHEMA_VERSION: u32 = STEPS.len() as u32;

/// The schema, one migration per step; never edit a published step, add one.
fn migrations() -> Migrations<'static> {
    Migrations::from_slice(STEPS)
}

const STEPS: &[M<'static>] = &[
    M::up(
        "CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE records (
            user_id TEXT NOT NULL,
            data_type TEXT NOT NULL,
            data TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL,
            PRIMARY KEY (user_id, data_type)
        ) WITHOUT ROWID;
        CREATE TABLE ops (
            user_id TEXT NOT NULL,
            op_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            data TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_ms INTEGER,
            created_ms INTEGER NOT NULL,
            PRIMARY KEY (user_id, op_id)
        ) WITHOUT ROWID;
        CREATE INDEX ops_by_age ON ops (created_ms);
        CREATE TABLE ledger (
            id INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL,
            data_type TEXT NOT NULL,
            site_id TEXT NOT NULL,
            op_id TEXT,
            delta INTEGER NOT NULL,
            result INTEGER NOT NULL,
            version INTEGER NOT NULL,
            reason TEXT,
            at_ms INTEGER NOT NULL
        );
        CREATE INDEX ledger_by_record ON ledger (user_id, data_type, id);",
    ),
    // A refused op's code (`insufficient_funds`, `version_conflict`); NULL when applied.
    M::up("ALTER TABLE ops ADD COLUMN refusal TEXT;"),
    // The ledger is read whole (audits, the reliability suite), never by record; an index
    // by record cost every write one more page far from the others.
    M::up("DROP INDEX ledger_by_record;"),
    // New op ids are appended to a log in arrival order, indexed in memory (`op_index.rs`);
    // while the log holds `op_log_capacity` rows, further ones go to `ops`, the table by
    // user. `remembered_ops` reads both.
    M::up(
        "CREATE TABLE op_log (
            id INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL,
            op_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            data TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_ms INTEGER,
            created_ms INTEGER NOT NULL,
            refusal TEXT
        );
        CREATE VIEW remembered_ops AS
            SELECT user_id, op_id, fingerprint, data, version, updated_ms, created_ms, refusal FROM ops
            UNION ALL
            SELECT user_id, op_id, fingerprint, data, version, updated_ms, created_ms, refusal FROM op_log;",
    ),
    // What a record's amount was credited today, by site (JSON of `Credits`), for the
    // sites' daily credit ceilings; NULL until the first credit. Beside the record, so a
    // credit writes no other page.
    M::up("ALTER TABLE records ADD COLUMN credits TEXT;"),
    // The feed (`sqlite/feed.rs`): each record's position at its latest change, and the
    // site whose backend made that change (NULL: a page). The records written before take
    // positions in the order of their last change, so that the feed read from its start
    // lists each of them. Then each site's webhook: its cursor in the feed, and its queue of
    // notifications, one per record at most.
    M::up(
        "ALTER TABLE records ADD COLUMN feed_seq INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE records ADD COLUMN origin TEXT;
        UPDATE records SET feed_seq = numbered.n
            FROM (SELECT user_id, data_type,
                         row_number() OVER (ORDER BY updated_ms, user_id, data_type) AS n
                  FROM records) AS numbered
            WHERE records.user_id = numbered.user_id AND records.data_type = numbered.data_type;
        CREATE INDEX records_by_feed ON records (feed_seq);
        CREATE TABLE webhook_cursors (
            site TEXT PRIMARY KEY,
            xid INTEGER NOT NULL,
            seq INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE webhook_queue (
            site TEXT NOT NULL,
            user_id TEXT NOT NULL,
            data_type TEXT NOT NULL,
            version INTEGER NOT NULL,
            queued_ms INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            due_ms INTEGER NOT NULL,
            lease_until_ms INTEGER NOT NULL,
            PRIMARY KEY (site, user_id, data_type)
        ) WITHOUT ROWID;
        CREATE INDEX webhook_queue_by_due ON webhook_queue (site, due_ms);",
    ),
    // The feed's order is kept in a log appended at its end, one row per write, instead of an
    // index on `records.feed_seq`: each write moved the record's entry in that index, dirtying
    // a page far from the others' (durable deltas ran 30 % slower). A row the record's later
    // write superseded is skipped by the feed (the record's `feed_seq` names its current row)
    // and swept away by the writer (`feed::sweep`).
    M::up(
        "DROP INDEX records_by_feed;
        CREATE TABLE feed_log (
            seq INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL,
            data_type TEXT NOT NULL
        );
        INSERT INTO feed_log (seq, user_id, data_type)
            SELECT feed_seq, user_id, data_type FROM records WHERE feed_seq > 0 ORDER BY feed_seq;",
    ),
];

/// Tuning of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How long an op id is remembered.
    pub op_retention: Duration,
    /// Writes committed together at most: 1 gives one transaction and one fsync per write.
    pub max_batch: usize,
    /// Op ids the op log takes at most, found through an index in memory (about 20–40 bytes
    /// each); while it is full, new ones go to the table by user. A log that holds more (the
    /// capacity was lowered) is indexed whole, and shrinks as its op ids expire.
    pub op_log_capacity: usize,
    /// Where the writer records its batch sizes and commit times.
    pub metrics: StoreMetrics,
    /// Where the store reads the time.
    pub clock: Arc<dyn Clock>,
}

/// What only the SQLite store reports to `/metrics`. Clones record into the same ones.
#[derive(Debug, Clone)]
struct SqliteMetrics {
    /// Seconds a checkpoint takes: copying the WAL into the database file and its fsync.
    checkpoint_seconds: Histogram,
    /// Op ids in the op log (and its index in memory) now.
    op_log_ids: Gauge,
}

impl Default for SqliteMetrics {
    fn default() -> Self {
        SqliteMetrics {
            checkpoint_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            op_log_ids: Gauge::default(),
        }
    }
}

/// SQLite behind the [`Store`] trait.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    epoch: String,
    writes: Queue,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    stamps: Arc<StampCache>,
    /// The data dir's lock, released when the store closes.
    lock: Mutex<Option<std::fs::File>>,
    metrics: SqliteMetrics,
    /// Where the writer publishes its committed changes.
    changes: Arc<Publisher>,
    /// This run's era of change positions.
    era: u64,
    /// Where the webhook queues are written (`sqlite/feed.rs` says why not by the writer);
    /// `None` once the store is closed.
    webhooks: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("epoch", &self.inner.epoch)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `dir`, brings its schema up to date and
    /// starts the writer.
    pub fn open(dir: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let dir = &trusted_data_dir(dir)?;
        let lock = lock_data_dir(dir)?;
        if let Some(kept) = backup::interrupted_restore(dir)? {
            return Err(StoreError::Open(format!(
                "{} is also {}: a restore was interrupted while it kept this database aside; run the restore again to finish it",
                dir.join(DB_FILE).display(),
                kept.display()
            )));
        }
        let path = dir.join(DB_FILE);
        create_private(&path)?;
        let mut conn = open_database(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // SQLite would checkpoint inside the COMMIT that a batch's replies wait for; the
        // writer checkpoints between batches instead, after the replies (`Writer::run`).
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        migrations()
            .to_latest(&mut conn)
            .map_err(|e| StoreError::Malformed(format!("migration failed: {e}")))?;
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)", params![new_epoch()])?;
        let epoch: String = conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0))?;
        // Each run of the hub over this database is an era of its changes' positions.
        let era: i64 = conn.query_row(
            "INSERT INTO meta (key, value) VALUES ('runs', '1')
             ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1
             RETURNING CAST(value AS INTEGER)",
            [],
            |r| r.get(0),
        )?;
        let era = u64::try_from(era).map_err(|_| StoreError::Malformed(format!("runs {era}")))?;
        let retention_ms = i64::try_from(options.op_retention.as_millis()).unwrap_or(i64::MAX);
        // A new database remembers nothing from before its creation minus the retention.
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('op_horizon_ms', ?1)",
            params![options.clock.now_ms().saturating_sub(retention_ms).to_string()],
        )?;
        let horizon_ms: String =
            conn.query_row("SELECT value FROM meta WHERE key = 'op_horizon_ms'", [], |r| r.get(0))?;
        let horizon_ms =
            horizon_ms.parse().map_err(|_| StoreError::Malformed(format!("op_horizon_ms {horizon_ms:?}")))?;

        let ops = OpIds::load(&conn, options.op_log_capacity)?;
        let feed_seq = feed::last_seq(&conn)?;
        let webhooks = feed::open_webhooks(&path)?;
        let own_metrics = SqliteMetrics::default();
        ops.report(&own_metrics);

        let (queue, rx) = queue();
        let max_batch = options.max_batch.max(1);
        let stamps = Arc::new(StampCache::new(CACHED_USERS));
        let writer_stamps = stamps.clone();
        let writer_metrics = own_metrics.clone();
        let changes = Arc::new(Publisher::default());
        let writer_changes = changes.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let horizon = Horizon::new(horizon_ms, retention_ms, options.clock.monotonic_ms());
                Writer {
                    conn,
                    horizon,
                    clock: options.clock,
                    last_prune: None,
                    since_checkpoint: 0,
                    max_batch,
                    ops,
                    ops_unknown: false,
                    stamps: writer_stamps,
                    metrics: options.metrics,
                    own_metrics: writer_metrics,
                    changes: writer_changes,
                    made: Vec::new(),
                    position: Position { era, seq: 0 },
                    feed_seq,
                    swept: 0,
                    since_sweep: 0,
                }
                .run(rx)
            })
            .map_err(|e| StoreError::Malformed(format!("cannot start the writer: {e}")))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                epoch,
                writes: queue,
                writer_thread: Mutex::new(Some(thread)),
                readers: Mutex::new(Vec::new()),
                stamps,
                lock: Mutex::new(Some(lock)),
                metrics: own_metrics,
                changes,
                era,
                webhooks: Mutex::new(Some(webhooks)),
            }),
        })
    }

    /// Runs `f` on a pooled read connection, on the calling thread. A read is a lookup by
    /// primary key in pages the OS already caches, a few microseconds: handing it to another
    /// thread and back would cost more than the read itself.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.read_now(f)
    }

    /// Runs `f` on a pooled read connection, on a thread for blocking work: for a read of
    /// many rows (the feed), which would hold a task's thread for milliseconds.
    async fn read_many<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read_now(f))
            .await
            .map_err(|e| StoreError::Database(format!("a read of the store failed: {e}")))?
    }

    fn read_now<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError>,
    {
        let pooled = self.inner.readers.lock().expect("reader pool").pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&self.inner.path)?,
        };
        let result = f(&conn);
        let mut readers = self.inner.readers.lock().expect("reader pool");
        if readers.len() < MAX_IDLE_READERS {
            readers.push(conn);
        }
        result
    }

    /// Runs `f` on the webhook queues' connection, on a thread for blocking work: it may wait
    /// for the writer's lock.
    async fn webhooks<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.inner.writes.check()?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.webhooks.lock().expect("the webhook queues' connection");
            f(conn.as_mut().ok_or(StoreError::Closed)?)
        })
        .await
        .map_err(|e| StoreError::Database(format!("a webhook queue's update failed: {e}")))?
    }
}

/// Creates the data dir `dir` (0700) unless it exists, and returns its path with every
/// symbolic link resolved. The path up to the data dir is the administrator's; what is in it
/// belongs to the hub's user, and is opened without following a symbolic link
/// ([`open_in_data_dir`], [`open_database`]).
fn trusted_data_dir(dir: &Path) -> Result<PathBuf, StoreError> {
    crate::config::create_data_dir(dir)
        .and_then(|()| std::fs::canonicalize(dir))
        .map_err(|e| StoreError::Open(format!("cannot create {}: {e}", dir.display())))
}

/// Locks the data dir `dir` (which must exist) for this process until the file returned is
/// dropped. Every write goes through one process's writer (the stamp cache relies on it), so
/// no second process may open the same database, and a restore must not replace it under a
/// hub. The kernel releases the lock when its process ends, however it ends.
fn lock_data_dir(dir: &Path) -> Result<File, StoreError> {
    let lock_path = dir.join(LOCK_FILE);
    let lock = open_in_data_dir(&lock_path, OpenOptions::new().create(true).truncate(false).write(true))
        .map_err(|e| StoreError::Open(format!("cannot open {}: {e}", lock_path.display())))?;
    lock.try_lock().map_err(|_| {
        StoreError::Open(format!("another hub process is using {}; stop it first", dir.display()))
    })?;
    Ok(lock)
}

/// Opens `path`, a file of the data dir, as `options` say, but never through a symbolic link,
/// and only a regular file: the data dir is writable by the hub's user, and a command run as
/// root (`hub restore`, `hub import`) must not be led by a link there to a file of root's.
pub(crate) fn open_in_data_dir(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    #[cfg(unix)]
    {
        // Non-blocking, so that a FIFO put in a file's place is refused rather than waited on.
        std::os::unix::fs::OpenOptionsExt::custom_flags(options, libc::O_NOFOLLOW | libc::O_NONBLOCK);
        let file = options.open(path).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                std::io::Error::other("it is a symbolic link, which the hub does not follow")
            }
            Some(libc::ENXIO) => std::io::Error::other("it is not a regular file"),
            _ => e,
        })?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("it is not a regular file"));
        }
        Ok(file)
    }
    #[cfg(not(unix))]
    options.open(path)
}

/// Opens the database `path` for the hub, refusing a symbolic link anywhere in its path
/// (SQLite would otherwise follow it, and put its `-wal` beside the file it leads to).
fn open_database(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(path, OpenFlags::default() | OpenFlags::SQLITE_OPEN_NOFOLLOW)
}

/// A new database's id: pages that held another drop their cache when they see it.
fn new_epoch() -> String {
    crate::config::random_secret()[..16].to_owned()
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = open_database(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
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

/// Creates an empty database at `path` (0600, which SQLite gives its `-wal` and `-shm` files
/// too) unless it exists, so that outside systemd, whatever the umask, only the hub's user
/// reads it. SQLite would create it 0644.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    open_in_data_dir(path, &mut options)
        .map_err(|e| StoreError::Open(format!("cannot create {}: {e}", path.display())))?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn feed(
        &self,
        after: FeedPosition,
        types: &[DataType],
        limit: usize,
    ) -> Result<Vec<FeedChange>, StoreError> {
        let types = types.to_vec();
        self.read_many(move |conn| feed::read(conn, after, &types, limit)).await
    }

    async fn feed_end(&self) -> Result<FeedPosition, StoreError> {
        self.read(feed::end).await
    }

    async fn webhook_transfer(
        &self,
        site: &SiteId,
        types: &[DataType],
        now_ms: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let (site, types) = (site.clone(), types.to_vec());
        self.webhooks(move |conn| feed::transfer(conn, &site, &types, now_ms, limit)).await
    }

    async fn webhook_claim(
        &self,
        site: &SiteId,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        let site = site.clone();
        self.webhooks(move |conn| feed::claim(conn, &site, now_ms, lease_ms, limit)).await
    }

    async fn webhook_settle(
        &self,
        site: &SiteId,
        now_ms: i64,
        settled: &[Settled],
    ) -> Result<(), StoreError> {
        let (site, settled) = (site.clone(), settled.to_vec());
        self.webhooks(move |conn| feed::settle(conn, &site, now_ms, &settled)).await
    }

    async fn webhook_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        self.read(feed::stats).await
    }

    fn epoch(&self) -> &str {
        &self.inner.epoch
    }

    async fn stamps(&self, user: &UserId, types: &[DataType]) -> Result<Vec<Stamp>, StoreError> {
        if let Some(stamps) = self.inner.stamps.get(user.as_str(), types) {
            return Ok(stamps);
        }
        let ticket = self.inner.stamps.ticket(user.as_str());
        let owned = user.as_str().to_owned();
        let stored = self
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT data_type, version, updated_ms FROM records WHERE user_id = ?1",
                )?;
                let mut rows = stmt.query(params![owned])?;
                let mut stored = DataType::ALL.map(|t| (t, Stamp { version: 0, updated_ms: None }));
                while let Some(row) = rows.next()? {
                    let data_type = data_type_of(&row.get::<_, String>(0)?)?;
                    let stamp = Stamp { version: version_of(row.get(1)?), updated_ms: Some(row.get(2)?) };
                    stored[data_type.index()].1 = stamp;
                }
                Ok(stored)
            })
            .await?;
        self.inner.stamps.merge_loaded(ticket, user.as_str(), stored);
        // What was read answers this check, whether the cache kept it or not.
        Ok(types.iter().map(|t| stored[t.index()].1).collect())
    }

    async fn records(&self, user: &UserId, types: &[DataType]) -> Result<Vec<Record>, StoreError> {
        let user = user.as_str().to_owned();
        let types = types.to_vec();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT data, version, updated_ms FROM records WHERE user_id = ?1 AND data_type = ?2",
            )?;
            types.iter().map(|t| read_record(&mut stmt, &user, *t)).collect()
        })
        .await
    }

    async fn write(&self, write: Write) -> Result<WriteOutcome, StoreError> {
        self.inner.writes.write(write).await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.inner.writes.check()?;
        self.read(|conn| Ok(conn.query_row("SELECT count(*) FROM meta", [], |r| r.get::<_, i64>(0))?))
            .await?;
        Ok(())
    }

    async fn close(&self) {
        self.inner.writes.close();
        let thread = self.inner.writer_thread.lock().expect("writer thread").take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let inner = self.inner.clone();
        let webhooks = tokio::task::spawn_blocking(move || {
            inner.webhooks.lock().expect("the webhook queues' connection").take()
        });
        drop(webhooks.await);
        drop(self.inner.lock.lock().expect("data dir lock").take());
    }

    fn take_changes(&self) -> Option<Changes> {
        self.inner.changes.take(Position { era: self.inner.era, seq: 0 })
    }

    fn register_metrics(&self, registry: &mut Registry) {
        let metrics = &self.inner.metrics;
        registry.register_with_unit(
            "store_checkpoint",
            "Time of a checkpoint between batches: copying the WAL into the database file and its fsync",
            Unit::Seconds,
            metrics.checkpoint_seconds.clone(),
        );
        registry.register(
            "store_op_log_ids",
            "Op ids in the op log, indexed in memory; at [store] op_ids_in_memory new ones go to the table by user",
            metrics.op_log_ids.clone(),
        );
    }
}

fn read_record(
    stmt: &mut rusqlite::CachedStatement<'_>,
    user: &str,
    t: DataType,
) -> Result<Record, StoreError> {
    let row = stmt
        .query_row(params![user, t.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
        .optional()?;
    match row {
        Some((data, version, updated_ms)) => Ok(Record {
            data: parse_data(&data)?,
            version: version_of(version),
            updated_ms: Some(updated_ms),
        }),
        None => Ok(Record::empty(t)),
    }
}

/// A record as a write sees it: with its credit count.
fn read_for_write(conn: &Connection, user: &str, t: DataType) -> Result<(Record, Credits), StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT data, version, updated_ms, credits FROM records WHERE user_id = ?1 AND data_type = ?2",
        )?
        .query_row(params![user, t.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })
        .optional()?;
    let Some((data, version, updated_ms, credits)) = row else {
        return Ok((Record::empty(t), Credits::default()));
    };
    let record =
        Record { data: parse_data(&data)?, version: version_of(version), updated_ms: Some(updated_ms) };
    let credits = match credits {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| StoreError::Malformed(format!("credits of {user}'s {t}: {e}")))?,
        None => Credits::default(),
    };
    Ok((record, credits))
}

/// The one connection that writes, on its own thread.
struct Writer {
    conn: Connection,
    /// Op ids dated or made before it are forgotten, and an unknown op dated before it is
    /// refused.
    horizon: Horizon,
    clock: Arc<dyn Clock>,
    /// The monotonic clock at the last prune.
    last_prune: Option<u64>,
    /// Writes committed since the WAL was last copied into the database file.
    since_checkpoint: usize,
    max_batch: usize,
    /// Where remembered op ids are.
    ops: OpIds,
    /// A batch failed: the index may differ from the op log until it is read again.
    ops_unknown: bool,
    /// Told every applied write's new stamp after its commit, before the replies go out.
    stamps: Arc<StampCache>,
    metrics: StoreMetrics,
    own_metrics: SqliteMetrics,
    /// Where committed changes go, once the hub's event streams take them.
    changes: Arc<Publisher>,
    /// The changes the batch in progress made, published once it commits.
    made: Vec<ChangeEvent>,
    /// The last change's position.
    position: Position,
    /// The last feed position drawn (`sqlite/feed.rs`).
    feed_seq: i64,
    /// Where the last sweep of the feed's log stopped (`feed::sweep`).
    swept: i64,
    /// Writes committed since the last sweep.
    since_sweep: usize,
}

impl Writer {
    fn run(mut self, mut rx: Writes) {
        while let Some((writes, replies)) = next_batch(&mut rx, self.max_batch) {
            let count = writes.len();
            let changed: Vec<(UserId, DataType)> =
                writes.iter().map(|w| (w.user.clone(), w.data_type)).collect();
            let results = self.commit_batch(writes);
            for ((user, data_type), result) in changed.iter().zip(&results) {
                if let Ok(WriteOutcome::Applied(record)) = result {
                    let stamp = Stamp { version: record.version, updated_ms: record.updated_ms };
                    self.stamps.merge_written(user.as_str(), [(*data_type, stamp)]);
                }
            }
            tracing::trace!(batch = count, "store batch committed");
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
            // After the writers' answers: no stream hears of a change before its writer does.
            self.changes.publish(std::mem::take(&mut self.made));
            self.since_checkpoint += count;
            self.since_sweep += count;
            if self.since_sweep >= feed::SWEEP_EVERY {
                self.sweep();
            }
            if self.since_checkpoint >= CHECKPOINT_AT_MOST
                || (self.since_checkpoint >= CHECKPOINT_WHEN_IDLE && rx.is_empty())
            {
                self.checkpoint();
            }
        }
        self.checkpoint();
    }

    /// Copies the WAL into the database file, after the replies have gone out: the writes are
    /// already durable in the WAL, so no reply waits for this.
    /// Sweeps superseded rows out of the feed's log, after the replies have gone out.
    fn sweep(&mut self) {
        match feed::sweep(&mut self.conn, self.swept) {
            Ok(swept) => self.swept = swept,
            Err(e) => tracing::warn!(error = %e, "sweeping the feed's log failed; the next sweep retries"),
        }
        self.since_sweep = 0;
    }

    fn checkpoint(&mut self) {
        let started = Instant::now();
        if let Err(e) = self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries");
        }
        self.own_metrics.checkpoint_seconds.observe(started.elapsed().as_secs_f64());
        self.since_checkpoint = 0;
    }

    /// Runs every write in one transaction; on a failed commit every write fails.
    fn commit_batch(&mut self, writes: Vec<Write>) -> Vec<Result<WriteOutcome, StoreError>> {
        let now = self.clock.now_ms();
        let monotonic = self.clock.monotonic_ms();
        let count = writes.len();
        if self.ops_unknown {
            match OpIds::load(&self.conn, self.ops.capacity) {
                Ok(ops) => {
                    self.ops = ops;
                    self.ops_unknown = false;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the op log; {count} writes refused");
                    return (0..count).map(|_| Err(StoreError::Database(e.to_string()))).collect();
                }
            }
        }
        let prune = self.last_prune.is_none_or(|at| monotonic.saturating_sub(at) >= PRUNE_EVERY_MS);
        let horizon = if prune { self.horizon.next(now, monotonic) } else { self.horizon.ms };
        let ops = &mut self.ops;
        let made = &mut self.made;
        let wanted = self.changes.wanted();
        let mut position = self.position;
        let feed_seq = &mut self.feed_seq;
        type Outcome = (Vec<Result<WriteOutcome, StoreError>>, Option<bool>);
        let outcome = (|| -> Result<Outcome, StoreError> {
            let mut tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut results = Vec::with_capacity(count);
            for write in writes {
                let mark = ops.index.mark();
                let (made_before, position_before) = (made.len(), position);
                let sp = tx.savepoint()?;
                let mut sqlite_tx = SqliteTx {
                    conn: &sp,
                    ops,
                    made: wanted.then_some(&mut *made),
                    position: &mut position,
                    feed_seq: &mut *feed_seq,
                };
                match rules::apply(&mut sqlite_tx, &write, now, horizon) {
                    Ok(outcome) => {
                        sp.commit()?;
                        results.push(Ok(outcome));
                    }
                    Err(e) => {
                        drop(sp);
                        ops.index.forget_since(mark);
                        made.truncate(made_before);
                        position = position_before;
                        // Some failures (a full disk, an I/O error) make SQLite roll back the
                        // whole transaction; every later write would then commit on its own.
                        if tx.is_autocommit() {
                            return Err(e);
                        }
                        results.push(Err(e));
                    }
                }
            }
            let table_after_prune = if prune {
                tx.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'op_horizon_ms'",
                    params![horizon.to_string()],
                )?;
                Some(ops.prune(&tx, horizon)?)
            } else {
                None
            };
            let commit = Instant::now();
            tx.commit()?;
            self.metrics.commit_seconds.observe(commit.elapsed().as_secs_f64());
            self.metrics.batch_writes.observe(count as f64);
            Ok((results, table_after_prune))
        })();
        match outcome {
            Ok((results, table_after_prune)) => {
                self.position = position;
                self.ops.index.commit();
                self.ops.report(&self.own_metrics);
                if let Some(in_table) = table_after_prune {
                    self.ops.in_table = in_table;
                    self.horizon.move_to(horizon, monotonic);
                    self.last_prune = Some(monotonic);
                }
                results
            }
            Err(e) => {
                self.made.clear();
                // What the rollback undid is the database's to say: the index is read back from
                // the op log before the next write runs.
                self.ops.index.discard();
                self.ops_unknown = true;
                let message = match e {
                    StoreError::Database(message) => message,
                    other => other.to_string(),
                };
                tracing::error!(error = %message, "store batch failed; {count} writes refused");
                (0..count).map(|_| Err(StoreError::Database(message.clone()))).collect()
            }
        }
    }
}

/// Where the writer remembers op ids: the op log while it has room, through an index in
/// memory; the table by user (`ops`) once the log is full, and for op ids from before the log.
struct OpIds {
    /// The op log's rows.
    index: OpIndex,
    /// Rows the log holds at most.
    capacity: usize,
    /// Whether `ops` may hold an op id, so that one missing from the log must be looked for
    /// there too. Set as soon as a write goes there; cleared only by a committed prune.
    in_table: bool,
}

impl OpIds {
    /// Indexes every row of the op log.
    fn load(conn: &Connection, capacity: usize) -> Result<OpIds, StoreError> {
        let mut index = OpIndex::default();
        let mut stmt = conn.prepare("SELECT id, user_id, op_id FROM op_log")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let hash = index.hash(&row.get::<_, String>(1)?, &row.get::<_, String>(2)?);
            index.insert_committed(hash, row.get(0)?);
        }
        Ok(OpIds { index, capacity, in_table: any_in_table(conn)? })
    }

    /// Shows how full the op log is on `/metrics`.
    fn report(&self, metrics: &SqliteMetrics) {
        metrics.op_log_ids.set(i64::try_from(self.index.len()).unwrap_or(i64::MAX));
    }

    /// Looks `op_id` up: in the op log through the index, then, if need be, in `ops`.
    fn find(&self, conn: &Connection, user: &str, op_id: &str) -> Result<Option<SeenOp>, StoreError> {
        let mut candidates = self.index.candidates(self.index.hash(user, op_id)).peekable();
        if candidates.peek().is_some() {
            let mut by_row = conn.prepare_cached(
                "SELECT user_id, op_id, fingerprint, data, version, updated_ms, refusal FROM op_log WHERE id = ?1",
            )?;
            for row in candidates {
                let found = by_row
                    .query_row(params![row], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, StoredOp::from_row(r, 2)?))
                    })
                    .optional()?;
                if let Some((row_user, row_op, seen)) = found
                    && row_user == user
                    && row_op == op_id
                {
                    return seen.parse().map(Some);
                }
            }
        }
        if !self.in_table {
            return Ok(None);
        }
        conn.prepare_cached(
            "SELECT fingerprint, data, version, updated_ms, refusal FROM ops WHERE user_id = ?1 AND op_id = ?2",
        )?
        .query_row(params![user, op_id], |r| StoredOp::from_row(r, 0))
        .optional()?
        .map(StoredOp::parse)
        .transpose()
    }

    /// Keeps an op's answer — the record it left, or the refusal it got with the record that
    /// caused it — so that every later copy of the op gets the same answer.
    fn remember(
        &mut self,
        conn: &Connection,
        user: &str,
        op: &OpKey,
        record: &Record,
        refusal: Option<&str>,
        from_ms: i64,
    ) -> Result<(), StoreError> {
        let in_log = self.index.len() < self.capacity;
        let sql = if in_log {
            "INSERT INTO op_log (user_id, op_id, fingerprint, data, version, updated_ms, created_ms, refusal)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        } else {
            "INSERT INTO ops (user_id, op_id, fingerprint, data, version, updated_ms, created_ms, refusal)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        };
        conn.prepare_cached(sql)?.execute(params![
            user,
            op.op_id.as_str(),
            op.fingerprint,
            record.data.to_string(),
            i64::try_from(record.version).unwrap_or(i64::MAX),
            record.updated_ms,
            from_ms,
            refusal,
        ])?;
        if in_log {
            self.index.add(self.index.hash(user, op.op_id.as_str()), conn.last_insert_rowid());
        } else {
            self.in_table = true;
        }
        Ok(())
    }

    /// Forgets op ids created before `cutoff_ms`, in both places; returns whether `ops` still
    /// holds any. The log is in creation order, so its expired rows are at its front; after
    /// the clock was set back, rows behind a later-stamped one wait for it to expire.
    fn prune(&mut self, conn: &Connection, cutoff_ms: i64) -> rusqlite::Result<bool> {
        conn.execute("DELETE FROM ops WHERE created_ms < ?1", params![cutoff_ms])?;
        let mut last = None;
        {
            let mut stmt =
                conn.prepare_cached("SELECT id, user_id, op_id, created_ms FROM op_log ORDER BY id")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                if row.get::<_, i64>(3)? >= cutoff_ms {
                    break;
                }
                let id = row.get(0)?;
                self.index.remove(self.index.hash(&row.get::<_, String>(1)?, &row.get::<_, String>(2)?), id);
                last = Some(id);
            }
        }
        if let Some(last) = last {
            conn.prepare_cached("DELETE FROM op_log WHERE id <= ?1")?.execute(params![last])?;
        }
        any_in_table(conn)
    }
}

/// Whether `ops`, the table by user, holds any op id.
fn any_in_table(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row("SELECT EXISTS (SELECT 1 FROM ops)", [], |r| r.get(0))
}

/// An op id's row as stored: its record's data still as text.
struct StoredOp {
    fingerprint: String,
    data: String,
    version: i64,
    updated_ms: Option<i64>,
    refusal: Option<String>,
}

impl StoredOp {
    /// Reads the five columns from `first` on: fingerprint, data, version, updated_ms, refusal.
    fn from_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<StoredOp> {
        Ok(StoredOp {
            fingerprint: row.get(first)?,
            data: row.get(first + 1)?,
            version: row.get(first + 2)?,
            updated_ms: row.get(first + 3)?,
            refusal: row.get(first + 4)?,
        })
    }

    fn parse(self) -> Result<SeenOp, StoreError> {
        Ok(SeenOp {
            fingerprint: self.fingerprint,
            record: Record {
                data: parse_data(&self.data)?,
                version: version_of(self.version),
                updated_ms: self.updated_ms,
            },
            refusal: self.refusal,
        })
    }
}

/// The writer's transaction, as the rules see it.
struct SqliteTx<'a> {
    conn: &'a Connection,
    ops: &'a mut OpIds,
    /// Where each record written is told as a change, when the hub streams them.
    made: Option<&'a mut Vec<ChangeEvent>>,
    /// The last change's position, moved on by each record written.
    position: &'a mut Position,
    /// The last feed position drawn, moved on by each record written, and not moved back
    /// when the write is rolled back.
    feed_seq: &'a mut i64,
}

impl Tx for SqliteTx<'_> {
    fn find_op(&mut self, user: &UserId, op_id: &OpId) -> Result<Option<SeenOp>, StoreError> {
        self.ops.find(self.conn, user.as_str(), op_id.as_str())
    }

    fn remember_op(
        &mut self,
        user: &UserId,
        op: &OpKey,
        record: &Record,
        refusal: Option<&str>,
        from_ms: i64,
    ) -> Result<(), StoreError> {
        self.ops.remember(self.conn, user.as_str(), op, record, refusal, from_ms)
    }

    /// Every write goes through the one writer, so reading is locking here.
    fn read_record(&mut self, user: &UserId, data_type: DataType) -> Result<(Record, Credits), StoreError> {
        read_for_write(self.conn, user.as_str(), data_type)
    }

    fn put_record(
        &mut self,
        user: &UserId,
        data_type: DataType,
        record: &Record,
        credits: Option<&Credits>,
        origin: Option<&SiteId>,
    ) -> Result<(), StoreError> {
        let credits = credits
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Malformed(e.to_string()))?;
        let data = record.data.to_string();
        *self.feed_seq += 1;
        self.conn
            .prepare_cached(
                "INSERT INTO records (user_id, data_type, data, version, updated_ms, credits, feed_seq, origin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (user_id, data_type)
                 DO UPDATE SET data = ?3, version = ?4, updated_ms = ?5, credits = COALESCE(?6, credits),
                     feed_seq = ?7, origin = ?8",
            )?
            .execute(params![
                user.as_str(),
                data_type.as_str(),
                data,
                i64::try_from(record.version).unwrap_or(i64::MAX),
                record.updated_ms,
                credits,
                *self.feed_seq,
                origin.map(SiteId::as_str),
            ])?;
        self.conn
            .prepare_cached("INSERT INTO feed_log (seq, user_id, data_type) VALUES (?1, ?2, ?3)")?
            .execute(params![*self.feed_seq, user.as_str(), data_type.as_str()])?;
        if let Some(made) = self.made.as_deref_mut() {
            self.position.seq += 1;
            made.push(ChangeEvent {
                position: *self.position,
                user: user.clone(),
                data_type,
                version: record.version,
                updated_ms: record.updated_ms.unwrap_or_default(),
                data: ChangeEvent::inline(data),
            });
        }
        Ok(())
    }

    fn append_ledger(&mut self, row: LedgerRow<'_>) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO ledger (user_id, data_type, site_id, op_id, delta, result, version, reason, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                row.user.as_str(),
                row.data_type.as_str(),
                row.site.as_str(),
                row.op_id.map(OpId::as_str),
                row.entry.delta,
                row.entry.result,
                i64::try_from(row.version).unwrap_or(i64::MAX),
                row.entry.reason,
                row.at_ms,
            ])?;
        Ok(())
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StoreError::Busy(e.to_string())
            }
            _ => StoreError::Database(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use protocol::{OpId, SiteId};
    use serde_json::json;

    use super::*;
    use crate::store::{Change, Current, LedgerEntry, Rejection};

    fn delta(op_id: &str, amount: i64, reason: &str) -> Write {
        let reason = reason.to_owned();
        Write {
            user: UserId::parse("alice").unwrap(),
            data_type: DataType::Balance,
            site: SiteId::parse("roflfaucet").unwrap(),
            origin: None,
            op: Some(OpKey { op_id: OpId::parse(op_id).unwrap(), fingerprint: amount.to_string() }),
            mutation: Arc::new(move |current: Current<'_>| {
                let coins = current.record.data["coins"].as_i64().unwrap_or(0) + amount;
                let ledger = LedgerEntry { delta: amount, result: coins, reason: Some(reason.clone()) };
                Ok(Change { data: json!({ "coins": coins }), ledger: Some(ledger), credits: None })
            }),
        }
    }

    const DAY: i64 = 86_400_000;
    const RETENTION: i64 = 30 * DAY;
    /// 2026-12-06T00:00:00Z.
    const T: i64 = 1_796_515_200_000;

    /// A clock the test sets: the wall clock and the time that passed, apart.
    #[derive(Debug, Default)]
    struct TestClock {
        wall: std::sync::atomic::AtomicI64,
        passed: std::sync::atomic::AtomicU64,
    }

    impl TestClock {
        fn at(wall: i64) -> Arc<TestClock> {
            let clock = TestClock::default();
            clock.wall.store(wall, std::sync::atomic::Ordering::SeqCst);
            Arc::new(clock)
        }

        /// Time passes: both clocks move.
        fn pass(&self, ms: i64) {
            self.wall.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
            self.passed.fetch_add(u64::try_from(ms).unwrap(), std::sync::atomic::Ordering::SeqCst);
        }

        /// Someone sets the wall clock; no time passes.
        fn set_wall(&self, ms: i64) {
            self.wall.store(ms, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Clock for TestClock {
        fn now_ms(&self) -> i64 {
            self.wall.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn monotonic_ms(&self) -> u64 {
            self.passed.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// A UUIDv7 op id dated `ms`.
    fn uuid7(ms: i64, n: u16) -> String {
        let hex = format!("{ms:012x}");
        format!("{}-{}-7000-8000-{n:012x}", &hex[..8], &hex[8..])
    }

    fn outcome(writer: &mut Writer, write: Write) -> WriteOutcome {
        writer.commit_batch(vec![write]).remove(0).unwrap()
    }

    fn writer(dir: &Path) -> Writer {
        writer_at(dir, TestClock::at(T))
    }

    fn writer_at(dir: &Path, clock: Arc<TestClock>) -> Writer {
        let mut conn = Connection::open(dir.join(DB_FILE)).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        migrations().to_latest(&mut conn).unwrap();
        let ops = OpIds::load(&conn, 1000).unwrap();
        let horizon = clock.now_ms() - RETENTION;
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('op_horizon_ms', ?1)",
            params![horizon.to_string()],
        )
        .unwrap();
        Writer {
            conn,
            horizon: Horizon::new(horizon, RETENTION, clock.monotonic_ms()),
            clock,
            last_prune: None,
            since_checkpoint: 0,
            max_batch: MAX_BATCH,
            ops,
            ops_unknown: false,
            stamps: Arc::new(StampCache::new(100)),
            metrics: StoreMetrics::default(),
            own_metrics: SqliteMetrics::default(),
            changes: Arc::new(Publisher::default()),
            made: Vec::new(),
            position: Position::default(),
            feed_seq: 0,
            swept: 0,
            since_sweep: 0,
        }
    }

    #[test]
    fn records_written_before_the_feed_take_positions_in_the_order_of_their_last_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        // Version 5: the schema before the feed.
        migrations().to_version(&mut conn, 5).unwrap();
        for (user, data_type, updated_ms) in
            [("bob", "balance", 300), ("ann", "profile", 100), ("ann", "balance", 200)]
        {
            conn.execute(
                "INSERT INTO records (user_id, data_type, data, version, updated_ms) VALUES (?1, ?2, '{}', 1, ?3)",
                params![user, data_type, updated_ms],
            )
            .unwrap();
        }
        migrations().to_latest(&mut conn).unwrap();

        let read = feed::read(&conn, FeedPosition::default(), &DataType::ALL, 10).unwrap();
        let listed: Vec<_> =
            read.iter().map(|c| (c.position.seq, c.user.as_str(), c.data_type, c.origin.clone())).collect();
        assert_eq!(
            listed,
            [
                (1, "ann", DataType::Profile, None),
                (2, "ann", DataType::Balance, None),
                (3, "bob", DataType::Balance, None)
            ]
        );
        assert_eq!(feed::last_seq(&conn).unwrap(), 3, "the writer goes on after them");
    }

    #[test]
    fn the_writers_sweeps_keep_one_row_of_the_feeds_log_per_record_and_the_feed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path());
        let log_rows = |writer: &Writer| -> i64 {
            writer.conn.query_row("SELECT count(*) FROM feed_log", [], |r| r.get(0)).unwrap()
        };
        // One record written 5,000 times: 5,000 rows appended, all but the last superseded.
        for batch in 0..10 {
            let writes = (0..500).map(|n| delta(&format!("w{batch}-{n}"), 1, "")).collect();
            assert!(writer.commit_batch(writes).iter().all(Result::is_ok));
        }
        assert_eq!(log_rows(&writer), 5000);
        writer.sweep();
        assert_eq!(log_rows(&writer), 5000 - feed::SWEEP_ROWS, "one sweep looks at its rows only");
        writer.sweep();
        assert_eq!(log_rows(&writer), 1, "the record's current row stays");
        let listed = |writer: &Writer| -> Vec<(i64, String)> {
            feed::read(&writer.conn, FeedPosition::default(), &DataType::ALL, 10)
                .unwrap()
                .into_iter()
                .map(|c| (c.position.seq, c.user.as_str().to_owned()))
                .collect()
        };
        assert_eq!(listed(&writer), [(5000, "alice".to_owned())]);

        // The sweeps start again from the log's start: what a later write supersedes goes too.
        outcome(&mut writer, delta("w-after", 1, ""));
        assert_eq!(listed(&writer), [(5001, "alice".to_owned())]);
        writer.sweep();
        assert_eq!(log_rows(&writer), 1);
        assert_eq!(feed::last_seq(&writer.conn).unwrap(), 5001);
    }

    #[test]
    fn a_batch_that_sqlite_rolls_back_whole_applies_none_of_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(dir.path());
        // The database may grow by a few pages only: a write that needs more fails with
        // "database or disk is full", and SQLite rolls back the whole transaction.
        let pages: i64 = writer.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        writer.conn.pragma_update(None, "max_page_count", pages + 8).unwrap();
        let too_big = "x".repeat(200_000);
        let results =
            writer.commit_batch(vec![delta("w1", 1, ""), delta("w2", 1, &too_big), delta("w3", 1, "")]);
        assert!(results.iter().all(Result::is_err), "{results:?}");
        let ledger: i64 = writer.conn.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0)).unwrap();
        assert_eq!(ledger, 0, "a write of the failed batch was committed");

        writer.conn.pragma_update(None, "max_page_count", 1_000_000).unwrap();
        let first = writer.commit_batch(vec![delta("w3", 1, "")]);
        assert!(matches!(first[0], Ok(WriteOutcome::Applied(_))), "{first:?}");
        let again = writer.commit_batch(vec![delta("w3", 1, "")]);
        assert!(matches!(again[0], Ok(WriteOutcome::Replayed(_))), "{again:?}");
    }

    #[test]
    fn an_unknown_op_dated_before_the_horizon_is_refused_and_a_forgotten_one_is_never_applied_again() {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(T);
        let mut writer = writer_at(dir.path(), clock.clone());
        let made_now = uuid7(T, 1);
        assert!(matches!(outcome(&mut writer, delta(&made_now, 5, "")), WriteOutcome::Applied(_)));
        // Older than the retention when it first arrives: refused, not applied.
        let too_old = uuid7(T - RETENTION - DAY, 2);
        assert!(matches!(
            outcome(&mut writer, delta(&too_old, 7, "")),
            WriteOutcome::Rejected(Rejection::OpExpired)
        ));
        // Made 29 days ago and arriving only now: applied, and remembered from its arrival.
        let late = uuid7(T - 29 * DAY, 3);
        assert!(matches!(outcome(&mut writer, delta(&late, 1, "")), WriteOutcome::Applied(_)));

        // Two days pass: the horizon is past `late`'s date, but `late` is remembered.
        clock.pass(2 * DAY);
        assert!(matches!(outcome(&mut writer, delta(&late, 1, "")), WriteOutcome::Replayed(_)));
        // Thirty more: both are forgotten, and neither is applied again.
        clock.pass(30 * DAY);
        assert!(matches!(outcome(&mut writer, delta("undated", 1, "")), WriteOutcome::Applied(_)));
        for op in [&made_now, &late] {
            assert!(matches!(
                outcome(&mut writer, delta(op, 1, "")),
                WriteOutcome::Rejected(Rejection::OpExpired)
            ));
        }
        let coins = |w: &Writer| -> String {
            w.conn.query_row("SELECT data FROM records WHERE user_id = 'alice'", [], |r| r.get(0)).unwrap()
        };
        assert_eq!(coins(&writer), r#"{"coins":7}"#, "5 + 1 + 1, each once");
    }

    #[test]
    fn a_clock_set_forward_does_not_make_the_store_forget_early() {
        let dir = tempfile::tempdir().unwrap();
        let clock = TestClock::at(T);
        let mut writer = writer_at(dir.path(), clock.clone());
        let op = uuid7(T, 1);
        assert!(matches!(outcome(&mut writer, delta(&op, 5, "")), WriteOutcome::Applied(_)));
        // The wall clock jumps two months ahead; eleven minutes pass (a prune is due).
        clock.set_wall(T + 60 * DAY);
        clock.pass(11 * 60 * 1000);
        assert!(matches!(outcome(&mut writer, delta("undated", 1, "")), WriteOutcome::Applied(_)));
        let stored: String = writer
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'op_horizon_ms'", [], |r| r.get(0))
            .unwrap();
        let moved_by_time_passed = T - RETENTION + 11 * 60 * 1000;
        assert_eq!((writer.horizon.ms, stored), (moved_by_time_passed, moved_by_time_passed.to_string()));
        // The op is still remembered: its copy replays.
        assert!(matches!(outcome(&mut writer, delta(&op, 5, "")), WriteOutcome::Replayed(_)));
        // An op dated a month ago is still within what the store remembers.
        let month_old = uuid7(T - 29 * DAY, 2);
        assert!(matches!(outcome(&mut writer, delta(&month_old, 1, "")), WriteOutcome::Applied(_)));
    }
}
