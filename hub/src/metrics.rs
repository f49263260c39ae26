//! What the hub counts, for its operator: Prometheus metrics behind `/metrics`, and the last
//! hour in ten-second slots behind the dashboard. Records and reports; decides nothing about
//! a request and never refuses one.

mod process;

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use protocol::{DataType, SiteId, UserId};
use serde::Serialize;

use crate::store::StoreMetrics;

/// The dashboard's resolution: one slot per this many milliseconds.
pub const SLOT_MS: i64 = 10_000;
/// Slots kept: one hour.
pub const SLOTS: usize = 360;

/// Request latency bounds, in seconds, for `/metrics` (as Prometheus users expect them).
const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// The dashboard's finer latency bounds: 50 µs, growing by 1.5 up to about 6 s.
const WINDOW_BUCKETS: usize = 30;

/// What a request was, as far as the hub understood it; set by the handler, read once the
/// answer is sent.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub action: Action,
    pub types: TypeSet,
    /// The site of a verified token; `None` before (or without) one.
    pub site: Option<usize>,
    /// A write answered from its op id's first answer.
    pub replayed: bool,
    /// Whom the request spoke for, for the logs: its token's site and user (an expired
    /// token's too), or with auth off the user and site it named.
    pub who: Option<(SiteId, UserId)>,
}

/// The kind of request, a label of every request metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Action {
    Timestamp,
    Get,
    Push,
    Delta,
    /// Pushes and deltas sent together.
    Batch,
    /// An event stream opened (`/api/events`).
    Events,
    /// A page of the change feed, or its stream opened (`/api/changes`).
    Changes,
    Preflight,
    Health,
    /// `/metrics` and the dashboard.
    Admin,
    /// Anything the hub could not place: a bad query, an unknown path or method.
    #[default]
    Other,
}

/// How many kinds of [`Action`] there are.
const ACTIONS: usize = 11;

impl Action {
    const ALL: [Action; ACTIONS] = [
        Action::Timestamp,
        Action::Get,
        Action::Push,
        Action::Delta,
        Action::Batch,
        Action::Events,
        Action::Changes,
        Action::Preflight,
        Action::Health,
        Action::Admin,
        Action::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Timestamp => "timestamp",
            Action::Get => "get",
            Action::Push => "push",
            Action::Delta => "delta",
            Action::Batch => "batch",
            Action::Events => "events",
            Action::Changes => "changes",
            Action::Preflight => "preflight",
            Action::Health => "health",
            Action::Admin => "admin",
            Action::Other => "other",
        }
    }
}

