//! The hub's configuration: a TOML file, overridden by `HUB_*` environment variables, then
//! by command-line flags. Checks every value at load time so a bad config stops the start,
//! never a request.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Everything the hub needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The hub's name in tokens: their `aud` must equal it.
    pub hub_id: String,
    pub listen: SocketAddr,
    /// Where the database (and, in development, the generated site keys) live.
    pub data_dir: PathBuf,
    /// Switching auth off is only allowed on a loopback address, for development.
    pub auth: bool,
    /// The certificate chain (PEM) to serve HTTPS with, or `None` for plain HTTP. Set with
    /// `tls_key`, or not at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// The reverse proxies in front of the hub. Only a request whose connection comes from
    /// one of them is believed about the client it forwards (`Forwarded`, `X-Forwarded-For`,
    /// `X-Forwarded-Proto`); empty, no peer is, not even loopback.
    pub trusted_proxies: TrustedProxies,
    /// Seconds the hub goes on serving after SIGTERM, with `/healthz` answering 503, so that
    /// a load balancer moves its traffic to another instance before connections are refused.
    /// 0 stops at once: a hub alone behind its proxy has no one to hand its traffic to. At
    /// most [`MAX_DRAIN_SECS`].
    pub drain_secs: u64,
    pub limits: Limits,
    pub store: StoreConfig,
    pub metrics: MetricsConfig,
    pub access_log: AccessLogConfig,
    pub events: EventsConfig,
    pub webhooks: WebhooksConfig,
    pub sites: Vec<Site>,
}

/// The network the per-address limits count a client by: its IPv4 address (one written as
/// IPv6, `::ffff:a.b.c.d`, as that IPv4 address), or the /64 of its IPv6 address, the block
/// one subscriber usually holds.
pub fn client_network(ip: IpAddr) -> IpNet {
    match ip.to_canonical() {
        IpAddr::V4(ip) => IpNet::V4(ipnet::Ipv4Net::from(ip)),
        IpAddr::V6(ip) => IpNet::V6(ipnet::Ipv6Net::new_assert(ip, 64).trunc()),
    }
}

/// Addresses (`127.0.0.1`, `::1`) and networks (`10.0.0.0/8`, `fd00::/8`) of reverse proxies,
/// written as text in the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Whether `ip` is one of the proxies (an IPv4 address written as IPv6, `::ffff:a.b.c.d`,
    /// is the IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<Vec<String>> for TrustedProxies {
    type Error = String;

    fn try_from(entries: Vec<String>) -> Result<Self, String> {
        entries
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        format!("trusted_proxies: {entry:?} is neither an IP address nor a network (CIDR)")
                    })
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

impl From<TrustedProxies> for Vec<String> {
    fn from(proxies: TrustedProxies) -> Self {
        proxies
            .0
            .iter()
            .map(|net| {
                if net.prefix_len() == net.max_prefix_len() {
                    net.addr().to_string()
                } else {
                    net.to_string()
                }
            })
            .collect()
    }
}

/// Who may read `/metrics` and the dashboard's data: they show every site's traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Callers on a loopback address need no token (true): a Prometheus on the same
    /// machine, an SSH tunnel. Turn it off when a reverse proxy on the same machine forwards
    /// the public's requests, which then all come from loopback.
    pub allow_loopback: bool,
    /// A bearer token that lets a caller from any address in (at least 16 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Name of an environment variable holding that token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { allow_loopback: true, token: None, token_env: None }
    }
}

/// The realtime event streams (`GET /api/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Off, `/api/events` answers 404 and pages check for changes as they did before.
    pub enabled: bool,
    /// Streams one user may hold on one hub instance: a stream per site the user has open.
    pub max_streams_per_user: usize,
    /// Streams one client address (an IPv4 address or an IPv6 /64) may hold on one instance.
    pub max_streams_per_address: usize,
    /// Seconds between two heartbeats of an idle stream: shorter than any proxy's read
    /// timeout (nginx: 60 s) and than the connections' idle timeout.
    pub heartbeat_secs: u64,
    /// How long a client waits before reconnecting a stream that ended, in milliseconds.
    pub retry_ms: u64,
    /// Changes kept in memory, across every user, for streams that reconnect: one older than
    /// them gets `resync` (one timestamp check) instead of what it missed.
    pub resume_window: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            enabled: true,
            max_streams_per_user: 8,
            max_streams_per_address: 64,
            heartbeat_secs: 15,
            retry_ms: 3000,
            resume_window: 65_536,
        }
    }
}

impl EventsConfig {
    pub fn heartbeat(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.heartbeat_secs)
    }
}

/// How the hub sends the sites' webhooks (`[[sites]] webhook_url`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// How long one delivery may take, answer included.
    pub timeout_secs: u64,
    /// How long a notification is retried before it is given up: keep it at least a day, so
    /// that a site's outage over a night loses nothing.
    pub retry_for_secs: u64,
    /// The wait before the first retry, in milliseconds; doubled after each failure…
    pub first_retry_ms: u64,
    /// …up to this (each wait is then shortened by a random part of up to a half).
    pub max_retry_ms: u64,
    /// Deliveries under way at once, per site.
    pub in_flight: usize,
    /// More certificate authorities (PEM) to trust for `https://` webhooks, beside the
    /// system's: a receiver whose certificate a private authority signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            timeout_secs: 10,
            retry_for_secs: 3 * 24 * 3600,
            first_retry_ms: 5000,
            max_retry_ms: 3_600_000,
            in_flight: 8,
            ca_file: None,
        }
    }
}

/// Longest `webhooks.timeout_secs`: a receiver is to acknowledge at once and work after.
const MAX_WEBHOOK_TIMEOUT_SECS: u64 = 60;
/// Most `webhooks.in_flight`: deliveries to one site at once.
const MAX_WEBHOOKS_IN_FLIGHT: usize = 64;
/// Shortest `webhooks.retry_for_secs`.
const MIN_WEBHOOK_RETRY_FOR_SECS: u64 = 60;

