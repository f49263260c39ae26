//! Wiring between the page and the engine: every input goes to the engine with the current
//! time, then [`Shell::drive`] drains the engine's outputs in the documented order.
//!
//! The page's side of the wiring is one small JavaScript object (`connect`, at the end of
//! this file): the page events, the tabs' `BroadcastChannel`, `fetch`, the page's `getToken`
//! and `getGrant`, the one timer, the listeners, the promises `login` and friends return, and
//! the indicator element. Every asynchronous answer comes back into Rust through one callback.
//! Written in Rust with web-sys, futures and a closure per call, the same wiring cost the
//! package several kilobytes more than these lines. The JavaScript makes no decision either:
//! it only carries inputs in and outputs out.
//!
//! The event stream: the tab holding the site's stream lock (a Web Lock named after the
//! site's channel, `…:stream`) reads `GET /api/events` with `fetch` (its token in the
//! `Authorization` header only), splits the server-sent events, hands each to the engine and
//! shares it, and whether its stream is live, over the site's channel; the other tabs hand
//! what they hear to their engines. A tab that starts waiting for the lock asks whether the
//! stream is live; the tab with a live stream answers.
//!
//! Storage, shared by the tabs of one origin: the cache under one key (what the last tab to
//! store saw; versions make an older copy harmless), and each pending write under a key of
//! its own, written when it is new (or carries a fresh grant) and removed once it is finished.
//! No tab reads, changes and writes back a value another tab may be writing: in Chromium,
//! even two tabs taking turns under a Web Lock lose some of each other's writes that way (the
//! lock can reach a tab before the other's last write has). Before storing, a tab reads the
//! writes stored under the other keys and adopts those it does not know.

use alloc::{string::String, vec::Vec};

use alloc::rc::{Rc, Weak};
use core::cell::{Cell, RefCell};

