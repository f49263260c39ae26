//! Connections: accepting them up to a limit in all and a share per client address,
//! serving HTTP/1.1 and HTTP/2 — over TLS when a certificate is configured — with a header
//! read timeout, closing those that stay idle, and shutting down gracefully — in-flight
//! requests finish, pending writes are flushed, then the store closes. Reading certificates
//! is `tls`'s work.

mod connection;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tower::ServiceExt;

use crate::http::App;
use crate::metrics::Metrics;
use crate::time::now_ms;
use connection::{Activity, AnswerBody, PerAddress};

/// How often fully recovered rate-limit keys are forgotten, and the dashboard's slot moves
/// on (it is ten seconds long).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(2);
/// How long shutdown waits for in-flight requests.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The HTTP/2 connection preface; a connection that starts with anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What an HTTP/1.1 connection may have sent that the hub has not read yet: enough for any
/// request's headers and a whole body (hyper's default read buffer grows to about 400 KiB).
const READ_BUFFER_BYTES: usize = crate::http::MAX_BODY;
/// What an HTTP/2 stream may send ahead of the hub's reading: one whole body.
const H2_STREAM_WINDOW: u32 = crate::http::MAX_BODY as u32;
/// What an HTTP/2 connection may send ahead of the hub's reading, over all its streams: two
/// bodies, so that no client parks more than that in the hub's memory per connection, beside
/// the bodies in flight that `limits.max_body_bytes_in_flight` counts.
const H2_CONNECTION_WINDOW: u32 = 2 * H2_STREAM_WINDOW;

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Http1,
    Http2,
}

/// Waits, at most `timeout`, until the client's first bytes tell which protocol it speaks.
/// hyper's header timeout starts only once the protocol is known, so without this a client
/// that connects and stays silent (or stops inside the HTTP/2 preface) would hold one of
/// the `max_connections` forever.
async fn speaks_in_time(stream: &TcpStream, timeout: Duration) -> Option<Version> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 && buf[..n] != H2_PREFACE[..n] => return Some(Version::Http1),
            Ok(Ok(n)) if n == buf.len() => return Some(Version::Http2),
            Ok(Ok(n)) if n > 0 && tokio::time::Instant::now() < deadline => {
                // Part of the preface: the rest has not arrived yet.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => return None,
        }
    }
}

/// How a connection is served once its version is known (from its first bytes, or from ALPN
/// over TLS): with hyper's builder for that version alone. hyper-util's `auto` builder, which
/// finds the version itself, reads a connection's first 24 bytes on its own and hands them to
/// hyper as a first read of their own; the read that follows finds the 8 KiB read buffer 24
/// bytes short and doubles it to 16 KiB, which an HTTP/1.1 connection then keeps for its life.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

/// How connections are served over TLS: the handshake, then the HTTP version ALPN chose
/// (HTTP/1.1 when the client offered no ALPN).
struct TlsServing {
    acceptor: TlsAcceptor,
}

impl TlsServing {
    /// The TLS stream, if the handshake finishes within `timeout`, and its HTTP version.
    async fn handshake(
        &self,
        stream: TcpStream,
        timeout: Duration,
        peer: SocketAddr,
    ) -> Option<(TlsStream<TcpStream>, Version)> {
        match tokio::time::timeout(timeout, self.acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                Some((stream, if h2 { Version::Http2 } else { Version::Http1 }))
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %peer, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake not finished in time");
                None
            }
        }
    }
}

/// Awaits `connection`, or closes it if its first request has not arrived within `timeout`.
/// Nothing can be peeked at inside TLS, and hyper's HTTP/2 side waits for the client's
/// preface without a limit, so without this a client that finishes the handshake and then
/// stays silent would keep its connection slot.
async fn first_request_within<T>(
    timeout: Duration,
    activity: &Activity,
    connection: impl Future<Output = T>,
) -> Option<T> {
    let mut connection = pin!(connection);
    tokio::select! {
        ended = connection.as_mut() => return Some(ended),
        () = tokio::time::sleep(timeout) => {}
    }
    if !activity.has_had_a_request() {
        return None;
    }
    Some(connection.await)
}

/// What closes a connection besides its client: its idle time and the hub's stop.
struct Idle<'a> {
    activity: &'a Activity,
    timeout: Duration,
    stop: watch::Receiver<bool>,
    metrics: &'a Metrics,
}

