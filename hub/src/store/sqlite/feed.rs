//! SQLite's feed and webhook queues (see [`crate::store::feed`]).
//!
//! A record's feed position is `(0, feed_seq)`: the writer draws `feed_seq` from a counter
//! it keeps in memory (loaded at open from the greatest one stored) for each record it
//! writes, and commits a batch at a time, one writer after another, so a position is
//! greater than every position committed before it and every change a reader sees can no
//! longer be overtaken. A write rolled back leaves a gap, never a position used twice.
//!
//! The order is kept by `feed_log`, appended at its end by each write (its `seq` is the
//! position): reading it after a position, joined to `records` on the record's current
//! `feed_seq`, gives each record once, at its latest change; a row a later write of its
//! record superseded joins nothing. The writer sweeps such rows away every [`SWEEP_EVERY`]
//! writes ([`sweep`]), looking at twice as many rows, so the log holds about a row per
//! record, and at most about twice as many.
//!
//! The webhook queues are written through a connection of their own, not through the
//! writer: the writer's queue carries the users' writes (and only those, in both stores), and
//! their bookkeeping is a few short transactions a second at most. Both connections wait for
//! the lock (a busy timeout) rather than fail, so a webhook transaction only delays the
//! writer's next batch by its own length, a millisecond or so, and never fails a user's
//! write. A transfer or a claim with nothing to do answers from a read, without taking the
//! lock at all. The webhook connection commits with `synchronous=NORMAL`: a commit lost with
//! the power only sends a notification again, or again later (the queue promises delivery at
//! least once), and an fsync of its own on every claim and settle would take the disk from
//! the users' writes.

use std::path::Path;
use std::time::Duration;

use protocol::{DataType, SiteId, UserId};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{data_type_of, open_database, version_of};
use crate::store::{
    FeedChange, FeedPosition, INLINE_DATA_BYTES, Pending, QueueStats, Settle, Settled, StoreError,
};

/// Where the writer's counter of feed positions starts at open: after the last one stored.
/// The log's last row is never swept: no later write superseded it.
pub(super) fn last_seq(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(seq), 0) FROM feed_log", [], |r| r.get(0))
}

/// Rows of the log one sweep looks at, at most…
pub(super) const SWEEP_ROWS: i64 = 4096;
/// …after this many writes: twice as many rows as were appended, so that the sweeps keep up
/// with the writes and the log holds at most about twice a row per record.
pub(super) const SWEEP_EVERY: usize = 2048;

/// Deletes the superseded rows among the [`SWEEP_ROWS`] after `from`, in one transaction of
/// the writer's; where the next sweep starts (the start again, once it reached the end).
pub(super) fn sweep(conn: &mut Connection, from: i64) -> rusqlite::Result<i64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (last, seen): (Option<i64>, i64) = tx.query_row(
        "SELECT max(seq), count(*) FROM (SELECT seq FROM feed_log WHERE seq > ?1 ORDER BY seq LIMIT ?2)",
        params![from, SWEEP_ROWS],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let Some(last) = last else {
        return Ok(0);
    };
    tx.prepare_cached(
        "DELETE FROM feed_log
         WHERE seq > ?1 AND seq <= ?2
           AND NOT EXISTS (SELECT 1 FROM records AS r
                           WHERE r.user_id = feed_log.user_id AND r.data_type = feed_log.data_type
                             AND r.feed_seq = feed_log.seq)",
    )?
    .execute(params![from, last])?;
    tx.commit()?;
    Ok(if seen < SWEEP_ROWS { 0 } else { last })
}

/// The `feed_seq` after which `after` is followed by every stored position, all at xid 0;
/// `None` when none follows it.
fn seq_after(after: FeedPosition) -> Option<i64> {
    match after.xid.cmp(&0) {
        std::cmp::Ordering::Less => Some(i64::MIN),
        std::cmp::Ordering::Equal => Some(after.seq),
        std::cmp::Ordering::Greater => None,
    }
}

/// `types` as the JSON array the queries' `json_each` reads.
fn type_names(types: &[DataType]) -> String {
    serde_json::Value::from(types.iter().map(|t| t.as_str()).collect::<Vec<_>>()).to_string()
}

fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn user_of(s: &str) -> Result<UserId, StoreError> {
    UserId::parse(s).map_err(|_| StoreError::Malformed(format!("unknown user_id {s:?} stored")))
}

fn site_of(s: &str) -> Result<SiteId, StoreError> {
    SiteId::parse(s).map_err(|_| StoreError::Malformed(format!("unknown site {s:?} stored")))
}