impl EncodeLabelValue for Action {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// The data types a request named, as one label value (`balance,profile`): at most 31
/// values, so the label's cardinality stays small.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TypeSet(u8);

impl TypeSet {
    pub fn of(types: &[DataType]) -> TypeSet {
        TypeSet(types.iter().fold(0, |bits, t| bits | 1 << t.index()))
    }
}

impl EncodeLabelValue for TypeSet {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        let mut first = true;
        for t in DataType::ALL.into_iter().filter(|t| self.0 & 1 << DataType::index(*t) != 0) {
            if !first {
                encoder.write_char(',')?;
            }
            encoder.write_str(t.as_str())?;
            first = false;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    action: Action,
    data_type: TypeSet,
    /// Empty for requests without a verified token.
    site: Arc<str>,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ActionLabels {
    action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SiteLabels {
    site: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FetchLabels {
    site: Arc<str>,
    /// `sent` (the record), or `not_modified` (the client's copy was current).
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ScopeLabels {
    /// `user` (a verified token's user) or `address` (requests without a valid token).
    scope: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    /// `applied`, `replayed` (answered from the op id's first answer) or `refused`.
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectionStateLabels {
    /// `active` (a request in progress) or `idle`.
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectionLimitLabels {
    /// `per_address`: its address held `limits.max_connections_per_address` already.
    limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BodyRefusalLabels {
    /// `busy` (`limits.max_body_bytes_in_flight` was reached; answered 503 unread) or
    /// `timeout` (not all in within `limits.body_timeout_secs`; answered 408).
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    /// What SIGHUP reread: `sites`, `tls` (the certificate and key) or `access_log` (reopened).
    what: &'static str,
    /// `ok`, or `failed` (what was in use stays).
    result: &'static str,
}

/// What a SIGHUP rereads, each on its own: one may fail while the others are taken up.
#[derive(Debug, Clone, Copy)]
pub enum Reload {
    Sites,
    Tls,
    AccessLog,
}

impl Reload {
    const ALL: [Reload; 3] = [Reload::Sites, Reload::Tls, Reload::AccessLog];

    fn as_str(self) -> &'static str {
        match self {
            Reload::Sites => "sites",
            Reload::Tls => "tls",
            Reload::AccessLog => "access_log",
        }
    }
}

/// The served certificate's `notAfter`, for `/metrics` only while there is one: a plain-HTTP
/// hub shows no expiry rather than a date in 1970.
#[derive(Debug)]
struct CertificateExpiry(Arc<AtomicI64>);

/// Held by [`CertificateExpiry`] while no certificate is served.
const NO_CERTIFICATE: i64 = i64::MIN;

impl CertificateExpiry {
    fn get(&self) -> Option<i64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|secs| *secs != NO_CERTIFICATE)
    }
}

impl Collector for CertificateExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(secs) = self.get() else { return Ok(()) };
        ConstGauge::new(secs).encode(encoder.encode_descriptor(
            "tls_cert_not_after",
            "When the certificate served over HTTPS expires (its notAfter), in seconds since the Unix epoch; reread on SIGHUP",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)
    }
}

/// Which rate limit refused a request.
#[derive(Debug, Clone, Copy)]
pub enum LimitScope {
    User,
    Address,
}

const SCOPES: [&str; 2] = ["user", "address"];
const FETCH_RESULTS: [&str; 2] = ["sent", "not_modified"];
const DELTA_OUTCOMES: [&str; 3] = ["applied", "replayed", "refused"];

/// Every metric of one hub.
pub struct Metrics {
    registry: Registry,
    counts: Arc<Counts>,
    open_connections: Gauge,
    connection_states: ConnectionStates,
    refused_per_address: Counter,
    closed_idle: Counter,
    /// Bytes of request bodies held now (see `limits.max_body_bytes_in_flight`).
    body_bytes_in_flight: Gauge,
    body_bytes_limit: Gauge,
    bodies_refused_busy: Counter,
    bodies_timed_out: Counter,
    origins_refused: Counter,
    reloads: Family<ReloadLabels, Counter>,
    tls_not_after: CertificateExpiry,
    access_log_dropped: Counter,
    store: StoreMetrics,
    history: Mutex<History>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("sites", &self.counts.sites).finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics for a hub serving `sites`; `now_ms` starts the dashboard's first slot.
    pub fn new<'a>(sites: impl IntoIterator<Item = &'a str>, now_ms: i64) -> Metrics {
        let sites: Vec<Arc<str>> = sites.into_iter().map(Arc::from).collect();
        let site_index = sites.iter().enumerate().map(|(i, s)| (s.to_string(), i)).collect();
        let counts = Arc::new(Counts {
            shards: (0..SHARDS).map(|_| Shard(Mutex::new(Tally::new(sites.len())))).collect(),
            no_site: Arc::from(""),
            sites,
            site_index,
        });
        let mut root = Registry::default();
        root.register_collector(Box::new(process::Process));
        let registry = root.sub_registry_with_prefix("hub");
        registry.register("build", "The hub's version", Info::new([("version", env!("CARGO_PKG_VERSION"))]));
        registry.register_collector(Box::new(counts.clone()));
        let open_connections = Gauge::default();
        registry.register("open_connections", "Client connections open now", open_connections.clone());
        let connections = Family::<ConnectionStateLabels, Gauge>::default();
        registry.register(
            "connections",
            "Client connections open now: `active` with a request in progress, `idle` without",
            connections.clone(),
        );
        // One at a time: the family is locked while a gauge it returned is borrowed.
        let active = connections.get_or_create(&ConnectionStateLabels { state: "active" }).clone();
        let idle = connections.get_or_create(&ConnectionStateLabels { state: "idle" }).clone();
        let connection_states = ConnectionStates { active, idle };
        let refused = Family::<ConnectionLimitLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed as soon as they were accepted, by the limit they were over",
            refused.clone(),
        );
        let refused_per_address =
            refused.get_or_create(&ConnectionLimitLabels { limit: "per_address" }).clone();
        let closed_idle = Counter::default();
        registry.register(
            "connections_closed_idle",
            "Connections closed after limits.idle_timeout_secs without a request in progress",
            closed_idle.clone(),
        );
        let body_bytes_in_flight = Gauge::default();
        registry.register(
            "request_body_bytes_in_flight",
            "Bytes of request bodies held now: each body's declared length, from before its first byte is read until it is answered",
            body_bytes_in_flight.clone(),
        );
        let body_bytes_limit = Gauge::default();
        registry.register(
            "request_body_bytes_in_flight_limit",
            "limits.max_body_bytes_in_flight: a body beyond it is refused unread (503 busy)",
            body_bytes_limit.clone(),
        );
        let bodies_refused = Family::<BodyRefusalLabels, Counter>::default();
        registry.register(
            "request_bodies_refused",
            "Request bodies refused: `busy` unread beyond the bytes in flight, `timeout` not all in within limits.body_timeout_secs",
            bodies_refused.clone(),
        );
        let bodies_refused_busy = bodies_refused.get_or_create(&BodyRefusalLabels { reason: "busy" }).clone();
        let bodies_timed_out = bodies_refused.get_or_create(&BodyRefusalLabels { reason: "timeout" }).clone();
        let origins_refused = Counter::default();
        registry.register(
            "cors_origins_refused",
            "Requests from a page on an origin no site lists: answered without CORS headers, so the page sees no answer",
            origins_refused.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "reloads",
            "What SIGHUP reread or reopened, by what and result; after a failed one, what was in use stays",
            reloads.clone(),
        );
        for what in Reload::ALL {
            for result in ["ok", "failed"] {
                // Created at zero, so that an alert on `failed` has a series from the start.
                drop(reloads.get_or_create(&ReloadLabels { what: what.as_str(), result }));
            }
        }
        let tls_not_after = Arc::new(AtomicI64::new(NO_CERTIFICATE));
        registry.register_collector(Box::new(CertificateExpiry(tls_not_after.clone())));
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access log lines dropped because its writer fell behind (128,000 lines waiting)",
            access_log_dropped.clone(),
        );
        let store = StoreMetrics::default();
        registry.register(
            "store_commit_batch_writes",
            "Writes committed together in one transaction and one fsync",
            store.batch_writes.clone(),
        );
        registry.register_with_unit(
            "store_commit",
            "Time of a batch's COMMIT, until it is durable",
            Unit::Seconds,
            store.commit_seconds.clone(),
        );
        Metrics {
            registry: root,
            counts,
            open_connections,
            connection_states,
            refused_per_address,
            closed_idle,
            body_bytes_in_flight,
            body_bytes_limit,
            bodies_refused_busy,
            bodies_timed_out,
            origins_refused,
            reloads,
            tls_not_after: CertificateExpiry(tls_not_after),
            access_log_dropped,
            store,
            history: Mutex::new(History {
                live_start_ms: now_ms - now_ms % SLOT_MS,
                closed: VecDeque::new(),
            }),
        }
    }

    /// What the store records into: batch sizes and commit times.
    pub fn store(&self) -> &StoreMetrics {
        &self.store
    }

    /// Where a part that reports only in some deployments (a store's backend, a rate limit
    /// shared with other instances) adds its metrics, under the hub's prefix.
    pub fn hub_registry(&mut self) -> &mut prometheus_client::registry::Registry {
        self.registry.sub_registry_with_prefix("hub")
    }

    /// The index of a configured site, for [`Seen::site`].
    pub fn site_index(&self, site: &str) -> Option<usize> {
        self.counts.site_index.get(site).copied()
    }

    /// Counts one answered request.
    pub fn request(&self, seen: &Seen, status: u16, elapsed: Duration) {
        let site = seen.site.unwrap_or(self.counts.sites.len());
        let ok = status == 200;
        let mut tally = self.counts.shard();
        *tally.requests.entry((seen.action, seen.types, site, status)).or_default() += 1;
        tally.latency[seen.action as usize].observe(elapsed.as_secs_f64(), &LATENCY_BUCKETS);
        let slot = &mut tally.live;
        slot.requests[site] += 1;
        slot.latency[window_bucket(elapsed)] += 1;
        match status {
            429 => {}
            400..=499 => slot.client_errors += 1,
            500..=599 => slot.server_errors += 1,
            _ => {}
        }
        match seen.action {
            Action::Timestamp if ok => {
                tally.checks[site] += 1;
                tally.live.checks += 1;
            }
            Action::Get if ok || status == 304 => {
                tally.fetches[site][usize::from(!ok)] += 1;
                if ok {
                    tally.live.fetches += 1;
                } else {
                    tally.live.not_modified += 1;
                }
            }
            Action::Delta => {
                let outcome = match (ok, seen.replayed) {
                    (true, false) => 0,
                    (true, true) => 1,
                    (false, _) if (400..500).contains(&status) && status != 429 => 2,
                    (false, _) => return,
                };
                tally.deltas[outcome] += 1;
                if outcome == 0 {
                    tally.live.deltas += 1;
                }
            }
            _ => {}
        }
    }

    /// Counts a request refused by a rate limit.
    pub fn rate_limited(&self, scope: LimitScope) {
        let mut tally = self.counts.shard();
        tally.rate_limited[scope as usize] += 1;
        tally.live.rate_limited += 1;
    }

    pub fn connection_opened(&self) {
        self.open_connections.inc();
        self.connection_states.idle.inc();
    }

    pub fn connection_closed(&self) {
        self.open_connections.dec();
        self.connection_states.idle.dec();
    }

    /// What each connection tells as its requests come and go.
    pub fn connection_states(&self) -> ConnectionStates {
        self.connection_states.clone()
    }

    /// Counts a connection closed at once because its address held its share already.
    pub fn connection_refused_per_address(&self) {
        self.refused_per_address.inc();
    }

    /// Counts a connection closed for being idle.
    pub fn connection_closed_idle(&self) {
        self.closed_idle.inc();
    }

    /// The most bytes of request bodies held at once (`limits.max_body_bytes_in_flight`).
    pub fn body_bytes_limit(&self, bytes: usize) {
        self.body_bytes_limit.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The bytes of request bodies held now, which the hub's body budget keeps up to date.
    pub fn body_bytes_in_flight(&self) -> &Gauge {
        &self.body_bytes_in_flight
    }

    /// Counts a body refused unread because too many bytes were in flight.
    pub fn body_refused_busy(&self) {
        self.bodies_refused_busy.inc();
    }

    /// Counts a body cut for not arriving in time.
    pub fn body_timed_out(&self) {
        self.bodies_timed_out.inc();
    }

    /// Counts a request from a page on an origin no site lists.
    pub fn origin_refused(&self) {
        self.origins_refused.inc();
    }

    /// Counts what a SIGHUP reread, and whether it was taken up.
    pub fn reloaded(&self, what: Reload, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ReloadLabels { what: what.as_str(), result }).inc();
    }

    /// The `notAfter` of the certificate served now, in seconds since the Unix epoch.
    pub fn tls_cert_not_after(&self, secs: i64) {
        self.tls_not_after.0.store(secs, Ordering::Relaxed);
    }

    /// Counts access log lines dropped because its writer fell behind.
    pub fn access_log_dropped(&self, lines: u64) {
        self.access_log_dropped.inc_by(lines);
    }

    /// Everything, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String never fails");
        text
    }

