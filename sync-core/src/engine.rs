//! The sync state machine: when to check, what to fetch, what to send and resend, and what
//! to tell the page. See the crate docs for the call order.

use protocol::compact::{concat, decimal};
use protocol::wire;
use protocol::{DataType, Limits, Refusal};

use crate::cache::{CachedRecord, PerType, Persisted};
use crate::outbox::{Op, OpKind, backoff_ms};
use crate::{Event, Grant, Json, Method, Reply, Request, RequestId, Shared, Source, Status, Trigger};

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
    /// Emit [`Event::Log`] lines.
    pub debug: bool,
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
        }
    }
}

/// Op ids of finished writes remembered, so that another tab's stale copy is not adopted.
const DONE_REMEMBERED: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    Stamps,
    /// A fetch, and the check (by `Check::id`) that sent it.
    Fetch(DataType, u64),
    Write(String),
}

#[derive(Debug)]
struct InFlight {
    purpose: Purpose,
    deadline_ms: u64,
    token: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting to send the timestamp request (for a token, or for the next pump).
    Pending,
    Stamps,
    Fetching(Vec<DataType>),
}

#[derive(Debug)]
struct Check {
    id: u64,
    reason: &'static str,
    started_ms: u64,
    tickets: Vec<u64>,
    stage: Stage,
    spinner_at_ms: u64,
    spinner_shown: bool,
}

/// The client's sync engine. Construct with [`Engine::new`], then feed inputs and drain
/// outputs as the crate docs describe.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    rng: fastrand::Rng,
    now_ms: u64,
    epoch: Option<String>,
    records: PerType<CachedRecord>,
    outbox: Vec<Op>,
    done: Vec<String>,
    /// What was last announced per type (view, version, pending writes), so the page hears
    /// of every real change — a confirmed write too — and of nothing else.
    shown: PerType<(Json, u64, usize)>,
    check: Option<Check>,
    next_ticket: u64,
    next_check_id: u64,
    in_flight: Vec<(RequestId, InFlight)>,
    next_request: RequestId,
    /// Outputs wait here in order; queues are short, so a `Vec` is all they need.
    requests: Vec<Request>,
    events: Vec<Event>,
    token: Option<String>,
    token_requested: bool,
    replied_token: Option<String>,
    /// A fresh token was already fetched after a 401; another 401 means give up.
    token_refreshed: bool,
    /// The hub refused our identity (401 twice, no token, 403): status `error` until the
    /// next explicit trigger.
    auth_failed: bool,
    network_down: bool,
    online: bool,
    visible: bool,
    write_in_flight: Option<String>,
    /// The credit waiting for the page's fresh grant ([`Event::NeedGrant`]); the writes
    /// behind it wait too, so the outbox keeps its order.
    awaiting_grant: Option<String>,
    /// The hub asked (429 with `Retry-After`) that nothing be sent before this; checks
    /// triggered meanwhile end at once with cached data.
    hold_until_ms: u64,
    /// A check ended unasked because of the hold: one runs when the hold ends.
    check_after_hold: bool,
    write_attempts: u32,
    next_write_ms: u64,
    last_check_end_ms: Option<u64>,
    status: Status,
}

impl Engine {
    /// Starts an engine with what a previous page persisted. Cached data is announced at
    /// once (source [`Source::Cache`]); pending writes are sent again with their op ids.
    pub fn new(config: Config, persisted: Option<Persisted>, now: u64) -> Engine {
        let persisted = persisted.unwrap_or_default();
        let mut engine = Engine {
            rng: fastrand::Rng::with_seed(config.seed),
            config,
            now_ms: now,
            epoch: persisted.epoch,
            records: persisted.records,
            outbox: persisted.outbox,
            done: Vec::new(),
            shown: PerType::default(),
            check: None,
            next_ticket: 1,
            next_check_id: 0,
            in_flight: Vec::new(),
            next_request: 1,
            requests: Vec::new(),
            events: Vec::new(),
            token: None,
            token_requested: false,
            replied_token: None,
            token_refreshed: false,
            auth_failed: false,
            network_down: false,
            online: true,
            visible: true,
            write_in_flight: None,
            awaiting_grant: None,
            hold_until_ms: 0,
            check_after_hold: false,
            write_attempts: 0,
            next_write_ms: now,
            last_check_end_ms: None,
            status: Status::Idle,
        };
        engine.announce(Source::Cache);
        engine.pump(now);
        engine
    }

