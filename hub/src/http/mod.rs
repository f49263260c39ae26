//! Routes and the HTTP rules around them: CORS, request ids, body limits, timeouts, auth
//! and rate limits. Handlers parse, call the domain and shape its answer; every rule about
//! the data itself lives in the domain.

mod admin;
mod error;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use protocol::{
    DataType, DeltaAnswer, GetAnswer, GetManyAnswer, GetQuery, PostRequest, PushAnswer, QueryAction,
    RecordState, Refusal, Scopes, SiteId, TimestampAnswer, TimestampsAnswer, UserId, parse_data_types,
};
use serde::Serialize;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::App;
use crate::domain::{Caller, Ceilings, Written};
use crate::metrics::{Action, LimitScope, Seen, TypeSet};
use crate::store::Record;
use crate::time::rfc3339_ms;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Sent with every answer over HTTPS: browsers then use only HTTPS for the hub's name, for a
/// year from each answer. Never sent over plain HTTP, where it would mean nothing.
const HSTS: &str = "max-age=31536000";

/// The hub's routes with every layer applied.
pub fn router(app: App) -> Router {
    let sync = get(sync_get).post(sync_post).fallback(method_not_allowed);
    let router = Router::new()
        .route("/api/sync.php", sync.clone())
        .route("/api/sync", sync)
        .route("/healthz", get(healthz))
        .merge(admin::routes())
        .fallback(not_found)
        .with_state(app.clone())
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(app.clone(), observe))
                .layer(SetRequestIdLayer::x_request_id(RequestCounter::default()))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<Body>| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
                    tracing::info_span!("req", id = %id)
                }))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(cors(app.clone()))
                .layer(SetResponseHeaderLayer::if_not_present(
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                )),
        );
    if app.tls().is_none() {
        return router;
    }
    router.layer(SetResponseHeaderLayer::overriding(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static(HSTS),
    ))
}

/// Counts every answer — preflights and refusals included — with what its handler saw.
async fn observe(State(app): State<App>, request: Request<Body>, next: Next) -> Response {
    let start = Instant::now();
    let preflight = request.method() == Method::OPTIONS;
    let response = next.run(request).await;
    let fallback =
        Seen { action: if preflight { Action::Preflight } else { Action::Other }, ..Seen::default() };
    let seen = response.extensions().get::<Seen>().unwrap_or(&fallback);
    app.metrics().request(seen, response.status().as_u16(), start.elapsed());
    response
}

/// Attaches what a handler saw to its answer, for [`observe`].
fn seen(mut response: Response, seen: Seen) -> Response {
    response.extensions_mut().insert(seen);
    response
}

/// Request ids: a per-process random prefix and a counter, unique without a syscall.
#[derive(Clone)]
struct RequestCounter {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl Default for RequestCounter {
    fn default() -> Self {
        RequestCounter {
            prefix: crate::config::random_secret()[..8].into(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for RequestCounter {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n}", self.prefix)).ok().map(RequestId::new)
    }
}

fn cors(app: App) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin.to_str().is_ok_and(|o| app.sites().allows_origin(o))
        }))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::IF_NONE_MATCH])
        .expose_headers([header::ETAG, header::RETRY_AFTER, HeaderName::from_static("x-request-id")])
        .max_age(Duration::from_secs(7200))
}

/// A JSON answer that no cache stores.
pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).expect("answers serialize");
    let mut response = (status, Bytes::from(bytes)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub(crate) fn record_state(record: &Record) -> RecordState {
    RecordState {
        data: record.data.clone(),
        last_updated: record.updated_ms.map(rfc3339_ms),
        version: record.version,
    }
}

/// Runs a handler within the request timeout.
async fn timed(app: &App, work: impl Future<Output = Result<Response, ApiError>>) -> Response {
    match tokio::time::timeout(app.config().limits.request_timeout(), work).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => e.into_response(),
        Err(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long; retry")
                .into_response()
        }
    }
}

