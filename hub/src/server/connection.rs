//! What the accept loop keeps about each connection: the share of its client's address
//! (`limits.max_connections_per_address`) and whether a request is in progress on it (for
//! `limits.idle_timeout_secs`). Serves nothing; `server` decides what to do with them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::{Frame, SizeHint};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::sync::watch;

use crate::http::App;

/// Open connections per client network: an IPv4 address, or the /64 an IPv6 address is in
/// (what one subscriber is usually given, so that walking through it gains nothing).
#[derive(Debug)]
pub struct PerAddress {
    cap: usize,
    open: Mutex<HashMap<IpNet, usize>>,
}

impl PerAddress {
    pub fn new(cap: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress { cap, open: Mutex::new(HashMap::new()) })
    }

    /// One more connection from `ip`, held until the share is dropped; `None` when its
    /// network holds `cap` connections already.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Share> {
        let network = match ip.to_canonical() {
            IpAddr::V4(ip) => IpNet::V4(Ipv4Net::from(ip)),
            IpAddr::V6(ip) => IpNet::V6(Ipv6Net::new_assert(ip, 64).trunc()),
        };
        let mut open = self.open.lock().expect("per-address counts");
        let held = open.entry(network).or_insert(0);
        if *held >= self.cap {
            return None;
        }
        *held += 1;
        Some(Share { table: self.clone(), network })
    }
}

/// One connection's place in its network's count.
#[derive(Debug)]
pub struct Share {
    table: Arc<PerAddress>,
    network: IpNet,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().expect("per-address counts");
        if let Some(held) = open.get_mut(&self.network) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.network);
            }
        }
    }
}

/// The requests of one connection.
#[derive(Debug, Clone, Copy, Default)]
struct Requests {
    in_progress: usize,
    /// Every request that ever arrived: tells a request that came and went from none.
    arrived: u64,
}

/// Whether a connection is in use: a request is in progress from its arrival until its
/// answer's body has been sent or dropped, so that a long answer (or an upload, which is
/// read before the answer) keeps it in use while pings alone do not.
#[derive(Debug)]
pub struct Activity {
    requests: watch::Sender<Requests>,
    app: App,
}

impl Activity {
    pub fn new(app: App) -> Arc<Activity> {
        Arc::new(Activity { requests: watch::Sender::new(Requests::default()), app })
    }

    /// Counts a request as in progress until the returned guard is dropped.
    pub fn request_arrived(self: &Arc<Self>) -> InProgress {
        let mut first = false;
        self.requests.send_modify(|r| {
            r.in_progress += 1;
            r.arrived += 1;
            first = r.in_progress == 1;
        });
        if first {
            self.app.metrics().connection_active();
        }
        InProgress(self.clone())
    }

    /// Counts the connection as closed for having been idle.
    pub fn closed_for_idleness(&self) {
        self.app.metrics().connection_closed_idle();
    }

    /// Resolves once the connection's first request has arrived.
    pub async fn first_request(&self) {
        let mut requests = self.requests.subscribe();
        let _ = requests.wait_for(|r| r.arrived > 0).await;
    }

    /// Resolves once the connection has had no request in progress, and none arriving, for
    /// `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut requests = self.requests.subscribe();
        loop {
            let Ok(arrived) = requests.wait_for(|r| r.in_progress == 0).await.map(|r| r.arrived) else {
                return;
            };
            if tokio::time::timeout(timeout, requests.wait_for(|r| r.arrived != arrived)).await.is_err() {
                return;
            }
        }
    }
}

/// A request in progress; see [`Activity`].
#[derive(Debug)]
pub struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let mut last = false;
        self.0.requests.send_modify(|r| {
            r.in_progress -= 1;
            last = r.in_progress == 0;
        });
        if last {
            self.0.app.metrics().connection_inactive();
        }
    }
}

/// An answer's body that keeps its request in progress until it has been sent or dropped.
#[derive(Debug)]
pub struct AnswerBody {
    body: Body,
    in_progress: Option<InProgress>,
}

impl AnswerBody {
    pub fn new(body: Body, in_progress: InProgress) -> AnswerBody {
        AnswerBody { body, in_progress: Some(in_progress) }
    }
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            self.in_progress = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
