//! The feed and the webhook queues on PostgreSQL, for every hub instance on the database (what
//! they mean: `store/feed.rs`). Nothing here writes a record: each batch stamps the records it
//! writes with their position and origin (`postgres.rs`).
//!
//! Order. A record's position is `(feed_xid, feed_seq)`: the id of the transaction that wrote
//! it and a number drawn from `records_feed_seq` while it did, both before it commits, so rows
//! become visible out of position order. As the change log does (`change_log.rs`), and for the
//! same reason, the feed reads only the rows of transactions whose ids are below its
//! snapshot's `xmin`: every transaction with a smaller id has ended, so no row can appear
//! below that boundary later, and a reader that went past a position never finds a change
//! behind it. A transaction left open anywhere in the cluster, once it has an id, holds every
//! later change back until it ends. The records written before the feed existed sit at
//! transaction id 0, before every later change.
//!
//! Queues. A site's transfer locks its cursor row (`FOR UPDATE`) for one transaction: two
//! instances transferring for one site take turns, and each change moves into the queue once.
//! A claim takes due rows `FOR UPDATE SKIP LOCKED` and leases them until a time: another
//! instance's claim skips a row being claimed, and finds it leased once claimed.
//!
//! Every statement names one site, except the statistics and forgetting sites, over the queues
//! and cursors of every site (small tables: a row per record waiting, a row per site).

use protocol::{DataType, SiteId, UserId};
use tokio_postgres::types::ToSql;

use crate::store::{
    FeedChange, FeedPosition, INLINE_DATA_BYTES, Pending, QueueStats, Settle, Settled, StoreError,
};

/// The boundary of the statement's snapshot: every transaction with a smaller id has ended.
const BOUNDARY: &str = "SELECT pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT";
/// Records of the types `$3` after the position (`$1`, `$2`) and below the boundary, `$4` at
/// most, in position order, with their data when at most `$5` bytes long.
const READ: &str = "
    SELECT feed_xid, feed_seq, user_id, data_type, version, updated_ms, origin,
           CASE WHEN octet_length(data) <= $5::INTEGER THEN data END
    FROM records
    WHERE (feed_xid, feed_seq) > ($1, $2)
      AND feed_xid < pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT
      AND data_type = ANY($3::TEXT[])
    ORDER BY feed_xid, feed_seq
    LIMIT $4";
/// Site `$1`'s cursor, locked until the transfer's transaction ends.
const LOCK_CURSOR: &str = "SELECT xid, seq FROM webhook_cursors WHERE site = $1 FOR UPDATE";
/// Site `$1`'s cursor, at the feed's end. Two instances meeting the site at once both insert
/// it: the second's waits for the first's, then inserts nothing.
const START_CURSOR: &str = "
    INSERT INTO webhook_cursors (site, xid, seq)
    VALUES ($1, pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT - 1, 9223372036854775807)
    ON CONFLICT (site) DO NOTHING";
/// One transfer of site `$1`, its cursor (`$2`, `$3`) locked: reads up to `$5` records of the
/// types `$4` after the cursor and below the boundary; queues each not written by the site's
/// own backend at `$6`, replacing the version of a record waiting if older; then moves the
/// cursor past what it read, or to the boundary when it read fewer than it may (every change
/// before the boundary is read: the next transfer need not step over the other types' again).
/// Answers how many records it read.
const TRANSFER: &str = "
    WITH boundary AS MATERIALIZED (
        SELECT pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT AS xid
    ), read AS MATERIALIZED (
        SELECT user_id, data_type, version, origin, feed_xid, feed_seq FROM records
        WHERE (feed_xid, feed_seq) > ($2, $3)
          AND feed_xid < (SELECT xid FROM boundary)
          AND data_type = ANY($4::TEXT[])
        ORDER BY feed_xid, feed_seq
        LIMIT $5
    ), queued AS (
        INSERT INTO webhook_queue AS q
            (site, user_id, data_type, version, queued_ms, attempts, due_ms, lease_until_ms)
        SELECT $1, user_id, data_type, version, $6, 0, $6, 0 FROM read
        WHERE origin IS DISTINCT FROM $1
        ON CONFLICT (site, user_id, data_type)
        DO UPDATE SET version = EXCLUDED.version, queued_ms = EXCLUDED.queued_ms
            WHERE q.version < EXCLUDED.version
    ), next AS (
        SELECT CASE WHEN r.n < $5 THEN b.xid - 1 ELSE l.feed_xid END AS xid,
               CASE WHEN r.n < $5 THEN 9223372036854775807 ELSE l.feed_seq END AS seq
        FROM boundary b
        CROSS JOIN (SELECT count(*) AS n FROM read) r
        LEFT JOIN (SELECT feed_xid, feed_seq FROM read ORDER BY feed_xid DESC, feed_seq DESC LIMIT 1) l ON true
    ), moved AS (
        UPDATE webhook_cursors AS c SET xid = next.xid, seq = next.seq FROM next
        WHERE c.site = $1 AND (c.xid, c.seq) < (next.xid, next.seq)
    )
    SELECT count(*) FROM read";
