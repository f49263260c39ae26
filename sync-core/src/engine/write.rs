//! Local writes: the outbox (oldest first, each with an op id made before its first send and
//! persisted before it), the one write on its way or the credit waiting for the page's fresh
//! grant, the backoff between attempts, and the op ids finished lately. Writes go one at a
//! time in outbox order, so the hub applies them in the order the page made them; on unload,
//! all go at once with `keepalive`. Sends through the engine; reads no clock.

use protocol::compact::{concat, decimal};
use protocol::{DataType, Refusal, wire};

use super::requests::Purpose;
use super::{Engine, Link};
use crate::cache::CachedRecord;
use crate::outbox::{Op, OpKind};
use crate::{Event, Grant, Json, Reply, Request, Source};

/// Op ids of finished writes remembered, so that another tab's stale copy is not adopted.
const DONE_REMEMBERED: usize = 256;

#[derive(Debug)]
pub(super) struct Writes {
    /// Local writes not yet confirmed, oldest first.
    outbox: Vec<Op>,
    /// Op ids confirmed or refused lately, oldest first.
    done: Vec<String>,
    state: State,
    /// Failed attempts since the last success: each doubles the delay before the next.
    attempts: u32,
    /// The next write may not go before this.
    next_ms: u64,
}

#[derive(Debug)]
enum State {
    /// No write on its way: the first one goes when its time comes.
    Idle,
    /// The outbox's first write (by op id) is on its way.
    InFlight(String),
    /// The hub found the grant of this credit expired before it ever applied it, and the page
    /// was asked for a fresh one ([`Event::NeedGrant`]); the writes behind it wait, so the
    /// outbox keeps its order.
    AwaitingGrant(String),
}

impl Writes {
    pub(super) fn new(outbox: Vec<Op>, now: u64) -> Writes {
        Writes { outbox, done: Vec::new(), state: State::Idle, attempts: 0, next_ms: now }
    }

    pub(super) fn outbox(&self) -> &[Op] {
        &self.outbox
    }

    pub(super) fn pending(&self, data_type: DataType) -> impl Iterator<Item = &Op> {
        self.outbox.iter().filter(move |op| op.data_type == data_type)
    }

    pub(super) fn position(&self, op_id: &str) -> Option<usize> {
        self.outbox.iter().position(|op| op.op_id == op_id)
    }

    /// Whether `op_id` is pending here or was finished lately.
    pub(super) fn knows(&self, op_id: &str) -> bool {
        self.position(op_id).is_some() || self.done.iter().any(|done| done == op_id)
    }

    /// A write to send after the others: made here, or another tab's, sent from here too.
    pub(super) fn push(&mut self, op: Op) {
        self.outbox.push(op);
    }

    /// A write waits to be sent and none is on its way or waiting for its grant.
    fn ready(&self) -> bool {
        matches!(self.state, State::Idle) && !self.outbox.is_empty()
    }

    pub(super) fn next_ms(&self) -> u64 {
        self.next_ms
    }

    /// The next write may go at once (back online, a fresh grant).
    pub(super) fn retry_now(&mut self, now: u64) {
        self.next_ms = now;
    }

    /// Whether `op_id` is the credit waiting for its fresh grant: unload leaves it out, its
    /// grant known to have expired.
    pub(super) fn awaits_grant(&self, op_id: &str) -> bool {
        matches!(&self.state, State::AwaitingGrant(waiting) if waiting == op_id)
    }

    /// Takes the write at `index` out of the outbox for good (confirmed or refused).
    pub(super) fn finish(&mut self, index: usize) -> Op {
        let op = self.outbox.remove(index);
        self.move_to_idle_granted(&op.op_id);
        if self.done.len() == DONE_REMEMBERED {
            self.done.remove(0);
        }
        self.done.push(op.op_id.clone());
        op
    }

    /// The hub answered a write: the next goes at once, with no backoff.
    fn succeeded(&mut self, now: u64) {
        self.attempts = 0;
        self.next_ms = now;
    }

    /// A failed attempt: the delay before the next, with jitter, at least `retry_after_ms`.
    fn failed(
        &mut self,
        now: u64,
        retry_after_ms: u64,
        base_ms: u64,
        max_ms: u64,
        rng: &mut fastrand::Rng,
    ) -> u64 {
        self.attempts += 1;
        let delay = backoff_ms(self.attempts, base_ms, max_ms, retry_after_ms, rng);
        self.next_ms = now + delay;
        delay
    }

    // Every change of state happens below. Each asserts, in debug builds, that it starts
    // from a state it may (the browser build carries no panic message for them).

    /// Sends the outbox's first write: it is on its way.
    fn move_to_in_flight(&mut self) -> Option<Op> {
        debug_assert!(self.ready(), "a write sent while another is on its way");
        let op = self.outbox.first()?.clone();
        self.state = State::InFlight(op.op_id.clone());
        Some(op)
    }