    /// Closes the live slot if `now_ms` is past its end; the hub calls it every few seconds.
    pub fn roll(&self, now_ms: i64) {
        drop(self.roll_locked(now_ms));
    }

    fn roll_locked(&self, now_ms: i64) -> MutexGuard<'_, History> {
        let mut history = self.history.lock().expect("metrics history");
        if now_ms >= history.live_start_ms + SLOT_MS {
            let closed = self.counts.live(true).view(history.live_start_ms);
            if closed.requests.iter().any(|n| *n > 0) || closed.rate_limited > 0 {
                history.closed.push_back(closed);
            }
            history.live_start_ms = now_ms - now_ms % SLOT_MS;
            let oldest = history.live_start_ms.saturating_sub(SLOT_MS * SLOTS as i64);
            while history.closed.front().is_some_and(|s| s.start_ms < oldest) {
                history.closed.pop_front();
            }
        }
        history
    }

    /// The last hour, slot by slot, ending with the slot still being filled.
    pub fn recent(&self, now_ms: i64) -> Recent {
        let history = self.roll_locked(now_ms);
        let mut slots: Vec<SlotView> = history.closed.iter().cloned().collect();
        slots.push(self.counts.live(false).view(history.live_start_ms));
        Recent {
            slot_ms: SLOT_MS,
            sites: self.counts.sites.iter().map(|s| s.to_string()).collect(),
            open_connections: self.open_connections.get(),
            tls_cert_not_after_ms: self.tls_not_after.get().map(|secs| secs.saturating_mul(1000)),
            now_ms,
            slots,
        }
    }
}

