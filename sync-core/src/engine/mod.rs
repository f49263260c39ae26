//! The sync state machine: when to check, what to fetch, what to send and resend, and what
//! to tell the page. See the crate docs for the call order.
//!
//! [`Engine`] composes small state machines, each in its own module with its state in one
//! enum that only its own `move_to_*` methods change (quinn-proto's `connection/` is the
//! model): `token` (the page's token: asked for, held, refreshed once, given up on),
//! `check` (a timestamp check and the fetches it starts, the spinner, the hub's hold, the
//! inactivity check), `write` (the outbox, the writes on their way — one, or a batch — or the
//! credit waiting for a fresh grant, the backoff), `live` (the event stream: wanted, locked,
//! open, backing off, or not offered by the hub) and `requests` (what is on its way to the
//! hub, until when).
//! Each module also holds the engine's reactions to the answers it owns. This one routes the
//! inputs to them, keeps the cache and tells the page what it shows. Does no I/O and reads
//! no clock: `now` comes with every input.

use alloc::{borrow::ToOwned, string::String, vec::Vec};

mod check;
mod live;
mod requests;
mod token;
mod write;

use protocol::compact::concat;
use protocol::{DataType, Limits, Refusal, wire};

use self::check::Checks;
use self::live::Live;
use self::requests::{Purpose, Requests};
use self::token::{Failure, Token};
use self::write::Writes;
use crate::cache::{CachedRecord, PerType, Persisted};
use crate::outbox::Op;
use crate::{
    Event, Grant, Json, Reason, Reply, Request, RequestId, Shared, Source, Status, StreamInput, Trigger,
};

/// How a client behaves; [`Config::new`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub site_id: String,
    pub user_id: String,
    /// The types this page keeps in step; every check covers all of them.
    pub data_types: Vec<DataType>,
    /// False when the hub runs without auth (development): no token is ever asked for.
    pub needs_token: bool,
    /// The page can get a fresh grant from its site's backend (`getGrant`): a credit whose
    /// grant expired before the hub ever applied it asks for one ([`Event::NeedGrant`])
    /// instead of being refused and rolled back.
    pub asks_for_grants: bool,
    /// A check shorter than this never shows the spinner (no flicker).
    pub spinner_delay_ms: u64,
    /// While the tab is visible, check after this long without a check.
    pub inactivity_ms: u64,
    /// The hub's limits, which a delta is checked against before it is queued. The hub does
    /// not tell its clients its configured `limits.max_delta`, so this is the hub's default; a
    /// caller that knows its hub's configuration sets it. A delta the hub finds too large is
    /// refused there (`delta_too_large`) and rolled back.
    pub limits: Limits,
    /// A request unanswered after this long counts as a network failure.
    pub request_timeout_ms: u64,
    /// First retry delay of a failed write; doubles per attempt up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Seeds op ids and retry jitter; the shell passes real randomness.
    pub seed: u64,
    /// Emit [`Event::Log`] lines. The browser shell leaves it on and decides at each line
    /// whether to print it, so that `localStorage.sync_debug` works on a live page.
    pub debug: bool,
    /// The caller keeps the hub's event stream as the engine asks ([`Event::StreamLock`],
    /// [`Event::Stream`], [`Engine::handle_stream`]): changes then arrive as they happen, and
    /// tab returns need no check while it is open. Off by default.
    pub live: bool,
    /// A stream silent this long (not even a heartbeat) is taken for broken.
    pub stream_silence_ms: u64,
}

impl Config {
    pub fn new(site_id: impl Into<String>, user_id: impl Into<String>, data_types: Vec<DataType>) -> Config {
        Config {
            site_id: site_id.into(),
            user_id: user_id.into(),
            data_types,
            needs_token: true,
            asks_for_grants: false,
            spinner_delay_ms: 150,
            inactivity_ms: 5 * 60 * 1000,
            limits: Limits::default(),
            request_timeout_ms: 15_000,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000,
            seed: 0,
            debug: false,
            live: false,
            stream_silence_ms: crate::STREAM_SILENCE_MS,
        }
    }
}

