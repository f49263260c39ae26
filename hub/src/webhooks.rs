//! Signed webhooks: each site with a `webhook_url` is told of every change of its subscribed
//! data types that its own backend did not make, by a POST signed as the Standard Webhooks
//! specification says (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
//!
//! What waits to be sent lives in the store, not here: a site's queue holds the newest
//! undelivered version of each of its users' records ([`Store::webhook_transfer`] moves the
//! feed's changes into it), so a notification survives a restart, a newer change replaces an
//! older one not yet delivered, and instances sharing a store take each notification under a
//! lease, so that one of them sends it. This module runs one task per site that moves its
//! share of the feed into its queue, takes what is due, sends it and settles it: delivered on
//! a 2xx answer, retried with backoff otherwise, given up once it waited longer than
//! `[webhooks] retry_for_secs`. A site that is slow or down delays only its own task.
//!
//! Decides nothing about what a site may see: the store queues only changes of the types the
//! site subscribed to and not made by its own backend.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{Hmac, Mac};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use protocol::{DataType, SiteId, UserId};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{Config, Site, WebhooksConfig};
use crate::store::{INLINE_DATA_BYTES, Pending, Record, Settle, Settled, Store, StoreError};
use crate::time::{now_ms, rfc3339_ms};

/// The prefix of a secret as the Standard Webhooks specification writes it.
const SECRET_PREFIX: &str = "whsec_";
/// The bytes a secret holds, at least and at most: 24 is what the specification's libraries
/// make; fewer would be guessable sooner.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 24..=64;
/// Changes one transfer reads from the feed at most; a site far behind takes several.
const TRANSFER_BATCH: usize = 1000;
/// How long a task waits at most before it looks at its queue again: the retries that came
/// due, and changes the broker did not tell of (`[events] enabled = false`).
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How long a notification stays leased beyond its request's timeout: an instance that died
/// while sending it leaves it to another instance after that.
const LEASE_MARGIN_MS: i64 = 30_000;
/// How often the queues' sizes and ages are read for `/metrics` and the dashboard.
const STATS_EVERY: Duration = Duration::from_secs(2);

/// The base64 of secrets: the standard alphabet, with or without its padding.
const SECRET_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A site's webhook secret: the bytes its signatures are keyed with. Its `Debug` shows none.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(hidden)")
    }
}

impl Secret {
    /// A secret as the Standard Webhooks specification writes it: `whsec_` and the base64 of
    /// 24 to 64 random bytes.
    pub fn parse(text: &str) -> Result<Secret, String> {
        let make = "make one with `echo whsec_$(openssl rand -base64 32)`";
        let Some(encoded) = text.trim().strip_prefix(SECRET_PREFIX) else {
            return Err(format!("it does not start with {SECRET_PREFIX}; {make}"));
        };
        let bytes = SECRET_BASE64
            .decode(encoded)
            .map_err(|_| format!("what follows {SECRET_PREFIX} is not base64; {make}"))?;
        if !SECRET_BYTES.contains(&bytes.len()) {
            return Err(format!(
                "it holds {} bytes, where a secret holds {} to {}; {make}",
                bytes.len(),
                SECRET_BYTES.start(),
                SECRET_BYTES.end()
            ));
        }
        Ok(Secret(bytes))
    }

    /// The site's secret, from the variable its `webhook_secret_env` names.
    fn of(site: &Site) -> anyhow::Result<Secret> {
        let var = site.webhook_secret_env.as_deref().context("a webhook_url needs webhook_secret_env")?;
        let text = std::env::var(var).map_err(|_| {
            anyhow::anyhow!(
                "webhook_secret_env names {var}, which is not set; set it in the hub's environment (under \
                 systemd, a line {var}=whsec_… in the unit's EnvironmentFile)"
            )
        })?;
        Secret::parse(&text).map_err(|why| anyhow::anyhow!("the webhook secret in {var} is unusable: {why}"))
    }

    /// The `webhook-signature` header's value for a notification: `v1,` and the base64 of the
    /// HMAC-SHA256 of `{id}.{timestamp}.{body}`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// A notification's `webhook-id`: the same for every attempt to send one version of one
/// record, and different across databases (epochs), so that a receiver can drop a duplicate.
pub fn webhook_id(epoch: &str, data_type: DataType, version: u64, user: &UserId) -> String {
    format!("{epoch}.{data_type}.{version}.{user}")
}

/// A notification's body, as the receiver reads it.
#[derive(Debug, Serialize)]
struct Notification<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    epoch: &'a str,
    user_id: &'a str,
    data_type: DataType,
    version: u64,
    last_updated: String,
    /// The record's data, when its JSON is at most [`INLINE_DATA_BYTES`] long; a larger one
    /// is read through the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a serde_json::Value>,
}

