//! What every backend does with a write, the same on every one: an op id seen before
//! answers as it did the first time (and one reused for another request is refused), a
//! refusal that depends on the record's state is kept with the op id for good, an op too old
//! to be told from a forgotten one is refused, the version moves by one only when something
//! changed, the record's stamp only ever moves forward, and an amount's change leaves a
//! ledger row.
//!
//! A backend supplies the primitives ([`Tx`]) inside its own transaction; [`apply`] runs the
//! rules over them. A backend may run `apply` for the same write more than once (a
//! serialization failure, or two hub instances racing on one op id, rolls its transaction
//! back), which is why a [`Mutation`](super::Mutation) is a `Fn`.

use protocol::{DataType, OpId, Refusal, SiteId, UserId};

use super::{Credits, Current, LedgerEntry, OpKey, Record, Rejection, StoreError, Write, WriteOutcome};

/// How far ahead of the hub's clock an op id may be dated: a client stamps its ids with the
/// hub's time, so more is a broken clock or a made-up id. Such an op is refused rather than
/// remembered from its arrival: once forgotten, its date would not tell a late copy from a
/// new op, and it would be applied again.
const DATED_AHEAD_MS: i64 = 24 * 3600 * 1000;

/// What an op id got the first time it was seen.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenOp {
    /// The fingerprint of the request that carried it.
    pub fingerprint: String,
    /// The record as the op left it, or as it stood when the op was refused.
    pub record: Record,
    /// The code of the refusal it got for good ([`Rejection::code`]); `None` when applied.
    pub refusal: Option<String>,
}

/// One audit ledger row as a backend stores it.
#[derive(Debug, Clone, Copy)]
pub struct LedgerRow<'a> {
    pub user: &'a UserId,
    pub data_type: DataType,
    pub site: &'a SiteId,
    pub op_id: Option<&'a OpId>,
    pub entry: &'a LedgerEntry,
    /// The record's version the row made.
    pub version: u64,
    pub at_ms: i64,
}

/// The primitives of one backend's write transaction: all a write needs from storage.
pub trait Tx {
    /// What `op_id` of `user` got the first time, if the store remembers it.
    fn find_op(&mut self, user: &UserId, op_id: &OpId) -> Result<Option<SeenOp>, StoreError>;

    /// Keeps an op's answer: `record` as the op left it (or as it stood when refused) and the
    /// code of a refusal kept for good, remembered from `from_ms` on. A backend shared by
    /// several hub instances fails this with [`StoreError::Conflict`] when another
    /// transaction remembered the same op id first.
    fn remember_op(
        &mut self,
        user: &UserId,
        op: &OpKey,
        record: &Record,
        refusal: Option<&str>,
        from_ms: i64,
    ) -> Result<(), StoreError>;

    /// The record and its credit count, locked against other writers until the transaction
    /// ends; a record never written is [`Record::empty`].
    fn read_record(&mut self, user: &UserId, data_type: DataType) -> Result<(Record, Credits), StoreError>;

    /// Writes the record, at the next position of the feed, made by `origin`'s backend
    /// (`None`: a page); `credits` replaces the record's credit count, `None` keeps it.
    fn put_record(
        &mut self,
        user: &UserId,
        data_type: DataType,
        record: &Record,
        credits: Option<&Credits>,
        origin: Option<&SiteId>,
    ) -> Result<(), StoreError>;

