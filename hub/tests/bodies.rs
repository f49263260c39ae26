//! Request bodies against the real hub over real connections: a POST is refused on its token
//! before a byte of its body is read, and the refusal reaches clients still uploading cleanly
//! over HTTP/1.1 and HTTP/2 (hyper's client and curl); bodies that stall or trickle are cut
//! with `408 body_timeout` and counted against their addresses; bodies beyond
//! `limits.max_body_bytes_in_flight` are refused `503 busy` unread while the others complete,
//! and the hub's memory stays bounded under a flood of uploads (its peak is printed).
//!
//! "Other users" come from other loopback addresses (127.0.0.x).

mod support;

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use support::{Deployment, TestHub, sample};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const SITE: &str = "roflfaucet";
/// The largest body the hub reads.
const MAX_BODY: usize = 64 * 1024;
/// How long any one answer may take before the test fails: a bound on waiting, not a speed
/// target.
const PATIENCE: Duration = Duration::from_secs(60);

/// A raw connection to `addr` from the loopback address `from`.
async fn connect(addr: &str, from: Ipv4Addr) -> TcpStream {
    support::connect_from(addr.parse().unwrap(), from).await
}

/// The head of a JSON POST to the sync API declaring a body of `length` bytes, with
/// `token` if any.
fn post_head(token: Option<&str>, length: usize) -> String {
    let authorization = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!(
        "POST /api/sync.php HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n{authorization}\r\n"
    )
}

/// A push of `user`'s settings, padded with spaces to exactly `size` bytes.
fn push_body(user: &str, size: usize) -> Vec<u8> {
    let mut body = serde_json::to_vec(&json!({
        "action": "push", "user_id": user, "site_id": SITE, "data_type": "settings", "data": {"theme": "dark"},
    }))
    .unwrap();
    assert!(body.len() <= size);
    body.resize(size, b' ');
    body
}

/// One answer read off a raw HTTP/1.1 connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    /// Asserts the hub's own refusal: this status and code, `success: false` and a message.
    #[track_caller]
    fn assert_refused(&self, status: u16, code: &str) {
        assert_eq!((self.status, self.code()), (status, code), "{self:?}");
        assert_eq!(self.body["success"], false, "{self:?}");
        assert!(self.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{self:?}");
    }
}

/// Reads one answer (status line, headers, a `Content-Length` body), failing the test if none
/// comes within [`PATIENCE`].
async fn read_answer(stream: &mut BufReader<impl tokio::io::AsyncRead + Unpin>) -> Answer {
    tokio::time::timeout(PATIENCE, async {
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
        let status = status.unwrap_or_else(|| panic!("not a status line: {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            stream.read_line(&mut line).await.unwrap();
            let Some((name, value)) = line.trim_end().split_once(':') else { break };
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let length = headers.iter().find(|(n, _)| n == "content-length").map(|(_, v)| v.parse().unwrap());
        let mut body = vec![0; length.expect("every answer has a Content-Length")];
        stream.read_exact(&mut body).await.unwrap();
        let body = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() };
        Answer { status, headers, body }
    })
    .await
    .unwrap_or_else(|_| panic!("no answer within {PATIENCE:?}"))
}

/// Sends `request` on `stream` and reads its answer.
async fn ask(stream: &mut BufReader<TcpStream>, request: &str) -> Answer {
    stream.get_mut().write_all(request.as_bytes()).await.unwrap();
    read_answer(stream).await
}

const HEALTH: &str = "GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n";
const TIMESTAMP: &str =
    "GET /api/sync.php?action=timestamp&user_id=8-evans&data_type=balance HTTP/1.1\r\nHost: hub\r\n\r\n";

async fn scrape(url: &str) -> String {
    support::client().get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn a_post_without_a_valid_token_is_answered_before_its_body_is_sent() {
    // A body the hub waited for would end, unsent, in `408 body_timeout`; each of these is
    // answered on its token alone while the client has sent nothing after the head.
    let hub = TestHub::start_with(|c| c.limits.body_timeout_secs = 20).await;
    let addr = hub.url.trim_start_matches("http://").to_owned();
    let now = jsonwebtoken::get_current_timestamp();
    let claims = hub::auth::Claims {
        iss: SITE.into(),
        sub: "8-evans".into(),
        aud: "test-hub".into(),
        exp: now - 3600,
        iat: Some(now - 3700),
        nbf: None,
        adm: false,
        scope: None,
    };
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(support::site_secret(SITE).as_bytes()),
    )
    .unwrap();
    for (token, code) in
        [(None, "missing_token"), (Some("x.y.z"), "invalid_token"), (Some(&*expired), "token_expired")]
    {
        let mut stream = BufReader::new(connect(&addr, Ipv4Addr::LOCALHOST).await);
        let answer = ask(&mut stream, &post_head(token, 60_000)).await;
        answer.assert_refused(401, code);
        // The client sends its body after all: it is thrown away, and the connection serves
        // the next request.
        stream.get_mut().write_all(&push_body("8-evans", 60_000)).await.unwrap();
        assert_eq!(ask(&mut stream, HEALTH).await.status, 200, "{code}: the connection was not kept");
    }
    // A client that waits for `100 Continue` before it sends its body is answered without
    // being told to send it.
    let mut stream = BufReader::new(connect(&addr, Ipv4Addr::LOCALHOST).await);
    let head = post_head(None, 60_000).replace("\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n");
    ask(&mut stream, &head).await.assert_refused(401, "missing_token");
    // Nothing follows, and since the body never comes, the connection ends.
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("the connection stayed open")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), "");
    let text = scrape(&hub.url).await;
    assert_eq!(sample(&text, "hub_request_body_bytes_in_flight"), Some(0.0), "{text}");
    hub.stop().await;
}

