//! The unified-sync client's sync engine. Sans-IO: it does no I/O, reads no clock and
//! knows no browser type. The caller feeds it inputs (`handle_*`) with the current time in
//! milliseconds, and drains its outputs (`poll_*`): requests to send, when to call
//! [`Engine::handle_timeout`] next, and events for the page.
//!
//! Call order, after every input:
//! 1. drain [`Engine::poll_event`] — persist on [`Event::Persist`] *before* sending anything,
//!    so that a delta is stored before its first send;
//! 2. drain [`Engine::poll_request`] and send each one, answering with
//!    [`Engine::handle_reply`];
//! 3. arm a timer for [`Engine::poll_timeout`].
//!
//! The same engine drives the wasm `SyncManager` and native Rust users alike; native callers
//! can leave the call order to [`Engine::drive`] and answer through a [`Host`].
//!
//! With [`Config::live`], the engine also keeps the hub's event stream while the page is
//! visible: it asks for the site's stream lock ([`Event::StreamLock`]), then to open or close
//! the stream ([`Event::Stream`]), and takes what the stream brings, or what the tab holding
//! it shared, through [`Engine::handle_stream`].

#![cfg_attr(not(test), no_std)]

extern crate alloc;

use alloc::{borrow::ToOwned, string::String};

mod cache;
mod drive;
mod engine;
mod grant;
mod json;
mod outbox;

pub use cache::{CachedRecord, PerType, Persisted};
pub use drive::{Answer, Host};
pub use engine::{Config, Engine};
pub use grant::Grant;
pub use json::Json;
pub use outbox::{Op, OpKind};
pub use protocol::DataType;

/// Identifies one request the engine asked to send.
pub type RequestId = u64;

/// How long a hidden tab keeps the event stream open: a glance at another tab costs no
/// reconnect, a longer absence spares the hub a connection. The stream resumes on return.
pub const STREAM_GRACE_MS: u64 = 10_000;

/// How long a tab return waits for the resumed stream's `ready` before it checks the hub
/// as it would without a stream.
pub const STREAM_READY_WAIT_MS: u64 = 5_000;

/// A stream that brings nothing, not even the hub's heartbeat (every 15 s by default), for
/// this long is taken for broken (a frozen hub, a dead connection): the hub counts as
/// unreachable and the stream is opened again. [`Config::stream_silence_ms`] defaults to it.
pub const STREAM_SILENCE_MS: u64 = 45_000;

/// Why the engine should check the hub for changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The page signed the user in: always checks every data type.
    Login,
    /// The tab became visible again (`visibilitychange`).
    TabVisible,
    /// The page came back from the back/forward cache (`pageshow` with `persisted`).
    PageShow,
    /// The browser is online again.
    Online,
    /// The page is about to change a balance, open an editor, …
    EnsureFresh,
    /// The page asked for a full sync.
    Force,
}

/// A request for the shell to send to the hub's sync endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: RequestId,
    /// `GET` with a query string, or `POST` with a JSON body.
    pub method: Method,
    /// The query string (without `?`) of a GET.
    pub query: Option<String>,
    /// The JSON body of a POST.
    pub body: Option<Json>,
    pub if_none_match: Option<String>,
    /// Sent as `Authorization: Bearer …` when present.
    pub token: Option<String>,
    /// The page is unloading: send with `fetch(…, {keepalive: true})`.
    pub keepalive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

/// The hub's event stream (`GET /api/events?` and the query) for the shell to open.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRequest {
    pub query: String,
    /// Sent as `Authorization: Bearer …` when present.
    pub token: Option<String>,
    /// Sent as `Last-Event-ID`: the stream resumes after the last event seen.
    pub last_event_id: Option<String>,
}

/// One event of the stream: its `event:` name, `id:` and `data:`.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// Empty for a change; `ready`, `resync` or `reauth` otherwise.
    pub name: String,
    pub id: Option<String>,
    /// `data:` parsed; `Json::Null` when absent or not JSON.
    pub data: Json,
}

/// What happened to the event stream, or what the tab holding it shared.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamInput {
    /// This tab holds the site's stream lock now ([`Event::StreamLock`]).
    Locked,
    /// An event of this tab's stream.
    Event(StreamEvent),
    /// An event the tab holding the site's stream shared.
    Shared(StreamEvent),
    /// Whether the tab holding the site's stream has it live, as that tab shared.
    SharedLive(bool),
    /// This tab's stream ended or never opened: the status (0 when no answer came or the
    /// connection broke, 200 when the body ended), and a refusal's body and `Retry-After` in
    /// seconds.
    Ended { status: u16, body: Json, retry_after: Option<u64> },
}

/// What came back for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The hub answered (any status).
    Answer {
        status: u16,
        /// The parsed JSON body; `Json::Null` when empty (304) or not JSON.
        body: Json,
        /// `Retry-After` in seconds, if the answer carried one.
        retry_after: Option<u64>,
        /// The answer's `Date`, in milliseconds since the Unix epoch: the hub's clock, by which
        /// the engine dates the op ids it makes, whatever this device's clock says.
        date: Option<u64>,
        /// The answer's `ETag`, as the hub wrote it: a later `get` of the record sends it back
        /// as `If-None-Match`. The engine never makes one.
        etag: Option<String>,
    },
    /// No answer: the network failed or the hub is down.
    NetworkError,
}

