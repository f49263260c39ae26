//! One native driver of the engine: the crate's call order written once, for Rust callers
//! that play the page's part themselves (the tests' simulated tabs, the benchmark's day of
//! one user, a native client). It drains events before requests, stores on
//! [`Event::Persist`] — first adopting the writes other pages left in storage, then storing
//! its own, as the browser shell does — answers [`Event::NeedToken`] and [`Event::NeedGrant`]
//! with what the [`Host`] says, sends each request and hands back a reply that came at once.
//! It does no I/O itself and reads no clock: the host sends, and `now` stays what the caller
//! passed.
//!
//! The browser shell keeps its own loop: it must let go of the engine before it calls page
//! code (listeners, `getToken`) that may call back into it.

use alloc::{string::String, vec::Vec};

use crate::{DataType, Engine, Event, Op, Persisted, Reply, Request};

/// An answer the host gives now, or later through the engine's `handle_*` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Now(T),
    Later,
}

/// The page's side of the engine, as a native caller plays it. [`Engine::drive`] calls it in
/// the crate's call order.
pub trait Host {
    /// Why driving stopped early: a request that could not be sent, an event the host cannot
    /// accept.
    type Error;

    /// Sees every event first, in order, before [`Engine::drive`] acts on the ones it handles.
    fn event(&mut self, event: &Event) -> Result<(), Self::Error>;

    /// The writes stored now, which other pages sharing the storage may have added: read on
    /// [`Event::Persist`] before storing, and adopted. None by default (storage of one page).
    fn stored_ops(&mut self) -> Vec<Op> {
        Vec::new()
    }

    /// Stores what [`Event::Persist`] asks to store; called before any request after it is
    /// sent, so a write is stored before its first send. A host whose storage can refuse says
    /// so through [`Engine::handle_persisted`].
    fn persist(&mut self, persisted: Persisted) -> Result<(), Self::Error>;

    /// The page's `getToken`: a token, `None` when it has none.
    fn token(&mut self) -> Answer<Option<String>>;

    /// The page's `getGrant` for the credit `op_id` of `amount` on `data_type`: a fresh grant,
    /// `None` when the site's backend declines.
    fn grant(&mut self, op_id: &str, data_type: DataType, amount: i64) -> Answer<Option<String>>;

    /// Sends `request`; `Answer::Now` with the reply when it came at once, `Later` when it
    /// will come through [`Engine::handle_reply`].
    fn send(&mut self, request: Request) -> Result<Answer<Reply>, Self::Error>;
}

impl Engine {
    /// Drains the engine in the call order until it has nothing more to say, answering
    /// through `host` at `now`. Returns when to call [`Engine::handle_timeout`] next.
    pub fn drive<H: Host>(&mut self, now: u64, host: &mut H) -> Result<Option<u64>, H::Error> {
        loop {
            if let Some(event) = self.poll_event() {
                host.event(&event)?;
                match event {
                    Event::Persist => {
                        let stored = host.stored_ops();
                        if !stored.is_empty() {
                            self.handle_stored_ops(now, &stored);
                        }
                        host.persist(self.persisted())?;
                    }
                    Event::NeedToken => {
                        if let Answer::Now(token) = host.token() {
                            self.handle_token(now, token);
                        }
                    }
                    Event::NeedGrant { op_id, data_type, amount, .. } => {
                        if let Answer::Now(grant) = host.grant(&op_id, data_type, amount) {
                            self.handle_grant(now, &op_id, grant);
                        }
                    }
                    _ => {}
                }
                continue;
            }
            if let Some(request) = self.poll_request() {
                let id = request.id;
                if let Answer::Now(reply) = host.send(request)? {
                    self.handle_reply(now, id, reply);
                }
                continue;
            }
            return Ok(self.poll_timeout());
        }
    }
}
