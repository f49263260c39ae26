//! The HTTP rules around the API: CORS from configured origins only, rate limits per user
//! and per address, the header read timeout (also for a client that sends nothing) and the
//! connection limit.

mod support;

use std::time::Duration;

use reqwest::Method;
use support::{Deployment, Reply, TestHub, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMESTAMP: &str = "/api/sync.php?action=timestamp&user_id=8-evans&data_type=balance";

async fn preflight(hub: &TestHub, origin: &str) -> reqwest::Response {
    hub.request(Method::OPTIONS, "/api/sync.php")
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization, content-type")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_allowed_origin_gets_cors_headers() {
    let hub = TestHub::start().await;
    let response = preflight(&hub, "https://roflfaucet.com").await;
    assert!(response.status().is_success());
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], "https://roflfaucet.com");
    assert_eq!(headers["access-control-max-age"], "7200");
    let allowed = headers["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
    assert!(headers["vary"].to_str().unwrap().to_ascii_lowercase().contains("origin"));

    let token = hub.token("roflfaucet", "8-evans");
    let get =
        hub.request(Method::GET, TIMESTAMP).bearer_auth(token).header("Origin", "https://roflfaucet.com");
    let response = get.send().await.unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], "https://roflfaucet.com");
    let exposed = response.headers()["access-control-expose-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(exposed.contains("etag") && exposed.contains("retry-after"), "{exposed}");
    // A page dates the op ids it makes with the hub's clock.
    assert!(exposed.contains("date") && response.headers().contains_key("date"), "{exposed}");
}

#[tokio::test]
async fn other_origins_and_null_get_no_cors_headers() {
    let hub = TestHub::start().await;
    for origin in
        ["https://evil.example", "null", "https://roflfaucet.com.evil.example", "http://roflfaucet.com"]
    {
        let response = preflight(&hub, origin).await;
        assert!(response.headers().get("access-control-allow-origin").is_none(), "{origin}");
        let token = hub.token("roflfaucet", "8-evans");
        let get = hub.request(Method::GET, TIMESTAMP).bearer_auth(token).header("Origin", origin);
        let response = get.send().await.unwrap();
        assert!(response.headers().get("access-control-allow-origin").is_none(), "{origin}");
    }
}

#[tokio::test]
async fn an_origin_no_site_lists_is_counted_and_logged_once_up_to_a_bound() {
    // To the page, a CORS refusal is a `fetch` that failed, as if the hub were down: the
    // operator's log and metrics are where an origin missing from the configuration shows.
    let deployment = Deployment::new(|_| {});
    let mut hub = deployment.start().await;
    let send = |origin: String| {
        support::client()
            .request(Method::OPTIONS, format!("{}/api/sync.php", deployment.url()))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .send()
    };
    for _ in 0..3 {
        let response = send("https://shop.example".to_owned()).await.unwrap();
        assert!(response.headers().get("access-control-allow-origin").is_none());
    }
    // A client making up origins by the hundred fills neither the log nor the hub's memory.
    for n in 0..200 {
        send(format!("https://made-up-{n}.example")).await.unwrap();
    }
    // A listed origin is neither counted nor logged.
    let response = send("https://roflfaucet.com".to_owned()).await.unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], "https://roflfaucet.com");
    let metrics = support::client().get(format!("{}/metrics", deployment.url())).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert_eq!(sample(&text, "hub_cors_origins_refused_total"), Some(203.0), "{text}");
    hub.kill().await.unwrap();
    let log = deployment.log();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("no site lists")).collect();
    let shop: Vec<&&str> = refusals.iter().filter(|l| l.contains("https://shop.example")).collect();
    assert_eq!(shop.len(), 1, "logged once per origin:\n{log}");
    assert!(shop[0].contains("WARN") && shop[0].contains("`origins`"), "{}", shop[0]);
    assert_eq!(refusals.len(), 64, "{log}");
    assert!(!log.contains("https://roflfaucet.com"), "{log}");
}