#[tokio::test]
async fn refused_uploads_are_answered_cleanly_over_one_http2_connection() {
    let hub = TestHub::start().await;
    let token = hub.backend_token(SITE, "8-evans");
    let addr = hub.url.trim_start_matches("http://").to_owned();
    let tcp = connect(&addr, Ipv4Addr::LOCALHOST).await;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    let connection = tokio::spawn(connection);
    // Each refusal comes while its body is still being sent: the client sends a first part,
    // reads the whole answer, then sends the rest.
    let cases: [(Option<&str>, &str, usize, u16, &str); 4] = [
        (None, "application/json", 60_000, 401, "missing_token"),
        (Some("x.y.z"), "application/json", 60_000, 401, "invalid_token"),
        (Some(&token), "text/plain", 60_000, 415, "unsupported_media_type"),
        (Some(&token), "application/json", 100_000, 413, "body_too_large"),
    ];
    for i in 0..100 {
        let (token, content_type, length, status, code) = cases[i % cases.len()];
        let (mut body, channel) = Channel::<Bytes, Infallible>::new(4);
        let mut request = hyper::Request::post(format!("http://{addr}/api/sync.php"))
            .header("content-type", content_type)
            .header("content-length", length);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let answer = sender.clone().send_request(request.body(channel).unwrap());
        body.send_data(Bytes::from(vec![b' '; 16 * 1024])).await.unwrap();
        let response = tokio::time::timeout(PATIENCE, answer).await.expect("no answer").unwrap();
        let answered = response.status().as_u16();
        let bytes = tokio::time::timeout(PATIENCE, response.into_body().collect())
            .await
            .expect("no whole answer")
            .unwrap_or_else(|e| panic!("upload {i} ({code}): the answer's body broke off: {e}"))
            .to_bytes();
        let answer: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("upload {i} ({code}): not the hub's JSON ({e}): {bytes:?}"));
        assert_eq!((answered, answer["code"].as_str()), (status, Some(code)), "upload {i}: {answer}");
        assert_eq!(answer["success"], false);
        // The rest of the body goes too: the hub throws it away rather than reset the stream
        // under the upload (which curl, for one, takes for a failed request).
        let mut sent = 16 * 1024;
        while sent < length {
            let n = (length - sent).min(16 * 1024);
            let rest = tokio::time::timeout(PATIENCE, body.send_data(Bytes::from(vec![b' '; n]))).await;
            assert!(
                rest.is_ok_and(|sent| sent.is_ok()),
                "upload {i} ({code}): the stream was reset under its body"
            );
            sent += n;
        }
    }
    // The connection still carries requests.
    let (mut body, channel) = Channel::<Bytes, Infallible>::new(1);
    let request = hyper::Request::post(format!("http://{addr}/api/sync.php"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(channel)
        .unwrap();
    let answer = sender.clone().send_request(request);
    body.send_data(Bytes::from(push_body("8-evans", 200))).await.unwrap();
    drop(body);
    let response = tokio::time::timeout(PATIENCE, answer).await.expect("no answer").unwrap();
    assert_eq!(response.status(), 200);
    drop(sender);
    let _ = tokio::time::timeout(PATIENCE, connection).await;
    hub.stop().await;
}

/// Has curl POST the file `body` to `url` as `content_type`, with `args`: whether it exited
/// well, and what it printed.
fn curl(args: &[&str], content_type: &str, body: &std::path::Path, url: &str) -> (bool, String) {
    let output = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "-H", &format!("Content-Type: {content_type}")])
        .args(args)
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "curl is not installed ({e}): `cargo xtask test` installs it, or run `apt-get install curl`"
            )
        });
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[tokio::test]
async fn curl_reads_every_refusal_of_an_upload_over_http2_and_http1() {
    let hub = TestHub::start_with(|c| c.limits.unauthenticated_requests_per_minute = 10_000).await;
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(&body, push_body("8-evans", 60_000)).unwrap();
    let url = format!("{}/api/sync.php", hub.url);
    let token = format!("Authorization: Bearer {}", hub.backend_token(SITE, "8-evans"));
    let failures = tokio::task::spawn_blocking(move || {
        let mut failures = Vec::new();
        for (protocol, flag) in [("HTTP/2", "--http2-prior-knowledge"), ("HTTP/1.1", "--http1.1")] {
            for i in 0..100 {
                // Without a token, and with a token but a body type the hub does not read.
                let (args, content_type, code) = if i % 2 == 0 {
                    (vec![flag], "application/json", "missing_token")
                } else {
                    (vec![flag, "-H", &token], "text/plain", "unsupported_media_type")
                };
                let (exited_well, text) = curl(&args, content_type, &body, &url);
                if !exited_well || !text.contains(&format!("\"code\":\"{code}\"")) {
                    failures.push(format!("{protocol} upload {i}: {text}"));
                }
            }
        }
        failures
    })
    .await
    .unwrap();
    assert!(
        failures.is_empty(),
        "{} of 200 refusals did not reach curl:\n{}",
        failures.len(),
        failures.join("\n")
    );
    hub.stop().await;
}

