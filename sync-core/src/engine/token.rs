//! The page's token: asked for when a request must go and there is none, refreshed once
//! after the hub refuses it (401) — at once, whatever else waits, when the hub says it
//! expired — given up on when the hub refuses the fresh one too, says 403, or the page has
//! none — until an explicit trigger starts over with a fresh one. Sends nothing and knows no
//! request: the engine asks it what to attach and tells it what the hub said.

use alloc::{borrow::ToOwned, string::String, vec::Vec};

use protocol::wire::{RefusalRef, code};

use super::{Engine, Link};
use crate::{Event, Json};

/// The token, and where getting one stands.
#[derive(Debug)]
pub(super) struct Token {
    /// False when the hub runs without auth: nothing is asked for or attached.
    needed: bool,
    state: State,
}

#[derive(Debug)]
enum State {
    /// None to attach: none asked for yet, or the hub refused the last one. `refreshing`: the
    /// next one replaces one the hub refused.
    Missing { refreshing: bool },
    /// [`Event::NeedToken`] is out and the page has not answered.
    Asked { refreshing: bool },
    /// A token the hub has not refused. `refreshed`: it replaced one the hub refused, and no
    /// answer since has shown it good; a 401 for it gives up.
    Held { token: String, refreshed: bool },
    /// The hub refused our identity, or the page had no token: nothing is sent (status
    /// `error`) until an explicit trigger, which asks the page for a fresh token.
    Failed(Failure),
}

/// Why auth failed: what the page reads as the status reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The page's `getToken` threw or returned no token.
    NoToken,
    /// The hub refused the token (401, and again for a fresh one; or 403): its code and message.
    Refused { code: String, message: String },
}

impl From<&RefusalRef<'_, Json>> for Failure {
    fn from(refusal: &RefusalRef<'_, Json>) -> Failure {
        Failure::Refused { code: refusal.code.to_owned(), message: refusal.message.to_owned() }
    }
}

impl Token {
    pub(super) fn new(needed: bool) -> Token {
        Token { needed, state: State::Missing { refreshing: false } }
    }

    /// The token a request carries now, if the hub needs one.
    pub(super) fn current(&self) -> Option<&str> {
        match &self.state {
            State::Held { token, .. } if self.needed => Some(token),
            _ => None,
        }
    }

    /// The hub refused our identity: nothing goes until an explicit trigger.
    pub(super) fn failed(&self) -> bool {
        matches!(self.state, State::Failed(_))
    }

    /// Why auth failed, while it has.
    pub(super) fn failure(&self) -> Option<&Failure> {
        match &self.state {
            State::Failed(failure) => Some(failure),
            _ => None,
        }
    }

    /// The page was asked for a token and has not answered.
    pub(super) fn asked(&self) -> bool {
        matches!(self.state, State::Asked { .. })
    }

    /// The token held replaced one the hub refused, and no answer has shown it good yet.
    pub(super) fn fresh(&self) -> bool {
        matches!(self.state, State::Held { refreshed: true, .. })
    }

    /// Whether a request can go now: a token is held, or none is needed. When one is missing,
    /// asks the page for it (once) with [`Event::NeedToken`].
    pub(super) fn ready(&mut self, events: &mut Vec<Event>) -> bool {
        if !self.needed || self.current().is_some() {
            return true;
        }
        if let State::Missing { .. } = self.state {
            self.move_to_asked();
            events.push(Event::NeedToken);
        }
        false
    }

    /// The page's answer to [`Event::NeedToken`]; false when it had none (auth failed).
    pub(super) fn answered(&mut self, token: Option<String>) -> bool {
        let came = token.is_some();
        match token {
            Some(token) => self.move_to_held(token),
            None => self.move_to_failed(Failure::NoToken),
        }
        came
    }

    /// The hub answered a request: the token it carried is good, so a later 401 deserves a
    /// fresh one again.
    pub(super) fn accepted(&mut self) {
        match &mut self.state {
            State::Held { refreshed, .. } => *refreshed = false,
            State::Missing { refreshing } | State::Asked { refreshing } => *refreshing = false,
            State::Failed(_) => {}
        }
    }

