//! What the accept loop keeps about each connection: the share of its client's address
//! (`limits.max_connections_per_address`) and whether a request is in progress on it (for
//! `limits.idle_timeout_secs`). Serves nothing; `server` decides what to do with them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::{Frame, SizeHint};
use ipnet::IpNet;
use tokio::time::Instant;

use crate::metrics::ConnectionStates;

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
        let network = crate::config::client_network(ip);
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

/// Whether a connection is in use: a request is in progress from its arrival until its
/// answer's body has been sent or dropped, so that a long answer (or an upload, which is
/// read before the answer) keeps it in use while pings alone do not. Every connection has
/// one, and every request touches it: a request only counts and notes the time, and the
/// connection's idle timer looks when it is due, so that no request wakes anything. A request
/// whose answer has not moved for `stalled` (no frame of it sent since it arrived or since its
/// last frame: an HTTP/2 client that never opens its flow-control window) no longer keeps the
/// connection in use; no handler runs that long.
#[derive(Debug)]
pub struct Activity {
    in_progress: AtomicUsize,
    /// When the last request arrived or finished, or an answer's frame was sent, in
    /// nanoseconds after `opened`; 0 before the first.
    last_change: AtomicU64,
    opened: Instant,
    stalled: Duration,
    states: ConnectionStates,
}

impl Activity {
    pub fn new(states: ConnectionStates, stalled: Duration) -> Arc<Activity> {
        Arc::new(Activity {
            in_progress: AtomicUsize::new(0),
            last_change: AtomicU64::new(0),
            opened: Instant::now(),
            stalled,
            states,
        })
    }

    /// Counts a request as in progress until the returned guard is dropped.
    pub fn request_arrived(self: &Arc<Self>) -> InProgress {
        if self.in_progress.fetch_add(1, Ordering::AcqRel) == 0 {
            self.states.active();
        }
        self.changed();
        InProgress(self.clone())
    }

    /// Whether a request has arrived on the connection yet.
    pub fn has_had_a_request(&self) -> bool {
        self.last_change.load(Ordering::Acquire) > 0
    }

    fn changed(&self) {
        let since = self.opened.elapsed().as_nanos();
        self.last_change.store(u64::try_from(since).unwrap_or(u64::MAX).max(1), Ordering::Release);
    }

    /// Resolves once the connection has had no request in progress, and none arriving, for
    /// `timeout` from now on. A request that came and went in between starts the time again;
    /// one in progress counts only until its answer has stalled.
    pub async fn idle_for(&self, timeout: Duration) {
        let called = Instant::now();
        let mut due = pin!(tokio::time::sleep(timeout));
        loop {
            due.as_mut().await;
            let now = Instant::now();
            let last = self.opened + Duration::from_nanos(self.last_change.load(Ordering::Acquire));
            let idle_at = if self.in_progress.load(Ordering::Acquire) > 0 {
                (called + timeout).max(last + self.stalled)
            } else {
                called.max(last) + timeout
            };
            if idle_at <= now {
                return;
            }
            due.as_mut().reset(idle_at.min(now + timeout));
        }
    }
}

