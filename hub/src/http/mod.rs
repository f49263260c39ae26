//! Routes and the HTTP rules around them: CORS, request ids, body limits, timeouts, auth
//! and rate limits. Handlers parse, call the domain and shape its answer; every rule about
//! the data itself lives in the domain.

mod access_log;
mod admin;
mod answer;
mod app;
mod body;
mod changes;
mod client;
mod error;
mod events;
mod logs;
mod refusals;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing;
use protocol::{
    BatchRequest, DataType, DeltaRequest, GetQuery, PostRequest, PushRequest, QueryAction, Refusal, UserId,
    parse_data_types,
};
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

pub(crate) use answer::{json, record_state};
pub use app::{App, Sites};
use body::Unread;
pub use client::ClientAddr;
pub use error::ApiError;

use crate::domain::{Caller, DomainError, Written};
use crate::metrics::{Action, Seen, TypeSet};

/// Largest request body accepted: what a browser lets a leaving page's `keepalive`
/// requests carry, so that whatever a page sends when it leaves can arrive.
pub const MAX_BODY: usize = protocol::wire::MAX_BODY_BYTES;

/// Sent with every answer over HTTPS: browsers then use only HTTPS for the hub's name, for a
/// year from each answer. Never sent over plain HTTP, where it would mean nothing.
const HSTS: &str = "max-age=31536000";

/// The hub's routes with every layer applied.
pub fn router(app: App) -> Router {
    let sync = routing::get(sync_get).post(sync_post).fallback(method_not_allowed);
    let router = Router::new()
        .route("/api/sync.php", sync.clone())
        .route("/api/sync", sync)
        .route("/api/events", routing::get(events::events).fallback(method_not_allowed))
        .route("/api/changes", routing::get(changes::changes).fallback(method_not_allowed))
        .route("/healthz", routing::get(healthz))
        .merge(admin::routes())
        .fallback(not_found)
        .with_state(app.clone())
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(app.clone(), observe))
                .layer(SetRequestIdLayer::x_request_id(RequestCounter::default()))
                .layer(middleware::from_fn_with_state(app.clone(), client::identify))
                // Answers of 5xx are counted in /metrics, and the store's failures logged where
                // they happen: a flood of `503 busy` must not fill the operator's logs.
                .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG)).make_span_with(|req: &Request<Body>| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
                    match req.extensions().get::<ClientAddr>() {
                        Some(c) => {
                            tracing::info_span!("req", id = %id, client = %c.ip(), scheme = %c.scheme())
                        }
                        None => tracing::info_span!("req", id = %id),
                    }
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

/// Counts every answer — preflights and refusals included — with what its handler saw, and
/// logs it ([`logs`]: the access log, refused tokens and rate limits).
async fn observe(State(app): State<App>, request: Request<Body>, next: Next) -> Response {
    let start = Instant::now();
    let preflight = request.method() == Method::OPTIONS;
    let asked = logs::Asked {
        method: request.method().clone(),
        authorization: request.headers().get(header::AUTHORIZATION).cloned(),
    };
    let response = next.run(request).await;
    let took = start.elapsed();
    let fallback =
        Seen { action: if preflight { Action::Preflight } else { Action::Other }, ..Seen::default() };
    let seen = response.extensions().get::<Seen>().unwrap_or(&fallback);
    app.metrics().request(seen, response.status().as_u16(), took);
    app.logs().answered(&app, &asked, &response, seen, took);
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
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| app.allows_origin(origin)))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_NONE_MATCH,
            HeaderName::from_static("last-event-id"),
        ])
        // `Date`: the hub's clock, from which a page dates the op ids it makes (UUIDv7).
        .expose_headers([
            header::ETAG,
            header::RETRY_AFTER,
            header::DATE,
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(7200))
}

/// Runs a handler within the request timeout.
async fn timed(app: &App, work: impl Future<Output = Result<Response, ApiError>>) -> Response {
    timed_beyond(app, Duration::ZERO, work).await
}