    // ---- inputs ----

    /// Starts a check (or joins the one running) and returns a ticket that a
    /// [`Event::CheckDone`] will name.
    pub fn handle_trigger(&mut self, now: u64, trigger: Trigger) -> u64 {
        self.now_ms = now;
        match trigger {
            Trigger::TabVisible | Trigger::PageShow => self.visible = true,
            Trigger::Online => {
                self.online = true;
                self.network_down = false;
                self.next_write_ms = now;
            }
            Trigger::Login | Trigger::Force | Trigger::EnsureFresh => {
                // An explicit request gets a fresh chance at auth.
                if self.auth_failed {
                    self.auth_failed = false;
                    self.token_refreshed = false;
                }
            }
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
        self.start_check(now, reason, Some(ticket));
        self.tick(now);
        self.pump(now);
        ticket
    }

    /// The tab was hidden: no inactivity checks until it is visible again.
    pub fn handle_hidden(&mut self, now: u64) {
        self.now_ms = now;
        self.visible = false;
    }

    /// The browser went offline: checks end at once with cached data, writes wait.
    pub fn handle_offline(&mut self, now: u64) {
        self.now_ms = now;
        self.online = false;
        self.pump(now);
    }

    /// The answer to [`Event::NeedToken`]: a token, or `None` if the page could not get one.
    pub fn handle_token(&mut self, now: u64, token: Option<String>) {
        self.now_ms = now;
        self.token_requested = false;
        match token {
            Some(token) => self.token = Some(token),
            None => {
                self.log(&["token unavailable → ERROR"]);
                self.auth_failed = true;
                self.finish_check(now, false);
            }
        }
        self.pump(now);
    }

    /// The answer to [`Event::NeedGrant`]: a fresh grant is stored with the op (persisted
    /// before the resend) and sent; `None` (the page has none) refuses the write and rolls it
    /// back, with code `grant_expired`.
    pub fn handle_grant(&mut self, now: u64, op_id: &str, grant: Option<String>) {
        self.now_ms = now;
        if self.awaiting_grant.as_deref() == Some(op_id) {
            self.awaiting_grant = None;
        }
        if let Some(index) = self.outbox.iter().position(|op| op.op_id == op_id) {
            match grant {
                Some(fresh) => {
                    if let OpKind::Delta { grant, .. } = &mut self.outbox[index].kind {
                        *grant = Some(fresh);
                    }
                    self.log(&["fresh grant for ", op_id, " → resend"]);
                    self.next_write_ms = now;
                    self.events.push(Event::Persist);
                }
                None => self.refuse(
                    index,
                    "grant_expired".into(),
                    "the grant expired and no fresh one came".into(),
                    None,
                ),
            }
        }
        self.pump(now);
    }

    /// What came back for request `id`. Unknown, late and duplicated replies are ignored.
    pub fn handle_reply(&mut self, now: u64, id: RequestId, reply: Reply) {
        self.now_ms = now;
        let Some(index) = self.in_flight.iter().position(|(i, _)| *i == id) else { return };
        let (_, flight) = self.in_flight.swap_remove(index);
        self.replied_token = flight.token.clone();
        if let Reply::Answer { .. } = &reply {
            self.network_down = false;
        }
        match flight.purpose {
            Purpose::Stamps => self.on_stamps(now, reply),
            Purpose::Fetch(data_type, check_id) => self.on_fetch(now, data_type, check_id, reply),
            Purpose::Write(op_id) => self.on_write(now, &op_id, reply),
        }
        self.pump(now);
    }

    /// Time passed: shows the spinner, expires requests, retries writes, runs the
    /// inactivity check.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now_ms = now;
        self.tick(now);
        self.pump(now);
    }

