//! Event streams held open, and the time from a write's answer to its event. `bench streams`
//! opens one `GET /api/events` per user — a TCP connection of its own with a hand-written
//! HTTP/1.1 request, so that ten thousand cost this process little — from as many loopback
//! addresses as the hub's per-address stream limit asks, reads every frame they carry and
//! holds them until its standard input ends. It prints one JSON line once every stream has
//! had its `ready` event, then answers the commands it reads, one a line, each with one JSON
//! line:
//!
//! - `count`: the streams still open and the change events they have read so far;
//! - `latency`: writes a few thousand durable deltas, each to a user whose stream is open and
//!   none while another to the same user is in flight, and measures from each write's answer
//!   (received) to its event (read on the stream).
//!
//! A stream the hub ends is not opened again: `count` shows it gone.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::load::{connect, tcp};
use crate::scenario::{ORIGIN_URL, Requests, user_id};

/// Streams being opened at once, so that the hub's listen backlog does not overflow.
const CONNECTING: usize = 64;
/// How long the streams may take to be in place.
const SETTING_UP: Duration = Duration::from_secs(120);
/// How long a write's event may take before it counts as missing.
const EVENT_AT_MOST: Duration = Duration::from_secs(5);
/// Connections the latency's writes are spread over.
const WRITERS: usize = 16;

/// What is held and measured.
pub struct Plan {
    /// The instance the streams are opened on.
    pub streams_at: SocketAddr,
    /// The instance the latency's writes go to: the same, or another instance of one hub.
    pub writes_at: SocketAddr,
    /// One stream per user, users `0..streams`.
    pub streams: usize,
    /// The addresses the streams come from, each holding `per_address` of them.
    pub sources: Vec<IpAddr>,
    pub per_address: usize,
    /// The latency's writes, and their rate in all (per second).
    pub writes: usize,
    pub rate: f64,
}

/// What `bench streams` prints once every stream is open.
#[derive(Serialize)]
struct InPlace {
    streams: usize,
    addresses: usize,
    /// How long it took to open them.
    secs: f64,
}

/// What `count` prints.
#[derive(Serialize)]
struct Counts {
    open: usize,
    events: u64,
}

/// What `latency` prints: from each write's answer to its event, and from its sending.
#[derive(Serialize)]
struct Latency {
    writes: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    sent_p50_us: u64,
    sent_p99_us: u64,
    /// Events read before their write's answer (counted as 0 µs).
    before_answer: u64,
    /// Writes whose event did not come within [`EVENT_AT_MOST`], or came with another version.
    missing: u64,
    /// Writes not answered `200`.
    failed: u64,
}

/// What the streams share with the writes.
#[derive(Default)]
struct Shared {
    open: AtomicUsize,
    events: AtomicU64,
    /// Writes in flight, by user: the next balance event on that user's stream is theirs.
    waiting: Mutex<HashMap<usize, oneshot::Sender<(u64, Instant)>>>,
}

