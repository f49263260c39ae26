//! A catalogue of hostile input against a real hub over real HTTP. Every refused request is
//! answered with its status, a stable `code` and a message, and leaves the store exactly as
//! it was; the few inputs the SPEC accepts after normalization are checked as stored.
//! Tokens and authorization live in `tokens.rs`; here the caller is always legitimate.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use protocol::MAX_AMOUNT;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Reply, SiteClient, TestHub};

const USER: &str = "8-evans";
const SITE: &str = "roflfaucet";
/// One op id for every refused delta: were any of them remembered, the next would be
/// answered `op_id_reused` instead of its own refusal.
const OP: &str = "hostile-op";
/// The hub's body limit.
const MAX_BODY: usize = 64 * 1024;

/// A hub holding a few legitimate records of [`USER`], and a snapshot of its store taken
/// after them: a refused request must leave the store equal to that snapshot.
struct Seeded {
    hub: TestHub,
    page: SiteClient,
    token: String,
    before: Vec<String>,
}

impl Seeded {
    async fn start() -> Seeded {
        // The catalogue is not about rate limits: let every case reach its own rule.
        let hub = TestHub::start_with(|config| {
            config.limits.requests_per_minute = 10_000;
            config.limits.unauthenticated_requests_per_minute = 10_000;
        })
        .await;
        let page = hub.site(SITE, USER);
        page.push("balance", json!({"coins": 100})).await.assert_ok();
        page.delta("balance", 5, "seed-op").await.assert_ok();
        page.push("points", json!({"points": MAX_AMOUNT})).await.assert_ok();
        page.push(
            "profile",
            json!({"display_name": "Evans", "bio": "Kenya reforestation", "website": "https://example.org"}),
        )
        .await
        .assert_ok();
        page.push("settings", json!({"theme": "dark"})).await.assert_ok();
        page.push("roles", json!({"site_roles": {SITE: ["recipient"]}})).await.assert_ok();
        let token = page.token.clone().expect("auth is on");
        let before = hub.snapshot();
        assert!(!before.is_empty(), "the seed writes were stored");
        Seeded { hub, page, token, before }
    }

    /// Takes the snapshot again after legitimate writes made by the test itself.
    fn settle(&mut self) {
        self.before = self.hub.snapshot();
    }

    /// Asserts that `reply` refuses with `status` and `code`, says why, carries a request
    /// id, and that the store is unchanged.
    #[track_caller]
    fn assert_refused(&self, case: &str, reply: &Reply, status: u16, code: &str) {
        assert_eq!((reply.status.as_u16(), reply.code()), (status, code), "{case}: {}", reply.body);
        assert_eq!(reply.body["success"], false, "{case}: {}", reply.body);
        assert!(
            reply.body["error"].as_str().is_some_and(|e| !e.trim().is_empty()),
            "{case}: no message: {}",
            reply.body
        );
        assert!(reply.header("x-request-id").is_some(), "{case}: no X-Request-Id");
        assert_eq!(self.hub.snapshot(), self.before, "{case}: the store changed");
    }

    async fn push_refused(&self, data_type: &str, data: Value, status: u16, code: &str) {
        let case = format!("push {data_type} {data}");
        let reply = self.page.push(data_type, data).await;
        self.assert_refused(&case, &reply, status, code);
    }

    async fn post_refused(&self, case: &str, body: Value, status: u16, code: &str) {
        let reply = self.page.post(&body).await;
        self.assert_refused(case, &reply, status, code);
    }

    /// POSTs `body` as given, with the page's token and `content_type` (none when `None`).
    async fn post_raw(&self, content_type: Option<&str>, body: impl Into<reqwest::Body>) -> Reply {
        let mut request = self.hub.request(Method::POST, "/api/sync.php").bearer_auth(&self.token).body(body);
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        Reply::from(request.send().await.unwrap()).await
    }

    async fn post_json_text(&self, body: impl Into<reqwest::Body>) -> Reply {
        self.post_raw(Some("application/json"), body).await
    }

    /// A GET of `/api/sync.php` with these query parameters, encoded, and the page's token.
    async fn query(&self, params: &[(&str, &str)]) -> Reply {
        let request = self.hub.request(Method::GET, "/api/sync.php").query(params).bearer_auth(&self.token);
        Reply::from(request.send().await.unwrap()).await
    }