    /// The hub answered 401, with `refusal`, to a request that carried `sent_with`. Whether
    /// to send it again (with the token held now, or a fresh one), and why, for the log.
    pub(super) fn refused(
        &mut self,
        sent_with: Option<&str>,
        refusal: &RefusalRef<'_, Json>,
    ) -> (bool, Option<&'static str>) {
        if sent_with != self.current() {
            // The request carried a token already replaced.
            return (true, None);
        }
        match self.state {
            State::Held { refreshed: false, .. }
            | State::Missing { refreshing: false }
            | State::Asked { refreshing: false }
                if self.needed =>
            {
                self.move_to_refreshing();
                (true, Some("token refused → asking for a fresh one"))
            }
            _ => {
                self.move_to_failed(refusal.into());
                (false, Some("token refused again → ERROR"))
            }
        }
    }

    /// The hub refused our identity outright (403), with `refusal`.
    pub(super) fn forbidden(&mut self, refusal: &RefusalRef<'_, Json>) {
        self.move_to_failed(refusal.into());
    }

    /// The hub said the token held expires now (the stream's `reauth`): the next request asks
    /// for a fresh one.
    pub(super) fn expired(&mut self) {
        if let State::Held { .. } = self.state {
            self.move_to_missing_fresh();
        }
    }

    /// An explicit trigger, or an answer that got past auth: a failure is forgotten, and a
    /// fresh token will be asked for.
    pub(super) fn clear_failure(&mut self) {
        if self.failed() {
            self.move_to_missing();
        }
    }

    // Every change of state happens below. Each asserts, in debug builds, that it starts
    // from a state it may (the browser build carries no panic message for them).

    fn move_to_asked(&mut self) {
        debug_assert!(matches!(self.state, State::Missing { .. }), "a token asked for twice");
        if let State::Missing { refreshing } = self.state {
            self.state = State::Asked { refreshing };
        }
    }

    /// A token came from the page: it is attached from now on, unless auth failed meanwhile
    /// (the explicit trigger that starts over asks again).
    fn move_to_held(&mut self, token: String) {
        self.state = match self.state {
            State::Missing { refreshing } | State::Asked { refreshing } => {
                State::Held { token, refreshed: refreshing }
            }
            State::Held { refreshed, .. } => State::Held { token, refreshed },
            State::Failed(_) => return,
        };
    }

    /// The token the hub refused is dropped; the next one replaces it.
    fn move_to_refreshing(&mut self) {
        debug_assert!(self.needed && !self.failed(), "a token refreshed after auth failed");
        self.state = match self.state {
            State::Asked { refreshing } => {
                debug_assert!(!refreshing, "a refreshed token refreshed again");
                State::Asked { refreshing: true }
            }
            _ => State::Missing { refreshing: true },
        };
    }

    fn move_to_failed(&mut self, failure: Failure) {
        self.state = State::Failed(failure);
    }

    /// The token held is dropped for a fresh one, the old one not refused.
    fn move_to_missing_fresh(&mut self) {
        debug_assert!(matches!(self.state, State::Held { .. }), "no token held to drop");
        self.state = State::Missing { refreshing: false };
    }

    fn move_to_missing(&mut self) {
        debug_assert!(self.failed(), "auth retried when it had not failed");
        self.state = State::Missing { refreshing: false };
    }
}

impl Engine {
    /// After a 401: whether the request should be repeated (with the token now held, or a
    /// fresh one); logs what the token machine decided. A token the hub says `expired` is
    /// replaced at once, whatever else waits — the hub's hold, a write's backoff, or no
    /// request due at all — so that the fresh one is there for the next request; unless the
    /// browser is offline, when the page could not reach its backend for one.
    pub(super) fn token_refused(&mut self, sent_with: Option<&str>, refusal: &RefusalRef<'_, Json>) -> bool {
        let expired = refusal.code == code::TOKEN_EXPIRED;
        let (repeat, why) = self.token.refused(sent_with, refusal);
        if let Some(why) = why {
            self.log(&[why]);
        }
        if repeat && expired && self.link != Link::Offline {
            self.token.ready(&mut self.events);
        }
        repeat
    }
}
