//! An in-memory hub with the real hub's rules (hub/src/domain.rs and hub/src/http): records
//! with version, last_updated and epoch, merge-patch pushes, deltas applied once per op id,
//! batches of them applied in order, ETag/304, bearer tokens (a page's: its credits need a
//! grant), grants for credits, and — with a retention — op ids forgotten once the horizon
//! passes both their date and their arrival, an unknown UUIDv7 op dated before it refused
//! `422 op_expired`. It parses requests with the real hub's parser and validates data with the
//! `protocol` crate, answers with `protocol`'s answer types and a `Date`, so the engine sees
//! the real shapes. It can be switched down (no answer), busy (429 with Retry-After),
//! unavailable (503), behind something that answers for it (a proxy's 4xx, a bare 200), or
//! set to fail a batch half way; its clock can be skewed from the world's; and it counts how
//! many times each op id was applied. It keeps every committed change, numbered, for event
//! streams: what a stream opened now starts with (`ready`, after the changes a `Last-Event-ID`
//! missed, or `resync` when it names changes no longer kept or another epoch), and the
//! changes after a position, each with its data when small. Does no I/O and reads no clock.
//!
//! It cannot check signatures: a grant is valid when this hub minted it (standing in for the
//! site's backend signing it with the site's key), and is then checked as the real hub checks
//! one: bound to its site, user, op id, data type and amounts, and to its expiry on the fake
//! clock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use base64::Engine as _;

use protocol::wire::code::TOKEN_EXPIRED;
use protocol::{
    BatchAnswer, BatchRequest, DataType, DeltaAnswer, ErrorAnswer, GetAnswer, GetManyAnswer, Limits,
    MAX_AMOUNT, OpId, PostRequest, PushAnswer, RecordState, SiteId, Stamp, TimestampAnswer, TimestampsAnswer,
    amount_field, merge_patch, parse_data_types, uuid7_ms, validate_delta, validate_push, validate_reason,
    validate_record,
};
use serde_json::{Value, json};
use sync_core::{Json, Method, Reply, Request, StreamEvent};

/// One record as the hub stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct HubRecord {
    pub data: Value,
    /// 0 = never written, +1 on every change.
    pub version: u64,
    /// The hub's clock at the last change; strictly increasing per record.
    pub updated_ms: Option<u64>,
}

impl HubRecord {
    fn empty(data_type: DataType) -> HubRecord {
        HubRecord { data: data_type.empty_data(), version: 0, updated_ms: None }
    }

    pub fn last_updated(&self) -> Option<String> {
        self.updated_ms.map(rfc3339_ms)
    }

    fn state(&self) -> RecordState {
        RecordState { data: self.data.clone(), last_updated: self.last_updated(), version: self.version }
    }
}

/// How the hub answers the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Up,
    /// No answer at all: the shell sees a network error.
    Down,
    /// `429 rate_limited` with `Retry-After: retry_after` seconds.
    Busy {
        retry_after: u64,
    },
    /// `503 store_unavailable`.
    Unavailable,
    /// Something in front of the hub answers instead, with this status and a body that is not
    /// the hub's (a proxy's or a firewall's, or a captive portal's 200).
    Foreign {
        status: u16,
    },
}

/// One request as the hub saw it, for tests to count and inspect.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `timestamp`, `get`, `push`, `delta`, or `?` when unreadable.
    pub action: String,
    /// The `data_type` of the query or body, as sent (`balance,profile` for a check).
    pub data_type: String,
    pub op_id: Option<String>,
    /// The grant a delta carried.
    pub grant: Option<String>,
    pub keepalive: bool,
    /// The status answered, or `None` when the hub was down.
    pub status: Option<u16>,
    /// How many writes the request carried: 1 for a push or delta, the ops of a batch (each
    /// of which is also seen on its own, with `in_batch`), 0 for a read.
    pub writes: usize,
    /// A write inside a batch.
    pub in_batch: bool,
    /// Answered by something in front of the hub ([`Mode::Foreign`]), not the hub.
    pub foreign: bool,
}

/// An applied change to an amount, as the hub's audit ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub user: String,
    pub data_type: DataType,
    pub op_id: String,
    pub delta: i64,
    pub result: i64,
}

#[derive(Debug, Clone)]
struct SeenOp {
    fingerprint: String,
    /// The record as the first write left it (or as it was when the write was refused):
    /// what a replay answers.
    answer: HubRecord,
    data_type: DataType,
    /// The refusal the op got (`insufficient_funds`, `version_conflict`, `credit_limit`), with
    /// its status, kept for good.
    refusal: Option<Refused>,
    /// When the hub first saw it (the hub's clock): it is remembered until the horizon passes
    /// both this and the date its id carries.
    arrived_ms: u64,
}

/// What a grant says, as the site's backend signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantClaims {
    pub site: String,
    pub user: String,
    pub op_id: String,
    pub data_type: DataType,
    pub amount: i64,
    /// `exp` on the fake clock, in milliseconds.
    pub expires_ms: u64,
}

