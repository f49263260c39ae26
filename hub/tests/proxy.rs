//! The hub behind a real nginx, run by each test as a child process with the deployment
//! guide's own configuration (`deploy/nginx/unified-sync-hub.conf`, only its ports and
//! certificate files changed): clients that reach nginx from different addresses get their
//! own rate-limit buckets and are logged by their address; an `X-Forwarded-For` forged by a
//! client, sent straight to the hub or through nginx, picks no other client's bucket;
//! `/metrics` and the dashboard's data through nginx want the metrics token even with
//! `allow_loopback`; a page's expired token is told `token_expired` through nginx while
//! anonymous requests flood its address; a hub with auth off refuses whatever a proxy
//! forwards. Clients bind
//! 127.0.0.2, 127.0.0.3 … (or `::1`) before connecting, to be other users.

mod support;

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hub::auth::Claims;
use hub::config::TrustedProxies;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use reqwest::StatusCode;
use support::nginx::{NGINX_CONF, Nginx};
use support::{Reply, SiteClient, TestHub, site_secret};
const DEPLOYMENT_GUIDE: &str = include_str!("../../docs/deployment.md");
/// Requests without a valid token one address may make per minute, in these tests.
const ANONYMOUS_PER_MINUTE: u32 = 3;
/// More requests than any bucket holds: a client sending this many is refused before the end.
const FLOOD: usize = 12;
const METRICS_TOKEN: &str = "a-metrics-token-for-the-proxy-tests";

impl Nginx {
    /// nginx's address, as the clients on `from` reach it.
    fn url(&self, from: IpAddr) -> String {
        match from {
            IpAddr::V4(_) => format!("https://127.0.0.1:{}", self.port),
            IpAddr::V6(_) => format!("https://[::1]:{}", self.port),
        }
    }

    /// A client connecting from `from`, trusting nginx's certificate.
    fn client(&self, from: IpAddr) -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .local_address(from)
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.authority_pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    /// A client on `from`, asking through nginx.
    fn from(&self, from: &str) -> Caller {
        let from = from.parse().unwrap();
        Caller { url: self.url(from), client: self.client(from) }
    }

    /// A page of `site` signed in as `user` on `from`, asking through nginx.
    fn page(&self, hub: &TestHub, from: &str, site: &str, user: &str) -> SiteClient {
        let Caller { url, client } = self.from(from);
        let token = hub.app.sites().keys().map(|_| hub.token(site, user));
        SiteClient { url, client, token, site: site.into(), user: user.into() }
    }

    fn access_log(&self) -> String {
        read(&self.dir.path().join("access.log"))
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A client on one address, asking the hub directly.
fn direct(hub: &TestHub, from: &str) -> Caller {
    Caller {
        url: hub.url.clone(),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .local_address(from.parse::<IpAddr>().unwrap())
            .build()
            .unwrap(),
    }
}

/// Someone on one address, through nginx or not, with no token.
struct Caller {
    url: String,
    client: reqwest::Client,
}

impl Caller {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.client.get(format!("{}{path}", self.url));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Reply::from(request.send().await.unwrap()).await
    }

    /// The status of a GET of `path`, whatever its body.
    async fn status(&self, path: &str) -> StatusCode {
        self.client.get(format!("{}{path}", self.url)).send().await.unwrap().status()
    }

    /// A version check without a token: refused, and charged to the caller's address.
    async fn anonymous(&self, headers: &[(&str, &str)]) -> Reply {
        self.get("/api/sync.php?action=timestamp&user_id=8-evans&data_type=balance", headers).await
    }

    /// Sends anonymous requests until one is rate-limited; how many were answered before it.
    async fn exhaust(&self, headers: &[(&str, &str)]) -> usize {
        for sent in 0..FLOOD {
            let reply = self.anonymous(headers).await;
            if reply.status == StatusCode::TOO_MANY_REQUESTS {
                reply.assert_refused(429, "rate_limited");
                return sent;
            }
            reply.assert_refused(401, "missing_token");
        }
        panic!("{FLOOD} anonymous requests from {} were never rate-limited", self.url);
    }
}

/// A hub that believes nginx on 127.0.0.1, answering `anonymous_per_minute` requests without
/// a token from each address.
async fn hub_behind_nginx(anonymous_per_minute: u32) -> TestHub {
    TestHub::start_with(|config| {
        config.trusted_proxies = TrustedProxies::try_from(vec!["127.0.0.1".to_owned()]).unwrap();
        config.limits.unauthenticated_requests_per_minute = anonymous_per_minute;
        config.metrics.token = Some(METRICS_TOKEN.into());
    })
    .await
}

/// Every log line of this test binary, for the tests that read what the hub logged.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = LogWriter(logs.clone());
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
    .clone()
}

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_deployment_guide_shows_the_tested_nginx_configuration() {
    assert!(
        DEPLOYMENT_GUIDE.contains(&format!("```nginx\n{NGINX_CONF}```\n")),
        "docs/deployment.md must show deploy/nginx/unified-sync-hub.conf verbatim, in an nginx block"
    );
}