/// A request in progress; see [`Activity`].
#[derive(Debug)]
pub struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_progress.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.states.inactive();
        }
        activity.changed();
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
        match (&frame, &self.in_progress) {
            (Poll::Ready(Some(Ok(_))), Some(InProgress(activity))) => activity.changed(),
            (Poll::Ready(None | Some(Err(_))), _) => self.in_progress = None,
            _ => {}
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

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn an_address_holds_its_cap_and_a_closed_connection_gives_its_place_back() {
        let table = PerAddress::new(2);
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let first = table.take(ip("127.0.0.2")).unwrap();
        let _second = table.take(ip("127.0.0.2")).unwrap();
        assert!(table.take(ip("127.0.0.2")).is_none());
        assert!(table.take(ip("::ffff:127.0.0.2")).is_none(), "an IPv4 address written as IPv6 is the same");
        let other = table.take(ip("127.0.0.3")).unwrap();
        drop(first);
        let _third = table.take(ip("127.0.0.2")).unwrap();
        drop(other);
        assert_eq!(table.open.lock().unwrap().len(), 1, "an address without connections is forgotten");
    }

    #[test]
    fn ipv6_addresses_count_with_their_64() {
        let table = PerAddress::new(1);
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let _held = table.take(ip("2001:db8:1:2::1")).unwrap();
        assert!(table.take(ip("2001:db8:1:2:ffff:ffff:ffff:fffe")).is_none());
        let _next_64 = table.take(ip("2001:db8:1:3::1")).unwrap();
    }

    fn active(metrics: &Metrics) -> String {
        let text = metrics.encode();
        text.lines().find(|l| l.starts_with(r#"hub_connections{state="active"}"#)).unwrap().to_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_in_progress_until_its_answer_has_been_sent_or_dropped() {
        let metrics = Metrics::new(["roflfaucet"], 0);
        metrics.connection_opened();
        let activity = Activity::new(metrics.connection_states(), STALLED);
        let idle = Duration::from_secs(60);
        // Longer than the idle time, shorter than an answer may stand still.
        let long = STALLED - Duration::from_secs(1);

        let mut answer = AnswerBody::new(Body::from("an answer"), activity.request_arrived());
        assert_eq!(active(&metrics), r#"hub_connections{state="active"} 1"#);
        assert!(tokio::time::timeout(long, activity.idle_for(idle)).await.is_err(), "idle before its answer");
        assert!(answer.frame().await.unwrap().unwrap().is_data());
        assert!(tokio::time::timeout(long, activity.idle_for(idle)).await.is_err(), "idle inside its answer");
        assert!(answer.frame().await.is_none());
        assert_eq!(active(&metrics), r#"hub_connections{state="active"} 0"#);
        tokio::time::timeout(idle * 2, activity.idle_for(idle)).await.expect("idle once the answer is sent");

        let dropped = AnswerBody::new(Body::from("an answer never sent"), activity.request_arrived());
        assert!(tokio::time::timeout(long, activity.idle_for(idle)).await.is_err());
        drop(dropped);
        tokio::time::timeout(idle * 2, activity.idle_for(idle))
            .await
            .expect("idle once the answer is dropped");
    }

    /// How long an answer may stand still in the tests.
    const STALLED: Duration = Duration::from_secs(90);

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_never_moves_keeps_its_connection_only_until_it_has_stalled() {
        let metrics = Metrics::new(["roflfaucet"], 0);
        let activity = Activity::new(metrics.connection_states(), STALLED);
        let idle = Duration::from_secs(60);
        let mut answer = AnswerBody::new(Body::from("an answer"), activity.request_arrived());
        let idle_for = activity.idle_for(idle);
        tokio::pin!(idle_for);
        assert!(tokio::time::timeout(STALLED * 2 / 3, &mut idle_for).await.is_err(), "in use at first");
        // A frame sent: the answer moved, and the time starts again.
        assert!(answer.frame().await.unwrap().unwrap().is_data());
        assert!(tokio::time::timeout(STALLED * 2 / 3, &mut idle_for).await.is_err(), "in use after a frame");
        tokio::time::timeout(STALLED / 2, &mut idle_for).await.expect("idle once the answer stalled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_came_and_went_starts_the_idle_time_again() {
        let metrics = Metrics::new(["roflfaucet"], 0);
        let activity = Activity::new(metrics.connection_states(), STALLED);
        let idle = Duration::from_secs(60);
        let idle_for = activity.idle_for(idle);
        tokio::pin!(idle_for);
        assert!(tokio::time::timeout(idle * 2 / 3, &mut idle_for).await.is_err());
        drop(activity.request_arrived());
        assert!(
            tokio::time::timeout(idle * 5 / 6, &mut idle_for).await.is_err(),
            "idle since before the request"
        );
        tokio::time::timeout(idle / 3, &mut idle_for).await.expect("idle since the request");
    }
}
