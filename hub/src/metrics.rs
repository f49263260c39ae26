//! What the hub counts, for its operator: Prometheus metrics behind `/metrics`, and the last
//! hour in ten-second slots behind the dashboard. Records and reports; decides nothing about
//! a request and never refuses one.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use protocol::DataType;
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
}

/// The kind of request, a label of every request metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Action {
    Timestamp,
    Get,
    Push,
    Delta,
    Preflight,
    Health,
    /// `/metrics` and the dashboard.
    Admin,
    /// Anything the hub could not place: a bad query, an unknown path or method.
    #[default]
    Other,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Timestamp => "timestamp",
            Action::Get => "get",
            Action::Push => "push",
            Action::Delta => "delta",
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
        TypeSet(types.iter().fold(0, |bits, t| bits | 1 << index_of(*t)))
    }
}

fn index_of(t: DataType) -> usize {
    DataType::ALL.iter().position(|x| *x == t).expect("every type is in ALL")
}

impl EncodeLabelValue for TypeSet {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        let mut first = true;
        for t in DataType::ALL.into_iter().filter(|t| self.0 & 1 << index_of(*t) != 0) {
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

/// Which rate limit refused a request.
#[derive(Debug, Clone, Copy)]
pub enum LimitScope {
    User,
    Address,
}

/// Every metric of one hub.
pub struct Metrics {
    registry: Registry,
    /// Configured site ids; a request's `Seen::site` indexes it.
    sites: Vec<Arc<str>>,
    site_index: HashMap<String, usize>,
    no_site: Arc<str>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<ActionLabels, Histogram>,
    checks: Family<SiteLabels, Counter>,
    fetches: Family<FetchLabels, Counter>,
    rate_limited: Family<ScopeLabels, Counter>,
    deltas: Family<OutcomeLabels, Counter>,
    open_connections: Gauge,
    store: StoreMetrics,
    window: Window,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("sites", &self.sites).finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics for a hub serving `sites`; `now_ms` starts the dashboard's first slot.
    pub fn new<'a>(sites: impl IntoIterator<Item = &'a str>, now_ms: i64) -> Metrics {
        let sites: Vec<Arc<str>> = sites.into_iter().map(Arc::from).collect();
        let site_index = sites.iter().enumerate().map(|(i, s)| (s.to_string(), i)).collect();
        let mut registry = Registry::with_prefix("hub");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by action, data type, site and status",
            requests.clone(),
        );
        let latency =
            Family::<ActionLabels, Histogram>::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS));
        registry.register_with_unit(
            "request_duration",
            "Time from a request's arrival to its answer",
            Unit::Seconds,
            latency.clone(),
        );
        let checks = Family::<SiteLabels, Counter>::default();
        registry.register(
            "sync_checks",
            "Version checks answered (one per tab return or login)",
            checks.clone(),
        );
        let fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "sync_fetches",
            "Record fetches: `sent` when a check found something new, `not_modified` when the client's copy was current",
            fetches.clone(),
        );
        let rate_limited = Family::<ScopeLabels, Counter>::default();
        registry.register("rate_limited", "Requests refused by a rate limit", rate_limited.clone());
        let deltas = Family::<OutcomeLabels, Counter>::default();
        registry.register("deltas", "Deltas by outcome", deltas.clone());
        let open_connections = Gauge::default();
        registry.register("open_connections", "Client connections open now", open_connections.clone());
        let store = StoreMetrics::default();
        registry.register(
            "store_commit_batch_writes",
            "Writes committed together in one transaction and one fsync",
            store.batch_writes.clone(),
        );
        registry.register_with_unit(
            "store_commit",
            "Time of a batch's COMMIT: writing the WAL and its fsync",
            Unit::Seconds,
            store.commit_seconds.clone(),
        );
        Metrics {
            registry,
            window: Window::new(sites.len(), now_ms),
            sites,
            site_index,
            no_site: Arc::from(""),
            requests,
            latency,
            checks,
            fetches,
            rate_limited,
            deltas,
            open_connections,
            store,
        }
    }

    /// What the store records into: batch sizes and commit times.
    pub fn store(&self) -> &StoreMetrics {
        &self.store
    }

    /// The index of a configured site, for [`Seen::site`].
    pub fn site_index(&self, site: &str) -> Option<usize> {
        self.site_index.get(site).copied()
    }

    /// Counts one answered request.
    pub fn request(&self, seen: &Seen, status: u16, elapsed: Duration) {
        let site = seen.site.map_or_else(|| self.no_site.clone(), |i| self.sites[i].clone());
        let ok = status == 200;
        self.requests
            .get_or_create(&RequestLabels {
                action: seen.action,
                data_type: seen.types,
                site: site.clone(),
                status,
            })
            .inc();
        self.latency.get_or_create(&ActionLabels { action: seen.action }).observe(elapsed.as_secs_f64());
        let slot = &self.window.live;
        slot.requests[seen.site.unwrap_or(self.sites.len())].fetch_add(1, Ordering::Relaxed);
        slot.latency[window_bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
        match status {
            429 => {}
            400..=499 => add(&slot.client_errors),
            500..=599 => add(&slot.server_errors),
            _ => {}
        }
        match seen.action {
            Action::Timestamp if ok => {
                self.checks.get_or_create(&SiteLabels { site }).inc();
                add(&slot.checks);
            }
            Action::Get if ok || status == 304 => {
                let result = if ok { "sent" } else { "not_modified" };
                self.fetches.get_or_create(&FetchLabels { site, result }).inc();
                add(if ok { &slot.fetches } else { &slot.not_modified });
            }
            Action::Delta => {
                let outcome = match (ok, seen.replayed) {
                    (true, false) => "applied",
                    (true, true) => "replayed",
                    (false, _) if (400..500).contains(&status) && status != 429 => "refused",
                    (false, _) => return,
                };
                self.deltas.get_or_create(&OutcomeLabels { outcome }).inc();
                if outcome == "applied" {
                    add(&slot.deltas);
                }
            }
            _ => {}
        }
    }

    /// Counts a request refused by a rate limit.
    pub fn rate_limited(&self, scope: LimitScope) {
        let scope = match scope {
            LimitScope::User => "user",
            LimitScope::Address => "address",
        };
        self.rate_limited.get_or_create(&ScopeLabels { scope }).inc();
        add(&self.window.live.rate_limited);
    }

    pub fn connection_opened(&self) {
        self.open_connections.inc();
    }

    pub fn connection_closed(&self) {
        self.open_connections.dec();
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
        self.window.roll(now_ms);
    }

    /// The last hour, slot by slot, ending with the slot still being filled.
    pub fn recent(&self, now_ms: i64) -> Recent {
        self.window.roll(now_ms);
        let history = self.window.history.lock().expect("metrics window");
        let mut slots: Vec<SlotView> = history.closed.iter().cloned().collect();
        slots.push(self.window.live.view(history.live_start_ms));
        Recent {
            slot_ms: SLOT_MS,
            sites: self.sites.iter().map(|s| s.to_string()).collect(),
            open_connections: self.open_connections.get(),
            now_ms,
            slots,
        }
    }
}