/// Whether the hub can be reached, as the browser and the last answer tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// A request got no answer; the next answer ends it.
    Unreachable,
    /// The browser says it is offline; only its `online` event ends it. Checks end at once
    /// with cached data and writes wait.
    Offline,
}

/// The client's sync engine. Construct with [`Engine::new`], then feed inputs and drain
/// outputs as the crate docs describe.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    /// Draws op ids and retry jitter, from the seed the shell passes.
    rng: fastrand::Rng,
    /// The hub database the cache came from; a different one drops the cache.
    epoch: Option<String>,
    records: PerType<CachedRecord>,
    /// What was last announced per type (view, version, pending writes), so the page hears
    /// of every real change — a confirmed write too — and of nothing else.
    shown: PerType<(Json, u64, usize)>,
    token: Token,
    checks: Checks,
    writes: Writes,
    requests: Requests,
    live: Live,
    /// Events wait here in order; the queue is short, so a `Vec` is all it needs.
    events: Vec<Event>,
    link: Link,
    /// Inactivity checks run only while the tab is visible.
    visible: bool,
    /// The status last told to the page, so it hears of changes only.
    status: Status,
    /// Why, as last told.
    reason: Option<Reason>,
    /// The last answer was not the hub's (a proxy's page, a firewall's JSON, a bare 200); the
    /// hub's next answer ends it.
    foreign: bool,
    /// The page's storage refused the last [`Event::Persist`].
    storage_failed: bool,
    /// The hub's clock minus this device's, from the last answer's `Date`: op ids are dated by
    /// it, so that the hub can date them whatever this device's clock says.
    clock_offset_ms: i64,
    /// The next ticket a trigger hands out for its [`Event::CheckDone`].
    next_ticket: u64,
}

impl Engine {
    /// Starts an engine with what a previous page persisted. Cached data is announced at
    /// once (source [`Source::Cache`]); pending writes are sent again with their op ids.
    pub fn new(config: Config, persisted: Option<Persisted>, now: u64) -> Engine {
        let persisted = persisted.unwrap_or_default();
        let mut engine = Engine {
            rng: fastrand::Rng::with_seed(config.seed),
            token: Token::new(config.needs_token),
            config,
            epoch: persisted.epoch,
            records: persisted.records,
            shown: PerType::default(),
            checks: Checks::default(),
            writes: Writes::new(persisted.outbox, now),
            requests: Requests::default(),
            live: Live::default(),
            events: Vec::new(),
            link: Link::Up,
            visible: true,
            status: Status::Idle,
            reason: None,
            foreign: false,
            storage_failed: false,
            clock_offset_ms: persisted.clock_offset_ms,
            next_ticket: 1,
        };
        engine.announce(Source::Cache);
        engine.want_stream();
        engine.pump(now);
        engine
    }

    // ---- inputs ----