impl WebhooksConfig {
    /// Refuses numbers that would stop deliveries or flood a receiver.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=MAX_WEBHOOK_TIMEOUT_SECS).contains(&self.timeout_secs) {
            bail!("webhooks.timeout_secs must be from 1 to {MAX_WEBHOOK_TIMEOUT_SECS}");
        }
        if !(1..=MAX_WEBHOOKS_IN_FLIGHT).contains(&self.in_flight) {
            bail!("webhooks.in_flight must be from 1 to {MAX_WEBHOOKS_IN_FLIGHT}");
        }
        if self.first_retry_ms == 0 || self.first_retry_ms > self.max_retry_ms {
            bail!("webhooks.first_retry_ms must be at least 1 and at most webhooks.max_retry_ms");
        }
        if self.retry_for_secs < MIN_WEBHOOK_RETRY_FOR_SECS {
            bail!(
                "webhooks.retry_for_secs must be at least {MIN_WEBHOOK_RETRY_FOR_SECS} (keep it a day or more, \
                 86400, so that a receiver's night-long outage loses nothing)"
            );
        }
        Ok(())
    }
}

/// Longest `events.heartbeat_secs`: `SyncManager` takes a stream that sent nothing for 45 s as
/// broken, and reconnects.
const MAX_HEARTBEAT_SECS: u64 = 30;

/// Shortest metrics token accepted.
const MIN_METRICS_TOKEN: usize = 16;

impl MetricsConfig {
    /// The bearer token, from `token` or the variable `token_env` names.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        let token = match (&self.token, &self.token_env) {
            (Some(_), Some(_)) => bail!("metrics: set token or token_env, not both"),
            (Some(token), None) => token.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                anyhow::anyhow!(
                    "metrics.token_env names {var}, which is not set; set it in the hub's environment \
                     (under systemd, a line {var}=… in the unit's EnvironmentFile), or remove token_env"
                )
            })?,
            (None, None) => return Ok(None),
        };
        if token.len() < MIN_METRICS_TOKEN {
            bail!(
                "the metrics token must be at least {MIN_METRICS_TOKEN} characters; make one with \
                 `openssl rand -base64 24`"
            );
        }
        Ok(Some(token))
    }
}

/// The access log: one line per answered request, for the operator (off by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Write it. Without it, `path` is ignored.
    pub enabled: bool,
    /// The file it is appended to, created (mode 0640) if missing and reopened on SIGHUP so
    /// that logrotate can move it away; `None` writes it to stderr, beside the hub's own log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// Where the records are kept: which backend, and how it writes. Its `Debug` shows no
/// database URL, which may hold a password.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `"sqlite"` (the default): one file in the data dir, served by one hub process.
    /// `"postgres"`: a PostgreSQL database that several hub instances share.
    pub backend: Backend,
    /// Gather the writes that arrive together into one transaction and one fsync (the
    /// default). `false` commits and fsyncs each write on its own: every write is just as
    /// durable, but the disk's fsync rate caps the hub's write rate. It exists to measure
    /// what group commit buys (`cargo xtask bench`).
    pub group_commit: bool,
    /// SQLite: op ids the op log holds at most. The hub finds them through an index in
    /// memory, about 20 bytes each (18 MiB when the default is full), and a new one costs an
    /// append to the log. While the log is full, new op ids go to a table by user, where each
    /// costs about one more page written, until old ones expire (`limits.op_retention_days`).
    pub op_ids_in_memory: usize,
    /// PostgreSQL: the database's URL, `postgres://user:password@host:port/database`. Prefer
    /// `url_env`, which keeps the password out of the settings file. Never logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// PostgreSQL: the name of an environment variable holding the URL (read at start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// PostgreSQL: certificate authorities (PEM) to trust for the database's certificate,
    /// beside the system's: for a server whose certificate a private authority signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL: connections this instance opens at most, its two writers' included. Every
    /// instance opens its own: the database's `max_connections` must hold all of them.
    pub pool: usize,
    /// PostgreSQL: how long one statement may take before the database cancels it, in
    /// milliseconds; the request then fails with `503` and may be retried.
    pub statement_timeout_ms: u64,
}

/// The stores the hub can keep its records in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sqlite,
    Postgres,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Sqlite,
            group_commit: true,
            op_ids_in_memory: 900_000,
            url: None,
            url_env: None,
            ca_file: None,
            pool: 16,
            statement_timeout_ms: 5_000,
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("group_commit", &self.group_commit)
            .field("op_ids_in_memory", &self.op_ids_in_memory)
            .field("url", &self.url.as_ref().map(|_| "(hidden)"))
            .field("url_env", &self.url_env)
            .field("ca_file", &self.ca_file)
            .field("pool", &self.pool)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .finish()
    }
}

impl StoreConfig {
    /// Refuses settings that do not name one database, or that belong to another backend.
    pub fn validate(&self) -> anyhow::Result<()> {
        match self.backend {
            Backend::Sqlite => {
                if self.url.is_some() || self.url_env.is_some() {
                    bail!(
                        "store.url and store.url_env are for backend = \"postgres\"; SQLite lives in the data dir"
                    );
                }
            }
            Backend::Postgres => {
                if self.url.is_some() == self.url_env.is_some() {
                    bail!("backend = \"postgres\" needs exactly one of store.url and store.url_env");
                }
                if let Some(var) = self.url_env.as_deref().filter(|var| var.starts_with("HUB_")) {
                    bail!(
                        "store.url_env names {var}, but variables starting with HUB_ are read as the hub's own \
                         settings; name another (UNIFIED_SYNC_DATABASE_URL, say), or set HUB_STORE__URL instead"
                    );
                }
                if self.pool < 3 {
                    bail!("store.pool must be at least 3: two connections write, the others read");
                }
                if self.statement_timeout_ms == 0 {
                    bail!("store.statement_timeout_ms must be at least 1");
                }
            }
        }
        Ok(())
    }