/// One committed change, as event streams send it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Its position: 1 for the first change, +1 for each.
    pub seq: u64,
    pub user: String,
    pub data_type: DataType,
    pub record: HubRecord,
}

/// Why an event stream did not open: the status (0: no answer), the body, `Retry-After`.
pub type StreamRefusal = (u16, Json, Option<u64>);

/// How long the grants a site's backend mints live, unless a test says otherwise: the
/// longest the real hub accepts.
pub const GRANT_TTL_MS: u64 = 10 * 60 * 1000;

/// A refusal for a reason of the record's state: status, code, message.
type Refused = (u16, &'static str, &'static str);

/// The fake hub. Starts up, with auth on and one epoch.
#[derive(Debug)]
pub struct FakeHub {
    epoch: String,
    /// Per user, per data type.
    records: BTreeMap<String, BTreeMap<DataType, HubRecord>>,
    /// Per user, per op id: what the op ids already applied answer.
    ops: BTreeMap<String, BTreeMap<String, SeenOp>>,
    applied: BTreeMap<String, u32>,
    ledger: Vec<LedgerEntry>,
    mode: Mode,
    /// Modes for the next requests, before `mode` applies again.
    script: VecDeque<Mode>,
    tokens_required: bool,
    /// Valid tokens and whom they speak for: (site, user).
    tokens: BTreeMap<String, (String, String)>,
    /// Tokens this hub minted that have expired: `401 token_expired`, counted against their
    /// user, never against the address.
    expired: BTreeSet<String>,
    /// Requests without a token the hub knows (none, or one it cannot verify) are answered
    /// `429 rate_limited` with this `Retry-After`: other clients at the page's address have
    /// used up the address's limit.
    anonymous_limited: Option<u64>,
    minted: u64,
    /// Grants the sites' backends minted (this hub's stand-in for their signatures).
    grants: BTreeMap<String, GrantClaims>,
    grant_ttl_ms: u64,
    /// The site's `max_credit_per_op`.
    max_credit_per_op: Option<i64>,
    /// How long op ids are remembered: the horizon is the hub's clock minus this. `None`:
    /// forever (the real hub's seven days are longer than any test's world).
    retention_ms: Option<u64>,
    /// The hub's clock minus the world's (the devices').
    skew_ms: i64,
    /// The next batch fails at this op (503), and the ops after it are not attempted.
    fail_batch_at: Option<usize>,
    /// Answers a batch as a hub from before batches does: `400 unknown_action`.
    refuses_batches: bool,
    seen: Vec<Seen>,
    /// Every committed change, oldest first.
    changes: Vec<Change>,
    /// Changes numbered below this are no longer kept: a stream resuming before it gets
    /// `resync`.
    kept_from: u64,
    /// `GET /api/events` exists (a hub without events answers 404).
    events: bool,
    /// A change event carries its data when that is at most this many bytes of JSON.
    inline_limit: usize,
    /// Event streams opened.
    streams_opened: u64,
}

impl FakeHub {
    pub fn new(epoch: &str) -> FakeHub {
        FakeHub {
            epoch: epoch.into(),
            records: BTreeMap::new(),
            ops: BTreeMap::new(),
            applied: BTreeMap::new(),
            ledger: Vec::new(),
            mode: Mode::Up,
            script: VecDeque::new(),
            tokens_required: true,
            tokens: BTreeMap::new(),
            expired: BTreeSet::new(),
            anonymous_limited: None,
            minted: 0,
            grants: BTreeMap::new(),
            grant_ttl_ms: GRANT_TTL_MS,
            max_credit_per_op: None,
            retention_ms: None,
            skew_ms: 0,
            fail_batch_at: None,
            refuses_batches: false,
            seen: Vec::new(),
            changes: Vec::new(),
            kept_from: 1,
            events: true,
            inline_limit: 2048,
            streams_opened: 0,
        }
    }

    // ---- switches ----

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn down(&mut self) {
        self.mode = Mode::Down;
    }

    pub fn up(&mut self) {
        self.mode = Mode::Up;
        self.script.clear();
    }

    /// The next requests get these modes, one each, before the standing mode applies again.
    pub fn script(&mut self, modes: impl IntoIterator<Item = Mode>) {
        self.script.extend(modes);
    }

    pub fn set_tokens_required(&mut self, required: bool) {
        self.tokens_required = required;
    }

    pub fn tokens_required(&self) -> bool {
        self.tokens_required
    }

    /// A token as `site`'s backend mints it for `user`.
    pub fn mint_token(&mut self, site: &str, user: &str) -> String {
        self.minted += 1;
        let token = format!("jwt-{site}-{user}-{}", self.minted);
        self.tokens.insert(token.clone(), (site.into(), user.into()));
        token
    }

