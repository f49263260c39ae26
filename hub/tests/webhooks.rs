//! Signed webhooks against the real hub and real receiving servers: a change reaches each
//! subscribed site in one POST signed as the Standard Webhooks specification says (checked
//! here with the `hmac` crate, apart from the hub's code), with the record's fields and its
//! data when small; a site's own backend's writes are not told to it, its pages' writes are;
//! changes waiting for a down receiver coalesce into the newest version per user and type and
//! arrive in version order; failed attempts are retried with backoff, each signed afresh under
//! the same id, until `retry_for_secs`, then given up and counted; the queue survives a
//! restart; a receiver that never answers delays neither another site nor the hub's writes;
//! redirects are not followed; an https receiver of a private authority is trusted through
//! `[webhooks] ca_file` alone; a receiver not listening shows on the dashboard as failing,
//! with why, until it listens; `/metrics` and the dashboard show each site's deliveries; a
//! webhook in clear to another machine, and a bad secret, stop the start; two instances on one
//! PostgreSQL database deliver each notification once. The documented
//! receivers (`docs/examples/webhook-receiver.php` under `php -S`, `webhook-receiver.mjs`
//! under `node`) accept what the hub sends and refuse a tampered body, a forged signature
//! and an old timestamp with 401.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use hub::config::Config;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use support::receiver::{Answer, Received, Receiver, secret, signed_by};
use support::webhooks::{Hook, drained, metric, metrics, open, quick_retries, start, wait_metric};
use support::{Reply, TestHub, client, sample, test_config};

const FAUCET: &str = "roflfaucet";
const CHARITY: &str = "clickforcharity";
const USER: &str = "8-evans";

/// The record's `data`, `version` and `last_updated` as the sync API shows them, with the
/// database's epoch.
async fn record(hub: &TestHub, user: &str, data_type: &str) -> Value {
    let reply = hub.site(FAUCET, user).get(data_type).await;
    let body = reply.assert_ok();
    json!({
        "epoch": body["epoch"], "version": body["version"], "last_updated": body["last_updated"], "data": body["data"],
    })
}

fn about<'a>(received: &'a [Received], user: &str, data_type: &str) -> Vec<&'a Received> {
    received.iter().filter(|r| r.user() == user && r.data_type() == data_type).collect()
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Settings whose JSON is longer than what a notification carries inline (2048 bytes).
fn large_settings() -> Value {
    json!({ "a": "x".repeat(1000), "b": "y".repeat(1000), "c": "z".repeat(1000) })
}

#[tokio::test]
async fn a_page_write_reaches_its_site_in_one_signed_post_with_the_records_fields() {
    let receiver = Receiver::start(Answer::Ok).await;
    let hook = Hook::new("one_post", FAUCET, &receiver.url, 1);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), |_| {}).await;
    let page = hub.page(FAUCET, USER);

    page.push("profile", json!({ "display_name": "Evans" })).await.assert_ok();
    let shown = record(&hub, USER, "profile").await;
    let version = shown["version"].as_u64().unwrap();
    let epoch = shown["epoch"].as_str().unwrap();
    let got = receiver.wait_delivered(USER, "profile", version).await;
    assert_eq!(got.path, "/webhooks/unified-sync");
    assert_eq!(got.content_type, "application/json");
    assert_eq!(
        got.id,
        format!("{epoch}.profile.{version}.{USER}"),
        "the id names epoch, type, version and user"
    );
    let timestamp: i64 = got.timestamp.parse().unwrap();
    assert!(
        (timestamp - now_secs()).abs() < 300,
        "webhook-timestamp {timestamp} is the hub's clock in seconds"
    );
    assert!(got.signature.starts_with("v1,"), "{}", got.signature);
    assert!(signed_by(&hook.secret, &got), "the signature verifies with the site's secret");
    assert!(!signed_by(&secret(2), &got), "and with no other");
    let tampered = Received { body: got.body.replace("Evans", "Evan$"), ..got.clone() };
    assert!(!signed_by(&hook.secret, &tampered), "the signature covers the body");
    assert_eq!(
        got.json,
        json!({
            "type": "record.changed", "epoch": epoch, "user_id": USER, "data_type": "profile",
            "version": version, "last_updated": shown["last_updated"], "data": shown["data"],
        })
    );

    page.push("settings", large_settings()).await.assert_ok();
    let large = record(&hub, USER, "settings").await;
    let got = receiver.wait_delivered(USER, "settings", large["version"].as_u64().unwrap()).await;
    assert!(signed_by(&hook.secret, &got));
    assert_eq!(got.json["last_updated"], large["last_updated"]);
    assert!(got.json.get("data").is_none(), "large data is read through the API: {}", got.json);

    drained(&hub, FAUCET).await;
    let received = receiver.received();
    assert_eq!(about(&received, USER, "profile").len(), 1, "one POST for one change: {received:#?}");
    assert_eq!(about(&received, USER, "settings").len(), 1, "{received:#?}");
}