#[tokio::test]
async fn a_sites_token_is_refused_from_another_sites_page() {
    let hub = TestHub::start().await;
    let token = hub.token("wrc", "8-evans");
    let from = |origin: &'static str| {
        hub.request(Method::GET, TIMESTAMP).bearer_auth(&token).header("Origin", origin).send()
    };
    Reply::from(from("https://wrc.org").await.unwrap()).await.assert_ok();
    let foreign = Reply::from(from("https://roflfaucet.com").await.unwrap()).await;
    foreign.assert_refused(403, "origin_not_allowed");
    // Without an Origin (a site's backend, curl) the token alone decides.
    Reply::from(hub.request(Method::GET, TIMESTAMP).bearer_auth(&token).send().await.unwrap())
        .await
        .assert_ok();
}

#[tokio::test]
async fn the_101st_request_in_a_minute_is_rate_limited_and_other_users_are_not() {
    let hub = TestHub::start().await;
    let evans = hub.site("roflfaucet", "8-evans");
    for _ in 0..100 {
        evans.timestamp("balance").await.assert_ok();
    }
    let limited = evans.timestamp("balance").await;
    limited.assert_refused(429, "rate_limited");
    let wait: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After: {wait}");
    // The limit is per user, across sites.
    hub.site("clickforcharity", "8-evans").timestamp("balance").await.assert_refused(429, "rate_limited");
    hub.site("roflfaucet", "someone-else").timestamp("balance").await.assert_ok();
}

#[tokio::test]
async fn preflights_do_not_count_against_the_rate_limit() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 2).await;
    for _ in 0..10 {
        assert!(preflight(&hub, "https://roflfaucet.com").await.status().is_success());
    }
    let evans = hub.site("roflfaucet", "8-evans");
    evans.timestamp("balance").await.assert_ok();
    evans.timestamp("balance").await.assert_ok();
    evans.timestamp("balance").await.assert_refused(429, "rate_limited");
}

#[tokio::test]
async fn requests_without_a_valid_token_are_limited_per_address() {
    let hub = TestHub::start_with(|c| c.limits.unauthenticated_requests_per_minute = 3).await;
    for _ in 0..3 {
        Reply::from(hub.request(Method::GET, TIMESTAMP).send().await.unwrap())
            .await
            .assert_refused(401, "missing_token");
    }
    let limited =
        Reply::from(hub.request(Method::GET, TIMESTAMP).bearer_auth("x.y.z").send().await.unwrap()).await;
    limited.assert_refused(429, "rate_limited");
    assert!(limited.header("retry-after").is_some());
    // Signed-in users are counted on their own limit, not the address's.
    hub.site("roflfaucet", "8-evans").timestamp("balance").await.assert_ok();
}

#[tokio::test]
async fn a_client_too_slow_to_send_its_headers_is_disconnected() {
    let hub = TestHub::start_with(|c| c.limits.header_read_timeout_secs = 1).await;
    let addr = hub.url.trim_start_matches("http://");
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the connection stayed open");
    // Others are served meanwhile and afterwards.
    hub.site("roflfaucet", "8-evans").timestamp("balance").await.assert_ok();
}

#[tokio::test]
async fn a_client_that_connects_and_says_nothing_does_not_keep_its_connection() {
    let hub = TestHub::start_with(|c| {
        c.limits.header_read_timeout_secs = 1;
        c.limits.max_connections = 2;
    })
    .await;
    let addr = hub.url.trim_start_matches("http://");
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut half_preface = tokio::net::TcpStream::connect(addr).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for (name, mut stream) in [("silent", silent), ("half an HTTP/2 preface", half_preface)] {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the {name} connection stayed open");
    }
    // Both connection slots are free again.
    hub.site("roflfaucet", "8-evans").timestamp("balance").await.assert_ok();
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let hub = TestHub::start_with(|c| c.limits.max_connections = 1).await;
    let addr = hub.url.trim_start_matches("http://").to_owned();
    let mut first = tokio::net::TcpStream::connect(&addr).await.unwrap();
    first.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    first.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // A second connection is accepted by the kernel but not served while the first is open.
    let second = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        answer
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "a connection beyond the limit was served");
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(20), second).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
}
