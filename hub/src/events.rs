//! The realtime event streams: each user's committed changes, told to that user's open
//! streams as Server-Sent Events. The broker reads the store's changes ([`Store::take_changes`])
//! in their order, serializes each change once into its frame, keeps the most recent ones for
//! streams that reconnect (`Last-Event-ID`), and hands each frame to the streams of its user
//! that asked for its data type. A stream is a queue of frames the HTTP layer sends; a stream
//! that lets its queue fill is ended (it reconnects and catches up from the kept changes).
//!
//! An event's id names the store's epoch and its position there: `<epoch>.<era>.<seq>`. A
//! stream reconnecting with an id from another epoch, or older than what is kept, gets a
//! `resync` event instead of its missed changes: its client checks its records' versions once.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use protocol::{DataType, UserId};
use tokio::sync::mpsc;

use crate::config::EventsConfig;
use crate::store::{ChangeEvent, Changes, Position, Store};
use crate::time::rfc3339_ms;

/// Frames waiting to be sent on one stream; a stream further behind is ended.
const QUEUE: usize = 64;

/// Bytes of frames kept for streams that reconnect, at most, whatever `resume_window` says:
/// changes with large data are kept fewer.
const KEPT_BYTES: usize = 16 << 20;

/// The frame a stream ends with when its token expires: its client gets a fresh one.
pub const REAUTH: &[u8] = b"event: reauth\ndata: {}\n\n";

/// The comment sent on idle streams, so that proxies and the hub's own idle timeout see
/// them alive.
pub const HEARTBEAT: &[u8] = b": keep-alive\n\n";

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The user holds `max_streams_per_user` streams already.
    PerUser,
    /// The client's address holds `max_streams_per_address` streams already.
    PerAddress,
    /// The hub is stopping.
    Stopping,
}

/// The data types a stream asked for, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Types(u8);

impl Types {
    pub fn of(types: &[DataType]) -> Types {
        Types(types.iter().fold(0, |bits, t| bits | Types::bit(*t)))
    }

    fn bit(t: DataType) -> u8 {
        1 << DataType::ALL.iter().position(|x| *x == t).unwrap_or(0)
    }

    fn has(self, t: DataType) -> bool {
        self.0 & Types::bit(t) != 0
    }
}

/// One change as streams send it.
struct Sent {
    position: Position,
    user: UserId,
    data_type: DataType,
    frame: Bytes,
}

/// A stream waiting for its user's changes.
struct Subscriber {
    id: u64,
    types: Types,
    /// When its token expires, in milliseconds since the Unix epoch: no change is handed to
    /// it after, whether or not its client still reads.
    expires_ms: Option<i64>,
    frames: mpsc::Sender<Bytes>,
}

struct State {
    /// The most recent changes, oldest first, at most `resume_window` and [`KEPT_BYTES`].
    kept: VecDeque<Sent>,
    /// The bytes of `kept`'s frames.
    kept_bytes: usize,
    /// Every change after it is in `kept` or yet to come.
    start: Position,
    /// The last change handed to streams.
    latest: Position,
    streams: HashMap<UserId, Vec<Subscriber>>,
    /// Streams open per user and per address, from their opening until their answer is done
    /// with: a stream ended by the hub holds its connection until its client reads its end.
    per_user: HashMap<UserId, usize>,
    per_address: HashMap<IpAddr, usize>,
    /// The broker reads the store's changes: until then, and once the hub stops, no stream opens.
    running: bool,
}

/// What `/metrics` shows of the streams.
#[derive(Debug, Clone, Default)]
struct EventMetrics {
    open: Gauge,
    refused: Family<ReasonLabel, Counter>,
    ended: Family<ReasonLabel, Counter>,
    sent: Counter,
    resyncs: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The hub's event streams. Clones share them.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    config: EventsConfig,
    epoch: String,
    state: Mutex<State>,
    next_id: AtomicU64,
    metrics: EventMetrics,
    /// Counts the batches of changes dispatched: what the change feed's readers and the
    /// webhooks wait on.
    committed: tokio::sync::watch::Sender<u64>,
    /// Set when the hub stops: who waits on `committed` stops waiting, so that its request
    /// ends and its connection can close.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("epoch", &self.inner.epoch).finish_non_exhaustive()
    }
}