#[tokio::test]
async fn clients_behind_nginx_have_their_own_buckets_and_are_logged_by_their_address() {
    let logs = logs();
    let hub = hub_behind_nginx(ANONYMOUS_PER_MINUTE).await;
    let nginx = Nginx::start(&hub, |site| site).await;

    // The deployment works: a signed-in page reads and writes through nginx, over HTTP/2.
    let page = nginx.page(&hub, "127.0.0.4", "roflfaucet", "8-evans");
    page.timestamp("balance").await.assert_ok();
    page.push("profile", serde_json::json!({"display_name": "Evans"})).await.assert_ok();
    let reply = page.get("profile").await;
    assert_eq!(reply.assert_ok()["data"]["display_name"], "Evans");
    assert_eq!(reply.header("strict-transport-security"), Some("max-age=31536000"));
    assert!(
        nginx.access_log().contains("127.0.0.4 "),
        "nginx saw the page's address:\n{}",
        nginx.access_log()
    );

    // One client uses up its bucket; the others, behind the same nginx, still have theirs.
    let first = nginx.from("127.0.0.2");
    let answered = first.exhaust(&[]).await;
    assert!(answered <= FLOOD / 2, "the first client's bucket held {answered} requests");
    nginx.from("127.0.0.3").anonymous(&[]).await.assert_refused(401, "missing_token");
    nginx.from("::1").anonymous(&[]).await.assert_refused(401, "missing_token");
    // nginx's own address, which every request came from, was charged for none of them.
    direct(&hub, "127.0.0.1").anonymous(&[]).await.assert_refused(401, "missing_token");
    first.anonymous(&[]).await.assert_refused(429, "rate_limited");

    let logged = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    for client in
        ["client=127.0.0.2 scheme=https", "client=127.0.0.3 scheme=https", "client=::1 scheme=https"]
    {
        assert!(logged.contains(client), "no request logged with {client}");
    }
    assert!(logged.contains("client=127.0.0.1 scheme=http}"), "the direct request is logged as nginx's own");
}

#[tokio::test]
async fn an_expired_token_through_nginx_is_told_token_expired_while_anonymous_requests_flood() {
    let hub = hub_behind_nginx(ANONYMOUS_PER_MINUTE).await;
    let nginx = Nginx::start(&hub, |site| site).await;
    // Someone behind the page's address uses up its anonymous bucket.
    nginx.from("127.0.0.2").exhaust(&[]).await;

    // The page's token, issued an hour ago by its site for this hub, expired 50 minutes ago.
    let now = get_current_timestamp();
    let claims = Claims {
        iss: "roflfaucet".into(),
        sub: "8-evans".into(),
        aud: "test-hub".into(),
        exp: now - 3000,
        iat: Some(now - 3600),
        nbf: None,
        adm: false,
        scope: None,
    };
    let secret = site_secret("roflfaucet");
    let expired =
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()));
    let mut page = nginx.page(&hub, "127.0.0.2", "roflfaucet", "8-evans");
    page.token = Some(expired.unwrap());
    page.timestamp("balance").await.assert_refused(401, "token_expired");
    // With a fresh token from its site, the page is served at once.
    page.token = Some(hub.token("roflfaucet", "8-evans"));
    page.timestamp("balance").await.assert_ok();
    nginx.from("127.0.0.2").anonymous(&[]).await.assert_refused(429, "rate_limited");
}

#[tokio::test]
async fn a_forged_x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let hub = hub_behind_nginx(ANONYMOUS_PER_MINUTE).await;
    let nginx = Nginx::start(&hub, |site| site).await;

    // 127.0.0.2 is no trusted proxy: whatever client it names, its own bucket pays.
    let forger = direct(&hub, "127.0.0.2");
    let mut forged = 0;
    while forger.anonymous(&[("x-forwarded-for", &format!("198.51.100.{forged}"))]).await.status
        != StatusCode::TOO_MANY_REQUESTS
    {
        forged += 1;
        assert!(forged < FLOOD, "forged addresses gave the forger fresh buckets");
    }
    let named =
        [("x-forwarded-for", "127.0.0.3"), ("forwarded", "for=127.0.0.3"), ("x-real-ip", "127.0.0.3")];
    forger.anonymous(&named).await.assert_refused(429, "rate_limited");
    // The client it named, through nginx, was charged nothing.
    nginx.from("127.0.0.3").anonymous(&[]).await.assert_refused(401, "missing_token");
}