    /// A grant as `site`'s backend mints it for one credit of `user`: a compact JWS whose
    /// payload names the op, the data type and the exact amounts, living
    /// [`FakeHub::set_grant_ttl`] from `now`.
    pub fn mint_grant(
        &mut self,
        now: u64,
        site: &str,
        user: &str,
        op_id: &str,
        data_type: DataType,
        amount: i64,
    ) -> String {
        self.minted += 1;
        let field = amount_field(data_type).expect("grants are for amounts");
        let expires_ms = now + self.grant_ttl_ms;
        let claims = json!({
            "iss": site, "sub": user, "aud": "fake-hub", "exp": expires_ms / 1000,
            "op_id": op_id, "data_type": data_type, "delta": { field: amount },
        });
        let encode =
            |value: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string());
        let header = encode(&json!({"alg": "HS256", "typ": "grant+jwt"}));
        let grant = format!("{header}.{}.sig{}", encode(&claims), self.minted);
        let claims = GrantClaims {
            site: site.into(),
            user: user.into(),
            op_id: op_id.into(),
            data_type,
            amount,
            expires_ms,
        };
        self.grants.insert(grant.clone(), claims);
        grant
    }

    /// How long grants minted from now on live.
    pub fn set_grant_ttl(&mut self, ms: u64) {
        self.grant_ttl_ms = ms;
    }

    /// The sites' `max_credit_per_op`: a larger credit is `403 credit_limit`.
    pub fn set_max_credit_per_op(&mut self, max: i64) {
        self.max_credit_per_op = Some(max);
    }

    /// Op ids are forgotten once the horizon (the hub's clock minus `ms`) passes both their
    /// date and their arrival; an unknown UUIDv7 op dated before it is `422 op_expired`.
    pub fn set_retention(&mut self, ms: u64) {
        self.retention_ms = Some(ms);
    }

    /// The hub's clock runs `ms` ahead of the world's (behind, when negative): the devices'
    /// clocks are that wrong.
    pub fn set_skew(&mut self, ms: i64) {
        self.skew_ms = ms;
    }

    /// The next batch fails at its op `index` (a 503 the store gave), and the ops after it are
    /// answered `not_attempted`.
    pub fn fail_next_batch_at(&mut self, index: usize) {
        self.fail_batch_at = Some(index);
    }

    /// Whether this hub answers a batch as one from before batches does (`400
    /// unknown_action`).
    pub fn set_refuses_batches(&mut self, refuses: bool) {
        self.refuses_batches = refuses;
    }

    /// Whether this hub has `/api/events` (else it answers 404, as a hub without events).
    pub fn set_events(&mut self, on: bool) {
        self.events = on;
    }

    /// Change events carry their data when it is at most `bytes` of JSON (the real hub's
    /// limit is 2048); others are fetched.
    pub fn set_inline_limit(&mut self, bytes: usize) {
        self.inline_limit = bytes;
    }

    /// The changes kept so far are forgotten: a stream resuming from before now gets `resync`.
    pub fn forget_changes(&mut self) {
        self.kept_from = self.changes.len() as u64 + 1;
    }

    /// The hub's clock when the world's says `now`.
    pub fn clock(&self, now: u64) -> u64 {
        now.saturating_add_signed(self.skew_ms)
    }

    /// Every token minted so far expires.
    pub fn expire_tokens(&mut self) {
        self.expired.extend(std::mem::take(&mut self.tokens).into_keys());
    }

    /// A token `site`'s backend minted for `user` that has expired already (a stale one it
    /// kept too long).
    pub fn mint_expired_token(&mut self, site: &str, user: &str) -> String {
        let token = self.mint_token(site, user);
        self.tokens.remove(&token);
        self.expired.insert(token.clone());
        token
    }

    /// Whether requests without a token the hub knows are refused `429` with `Retry-After:
    /// retry_after` seconds (`Some`), as when anonymous clients at the page's address flood
    /// the hub, or answered `401` (`None`).
    pub fn set_anonymous_limited(&mut self, retry_after: Option<u64>) {
        self.anonymous_limited = retry_after;
    }

    /// A new database: every record, op id and kept change is gone, and the epoch changes.
    pub fn replace_database(&mut self, epoch: &str) {
        self.epoch = epoch.into();
        self.records.clear();
        self.ops.clear();
        self.forget_changes();
    }

    /// Writes a record directly, as another writer (the agent, an admin) would: +1 version.
    pub fn write(&mut self, now: u64, user: &str, data_type: DataType, data: Value) -> HubRecord {
        let current = self.record(user, data_type);
        let record = HubRecord {
            data,
            version: current.version + 1,
            updated_ms: Some(current.updated_ms.map_or(now, |prev| now.max(prev + 1))),
        };
        self.commit(user, data_type, record.clone());
        record
    }

    /// Stores a new version of a record and keeps the change for event streams.
    fn commit(&mut self, user: &str, data_type: DataType, record: HubRecord) {
        self.records.entry(user.into()).or_default().insert(data_type, record.clone());
        let seq = self.changes.len() as u64 + 1;
        self.changes.push(Change { seq, user: user.into(), data_type, record });
    }

    // ---- event streams ----

    /// Opens `user`'s event stream for a page with `token`, resuming after `last_event_id`:
    /// the events it starts with and its position, or why it did not open.
    pub fn open_stream(
        &mut self,
        token: Option<&str>,
        user: &str,
        last_event_id: Option<&str>,
    ) -> Result<(Vec<StreamEvent>, u64), StreamRefusal> {
        let refused = |reply: Reply| match reply {
            Reply::Answer { status, body, retry_after, .. } => (status, body, retry_after),
            Reply::NetworkError => (0, Json::Null, None),
        };
        let mode = self.script.pop_front().unwrap_or(self.mode);
        match mode {
            Mode::Down => return Err((0, Json::Null, None)),
            Mode::Busy { retry_after } => {
                let reply = error_with(429, "too_many_streams", "too many streams", None, Some(retry_after));
                return Err(refused(reply));
            }
            Mode::Unavailable => return Err(refused(error(503, "store_unavailable", "retry"))),
            Mode::Foreign { status } => {
                return Err((status, Json::object().with("message", "blocked"), None));
            }
            Mode::Up => {}
        }
        if !self.events {
            return Err(refused(error(404, "not_found", "no such endpoint")));
        }
        match self.caller(token) {
            Err(reply) => return Err(refused(reply)),
            Ok(Some((_, who))) if who != user => {
                return Err(refused(error(403, "forbidden", "another user")));
            }
            Ok(_) => {}
        }
        self.streams_opened += 1;
        let position = self.changes.len() as u64;
        let resume = last_event_id.and_then(|id| {
            let (epoch, seq) = id.rsplit_once('.')?;
            let seq: u64 = seq.parse().ok()?;
            (epoch == self.epoch && seq + 1 >= self.kept_from && seq <= position).then_some(seq)
        });
        let mut events = match resume {
            Some(seq) => self.changes_after(user, seq),
            None if last_event_id.is_some() => {
                vec![self.stream_event("resync", position, Json::object().with("epoch", self.epoch.as_str()))]
            }
            None => Vec::new(),
        };
        let ready = Json::object().with("epoch", self.epoch.as_str()).with("resumed", resume.is_some());
        events.push(self.stream_event("ready", position, ready));
        Ok((events, position))
    }

    /// `user`'s change events after position `after`.
    pub fn changes_after(&self, user: &str, after: u64) -> Vec<StreamEvent> {
        let start = usize::try_from(after).unwrap_or(usize::MAX).min(self.changes.len());
        self.changes[start..]
            .iter()
            .filter(|change| change.user == user)
            .map(|change| {
                let record = &change.record;
                let mut data = Json::object()
                    .with("data_type", change.data_type.as_str())
                    .with("version", record.version)
                    .with("last_updated", record.last_updated());
                if record.data.to_string().len() <= self.inline_limit {
                    data.set("data", Json::from(&record.data));
                }
                self.stream_event("", change.seq, data)
            })
            .collect()
    }

    /// The position of the last change.
    pub fn position(&self) -> u64 {
        self.changes.len() as u64
    }

    /// Whether a stream opened with `token` may go on (its token has not expired).
    pub fn token_valid(&self, token: Option<&str>) -> bool {
        !self.tokens_required || token.is_some_and(|t| self.tokens.contains_key(t))
    }

    /// How many event streams opened.
    pub fn streams_opened(&self) -> u64 {
        self.streams_opened
    }

    fn stream_event(&self, name: &str, seq: u64, data: Json) -> StreamEvent {
        StreamEvent { name: name.into(), id: Some(format!("{}.{seq}", self.epoch)), data }
    }

    // ---- what tests read ----

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn record(&self, user: &str, data_type: DataType) -> HubRecord {
        self.records
            .get(user)
            .and_then(|records| records.get(&data_type))
            .cloned()
            .unwrap_or_else(|| HubRecord::empty(data_type))
    }

    /// How many times the hub applied `op_id` (replays do not count).
    pub fn applied(&self, op_id: &str) -> u32 {
        self.applied.get(op_id).copied().unwrap_or(0)
    }

    pub fn applied_ops(&self) -> &BTreeMap<String, u32> {
        &self.applied
    }

    pub fn ledger(&self) -> &[LedgerEntry] {
        &self.ledger
    }

    /// Every request received, oldest first.
    pub fn seen(&self) -> &[Seen] {
        &self.seen
    }

    // ---- requests ----

    /// Answers one request at time `now` (the world's clock), dated by the hub's.
    pub fn handle(&mut self, now: u64, request: &Request) -> Reply {
        let mode = self.script.pop_front().unwrap_or(self.mode);
        let mut seen = describe(request);
        let at = self.seen.len();
        self.forget(now);
        let mut reply = match mode {
            Mode::Down => Reply::NetworkError,
            Mode::Busy { retry_after } => {
                error_with(429, "rate_limited", "too many requests; retry later", None, Some(retry_after))
            }
            Mode::Unavailable => error(503, "store_unavailable", "the store cannot serve right now; retry"),
            Mode::Foreign { status } => {
                seen.status = Some(status);
                seen.foreign = true;
                self.seen.push(seen);
                let body = Json::object().with("message", "Request blocked by the gateway");
                return Reply::Answer { status, body, retry_after: None, date: None, etag: None };
            }
            Mode::Up => match request.method {
                Method::Get => self.get(now, request),
                Method::Post => self.post(now, request),
            },
        };
        seen.status = match &mut reply {
            Reply::Answer { status, date, .. } => {
                // HTTP dates count whole seconds.
                *date = Some(self.clock(now) / 1000 * 1000);
                Some(*status)
            }
            Reply::NetworkError => None,
        };
        // A batch's ops were seen as they were applied; the batch itself comes first.
        self.seen.insert(at, seen);
        reply
    }

    /// Forgets the op ids the horizon has passed, date and arrival both.
    fn forget(&mut self, now: u64) {
        let Some(retention) = self.retention_ms else { return };
        let horizon = self.clock(now).saturating_sub(retention);
        for ops in self.ops.values_mut() {
            ops.retain(|op_id, seen| {
                let dated = uuid7_ms(op_id).map_or(0, |ms| ms.max(0) as u64);
                dated.max(seen.arrived_ms) >= horizon
            });
        }
    }

    /// Who the request's token speaks for: `Ok(None)` with auth off; `401 token_expired` for a
    /// token the hub minted that has expired; and for a missing token or one the hub did not
    /// mint, a 401, or a 429 while anonymous requests are limited.
    fn caller(&self, token: Option<&str>) -> Result<Option<(String, String)>, Reply> {
        if !self.tokens_required {
            return Ok(None);
        }
        let anonymous = |code, message| match self.anonymous_limited {
            Some(secs) => error_with(429, "rate_limited", "too many requests; retry later", None, Some(secs)),
            None => error(401, code, message),
        };
        let Some(token) = token else {
            return Err(anonymous("missing_token", "send Authorization: Bearer <token>"));
        };
        if let Some(who) = self.tokens.get(token) {
            return Ok(Some(who.clone()));
        }
        if self.expired.contains(token) {
            return Err(error(401, TOKEN_EXPIRED, "the token has expired; ask the site for a fresh one"));
        }
        Err(anonymous("invalid_token", "the token is invalid"))
    }

    fn get(&mut self, _now: u64, request: &Request) -> Reply {
        let caller = match self.caller(request.token.as_deref()) {
            Ok(caller) => caller,
            Err(reply) => return reply,
        };
        let params = query_params(request.query.as_deref().unwrap_or(""));
        let (Some(action), Some(user), Some(list)) =
            (params.get("action"), params.get("user_id"), params.get("data_type"))
        else {
            return error(400, "missing_field", "the query needs action, user_id and data_type");
        };
        if caller.as_ref().is_some_and(|(_, u)| u != user) {
            return error(403, "wrong_user", "the token does not speak for this user_id");
        }
        let types = match parse_data_types(list) {
            Ok(types) => types,
            Err(refusal) => return error(400, refusal.code, &refusal.message),
        };
        let single = !list.contains(',');
        let epoch = self.epoch.clone();
        match action.as_str() {
            "timestamp" if single => {
                let record = self.record(user, types[0]);
                answer(
                    200,
                    serde_json::to_value(TimestampAnswer {
                        success: true,
                        data_type: types[0],
                        last_updated: record.last_updated(),
                        version: record.version,
                        epoch,
                    }),
                )
            }
            "timestamp" => {
                let timestamps = types
                    .iter()
                    .map(|t| {
                        let record = self.record(user, *t);
                        (*t, Stamp { last_updated: record.last_updated(), version: record.version })
                    })
                    .collect();
                answer(200, serde_json::to_value(TimestampsAnswer { success: true, timestamps, epoch }))
            }
            "get" if single => {
                let record = self.record(user, types[0]);
                let etag = protocol::wire::etag(&epoch, record.version);
                let matches = request
                    .if_none_match
                    .as_deref()
                    .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
                if matches {
                    return Reply::Answer {
                        status: 304,
                        body: Json::Null,
                        retry_after: None,
                        date: None,
                        etag: Some(etag),
                    };
                }
                let mut reply = answer(
                    200,
                    serde_json::to_value(GetAnswer {
                        success: true,
                        data_type: types[0],
                        data: record.data.clone(),
                        last_updated: record.last_updated(),
                        version: record.version,
                        epoch,
                    }),
                );
                if let Reply::Answer { etag: tag, .. } = &mut reply {
                    *tag = Some(etag);
                }
                reply
            }
            "get" => {
                let records = types.iter().map(|t| (*t, self.record(user, *t).state())).collect();
                answer(200, serde_json::to_value(GetManyAnswer { success: true, records, epoch }))
            }
            "push" | "delta" => error(405, "method_not_allowed", "action push and delta are sent with POST"),
            _ => error(400, "unknown_action", "expected timestamp, get, push or delta"),
        }
    }

    fn post(&mut self, now: u64, request: &Request) -> Reply {
        let text = request.body.as_ref().map(Json::to_text).unwrap_or_default();
        let parsed = match PostRequest::parse(text.as_bytes()) {
            Ok(parsed) => parsed,
            Err(refusal) => return error(400, refusal.code, &refusal.message),
        };
        let caller = match self.caller(request.token.as_deref()) {
            Ok(caller) => caller,
            Err(reply) => return reply,
        };
        match parsed {
            PostRequest::Batch(_) if self.refuses_batches => error(
                400,
                "unknown_action",
                "unknown action \"batch\"; expected timestamp, get, push or delta",
            ),
            PostRequest::Batch(batch) => self.batch(now, caller, batch, request.keepalive),
            write => self.apply(now, caller, write),
        }
    }

    /// A batch: its ops applied in order, each answered as if sent alone (with its `status`
    /// and `op_id`), until one fails for a reason worth retrying; the ops after it are
    /// `not_attempted`.
    fn batch(
        &mut self,
        now: u64,
        caller: Option<(String, String)>,
        batch: BatchRequest,
        keepalive: bool,
    ) -> Reply {
        let fail_at = self.fail_batch_at.take();
        let mut stopped = false;
        let mut results = Vec::new();
        for (index, op) in batch.ops.into_iter().enumerate() {
            let mut seen = describe_op(&op, keepalive);
            let op_id = op.op_id().unwrap_or_default().to_owned();
            let reply = if stopped {
                error(503, "not_attempted", "an op before this one failed; this one was not attempted")
            } else if fail_at == Some(index) {
                stopped = true;
                error(503, "store_unavailable", "the store cannot serve right now; retry")
            } else {
                self.apply(now, caller.clone(), op)
            };
            let Reply::Answer { status, body, .. } = reply else { unreachable!("a write is answered") };
            stopped |= status >= 500;
            seen.status = Some(status);
            self.seen.push(seen);
            let mut result = Value::from(&body);
            result["status"] = Value::from(status);
            result["op_id"] = Value::from(op_id);
            results.push(result);
        }
        answer(200, serde_json::to_value(BatchAnswer { success: true, results }))
    }

    /// One push or delta.
    fn apply(&mut self, now: u64, caller: Option<(String, String)>, parsed: PostRequest) -> Reply {
        let (user, site) = (parsed.user_id().to_owned(), parsed.site_id().to_owned());
        if let Some((token_site, token_user)) = &caller {
            if *token_user != user {
                return error(403, "wrong_user", "the token does not speak for this user_id");
            }
            if *token_site != site {
                return error(403, "wrong_site", "site_id must be the site that issued the token");
            }
        }
        let site = match SiteId::parse(&site) {
            Ok(site) => site,
            Err(refusal) => return error(400, refusal.code, &refusal.message),
        };
        let hub_now = self.clock(now);
        match parsed {
            PostRequest::Batch(_) => error(400, "invalid_batch", "batches do not nest"),
            PostRequest::Push(push) => {
                let data_type = match DataType::parse(&push.data_type) {
                    Ok(t) => t,
                    Err(refusal) => return error(400, refusal.code, &refusal.message),
                };
                let patch = match validate_push(data_type, &push.data, &site, false) {
                    Ok(patch) => patch,
                    Err(refusal) => return error(400, refusal.code, &refusal.message),
                };
                let fingerprint =
                    json!(["push", data_type, site.as_str(), patch, push.base_version]).to_string();
                let op_id = match push.op_id.as_deref().map(OpId::parse).transpose() {
                    Ok(op_id) => op_id.map(|o| o.as_str().to_owned()),
                    Err(refusal) => return error(400, refusal.code, &refusal.message),
                };
                if let Some(op_id) = &op_id
                    && let Some(reply) = self.replay(&user, op_id, &fingerprint, |record, data_type| {
                        push_answer(data_type, record, true)
                    })
                {
                    return reply;
                }
                if let Some(op_id) = &op_id
                    && let Some(reply) = self.expired(hub_now, op_id)
                {
                    return reply;
                }
                let current = self.record(&user, data_type);
                if push.base_version.is_some_and(|base| base != current.version) {
                    let refusal =
                        (409, "version_conflict", "the record is at another version than base_version");
                    return self.refuse(hub_now, &user, data_type, op_id, fingerprint, refusal);
                }
                let mut data = current.data.clone();
                merge_patch(&mut data, &patch);
                if let Err(refusal) = validate_record(data_type, &data) {
                    return error(400, refusal.code, &refusal.message);
                }
                let record = self.change(hub_now, &user, data_type, data, op_id, fingerprint);
                push_answer(data_type, &record, false)
            }
            PostRequest::Delta(delta) => {
                let data_type = match DataType::parse(&delta.data_type) {
                    Ok(t) => t,
                    Err(refusal) => return error(400, refusal.code, &refusal.message),
                };
                let change = match validate_delta(data_type, &delta.delta, Limits::default()) {
                    Ok(change) => change,
                    Err(refusal) => return error(400, refusal.code, &refusal.message),
                };
                let op_id = match OpId::parse(&delta.op_id) {
                    Ok(op_id) => op_id.as_str().to_owned(),
                    Err(refusal) => return error(400, refusal.code, &refusal.message),
                };
                let reason = match delta.reason.as_deref().map(validate_reason).transpose() {
                    Ok(reason) => reason,
                    Err(refusal) => return error(400, refusal.code, &refusal.message),
                };
                // The grant is no part of the fingerprint: the same op with a re-minted grant is a
                // retry.
                let fingerprint = json!(["delta", data_type, site.as_str(), change, reason]).to_string();
                if let Some(reply) = self.replay(&user, &op_id, &fingerprint, |record, data_type| {
                    delta_answer(data_type, record, true)
                }) {
                    return reply;
                }
                if let Some(reply) = self.expired(hub_now, &op_id) {
                    return reply;
                }
                if caller.is_some()
                    && change > 0
                    && let Err(reply) = self.check_grant(
                        now,
                        delta.grant.as_deref(),
                        site.as_str(),
                        &user,
                        &op_id,
                        data_type,
                        change,
                    )
                {
                    return reply;
                }
                if self.max_credit_per_op.is_some_and(|max| change > max) {
                    let refusal = (403, "credit_limit", "the credit is larger than the site may grant");
                    return self.refuse(hub_now, &user, data_type, Some(op_id), fingerprint, refusal);
                }
                let field = amount_field(data_type).expect("validate_delta accepts amounts only");
                let current = self.record(&user, data_type);
                let result = current.data.get(field).and_then(Value::as_i64).unwrap_or(0) + change;
                if result < 0 {
                    let refusal = (409, "insufficient_funds", "the balance would go below zero");
                    return self.refuse(hub_now, &user, data_type, Some(op_id), fingerprint, refusal);
                }
                if result > MAX_AMOUNT {
                    return error(400, "value_too_large", "the amount would be too large");
                }
                let mut data = current.data.clone();
                data[field] = Value::from(result);
                self.ledger.push(LedgerEntry {
                    user: user.clone(),
                    data_type,
                    op_id: op_id.clone(),
                    delta: change,
                    result,
                });
                let record = self.change(hub_now, &user, data_type, data, Some(op_id), fingerprint);
                delta_answer(data_type, &record, false)
            }
        }
    }

    /// A page's credit (a positive delta under a token without `amounts:credit`): allowed only
    /// with a grant of the op's own site naming exactly this op, within its life. Every
    /// refusal is final for the grant, and leaves the op id unused.
    #[allow(clippy::too_many_arguments)]
    fn check_grant(
        &self,
        now: u64,
        grant: Option<&str>,
        site: &str,
        user: &str,
        op_id: &str,
        data_type: DataType,
        change: i64,
    ) -> Result<(), Reply> {
        let Some(grant) = grant else {
            return Err(error(
                403,
                "insufficient_scope",
                "a credit needs the scope amounts:credit or a grant",
            ));
        };
        let Some(claims) = self.grants.get(grant) else {
            return Err(error(403, "grant_invalid", "the grant is not signed by the site"));
        };
        let bound = (
            claims.site.as_str(),
            claims.user.as_str(),
            claims.op_id.as_str(),
            claims.data_type,
            claims.amount,
        );
        if bound != (site, user, op_id, data_type, change) {
            return Err(error(403, "grant_invalid", "the grant is for another op"));
        }
        if now >= claims.expires_ms {
            return Err(error(403, "grant_expired", "the grant expired; ask the site for a fresh one"));
        }
        Ok(())
    }

    /// The first answer again for an op id seen with the same body, `422 op_id_reused` for
    /// one seen with another body, `None` for a new op id.
    fn replay(
        &self,
        user: &str,
        op_id: &str,
        fingerprint: &str,
        answer: impl FnOnce(&HubRecord, DataType) -> Reply,
    ) -> Option<Reply> {
        let seen = self.ops.get(user)?.get(op_id)?;
        Some(if seen.fingerprint != fingerprint {
            error(422, "op_id_reused", "this op_id was already used for a different request")
        } else if let Some((status, code, message)) = seen.refusal {
            error_with(status, code, message, Some(&seen.answer), None)
        } else {
            answer(&seen.answer, seen.data_type)
        })
    }

    /// `422 op_expired` for an op id this hub does not remember (asked after the replay) when it
    /// is a UUIDv7 dated before the horizon: it may have been applied and forgotten.
    fn expired(&self, hub_now: u64, op_id: &str) -> Option<Reply> {
        let horizon = hub_now.saturating_sub(self.retention_ms?);
        let dated = uuid7_ms(op_id)?;
        (dated < horizon as i64).then(|| {
            error(
                422,
                "op_expired",
                "this op is older than the ops the hub remembers; it was not applied now",
            )
        })
    }

    /// Refuses a write for a reason of the record's state; the op id keeps the refusal.
    fn refuse(
        &mut self,
        now: u64,
        user: &str,
        data_type: DataType,
        op_id: Option<String>,
        fingerprint: String,
        refusal: Refused,
    ) -> Reply {
        let current = self.record(user, data_type);
        if let Some(op_id) = op_id {
            let seen = SeenOp {
                fingerprint,
                answer: current.clone(),
                data_type,
                refusal: Some(refusal),
                arrived_ms: now,
            };
            self.ops.entry(user.into()).or_default().insert(op_id, seen);
        }
        let (status, code, message) = refusal;
        error_with(status, code, message, Some(&current), None)
    }

    /// Stores `data` (a new version only if it differs) and remembers the op id.
    fn change(
        &mut self,
        now: u64,
        user: &str,
        data_type: DataType,
        data: Value,
        op_id: Option<String>,
        fingerprint: String,
    ) -> HubRecord {
        let current = self.record(user, data_type);
        let record = if data == current.data {
            current
        } else {
            let record = HubRecord {
                data,
                version: current.version + 1,
                updated_ms: Some(current.updated_ms.map_or(now, |prev| now.max(prev + 1))),
            };
            self.commit(user, data_type, record.clone());
            record
        };
        if let Some(op_id) = op_id {
            *self.applied.entry(op_id.clone()).or_default() += 1;
            let seen =
                SeenOp { fingerprint, answer: record.clone(), data_type, refusal: None, arrived_ms: now };
            self.ops.entry(user.into()).or_default().insert(op_id, seen);
        }
        record
    }
}