/// Opens the streams, prints when they are in place, and answers commands until standard
/// input ends.
pub async fn run(requests: Arc<Requests>, plan: Plan) -> anyhow::Result<()> {
    let started = Instant::now();
    let shared = Arc::new(Shared::default());
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let (ready, mut readies) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    for user in 0..plan.streams {
        let source = plan.sources[user / plan.per_address];
        let request = format!(
            "GET /api/events?user_id={} HTTP/1.1\r\nHost: {}\r\nOrigin: {ORIGIN_URL}\r\nAuthorization: {}\r\nAccept: text/event-stream\r\n\r\n",
            user_id(user),
            plan.streams_at,
            requests.authorization(user).to_str()?,
        );
        let (shared, connecting, ready) = (shared.clone(), connecting.clone(), ready.clone());
        let addr = plan.streams_at;
        tokio::spawn(async move {
            let opened = open(addr, source, request.as_bytes(), &connecting).await;
            let mut reader = match opened {
                Ok(reader) => reader,
                Err(e) => {
                    let _ = ready.send(Err(e.context(format!("the stream of user {user}"))));
                    return;
                }
            };
            shared.open.fetch_add(1, Ordering::Relaxed);
            let _ = reader.read(user, &shared, Some(ready)).await;
            shared.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(ready);
    let all_ready = async {
        for _ in 0..plan.streams {
            readies.recv().await.context("a stream ended before it was ready")??;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(SETTING_UP, all_ready)
        .await
        .with_context(|| format!("the {} streams were not all open within {SETTING_UP:?}", plan.streams))??;
    let in_place = InPlace {
        streams: plan.streams,
        addresses: plan.streams.div_ceil(plan.per_address),
        secs: started.elapsed().as_secs_f64(),
    };
    println!("{}", serde_json::to_string(&in_place)?);

    let mut commands = stdin_lines();
    while let Some(command) = commands.recv().await {
        let printed = match command.trim() {
            "count" => serde_json::to_string(&Counts {
                open: shared.open.load(Ordering::Relaxed),
                events: shared.events.load(Ordering::Relaxed),
            })?,
            "latency" => serde_json::to_string(&latency(&requests, &plan, &shared).await?)?,
            other => bail!("unknown command {other:?}"),
        };
        println!("{printed}");
    }
    Ok(())
}

/// Standard input's lines, read by a thread of their own; the channel ends with it.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (lines, received) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    received
}

/// Connects from `source`, sends the stream's request and reads its answer's head.
async fn open(
    addr: SocketAddr,
    source: IpAddr,
    request: &[u8],
    connecting: &Semaphore,
) -> anyhow::Result<StreamReader> {
    let _turn = connecting.acquire().await?;
    let mut stream = tcp(addr, Some(source)).await?;
    stream.write_all(request).await?;
    let mut reader =
        StreamReader { stream, raw: Vec::with_capacity(1024), body: Vec::new(), chunk: Chunk::Size };
    let head_end = loop {
        if let Some(end) = find(&reader.raw, b"\r\n\r\n") {
            break end;
        }
        reader.fill().await?;
    };
    let head = String::from_utf8_lossy(&reader.raw[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        bail!("the hub answered {:?}", head.lines().next().unwrap_or(""));
    }
    if !head.contains("transfer-encoding: chunked") {
        bail!("the stream's answer is not chunked: {head:?}");
    }
    reader.raw.drain(..head_end + 4);
    Ok(reader)
}

/// Where a chunked body's decoding is.
enum Chunk {
    /// Reading a chunk's size line.
    Size,
    /// Inside a chunk, with this many bytes of it to come.
    Data(usize),
    /// After a chunk's data, before the line end that closes it.
    End,
}

/// One stream's connection: its bytes as read, and its body's bytes decoded but not yet a
/// whole event.
struct StreamReader {
    stream: tokio::net::TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    chunk: Chunk,
}

impl StreamReader {
    async fn fill(&mut self) -> anyhow::Result<Instant> {
        let mut buf = [0u8; 2048];
        let n = self.stream.read(&mut buf).await?;
        if n == 0 {
            bail!("the hub closed the stream");
        }
        self.raw.extend_from_slice(&buf[..n]);
        Ok(Instant::now())
    }

    /// Reads events until the stream ends, telling `ready` once the `ready` event came, and
    /// each balance change to the write waiting for it.
    async fn read(
        &mut self,
        user: usize,
        shared: &Shared,
        mut ready: Option<mpsc::UnboundedSender<anyhow::Result<()>>>,
    ) -> anyhow::Result<()> {
        let mut read_at = Instant::now();
        loop {
            if !self.decode()? {
                bail!("the hub ended the stream");
            }
            while let Some(end) = find(&self.body, b"\n\n") {
                let frame: Vec<u8> = self.body.drain(..end + 2).collect();
                let frame = std::str::from_utf8(&frame)?;
                if frame.lines().any(|line| line == "event: ready") {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                } else if let Some(data) = frame.lines().find_map(|line| line.strip_prefix("data: "))
                    && !frame.lines().any(|line| line.starts_with("event:"))
                {
                    shared.events.fetch_add(1, Ordering::Relaxed);
                    let change: Change = serde_json::from_str(data)?;
                    if change.data_type == "balance"
                        && let Some(waiting) =
                            shared.waiting.lock().expect("the writes waiting").remove(&user)
                    {
                        let _ = waiting.send((change.version, read_at));
                    }
                }
            }
            read_at = self.fill().await?;
        }
    }

    /// Moves what `raw` holds of the chunked body into `body`; `false` once the body ended.
    fn decode(&mut self) -> anyhow::Result<bool> {
        let mut at = 0;
        loop {
            match self.chunk {
                Chunk::Size => {
                    let Some(end) = find(&self.raw[at..], b"\r\n") else { break };
                    let line = std::str::from_utf8(&self.raw[at..at + end])?;
                    let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                        .with_context(|| format!("a chunk's size line {line:?}"))?;
                    at += end + 2;
                    if size == 0 {
                        return Ok(false);
                    }
                    self.chunk = Chunk::Data(size);
                }
                Chunk::Data(left) => {
                    let n = left.min(self.raw.len() - at);
                    if n == 0 {
                        break;
                    }
                    self.body.extend_from_slice(&self.raw[at..at + n]);
                    at += n;
                    self.chunk = if n == left { Chunk::End } else { Chunk::Data(left - n) };
                }
                Chunk::End => {
                    if self.raw.len() - at < 2 {
                        break;
                    }
                    at += 2;
                    self.chunk = Chunk::Size;
                }
            }
        }
        self.raw.drain(..at);
        Ok(true)
    }
}

/// What an event's data says of its change.
#[derive(Deserialize)]
struct Change {
    data_type: String,
    version: u64,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// [`Plan::writes`] deltas at [`Plan::rate`], over [`WRITERS`] connections to
/// [`Plan::writes_at`], each to the next user of its own, and the time from each one's answer
/// to its event.
async fn latency(requests: &Arc<Requests>, plan: &Plan, shared: &Arc<Shared>) -> anyhow::Result<Latency> {
    let interval = Duration::from_secs_f64(WRITERS as f64 / plan.rate);
    let start = Instant::now() + Duration::from_millis(50);
    let mut writers = Vec::with_capacity(WRITERS);
    for writer in 0..WRITERS {
        let mut sender = connect(plan.writes_at).await?;
        let (requests, shared) = (requests.clone(), shared.clone());
        let (writes, streams) = (plan.writes.div_ceil(WRITERS), plan.streams);
        let first = start + interval.mul_f64(writer as f64 / WRITERS as f64);
        writers.push(tokio::spawn(async move {
            let mut measured = Measured::new()?;
            for n in 0..writes {
                tokio::time::sleep_until(first + interval * n as u32).await;
                let user = (writer + WRITERS * n) % streams;
                let (event, delivered) = oneshot::channel();
                shared.waiting.lock().expect("the writes waiting").insert(user, event);
                sender.ready().await?;
                let sent = Instant::now();
                let response = sender.send_request(requests.build_for(user, writer, n as u64)).await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                let answered = Instant::now();
                if !status.is_success() {
                    measured.failed += 1;
                    shared.waiting.lock().expect("the writes waiting").remove(&user);
                    continue;
                }
                let version = serde_json::from_slice::<Change>(&body)?.version;
                match tokio::time::timeout(EVENT_AT_MOST, delivered).await {
                    Ok(Ok((seen, read_at))) if seen == version => measured.record(sent, answered, read_at),
                    _ => {
                        measured.missing += 1;
                        shared.waiting.lock().expect("the writes waiting").remove(&user);
                    }
                }
            }
            anyhow::Ok(measured)
        }));
    }
    let mut all = Measured::new()?;
    for writer in writers {
        let measured = writer.await??;
        all.histogram.add(&measured.histogram)?;
        all.from_sent.add(&measured.from_sent)?;
        all.before_answer += measured.before_answer;
        all.missing += measured.missing;
        all.failed += measured.failed;
    }
    Ok(Latency {
        writes: all.histogram.len(),
        p50_us: all.histogram.value_at_quantile(0.50),
        p99_us: all.histogram.value_at_quantile(0.99),
        max_us: all.histogram.max(),
        sent_p50_us: all.from_sent.value_at_quantile(0.50),
        sent_p99_us: all.from_sent.value_at_quantile(0.99),
        before_answer: all.before_answer,
        missing: all.missing,
        failed: all.failed,
    })
}

/// One writer's measures.
struct Measured {
    /// From each write's answer to its event.
    histogram: Histogram<u64>,
    /// From each write's sending to its event.
    from_sent: Histogram<u64>,
    before_answer: u64,
    missing: u64,
    failed: u64,
}

impl Measured {
    fn new() -> anyhow::Result<Measured> {
        Ok(Measured {
            histogram: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            from_sent: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            before_answer: 0,
            missing: 0,
            failed: 0,
        })
    }

    fn record(&mut self, sent: Instant, answered: Instant, read_at: Instant) {
        if read_at < answered {
            self.before_answer += 1;
        }
        let micros = |from: Instant| {
            u64::try_from(read_at.saturating_duration_since(from).as_micros()).unwrap_or(u64::MAX).max(1)
        };
        self.histogram.saturating_record(micros(answered));
        self.from_sent.saturating_record(micros(sent));
    }
}
