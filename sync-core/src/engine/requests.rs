//! What is on its way to the hub: every request sent and not yet answered, with what its
//! answer is for, until when it may take, and the token it carried; and the requests waiting
//! for the shell to send them. Decides nothing: the engine asks what timed out, and routes
//! each answer by its purpose.

use alloc::{string::String, vec::Vec};

use protocol::DataType;

use crate::{Json, Method, Request, RequestId};

/// What an answer is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Purpose {
    /// The timestamp request of the check with this id.
    Stamps(u64),
    /// A fetch, and the check (by id) that sent it.
    Fetch(DataType, u64),
    /// Writes, by op id: one alone, or several in one batch, in the outbox's order.
    Write(Vec<String>),
}

#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) purpose: Purpose,
    /// Unanswered by then, it counts as a network failure.
    pub(super) deadline_ms: u64,
    /// The token it carried: a 401 for a token already replaced is no reason to ask again.
    pub(super) token: Option<String>,
}

#[derive(Debug)]
pub(super) struct Requests {
    in_flight: Vec<(RequestId, InFlight)>,
    /// Sent in this order by the shell; the queue is short, so a `Vec` is all it needs.
    queue: Vec<Request>,
    next_id: RequestId,
}

impl Default for Requests {
    fn default() -> Requests {
        Requests { in_flight: Vec::new(), queue: Vec::new(), next_id: 1 }
    }
}

impl Requests {
    /// Queues `request` under a fresh id, answered for `purpose` by `deadline_ms`; the id.
    pub(super) fn send(&mut self, purpose: Purpose, deadline_ms: u64, mut request: Request) -> RequestId {
        let id = self.next_id;
        request.id = id;
        self.next_id += 1;
        self.in_flight.push((id, InFlight { purpose, deadline_ms, token: request.token.clone() }));
        self.queue.push(request);
        id
    }

    pub(super) fn poll(&mut self) -> Option<Request> {
        (!self.queue.is_empty()).then(|| self.queue.remove(0))
    }

    /// The request `id` is answered: what it was for, unless it was answered already.
    pub(super) fn take(&mut self, id: RequestId) -> Option<InFlight> {
        let index = self.in_flight.iter().position(|(i, _)| *i == id)?;
        Some(self.in_flight.swap_remove(index).1)
    }

    /// The requests whose deadline has come.
    pub(super) fn expired(&self, now: u64) -> Vec<RequestId> {
        self.in_flight.iter().filter(|(_, f)| now >= f.deadline_ms).map(|(id, _)| *id).collect()
    }

    pub(super) fn next_deadline(&self) -> Option<u64> {
        self.in_flight.iter().map(|(_, f)| f.deadline_ms).min()
    }
}

impl Request {
    /// A GET with `query`, naming the version it has with `if_none_match`.
    pub(super) fn get(query: String, if_none_match: Option<String>) -> Request {
        let query = Some(query);
        Request {
            id: 0,
            method: Method::Get,
            query,
            body: None,
            if_none_match,
            token: None,
            keepalive: false,
        }
    }

    /// A POST of `body`, with `keepalive` while the page unloads.
    pub(super) fn post(body: Json, keepalive: bool) -> Request {
        let body = Some(body);
        Request {
            id: 0,
            method: Method::Post,
            query: None,
            body,
            if_none_match: None,
            token: None,
            keepalive,
        }
    }
}