    /// POSTs `body` with `Transfer-Encoding: chunked` and no Content-Length over a plain
    /// socket (reqwest always declares a length), so the hub only learns the size by reading.
    async fn post_chunked(&self, body: Vec<u8>) -> Reply {
        let addr = self.hub.url.trim_start_matches("http://").to_owned();
        let token = self.token.clone();
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let head = format!(
                "POST /api/sync.php HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            );
            // The hub may answer and stop reading once the limit is passed; the answer is
            // what this checks, so a refused write is no failure.
            let mut send = || -> std::io::Result<()> {
                stream.write_all(head.as_bytes())?;
                for chunk in body.chunks(4096) {
                    stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                    stream.write_all(chunk)?;
                    stream.write_all(b"\r\n")?;
                }
                stream.write_all(b"0\r\n\r\n")
            };
            let _ = send();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            parse_http_answer(&answer)
        })
        .await
        .unwrap()
    }
}

/// A push body of the seeded user and site.
fn push_body(data_type: &str, data: Value) -> Value {
    json!({"action": "push", "user_id": USER, "site_id": SITE, "data_type": data_type, "data": data})
}

/// A delta body of the seeded user and site on `data_type`.
fn delta_body(data_type: &str, delta: Value) -> Value {
    json!({
        "action": "delta", "user_id": USER, "site_id": SITE, "data_type": data_type,
        "delta": delta, "op_id": OP,
    })
}

/// Reads an HTTP/1.1 answer with a Content-Length body into a [`Reply`].
fn parse_http_answer(answer: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no answer: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap();
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        headers.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value.trim()).unwrap(),
        );
    }
    let body = if body.is_empty() { Value::Null } else { serde_json::from_str(body).unwrap() };
    Reply { status: StatusCode::from_u16(status).unwrap(), headers, body, len: answer.len() }
}

#[tokio::test]
async fn wrong_json_types_are_refused() {
    let s = Seeded::start().await;
    for data in [json!([1, 2]), json!("coins=5"), json!(5), json!(null), json!(true)] {
        s.push_refused("balance", data, 400, "invalid_data").await;
    }
    for coins in [json!("5"), json!(true), json!(null), json!([5]), json!({"value": 5})] {
        s.push_refused("balance", json!({"coins": coins}), 400, "not_an_integer").await;
    }
    s.push_refused("points", json!({"points": "10"}), 400, "not_an_integer").await;
    s.push_refused("profile", json!({"bio": 42}), 400, "invalid_type").await;
    s.push_refused("profile", json!({"display_name": ["Evans"]}), 400, "invalid_type").await;
    s.push_refused("profile", json!({"website": {"href": "https://x.org"}}), 400, "invalid_type").await;
    s.push_refused("profile", json!({"avatar": false}), 400, "invalid_type").await;
    s.push_refused("roles", json!({"site_roles": [SITE]}), 400, "invalid_type").await;
    s.push_refused("roles", json!({"site_roles": {SITE: "recipient"}}), 400, "invalid_type").await;
    s.post_refused("delta as a number", delta_body("balance", json!(10)), 400, "invalid_request").await;
    let mut body = push_body("balance", json!({"coins": 1}));
    body["base_version"] = json!("3");
    s.post_refused("base_version as a string", body.clone(), 400, "invalid_request").await;
    body["base_version"] = json!(-1);
    s.post_refused("negative base_version", body, 400, "invalid_request").await;
    let mut body = delta_body("balance", json!({"coins": 1}));
    body["op_id"] = json!(17);
    s.post_refused("op_id as a number", body, 400, "invalid_request").await;
    let mut body = push_body("balance", json!({"coins": 1}));
    body["user_id"] = json!(8);
    s.post_refused("user_id as a number", body, 400, "invalid_request").await;
    s.hub.stop().await;
}

