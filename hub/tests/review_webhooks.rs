//! A reviewer's probes of the signed webhooks, against the real hub and real receivers: what
//! a site hears after its subscription narrows, what the dashboard tells of a failing
//! receiver, a page's credit with a grant, receivers that misbehave (close mid-answer, answer
//! after the timeout, answer with a body that never ends, hang while the hub stops), and two
//! instances on one PostgreSQL database whose configurations differ for a while (a rollout).

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hub::config::Config;
use reqwest::Method;
use serde_json::{Value, json};
use support::TestHub;
use support::receiver::PATIENCE;
use support::receiver::{Answer, Receiver, signed_by};
use support::webhooks::{Hook, drained, metric, quick_retries, start, wait_metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const FAUCET: &str = "roflfaucet";
const CHARITY: &str = "clickforcharity";

async fn dashboard(hub: &TestHub) -> Value {
    hub.request(Method::GET, "/dashboard/data").send().await.unwrap().json().await.unwrap()
}

// ----- A receiver on a raw socket, to misbehave as no HTTP framework would let it. -----

/// One request a raw receiver read: its head (request line and headers) and body.
#[derive(Debug, Clone)]
struct RawRequest {
    head: String,
    body: String,
}

impl RawRequest {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// How a raw receiver answers the `n`-th request it reads (from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Reads the request, then closes the connection without a word.
    CloseAfterRequest,
    /// Waits this long, then answers 200.
    OkAfter(Duration),
    /// Answers 200 and a chunked body that never ends.
    EndlessBody,
}

struct RawReceiver {
    url: String,
    requests: Arc<Mutex<Vec<RawRequest>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for RawReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl RawReceiver {
    /// A receiver on 127.0.0.1 whose URL has `path_and_query`, answering the `n`-th request
    /// as `behaviour(n)` says.
    async fn start(
        path_and_query: &str,
        behaviour: impl Fn(usize) -> Behaviour + Send + Sync + 'static,
    ) -> RawReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}{path_and_query}", listener.local_addr().unwrap());
        let requests: Arc<Mutex<Vec<RawRequest>>> = Arc::default();
        let behaviour = Arc::new(behaviour);
        let server = tokio::spawn({
            let requests = requests.clone();
            async move {
                let mut tasks = tokio::task::JoinSet::new();
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else { continue };
                    let (requests, behaviour) = (requests.clone(), behaviour.clone());
                    tasks.spawn(async move {
                        let Some(request) = read_request(&mut stream).await else { return };
                        let n = {
                            let mut all = requests.lock().unwrap();
                            all.push(request);
                            all.len() - 1
                        };
                        match behaviour(n) {
                            Behaviour::CloseAfterRequest => drop(stream),
                            Behaviour::OkAfter(wait) => {
                                tokio::time::sleep(wait).await;
                                let _ = stream
                                    .write_all(
                                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                                    )
                                    .await;
                                let _ = stream.shutdown().await;
                            }
                            Behaviour::EndlessBody => {
                                let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
                                if stream.write_all(head).await.is_err() {
                                    return;
                                }
                                let chunk = format!("{:x}\r\n{}\r\n", 65536, "x".repeat(65536));
                                while stream.write_all(chunk.as_bytes()).await.is_ok() {}
                            }
                        }
                    });
                }
            }
        });
        RawReceiver { url, requests, server }
    }

    fn requests(&self) -> Vec<RawRequest> {
        self.requests.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&[RawRequest]) -> bool) -> Vec<RawRequest> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let requests = self.requests();
            if done(&requests) {
                return requests;
            }
            assert!(Instant::now() < deadline, "the receiver did not get {what}; it got {requests:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads one HTTP/1.1 request (head and a body of its content-length).
async fn read_request(stream: &mut TcpStream) -> Option<RawRequest> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let request = RawRequest { head, body: String::new() };
    let length: usize = request.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).into_owned();
    Some(RawRequest { body, ..request })
}

// ----- The probes. -----