use js_sys::{Function, Promise};
use protocol::Refusal;
use protocol::compact::concat;
use sync_core::{
    Config, DataType, Engine, Event, Grant, Json, Method, Op, Persisted, Reply, Request, Shared, Source,
    StreamEvent, StreamInput, Trigger,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen::{JsCast, JsValue};

use crate::options::Options;

/// A refusal on the JavaScript side: an `Error` with a `code`.
#[derive(Debug)]
pub(crate) struct SyncError {
    code: &'static str,
    message: String,
}

impl SyncError {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> SyncError {
        SyncError { code, message: message.into() }
    }
}

impl From<Refusal> for SyncError {
    fn from(r: Refusal) -> SyncError {
        SyncError { code: r.code, message: r.message }
    }
}

impl From<SyncError> for JsValue {
    fn from(e: SyncError) -> JsValue {
        error(e.code, &e.message)
    }
}

fn now() -> u64 {
    js_sys::Date::now() as u64
}

/// The page's JSON object for a value (no JSON text in between).
fn to_js(value: &Json) -> JsValue {
    match value {
        Json::Null => JsValue::NULL,
        Json::Bool(b) => JsValue::from_bool(*b),
        Json::Number(n) => JsValue::from_f64(*n),
        Json::String(s) => JsValue::from_str(s),
        Json::Array(items) => items.iter().map(to_js).collect::<js_sys::Array>().into(),
        Json::Object(pairs) => {
            let object = js_sys::Object::new();
            for (key, value) in pairs {
                let _ = js_sys::Reflect::set(&object, &JsValue::from_str(key), &to_js(value));
            }
            object.into()
        }
    }
}

/// A value from the page: plain data only (functions, symbols and the like become null).
fn from_js(value: &JsValue) -> Json {
    if let Some(b) = value.as_bool() {
        Json::Bool(b)
    } else if let Some(n) = value.as_f64() {
        Json::Number(n)
    } else if let Some(s) = value.as_string() {
        Json::String(s)
    } else if js_sys::Array::is_array(value) {
        Json::Array(js_sys::Array::from(value).iter().map(|v| from_js(&v)).collect())
    } else if value.is_object() && !value.is_function() {
        let object: &js_sys::Object = value.unchecked_ref();
        let pairs = js_sys::Object::keys(object)
            .iter()
            .filter_map(|key| {
                let name = key.as_string()?;
                let item = js_sys::Reflect::get(object, &key).ok()?;
                (!item.is_undefined()).then(|| (name, from_js(&item)))
            })
            .collect();
        Json::Object(pairs)
    } else {
        Json::Null
    }
}

/// JSON text as the page's `JSON.parse` reads it.
fn parse(text: &str) -> Json {
    js_sys::JSON::parse(text).map_or(Json::Null, |v| from_js(&v))
}

/// JSON text as the page's `JSON.stringify` writes it.
fn stringify(value: &Json) -> String {
    js_sys::JSON::stringify(&to_js(value)).ok().and_then(|s| s.as_string()).unwrap_or_default()
}

/// What the JavaScript side calls back with: `(input, id, status, value, extra, date, etag)`, where
/// `input` is one of the constants below and the other arguments mean what each one says.
type Callback = Closure<dyn FnMut(u32, f64, u32, JsValue, JsValue, f64, JsValue)>;

/// The page events (`visibilitychange` to visible or hidden, `pageshow` from the back/forward
/// cache, `online`, `offline`, `pagehide`).
const VISIBLE: u32 = 1;
const HIDDEN: u32 = 2;
const RESTORED: u32 = 3;
const ONLINE: u32 = 4;
const OFFLINE: u32 = 5;
const LEAVING: u32 = 6;
/// Another tab's message (`value`).
const SHARED: u32 = 7;
/// The answer to request `id`: `status` (0 when none came), the body's text (`value`),
/// `Retry-After` in seconds (`extra`: a number, NaN when there is none or it is a date), the
/// answer's `Date` in milliseconds since the epoch (`date`, NaN when there is none) and its
/// `ETag` (`etag`, null when there is none).
const REPLY: u32 = 8;
/// What `getToken` or `getGrant` gave (`value`, empty when nothing usable); `extra` is the
/// op id a grant was asked for, `undefined` for a token.
const ANSWER: u32 = 9;
/// The timer armed with `arm` fired.
const TIMER: u32 = 10;
/// This tab holds the site's stream lock.
const LOCKED: u32 = 11;
/// An event of this tab's stream (`STREAM_EVENT`) or one the tab holding the stream shared
/// (`STREAM_SHARED`): its data parsed (`value`), its name (`extra`) and its id (`etag`).
const STREAM_EVENT: u32 = 12;
const STREAM_SHARED: u32 = 13;
/// The tab holding the site's stream says whether it is live (`status`: 1 or 0).
const SHARED_LIVE: u32 = 14;
/// This tab's stream ended or never opened: `status` (0 when no answer came or the connection
/// broke, 200 when the body ended), a refusal's body (`value`) and `Retry-After` (`extra`), as
/// for [`REPLY`].
const STREAM_END: u32 = 15;

pub(crate) struct Shell {
    engine: RefCell<Engine>,
    /// The sync endpoint; the event stream is `/api/events` beside it.
    endpoint: String,
    /// The cache's key; each pending write is stored under it and `:op:` and its op id.
    storage_key: String,
    /// The page's `debug` option; without it, `localStorage.sync_debug` is read at each line.
    debug: bool,
    get_token: Option<Function>,
    get_grant: Option<Function>,
    /// The page's side of the wiring (see `connect` below).
    host: Host,
    /// The callback `host` calls; kept alive as long as the shell.
    _input: Callback,
    destroyed: Cell<bool>,
}

impl Shell {
    pub(crate) fn start(options: Options) -> Result<Rc<Shell>, SyncError> {
        let endpoint = options.endpoint();
        let storage_key = concat(&["unified-sync:", &endpoint, ":", &options.user_id]);
        let channel = concat(&[storage_key.as_str(), ":", &options.site_id]);
        let mut config = Config::new(options.site_id, options.user_id, options.data_types);
        config.live = true;
        config.needs_token = options.get_token.is_some();
        config.asks_for_grants = options.get_grant.is_some();
        // Every line is made; `Event::Log` decides whether to print it.
        config.debug = true;
        config.seed = (js_sys::Math::random() * 9.007_199_254_740_991e15) as u64 ^ now();
        if let Some(ms) = options.spinner_delay_ms {
            config.spinner_delay_ms = ms;
        }
        if let Some(ms) = options.inactivity_ms {
            config.inactivity_ms = ms;
        }
        if let Some(ms) = options.request_timeout_ms {
            config.request_timeout_ms = ms;
        }
        // The cache, and the writes an older version stored with it; then the writes stored
        // one key each.
        let stored = load(&storage_key).map(|text| Persisted::from_json(&parse(&text)));
        let mut engine = Engine::new(config, stored, now());
        engine.handle_stored_ops(now(), &stored_ops(&storage_key));
        let shell = Rc::new_cyclic(|this: &Weak<Shell>| {
            let shell = this.clone();
            let input = Callback::new(
                move |input: u32,
                      id: f64,
                      status: u32,
                      value: JsValue,
                      extra: JsValue,
                      date: f64,
                      etag: JsValue| {
                    let Some(shell) = shell.upgrade().filter(|s| !s.destroyed.get()) else { return };
                    shell.handle(input, id, status, value, extra, date, etag);
                },
            );
            Shell {
                engine: RefCell::new(engine),
                endpoint,
                storage_key,
                debug: options.debug,
                get_token: options.get_token,
                get_grant: options.get_grant,
                host: connect(&channel, &options.spinner, input.as_ref()),
                _input: input,
                destroyed: Cell::new(false),
            }
        });
        if shell.host.hidden() {
            shell.engine.borrow_mut().handle_hidden(now());
        }
        shell.drive();
        Ok(shell)
    }

    /// One input from the page's side (see the constants above), then the outputs it caused.
    #[allow(clippy::too_many_arguments)]
    fn handle(
        &self,
        input: u32,
        id: f64,
        status: u32,
        value: JsValue,
        extra: JsValue,
        date: f64,
        etag: JsValue,
    ) {
        let now = now();
        let mut engine = self.engine.borrow_mut();
        match input {
            VISIBLE => {
                engine.handle_trigger(now, Trigger::TabVisible);
            }
            HIDDEN => engine.handle_hidden(now),
            RESTORED => {
                engine.handle_trigger(now, Trigger::PageShow);
            }
            ONLINE => {
                engine.handle_trigger(now, Trigger::Online);
            }
            OFFLINE => engine.handle_offline(now),
            LEAVING => engine.handle_unload(now),
            SHARED => {
                if let Some(shared) = Shared::from_json(&from_js(&value)) {
                    engine.handle_shared(now, shared);
                }
            }
            REPLY => {
                let reply = if status == 0 {
                    Reply::NetworkError
                } else {
                    let (body, retry_after) = answer(&value, &extra);
                    let date = (date >= 0.0).then_some(date as u64);
                    Reply::Answer { status: status as u16, body, retry_after, date, etag: etag.as_string() }
                };
                engine.handle_reply(now, id as u64, reply);
            }
            LOCKED => engine.handle_stream(now, StreamInput::Locked),
            STREAM_EVENT | STREAM_SHARED => {
                let name = extra.as_string().unwrap_or_default();
                let event = StreamEvent { name, id: etag.as_string(), data: from_js(&value) };
                let input = if input == STREAM_EVENT {
                    StreamInput::Event(event)
                } else {
                    StreamInput::Shared(event)
                };
                engine.handle_stream(now, input);
            }
            SHARED_LIVE => engine.handle_stream(now, StreamInput::SharedLive(status == 1)),
            STREAM_END => {
                let (body, retry_after) = answer(&value, &extra);
                engine.handle_stream(now, StreamInput::Ended { status: status as u16, body, retry_after });
            }
            ANSWER => {
                let answer = value.as_string().filter(|text| !text.is_empty());
                match extra.as_string() {
                    Some(op_id) => engine.handle_grant(now, &op_id, answer),
                    None => engine.handle_token(now, answer),
                }
            }
            TIMER => engine.handle_timeout(now),
            _ => {}
        }
        drop(engine);
        self.drive();
    }

    /// Drains the engine: events first (so a write is stored before it is sent), then
    /// requests, then arms the timer.
    pub(crate) fn drive(&self) {
        if self.destroyed.get() {
            return;
        }
        loop {
            let event = self.engine.borrow_mut().poll_event();
            match event {
                Some(event) => self.on_event(event),
                None => break,
            }
        }
        loop {
            let request = self.engine.borrow_mut().poll_request();
            match request {
                Some(request) => self.send(request),
                None => break,
            }
        }
        let due = self.engine.borrow().poll_timeout();
        self.host.arm(due.map_or(-1.0, |at| at.saturating_sub(now()) as f64));
    }

    fn on_event(&self, event: Event) {
        match event {
            Event::Data { data_type, data, version, last_updated, source, pending } => {
                let meta = meta(version, last_updated, source_name(source), pending);
                self.host.emit(data_type.as_str(), &to_js(&data), &meta);
            }
            Event::Status(status) => self.host.emit("status", &status.as_str().into(), &JsValue::UNDEFINED),
            Event::Error { reason, hub_code, message } => {
                let error = Json::object()
                    .with("code", reason.code())
                    .with("hubCode", hub_code)
                    .with("message", message);
                self.host.emit("error", &to_js(&error), &JsValue::UNDEFINED);
            }
            Event::Spinner(visible) => self.host.spinner(visible),
            Event::CheckDone { ticket, fresh } => self.host.done(ticket as f64, fresh),
            Event::Refused { data_type, op_id, code, message } => {
                let refused = Json::object()
                    .with("dataType", data_type.as_str())
                    .with("opId", op_id)
                    .with("code", code)
                    .with("message", message);
                self.host.emit("refused", &to_js(&refused), &JsValue::UNDEFINED);
            }
            Event::NeedToken => {
                if let Some(get_token) = &self.get_token {
                    self.host.ask(get_token, &JsValue::UNDEFINED, &JsValue::UNDEFINED);
                }
            }
            Event::NeedGrant { op_id, data_type, amount, reason } => {
                // The same op, data type and amounts: the grant must name them exactly.
                if let Some(get_grant) = &self.get_grant {
                    let field = protocol::amount_field(data_type).unwrap_or("coins");
                    let request = Json::object()
                        .with("opId", op_id.as_str())
                        .with("dataType", data_type.as_str())
                        .with("delta", Json::object().with(field, amount))
                        .with("reason", reason);
                    self.host.ask(get_grant, &to_js(&request), &op_id.into());
                }
            }
            Event::Persist => self.persist(),
            Event::Share(shared) => self.host.post(&to_js(&shared.to_json())),
            Event::StreamLock(on) => self.host.lock(on),
            Event::Stream(request) => match request {
                Some(r) => {
                    let url = concat(&[self.endpoint.as_str(), "?", &r.query]);
                    self.host.stream(Some(&url), r.token.as_deref(), r.last_event_id.as_deref());
                }
                None => self.host.stream(None, None, None),
            },
            Event::Live(live) => self.host.emit("live", &live.into(), &JsValue::UNDEFINED),
            Event::Log(line) => {
                if self.debug || load("sync_debug").as_deref() == Some("true") {
                    console_log(&line);
                }
            }
        }
    }

    /// Adopts the writes other tabs stored (the hub applies each op once), then stores the
    /// cache and the pending writes (`storeOps` writes the new and changed ones and removes the
    /// finished ones), and tells the engine whether storage took it all.
    fn persist(&self) {
        let now = now();
        self.engine.borrow_mut().handle_stored_ops(now, &stored_ops(&self.storage_key));
        let mut state = self.engine.borrow().persisted().to_json();
        let ops = to_js(state.get("outbox").unwrap_or(&Json::Null));
        state.set("outbox", Json::Array(Vec::new()));
        let saved =
            save(&self.storage_key, &stringify(&state)) & store_ops(&op_key(&self.storage_key, ""), &ops);
        self.engine.borrow_mut().handle_persisted(now, saved);
    }

    fn send(&self, request: Request) {
        let (url, method) = match (&request.method, &request.query) {
            (Method::Get, Some(query)) => (concat(&[self.endpoint.as_str(), "?", query]), "GET"),
            _ => (self.endpoint.clone(), "POST"),
        };
        self.host.send(
            &url,
            method,
            request.token.as_deref(),
            request.if_none_match.as_deref(),
            request.body.as_ref().map(stringify).as_deref(),
            request.keepalive,
            request.id as f64,
        );
    }

    // ---- the page's calls ----

    /// Registers `listener`; a data listener hears at once what is already known.
    pub(crate) fn on(&self, event: &str, listener: &Function) {
        let engine = self.engine.borrow();
        let known = DataType::from_name(event).and_then(|data_type| {
            let view = engine.view(data_type)?;
            let (version, last_updated) =
                engine.record(data_type).map_or((0, None), |r| (r.version, r.last_updated.clone()));
            let pending = engine.pending().filter(|op| op.data_type == data_type).count();
            Some((to_js(&view), meta(version, last_updated, "cache", pending)))
        });
        drop(engine);
        let (data, meta) = known.unwrap_or((JsValue::UNDEFINED, JsValue::UNDEFINED));
        self.host.on(event, listener, &data, &meta);
    }

    pub(crate) fn off(&self, event: &str, listener: &Function) {
        self.host.off(event, listener);
    }

    /// A promise of the check `trigger` starts (or joins): true when it ended fresh.
    pub(crate) fn check(&self, trigger: Trigger) -> Promise {
        // Tickets start at 1; a destroyed manager's promise resolves to false at once.
        let ticket =
            if self.destroyed.get() { 0 } else { self.engine.borrow_mut().handle_trigger(now(), trigger) };
        let promise = self.host.wait(ticket as f64);
        self.drive();
        promise
    }

    pub(crate) fn apply_delta(
        &self,
        data_type: &str,
        delta: &JsValue,
        reason: Option<String>,
        options: &JsValue,
    ) -> Result<String, JsValue> {
        let data_type = data_type_of(data_type)?;
        let field = protocol::amount_field(data_type).unwrap_or_default();
        let credit = read_delta(delta, field, options);
        if !js_sys::Array::is_array(&credit) {
            return Err(credit);
        }
        let credit: js_sys::Array = credit.unchecked_into();
        let amount = credit.get(0).as_f64().unwrap_or_default() as i64;
        let grant = credit.get(1).as_string().zip(credit.get(2).as_string());
        let mut engine = self.engine.borrow_mut();
        let op_id = match grant {
            Some((jwt, op_id)) => {
                engine.apply_delta_with_grant(now(), data_type, amount, reason, Grant::new(jwt, op_id))
            }
            None => engine.apply_delta(now(), data_type, amount, reason),
        }
        .map_err(SyncError::from)?;
        drop(engine);
        self.drive();
        Ok(op_id)
    }

    pub(crate) fn push_changes(&self, data_type: &str, changes: &JsValue) -> Result<String, SyncError> {
        let data_type = data_type_of(data_type)?;
        let patch = from_js(changes);
        let op_id = self.engine.borrow_mut().push_changes(now(), data_type, patch)?;
        self.drive();
        Ok(op_id)
    }

    pub(crate) fn get(&self, data_type: &str) -> Result<JsValue, SyncError> {
        let data_type = data_type_of(data_type)?;
        Ok(self.engine.borrow().view(data_type).map_or(JsValue::UNDEFINED, |v| to_js(&v)))
    }

    /// Whether changes reach the page live.
    pub(crate) fn live(&self) -> bool {
        self.engine.borrow().live()
    }

    /// Why the status is `offline` or `error`.
    pub(crate) fn status_reason(&self) -> Option<&'static str> {
        self.engine.borrow().status_reason().map(sync_core::Reason::code)
    }

    /// The engine's status; once destroyed, a check it was waiting on will never end, so
    /// the manager reports `idle` instead of `syncing`.
    pub(crate) fn status(&self) -> &'static str {
        match self.engine.borrow().status() {
            sync_core::Status::Syncing if self.destroyed.get() => sync_core::Status::Idle.as_str(),
            status => status.as_str(),
        }
    }

    pub(crate) fn destroy(&self) {
        if !self.destroyed.replace(true) {
            self.host.close();
        }
    }
}