/// The body telling of `record`, the version of `user`'s `data_type` to notify.
pub fn notification(epoch: &str, user: &UserId, data_type: DataType, record: &Record) -> String {
    let small = serde_json::to_string(&record.data).is_ok_and(|json| json.len() <= INLINE_DATA_BYTES);
    serde_json::to_string(&Notification {
        kind: "record.changed",
        epoch,
        user_id: user.as_str(),
        data_type,
        version: record.version,
        last_updated: record.updated_ms.map(rfc3339_ms).unwrap_or_default(),
        data: small.then_some(&record.data),
    })
    .expect("a notification serializes")
}

/// How long after its `attempts`-th failure (counting from 0) a notification is tried again,
/// in milliseconds: `first_retry_ms` doubled per earlier failure up to `max_retry_ms`, times
/// `jitter` (0.5 to 1), so that the notifications that failed together do not all come back
/// together.
pub fn retry_delay_ms(config: &WebhooksConfig, attempts: u32, jitter: f64) -> i64 {
    let doubled = config.first_retry_ms.saturating_mul(1u64.checked_shl(attempts).unwrap_or(u64::MAX));
    let delay = doubled.min(config.max_retry_ms) as f64 * jitter.clamp(0.5, 1.0);
    (delay as i64).max(1)
}

/// What `hub check` says of the sites' webhooks, when any site has one.
pub fn describe(config: &Config) -> Option<Result<String, String>> {
    let sites: Vec<&Site> = config.sites.iter().filter(|s| s.webhook_url.is_some()).collect();
    if sites.is_empty() {
        return None;
    }
    Some(Webhooks::from_config(config).map_err(|e| format!("{e:#}")).map(|_| {
        let names: Vec<&str> = sites.iter().map(|s| s.id.as_str()).collect();
        format!("{} site(s) with a webhook ({}), each secret usable", sites.len(), names.join(", "))
    }))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabel {
    site: String,
}

/// What `/metrics` shows of the webhooks, one series per site with one.
#[derive(Debug, Clone, Default)]
struct Families {
    queued: Family<SiteLabel, Gauge>,
    delivered: Family<SiteLabel, Counter>,
    failed: Family<SiteLabel, Counter>,
    dropped: Family<SiteLabel, Counter>,
    oldest_pending: Family<SiteLabel, Gauge>,
}

/// One site's series.
#[derive(Debug, Clone)]
struct SiteMetrics {
    queued: Gauge,
    delivered: Counter,
    failed: Counter,
    dropped: Counter,
    oldest_pending: Gauge,
}

impl Families {
    fn of(&self, site: &str) -> SiteMetrics {
        let label = SiteLabel { site: site.to_owned() };
        // One at a time: a family is locked while a series it returned is borrowed.
        let queued = self.queued.get_or_create(&label).clone();
        let delivered = self.delivered.get_or_create(&label).clone();
        let failed = self.failed.get_or_create(&label).clone();
        let dropped = self.dropped.get_or_create(&label).clone();
        let oldest_pending = self.oldest_pending.get_or_create(&label).clone();
        SiteMetrics { queued, delivered, failed, dropped, oldest_pending }
    }
}

/// How a site's deliveries go lately, for the logs and the dashboard.
#[derive(Debug, Clone, Default)]
struct Health {
    /// The site's last attempt failed: it is sent one notification at a time until one is
    /// delivered.
    failing: bool,
    /// Why the last failed attempt failed.
    last_failure: Option<String>,
}

/// One site's webhook, as configured.
#[derive(Debug)]
struct Target {
    site: SiteId,
    url: reqwest::Url,
    secret: Secret,
    types: Vec<DataType>,
    metrics: SiteMetrics,
    health: Mutex<Health>,
}

/// The sites' webhooks, read from the configuration at start. Clones share them.
#[derive(Debug, Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: WebhooksConfig,
    /// `None` when no site has a webhook.
    client: Option<reqwest::Client>,
    targets: Vec<Arc<Target>>,
    families: Families,
}

