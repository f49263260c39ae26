//! The hub's event streams behind a real nginx, run with the deployment guide's configuration
//! (`deploy/nginx/unified-sync-hub.conf`, only its ports and certificate files changed): an
//! event reaches the page through nginx as soon as its change is written, not when nginx's
//! buffer fills or a later event pushes it out, whether nginx buffers answers (the hub's
//! `X-Accel-Buffering: no`) or not (the guide's `proxy_buffering off`).

mod support;

use std::time::Duration;

use hub::config::TrustedProxies;
use reqwest::Version;
use serde_json::Value;
use support::TestHub;
use support::events::{EventStream, Next, accepted};
use support::nginx::{Nginx, replace_once};

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// How long an event may take through nginx before the test calls it held back: far longer
/// than any delivery takes, far shorter than nginx's read timeout or a heartbeat (15 s).
const PROMPT: Duration = Duration::from_secs(5);

impl Nginx {
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