/// Records' latest changes after `after`, of `types`, `limit` at most, in feed order.
pub(super) fn read(
    conn: &Connection,
    after: FeedPosition,
    types: &[DataType],
    limit: usize,
) -> Result<Vec<FeedChange>, StoreError> {
    let Some(after) = seq_after(after).filter(|_| !types.is_empty()) else {
        return Ok(Vec::new());
    };
    let mut stmt = conn.prepare_cached(
        "SELECT f.seq, r.user_id, r.data_type, r.version, r.updated_ms, r.origin,
                CASE WHEN octet_length(r.data) <= ?3 THEN r.data END
         FROM feed_log AS f
         CROSS JOIN records AS r
             ON r.user_id = f.user_id AND r.data_type = f.data_type AND r.feed_seq = f.seq
         WHERE f.seq > ?1 AND f.data_type IN (SELECT value FROM json_each(?2))
         ORDER BY f.seq
         LIMIT ?4",
    )?;
    let mut rows =
        stmt.query(params![after, type_names(types), limit_of(INLINE_DATA_BYTES), limit_of(limit)])?;
    let mut changes = Vec::new();
    while let Some(row) = rows.next()? {
        changes.push(FeedChange {
            position: FeedPosition { xid: 0, seq: row.get(0)? },
            user: user_of(&row.get::<_, String>(1)?)?,
            data_type: data_type_of(&row.get::<_, String>(2)?)?,
            version: version_of(row.get(3)?),
            updated_ms: row.get(4)?,
            origin: row.get::<_, Option<String>>(5)?.as_deref().map(site_of).transpose()?,
            data: row.get(6)?,
        });
    }
    Ok(changes)
}

/// Where the feed ends: the last position committed.
pub(super) fn end(conn: &Connection) -> Result<FeedPosition, StoreError> {
    Ok(FeedPosition { xid: 0, seq: last_seq(conn)? })
}

/// The connection the webhook queues are written through.
pub(super) fn open_webhooks(path: &Path) -> Result<Connection, StoreError> {
    let conn = open_database(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // The writer checkpoints between its batches; these commits go into the WAL it copies.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

fn immediate(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

/// `site`'s cursor in the feed, if it has one.
fn cursor(conn: &Connection, site: &SiteId) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT seq FROM webhook_cursors WHERE site = ?1")?
        .query_row(params![site.as_str()], |r| r.get(0))
        .optional()
}

/// A change as a transfer reads it: enough to queue it.
struct Moved {
    seq: i64,
    user_id: String,
    data_type: String,
    version: i64,
    origin: Option<String>,
}

/// Up to `limit` changes of `types` after `after`, as a transfer reads them.
fn to_move(conn: &Connection, after: i64, types: &[DataType], limit: usize) -> rusqlite::Result<Vec<Moved>> {
    conn.prepare_cached(
        "SELECT f.seq, r.user_id, r.data_type, r.version, r.origin
         FROM feed_log AS f
         CROSS JOIN records AS r
             ON r.user_id = f.user_id AND r.data_type = f.data_type AND r.feed_seq = f.seq
         WHERE f.seq > ?1 AND f.data_type IN (SELECT value FROM json_each(?2))
         ORDER BY f.seq
         LIMIT ?3",
    )?
    .query_map(params![after, type_names(types), limit_of(limit)], |r| {
        Ok(Moved {
            seq: r.get(0)?,
            user_id: r.get(1)?,
            data_type: r.get(2)?,
            version: r.get(3)?,
            origin: r.get(4)?,
        })
    })?
    .collect()
}

/// See [`Store::webhook_transfer`](crate::store::Store::webhook_transfer).
pub(super) fn transfer(
    conn: &mut Connection,
    site: &SiteId,
    types: &[DataType],
    now_ms: i64,
    limit: usize,
) -> Result<usize, StoreError> {
    // Nothing written after the cursor: nothing to do, and the write lock is not taken.
    if let Some(after) = cursor(conn, site)?
        && last_seq(conn)? <= after
    {
        return Ok(0);
    }
    let tx = immediate(conn)?;
    let Some(after) = cursor(&tx, site)? else {
        tx.execute(
            "INSERT INTO webhook_cursors (site, xid, seq) VALUES (?1, 0, ?2)",
            params![site.as_str(), last_seq(&tx)?],
        )?;
        tx.commit()?;
        return Ok(0);
    };
    let end = last_seq(&tx)?;
    let moved = to_move(&tx, after, types, limit)?;
    // A short read read every change of the site's types up to the feed's end: the cursor
    // moves there, so that the next transfer does not step again over other types' changes.
    let next = match moved.last() {
        Some(last) if moved.len() >= limit => last.seq,
        _ => end,
    };
    {
        // A record already waiting takes the newer version, whose wait starts now (it is given
        // up `retry_for_secs` after this, not after the version it replaces), and keeps its
        // place: its attempts, when it is due (a failing site is not tried sooner for it), and
        // a lease on it (an older version being sent is settled before this one goes).
        let mut queue = tx.prepare_cached(
            "INSERT INTO webhook_queue
                 (site, user_id, data_type, version, queued_ms, attempts, due_ms, lease_until_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, ?5, 0)
             ON CONFLICT (site, user_id, data_type)
             DO UPDATE SET version = excluded.version, queued_ms = excluded.queued_ms
             WHERE excluded.version > webhook_queue.version",
        )?;
        for m in moved.iter().filter(|m| m.origin.as_deref() != Some(site.as_str())) {
            queue.execute(params![site.as_str(), m.user_id, m.data_type, m.version, now_ms])?;
        }
    }
    tx.execute("UPDATE webhook_cursors SET seq = ?2 WHERE site = ?1", params![site.as_str(), next])?;
    tx.commit()?;
    Ok(moved.len())
}

/// Up to `limit` of `site`'s notifications due at `now_ms` and not leased, longest due first,
/// with when each is due.
fn due(conn: &Connection, site: &SiteId, now_ms: i64, limit: usize) -> Result<Vec<Pending>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id, data_type, version, attempts, queued_ms FROM webhook_queue
         WHERE site = ?1 AND due_ms <= ?2 AND lease_until_ms <= ?2
         ORDER BY due_ms, queued_ms
         LIMIT ?3",
    )?;
    let mut rows = stmt.query(params![site.as_str(), now_ms, limit_of(limit)])?;
    let mut due = Vec::new();
    while let Some(row) = rows.next()? {
        due.push(Pending {
            user: user_of(&row.get::<_, String>(0)?)?,
            data_type: data_type_of(&row.get::<_, String>(1)?)?,
            version: version_of(row.get(2)?),
            attempts: u32::try_from(row.get::<_, i64>(3)?).unwrap_or(u32::MAX),
            queued_ms: row.get(4)?,
        });
    }
    Ok(due)
}