async fn sync_get(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut saw = Seen::default();
    let response = timed(&app, async {
        let (action, user, types, single, site) = parse_get(query.as_deref().unwrap_or(""))
            .map_err(|e| app.refuse_unauthenticated(peer.ip(), e))?;
        saw.action = match action {
            QueryAction::Timestamp => Action::Timestamp,
            QueryAction::Get => Action::Get,
        };
        saw.types = TypeSet::of(&types);
        let caller = app.admit(&headers, None, peer.ip(), &user, site.as_deref(), &mut saw)?;
        let domain = app.domain();
        match action {
            QueryAction::Timestamp => {
                let stamps = domain.stamps(&caller, &user, &types).await?;
                let epoch = domain.epoch().to_owned();
                if single {
                    let stamp = stamps[0];
                    Ok(json(
                        StatusCode::OK,
                        &TimestampAnswer {
                            success: true,
                            data_type: types[0],
                            last_updated: stamp.updated_ms.map(rfc3339_ms),
                            version: stamp.version,
                            epoch,
                        },
                    ))
                } else {
                    let timestamps = types
                        .iter()
                        .zip(stamps)
                        .map(|(t, s)| {
                            (
                                *t,
                                protocol::Stamp {
                                    last_updated: s.updated_ms.map(rfc3339_ms),
                                    version: s.version,
                                },
                            )
                        })
                        .collect();
                    Ok(json(StatusCode::OK, &TimestampsAnswer { success: true, timestamps, epoch }))
                }
            }
            QueryAction::Get => {
                let records = domain.records(&caller, &user, &types).await?;
                let epoch = domain.epoch().to_owned();
                if single {
                    let record = &records[0];
                    let etag = HeaderValue::from_str(&format!("\"{}\"", record.version))
                        .expect("a quoted number is a header value");
                    if if_none_match(&headers, &etag) {
                        let mut response = StatusCode::NOT_MODIFIED.into_response();
                        response.headers_mut().insert(header::ETAG, etag);
                        return Ok(response);
                    }
                    let state = record_state(record);
                    let mut response = json(
                        StatusCode::OK,
                        &GetAnswer {
                            success: true,
                            data_type: types[0],
                            data: state.data,
                            last_updated: state.last_updated,
                            version: state.version,
                            epoch,
                        },
                    );
                    let headers = response.headers_mut();
                    headers.insert(header::ETAG, etag);
                    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
                    Ok(response)
                } else {
                    let records = types.iter().copied().zip(records.iter().map(record_state)).collect();
                    Ok(json(StatusCode::OK, &GetManyAnswer { success: true, records, epoch }))
                }
            }
        }
    })
    .await;
    seen(response, saw)
}

type ParsedGet = (QueryAction, UserId, Vec<DataType>, bool, Option<String>);

fn parse_get(raw: &str) -> Result<ParsedGet, ApiError> {
    let query: GetQuery = serde_urlencoded::from_str(raw)
        .map_err(|e| Refusal::invalid("invalid_query", format!("the query string is malformed: {e}")))?;
    let action = query.action()?;
    let user = UserId::parse(query.required("user_id", &query.user_id)?)?;
    let list = query.required("data_type", &query.data_type)?;
    let types = parse_data_types(list)?;
    Ok((action, user, types, !list.contains(','), query.site_id))
}

/// Whether `If-None-Match` names `etag` (or `*`); weak tags compare equal too.
fn if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let etag = etag.to_str().unwrap_or_default();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag
        })
}

async fn sync_post(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut saw = Seen::default();
    let response = timed(&app, async {
        let (request, user) =
            parse_post(&headers, body).await.map_err(|e| app.refuse_unauthenticated(peer.ip(), e))?;
        let (site, action, data_type) = match &request {
            PostRequest::Push(p) => (p.site_id.as_str(), Action::Push, &p.data_type),
            PostRequest::Delta(d) => (d.site_id.as_str(), Action::Delta, &d.data_type),
        };
        saw.action = action;
        saw.types = TypeSet::of(DataType::parse(data_type).ok().as_slice());
        let caller = app.admit(&headers, request.token(), peer.ip(), &user, Some(site), &mut saw)?;
        let domain = app.domain();
        match request {
            PostRequest::Push(push) => {
                let Written { data_type, record, replayed } = domain.push(&caller, push).await?;
                saw.replayed = replayed;
                let state = record_state(&record);
                Ok(json(
                    StatusCode::OK,
                    &PushAnswer {
                        success: true,
                        data_type,
                        timestamp: state.last_updated.clone(),
                        last_updated: state.last_updated,
                        version: state.version,
                        data: state.data,
                        replayed,
                    },
                ))
            }
            PostRequest::Delta(mut delta) => {
                let grant = match (delta.grant.take(), app.sites().keys()) {
                    (Some(grant), Some(keys)) => Some(keys.verify_grant(&grant)),
                    // Without auth anyone may credit anyway: a grant has nothing to add.
                    _ => None,
                };
                let Written { data_type, record, replayed } = domain.delta(&caller, delta, grant).await?;
                saw.replayed = replayed;
                let state = record_state(&record);
                Ok(json(
                    StatusCode::OK,
                    &DeltaAnswer {
                        success: true,
                        data_type,
                        version: state.version,
                        data: state.data,
                        last_updated: state.last_updated,
                        replayed,
                    },
                ))
            }
        }
    })
    .await;
    seen(response, saw)
}

