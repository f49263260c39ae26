//! The hub's public API as the agent uses it: the sync API, one user's balance at a time, and
//! the site's change feed (`/api/changes`), over HTTP (reqwest), each request with a token of
//! its own, sent again with backoff until the hub answers. HTTPS trusts the public
//! authorities (webpki's list), the system's trust store and the `--ca-file`; a certificate
//! it does not accept is logged as an error and tried again only every few minutes. Decides
//! nothing about balances: that is [`crate::reconcile`]'s.

use std::fmt::Display;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use backon::{ExponentialBuilder, Retryable};
use protocol::{DeltaRequest, ErrorAnswer, PostRequest, PushRequest, SiteId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_rustls::rustls::{self, CertificateError};

use crate::reconcile::{HubBalance, Reply, Request};
use crate::token::Signer;

/// The longest pause between two attempts at a request.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// The pauses before each new attempt: 0.5 s, doubling up to [`MAX_RETRY`], for as long as
/// it takes.
const BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(500))
    .with_max_delay(MAX_RETRY)
    .without_max_times();
/// The longest a request may take before it counts as failed and is sent again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The pause after a TLS handshake that failed on the agent's side (a certificate it does not
/// trust, a name that does not match, no TLS at all): that is a configuration to fix, on the
/// hub or here, which retrying sooner does not fix. The agent goes on trying, rather than
/// exiting, so that it resumes by itself once the hub's certificate is renewed or its
/// authority trusted — a service manager restarting an agent that exits would soon give up.
const TLS_RETRY: Duration = Duration::from_secs(300);

/// How long the hub may hold a read of the change feed open while nothing changes: its
/// longest.
const FEED_WAIT_SECS: u64 = 25;
/// The most changes one read of the feed brings.
const FEED_LIMIT: u32 = 1000;

/// The hub's sync API as the agent uses it: one user's balance at a time.
pub(crate) struct Hub {
    http: reqwest::Client,
    /// `<hub URL>/api/sync`.
    pub(crate) api: reqwest::Url,
    /// `<hub URL>/api/changes`.
    changes: reqwest::Url,
    signer: Signer,
    site: SiteId,
}

/// The site's change feed, read by a task of its own beside [`Hub`]'s requests.
pub(crate) struct Feed {
    http: reqwest::Client,
    url: reqwest::Url,
    signer: Signer,
    /// The `sub` of the feed's tokens: the hub counts the feed's requests against it.
    reader: UserId,
}

/// One read of the change feed.
pub(crate) enum FeedAnswer {
    Changes(Changes),
    /// The hub no longer knows the cursor (`cursor_reset`: its database was replaced, or the
    /// cursor was not one of its): the feed is read again from its start.
    Reset {
        code: String,
        message: String,
    },
}

/// The changes after a cursor, and where to read on.
#[derive(Debug, Deserialize)]
pub(crate) struct Changes {
    pub(crate) epoch: String,
    pub(crate) changes: Vec<Change>,
    pub(crate) cursor: String,
}

/// A record changed: the hub's latest version of it.
#[derive(Debug, Deserialize)]
pub(crate) struct Change {
    pub(crate) user_id: String,
    pub(crate) data_type: String,
    pub(crate) version: u64,
    /// The record, when small enough to come with the change.
    #[serde(default)]
    pub(crate) data: Option<Value>,
}

impl Change {
    /// The balance the change names, when its record came with it.
    pub(crate) fn balance(&self) -> Option<HubBalance> {
        let data = self.data.as_ref()?;
        Some(HubBalance { coins: coins_of(data), version: self.version })
    }
}

/// The hub's answer to a request, and its epoch when the answer names it (a get's does).
pub(crate) struct Answer {
    pub(crate) reply: Reply,
    pub(crate) epoch: Option<String>,
}

/// Why a request must be sent again, and how long the hub asked to wait first.
struct Retry {
    why: String,
    after: Option<Duration>,
    /// The TLS handshake failed on the agent's side: see [`TLS_RETRY`].
    tls: bool,
}

impl Retry {
    fn because(why: impl Into<String>) -> Retry {
        Retry { why: why.into(), after: None, tls: false }
    }

    /// A request that got no answer; a TLS error says what to fix.
    fn unanswered(error: reqwest::Error) -> Retry {
        let fix = tls_error(&error).map(fix_for);
        let why = format!("{:#}", anyhow::Error::from(error));
        match fix {
            Some(fix) => Retry { why: format!("{why}; {fix}"), after: None, tls: true },
            None => Retry::because(why),
        }
    }
}

/// The TLS error under `error`, if its handshake failed. rustls's error is wrapped in an
/// `io::Error` (perhaps in another), whose `source` skips what it wraps, so each is opened.
fn tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = error.downcast_ref() {
        return Some(tls);
    }
    let wrapped = error.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref);
    if let Some(tls) = wrapped.and_then(|inner| tls_error(inner)) {
        return Some(tls);
    }
    tls_error(error.source()?)
}