    /// The PostgreSQL URL, from the settings or from the environment variable they name.
    pub fn postgres_url(&self) -> anyhow::Result<String> {
        match (&self.url, &self.url_env) {
            (Some(url), _) => Ok(url.clone()),
            (None, Some(var)) => std::env::var(var)
                .map_err(|_| anyhow::anyhow!("store.url_env names {var}, which is not set (or not UTF-8)")),
            (None, None) => bail!("backend = \"postgres\" needs store.url or store.url_env"),
        }
    }
}

/// Limits that protect the hub and its users; every one has a safe default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests one user may make per minute, summed over all sites.
    pub requests_per_minute: u32,
    /// Requests without a valid token one IP address may make per minute.
    pub unauthenticated_requests_per_minute: u32,
    /// Largest |amount| a single delta may carry.
    pub max_delta: i64,
    /// Open connections at most; beyond it the hub stops accepting until one closes.
    pub max_connections: usize,
    /// Open connections one client address may hold (an IPv6 address counts with its whole
    /// /64, which one subscriber is usually given); a connection beyond it is closed as soon
    /// as it is accepted, so that one address cannot take every slot of `max_connections`.
    /// Connections from `trusted_proxies` are not counted: each carries many clients.
    pub max_connections_per_address: usize,
    /// A kept-alive connection (HTTP/1.1 or HTTP/2) without a request in progress for this
    /// long is closed. A request is in progress from its arrival until its answer has been
    /// sent; pings do not count.
    pub idle_timeout_secs: u64,
    /// Requests one HTTP/2 connection may have in progress at once; the client is told, and
    /// a stream beyond it is refused (`REFUSED_STREAM`).
    pub http2_max_concurrent_streams: u32,
    /// Time a client has to send a request's headers.
    pub header_read_timeout_secs: u64,
    /// Time to read the body and answer a request.
    pub request_timeout_secs: u64,
    /// Time a client has to send a request's whole body once its headers are in: at least 64
    /// KiB (the largest body) per this many seconds. A body that stalls or trickles is cut with
    /// `408 body_timeout`, counted against the client's address. Shorter than
    /// `request_timeout_secs`.
    pub body_timeout_secs: u64,
    /// Bytes of request bodies the hub reads at once, over all connections: each body holds
    /// its declared `Content-Length` (64 KiB when it declares none) from before its first byte
    /// is read until it is answered. A body that would go beyond is refused at once with `503
    /// busy` and `Retry-After`, unread, so that memory never grows with the uploads in flight.
    pub max_body_bytes_in_flight: usize,
    /// A body the hub answered without reading (a refusal before it: a token, a limit) is
    /// still read and thrown away, up to this many bytes and within `body_timeout_secs`, so
    /// that a client that sends its whole body before reading the answer (most HTTP/1.1
    /// clients; curl over HTTP/2, which fails a stream reset under its upload) reads the
    /// answer cleanly. A body declared larger is cut at once: its HTTP/2 stream is reset, its
    /// HTTP/1.1 connection closed. 0 cuts every one.
    pub max_discarded_body_bytes: u64,
    /// How long an `op_id` is remembered (at least 7 days).
    pub op_retention_days: u32,
}

/// One site that may talk to the hub: its keys, where its pages live, and what its key may
/// sign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Also the `iss` of the site's tokens.
    pub id: String,
    /// Browser origins allowed by CORS. `http://localhost:*` allows any port.
    #[serde(default)]
    pub origins: Vec<String>,
    /// HS256 secret, at least 32 bytes. With `secret_env` or `public_key_pem`, the site's key
    /// without a `kid`: it verifies tokens whose header names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Name of an environment variable holding the HS256 secret (read at start only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// A file holding the HS256 secret, reread on every SIGHUP: a new key can be added
    /// without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Ed25519 public key (PEM): the site signs its tokens with EdDSA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// Ed25519 private key (PEM), only so that `hub token` can mint tokens for this site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    /// More keys, each named by the `kid` its tokens carry in their header, so that a key is
    /// rotated without a gap (add the new one, move the backend to it, remove the old) and a
    /// leaked one is revoked by removing it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<SiteKey>,
    /// The scopes this site's key may sign. A token claiming any other is refused, so that a
    /// leaked key of a small site cannot do what it was never given.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Whether the site's key may sign admin tokens (`adm: true`, which write
    /// `global_roles` for every user).
    #[serde(default)]
    pub admin: bool,
    /// Longest lifetime of a token (`exp` − `iat`, or `exp` − now without `iat`).
    #[serde(default = "default_max_token_ttl_secs")]
    pub max_token_ttl_secs: u64,
    /// Tokens issued before this instant (RFC 3339) are refused, and so are tokens without
    /// `iat` while it is set: ends every session of the site at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_issued_after: Option<String>,
    /// Largest credit one op may carry: a positive delta, or a set that raises an amount
    /// by this much. Applies to every credit the site's key signs, grants and tokens alike.
    #[serde(default = "default_max_credit_per_op")]
    pub max_credit_per_op: i64,
    /// Most one user may be credited per amount (coins, points) per UTC day by this site's
    /// key, so that even a stolen key cannot mint without bound.
    #[serde(default = "default_max_credits_per_user_per_day")]
    pub max_credits_per_user_per_day: i64,
    /// Where the hub POSTs a signed notification of each change the site did not make itself
    /// (`https://`, or `http://` to a loopback address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// The environment variable holding the site's webhook secret (`whsec_` and base64, as
    /// the Standard Webhooks specification writes it), apart from its token key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_env: Option<String>,
    /// The data types the site's webhook and change feed carry; every type when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_data_types: Option<Vec<String>>,
}

