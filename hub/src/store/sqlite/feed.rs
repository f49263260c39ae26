//! SQLite's feed (see [`crate::store::feed`]).
//!
//! A record's feed position is `(0, feed_seq)`: the writer draws `feed_seq` from a counter
//! it keeps in memory (loaded at open from the greatest one stored) for each record it
//! writes, and commits a batch at a time, one writer after another, so a position is
//! greater than every position committed before it and every change a reader sees can no
//! longer be overtaken. A write rolled back leaves a gap, never a position used twice.

use protocol::{DataType, SiteId, UserId};
use rusqlite::{Connection, params};

use super::{data_type_of, version_of};
use crate::store::{FeedChange, FeedPosition, INLINE_DATA_BYTES, StoreError};

/// Where the writer's counter of feed positions starts at open: after the last one stored.
pub(super) fn last_seq(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(feed_seq), 0) FROM records", [], |r| r.get(0))
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
        "SELECT feed_seq, user_id, data_type, version, updated_ms, origin,
                CASE WHEN octet_length(data) <= ?3 THEN data END
         FROM records
         WHERE feed_seq > ?1 AND data_type IN (SELECT value FROM json_each(?2))
         ORDER BY feed_seq
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