/// What the operator does about a failed TLS handshake.
fn fix_for(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the hub's certificate comes from an authority this machine does not trust: give the \
             agent that authority's certificate with --ca-file, or add it to the system's trust store"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the hub's certificate does not name the host of --hub",
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => "the hub's certificate has expired or is not valid yet: renew it, or check this machine's clock",
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if matches!(other.0.downcast_ref(), Some(webpki::Error::CaUsedAsEndEntity)) =>
        {
            "the hub's certificate is a certificate authority's, which is never accepted as a \
             server's: make it as a server's (OpenSSL's `req -x509` makes an authority's unless \
             given `-addext basicConstraints=critical,CA:FALSE`), or issue it from an authority"
        }
        rustls::Error::InvalidCertificate(_) => "the hub's certificate is not accepted",
        _ => "the TLS handshake with the hub failed: does the hub serve HTTPS on that address?",
    }
}

impl Hub {
    /// A client of the hub at `url`; over HTTPS it also trusts the authorities in `ca_file`
    /// (PEM).
    pub(crate) fn new(
        url: &str,
        ca_file: Option<&Path>,
        signer: Signer,
        site: SiteId,
    ) -> anyhow::Result<Hub> {
        let mut base = reqwest::Url::parse(url).with_context(|| format!("--hub {url:?} is not a URL"))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            bail!("--hub {url:?} must be an http:// or https:// URL");
        }
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let api = base.join("api/sync")?;
        let changes = base.join("api/changes")?;
        let mut http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("hub-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            let pem =
                std::fs::read(path).with_context(|| format!("cannot read --ca-file {}", path.display()))?;
            let authorities = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("--ca-file {} is not PEM", path.display()))?;
            if authorities.is_empty() {
                bail!("--ca-file {} holds no CERTIFICATE block", path.display());
            }
            for authority in authorities {
                http = http.add_root_certificate(authority);
            }
        }
        let http = http.build().context("cannot set up HTTPS (the system's trust store, --ca-file)")?;
        Ok(Hub { http, api, changes, signer, site })
    }

    /// The site's change feed, read with tokens of `signer` for `reader`.
    pub(crate) fn feed(&self, signer: Signer, reader: UserId) -> Feed {
        Feed { http: self.http.clone(), url: self.changes.clone(), signer, reader }
    }

    /// Sends `request` until the hub answers it, pausing longer after each failure (up to
    /// [`MAX_RETRY`], or what the hub asks for).
    pub(crate) async fn send_until_answered(&self, user: &UserId, request: &Request) -> Answer {
        until_answered(user, || self.send(user, request)).await
    }

    async fn send(&self, user: &UserId, request: &Request) -> Result<Answer, Retry> {
        let token =
            self.signer.mint(user).map_err(|e| Retry::because(format!("cannot sign a token: {e:#}")))?;
        let post = |body: PostRequest| self.http.post(self.api.clone()).json(&body.to_json());
        let (user_id, site_id, data_type) = (user.to_string(), self.site.to_string(), "balance".to_owned());
        let builder = match request {
            Request::Get => self.http.get(self.api.clone()).query(&[
                ("action", "get"),
                ("user_id", user.as_str()),
                ("data_type", "balance"),
            ]),
            Request::Push { coins, base_version, op_id } => post(PostRequest::Push(PushRequest {
                user_id,
                site_id,
                data_type,
                data: json!({ "coins": coins }),
                base_version: Some(*base_version),
                op_id: Some(op_id.clone()),
            })),
            Request::Delta { coins, op_id } => post(PostRequest::Delta(DeltaRequest {
                user_id,
                site_id,
                data_type,
                delta: serde_json::Map::from_iter([("coins".to_owned(), Value::from(*coins))]),
                op_id: op_id.clone(),
                reason: Some("file changed on the site".into()),
                grant: None,
            })),
        };
        let response = builder.bearer_auth(token).send().await.map_err(Retry::unanswered)?;
        let (status, after) = (response.status(), retry_after(&response));
        let body =
            response.bytes().await.map_err(|e| Retry::because(format!("{:#}", anyhow::Error::from(e))))?;
        if status.is_success() {
            return answer(&body)
                .ok_or_else(|| Retry::because(format!("{status} with a body that is not the hub's")));
        }
        let Ok(error) = serde_json::from_slice::<ErrorAnswer>(&body) else {
            return Err(Retry {
                why: format!("{status} with a body that is not the hub's"),
                after,
                tls: false,
            });
        };
        // A refused token may be a clock or key being fixed; an overloaded or restarting hub
        // answers 5xx, 408 or 429. Any other refusal is the hub's answer to this request.
        if status.is_server_error() || matches!(status.as_u16(), 401 | 408 | 429) {
            return Err(Retry {
                why: format!("{status} {}: {}", error.code, error.error),
                after,
                tls: false,
            });
        }
        let current = error.current.map(|c| HubBalance { coins: coins_of(&c.data), version: c.version });
        let reply = match (error.code.as_str(), current) {
            ("version_conflict", Some(hub)) => Reply::Conflict(hub),
            ("insufficient_funds", Some(hub)) => Reply::InsufficientFunds(hub),
            _ => Reply::Refused { code: error.code, message: error.error },
        };
        Ok(Answer { reply, epoch: None })
    }
}