/// One of a site's keys, named by a `kid`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteKey {
    /// What tokens signed with this key name in their header's `kid`.
    pub kid: String,
    /// HS256 secret, at least 32 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Name of an environment variable holding the HS256 secret (read at start only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// A file holding the HS256 secret, reread on every SIGHUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Ed25519 public key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// Ed25519 private key (PEM), only so that the hub can mint with this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
}

/// The key material of one key, whichever way it was configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyMaterial<'a> {
    /// `None` for the site's key without a `kid`.
    pub kid: Option<&'a str>,
    pub secret: Option<&'a str>,
    pub secret_env: Option<&'a str>,
    pub secret_file: Option<&'a Path>,
    pub public_key_pem: Option<&'a str>,
    pub private_key_pem: Option<&'a str>,
}

fn default_scopes() -> Vec<String> {
    protocol::Scopes::SITE_DEFAULT.iter().map(|s| s.as_str().to_owned()).collect()
}

fn default_max_token_ttl_secs() -> u64 {
    3600
}

fn default_max_credit_per_op() -> i64 {
    10_000
}

fn default_max_credits_per_user_per_day() -> i64 {
    100_000
}

impl Site {
    /// A site with no key and every policy at its default; tests and `--dev` fill in the rest.
    pub fn new(id: impl Into<String>) -> Site {
        Site {
            id: id.into(),
            origins: Vec::new(),
            secret: None,
            secret_env: None,
            secret_file: None,
            public_key_pem: None,
            private_key_pem: None,
            keys: Vec::new(),
            scopes: default_scopes(),
            admin: false,
            max_token_ttl_secs: default_max_token_ttl_secs(),
            tokens_issued_after: None,
            max_credit_per_op: default_max_credit_per_op(),
            max_credits_per_user_per_day: default_max_credits_per_user_per_day(),
            webhook_url: None,
            webhook_secret_env: None,
            webhook_data_types: None,
        }
    }

    /// Every key of the site: the one given by the top-level fields (if any), then `keys`.
    pub fn key_materials(&self) -> Vec<KeyMaterial<'_>> {
        let top = KeyMaterial {
            kid: None,
            secret: self.secret.as_deref(),
            secret_env: self.secret_env.as_deref(),
            secret_file: self.secret_file.as_deref(),
            public_key_pem: self.public_key_pem.as_deref(),
            private_key_pem: self.private_key_pem.as_deref(),
        };
        let given = top.secret.is_some()
            || top.secret_env.is_some()
            || top.secret_file.is_some()
            || top.public_key_pem.is_some()
            || top.private_key_pem.is_some();
        let mut materials = Vec::new();
        // A site with no key at all keeps its empty top-level one, which fails to load, saying so.
        if given || self.keys.is_empty() {
            materials.push(top);
        }
        materials.extend(self.keys.iter().map(|k| KeyMaterial {
            kid: Some(k.kid.as_str()),
            secret: k.secret.as_deref(),
            secret_env: k.secret_env.as_deref(),
            secret_file: k.secret_file.as_deref(),
            public_key_pem: k.public_key_pem.as_deref(),
            private_key_pem: k.private_key_pem.as_deref(),
        }));
        materials
    }

    /// The scopes the site's key may sign.
    pub fn signable_scopes(&self) -> anyhow::Result<protocol::Scopes> {
        self.scopes
            .iter()
            .map(|name| {
                protocol::Scope::from_name(name).with_context(|| {
                    format!(
                        "site {}: unknown scope {name:?} in scopes; the scopes are {}",
                        self.id,
                        protocol::Scopes::ALL
                    )
                })
            })
            .collect()
    }

    /// `tokens_issued_after` in seconds since the Unix epoch.
    pub fn tokens_issued_after_secs(&self) -> anyhow::Result<Option<u64>> {
        let Some(text) = &self.tokens_issued_after else { return Ok(None) };
        let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .with_context(|| {
                format!("site {}: tokens_issued_after {text:?} is not an RFC 3339 time", self.id)
            })?;
        Ok(Some(u64::try_from(at.unix_timestamp()).unwrap_or(0)))
    }

    /// The data types the site's webhook and change feed carry: `webhook_data_types`, or every
    /// type when it is absent.
    pub fn webhook_types(&self) -> anyhow::Result<Vec<protocol::DataType>> {
        let Some(names) = &self.webhook_data_types else { return Ok(protocol::DataType::ALL.to_vec()) };
        let mut types = Vec::new();
        for name in names {
            let data_type = protocol::DataType::from_name(name).with_context(|| {
                format!(
                    "site {}: unknown data type {name:?} in webhook_data_types; the types are {}",
                    self.id,
                    protocol::DataType::ALL.map(protocol::DataType::as_str).join(", ")
                )
            })?;
            if !types.contains(&data_type) {
                types.push(data_type);
            }
        }
        if types.is_empty() {
            bail!(
                "site {}: webhook_data_types is empty; name at least one type, or remove it for every type",
                self.id
            );
        }
        Ok(types)
    }

    /// Checks the webhook's settings: where it goes and what it carries. Its secret, read from
    /// the environment, is `check`'s.
    fn validate_webhook(&self) -> anyhow::Result<()> {
        self.webhook_types()?;
        let Some(url) = &self.webhook_url else {
            if self.webhook_secret_env.is_some() {
                bail!(
                    "site {}: webhook_secret_env is set without webhook_url; set both, or neither",
                    self.id
                );
            }
            return Ok(());
        };
        let parsed = reqwest::Url::parse(url)
            .with_context(|| format!("site {}: webhook_url {url:?} is not a URL", self.id))?;
        let host = parsed.host_str().unwrap_or_default();
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match parsed.scheme() {
            "https" if !host.is_empty() => {}
            "http" if loopback => {}
            "http" => bail!(
                "site {}: webhook_url {url:?} is plain http to another machine, where anyone on the way \
                 could read the notifications; use https:// (http:// is for a receiver on this machine: \
                 127.0.0.1, ::1 or localhost)",
                self.id
            ),
            _ => bail!("site {}: webhook_url {url:?} must be an https:// URL", self.id),
        }
        if self.webhook_secret_env.is_none() {
            bail!(
                "site {}: webhook_url needs webhook_secret_env, the environment variable holding the \
                 webhook's secret (whsec_ and base64, the Standard Webhooks form; make one with \
                 `echo whsec_$(openssl rand -base64 32)`)",
                self.id
            );
        }
        Ok(())
    }

    /// Checks the site's policies (its keys are checked when they are loaded).
    fn validate(&self) -> anyhow::Result<()> {
        self.signable_scopes()?;
        self.tokens_issued_after_secs()?;
        self.validate_webhook()?;
        if self.max_token_ttl_secs == 0 {
            bail!("site {}: max_token_ttl_secs must be at least 1", self.id);
        }
        for (name, value) in [
            ("max_credit_per_op", self.max_credit_per_op),
            ("max_credits_per_user_per_day", self.max_credits_per_user_per_day),
        ] {
            if !(1..=protocol::MAX_AMOUNT).contains(&value) {
                bail!("site {}: {name} must be between 1 and {}", self.id, protocol::MAX_AMOUNT);
            }
        }
        let mut kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        kids.sort_unstable();
        if let Some(w) = kids.windows(2).find(|w| w[0] == w[1]) {
            bail!("site {}: two keys have the kid {:?}", self.id, w[0]);
        }
        if let Some(key) = self.keys.iter().find(|k| k.kid.is_empty() || k.kid.len() > 64) {
            bail!("site {}: a kid has 1 to 64 characters, not {:?}", self.id, key.kid);
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hub_id: "unified-sync-hub".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            data_dir: PathBuf::from("./hub-data"),
            auth: true,
            tls_cert: None,
            tls_key: None,
            trusted_proxies: TrustedProxies::default(),
            drain_secs: 0,
            limits: Limits::default(),
            store: StoreConfig::default(),
            metrics: MetricsConfig::default(),
            access_log: AccessLogConfig::default(),
            events: EventsConfig::default(),
            webhooks: WebhooksConfig::default(),
            sites: Vec::new(),
        }
    }
}