/// The engine's summary of where sync stands, for the page to show; [`Reason`] says why it
/// is `Offline` or `Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Idle,
    Syncing,
    Offline,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Idle => "idle",
            Status::Syncing => "syncing",
            Status::Offline => "offline",
            Status::Error => "error",
        }
    }
}

/// Why the status is `Offline` or `Error`: what the page reads as `sync.statusReason`, and
/// what an [`Event::Error`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The browser says it is offline (status `Offline`): checks end with cached data, writes
    /// wait for `online`.
    Offline,
    /// A request got no answer (status `Offline`); the next answer ends it.
    Unreachable,
    /// The page's `getToken` threw or gave no token (status `Error`): nothing is sent until
    /// the next trigger (a tab return, back online, or an explicit check) asks for one again.
    TokenFailed,
    /// The hub refused this page's token and a fresh one (401), or refused its identity
    /// outright (403, e.g. `origin_not_allowed`) (status `Error`): nothing is sent until an
    /// explicit check asks for a fresh token. The `Error` event carries the hub's code.
    Unauthorized,
    /// An answer that is not the hub's: a proxy's or a firewall's error page, a captive
    /// portal, a 200 without the hub's body (status `Error`). Writes stay pending and shown,
    /// and are retried with backoff; the hub's next answer ends it.
    UnexpectedAnswer,
    /// The page's storage refused to keep the pending writes (full, or switched off) (status
    /// `Error`): they live in this page only, until a later store succeeds.
    StorageFailed,
}

impl Reason {
    /// The reason's stable code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Offline => "offline",
            Reason::Unreachable => "hub_unreachable",
            Reason::TokenFailed => "token_failed",
            Reason::Unauthorized => "unauthorized",
            Reason::UnexpectedAnswer => "unexpected_answer",
            Reason::StorageFailed => "storage_failed",
        }
    }
}

/// Where the data of a [`Event::Data`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Restored from storage when the engine started.
    Cache,
    /// Fetched from, or confirmed by, the hub.
    Hub,
    /// A local write not yet confirmed (optimistic).
    Local,
    /// Shared by another tab of the same site.
    Tab,
}

/// A record as one tab shares it with the site's other tabs.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    pub epoch: String,
    pub data_type: DataType,
    pub record: CachedRecord,
    /// The write this record confirms (or refuses): the other tabs drop their copy of it.
    pub finished: Option<String>,
}

impl Shared {
    pub fn to_json(&self) -> Json {
        Json::object()
            .with("epoch", self.epoch.as_str())
            .with("data_type", self.data_type.as_str())
            .with("record", self.record.to_json())
            .with("finished", self.finished.clone())
    }

    pub fn from_json(json: &Json) -> Option<Shared> {
        Some(Shared {
            epoch: json.get("epoch")?.as_str()?.to_owned(),
            data_type: DataType::from_name(json.get("data_type")?.as_str()?)?,
            record: CachedRecord::from_json(json.get("record")?)?,
            finished: json.get("finished").and_then(Json::as_str).map(str::to_owned),
        })
    }
}

/// What the page should learn or do.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The data the page should show for a type changed.
    Data {
        data_type: DataType,
        data: Json,
        /// The hub's version the data is based on (pending local writes come on top).
        version: u64,
        last_updated: Option<String>,
        source: Source,
        /// Local writes to this type not yet confirmed by the hub.
        pending: usize,
    },
    Status(Status),
    /// The status turned `Error`, for this reason (also in [`Engine::status_reason`]); for
    /// [`Reason::Unauthorized`], with the hub's own code and message.
    Error {
        reason: Reason,
        hub_code: Option<String>,
        message: Option<String>,
    },
    /// Show (true) or hide (false) the sync indicator.
    Spinner(bool),
    /// A check the page waits for (login, ensureFresh, forceSync) ended; `fresh` is false if
    /// the hub could not be reached and cached data is all there is.
    CheckDone {
        ticket: u64,
        fresh: bool,
    },
    /// The hub refused a local write; its optimistic effect is rolled back. Code `op_expired`:
    /// the hub no longer knows whether the op was applied long ago; it is dropped, not
    /// resent, and the record is fetched again.
    Refused {
        data_type: DataType,
        op_id: String,
        code: String,
        message: String,
    },
    /// The engine needs a (fresh) token: answer with [`Engine::handle_token`].
    NeedToken,
    /// The hub found the grant of this credit expired before it ever applied it (only with
    /// [`Config::asks_for_grants`]): answer with [`Engine::handle_grant`]. The writes queued
    /// behind it wait for the answer, as they wait for a write in flight.
    NeedGrant {
        op_id: String,
        data_type: DataType,
        amount: i64,
        reason: Option<String>,
    },
    /// The cache or the outbox changed: store [`Engine::persisted`] now, and say with
    /// [`Engine::handle_persisted`] whether storage took it.
    Persist,
    /// Fresh data to share with the site's other tabs.
    Share(Shared),
    /// Take (true) or let go of (false) the site's stream lock: the one tab of a site holding
    /// it keeps the event stream and shares its events, and whether it is live, with the
    /// site's other tabs. Answer with [`StreamInput::Locked`] once it is held.
    StreamLock(bool),
    /// Open the event stream with this request, replacing any open one; `None`: close it.
    /// Nothing of a stream replaced or closed is handed back.
    Stream(Option<StreamRequest>),
    /// Changes reach this page live (a stream is open here, or the tab holding the site's
    /// stream shares one), or no longer.
    Live(bool),
    /// A debug line in the seed's format, when debugging is on.
    Log(String),
}