    /// Starts a check (or joins the one running) and returns a ticket that a
    /// [`Event::CheckDone`] will name. A tab return needs no check while the event stream is
    /// open or shared, and waits for its `ready` when it can resume.
    pub fn handle_trigger(&mut self, now: u64, trigger: Trigger) -> u64 {
        match trigger {
            Trigger::TabVisible | Trigger::PageShow => {
                self.visible = true;
                self.want_stream();
            }
            Trigger::Online => {
                self.link = Link::Up;
                self.writes.retry_now(now);
            }
            // An explicit request gets a fresh chance at auth.
            Trigger::Login | Trigger::Force | Trigger::EnsureFresh => self.token.clear_failure(),
        }
        // The page's own backend failed to give a token (down, or the network was): any later
        // trigger asks it again, which costs the hub nothing. A token the hub refused waits for
        // an explicit request, so that tab returns never repeat a refused identity.
        if matches!(self.token.failure(), Some(Failure::NoToken)) {
            self.token.clear_failure();
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let reason = match trigger {
            Trigger::Login => "Login",
            Trigger::TabVisible => "Tab visible",
            Trigger::PageShow => "Page restored",
            Trigger::Online => "Back online",
            Trigger::EnsureFresh => "Before an operation",
            Trigger::Force => "Forced sync",
        };
        if trigger == Trigger::TabVisible && self.stream_covers(now) {
            self.events.push(Event::CheckDone { ticket, fresh: true });
        } else {
            self.start_check(now, reason, Some(ticket));
        }
        self.tick(now);
        self.pump(now);
        ticket
    }

    /// The tab was hidden: no inactivity checks until it is visible again, and the event
    /// stream closes after [`crate::STREAM_GRACE_MS`].
    pub fn handle_hidden(&mut self, now: u64) {
        self.visible = false;
        self.live.hidden(now);
    }

    /// The browser went offline: checks end at once with cached data, writes wait.
    pub fn handle_offline(&mut self, now: u64) {
        self.link = Link::Offline;
        self.pump(now);
    }

    /// The answer to [`Event::NeedToken`]: a token, or `None` if the page could not get one.
    /// A fresh token that replaces one the hub refused goes at once: the hub's hold and the
    /// writes' backoff came with answers to the refused token (which a hub may have counted
    /// against the page's address, shared with anonymous clients), not to this one.
    pub fn handle_token(&mut self, now: u64, token: Option<String>) {
        if !self.token.answered(token) {
            self.log(&["token unavailable → ERROR"]);
            self.finish_check(now, false);
        } else if self.token.fresh() {
            self.checks.lift_hold(now);
            self.writes.retry_now(now);
            self.tick(now);
        }
        self.pump(now);
    }

    /// The answer to [`Event::NeedGrant`]: a fresh grant is stored with the op (persisted
    /// before the resend) and sent; `None` (the page has none) refuses the write and rolls it
    /// back, with code `grant_expired`.
    pub fn handle_grant(&mut self, now: u64, op_id: &str, grant: Option<String>) {
        self.on_grant(now, op_id, grant);
        self.pump(now);
    }

    /// What came back for request `id`. Unknown, late and duplicated replies are ignored.
    pub fn handle_reply(&mut self, now: u64, id: RequestId, reply: Reply) {
        let Some(flight) = self.requests.take(id) else { return };
        if let Reply::Answer { body, date, .. } = &reply {
            if self.link == Link::Unreachable {
                self.link = Link::Up;
            }
            if let Some(date) = date {
                self.clock_offset_ms = *date as i64 - now as i64;
            }
            if wire::succeeded(body) || wire::refusal(body).is_some() {
                self.foreign = false;
            }
        }
        let sent_with = flight.token.as_deref();
        match flight.purpose {
            Purpose::Stamps(check_id) => self.on_stamps(now, check_id, reply, sent_with),
            Purpose::Fetch(data_type, check_id) => self.on_fetch(now, data_type, check_id, reply, sent_with),
            Purpose::Write(op_ids) => {
                self.on_write(now, id, &op_ids, reply, sent_with);
                self.apply_deferred();
            }
        }
        self.pump(now);
    }

    /// What the event stream brought, or what the tab holding the site's stream shared (with
    /// [`Config::live`]).
    pub fn handle_stream(&mut self, now: u64, input: StreamInput) {
        self.on_stream(now, input);
        self.pump(now);
    }

    /// Whether the page could store what the last [`Event::Persist`] asked for. While storage
    /// refuses (full, or switched off), the status is `Error` ([`Reason::StorageFailed`]):
    /// pending writes are still sent, but live in this page only.
    pub fn handle_persisted(&mut self, now: u64, stored: bool) {
        if self.storage_failed == stored {
            self.log(&[if stored { "storage works again" } else { "storage refused the outbox → ERROR" }]);
        }
        self.storage_failed = !stored;
        self.pump(now);
    }

    /// Time passed: shows the spinner, expires requests, retries writes, runs the
    /// inactivity check.
    pub fn handle_timeout(&mut self, now: u64) {
        self.tick(now);
        self.pump(now);
    }

    /// Fresh data another tab of this site received.
    pub fn handle_shared(&mut self, _now: u64, shared: Shared) {
        if self.epoch.as_ref().is_some_and(|e| *e != shared.epoch) {
            return;
        }
        self.epoch = Some(shared.epoch);
        let finished = shared.finished.and_then(|op_id| self.writes.position(&op_id));
        if let Some(index) = finished {
            self.writes.finish(index);
        }
        if self.store(shared.data_type, shared.record) || finished.is_some() {
            self.events.push(Event::Persist);
            self.announce(Source::Tab);
        }
    }

    /// Writes another tab (or a closed page) left in storage: the ones this engine does not
    /// know are adopted and sent too. The hub applies each op id once, so a write both tabs
    /// send is still applied once.
    pub fn handle_stored_ops(&mut self, now: u64, ops: &[Op]) {
        let mut adopted = false;
        for op in ops {
            if !self.writes.knows(&op.op_id) {
                self.log(&["adopted pending write ", &op.op_id, " for ", op.data_type.as_str()]);
                self.writes.push(op.clone());
                adopted = true;
            }
        }
        if adopted {
            self.announce(Source::Local);
            self.pump(now);
        }
    }

    /// The page is going away: send every pending write now, with `keepalive` (but a credit
    /// whose grant is known to have expired), in order: in batches when there are several, as
    /// many as fit the browser's budget for `keepalive` bodies. They stay in the outbox; the
    /// next page resends what was not confirmed, and the hub applies each once. The event
    /// stream closes and its lock goes (a page restored from the back/forward cache takes them
    /// again).
    pub fn handle_unload(&mut self, now: u64) {
        self.send_on_unload(now);
        self.leave_stream();
    }

    /// Adds `amount` to balance or points: shown at once, stored in the outbox before it is
    /// first sent, retried until the hub answers. Returns the op id. Without a grant, the hub
    /// takes a spend from a page's token, and a credit only from a server's token with
    /// `amounts:credit`.
    pub fn apply_delta(
        &mut self,
        now: u64,
        data_type: DataType,
        amount: i64,
        reason: Option<String>,
    ) -> Result<String, Refusal> {
        self.delta(now, data_type, amount, reason, None)
    }

    /// [`Engine::apply_delta`] for a credit the site's backend granted: the op takes the
    /// grant's op id and carries the grant to the hub. A grant whose op is already pending or
    /// done is refused (`duplicate_op`), so re-applying one never counts twice on the page.
    pub fn apply_delta_with_grant(
        &mut self,
        now: u64,
        data_type: DataType,
        amount: i64,
        reason: Option<String>,
        grant: Grant,
    ) -> Result<String, Refusal> {
        self.delta(now, data_type, amount, reason, Some(grant))
    }

    /// Merges `patch` into a record (fire and forget): shown at once, sent in order, retried.
    /// The hub checks the fields; if it refuses, the change is rolled back with
    /// [`Event::Refused`].
    pub fn push_changes(&mut self, now: u64, data_type: DataType, patch: Json) -> Result<String, Refusal> {
        self.push(now, data_type, patch)
    }

    // ---- outputs ----

    pub fn poll_request(&mut self) -> Option<Request> {
        self.requests.poll()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    /// When to call [`Engine::handle_timeout`] next, if anything waits on time.
    pub fn poll_timeout(&self) -> Option<u64> {
        let write = (self.writes_may_go() && !self.token.asked()).then(|| self.writes.next_ms());
        let may_open = self.stream_may_open() && !self.token.asked();
        let stream = self.live.next_timeout(may_open, self.config.stream_silence_ms);
        let next =
            [self.checks.next_timeout(), self.requests.next_deadline(), write, self.inactivity_due(), stream]
                .iter()
                .fold(u64::MAX, |next, at| next.min(at.unwrap_or(u64::MAX)));
        (next != u64::MAX).then_some(next)
    }

    // ---- queries ----

    pub fn status(&self) -> Status {
        self.status
    }

    /// Whether changes reach the page live: an event stream is open here, or the tab holding
    /// the site's stream shares one.
    pub fn live(&self) -> bool {
        self.live.live()
    }

    /// Why the status is `Offline` or `Error`; `None` while idle or syncing.
    pub fn status_reason(&self) -> Option<Reason> {
        self.reason
    }

    /// What the page should show for `data_type`: the hub's data with pending local writes
    /// applied, or `None` if nothing is known yet.
    pub fn view(&self, data_type: DataType) -> Option<Json> {
        let base = self.records.get(data_type);
        let mut pending = self.writes.pending(data_type).peekable();
        if base.is_none() && pending.peek().is_none() {
            return None;
        }
        let mut data = base.map_or_else(|| data_type.empty(), |r| r.data.clone());
        for op in pending {
            op.apply(&mut data);
        }
        Some(data)
    }

    /// The hub's record as last confirmed, without pending writes.
    pub fn record(&self, data_type: DataType) -> Option<&CachedRecord> {
        self.records.get(data_type)
    }

    /// Local writes not yet confirmed by the hub.
    pub fn pending(&self) -> impl Iterator<Item = &Op> {
        self.writes.outbox().iter()
    }

    /// What to store so that the next page starts where this one is.
    pub fn persisted(&self) -> Persisted {
        Persisted {
            epoch: self.epoch.clone(),
            records: self.records.clone(),
            outbox: self.writes.outbox().to_vec(),
            clock_offset_ms: self.clock_offset_ms,
        }
    }

    // ---- plumbing ----

    /// Runs what is due at `now`: the spinner, request deadlines, the inactivity check, the
    /// check after the hub's hold.
    fn tick(&mut self, now: u64) {
        if self.checks.show_spinner(now) {
            self.events.push(Event::Spinner(true));
        }
        for id in self.requests.expired(now) {
            self.log(&["request timed out"]);
            self.handle_reply(now, id, Reply::NetworkError);
        }
        if self.inactivity_due().is_some_and(|at| now >= at) {
            self.start_check(now, "Inactivity", None);
        }
        if self.checks.rerun_due(now) {
            self.start_check(now, "After Retry-After", None);
        }
        self.stream_tick(now);
    }

    /// Sends what can be sent: the pending check, then the next write; asks for a token
    /// first when one is missing.
    fn pump(&mut self, now: u64) {
        if self.checks.pending() {
            let held = self.checks.held(now);
            if held {
                self.log(&["the hub asked to wait (429) → cached data"]);
            }
            if held || self.link == Link::Offline || self.token.failed() {
                self.finish_check(now, false);
                if held {
                    self.checks.rerun_after_hold();
                }
            }
        }
        let check_pending = self.checks.pending();
        let write_due = self.writes_may_go() && now >= self.writes.next_ms();
        let stream_due = self.stream_due(now);
        if (check_pending || write_due || stream_due) && !self.token.ready(&mut self.events) {
            self.update_status();
            return;
        }
        if check_pending {
            self.send_check(now);
        }
        if write_due {
            self.send_next_write(now);
        }
        if stream_due {
            self.open_stream(now);
        }
        self.update_status();
    }

    /// Queues `request` for the shell, with the token if the hub needs one; its answer goes to
    /// `purpose`. Returns its id.
    fn send(&mut self, now: u64, purpose: Purpose, mut request: Request) -> RequestId {
        request.token = self.token.current().map(str::to_owned);
        self.requests.send(purpose, now + self.config.request_timeout_ms, request)
    }

    /// The epoch an answer or the event stream names: a new one drops the cache. Whether it
    /// did.
    fn adopt_epoch(&mut self, epoch: Option<&str>) -> bool {
        let Some(epoch) = epoch else { return false };
        let dropped = self.epoch.as_deref().is_some_and(|e| e != epoch);
        if dropped {
            self.log(&["hub epoch changed (", epoch, ") → cache dropped"]);
            self.records.clear();
            // Changes a stream brought while a write was on its way are of the old database.
            self.live.deferred.clear();
            self.events.push(Event::Persist);
        }
        self.epoch = Some(epoch.to_owned());
        dropped
    }

    /// Keeps `record` if it is newer than what the cache holds. Returns whether it did.
    fn store(&mut self, data_type: DataType, record: CachedRecord) -> bool {
        let newer = self.records.get(data_type).is_none_or(|r| record.version > r.version);
        if newer {
            self.records.insert(data_type, record);
        }
        newer
    }

    fn share(&mut self, data_type: DataType, record: CachedRecord, finished: Option<String>) {
        if let Some(epoch) = &self.epoch {
            self.events.push(Event::Share(Shared { epoch: epoch.clone(), data_type, record, finished }));
        }
    }

    /// Tells the page about every type whose view changed.
    fn announce(&mut self, source: Source) {
        for data_type in DataType::ALL {
            let Some(view) = self.view(data_type) else { continue };
            let record = self.records.get(data_type);
            let version = record.map_or(0, |r| r.version);
            let pending = self.writes.pending(data_type).count();
            let state = (view, version, pending);
            if self.shown.get(data_type) == Some(&state) {
                continue;
            }
            self.shown.insert(data_type, state.clone());
            let (view, ..) = state;
            let source = if pending > 0 && source == Source::Hub { Source::Local } else { source };
            self.events.push(Event::Data {
                data_type,
                data: view,
                version,
                last_updated: record.and_then(|r| r.last_updated.clone()),
                source,
                pending,
            });
        }
    }

    /// Tells the page where sync stands and why, when that changed. A storage that refuses
    /// comes first: whatever else holds, the page's writes would not survive it.
    fn update_status(&mut self) {
        self.update_live();
        let (status, reason) = if self.storage_failed {
            (Status::Error, Some(Reason::StorageFailed))
        } else if self.link == Link::Offline {
            (Status::Offline, Some(Reason::Offline))
        } else if self.link == Link::Unreachable {
            (Status::Offline, Some(Reason::Unreachable))
        } else if let Some(failure) = self.token.failure() {
            match failure {
                Failure::NoToken => (Status::Error, Some(Reason::TokenFailed)),
                Failure::Refused { .. } => (Status::Error, Some(Reason::Unauthorized)),
            }
        } else if self.foreign {
            (Status::Error, Some(Reason::UnexpectedAnswer))
        } else if self.checks.running() {
            (Status::Syncing, None)
        } else {
            (Status::Idle, None)
        };
        if status != self.status {
            self.status = status;
            self.events.push(Event::Status(status));
        }
        if reason != self.reason {
            self.reason = reason;
            if let (Status::Error, Some(reason)) = (status, reason) {
                let (hub_code, message) = match self.token.failure() {
                    Some(Failure::Refused { code, message }) if reason == Reason::Unauthorized => {
                        (Some(code.clone()), Some(message.clone()))
                    }
                    _ => (None, None),
                };
                self.events.push(Event::Error { reason, hub_code, message });
            }
        }
    }

    /// A debug line made of `parts`, joined only when debugging is on.
    fn log(&mut self, parts: &[&str]) {
        if self.config.debug {
            self.events.push(Event::Log(concat(&["[SYNC] ", &concat(parts)])));
        }
    }
}