/// The data type a page names, or an error listing the valid ones.
pub(crate) fn data_type_of(name: &str) -> Result<DataType, SyncError> {
    DataType::from_name(name).ok_or_else(|| {
        SyncError::new(
            "invalid_data_type",
            "the data type must be balance, points, profile, roles or settings",
        )
    })
}

/// An answer's body (`text`, parsed; null when empty) and `Retry-After` (`retry_after`, whole
/// seconds or none).
fn answer(text: &JsValue, retry_after: &JsValue) -> (Json, Option<u64>) {
    let text = text.as_string().unwrap_or_default();
    let body = if text.is_empty() { Json::Null } else { parse(&text) };
    (body, retry_after.as_f64().filter(|s| *s >= 0.0 && *s % 1.0 == 0.0).map(|s| s as u64))
}

/// The key a pending write is stored under, beside the cache's `storage_key`.
fn op_key(storage_key: &str, op_id: &str) -> String {
    concat(&[storage_key, ":op:", op_id])
}

/// The pending writes stored beside the cache's `storage_key`, in the order they were first
/// stored.
fn stored_ops(storage_key: &str) -> Vec<Op> {
    let mut ops = Vec::new();
    for value in load_ops(&op_key(storage_key, "")).iter() {
        ops.extend(Op::from_json(&from_js(&value)));
    }
    ops
}