/// A stream opened: the frames to send first, then those its queue receives. Dropping it
/// closes the stream.
pub struct Subscription {
    pub first: Vec<Bytes>,
    pub frames: mpsc::Receiver<Bytes>,
    /// Set when the kept changes do not reach back to the stream's `Last-Event-ID`:
    /// [`Broker::catch_up`] asks the store for the rest.
    older: Option<Older>,
    guard: Guard,
}

/// The changes a resumed stream missed before the kept ones: its user's after `after` up to
/// `upto`. The stream was opened when `latest` was the last change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Older {
    after: Position,
    upto: Position,
    latest: Position,
}

/// Takes a stream out of the broker when dropped.
struct Guard {
    broker: Broker,
    user: UserId,
    id: u64,
    address: IpAddr,
}

impl Guard {
    /// Takes the stream out of those its user's changes are handed to.
    fn unsubscribe(&self, state: &mut State) -> bool {
        let Some(subs) = state.streams.get_mut(&self.user) else { return false };
        let Some(at) = subs.iter().position(|s| s.id == self.id) else { return false };
        subs.swap_remove(at);
        if subs.is_empty() {
            state.streams.remove(&self.user);
        }
        true
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let inner = &self.broker.inner;
        let mut state = inner.state.lock().expect("the event broker");
        self.unsubscribe(&mut state);
        release(&mut state.per_user, &self.user);
        release(&mut state.per_address, &self.address);
        inner.metrics.open.dec();
    }
}

/// One stream less for `key`.
fn release<K: Eq + std::hash::Hash>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

impl Subscription {
    /// Ends the stream for `reason` (its token expired): no change is handed to it any more.
    pub fn ended(&self, reason: &'static str) {
        let inner = &self.guard.broker.inner;
        let mut state = inner.state.lock().expect("the event broker");
        if self.guard.unsubscribe(&mut state) {
            inner.metrics.ended.get_or_create(&ReasonLabel { reason }).inc();
        }
    }
}

impl Broker {
    pub fn new(config: EventsConfig, epoch: &str) -> Broker {
        Broker {
            inner: Arc::new(Inner {
                config,
                epoch: epoch.to_owned(),
                state: Mutex::new(State {
                    kept: VecDeque::new(),
                    kept_bytes: 0,
                    start: Position::default(),
                    latest: Position::default(),
                    streams: HashMap::new(),
                    per_user: HashMap::new(),
                    per_address: HashMap::new(),
                    running: false,
                }),
                next_id: AtomicU64::new(0),
                metrics: EventMetrics::default(),
                committed: tokio::sync::watch::Sender::new(0),
                stopping: tokio::sync::watch::Sender::new(false),
            }),
        }
    }

    pub fn config(&self) -> &EventsConfig {
        &self.inner.config
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.inner.metrics;
        registry.register("event_streams", "Event streams open", m.open.clone());
        registry.register(
            "event_streams_refused",
            "Event streams refused: the user's or the address's streams were at their limit",
            m.refused.clone(),
        );
        registry.register(
            "event_streams_ended",
            "Event streams the hub ended: slow (its client read too little), expired (its token), shutdown, lost (changes the store could not publish)",
            m.ended.clone(),
        );
        registry.register("events_sent", "Changes handed to event streams", m.sent.clone());
        registry.register(
            "event_resyncs",
            "Reconnected streams told to check their records, their missed changes being too old or of another epoch",
            m.resyncs.clone(),
        );
    }