#[tokio::test]
async fn a_sites_backend_writes_are_told_to_the_other_sites_and_its_pages_writes_to_all() {
    let faucet_receiver = Receiver::start(Answer::Ok).await;
    let charity_receiver = Receiver::start(Answer::Ok).await;
    let hooks = [
        Hook::new("origins", FAUCET, &faucet_receiver.url, 3),
        Hook::new("origins", CHARITY, &charity_receiver.url, 4),
    ];
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), &hooks, |_| {}).await;

    // The faucet's backend credits (amounts:credit), then an admin token of the charity's
    // backend sets a profile, then a page of the faucet writes.
    let credited =
        hub.site(FAUCET, "1-credited").delta("balance", 10, "credit-1").await.assert_ok()["version"]
            .as_u64()
            .unwrap();
    let token = hub.admin_token(CHARITY, "2-charity-admin");
    let by_charity = Reply::from(
        client()
            .post(format!("{}/api/sync.php", hub.url))
            .bearer_auth(token)
            .json(&json!({
                "action": "push", "user_id": "2-charity-admin", "site_id": CHARITY, "data_type": "profile",
                "data": { "display_name": "Set by the charity" },
            }))
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_ok()["version"]
        .as_u64()
        .unwrap();
    hub.page(FAUCET, "3-paged").push("profile", json!({ "display_name": "Paged" })).await.assert_ok();

    charity_receiver.wait_delivered("1-credited", "balance", credited).await;
    charity_receiver.wait_delivered("3-paged", "profile", 1).await;
    faucet_receiver.wait_delivered("2-charity-admin", "profile", by_charity).await;
    faucet_receiver.wait_delivered("3-paged", "profile", 1).await;
    // Once each queue is empty, whatever was queued was acknowledged: had the faucet been
    // queued its own credit, or the charity its own profile, its receiver would hold it.
    drained(&hub, FAUCET).await;
    drained(&hub, CHARITY).await;
    let to_faucet = faucet_receiver.received();
    assert!(about(&to_faucet, "1-credited", "balance").is_empty(), "its own backend's write: {to_faucet:#?}");
    let to_charity = charity_receiver.received();
    assert!(
        about(&to_charity, "2-charity-admin", "profile").is_empty(),
        "its own admin's write: {to_charity:#?}"
    );
    for (hook, receiver) in hooks.iter().zip([&faucet_receiver, &charity_receiver]) {
        assert!(receiver.received().iter().all(|r| signed_by(&hook.secret, r)), "each site's own secret");
    }

    // Per site in /metrics, and on the dashboard.
    for site in [FAUCET, CHARITY] {
        wait_metric(&hub, "hub_webhooks_delivered_total", site, 2.0, support::receiver::PATIENCE).await;
        let text = metrics(&hub).await;
        for series in ["hub_webhooks_failed_total", "hub_webhooks_dropped_total"] {
            assert_eq!(
                sample(&text, &format!("{series}{{site=\"{site}\"}}")),
                Some(0.0),
                "{series} of {site}"
            );
        }
        for gauge in ["hub_webhooks_queued", "hub_webhooks_oldest_pending_seconds"] {
            assert!(sample(&text, &format!("{gauge}{{site=\"{site}\"}}")).is_some(), "{gauge} of {site}");
        }
    }
    assert_eq!(
        sample(&metrics(&hub).await, "hub_webhooks_delivered_total{site=\"wrc\"}"),
        None,
        "no webhook"
    );
    let dashboard: Value =
        hub.request(Method::GET, "/dashboard/data").send().await.unwrap().json().await.unwrap();
    let shown: Vec<(&str, u64, bool)> = dashboard["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (w["site"].as_str().unwrap(), w["delivered"].as_u64().unwrap(), w["failing"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(shown, [(FAUCET, 2, false), (CHARITY, 2, false)]);
    assert_eq!(
        dashboard["webhooks"][0]["receiver"],
        faucet_receiver.url.trim_end_matches("/webhooks/unified-sync")
    );
}

#[tokio::test]
async fn changes_waiting_for_a_down_receiver_arrive_once_at_their_newest_version_in_version_order() {
    let receiver = Receiver::start(Answer::Status(503)).await;
    let hook = Hook::new("coalesce", FAUCET, &receiver.url, 5);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), quick_retries).await;

    // Five changes of two records, made by the charity's backend, while the faucet's
    // receiver answers 503.
    let charity = hub.site(CHARITY, USER);
    for i in 0..5 {
        charity.delta("balance", 1, &format!("balance-{i}")).await.assert_ok();
        if i % 2 == 0 {
            charity.delta("points", 1, &format!("points-{i}")).await.assert_ok();
        }
    }
    let balance = record(&hub, USER, "balance").await["version"].as_u64().unwrap();
    let points = record(&hub, USER, "points").await["version"].as_u64().unwrap();
    receiver.wait_for("a failed attempt", |all| !all.is_empty()).await;

    receiver.answer(Answer::Ok);
    receiver.wait_delivered(USER, "balance", balance).await;
    receiver.wait_delivered(USER, "points", points).await;
    drained(&hub, FAUCET).await;
    let received = receiver.received();
    for (data_type, newest) in [("balance", balance), ("points", points)] {
        let attempts = about(&received, USER, data_type);
        let delivered: Vec<u64> = attempts.iter().filter(|r| r.delivered()).map(|r| r.version()).collect();
        assert_eq!(delivered, [newest], "one delivery of {data_type}, at its newest version: {attempts:#?}");
        let versions: Vec<u64> = attempts.iter().map(|r| r.version()).collect();
        assert!(versions.is_sorted(), "{data_type} was sent in version order: {versions:?}");
    }
    assert!(received.iter().all(|r| signed_by(&hook.secret, r)));
}

