//! Wiring between the page and the engine: every input goes to the engine with the current
//! time, then [`Shell::drive`] drains the engine's outputs in the documented order.

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
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{BroadcastChannel, MessageEvent, RequestInit, RequestMode, Response};

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

/// One registered DOM listener, kept to be removed on `destroy`.
struct Listener {
    target: web_sys::EventTarget,
    kind: &'static str,
    closure: Closure<dyn FnMut(web_sys::Event)>,
}

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
    channel: Option<BroadcastChannel>,
    dom: RefCell<Vec<Listener>>,
    destroyed: Cell<bool>,
    this: Weak<Shell>,
}

impl Shell {
    pub(crate) fn start(options: Options) -> Result<Rc<Shell>, SyncError> {
        let endpoint = options.endpoint();
        let storage_key = format!("unified-sync:{endpoint}:{}", options.user_id);
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
        let channel = BroadcastChannel::new(&format!("{storage_key}:{}", options.site_id)).ok();
        let shell = Rc::new_cyclic(|this| Shell {
            engine: RefCell::new(engine),
            endpoint,
            storage_key,
            get_token: options.get_token,
            listeners: RefCell::new(Vec::new()),
            waiting: RefCell::new(Vec::new()),
            spinner: RefCell::new(Spinner::new(options.spinner)),
            timer: RefCell::new(None),
            channel,
            dom: RefCell::new(Vec::new()),
            destroyed: Cell::new(false),
            this: this.clone(),
        });
        shell.wire();
        shell.drive();
        Ok(shell)
    }

    /// Registers the page events the engine reacts to. `focus` is deliberately not one.
    fn wire(&self) {
        let Some(window) = web_sys::window() else { return };
        if let Some(document) = window.document() {
            self.listen(document.into(), "visibilitychange", |shell, _| {
                let visible = web_sys::window()
                    .and_then(|w| w.document())
                    .is_none_or(|d| d.visibility_state() == web_sys::VisibilityState::Visible);
                if visible {
                    shell.engine.borrow_mut().handle_trigger(now(), Trigger::TabVisible);
                } else {
                    shell.engine.borrow_mut().handle_hidden(now());
                }
            });
        }
        let target: web_sys::EventTarget = window.into();
        self.listen(target.clone(), "pageshow", |shell, event| {
            let persisted = event.dyn_ref::<web_sys::PageTransitionEvent>().is_some_and(|e| e.persisted());
            if persisted {
                shell.engine.borrow_mut().handle_trigger(now(), Trigger::PageShow);
            }
        });
        self.listen(target.clone(), "online", |shell, _| {
            shell.engine.borrow_mut().handle_trigger(now(), Trigger::Online);
        });
        self.listen(target.clone(), "offline", |shell, _| shell.engine.borrow_mut().handle_offline(now()));
        self.listen(target, "pagehide", |shell, _| shell.engine.borrow_mut().handle_unload(now()));
        if let Some(channel) = &self.channel {
            self.listen(channel.clone().into(), "message", |shell, event| {
                let data = event.dyn_ref::<MessageEvent>().map(|m| from_js(&m.data()));
                if let Some(shared) = data.as_ref().and_then(Shared::from_json) {
                    shell.engine.borrow_mut().handle_shared(now(), shared);
                }
            });
        }
    }