impl Feed {
    /// The balance changes after `cursor` (from the feed's start without one), read until the
    /// hub answers; the hub holds the read open until something changes or
    /// [`FEED_WAIT_SECS`] pass.
    pub(crate) async fn read(&self, cursor: Option<&str>) -> FeedAnswer {
        until_answered("the change feed", || self.try_read(cursor)).await
    }

    async fn try_read(&self, cursor: Option<&str>) -> Result<FeedAnswer, Retry> {
        let token = self
            .signer
            .mint(&self.reader)
            .map_err(|e| Retry::because(format!("cannot sign a token: {e:#}")))?;
        let (wait, limit) = (FEED_WAIT_SECS.to_string(), FEED_LIMIT.to_string());
        let mut query = vec![("data_type", "balance"), ("wait", wait.as_str()), ("limit", limit.as_str())];
        query.extend(cursor.map(|cursor| ("cursor", cursor)));
        let response = self
            .http
            .get(self.url.clone())
            .query(&query)
            .timeout(Duration::from_secs(FEED_WAIT_SECS) + REQUEST_TIMEOUT)
            .bearer_auth(token)
            .send()
            .await
            .map_err(Retry::unanswered)?;
        let (status, after) = (response.status(), retry_after(&response));
        let body =
            response.bytes().await.map_err(|e| Retry::because(format!("{:#}", anyhow::Error::from(e))))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map(FeedAnswer::Changes)
                .map_err(|e| Retry::because(format!("{status} with a body that is not the feed's: {e}")));
        }
        let Ok(error) = serde_json::from_slice::<ErrorAnswer>(&body) else {
            let why = if status == reqwest::StatusCode::NOT_FOUND {
                format!(
                    "{status}: this hub has no change feed; upgrade it, or run the agent with --push-only"
                )
            } else {
                format!("{status} with a body that is not the hub's")
            };
            return Err(Retry { why, after, tls: false });
        };
        match error.code.as_str() {
            "cursor_reset" | "bad_cursor" => Ok(FeedAnswer::Reset { code: error.code, message: error.error }),
            // Anything else is a hub that is down, or a configuration to fix (a site whose
            // scopes do not list changes:read, a key the hub does not know): the feed is read
            // again until it answers.
            _ => Err(Retry { why: format!("{status} {}: {}", error.code, error.error), after, tls: false }),
        }
    }
}

/// Runs `attempt` until it succeeds, pausing longer after each failure (up to [`MAX_RETRY`],
/// or what the hub asks for), and logs each failure as `who`'s.
async fn until_answered<T, F, Fut>(who: impl Display, attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Retry>>,
{
    let answered = attempt
        .retry(BACKOFF)
        // The hub's `Retry-After` stands in for the next pause, and either is spread by
        // ±20 %, so that agents that failed together do not all come back together.
        .adjust(|retry: &Retry, pause| {
            let pause = if retry.tls { TLS_RETRY } else { retry.after.or(pause)?.min(MAX_RETRY) };
            Some(pause.mul_f64(rand::random_range(0.8..1.2)))
        })
        .notify(|retry, wait| {
            if retry.tls {
                tracing::error!(
                    "{who}: no TLS connection to the hub ({}); trying again in {:.0} s",
                    retry.why,
                    wait.as_secs_f64()
                );
            } else {
                tracing::warn!(
                    "{who}: no answer from the hub ({}); trying again in {:.1} s",
                    retry.why,
                    wait.as_secs_f64()
                );
            }
        })
        .await;
    match answered {
        Ok(answer) => answer,
        Err(_) => unreachable!("the backoff has no last attempt"),
    }
}

/// The pause an answer's `Retry-After` asks for.
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .map(Duration::from_secs)
}

/// A successful answer (get, push or delta): the balance, and the epoch if named.
fn answer(body: &[u8]) -> Option<Answer> {
    #[derive(Deserialize)]
    struct Success {
        success: bool,
        data: Value,
        version: u64,
        epoch: Option<String>,
    }
    let success: Success = serde_json::from_slice(body).ok().filter(|s: &Success| s.success)?;
    let hub = HubBalance { coins: coins_of(&success.data), version: success.version };
    Some(Answer { reply: Reply::Balance(hub), epoch: success.epoch })
}

fn coins_of(data: &Value) -> i64 {
    data.get("coins").and_then(Value::as_i64).unwrap_or(0)
}