#[tokio::test]
async fn a_failed_notification_is_retried_with_backoff_signed_afresh_under_the_same_id() {
    let receiver = Receiver::start(Answer::Status(500)).await;
    let hook = Hook::new("retries", FAUCET, &receiver.url, 6);
    let data = tempfile::tempdir().unwrap();
    // At least a second between attempts, so that each has its own timestamp.
    let hub = start(data.path(), std::slice::from_ref(&hook), |c| {
        c.webhooks.first_retry_ms = 2000;
        c.webhooks.max_retry_ms = 4000;
    })
    .await;

    hub.page(FAUCET, USER).push("profile", json!({ "display_name": "Retried" })).await.assert_ok();
    receiver.wait_for("two failed attempts", |all| all.len() >= 2).await;
    receiver.answer(Answer::Ok);
    receiver.wait_delivered(USER, "profile", 1).await;
    drained(&hub, FAUCET).await;

    let attempts = receiver.received();
    assert!(attempts.len() >= 3, "{attempts:#?}");
    let first = &attempts[0];
    for (earlier, later) in attempts.iter().zip(&attempts[1..]) {
        assert_eq!(later.id, first.id, "every attempt has the same webhook-id");
        assert_eq!(later.body, first.body, "and the same body");
        let (earlier_at, later_at): (i64, i64) =
            (earlier.timestamp.parse().unwrap(), later.timestamp.parse().unwrap());
        assert!(
            later_at > earlier_at,
            "a retry waits (at least a second here): {earlier_at} then {later_at}"
        );
        assert_ne!(later.signature, earlier.signature, "signed afresh");
    }
    assert!(attempts.iter().all(|r| signed_by(&hook.secret, r)), "each signature verifies");
    assert_eq!(attempts.iter().filter(|r| r.delivered()).count(), 1);
    let failed = metric(&hub, "hub_webhooks_failed_total", FAUCET).await;
    assert_eq!(failed, (attempts.len() - 1) as f64, "each failed attempt is counted");
    assert_eq!(metric(&hub, "hub_webhooks_delivered_total", FAUCET).await, 1.0);
}