/// Up to `$4` of site `$1`'s notifications due at `$2` and not leased, the longest due first,
/// leased for `$3` ms. A row another claim is taking is skipped, and found leased once taken.
/// The rows are named by where they lie (`ctid`), which the ones locked keep until this
/// statement's transaction ends, and taken once (an init plan): the update then reads just
/// them whatever the planner guesses the limit to be (a plan kept for every limit thought it
/// large and read the whole queue).
const CLAIM: &str = "
    UPDATE webhook_queue SET lease_until_ms = $2 + $3
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM webhook_queue
        WHERE site = $1 AND due_ms <= $2 AND lease_until_ms <= $2
        ORDER BY due_ms, queued_ms
        LIMIT $4
        FOR UPDATE SKIP LOCKED
    ))
    RETURNING user_id, data_type, version, attempts, queued_ms, due_ms";
/// Site `$1`'s notifications sent and done with, each record (`$2`, `$3`) at the version sent
/// (`$4`): gone from the queue. A row holding a newer version stays, for [`REPLACED`].
const DONE: &str = "
    DELETE FROM webhook_queue AS q
    USING unnest($2::TEXT[], $3::TEXT[], $4::BIGINT[]) AS k (user_id, data_type, version)
    WHERE q.site = $1 AND q.user_id = k.user_id AND q.data_type = k.data_type AND q.version = k.version";
/// Of the records [`DONE`] was given, those whose row holds a newer version than was sent:
/// released, due at `$5`, counting no attempt. Run after [`DONE`], in a statement of its own:
/// it sees a newer version that a transfer committed while [`DONE`] waited for its row.
const REPLACED: &str = "
    UPDATE webhook_queue AS q SET lease_until_ms = 0, attempts = 0, due_ms = $5
    FROM unnest($2::TEXT[], $3::TEXT[], $4::BIGINT[]) AS k (user_id, data_type, version)
    WHERE q.site = $1 AND q.user_id = k.user_id AND q.data_type = k.data_type AND q.version > k.version";
/// Site `$1`'s notifications that failed, each record (`$2`, `$3`) tried again at `$4`.
const RETRY: &str = "
    UPDATE webhook_queue AS q SET attempts = q.attempts + 1, due_ms = k.at_ms, lease_until_ms = 0
    FROM unnest($2::TEXT[], $3::TEXT[], $4::BIGINT[]) AS k (user_id, data_type, at_ms)
    WHERE q.site = $1 AND q.user_id = k.user_id AND q.data_type = k.data_type";
const STATS: &str = "SELECT site, count(*), min(queued_ms) FROM webhook_queue GROUP BY site ORDER BY site";

/// The records of `types` changed after `after`, below the boundary, `limit` at most.
pub(super) async fn read(
    client: &deadpool_postgres::Client,
    after: FeedPosition,
    types: &[DataType],
    limit: usize,
) -> Result<Vec<FeedChange>, StoreError> {
    if types.is_empty() || limit == 0 {
        return Ok(Vec::new());
    }
    let stmt = client.prepare_cached(READ).await?;
    let inline = i32::try_from(INLINE_DATA_BYTES).unwrap_or(i32::MAX);
    let params: [&(dyn ToSql + Sync); 5] =
        [&after.xid, &after.seq, &type_names(types), &count(limit), &inline];
    client.query(&stmt, &params).await?.iter().map(change_in).collect()
}

/// Where the feed ends now: every change after it is of a transaction not ended at this
/// statement's snapshot, or one to come.
pub(super) async fn end(client: &deadpool_postgres::Client) -> Result<FeedPosition, StoreError> {
    let boundary: i64 = client.query_one(BOUNDARY, &[]).await?.get(0);
    Ok(FeedPosition { xid: boundary - 1, seq: i64::MAX })
}

/// Moves up to `limit` of `site`'s changes of `types` after its cursor into its queue, in one
/// transaction holding its cursor; a site met for the first time starts at the feed's end.
/// Answers how many it read.
pub(super) async fn transfer(
    client: &mut deadpool_postgres::Client,
    site: &SiteId,
    types: &[DataType],
    now_ms: i64,
    limit: usize,
) -> Result<usize, StoreError> {
    let tx = client.transaction().await?;
    let lock = tx.prepare_cached(LOCK_CURSOR).await?;
    let Some(cursor) = tx.query_opt(&lock, &[&site.as_str()]).await? else {
        tx.execute(START_CURSOR, &[&site.as_str()]).await?;
        tx.commit().await?;
        return Ok(0);
    };
    let (xid, seq): (i64, i64) = (cursor.get(0), cursor.get(1));
    let stmt = tx.prepare_cached(TRANSFER).await?;
    let params: [&(dyn ToSql + Sync); 6] =
        [&site.as_str(), &xid, &seq, &type_names(types), &count(limit), &now_ms];
    let read: i64 = tx.query_one(&stmt, &params).await?.get(0);
    tx.commit().await?;
    Ok(usize::try_from(read).unwrap_or(0))
}

