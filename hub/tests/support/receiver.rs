//! A site's webhook receiver for the tests: a real HTTP server on `127.0.0.1:0` that keeps
//! every request it is sent (headers and body) and answers as the test sets it — acknowledging,
//! failing with a status, redirecting, or never answering — and that verifies a notification's
//! signature with the `hmac` crate, apart from the hub's own code.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::Notify;

/// How long a test waits for a notification before it fails.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A Standard Webhooks secret for tests: `whsec_` and the base64 of 32 bytes made of `seed`.
pub fn secret(seed: u8) -> String {
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([seed; 32]))
}

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `200 OK`: delivered.
    Ok,
    /// This status, with nothing else.
    Status(u16),
    /// `302 Found` to the receiver itself: a redirect the hub must not follow.
    Redirect,
    /// Never: the request is held open until the test ends.
    Hang,
}

/// One request the receiver was sent, with what it answered.
#[derive(Debug, Clone)]
pub struct Received {
    /// The path it was sent to.
    pub path: String,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub content_type: String,
    pub body: String,
    pub json: Value,
    /// What the receiver answered (`None` while it hangs).
    pub answered: Option<Answer>,
}

impl Received {
    pub fn user(&self) -> &str {
        self.json["user_id"].as_str().unwrap_or_default()
    }

    pub fn data_type(&self) -> &str {
        self.json["data_type"].as_str().unwrap_or_default()
    }

    pub fn version(&self) -> u64 {
        self.json["version"].as_u64().unwrap_or_default()
    }

    pub fn delivered(&self) -> bool {
        self.answered == Some(Answer::Ok)
    }
}

#[derive(Debug)]
struct Inner {
    answer: Mutex<Answer>,
    received: Mutex<Vec<Received>>,
    arrived: Notify,
}

/// A running receiver; it stops when dropped.
pub struct Receiver {
    pub url: String,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    /// A receiver answering `answer` until told otherwise.
    pub async fn start(answer: Answer) -> Receiver {
        Receiver::start_on(0, answer).await
    }

    /// A receiver on `port` of 127.0.0.1 (0: any free one).
    pub async fn start_on(port: u16, answer: Answer) -> Receiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let url = format!("http://{}/webhooks/unified-sync", listener.local_addr().unwrap());
        let (inner, app) = Inner::serving(answer);
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { url, inner, server }
    }

    /// A receiver speaking HTTPS on a free port of 127.0.0.1, with the certificate (for
    /// 127.0.0.1) and key of these PEM files.
    pub async fn start_tls(answer: Answer, cert: &Path, key: &Path) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/webhooks/unified-sync", listener.local_addr().unwrap());
        let (inner, app) = Inner::serving(answer);
        let acceptor = hub::tls::Tls::load(cert, key).unwrap().acceptor();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { url, inner, server }
    }

    /// From now on, answer `answer`.
    pub fn answer(&self, answer: Answer) {
        *self.inner.answer.lock().unwrap() = answer;
    }

    /// Every request received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }

    /// The notifications acknowledged so far, in arrival order.
    pub fn delivered(&self) -> Vec<Received> {
        self.received().into_iter().filter(Received::delivered).collect()
    }

    /// Waits until what was received satisfies `done`, failing the test after [`PATIENCE`].
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let arrived = self.inner.arrived.notified();
            let received = self.received();
            if done(&received) {
                return received;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("the receiver did not get {what} within {PATIENCE:?}; it got {received:#?}");
            }
            // Woken by each arrival, and every so often in case one came between the read and now.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), arrived).await;
        }
    }

    /// Waits until a notification of `user`'s `data_type` at `version` was acknowledged.
    pub async fn wait_delivered(&self, user: &str, data_type: &str, version: u64) -> Received {
        let what = format!("{user}'s {data_type} at version {version}");
        let received = self
            .wait_for(&what, |all| {
                all.iter().any(|r| {
                    r.delivered() && r.user() == user && r.data_type() == data_type && r.version() == version
                })
            })
            .await;
        received
            .into_iter()
            .find(|r| {
                r.delivered() && r.user() == user && r.data_type() == data_type && r.version() == version
            })
            .unwrap()
    }
}

impl Inner {
    /// A receiver's state, answering `answer`, and the routes that fill it.
    fn serving(answer: Answer) -> (Arc<Inner>, Router) {
        let inner = Arc::new(Inner {
            answer: Mutex::new(answer),
            received: Mutex::new(Vec::new()),
            arrived: Notify::new(),
        });
        let app = Router::new().fallback(receive).with_state(inner.clone());
        (inner, app)
    }
}

async fn receive(State(inner): State<Arc<Inner>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let answer = *inner.answer.lock().unwrap();
    let body = String::from_utf8_lossy(&body).into_owned();
    let received = Received {
        path: uri.path().to_owned(),
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        content_type: header("content-type"),
        json: serde_json::from_str(&body).unwrap_or(Value::Null),
        body,
        answered: (answer != Answer::Hang).then_some(answer),
    };
    inner.received.lock().unwrap().push(received);
    inner.arrived.notify_waiters();
    match answer {
        Answer::Ok => StatusCode::OK.into_response(),
        Answer::Status(status) => StatusCode::from_u16(status).unwrap().into_response(),
        Answer::Redirect => (StatusCode::FOUND, [(header::LOCATION, "/webhooks/elsewhere")]).into_response(),
        Answer::Hang => std::future::pending().await,
    }
}

/// Whether `received` carries a valid signature by `secret` (`whsec_…`): one of the
/// space-separated `v1,<base64>` of its `webhook-signature` is the HMAC-SHA256 of
/// `{id}.{timestamp}.{body}`, compared in constant time.
pub fn signed_by(secret: &str, received: &Received) -> bool {
    let key =
        base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    received.signature.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|signature| {
        let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(signature) else { return false };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{}.{}.{}", received.id, received.timestamp, received.body).as_bytes());
        mac.verify_slice(&signature).is_ok()
    })
}
