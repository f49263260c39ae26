//! Wiring between the page and the engine: every input goes to the engine with the current
//! time, then [`Shell::drive`] drains the engine's outputs in the documented order. The two
//! asynchronous browser calls (`fetch`, the page's `getToken`) are a few lines of JavaScript
//! that call back into Rust once: cheaper in the package than Rust futures.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use gloo_timers::callback::Timeout;
use js_sys::{Function, Promise};
use protocol::Refusal;
use sync_core::{
    Config, DataType, Engine, Event, Json, Method, Persisted, Reply, Request, Shared, Source, Trigger,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen::{JsCast, JsValue};

use crate::options::Options;
use crate::spinner::Spinner;

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
        let error = js_sys::Error::new(&e.message);
        let _ = js_sys::Reflect::set(&error, &"code".into(), &e.code.into());
        error.into()
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

/// A Rust function the page's JavaScript calls with one value.
type Callback = Closure<dyn FnMut(JsValue)>;

pub(crate) struct Shell {
    engine: RefCell<Engine>,
    endpoint: String,
    storage_key: String,
    get_token: Option<Function>,
    /// Page callbacks by event name, in registration order.
    listeners: RefCell<Vec<(String, Function)>>,
    /// Promise resolvers by check ticket.
    waiting: RefCell<Vec<(u64, Function)>>,
    spinner: RefCell<Spinner>,
    timer: RefCell<Option<Timeout>>,
    /// The page events and the tabs' channel, wired in JavaScript (see `wire` below).
    wiring: RefCell<Option<Wiring>>,
    /// The callbacks `wiring` calls; kept alive as long as the shell.
    callbacks: RefCell<Vec<Callback>>,
    destroyed: Cell<bool>,
    this: Weak<Shell>,
}

impl Shell {
    pub(crate) fn start(options: Options) -> Result<Rc<Shell>, SyncError> {
        let endpoint = options.endpoint();
        let storage_key = ["unified-sync:", &endpoint, ":", &options.user_id].concat();
        let channel = [storage_key.as_str(), ":", &options.site_id].concat();
        let debug = options.debug
            || storage().and_then(|s| s.get_item("sync_debug").ok().flatten()).as_deref() == Some("true");
        let mut config =
            Config::new(options.site_id.clone(), options.user_id.clone(), options.data_types.clone());
        config.needs_token = options.get_token.is_some();
        config.debug = debug;
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
        let stored = load(&storage_key);
        let engine = Engine::new(config, stored, now());
        let shell = Rc::new_cyclic(|this| Shell {
            engine: RefCell::new(engine),
            endpoint,
            storage_key,
            get_token: options.get_token,
            listeners: RefCell::new(Vec::new()),
            waiting: RefCell::new(Vec::new()),
            spinner: RefCell::new(Spinner::new(options.spinner)),
            timer: RefCell::new(None),
            wiring: RefCell::new(None),
            callbacks: RefCell::new(Vec::new()),
            destroyed: Cell::new(false),
            this: this.clone(),
        });
        shell.wire(&channel);
        shell.drive();
        Ok(shell)
    }

    /// Registers the page events the engine reacts to (`focus` is deliberately not one) and
    /// the channel the site's tabs share fresh data on.
    fn wire(&self, channel: &str) {
        let this = self.this.clone();
        let on_event = Callback::new(move |code: JsValue| {
            let Some(shell) = this.upgrade().filter(|s| !s.destroyed.get()) else { return };
            let mut engine = shell.engine.borrow_mut();
            match code.as_f64().unwrap_or(0.0) as u8 {
                1 => {
                    engine.handle_trigger(now(), Trigger::TabVisible);
                }
                2 => engine.handle_hidden(now()),
                3 => {
                    engine.handle_trigger(now(), Trigger::PageShow);
                }
                4 => {
                    engine.handle_trigger(now(), Trigger::Online);
                }
                5 => engine.handle_offline(now()),
                _ => engine.handle_unload(now()),
            }
            drop(engine);
            shell.drive();
        });
        let this = self.this.clone();
        let on_shared = Callback::new(move |message: JsValue| {
            let Some(shell) = this.upgrade().filter(|s| !s.destroyed.get()) else { return };
            if let Some(shared) = Shared::from_json(&from_js(&message)) {
                shell.engine.borrow_mut().handle_shared(now(), shared);
                shell.drive();
            }
        });
        *self.wiring.borrow_mut() = Some(wire(channel, on_event.as_ref(), on_shared.as_ref()));
        self.callbacks.borrow_mut().extend([on_event, on_shared]);
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
        let timer = due.map(|at| {
            let this = self.this.clone();
            Timeout::new(at.saturating_sub(now()).min(u64::from(u32::MAX)) as u32, move || {
                if let Some(shell) = this.upgrade() {
                    shell.engine.borrow_mut().handle_timeout(now());
                    shell.drive();
                }
            })
        });
        // Replacing the previous timeout cancels it.
        *self.timer.borrow_mut() = timer;
    }

    fn on_event(&self, event: Event) {
        match event {
            Event::Data { data_type, data, version, last_updated, source, pending } => {
                let meta = meta(version, last_updated, source_name(source), pending);
                self.emit(data_type.as_str(), &to_js(&data), &meta);
            }
            Event::Status(status) => self.emit("status", &status.as_str().into(), &JsValue::UNDEFINED),
            Event::Spinner(visible) => self.spinner.borrow_mut().show(visible),
            Event::CheckDone { ticket, fresh } => {
                let resolve = {
                    let mut waiting = self.waiting.borrow_mut();
                    waiting.iter().position(|(t, _)| *t == ticket).map(|i| waiting.swap_remove(i).1)
                };
                if let Some(resolve) = resolve {
                    let _ = resolve.call1(&JsValue::NULL, &JsValue::from_bool(fresh));
                }
            }
            Event::Refused { data_type, op_id, code, message } => {
                let refused = Json::object()
                    .with("dataType", data_type.as_str())
                    .with("opId", op_id)
                    .with("code", code)
                    .with("message", message);
                self.emit("refused", &to_js(&refused), &JsValue::UNDEFINED);
            }
            Event::NeedToken => self.fetch_token(),
            Event::Persist => self.persist(),
            Event::Share(shared) => {
                if let Some(wiring) = &*self.wiring.borrow() {
                    wiring.post(&to_js(&shared.to_json()));
                }
            }
            Event::Log(line) => web_sys::console::log_1(&line.into()),
        }
    }

    fn emit(&self, event: &str, first: &JsValue, second: &JsValue) {
        let listeners: Vec<Function> = self
            .listeners
            .borrow()
            .iter()
            .filter(|(name, _)| name == event)
            .map(|(_, f)| f.clone())
            .collect();
        for listener in listeners {
            if let Err(e) = listener.call2(&JsValue::NULL, first, second) {
                web_sys::console::error_2(&"unified-balance: a listener threw".into(), &e);
            }
        }
    }

    /// Merges writes other tabs stored (they are adopted, and the hub applies each op once),
    /// then stores this engine's state.
    fn persist(&self) {
        let Some(storage) = storage() else { return };
        if let Some(stored) = load(&self.storage_key) {
            self.engine.borrow_mut().handle_stored_ops(now(), stored.outbox);
        }
        let state = self.engine.borrow().persisted();
        let _ = storage.set_item(&self.storage_key, &stringify(&state.to_json()));
    }

    fn fetch_token(&self) {
        let Some(get_token) = self.get_token.clone() else { return };
        let this = self.this.clone();
        let done = Closure::once_into_js(move |token: String| {
            if let Some(shell) = this.upgrade() {
                shell.engine.borrow_mut().handle_token(now(), Some(token).filter(|t| !t.is_empty()));
                shell.drive();
            }
        });
        ask_token(&get_token, &done);
    }

    fn send(&self, request: Request) {
        let this = self.this.clone();
        let id = request.id;
        let done = Closure::once_into_js(move |status: u16, retry_after: Option<String>, text: String| {
            let reply = if status == 0 {
                Reply::NetworkError
            } else {
                let body = if text.is_empty() { Json::Null } else { parse(&text) };
                Reply::Answer { status, body, retry_after: retry_after.and_then(|v| v.trim().parse().ok()) }
            };
            if let Some(shell) = this.upgrade()
                && !shell.destroyed.get()
            {
                shell.engine.borrow_mut().handle_reply(now(), id, reply);
                shell.drive();
            }
        });
        let (url, method) = match (&request.method, &request.query) {
            (Method::Get, Some(query)) => ([self.endpoint.as_str(), "?", query].concat(), "GET"),
            _ => (self.endpoint.clone(), "POST"),
        };
        hub_request(
            &url,
            method,
            request.token.as_deref(),
            request.if_none_match.as_deref(),
            request.body.as_ref().map(stringify).as_deref(),
            request.keepalive,
            &done,
        );
    }

    // ---- the page's calls ----

    pub(crate) fn on(&self, event: &str, listener: Function) {
        self.listeners.borrow_mut().push((event.to_owned(), listener.clone()));
        // A data listener hears at once what is already known.
        if let Some(data_type) = sync_core::data_type_named(event) {
            let engine = self.engine.borrow();
            if let Some(view) = engine.view(data_type) {
                let record = engine.record(data_type).cloned();
                let pending = engine.pending().filter(|op| op.data_type == data_type).count();
                drop(engine);
                let (version, last_updated) = record.map_or((0, None), |r| (r.version, r.last_updated));
                let meta = meta(version, last_updated, "cache", pending);
                let _ = listener.call2(&JsValue::NULL, &to_js(&view), &meta);
            }
        }
    }

    pub(crate) fn off(&self, event: &str, listener: &Function) {
        self.listeners.borrow_mut().retain(|(name, l)| !(name == event && l == listener));
    }

    pub(crate) fn check(&self, trigger: Trigger) -> Promise {
        let mut resolve_slot = None;
        let promise = Promise::new(&mut |resolve, _reject| resolve_slot = Some(resolve));
        if self.destroyed.get() {
            if let Some(resolve) = resolve_slot {
                let _ = resolve.call1(&JsValue::NULL, &JsValue::FALSE);
            }
            return promise;
        }
        let ticket = self.engine.borrow_mut().handle_trigger(now(), trigger);
        if let Some(resolve) = resolve_slot {
            self.waiting.borrow_mut().push((ticket, resolve));
        }
        self.drive();
        promise
    }

    pub(crate) fn apply_delta(
        &self,
        data_type: &str,
        delta: &JsValue,
        reason: Option<String>,
    ) -> Result<String, SyncError> {
        let data_type = data_type_of(data_type)?;
        let amount = match delta.as_f64() {
            Some(n) => Some(n),
            None => protocol::amount_field(data_type)
                .and_then(|field| js_sys::Reflect::get(delta, &field.into()).ok())
                .and_then(|v| v.as_f64()),
        };
        let amount =
            amount.filter(|n| n.fract() == 0.0 && n.abs() <= protocol::MAX_AMOUNT as f64).ok_or_else(
                || SyncError::new("not_an_integer", "the delta must be a whole number, e.g. {coins: 10}"),
            )?;
        let op_id = self.engine.borrow_mut().apply_delta(now(), data_type, amount as i64, reason)?;
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

    /// The engine's status; once destroyed, a check it was waiting on will never end, so
    /// the manager reports `idle` instead of `syncing`.
    pub(crate) fn status(&self) -> &'static str {
        match self.engine.borrow().status() {
            sync_core::Status::Syncing if self.destroyed.get() => sync_core::Status::Idle.as_str(),
            status => status.as_str(),
        }
    }

    pub(crate) fn destroy(&self) {
        if self.destroyed.replace(true) {
            return;
        }
        if let Some(wiring) = self.wiring.borrow_mut().take() {
            wiring.close();
        }
        self.timer.borrow_mut().take();
        self.spinner.borrow_mut().remove();
        self.listeners.borrow_mut().clear();
        for (_, resolve) in std::mem::take(&mut *self.waiting.borrow_mut()) {
            let _ = resolve.call1(&JsValue::NULL, &JsValue::FALSE);
        }
    }
}

/// The data type a page names, or an error listing the valid ones.
pub(crate) fn data_type_of(name: &str) -> Result<DataType, SyncError> {
    sync_core::data_type_named(name).ok_or_else(|| {
        SyncError::new(
            "invalid_data_type",
            "the data type must be balance, points, profile, roles or settings",
        )
    })
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

fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok().flatten()
}

fn load(key: &str) -> Option<Persisted> {
    let text = storage()?.get_item(key).ok().flatten()?;
    Some(Persisted::from_json(&parse(&text)))
}

#[wasm_bindgen(inline_js = r#"
export function hubRequest(url, method, token, ifNoneMatch, body, keepalive, done) {
  const headers = {};
  if (token) headers.Authorization = "Bearer " + token;
  if (ifNoneMatch) headers["If-None-Match"] = ifNoneMatch;
  if (body != null) headers["Content-Type"] = "application/json";
  fetch(url, { method, headers, body, keepalive, mode: "cors" })
    .then((r) => r.text().then((t) => done(r.status, r.headers.get("Retry-After"), t)))
    .catch(() => done(0, null, ""));
}
export function wire(channelName, onEvent, onShared) {
  const d = document;
  const on = {
    visibilitychange: () => onEvent(d.visibilityState === "visible" ? 1 : 2),
    pageshow: (e) => e.persisted && onEvent(3),
    online: () => onEvent(4),
    offline: () => onEvent(5),
    pagehide: () => onEvent(6),
  };
  const target = (kind) => (kind === "visibilitychange" ? d : globalThis);
  for (const kind in on) target(kind).addEventListener(kind, on[kind]);
  let channel = null;
  if (typeof BroadcastChannel === "function") {
    channel = new BroadcastChannel(channelName);
    channel.onmessage = (e) => onShared(e.data);
  }
  return {
    post: (message) => channel && channel.postMessage(message),
    close: () => {
      for (const kind in on) target(kind).removeEventListener(kind, on[kind]);
      if (channel) channel.close();
    },
  };
}
export function askToken(getToken, done) {
  Promise.resolve()
    .then(() => getToken())
    .then((t) => done(typeof t === "string" ? t : ""), () => done(""));
}
"#)]
extern "C" {
    /// `fetch` one request; `done(status, retryAfter, text)`, with status 0 when no answer came.
    #[wasm_bindgen(js_name = hubRequest)]
    fn hub_request(
        url: &str,
        method: &str,
        token: Option<&str>,
        if_none_match: Option<&str>,
        body: Option<&str>,
        keepalive: bool,
        done: &JsValue,
    );

    /// Calls the page's `getToken` (sync or async); `done(token)`, empty when it failed.
    #[wasm_bindgen(js_name = askToken)]
    fn ask_token(get_token: &Function, done: &JsValue);

    /// The page's events (`onEvent(code)`: 1 visible, 2 hidden, 3 restored from the
    /// back/forward cache, 4 online, 5 offline, 6 page hidden for good) and the tabs' channel.
    type Wiring;
    fn wire(channel: &str, on_event: &JsValue, on_shared: &JsValue) -> Wiring;
    #[wasm_bindgen(method)]
    fn post(this: &Wiring, message: &JsValue);
    #[wasm_bindgen(method)]
    fn close(this: &Wiring);
}