    /// Fresh data another tab of this site received.
    pub fn handle_shared(&mut self, now: u64, shared: Shared) {
        self.now_ms = now;
        if self.epoch.as_ref().is_some_and(|e| *e != shared.epoch) {
            return;
        }
        self.epoch = Some(shared.epoch);
        let mut changed = false;
        if let Some(op_id) = &shared.finished
            && let Some(index) = self.outbox.iter().position(|op| op.op_id == *op_id)
        {
            self.finish(index);
            changed = true;
        }
        if self.store(shared.data_type, shared.record) || changed {
            self.events.push(Event::Persist);
            self.announce(Source::Tab);
        }
    }

    /// Writes another tab (or a closed page) left in storage: the ones this engine does not
    /// know are adopted and sent too. The hub applies each op id once, so a write both tabs
    /// send is still applied once.
    pub fn handle_stored_ops(&mut self, now: u64, ops: Vec<Op>) {
        self.now_ms = now;
        let mut adopted = false;
        for op in ops {
            if !self.knows(&op.op_id) {
                self.log(&["adopted pending write ", &op.op_id, " for ", op.data_type.as_str()]);
                self.outbox.push(op);
                adopted = true;
            }
        }
        if adopted {
            self.announce(Source::Local);
            self.pump(now);
        }
    }

    /// The page is going away: send every pending write now, with `keepalive` (but a credit
    /// whose grant is known to have expired). They stay in the outbox; the next page resends
    /// what was not confirmed, and the hub applies each once.
    pub fn handle_unload(&mut self, now: u64) {
        self.now_ms = now;
        let ops: Vec<Op> = self.outbox.clone();
        for op in ops {
            if self.awaiting_grant.as_ref() != Some(&op.op_id) {
                self.send_write(now, &op, true);
            }
        }
    }

    // ---- local writes ----

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

