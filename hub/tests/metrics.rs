//! `/metrics` and the dashboard over real HTTP: what the operator sees after real traffic,
//! and who may see it; the real binary's version, process figures and reloads.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use support::{Deployment, Reply, TestHub, sample};

#[track_caller]
fn assert_sample(text: &str, series: &str, expected: f64) {
    assert_eq!(sample(text, series), Some(expected), "{series} in\n{text}");
}

async fn scrape(hub: &TestHub) -> String {
    let response = hub.request(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    response.text().await.unwrap()
}

#[tokio::test]
async fn metrics_count_checks_fetches_deltas_limits_and_commits_by_site_and_status() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 12).await;
    let faucet = hub.site("roflfaucet", "8-evans");
    let charity = hub.site("clickforcharity", "8-evans");

    faucet.timestamp("balance,profile").await.assert_ok();
    faucet.timestamp("balance,profile").await.assert_ok();
    charity.delta("balance", 10, "op-earn-1").await.assert_ok();
    charity.delta("balance", 10, "op-earn-1").await.assert_ok(); // the same op, replayed
    charity.delta("balance", -50, "op-spend-1").await.assert_refused(409, "insufficient_funds");
    let fetched = faucet.get("balance").await;
    let etag = fetched.header("etag").unwrap().to_owned();
    let not_modified = faucet
        .client
        .get(format!("{}/api/sync.php?action=get&user_id=8-evans&data_type=balance", hub.url))
        .bearer_auth(faucet.token.as_ref().unwrap())
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    Reply::from(
        hub.request(Method::GET, "/api/sync.php?action=timestamp&user_id=8-evans&data_type=balance")
            .bearer_auth("not-a-token")
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_refused(401, "invalid_token");
    // 7 requests so far for 8-evans; the limit is 12 a minute.
    let mut limited = 0;
    for _ in 0..8 {
        if faucet.timestamp("balance").await.status == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        }
    }
    assert!(limited >= 3, "the user limit refused {limited} requests");

    let text = scrape(&hub).await;
    assert_sample(
        &text,
        r#"hub_requests_total{action="timestamp",data_type="balance,profile",site="roflfaucet",status="200"}"#,
        2.0,
    );
    assert_sample(
        &text,
        r#"hub_requests_total{action="delta",data_type="balance",site="clickforcharity",status="200"}"#,
        2.0,
    );
    assert_sample(
        &text,
        r#"hub_requests_total{action="delta",data_type="balance",site="clickforcharity",status="409"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"hub_requests_total{action="timestamp",data_type="balance",site="",status="401"}"#,
        1.0,
    );
    assert_sample(
        &text,
        r#"hub_requests_total{action="timestamp",data_type="balance",site="roflfaucet",status="429"}"#,
        f64::from(limited),
    );
    assert_sample(&text, r#"hub_rate_limited_total{scope="user"}"#, f64::from(limited));
    assert_sample(&text, r#"hub_sync_checks_total{site="roflfaucet"}"#, f64::from(2 + 8 - limited));
    assert_sample(&text, r#"hub_sync_fetches_total{site="roflfaucet",result="sent"}"#, 1.0);
    assert_sample(&text, r#"hub_sync_fetches_total{site="roflfaucet",result="not_modified"}"#, 1.0);
    assert_sample(&text, r#"hub_deltas_total{outcome="applied"}"#, 1.0);
    assert_sample(&text, r#"hub_deltas_total{outcome="replayed"}"#, 1.0);
    assert_sample(&text, r#"hub_deltas_total{outcome="refused"}"#, 1.0);
    // Every delta is one write, replays and refusals too: the writer looks up the op id
    // inside its transaction.
    assert_sample(&text, "hub_store_commit_batch_writes_sum", 3.0);
    assert!(sample(&text, "hub_store_commit_seconds_count").is_some_and(|n| n >= 1.0), "{text}");
    assert!(sample(&text, "hub_store_commit_seconds_sum").is_some_and(|s| s > 0.0), "{text}");
    assert!(
        sample(&text, r#"hub_request_duration_seconds_count{action="timestamp"}"#).is_some_and(|n| n >= 11.0)
    );
    assert!(
        sample(&text, "hub_open_connections").is_some_and(|n| n >= 1.0),
        "the scrape's own connection is open: {text}"
    );
    assert!(text.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn metrics_are_refused_without_the_token_when_loopback_is_not_trusted() {
    let token = "metrics-token-for-the-operator";
    let hub = TestHub::start_with(|c| {
        c.metrics.allow_loopback = false;
        c.metrics.token = Some(token.into());
    })
    .await;
    let before = hub.snapshot();
    for path in ["/metrics", "/dashboard/data"] {
        Reply::from(hub.request(Method::GET, path).send().await.unwrap())
            .await
            .assert_refused(401, "missing_token");
        Reply::from(
            hub.request(Method::GET, path)
                .bearer_auth("metrics-token-for-the-operatoR")
                .send()
                .await
                .unwrap(),
        )
        .await
        .assert_refused(401, "invalid_token");
        // A site's user token is no metrics token.
        Reply::from(
            hub.request(Method::GET, path)
                .bearer_auth(hub.token("roflfaucet", "8-evans"))
                .send()
                .await
                .unwrap(),
        )
        .await
        .assert_refused(401, "invalid_token");
        let allowed = hub.request(Method::GET, path).bearer_auth(token).send().await.unwrap();
        assert_eq!(allowed.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(hub.snapshot(), before, "reading metrics stores nothing");
}

#[tokio::test]
async fn a_loopback_caller_reads_metrics_without_a_token_by_default() {
    let hub = TestHub::start().await;
    scrape(&hub).await;
    let text = scrape(&hub).await;
    assert_sample(&text, r#"hub_requests_total{action="admin",data_type="",site="",status="200"}"#, 1.0);
}

#[tokio::test]
async fn a_short_metrics_token_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::test_config(dir.path());
    config.metrics.token = Some("short".into());
    let error = hub::App::open(config).unwrap_err();
    assert!(error.to_string().contains("at least 16"), "{error}");
}

#[tokio::test]
async fn the_dashboard_data_holds_the_last_hour_by_site() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    let wrc = hub.site("wrc", "8-evans");
    for _ in 0..3 {
        faucet.timestamp("balance").await.assert_ok();
    }
    wrc.delta("balance", 5, "op-wrc-1").await.assert_ok();
    let data: Value = hub.request(Method::GET, "/dashboard/data").send().await.unwrap().json().await.unwrap();
    assert_eq!(data["sites"], serde_json::json!(["roflfaucet", "clickforcharity", "wrc"]));
    assert_eq!(data["slot_ms"], 10_000);
    let slots = data["slots"].as_array().unwrap();
    let total = |field: &str, index: Option<usize>| -> u64 {
        slots
            .iter()
            .map(|s| match index {
                Some(i) => s[field][i].as_u64().unwrap(),
                None => s[field].as_u64().unwrap(),
            })
            .sum()
    };
    assert_eq!(total("requests", Some(0)), 3);
    assert_eq!(total("requests", Some(2)), 1);
    assert_eq!(total("checks", None), 3);
    assert_eq!(total("deltas", None), 1);
    let last = slots.last().unwrap();
    assert!(last["p50_ms"].as_f64().is_some(), "a slot with requests has percentiles: {last}");
}

#[tokio::test]
async fn the_dashboard_page_is_served_with_a_strict_content_policy() {
    let hub = TestHub::start().await;
    let redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}/dashboard", hub.url))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(redirect.headers()["location"], "/dashboard/");
    for (path, kind) in [
        ("/dashboard/", "text/html"),
        ("/dashboard/dashboard.js", "text/javascript"),
        ("/dashboard/dashboard.css", "text/css"),
    ] {
        let response = hub.request(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        let csp = response.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    }
}

/// `/metrics` of the real binary, read from loopback.
async fn scrape_deployment(deployment: &Deployment) -> String {
    let response = support::client().get(format!("{}/metrics", deployment.url())).send().await.unwrap();
    response.text().await.unwrap()
}

#[tokio::test]
async fn the_real_hub_tells_its_version_its_process_and_each_sites_reload() {
    let deployment = Deployment::new(|_| {});
    let hub = deployment.start().await;
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let text = scrape_deployment(&deployment).await;
    assert_sample(&text, &format!(r#"hub_build_info{{version="{}"}}"#, env!("CARGO_PKG_VERSION")), 1.0);

    // The process's own figures: the hub's, not the test's. Its threads and files come and go
    // with its work, so they are compared with what /proc shows of it within a margin.
    let pid = hub.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads: f64 =
        status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap();
    let reported = sample(&text, "process_threads").unwrap();
    assert!((2.0..=threads + 8.0).contains(&reported), "{reported} threads, /proc lists {threads}");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as f64;
    let open_fds = sample(&text, "process_open_fds").unwrap();
    assert!((3.0..=fds + 8.0).contains(&open_fds), "{open_fds} open, /proc lists {fds}");
    let resident = sample(&text, "process_resident_memory_bytes").unwrap();
    assert!((1e6..1e9).contains(&resident), "{resident} bytes resident");
    let started = sample(&text, "process_start_time_seconds").unwrap();
    assert!((before - 60.0..=before + 1.0).contains(&started), "started at {started}, the test at {before}");
    assert!(sample(&text, "process_max_fds").is_some(), "{text}");
    // CPU time is counted in clock ticks: after some work it is more than none.
    let client = support::client();
    for _ in 0..300 {
        client.get(format!("{}/healthz", deployment.url())).send().await.unwrap();
    }
    let cpu = sample(&scrape_deployment(&deployment).await, "process_cpu_seconds_total").unwrap();
    assert!(cpu > 0.0, "{cpu} s of CPU after 300 requests");

    // A configuration that does not load is a failed reload of the sites; a good one is not.
    const OK: &str = r#"hub_reloads_total{what="sites",result="ok"}"#;
    const FAILED: &str = r#"hub_reloads_total{what="sites",result="failed"}"#;
    assert_sample(&text, FAILED, 0.0);
    let config = deployment.dir.path().join("hub.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, "no_such_key = 1\n").unwrap();
    support::hang_up(&hub).await;
    let text = until_sample(&deployment, FAILED, 1.0).await;
    assert_sample(&text, OK, 0.0);
    std::fs::write(&config, good).unwrap();
    support::hang_up(&hub).await;
    let text = until_sample(&deployment, OK, 1.0).await;
    assert_sample(&text, FAILED, 1.0);
    assert!(
        !text.contains(r#"what="tls",result="ok"} 1"#),
        "a plain-HTTP hub reloads no certificate: {text}"
    );
}

/// Polls the real hub's `/metrics` until `series` has `value`; returns the whole text.
async fn until_sample(deployment: &Deployment, series: &str, value: f64) -> String {
    let deadline = std::time::Instant::now() + support::PATIENCE;
    loop {
        let text = scrape_deployment(deployment).await;
        if sample(&text, series) == Some(value) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} never became {value}:\n{text}\nlog:\n{}",
            deployment.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
