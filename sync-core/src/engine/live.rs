//! The hub's event stream, for a page with [`Config::live`](super::Config::live): wanted while
//! the tab is visible or hidden for less than [`STREAM_GRACE_MS`]; kept by the one tab of a
//! site holding the site's stream lock, which shares its events (and whether it is live) with
//! the others; opened with the token and the last event id seen, here or shared, so that it
//! resumes; reopened after a backoff with jitter (at least the hub's `Retry-After`), at once
//! after `reauth` with a fresh token, and when silent for
//! [`Config::stream_silence_ms`](super::Config::stream_silence_ms) (the hub then counts as
//! unreachable); given up for the page's life when the hub has none (a
//! 404, or another final refusal), leaving the checks as they were.
//!
//! What the events do: a change newer than the cache is stored as a fetch's answer would be
//! (pending writes stay on top; while a write of its type is on its way, after its answer); a
//! change without its data is fetched by the tab holding the stream, which shares what it
//! gets; one no newer than the cache is ignored, so duplicates and reordering are harmless. A
//! fresh stream's `ready` checks unless a check ended since it began opening; `resync`
//! checks; a new epoch drops the cache. A tab return while the stream is open or shared needs
//! no check, and one whose stream can resume waits for its `ready` (or its failure, or
//! [`STREAM_READY_WAIT_MS`]) instead. Sends through the engine; reads no clock.

use alloc::{borrow::ToOwned, string::String, vec::Vec};

use protocol::DataType;
use protocol::compact::decimal;
use protocol::wire;

use super::requests::Purpose;
use super::write::backoff_ms;
use super::{Engine, Link};
use crate::cache::CachedRecord;
use crate::{
    Event, Json, Request, STREAM_GRACE_MS, STREAM_READY_WAIT_MS, Source, StreamEvent, StreamInput,
    StreamRequest,
};

/// The stream as this tab has it, and what it remembers between streams.
#[derive(Debug, Default)]
pub(super) struct Live {
    state: State,
    /// The id of the last event seen, on this tab's stream or shared: the next stream resumes
    /// after it.
    last_id: Option<String>,
    /// A change an event announced could not be fetched: the next `ready` checks, and a tab
    /// return does not wait for the stream. A check that ends fresh clears it.
    missed: bool,
    /// Failed openings since the last `ready`: each doubles the delay before the next.
    attempts: u32,
    /// When the tab was hidden, while it is.
    hidden_ms: Option<u64>,
    /// When this tab's stream last brought anything (or was asked for).
    heard_ms: u64,
    /// The tab holding the site's stream says it is live (heard while waiting for the lock).
    shared: bool,
    /// Whether the page was last told it is live.
    told: bool,
    /// When a check last ended fresh: a fresh stream's `ready` needs none after it.
    checked_ms: u64,
    /// A tab return waits for the stream's `ready` until then, instead of a check.
    owed_until_ms: Option<u64>,
    /// Records events brought while a write of their type was on its way: stored once the hub
    /// answers it, so that the write's own effect is not shown twice meanwhile.
    pub(super) deferred: Vec<(DataType, CachedRecord)>,
}

#[derive(Debug, Default)]
enum State {
    /// Not wanted: the page keeps no stream, or the tab is hidden past the grace.
    #[default]
    Off,
    /// Wanted: waiting for the site's stream lock, which another tab may hold.
    Waiting,
    /// Holding the lock, no stream open: it opens at `at_ms`, once a token is there.
    Closed { at_ms: u64 },
    /// Asked for at `since_ms` with `token`; no `ready` yet.
    Opening { since_ms: u64, token: Option<String> },
    /// Its `ready` came: changes arrive as they happen.
    Open { token: Option<String> },
    /// The hub has no event stream for this page (404, or another final refusal): checks only,
    /// for the rest of the page's life.
    Unavailable,
}

impl Live {
    /// Whether this tab's stream is opening or open.
    fn streaming(&self) -> bool {
        matches!(self.state, State::Opening { .. } | State::Open { .. })
    }

    /// Whether the stream is wanted (the lock asked for or held).
    fn wanted(&self) -> bool {
        !matches!(self.state, State::Off | State::Unavailable)
    }

    /// Changes reach the page live.
    pub(super) fn live(&self) -> bool {
        matches!(self.state, State::Open { .. }) || self.shared
    }

    /// A check ended fresh at `now`.
    pub(super) fn checked(&mut self, now: u64) {
        self.checked_ms = now;
        self.missed = false;
    }

    /// A change an event announced could not be fetched.
    pub(super) fn missed(&mut self) {
        self.missed = true;
    }

    /// The tab was hidden at `now` (the grace counts from the first time).
    pub(super) fn hidden(&mut self, now: u64) {
        self.hidden_ms.get_or_insert(now);
    }