/// Open connections by state: `active` with a request in progress, `idle` without (the
/// rest of `open_connections`). A connection moves between them as its requests come and go.
#[derive(Debug, Clone)]
pub struct ConnectionStates {
    active: Gauge,
    idle: Gauge,
}

impl ConnectionStates {
    /// A connection's first request in progress arrived.
    pub fn active(&self) {
        self.idle.dec();
        self.active.inc();
    }

    /// A connection's last request in progress finished.
    pub fn inactive(&self) {
        self.active.dec();
        self.idle.inc();
    }
}

/// Shards of the request counts: a thread records into its own shard, so that two threads
/// answering requests at once never wait for, or bounce a cache line with, each other.
/// Scrapes and the dashboard add the shards up.
#[derive(Debug)]
struct Counts {
    shards: Vec<Shard>,
    /// Configured site ids; a request's `Seen::site` indexes them, and index `sites.len()`
    /// counts requests without a verified token.
    sites: Vec<Arc<str>>,
    site_index: HashMap<String, usize>,
    no_site: Arc<str>,
}

/// More shards than a machine has worker threads, in practice: threads take them in turn.
const SHARDS: usize = 16;

/// One shard, alone on its cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct Shard(Mutex<Tally>);

impl Counts {
    fn shard(&self) -> MutexGuard<'_, Tally> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        self.shards[SHARD.with(|i| *i)].0.lock().expect("metrics shard")
    }

    fn site(&self, index: usize) -> Arc<str> {
        self.sites.get(index).unwrap_or(&self.no_site).clone()
    }

    /// The live slot summed over the shards; with `take`, the shards start a new one.
    fn live(&self, take: bool) -> SlotTally {
        let mut sum = SlotTally::new(self.sites.len());
        for shard in &self.shards {
            let mut tally = shard.0.lock().expect("metrics shard");
            sum.add(&tally.live);
            if take {
                tally.live = SlotTally::new(self.sites.len());
            }
        }
        sum
    }

    /// Every shard's totals added up.
    fn total(&self) -> Tally {
        let mut sum = Tally::new(self.sites.len());
        for shard in &self.shards {
            sum.add(&shard.0.lock().expect("metrics shard"));
        }
        sum
    }
}