/// Slow uploads per source address, and the addresses.
const SLOW_PER_ADDRESS: usize = 100;
const SLOW_ADDRESSES: u8 = 10;

/// Sends `head` and a first few bytes of its body, then either nothing more (`trickle` false)
/// or a byte every 200 ms, until the hub answers; returns the answer.
async fn slow_upload(
    addr: String,
    from: Ipv4Addr,
    head: String,
    trickle: bool,
    gate: Arc<Semaphore>,
) -> Answer {
    let stream = {
        let _permit = gate.acquire().await.unwrap();
        connect(&addr, from).await
    };
    let (read, mut write) = stream.into_split();
    write.write_all(head.as_bytes()).await.unwrap();
    write.write_all(b"{\"action\":").await.unwrap();
    let writer = tokio::spawn(async move {
        if trickle {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if write.write_all(b" ").await.is_err() {
                    break;
                }
            }
        }
        write
    });
    let answer = read_answer(&mut BufReader::new(read)).await;
    writer.abort();
    answer
}

#[tokio::test]
async fn a_thousand_slow_bodies_are_cut_with_408_and_counted_against_their_addresses() {
    let hub = TestHub::start_with(|c| {
        c.limits.body_timeout_secs = 2;
        // Each address may send 2 requests without a valid token a minute: the bodies'
        // timeouts alone use that up, and it comes back slowly enough to be seen gone.
        c.limits.unauthenticated_requests_per_minute = 2;
        c.limits.requests_per_minute = 1_000;
    })
    .await;
    let addr = hub.url.trim_start_matches("http://").to_owned();
    let gate = Arc::new(Semaphore::new(100));
    let mut uploads = Vec::new();
    for a in 0..SLOW_ADDRESSES {
        let from = Ipv4Addr::new(127, 0, 0, 20 + a);
        // One user per address, its token valid: each upload gets past admission.
        let token = hub.token(SITE, &format!("slow-{a}"));
        for i in 0..SLOW_PER_ADDRESS {
            let head = post_head(Some(&token), 1_000);
            uploads.push(tokio::spawn(slow_upload(addr.clone(), from, head, i % 2 == 1, gate.clone())));
        }
    }
    for upload in uploads {
        upload.await.unwrap().assert_refused(408, "body_timeout");
    }
    for a in 0..SLOW_ADDRESSES {
        let mut stream = BufReader::new(connect(&addr, Ipv4Addr::new(127, 0, 0, 20 + a)).await);
        let answer = ask(&mut stream, TIMESTAMP).await;
        answer.assert_refused(429, "rate_limited");
        assert!(answer.header("retry-after").is_some());
    }
    let mut stream = BufReader::new(connect(&addr, Ipv4Addr::new(127, 0, 0, 19)).await);
    ask(&mut stream, TIMESTAMP).await.assert_refused(401, "missing_token");
    let text = scrape(&hub.url).await;
    let cut = (SLOW_PER_ADDRESS * usize::from(SLOW_ADDRESSES)) as f64;
    assert_eq!(sample(&text, r#"hub_request_bodies_refused_total{reason="timeout"}"#), Some(cut), "{text}");
    assert_eq!(sample(&text, "hub_request_body_bytes_in_flight"), Some(0.0));
    hub.stop().await;
}

/// The peak resident memory of the process `pid` so far (`VmHWM`), in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Bytes of bodies the hub may hold at once in [`uploads_beyond_the_bytes_in_flight_are_refused_busy_and_memory_stays_bounded`]:
/// 16 of the largest.
const IN_FLIGHT: usize = 16 * MAX_BODY;
/// Uploads of the largest body all at once, from [`FLOOD_ADDRESSES`] addresses.
const FLOOD: usize = 2_000;
const FLOOD_ADDRESSES: u8 = 10;
/// The hub's peak memory must stay below this: without the limit the flood's bodies alone
/// would take 125 MiB.
const MEMORY_BOUND: u64 = 256 * 1024 * 1024;

#[tokio::test]
async fn uploads_beyond_the_bytes_in_flight_are_refused_busy_and_memory_stays_bounded() {
    let deployment = Deployment::new(|c| {
        c.limits.max_body_bytes_in_flight = IN_FLIGHT;
        c.limits.requests_per_minute = 10_000;
        c.limits.unauthenticated_requests_per_minute = 10_000;
    });
    let hub = deployment.start().await;
    let pid = hub.id().unwrap();
    let addr = deployment.addr();
    let token = deployment.token(SITE, "8-evans");
    let at_start = peak_memory(pid);

    // 16 uploads of the largest body hold every byte in flight: each has sent its head and
    // a first part, and waits.
    let mut held = Vec::new();
    for _ in 0..IN_FLIGHT / MAX_BODY {
        let mut stream = connect(&addr, Ipv4Addr::new(127, 0, 0, 40)).await;
        stream.write_all(post_head(Some(&token), MAX_BODY).as_bytes()).await.unwrap();
        stream.write_all(&push_body("8-evans", MAX_BODY)[..1_000]).await.unwrap();
        held.push(stream);
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = scrape(&deployment.url()).await;
        if sample(&text, "hub_request_body_bytes_in_flight") == Some(IN_FLIGHT as f64) {
            assert_eq!(sample(&text, "hub_request_body_bytes_in_flight_limit"), Some(IN_FLIGHT as f64));
            break;
        }
        assert!(Instant::now() < deadline, "the held uploads were never all in flight: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Meanwhile a flood of uploads of the largest body, from several addresses: each is
    // answered 503 busy before it sends its body, then sends it all the same (thrown away).
    let gate = Arc::new(Semaphore::new(200));
    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            let (addr, token, gate) = (addr.clone(), token.clone(), gate.clone());
            let from = Ipv4Addr::new(127, 0, 0, 50 + (i % usize::from(FLOOD_ADDRESSES)) as u8);
            tokio::spawn(async move {
                let stream = {
                    let _permit = gate.acquire().await.unwrap();
                    connect(&addr, from).await
                };
                let mut stream = BufReader::new(stream);
                let answer = ask(&mut stream, &post_head(Some(&token), MAX_BODY)).await;
                let _ = stream.get_mut().write_all(&push_body("8-evans", MAX_BODY)).await;
                answer
            })
        })
        .collect();
    for upload in flood {
        let answer = upload.await.unwrap();
        answer.assert_refused(503, "busy");
        assert_eq!(answer.header("retry-after"), Some("1"));
    }
    let peak = peak_memory(pid);

    // The held uploads finish and are applied.
    for mut stream in held {
        stream.write_all(&push_body("8-evans", MAX_BODY)[1_000..]).await.unwrap();
        let answer = read_answer(&mut BufReader::new(stream)).await;
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let text = scrape(&deployment.url()).await;
    assert_eq!(sample(&text, r#"hub_request_bodies_refused_total{reason="busy"}"#), Some(FLOOD as f64));
    assert_eq!(sample(&text, "hub_request_body_bytes_in_flight"), Some(0.0));
    println!(
        "hub peak memory: {:.1} MiB at start, {:.1} MiB after {FLOOD} uploads of {} KiB refused busy \
         beside {} KiB in flight",
        at_start as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        MAX_BODY / 1024,
        IN_FLIGHT / 1024
    );
    assert!(peak < MEMORY_BOUND, "the hub's peak memory reached {peak} bytes");
    // Refusals are counted, not logged one by one: a flood does not fill the operator's logs.
    let log = deployment.log();
    let errors = log.lines().filter(|line| line.contains("ERROR")).count();
    assert_eq!(errors, 0, "{FLOOD} refusals logged {errors} errors:\n{log}");
}
