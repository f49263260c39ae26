//! Checks: one `timestamp` request for every data type, then a `get` (with `If-None-Match`)
//! for each type whose version moved. Triggers that come while a check runs join it. Also
//! when the spinner shows (only for a check that outlasts its delay), the hub's hold (a 429's
//! `Retry-After`: checks meanwhile end at once with cached data, and one runs when it ends),
//! and the inactivity check of a visible tab. Sends through the engine and stores through its
//! cache; reads no clock.

use alloc::{borrow::ToOwned, vec::Vec};

use protocol::DataType;
use protocol::compact::{concat, decimal};
use protocol::wire;

use super::requests::Purpose;
use super::{Engine, Link};
use crate::cache::CachedRecord;
use crate::{Event, Json, Reply, Request, Source};

/// The check running, if any; the hub's hold.
#[derive(Debug, Default)]
pub(super) struct Checks {
    state: State,
    /// The id of the last check started: answers name the check that asked for them, so an
    /// answer for a check that ended does not end the next one.
    last_id: u64,
    /// The hub asked (429 with `Retry-After`) that nothing be sent before this.
    hold_until_ms: u64,
}

#[derive(Debug)]
enum State {
    /// No check running.
    Idle {
        /// When the last check ended: the inactivity check counts from it (none before the
        /// first check).
        last_end_ms: Option<u64>,
        /// The last check ended unasked because of the hub's hold: one runs when it ends.
        after_hold: bool,
    },
    Running(Check),
}

impl Default for State {
    fn default() -> State {
        State::Idle { last_end_ms: None, after_hold: false }
    }
}

