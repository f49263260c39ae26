//! The flood the hub's connection and body limits are for, from many client addresses at
//! once. Each address holds its share of the hub's connections
//! (`limits.max_connections_per_address`): half are HTTP/1.1 keep-alives that ask
//! `/healthz` every 8 s and are otherwise silent, half are HTTP/2 connections whose every
//! stream is a push with a valid token, declaring a 64 KiB body and sending it a byte at a
//! time, which the hub cuts at its body timeout (or refuses `503 busy` once the bytes in
//! flight are full) before the stream starts another. Beyond its share, each address keeps
//! trying more connections, once a second each. Measures nothing: it prints one JSON line
//! once every share is held and holds them until killed, while `cargo xtask bench` measures
//! another address's requests.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue, ORIGIN};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::load::tcp;
use crate::scenario::{ORIGIN_URL, Requests};

/// How often an idle keep-alive asks again: within the hub's header read timeout (10 s),
/// which closes a connection silent for longer.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(8);
/// What a flooding upload declares it will send: the largest body the hub accepts.
const DECLARED_BYTES: usize = protocol::wire::MAX_BODY_BYTES;
/// How long one upload is kept going at most: past the hub's body timeout (10 s).
const UPLOAD_AT_MOST: Duration = Duration::from_secs(15);
/// An upload or a connection starts at most this often on its stream or slot, however soon
/// the hub ends the last one.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Connections being opened at once, so that the hub's listen backlog does not overflow.
const CONNECTING: usize = 64;
/// How long the flood may take to be in place.
const SETTING_UP: Duration = Duration::from_secs(300);

/// What the flood is.
pub struct Plan {
    /// The client addresses, each holding its share.
    pub sources: Vec<IpAddr>,
    /// The connections each address holds: the hub's per-address limit.
    pub per_address: usize,
    /// The uploads each HTTP/2 connection keeps going: the hub's stream limit.
    pub streams: usize,
    /// Connections each address keeps trying beyond its share.
    pub extra: usize,
    /// Between two bytes of an upload.
    pub trickle: Duration,
}

/// What `bench flood` prints once in place.
#[derive(Serialize)]
struct InPlace {
    addresses: usize,
    http1_connections: usize,
    http2_connections: usize,
    /// Uploads the HTTP/2 connections keep going, together.
    uploads: usize,
    /// How long it took to put the flood in place.
    secs: f64,
}

/// Floods `addr` as `plan` says; never returns unless the flood cannot be put in place.
pub async fn run(addr: SocketAddr, requests: Arc<Requests>, plan: Plan) -> anyhow::Result<()> {
    let started = Instant::now();
    let (in_place, mut placed) = mpsc::unbounded_channel::<()>();
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let plan = Arc::new(plan);
    for (a, &source) in plan.sources.iter().enumerate() {
        for slot in 0..plan.per_address + plan.extra {
            // Any slot that gets in counts: an extra one may take a place first, and the one it
            // took it from keeps trying.
            let held = Some(in_place.clone());
            let (plan, connecting) = (plan.clone(), connecting.clone());
            if slot % 2 == 0 {
                tokio::spawn(keep_alive(addr, source, held, connecting));
            } else {
                let user = a * plan.per_address + slot;
                let upload = Upload { addr, authorization: requests.authorization(user), plan };
                tokio::spawn(uploads(upload, source, held, connecting));
            }
        }
    }
    let held = plan.sources.len() * plan.per_address;
    let all_placed = async {
        for _ in 0..held {
            placed.recv().await;
        }
    };
    if tokio::time::timeout(SETTING_UP, all_placed).await.is_err() {
        bail!("the flood's {held} connections were not all open within {} s", SETTING_UP.as_secs());
    }
    let http2_connections = plan.sources.len() * (plan.per_address / 2);
    let printed = InPlace {
        addresses: plan.sources.len(),
        http1_connections: held - http2_connections,
        http2_connections,
        uploads: http2_connections * plan.streams,
        secs: started.elapsed().as_secs_f64(),
    };
    println!("{}", serde_json::to_string(&printed)?);
    std::future::pending().await
}