impl Limits {
    /// How long an op id is remembered.
    pub fn op_retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.op_retention_days) * 86_400)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            requests_per_minute: 100,
            unauthenticated_requests_per_minute: 60,
            max_delta: 1_000_000_000,
            max_connections: 10_000,
            max_connections_per_address: 256,
            idle_timeout_secs: 60,
            http2_max_concurrent_streams: 32,
            header_read_timeout_secs: 10,
            request_timeout_secs: 30,
            body_timeout_secs: 10,
            max_body_bytes_in_flight: 16 * 1024 * 1024,
            max_discarded_body_bytes: 1024 * 1024,
            op_retention_days: 30,
        }
    }
}

impl Limits {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

/// The longest drain: the hub asks systemd for the time its stop may take in microseconds
/// counted in 32 bits (`EXTEND_TIMEOUT_USEC`), about 71 minutes in all.
pub const MAX_DRAIN_SECS: u64 = 3600;

/// The site id the ledger names for balances brought in by `hub import`; no configured site
/// may take it.
pub const IMPORT_SITE: &str = "import";

/// The sites `--dev` adds when the config names none.
pub const DEV_SITES: [&str; 3] = ["roflfaucet", "clickforcharity", "wrc"];
const DEV_ORIGINS: [&str; 2] = ["http://localhost:*", "http://127.0.0.1:*"];
const DEV_KEYS_FILE: &str = "dev-sites.toml";

impl Config {
    /// Defaults, then `file` (if any), then `HUB_*` variables (`HUB_LIMITS__MAX_DELTA` for
    /// nested keys).
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        // HUB_CONFIG names the file itself (see `hub serve --config`); it is no setting.
        figment = figment.merge(Env::prefixed("HUB_").ignore(&["config"]).split("__"));
        figment.extract().context("invalid configuration")
    }

    /// Development mode: with no sites configured, adds the demo sites with keys generated
    /// once and kept in the data dir, allowing any localhost origin.
    pub fn with_dev_sites(self) -> anyhow::Result<Config> {
        self.dev_sites(true)
    }

    /// [`Config::with_dev_sites`] writing nothing: while the data dir holds no keys, the sites
    /// get new ones that only this process knows, as a first start would generate and keep
    /// them (what `hub check --dev` checks).
    pub fn with_dev_sites_unwritten(self) -> anyhow::Result<Config> {
        self.dev_sites(false)
    }

