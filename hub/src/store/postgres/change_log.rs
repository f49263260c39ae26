//! The change log: how a change committed through one hub instance reaches the event streams
//! of every instance. Each batch writes its changes into `change_log` inside its own
//! transaction (`postgres.rs`); once it has committed, its writer wakes this instance's log
//! reader ([`Signal::committed`]), which reads the log at once and tells the other instances
//! with one `NOTIFY`, on a connection of its own and never inside a write transaction: a
//! transaction that notifies takes a lock of the whole database at its commit, which would
//! queue every writer behind the one notifying. Every instance's reader listens, and reads
//! the log when told, when woken by its own writers, after its connection comes back, and
//! every [`READ_EVERY`] anyway: a notification lost (its instance crashed between its commit
//! and its `NOTIFY`, or this reader's connection was away) makes a change late, never missing.
//!
//! Order. A row's position is drawn when it is inserted, not when its transaction commits, so
//! rows become visible out of position order. The reader delivers only the rows of
//! transactions whose ids are below its snapshot's `xmin` — every transaction with a smaller
//! id has ended, so none of their rows can appear later — in order of (transaction id,
//! position), which is each change's [`Position`], the same on every instance; then its
//! cursor moves to that boundary. A transaction left open anywhere in the cluster, once it
//! has written, holds every later change back until it ends. Two batches can take their ids
//! in one order and a record's lock in the other: that record's later version is then
//! published before its earlier one, and a page keeps the newer version it has (each change
//! carries its version).
//!
//! The writers keep the log to [`KEEP_FOR`] or [`KEEP_ROWS`] ([`Retention`]); [`between`]
//! answers `None` for a resume from before what it keeps. Nothing here writes a change.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use protocol::{DataType, UserId};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Row, Statement};

use super::SWEEP_CHUNK;
use super::client::{Client, Database};
use crate::store::{ChangeEvent, Changes, Position, Publisher, StoreError};

/// The `application_name` of each instance's connection to the change log (its reader's, which
/// also notifies the other instances), as `pg_stat_activity` shows it.
pub const LOG_READER_NAME: &str = "unified-sync hub changes";
/// How often the reader reads the log when nothing woke it: the most a change whose
/// notification was lost is late.
pub const READ_EVERY: Duration = Duration::from_secs(5);
/// How soon the reader reads again when committed changes wait behind an older transaction
/// still open, whose end may come with no notification (it may not be a hub's batch).
const READ_SOON: Duration = Duration::from_millis(15);
/// The least time between two rounds of the reader: the commits of a burst are told and read
/// in one notification and one read, and a busy instance reads and notifies at most 200 times
/// a second, each change waiting half of it on average.
const ROUND_GAP: Duration = Duration::from_millis(5);
/// Changes read by one statement at most; the reader reads again at once when it read as many.
const PAGE: i64 = 1000;
/// How long the reader waits before connecting again after it lost its connection, doubled
/// after each failure up to [`RECONNECT_MOST`].
const RECONNECT_FIRST: Duration = Duration::from_millis(250);
const RECONNECT_MOST: Duration = Duration::from_secs(5);
/// How long the log keeps a change: a stream that comes back within it, to any instance, gets
/// the changes it missed; one from before gets a resync.
pub const KEEP_FOR: Duration = Duration::from_secs(10 * 60);
/// Changes the log keeps at most (give or take those of [`MARK_EVERY_MS`]), so that a busy
/// deployment's log stays small: about 200 MB.
pub const KEEP_ROWS: i64 = 1_000_000;
/// How often (on the monotonic clock) an instance's writers mark where the log stands.
const MARK_EVERY_MS: u64 = 10_000;
/// A user's changes read for one resume at most: a client that missed more does one timestamp
/// check instead.
const CATCH_UP_MOST: i64 = 1000;

/// The boundary of the statement's snapshot: every transaction with a smaller id has ended.
const BOUNDARY: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT";
/// Listening and telling, on the channel every instance listens on.
const LISTEN: &str = "LISTEN hub_changes";
const NOTIFY: &str = "SELECT pg_notify('hub_changes', '')";
/// One snapshot's boundary, whether committed changes wait beyond it, where the log is kept
/// from, and the changes after the cursor (`$1`, `$2`) below the boundary, `$3` at most, in
/// order; one row with no change when none.
const READ: &str = "
    SELECT b.boundary, b.beyond, b.kept, c.xid, c.position, c.user_id, c.data_type, c.version,
           c.updated_ms, c.data
    FROM (
        SELECT s.boundary,
               EXISTS (SELECT 1 FROM change_log WHERE xid >= s.boundary) AS beyond,
               (SELECT value::BIGINT FROM meta WHERE key = 'change_log_kept_from') AS kept
        FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT AS boundary) s
    ) b
    LEFT JOIN LATERAL (
        SELECT xid, position, user_id, data_type, version, updated_ms, data FROM change_log
        WHERE (xid, position) > ($1, $2) AND xid < b.boundary
        ORDER BY xid, position
        LIMIT $3
    ) c ON true
    ORDER BY c.xid, c.position";
