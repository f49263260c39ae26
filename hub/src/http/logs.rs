//! What the operator reads of each answer besides the metrics: its access log line (when
//! `[access_log]` is on) and, for a refused token or a rate limit, the refusals log. Fed by
//! `observe` once an answer is ready; decides nothing about a request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::{HeaderValue, Method};
use axum::response::Response;

use super::access_log::{AccessLog, Line};
use super::refusals::{Refusals, Site};
use super::{App, ClientAddr};
use crate::config::AccessLogConfig;
use crate::metrics::{Metrics, Seen};
use crate::time::now_ms;

/// The hub's logs of answers.
#[derive(Debug)]
pub(super) struct Logs {
    access: Option<AccessLog>,
    refusals: Refusals,
    /// Access log lines dropped that the metrics and the log have been told of.
    dropped_told: AtomicU64,
}

/// The hub's own code for a refusal or failure, which `ApiError` leaves in its answer's
/// extensions for the logs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Code(pub(super) &'static str);

/// What the logs need of a request, taken before it is handed on.
#[derive(Debug)]
pub(super) struct Asked {
    pub(super) method: Method,
    /// Its `Authorization`, read only to name the site a refused token claims.
    pub(super) authorization: Option<HeaderValue>,
}

impl Logs {
    pub(super) fn open(config: &AccessLogConfig) -> anyhow::Result<Logs> {
        Ok(Logs { access: AccessLog::open(config)?, refusals: Refusals::default(), dropped_told: 0.into() })
    }

    /// Whether every answer is logged, and so needs its caller's site and user in its
    /// [`Seen`] (a refused one needs them only when it is refused).
    pub(super) fn keeps_access(&self) -> bool {
        self.access.is_some()
    }

    /// Logs one answer, as its handler saw the request.
    pub(super) fn answered(
        &self,
        app: &App,
        asked: &Asked,
        response: &Response,
        seen: &Seen,
        took: Duration,
    ) {
        let status = response.status().as_u16();
        let concerns_refusals = Refusals::concerns(status);
        if self.access.is_none() && !concerns_refusals {
            return;
        }
        let Some(client) = response.extensions().get::<ClientAddr>().map(ClientAddr::ip) else { return };
        let code = response.extensions().get::<Code>().map(|c| c.0);
        let (site, user) = match &seen.who {
            Some((site, user)) => (Some(site.as_str()), Some(user.as_str())),
            None => (None, None),
        };
        let sites = app.sites();
        // A token that was refused still names the site it claims to come from, which is what
        // its operator looks for; only a configured site's name is taken from it, and it is
        // logged as a claim, never as the site: anyone can write a token naming any site.
        let claimed = match (site, status, &asked.authorization, sites.keys()) {
            (None, 401 | 429, Some(authorization), Some(keys)) => {
                bearer(authorization).and_then(|token| keys.claimed_site(token))
            }
            _ => None,
        };
        let now = now_ms();
        if concerns_refusals {
            let named = match (site, claimed) {
                (Some(site), _) => Some(Site::Verified(site.to_owned())),
                (None, Some(claimed)) => Some(Site::Claimed(claimed.to_owned())),
                (None, None) => None,
            };
            self.refusals.note(now, status, code.unwrap_or("-"), named, client);
        }
        if let Some(access) = &self.access {
            let request_id = response.headers().get("x-request-id").and_then(|v| v.to_str().ok());
            access.write(&Line {
                time_ms: now,
                client,
                method: &asked.method,
                action: seen.action.as_str(),
                status,
                code,
                duration: took,
                site,
                claimed_site: claimed,
                user,
                request_id,
            });
        }
    }

    /// Every few seconds: the refusals of a minute that ended, and the access log lines
    /// dropped since the last call, counted and logged.
    pub(super) fn housekeeping(&self, now_ms: i64, metrics: &Metrics) {
        self.refusals.sum_up_if_due(now_ms);
        let Some(access) = &self.access else { return };
        let dropped = access.dropped();
        let told = self.dropped_told.swap(dropped, Ordering::Relaxed);
        if dropped > told {
            metrics.access_log_dropped(dropped - told);
            tracing::warn!(
                "the access log fell behind its writes: {} line(s) dropped ({dropped} since the start)",
                dropped - told
            );
        }
    }

    /// As the hub stops: the refusals of the minute so far.
    pub(super) fn stopping(&self) {
        self.refusals.sum_up();
    }

    /// Reopens the access log's file (SIGHUP); `None` when it has none.
    pub(super) fn reopen(&self) -> Option<anyhow::Result<()>> {
        self.access.as_ref()?.reopen()
    }
}

/// The token of an `Authorization: Bearer …` value.
fn bearer(authorization: &HeaderValue) -> Option<&str> {
    let (scheme, token) = authorization.to_str().ok()?.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