#[tokio::test]
async fn floats_and_negative_amounts_are_refused() {
    let s = Seeded::start().await;
    for coins in [json!(1.5), json!(10.0), json!(-0.5), json!(1e3)] {
        s.push_refused("balance", json!({"coins": coins}), 400, "not_an_integer").await;
    }
    s.push_refused("points", json!({"points": 2.0}), 400, "not_an_integer").await;
    for coins in [-1, -MAX_AMOUNT] {
        s.push_refused("balance", json!({"coins": coins}), 400, "negative_value").await;
    }
    for delta in [json!(1.5), json!(10.0), json!(-2.5)] {
        let case = format!("delta {delta}");
        s.post_refused(&case, delta_body("balance", json!({"coins": delta})), 400, "not_an_integer").await;
    }
    let reply = s.post_json_text(
        r#"{"action":"push","user_id":"8-evans","site_id":"roflfaucet","data_type":"balance","data":{"coins":1E2}}"#,
    );
    s.assert_refused("exponent notation", &reply.await, 400, "not_an_integer");
    s.hub.stop().await;
}

#[tokio::test]
async fn overflowing_amounts_are_refused() {
    let s = Seeded::start().await;
    for coins in
        [json!(u64::MAX), json!(i64::MAX), json!(i64::MIN), json!(MAX_AMOUNT + 1), json!(1_u64 << 53)]
    {
        s.push_refused("balance", json!({"coins": coins}), 400, "value_too_large").await;
    }
    let huge = "9".repeat(400);
    let reply = s
        .post_json_text(format!(
            r#"{{"action":"push","user_id":"8-evans","site_id":"roflfaucet","data_type":"balance","data":{{"coins":{huge}}}}}"#
        ))
        .await;
    s.assert_refused("a 400-digit coins value", &reply, 400, "invalid_json");
    let reply = s
        .post_json_text(format!(
            r#"{{"action":"delta","user_id":"8-evans","site_id":"roflfaucet","data_type":"balance","delta":{{"coins":-{huge}}},"op_id":"{OP}"}}"#
        ))
        .await;
    s.assert_refused("a 400-digit delta", &reply, 400, "invalid_json");
    for delta in [1_000_000_001_i64, -1_000_000_001, MAX_AMOUNT] {
        let case = format!("delta {delta} beyond max_delta");
        s.post_refused(&case, delta_body("balance", json!({"coins": delta})), 400, "delta_too_large").await;
    }
    for delta in [json!(u64::MAX), json!(i64::MIN), json!(1_u64 << 53)] {
        let case = format!("delta {delta} beyond the amount range");
        s.post_refused(&case, delta_body("balance", json!({"coins": delta})), 400, "value_too_large").await;
    }
    // Points are seeded at MAX_AMOUNT: one more would pass what a JavaScript number holds.
    s.post_refused("points past 2^53-1", delta_body("points", json!({"points": 1})), 400, "value_too_large")
        .await;
    s.hub.stop().await;
}

#[tokio::test]
async fn malformed_deltas_are_refused() {
    let s = Seeded::start().await;
    s.post_refused("a delta of 0", delta_body("balance", json!({"coins": 0})), 400, "zero_delta").await;
    s.post_refused("a delta of -0", delta_body("points", json!({"points": -0})), 400, "zero_delta").await;
    s.post_refused(
        "a delta on profile",
        delta_body("profile", json!({"coins": 5})),
        400,
        "invalid_data_type",
    )
    .await;
    s.post_refused("a delta on roles", delta_body("roles", json!({"coins": 5})), 400, "invalid_data_type")
        .await;
    s.post_refused("points on balance", delta_body("balance", json!({"points": 5})), 400, "invalid_data")
        .await;
    s.post_refused("coins on points", delta_body("points", json!({"coins": 5})), 400, "invalid_data").await;
    s.post_refused("an empty delta", delta_body("balance", json!({})), 400, "invalid_data").await;
    s.post_refused(
        "a second field",
        delta_body("balance", json!({"coins": 5, "points": 5})),
        400,
        "unknown_field",
    )
    .await;
    for op_id in [String::new(), "x".repeat(129), "a b".into(), "ü".into(), "op\n1".into()] {
        let mut body = delta_body("balance", json!({"coins": 5}));
        body["op_id"] = json!(op_id);
        s.post_refused(&format!("op_id {op_id:?}"), body, 400, "invalid_op_id").await;
    }
    let mut body = delta_body("balance", json!({"coins": 5}));
    body["reason"] = json!("game\u{0}");
    s.post_refused("a control character in the reason", body.clone(), 400, "control_characters").await;
    body["reason"] = json!("x".repeat(101));
    s.post_refused("a reason over 100 characters", body, 400, "text_too_long").await;
    s.hub.stop().await;
}