/// What a data listener learns besides the data (`RecordMeta` in the typings).
fn meta(version: u64, last_updated: Option<String>, source: &str, pending: usize) -> JsValue {
    let meta = Json::object()
        .with("version", version)
        .with("lastUpdated", last_updated)
        .with("source", source)
        .with("pending", pending as u64);
    to_js(&meta)
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Cache => "cache",
        Source::Hub => "hub",
        Source::Local => "local",
        Source::Tab => "tab",
    }
}

#[wasm_bindgen(inline_js = r#"
export function connect(channelName, spinner, input) {
  const d = document;
  const on = {
    visibilitychange: () => input(d.visibilityState === "visible" ? 1 : 2),
    pageshow: (e) => e.persisted && input(3),
    online: () => input(4),
    offline: () => input(5),
    pagehide: () => input(6),
  };
  const target = (kind) => (kind === "visibilitychange" ? d : globalThis);
  for (const kind in on) target(kind).addEventListener(kind, on[kind]);
  let channel = null;
  if (typeof BroadcastChannel === "function") {
    channel = new BroadcastChannel(channelName);
    channel.onmessage = ({ data: m }) =>
      m.f ? input(13, 0, 0, m.f[2], m.f[0], NaN, m.f[1]) : "l" in m ? input(14, 0, m.l) : m.ask ? live && post({ l: 1 }) : input(7, 0, 0, m);
  }
  const post = (message) => channel && channel.postMessage(message);
  let listeners = [];
  const waiting = new Map();
  let closed = false, timer, element;
  // The stream: the lock's release (or, while asked for, what gives the request up), the
  // stream's abort, its generation (anything of an older stream is dropped), whether it is live.
  let release, abort, gen = 0, live = 0;
  const setLive = (on) => live !== on && post({ l: (live = on) });
  const lock = (on) => {
    if (release) release();
    release = null;
    if (!on) return;
    post({ ask: 1 });
    let gone;
    release = () => (gone = 1);
    const held = () => {
      if (gone) return;
      const p = new Promise((r) => (release = r));
      // A holder before this one may have gone without saying its stream ended.
      post({ l: (live = 0) });
      input(11);
      return p;
    };
    if (navigator.locks) navigator.locks.request(channelName + ":stream", held);
    else Promise.resolve().then(held);
  };
  const stream = (url, token, lastId) => {
    const g = ++gen;
    if (abort) abort.abort();
    setLive(0);
    if (!url) return;
    const headers = {};
    if (token) headers.Authorization = "Bearer " + token;
    if (lastId) headers["Last-Event-ID"] = lastId;
    const end = (status, body, retry) => g === gen && (setLive(0), input(15, 0, status, body, retry));
    fetch(url.replace(/sync(\.php)?\?/, "events?"), { headers, signal: (abort = new AbortController()).signal })
      .then(async (r) => {
        if (r.status !== 200) return end(r.status, await r.text(), +(r.headers.get("Retry-After") ?? NaN));
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        for (let text = "", i, read; !(read = await reader.read()).done; ) {
          text += read.value.replace(/\r/g, "");
          while ((i = text.indexOf("\n\n")) >= 0 && g === gen) {
            let name = "", id = null, data = null;
            text
              .slice(0, i)
              .replace(/^(event|id|data)(?:: ?(.*))?$/gm, (_, field, v = "") =>
                field === "data" ? (data = data === null ? v : data + "\n" + v) : field === "id" ? (id = v) : (name = v),
              );
            text = text.slice(i + 2);
            // A heartbeat (or the retry hint): the stream is alive.
            if (data === null) {
              input(12);
              continue;
            }
            try {
              data = JSON.parse(data);
            } catch (e) {
              data = null;
            }
            if (name === "ready") setLive(1);
            post({ f: [name, id, data] });
            input(12, 0, 0, data, name, NaN, id);
          }
        }
        end(200, "");
      })
      .catch(() => end(0, ""));
  };
  const call = (f, a, b) => {
    try {
      f(a, b);
    } catch (e) {
      console.error("unified-balance: a listener threw", e);
    }
  };
  return {
    send(url, method, token, ifNoneMatch, body, keepalive, id) {
      const headers = {};
      if (token) headers.Authorization = "Bearer " + token;
      if (ifNoneMatch) headers["If-None-Match"] = ifNoneMatch;
      if (body != null) headers["Content-Type"] = "application/json";
      fetch(url, { method, headers, body, keepalive, mode: "cors" })
        .then((r) => r.text().then((t) => input(8, id, r.status, t, +(r.headers.get("Retry-After") ?? NaN), Date.parse(r.headers.get("Date")), r.headers.get("ETag"))))
        .catch(() => input(8, id, 0));
    },
    ask(callback, request, opId) {
      const name = opId ? "getGrant" : "getToken";
      Promise.resolve()
        .then(() => callback(request))
        .then(
          (t) => {
            if (!opId && !(typeof t === "string" && t)) console.error("unified-balance: getToken gave no token (a string)", t);
            input(9, 0, 0, typeof t === "string" ? t : "", opId);
          },
          (e) => {
            console.error("unified-balance: " + name + " threw", e);
            input(9, 0, 0, "", opId);
          },
        );
    },
    arm(ms) {
      clearTimeout(timer);
      if (ms >= 0) timer = setTimeout(() => input(10), Math.min(ms, 2147483647));
    },
    post,
    lock,
    stream,
    hidden: () => d.hidden,
    on(name, f, data, meta) {
      listeners.push([name, f]);
      if (data !== undefined) call(f, data, meta);
    },
    off(name, f) {
      listeners = listeners.filter(([n, g]) => n !== name || g !== f);
    },
    emit(name, a, b) {
      for (const [n, f] of listeners) if (n === name) call(f, a, b);
    },
    wait: (ticket) => (closed ? Promise.resolve(false) : new Promise((resolve) => waiting.set(ticket, resolve))),
    done(ticket, fresh) {
      const resolve = waiting.get(ticket);
      waiting.delete(ticket);
      if (resolve) resolve(fresh);
    },
    spinner(visible) {
      if (typeof spinner === "function") return call(spinner, visible);
      if (spinner === false) return;
      const { className, text } = spinner || {};
      if (!element && visible && d.body) {
        element = d.createElement("div");
        if (typeof className === "string") element.className = className;
        else {
          element.className = "sync-indicator";
          element.style.cssText = "position:fixed;top:10px;right:10px;z-index:9999;padding:8px 12px;border-radius:4px;background:#2e7d32;color:#fff;font:14px/1.2 system-ui,sans-serif";
        }
        element.setAttribute("role", "status");
        element.setAttribute("aria-live", "polite");
        element.textContent = typeof text === "string" ? text : "Checking for updates…";
        d.body.append(element);
      }
      if (element) element.hidden = !visible;
    },
    close() {
      closed = true;
      stream();
      lock();
      for (const kind in on) target(kind).removeEventListener(kind, on[kind]);
      if (channel) channel.close();
      clearTimeout(timer);
      if (element) element.remove();
      listeners = [];
      for (const resolve of waiting.values()) resolve(false);
      waiting.clear();
    },
  };
}
export function load(key) {
  try {
    return localStorage.getItem(key);
  } catch (e) {
    return null;
  }
}
export function save(key, value) {
  try {
    localStorage.setItem(key, value);
    return true;
  } catch (e) {
    return false;
  }
}
export function forget(key) {
  try {
    localStorage.removeItem(key);
  } catch (e) {}
}
let stamp = 0;
export function storeOps(prefix, ops) {
  const stored = new Map();
  let saved = true;
  try {
    for (let i = 0; i < localStorage.length; i++) {
      const key = localStorage.key(i);
      if (key.startsWith(prefix)) stored.set(key, localStorage.getItem(key));
    }
    for (const op of ops) {
      const key = prefix + op.op_id, old = stored.get(key);
      stored.delete(key);
      op.at = old ? JSON.parse(old).at : (stamp = Math.max(Date.now(), stamp + 1));
      const text = JSON.stringify(op);
      if (text !== old) saved = save(key, text) && saved;
    }
  } catch (e) {
    return false;
  }
  for (const key of stored.keys()) forget(key);
  return saved;
}
export function loadOps(prefix) {
  const ops = [];
  try {
    for (let i = 0; i < localStorage.length; i++) {
      const key = localStorage.key(i);
      if (key.startsWith(prefix)) ops.push(JSON.parse(localStorage.getItem(key)));
    }
  } catch (e) {}
  return ops.sort((a, b) => a.at - b.at);
}
export function error(code, message) {
  return Object.assign(new Error(message), { code });
}
export function readOptions(o) {
  const fail = (message) => {
    throw error("invalid_options", message);
  };
  if (typeof o !== "object" || o === null) fail("SyncManager needs an options object");
  const text = (name) => (typeof o[name] === "string" && o[name]) || fail("SyncManager needs " + name + " (a string)");
  const callback = (name) => (o[name] == null || typeof o[name] === "function" ? o[name] : fail(name + " must be a function"));
  const millis = (name) =>
    o[name] === undefined
      ? -1
      : typeof o[name] === "number" && o[name] >= 0 && o[name] < Infinity
        ? o[name]
        : fail(name + " must be a number of milliseconds");
  const user = text("userId"), site = text("siteId");
  const types = o.dataTypes === undefined ? ["balance", "profile", "roles"] : o.dataTypes;
  if (!Array.isArray(types)) fail("dataTypes must be an array");
  const { spinner } = o;
  if (!(spinner === undefined || spinner === false || typeof spinner === "function" || (typeof spinner === "object" && spinner !== null)))
    fail("spinner must be false, a function or an object");
  return [user, site, types, spinner, text("hubUrl"), callback("getToken"), callback("getGrant"),
    millis("spinnerDelayMs"), millis("inactivityMs"), millis("requestTimeoutMs"), o.debug === true];
}
export function readDelta(delta, field, options) {
  const amount = typeof delta === "number" ? delta : delta?.[field];
  if (!Number.isSafeInteger(amount)) return error("not_an_integer", "the delta must be a whole number, e.g. {coins: 10}");
  const grant = options?.grant;
  if (grant == null) return [amount];
  try {
    const opId = JSON.parse(atob(grant.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).op_id;
    if (typeof opId === "string" && opId) return [amount, grant, opId];
  } catch (e) {}
  return error("grant_invalid", "the grant must be a JWT whose payload names an op_id");
}
"#)]
extern "C" {
    /// The page's side of the wiring, calling `input` back (see [`Callback`]).
    type Host;
    fn connect(channel: &str, spinner: &JsValue, input: &JsValue) -> Host;

    /// `fetch` one request; answers with [`REPLY`].
    #[wasm_bindgen(method)]
    #[allow(clippy::too_many_arguments)]
    fn send(
        this: &Host,
        url: &str,
        method: &str,
        token: Option<&str>,
        if_none_match: Option<&str>,
        body: Option<&str>,
        keepalive: bool,
        id: f64,
    );

    /// Calls the page's `getToken` or `getGrant` (sync or async) with `request`; answers with
    /// [`ANSWER`], naming `op_id` for a grant.
    #[wasm_bindgen(method)]
    fn ask(this: &Host, callback: &Function, request: &JsValue, op_id: &JsValue);

    /// Replaces the timer: [`TIMER`] after `ms` milliseconds, none when `ms` is negative.
    #[wasm_bindgen(method)]
    fn arm(this: &Host, ms: f64);

    /// Shares a message with the site's other tabs.
    #[wasm_bindgen(method)]
    fn post(this: &Host, message: &JsValue);

    /// Asks for the site's stream lock (answers [`LOCKED`] once held), or lets go of it or of
    /// the request.
    #[wasm_bindgen(method)]
    fn lock(this: &Host, on: bool);

    /// Opens the event stream (replacing the one open), or closes it (`None`): `url` is the
    /// sync endpoint and the stream's query, read as `/api/events` beside it. Its events come
    /// back as [`STREAM_EVENT`] and are shared, its end as [`STREAM_END`].
    #[wasm_bindgen(method)]
    fn stream(this: &Host, url: Option<&str>, token: Option<&str>, last_event_id: Option<&str>);

    /// Whether the page is hidden.
    #[wasm_bindgen(method)]
    fn hidden(this: &Host) -> bool;

    /// Registers a listener; calls it at once with `data` and `meta` unless `data` is
    /// `undefined`.
    #[wasm_bindgen(method)]
    fn on(this: &Host, event: &str, listener: &Function, data: &JsValue, meta: &JsValue);

    #[wasm_bindgen(method)]
    fn off(this: &Host, event: &str, listener: &Function);

    /// Calls the listeners of `event`; one that throws is logged and the others still run.
    #[wasm_bindgen(method)]
    fn emit(this: &Host, event: &str, first: &JsValue, second: &JsValue);

    /// A promise that [`Host::done`] resolves for `ticket` (false at once once closed).
    #[wasm_bindgen(method)]
    fn wait(this: &Host, ticket: f64) -> Promise;

    #[wasm_bindgen(method)]
    fn done(this: &Host, ticket: f64, fresh: bool);

    /// Shows or hides the indicator: the built-in element (`role="status"`, `aria-live`,
    /// text set with `textContent`), the page's callback, or nothing (`spinner: false`).
    #[wasm_bindgen(method)]
    fn spinner(this: &Host, visible: bool);

    /// Unwires everything: page events, the channel, the timer, the indicator, the
    /// listeners; the promises still waiting resolve to false.
    #[wasm_bindgen(method)]
    fn close(this: &Host);

    /// `localStorage.getItem`, `None` when storage is unavailable.
    fn load(key: &str) -> Option<String>;

    /// `localStorage.setItem`; false when storage refused (full, or unavailable).
    fn save(key: &str, value: &str) -> bool;

    /// `localStorage.removeItem`.
    fn forget(key: &str);

    /// The values stored under keys that start with `prefix`, parsed, sorted by their `at`.
    #[wasm_bindgen(js_name = loadOps)]
    fn load_ops(prefix: &str) -> js_sys::Array;

    /// Stores each of `ops` (in order) under `prefix` and its op id when it is not stored so
    /// already, stamped (`at`) when first stored so that `loadOps` gives them back in order;
    /// removes the other keys under `prefix` (finished writes). False when storage refused.
    #[wasm_bindgen(js_name = storeOps)]
    fn store_ops(prefix: &str, ops: &JsValue) -> bool;

    /// An `Error` with a `code`: how the package refuses what the page asked.
    fn error(code: &str, message: &str) -> JsValue;

    /// The page's `SyncOptions` in an array, in this order: userId, siteId, dataTypes,
    /// spinner, hubUrl, getToken, getGrant, spinnerDelayMs, inactivityMs, requestTimeoutMs (-1
    /// when not given), debug; or the `Error` (code `invalid_options`) naming the first that is
    /// wrong.
    #[wasm_bindgen(catch, js_name = readOptions)]
    pub(crate) fn read_options(options: &JsValue) -> Result<js_sys::Array, JsValue>;

    /// What `applyDelta` was given, as `[amount]` or `[amount, grant, its op id]`: the amount
    /// (a number, or the `field` of an object) a safe integer, and the grant's payload
    /// (base64url JSON, read without checking the signature: the hub does) naming an op id;
    /// else the `Error` saying which is wrong.
    #[wasm_bindgen(js_name = readDelta)]
    fn read_delta(delta: &JsValue, field: &str, options: &JsValue) -> JsValue;
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = log)]
    fn console_log(line: &str);
}
