//! `App`: what every request handler shares — the configuration, the domain, the sites (keys,
//! policies, origins; SIGHUP replaces them whole), the rate limits, the metrics, the TLS
//! certificate — and the gates every request passes before a handler does its work: its
//! token, its site's origin and the rate limits, or, for the operator's pages, the metrics
//! token. Serves nothing itself; `server` accepts connections and `http` routes them.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use protocol::{DataType, Refusal, Scopes, SiteId, UserId};
use subtle::ConstantTimeEq;

use super::body::{Budget, Held};
use super::logs::Logs;
use super::{ApiError, ClientAddr, bearer};
use crate::auth::{AuthError, Keys};
use crate::config::{Config, OriginPattern};
use crate::domain::{Caller, Ceilings, Domain};
use crate::events::Broker;
use crate::limit::RateLimits;
use crate::metrics::{LimitScope, Metrics, Seen};
use crate::store::Store;
use crate::time::now_ms;
use crate::tls::Tls;
use crate::webhooks::Webhooks;

/// Everything a request handler needs: the domain, the sites, limits and configuration.
#[derive(Clone, Debug)]
pub struct App {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    domain: Domain,
    /// The sites' keys, policies and origins; SIGHUP replaces them whole.
    sites: ArcSwap<Sites>,
    rate_limits: RateLimits,
    metrics: Metrics,
    /// Lets callers from any address read the metrics; see `MetricsConfig`.
    metrics_token: Option<String>,
    /// `None` when the hub serves plain HTTP.
    tls: Option<Tls>,
    /// The access log and the refusals log.
    logs: Logs,
    /// The bytes of request bodies held at once.
    bodies: Budget,
    /// The realtime event streams.
    events: Broker,
    /// The sites' webhooks; `server` runs their deliveries.
    webhooks: Webhooks,
    /// The change feed's readers open now, by site (`http/changes.rs`).
    feed_readers: Mutex<HashMap<SiteId, usize>>,
    /// Origins refused by CORS and logged in the current window: each is logged once per
    /// window, up to [`LOGGED_ORIGINS`]; all are counted.
    refused_origins: Mutex<RefusedOrigins>,
    /// Set when the hub has been asked to stop and drains: `/healthz` then answers 503 so that
    /// a load balancer sends its traffic elsewhere, while every request is still served.
    draining: AtomicBool,
}

/// How many distinct refused origins are logged per [`ORIGIN_LOG_WINDOW_MS`]: a page whose
/// site's origin is missing from the configuration shows among the first, and a client sending
/// made-up origins cannot fill the log — nor keep a real one out of it for longer than a window.
const LOGGED_ORIGINS: usize = 64;
const ORIGIN_LOG_WINDOW_MS: i64 = 3_600_000;

/// The refused origins logged since `since_ms`.
#[derive(Debug, Default)]
struct RefusedOrigins {
    since_ms: i64,
    logged: HashSet<String>,
}

/// What the hub knows of its sites, read from the configuration at start and again on SIGHUP.
#[derive(Debug)]
pub struct Sites {
    /// `None` when auth is off (development on loopback only).
    keys: Option<Keys>,
    /// Every configured origin: what CORS answers for before a token is read.
    origins: Vec<OriginPattern>,
    /// Each site's own origins: a site's token is refused from any other page.
    site_origins: HashMap<String, Vec<OriginPattern>>,
    /// The data types each site's change feed carries (`webhook_data_types`).
    subscribed: HashMap<String, Vec<DataType>>,
}