/// Reads and parses a POST body: JSON only (415), at most [`MAX_BODY`] bytes (413).
async fn parse_post(headers: &HeaderMap, body: Body) -> Result<(PostRequest, UserId), ApiError> {
    let is_json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let mime = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    });
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than {} KiB", MAX_BODY / 1024),
        )
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return Err(too_large()),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                "the body could not be read",
            ));
        }
    };
    let request = PostRequest::parse(&bytes)?;
    let user_id = match &request {
        PostRequest::Push(p) => &p.user_id,
        PostRequest::Delta(d) => &d.user_id,
    };
    let user = UserId::parse(user_id)?;
    Ok((request, user))
}

async fn healthz(State(app): State<App>) -> Response {
    let response = match app.domain().store().check().await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({"success": true, "status": "ok"})),
        Err(e) => ApiError::from(e).into_response(),
    };
    seen(response, Seen { action: Action::Health, ..Seen::default() })
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET or POST")
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; the sync API is at /api/sync.php")
}

impl App {
    /// Who the request speaks for, after checking its token and the rate limits.
    /// `claimed_site` is the `site_id` the request names, if any; `saw` learns the token's
    /// site as soon as it is verified, so that later refusals are counted under it.
    fn admit(
        &self,
        headers: &HeaderMap,
        body_token: Option<&str>,
        ip: IpAddr,
        user: &UserId,
        claimed_site: Option<&str>,
        saw: &mut Seen,
    ) -> Result<Caller, ApiError> {
        let sites = self.sites();
        let Some(keys) = sites.keys() else {
            self.check_user(user.as_str())?;
            let site = SiteId::parse(claimed_site.unwrap_or("dev"))?;
            return Ok(Caller {
                site,
                user: user.clone(),
                admin: true,
                scopes: Scopes::ALL,
                ceilings: Ceilings::NONE,
            });
        };
        let token = bearer(headers).or(body_token);
        let verified = match token {
            Some(token) => keys.verify(token),
            None => Err(crate::auth::AuthError::Missing),
        };
        match verified {
            Ok(v) => {
                saw.site = self.metrics().site_index(v.site.as_str());
                self.check_user(v.user.as_str())?;
                if claimed_site.is_some_and(|s| s != v.site.as_str()) {
                    return Err(Refusal::forbidden(
                        "wrong_site",
                        "site_id must be the site that issued the token",
                    )
                    .into());
                }
                let origin = headers.get(header::ORIGIN).map(|o| o.to_str().unwrap_or(""));
                if origin.is_some_and(|o| !sites.site_allows_origin(v.site.as_str(), o)) {
                    return Err(Refusal::forbidden(
                        "origin_not_allowed",
                        format!("{}'s tokens are not accepted from this page's origin", v.site),
                    )
                    .into());
                }
                Ok(Caller {
                    site: v.site,
                    user: v.user,
                    admin: v.admin,
                    scopes: v.scopes,
                    ceilings: v.ceilings,
                })
            }
            Err(e) => {
                self.check_address(ip)?;
                Err(e.into())
            }
        }
    }

    /// A request refused before its token was read still counts against its address.
    fn refuse_unauthenticated(&self, ip: IpAddr, error: ApiError) -> ApiError {
        match self.check_address(ip) {
            Ok(()) => error,
            Err(wait) => wait,
        }
    }

    /// Charges a verified user's rate limit.
    fn check_user(&self, user: &str) -> Result<(), ApiError> {
        self.rate_limits().check_user(user).map_err(|wait| {
            self.metrics().rate_limited(LimitScope::User);
            wait.into()
        })
    }

    /// Charges the rate limit of an address whose request carries no valid token.
    fn check_address(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.rate_limits().check_address(ip).map_err(|wait| {
            self.metrics().rate_limited(LimitScope::Address);
            wait.into()
        })
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