#[tokio::test]
async fn bodies_over_64_kib_are_refused_with_413() {
    let s = Seeded::start().await;
    // An unknown action padded with spaces to an exact size: at the limit the body is read
    // and refused for what it says; one byte more and it is refused for its size.
    let padded = |size: usize| {
        let mut body = br#"{"action":"drop_tables"}"#.to_vec();
        body.resize(size, b' ');
        body
    };
    let reply = s.post_json_text(padded(MAX_BODY)).await;
    s.assert_refused("a body of exactly 64 KiB", &reply, 400, "unknown_action");
    let reply = s.post_json_text(padded(MAX_BODY + 1)).await;
    s.assert_refused("a body of 64 KiB + 1 with Content-Length", &reply, 413, "body_too_large");

    let bio = "x".repeat(2 * MAX_BODY);
    let reply = s.page.push("profile", json!({"bio": bio})).await;
    s.assert_refused("a 128 KiB push", &reply, 413, "body_too_large");

    let reply = s.post_chunked(padded(1024)).await;
    s.assert_refused("a small chunked body", &reply, 400, "unknown_action");
    let reply = s.post_chunked(padded(MAX_BODY + 1)).await;
    s.assert_refused("a chunked body of 64 KiB + 1", &reply, 413, "body_too_large");
    let big = serde_json::to_vec(&push_body("profile", json!({"bio": bio}))).unwrap();
    let reply = s.post_chunked(big).await;
    s.assert_refused("a chunked 128 KiB push", &reply, 413, "body_too_large");
    s.hub.stop().await;
}

#[tokio::test]
async fn control_characters_in_profile_text_are_refused() {
    let s = Seeded::start().await;
    for (field, text) in [
        ("bio", "hello\u{0}world"),
        ("bio", "\u{1b}[31mred\u{1b}[0m"),
        ("bio", "bell\u{7}"),
        ("bio", "delete\u{7f}"),
        ("bio", "next line\u{85}"),
        ("display_name", "Evans\nAdmin"),
        ("display_name", "Evans\rAdmin"),
        ("display_name", "Evans\r\nAdmin"),
        ("display_name", "\u{0}"),
        ("location", "Nairobi\u{8}"),
        ("avatar", "\u{1b}"),
        ("website", "https://example.org/\u{0}"),
    ] {
        s.push_refused("profile", json!({field: text}), 400, "control_characters").await;
    }
    s.push_refused("settings", json!({"motto": "line\nbreak"}), 400, "control_characters").await;
    s.push_refused("settings", json!({"motto": "nul\u{0}"}), 400, "control_characters").await;
    s.hub.stop().await;
}

#[tokio::test]
async fn script_and_data_websites_are_refused() {
    let s = Seeded::start().await;
    for website in [
        "javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "  javascript:alert(1)  ",
        "java\tscript:alert(1)",
        "\u{202E}javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "DATA:text/html;base64,PHNjcmlwdD4=",
        "vbscript:msgbox(1)",
        "file:///etc/passwd",
        "ftp://example.org",
        "//evil.example",
        "example.org",
        "https://",
        "http://example.org@evil.example",
        "http://example.org/\"onmouseover=\"alert(1)",
        "https://example.org/<script>",
        "https://exa mple.org",
    ] {
        s.push_refused("profile", json!({"website": website}), 400, "invalid_url").await;
    }
    let long = format!("https://example.org/{}", "a".repeat(200));
    s.push_refused("profile", json!({"website": long}), 400, "text_too_long").await;
    s.hub.stop().await;
}

