//! HTTPS served by the hub itself: the sync API over TLS, HTTP/2 or HTTP/1.1 as ALPN chooses,
//! HSTS over HTTPS and never over plain HTTP, plain HTTP refused on the TLS port, silent or
//! stalled clients closed after the header read timeout, unusable certificate files refused
//! by name, and a renewed certificate taken up on SIGHUP (or `Tls::reload`) while the
//! connections already open keep working; the served certificate's expiry and each reload in
//! `/metrics` and the dashboard's data. Each test makes its own certificate authorities.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Empty;
use hub::App;
use hub::config::Config;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use reqwest::{Method, Version};
use support::{Deployment, PATIENCE, SiteClient, TestHub, hang_up};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};

const HSTS: &str = "max-age=31536000";

/// A certificate authority made for one test.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate and its key, as the hub's PEM files hold them.
struct Issued {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Authority { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    /// A certificate for the names the tests reach the hub by: `localhost` and `127.0.0.1`.
    fn issue(&self) -> Issued {
        self.issue_until(rcgen::date_time_ymd(4096, 1, 1))
    }

    /// A certificate as [`Authority::issue`] makes, valid until `not_after`.
    fn issue_until(&self, not_after: time::OffsetDateTime) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }

    /// An HTTP client that trusts this authority and no other.
    fn client(&self) -> reqwest::ClientBuilder {
        let root = reqwest::Certificate::from_pem(self.issuer.pem().as_bytes()).unwrap();
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .tls_built_in_root_certs(false)
            .add_root_certificate(root)
    }

    /// `site`'s backend signed in as `user`, on the in-process `hub`, trusting this authority.
    fn page(&self, hub: &TestHub, site: &str, user: &str) -> SiteClient {
        SiteClient {
            url: hub.url.clone(),
            client: self.client().build().unwrap(),
            token: Some(hub.backend_token(site, user)),
            site: site.into(),
            user: user.into(),
        }
    }
}

/// The hub's certificate and key files, in a directory of the test's own.
struct CertFiles {
    dir: TempDir,
}