    fn delta(
        &mut self,
        now: u64,
        data_type: DataType,
        amount: i64,
        reason: Option<String>,
        grant: Option<Grant>,
    ) -> Result<String, Refusal> {
        self.now_ms = now;
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
        // Judged by the hub's own rule; the hub normalizes what it keeps.
        let reason = reason.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
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
            Some(Grant { jwt, op_id }) if !self.knows(&op_id) => (op_id, Some(jwt)),
            Some(_) => {
                return Err(Refusal::invalid("duplicate_op", "this grant's op is already pending or done"));
            }
            None => (self.new_op_id(), None),
        };
        let op = Op { op_id, data_type, kind: OpKind::Delta { amount, reason, grant } };
        self.log(&[data_type.as_str(), ": delta ", &signed(amount), " queued (", &op.op_id, ")"]);
        Ok(self.enqueue(now, op))
    }

    /// Merges `patch` into a record (fire and forget): shown at once, sent in order, retried.
    /// The hub checks the fields; if it refuses, the change is rolled back with
    /// [`Event::Refused`].
    pub fn push_changes(&mut self, now: u64, data_type: DataType, patch: Json) -> Result<String, Refusal> {
        self.now_ms = now;
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

    // ---- outputs ----

    pub fn poll_request(&mut self) -> Option<Request> {
        (!self.requests.is_empty()).then(|| self.requests.remove(0))
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        (!self.events.is_empty()).then(|| self.events.remove(0))
    }

    /// When to call [`Engine::handle_timeout`] next, if anything waits on time.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        let mut consider = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(check) = &self.check
            && !check.spinner_shown
        {
            consider(check.spinner_at_ms);
        }
        for (_, flight) in &self.in_flight {
            consider(flight.deadline_ms);
        }
        if self.writes_may_go() && !self.token_requested {
            consider(self.next_write_ms);
        }
        if let Some(at) = self.inactivity_due() {
            consider(at);
        }
        if self.check_after_hold {
            consider(self.hold_until_ms);
        }
        next
    }

    // ---- queries ----

    pub fn status(&self) -> Status {
        self.status
    }

    /// What the page should show for `data_type`: the hub's data with pending local writes
    /// applied, or `None` if nothing is known yet.
    pub fn view(&self, data_type: DataType) -> Option<Json> {
        let base = self.records.get(data_type);
        let pending = self.outbox.iter().filter(|op| op.data_type == data_type);
        if base.is_none() && pending.clone().next().is_none() {
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
        self.outbox.iter()
    }

    /// What to store so that the next page starts where this one is.
    pub fn persisted(&self) -> Persisted {
        Persisted { epoch: self.epoch.clone(), records: self.records.clone(), outbox: self.outbox.clone() }
    }

    // ---- checks ----

    fn start_check(&mut self, now: u64, reason: &'static str, ticket: Option<u64>) {
        match &mut self.check {
            Some(check) => check.tickets.extend(ticket),
            None => {
                self.log(&[reason, " - checking timestamps"]);
                self.next_check_id += 1;
                self.check = Some(Check {
                    id: self.next_check_id,
                    reason,
                    started_ms: now,
                    tickets: ticket.into_iter().collect(),
                    stage: Stage::Pending,
                    spinner_at_ms: now + self.config.spinner_delay_ms,
                    spinner_shown: false,
                });
            }
        }
        self.update_status();
    }

    fn finish_check(&mut self, now: u64, fresh: bool) {
        let Some(check) = self.check.take() else { return };
        if check.spinner_shown {
            self.events.push(Event::Spinner(false));
        }
        let elapsed = now.saturating_sub(check.started_ms);
        if fresh {
            let hundredths = elapsed % 1000 / 10;
            let pad = if hundredths < 10 { "0" } else { "" };
            self.log(&["Sync complete in ", &decimal(elapsed / 1000), ".", pad, &decimal(hundredths), "s"]);
        } else {
            self.log(&[check.reason, " check ended without the hub; using cached data"]);
        }
        for ticket in check.tickets {
            self.events.push(Event::CheckDone { ticket, fresh });
        }
        self.last_check_end_ms = Some(now);
        self.update_status();
    }

    fn inactivity_due(&self) -> Option<u64> {
        if !self.visible || !self.online || self.check.is_some() {
            return None;
        }
        self.last_check_end_ms.map(|end| end + self.config.inactivity_ms)
    }

    fn on_stamps(&mut self, now: u64, reply: Reply) {
        let body = match self.answer_of(now, reply, "timestamp check") {
            Ok(body) => body,
            Err(retry_with_token) => {
                if retry_with_token && let Some(check) = &mut self.check {
                    check.stage = Stage::Pending;
                } else {
                    self.finish_check(now, false);
                }
                return;
            }
        };
        let Some(epoch) = wire::epoch(&body).map(str::to_owned) else {
            self.log(&["timestamp answer without epoch → ERROR"]);
            self.finish_check(now, false);
            return;
        };
        if self.epoch.as_ref().is_some_and(|e| *e != epoch) {
            self.log(&["hub epoch changed (", &epoch, ") → cache dropped"]);
            self.records.clear();
            self.events.push(Event::Persist);
        }
        self.epoch = Some(epoch);
        let mut fetch = Vec::new();
        for data_type in self.config.data_types.clone() {
            let server = wire::stamp_version(&body, data_type);
            let local = self.records.get(data_type).map(|r| r.version);
            let changed = local.is_none() || server != local;
            let show = |v: Option<u64>| v.map_or_else(|| "none".to_owned(), |v| concat(&["v", &decimal(v)]));
            let decision = if changed { "FETCH" } else { "SKIP" };
            self.log(&[
                data_type.as_str(),
                ": server=",
                &show(server),
                ", local=",
                &show(local),
                " → ",
                decision,
            ]);
            if changed {
                fetch.push(data_type);
            }
        }
        if fetch.is_empty() {
            self.finish_check(now, true);
            return;
        }
        for data_type in &fetch {
            let etag = self.records.get(*data_type).map(|r| wire::etag(r.version));
            let query = wire::get_query(&self.config.user_id, *data_type);
            let check_id = self.check.as_ref().map_or(0, |c| c.id);
            self.send(now, Purpose::Fetch(*data_type, check_id), Method::Get, Some(query), None, etag, false);
        }
        if let Some(check) = &mut self.check {
            check.stage = Stage::Fetching(fetch);
        }
    }

    fn on_fetch(&mut self, now: u64, data_type: DataType, check_id: u64, reply: Reply) {
        let not_modified = matches!(reply, Reply::Answer { status: 304, .. });
        if !not_modified {
            match self.answer_of(now, reply, "fetch") {
                Ok(body) => {
                    if let Some(record) = CachedRecord::from_json(&body)
                        && self.store(data_type, record.clone())
                    {
                        self.share(data_type, record, None);
                        self.events.push(Event::Persist);
                        self.announce(Source::Hub);
                    }
                }
                Err(retry_with_token) => {
                    if retry_with_token {
                        // Refetch everything with the new token through a fresh timestamp check.
                        if let Some(check) = &mut self.check {
                            check.stage = Stage::Pending;
                        }
                    } else {
                        self.finish_check(now, false);
                    }
                    return;
                }
            }
        }
        let done = match &mut self.check {
            Some(Check { id, stage: Stage::Fetching(remaining), .. }) if *id == check_id => {
                remaining.retain(|t| *t != data_type);
                remaining.is_empty()
            }
            _ => false,
        };
        if done {
            self.finish_check(now, true);
        }
    }

    // ---- writes ----

    fn enqueue(&mut self, now: u64, op: Op) -> String {
        let op_id = op.op_id.clone();
        self.outbox.push(op);
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

    fn send_write(&mut self, now: u64, op: &Op, keepalive: bool) {
        let body = op.body(&self.config.user_id, &self.config.site_id);
        self.send(now, Purpose::Write(op.op_id.clone()), Method::Post, None, Some(body), None, keepalive);
    }

    fn on_write(&mut self, now: u64, op_id: &str, reply: Reply) {
        if self.write_in_flight.as_deref() == Some(op_id) {
            self.write_in_flight = None;
        }
        let Some(index) = self.outbox.iter().position(|op| op.op_id == op_id) else { return };
        let data_type = self.outbox[index].data_type;
        let retry_after = match &reply {
            Reply::Answer { retry_after, .. } => retry_after.unwrap_or(0) * 1000,
            Reply::NetworkError => 0,
        };
        let (status, body) = match reply {
            Reply::Answer { status, body, .. } => (status, body),
            Reply::NetworkError => {
                self.network_down = true;
                self.retry_later(now, 0, "network error");
                return;
            }
        };
        match status {
            200 => {
                self.write_attempts = 0;
                self.next_write_ms = now;
                self.token_refreshed = false;
                self.finish(index);
                if let Some(record) = CachedRecord::from_json(&body) {
                    let outcome = if wire::replayed(&body) { " replayed v" } else { " applied v" };
                    self.log(&[data_type.as_str(), ": write ", op_id, outcome, &decimal(record.version)]);
                    self.store(data_type, record.clone());
                    self.share(data_type, record, Some(op_id.to_owned()));
                }
                self.events.push(Event::Persist);
                self.announce(Source::Hub);
            }
            401 => {
                if !self.refresh_token() {
                    self.retry_later(now, 0, "token refused");
                }
            }
            429 | 408 | 500..=599 => {
                if status == 429 {
                    self.hold(now, retry_after);
                }
                self.retry_later(now, retry_after, "hub busy");
            }
            _ => {
                let refusal = wire::refusal(&body);
                let code = refusal.code.unwrap_or("refused");
                // The hub never applied the op: with a fresh grant for the same op id, the
                // next attempt is still a retry.
                if code == "grant_expired"
                    && self.config.asks_for_grants
                    && let OpKind::Delta { amount, reason, .. } = &self.outbox[index].kind
                {
                    if self.awaiting_grant.as_deref() != Some(op_id) {
                        let need = Event::NeedGrant {
                            op_id: op_id.into(),
                            data_type,
                            amount: *amount,
                            reason: reason.clone(),
                        };
                        self.log(&[
                            data_type.as_str(),
                            ": grant of ",
                            op_id,
                            " expired → asking for a fresh one",
                        ]);
                        self.awaiting_grant = Some(op_id.into());
                        self.events.push(need);
                    }
                    return;
                }
                let message = refusal.message.unwrap_or("the hub refused the write");
                let current = refusal.current.map(CachedRecord::from);
                self.refuse(index, code.into(), message.into(), current);
            }
        }
    }

    /// Rolls back the write at `index` after a final refusal, and adopts the record the hub
    /// sent with it.
    fn refuse(&mut self, index: usize, code: String, message: String, current: Option<CachedRecord>) {
        let op = self.finish(index);
        let data_type = op.data_type;
        self.log(&[data_type.as_str(), ": write ", &op.op_id, " refused: ", &code, " → ROLLBACK"]);
        if let Some(current) = current {
            self.store(data_type, current.clone());
            self.share(data_type, current, Some(op.op_id.clone()));
        }
        self.events.push(Event::Refused { data_type, op_id: op.op_id, code, message });
        self.events.push(Event::Persist);
        self.announce(Source::Hub);
    }

    /// Takes the write at `index` out of the outbox for good (confirmed or refused).
    fn finish(&mut self, index: usize) -> Op {
        let op = self.outbox.remove(index);
        if self.awaiting_grant.as_ref() == Some(&op.op_id) {
            self.awaiting_grant = None;
        }
        self.remember_done(op.op_id.clone());
        op
    }

    /// Whether `op_id` is pending here or was finished lately.
    fn knows(&self, op_id: &str) -> bool {
        self.outbox.iter().any(|op| op.op_id == op_id) || self.done.iter().any(|done| done == op_id)
    }

    /// Whether the next write may be sent once its time comes.
    fn writes_may_go(&self) -> bool {
        self.online
            && !self.auth_failed
            && self.write_in_flight.is_none()
            && self.awaiting_grant.is_none()
            && !self.outbox.is_empty()
    }

    fn retry_later(&mut self, now: u64, retry_after_ms: u64, why: &str) {
        self.write_attempts += 1;
        let delay = backoff_ms(
            self.write_attempts,
            self.config.retry_base_ms,
            self.config.retry_max_ms,
            retry_after_ms,
            &mut self.rng,
        );
        self.next_write_ms = now + delay;
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

    fn hold(&mut self, now: u64, ms: u64) {
        self.hold_until_ms = self.hold_until_ms.max(now + ms);
    }

    fn remember_done(&mut self, op_id: String) {
        if self.done.len() == DONE_REMEMBERED {
            self.done.remove(0);
        }
        self.done.push(op_id);
    }

    // ---- plumbing ----

    /// Runs what is due at `now`: the spinner, request deadlines, the inactivity check.
    fn tick(&mut self, now: u64) {
        if let Some(check) = &mut self.check
            && !check.spinner_shown
            && now >= check.spinner_at_ms
        {
            check.spinner_shown = true;
            self.events.push(Event::Spinner(true));
        }
        let expired: Vec<RequestId> =
            self.in_flight.iter().filter(|(_, f)| now >= f.deadline_ms).map(|(id, _)| *id).collect();
        for id in expired {
            self.log(&["request timed out"]);
            self.handle_reply(now, id, Reply::NetworkError);
        }
        if self.inactivity_due().is_some_and(|at| now >= at) {
            self.start_check(now, "Inactivity", None);
        }
        if self.check_after_hold && now >= self.hold_until_ms {
            self.check_after_hold = false;
            self.start_check(now, "After Retry-After", None);
        }
    }

    /// Sends what can be sent: the pending check, then the next write.
    fn pump(&mut self, now: u64) {
        let check_pending = self.check.as_ref().is_some_and(|c| c.stage == Stage::Pending);
        if check_pending && now < self.hold_until_ms {
            self.log(&["the hub asked to wait (429) → cached data"]);
            self.check_after_hold = true;
        }
        if check_pending && (!self.online || self.auth_failed || now < self.hold_until_ms) {
            self.finish_check(now, false);
        }
        let check_pending = self.check.as_ref().is_some_and(|c| c.stage == Stage::Pending);
        let write_due = self.writes_may_go() && now >= self.next_write_ms;
        if (check_pending || write_due) && self.config.needs_token && self.token.is_none() {
            if !self.token_requested && !self.auth_failed {
                self.token_requested = true;
                self.events.push(Event::NeedToken);
            }
            self.update_status();
            return;
        }
        if check_pending {
            let query = wire::timestamp_query(&self.config.user_id, &self.config.data_types);
            self.send(now, Purpose::Stamps, Method::Get, Some(query), None, None, false);
            if let Some(check) = &mut self.check {
                check.stage = Stage::Stamps;
            }
        }
        if write_due && let Some(op) = self.outbox.first().cloned() {
            self.write_in_flight = Some(op.op_id.clone());
            self.send_write(now, &op, false);
        }
        self.update_status();
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        now: u64,
        purpose: Purpose,
        method: Method,
        query: Option<String>,
        body: Option<Json>,
        if_none_match: Option<String>,
        keepalive: bool,
    ) {
        let id = self.next_request;
        self.next_request += 1;
        let token = if self.config.needs_token { self.token.clone() } else { None };
        let deadline_ms = now + self.config.request_timeout_ms;
        self.in_flight.push((id, InFlight { purpose, deadline_ms, token: token.clone() }));
        self.requests.push(Request { id, method, query, body, if_none_match, token, keepalive });
    }

    /// The JSON body of a successful answer, or `Err(true)` when the request should be
    /// repeated with a fresh token, `Err(false)` when it failed.
    fn answer_of(&mut self, now: u64, reply: Reply, what: &str) -> Result<Json, bool> {
        match reply {
            Reply::NetworkError => {
                self.network_down = true;
                self.log(&[what, ": hub unreachable → OFFLINE"]);
                Err(false)
            }
            Reply::Answer { status: 200, body, .. } => {
                self.token_refreshed = false;
                if body.is_object() {
                    Ok(body)
                } else {
                    self.log(&[what, ": unreadable answer"]);
                    Err(false)
                }
            }
            Reply::Answer { status: 401, .. } => Err(self.refresh_token()),
            Reply::Answer { status, retry_after, .. } => {
                if status == 429 {
                    self.hold(now, retry_after.unwrap_or(1) * 1000);
                }
                if (400..500).contains(&status) && status != 429 && status != 408 {
                    self.auth_failed = status == 403;
                }
                self.log(&[what, ": hub answered ", &decimal(u64::from(status))]);
                Err(false)
            }
        }
    }

    /// After a 401: asks for a fresh token once. Returns whether it did.
    fn refresh_token(&mut self) -> bool {
        if self.replied_token != self.token {
            return true;
        }
        self.token = None;
        if self.token_refreshed || !self.config.needs_token {
            self.log(&["token refused again → ERROR"]);
            self.auth_failed = true;
            return false;
        }
        self.log(&["token refused → asking for a fresh one"]);
        self.token_refreshed = true;
        true
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
            let pending = self.outbox.iter().filter(|op| op.data_type == data_type).count();
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

    fn update_status(&mut self) {
        let status = if !self.online || self.network_down {
            Status::Offline
        } else if self.auth_failed {
            Status::Error
        } else if self.check.is_some() {
            Status::Syncing
        } else {
            Status::Idle
        };
        if status != self.status {
            self.status = status;
            self.events.push(Event::Status(status));
        }
    }

    /// A debug line made of `parts`, joined only when debugging is on.
    fn log(&mut self, parts: &[&str]) {
        if self.config.debug {
            self.events.push(Event::Log(concat(&["[SYNC] ", &concat(parts)])));
        }
    }
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
