//! The operator's view: `/metrics` for Prometheus, and `/dashboard`, a page drawing the last
//! hour. What they show is for admins only (callers on loopback that came through no proxy,
//! or the metrics token); the page's own files hold no data and are served to anyone, so an
//! admin on another machine can open it and paste the token. Nothing here reads or writes a user's records.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Serialize;

use super::{App, ClientAddr};
use super::{json, seen};
use crate::metrics::{Action, Recent, Seen};
use crate::time::now_ms;
use crate::webhooks::WebhookView;

/// The dashboard's files, built into the binary so that the hub serves them wherever it runs.
const INDEX_HTML: &str = include_str!("../../../www/dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("../../../www/dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../../../www/dashboard/dashboard.css");

/// The page runs only its own script and style and talks only to this hub.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub(super) fn routes() -> Router<App> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/dashboard", get(|| async { Redirect::permanent("/dashboard/") }))
        .route("/dashboard/", get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }))
        .route(
            "/dashboard/dashboard.js",
            get(|| async { page(DASHBOARD_JS, "text/javascript; charset=utf-8") }),
        )
        .route("/dashboard/dashboard.css", get(|| async { page(DASHBOARD_CSS, "text/css; charset=utf-8") }))
        .route("/dashboard/data", get(data))
}

fn admin(response: Response) -> Response {
    seen(response, Seen { action: Action::Admin, ..Seen::default() })
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    admin(response)
}

/// Every metric, in the OpenMetrics text format Prometheus scrapes.
async fn metrics(State(app): State<App>, client: ClientAddr, headers: HeaderMap) -> Response {
    let response = match app.admit_admin(&headers, client) {
        Ok(()) => {
            let mut response = app.metrics().encode().into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => e.into_response(),
    };
    admin(response)
}

/// What the dashboard shows: the last hour, and the sites' webhooks as they stand.
#[derive(Serialize)]
struct Dashboard {
    #[serde(flatten)]
    recent: Recent,
    webhooks: Vec<WebhookView>,
}

/// The last hour in ten-second slots, for the dashboard's charts, and the webhooks' queues.
async fn data(State(app): State<App>, client: ClientAddr, headers: HeaderMap) -> Response {
    let response = match app.admit_admin(&headers, client) {
        Ok(()) => json(
            StatusCode::OK,
            &Dashboard { recent: app.metrics().recent(now_ms()), webhooks: app.webhooks().views() },
        ),
        Err(e) => e.into_response(),
    };
    admin(response)
}