    /// The write `op_id` was answered: if it was the one on its way, the way is clear.
    fn move_to_idle_after(&mut self, op_id: &str) {
        if matches!(&self.state, State::InFlight(sent) if sent == op_id) {
            self.state = State::Idle;
        }
    }

    /// The grant of credit `op_id` expired; whether the page is to be asked for a fresh one
    /// (it was not asked already). A credit sent on unload may be answered while the outbox's
    /// first write is still on its way: the wait for the grant holds the outbox from then on.
    fn move_to_awaiting_grant(&mut self, op_id: &str) -> bool {
        if self.awaits_grant(op_id) {
            return false;
        }
        self.state = State::AwaitingGrant(op_id.to_owned());
        true
    }

    /// The page answered for the grant of `op_id`, or the credit is finished.
    fn move_to_idle_granted(&mut self, op_id: &str) {
        if self.awaits_grant(op_id) {
            self.state = State::Idle;
        }
    }
}

impl Engine {
    /// Whether the next write may be sent once its time comes.
    pub(super) fn writes_may_go(&self) -> bool {
        self.link != Link::Offline && !self.token.failed() && self.writes.ready()
    }

    pub(super) fn delta(
        &mut self,
        now: u64,
        data_type: DataType,
        amount: i64,
        reason: Option<String>,
        grant: Option<Grant>,
    ) -> Result<String, Refusal> {
        let field = protocol::amount_field(data_type).ok_or_else(|| {
            Refusal::invalid("invalid_data_type", "a delta applies to balance and points only")
        })?;
        self.config.limits.check_amount(amount).map_err(|code| {
            let message = if code == "zero_delta" {
                "a delta of 0 changes nothing"
            } else {
                "the delta is larger than the hub accepts"
            };
            Refusal::invalid(code, message)
        })?;
        // Judged by the hub's own rule; the hub normalizes (and trims) what it keeps.
        let reason = reason.filter(|r| !r.chars().all(char::is_whitespace));
        if reason.as_deref().is_some_and(|r| !protocol::is_valid_reason(r)) {
            return Err(Refusal::invalid(
                "invalid_reason",
                "the reason must be at most 100 characters of plain text",
            ));
        }
        let current = self.view(data_type).and_then(|v| v.get(field).and_then(Json::as_i64)).unwrap_or(0);
        if current + amount < 0 {
            return Err(Refusal::invalid("insufficient_funds", concat(&[field, " would go below zero"])));
        }
        let (op_id, grant) = match grant {
            Some(Grant { jwt, op_id }) if !self.writes.knows(&op_id) => (op_id, Some(jwt)),
            Some(_) => {
                return Err(Refusal::invalid("duplicate_op", "this grant's op is already pending or done"));
            }
            None => (self.new_op_id(), None),
        };
        let op = Op { op_id, data_type, kind: OpKind::Delta { amount, reason, grant } };
        self.log(&[data_type.as_str(), ": delta ", &signed(amount), " queued (", &op.op_id, ")"]);
        Ok(self.enqueue(now, op))
    }

    pub(super) fn push(&mut self, now: u64, data_type: DataType, patch: Json) -> Result<String, Refusal> {
        if !matches!(&patch, Json::Object(pairs) if !pairs.is_empty()) {
            return Err(Refusal::invalid(
                "invalid_data",
                "changes must be an object with at least one field",
            ));
        }
        let op = Op { op_id: self.new_op_id(), data_type, kind: OpKind::Push { patch } };
        self.log(&[data_type.as_str(), ": push queued (", &op.op_id, ")"]);
        Ok(self.enqueue(now, op))
    }

    /// Stores `op` (the page persists before anything is sent), shows it, and sends what can
    /// go. Returns its op id.
    fn enqueue(&mut self, now: u64, op: Op) -> String {
        let op_id = op.op_id.clone();
        self.writes.push(op);
        self.events.push(Event::Persist);
        self.announce(Source::Local);
        self.pump(now);
        op_id
    }

    fn new_op_id(&mut self) -> String {
        let mut id = self.config.site_id.clone();
        id.push('-');
        for _ in 0..32 {
            id.push(char::from(b"0123456789abcdef"[self.rng.usize(..16)]));
        }
        id
    }

    /// Sends the outbox's first write.
    pub(super) fn send_next_write(&mut self, now: u64) {
        if let Some(op) = self.writes.move_to_in_flight() {
            self.send_write(now, &op, false);
        }
    }

    pub(super) fn send_write(&mut self, now: u64, op: &Op, keepalive: bool) {
        let body = op.body(&self.config.user_id, &self.config.site_id);
        self.send(now, Purpose::Write(op.op_id.clone()), Request::post(body, keepalive));
    }