    /// Reads `store`'s changes and hands them to streams until the hub stops; with a store
    /// that publishes none, or events off, streams never open.
    pub fn start(&self, store: &dyn Store) {
        if !self.inner.config.enabled {
            return;
        }
        let Some(Changes { start, mut batches, mut lost }) = store.take_changes() else { return };
        self.open_at(start);
        let broker = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // A loss is told before the batch after it: handled first.
                    biased;
                    Ok(()) = lost.changed() => broker.lost(),
                    batch = batches.recv() => match batch {
                        Some(batch) => broker.dispatch(batch),
                        None => break,
                    },
                }
            }
        });
        let broker = self.clone();
        let every = self.inner.config.heartbeat();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                if !broker.heartbeat(crate::time::now_ms()) {
                    break;
                }
            }
        });
    }

    /// Lets streams open, with every change after `start` to come.
    fn open_at(&self, start: Position) {
        let mut state = self.inner.state.lock().expect("the event broker");
        state.start = start;
        state.latest = start;
        state.running = true;
    }

    /// The store lost changes before the next batch: every stream is ended (its client
    /// reconnects) and the kept changes forgotten, so that no stream resumes from them past
    /// the loss; resumes from before it go to the store, which tells them to resync.
    fn lost(&self) {
        let mut state = self.inner.state.lock().expect("the event broker");
        tracing::warn!(
            "changes were lost before reaching this instance's event streams; every stream is told to resync"
        );
        state.kept.clear();
        state.kept_bytes = 0;
        state.start = Position { era: state.latest.era, seq: state.latest.seq.saturating_add(1) };
        let ended: usize = state.streams.values().map(Vec::len).sum();
        state.streams.clear();
        self.inner.metrics.ended.get_or_create(&ReasonLabel { reason: "lost" }).inc_by(ended as u64);
    }

    /// Ends every stream, and every wait for the change feed: the hub is stopping. Their
    /// clients reconnect, to another instance if there is one.
    pub fn stop(&self) {
        self.inner.stopping.send_replace(true);
        let mut state = self.inner.state.lock().expect("the event broker");
        state.running = false;
        let ended: usize = state.streams.values().map(Vec::len).sum();
        state.streams.clear();
        self.inner.metrics.ended.get_or_create(&ReasonLabel { reason: "shutdown" }).inc_by(ended as u64);
    }

    /// The id of an event at `position`.
    fn id(&self, position: Position) -> String {
        let mut id = String::with_capacity(self.inner.epoch.len() + 24);
        id.push_str(&self.inner.epoch);
        id.push('.');
        id.push_str(&position.era.to_string());
        id.push('.');
        id.push_str(&position.seq.to_string());
        id
    }

    /// The position an event id names, when it is of this store's epoch.
    fn position(&self, id: &str) -> Option<Position> {
        let mut parts = id.rsplitn(3, '.');
        let seq = parts.next()?.parse().ok()?;
        let era = parts.next()?.parse().ok()?;
        (parts.next()? == self.inner.epoch).then_some(Position { era, seq })
    }

    /// Moves on after each batch of changes this instance learns of (its own, and on
    /// PostgreSQL every instance's), while the broker runs; it never moves with events off.
    /// Who reads the change feed waits on it, and reads the feed anyway now and then.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.committed.subscribe()
    }

    /// Becomes true when the hub stops, events on or off: a reader of the change feed that
    /// waits for changes then answers.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.stopping.subscribe()
    }

    /// Serializes each change once and hands it to its user's streams.
    fn dispatch(&self, batch: Vec<ChangeEvent>) {
        self.inner.committed.send_modify(|batches| *batches += 1);
        let frames: Vec<Sent> = batch.into_iter().map(|change| self.frame(change)).collect();
        let mut state = self.inner.state.lock().expect("the event broker");
        let mut sent = 0;
        for change in frames {
            if change.position <= state.latest {
                continue;
            }
            state.latest = change.position;
            if let Some(subs) = state.streams.get_mut(&change.user) {
                subs.retain(|sub| {
                    if !sub.types.has(change.data_type) {
                        return true;
                    }
                    match sub.frames.try_send(change.frame.clone()) {
                        Ok(()) => {
                            sent += 1;
                            true
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            self.inner.metrics.ended.get_or_create(&ReasonLabel { reason: "slow" }).inc();
                            false
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => false,
                    }
                });
            }
            state.kept_bytes += change.frame.len();
            state.kept.push_back(change);
            while state.kept.len() > self.inner.config.resume_window || state.kept_bytes > KEPT_BYTES {
                let Some(oldest) = state.kept.pop_front() else { break };
                state.kept_bytes -= oldest.frame.len();
                state.start = oldest.position;
            }
        }
        self.inner.metrics.sent.inc_by(sent);
    }

    fn frame(&self, change: ChangeEvent) -> Sent {
        let id = self.id(change.position);
        let mut frame = String::with_capacity(id.len() + 120 + change.data.as_ref().map_or(0, String::len));
        frame.push_str("id: ");
        frame.push_str(&id);
        frame.push_str("\ndata: {\"data_type\":\"");
        frame.push_str(change.data_type.as_str());
        frame.push_str("\",\"version\":");
        frame.push_str(&change.version.to_string());
        frame.push_str(",\"last_updated\":\"");
        frame.push_str(&rfc3339_ms(change.updated_ms));
        frame.push('"');
        if let Some(data) = &change.data {
            frame.push_str(",\"data\":");
            frame.push_str(data);
        }
        frame.push_str("}\n\n");
        Sent {
            position: change.position,
            user: change.user,
            data_type: change.data_type,
            frame: frame.into(),
        }
    }

    /// A heartbeat to every stream, and the end of those whose token has expired (one whose
    /// client reads nothing never sees its own end come); `false` once the hub stops.
    fn heartbeat(&self, now_ms: i64) -> bool {
        let mut state = self.inner.state.lock().expect("the event broker");
        if !state.running {
            return false;
        }
        let heartbeat = Bytes::from_static(HEARTBEAT);
        state.streams.retain(|_, subs| {
            subs.retain(|sub| match sub.frames.try_send(heartbeat.clone()) {
                Ok(()) if sub.expires_ms.is_some_and(|exp| exp <= now_ms) => {
                    self.inner.metrics.ended.get_or_create(&ReasonLabel { reason: "expired" }).inc();
                    false
                }
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.inner.metrics.ended.get_or_create(&ReasonLabel { reason: "slow" }).inc();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            !subs.is_empty()
        });
        true
    }

    /// Opens a stream of `user`'s changes of `types` for a client at `address` whose token
    /// expires at `expires_ms`, resuming after `last_event_id` when it names a change still
    /// kept.
    pub fn subscribe(
        &self,
        user: &UserId,
        types: &[DataType],
        last_event_id: Option<&str>,
        address: IpAddr,
        expires_ms: Option<i64>,
    ) -> Result<Subscription, Refused> {
        let config = &self.inner.config;
        let mut state = self.inner.state.lock().expect("the event broker");
        if !state.running {
            return Err(Refused::Stopping);
        }
        if state.per_user.get(user).copied().unwrap_or(0) >= config.max_streams_per_user {
            self.inner.metrics.refused.get_or_create(&ReasonLabel { reason: "per_user" }).inc();
            return Err(Refused::PerUser);
        }
        let address = crate::config::client_network(address).addr();
        if state.per_address.get(&address).copied().unwrap_or(0) >= config.max_streams_per_address {
            self.inner.metrics.refused.get_or_create(&ReasonLabel { reason: "per_address" }).inc();
            return Err(Refused::PerAddress);
        }
        let types = Types::of(types);
        let latest = state.latest;
        let mut first = vec![Bytes::from(format!("retry: {}\n\n", config.retry_ms))];
        // An id ahead of every change this hub has handed out is of another run of its store
        // (a data dir copied back) or made up: nothing tells what its client missed.
        let resume = last_event_id.map(|id| self.position(id.trim()).filter(|after| *after <= latest));
        let mut older = None;
        match resume {
            None => {}
            Some(None) => first.push(self.resync(latest)),
            Some(Some(after)) => {
                let missed = state.kept.partition_point(|c| c.position <= after.max(state.start));
                first.extend(
                    state
                        .kept
                        .range(missed..)
                        .filter(|c| c.user == *user && types.has(c.data_type))
                        .map(|c| c.frame.clone()),
                );
                if after < state.start {
                    older = Some(Older { after, upto: state.start, latest });
                }
            }
        }
        if older.is_none() {
            first.push(self.ready(latest, resume.is_some()));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, frames) = mpsc::channel(QUEUE);
        state.streams.entry(user.clone()).or_default().push(Subscriber {
            id,
            types,
            expires_ms,
            frames: sender,
        });
        *state.per_user.entry(user.clone()).or_default() += 1;
        *state.per_address.entry(address).or_default() += 1;
        self.inner.metrics.open.inc();
        drop(state);
        Ok(Subscription {
            first,
            frames,
            older,
            guard: Guard { broker: self.clone(), user: user.clone(), id, address },
        })
    }

    /// Completes a subscription whose `Last-Event-ID` is older than the kept changes with
    /// those the store still has, sent before the kept ones; or, when the store keeps none
    /// from so far back, with a `resync` instead of every missed change.
    pub async fn catch_up(&self, store: &dyn Store, subscription: &mut Subscription, types: &[DataType]) {
        let Some(Older { after, upto, latest }) = subscription.older.take() else { return };
        let types = Types::of(types);
        let user = &subscription.guard.user;
        let retry = subscription.first.remove(0);
        let mut first = vec![retry];
        match store.changes_between(user, after, upto).await {
            Ok(Some(changes)) => {
                first.extend(
                    changes
                        .into_iter()
                        .filter(|c| c.user == *user && types.has(c.data_type))
                        .map(|c| self.frame(c).frame),
                );
                first.append(&mut subscription.first);
            }
            Ok(None) => first.push(self.resync(latest)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a stream's missed changes; it is told to resync");
                first.push(self.resync(latest));
            }
        }
        first.push(self.ready(latest, true));
        subscription.first = first;
    }

    fn resync(&self, at: Position) -> Bytes {
        self.inner.metrics.resyncs.inc();
        let mut frame = String::from("event: resync\nid: ");
        frame.push_str(&self.id(at));
        frame.push_str("\ndata: {\"epoch\":\"");
        frame.push_str(&self.inner.epoch);
        frame.push_str("\"}\n\n");
        frame.into()
    }

    fn ready(&self, at: Position, resumed: bool) -> Bytes {
        let mut frame = String::from("event: ready\nid: ");
        frame.push_str(&self.id(at));
        frame.push_str("\ndata: {\"epoch\":\"");
        frame.push_str(&self.inner.epoch);
        frame.push_str(if resumed { "\",\"resumed\":true}\n\n" } else { "\",\"resumed\":false}\n\n" });
        frame.into()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const EPOCH: &str = "E";
    const HERE: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn broker(config: EventsConfig) -> Broker {
        let broker = Broker::new(config, EPOCH);
        broker.open_at(Position { era: 1, seq: 0 });
        broker
    }

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn change(seq: u64, who: &str, data_type: DataType) -> ChangeEvent {
        ChangeEvent {
            position: Position { era: 1, seq },
            user: user(who),
            data_type,
            version: seq,
            updated_ms: 1_796_515_200_000,
            data: Some(r#"{"coins":1}"#.into()),
        }
    }

    fn text(frames: &[Bytes]) -> Vec<String> {
        frames.iter().map(|f| String::from_utf8(f.to_vec()).unwrap()).collect()
    }

    fn received(subscription: &mut Subscription) -> Vec<String> {
        let mut frames = Vec::new();
        while let Ok(frame) = subscription.frames.try_recv() {
            frames.push(frame);
        }
        text(&frames)
    }

    #[test]
    fn a_change_reaches_its_users_streams_of_its_type_only() {
        let broker = broker(EventsConfig::default());
        let mut balance = broker.subscribe(&user("a"), &[DataType::Balance], None, HERE, None).unwrap();
        let mut all = broker.subscribe(&user("a"), &DataType::ALL, None, HERE, None).unwrap();
        let mut other = broker.subscribe(&user("b"), &DataType::ALL, None, HERE, None).unwrap();
        broker.dispatch(vec![change(1, "a", DataType::Balance), change(2, "a", DataType::Profile)]);
        let balance = received(&mut balance);
        assert_eq!(balance.len(), 1, "{balance:?}");
        assert!(
            balance[0].starts_with("id: E.1.1\ndata: {\"data_type\":\"balance\",\"version\":1,"),
            "{balance:?}"
        );
        assert!(balance[0].ends_with("\"data\":{\"coins\":1}}\n\n"), "{balance:?}");
        assert_eq!(received(&mut all).len(), 2);
        assert!(received(&mut other).is_empty(), "another user's change reached b");
    }

    #[test]
    fn a_resume_gets_what_it_missed_and_a_change_seen_twice_is_sent_once() {
        let broker = broker(EventsConfig::default());
        broker.dispatch(vec![change(1, "a", DataType::Balance), change(2, "b", DataType::Balance)]);
        broker.dispatch(vec![change(2, "b", DataType::Balance), change(3, "a", DataType::Points)]);
        let mut resumed = broker.subscribe(&user("a"), &DataType::ALL, Some("E.1.1"), HERE, None).unwrap();
        let first = text(&resumed.first);
        assert_eq!(first.len(), 3, "{first:?}");
        assert!(first[0].starts_with("retry: "));
        assert!(first[1].starts_with("id: E.1.3\n"), "{first:?}");
        assert!(first[2].starts_with("event: ready\nid: E.1.3\n"), "{first:?}");
        assert!(first[2].contains(r#""resumed":true"#));
        broker.dispatch(vec![change(3, "a", DataType::Points)]);
        assert!(received(&mut resumed).is_empty(), "a change dispatched twice was sent twice");
    }

    #[test]
    fn a_resume_from_before_the_kept_changes_or_another_epoch_is_told_to_resync() {
        let broker = broker(EventsConfig { resume_window: 2, ..EventsConfig::default() });
        broker.dispatch((1..=5).map(|seq| change(seq, "a", DataType::Balance)).collect());
        let kept = broker.subscribe(&user("a"), &DataType::ALL, Some("E.1.3"), HERE, None).unwrap();
        assert!(kept.older.is_none());
        assert_eq!(text(&kept.first).len(), 4, "{:?}", text(&kept.first));
        let old = broker.subscribe(&user("a"), &DataType::ALL, Some("E.1.1"), HERE, None).unwrap();
        let (era, latest) = (1, Position { era: 1, seq: 5 });
        assert_eq!(
            old.older,
            Some(Older { after: Position { era, seq: 1 }, upto: Position { era, seq: 3 }, latest })
        );
        for id in ["F.1.4", "garbage", "E.x.1", "", "E.1.6", "E.2.1"] {
            let other = broker.subscribe(&user("a"), &DataType::ALL, Some(id), HERE, None).unwrap();
            let first = text(&other.first);
            assert!(first[1].starts_with("event: resync\nid: E.1.5\n"), "{id:?}: {first:?}");
            assert!(first[2].starts_with("event: ready\n"), "{id:?}: {first:?}");
        }
    }

    #[test]
    fn a_stream_that_reads_nothing_is_ended_and_its_slot_freed() {
        let broker = broker(EventsConfig { max_streams_per_user: 1, ..EventsConfig::default() });
        let mut slow = broker.subscribe(&user("a"), &DataType::ALL, None, HERE, None).unwrap();
        assert_eq!(
            broker.subscribe(&user("a"), &DataType::ALL, None, HERE, None).err(),
            Some(Refused::PerUser)
        );
        broker.dispatch((1..=QUEUE as u64 + 1).map(|seq| change(seq, "a", DataType::Balance)).collect());
        assert_eq!(received(&mut slow).len(), QUEUE);
        assert!(slow.frames.is_closed(), "the slow stream was not ended");
        drop(slow);
        assert!(broker.subscribe(&user("a"), &DataType::ALL, None, HERE, None).is_ok());
    }

    #[test]
    fn streams_are_capped_per_address_and_an_ipv6_host_counts_as_its_64() {
        let broker = broker(EventsConfig { max_streams_per_address: 2, ..EventsConfig::default() });
        let host = |last: u16| IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last));
        let _one = broker.subscribe(&user("a"), &DataType::ALL, None, host(1), None).unwrap();
        let _two = broker.subscribe(&user("b"), &DataType::ALL, None, host(2), None).unwrap();
        assert_eq!(
            broker.subscribe(&user("c"), &DataType::ALL, None, host(3), None).err(),
            Some(Refused::PerAddress)
        );
        assert!(broker.subscribe(&user("c"), &DataType::ALL, None, HERE, None).is_ok());
        // IPv4 clients of a dual-stack listener, written as IPv6, count as their own addresses.
        let mapped = |last: u8| IpAddr::V6(Ipv4Addr::new(192, 0, 2, last).to_ipv6_mapped());
        for last in 1..=3 {
            assert!(broker.subscribe(&user("d"), &DataType::ALL, None, mapped(last), None).is_ok(), "{last}");
        }
    }

    #[test]
    fn after_a_loss_every_stream_ends_and_no_resume_is_served_from_the_kept_changes() {
        let broker = broker(EventsConfig::default());
        broker.dispatch((1..=3).map(|seq| change(seq, "a", DataType::Balance)).collect());
        let mut open = broker.subscribe(&user("a"), &DataType::ALL, None, HERE, None).unwrap();
        broker.lost();
        assert!(open.frames.try_recv().is_err() && open.frames.is_closed(), "a stream outlived the loss");
        for id in ["E.1.1", "E.1.3"] {
            let resumed = broker.subscribe(&user("a"), &DataType::ALL, Some(id), HERE, None).unwrap();
            assert!(resumed.older.is_some(), "{id}: resumed from the kept changes past a loss");
        }
        broker.dispatch(vec![change(9, "a", DataType::Balance)]);
        let after = broker.subscribe(&user("a"), &DataType::ALL, Some("E.1.9"), HERE, None).unwrap();
        assert!(after.older.is_none(), "an id from after the loss needs nothing of the store");
    }

    #[test]
    fn stopping_ends_every_stream_and_opens_none() {
        let broker = broker(EventsConfig::default());
        let mut open = broker.subscribe(&user("a"), &DataType::ALL, None, HERE, None).unwrap();
        broker.stop();
        assert!(open.frames.try_recv().is_err() && open.frames.is_closed());
        assert_eq!(
            broker.subscribe(&user("a"), &DataType::ALL, None, HERE, None).err(),
            Some(Refused::Stopping)
        );
    }
}
