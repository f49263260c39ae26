//! The demo sites' own backends, one origin each: the site's static folder under `www/` at
//! `/`, what the sites share (`www/shared/`) at `/shared/`, the package at `/pkg/`,
//! `/config.json` (where the hub is and which site this is) and
//! `GET /api/token?user=ID`, a JWT for that user signed with the site's development key —
//! what a real site's PHP backend does, so the browser never sees a key. Keeps no state and
//! checks no password: whoever names a user id is that user, as befits a demo.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use hub::auth::Keys;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::process::root;

/// How long a token stays valid; the package asks for a new one when the hub answers 401.
const TOKEN_TTL_SECS: u64 = 600;

/// One demo site.
#[derive(Debug, Clone)]
pub struct Site {
    /// The hub's name for the site: the `iss` of its tokens, which selects its key.
    pub id: &'static str,
    /// The name people see, also in the other site's link to this one.
    pub name: &'static str,
    /// Its static files, under `www/`.
    pub folder: &'static str,
    pub port: u16,
}

impl Site {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The sites' servers, running until [`Running::stop`].
pub struct Running {
    stop: watch::Sender<bool>,
    servers: JoinSet<std::io::Result<()>>,
}

/// Binds every site's port (failing if one is taken) and starts serving them.
pub async fn start(sites: &[Site], hub_url: &str, keys: Arc<Keys>) -> anyhow::Result<Running> {
    let (stop, stopped) = watch::channel(false);
    let mut servers = JoinSet::new();
    for site in sites {
        let addr = SocketAddr::from(([127, 0, 0, 1], site.port));
        let listener =
            TcpListener::bind(addr).await.with_context(|| format!("cannot serve {} on {addr}", site.name))?;
        let config = serde_json::json!({
            "hubUrl": hub_url,
            "siteId": site.id,
            "siteName": site.name,
            "otherSites": sites
                .iter()
                .filter(|other| other.id != site.id)
                .map(|other| serde_json::json!({ "name": other.name, "url": other.url() }))
                .collect::<Vec<_>>(),
        });
        let backend = Arc::new(Backend { site: site.id, keys: Arc::clone(&keys), config });
        let mut stopped = stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        servers.spawn(
            axum::serve(listener, router(site, backend)).with_graceful_shutdown(shutdown).into_future(),
        );
    }
    Ok(Running { stop, servers })
}

impl Running {
    /// Stops accepting, lets requests in flight finish, and waits for every server.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        while let Some(result) = self.servers.join_next().await {
            result.context("a site server panicked")?.context("a site server failed")?;
        }
        Ok(())
    }
}

/// What a site's backend knows: its own id and key, and what its pages are told.
struct Backend {
    site: &'static str,
    keys: Arc<Keys>,
    config: serde_json::Value,
}

fn router(site: &Site, backend: Arc<Backend>) -> Router {
    let www = root().join("www").join(site.folder);
    Router::new()
        .route("/api/token", get(token))
        .route("/config.json", get(config))
        .with_state(backend)
        .nest_service("/pkg", ServeDir::new(root().join("pkg")))
        .nest_service("/shared", ServeDir::new(root().join("www").join("shared")))
        .fallback_service(ServeDir::new(www))
        // Pages and the package are revalidated on every load, so a rebuild shows at once.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        ))
}

#[derive(Deserialize)]
struct TokenQuery {
    user: String,
}

async fn token(State(backend): State<Arc<Backend>>, Query(query): Query<TokenQuery>) -> Response {
    if let Err(refusal) = protocol::UserId::parse(&query.user) {
        return (StatusCode::BAD_REQUEST, refusal.message).into_response();
    }
    match backend.keys.mint(backend.site, &query.user, TOKEN_TTL_SECS) {
        Ok(token) => ([(header::CACHE_CONTROL, "no-store")], token).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot sign a token: {e:#}")).into_response(),
    }
}

async fn config(State(backend): State<Arc<Backend>>) -> Json<serde_json::Value> {
    Json(backend.config.clone())
}