#[tokio::test]
async fn a_forged_x_forwarded_for_through_nginx_picks_no_other_clients_bucket() {
    let hub = hub_behind_nginx(ANONYMOUS_PER_MINUTE).await;
    let nginx = Nginx::start(&hub, |site| site).await;

    // A client naming another in X-Forwarded-For: nginx appends its real address, which the
    // hub charges, so the other's bucket stays full…
    let forger = nginx.from("127.0.0.3");
    forger.exhaust(&[("x-forwarded-for", "127.0.0.2")]).await;
    nginx.from("127.0.0.2").anonymous(&[]).await.assert_refused(401, "missing_token");
    // …and naming a fresh address, or several, does not get it a fresh bucket.
    for forged in ["127.0.0.9", "198.51.100.7, 127.0.0.9", "for=127.0.0.9"] {
        forger.anonymous(&[("x-forwarded-for", forged)]).await.assert_refused(429, "rate_limited");
    }
    // A Forwarded header it wrote itself goes no further than nginx.
    forger.anonymous(&[("forwarded", "for=127.0.0.9")]).await.assert_refused(429, "rate_limited");
}

#[tokio::test]
async fn metrics_and_the_dashboard_data_through_nginx_want_the_token_even_with_allow_loopback() {
    let hub = hub_behind_nginx(1000).await;
    assert!(hub.app.config().metrics.allow_loopback);
    let nginx = Nginx::start(&hub, |site| site).await;

    // On the hub's machine, and directly, no token is needed.
    let local = direct(&hub, "127.0.0.1");
    assert_eq!(local.status("/metrics").await, StatusCode::OK);
    // Through nginx, every client is on loopback too, and is refused all the same.
    for path in ["/metrics", "/dashboard/data"] {
        for from in ["127.0.0.1", "127.0.0.2", "::1"] {
            nginx.from(from).get(path, &[]).await.assert_refused(401, "missing_token");
        }
    }
    // A forwarding header of any kind, trusted or not, makes a request non-local.
    for header in
        [("x-forwarded-for", "127.0.0.1"), ("forwarded", "for=127.0.0.1"), ("x-real-ip", "127.0.0.1")]
    {
        local.get("/metrics", &[header]).await.assert_refused(401, "missing_token");
        direct(&hub, "127.0.0.2")
            .get("/dashboard/data", &[header])
            .await
            .assert_refused(401, "missing_token");
    }
    // The metrics token lets the operator in from anywhere.
    let bearer = format!("Bearer {METRICS_TOKEN}");
    let reply =
        nginx.from("127.0.0.2").client.get(format!("{}/metrics", nginx.url("127.0.0.2".parse().unwrap())));
    let reply = reply.header("authorization", &bearer).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    assert!(reply.text().await.unwrap().contains("hub_requests_total"));
}

#[tokio::test]
async fn a_hub_without_auth_refuses_what_a_proxy_forwards() {
    let hub = TestHub::start_with(|config| {
        config.auth = false;
        config.trusted_proxies = TrustedProxies::try_from(vec!["127.0.0.1".to_owned()]).unwrap();
    })
    .await;
    let nginx = Nginx::start(&hub, |site| site).await;
    let version_check = "/api/sync.php?action=timestamp&user_id=8-evans&data_type=balance";

    // On its own machine, the development hub answers anyone as anyone.
    let local = direct(&hub, "127.0.0.1");
    assert_eq!(local.status("/healthz").await, StatusCode::OK);
    local.get(version_check, &[]).await.assert_ok();
    // Through a proxy, it answers nothing.
    for path in ["/healthz", version_check, "/metrics", "/dashboard/"] {
        for from in ["127.0.0.2", "::1"] {
            nginx.from(from).get(path, &[]).await.assert_refused(403, "proxy_not_allowed");
        }
    }
    let page = nginx.page(&hub, "127.0.0.2", "roflfaucet", "8-evans");
    page.push("profile", serde_json::json!({"display_name": "Evans"}))
        .await
        .assert_refused(403, "proxy_not_allowed");
    // Nor to a proxy it does not know, whichever forwarding header it sends.
    for header in
        [("x-forwarded-for", "127.0.0.1"), ("forwarded", "for=127.0.0.1"), ("x-real-ip", "127.0.0.1")]
    {
        direct(&hub, "127.0.0.3")
            .get(version_check, &[header])
            .await
            .assert_refused(403, "proxy_not_allowed");
    }
    assert!(hub.snapshot().iter().all(|row| !row.contains("Evans")), "the proxied push changed nothing");
}