/// What a test wants to know about a request.
fn describe(request: &Request) -> Seen {
    let mut seen = Seen {
        action: "?".into(),
        data_type: String::new(),
        op_id: None,
        grant: None,
        keepalive: request.keepalive,
        status: None,
        writes: 0,
        in_batch: false,
        foreign: false,
    };
    if let Some(query) = &request.query {
        let mut params = query_params(query);
        seen.action = params.remove("action").unwrap_or_default();
        seen.data_type = params.remove("data_type").unwrap_or_default();
    }
    if let Some(body) = &request.body {
        let field = |name: &str| body.get(name).and_then(Json::as_str).map(str::to_owned);
        seen.action = field("action").unwrap_or_default();
        seen.data_type = field("data_type").unwrap_or_default();
        seen.op_id = field("op_id");
        seen.grant = field("grant");
        seen.writes = match body.get("ops") {
            Some(Json::Array(ops)) => ops.len(),
            _ => 1,
        };
    }
    seen
}

/// What a test wants to know about a write inside a batch.
fn describe_op(op: &PostRequest, keepalive: bool) -> Seen {
    let (action, grant) = match op {
        PostRequest::Delta(delta) => ("delta", delta.grant.clone()),
        _ => ("push", None),
    };
    Seen {
        action: action.into(),
        data_type: op.data_type().into(),
        op_id: op.op_id().map(str::to_owned),
        grant,
        keepalive,
        status: None,
        writes: 1,
        in_batch: true,
        foreign: false,
    }
}