    /// When the stream is to open (if it `may_open`), count as broken after `silence_ms`,
    /// close for the grace, or stop being waited for.
    pub(super) fn next_timeout(&self, may_open: bool, silence_ms: u64) -> Option<u64> {
        let open = match self.state {
            State::Closed { at_ms } if may_open => Some(at_ms),
            State::Opening { .. } | State::Open { .. } => Some(self.heard_ms.saturating_add(silence_ms)),
            _ => None,
        };
        let grace = self.hidden_ms.filter(|_| self.wanted()).map(|at| at + STREAM_GRACE_MS);
        [open, grace, self.owed_until_ms].into_iter().flatten().min()
    }

    // Every change of state happens below.

    fn move_to(&mut self, state: State) {
        debug_assert!(
            !matches!(self.state, State::Unavailable),
            "a stream the hub lacks is never wanted again"
        );
        self.state = state;
    }
}

impl Engine {
    /// The page is visible: the stream is wanted again, and the shell asks for the lock.
    pub(super) fn want_stream(&mut self) {
        self.live.hidden_ms = None;
        if self.config.live && matches!(self.live.state, State::Off) {
            self.live.move_to(State::Waiting);
            self.events.push(Event::StreamLock(true));
        }
    }

    /// The tab returned: whether the stream makes a check needless, being open or shared
    /// live, or resuming (its `ready` decides, unless it fails or is late).
    pub(super) fn stream_covers(&mut self, now: u64) -> bool {
        let resumes = self.live.last_id.is_some() && !self.live.missed && self.live.wanted();
        if !(self.live.live() || resumes) {
            return false;
        }
        if !self.live.live() {
            self.live.owed_until_ms.get_or_insert(now + STREAM_READY_WAIT_MS);
        }
        self.log(&["Tab visible - event stream → no check"]);
        true
    }

    /// Whether the stream may open once its time comes: the browser online, auth not given
    /// up on.
    pub(super) fn stream_may_open(&self) -> bool {
        self.link != Link::Offline && !self.token.failed()
    }

    pub(super) fn stream_due(&self, now: u64) -> bool {
        matches!(self.live.state, State::Closed { at_ms } if now >= at_ms) && self.stream_may_open()
    }

    /// Opens the stream (a token is there, or none is needed).
    pub(super) fn open_stream(&mut self, now: u64) {
        let token = self.token.current().map(str::to_owned);
        let last_event_id = self.live.last_id.clone();
        let query = protocol::compact::concat(&["user_id=", &self.config.user_id]);
        self.events.push(Event::Stream(Some(StreamRequest { query, token: token.clone(), last_event_id })));
        self.live.heard_ms = now;
        self.live.move_to(State::Opening { since_ms: now, token });
    }

    /// Time passed: the grace of a hidden tab, a tab return waiting for the stream.
    pub(super) fn stream_tick(&mut self, now: u64) {
        if self.live.hidden_ms.is_some_and(|at| now >= at + STREAM_GRACE_MS) {
            self.leave_stream();
        }
        if self.live.owed_until_ms.is_some_and(|at| now >= at) {
            self.check_for_stream(now);
        }
        if self.live.streaming() && now >= self.live.heard_ms.saturating_add(self.config.stream_silence_ms) {
            self.log(&["stream silent → hub unreachable"]);
            if self.link == Link::Up {
                self.link = Link::Unreachable;
            }
            self.events.push(Event::Stream(None));
            self.on_stream_end(now, 0, &Json::Null, None);
        }
    }

    /// No stream and no lock (hidden past the grace, the page leaving), until wanted again.
    pub(super) fn leave_stream(&mut self) {
        if self.live.wanted() {
            self.stop_stream(State::Off);
        }
    }

    /// Closes the stream if open and lets go of the lock, moving to `state`.
    fn stop_stream(&mut self, state: State) {
        self.log(&["stream closed"]);
        if self.live.streaming() {
            self.events.push(Event::Stream(None));
        }
        self.events.push(Event::StreamLock(false));
        self.live.shared = false;
        self.live.move_to(state);
    }

    /// A check the stream asks for, or that a tab return waiting for it needs after all.
    fn check_for_stream(&mut self, now: u64) {
        self.live.owed_until_ms = None;
        self.start_check(now, "Event stream", None);
    }

    /// Tells the page whether it is live, when that changed.
    pub(super) fn update_live(&mut self) {
        let live = self.live.live();
        if live != self.live.told {
            self.live.told = live;
            self.log(&[if live { "stream live" } else { "stream not live" }]);
            self.events.push(Event::Live(live));
        }
    }