/// What one shard has counted since the hub started (and, in `live`, in this slot).
#[derive(Debug)]
struct Tally {
    requests: HashMap<(Action, TypeSet, usize, u16), u64>,
    latency: [Buckets; ACTIONS],
    checks: Vec<u64>,
    fetches: Vec<[u64; 2]>,
    rate_limited: [u64; 2],
    deltas: [u64; 3],
    live: SlotTally,
}

impl Tally {
    fn new(sites: usize) -> Tally {
        Tally {
            requests: HashMap::new(),
            latency: std::array::from_fn(|_| Buckets::new(LATENCY_BUCKETS.len())),
            checks: vec![0; sites + 1],
            fetches: vec![[0; 2]; sites + 1],
            rate_limited: [0; 2],
            deltas: [0; 3],
            live: SlotTally::new(sites),
        }
    }

    fn add(&mut self, other: &Tally) {
        for (key, n) in &other.requests {
            *self.requests.entry(*key).or_default() += n;
        }
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            mine.add(theirs);
        }
        add_all(&mut self.checks, &other.checks);
        for (mine, theirs) in self.fetches.iter_mut().zip(&other.fetches) {
            add_all(mine, theirs);
        }
        add_all(&mut self.rate_limited, &other.rate_limited);
        add_all(&mut self.deltas, &other.deltas);
    }
}