#[tokio::test]
async fn a_notification_failing_for_retry_for_secs_is_given_up_and_counted() {
    let receiver = Receiver::start(Answer::Status(503)).await;
    let hook = Hook::new("given_up", FAUCET, &receiver.url, 7);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), |c| {
        c.webhooks.retry_for_secs = 60;
        c.webhooks.first_retry_ms = 1000;
        c.webhooks.max_retry_ms = 5000;
    })
    .await;

    hub.page(FAUCET, "1-given-up").push("profile", json!({ "display_name": "Lost" })).await.assert_ok();
    // The shortest retry_for_secs is a minute: the notification is given up after it.
    wait_metric(&hub, "hub_webhooks_dropped_total", FAUCET, 1.0, Duration::from_secs(120)).await;
    drained(&hub, FAUCET).await;
    assert!(metric(&hub, "hub_webhooks_failed_total", FAUCET).await >= 2.0);

    // The receiver comes back: what was given up stays given up, a new change is delivered.
    receiver.answer(Answer::Ok);
    hub.page(FAUCET, "2-later").push("profile", json!({ "display_name": "Later" })).await.assert_ok();
    receiver.wait_delivered("2-later", "profile", 1).await;
    drained(&hub, FAUCET).await;
    assert!(receiver.delivered().iter().all(|r| r.user() == "2-later"), "{:#?}", receiver.delivered());
    assert_eq!(metric(&hub, "hub_webhooks_dropped_total", FAUCET).await, 1.0);
}

#[tokio::test]
async fn notifications_waiting_at_a_restart_are_delivered_after_it() {
    let receiver = Receiver::start(Answer::Status(503)).await;
    let hook = Hook::new("restart", FAUCET, &receiver.url, 8);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), quick_retries).await;
    let charity = hub.site(CHARITY, "1-before");
    charity.delta("balance", 5, "before-restart").await.assert_ok();
    hub.page(FAUCET, "2-before").push("profile", json!({ "display_name": "Waiting" })).await.assert_ok();
    let epoch = record(&hub, "1-before", "balance").await["epoch"].clone();
    receiver.wait_for("a failed attempt", |all| !all.is_empty()).await;
    hub.stop().await;

    receiver.answer(Answer::Ok);
    let hub = start(data.path(), std::slice::from_ref(&hook), quick_retries).await;
    let balance = receiver.wait_delivered("1-before", "balance", 1).await;
    let profile = receiver.wait_delivered("2-before", "profile", 1).await;
    for got in [&balance, &profile] {
        assert!(signed_by(&hook.secret, got));
        assert_eq!(got.json["epoch"], epoch, "the same database");
    }
    drained(&hub, FAUCET).await;
}

#[tokio::test]
async fn a_receiver_that_never_answers_delays_neither_another_site_nor_the_hubs_writes() {
    let dead = Receiver::start(Answer::Hang).await;
    let alive = Receiver::start(Answer::Ok).await;
    let hooks = [Hook::new("dead", FAUCET, &dead.url, 9), Hook::new("dead", CHARITY, &alive.url, 10)];
    let data = tempfile::tempdir().unwrap();
    // The dead receiver holds each attempt for the longest timeout there is.
    let hub = start(data.path(), &hooks, |c| c.webhooks.timeout_secs = 60).await;
    let page = hub.page(FAUCET, USER);

    page.push("profile", json!({ "display_name": "First" })).await.assert_ok();
    dead.wait_for("an attempt it holds", |all| !all.is_empty()).await;
    for (i, name) in ["Second", "Third", "Fourth"].into_iter().enumerate() {
        page.push("profile", json!({ "display_name": name })).await.assert_ok();
        alive.wait_delivered(USER, "profile", i as u64 + 2).await;
    }
    // All the while, the dead receiver's first attempt was still waiting for its answer: the
    // hub counts it failed only once it times out.
    assert_eq!(
        metric(&hub, "hub_webhooks_failed_total", FAUCET).await,
        0.0,
        "the dead site's attempt still hangs"
    );
    assert!(dead.received().iter().all(|r| r.answered.is_none()), "{:#?}", dead.received());
    // The receiver has the last one before the hub has read its answer and counted it.
    wait_metric(&hub, "hub_webhooks_delivered_total", CHARITY, 4.0, support::receiver::PATIENCE).await;
    assert_eq!(metric(&hub, "hub_webhooks_delivered_total", CHARITY).await, 4.0);
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_counts_as_a_failed_attempt() {
    let receiver = Receiver::start(Answer::Redirect).await;
    let hook = Hook::new("redirect", FAUCET, &receiver.url, 11);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), quick_retries).await;

    hub.page(FAUCET, USER).push("profile", json!({ "display_name": "Moved" })).await.assert_ok();
    wait_metric(&hub, "hub_webhooks_failed_total", FAUCET, 1.0, support::receiver::PATIENCE).await;
    let received = receiver.received();
    assert!(
        received.iter().all(|r| r.path == "/webhooks/unified-sync"),
        "the redirect was followed: {received:#?}"
    );
    assert_eq!(metric(&hub, "hub_webhooks_delivered_total", FAUCET).await, 0.0);
    let dashboard: Value =
        hub.request(Method::GET, "/dashboard/data").send().await.unwrap().json().await.unwrap();
    assert_eq!(dashboard["webhooks"][0]["failing"], true);
    let why = dashboard["webhooks"][0]["last_failure"].as_str().unwrap();
    assert!(why.contains("302") && why.contains("redirects are not followed"), "{why}");
}