    pub(super) fn on_stream(&mut self, now: u64, input: StreamInput) {
        let waiting = matches!(self.live.state, State::Waiting);
        match input {
            StreamInput::Locked if waiting => {
                self.live.shared = false;
                self.live.move_to(State::Closed { at_ms: now });
            }
            // Held after it was let go of: let go of it again.
            StreamInput::Locked => self.events.push(Event::StreamLock(false)),
            StreamInput::Event(event) if self.live.streaming() => {
                self.live.heard_ms = now;
                self.on_stream_event(now, event, true);
            }
            StreamInput::Shared(event) => self.on_stream_event(now, event, false),
            StreamInput::SharedLive(live) if waiting => {
                self.live.shared = live;
                if live {
                    self.live.owed_until_ms = None;
                }
            }
            StreamInput::Ended { status, body, retry_after } if self.live.streaming() => {
                self.on_stream_end(now, status, &body, retry_after);
            }
            _ => {}
        }
    }

    fn on_stream_event(&mut self, now: u64, event: StreamEvent, own: bool) {
        if event.id.is_some() {
            self.live.last_id = event.id;
        }
        let data = &event.data;
        let name = event.name.as_str();
        match name {
            "" => return self.on_change(now, data, own),
            "ready" | "resync" | "reauth" => {}
            _ => return,
        }
        if !own {
            self.adopt_epoch(wire::epoch(data));
            return;
        }
        let (since, token) = match &mut self.live.state {
            State::Opening { since_ms, token } => (*since_ms, token.take()),
            State::Open { token } => (now, token.take()),
            _ => (now, None),
        };
        if name == "reauth" {
            self.token.expired();
            self.events.push(Event::Stream(None));
            self.live.move_to(State::Closed { at_ms: now });
            return;
        }
        self.live.move_to(State::Open { token });
        self.live.attempts = 0;
        self.token.accepted();
        if self.link == Link::Unreachable {
            self.link = Link::Up;
        }
        let dropped = self.adopt_epoch(wire::epoch(data));
        let resumed = data.get("resumed").and_then(Json::as_bool) == Some(true);
        if name == "resync" || dropped || self.live.missed || !(resumed || self.live.checked_ms >= since) {
            self.check_for_stream(now);
        }
        self.live.owed_until_ms = None;
    }

    /// A change event: its record stored if newer, or fetched when it came without its data
    /// (by the tab holding the stream).
    fn on_change(&mut self, now: u64, change: &Json, own: bool) {
        let Some(data_type) = change
            .get(wire::field::DATA_TYPE)
            .and_then(Json::as_str)
            .and_then(DataType::from_name)
            .filter(|t| self.config.data_types.contains(t))
        else {
            return;
        };
        let version = change.get(wire::field::VERSION).and_then(Json::as_u64).unwrap_or(0);
        let newer = self.records.get(data_type).is_none_or(|r| version > r.version);
        let decision = match CachedRecord::from_json(change) {
            _ if !newer => "SKIP",
            Some(record) if self.writes.on_its_way(data_type) => {
                self.live.deferred.push((data_type, record));
                "AFTER THE WRITE"
            }
            Some(record) => {
                self.keep_from_hub(data_type, record);
                "APPLY"
            }
            None if own => {
                let etag = self.records.get(data_type).and_then(|r| r.etag.clone());
                let query = wire::get_query(&self.config.user_id, data_type);
                self.send(now, Purpose::Fetch(data_type, 0), Request::get(query, etag));
                "FETCH"
            }
            None => "FETCHED BY THE STREAM'S TAB",
        };
        self.log(&[data_type.as_str(), ": event v", &decimal(version), " → ", decision]);
    }

    /// Stores a record the hub sent, if newer, and tells the page.
    fn keep_from_hub(&mut self, data_type: DataType, record: CachedRecord) {
        if self.store(data_type, record) {
            self.events.push(Event::Persist);
            self.announce(Source::Hub);
        }
    }

    /// The write on its way was answered: the records events brought meanwhile are stored.
    pub(super) fn apply_deferred(&mut self) {
        for (data_type, record) in core::mem::take(&mut self.live.deferred) {
            self.keep_from_hub(data_type, record);
        }
    }

    fn on_stream_end(&mut self, now: u64, status: u16, body: &Json, retry_after: Option<u64>) {
        let sent_with = match &self.live.state {
            State::Opening { token, .. } | State::Open { token } => token.clone(),
            _ => None,
        };
        self.log(&["stream ended: HTTP ", &decimal(u64::from(status))]);
        match (status, wire::refusal(body)) {
            (401, Some(refusal)) => {
                self.token_refused(sent_with.as_deref(), &refusal);
                self.live.move_to(State::Closed { at_ms: now });
            }
            (400..=499, _) if !matches!(status, 401 | 408 | 429) => self.stop_stream(State::Unavailable),
            _ => {
                self.live.attempts += 1;
                let (base, max) = (self.config.retry_base_ms, self.config.retry_max_ms);
                let wait = retry_after.unwrap_or(0) * 1000;
                let delay = backoff_ms(self.live.attempts, base, max, wait, &mut self.rng);
                self.live.move_to(State::Closed { at_ms: now + delay });
            }
        }
        if self.live.owed_until_ms.is_some() {
            self.check_for_stream(now);
        }
    }
}