fn add_all(mine: &mut [u64], theirs: &[u64]) {
    for (a, b) in mine.iter_mut().zip(theirs) {
        *a += b;
    }
}

/// A histogram's counts: one per bound, then one above the last.
#[derive(Debug, Clone)]
struct Buckets {
    counts: Vec<u64>,
    sum: f64,
}

impl Buckets {
    fn new(bounds: usize) -> Buckets {
        Buckets { counts: vec![0; bounds + 1], sum: 0.0 }
    }

    fn observe(&mut self, value: f64, bounds: &[f64]) {
        self.counts[bounds.iter().position(|b| value <= *b).unwrap_or(bounds.len())] += 1;
        self.sum += value;
    }

    fn add(&mut self, other: &Buckets) {
        add_all(&mut self.counts, &other.counts);
        self.sum += other.sum;
    }
}

impl Collector for Counts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let total = self.total();

        let mut requests: Vec<_> = total.requests.iter().collect();
        requests.sort_by_key(|((action, types, site, status), _)| (*action as u8, types.0, *site, *status));
        let mut family = encoder.encode_descriptor(
            "requests",
            "Requests answered, by action, data type, site and status",
            None,
            MetricType::Counter,
        )?;
        for ((action, types, site, status), n) in requests {
            let labels =
                RequestLabels { action: *action, data_type: *types, site: self.site(*site), status: *status };
            ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
        }

        let bounds: Vec<f64> = LATENCY_BUCKETS.iter().copied().chain([f64::MAX]).collect();
        let mut family = encoder.encode_descriptor(
            "request_duration",
            "Time from a request's arrival to its answer",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (action, buckets) in Action::ALL.iter().zip(&total.latency) {
            let count: u64 = buckets.counts.iter().sum();
            if count > 0 {
                let pairs: Vec<(f64, u64)> =
                    bounds.iter().copied().zip(buckets.counts.iter().copied()).collect();
                family.encode_family(&ActionLabels { action: *action })?.encode_histogram::<NoLabelSet>(
                    buckets.sum,
                    count,
                    &pairs,
                    None,
                )?;
            }
        }

        let sites = 0..=self.sites.len();
        let mut family = encoder.encode_descriptor(
            "sync_checks",
            "Version checks answered (one per tab return or login)",
            None,
            MetricType::Counter,
        )?;
        for site in sites.clone().filter(|s| total.checks[*s] > 0) {
            ConstCounter::new(total.checks[site])
                .encode(family.encode_family(&SiteLabels { site: self.site(site) })?)?;
        }

        let mut family = encoder.encode_descriptor(
            "sync_fetches",
            "Record fetches: `sent` when a check found something new, `not_modified` when the client's copy was current",
            None,
            MetricType::Counter,
        )?;
        for site in sites {
            for (result, n) in FETCH_RESULTS.iter().zip(total.fetches[site]).filter(|(_, n)| *n > 0) {
                let labels = FetchLabels { site: self.site(site), result };
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "rate_limited",
            "Requests refused by a rate limit",
            None,
            MetricType::Counter,
        )?;
        for (scope, n) in SCOPES.iter().zip(total.rate_limited) {
            ConstCounter::new(n).encode(family.encode_family(&ScopeLabels { scope })?)?;
        }

        let mut family =
            encoder.encode_descriptor("deltas", "Deltas by outcome", None, MetricType::Counter)?;
        for (outcome, n) in DELTA_OUTCOMES.iter().zip(total.deltas) {
            ConstCounter::new(n).encode(family.encode_family(&OutcomeLabels { outcome })?)?;
        }
        Ok(())
    }
}

/// The upper bound, in seconds, of each of the dashboard's latency buckets.
fn window_bounds() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 1.5, WINDOW_BUCKETS as u16)
}

fn window_bucket(elapsed: Duration) -> usize {
    let secs = elapsed.as_secs_f64();
    window_bounds().position(|bound| secs <= bound).unwrap_or(WINDOW_BUCKETS)
}