/// A site that narrows `webhook_data_types` is told of the types it still subscribes to only:
/// notifications of a type it dropped, still waiting in its queue from before (its receiver
/// was down), are not sent after the restart that takes the new list up.
#[tokio::test]
async fn a_type_the_site_no_longer_subscribes_to_is_not_sent_from_its_queue() {
    let receiver = Receiver::start(Answer::Status(503)).await;
    let hook = Hook::new("narrowed", FAUCET, &receiver.url, 21);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), quick_retries).await;
    // The charity's backend writes a profile and a balance; the faucet hears of both (it
    // subscribes to every type), but its receiver is down.
    let charity = hub.site(CHARITY, "1-narrowed");
    charity.push("profile", json!({ "display_name": "Private to profiles" })).await.assert_ok();
    charity.delta("balance", 5, "narrowed-1").await.assert_ok();
    receiver.wait_for("a failed attempt", |all| !all.is_empty()).await;
    hub.stop().await;

    // The faucet now subscribes to balances only, and its receiver is back.
    receiver.answer(Answer::Ok);
    let hub = start(data.path(), std::slice::from_ref(&hook), |c| {
        quick_retries(c);
        let site = c.sites.iter_mut().find(|s| s.id == FAUCET).unwrap();
        site.webhook_data_types = Some(vec!["balance".into()]);
    })
    .await;
    hub.site(CHARITY, "2-after").delta("balance", 1, "after-1").await.assert_ok();
    receiver.wait_delivered("2-after", "balance", 1).await;
    receiver.wait_delivered("1-narrowed", "balance", 1).await;
    drained(&hub, FAUCET).await;
    let profiles: Vec<_> = receiver.delivered().into_iter().filter(|r| r.data_type() == "profile").collect();
    assert!(
        profiles.is_empty(),
        "a site subscribed to balances only was sent a profile from its queue: {profiles:#?}"
    );
    hub.stop().await;
}

/// The dashboard names a site's receiver by its scheme, host and port only (a webhook URL's
/// path or query may hold a secret of the receiver's); why it fails must not give the rest
/// away either — here a receiver that reads the request and closes without an answer.
#[tokio::test]
async fn the_dashboard_names_a_failing_receiver_by_its_origin_only_never_its_path_or_query() {
    let receiver = RawReceiver::start("/hooks/PATH-SECRET-1234?token=QUERY-SECRET-5678", |_| {
        Behaviour::CloseAfterRequest
    })
    .await;
    let hook = Hook::new("leak", FAUCET, &receiver.url, 22);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), quick_retries).await;
    hub.page(FAUCET, "1-leak").push("profile", json!({ "display_name": "Leak" })).await.assert_ok();
    receiver.wait_for("an attempt", |all| !all.is_empty()).await;

    let deadline = Instant::now() + PATIENCE;
    let shown = loop {
        let board = dashboard(&hub).await;
        let view = board["webhooks"][0].clone();
        if view["failing"] == true && view["last_failure"].is_string() {
            break view;
        }
        assert!(Instant::now() < deadline, "the dashboard never showed the receiver failing: {board}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = shown.to_string();
    for secret in ["PATH-SECRET-1234", "QUERY-SECRET-5678"] {
        assert!(!text.contains(secret), "the dashboard shows the webhook URL's {secret}: {text}");
    }
    let metrics = hub.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("SECRET-"), "/metrics shows the webhook URL");
    hub.stop().await;
}

/// A page's credit carrying its site's grant is a page's write: the site's backend decided
/// it, but did not write it, so its own webhook hears of it (and its feed says not `own`).
#[tokio::test]
async fn a_pages_credit_with_its_sites_grant_is_told_to_that_site() {
    let receiver = Receiver::start(Answer::Ok).await;
    let hook = Hook::new("grant", FAUCET, &receiver.url, 23);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), |_| {}).await;
    let grant = hub.grant(FAUCET, "1-granted", "claim-1", "balance", json!({ "coins": 10 }));
    let credited = hub.page(FAUCET, "1-granted").delta_with_grant("balance", 10, "claim-1", &grant).await;
    let version = credited.assert_ok()["version"].as_u64().unwrap();
    let got = receiver.wait_delivered("1-granted", "balance", version).await;
    assert!(signed_by(&hook.secret, &got));
    assert_eq!(got.json["data"]["coins"], 10);

    let feed = support::client()
        .get(format!("{}/api/changes", hub.url))
        .bearer_auth(hub.backend_token(FAUCET, "feed-reader"))
        .send()
        .await
        .unwrap();
    let page: Value = feed.json().await.unwrap();
    let change = page["changes"].as_array().unwrap().iter().find(|c| c["user_id"] == "1-granted").cloned();
    assert_eq!(change.map(|c| c["own"].clone()), Some(json!(false)), "{page}");
    hub.stop().await;
}

/// A `2xx` that comes after `timeout_secs` did not acknowledge in time: the attempt failed,
/// and the notification is sent again, under the same `webhook-id` with the same body, until
/// an answer in time acknowledges it.
#[tokio::test]
async fn an_answer_after_the_timeout_is_a_failed_attempt_sent_again_under_the_same_id() {
    let receiver = RawReceiver::start("/hook", |n| {
        Behaviour::OkAfter(if n == 0 { Duration::from_millis(2500) } else { Duration::ZERO })
    })
    .await;
    let hook = Hook::new("late", FAUCET, &receiver.url, 24);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), |c| {
        quick_retries(c);
        c.webhooks.timeout_secs = 1;
    })
    .await;
    hub.page(FAUCET, "1-late").push("profile", json!({ "display_name": "Late" })).await.assert_ok();
    wait_metric(&hub, "hub_webhooks_delivered_total", FAUCET, 1.0, PATIENCE).await;
    let requests = receiver.wait_for("two attempts", |all| all.len() >= 2).await;
    assert!(metric(&hub, "hub_webhooks_failed_total", FAUCET).await >= 1.0, "the late 200 counted as failed");
    assert_eq!(requests[1].header("webhook-id"), requests[0].header("webhook-id"), "the same id");
    assert_eq!(requests[1].body, requests[0].body, "the same body");
    assert_eq!(requests[0].json()["user_id"], "1-late");
    drained(&hub, FAUCET).await;
    hub.stop().await;
}

