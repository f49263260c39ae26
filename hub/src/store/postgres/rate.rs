//! The users' rate limit that every hub instance on the database shares: one GCRA state per
//! user in `rate_limits`, its theoretical arrival time in microseconds of the database's
//! clock, so that the instances' clocks need not agree. An instance takes a lease of a few
//! cells in one statement, which holds the user's row for the moment it changes it; what an
//! instance does with its cells is the rate limiter's.
//!
//! Every statement names one user, except forgetting the users who have fully recovered, a
//! sweep every ten minutes by each instance (`DELETE FROM rate_limits WHERE tat_us < now`).

use std::num::NonZeroU32;
use std::time::Duration;

use async_trait::async_trait;

use super::PostgresStore;
use crate::store::StoreError;
use crate::store::{SharedQuota, Taken};

/// Takes up to `$3` (`want`) cells of user `$1`'s quota, and at least `$2` (`need`), each cell
/// coming back after `$4` microseconds, a full quota being `$5` microseconds of cells; answers
/// the cells taken (0 when fewer than `need` are there) and, for none, how many microseconds
/// until `need` are. The row is locked while it is read (`FOR UPDATE`) and written. Two
/// first leases of one user may both find no row: the one that inserts second writes nothing
/// and answers no row (its guard sees a value it did not read), and is run again.
const LEASE: &str = "
    WITH held AS (
        SELECT tat_us FROM rate_limits WHERE user_id = $1 FOR UPDATE
    ), bucket AS (
        SELECT held.tat_us AS held_us, clock.now_us, GREATEST(held.tat_us, clock.now_us) AS from_us
        FROM (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT AS now_us) clock
        LEFT JOIN held ON true
    ), lease AS (
        SELECT held_us, now_us, from_us,
            CASE WHEN (now_us + $5::BIGINT - from_us) / $4::BIGINT >= $2::BIGINT
                THEN LEAST($3::BIGINT, (now_us + $5::BIGINT - from_us) / $4::BIGINT)
                ELSE 0 END AS cells
        FROM bucket
    )
    INSERT INTO rate_limits AS r (user_id, tat_us)
    SELECT $1, from_us + cells * $4::BIGINT FROM lease
    ON CONFLICT (user_id) DO UPDATE SET tat_us = EXCLUDED.tat_us
        WHERE r.tat_us IS NOT DISTINCT FROM (SELECT held_us FROM lease)
    RETURNING (SELECT cells FROM lease), (SELECT from_us + $2::BIGINT * $4::BIGINT - now_us - $5::BIGINT FROM lease)";

/// Runs of [`LEASE`] for one lease at most: only two first leases of one user at once run
/// it again.
const TRIES: usize = 3;

/// The shared quotas of the database's users, through the store's pool of readers.
pub(super) struct UserQuotas(pub(super) PostgresStore);

#[async_trait]
impl SharedQuota for UserQuotas {
    async fn take(
        &self,
        user: &str,
        need: u32,
        want: u32,
        per_minute: NonZeroU32,
    ) -> Result<Taken, StoreError> {
        self.0
            .within(async {
                let interval_us = (60_000_000 / i64::from(per_minute.get())).max(1);
                let window_us = interval_us * i64::from(per_minute.get());
                let client = self.0.reader().await?;
                let lease = client.prepare_cached(LEASE).await?;
                for _ in 0..TRIES {
                    let row = client
                        .query_opt(
                            &lease,
                            &[&user, &i64::from(need), &i64::from(want), &interval_us, &window_us],
                        )
                        .await?;
                    if let Some(row) = row {
                        let (cells, wait_us): (i64, i64) = (row.get(0), row.get(1));
                        return Ok(match u32::try_from(cells) {
                            Ok(cells) if cells > 0 => Taken::Cells(cells),
                            _ => Taken::Refused(Duration::from_micros(u64::try_from(wait_us).unwrap_or(0))),
                        });
                    }
                }
                Err(StoreError::Conflict(format!("{user}'s first rate-limit lease kept losing to another's")))
            })
            .await
    }

    async fn forget_recovered(&self) -> Result<(), StoreError> {
        self.0
            .within(async {
                self.0
                    .reader()
                    .await?
                    .execute(
                        "DELETE FROM rate_limits WHERE tat_us < (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT",
                        &[],
                    )
                    .await?;
                Ok(())
            })
            .await
    }
}