/// Runs a handler within the request timeout and `wait` more: one that waits on purpose.
async fn timed_beyond(
    app: &App,
    wait: Duration,
    work: impl Future<Output = Result<Response, ApiError>>,
) -> Response {
    match tokio::time::timeout(app.config().limits.request_timeout() + wait, work).await {
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
    client: ClientAddr,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut saw = Seen::default();
    let response = timed(&app, async {
        let query = parse_get(query.as_deref().unwrap_or(""))
            .map_err(|e| app.refuse_unauthenticated(client.ip(), e))?;
        saw.action = match query.action {
            QueryAction::Timestamp => Action::Timestamp,
            QueryAction::Get => Action::Get,
        };
        saw.types = TypeSet::of(&query.types);
        let caller = app.admit(&headers, client.ip(), &query.user, query.site.as_deref(), &mut saw).await?;
        if app.logs().keeps_access() {
            saw.who.get_or_insert_with(|| (caller.site.clone(), caller.user.clone()));
        }
        match query.action {
            QueryAction::Timestamp => timestamp(&app, &caller, query).await,
            QueryAction::Get => get(&app, &caller, query, &headers).await,
        }
    })
    .await;
    seen(response, saw)
}

/// `action=timestamp`: the versions of the caller's records.
async fn timestamp(app: &App, caller: &Caller, query: Query) -> Result<Response, ApiError> {
    let domain = app.domain();
    let stamps = domain.stamps(caller, &query.user, query.site.as_deref(), &query.types).await?;
    Ok(answer::timestamps(&query.types, stamps, query.single, domain.epoch().to_owned()))
}

/// `action=get`: the caller's records.
async fn get(app: &App, caller: &Caller, query: Query, headers: &HeaderMap) -> Result<Response, ApiError> {
    let domain = app.domain();
    let records = domain.records(caller, &query.user, query.site.as_deref(), &query.types).await?;
    Ok(answer::records(&query.types, records, query.single, domain.epoch().to_owned(), headers))
}

/// A GET query, read.
struct Query {
    action: QueryAction,
    user: UserId,
    types: Vec<DataType>,
    /// One data type was asked for (the answer is flat), not a comma list.
    single: bool,
    /// The `site_id` some seed scripts send.
    site: Option<String>,
}

fn parse_get(raw: &str) -> Result<Query, ApiError> {
    let query: GetQuery = serde_urlencoded::from_str(raw)
        .map_err(|e| Refusal::invalid("invalid_query", format!("the query string is malformed: {e}")))?;
    let action = query.action()?;
    let user = UserId::parse(query.required("user_id", &query.user_id)?)?;
    let list = query.required("data_type", &query.data_type)?;
    let types = parse_data_types(list)?;
    Ok(Query { action, user, types, single: !list.contains(','), site: query.site_id })
}

/// A POST, in this order: its token and the rate limit it selects, what its headers say of its
/// body, then the body itself, read within the body timeout, and its ops beyond the first
/// counted once it is parsed. Nothing of the body is read before its token is checked; a body
/// left unread is discarded once the request is answered.
async fn sync_post(State(app): State<App>, client: ClientAddr, headers: HeaderMap, body: Body) -> Response {
    let mut saw = Seen::default();
    let mut unread = Some(body);
    let timeout = app.config().limits.body_timeout();
    let response = timed(&app, async {
        let caller = app.admit_token(&headers, client.ip(), &mut saw).await?;
        // With auth off, nothing is counted before the body names its user: a refusal until
        // then counts against the address.
        let anonymous = |e| if caller.is_some() { e } else { app.refuse_unauthenticated(client.ip(), e) };
        let _held = body::admit(&app, &headers).map_err(anonymous)?;
        let Some(body) = unread.take() else { unreachable!("the body is read once") };
        let bytes = match body::read(body, timeout).await {
            Ok(bytes) => bytes,
            Err(e) => {
                let error = e.error(timeout);
                match e {
                    Unread::TooLarge(rest) => unread = Some(rest),
                    Unread::TimedOut => app.body_timed_out(client.ip()),
                    Unread::Broken => {}
                }
                return Err(anonymous(error));
            }
        };
        let (request, user) = parse_post(&bytes).map_err(anonymous)?;
        let (action, types, ops) = match &request {
            PostRequest::Push(p) => (Action::Push, vec![p.data_type.as_str()], 1),
            PostRequest::Delta(d) => (Action::Delta, vec![d.data_type.as_str()], 1),
            PostRequest::Batch(b) => {
                (Action::Batch, b.ops.iter().map(|op| op.data_type()).collect(), b.ops.len())
            }
        };
        saw.action = action;
        let types: Vec<DataType> = types.into_iter().filter_map(|t| DataType::parse(t).ok()).collect();
        saw.types = TypeSet::of(&types);
        let caller = match caller {
            Some(caller) => {
                app.check_batch(&caller, ops).await?;
                caller
            }
            None => app.admit_named(&user, Some(request.site_id()), ops).await?,
        };
        if app.logs().keeps_access() {
            saw.who.get_or_insert_with(|| (caller.site.clone(), caller.user.clone()));
        }
        match request {
            PostRequest::Push(request) => {
                let written = push(&app, &caller, request).await?;
                saw.replayed = written.replayed;
                Ok(answer::pushed(written))
            }
            PostRequest::Delta(request) => {
                let written = delta(&app, &caller, request).await?;
                saw.replayed = written.replayed;
                Ok(answer::delta(written))
            }
            PostRequest::Batch(batch) => Ok(self::batch(&app, &caller, batch).await),
        }
    })
    .await;
    if let Some(body) = unread {
        body::discard(body, &headers, &app.config().limits);
    }
    seen(response, saw)
}

/// `action=batch`: each op in order, answered as if sent alone. The first op that fails for a
/// reason worth retrying (the store, a timeout) stops the batch: it and the ops after it
/// stay for the client to send again, in the same order.
async fn batch(app: &App, caller: &Caller, batch: BatchRequest) -> Response {
    let mut results = Vec::with_capacity(batch.ops.len());
    let mut stopped = false;
    for op in batch.ops {
        let op_id = op.op_id().unwrap_or_default().to_owned();
        if stopped {
            results.push(answer::not_attempted(&op_id));
            continue;
        }
        let written = match op {
            PostRequest::Push(request) => push(app, caller, request).await.map(answer::pushed_body),
            PostRequest::Delta(request) => delta(app, caller, request).await.map(answer::delta_body),
            // `BatchRequest::parse` refuses it; answered as it would be all the same.
            PostRequest::Batch(_) => Err(Refusal::invalid("invalid_batch", "batches do not nest").into()),
        };
        let (status, body) = match written {
            Ok(body) => (StatusCode::OK, body),
            Err(e) => {
                let e = ApiError::from(e);
                (e.status, e.body())
            }
        };
        stopped = status.is_server_error();
        results.push(answer::batch_result(status, body, &op_id));
    }
    answer::batch(results)
}

/// `action=push`.
async fn push(app: &App, caller: &Caller, request: PushRequest) -> Result<Written, DomainError> {
    app.domain().push(caller, request).await
}

/// `action=delta`, its grant (if any) checked against the sites' keys first.
async fn delta(app: &App, caller: &Caller, mut request: DeltaRequest) -> Result<Written, DomainError> {
    let grant = match (request.grant.take(), app.sites().keys()) {
        (Some(grant), Some(keys)) => Some(keys.verify_grant(&grant)),
        // Without auth anyone may credit anyway: a grant has nothing to add.
        _ => None,
    };
    app.domain().delta(caller, request, grant).await
}

/// Parses a POST body, and the user it names.
fn parse_post(bytes: &[u8]) -> Result<(PostRequest, UserId), ApiError> {
    let request = PostRequest::parse(bytes)?;
    let user = UserId::parse(request.user_id())?;
    Ok((request, user))
}

async fn healthz(State(app): State<App>) -> Response {
    let response = match app.domain().store().check().await {
        Ok(()) if app.draining() => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"success": false, "status": "draining"}),
        ),
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

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