/// See [`Store::webhook_claim`](crate::store::Store::webhook_claim).
pub(super) fn claim(
    conn: &mut Connection,
    site: &SiteId,
    now_ms: i64,
    lease_ms: i64,
    limit: usize,
) -> Result<Vec<Pending>, StoreError> {
    if due(conn, site, now_ms, limit)?.is_empty() {
        return Ok(Vec::new());
    }
    let tx = immediate(conn)?;
    let claimed = due(&tx, site, now_ms, limit)?;
    {
        let mut lease = tx.prepare_cached(
            "UPDATE webhook_queue SET lease_until_ms = ?4 WHERE site = ?1 AND user_id = ?2 AND data_type = ?3",
        )?;
        for p in &claimed {
            lease.execute(params![
                site.as_str(),
                p.user.as_str(),
                p.data_type.as_str(),
                now_ms.saturating_add(lease_ms)
            ])?;
        }
    }
    tx.commit()?;
    Ok(claimed)
}

/// See [`Store::webhook_settle`](crate::store::Store::webhook_settle).
pub(super) fn settle(
    conn: &mut Connection,
    site: &SiteId,
    now_ms: i64,
    settled: &[Settled],
) -> Result<(), StoreError> {
    if settled.is_empty() {
        return Ok(());
    }
    let tx = immediate(conn)?;
    {
        let mut remove = tx.prepare_cached(
            "DELETE FROM webhook_queue WHERE site = ?1 AND user_id = ?2 AND data_type = ?3 AND version = ?4",
        )?;
        // A newer version replaced the one sent while it was on its way: it is due now.
        let mut newer_due = tx.prepare_cached(
            "UPDATE webhook_queue SET lease_until_ms = 0, attempts = 0, due_ms = ?4
             WHERE site = ?1 AND user_id = ?2 AND data_type = ?3",
        )?;
        let mut retry = tx.prepare_cached(
            "UPDATE webhook_queue SET attempts = attempts + 1, due_ms = ?4, lease_until_ms = 0
             WHERE site = ?1 AND user_id = ?2 AND data_type = ?3",
        )?;
        for s in settled {
            let key = (site.as_str(), s.user.as_str(), s.data_type.as_str());
            match s.settle {
                Settle::Delivered | Settle::Dropped => {
                    let version = i64::try_from(s.version).unwrap_or(i64::MAX);
                    if remove.execute(params![key.0, key.1, key.2, version])? == 0 {
                        newer_due.execute(params![key.0, key.1, key.2, now_ms])?;
                    }
                }
                Settle::Retry { at_ms } => {
                    retry.execute(params![key.0, key.1, key.2, at_ms])?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// See [`Store::webhook_stats`](crate::store::Store::webhook_stats).
pub(super) fn stats(conn: &Connection) -> Result<Vec<QueueStats>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT site, count(*), min(queued_ms) FROM webhook_queue GROUP BY site ORDER BY site",
    )?;
    let mut rows = stmt.query([])?;
    let mut stats = Vec::new();
    while let Some(row) = rows.next()? {
        stats.push(QueueStats {
            site: site_of(&row.get::<_, String>(0)?)?,
            queued: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
            oldest_queued_ms: row.get(2)?,
        });
    }
    Ok(stats)
}
