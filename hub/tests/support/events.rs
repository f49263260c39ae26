//! The hub's event stream (`GET /api/events`) as the tests read it: the Server-Sent Events
//! wire parsed into [`Frame`]s, read through reqwest ([`EventStream`], HTTP/1.1 or HTTP/2)
//! or on a raw HTTP/1.1 socket the test controls ([`RawStream`]: its receive buffer, and
//! whether it reads at all). Every wait is bounded and fails saying what it waited for.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::Reply;

/// How long a test waits for a frame the hub owes it before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// One frame of the stream: the fields of the lines before a blank line. A heartbeat is a
/// frame of comments only.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: Option<String>,
    pub retry: Option<u64>,
    pub comments: Vec<String>,
}

impl Frame {
    /// The event's name: `message` when it has none, as a browser's reader would say.
    pub fn kind(&self) -> &str {
        self.event.as_deref().unwrap_or("message")
    }

    /// A heartbeat: comments and nothing else.
    pub fn is_heartbeat(&self) -> bool {
        !self.comments.is_empty()
            && self.id.is_none()
            && self.event.is_none()
            && self.data.is_none()
            && self.retry.is_none()
    }

    /// A change of a record: data and an id, no event name.
    pub fn is_change(&self) -> bool {
        self.event.is_none() && self.data.is_some()
    }

    /// The frame's data as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        let data = self.data.as_deref().unwrap_or_else(|| panic!("a frame without data: {self:?}"));
        serde_json::from_str(data).unwrap_or_else(|e| panic!("data that is not JSON ({e}): {self:?}"))
    }

    /// The frame's id, which every event but a heartbeat, `retry` and `reauth` carries.
    #[track_caller]
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_else(|| panic!("a frame without an id: {self:?}"))
    }
}

/// Splits the bytes of a stream into frames, as an EventSource would (lines ending in LF or
/// CRLF, one leading space of a value dropped), keeping comments and empty frames' fields.
#[derive(Default)]
pub struct Parser {
    pending: Vec<u8>,
    frame: Frame,
    started: bool,
}

impl Parser {
    /// Takes the next bytes of the body; the frames they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Frame> {
        self.pending.extend_from_slice(bytes);
        let mut frames = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line).expect("the stream is UTF-8");
            if line.is_empty() {
                if self.started {
                    frames.push(std::mem::take(&mut self.frame));
                    self.started = false;
                }
                continue;
            }
            self.started = true;
            if let Some(comment) = line.strip_prefix(':') {
                self.frame.comments.push(comment.trim_start().to_owned());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "id" => self.frame.id = Some(value),
                "event" => self.frame.event = Some(value),
                "retry" => self.frame.retry = Some(value.parse().expect("retry is a number of milliseconds")),
                "data" => match &mut self.frame.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(&value);
                    }
                    None => self.frame.data = Some(value),
                },
                other => panic!("a field the wire does not have: {other:?} in {line:?}"),
            }
        }
        frames
    }

    /// Bytes of an unfinished frame: a body that ends with some ended mid-frame.
    pub fn unfinished(&self) -> bool {
        self.started || !self.pending.is_empty()
    }
}

/// What came next on a stream.
#[derive(Debug)]
pub enum Next {
    Frame(Frame),
    /// The body ended cleanly.
    End,
    /// The body broke off (a connection closed mid-body, a stream reset).
    Broken(String),
    /// Nothing within the wait.
    Quiet,
}

/// A stream the hub accepted, read through reqwest.
pub struct EventStream {
    response: reqwest::Response,
    parser: Parser,
    frames: VecDeque<Frame>,
    pub version: reqwest::Version,
    pub headers: HeaderMap,
}

/// A client for streams: no overall timeout (a stream is open for as long as it lasts), each
/// wait bounded by the test instead.
pub fn stream_client() -> reqwest::Client {
    reqwest::Client::builder().connect_timeout(WAIT).build().unwrap()
}

/// Sends `request` (a GET of `/api/events`); the stream if the hub answered 200, its refusal
/// otherwise.
pub async fn open(request: RequestBuilder) -> Result<EventStream, Reply> {
    let response = tokio::time::timeout(WAIT, request.send())
        .await
        .unwrap_or_else(|_| panic!("no answer's head within {WAIT:?}"))
        .expect("the hub answers");
    if response.status() != StatusCode::OK {
        return Err(Reply::from(response).await);
    }
    Ok(EventStream {
        version: response.version(),
        headers: response.headers().clone(),
        response,
        parser: Parser::default(),
        frames: VecDeque::new(),
    })
}