impl Sites {
    fn from_config(config: &Config) -> anyhow::Result<Sites> {
        let keys = if config.auth { Some(Keys::from_config(config)?) } else { None };
        let site_origins = config
            .sites
            .iter()
            .map(|s| {
                Ok((
                    s.id.clone(),
                    s.origins.iter().map(|o| OriginPattern::parse(o)).collect::<anyhow::Result<_>>()?,
                ))
            })
            .collect::<anyhow::Result<HashMap<String, Vec<OriginPattern>>>>()?;
        let origins = site_origins.values().flatten().cloned().collect();
        let subscribed = config
            .sites
            .iter()
            .map(|s| Ok((s.id.clone(), s.webhook_types()?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Sites { keys, origins, site_origins, subscribed })
    }

    /// The sites' keys, or `None` when auth is off.
    pub fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// Whether any site has pages on `origin`.
    pub(crate) fn allows_origin(&self, origin: &str) -> bool {
        self.origins.iter().any(|p| p.matches(origin))
    }

    /// The data types `site`'s change feed carries: every type for a site the configuration
    /// does not name (with auth off, whatever site a request names).
    pub(crate) fn subscribed(&self, site: &str) -> &[DataType] {
        self.subscribed.get(site).map_or(&DataType::ALL, Vec::as_slice)
    }

    /// Whether a page on `origin` may use `site`'s tokens.
    pub(crate) fn site_allows_origin(&self, site: &str, origin: &str) -> bool {
        self.site_origins.get(site).is_some_and(|patterns| patterns.iter().any(|p| p.matches(origin)))
    }
}

impl App {
    /// Runs every check a start needs ([`crate::check`]: the settings, the sites' keys, the
    /// certificate, the data dir, the access log, the metrics token), opens the access log, and
    /// only then opens the store in its data dir, creating the database if there is none: a
    /// file the check could not foresee failing (a sandbox's read-only folder) leaves no
    /// database behind either.
    pub fn open(config: Config) -> anyhow::Result<App> {
        crate::check::check(&config).into_result()?;
        let logs = Logs::open(&config.access_log)?;
        let metrics = Metrics::new(config.sites.iter().map(|s| s.id.as_str()), now_ms());
        let store = crate::store::open(
            &config.store,
            &config.data_dir,
            config.limits.op_retention(),
            metrics.store().clone(),
        )?;
        Self::build(config, store, metrics, logs)
    }

    /// Builds the app over any store, reading the TLS certificate if one is configured;
    /// `metrics` is where that store records its commits.
    pub fn with_store(config: Config, store: Arc<dyn Store>, metrics: Metrics) -> anyhow::Result<App> {
        let logs = Logs::open(&config.access_log)?;
        Self::build(config, store, metrics, logs)
    }

    fn build(config: Config, store: Arc<dyn Store>, mut metrics: Metrics, logs: Logs) -> anyhow::Result<App> {
        config.validate()?;
        store.register_metrics(metrics.hub_registry());
        let metrics_token = config.metrics.token()?;
        let tls = config.tls_files().map(|(cert, key)| Tls::load(cert, key)).transpose()?;
        if let Some(tls) = &tls {
            metrics.tls_cert_not_after(tls.not_after());
        }
        let sites = Sites::from_config(&config)?;
        let limits = &config.limits;
        let rate_limits =
            RateLimits::new(limits.requests_per_minute, limits.unauthenticated_requests_per_minute)
                .sharing(store.shared_rate_limit());
        rate_limits.register_metrics(metrics.hub_registry());
        let domain = Domain::new(store, protocol::Limits { max_delta: limits.max_delta });
        metrics.body_bytes_limit(limits.max_body_bytes_in_flight);
        let bodies = Budget::new(limits.max_body_bytes_in_flight, metrics.body_bytes_in_flight().clone());
        let events = Broker::new(config.events.clone(), domain.epoch());
        events.register_metrics(metrics.hub_registry());
        let webhooks = Webhooks::from_config(&config)?;
        webhooks.register_metrics(metrics.hub_registry());
        Ok(App {
            inner: Arc::new(Inner {
                config,
                domain,
                sites: ArcSwap::from_pointee(sites),
                rate_limits,
                metrics,
                metrics_token,
                tls,
                logs,
                bodies,
                events,
                webhooks,
                feed_readers: Mutex::new(HashMap::new()),
                refused_origins: Mutex::new(RefusedOrigins::default()),
                draining: AtomicBool::new(false),
            }),
        })
    }

    /// Replaces the sites' keys, scopes, ceilings and origins with those of `config` (SIGHUP).
    /// Requests in flight finish with the sites they started with; tokens verified before are
    /// verified again. Everything else in `config` is read only at start. Fails, keeping the
    /// current sites, if `config` would not start a hub.
    pub fn reload_sites(&self, config: &Config) -> anyhow::Result<()> {
        config.validate()?;
        if config.auth != self.inner.config.auth || config.hub_id != self.inner.config.hub_id {
            anyhow::bail!("auth and hub_id change only with a restart");
        }
        let sites = Sites::from_config(config)?;
        let unlabelled: Vec<&str> = config
            .sites
            .iter()
            .map(|s| s.id.as_str())
            .filter(|id| self.metrics().site_index(id).is_none())
            .collect();
        if !unlabelled.is_empty() {
            tracing::warn!(
                "new sites {} are served; /metrics counts them without a site label until a restart",
                unlabelled.join(", ")
            );
        }
        self.inner.sites.store(Arc::new(sites));
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn domain(&self) -> &Domain {
        &self.inner.domain
    }

    /// The realtime event streams.
    pub fn events(&self) -> &Broker {
        &self.inner.events
    }

    /// Counts one more reader of `site`'s change feed until the guard is dropped; `None` when
    /// the site holds `[events] max_streams_per_user` already on this instance: each waiting
    /// reader reads the store after every commit, so a backend (or a stolen key) may not
    /// open them without bound.
    pub fn feed_reader(&self, site: &SiteId) -> Option<FeedReader> {
        let mut readers = self.inner.feed_readers.lock().expect("the feed's readers");
        let count = readers.entry(site.clone()).or_default();
        if *count >= self.inner.config.events.max_streams_per_user {
            return None;
        }
        *count += 1;
        Some(FeedReader { app: self.clone(), site: site.clone() })
    }

    /// The sites' webhooks, read at start.
    pub fn webhooks(&self) -> &Webhooks {
        &self.inner.webhooks
    }

    /// The sites as they stand now; hold the guard for one request at most.
    pub fn sites(&self) -> arc_swap::Guard<Arc<Sites>> {
        self.inner.sites.load()
    }

    /// Whether a page on `origin` may call the hub (CORS). A refusal is counted, and logged
    /// the first time for each origin in an hour: the page sees only a failed `fetch`, which it
    /// cannot tell from a hub that is down, so the operator's log is where it shows.
    pub fn allows_origin(&self, origin: &HeaderValue) -> bool {
        let text = origin.to_str().ok();
        if text.is_some_and(|o| self.sites().allows_origin(o)) {
            return true;
        }
        self.inner.metrics.origin_refused();
        let shown: String = String::from_utf8_lossy(origin.as_bytes()).chars().take(200).collect();
        let now = now_ms();
        let mut refused = self.inner.refused_origins.lock().unwrap_or_else(|e| e.into_inner());
        if now - refused.since_ms >= ORIGIN_LOG_WINDOW_MS {
            *refused = RefusedOrigins { since_ms: now, logged: HashSet::new() };
        }
        if refused.logged.len() < LOGGED_ORIGINS && refused.logged.insert(shown.clone()) {
            tracing::warn!(
                origin = ?shown,
                "a page on an origin no site lists called the hub: refused (CORS), so the page sees no answer; if it is a site's page, add the origin to that site's `origins`{}",
                if refused.logged.len() == LOGGED_ORIGINS { " (further origins this hour are only counted)" } else { "" }
            );
        }
        false
    }

    /// The certificate HTTPS is served with, or `None` for plain HTTP. Reload it after
    /// renewing its files.
    pub fn tls(&self) -> Option<&Tls> {
        self.inner.tls.as_ref()
    }

    /// Rereads the certificate and key, if HTTPS is served, and tells the metrics when the
    /// certificate now served expires (seconds since the Unix epoch, which it returns). On an
    /// error the current certificate stays.
    pub fn reload_tls(&self) -> Option<anyhow::Result<i64>> {
        let tls = self.tls()?;
        Some(tls.reload().map(|()| {
            self.metrics().tls_cert_not_after(tls.not_after());
            tls.not_after()
        }))
    }

    /// Reopens the access log's file after logrotate moved it (SIGHUP); `None` when the
    /// access log is off or goes to stderr. On an error the current file stays in use.
    pub fn reopen_access_log(&self) -> Option<anyhow::Result<()>> {
        self.inner.logs.reopen()
    }

    /// Every few seconds: writes what the logs summed up of a minute that ended.
    pub fn housekeeping_logs(&self, now_ms: i64) {
        self.inner.logs.housekeeping(now_ms, self.metrics());
    }

    /// As the hub stops, once no request is left: writes what the logs summed up so far.
    pub fn stopping_logs(&self) {
        self.inner.logs.stopping();
    }

    pub(super) fn logs(&self) -> &Logs {
        &self.inner.logs
    }

    pub fn rate_limits(&self) -> &RateLimits {
        &self.inner.rate_limits
    }

    /// From now on `/healthz` answers `503 draining`; requests are served as before.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::Relaxed)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn metrics_token(&self) -> Option<&str> {
        self.inner.metrics_token.as_deref()
    }

    /// Who the request speaks for, after checking its token, its page's origin and the rate
    /// limits (one request); whether it may do what it asks is the domain's to say.
    /// `claimed_site` is the `site_id` the request names, if any: with auth off (development)
    /// the caller is `user` of that site.
    pub(super) async fn admit(
        &self,
        headers: &HeaderMap,
        ip: IpAddr,
        user: &UserId,
        claimed_site: Option<&str>,
        saw: &mut Seen,
    ) -> Result<Caller, ApiError> {
        match self.admit_token(headers, ip, saw).await? {
            Some(caller) => Ok(caller),
            None => self.admit_named(user, claimed_site, 1).await,
        }
    }

    /// Who the request's token speaks for, checked before anything the request sends after
    /// its headers is read, with its page's origin, and the request counted: against the
    /// token's user — an expired token's too, since its site issued it to that user, so that
    /// no flood of anonymous requests from the same address can turn a page's token refresh
    /// into a 429 — or against the client's address when the token is missing or invalid.
    /// `None` when auth is off (development): the caller is whoever the request names (see
    /// [`App::admit_named`]). `saw` learns the token's site as soon as it is verified, so that
    /// later refusals are counted under it.
    pub(super) async fn admit_token(
        &self,
        headers: &HeaderMap,
        ip: IpAddr,
        saw: &mut Seen,
    ) -> Result<Option<Caller>, ApiError> {
        let sites = self.sites();
        let Some(keys) = sites.keys() else { return Ok(None) };
        let verified = match bearer(headers) {
            Some(token) => keys.verify(token),
            None => Err(AuthError::Missing),
        };
        let v = match verified {
            Ok(v) => v,
            Err(AuthError::Expired { site, user }) => {
                saw.site = self.metrics().site_index(site.as_str());
                saw.who = Some((site.clone(), user.clone()));
                self.check_user(user.as_str(), 1).await?;
                return Err(AuthError::Expired { site, user }.into());
            }
            Err(e) => {
                self.check_address(ip)?;
                return Err(e.into());
            }
        };
        saw.site = self.metrics().site_index(v.site.as_str());
        // The caller's names cost two copies a request: taken for the logs that read them, the
        // access log's every line and the refusals' lines.
        if let Err(limited) = self.check_user(v.user.as_str(), 1).await {
            saw.who = Some((v.site, v.user));
            return Err(limited);
        }
        if self.logs().keeps_access() {
            saw.who = Some((v.site.clone(), v.user.clone()));
        }
        let origin = headers.get(header::ORIGIN).map(|o| o.to_str().unwrap_or(""));
        if origin.is_some_and(|o| !sites.site_allows_origin(v.site.as_str(), o)) {
            return Err(Refusal::forbidden(
                "origin_not_allowed",
                format!("{}'s tokens are not accepted from this page's origin", v.site),
            )
            .into());
        }
        Ok(Some(Caller {
            site: v.site,
            user: v.user,
            admin: v.admin,
            scopes: v.scopes,
            ceilings: v.ceilings,
            expires: Some(v.expires),
        }))
    }

    /// With auth off (development), the caller a request names: `user` of `claimed_site`
    /// (`dev` when it names none), allowed everything, its `ops` counted against that user.
    pub(super) async fn admit_named(
        &self,
        user: &UserId,
        claimed_site: Option<&str>,
        ops: usize,
    ) -> Result<Caller, ApiError> {
        self.check_user(user.as_str(), ops).await?;
        let site = SiteId::parse(claimed_site.unwrap_or("dev"))?;
        Ok(Caller {
            site,
            user: user.clone(),
            admin: true,
            scopes: Scopes::ALL,
            ceilings: Ceilings::NONE,
            expires: None,
        })
    }

    /// Counts the ops of a batch beyond its first against its caller's limit: its admission
    /// counted one request, before its body told how many ops it holds.
    pub(super) async fn check_batch(&self, caller: &Caller, ops: usize) -> Result<(), ApiError> {
        let ops = u32::try_from(ops).unwrap_or(u32::MAX);
        self.rate_limits().check_user_rest(caller.user.as_str(), ops).await.map_err(|wait| {
            self.metrics().rate_limited(LimitScope::User);
            wait.into()
        })
    }

    /// Room for a request body of `declared` bytes among the bytes in flight, or `503 busy`.
    pub(super) fn hold_body(&self, declared: Option<u64>) -> Result<Held, ApiError> {
        self.inner.bodies.hold(declared).inspect_err(|_| self.metrics().body_refused_busy())
    }

    /// A body that did not arrive in time counts against its client's address, whatever its
    /// token: the address held the connection. The answer is `408` all the same, even when the
    /// address has nothing left to count against.
    pub(super) fn body_timed_out(&self, ip: IpAddr) {
        self.metrics().body_timed_out();
        let _ = self.rate_limits().check_address(ip);
    }

    /// A request refused before its token was read still counts against its address.
    pub(super) fn refuse_unauthenticated(&self, ip: IpAddr, error: ApiError) -> ApiError {
        match self.check_address(ip) {
            Ok(()) => error,
            Err(wait) => wait,
        }
    }

    /// Charges a verified user's rate limit: one request per op.
    async fn check_user(&self, user: &str, ops: usize) -> Result<(), ApiError> {
        let ops = u32::try_from(ops).unwrap_or(u32::MAX);
        self.rate_limits().check_user_ops(user, ops).await.map_err(|wait| {
            self.metrics().rate_limited(LimitScope::User);
            wait.into()
        })
    }

    /// Charges the rate limit of an address whose request carries no valid token.
    pub(super) fn check_address(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.rate_limits().check_address(ip).map_err(|wait| {
            self.metrics().rate_limited(LimitScope::Address);
            wait.into()
        })
    }

    /// Lets in the metrics token from anywhere, and local callers (on loopback, through no
    /// proxy) unless the configuration says otherwise. Failed attempts count against the
    /// client's rate limit.
    pub(super) fn admit_admin(&self, headers: &HeaderMap, client: ClientAddr) -> Result<(), ApiError> {
        let presented = bearer(headers);
        let expected = self.metrics_token();
        if let (Some(presented), Some(expected)) = (presented, expected)
            && bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
        {
            return Ok(());
        }
        if presented.is_none() && self.config().metrics.allow_loopback && client.is_local() {
            return Ok(());
        }
        self.check_address(client.ip())?;
        Err(match presented {
            Some(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", "that is not the metrics token")
            }
            None => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "metrics are for the hub's operator: send the metrics token as Authorization: Bearer",
            ),
        })
    }
}

/// One reader of a site's change feed, counted until dropped ([`App::feed_reader`]).
pub struct FeedReader {
    app: App,
    site: SiteId,
}

impl Drop for FeedReader {
    fn drop(&mut self) {
        let mut readers = self.app.inner.feed_readers.lock().expect("the feed's readers");
        if let Some(count) = readers.get_mut(&self.site) {
            *count -= 1;
            if *count == 0 {
                readers.remove(&self.site);
            }
        }
    }
}