fn add(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
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

/// The slot being filled, in atomics so that recording takes no lock.
struct LiveSlot {
    requests: Vec<AtomicU64>,
    checks: AtomicU64,
    fetches: AtomicU64,
    not_modified: AtomicU64,
    deltas: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    rate_limited: AtomicU64,
    latency: [AtomicU64; WINDOW_BUCKETS + 1],
}

impl LiveSlot {
    fn new(sites: usize) -> LiveSlot {
        LiveSlot {
            requests: (0..=sites).map(|_| AtomicU64::new(0)).collect(),
            checks: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            not_modified: AtomicU64::new(0),
            deltas: AtomicU64::new(0),
            client_errors: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Reads the slot; with `take`, also empties it for the next one.
    fn read(&self, start_ms: i64, take: bool) -> SlotView {
        let get = |a: &AtomicU64| if take { a.swap(0, Ordering::Relaxed) } else { a.load(Ordering::Relaxed) };
        let latency: Vec<u64> = self.latency.iter().map(get).collect();
        let percentile = |p: f64| percentile_ms(&latency, p);
        SlotView {
            start_ms,
            requests: self.requests.iter().map(get).collect(),
            checks: get(&self.checks),
            fetches: get(&self.fetches),
            not_modified: get(&self.not_modified),
            deltas: get(&self.deltas),
            client_errors: get(&self.client_errors),
            server_errors: get(&self.server_errors),
            rate_limited: get(&self.rate_limited),
            p50_ms: percentile(0.50),
            p95_ms: percentile(0.95),
            p99_ms: percentile(0.99),
        }
    }

    fn view(&self, start_ms: i64) -> SlotView {
        self.read(start_ms, false)
    }
}

/// The upper bound (ms) of the bucket holding the `p` quantile of `counts`.
fn percentile_ms(counts: &[u64], p: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * p).ceil().max(1.0) as u64;
    let mut seen = 0;
    let bounds: Vec<f64> = window_bounds().collect();
    for (i, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let secs = bounds.get(i).copied().unwrap_or(bounds[WINDOW_BUCKETS - 1] * 1.5);
            return Some((secs * 1000.0 * 1000.0).round() / 1000.0);
        }
    }
    None
}

struct Window {
    live: LiveSlot,
    history: Mutex<History>,
}

struct History {
    live_start_ms: i64,
    closed: VecDeque<SlotView>,
}

impl Window {
    fn new(sites: usize, now_ms: i64) -> Window {
        Window {
            live: LiveSlot::new(sites),
            history: Mutex::new(History {
                live_start_ms: now_ms - now_ms % SLOT_MS,
                closed: VecDeque::new(),
            }),
        }
    }

    fn roll(&self, now_ms: i64) {
        let mut history = self.history.lock().expect("metrics window");
        if now_ms < history.live_start_ms + SLOT_MS {
            return;
        }
        let closed = self.live.read(history.live_start_ms, true);
        if closed.requests.iter().any(|n| *n > 0) || closed.rate_limited > 0 {
            history.closed.push_back(closed);
        }
        history.live_start_ms = now_ms - now_ms % SLOT_MS;
        let oldest = history.live_start_ms.saturating_sub(SLOT_MS * SLOTS as i64);
        while history.closed.front().is_some_and(|s| s.start_ms < oldest) {
            history.closed.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(["roflfaucet", "clickforcharity"], 1_000_000)
    }

    fn seen(action: Action, site: Option<usize>) -> Seen {
        Seen { action, types: TypeSet::of(&[DataType::Balance, DataType::Profile]), site, replayed: false }
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
