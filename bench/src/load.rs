//! The load generator: a fixed number of HTTP/1.1 keep-alive connections, each sending its
//! next request when the previous answer has been read (closed loop, for peak throughput)
//! or on a fixed schedule (open loop, for latency at a given rate). Latency is counted
//! from when a request was due, not when it was sent, so a stalled server cannot hide its
//! stall by delaying the requests that would have measured it. The connections may be spread
//! over several instances of one hub, in turn.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::scenario::Requests;

/// How one run is driven.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub connections: usize,
    /// Requests sent but not counted, so that caches and the JIT-free hot paths settle.
    pub warmup: Duration,
    pub duration: Duration,
    /// Requests per second over all connections (open loop); `None` = as fast as answered.
    pub rate: Option<f64>,
    /// The local address every connection is made from (any loopback address), so that the
    /// hub counts this client apart from others on the same machine.
    pub source: Option<IpAddr>,
}

/// What a run measured, over its measured part only.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub requests: u64,
    /// Connections that failed mid-run (each reconnects).
    pub errors: u64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    pub requests_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Bytes of answer bodies, on average.
    pub mean_body_bytes: f64,
}

struct ConnResult {
    histogram: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    body_bytes: u64,
}

/// Runs `plan` against `addrs`: connection `n` goes to `addrs[n % addrs.len()]`, and
/// reconnects there.
pub async fn run(addrs: &[SocketAddr], requests: Arc<Requests>, plan: Plan) -> anyhow::Result<Outcome> {
    anyhow::ensure!(!addrs.is_empty(), "no address to load");
    let mut senders = Vec::with_capacity(plan.connections);
    for conn in 0..plan.connections {
        let addr = addrs[conn % addrs.len()];
        let sender = connect_from(addr, plan.source).await;
        senders.push((addr, sender.with_context(|| format!("cannot connect to {addr}"))?));
    }
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let interval = plan.rate.map(|rate| Duration::from_secs_f64(plan.connections as f64 / rate));
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(conn, (addr, sender))| {
            let requests = requests.clone();
            let offset =
                interval.map_or(Duration::ZERO, |i| i.mul_f64(conn as f64 / plan.connections as f64));
            let schedule = Schedule { start: start + offset, measure_from, end, interval };
            tokio::spawn(drive(addr, plan.source, sender, requests, conn, schedule))
        })
        .collect();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let (mut statuses, mut errors, mut body_bytes) = (BTreeMap::new(), 0, 0);
    for task in tasks {
        let result = task.await??;
        histogram.add(&result.histogram)?;
        for (status, count) in result.statuses {
            *statuses.entry(status).or_insert(0) += count;
        }
        errors += result.errors;
        body_bytes += result.body_bytes;
    }
    let requests = histogram.len();
    Ok(Outcome {
        requests,
        errors,
        statuses,
        requests_per_sec: requests as f64 / plan.duration.as_secs_f64(),
        p50_us: histogram.value_at_quantile(0.50),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
        mean_body_bytes: if requests == 0 { 0.0 } else { body_bytes as f64 / requests as f64 },
    })
}

/// When one connection sends.
struct Schedule {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Between two requests (open loop); `None` = as soon as answered.
    interval: Option<Duration>,
}

/// One connection's loop until `end`.
async fn drive(
    addr: SocketAddr,
    source: Option<IpAddr>,
    mut sender: SendRequest<Full<Bytes>>,
    requests: Arc<Requests>,
    conn: usize,
    schedule: Schedule,
) -> anyhow::Result<ConnResult> {
    let Schedule { start, measure_from, end, interval } = schedule;
    let mut result = ConnResult {
        histogram: Histogram::new_with_bounds(1, 120_000_000, 3)?,
        statuses: BTreeMap::new(),
        errors: 0,
        body_bytes: 0,
    };
    tokio::time::sleep_until(start).await;
    let mut due = start;
    let mut n = 0u64;
    loop {
        let sent_at = match interval {
            Some(interval) => {
                tokio::time::sleep_until(due).await;
                let at = due;
                due += interval;
                at
            }
            None => Instant::now(),
        };
        if sent_at >= end {
            break;
        }
        let answer = async {
            sender.ready().await?;
            let response = sender.send_request(requests.build(conn, n)).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body.len()))
        }
        .await;
        n += 1;
        match answer {
            Ok((status, len)) if sent_at >= measure_from => {
                let micros = u64::try_from(sent_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                result.histogram.saturating_record(micros.max(1));
                *result.statuses.entry(status).or_insert(0) += 1;
                result.body_bytes += len as u64;
            }
            Ok(_) => {}
            Err(_) => {
                result.errors += 1;
                sender = connect_from(addr, source).await?;
            }
        }
    }
    Ok(result)
}

/// Opens one keep-alive HTTP/1.1 connection.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    connect_from(addr, None).await
}

/// Opens one keep-alive HTTP/1.1 connection from `source`, or from whichever local address
/// the system picks.
pub async fn connect_from(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tcp(addr, source).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// A TCP connection to `addr` from `source` (port chosen by the system), without Nagle's delay.
pub async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let stream = match source {
        Some(source) => {
            let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(source, 0)).with_context(|| format!("cannot bind to {source}"))?;
            socket.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}