#[derive(Debug)]
struct Check {
    id: u64,
    /// Why it started, for the log.
    reason: &'static str,
    started_ms: u64,
    /// The triggers waiting for its end, each told by an [`Event::CheckDone`].
    tickets: Vec<u64>,
    stage: Stage,
    spinner: Spinner,
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    /// The timestamp request waits to be sent (for a token, or for the next pump).
    Pending,
    Stamps,
    /// The fetches not yet answered.
    Fetching(Vec<DataType>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spinner {
    /// Shown if the check still runs then.
    Due(u64),
    Shown,
}

impl Checks {
    pub(super) fn running(&self) -> bool {
        matches!(self.state, State::Running(_))
    }

    /// The check running is the one with this id.
    fn is(&self, id: u64) -> bool {
        matches!(&self.state, State::Running(check) if check.id == id)
    }

    /// A check waits for its timestamp request to be sent.
    pub(super) fn pending(&self) -> bool {
        matches!(&self.state, State::Running(Check { stage: Stage::Pending, .. }))
    }

    /// The hub asked to wait, and it is not time yet.
    pub(super) fn held(&self, now: u64) -> bool {
        now < self.hold_until_ms
    }

    /// The hub asked that nothing be sent for `ms`.
    pub(super) fn hold(&mut self, now: u64, ms: u64) {
        self.hold_until_ms = self.hold_until_ms.max(now + ms);
    }

    /// The hold ends now: it came with answers to a token since replaced.
    pub(super) fn lift_hold(&mut self, now: u64) {
        self.hold_until_ms = self.hold_until_ms.min(now);
    }

    /// When the last check ended, if none runs.
    fn last_end(&self) -> Option<u64> {
        match self.state {
            State::Idle { last_end_ms, .. } => last_end_ms,
            State::Running(_) => None,
        }
    }

    /// Whether the spinner is due to show at `now`; it is shown from then on.
    pub(super) fn show_spinner(&mut self, now: u64) -> bool {
        match &mut self.state {
            State::Running(check) if matches!(check.spinner, Spinner::Due(at) if now >= at) => {
                check.spinner = Spinner::Shown;
                true
            }
            _ => false,
        }
    }

    /// Whether the check after the hub's hold is due at `now`.
    pub(super) fn rerun_due(&self, now: u64) -> bool {
        matches!(self.state, State::Idle { after_hold: true, .. }) && now >= self.hold_until_ms
    }

    /// When the spinner or the check after the hold is due.
    pub(super) fn next_timeout(&self) -> Option<u64> {
        match &self.state {
            State::Running(Check { spinner: Spinner::Due(at), .. }) => Some(*at),
            State::Idle { after_hold: true, .. } => Some(self.hold_until_ms),
            _ => None,
        }
    }

    /// A fetch of the check `id` is answered; whether it was its last.
    fn fetched(&mut self, id: u64, data_type: DataType) -> bool {
        match &mut self.state {
            State::Running(Check { id: running, stage: Stage::Fetching(remaining), .. })
                if *running == id =>
            {
                remaining.retain(|t| *t != data_type);
                remaining.is_empty()
            }
            _ => false,
        }
    }

    // Every change of state happens below. Each asserts, in debug builds, that it starts
    // from a state it may (the browser build carries no panic message for them).

    /// Starts a check unless one runs; `ticket` waits for its end either way. Whether it
    /// started one.
    fn move_to_running(
        &mut self,
        now: u64,
        reason: &'static str,
        ticket: Option<u64>,
        spinner_delay_ms: u64,
    ) -> bool {
        if let State::Running(check) = &mut self.state {
            check.tickets.extend(ticket);
            return false;
        }
        self.last_id += 1;
        self.state = State::Running(Check {
            id: self.last_id,
            reason,
            started_ms: now,
            tickets: ticket.into_iter().collect(),
            stage: Stage::Pending,
            spinner: Spinner::Due(now + spinner_delay_ms),
        });
        true
    }

    /// The check's timestamp request is sent; its id.
    fn move_to_stamps(&mut self) -> u64 {
        debug_assert!(self.pending(), "a timestamp request sent for no pending check");
        match &mut self.state {
            State::Running(check) => {
                check.stage = Stage::Stamps;
                check.id
            }
            State::Idle { .. } => 0,
        }
    }

    /// The check's fetches are sent. Its timestamp answer may come back in any stage: a
    /// fetch's 401 may have sent it back to [`Stage::Pending`] meanwhile, or a second timestamp
    /// request may have left since.
    fn move_to_fetching(&mut self, fetch: Vec<DataType>) {
        debug_assert!(self.running(), "fetches sent for no check");
        if let State::Running(check) = &mut self.state {
            check.stage = Stage::Fetching(fetch);
        }
    }

    /// The running check starts again from its timestamp request (with a fresh token).
    fn move_to_pending(&mut self) {
        debug_assert!(self.running(), "no check to repeat");
        if let State::Running(check) = &mut self.state {
            check.stage = Stage::Pending;
        }
    }

    /// Ends the running check at `now`, if one runs, and hands it back.
    fn move_to_idle(&mut self, now: u64) -> Option<Check> {
        let idle = State::Idle { last_end_ms: Some(now), after_hold: false };
        match core::mem::replace(&mut self.state, idle) {
            State::Running(check) => Some(check),
            idle => {
                self.state = idle;
                None
            }
        }
    }

    /// The check that just ended for the hub's hold runs again when the hold ends.
    pub(super) fn rerun_after_hold(&mut self) {
        debug_assert!(!self.running(), "a rerun planned while a check runs");
        if let State::Idle { after_hold, .. } = &mut self.state {
            *after_hold = true;
        }
    }
}

impl Engine {
    pub(super) fn start_check(&mut self, now: u64, reason: &'static str, ticket: Option<u64>) {
        if self.checks.move_to_running(now, reason, ticket, self.config.spinner_delay_ms) {
            self.log(&[reason, " - checking timestamps"]);
        }
        self.update_status();
    }

    pub(super) fn finish_check(&mut self, now: u64, fresh: bool) {
        let Some(check) = self.checks.move_to_idle(now) else { return };
        if check.spinner == Spinner::Shown {
            self.events.push(Event::Spinner(false));
        }
        let elapsed = now.saturating_sub(check.started_ms);
        if fresh {
            self.live.checked(now);
            let hundredths = elapsed % 1000 / 10;
            let pad = if hundredths < 10 { "0" } else { "" };
            self.log(&["Sync complete in ", &decimal(elapsed / 1000), ".", pad, &decimal(hundredths), "s"]);
        } else {
            self.log(&[check.reason, " check ended without the hub; using cached data"]);
        }
        for ticket in check.tickets {
            self.events.push(Event::CheckDone { ticket, fresh });
        }
        self.update_status();
    }

    /// When the inactivity check is due: a while after the last check ended, while the tab is
    /// visible, the browser online and no event stream live.
    pub(super) fn inactivity_due(&self) -> Option<u64> {
        if !self.visible || self.link == Link::Offline || self.live() {
            return None;
        }
        self.checks.last_end().map(|end| end + self.config.inactivity_ms)
    }

    /// Sends the pending check's timestamp request.
    pub(super) fn send_check(&mut self, now: u64) {
        let query = wire::timestamp_query(&self.config.user_id, &self.config.data_types);
        let id = self.checks.move_to_stamps();
        self.send(now, Purpose::Stamps(id), Request::get(query, None));
    }

    pub(super) fn on_stamps(&mut self, now: u64, check_id: u64, reply: Reply, sent_with: Option<&str>) {
        let answer = self.answer_of(now, reply, sent_with, "timestamp check");
        if !self.checks.is(check_id) {
            return;
        }
        let body = match answer {
            Ok(body) => body,
            Err(Retry::WithFreshToken) => return self.checks.move_to_pending(),
            Err(Retry::No) => return self.finish_check(now, false),
        };
        if wire::epoch(&body).is_none() {
            self.log(&["timestamp answer without epoch → ERROR"]);
            self.finish_check(now, false);
            return;
        }
        self.adopt_epoch(wire::epoch(&body));
        let mut fetch = Vec::new();
        for i in 0..self.config.data_types.len() {
            let data_type = self.config.data_types[i];
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
        for &data_type in &fetch {
            let etag = self.records.get(data_type).and_then(|r| r.etag.clone());
            let query = wire::get_query(&self.config.user_id, data_type);
            self.send(now, Purpose::Fetch(data_type, check_id), Request::get(query, etag));
        }
        self.checks.move_to_fetching(fetch);
    }

    pub(super) fn on_fetch(
        &mut self,
        now: u64,
        data_type: DataType,
        check_id: u64,
        reply: Reply,
        sent_with: Option<&str>,
    ) {
        if !matches!(reply, Reply::Answer { status: 304, .. }) {
            let etag = match &reply {
                Reply::Answer { etag, .. } => etag.clone(),
                Reply::NetworkError => None,
            };
            match self.answer_of(now, reply, sent_with, "fetch") {
                Ok(body) => {
                    if let Some(record) = CachedRecord::from_json(&body).map(|r| CachedRecord { etag, ..r })
                        && self.store(data_type, record.clone())
                    {
                        self.share(data_type, record, None);
                        self.events.push(Event::Persist);
                        self.announce(Source::Hub);
                    }
                }
                // Refetch everything with the new token through a fresh timestamp request.
                Err(Retry::WithFreshToken) if self.checks.is(check_id) => {
                    return self.checks.move_to_pending();
                }
                Err(_) if self.checks.is(check_id) => return self.finish_check(now, false),
                // A change an event announced (a fetch of no check).
                Err(_) if check_id == 0 => return self.live.missed(),
                Err(_) => return,
            }
        }
        if self.checks.fetched(check_id, data_type) {
            self.finish_check(now, true);
        }
    }

    /// The JSON body of a check's or a fetch's successful answer (the hub's, `"success": true`);
    /// else whether to repeat the request with a fresh token. Tells the token, the link and the
    /// hold what the answer says; an answer that is not the hub's (a proxy's 403 or 404, an
    /// error page, a bare 200) says nothing of the token, and is an error until the hub answers.
    fn answer_of(
        &mut self,
        now: u64,
        reply: Reply,
        sent_with: Option<&str>,
        what: &str,
    ) -> Result<Json, Retry> {
        match reply {
            Reply::NetworkError => {
                self.link = match self.link {
                    Link::Offline => Link::Offline,
                    _ => Link::Unreachable,
                };
                self.log(&[what, ": hub unreachable → OFFLINE"]);
                Err(Retry::No)
            }
            Reply::Answer { status: 200, body, .. } if wire::succeeded(&body) => {
                self.token.accepted();
                Ok(body)
            }
            Reply::Answer { status, body, retry_after, .. } => {
                let refusal = wire::refusal(&body);
                let hubs = refusal.is_some();
                match (status, refusal) {
                    (401, Some(refusal)) => {
                        return if self.token_refused(sent_with, &refusal) {
                            Err(Retry::WithFreshToken)
                        } else {
                            Err(Retry::No)
                        };
                    }
                    (429, _) => self.checks.hold(now, retry_after.unwrap_or(1) * 1000),
                    (403, Some(refusal)) => self.token.forbidden(&refusal),
                    // Any other refusal got past auth.
                    (400..=499, Some(_)) if status != 408 => self.token.clear_failure(),
                    _ => {}
                }
                self.foreign |= !hubs;
                let whose = if hubs { ": hub answered " } else { ": not the hub's answer, HTTP " };
                self.log(&[what, whose, &decimal(u64::from(status))]);
                Err(Retry::No)
            }
        }
    }
}

/// Why a check's or a fetch's answer is no use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// The token was refused; a fresh one is coming, or already here.
    WithFreshToken,
    No,
}