/// One site's webhook as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookView {
    pub site: String,
    /// Where its notifications go: the URL's scheme, host and port only.
    pub receiver: String,
    pub queued: i64,
    /// How long the longest-waiting notification has waited, in seconds.
    pub oldest_pending_secs: i64,
    pub delivered: u64,
    /// Failed attempts, each retried or given up.
    pub failed: u64,
    /// Notifications given up after `retry_for_secs`.
    pub dropped: u64,
    pub failing: bool,
    pub last_failure: Option<String>,
}

impl Webhooks {
    /// The webhooks of `config`'s sites: each secret read from its variable and checked, and
    /// the client that sends them, trusting the system's authorities and `[webhooks]
    /// ca_file`'s. Redirects are not followed: a receiver answers where it is configured.
    pub fn from_config(config: &Config) -> anyhow::Result<Webhooks> {
        let families = Families::default();
        let mut targets = Vec::new();
        for site in config.sites.iter().filter(|s| s.webhook_url.is_some()) {
            let (url, secret, types) = (|| {
                let url = site.webhook_url.as_deref().unwrap_or_default();
                let url =
                    reqwest::Url::parse(url).with_context(|| format!("webhook_url {url:?} is not a URL"))?;
                anyhow::Ok((url, Secret::of(site)?, site.webhook_types()?))
            })()
            .with_context(|| format!("site {}", site.id))?;
            targets.push(Arc::new(Target {
                site: SiteId::parse(&site.id)
                    .map_err(|e| anyhow::anyhow!("site {:?}: {}", site.id, e.message))?,
                url,
                secret,
                types,
                metrics: families.of(&site.id),
                health: Mutex::new(Health::default()),
            }));
        }
        let client = if targets.is_empty() { None } else { Some(client(&config.webhooks)?) };
        Ok(Webhooks { inner: Arc::new(Inner { config: config.webhooks.clone(), client, targets, families }) })
    }

    /// Adds the webhooks' series to `/metrics`, under the hub's prefix.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let families = &self.inner.families;
        registry.register(
            "webhooks_queued",
            "Notifications waiting to be delivered, by site",
            families.queued.clone(),
        );
        registry.register(
            "webhooks_delivered",
            "Notifications the site's receiver acknowledged (2xx), by site",
            families.delivered.clone(),
        );
        registry.register(
            "webhooks_failed",
            "Attempts that failed (an answer other than 2xx, a timeout, no connection), each retried or given up, by site",
            families.failed.clone(),
        );
        registry.register(
            "webhooks_dropped",
            "Notifications given up after failing for webhooks.retry_for_secs, by site",
            families.dropped.clone(),
        );
        registry.register(
            "webhooks_oldest_pending_seconds",
            "How long the longest-waiting notification has waited, by site",
            families.oldest_pending.clone(),
        );
    }

    /// Each site's webhook, for the dashboard.
    pub fn views(&self) -> Vec<WebhookView> {
        self.inner
            .targets
            .iter()
            .map(|target| {
                let health = target.health.lock().expect("webhook health").clone();
                let metrics = &target.metrics;
                WebhookView {
                    site: target.site.to_string(),
                    receiver: target.url.origin().ascii_serialization(),
                    queued: metrics.queued.get(),
                    oldest_pending_secs: metrics.oldest_pending.get(),
                    delivered: metrics.delivered.get(),
                    failed: metrics.failed.get(),
                    dropped: metrics.dropped.get(),
                    failing: health.failing,
                    last_failure: health.last_failure,
                }
            })
            .collect()
    }

    /// Starts delivering: starts each site's cursor at the feed's end if it has none (so that
    /// every change accepted from now on is notified), then runs one task per site, woken by
    /// `committed` (the broker's count of dispatched changes) and at least every second.
    ///
    /// The queue and cursor of a site whose webhook was removed are kept: another instance
    /// sharing the store may still deliver them (a rollout of a new configuration), and a
    /// webhook added again is told of every record changed meanwhile, once each.
    pub async fn start(&self, store: Arc<dyn Store>, committed: watch::Receiver<u64>) -> Dispatcher {
        let (stopping, stop) = watch::channel(false);
        let mut tasks = Vec::new();
        let Some(client) = self.inner.client.clone() else { return Dispatcher { stopping, tasks } };
        let epoch: Arc<str> = Arc::from(store.epoch());
        for target in &self.inner.targets {
            let courier = Courier {
                target: target.clone(),
                config: self.inner.config.clone(),
                client: client.clone(),
                store: store.clone(),
                epoch: epoch.clone(),
            };
            if let Err(e) = courier.transfer().await {
                tracing::warn!(site = %target.site, error = %e, "webhook: the feed could not be read");
            }
            tasks.push(tokio::spawn(courier.run(committed.clone(), stop.clone())));
        }
        tasks.push(tokio::spawn(self.clone().watch_queues(store, stop)));
        Dispatcher { stopping, tasks }
    }

    /// Reads the queues' sizes and ages into the gauges every [`STATS_EVERY`], until `stop`.
    async fn watch_queues(self, store: Arc<dyn Store>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(STATS_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let stats = match store.webhook_stats().await {
                Ok(stats) => stats,
                Err(e) => {
                    tracing::debug!(error = %e, "webhook queues could not be read");
                    continue;
                }
            };
            let now = now_ms();
            for target in &self.inner.targets {
                let queue = stats.iter().find(|s| s.site == target.site);
                let queued = queue.map_or(0, |q| q.queued);
                let oldest = queue.and_then(|q| q.oldest_queued_ms).map_or(0, |ms| (now - ms).max(0) / 1000);
                target.metrics.queued.set(i64::try_from(queued).unwrap_or(i64::MAX));
                target.metrics.oldest_pending.set(oldest);
            }
        }
    }
}