/// Serves `connection` until it ends. It is closed gracefully — requests in progress
/// finish, then it closes — once it has had no request in progress for `idle.timeout`, or
/// when the hub stops (`idle.stop` changes). A peer that keeps it open after that (an HTTP/2
/// peer that never answers the ping of the server's GOAWAY) loses it after another
/// `idle.timeout` without a request. hyper-util's `GracefulShutdown` watches a connection
/// for the stop only, and takes it whole, so the idle close could not reach it. Every
/// connection's task holds this future: it is kept small.
async fn serve_until_idle<C: GracefulConnection>(
    mut connection: Pin<&mut C>,
    idle: Idle<'_>,
) -> Result<(), C::Error> {
    let Idle { activity, timeout: idle_timeout, mut stop, metrics } = idle;
    let mut closing = false;
    loop {
        tokio::select! {
            ended = connection.as_mut() => return ended,
            () = activity.idle_for(idle_timeout) => {
                if closing {
                    return Ok(());
                }
                metrics.connection_closed_idle();
            }
            _ = stop.changed(), if !closing => {}
        }
        closing = true;
        connection.as_mut().graceful_shutdown();
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then drains connections and
/// closes the store. Serves HTTPS when the app has a certificate ([`App::tls`]); the TLS
/// handshake must then finish within the header read timeout. A connection from an address
/// (or IPv6 /64) that holds `max_connections_per_address` already is closed as soon as it
/// is accepted, unless it comes from one of the `trusted_proxies`. Tests bind `127.0.0.1:0`
/// and pass a future they control.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let router = crate::http::router(app.clone());
    let limits = app.config().limits.clone();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = PerAddress::new(limits.max_connections_per_address);
    // Changed when the hub stops; every connection holds a receiver until it ends.
    let (stopping, stop) = watch::channel(false);
    let housekeeping = tokio::spawn({
        let app = app.clone();
        async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
            loop {
                tick.tick().await;
                app.rate_limits().purge();
                app.metrics().roll(now_ms());
                app.housekeeping_logs(now_ms());
            }
        }
    });
    let mut protocols =
        Protocols { http1: http1::Builder::new(), http2: http2::Builder::new(TokioExecutor::new()) };
    protocols
        .http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout())
        .max_buf_size(READ_BUFFER_BYTES);
    protocols
        .http2
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        // An HTTP/2 peer that stops answering pings is gone: its connection is closed.
        .keep_alive_interval(limits.header_read_timeout())
        .keep_alive_timeout(limits.header_read_timeout());
    // Over TLS the protocol is known once the handshake is done: ALPN chose it.
    let tls = app.tls().map(|tls| Arc::new(TlsServing { acceptor: tls.acceptor() }));
    let protocols = Arc::new(protocols);
    app.events().start(app.domain().store().as_ref());
    // Before the first connection is accepted: every write accepted from now on is notified.
    let webhooks = app.webhooks().start(app.domain().store().clone(), app.events().committed()).await;

    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and similar: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let share = if app.config().trusted_proxies.contains(peer.ip()) {
            None
        } else if let Some(share) = per_address.take(peer.ip()) {
            Some(share)
        } else {
            tracing::debug!(%peer, "connection refused: its address holds max_connections_per_address");
            app.metrics().connection_refused_per_address();
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        // No handler runs longer than the request timeout: an answer that stands still for
        // that and an idle timeout more is stuck behind a client that reads nothing.
        let activity = Activity::new(
            app.metrics().connection_states(),
            limits.request_timeout() + limits.idle_timeout(),
        );
        let service = hyper::service::service_fn({
            let activity = activity.clone();
            move |mut request: hyper::Request<Incoming>| {
                let in_progress = activity.request_arrived();
                request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                let answer = router.clone().oneshot(request);
                async move {
                    let answer = answer.await?;
                    Ok::<_, Infallible>(answer.map(|body| AnswerBody::new(body, in_progress)))
                }
            }
        });
        let (protocols, tls, stop) = (protocols.clone(), tls.clone(), stop.clone());
        let (header_read_timeout, idle_timeout) = (limits.header_read_timeout(), limits.idle_timeout());
        let app = app.clone();
        tokio::spawn(async move {
            let metrics = app.metrics();
            metrics.connection_opened();
            let ended = match tls {
                None => match speaks_in_time(&stream, header_read_timeout).await {
                    Some(Version::Http1) => {
                        let idle = Idle { activity: &activity, timeout: idle_timeout, stop, metrics };
                        let connection =
                            pin!(protocols.http1.serve_connection(TokioIo::new(stream), service));
                        Some(serve_until_idle(connection, idle).await)
                    }
                    // Boxed, as TLS is below: an HTTP/2 connection's state is several times an
                    // HTTP/1.1 one's, and each connection's task would otherwise be as large as
                    // the largest.
                    Some(Version::Http2) => Some(
                        Box::pin(async {
                            let idle = Idle { activity: &activity, timeout: idle_timeout, stop, metrics };
                            let connection =
                                pin!(protocols.http2.serve_connection(TokioIo::new(stream), service));
                            serve_until_idle(connection, idle).await
                        })
                        .await,
                    ),
                    None => None,
                },
                Some(tls) => {
                    Box::pin(async move {
                        let (stream, version) = tls.handshake(stream, header_read_timeout, peer).await?;
                        let idle = Idle { activity: &activity, timeout: idle_timeout, stop, metrics };
                        let io = TokioIo::new(stream);
                        match version {
                            Version::Http1 => {
                                let connection = pin!(protocols.http1.serve_connection(io, service));
                                let serving = serve_until_idle(connection, idle);
                                first_request_within(header_read_timeout, &activity, serving).await
                            }
                            Version::Http2 => {
                                let connection = pin!(protocols.http2.serve_connection(io, service));
                                let serving = serve_until_idle(connection, idle);
                                first_request_within(header_read_timeout, &activity, serving).await
                            }
                        }
                    })
                    .await
                }
            };
            if let Some(Err(e)) = ended {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            metrics.connection_closed();
            drop((permit, share));
        });
    }
    drop((listener, stop));
    housekeeping.abort();
    tracing::info!("shutting down: finishing in-flight requests");
    // Event streams never finish by themselves: they end first, so that their connections can.
    app.events().stop();
    stopping.send_replace(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, stopping.closed()).await.is_err() {
        tracing::warn!("some connections did not finish within {SHUTDOWN_GRACE:?}");
    }
    app.stopping_logs();
    webhooks.stop().await;
    app.domain().store().close().await;
    tracing::info!("store closed; all accepted writes are durable");
    Ok(())
}