    pub(super) fn on_write(&mut self, now: u64, op_id: &str, reply: Reply, sent_with: Option<&str>) {
        self.writes.move_to_idle_after(op_id);
        let Some(index) = self.writes.position(op_id) else { return };
        let (status, body, retry_after_ms) = match reply {
            Reply::Answer { status, body, retry_after } => (status, body, retry_after.unwrap_or(0) * 1000),
            Reply::NetworkError => {
                if self.link == Link::Up {
                    self.link = Link::Unreachable;
                }
                return self.retry_later(now, 0, "network error");
            }
        };
        match status {
            200 => {
                self.writes.succeeded(now);
                self.token.accepted();
                let record = CachedRecord::from_json(&body);
                if let Some(record) = &record {
                    let data_type = self.writes.outbox[index].data_type;
                    let outcome = if wire::replayed(&body) { " replayed v" } else { " applied v" };
                    self.log(&[data_type.as_str(), ": write ", op_id, outcome, &decimal(record.version)]);
                }
                self.settle(index, record, None);
            }
            401 => {
                if !self.token_refused(sent_with) {
                    self.retry_later(now, 0, "token refused");
                }
            }
            429 | 408 | 500..=599 => {
                if status == 429 {
                    self.checks.hold(now, retry_after_ms);
                }
                self.retry_later(now, retry_after_ms, "hub busy");
            }
            _ => {
                let refusal = wire::refusal(&body);
                let code = refusal.as_ref().map_or("refused", |r| r.code);
                // The hub never applied the op: with a fresh grant for the same op id, the
                // next attempt is still a retry.
                if code == "grant_expired"
                    && self.config.asks_for_grants
                    && let Op { data_type, kind: OpKind::Delta { amount, reason, .. }, .. } =
                        &self.writes.outbox[index]
                {
                    let (data_type, amount, reason) = (*data_type, *amount, reason.clone());
                    if self.writes.move_to_awaiting_grant(op_id) {
                        self.log(&[
                            data_type.as_str(),
                            ": grant of ",
                            op_id,
                            " expired → asking for a fresh one",
                        ]);
                        self.events.push(Event::NeedGrant { op_id: op_id.into(), data_type, amount, reason });
                    }
                    return;
                }
                let message = refusal.as_ref().map_or("the hub refused the write", |r| r.message);
                let current = refusal.and_then(|r| r.current).map(CachedRecord::from);
                self.settle(index, current, Some((code.to_owned(), message.to_owned())));
            }
        }
    }

    /// The page's answer to [`Event::NeedGrant`] for `op_id`.
    pub(super) fn on_grant(&mut self, now: u64, op_id: &str, grant: Option<String>) {
        self.writes.move_to_idle_granted(op_id);
        let Some(index) = self.writes.position(op_id) else { return };
        match grant {
            Some(fresh) => {
                if let OpKind::Delta { grant, .. } = &mut self.writes.outbox[index].kind {
                    *grant = Some(fresh);
                }
                self.log(&["fresh grant for ", op_id, " → resend"]);
                self.writes.retry_now(now);
                self.events.push(Event::Persist);
            }
            None => {
                let refused = ("grant_expired".into(), "the grant expired and no fresh one came".into());
                self.settle(index, None, Some(refused));
            }
        }
    }

    /// Takes the write at `index` out of the outbox for good, confirmed or (with its code and
    /// message) refused and rolled back; adopts the record the hub answered with, and tells
    /// the page and the site's other tabs.
    fn settle(&mut self, index: usize, record: Option<CachedRecord>, refused: Option<(String, String)>) {
        let op = self.writes.finish(index);
        let data_type = op.data_type;
        if let Some((code, _)) = &refused {
            self.log(&[data_type.as_str(), ": write ", &op.op_id, " refused: ", code, " → ROLLBACK"]);
        }
        if let Some(record) = record {
            self.store(data_type, record.clone());
            self.share(data_type, record, Some(op.op_id.clone()));
        }
        if let Some((code, message)) = refused {
            self.events.push(Event::Refused { data_type, op_id: op.op_id, code, message });
        }
        self.events.push(Event::Persist);
        self.announce(Source::Hub);
    }

    fn retry_later(&mut self, now: u64, retry_after_ms: u64, why: &str) {
        let (base, max) = (self.config.retry_base_ms, self.config.retry_max_ms);
        let delay = self.writes.failed(now, retry_after_ms, base, max, &mut self.rng);
        self.log(&[
            "write failed (",
            why,
            "); retry in ",
            &decimal(delay / 1000),
            ".",
            &decimal(delay % 1000 / 100),
            "s",
        ]);
    }
}

/// Exponential backoff with equal jitter (between half and all of the doubled step): the
/// delay before retry `attempt` (1-based), at least `retry_after_ms` when the hub asked for it.
fn backoff_ms(attempt: u32, base_ms: u64, max_ms: u64, retry_after_ms: u64, rng: &mut fastrand::Rng) -> u64 {
    let exponential = base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(20)).min(max_ms);
    let jittered = exponential / 2 + rng.u64(0..=exponential / 2);
    jittered.max(retry_after_ms)
}

/// `+5` or `-5`.
fn signed(n: i64) -> String {
    concat(&[if n < 0 { "-" } else { "+" }, &decimal(n.unsigned_abs())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_numbers_are_written_in_decimal() {
        assert_eq!(signed(-12), "-12");
        assert_eq!(signed(5), "+5");
    }
}