fn push_answer(data_type: DataType, record: &HubRecord, replayed: bool) -> Reply {
    answer(
        200,
        serde_json::to_value(PushAnswer {
            success: true,
            data_type,
            timestamp: record.last_updated(),
            last_updated: record.last_updated(),
            version: record.version,
            data: record.data.clone(),
            replayed,
        }),
    )
}

fn delta_answer(data_type: DataType, record: &HubRecord, replayed: bool) -> Reply {
    answer(
        200,
        serde_json::to_value(DeltaAnswer {
            success: true,
            data_type,
            version: record.version,
            data: record.data.clone(),
            last_updated: record.last_updated(),
            replayed,
        }),
    )
}

/// An answer as the shell hands it to the engine, parsed.
fn answer(status: u16, body: serde_json::Result<Value>) -> Reply {
    Reply::Answer {
        status,
        body: Json::from(&body.expect("answers serialize")),
        retry_after: None,
        date: None,
        etag: None,
    }
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    error_with(status, code, message, None, None)
}

fn error_with(
    status: u16,
    code: &str,
    message: &str,
    current: Option<&HubRecord>,
    retry_after: Option<u64>,
) -> Reply {
    let body = ErrorAnswer {
        success: false,
        code: code.into(),
        error: message.into(),
        current: current.map(HubRecord::state),
    };
    let body = serde_json::to_value(&body).expect("answers serialize");
    Reply::Answer { status, body: Json::from(&body), retry_after, date: None, etag: None }
}

/// The parameters of a query string. The engine sends only URL-safe values.
pub fn query_params(query: &str) -> BTreeMap<String, String> {
    query.split('&').filter_map(|pair| pair.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
}

/// RFC 3339 UTC with milliseconds, as the hub writes `last_updated`.
pub fn rfc3339_ms(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, day_secs) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (hour, minute, second) = (day_secs / 3600, day_secs % 3600 / 60, day_secs % 60);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
}