    fn listen(&self, target: web_sys::EventTarget, kind: &'static str, handler: fn(&Shell, &web_sys::Event)) {
        let this = self.this.clone();
        let closure = Closure::<dyn FnMut(web_sys::Event)>::new(move |event: web_sys::Event| {
            if let Some(shell) = this.upgrade()
                && !shell.destroyed.get()
            {
                handler(&shell, &event);
                shell.drive();
            }
        });
        let _ = target.add_event_listener_with_callback(kind, closure.as_ref().unchecked_ref());
        self.dom.borrow_mut().push(Listener { target, kind, closure });
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
                let meta = js_sys::Object::new();
                let set = |k: &str, v: JsValue| {
                    let _ = js_sys::Reflect::set(&meta, &k.into(), &v);
                };
                set("version", JsValue::from_f64(version as f64));
                set("lastUpdated", last_updated.map_or(JsValue::NULL, |s| JsValue::from_str(&s)));
                set("source", source_name(source).into());
                set("pending", JsValue::from_f64(pending as f64));
                self.emit(data_type.as_str(), &to_js(&data), &meta.into());
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
                let refused = js_sys::Object::new();
                for (k, v) in [
                    ("dataType", data_type.as_str()),
                    ("opId", &op_id),
                    ("code", &code),
                    ("message", &message),
                ] {
                    let _ = js_sys::Reflect::set(&refused, &k.into(), &v.into());
                }
                self.emit("refused", &refused.into(), &JsValue::UNDEFINED);
            }
            Event::NeedToken => self.fetch_token(),
            Event::Persist => self.persist(),
            Event::Share(shared) => {
                if let Some(channel) = &self.channel {
                    let _ = channel.post_message(&to_js(&shared.to_json()));
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
        spawn_local(async move {
            let token = match get_token.call0(&JsValue::NULL) {
                Ok(value) => match value.dyn_into::<Promise>() {
                    Ok(promise) => JsFuture::from(promise).await.ok().and_then(|v| v.as_string()),
                    Err(value) => value.as_string(),
                },
                Err(_) => None,
            };
            if let Some(shell) = this.upgrade() {
                shell.engine.borrow_mut().handle_token(now(), token.filter(|t| !t.is_empty()));
                shell.drive();
            }
        });
    }

    fn send(&self, request: Request) {
        let endpoint = self.endpoint.clone();
        let this = self.this.clone();
        spawn_local(async move {
            let id = request.id;
            let reply = fetch(&endpoint, request).await;
            if let Some(shell) = this.upgrade()
                && !shell.destroyed.get()
            {
                shell.engine.borrow_mut().handle_reply(now(), id, reply);
                shell.drive();
            }
        });
    }

    // ---- the page's calls ----

    pub(crate) fn on(&self, event: &str, listener: Function) {
        self.listeners.borrow_mut().push((event.to_owned(), listener.clone()));
        // A data listener hears at once what is already known.
        if let Ok(data_type) = DataType::parse(event) {
            let engine = self.engine.borrow();
            if let Some(view) = engine.view(data_type) {
                let record = engine.record(data_type).cloned();
                let pending = engine.pending().filter(|op| op.data_type == data_type).count();
                drop(engine);
                let meta = js_sys::Object::new();
                let _ = js_sys::Reflect::set(
                    &meta,
                    &"version".into(),
                    &JsValue::from_f64(record.as_ref().map_or(0, |r| r.version) as f64),
                );
                let last = record.and_then(|r| r.last_updated);
                let _ = js_sys::Reflect::set(
                    &meta,
                    &"lastUpdated".into(),
                    &last.map_or(JsValue::NULL, |s| s.into()),
                );
                let _ = js_sys::Reflect::set(&meta, &"source".into(), &"cache".into());
                let _ = js_sys::Reflect::set(&meta, &"pending".into(), &JsValue::from_f64(pending as f64));
                let _ = listener.call2(&JsValue::NULL, &to_js(&view), &meta.into());
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
        let data_type = DataType::parse(data_type)?;
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
        let data_type = DataType::parse(data_type)?;
        let patch = from_js(changes);
        let op_id = self.engine.borrow_mut().push_changes(now(), data_type, patch)?;
        self.drive();
        Ok(op_id)
    }

    pub(crate) fn get(&self, data_type: &str) -> Result<JsValue, SyncError> {
        let data_type = DataType::parse(data_type)?;
        Ok(self.engine.borrow().view(data_type).map_or(JsValue::UNDEFINED, |v| to_js(&v)))
    }

    pub(crate) fn status(&self) -> &'static str {
        self.engine.borrow().status().as_str()
    }

    pub(crate) fn destroy(&self) {
        if self.destroyed.replace(true) {
            return;
        }
        for listener in self.dom.borrow_mut().drain(..) {
            let _ = listener.target.remove_event_listener_with_callback(
                listener.kind,
                listener.closure.as_ref().unchecked_ref(),
            );
        }
        if let Some(channel) = &self.channel {
            channel.close();
        }
        self.timer.borrow_mut().take();
        self.spinner.borrow_mut().remove();
        self.listeners.borrow_mut().clear();
        for (_, resolve) in std::mem::take(&mut *self.waiting.borrow_mut()) {
            let _ = resolve.call1(&JsValue::NULL, &JsValue::FALSE);
        }
    }
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

/// Sends one request; any failure to get an answer is a `NetworkError`.
async fn fetch(endpoint: &str, request: Request) -> Reply {
    let init = RequestInit::new();
    let headers = web_sys::Headers::new().expect("Headers can be made");
    init.set_mode(RequestMode::Cors);
    // The default cache mode: the hub marks its answers `no-store` (or `no-cache` with an
    // ETag), so the browser never answers from a stale copy, and the engine's own
    // `If-None-Match` makes a fetch bypass the HTTP cache anyway. `no-store` here would also
    // bypass Chromium's CORS preflight cache: every check would cost a second request.
    if let Some(token) = &request.token {
        let _ = headers.set("Authorization", &format!("Bearer {token}"));
    }
    if let Some(tag) = &request.if_none_match {
        let _ = headers.set("If-None-Match", tag);
    }
    let url = match (&request.method, &request.query) {
        (Method::Get, Some(query)) => {
            init.set_method("GET");
            format!("{endpoint}?{query}")
        }
        _ => {
            init.set_method("POST");
            let _ = headers.set("Content-Type", "application/json");
            init.set_body(&JsValue::from_str(&request.body.as_ref().map_or_else(|| "{}".into(), stringify)));
            endpoint.to_owned()
        }
    };
    init.set_headers(&headers);
    if request.keepalive {
        // `keepalive` lets the request outlive the page (web-sys exposes no setter for it).
        let _ = js_sys::Reflect::set(&init, &"keepalive".into(), &JsValue::TRUE);
    }
    let Some(window) = web_sys::window() else { return Reply::NetworkError };
    let Ok(response) = JsFuture::from(window.fetch_with_str_and_init(&url, &init)).await else {
        return Reply::NetworkError;
    };
    let Ok(response) = response.dyn_into::<Response>() else { return Reply::NetworkError };
    let status = response.status();
    let retry_after =
        response.headers().get("Retry-After").ok().flatten().and_then(|v| v.trim().parse().ok());
    let body = match response.text() {
        Ok(promise) => {
            JsFuture::from(promise).await.ok().and_then(|v| v.as_string()).map_or(Json::Null, |t| parse(&t))
        }
        Err(_) => Json::Null,
    };
    Reply::Answer { status, body, retry_after }
}