/// The last hour for the dashboard.
#[derive(Debug, Serialize)]
pub struct Recent {
    pub slot_ms: i64,
    /// Names for `SlotView::requests`; one more entry there counts requests without a
    /// verified token.
    pub sites: Vec<String>,
    pub open_connections: i64,
    /// When the certificate served over HTTPS expires; `None` over plain HTTP.
    pub tls_cert_not_after_ms: Option<i64>,
    pub now_ms: i64,
    /// Oldest first; slots in which nothing happened are absent.
    pub slots: Vec<SlotView>,
}

/// One ten-second slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotView {
    pub start_ms: i64,
    /// Requests per configured site, then those without a verified token.
    pub requests: Vec<u64>,
    pub checks: u64,
    pub fetches: u64,
    pub not_modified: u64,
    pub deltas: u64,
    /// 4xx answers other than rate-limit refusals.
    pub client_errors: u64,
    pub server_errors: u64,
    pub rate_limited: u64,
    /// Latency percentiles in milliseconds (the upper bound of the bucket holding them);
    /// `None` in a slot without requests.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A slot's counts in one shard.
#[derive(Debug, Clone)]
struct SlotTally {
    requests: Vec<u64>,
    checks: u64,
    fetches: u64,
    not_modified: u64,
    deltas: u64,
    client_errors: u64,
    server_errors: u64,
    rate_limited: u64,
    latency: [u64; WINDOW_BUCKETS + 1],
}

impl SlotTally {
    fn new(sites: usize) -> SlotTally {
        SlotTally {
            requests: vec![0; sites + 1],
            checks: 0,
            fetches: 0,
            not_modified: 0,
            deltas: 0,
            client_errors: 0,
            server_errors: 0,
            rate_limited: 0,
            latency: [0; WINDOW_BUCKETS + 1],
        }
    }

    fn add(&mut self, other: &SlotTally) {
        add_all(&mut self.requests, &other.requests);
        self.checks += other.checks;
        self.fetches += other.fetches;
        self.not_modified += other.not_modified;
        self.deltas += other.deltas;
        self.client_errors += other.client_errors;
        self.server_errors += other.server_errors;
        self.rate_limited += other.rate_limited;
        add_all(&mut self.latency, &other.latency);
    }

    fn view(self, start_ms: i64) -> SlotView {
        let percentile = |p: f64| percentile_ms(&self.latency, p);
        SlotView {
            start_ms,
            p50_ms: percentile(0.50),
            p95_ms: percentile(0.95),
            p99_ms: percentile(0.99),
            requests: self.requests,
            checks: self.checks,
            fetches: self.fetches,
            not_modified: self.not_modified,
            deltas: self.deltas,
            client_errors: self.client_errors,
            server_errors: self.server_errors,
            rate_limited: self.rate_limited,
        }
    }
}

/// The upper bound (ms) of the bucket holding the `p` quantile of `counts`.
fn percentile_ms(counts: &[u64], p: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * p).ceil().max(1.0) as u64;
    let bounds: Vec<f64> = window_bounds().collect();
    let mut seen = 0;
    for (i, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let secs = bounds.get(i).copied().unwrap_or(bounds[WINDOW_BUCKETS - 1] * 1.5);
            return Some((secs * 1000.0 * 1000.0).round() / 1000.0);
        }
    }
    None
}