#[tokio::test]
async fn path_like_user_ids_are_refused_in_queries_and_bodies() {
    let s = Seeded::start().await;
    let overlong = "x".repeat(65);
    for user in
        ["../etc/passwd", "..", ".", "a/b", "a\\b", "8-evans/../admin", "", "a b", "é", "a\u{0}", &overlong]
    {
        for action in ["timestamp", "get"] {
            let reply = s.query(&[("action", action), ("user_id", user), ("data_type", "balance")]).await;
            s.assert_refused(&format!("GET {action} for {user:?}"), &reply, 400, "invalid_user_id");
        }
        let mut push = push_body("profile", json!({"bio": "x"}));
        push["user_id"] = json!(user);
        s.post_refused(&format!("push for {user:?}"), push, 400, "invalid_user_id").await;
        let mut delta = delta_body("balance", json!({"coins": 1}));
        delta["user_id"] = json!(user);
        s.post_refused(&format!("delta for {user:?}"), delta, 400, "invalid_user_id").await;
    }
    s.hub.stop().await;
}

#[tokio::test]
async fn repeated_query_parameters_are_refused() {
    let s = Seeded::start().await;
    for params in [
        [("action", "get"), ("user_id", USER), ("user_id", "victim"), ("data_type", "balance")],
        [("action", "get"), ("user_id", "victim"), ("user_id", USER), ("data_type", "balance")],
        [("action", "get"), ("user_id", USER), ("data_type", "balance"), ("data_type", "roles")],
        [("action", "get"), ("action", "timestamp"), ("user_id", USER), ("data_type", "balance")],
    ] {
        let reply = s.query(&params).await;
        s.assert_refused(&format!("GET {params:?}"), &reply, 400, "invalid_query");
    }
    s.hub.stop().await;
}

#[tokio::test]
async fn unknown_profile_fields_are_refused() {
    let s = Seeded::start().await;
    for field in ["email", "is_admin", "coins", "__proto__", "constructor", "Display_Name", "bio ", ""] {
        s.push_refused("profile", json!({field: "x"}), 400, "unknown_field").await;
    }
    s.push_refused("profile", json!({"bio": "fine", "role": "admin"}), 400, "unknown_field").await;
    s.push_refused("balance", json!({"coins": 1, "points": 1}), 400, "unknown_field").await;
    s.push_refused("points", json!({"coins": 1}), 400, "unknown_field").await;
    s.push_refused("roles", json!({"roles": ["admin"]}), 400, "unknown_field").await;
    s.push_refused("profile", json!({}), 400, "invalid_data").await;
    s.hub.stop().await;
}

#[tokio::test]
async fn settings_that_are_not_flat_named_scalars_are_refused() {
    let s = Seeded::start().await;
    for value in [json!({"a": 1}), json!({"deep": {"deeper": true}}), json!([1, 2]), json!([])] {
        s.push_refused("settings", json!({"layout": value}), 400, "invalid_type").await;
    }
    let too_long_key = "k".repeat(41);
    for key in ["Theme", "a-b", "a.b", "a b", "", "théme", "key\u{0}", "$where", too_long_key.as_str()] {
        s.push_refused("settings", json!({key: "x"}), 400, "invalid_setting_key").await;
    }
    s.push_refused("settings", json!({"motto": "x".repeat(1001)}), 400, "text_too_long").await;
    s.hub.stop().await;
}

#[tokio::test]
async fn unknown_data_types_are_refused() {
    let s = Seeded::start().await;
    for data_type in
        ["coins", "Balance", "BALANCE", "balance,foo", "balance,", " balance", "", "users", "../balance"]
    {
        s.push_refused(data_type, json!({"coins": 1}), 400, "invalid_data_type").await;
        let case = format!("delta on {data_type:?}");
        s.post_refused(&case, delta_body(data_type, json!({"coins": 1})), 400, "invalid_data_type").await;
    }
    for data_type in ["coins", "Balance", "balance,foo", "foo,balance", "balance,", ",", ""] {
        for action in ["timestamp", "get"] {
            let reply = s.query(&[("action", action), ("user_id", USER), ("data_type", data_type)]).await;
            s.assert_refused(&format!("GET {action} of {data_type:?}"), &reply, 400, "invalid_data_type");
        }
    }
    s.hub.stop().await;
}