#[tokio::test]
async fn a_receiver_not_listening_is_shown_failing_with_why_and_delivered_to_once_it_listens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/webhooks/unified-sync");
    let hook = Hook::new("not_listening", FAUCET, &url, 16);
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), quick_retries).await;

    hub.page(FAUCET, USER).push("profile", json!({ "display_name": "Patient" })).await.assert_ok();
    wait_metric(&hub, "hub_webhooks_failed_total", FAUCET, 1.0, support::receiver::PATIENCE).await;
    let dashboard: Value =
        hub.request(Method::GET, "/dashboard/data").send().await.unwrap().json().await.unwrap();
    assert_eq!(dashboard["webhooks"][0]["failing"], true);
    let why = dashboard["webhooks"][0]["last_failure"].as_str().unwrap();
    assert!(why.starts_with("no connection:") && why.contains("refused"), "{why}");

    let receiver = Receiver::start_on(port, Answer::Ok).await;
    let got = receiver.wait_delivered(USER, "profile", 1).await;
    assert!(signed_by(&hook.secret, &got));
    drained(&hub, FAUCET).await;
    let dashboard: Value =
        hub.request(Method::GET, "/dashboard/data").send().await.unwrap().json().await.unwrap();
    assert_eq!(dashboard["webhooks"][0]["failing"], false, "delivering again");
}

#[tokio::test]
async fn an_https_receiver_of_a_private_authority_is_trusted_through_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = support::certs::loopback_signed_by("receiver authority");
    let path = |name: &str| dir.path().join(name);
    for (name, pem) in [("cert.pem", &certs.cert), ("key.pem", &certs.key), ("ca.pem", &certs.authority)] {
        std::fs::write(path(name), pem).unwrap();
    }
    let receiver = Receiver::start_tls(Answer::Ok, &path("cert.pem"), &path("key.pem")).await;
    let hook = Hook::new("https", FAUCET, &receiver.url, 17);

    // Trusting the system's authorities alone, the hub refuses the receiver's certificate.
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), quick_retries).await;
    hub.page(FAUCET, USER).push("profile", json!({ "display_name": "Untrusted" })).await.assert_ok();
    wait_metric(&hub, "hub_webhooks_failed_total", FAUCET, 1.0, support::receiver::PATIENCE).await;
    let dashboard: Value =
        hub.request(Method::GET, "/dashboard/data").send().await.unwrap().json().await.unwrap();
    let why = dashboard["webhooks"][0]["last_failure"].as_str().unwrap();
    assert!(why.contains("certificate"), "{why}");
    assert!(receiver.received().is_empty(), "nothing was sent over a connection the hub does not trust");
    hub.stop().await;

    let hub = start(data.path(), std::slice::from_ref(&hook), |c| {
        quick_retries(c);
        c.webhooks.ca_file = Some(path("ca.pem"));
    })
    .await;
    let got = receiver.wait_delivered(USER, "profile", 1).await;
    assert!(signed_by(&hook.secret, &got));
    drained(&hub, FAUCET).await;
}