/// The closed slots of the last hour.
#[derive(Debug)]
struct History {
    live_start_ms: i64,
    closed: VecDeque<SlotView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(["roflfaucet", "clickforcharity"], 1_000_000)
    }

    fn seen(action: Action, site: Option<usize>) -> Seen {
        Seen { action, types: TypeSet::of(&[DataType::Balance, DataType::Profile]), site, ..Seen::default() }
    }

    #[test]
    fn requests_are_counted_by_action_types_site_and_status() {
        let m = metrics();
        m.request(&seen(Action::Timestamp, Some(1)), 200, Duration::from_micros(300));
        m.request(&seen(Action::Timestamp, Some(1)), 200, Duration::from_micros(300));
        m.request(&seen(Action::Get, None), 401, Duration::from_micros(300));
        let text = m.encode();
        assert!(
            text.contains(
                r#"hub_requests_total{action="timestamp",data_type="balance,profile",site="clickforcharity",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"hub_requests_total{action="get",data_type="balance,profile",site="",status="401"} 1"#
        ));
        assert!(text.contains(r#"hub_sync_checks_total{site="clickforcharity"} 2"#));
        assert!(text.contains(r#"hub_request_duration_seconds_count{action="timestamp"} 2"#));
    }

    #[test]
    fn fetches_tell_sent_from_not_modified_and_deltas_applied_from_replayed() {
        let m = metrics();
        m.request(&seen(Action::Get, Some(0)), 200, Duration::ZERO);
        m.request(&seen(Action::Get, Some(0)), 304, Duration::ZERO);
        m.request(&seen(Action::Get, Some(0)), 304, Duration::ZERO);
        m.request(&seen(Action::Delta, Some(0)), 200, Duration::ZERO);
        m.request(&Seen { replayed: true, ..seen(Action::Delta, Some(0)) }, 200, Duration::ZERO);
        m.request(&seen(Action::Delta, Some(0)), 409, Duration::ZERO);
        m.request(&seen(Action::Delta, Some(0)), 429, Duration::ZERO);
        let text = m.encode();
        assert!(text.contains(r#"hub_sync_fetches_total{site="roflfaucet",result="sent"} 1"#), "{text}");
        assert!(text.contains(r#"hub_sync_fetches_total{site="roflfaucet",result="not_modified"} 2"#));
        assert!(text.contains(r#"hub_deltas_total{outcome="applied"} 1"#));
        assert!(text.contains(r#"hub_deltas_total{outcome="replayed"} 1"#));
        assert!(text.contains(r#"hub_deltas_total{outcome="refused"} 1"#));
    }

    #[test]
    fn connections_are_counted_by_state_with_refusals_and_idle_closes() {
        let m = metrics();
        m.connection_opened();
        m.connection_opened();
        m.connection_states().active();
        m.connection_opened();
        m.connection_closed();
        m.connection_refused_per_address();
        m.connection_closed_idle();
        let text = m.encode();
        assert!(text.contains("hub_open_connections 2\n"), "{text}");
        assert!(text.contains(r#"hub_connections{state="active"} 1"#));
        assert!(text.contains(r#"hub_connections{state="idle"} 1"#));
        assert!(text.contains(r#"hub_connections_refused_total{limit="per_address"} 1"#));
        assert!(text.contains("hub_connections_closed_idle_total 1\n"));
    }

    #[test]
    fn the_window_keeps_one_slot_per_ten_seconds_for_an_hour() {
        let m = metrics();
        let start = 1_000_000;
        m.request(&seen(Action::Timestamp, Some(0)), 200, Duration::from_millis(2));
        m.rate_limited(LimitScope::User);
        m.roll(start + SLOT_MS);
        m.request(&seen(Action::Timestamp, None), 500, Duration::from_millis(2));
        let recent = m.recent(start + SLOT_MS + 1);
        assert_eq!(recent.slots.len(), 2);
        assert_eq!(recent.slots[0].requests, [1, 0, 0]);
        assert_eq!(recent.slots[0].rate_limited, 1);
        assert_eq!(recent.slots[0].checks, 1);
        assert_eq!(recent.slots[1].requests, [0, 0, 1]);
        assert_eq!(recent.slots[1].server_errors, 1);
        assert!(recent.slots[1].start_ms > recent.slots[0].start_ms);

        // An hour later the first slots are gone; empty slots are never kept.
        m.roll(start + SLOT_MS * (SLOTS as i64 + 2));
        let recent = m.recent(start + SLOT_MS * (SLOTS as i64 + 2));
        assert_eq!(recent.slots.len(), 1, "only the live slot is left");
        assert_eq!(recent.slots[0].requests, [0, 0, 0]);
    }

    #[test]
    fn percentiles_come_from_the_slot_latencies() {
        let m = metrics();
        for _ in 0..98 {
            m.request(&seen(Action::Timestamp, Some(0)), 200, Duration::from_micros(100));
        }
        for _ in 0..2 {
            m.request(&seen(Action::Timestamp, Some(0)), 200, Duration::from_millis(40));
        }
        let slot = &m.recent(1_000_001).slots[0];
        let (p50, p99) = (slot.p50_ms.unwrap(), slot.p99_ms.unwrap());
        assert!((0.1..0.2).contains(&p50), "p50 {p50}");
        assert!((40.0..60.0).contains(&p99), "p99 {p99}");
    }
}
