//! Local writes: the outbox (oldest first, each with an op id made before its first send and
//! persisted before it), the writes on their way or the credit waiting for the page's fresh
//! grant, the backoff between attempts, and the op ids finished lately. One request is on its
//! way at a time, in outbox order, so the hub applies the writes in the order the page made
//! them: the first write alone, or, when several wait (after an outage, back online, a
//! reload), a batch of the first ones — at most [`wire::MAX_BATCH_OPS`], within
//! [`wire::MAX_BODY_BYTES`] — which the hub applies in the order given. On unload, all go at
//! once with `keepalive`, in batches within the browser's budget for such bodies.
//!
//! Only the hub's own answer settles a write: its success body confirms it, its refusal (a
//! final 4xx with its code) rolls it back; anything else — no answer, a busy hub, a proxy's
//! page, a 200 without the hub's body — leaves it pending and shown, retried with backoff
//! and jitter. Sends through the engine; reads no clock.

use alloc::{borrow::ToOwned, string::String, vec::Vec};

use protocol::compact::{concat, decimal};
use protocol::wire::{self, code};
use protocol::{DataType, Refusal};

use super::requests::Purpose;
use super::{Engine, Link};
use crate::cache::CachedRecord;
use crate::outbox::{Op, OpKind};
use crate::{Event, Grant, Json, Reply, Request, RequestId, Source};

/// Op ids of finished writes remembered, so that another tab's stale copy is not adopted.
const DONE_REMEMBERED: usize = 256;

/// What a batch body weighs besides its writes, its user and its site: its other fields and
/// brackets.
const BATCH_OVERHEAD: usize = 64;

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
    /// The hub refused a batch as a whole (a hub that does not know the action, a body it
    /// found too large): nothing of it was applied, and writes go one at a time from then on.
    single_only: bool,
}

#[derive(Debug)]
enum State {
    /// No write on its way: the first one goes when its time comes.
    Idle,
    /// The outbox's first writes are on their way in this request: one alone, or several in a
    /// batch.
    InFlight(RequestId),
    /// The hub found the grant of this credit expired before it ever applied it, and the page
    /// was asked for a fresh one ([`Event::NeedGrant`]); the writes behind it wait, so the
    /// outbox keeps its order.
    AwaitingGrant(String),
}