    /// Appends an audit ledger row.
    fn append_ledger(&mut self, row: LedgerRow<'_>) -> Result<(), StoreError>;
}

/// Runs one write inside a backend's transaction, at `now_ms` on the store's clock.
/// `horizon_ms`: an op unknown to the store and dated before it may have been applied and
/// forgotten, so it is refused and not applied.
pub fn apply(
    tx: &mut impl Tx,
    write: &Write,
    now_ms: i64,
    horizon_ms: i64,
) -> Result<WriteOutcome, StoreError> {
    let user = &write.user;
    if let Some(op) = &write.op
        && let Some(seen) = tx.find_op(user, &op.op_id)?
    {
        if seen.fingerprint != op.fingerprint {
            return Ok(WriteOutcome::OpIdReused);
        }
        return match seen.refusal.as_deref() {
            None => Ok(WriteOutcome::Replayed(seen.record)),
            Some(code) => Rejection::kept(code, seen.record)
                .map(WriteOutcome::Rejected)
                .ok_or_else(|| StoreError::Malformed(format!("unknown refusal {code:?} kept with an op id"))),
        };
    }
    // The date an unknown op counts from: its id's, when it carries one (a remembered op
    // lasts until the horizon passes both its id's date and its arrival).
    let dated = write.op.as_ref().and_then(|op| op.op_id.dated_ms());
    if dated.is_some_and(|d| d > now_ms.saturating_add(DATED_AHEAD_MS)) {
        return Ok(WriteOutcome::Rejected(Rejection::Refused(Refusal::invalid(
            "invalid_op_id",
            "op_id is a UUIDv7 dated more than a day ahead of the hub's clock; make op ids with the hub's time",
        ))));
    }
    if dated.is_some_and(|d| d < horizon_ms) {
        return Ok(WriteOutcome::Rejected(Rejection::OpExpired));
    }
    let remembered_from = dated.map_or(now_ms, |d| d.max(now_ms));
    let (current, credits) = tx.read_record(user, write.data_type)?;
    let change = match (write.mutation)(Current { record: &current, credits: &credits, now_ms }) {
        Ok(change) => change,
        Err(refusal) => {
            if let (Some(op), Some(code)) = (&write.op, refusal.code()) {
                tx.remember_op(user, op, &current, Some(code), remembered_from)?;
            }
            return Ok(WriteOutcome::Rejected(refusal));
        }
    };
    let record = if change.data == current.data && change.ledger.is_none() {
        current
    } else {
        let record = Record {
            data: change.data,
            version: current.version + 1,
            // Never back, whatever this instance's clock says against the last writer's.
            updated_ms: Some(current.updated_ms.map_or(now_ms, |prev| now_ms.max(prev + 1))),
        };
        tx.put_record(user, write.data_type, &record, change.credits.as_ref(), write.origin.as_ref())?;
        if let Some(entry) = &change.ledger {
            tx.append_ledger(LedgerRow {
                user,
                data_type: write.data_type,
                site: &write.site,
                op_id: write.op.as_ref().map(|op| &op.op_id),
                entry,
                version: record.version,
                at_ms: record.updated_ms.unwrap_or(now_ms),
            })?;
        }
        record
    };
    if let Some(op) = &write.op {
        tx.remember_op(user, op, &record, None, remembered_from)?;
    }
    Ok(WriteOutcome::Applied(record))
}

/// The time before which the store remembers no op id. It follows the wall clock less the
/// retention, but moves no faster than time passes while the hub runs — a clock set forward
/// does not make the store forget early — and never moves back.
#[derive(Debug)]
pub struct Horizon {
    pub ms: i64,
    retention_ms: i64,
    /// The monotonic clock when `ms` last moved, or when the store started.
    moved_at: u64,
}

impl Horizon {
    pub fn new(ms: i64, retention_ms: i64, monotonic: u64) -> Horizon {
        Horizon { ms, retention_ms, moved_at: monotonic }
    }

    /// How far the horizon may move at `now` on the wall clock and `monotonic`.
    pub fn next(&self, now: i64, monotonic: u64) -> i64 {
        let passed = i64::try_from(monotonic.saturating_sub(self.moved_at)).unwrap_or(i64::MAX);
        now.saturating_sub(self.retention_ms).min(self.ms.saturating_add(passed)).max(self.ms)
    }

    pub fn move_to(&mut self, ms: i64, monotonic: u64) {
        if ms > self.ms {
            self.ms = ms;
            self.moved_at = monotonic;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    const RETENTION: i64 = 30 * DAY;
    /// 2026-12-06T00:00:00Z.
    const T: i64 = 1_796_515_200_000;

    #[test]
    fn the_horizon_never_moves_back_and_moves_no_faster_than_time_passes() {
        let mut horizon = Horizon::new(T - RETENTION, RETENTION, 0);
        assert_eq!(horizon.next(T - DAY, 0), T - RETENTION, "a clock set back");
        assert_eq!(horizon.next(T + 90 * DAY, 1000), T - RETENTION + 1000, "a clock set forward");
        horizon.move_to(T - RETENTION + 1000, 1000);
        assert_eq!(horizon.next(T + 1000 + DAY, 1000 + DAY as u64), T - RETENTION + 1000 + DAY);
        assert_eq!(horizon.next(T + 2000, 5000), T + 2000 - RETENTION, "time passing as the clock says");
    }
}