/// The deepest cause of `error`: what failed below the HTTP client (`Connection refused`, a
/// name that does not resolve, a certificate refused).
fn innermost(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// The client webhooks are sent with.
fn client(config: &WebhooksConfig) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(config.timeout_secs))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("unified-sync-hub/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read webhooks.ca_file {}", path.display()))?;
        let authorities = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("webhooks.ca_file {} is not PEM", path.display()))?;
        if authorities.is_empty() {
            bail!("webhooks.ca_file {} holds no CERTIFICATE block", path.display());
        }
        for authority in authorities {
            builder = builder.add_root_certificate(authority);
        }
    }
    builder.build().context("cannot set up HTTPS for webhooks (the system's trust store, webhooks.ca_file)")
}

/// The running webhook tasks. Dropping it leaves them running; [`Dispatcher::stop`] ends them.
#[derive(Debug)]
pub struct Dispatcher {
    stopping: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Dispatcher {
    /// Ends every task: a delivery under way is cut off and left due at once (it is sent again
    /// after a restart, or by another instance), and the store has heard of every delivery
    /// that finished.
    pub async fn stop(self) {
        self.stopping.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// What a pass over a site's queue left to do.
enum Pass {
    /// It took as many notifications as it may: more may be due.
    Full,
    /// Nothing more is due before `until`.
    Idle { until: tokio::time::Instant },
    /// The hub is stopping.
    Stopped,
}

/// One site's deliveries.
#[derive(Clone)]
struct Courier {
    target: Arc<Target>,
    config: WebhooksConfig,
    client: reqwest::Client,
    store: Arc<dyn Store>,
    epoch: Arc<str>,
}

impl Courier {
    /// Queues the site's share of the feed up to its end.
    async fn transfer(&self) -> Result<(), StoreError> {
        let target = &self.target;
        while self.store.webhook_transfer(&target.site, &target.types, now_ms(), TRANSFER_BATCH).await?
            == TRANSFER_BATCH
        {}
        Ok(())
    }

    fn failing(&self) -> bool {
        self.target.health.lock().expect("webhook health").failing
    }

    /// Delivers until `stop`: a pass, then a wait for a change or for the next due retry (a
    /// second at most). While the site fails, only the timer wakes the task, so that a busy
    /// hub does not send a down site a probe per change.
    async fn run(self, mut committed: watch::Receiver<u64>, mut stop: watch::Receiver<bool>) {
        loop {
            let until = match self.pass(&mut stop).await {
                Ok(Pass::Full) => continue,
                Ok(Pass::Stopped) => return,
                Ok(Pass::Idle { until }) => until,
                Err(e) => {
                    tracing::warn!(site = %self.target.site, error = %e, "webhook: the queue could not be read");
                    tokio::time::Instant::now() + IDLE_WAIT
                }
            };
            let failing = self.failing();
            let changed = async {
                if failing || committed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(until) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Moves the feed into the queue, takes what is due (one notification while the site
    /// fails), sends it all at once and settles each.
    async fn pass(&self, stop: &mut watch::Receiver<bool>) -> Result<Pass, StoreError> {
        let target = &self.target;
        self.transfer().await?;
        let limit = if self.failing() { 1 } else { self.config.in_flight };
        let lease_ms = i64::try_from(self.config.timeout_secs * 1000).unwrap_or(i64::MAX) + LEASE_MARGIN_MS;
        let claimed = self.store.webhook_claim(&target.site, now_ms(), lease_ms, limit).await?;
        let mut sends = JoinSet::new();
        for (i, pending) in claimed.iter().cloned().enumerate() {
            let courier = self.clone();
            sends.spawn(async move { (i, courier.send(&pending).await) });
        }
        let mut outcomes: Vec<Option<Settle>> = vec![None; claimed.len()];
        let stopped = loop {
            tokio::select! {
                joined = sends.join_next() => match joined {
                    Some(Ok((i, settle))) => outcomes[i] = Some(settle),
                    Some(Err(e)) => tracing::error!(site = %target.site, error = %e, "webhook: a delivery panicked"),
                    None => break false,
                },
                _ = stop.changed() => {
                    sends.abort_all();
                    break true;
                }
            }
        };
        let now = now_ms();
        let settled: Vec<Settled> = claimed
            .iter()
            .zip(outcomes)
            .map(|(pending, settle)| Settled {
                user: pending.user.clone(),
                data_type: pending.data_type,
                version: pending.version,
                // Cut off by the stop, or lost to a panic: due again at once.
                settle: settle.unwrap_or(Settle::Retry { at_ms: now }),
            })
            .collect();
        if !settled.is_empty() {
            self.store.webhook_settle(&target.site, now, &settled).await?;
        }
        if stopped {
            return Ok(Pass::Stopped);
        }
        if !claimed.is_empty() && claimed.len() == limit && !self.failing() {
            return Ok(Pass::Full);
        }
        let next_retry = settled
            .iter()
            .filter_map(|s| match s.settle {
                Settle::Retry { at_ms } => Some(at_ms),
                Settle::Delivered | Settle::Dropped => None,
            })
            .min()
            .map(|at_ms| Duration::from_millis(u64::try_from(at_ms - now).unwrap_or(0)));
        let wait = next_retry.map_or(IDLE_WAIT, |retry| retry.min(IDLE_WAIT));
        Ok(Pass::Idle { until: tokio::time::Instant::now() + wait })
    }

    /// Sends one notification, if its record still stands at its version, and says how it
    /// ended.
    async fn send(&self, pending: &Pending) -> Settle {
        let target = &self.target;
        // Queued before the site's `webhook_data_types` left its type out.
        if !target.types.contains(&pending.data_type) {
            return Settle::Dropped;
        }
        let record = match self.store.records(&pending.user, &[pending.data_type]).await {
            Ok(mut records) => records.pop(),
            Err(e) => {
                tracing::warn!(site = %target.site, error = %e, "webhook: a record could not be read");
                return Settle::Retry { at_ms: now_ms() + IDLE_WAIT.as_millis() as i64 };
            }
        };
        // A newer version is on its way through the feed, or was made by the site's own
        // backend: either way, this one is not worth telling.
        let Some(record) = record.filter(|r| r.version == pending.version) else { return Settle::Dropped };
        let body = notification(&self.epoch, &pending.user, pending.data_type, &record);
        let id = webhook_id(&self.epoch, pending.data_type, pending.version, &pending.user);
        let timestamp = now_ms().div_euclid(1000);
        let signature = target.secret.sign(&id, timestamp, body.as_bytes());
        let sent = self
            .client
            .post(target.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let why = match sent {
            Ok(answer) if answer.status().is_success() => {
                self.delivered();
                return Settle::Delivered;
            }
            Ok(answer) if answer.status().is_redirection() => {
                format!("answered {} (redirects are not followed: configure the final URL)", answer.status())
            }
            Ok(answer) => format!("answered {}", answer.status()),
            Err(e) if e.is_timeout() => format!("no answer within {} s", self.config.timeout_secs),
            Err(e) if e.is_connect() => format!("no connection: {}", innermost(&e)),
            // Without the URL: its path or query may hold a secret of the receiver's, and the
            // reason is shown on the dashboard.
            Err(e) => format!("the request failed: {}", e.without_url()),
        };
        self.failed(pending, why)
    }

    fn delivered(&self) {
        let target = &self.target;
        target.metrics.delivered.inc();
        let mut health = target.health.lock().expect("webhook health");
        if health.failing {
            tracing::info!(site = %target.site, "webhook: the receiver acknowledges again");
        }
        health.failing = false;
    }

    /// Counts a failed attempt, and decides: tried again after a backoff, or given up once its
    /// version has waited `retry_for_secs`.
    fn failed(&self, pending: &Pending, why: String) -> Settle {
        let target = &self.target;
        target.metrics.failed.inc();
        {
            let mut health = target.health.lock().expect("webhook health");
            if !health.failing {
                let receiver = target.url.origin().ascii_serialization();
                tracing::warn!(site = %target.site, %receiver, "webhook: {why}; retrying with backoff");
            }
            health.failing = true;
            health.last_failure = Some(why);
        }
        let now = now_ms();
        let retry_for_ms = i64::try_from(self.config.retry_for_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        if now - pending.queued_ms >= retry_for_ms {
            target.metrics.dropped.inc();
            tracing::warn!(
                site = %target.site,
                user = %pending.user,
                data_type = %pending.data_type,
                version = pending.version,
                "webhook: given up after failing for webhooks.retry_for_secs"
            );
            return Settle::Dropped;
        }
        let jitter = rand::random_range(0.5..=1.0);
        Settle::Retry { at_ms: now + retry_delay_ms(&self.config, pending.attempts, jitter) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_test_vector() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature =
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, br#"{"test": 2432232314}"#);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_are_whsec_and_the_base64_of_24_to_64_bytes() {
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        for n in [24, 32, 64] {
            assert!(Secret::parse(&format!("whsec_{}", b64(n))).is_ok(), "{n} bytes");
        }
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode([7u8; 32]);
        assert!(Secret::parse(&format!("whsec_{unpadded}")).is_ok(), "without its padding");
        for (text, says) in [
            (b64(32), "does not start with whsec_"),
            ("whsec_not base64!".to_owned(), "is not base64"),
            (format!("whsec_{}", b64(23)), "holds 23 bytes"),
            (format!("whsec_{}", b64(65)), "holds 65 bytes"),
        ] {
            let error = Secret::parse(&text).unwrap_err();
            assert!(error.contains(says) && error.contains("openssl rand"), "{text}: {error}");
        }
        assert_eq!(format!("{:?}", Secret::parse(&format!("whsec_{}", b64(32))).unwrap()), "Secret(hidden)");
    }

    #[test]
    fn retries_double_up_to_the_ceiling_shortened_by_the_jitter() {
        let config =
            WebhooksConfig { first_retry_ms: 5000, max_retry_ms: 3_600_000, ..WebhooksConfig::default() };
        let full: Vec<i64> = (0..12).map(|attempts| retry_delay_ms(&config, attempts, 1.0)).collect();
        assert_eq!(
            full,
            [
                5000, 10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 640_000, 1_280_000, 2_560_000,
                3_600_000, 3_600_000
            ]
        );
        assert_eq!(retry_delay_ms(&config, 0, 0.5), 2500);
        assert_eq!(retry_delay_ms(&config, 3, 0.75), 30_000);
        assert_eq!(retry_delay_ms(&config, 200, 1.0), 3_600_000, "no overflow after many failures");
        assert_eq!(retry_delay_ms(&config, 0, 0.0), 2500, "the jitter shortens by a half at most");
    }

    #[test]
    fn a_webhook_id_names_epoch_type_version_and_user() {
        let user = UserId::parse("42").unwrap();
        assert_eq!(webhook_id("01HX", DataType::Balance, 7, &user), "01HX.balance.7.42");
    }

    #[test]
    fn a_notification_carries_small_data_inline_and_leaves_large_data_out() {
        let user = UserId::parse("42").unwrap();
        let record = Record {
            data: serde_json::json!({ "coins": 120 }),
            version: 7,
            updated_ms: Some(1_762_713_930_123),
        };
        let body = notification("01HX", &user, DataType::Balance, &record);
        assert_eq!(
            body,
            r#"{"type":"record.changed","epoch":"01HX","user_id":"42","data_type":"balance","version":7,"last_updated":"2025-11-09T18:45:30.123Z","data":{"coins":120}}"#
        );
        let large = Record { data: serde_json::json!({ "bio": "x".repeat(INLINE_DATA_BYTES) }), ..record };
        let body: serde_json::Value =
            serde_json::from_str(&notification("01HX", &user, DataType::Profile, &large)).unwrap();
        assert_eq!(body["version"], 7);
        assert_eq!(body["data_type"], "profile");
        assert!(body.get("data").is_none(), "{body}");
    }
}
