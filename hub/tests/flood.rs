//! One client address flooding the hub with connections does not shut out the others: the
//! per-address connection limit, the idle timeout and the HTTP/2 stream limit, against
//! `hub::serve` on `127.0.0.1:0`. Each "user" connects from a loopback address of its own
//! (the flood from 127.0.0.2, another user from 127.0.0.3), through hyper's own client, or
//! through raw HTTP/2 frames where hyper's client would keep to the hub's limits.

mod support;

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::time::Duration;

use http_body_util::channel::{Channel, Sender};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use support::{SiteClient, TestHub, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// The flood's address.
const FLOOD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Another user's address.
const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// How long anything may take before the test fails: a bound on waiting, not a speed target.
const SAFETY: Duration = Duration::from_secs(30);

type Body = BoxBody<Bytes, Infallible>;

/// A TCP connection to the hub from `from`.
async fn connect_from(from: Ipv4Addr, hub: &TestHub) -> TcpStream {
    support::connect_from(hub.url.trim_start_matches("http://").parse().unwrap(), from).await
}

/// An HTTP/1.1 connection from `from`; the task ends when the connection closes.
async fn http1_from(from: Ipv4Addr, hub: &TestHub) -> (http1::SendRequest<Body>, JoinHandle<()>) {
    let io = TokioIo::new(connect_from(from, hub).await);
    let (mut sender, connection) = http1::handshake(io).await.unwrap();
    let connection = tokio::spawn(async move { connection.await.unwrap() });
    sender.ready().await.unwrap();
    (sender, connection)
}

/// An HTTP/2 connection from `from`, sending a ping every `ping` if given, even while no
/// request is in progress; the task ends when the connection closes.
async fn http2_from(
    from: Ipv4Addr,
    hub: &TestHub,
    ping: Option<Duration>,
) -> (http2::SendRequest<Body>, JoinHandle<()>) {
    let io = TokioIo::new(connect_from(from, hub).await);
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    if let Some(every) = ping {
        builder.keep_alive_interval(every).keep_alive_timeout(SAFETY).keep_alive_while_idle(true);
    }
    let (mut sender, connection) = builder.handshake(io).await.unwrap();
    let connection = tokio::spawn(async move { connection.await.unwrap() });
    sender.ready().await.unwrap();
    (sender, connection)
}

fn health() -> hyper::Request<Body> {
    hyper::Request::get("http://hub/healthz").body(Empty::new().boxed()).unwrap()
}

/// A push of the user's profile whose body is sent through the returned sender, a piece at a
/// time: an upload as slow as the test makes it.
fn slow_push(hub: &TestHub, user: &str) -> (hyper::Request<Body>, Sender<Bytes>) {
    let (sender, body) = Channel::<Bytes>::new(1);
    let request = hyper::Request::post("http://hub/api/sync.php")
        .header("authorization", format!("Bearer {}", hub.backend_token("roflfaucet", user)))
        .header("content-type", "application/json")
        .body(body.boxed())
        .unwrap();
    (request, sender)
}

/// The push [`slow_push`] sends: whitespace, as much as the sender likes, then this.
fn push_json(user: &str) -> Bytes {
    let push = serde_json::json!({
        "action": "push", "user_id": user, "site_id": "roflfaucet", "data_type": "profile",
        "data": { "display_name": "Slow Uploader" },
    });
    Bytes::from(push.to_string())
}

/// The value of one `/metrics` sample, read from 127.0.0.1.
async fn metric(hub: &TestHub, series: &str) -> f64 {
    let text = hub.request(reqwest::Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    sample(&text, series).unwrap_or_else(|| panic!("/metrics has no {series}:\n{text}"))
}

/// Waits until the `/metrics` sample `series` is at least `least`.
async fn metric_reaches(hub: &TestHub, series: &str, least: f64) {
    let reached = tokio::time::timeout(SAFETY, async {
        while metric(hub, series).await < least {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    reached.await.unwrap_or_else(|_| panic!("{series} never reached {least}"));
}

/// Whether a new connection from `from` is closed without an answer to a request.
async fn closed_without_answer(from: Ipv4Addr, hub: &TestHub) -> bool {
    let mut stream = connect_from(from, hub).await;
    // The hub may have closed it before the request is written, or while.
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n").await;
    let mut answer = [0u8; 64];
    let read = tokio::time::timeout(SAFETY, stream.read(&mut answer)).await;
    let read = read.expect("a connection beyond the limit neither answered nor closed");
    read.is_err() || read.is_ok_and(|n| n == 0)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_at_its_connection_cap_does_not_shut_out_another() {
    const CAP: usize = 24;
    const IDLE: usize = 16;
    const STREAMS: usize = 8;
    // More than the hub has slots left once the flood holds its share.
    const EXCESS: usize = 32;
    let hub = TestHub::start_with(|c| {
        c.limits.max_connections = 2 * CAP;
        c.limits.max_connections_per_address = CAP;
        c.limits.http2_max_concurrent_streams = STREAMS as u32;
        c.limits.requests_per_minute = 1_000_000;
        // The flood's idle connections stay for the whole test: only the limits end them.
        c.limits.header_read_timeout_secs = 120;
        c.limits.idle_timeout_secs = 120;
    })
    .await;

    // The flood: idle keep-alive connections, then HTTP/2 connections with every stream
    // they may open busy with an upload, up to its cap.
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        let (mut sender, connection) = http1_from(FLOOD, &hub).await;
        assert_eq!(sender.send_request(health()).await.unwrap().status(), 200);
        idle.push((sender, connection));
    }
    let (mut busy, mut uploads) = (Vec::new(), Vec::new());
    for _ in IDLE..CAP {
        let (mut sender, connection) = http2_from(FLOOD, &hub, None).await;
        for _ in 0..STREAMS {
            let (request, mut body) = slow_push(&hub, "flood");
            body.send_data(Bytes::from_static(b" ")).await.unwrap();
            uploads.push((body, tokio::spawn(sender.send_request(request))));
        }
        busy.push((sender, connection));
    }
    // Every HTTP/2 connection is busy, and so is the request asking.
    metric_reaches(&hub, r#"hub_connections{state="active"}"#, (CAP - IDLE + 1) as f64).await;

    // Beyond its cap, the flood's connections are closed at once, more of them than the
    // hub has connection slots left.
    for n in 0..EXCESS {
        assert!(closed_without_answer(FLOOD, &hub).await, "connection {n} beyond the cap was served");
    }
    assert_eq!(metric(&hub, r#"hub_connections_refused_total{limit="per_address"}"#).await, EXCESS as f64);

    // Another user is answered, on connections of its own.
    for n in 0..8 {
        let client = reqwest::Client::builder().local_address(Some(OTHER.into())).timeout(SAFETY).build();
        let page =
            SiteClient { client: client.unwrap(), ..hub.page("clickforcharity", &format!("other-{n}")) };
        page.timestamp("balance").await.assert_ok();
    }
    assert!(metric(&hub, "hub_open_connections").await >= CAP as f64);
    let held = idle.iter().map(|(_, c)| c).chain(busy.iter().map(|(_, c)| c));
    for (n, connection) in held.enumerate() {
        assert!(!connection.is_finished(), "the flood's connection {n} was closed");
    }
    drop(uploads);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_and_those_with_a_request_in_progress_are_not() {
    const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
    let hub = TestHub::start_with(|c| {
        c.limits.idle_timeout_secs = IDLE_TIMEOUT.as_secs();
        // Only the idle timeout can close a connection within the test, and the uploads
        // have all the time a body may take.
        c.limits.header_read_timeout_secs = 120;
        c.limits.body_timeout_secs = c.limits.request_timeout_secs - 1;
    })
    .await;

    // An HTTP/1.1 connection kept alive after its request, an HTTP/2 connection that only
    // pings, and an upload on each protocol that lasts longer than the idle timeout.
    let (mut kept_alive, kept_alive_connection) = http1_from(FLOOD, &hub).await;
    assert_eq!(kept_alive.send_request(health()).await.unwrap().status(), 200);
    let (_pinging, pinging_connection) = http2_from(FLOOD, &hub, Some(Duration::from_millis(100))).await;
    let started = tokio::time::Instant::now();
    let (mut http1_uploader, _) = http1_from(OTHER, &hub).await;
    let (mut http2_uploader, _) = http2_from(OTHER, &hub, None).await;
    let (http1_push, http1_body) = slow_push(&hub, "uploader-1");
    let (http2_push, http2_body) = slow_push(&hub, "uploader-2");
    let http1_answer = tokio::spawn(http1_uploader.send_request(http1_push));
    let http2_answer = tokio::spawn(http2_uploader.send_request(http2_push));
    let mut uploads = Vec::new();
    for (user, mut body, answer) in
        [("uploader-1", http1_body, http1_answer), ("uploader-2", http2_body, http2_answer)]
    {
        // A space every 100 ms until told to finish: a body within every limit, that takes
        // its time.
        let (finish, mut finishing) = tokio::sync::oneshot::channel::<()>();
        let trickle = tokio::spawn(async move {
            while finishing.try_recv().is_err() {
                body.send_data(Bytes::from_static(b" ")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            body.send_data(push_json(user)).await.unwrap();
        });
        uploads.push((user, finish, trickle, answer));
    }

    for (name, connection) in
        [("HTTP/1.1 kept alive", kept_alive_connection), ("HTTP/2 pinging", pinging_connection)]
    {
        tokio::time::timeout(SAFETY, connection)
            .await
            .unwrap_or_else(|_| panic!("the idle {name} connection is still open"))
            .unwrap();
    }
    // The uploads have been going on for twice the idle timeout by now, and were not
    // taken for idle.
    tokio::time::sleep_until(started + 2 * IDLE_TIMEOUT).await;
    assert_eq!(metric(&hub, "hub_connections_closed_idle_total").await, 2.0);

    for (user, finish, trickle, answer) in uploads {
        finish.send(()).unwrap();
        trickle.await.unwrap();
        let answer = tokio::time::timeout(SAFETY, answer).await.unwrap().unwrap().unwrap();
        let (status, closing) = (answer.status(), answer.headers().get("connection").cloned());
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "{user}: {body}");
        assert!(body.contains("\"success\":true"), "{user}: {body}");
        // An HTTP/1.1 connection being closed says so in its last answer.
        assert_eq!(closing, None, "{user}");
    }
}

/// A client that writes HTTP/2 frames itself, so that it can open more streams than the
/// hub allows: hyper's client waits for a free one.
struct RawHttp2 {
    stream: TcpStream,
}

/// Frame types and the error code the test reads.
const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

/// One frame read.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl RawHttp2 {
    /// Connects from `from`, sends the preface and empty settings, and returns the hub's
    /// settings.
    async fn open(from: Ipv4Addr, hub: &TestHub) -> (RawHttp2, Vec<(u16, u32)>) {
        let mut raw = RawHttp2 { stream: connect_from(from, hub).await };
        raw.stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        raw.send(SETTINGS, 0, 0, &[]).await;
        let settings = loop {
            let frame = raw.next().await;
            if frame.kind == SETTINGS && frame.flags == 0 {
                break frame.payload;
            }
        };
        raw.send(SETTINGS, 0x1, 0, &[]).await;
        let settings = settings
            .chunks(6)
            .map(|s| (u16::from_be_bytes([s[0], s[1]]), u32::from_be_bytes([s[2], s[3], s[4], s[5]])))
            .collect();
        (raw, settings)
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn next(&mut self) -> Frame {
        self.next_or_closed().await.expect("the hub closed the connection")
    }

    /// The next frame, or `None` once the hub has closed the connection.
    async fn next_or_closed(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        let read = tokio::time::timeout(SAFETY, self.stream.read_exact(&mut head));
        read.await.expect("the hub sent no frame and did not close the connection").ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        self.stream.read_exact(&mut payload).await.ok()?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Some(Frame { kind: head[3], flags: head[4], stream, payload })
    }

    /// Opens `stream` with a push's headers, its body still to come.
    async fn open_push(&mut self, stream: u32, token: &str) {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        for (index, value) in
            [(4, "/api/sync.php"), (1, "hub"), (23, &format!("Bearer {token}")), (31, "application/json")]
        {
            literal(&mut block, index, value.as_bytes());
        }
        self.send(HEADERS, END_HEADERS, stream, &block).await;
    }
}

/// An HPACK header field without indexing, its name from the static table (RFC 7541 §6.2.2).
fn literal(block: &mut Vec<u8>, name_index: usize, value: &[u8]) {
    integer(block, 4, 0x00, name_index);
    integer(block, 7, 0x00, value.len());
    block.extend(value);
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1).
fn integer(block: &mut Vec<u8>, prefix: u32, flags: u8, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        block.push(flags | value as u8);
        return;
    }
    block.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        block.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    block.push(rest as u8);
}

#[tokio::test]
async fn http2_streams_beyond_the_limit_are_refused() {
    const LIMIT: u32 = 4;
    let hub = TestHub::start_with(|c| c.limits.http2_max_concurrent_streams = LIMIT).await;
    let (mut raw, settings) = RawHttp2::open(FLOOD, &hub).await;
    assert!(settings.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, LIMIT)), "the hub announced {settings:?}");

    // LIMIT uploads in progress, then one stream more.
    let token = hub.backend_token("roflfaucet", "streams");
    let streams: Vec<u32> = (0..=LIMIT).map(|n| 2 * n + 1).collect();
    for stream in &streams {
        raw.open_push(*stream, &token).await;
    }
    let beyond = *streams.last().unwrap();
    let refused = loop {
        let frame = raw.next().await;
        assert_ne!(frame.kind, GOAWAY, "the hub closed the connection instead of refusing a stream");
        if frame.kind == RST_STREAM {
            let code = u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
            break (frame.stream, code);
        }
        assert!(!(frame.kind == HEADERS && frame.stream != 0), "a stream was answered before its body came");
    };
    assert_eq!(refused, (beyond, REFUSED_STREAM));

    // Once one upload is finished, a new stream is served.
    raw.send(DATA, END_STREAM, streams[0], &push_json("streams")).await;
    let later = beyond + 2;
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let frame = raw.next().await;
        if frame.kind == HEADERS {
            // `:status: 200` is entry 8 of HPACK's static table.
            assert_eq!(frame.payload.first(), Some(&0x88), "stream {} was not answered 200", frame.stream);
            answered.push(frame.stream);
            if frame.stream == streams[0] {
                raw.open_push(later, &token).await;
                raw.send(DATA, END_STREAM, later, &push_json("streams")).await;
            }
        }
        assert_ne!(frame.kind, RST_STREAM, "stream {} was reset", frame.stream);
    }
    assert_eq!(answered, [streams[0], later]);
}

#[tokio::test]
async fn an_idle_http2_connection_is_told_goaway_before_it_is_closed() {
    let hub = TestHub::start_with(|c| {
        c.limits.idle_timeout_secs = 2;
        c.limits.header_read_timeout_secs = 120;
    })
    .await;
    let (mut raw, _) = RawHttp2::open(FLOOD, &hub).await;
    // Last stream ids of the GOAWAYs the hub sends, until it closes the connection. The
    // client answers the hub's pings a while later, as one a network away would: the hub
    // waits for the answer, well within another idle timeout, before it closes.
    let mut goaways = Vec::new();
    while let Some(frame) = raw.next_or_closed().await {
        if frame.kind == PING && frame.flags == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            raw.send(PING, 0x1, 0, &frame.payload).await;
        }
        if frame.kind == GOAWAY {
            let code = u32::from_be_bytes(frame.payload[4..8].try_into().unwrap());
            assert_eq!(code, 0, "an idle connection is closed with NO_ERROR");
            goaways.push(u32::from_be_bytes(frame.payload[..4].try_into().unwrap()) & 0x7fff_ffff);
        }
    }
    // First "no new streams", then, a round trip later, "none was opened": RFC 9113 §6.8.
    assert_eq!(goaways, [0x7fff_ffff, 0]);
}