/// Leases up to `limit` of `site`'s due notifications until `now_ms + lease_ms`, the longest
/// due first.
pub(super) async fn claim(
    client: &deadpool_postgres::Client,
    site: &SiteId,
    now_ms: i64,
    lease_ms: i64,
    limit: usize,
) -> Result<Vec<Pending>, StoreError> {
    let stmt = client.prepare_cached(CLAIM).await?;
    let rows = client.query(&stmt, &[&site.as_str(), &now_ms, &lease_ms, &count(limit)]).await?;
    let mut claimed = rows
        .iter()
        .map(|row| {
            let pending = Pending {
                user: user_of(row.get(0))?,
                data_type: data_type_of(row.get(1))?,
                version: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
                attempts: u32::try_from(row.get::<_, i32>(3)).unwrap_or(0),
                queued_ms: row.get(4),
            };
            Ok(((row.get::<_, i64>(5), pending.queued_ms), pending))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    claimed.sort_by_key(|(due, _)| *due);
    Ok(claimed.into_iter().map(|(_, pending)| pending).collect())
}

/// Records how `settled` ended for `site`, at `now_ms`: one round trip, its statements run one
/// after the other, each in a transaction of its own (none depends on another having run).
pub(super) async fn settle(
    client: &deadpool_postgres::Client,
    site: &SiteId,
    now_ms: i64,
    settled: &[Settled],
) -> Result<(), StoreError> {
    let (mut done, mut retried) = (Keys::default(), Keys::default());
    for one in settled {
        match one.settle {
            Settle::Delivered | Settle::Dropped => {
                done.push(one, i64::try_from(one.version).unwrap_or(i64::MAX));
            }
            Settle::Retry { at_ms } => retried.push(one, at_ms),
        }
    }
    let (done_stmt, replaced_stmt, retry_stmt) = tokio::try_join!(
        client.prepare_cached(DONE),
        client.prepare_cached(REPLACED),
        client.prepare_cached(RETRY)
    )?;
    let site = site.as_str();
    let done_params: [&(dyn ToSql + Sync); 4] = [&site, &done.users, &done.types, &done.values];
    let replaced_params: [&(dyn ToSql + Sync); 5] = [&site, &done.users, &done.types, &done.values, &now_ms];
    let retry_params: [&(dyn ToSql + Sync); 4] = [&site, &retried.users, &retried.types, &retried.values];
    tokio::try_join!(
        async {
            if done.users.is_empty() {
                return Ok(0);
            }
            client.execute(&done_stmt, &done_params).await
        },
        async {
            if done.users.is_empty() {
                return Ok(0);
            }
            client.execute(&replaced_stmt, &replaced_params).await
        },
        async {
            if retried.users.is_empty() {
                return Ok(0);
            }
            client.execute(&retry_stmt, &retry_params).await
        },
    )?;
    Ok(())
}

/// Every site's queue, for those with one, by site.
pub(super) async fn stats(client: &deadpool_postgres::Client) -> Result<Vec<QueueStats>, StoreError> {
    let rows = client.query(STATS, &[]).await?;
    rows.iter()
        .map(|row| {
            let site: &str = row.get(0);
            Ok(QueueStats {
                site: SiteId::parse(site)
                    .map_err(|_| StoreError::Malformed(format!("site {site:?} in webhook_queue")))?,
                queued: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                oldest_queued_ms: row.get(2),
            })
        })
        .collect()
}

/// The records settled one way, as arrays for one statement: each with a number (the version
/// sent, or when to try again).
#[derive(Default)]
struct Keys<'a> {
    users: Vec<&'a str>,
    types: Vec<&'static str>,
    values: Vec<i64>,
}

impl<'a> Keys<'a> {
    fn push(&mut self, settled: &'a Settled, value: i64) {
        self.users.push(settled.user.as_str());
        self.types.push(settled.data_type.as_str());
        self.values.push(value);
    }
}

/// The change in a row of [`READ`].
fn change_in(row: &tokio_postgres::Row) -> Result<FeedChange, StoreError> {
    let origin = row
        .get::<_, Option<&str>>(6)
        .map(|site| {
            SiteId::parse(site).map_err(|_| StoreError::Malformed(format!("origin {site:?} in records")))
        })
        .transpose()?;
    Ok(FeedChange {
        position: FeedPosition { xid: row.get(0), seq: row.get(1) },
        user: user_of(row.get(2))?,
        data_type: data_type_of(row.get(3))?,
        version: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
        updated_ms: row.get(5),
        origin,
        data: row.get(7),
    })
}

fn user_of(user: &str) -> Result<UserId, StoreError> {
    UserId::parse(user).map_err(|_| StoreError::Malformed(format!("user_id {user:?} in the feed")))
}

fn data_type_of(data_type: &str) -> Result<DataType, StoreError> {
    DataType::parse(data_type)
        .map_err(|_| StoreError::Malformed(format!("data_type {data_type:?} in the feed")))
}

fn type_names(types: &[DataType]) -> Vec<&'static str> {
    types.iter().map(|t| t.as_str()).collect()
}

/// A limit as the statements take it.
fn count(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}