/// One HTTP/1.1 slot: a keep-alive asking `/healthz` every [`KEEP_ALIVE_EVERY`], opened again
/// whenever it closes. Tells `held` once it has been answered.
async fn keep_alive(
    addr: SocketAddr,
    source: IpAddr,
    mut held: Option<mpsc::UnboundedSender<()>>,
    connecting: Arc<Semaphore>,
) {
    loop {
        let retry_at = Instant::now() + RETRY_EVERY;
        if let Ok(mut sender) = open_http1(addr, source, &connecting).await {
            while sender.ready().await.is_ok() {
                let request = hyper::Request::get("/healthz")
                    .header(HOST, addr.to_string())
                    .body(Empty::<Bytes>::new())
                    .expect("a health check is well formed");
                let Ok(response) = sender.send_request(request).await else { break };
                let answered = response.status().is_success();
                if response.into_body().collect().await.is_err() || !answered {
                    break;
                }
                if let Some(held) = held.take() {
                    let _ = held.send(());
                }
                tokio::time::sleep(KEEP_ALIVE_EVERY).await;
            }
        }
        tokio::time::sleep_until(retry_at).await;
    }
}

async fn open_http1(
    addr: SocketAddr,
    source: IpAddr,
    connecting: &Semaphore,
) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    let _turn = connecting.acquire().await?;
    let (sender, connection) = http1::handshake(TokioIo::new(tcp(addr, Some(source)).await?)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// What every upload of one HTTP/2 slot sends.
struct Upload {
    addr: SocketAddr,
    authorization: HeaderValue,
    plan: Arc<Plan>,
}

/// One HTTP/2 slot: a connection with [`Plan::streams`] uploads going, opened again whenever
/// it closes. Tells `held` once it is open.
async fn uploads(
    upload: Upload,
    source: IpAddr,
    mut held: Option<mpsc::UnboundedSender<()>>,
    connecting: Arc<Semaphore>,
) {
    let upload = Arc::new(upload);
    loop {
        let retry_at = Instant::now() + RETRY_EVERY;
        if let Ok(sender) = open_http2(upload.addr, source, &connecting).await {
            if let Some(held) = held.take() {
                let _ = held.send(());
            }
            let mut streams = JoinSet::new();
            for _ in 0..upload.plan.streams {
                streams.spawn(upload_stream(sender.clone(), upload.clone()));
            }
            while streams.join_next().await.is_some() {}
        }
        tokio::time::sleep_until(retry_at).await;
    }
}

async fn open_http2(
    addr: SocketAddr,
    source: IpAddr,
    connecting: &Semaphore,
) -> anyhow::Result<http2::SendRequest<Channel<Bytes>>> {
    let _turn = connecting.acquire().await?;
    let io = TokioIo::new(tcp(addr, Some(source)).await?);
    let (mut sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
    tokio::spawn(connection);
    sender.ready().await?;
    Ok(sender)
}

/// One stream's uploads, one after another, until the connection closes.
async fn upload_stream(mut sender: http2::SendRequest<Channel<Bytes>>, upload: Arc<Upload>) {
    loop {
        let retry_at = Instant::now() + RETRY_EVERY;
        if sender.ready().await.is_err() {
            return;
        }
        let (mut bytes, body) = Channel::<Bytes>::new(1);
        let request = hyper::Request::post("/api/sync.php")
            .header(HOST, upload.addr.to_string())
            .header(ORIGIN, HeaderValue::from_static(ORIGIN_URL))
            .header(AUTHORIZATION, upload.authorization.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(CONTENT_LENGTH, DECLARED_BYTES)
            .body(body)
            .expect("an upload is well formed");
        let answer = sender.send_request(request);
        let trickle = async {
            while bytes.send_data(Bytes::from_static(b" ")).await.is_ok() {
                tokio::time::sleep(upload.plan.trickle).await;
            }
        };
        // Sending goes on after an early answer (503 busy) for as long as the hub reads.
        let _ = tokio::time::timeout(UPLOAD_AT_MOST, async { tokio::join!(answer, trickle) }).await;
        tokio::time::sleep_until(retry_at).await;
    }
}