impl Writes {
    pub(super) fn new(outbox: Vec<Op>, now: u64) -> Writes {
        Writes { outbox, done: Vec::new(), state: State::Idle, attempts: 0, next_ms: now, single_only: false }
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

    /// A write is on its way while writes of `data_type` are pending: the hub's record of that
    /// type may have changed by the write before its answer comes.
    pub(super) fn on_its_way(&self, data_type: DataType) -> bool {
        matches!(self.state, State::InFlight(_)) && self.pending(data_type).next().is_some()
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

    /// The outbox's first writes are on their way in request `id`.
    fn move_to_in_flight(&mut self, id: RequestId) {
        debug_assert!(self.ready(), "a write sent while another is on its way");
        self.state = State::InFlight(id);
    }

    /// Request `id` was answered: if it was the one on its way, the way is clear.
    fn move_to_idle_after(&mut self, id: RequestId) {
        if matches!(self.state, State::InFlight(sent) if sent == id) {
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
            None => (self.new_op_id(now), None),
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
        let op = Op { op_id: self.new_op_id(now), data_type, kind: OpKind::Push { patch } };
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

    /// A fresh op id: a UUIDv7 dated by the hub's clock as the last answer showed it, so that
    /// the hub can date it even when this device's clock is wrong.
    fn new_op_id(&mut self, now: u64) -> String {
        wire::uuid7(now.saturating_add_signed(self.clock_offset_ms), self.rng.u64(..), self.rng.u64(..))
    }

    /// The request that sends the first of `ops`, and as many after it as fit `budget` bytes
    /// (at most [`wire::MAX_BATCH_OPS`] in all): the first alone, or a batch. Its op ids, its
    /// body and what the body weighs (which may exceed `budget` when the first alone does);
    /// `None` when there is no op.
    fn write_request(&self, ops: &[Op], budget: usize) -> Option<(Vec<String>, Json, usize)> {
        let (user, site) = (self.config.user_id.as_str(), self.config.site_id.as_str());
        let most = if self.writes.single_only { 1 } else { wire::MAX_BATCH_OPS };
        let mut weight = BATCH_OVERHEAD + user.len() + site.len();
        let (mut op_ids, mut bodies) = (Vec::new(), Vec::new());
        for op in ops {
            if bodies.len() == most {
                break;
            }
            let body = op.body(user, site);
            let len = body.text_len() + 1;
            if !bodies.is_empty() && weight + len > budget {
                break;
            }
            weight += len;
            op_ids.push(op.op_id.clone());
            bodies.push(body);
        }
        let body = match bodies.len() {
            0 => return None,
            1 => bodies.pop()?,
            _ => wire::batch(user, site, bodies),
        };
        Some((op_ids, body, weight))
    }

    /// Sends the outbox's first write, or a batch of its first writes.
    pub(super) fn send_next_write(&mut self, now: u64) {
        let Some((op_ids, body, _)) = self.write_request(self.writes.outbox(), wire::MAX_BODY_BYTES) else {
            return;
        };
        if op_ids.len() > 1 {
            self.log(&["sending ", &decimal(op_ids.len() as u64), " writes in one batch"]);
        }
        let id = self.send(now, Purpose::Write(op_ids), Request::post(body, false));
        self.writes.move_to_in_flight(id);
    }

    /// Sends every pending write with `keepalive` (but a credit waiting for its fresh grant),
    /// in order, in as few requests as fit the browser's budget for such bodies; the rest
    /// stays stored for the next page.
    pub(super) fn send_on_unload(&mut self, now: u64) {
        let mut ops = self.writes.outbox().to_vec();
        ops.retain(|op| !self.writes.awaits_grant(&op.op_id));
        let (mut sent, mut budget) = (0, wire::MAX_BODY_BYTES);
        while let Some((op_ids, body, weight)) =
            self.write_request(ops.get(sent..).unwrap_or_default(), budget)
        {
            if weight > budget {
                self.log(&["writes left for the next page: over the keepalive budget"]);
                return;
            }
            sent += op_ids.len();
            budget -= weight;
            self.send(now, Purpose::Write(op_ids), Request::post(body, true));
        }
    }

    /// The answer to the request that carried `op_ids`: each write is settled by what the hub
    /// said of it, or retried after the backoff.
    pub(super) fn on_write(
        &mut self,
        now: u64,
        id: RequestId,
        op_ids: &[String],
        reply: Reply,
        sent_with: Option<&str>,
    ) {
        self.writes.move_to_idle_after(id);
        let (status, body, retry_after_ms) = match reply {
            Reply::Answer { status, body, retry_after, .. } => {
                (status, body, retry_after.unwrap_or(0) * 1000)
            }
            Reply::NetworkError => {
                if self.link == Link::Up {
                    self.link = Link::Unreachable;
                }
                return self.retry_later(now, 0, "network error");
            }
        };
        if status == 429 {
            self.checks.hold(now, retry_after_ms);
        }
        let outcome = match op_ids {
            [op_id] => self.on_answer(now, op_id, status, &body, sent_with),
            _ => match self.verdict(status, &body, sent_with) {
                Verdict::Success => {
                    let mut outcome = Outcome::Answered;
                    for op_id in op_ids {
                        let answered = match wire::batch_result(&body, op_id) {
                            Some((status, result)) => self.on_answer(now, op_id, status, result, sent_with),
                            None => Outcome::Retry("no result for it"),
                        };
                        if let Outcome::Retry(_) = answered {
                            outcome = answered;
                        }
                    }
                    outcome
                }
                // Refused as a whole, nothing of it applied (a hub from before batches).
                Verdict::Final(refusal) => {
                    self.log(&["batch refused (", refusal.code, ") → one write at a time"]);
                    self.writes.single_only = true;
                    Outcome::Answered
                }
                Verdict::Then(outcome) => outcome,
            },
        };
        match outcome {
            Outcome::Answered => self.writes.succeeded(now),
            Outcome::Retry(why) => self.retry_later(now, retry_after_ms, why),
        }
    }

    /// What an answer says: the hub's success, its final refusal, or what follows from an
    /// answer that is not the hub's, a refused token, or a refusal worth another try (408,
    /// 429, 5xx, an op a batch did not reach).
    fn verdict<'a>(&mut self, status: u16, answer: &'a Json, sent_with: Option<&str>) -> Verdict<'a> {
        if status == 200 && wire::succeeded(answer) {
            return Verdict::Success;
        }
        let Some(refusal) = wire::refusal(answer) else {
            self.foreign = true;
            self.log(&["HTTP ", &decimal(u64::from(status)), " without the hub's body"]);
            return Verdict::Then(Outcome::Retry("not the hub's answer"));
        };
        if status == 401 {
            let repeat = self.token_refused(sent_with, &refusal);
            return Verdict::Then(if repeat { Outcome::Answered } else { Outcome::Retry("token refused") });
        }
        if !(400..=499).contains(&status)
            || matches!(status, 408 | 429)
            || refusal.code == code::NOT_ATTEMPTED
        {
            return Verdict::Then(Outcome::Retry("hub busy"));
        }
        Verdict::Final(refusal)
    }

    /// What the hub said of the write `op_id`, alone or in a batch: the status it had and its
    /// own answer.
    fn on_answer(
        &mut self,
        now: u64,
        op_id: &str,
        status: u16,
        answer: &Json,
        sent_with: Option<&str>,
    ) -> Outcome {
        let Some(index) = self.writes.position(op_id) else { return Outcome::Answered };
        let refusal = match self.verdict(status, answer, sent_with) {
            Verdict::Success => {
                self.token.accepted();
                let record = CachedRecord::from_json(answer);
                let version = record.as_ref().map_or(0, |r| r.version);
                let outcome = if wire::replayed(answer) { " replayed v" } else { " applied v" };
                self.log(&["write ", op_id, outcome, &decimal(version)]);
                self.settle(index, record, None);
                return Outcome::Answered;
            }
            Verdict::Final(refusal) => refusal,
            Verdict::Then(outcome) => return outcome,
        };
        // The hub never applied the op: with a fresh grant for the same op id, the next attempt
        // is still a retry.
        if refusal.code == code::GRANT_EXPIRED
            && self.config.asks_for_grants
            && let Op { data_type, kind: OpKind::Delta { amount, reason, .. }, .. } =
                &self.writes.outbox[index]
        {
            let (data_type, amount, reason) = (*data_type, *amount, reason.clone());
            if self.writes.move_to_awaiting_grant(op_id) {
                self.log(&[data_type.as_str(), ": grant of ", op_id, " expired → asking for a fresh one"]);
                self.events.push(Event::NeedGrant { op_id: op_id.into(), data_type, amount, reason });
            }
            return Outcome::Answered;
        }
        let expired = refusal.code == code::OP_EXPIRED;
        let refused = (refusal.code.to_owned(), refusal.message.to_owned());
        self.settle(index, refusal.current.map(CachedRecord::from), Some(refused));
        if expired {
            // Whether it was applied long ago, only the hub's record can tell.
            self.start_check(now, "Op expired", None);
        }
        Outcome::Answered
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

/// What an answer says of a write or a batch, as [`Engine::verdict`] reads it.
enum Verdict<'a> {
    /// The hub's success body.
    Success,
    /// The hub's final refusal.
    Final(wire::RefusalRef<'a, Json>),
    /// Not settled by it: what follows.
    Then(Outcome),
}

/// What an answer did to the writes it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Settled (confirmed or refused), or waiting for a fresh grant or token: no backoff.
    Answered,
    /// Left pending, to be sent again after the backoff; why, for the log.
    Retry(&'static str),
}

/// Exponential backoff with equal jitter (between half and all of the doubled step): the
/// delay before retry `attempt` (1-based), at least `retry_after_ms` when the hub asked for it.
pub(super) fn backoff_ms(
    attempt: u32,
    base_ms: u64,
    max_ms: u64,
    retry_after_ms: u64,
    rng: &mut fastrand::Rng,
) -> u64 {
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