/// Like [`open`], failing the test unless the hub accepted the stream.
pub async fn accepted(request: RequestBuilder, what: &str) -> EventStream {
    match open(request).await {
        Ok(stream) => stream,
        Err(reply) => panic!("{what}: the stream was refused: {} {}", reply.status, reply.body),
    }
}

impl EventStream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The next frame, the end of the body, or nothing within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Next::Frame(frame);
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return Next::Quiet,
                Ok(Err(e)) => return Next::Broken(format!("{e:?}")),
                Ok(Ok(None)) if self.parser.unfinished() => {
                    return Next::Broken("the body ended in the middle of a frame".into());
                }
                Ok(Ok(None)) => return Next::End,
                Ok(Ok(Some(bytes))) => self.frames.extend(self.parser.feed(&bytes)),
            }
        }
    }

    /// The next frame, heartbeats included; fails if none comes within [`WAIT`].
    pub async fn frame(&mut self, what: &str) -> Frame {
        match self.next_within(WAIT).await {
            Next::Frame(frame) => frame,
            other => panic!("waiting for {what}: {other:?} instead"),
        }
    }

    /// The next frame that is not a heartbeat.
    pub async fn event(&mut self, what: &str) -> Frame {
        loop {
            let frame = self.frame(what).await;
            if !frame.is_heartbeat() {
                return frame;
            }
        }
    }

    /// The next change event (no heartbeat before it is a failure of anything but patience);
    /// fails on any other event.
    pub async fn change(&mut self, what: &str) -> Value {
        let frame = self.event(what).await;
        assert!(frame.is_change() && frame.id.is_some(), "waiting for {what}: {frame:?}");
        frame.json()
    }

    /// Reads the stream's opening: `retry:` first, then, after whatever it resumes, `ready`.
    /// Returns the frames between them (missed changes, or `resync`) and `ready`.
    pub async fn opening(&mut self) -> (Vec<Frame>, Frame) {
        let first = self.event("the retry hint").await;
        assert!(first.retry.is_some(), "the first frame is not a retry hint: {first:?}");
        let mut between = Vec::new();
        loop {
            let frame = self.event("the ready event").await;
            if frame.kind() == "ready" {
                return (between, frame);
            }
            between.push(frame);
        }
    }

    /// Reads the opening of a fresh stream (nothing resumed): its `ready` event.
    pub async fn ready(&mut self) -> Frame {
        let (between, ready) = self.opening().await;
        assert!(between.is_empty(), "frames before ready on a fresh stream: {between:?}");
        ready
    }

    /// Reads until the body ends cleanly within `wait`; the frames read on the way.
    pub async fn end_within(&mut self, wait: Duration, what: &str) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut frames = Vec::new();
        loop {
            match self.next_within(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
                Next::Frame(frame) => frames.push(frame),
                Next::End => return frames,
                Next::Broken(e) => {
                    panic!("{what}: the stream broke off instead of ending ({e}) after {frames:?}")
                }
                Next::Quiet => panic!("{what}: the stream did not end within {wait:?}; it sent {frames:?}"),
            }
        }
    }
}

/// A stream read on a raw HTTP/1.1 connection: the test decides where it connects from, how
/// small its receive buffer is, and when (if ever) it reads.
pub struct RawStream {
    socket: TcpStream,
    raw: Vec<u8>,
    chunk: Chunk,
    parser: Parser,
    frames: VecDeque<Frame>,
    pub status: u16,
    /// The answer's head: status line and headers.
    pub head: String,
}

/// Where the chunked body's decoding is.
enum Chunk {
    Size,
    Data(usize),
    DataEnd,
    Trailer,
    Done,
    /// Not chunked: the body runs to the connection's end.
    Identity,
}

impl RawStream {
    /// `user`'s stream on `hub` with `token`, over a receive buffer of 4 KiB, read up to its
    /// `ready`: then left unread, as by a tab frozen or a network stalled.
    pub async fn frozen(hub: &super::TestHub, user: &str, token: &str) -> (RawStream, Frame) {
        let addr: SocketAddr = hub.url.strip_prefix("http://").unwrap().parse().unwrap();
        let auth = format!("Bearer {token}");
        let mut stream = RawStream::open(
            addr,
            Some(4096),
            &format!("/api/events?user_id={user}"),
            &[("Authorization", &auth)],
        )
        .await;
        assert_eq!(stream.status, 200, "{}", stream.head);
        let ready = stream.ready().await;
        (stream, ready)
    }