#[test]
fn a_webhook_in_clear_to_another_machine_or_with_a_bad_secret_stops_the_start() {
    let data = tempfile::tempdir().unwrap();
    let refused = |hook: Hook| format!("{:#}", open(data.path(), &[hook], |_| {}).unwrap_err());

    let error = refused(Hook::new("refused_http", FAUCET, "http://203.0.113.5/hook", 12));
    assert!(error.contains("plain http to another machine") && error.contains("use https://"), "{error}");

    let short = Hook {
        secret: format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([1u8; 16])),
        ..Hook::new("refused_short", FAUCET, "https://roflfaucet.com/hook", 13)
    };
    let error = refused(short);
    assert!(error.contains("site roflfaucet") && error.contains("holds 16 bytes"), "{error}");
    let error = refused(Hook {
        secret: "not-a-whsec".into(),
        ..Hook::new("refused_form", FAUCET, "https://a.b/", 14)
    });
    assert!(error.contains("does not start with whsec_"), "{error}");

    // Without the variable at all, `hub check` names it.
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir.path().join("data"));
    config.sites[0].webhook_url = Some("https://roflfaucet.com/hook".into());
    config.sites[0].webhook_secret_env = Some("WEBHOOK_TEST_NEVER_SET".into());
    std::fs::write(dir.path().join("hub.toml"), toml::to_string(&config).unwrap()).unwrap();
    let out = support::hub_command()
        .as_std_mut()
        .args(["check", "--config"])
        .arg(dir.path().join("hub.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL  webhooks:")
                && l.contains("WEBHOOK_TEST_NEVER_SET, which is not set")),
        "{text}"
    );
}

#[tokio::test]
async fn two_instances_on_one_postgresql_database_deliver_each_notification_once() {
    let receiver = Receiver::start(Answer::Ok).await;
    let hook = Hook::new("instances", FAUCET, &receiver.url, 15);
    let url = support::postgres::Cluster::shared().database();
    let on_postgres = |c: &mut Config| {
        c.limits.requests_per_minute = 1_000_000;
        c.store.backend = hub::config::Backend::Postgres;
        c.store.url = Some(url.clone());
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(dir_a.path(), std::slice::from_ref(&hook), on_postgres).await;
    let b = start(dir_b.path(), std::slice::from_ref(&hook), on_postgres).await;

    // Ten users, each credited three times by the charity's backend, through either instance
    // at once: both instances move the feed into the one queue and send from it.
    let mut writes = tokio::task::JoinSet::new();
    for u in 0..10 {
        for (i, hub) in [&a, &b, &a].into_iter().enumerate() {
            let charity = hub.site(CHARITY, &format!("{u}-user"));
            writes.spawn(async move {
                charity.delta("balance", 1, &format!("credit-{i}")).await.assert_ok().clone()
            });
        }
    }
    while let Some(written) = writes.join_next().await {
        written.unwrap();
    }
    for u in 0..10 {
        receiver.wait_delivered(&format!("{u}-user"), "balance", 3).await;
    }
    drained(&a, FAUCET).await;
    let delivered = receiver.delivered();
    let mut ids: Vec<&str> = delivered.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "a notification was delivered twice: {delivered:#?}");
    for u in 0..10 {
        let versions: Vec<u64> =
            about(&delivered, &format!("{u}-user"), "balance").iter().map(|r| r.version()).collect();
        assert!(versions.is_sorted() && versions.last() == Some(&3), "user {u}: {versions:?}");
    }
    let sent = metric(&a, "hub_webhooks_delivered_total", FAUCET).await
        + metric(&b, "hub_webhooks_delivered_total", FAUCET).await;
    assert_eq!(sent, delivered.len() as f64, "each delivery counted by the instance that made it");
    assert!(delivered.iter().all(|r| signed_by(&hook.secret, r)));
}