#[tokio::test]
async fn malformed_request_bodies_are_refused() {
    let s = Seeded::start().await;
    let mut body = push_body("balance", json!({"coins": 1}));
    body["admin"] = json!(true);
    s.post_refused("an unknown top-level field", body, 400, "invalid_request").await;
    let mut body = delta_body("balance", json!({"coins": 1}));
    body["version"] = json!(9);
    s.post_refused("an unknown top-level field on a delta", body, 400, "invalid_request").await;
    let mut body = push_body("balance", json!({"coins": 1}));
    body["action"] = json!("drop");
    s.post_refused("an unknown action", body.clone(), 400, "unknown_action").await;
    body["action"] = json!("PUSH");
    s.post_refused("an action in capitals", body.clone(), 400, "unknown_action").await;
    body["action"] = json!(1);
    s.post_refused("an action that is not a string", body.clone(), 400, "invalid_request").await;
    body["action"] = json!("get");
    s.post_refused("a GET action by POST", body.clone(), 405, "method_not_allowed").await;
    body["action"] = json!("timestamp");
    s.post_refused("a timestamp by POST", body.clone(), 405, "method_not_allowed").await;
    body.as_object_mut().unwrap().remove("action");
    s.post_refused("no action", body, 400, "missing_field").await;
    for field in ["user_id", "site_id", "data_type", "data"] {
        let mut body = push_body("balance", json!({"coins": 1}));
        body.as_object_mut().unwrap().remove(field);
        s.post_refused(&format!("a push without {field}"), body, 400, "missing_field").await;
    }
    for field in ["user_id", "site_id", "data_type", "delta", "op_id"] {
        let mut body = delta_body("balance", json!({"coins": 1}));
        body.as_object_mut().unwrap().remove(field);
        s.post_refused(&format!("a delta without {field}"), body, 400, "missing_field").await;
    }

    for (case, text) in [
        ("broken JSON", r#"{"action":"push","user_id":"8-evans""#),
        ("trailing garbage", r#"{"action":"drop"} {"action":"push"}"#),
        ("single quotes", "{'action':'push'}"),
        ("a comment", r#"{"action":"push" /* hi */}"#),
        ("an empty body", ""),
        ("a byte-order mark", "\u{feff}{\"action\":\"push\"}"),
        (
            "NaN",
            r#"{"action":"push","user_id":"8-evans","site_id":"roflfaucet","data_type":"balance","data":{"coins":NaN}}"#,
        ),
    ] {
        let reply = s.post_json_text(text).await;
        s.assert_refused(case, &reply, 400, "invalid_json");
    }
    let reply = s.post_json_text(b"{\"action\":\"push\",\"user_id\":\"\xff\xfe\"}".to_vec()).await;
    s.assert_refused("invalid UTF-8", &reply, 400, "invalid_json");
    // Nesting far beyond any real body, inside the size limit: refused, not a stack overflow.
    let deep = format!(
        r#"{{"action":"push","user_id":"8-evans","site_id":"roflfaucet","data_type":"settings","data":{}{}}}"#,
        "[".repeat(30_000),
        "]".repeat(30_000)
    );
    let reply = s.post_json_text(deep).await;
    s.assert_refused("30 000 nested arrays", &reply, 400, "invalid_json");

    for text in ["[]", r#"[{"action":"push"}]"#, r#""push""#, "42", "null", "true"] {
        let reply = s.post_json_text(text).await;
        s.assert_refused(&format!("the JSON body {text}"), &reply, 400, "invalid_request");
    }
    s.hub.stop().await;
}

#[tokio::test]
async fn bodies_that_are_not_json_are_refused_with_415() {
    let s = Seeded::start().await;
    let body = push_body("balance", json!({"coins": 1})).to_string();
    for content_type in [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonp"),
        Some("text/json"),
        None,
    ] {
        let reply = s.post_raw(content_type, body.clone()).await;
        s.assert_refused(&format!("Content-Type {content_type:?}"), &reply, 415, "unsupported_media_type");
    }
    let reply = s.post_raw(Some("application/x-www-form-urlencoded"), "action=push&user_id=8-evans").await;
    s.assert_refused("a form body", &reply, 415, "unsupported_media_type");
    s.hub.stop().await;
}

#[tokio::test]
async fn wrong_methods_and_unknown_paths_are_refused() {
    let s = Seeded::start().await;
    for action in ["push", "delta"] {
        let reply = s.query(&[("action", action), ("user_id", USER), ("data_type", "balance")]).await;
        s.assert_refused(&format!("GET action={action}"), &reply, 405, "method_not_allowed");
        assert!(reply.header("allow").is_some_and(|a| a.contains("POST")), "no Allow header");
    }
    let reply = s.query(&[("action", "drop"), ("user_id", USER), ("data_type", "balance")]).await;
    s.assert_refused("GET action=drop", &reply, 400, "unknown_action");
    for (missing, params) in [
        ("action", [("user_id", USER), ("data_type", "balance")]),
        ("user_id", [("action", "get"), ("data_type", "balance")]),
        ("data_type", [("action", "get"), ("user_id", USER)]),
    ] {
        let reply = s.query(&params).await;
        s.assert_refused(&format!("GET without {missing}"), &reply, 400, "missing_field");
    }

    let body = push_body("balance", json!({"coins": 1}));
    for path in ["/api/sync.php", "/api/sync"] {
        for method in [Method::PUT, Method::DELETE, Method::PATCH] {
            let request = s.hub.request(method.clone(), path).bearer_auth(&s.token).json(&body);
            let reply = Reply::from(request.send().await.unwrap()).await;
            s.assert_refused(&format!("{method} {path}"), &reply, 405, "method_not_allowed");
        }
    }
    for path in
        ["/", "/api", "/api/sync.php/extra", "/api/sync.php.bak", "/api/sync.php%00", "/admin", "/.env"]
    {
        for method in [Method::GET, Method::POST] {
            let request = s.hub.request(method.clone(), path).bearer_auth(&s.token).json(&body);
            let reply = Reply::from(request.send().await.unwrap()).await;
            s.assert_refused(&format!("{method} {path}"), &reply, 404, "not_found");
        }
    }
    s.hub.stop().await;
}

#[tokio::test]
async fn settings_over_4_kib_are_refused_and_earlier_settings_kept() {
    let mut s = Seeded::start().await;
    let long = "x".repeat(1000);
    for key in ["a", "b", "c", "d"] {
        s.page.push("settings", json!({key: long})).await.assert_ok();
    }
    s.settle();
    s.push_refused("settings", json!({"e": "x".repeat(100)}), 400, "settings_too_large").await;
    s.push_refused("settings", json!({"f": 1, "g": 2, "h": long}), 400, "settings_too_large").await;
    let reply = s.page.get("settings").await;
    let settings = &reply.assert_ok()["data"];
    assert_eq!(settings["theme"], "dark");
    for key in ["a", "b", "c", "d"] {
        assert_eq!(settings[key], long.as_str(), "settings.{key}");
    }
    assert!(settings.get("e").is_none() && settings.get("f").is_none());
    // Freeing room by clearing a key in the same patch is judged on the merged result.
    s.page.push("settings", json!({"a": null, "e": "x".repeat(100)})).await.assert_ok();
    s.hub.stop().await;
}

#[tokio::test]
async fn too_many_roles_and_invalid_role_names_are_refused() {
    let s = Seeded::start().await;
    let seventeen: Vec<String> = (0..17).map(|i| format!("role-{i}")).collect();
    s.push_refused("roles", json!({"site_roles": {SITE: seventeen}}), 400, "too_many_roles").await;
    let too_long = "r".repeat(33);
    for role in
        [json!("Admin"), json!("a b"), json!(""), json!(too_long), json!("<script>"), json!("admin\u{0}")]
    {
        s.push_refused("roles", json!({"site_roles": {SITE: [role]}}), 400, "invalid_role").await;
    }
    for role in [json!(5), json!(null), json!(["admin"]), json!({"name": "admin"})] {
        s.push_refused("roles", json!({"site_roles": {SITE: ["recipient", role]}}), 400, "invalid_role")
            .await;
    }

    let admin = SiteClient { token: Some(s.hub.admin_token(SITE, USER)), ..s.page.clone() };
    let reply = admin.push("roles", json!({"global_roles": seventeen})).await;
    s.assert_refused("17 global roles", &reply, 400, "too_many_roles");
    let reply = admin.push("roles", json!({"global_roles": ["Root"]})).await;
    s.assert_refused("an invalid global role", &reply, 400, "invalid_role");
    let reply = admin.push("roles", json!({"global_roles": "admin"})).await;
    s.assert_refused("global_roles as a string", &reply, 400, "invalid_type");
    s.hub.stop().await;
}

#[tokio::test]
async fn profile_text_is_stored_as_trimmed_plain_text() {
    let s = Seeded::start().await;
    let markup = "<img src=x onerror=alert(1)>";
    let reply = s.page.push("profile", json!({"bio": format!("  {markup}  ")})).await;
    assert_eq!(reply.assert_ok()["data"]["bio"], markup);
    let reply = s.page.get("profile").await;
    assert_eq!(reply.assert_ok()["data"]["bio"], markup, "stored verbatim, never escaped");

    s.page
        .push("profile", json!({"bio": "line one\r\nline two\rline three\n", "location": "Nairobi\t Kenya"}))
        .await
        .assert_ok();
    s.page
        .push("profile", json!({"display_name": "evil\u{202E}gnp.exe", "avatar": "\u{FEFF}🌳"}))
        .await
        .assert_ok();
    s.page.push("profile", json!({"website": "HTTPS://Example.org/Path?q=1"})).await.assert_ok();
    let reply = s.page.get("profile").await;
    let profile = &reply.assert_ok()["data"];
    assert_eq!(profile["bio"], "line one\nline two\nline three");
    assert_eq!(profile["location"], "Nairobi  Kenya");
    assert_eq!(profile["display_name"], "evilgnp.exe");
    assert_eq!(profile["avatar"], "🌳");
    assert_eq!(profile["website"], "https://Example.org/Path?q=1");

    s.page
        .push("roles", json!({"site_roles": {SITE: ["recipient", "donor", "recipient"]}}))
        .await
        .assert_ok();
    let reply = s.page.get("roles").await;
    assert_eq!(reply.assert_ok()["data"]["site_roles"][SITE], json!(["recipient", "donor"]));
    s.hub.stop().await;
}

#[tokio::test]
async fn ambiguous_bodies_and_invisible_line_breaks_are_refused() {
    let s = Seeded::start().await;
    let twice = format!(
        r#"{{"action":"push","user_id":"victim","user_id":"{USER}","site_id":"{SITE}","data_type":"balance","data":{{"coins":1}}}}"#
    );
    let reply = s.post_json_text(twice).await;
    s.assert_refused("user_id given twice", &reply, 400, "invalid_request");
    let reply = s.post_json_text(format!(
        r#"{{"action":"push","user_id":"{USER}","site_id":"{SITE}","data_type":"balance","data":{{"coins":18446744073709551616}}}}"#
    ))
    .await;
    s.assert_refused("coins beyond u64", &reply, 400, "value_too_large");
    s.push_refused("profile", json!({"display_name": "a\u{2028}b"}), 400, "control_characters").await;
    s.hub.stop().await;
}

#[tokio::test]
async fn amounts_out_of_range_in_the_database_are_refused_and_never_stop_the_writer() {
    let hub = TestHub::start().await;
    let page = hub.site(SITE, USER);
    page.push("balance", json!({"coins": 1})).await.assert_ok();
    page.push("points", json!({"points": 1})).await.assert_ok();
    // Records no write of the hub's makes, as a hand-edited or older database may hold them.
    let conn = rusqlite::Connection::open(hub.dir.path().join("hub.sqlite3")).unwrap();
    conn.execute(
        "UPDATE records SET data = ?1 WHERE user_id = ?2 AND data_type = 'balance'",
        rusqlite::params![format!(r#"{{"coins":{}}}"#, i64::MAX), USER],
    )
    .unwrap();
    conn.execute(
        "UPDATE records SET data = ?1 WHERE user_id = ?2 AND data_type = 'points'",
        rusqlite::params![format!(r#"{{"points":{}}}"#, i64::MIN), USER],
    )
    .unwrap();
    page.delta("balance", 1, "past-max").await.assert_refused(400, "value_too_large");
    page.delta("points", -1, "past-min").await.assert_refused(409, "insufficient_funds");
    let set = page.push("points", json!({"points": 5})).await;
    assert_eq!(set.status.as_u16() / 100, 4, "{}", set.body);
    // The writer is still there: other writes go on.
    let other = hub.site(SITE, "13-alice");
    assert_eq!(other.delta("balance", 7, "after").await.assert_ok()["data"]["coins"], 7);
    hub.stop().await;
}