    /// Connects to `addr` with a receive buffer of `receive_buffer` bytes (if given), sends a
    /// GET of `path_and_query` with `headers`, and reads the answer's head.
    pub async fn open(
        addr: SocketAddr,
        receive_buffer: Option<u32>,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> RawStream {
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(bytes) = receive_buffer {
            socket.set_recv_buffer_size(bytes).unwrap();
        }
        let mut socket = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .unwrap_or_else(|_| panic!("{addr} accepted no connection within {WAIT:?}"))
            .unwrap();
        let mut request = format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no answer's head within {WAIT:?}"))
                .unwrap();
            assert!(
                n > 0,
                "the hub closed the connection before answering: {:?}",
                String::from_utf8_lossy(&raw)
            );
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8(raw.drain(..end + 4).collect()).unwrap();
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
        let chunked = head.lines().any(|line| {
            let line = line.to_ascii_lowercase();
            line.starts_with("transfer-encoding:") && line.contains("chunked")
        });
        let chunk = if chunked { Chunk::Size } else { Chunk::Identity };
        RawStream { socket, raw, chunk, parser: Parser::default(), frames: VecDeque::new(), status, head }
    }

    /// Decodes what has arrived of the body into frames; whether the body ended.
    fn decode(&mut self) -> bool {
        let mut body = Vec::new();
        loop {
            match self.chunk {
                Chunk::Identity => {
                    body.append(&mut self.raw);
                    break;
                }
                Chunk::Size => {
                    let Some(end) = self.raw.windows(2).position(|w| w == b"\r\n") else { break };
                    let line = String::from_utf8(self.raw.drain(..end + 2).collect()).unwrap();
                    let size = line.trim_end().split(';').next().unwrap();
                    let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
                    self.chunk = if size == 0 { Chunk::Trailer } else { Chunk::Data(size) };
                }
                Chunk::Data(left) => {
                    if self.raw.is_empty() {
                        break;
                    }
                    let n = left.min(self.raw.len());
                    body.extend(self.raw.drain(..n));
                    self.chunk = if n == left { Chunk::DataEnd } else { Chunk::Data(left - n) };
                }
                Chunk::DataEnd => {
                    if self.raw.len() < 2 {
                        break;
                    }
                    assert_eq!(&self.raw[..2], b"\r\n", "a chunk not followed by CRLF");
                    self.raw.drain(..2);
                    self.chunk = Chunk::Size;
                }
                Chunk::Trailer => {
                    let Some(end) = self.raw.windows(2).position(|w| w == b"\r\n") else { break };
                    let line: Vec<u8> = self.raw.drain(..end + 2).collect();
                    if line == b"\r\n" {
                        self.chunk = Chunk::Done;
                    }
                }
                Chunk::Done => break,
            }
        }
        self.frames.extend(self.parser.feed(&body));
        matches!(self.chunk, Chunk::Done)
    }

    /// The next frame, the end of the body (a last chunk, or the connection's end when not
    /// chunked), a broken body, or nothing within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let ended = self.decode();
            if let Some(frame) = self.frames.pop_front() {
                return Next::Frame(frame);
            }
            if ended {
                return Next::End;
            }
            let mut buf = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.socket.read(&mut buf)).await {
                Err(_) => return Next::Quiet,
                Ok(Err(e)) => return Next::Broken(e.to_string()),
                Ok(Ok(0)) if matches!(self.chunk, Chunk::Identity) && !self.parser.unfinished() => {
                    return Next::End;
                }
                Ok(Ok(0)) => return Next::Broken("the connection closed in the middle of the body".into()),
                Ok(Ok(n)) => self.raw.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// The next frame that is not a heartbeat; fails if none comes within [`WAIT`].
    pub async fn event(&mut self, what: &str) -> Frame {
        loop {
            match self.next_within(WAIT).await {
                Next::Frame(frame) if frame.is_heartbeat() => {}
                Next::Frame(frame) => return frame,
                other => panic!("waiting for {what}: {other:?} instead"),
            }
        }
    }

    /// Reads the opening of a fresh stream: `retry:`, then `ready`, which it returns.
    pub async fn ready(&mut self) -> Frame {
        let first = self.event("the retry hint").await;
        assert!(first.retry.is_some(), "the first frame is not a retry hint: {first:?}");
        let ready = self.event("the ready event").await;
        assert_eq!(ready.kind(), "ready", "{ready:?}");
        ready
    }

    /// Reads everything left until the body ends or breaks off, within `wait`: the frames,
    /// and whether it ended cleanly.
    pub async fn drain_within(&mut self, wait: Duration, what: &str) -> (Vec<Frame>, bool) {
        let deadline = tokio::time::Instant::now() + wait;
        let mut frames = Vec::new();
        loop {
            match self.next_within(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
                Next::Frame(frame) => frames.push(frame),
                Next::End => return (frames, true),
                Next::Broken(_) => return (frames, false),
                Next::Quiet => {
                    panic!("{what}: the stream did not end within {wait:?} ({} frames read)", frames.len())
                }
            }
        }
    }
}

/// A GET of `user`'s stream (`extra` appended to the query) on the hub at `url`, with `token`
/// in the Authorization header when given.
pub fn stream_request(
    client: &reqwest::Client,
    url: &str,
    user: &str,
    extra: &str,
    token: Option<&str>,
) -> RequestBuilder {
    let request = client.get(format!("{url}/api/events?user_id={user}{extra}"));
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// The store's position an event id names: its two numbers after the epoch.
pub fn position(id: &str) -> (u64, u64) {
    let mut parts = id.rsplitn(3, '.');
    let seq = parts.next().and_then(|s| s.parse().ok());
    let era = parts.next().and_then(|s| s.parse().ok());
    match (era, seq, parts.next()) {
        (Some(era), Some(seq), Some(_epoch)) => (era, seq),
        _ => panic!("an event id that is not <epoch>.<era>.<seq>: {id:?}"),
    }
}

/// The epoch an event id names.
pub fn epoch_of(id: &str) -> &str {
    id.rsplitn(3, '.').nth(2).unwrap_or_else(|| panic!("an event id without an epoch: {id:?}"))
}

/// Asserts that `event` is the change a write was answered with: its type, version, stamp and,
/// when both carry it, its data.
#[track_caller]
pub fn assert_change(event: &Value, data_type: &str, answer: &Value) {
    let said = || format!("event {event} for answer {answer}");
    assert_eq!(event["data_type"], data_type, "{}", said());
    assert_eq!(event["version"], answer["version"], "{}", said());
    assert_eq!(event["last_updated"], answer["last_updated"], "{}", said());
    if let (Some(sent), Some(data)) = (event.get("data"), answer.get("data")) {
        assert_eq!(sent, data, "{}", said());
    }
}

/// `user`'s stream resumed after `last_event_id`, read up to its `ready` event: the stream,
/// the frames between its retry hint and `ready`, and `ready`.
pub async fn resume(
    url: &str,
    token: &str,
    user: &str,
    last_event_id: &str,
) -> (EventStream, Vec<Frame>, Frame) {
    let request =
        stream_request(&stream_client(), url, user, "", Some(token)).header("Last-Event-ID", last_event_id);
    let mut stream = accepted(request, "a resumed stream").await;
    let (between, ready) = stream.opening().await;
    (stream, between, ready)
}

/// Each frame's data type and version.
pub fn changes(frames: &[Frame]) -> Vec<(String, u64)> {
    frames
        .iter()
        .map(|frame| {
            assert!(frame.is_change(), "not a change: {frame:?}");
            let event = frame.json();
            (event["data_type"].as_str().unwrap().to_owned(), event["version"].as_u64().unwrap())
        })
        .collect()
}

/// The hub's `/metrics` text, asked from loopback (allowed without a token by default).
pub async fn metrics(url: &str) -> String {
    let response = super::client().get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "/metrics");
    response.text().await.unwrap()
}

/// The value of `series` in the hub's metrics, 0 when absent.
pub async fn metric(url: &str, series: &str) -> f64 {
    super::sample(&metrics(url).await, series).unwrap_or(0.0)
}

/// Waits until `series` satisfies `holds`; fails after [`WAIT`] saying what it last was.
pub async fn wait_for_metric(url: &str, series: &str, what: &str, holds: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = metric(url, series).await;
        if holds(value) {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {series} is still {value} after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