impl CertFiles {
    fn new(issued: &Issued) -> CertFiles {
        let files = CertFiles { dir: tempfile::tempdir().unwrap() };
        files.write(issued);
        files
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// Replaces both files, as a certificate renewal does.
    fn write(&self, issued: &Issued) {
        std::fs::write(self.cert(), &issued.cert_pem).unwrap();
        std::fs::write(self.key(), &issued.key_pem).unwrap();
    }

    fn configure(&self, config: &mut Config) {
        config.tls_cert = Some(self.cert());
        config.tls_key = Some(self.key());
    }
}

/// An in-process hub serving HTTPS with a certificate of `authority`.
async fn https_hub(authority: &Authority, tweak: impl FnOnce(&mut Config)) -> (TestHub, CertFiles) {
    let files = CertFiles::new(&authority.issue());
    let hub = TestHub::start_with(|c| {
        files.configure(c);
        tweak(c);
    })
    .await;
    assert!(hub.url.starts_with("https://"), "{}", hub.url);
    (hub, files)
}

fn addr(url: &str) -> &str {
    url.split_once("://").unwrap().1
}

/// A TLS connection to `addr` as a client that trusts `roots` and offers `alpn`.
async fn handshake(
    addr: &str,
    roots: &[&Authority],
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut trusted = RootCertStore::empty();
    for root in roots {
        trusted.add(root.issuer.der().clone()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(trusted)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await
}

fn negotiated(stream: &TlsStream<TcpStream>) -> Option<&[u8]> {
    stream.get_ref().1.alpn_protocol()
}

/// The certificate the hub presented on this connection.
fn presented(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().expect("the hub presents a certificate")[0].to_vec()
}

/// The certificate a new connection is presented, trusting either authority.
async fn presented_now(addr: &str, roots: &[&Authority]) -> Vec<u8> {
    presented(&handshake(addr, roots, &[b"http/1.1"]).await.unwrap())
}

/// An HTTP/1.1 connection over TLS that stays open between requests.
struct Held {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    certificate: Vec<u8>,
}

impl Held {
    async fn open(stream: TlsStream<TcpStream>) -> Held {
        let certificate = presented(&stream);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Held { sender, certificate }
    }

    /// The status of `/healthz`, asked on this connection.
    async fn health(&mut self) -> u16 {
        self.sender.ready().await.expect("the connection is still open");
        let request = hyper::Request::get("/healthz").header("host", "127.0.0.1").body(Empty::new()).unwrap();
        self.sender.send_request(request).await.unwrap().status().as_u16()
    }
}

#[tokio::test]
async fn the_sync_api_answers_over_https() {
    let ca = Authority::new("test CA");
    let (hub, _files) = https_hub(&ca, |_| {}).await;
    let page = ca.page(&hub, "roflfaucet", "8-evans");
    page.delta("balance", 25, "op-over-tls-1").await.assert_ok();
    page.timestamp("balance").await.assert_ok();
    assert_eq!(page.coins().await, 25);
    // A client that does not trust the hub's authority gets nothing.
    let stranger = Authority::new("another CA").page(&hub, "roflfaucet", "8-evans");
    let refused = stranger.client.get(format!("{}/healthz", hub.url)).send().await;
    assert!(refused.is_err(), "a certificate of an untrusted authority was accepted");
}

#[tokio::test]
async fn alpn_chooses_http2_when_offered_and_http1_otherwise() {
    let ca = Authority::new("test CA");
    let (hub, _files) = https_hub(&ca, |_| {}).await;
    let addr = addr(&hub.url);
    let both = handshake(addr, &[&ca], &[b"h2", b"http/1.1"]).await.unwrap();
    assert_eq!(negotiated(&both), Some(&b"h2"[..]));
    let http1 = handshake(addr, &[&ca], &[b"http/1.1"]).await.unwrap();
    assert_eq!(negotiated(&http1), Some(&b"http/1.1"[..]));

    // Each is answered in the protocol chosen.
    let health = format!("{}/healthz", hub.url);
    let answer = ca.client().build().unwrap().get(&health).send().await.unwrap();
    assert_eq!((answer.status().as_u16(), answer.version()), (200, Version::HTTP_2));
    let answer = ca.client().http1_only().build().unwrap().get(&health).send().await.unwrap();
    assert_eq!((answer.status().as_u16(), answer.version()), (200, Version::HTTP_11));

    // A client that offers no protocol is spoken to in HTTP/1.1.
    let silent_on_alpn = handshake(addr, &[&ca], &[]).await.unwrap();
    assert_eq!(negotiated(&silent_on_alpn), None);
    assert_eq!(Held::open(silent_on_alpn).await.health().await, 200);
}

#[tokio::test]
async fn hsts_is_sent_over_https_and_never_over_plain_http() {
    let ca = Authority::new("test CA");
    let (hub, _files) = https_hub(&ca, |_| {}).await;
    let client = ca.client().build().unwrap();
    let requests = [
        (Method::GET, "/healthz"),
        (Method::GET, "/api/sync.php?action=timestamp&user_id=8-evans&data_type=balance"), // 401
        (Method::GET, "/nowhere"),                                                         // 404
    ];
    for (method, path) in &requests {
        let answer = client.request(method.clone(), format!("{}{path}", hub.url)).send().await.unwrap();
        let hsts = answer.headers().get("strict-transport-security").and_then(|v| v.to_str().ok());
        assert_eq!(hsts, Some(HSTS), "{method} {path} answered {}", answer.status());
    }
    let preflight = client
        .request(Method::OPTIONS, format!("{}/api/sync.php", hub.url))
        .header("Origin", "https://roflfaucet.com")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.headers().get("strict-transport-security").unwrap(), HSTS);

    let plain = TestHub::start().await;
    for (method, path) in &requests {
        let answer = plain.request(method.clone(), path).send().await.unwrap();
        assert!(
            answer.headers().get("strict-transport-security").is_none(),
            "plain HTTP sent HSTS on {method} {path}"
        );
    }
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_no_http_answer() {
    let ca = Authority::new("test CA");
    let (hub, _files) = https_hub(&ca, |_| {}).await;
    let addr = addr(&hub.url);
    let plain = support::client().get(format!("http://{addr}/healthz")).send().await;
    assert!(plain.is_err(), "plain HTTP was answered on the TLS port: {plain:?}");
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, raw.read_to_end(&mut answer)).await.expect("the hub hung up");
    assert!(!answer.starts_with(b"HTTP/"), "{}", String::from_utf8_lossy(&answer));
    // HTTPS is still served.
    ca.page(&hub, "roflfaucet", "8-evans").timestamp("balance").await.assert_ok();
}

#[tokio::test]
async fn silent_or_stalled_clients_on_the_tls_port_are_closed_after_the_header_read_timeout() {
    let ca = Authority::new("test CA");
    let (hub, _files) = https_hub(&ca, |c| {
        c.limits.header_read_timeout_secs = 1;
        c.limits.max_connections = 4;
    })
    .await;
    let addr = addr(&hub.url);
    let silent = TcpStream::connect(addr).await.unwrap();
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    // A TLS record header announcing a ClientHello that never comes.
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
    for (name, mut stream) in [("silent", silent), ("stalled in the handshake", stalled)] {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the {name} connection stayed open");
    }
    // Clients that finish the handshake and then say nothing, in either protocol.
    let http2 = handshake(addr, &[&ca], &[b"h2"]).await.unwrap();
    let http1 = handshake(addr, &[&ca], &[b"http/1.1"]).await.unwrap();
    for (name, mut stream) in [("HTTP/2", http2), ("HTTP/1.1", http1)] {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the silent {name} connection over TLS stayed open");
    }
    // Every connection slot is free again: four at once are served.
    let page = ca.page(&hub, "roflfaucet", "8-evans");
    let checks: Vec<_> = (0..4)
        .map(|_| {
            let page = page.clone();
            tokio::spawn(async move { page.timestamp("balance").await })
        })
        .collect();
    for check in checks {
        check.await.unwrap().assert_ok();
    }
}

#[tokio::test]
async fn unusable_certificate_files_stop_the_start_naming_the_file() {
    let ca = Authority::new("test CA");
    let issued = ca.issue();
    let files = CertFiles::new(&issued);
    let data = tempfile::tempdir().unwrap();
    let start = |tweak: &dyn Fn(&mut Config)| {
        let mut config = support::test_config(data.path());
        files.configure(&mut config);
        tweak(&mut config);
        format!("{:#}", App::open(config).expect_err("the hub started"))
    };
    let cert = files.cert().display().to_string();
    let key = files.key().display().to_string();

    let missing = files.dir.path().join("missing.pem");
    let error = start(&|c| c.tls_cert = Some(missing.clone()));
    assert!(error.contains(&missing.display().to_string()), "{error}");

    std::fs::write(files.cert(), "not a certificate").unwrap();
    let error = start(&|_| {});
    assert!(error.contains(&cert) && error.contains("no CERTIFICATE"), "{error}");

    std::fs::write(files.cert(), &issued.cert_pem).unwrap();
    std::fs::write(files.key(), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
    let error = start(&|_| {});
    assert!(error.contains(&key), "{error}");

    std::fs::write(files.key(), ca.issue().key_pem).unwrap();
    let error = start(&|_| {});
    assert!(error.contains(&key) && error.contains("does not belong") && error.contains(&cert), "{error}");

    // The binary says so before it listens.
    let config_file = files.dir.path().join("hub.toml");
    let mut config = support::test_config(data.path());
    config.tls_cert = Some(missing.clone());
    config.tls_key = Some(files.key());
    std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_file)
        .env_remove("HUB_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot read TLS certificate") && stderr.contains(&missing.display().to_string())
    );
}

#[tokio::test]
async fn a_reload_takes_a_renewed_certificate_and_keeps_the_current_one_on_a_bad_file() {
    let (first, second) = (Authority::new("first CA"), Authority::new("second CA"));
    let (hub, files) = https_hub(&first, |_| {}).await;
    let addr = addr(&hub.url);
    let tls = hub.app.tls().expect("the hub serves HTTPS");
    let old = presented_now(addr, &[&first]).await;

    // A new certificate whose key was not replaced with it.
    let renewed = second.issue();
    std::fs::write(files.cert(), &renewed.cert_pem).unwrap();
    let error = format!("{:#}", tls.reload().expect_err("a mismatched key was taken"));
    assert!(error.contains("does not belong"), "{error}");
    assert_eq!(presented_now(addr, &[&first, &second]).await, old);

    files.write(&renewed);
    tls.reload().unwrap();
    assert_eq!(presented_now(addr, &[&first, &second]).await, renewed.der);
    second.page(&hub, "roflfaucet", "8-evans").timestamp("balance").await.assert_ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_renews_the_certificate_while_open_connections_keep_working() {
    let (first, second) = (Authority::new("first CA"), Authority::new("second CA"));
    let issued = first.issue();
    let files = CertFiles::new(&issued);
    let deployment = Deployment::new(|c| {
        files.configure(c);
        // Longer than the test keeps its connection idle.
        c.limits.header_read_timeout_secs = 120;
    });
    let mut hub = deployment.start().await;
    let addr = deployment.addr();
    let both: &[&Authority] = &[&first, &second];

    let mut open = Held::open(handshake(&addr, both, &[b"http/1.1"]).await.unwrap()).await;
    assert_eq!(open.certificate, issued.der);
    assert_eq!(open.health().await, 200);

    let renewed = second.issue();
    files.write(&renewed);
    hang_up(&hub).await;
    let deadline = Instant::now() + PATIENCE;
    while presented_now(&addr, both).await != renewed.der {
        assert!(
            Instant::now() < deadline,
            "no new connection got the new certificate; log:\n{}",
            deployment.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The connection opened before still answers, and a client trusting only the new
    // authority is served.
    assert_eq!(open.health().await, 200);
    let mut page = deployment.backend("roflfaucet", "8-evans", Duration::from_secs(30));
    page.client = second.client().build().unwrap();
    page.timestamp("balance").await.assert_ok();

    // A broken replacement is logged and the renewed certificate stays.
    std::fs::write(files.cert(), "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    hang_up(&hub).await;
    let deadline = Instant::now() + PATIENCE;
    while !deployment.log().contains("keeping the current TLS certificate") {
        assert!(Instant::now() < deadline, "the bad file was not reported; log:\n{}", deployment.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(deployment.log().contains(&files.cert().display().to_string()), "{}", deployment.log());
    assert!(hub.try_wait().unwrap().is_none(), "the hub exited; log:\n{}", deployment.log());
    assert_eq!(presented_now(&addr, both).await, renewed.der);
    page.timestamp("balance").await.assert_ok();
    assert_eq!(open.health().await, 200);
    hub.kill().await.unwrap();
}

/// `/metrics` of a hub whose HTTPS `authority` trusts, read from loopback.
async fn scrape(deployment: &Deployment, authority: &Authority) -> String {
    let response = authority.client().build().unwrap().get(format!("{}/metrics", deployment.url())).send();
    response.await.unwrap().text().await.unwrap()
}

/// Polls `/metrics` until `series` has `value`; returns the whole text.
async fn until_metric(deployment: &Deployment, authority: &Authority, series: &str, value: f64) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = scrape(deployment, authority).await;
        if support::sample(&text, series) == Some(value) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never became {value}:\n{text}\nlog:\n{}",
            deployment.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_and_the_dashboard_show_the_served_certificates_expiry_and_each_reload() {
    let ca = Authority::new("test CA");
    let (first_expiry, renewed_expiry) =
        (rcgen::date_time_ymd(2031, 5, 17), rcgen::date_time_ymd(2032, 2, 29));
    let files = CertFiles::new(&ca.issue_until(first_expiry));
    let deployment = Deployment::new(|c| files.configure(c));
    let hub = deployment.start().await;
    const EXPIRY: &str = "hub_tls_cert_not_after_seconds";
    const TLS_OK: &str = r#"hub_reloads_total{what="tls",result="ok"}"#;
    const TLS_FAILED: &str = r#"hub_reloads_total{what="tls",result="failed"}"#;
    const SITES_OK: &str = r#"hub_reloads_total{what="sites",result="ok"}"#;

    let text = scrape(&deployment, &ca).await;
    assert_eq!(support::sample(&text, EXPIRY), Some(first_expiry.unix_timestamp() as f64), "{text}");
    for series in [TLS_OK, TLS_FAILED, SITES_OK] {
        assert_eq!(support::sample(&text, series), Some(0.0), "{series}: {text}");
    }
    let data: serde_json::Value = ca
        .client()
        .build()
        .unwrap()
        .get(format!("{}/dashboard/data", deployment.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(data["tls_cert_not_after_ms"], first_expiry.unix_timestamp() * 1000, "{data}");

    // A renewed certificate: its expiry, and one reload of each.
    files.write(&ca.issue_until(renewed_expiry));
    hang_up(&hub).await;
    let text = until_metric(&deployment, &ca, TLS_OK, 1.0).await;
    assert_eq!(support::sample(&text, EXPIRY), Some(renewed_expiry.unix_timestamp() as f64), "{text}");
    assert_eq!(support::sample(&text, SITES_OK), Some(1.0), "{text}");

    // A broken one is counted as failed, and the renewed certificate's expiry stays.
    std::fs::write(files.cert(), "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    hang_up(&hub).await;
    let text = until_metric(&deployment, &ca, TLS_FAILED, 1.0).await;
    assert_eq!(support::sample(&text, EXPIRY), Some(renewed_expiry.unix_timestamp() as f64), "{text}");
    assert_eq!(support::sample(&text, TLS_OK), Some(1.0), "{text}");
}

#[tokio::test]
async fn a_plain_http_hub_shows_no_certificate_expiry() {
    let hub = TestHub::start().await;
    let text = hub.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("hub_tls_cert_not_after"), "{text}");
    let data: serde_json::Value =
        hub.request(Method::GET, "/dashboard/data").send().await.unwrap().json().await.unwrap();
    assert!(data["tls_cert_not_after_ms"].is_null(), "{data}");
}