/// A documented receiver, run as its guide says, writing each verified body to a file.
struct Documented {
    url: String,
    verified: PathBuf,
    _server: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Documented {
    /// Starts `program args…` with the secret and a file for what it verifies, on a free
    /// port given as `PORT`, and waits until it answers.
    async fn start(program: &str, args: impl Fn(u16) -> Vec<String>, secret: &str) -> Documented {
        let dir = tempfile::tempdir().unwrap();
        let verified = dir.path().join("verified.jsonl");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = tokio::process::Command::new(program)
            .args(args(port))
            .env("WEBHOOK_SECRET", secret)
            .env("WEBHOOK_VERIFIED_FILE", &verified)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `{program}` ({e}): install it (`apt-get install php-cli nodejs`)")
            });
        let url = format!("http://127.0.0.1:{port}/webhooks/unified-sync");
        let deadline = Instant::now() + support::receiver::PATIENCE;
        while client().get(&url).send().await.is_err() {
            assert!(Instant::now() < deadline, "{program} did not answer on port {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Documented { url, verified, _server: server, _dir: dir }
    }

    /// The bodies it verified, one per line.
    fn verified(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.verified)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// Waits until it verified a notification of `user`'s `data_type` at `version`.
    async fn wait_verified(&self, user: &str, data_type: &str, version: u64) -> Vec<Value> {
        let deadline = Instant::now() + support::receiver::PATIENCE;
        loop {
            let verified = self.verified();
            if verified
                .iter()
                .any(|b| b["user_id"] == user && b["data_type"] == data_type && b["version"] == version)
            {
                return verified;
            }
            assert!(
                Instant::now() < deadline,
                "{user}'s {data_type} at version {version} was not verified: {verified:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// POSTs `body` with these headers, as someone other than the hub might.
    async fn post(&self, id: &str, timestamp: i64, signature: &str, body: &str) -> u16 {
        client()
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

/// `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` by `secret` (`whsec_…`).
fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let key =
        base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

fn example(file: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples").join(file).display().to_string()
}

/// The hub delivers to `receiver` (one of the documented ones), which verifies and keeps
/// what it sent; a tampered body, a forged or missing signature and a timestamp older than
/// five minutes are refused with 401 and kept nowhere; several signatures, one of them
/// right, are accepted (a receiver during a secret's rotation).
async fn documented_receiver_verifies(test: &str, receiver: Documented, hook_secret: &str) {
    let hook = Hook { secret: hook_secret.to_owned(), ..Hook::new(test, FAUCET, &receiver.url, 0) };
    let data = tempfile::tempdir().unwrap();
    let hub = start(data.path(), std::slice::from_ref(&hook), quick_retries).await;
    hub.page(FAUCET, USER).push("profile", json!({ "display_name": "Verified" })).await.assert_ok();
    hub.site(CHARITY, USER).delta("balance", 3, "verified-credit").await.assert_ok();
    receiver.wait_verified(USER, "balance", 1).await;
    let verified = receiver.wait_verified(USER, "profile", 1).await;
    assert!(verified.iter().any(|b| b["data_type"] == "profile" && b["data"]["display_name"] == "Verified"));
    drained(&hub, FAUCET).await;
    assert_eq!(metric(&hub, "hub_webhooks_failed_total", FAUCET).await, 0.0, "every delivery acknowledged");
    let kept = receiver.verified().len();
    assert_eq!(kept, 2, "{:?}", receiver.verified());

    let body =
        r#"{"type":"record.changed","epoch":"e","user_id":"9-mallory","data_type":"balance","version":7}"#;
    let now = now_secs();
    let good = sign(hook_secret, "msg-1", now, body);
    for (what, id, timestamp, signature, body) in [
        ("a tampered body", "msg-1", now, good.clone(), body.replace("7}", "8}")),
        ("another secret's signature", "msg-1", now, sign(&secret(99), "msg-1", now, body), body.to_owned()),
        ("another id", "msg-2", now, good.clone(), body.to_owned()),
        ("no v1 signature", "msg-1", now, good.replace("v1,", "v2,"), body.to_owned()),
        (
            "a timestamp six minutes old",
            "msg-3",
            now - 360,
            sign(hook_secret, "msg-3", now - 360, body),
            body.to_owned(),
        ),
        (
            "a timestamp six minutes ahead",
            "msg-4",
            now + 360,
            sign(hook_secret, "msg-4", now + 360, body),
            body.to_owned(),
        ),
    ] {
        assert_eq!(receiver.post(id, timestamp, &signature, &body).await, 401, "{what}");
    }
    assert_eq!(receiver.verified().len(), kept, "nothing refused was kept");
    let rotating = format!("{} {good}", sign(&secret(98), "msg-1", now, body));
    assert!(
        (200..300).contains(&receiver.post("msg-1", now, &rotating, body).await),
        "one right signature of several"
    );
    assert_eq!(receiver.verified().len(), kept + 1);
}

#[tokio::test]
async fn the_documented_php_receiver_verifies_the_hubs_webhooks_and_refuses_forgeries() {
    let secret = secret(21);
    let php = Documented::start(
        "php",
        |port| vec!["-S".into(), format!("127.0.0.1:{port}"), example("webhook-receiver.php")],
        &secret,
    )
    .await;
    documented_receiver_verifies("php", php, &secret).await;
}

#[tokio::test]
async fn the_documented_node_receiver_verifies_the_hubs_webhooks_and_refuses_forgeries() {
    let secret = secret(22);
    let node = Documented::start("node", |_| vec![example("webhook-receiver.mjs")], &secret).await;
    documented_receiver_verifies("node", node, &secret).await;
}
