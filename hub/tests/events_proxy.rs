//! The hub's event streams behind a real nginx, run with the deployment guide's configuration
//! (`deploy/nginx/unified-sync-hub.conf`, only its ports and certificate files changed): an
//! event reaches the page through nginx as soon as its change is written, not when nginx's
//! buffer fills or a later event pushes it out, whether nginx buffers answers (the hub's
//! `X-Accel-Buffering: no`) or not (the guide's `proxy_buffering off`).

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hub::config::TrustedProxies;
use reqwest::Version;
use serde_json::Value;
use support::events::{EventStream, Next, accepted};
use support::{PATIENCE, TestHub};
use tempfile::TempDir;
use tokio::process::{Child, Command};

const NGINX_CONF: &str = include_str!("../../deploy/nginx/unified-sync-hub.conf");
const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// How long an event may take through nginx before the test calls it held back: far longer
/// than any delivery takes, far shorter than nginx's read timeout or a heartbeat (15 s).
const PROMPT: Duration = Duration::from_secs(5);

/// A running nginx in front of a hub, killed when dropped.
struct Nginx {
    dir: TempDir,
    port: u16,
    authority_pem: String,
    _child: Child,
}

fn nginx_binary() -> PathBuf {
    ["nginx", "/usr/sbin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|nginx| std::process::Command::new(nginx).arg("-v").output().is_ok_and(|o| o.status.success()))
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed: `cargo xtask test` installs it (Debian's package nginx), \
                 or run `apt-get install nginx`"
            )
        })
}

/// Replaces the one occurrence of `from`, so that a change of the guide's file these tests do
/// not follow fails them.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "deploy/nginx/unified-sync-hub.conf has no single {from:?}");
    text.replace(from, to)
}

impl Nginx {
    /// Starts nginx with the guide's configuration as `adapt` changes it, forwarding to
    /// `hub`, on a free port of 127.0.0.1.
    async fn start(hub: &TestHub, adapt: impl FnOnce(String) -> String) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let hub_addr = hub.url.strip_prefix("http://").expect("the hub behind nginx speaks plain HTTP");
        let pems = support::certs::loopback_signed_by("events proxy test authority");
        std::fs::write(dir.path().join("fullchain.pem"), &pems.cert).unwrap();
        std::fs::write(dir.path().join("privkey.pem"), &pems.key).unwrap();

        let site = replace_once(NGINX_CONF, "server 127.0.0.1:8787;", &format!("server {hub_addr};"));
        let site = replace_once(&site, "listen 443 ssl", &format!("listen 127.0.0.1:{port} ssl"));
        let v6_port = std::net::TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap().port();
        let site = replace_once(&site, "listen [::]:443 ssl", &format!("listen [::1]:{v6_port} ssl"));
        let site =
            site.replace("/etc/letsencrypt/live/hub.example.org/", &format!("{}/", dir.path().display()));
        let site = adapt(site);
        std::fs::write(dir.path().join("site.conf"), site).unwrap();

        let d = dir.path().display();
        let main = format!(
            "master_process off;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
                 access_log {d}/access.log;\n\
                 client_body_temp_path {d}/client_body;\n\
                 proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\n\
                 scgi_temp_path {d}/scgi;\n\
                 include {d}/site.conf;\n\
             }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = Command::new(nginx_binary())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-g")
            .arg(format!("daemon off; pid {d}/nginx.pid; error_log stderr;"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let said = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("nginx exited ({status}); it said:\n{}", said());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen within {PATIENCE:?}; it said:\n{}",
                said()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Nginx { dir, port, authority_pem: pems.authority, _child: child }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A client trusting nginx's certificate, speaking `version` to it; no overall timeout,
    /// for streams.
    fn client(&self, version: Version) -> reqwest::Client {
        let builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.authority_pem.as_bytes()).unwrap());
        let builder = if version == Version::HTTP_11 { builder.http1_only() } else { builder };
        builder.build().unwrap()
    }

    fn said(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

/// A hub that believes nginx on 127.0.0.1.
async fn hub_behind_nginx() -> TestHub {
    TestHub::start_with(|c| {
        c.trusted_proxies = TrustedProxies::try_from(vec!["127.0.0.1".to_owned()]).unwrap();
    })
    .await
}

/// Opens a stream through `nginx` in HTTP/2 and in HTTP/1.1 (nginx buffers each
/// differently), writes one change at a time, and checks that each reaches both streams
/// before the next is written.
async fn events_pass_through_at_once(hub: &TestHub, nginx: &Nginx) {
    let token = hub.token(SITE, USER);
    for version in [Version::HTTP_2, Version::HTTP_11] {
        let request = nginx
            .client(version)
            .get(format!("{}/api/events?user_id={USER}", nginx.url()))
            .bearer_auth(&token);
        let mut stream = accepted(request, &format!("a stream through nginx in {version:?}")).await;
        assert_eq!(stream.version, version);
        stream.ready().await;
        changes_arrive_one_by_one(hub, nginx, &mut stream, version).await;
    }
}

async fn changes_arrive_one_by_one(hub: &TestHub, nginx: &Nginx, stream: &mut EventStream, version: Version) {
    let writer = hub.site(SITE, USER);
    for i in 1..=3 {
        let answer = writer.delta("balance", 1, &format!("credit-{version:?}-{i}")).await;
        let answer = answer.assert_ok();
        let written = tokio::time::Instant::now();
        let event: Value = loop {
            match stream.next_within(PROMPT.saturating_sub(written.elapsed())).await {
                Next::Frame(frame) if frame.is_heartbeat() => {}
                Next::Frame(frame) if frame.is_change() => break frame.json(),
                other => panic!(
                    "{version:?}: change {i} did not come through nginx within {PROMPT:?} of its write: \
                     {other:?}; nginx said:\n{}",
                    nginx.said()
                ),
            }
        };
        assert_eq!(event["data_type"], "balance");
        assert_eq!(event["version"], answer["version"], "{event}");
        assert_eq!(event["data"], answer["data"], "{event}");
    }
}

#[tokio::test]
async fn events_pass_through_the_documented_nginx_as_they_happen() {
    let hub = hub_behind_nginx().await;
    let nginx = Nginx::start(&hub, |site| site).await;
    events_pass_through_at_once(&hub, &nginx).await;
}

#[tokio::test]
async fn events_pass_through_an_nginx_that_buffers_answers_as_they_happen() {
    let hub = hub_behind_nginx().await;
    // A location that buffers what the hub answers, as nginx does unless told otherwise.
    let nginx =
        Nginx::start(&hub, |site| replace_once(&site, "proxy_buffering off;", "proxy_buffering on;")).await;
    events_pass_through_at_once(&hub, &nginx).await;
}
