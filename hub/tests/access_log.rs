//! What the operator reads of the requests the real binary answers: the access log — one line
//! per request with its time, client (the forwarded one behind a trusted proxy), method,
//! action, status, code, duration, site and user, to a file that SIGHUP reopens after
//! logrotate moved it, or to stderr — and refused tokens and rate limits at `info`, a flood of
//! them in a bounded number of lines that still name the address and the site. A site that a
//! refused token only claims is logged as that token's claim, never as the site's own request,
//! and is counted in the metrics under no site.

mod support;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{Deployment, PATIENCE, hang_up, sample};
use tokio::process::Child;

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// The access log's lines, each as its time and its fields.
fn lines(path: &Path) -> Vec<(String, HashMap<String, String>)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let (time, rest) = line.split_once(' ').unwrap();
            let fields = rest
                .split(' ')
                .map(|pair| {
                    let (key, value) =
                        pair.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
                    (key.to_owned(), value.to_owned())
                })
                .collect();
            (time.to_owned(), fields)
        })
        .collect()
}

/// Polls `path` until a line has `key=value`; returns that line's fields.
async fn until_line(path: &Path, key: &str, value: &str) -> HashMap<String, String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some((_, fields)) =
            lines(path).into_iter().find(|(_, fields)| fields.get(key).map(String::as_str) == Some(value))
        {
            return fields;
        }
        assert!(
            Instant::now() < deadline,
            "no line with {key}={value} in {}:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A hub with its access log in `access.log` beside its configuration, behind a proxy on
/// 127.0.0.1.
fn deployment() -> (Deployment, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let deployment = Deployment::new(|config| {
        config.access_log.enabled = true;
        config.access_log.path = Some(path.clone());
        config.trusted_proxies = vec!["127.0.0.1".to_owned()].try_into().unwrap();
    });
    // The log's folder outlives the test's use of it.
    std::mem::forget(dir);
    (deployment, path)
}

/// A token naming `site` as its issuer whose signature does not hold: what anyone can send,
/// and what a site whose key the hub does not have sends too.
fn forged(deployment: &Deployment, site: &str) -> String {
    let mut token = deployment.token(site, USER);
    token.push_str(if token.ends_with('A') { "B" } else { "A" });
    token
}

/// Stops the hub as systemd does, and waits until it has.
async fn stop(mut hub: Child) {
    let pid = hub.id().unwrap().to_string();
    let sent = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(PATIENCE, hub.wait()).await.expect("the hub stops").unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn each_request_is_one_line_naming_its_client_site_user_action_and_status() {
    let (deployment, path) = deployment();
    let hub = deployment.start().await;
    let backend = deployment.backend(SITE, USER, Duration::from_secs(10));
    backend.delta("balance", 7, "op-access-log-1").await.assert_ok();
    let url = format!("{}/api/sync?action=timestamp&user_id={USER}&data_type=balance", deployment.url());
    let client = support::client();
    let refused = client.get(&url).bearer_auth("not-a-token").send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let through_proxy = client
        .get(&url)
        .bearer_auth(deployment.token(SITE, "proxied-user"))
        .header("x-forwarded-for", "198.51.100.1, 203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(through_proxy.status(), 403, "the token is for another user than the query names");

    let delta = until_line(&path, "action", "delta").await;
    assert_eq!(delta["client"], "127.0.0.1");
    assert_eq!(delta["method"], "POST");
    assert_eq!(delta["status"], "200");
    assert_eq!(delta["code"], "-");
    assert_eq!((delta["site"].as_str(), delta["user"].as_str()), (SITE, USER));
    assert_eq!(delta["claimed_site"], "-");
    assert!(delta["duration_ms"].parse::<f64>().unwrap() > 0.0, "{delta:?}");
    assert!(!delta["id"].is_empty() && delta["id"] != "-", "{delta:?}");

    let refused = until_line(&path, "status", "401").await;
    assert_eq!(refused["code"], "invalid_token");
    assert_eq!((refused["action"].as_str(), refused["method"].as_str()), ("timestamp", "GET"));
    assert_eq!((refused["site"].as_str(), refused["user"].as_str()), ("-", "-"), "a token of no site");
    assert_eq!(refused["claimed_site"], "-");

    // Behind the trusted proxy, the client is the address it forwarded, not the proxy's.
    let proxied = until_line(&path, "user", "proxied-user").await;
    assert_eq!(proxied["client"], "203.0.113.7");
    assert_eq!((proxied["status"].as_str(), proxied["code"].as_str()), ("403", "wrong_user"));

    // Each line starts with its time, in order.
    let times: Vec<String> = lines(&path).into_iter().map(|(time, _)| time).collect();
    assert!(times.iter().all(|t| t.ends_with('Z') && t.len() == 24), "{times:?}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    stop(hub).await;
}

#[tokio::test]
async fn after_logrotate_moves_the_file_sighup_sends_the_new_lines_to_a_new_one() {
    let (mut deployment, path) = deployment();
    // The unit's: without more, a new file would be the service user's alone.
    deployment.umask = Some("0077");
    let hub = deployment.start().await;
    let before = deployment.backend(SITE, "before-rotation", Duration::from_secs(10));
    before.timestamp("balance").await.assert_ok();
    until_line(&path, "user", "before-rotation").await;

    let rotated = path.with_extension("log.1");
    std::fs::rename(&path, &rotated).unwrap();
    hang_up(&hub).await;
    let deadline = Instant::now() + PATIENCE;
    let reopened = r#"hub_reloads_total{what="access_log",result="ok"}"#;
    loop {
        let metrics = support::client().get(format!("{}/metrics", deployment.url())).send().await.unwrap();
        if sample(&metrics.text().await.unwrap(), reopened) == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP reopened no access log; log:\n{}", deployment.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let after = deployment.backend(SITE, "after-rotation", Duration::from_secs(10));
    after.timestamp("balance").await.assert_ok();
    until_line(&path, "user", "after-rotation").await;
    let users =
        |path: &Path| -> Vec<String> { lines(path).into_iter().map(|(_, f)| f["user"].clone()).collect() };
    assert!(!users(&path).contains(&"before-rotation".to_owned()), "{:?}", users(&path));
    assert!(users(&rotated).contains(&"before-rotation".to_owned()), "{:?}", users(&rotated));
    assert!(!users(&rotated).contains(&"after-rotation".to_owned()), "{:?}", users(&rotated));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "its owner and its group may read it, others not: {mode:o}");
    }
    stop(hub).await;
}

#[tokio::test]
async fn without_a_path_the_access_log_goes_to_stderr() {
    let deployment = Deployment::new(|config| config.access_log.enabled = true);
    let hub = deployment.start().await;
    let backend = deployment.backend(SITE, "on-stderr", Duration::from_secs(10));
    backend.timestamp("balance").await.assert_ok();
    stop(hub).await;
    let log = deployment.log();
    let line = log.lines().find(|l| l.contains("user=on-stderr")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("client=127.0.0.1 method=GET action=timestamp status=200 code=- "), "{line}");
    assert!(line.contains(&format!("site={SITE} claimed_site=- user=on-stderr id=")), "{line}");
}

#[tokio::test]
async fn a_flood_of_refused_tokens_is_logged_in_a_few_lines_naming_the_addresses_and_site() {
    let mut deployment = Deployment::new(|_| {});
    deployment.rust_log = "info";
    let hub = deployment.start().await;
    let forged = forged(&deployment, SITE);
    let url = format!("{}/api/sync?action=timestamp&user_id={USER}&data_type=balance", deployment.url());
    let addresses: [IpAddr; 2] = ["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
    let mut statuses = HashMap::<u16, usize>::new();
    for address in addresses {
        let client = reqwest::Client::builder().local_address(address).build().unwrap();
        for _ in 0..150 {
            let status = client.get(&url).bearer_auth(&forged).send().await.unwrap().status().as_u16();
            *statuses.entry(status).or_default() += 1;
        }
    }
    // About 60 a minute from each address are answered 401, the rest 429.
    let (unauthorized, limited) = (statuses[&401], statuses[&429]);
    assert!((120..=130).contains(&unauthorized) && unauthorized + limited == 300, "{statuses:?}");
    stop(hub).await;

    let log = deployment.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused ") && (l.contains(" 401 ") || l.contains(" 429 ")))
        .collect();
    assert_eq!(refused.len(), 4, "the first of each kind and one sum of each:\n{}", refused.join("\n"));
    for line in &refused {
        assert!(line.contains(" INFO "), "{line}");
        assert!(line.contains(&format!("claiming site {SITE}")), "{line}");
    }
    assert!(
        refused[0].contains("refused 401 invalid_token claiming site roflfaucet from 127.0.0.2"),
        "{}",
        refused[0]
    );
    assert!(
        refused[1].contains("refused 429 rate_limited claiming site roflfaucet from 127.0.0.2"),
        "{}",
        refused[1]
    );
    let sums = refused[2..].join("\n");
    for (status, code, count) in [(401, "invalid_token", unauthorized), (429, "rate_limited", limited)] {
        let sum = format!(
            "refused {} more {status} {code} claiming site roflfaucet since the first, from 2 addresses, the latest 127.0.0.3",
            count - 1
        );
        assert!(sums.contains(&sum), "{sum} in:\n{sums}");
    }
}

#[tokio::test]
async fn a_forged_token_naming_a_site_is_logged_as_its_claim_not_as_that_site() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut deployment = Deployment::new(|config| {
        config.access_log.enabled = true;
        config.access_log.path = Some(path.clone());
        config.limits.requests_per_minute = 1;
    });
    deployment.rust_log = "info";
    let hub = deployment.start().await;
    let url = format!("{}/api/sync?action=timestamp&user_id={USER}&data_type=balance", deployment.url());
    let stranger =
        reqwest::Client::builder().local_address("127.0.0.2".parse::<IpAddr>().unwrap()).build().unwrap();
    let refused = stranger.get(&url).bearer_auth(forged(&deployment, SITE)).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    // The site's own backend, over its user's limit: a refusal of the site itself.
    let backend = deployment.backend(SITE, USER, Duration::from_secs(10));
    backend.timestamp("balance").await.assert_ok();
    backend.timestamp("balance").await.assert_refused(429, "rate_limited");

    let claim = until_line(&path, "status", "401").await;
    assert_eq!((claim["site"].as_str(), claim["claimed_site"].as_str()), ("-", SITE), "{claim:?}");
    assert_eq!((claim["client"].as_str(), claim["user"].as_str()), ("127.0.0.2", "-"), "{claim:?}");
    let limited = until_line(&path, "status", "429").await;
    assert_eq!((limited["site"].as_str(), limited["claimed_site"].as_str()), (SITE, "-"), "{limited:?}");

    let metrics = support::client().get(format!("{}/metrics", deployment.url())).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    let requests = |site: &str, status: u16| {
        let series = format!(
            r#"hub_requests_total{{action="timestamp",data_type="balance",site="{site}",status="{status}"}}"#
        );
        sample(&metrics, &series)
    };
    assert_eq!(requests("", 401), Some(1.0), "counted under no site:\n{metrics}");
    assert_eq!(requests(SITE, 401), None, "{metrics}");
    assert_eq!(requests(SITE, 429), Some(1.0), "{metrics}");
    stop(hub).await;

    let log = deployment.log();
    assert!(log.contains(&format!("refused 401 invalid_token claiming site {SITE} from 127.0.0.2")), "{log}");
    assert!(!log.contains(&format!("401 invalid_token for site {SITE}")), "{log}");
    assert!(log.contains(&format!("refused 429 rate_limited for site {SITE} from 127.0.0.1")), "{log}");
}