    fn dev_sites(mut self, keep: bool) -> anyhow::Result<Config> {
        if !self.sites.is_empty() {
            return Ok(self);
        }
        let path = self.data_dir.join(DEV_KEYS_FILE);
        #[derive(Serialize, Deserialize)]
        struct DevKeys {
            sites: Vec<Site>,
        }
        let keys = if path.exists() {
            let text = std::fs::read_to_string(&path)?;
            toml::from_str::<DevKeys>(&text).with_context(|| format!("cannot read {}", path.display()))?
        } else {
            let sites = DEV_SITES
                .iter()
                .map(|id| Site {
                    origins: DEV_ORIGINS.iter().map(|o| (*o).into()).collect(),
                    secret: Some(random_secret()),
                    ..Site::new(*id)
                })
                .collect();
            let keys = DevKeys { sites };
            if keep {
                create_data_dir(&self.data_dir)
                    .with_context(|| format!("cannot create data dir {}", self.data_dir.display()))?;
                write_private(&path, &toml::to_string(&keys)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            keys
        };
        self.sites = keys.sites;
        Ok(self)
    }

    /// Refuses configurations that would start an unsafe or broken hub. Reads no file and no
    /// environment variable: the secrets, keys and files they name are `check`'s.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.auth && !self.listen.ip().is_loopback() {
            bail!(
                "auth = false is only allowed when the hub listens on a loopback address, not {}",
                self.listen
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("tls_cert and tls_key go together: set both to serve HTTPS, or neither for plain HTTP");
        }
        if self.auth && self.sites.is_empty() {
            bail!("no [[sites]] configured: add one, or start with --dev");
        }
        self.validate_records()?;
        if self.drain_secs > MAX_DRAIN_SECS {
            bail!("drain_secs must be at most {MAX_DRAIN_SECS} (an hour), not {}", self.drain_secs);
        }
        if self.limits.requests_per_minute == 0 || self.limits.unauthenticated_requests_per_minute == 0 {
            bail!("request limits must be at least 1 per minute");
        }
        if !(1..self.limits.request_timeout_secs).contains(&self.limits.body_timeout_secs) {
            bail!("limits.body_timeout_secs must be at least 1 and shorter than limits.request_timeout_secs");
        }
        if self.limits.max_body_bytes_in_flight < protocol::wire::MAX_BODY_BYTES {
            bail!(
                "limits.max_body_bytes_in_flight must hold at least one whole body ({} bytes)",
                protocol::wire::MAX_BODY_BYTES
            );
        }
        if self.limits.max_connections_per_address == 0
            || self.limits.idle_timeout_secs == 0
            || self.limits.http2_max_concurrent_streams == 0
        {
            bail!(
                "limits.max_connections_per_address, limits.idle_timeout_secs and \
                 limits.http2_max_concurrent_streams must be at least 1"
            );
        }
        let events = &self.events;
        if events.max_streams_per_user == 0
            || events.max_streams_per_address == 0
            || events.resume_window == 0
        {
            bail!(
                "events.max_streams_per_user, events.max_streams_per_address and events.resume_window must be at least 1"
            );
        }
        let stuck = self.limits.request_timeout_secs + self.limits.idle_timeout_secs;
        if !(1..=MAX_HEARTBEAT_SECS.min(stuck - 1)).contains(&events.heartbeat_secs) {
            bail!(
                "events.heartbeat_secs must be from 1 to {MAX_HEARTBEAT_SECS} (pages take a stream silent for 45 s \
                 as broken) and shorter than limits.request_timeout_secs and limits.idle_timeout_secs together \
                 (the hub takes an answer silent for that long as stuck)"
            );
        }
        self.webhooks.validate()?;
        for site in &self.sites {
            if site.id == IMPORT_SITE {
                bail!("site id {:?} is reserved for balances brought in by `hub import`", site.id);
            }
            protocol::SiteId::parse(&site.id)
                .map_err(|e| anyhow::anyhow!("site {:?}: {}", site.id, e.message))?;
            for origin in &site.origins {
                OriginPattern::parse(origin).with_context(|| format!("site {}", site.id))?;
            }
            site.validate()?;
        }
        let mut ids: Vec<&str> = self.sites.iter().map(|s| s.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            bail!("site {} is configured twice", w[0]);
        }
        Ok(())
    }

    /// Checks the settings that decide how records are kept and changed: all that `hub
    /// import` reads, which needs no site, key or certificate.
    pub fn validate_records(&self) -> anyhow::Result<()> {
        self.store.validate()?;
        if self.limits.op_retention_days < 7 {
            bail!("limits.op_retention_days must be at least 7");
        }
        if self.limits.max_delta <= 0 {
            bail!("limits.max_delta must be positive");
        }
        Ok(())
    }

    /// The certificate and key files HTTPS is served with, when it is.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        self.tls_cert.as_deref().zip(self.tls_key.as_deref())
    }

    pub fn site(&self, id: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.id == id)
    }
}

/// Writes a file only its owner may read: it holds signing keys.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(text.as_bytes())
}

/// Creates the data dir, and the folders above it that are missing, for its owner alone
/// (0700): it holds the database and, in development, the sites' keys. One that exists keeps
/// its mode.
pub fn create_data_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// 32 random bytes, base64url: an HS256 secret.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An allowed browser origin: exact (`https://roflfaucet.com`) or any port
/// (`http://localhost:*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    Exact(String),
    AnyPort(String),
}