/// A receiver that acknowledges with `200` and then sends a body that never ends is
/// acknowledged: the hub reads none of it, goes on to the site's next notification, and
/// stops as usual.
#[tokio::test]
async fn an_acknowledgement_with_an_endless_body_neither_holds_the_site_nor_the_hubs_stop() {
    let receiver = RawReceiver::start("/hook", |_| Behaviour::EndlessBody).await;
    let hook = Hook::new("endless", FAUCET, &receiver.url, 25);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), |c| {
        quick_retries(c);
        c.webhooks.timeout_secs = 2;
        c.webhooks.in_flight = 1;
    })
    .await;
    for i in 0..3 {
        hub.page(FAUCET, &format!("{i}-endless"))
            .push("profile", json!({ "display_name": "Endless" }))
            .await
            .assert_ok();
    }
    wait_metric(&hub, "hub_webhooks_delivered_total", FAUCET, 3.0, PATIENCE).await;
    drained(&hub, FAUCET).await;
    assert_eq!(metric(&hub, "hub_webhooks_failed_total", FAUCET).await, 0.0);
    tokio::time::timeout(PATIENCE, hub.stop()).await.expect("the hub stops");
}

/// A hub stopping while a receiver hangs on a delivery stops (the delivery is cut off), and
/// the next run sends it again at once: the cut-off attempt holds no lease over it.
#[tokio::test]
async fn a_hanging_receiver_holds_up_neither_the_stop_nor_the_delivery_after_a_restart() {
    let receiver = Receiver::start(Answer::Hang).await;
    let hook = Hook::new("hang_stop", FAUCET, &receiver.url, 26);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), |c| c.webhooks.timeout_secs = 60).await;
    hub.page(FAUCET, "1-hung").push("profile", json!({ "display_name": "Hung" })).await.assert_ok();
    receiver.wait_for("the hung attempt", |all| !all.is_empty()).await;
    tokio::time::timeout(PATIENCE, hub.stop()).await.expect("the hub stops while a receiver hangs");

    receiver.answer(Answer::Ok);
    let hub = start(data.path(), std::slice::from_ref(&hook), |c| c.webhooks.timeout_secs = 60).await;
    receiver.wait_delivered("1-hung", "profile", 1).await;
    drained(&hub, FAUCET).await;
    hub.stop().await;
}

/// Two instances on one PostgreSQL database while a configuration change rolls out: one has
/// the faucet's webhook, the other (started from the configuration before) has none. The
/// second's start must not forget the queue and the cursor the first delivers from: what
/// waited for the faucet's receiver is still delivered once it is back.
#[tokio::test]
async fn an_instance_without_the_webhook_does_not_forget_the_queue_another_instance_delivers() {
    let receiver = Receiver::start(Answer::Status(503)).await;
    let hook = Hook::new("rollout", FAUCET, &receiver.url, 27);
    let url = support::postgres::Cluster::shared().database();
    let on_postgres = |c: &mut Config| {
        quick_retries(c);
        c.limits.requests_per_minute = 1_000_000;
        c.store.backend = hub::config::Backend::Postgres;
        c.store.url = Some(url.clone());
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_hook = start(dir_a.path(), std::slice::from_ref(&hook), on_postgres).await;
    with_hook.site(CHARITY, "1-waiting").delta("balance", 5, "waiting-1").await.assert_ok();
    receiver.wait_for("a failed attempt", |all| all.iter().any(|r| r.user() == "1-waiting")).await;

    // An instance of the configuration before the faucet had a webhook starts.
    let without = start(dir_b.path(), &[], on_postgres).await;
    receiver.answer(Answer::Ok);
    let deadline = Instant::now() + PATIENCE;
    while !receiver.delivered().iter().any(|r| r.user() == "1-waiting") {
        if Instant::now() > deadline {
            let stats = with_hook.app.domain().store().webhook_stats().await.unwrap();
            panic!(
                "1-waiting's balance was never delivered after an instance without the webhook started; \
                 queues now {stats:?}, received {:#?}",
                receiver.received()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    without.stop().await;
    with_hook.stop().await;
}
