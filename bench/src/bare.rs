//! The ceiling: a bare hyper 1.x server that answers every request with the same small
//! JSON body, without routing, auth, limits or storage. No endpoint on this machine can be
//! faster, so the hub's results are reported as fractions of this one's.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// About the size of the hub's answer to a three-type timestamp check.
pub const BODY: &str = r#"{"success":true,"timestamps":{"balance":{"last_updated":"2026-11-25T12:00:00.000Z","version":1},"profile":{"last_updated":"2026-11-25T12:00:00.000Z","version":1},"roles":{"last_updated":null,"version":0}},"epoch":"bench"}"#;

/// Serves [`BODY`] on `listen` until the process ends, printing the bound address first.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_request: Request<Incoming>| async {
                let mut response = Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
                response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Ok::<_, Infallible>(response)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