impl OriginPattern {
    pub fn parse(s: &str) -> anyhow::Result<OriginPattern> {
        let lower = s.to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://")) else {
            bail!("origin {s:?} must start with http:// or https://");
        };
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            bail!("origin {s:?} must be scheme://host[:port] with nothing after it");
        }
        Ok(match lower.strip_suffix(":*") {
            Some(prefix) => OriginPattern::AnyPort(prefix.to_owned()),
            None => OriginPattern::Exact(lower),
        })
    }

    pub fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Exact(o) => o.eq_ignore_ascii_case(origin),
            OriginPattern::AnyPort(prefix) => {
                origin.len() > prefix.len()
                    && origin[..prefix.len()].eq_ignore_ascii_case(prefix)
                    && origin[prefix.len()..].strip_prefix(':').is_some_and(|port| {
                        !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_port_patterns_match_only_that_host_with_a_port() {
        let p = OriginPattern::parse("http://localhost:*").unwrap();
        assert!(p.matches("http://localhost:8080"));
        assert!(!p.matches("http://localhost"));
        assert!(!p.matches("http://localhost.evil.com:80"));
        assert!(!p.matches("http://localhost:80/x"));
        assert!(!p.matches("https://localhost:8080"));
        assert!(!p.matches("null"));
    }

    #[test]
    fn exact_origins_match_exactly() {
        let p = OriginPattern::parse("https://roflfaucet.com").unwrap();
        assert!(p.matches("https://roflfaucet.com"));
        assert!(!p.matches("https://roflfaucet.com.evil.org"));
        assert!(OriginPattern::parse("https://a.com/path").is_err());
        assert!(OriginPattern::parse("null").is_err());
    }

    #[test]
    fn auth_can_be_off_only_on_loopback() {
        let mut config = Config { auth: false, ..Config::default() };
        assert!(config.validate().is_ok());
        config.listen = "0.0.0.0:8787".parse().unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn a_tls_certificate_needs_its_key_and_the_key_its_certificate() {
        let both = Config {
            auth: false,
            tls_cert: Some("cert.pem".into()),
            tls_key: Some("key.pem".into()),
            ..Config::default()
        };
        assert!(both.validate().is_ok());
        for half in [Config { tls_key: None, ..both.clone() }, Config { tls_cert: None, ..both.clone() }] {
            let error = half.validate().unwrap_err().to_string();
            assert!(error.contains("tls_cert and tls_key go together"), "{error}");
        }
    }

    #[test]
    fn a_drain_lasts_at_most_an_hour() {
        let config = Config { auth: false, drain_secs: MAX_DRAIN_SECS, ..Config::default() };
        assert!(config.validate().is_ok());
        let error = Config { drain_secs: MAX_DRAIN_SECS + 1, ..config }.validate().unwrap_err().to_string();
        assert!(error.contains("drain_secs must be at most 3600"), "{error}");
    }

    #[test]
    fn a_body_has_less_time_than_its_request_and_room_for_one_whole_body() {
        let config = Config { auth: false, ..Config::default() };
        assert!(config.validate().is_ok());
        for limits in [
            Limits { body_timeout_secs: 0, ..config.limits.clone() },
            Limits { body_timeout_secs: 30, ..config.limits.clone() },
            Limits { max_body_bytes_in_flight: protocol::wire::MAX_BODY_BYTES - 1, ..config.limits.clone() },
        ] {
            assert!(Config { limits, ..config.clone() }.validate().is_err());
        }
    }

    fn with_webhook(url: &str, secret_env: Option<&str>) -> Config {
        let site = Site {
            secret: Some(random_secret()),
            webhook_url: Some(url.into()),
            webhook_secret_env: secret_env.map(str::to_owned),
            ..Site::new("roflfaucet")
        };
        Config { sites: vec![site], ..Config::default() }
    }

    #[test]
    fn a_webhook_goes_over_https_or_to_this_machine() {
        for url in [
            "https://roflfaucet.com/hub-webhook",
            "http://127.0.0.1:8080/hook",
            "http://127.5.6.7/hook",
            "http://[::1]:9000/hook",
            "http://localhost/hook",
        ] {
            assert!(with_webhook(url, Some("ROFL_WHSEC")).validate().is_ok(), "{url}");
        }
        for (url, says) in [
            ("http://roflfaucet.com/hook", "plain http to another machine"),
            ("http://10.0.0.1/hook", "plain http to another machine"),
            ("http://localhost.roflfaucet.com/hook", "plain http to another machine"),
            ("ftp://roflfaucet.com/hook", "must be an https:// URL"),
            ("roflfaucet.com/hook", "is not a URL"),
        ] {
            let error = with_webhook(url, Some("ROFL_WHSEC")).validate().unwrap_err().to_string();
            assert!(error.contains(says), "{url}: {error}");
        }
        let error = with_webhook("https://roflfaucet.com/hook", None).validate().unwrap_err().to_string();
        assert!(error.contains("webhook_url needs webhook_secret_env"), "{error}");
    }

    #[test]
    fn a_webhooks_types_are_known_ones_and_default_to_all() {
        let mut site = Site::new("roflfaucet");
        assert_eq!(site.webhook_types().unwrap(), protocol::DataType::ALL);
        site.webhook_data_types = Some(vec!["balance".into(), "profile".into(), "balance".into()]);
        assert_eq!(site.webhook_types().unwrap(), [protocol::DataType::Balance, protocol::DataType::Profile]);
        site.webhook_data_types = Some(vec!["coins".into()]);
        let error = site.webhook_types().unwrap_err().to_string();
        assert!(error.contains("unknown data type \"coins\" in webhook_data_types"), "{error}");
        site.webhook_data_types = Some(Vec::new());
        assert!(site.webhook_types().unwrap_err().to_string().contains("is empty"));
    }

    #[test]
    fn webhook_delivery_numbers_are_sane() {
        let config = with_webhook("https://roflfaucet.com/hook", Some("ROFL_WHSEC"));
        assert!(config.validate().is_ok());
        let defaults = WebhooksConfig::default();
        for (webhooks, says) in [
            (WebhooksConfig { timeout_secs: 0, ..defaults.clone() }, "timeout_secs"),
            (WebhooksConfig { timeout_secs: 61, ..defaults.clone() }, "timeout_secs"),
            (WebhooksConfig { in_flight: 0, ..defaults.clone() }, "in_flight"),
            (WebhooksConfig { in_flight: 65, ..defaults.clone() }, "in_flight"),
            (WebhooksConfig { first_retry_ms: 0, ..defaults.clone() }, "first_retry_ms"),
            (
                WebhooksConfig { first_retry_ms: 10_000, max_retry_ms: 9_999, ..defaults.clone() },
                "first_retry_ms",
            ),
            (WebhooksConfig { retry_for_secs: 59, ..defaults.clone() }, "retry_for_secs"),
        ] {
            let error = Config { webhooks, ..config.clone() }.validate().unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        }
    }

    #[test]
    fn a_postgres_store_names_one_database_in_a_variable_the_hub_does_not_read_as_a_setting() {
        let postgres = |url: Option<&str>, url_env: Option<&str>| StoreConfig {
            backend: Backend::Postgres,
            url: url.map(str::to_owned),
            url_env: url_env.map(str::to_owned),
            ..StoreConfig::default()
        };
        assert!(postgres(Some("postgres://hub@db/hub"), None).validate().is_ok());
        assert!(postgres(None, Some("UNIFIED_SYNC_DATABASE_URL")).validate().is_ok());
        for (config, says) in [
            (postgres(None, None), "exactly one of store.url and store.url_env"),
            (postgres(Some("postgres://hub@db/hub"), Some("DB_URL")), "exactly one"),
            (postgres(None, Some("HUB_DATABASE_URL")), "HUB_STORE__URL"),
            (StoreConfig { pool: 2, ..postgres(None, Some("DB_URL")) }, "store.pool must be at least 3"),
            (
                StoreConfig { url: Some("postgres://hub@db/hub".into()), ..StoreConfig::default() },
                "for backend = \"postgres\"",
            ),
        ] {
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        }
    }
}

#[cfg(test)]
// figment's `Jail` fixes the closures' error type to its own large `figment::Error`.
#[allow(clippy::result_large_err)]
mod load_tests {
    use super::*;

    #[test]
    fn environment_variables_override_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "hub.toml",
                r#"
                hub_id = "directsponsor-hub"
                listen = "127.0.0.1:9000"
                [limits]
                requests_per_minute = 50
                [[sites]]
                id = "roflfaucet"
                origins = ["https://roflfaucet.com"]
                secret_env = "ROFL_SECRET"
                "#,
            )?;
            jail.set_env("HUB_LISTEN", "127.0.0.1:9100");
            jail.set_env("HUB_CONFIG", "hub.toml");
            jail.set_env("HUB_LIMITS__REQUESTS_PER_MINUTE", "70");
            let config = Config::load(Some(Path::new("hub.toml"))).unwrap();
            assert_eq!(config.hub_id, "directsponsor-hub");
            assert_eq!(config.listen, "127.0.0.1:9100".parse().unwrap());
            assert_eq!(config.limits.requests_per_minute, 70);
            assert_eq!(config.limits.max_delta, Limits::default().max_delta);
            assert_eq!(config.sites[0].secret_env.as_deref(), Some("ROFL_SECRET"));
            Ok(())
        });
    }

    #[test]
    fn tls_files_come_from_the_file_or_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("hub.toml", "tls_cert = \"/etc/hub/cert.pem\"\ntls_key = \"/etc/hub/key.pem\"")?;
            jail.set_env("HUB_TLS_KEY", "/etc/hub/renewed-key.pem");
            let config = Config::load(Some(Path::new("hub.toml"))).unwrap();
            assert_eq!(
                config.tls_files(),
                Some((Path::new("/etc/hub/cert.pem"), Path::new("/etc/hub/renewed-key.pem")))
            );
            assert_eq!(Config::default().tls_files(), None);
            Ok(())
        });
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks_from_the_file_or_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("hub.toml", "trusted_proxies = [\"127.0.0.1\", \"10.1.2.3/8\", \"::1\"]")?;
            let config = Config::load(Some(Path::new("hub.toml"))).unwrap();
            let proxies = &config.trusted_proxies;
            assert_eq!(Vec::<String>::from(proxies.clone()), ["127.0.0.1", "10.0.0.0/8", "::1"]);
            for trusted in ["127.0.0.1", "10.200.0.1", "::1", "::ffff:127.0.0.1"] {
                assert!(proxies.contains(trusted.parse().unwrap()), "{trusted}");
            }
            for untrusted in ["127.0.0.2", "11.0.0.1", "::2"] {
                assert!(!proxies.contains(untrusted.parse().unwrap()), "{untrusted}");
            }
            assert!(Config::default().trusted_proxies.is_empty(), "no peer is trusted by default");

            jail.set_env("HUB_TRUSTED_PROXIES", "[\"192.168.0.0/16\", \"fd00::/8\"]");
            let config = Config::load(Some(Path::new("hub.toml"))).unwrap();
            assert_eq!(Vec::<String>::from(config.trusted_proxies), ["192.168.0.0/16", "fd00::/8"]);

            jail.set_env("HUB_TRUSTED_PROXIES", "[\"localhost\"]");
            let error = format!("{:#}", Config::load(Some(Path::new("hub.toml"))).unwrap_err());
            assert!(error.contains("\"localhost\" is neither an IP address nor a network"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("hub.toml", "hub_idd = \"typo\"")?;
            assert!(Config::load(Some(Path::new("hub.toml"))).is_err());
            Ok(())
        });
    }

    #[test]
    fn dev_sites_keep_their_keys_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() };
        let first = config.clone().with_dev_sites().unwrap();
        let second = config.with_dev_sites().unwrap();
        assert_eq!(first.sites, second.sites);
        assert_eq!(first.sites.len(), DEV_SITES.len());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(DEV_KEYS_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the dev keys are private");
        }
        assert!(first.validate().is_ok());
    }

    #[test]
    fn unwritten_dev_sites_leave_the_data_dir_alone_and_read_the_kept_keys() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let config = Config { data_dir: data_dir.clone(), ..Config::default() };
        let unwritten = config.clone().with_dev_sites_unwritten().unwrap();
        assert_eq!(unwritten.sites.len(), DEV_SITES.len());
        assert!(!data_dir.exists(), "the data dir was created");
        let kept = config.clone().with_dev_sites().unwrap();
        assert_eq!(config.with_dev_sites_unwritten().unwrap().sites, kept.sites);
    }
}