/// Where the log is kept from, and user `$1`'s changes after (`$2`, `$3`) up to (`$4`, `$5`),
/// `$6` at most, in order; one row with no change when none.
const BETWEEN: &str = "
    SELECT k.kept, c.xid, c.position, c.user_id, c.data_type, c.version, c.updated_ms, c.data
    FROM (SELECT value::BIGINT AS kept FROM meta WHERE key = 'change_log_kept_from') k
    LEFT JOIN LATERAL (
        SELECT xid, position, user_id, data_type, version, updated_ms, data FROM change_log
        -- A resume from before what the log keeps reads no row: it is told to resync anyway.
        WHERE $2 >= k.kept AND user_id = $1 AND (xid, position) > ($2, $3) AND (xid, position) <= ($4, $5)
        ORDER BY xid, position
        LIMIT $6
    ) c ON true
    ORDER BY c.xid, c.position";

/// How the instance's writers and its store reach its log reader.
#[derive(Debug, Default)]
pub(super) struct Signal {
    wake: Notify,
    /// Changes this instance committed that the other instances were not told of yet.
    untold: AtomicBool,
    closing: AtomicBool,
}

impl Signal {
    /// A batch that changed records has committed: the reader reads the log, and tells the
    /// other instances.
    pub(super) fn committed(&self) {
        self.untold.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The instance's side of the change log: its reader, on a thread of its own with a runtime
/// of its own (as the writers', and for the same reason), and the changes it publishes.
pub(super) struct ChangeLog {
    signal: Arc<Signal>,
    publisher: Arc<Publisher>,
    /// The log's boundary when the reader started: every change after it is published.
    start: Position,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ChangeLog {
    /// Starts the reader, once it has connected and read where the changes it publishes begin.
    pub(super) fn start(database: Database, signal: Arc<Signal>) -> Result<ChangeLog, StoreError> {
        let publisher = Arc::new(Publisher::default());
        let (opened, open_result) = std::sync::mpsc::channel();
        let reader = Reader {
            database,
            signal: signal.clone(),
            publisher: publisher.clone(),
            cursor: Position::default(),
        };
        let thread = std::thread::Builder::new()
            .name("store-changes".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = opened.send(Err(StoreError::Open(format!(
                            "cannot start the change log's runtime: {e}"
                        ))));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let mut reader = reader;
                    match reader.begin().await {
                        Ok(conn) => {
                            let _ = opened.send(Ok(reader.cursor));
                            reader.run(Some(conn)).await;
                        }
                        Err(e) => {
                            let _ = opened.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| StoreError::Open(format!("cannot start the change log's reader: {e}")))?;
        let start = open_result.recv().unwrap_or_else(|_| {
            Err(StoreError::Open("the change log's reader stopped while opening".into()))
        });
        match start {
            Ok(start) => Ok(ChangeLog { signal, publisher, start, thread: Mutex::new(Some(thread)) }),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// The changes from the reader's start on, once.
    pub(super) fn take(&self) -> Option<Changes> {
        let changes = self.publisher.take(self.start)?;
        self.signal.wake.notify_one();
        Some(changes)
    }

    /// Stops the reader, after it told the other instances of what it has not yet if its
    /// connection is up.
    pub(super) async fn close(&self) {
        self.signal.closing.store(true, Ordering::Release);
        self.signal.wake.notify_one();
        let thread = self.thread.lock().expect("the change log's reader").take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for ChangeLog {
    fn drop(&mut self) {
        self.signal.closing.store(true, Ordering::Release);
        self.signal.wake.notify_one();
    }
}

/// The reader of the log: where it stands, and whom it publishes to.
struct Reader {
    database: Database,
    signal: Arc<Signal>,
    publisher: Arc<Publisher>,
    /// Every change up to it was published (once the changes were taken).
    cursor: Position,
}

/// The reader's connection.
struct Conn {
    client: tokio_postgres::Client,
    read: Statement,
    /// Whether it listens to the other instances: from when the changes are taken.
    listening: bool,
}

/// What one statement read of the log.
struct Page {
    changes: Vec<ChangeEvent>,
    /// Where the cursor goes.
    next: Position,
    /// Whether the statement read as many changes as it may: more may follow at once.
    full: bool,
    /// Whether committed changes wait beyond the boundary.
    beyond: bool,
}

impl Reader {
    /// Connects, and starts the cursor at the log's boundary.
    async fn begin(&mut self) -> Result<Conn, StoreError> {
        let conn = self.connect().await?;
        let boundary: i64 = bounded(&self.database, conn.client.query_one(BOUNDARY, &[])).await?.get(0);
        self.cursor = Position { era: unsigned(boundary), seq: 0 };
        Ok(conn)
    }

    /// A connection whose notifications from other instances wake the reader, as does its end.
    async fn connect(&self) -> Result<Conn, StoreError> {
        let mut config = self.database.config.clone();
        config.application_name(LOG_READER_NAME);
        let (client, mut connection) =
            bounded(&self.database, config.connect(self.database.tls.clone())).await?;
        let own_pid = Arc::new(AtomicI32::new(0));
        let (signal, own) = (self.signal.clone(), own_pid.clone());
        tokio::spawn(async move {
            while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                // Its own notifications come back to it: the reader read when it sent them.
                if let AsyncMessage::Notification(from) = message
                    && from.process_id() != own.load(Ordering::Relaxed)
                {
                    signal.wake.notify_one();
                }
            }
            signal.wake.notify_one();
        });
        let (read, pid) = bounded(&self.database, async {
            // The read is planned once: its plan depends on no value, and planning it costs the
            // database more than running it.
            client.batch_execute("SET plan_cache_mode = force_generic_plan").await?;
            let read = client.prepare(READ).await?;
            let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
            Ok((read, pid))
        })
        .await?;
        own_pid.store(pid, Ordering::Relaxed);
        Ok(Conn { client, read, listening: false })
    }

    /// Rounds until the store closes: tells the other instances of this one's commits, and
    /// once the changes are taken, reads the log; then waits to be woken, or for a read due.
    async fn run(mut self, mut conn: Option<Conn>) {
        let mut failures: u32 = 0;
        let mut retry_at: Option<Instant> = None;
        loop {
            let closing = self.signal.closing.load(Ordering::Acquire);
            let wanted = self.publisher.wanted() && !closing;
            let tell = self.signal.untold.swap(false, Ordering::AcqRel);
            let mut wait = READ_EVERY;
            if conn.as_ref().is_some_and(|c| c.client.is_closed()) {
                tracing::warn!("the change log's reader lost its connection; it connects again");
                conn = None;
                failures = 1;
                retry_at = Some(Instant::now() + RECONNECT_FIRST);
            }
            if conn.is_none() && (wanted || tell) && !closing {
                match retry_at {
                    Some(at) if Instant::now() < at => wait = at.saturating_duration_since(Instant::now()),
                    _ => match self.connect().await {
                        Ok(connected) => {
                            if failures > 0 {
                                tracing::info!("the change log's reader is connected to the database again");
                            }
                            (conn, failures, retry_at) = (Some(connected), 0, None);
                        }
                        Err(e) => {
                            if failures == 0 {
                                tracing::warn!(error = %e, "the change log's reader cannot reach the database");
                            }
                            failures += 1;
                            wait = backoff(failures);
                            retry_at = Some(Instant::now() + wait);
                        }
                    },
                }
            }
            match conn.as_mut() {
                Some(connected) => match self.round(connected, wanted, tell).await {
                    Ok(true) => wait = READ_SOON,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the change log's reader failed; it reads again soon");
                        self.signal.untold.fetch_or(tell, Ordering::AcqRel);
                        if matches!(e, StoreError::Unavailable(_)) {
                            conn = None;
                            failures = 1;
                            retry_at = Some(Instant::now() + RECONNECT_FIRST);
                        }
                        wait = RECONNECT_FIRST;
                    }
                },
                None => {
                    self.signal.untold.fetch_or(tell, Ordering::AcqRel);
                }
            }
            if closing {
                return;
            }
            let round_at = Instant::now();
            tokio::select! {
                () = self.signal.wake.notified() => tokio::time::sleep_until(round_at + ROUND_GAP).await,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Tells the other instances when `tell`, and reads the log when `wanted`, in one round
    /// trip; then reads on while pages come full. Whether to read again soon.
    async fn round(&mut self, conn: &mut Conn, wanted: bool, tell: bool) -> Result<bool, StoreError> {
        if wanted && !conn.listening {
            bounded(&self.database, conn.client.batch_execute(LISTEN)).await?;
            conn.listening = true;
        }
        let client = &conn.client;
        let notify = async {
            if tell {
                client.batch_execute(NOTIFY).await?;
            }
            Ok(())
        };
        let cursor = self.cursor;
        let read = async {
            if !wanted {
                return Ok(None);
            }
            client.query(&conn.read, &[&signed(cursor.era), &signed(cursor.seq), &PAGE]).await.map(Some)
        };
        let (told, mut rows) = bounded(&self.database, async {
            let (told, read): (Result<(), tokio_postgres::Error>, _) = tokio::join!(notify, read);
            Ok((told, read?))
        })
        .await?;
        told?;
        while let Some(read) = rows.take() {
            let page = self.page(&read)?;
            self.publisher.publish(page.changes);
            self.cursor = page.next;
            if !page.full {
                return Ok(page.beyond);
            }
            let cursor = self.cursor;
            rows = Some(
                bounded(
                    &self.database,
                    client.query(&conn.read, &[&signed(cursor.era), &signed(cursor.seq), &PAGE]),
                )
                .await?,
            );
        }
        Ok(false)
    }

    /// The changes `rows` of [`READ`] hold, and where the cursor goes after them.
    fn page(&self, rows: &[Row]) -> Result<Page, StoreError> {
        let first = rows
            .first()
            .ok_or_else(|| StoreError::Malformed("the change log's read returned no row".into()))?;
        let boundary: i64 = first.get(0);
        let beyond: bool = first.get(1);
        let kept: Option<i64> = first.get(2);
        if kept.is_some_and(|kept| self.cursor.era < unsigned(kept)) {
            tracing::error!(
                "the change log was pruned past this instance's reader, which was away longer than the log keeps \
                 changes: this instance's streams are told to resync"
            );
            self.publisher.lost();
        }
        let mut changes = Vec::with_capacity(rows.len());
        let (mut read, mut last) = (0, None);
        for row in rows {
            let Some((position, change)) = change_in(row, 3) else { continue };
            (read, last) = (read + 1, Some(position));
            match change {
                Ok(change) => changes.push(change),
                Err(e) => tracing::error!(error = %e, "a change in the change log is damaged; not streamed"),
            }
        }
        let full = read == PAGE;
        let next = match last {
            Some(last) if full => last,
            _ => self.cursor.max(Position { era: unsigned(boundary), seq: 0 }),
        };
        Ok(Page { changes, next, full, beyond })
    }
}

/// `user`'s changes after `after` up to `upto`, in order; `None` when the log no longer keeps
/// all of them, or holds more than a client should be sent rather than checking its records.
pub(super) async fn between(
    client: &deadpool_postgres::Client,
    user: &UserId,
    after: Position,
    upto: Position,
) -> Result<Option<Vec<ChangeEvent>>, StoreError> {
    let stmt = client.prepare_cached(BETWEEN).await?;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
        &user.as_str(),
        &signed(after.era),
        &signed(after.seq),
        &signed(upto.era),
        &signed(upto.seq),
        &(CATCH_UP_MOST + 1),
    ];
    let rows = client.query(&stmt, &params).await?;
    let first =
        rows.first().ok_or_else(|| StoreError::Malformed("meta holds no change_log_kept_from".into()))?;
    if after.era < unsigned(first.get(0)) {
        return Ok(None);
    }
    let changes = rows
        .iter()
        .filter_map(|row| change_in(row, 1))
        .map(|(_, change)| change)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((changes.len() as i64 <= CATCH_UP_MOST).then_some(changes))
}

/// The change in `row`'s columns from `at` on (xid, position, user_id, data_type, version,
/// updated_ms, data), with its position; `None` for the one row that holds no change.
fn change_in(row: &Row, at: usize) -> Option<(Position, Result<ChangeEvent, StoreError>)> {
    let xid: Option<i64> = row.get(at);
    let position = Position { era: unsigned(xid?), seq: unsigned(row.get(at + 1)) };
    let (user, data_type): (&str, &str) = (row.get(at + 2), row.get(at + 3));
    let change = UserId::parse(user)
        .map_err(|_| StoreError::Malformed(format!("user_id {user:?} in change_log")))
        .and_then(|user| {
            let data_type = DataType::parse(data_type)
                .map_err(|_| StoreError::Malformed(format!("data_type {data_type:?} in change_log")))?;
            Ok(ChangeEvent {
                position,
                user,
                data_type,
                version: unsigned(row.get(at + 4)),
                updated_ms: row.get(at + 5),
                data: row.get(at + 6),
            })
        });
    Some((position, change))
}

/// Keeping the log to [`KEEP_FOR`] or [`KEEP_ROWS`], done by the writers between batches,
/// one of an instance's at a time. Every [`MARK_EVERY_MS`] they mark the log's boundary and
/// the last position drawn; once a mark is older than [`KEEP_FOR`], or [`KEEP_ROWS`] positions
/// were drawn since, the rows of transactions below its boundary are deleted, a chunk at a
/// time, after `meta.change_log_kept_from` says so (in its own statement, first, so that a
/// resume never finds part of what it missed). An instance that starts marks afresh; any
/// instance's writers prune what is due.
#[derive(Debug, Default)]
pub(super) struct Retention {
    marks: VecDeque<Mark>,
    /// When the next mark is due; `None`: at the next batch.
    next_mark: Option<u64>,
    /// The boundary below which rows are deleted.
    cut: i64,
    /// Whether rows below `cut` may be left.
    unswept: bool,
    /// Whether they are being deleted now, a chunk after each batch.
    sweeping: bool,
}

/// Where the log stood at a moment.
#[derive(Debug)]
struct Mark {
    /// When, on the monotonic clock.
    at: u64,
    /// The boundary then: rows below it were committed before `at`.
    boundary: i64,
    /// The last position drawn then.
    last: i64,
}

impl Retention {
    /// Whether rows are being deleted, a chunk after each batch.
    pub(super) fn sweeping(&self) -> bool {
        self.sweeping
    }

    /// One step: a chunk deleted while sweeping; otherwise, when a mark is due, a mark, and
    /// the cut moved to the newest mark that is due to go.
    pub(super) fn step(&mut self, client: &Client, monotonic: u64) -> Result<(), StoreError> {
        if self.sweeping {
            let deleted = client.execute(
                "DELETE FROM change_log WHERE (xid, position) IN
                     (SELECT xid, position FROM change_log WHERE xid < $1
                      ORDER BY xid, position LIMIT $2 FOR UPDATE SKIP LOCKED)",
                &[&self.cut, &SWEEP_CHUNK],
            )?;
            self.sweeping = deleted == SWEEP_CHUNK as u64;
            self.unswept = self.sweeping;
            return Ok(());
        }
        if self.next_mark.is_some_and(|at| monotonic < at) {
            return Ok(());
        }
        self.next_mark = Some(monotonic + MARK_EVERY_MS);
        let row = client.query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT,
                    (SELECT last_value FROM change_log_position_seq)",
            &[],
        )?;
        let (boundary, last): (i64, i64) = (row.get(0), row.get(1));
        self.marks.push_back(Mark { at: monotonic, boundary, last });
        let keep_for_ms = u64::try_from(KEEP_FOR.as_millis()).unwrap_or(u64::MAX);
        let mut due = None;
        while self.marks.front().is_some_and(|mark| {
            monotonic.saturating_sub(mark.at) >= keep_for_ms || last - mark.last >= KEEP_ROWS
        }) {
            due = self.marks.pop_front();
        }
        if let Some(mark) = due.filter(|mark| mark.boundary > self.cut) {
            client.execute(
                "UPDATE meta SET value = $1::BIGINT::TEXT
                 WHERE key = 'change_log_kept_from' AND value::BIGINT < $1::BIGINT",
                &[&mark.boundary],
            )?;
            self.cut = mark.boundary;
            self.unswept = true;
        }
        self.sweeping = self.unswept;
        Ok(())
    }

    /// After a step failed: the sweep, if any, goes on from the next mark.
    pub(super) fn failed(&mut self) {
        self.sweeping = false;
    }
}

/// Runs `call`, waiting at most as long as the database is given to answer.
async fn bounded<T>(
    database: &Database,
    call: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    let deadline = database.answer_deadline();
    match tokio::time::timeout(deadline, call).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(StoreError::Unavailable(format!(
            "the database did not answer within {:.1} s",
            deadline.as_secs_f64()
        ))),
    }
}

/// How long to wait before connecting again after `failures` failures in a row.
fn backoff(failures: u32) -> Duration {
    RECONNECT_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(8)).min(RECONNECT_MOST)
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
