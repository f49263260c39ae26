//! The per-user rate limit of a deployment, not of an instance: two hub instances on one
//! PostgreSQL database let one user through no more than `limits.requests_per_minute`, with
//! at most a tenth above it, however the user's requests are spread; one instance on SQLite
//! lets exactly the limit through; while the database is away, each instance limits on its
//! own, and the shared limit is back once the database is.
//!
//! The tests count answers and never time them: the limits are large enough for a cell to
//! come back only every 0.6 s (100 a minute) or 6 s (10 a minute), far longer than a burst
//! of requests takes.

mod support;

use hub::config::Backend;
use reqwest::Method;
use support::postgres::Cluster;
use support::{Reply, SiteClient, TestHub, sample};

const USER: &str = "8-evans";

/// A hub on the PostgreSQL database at `url` letting each user through `per_minute` requests.
async fn hub_on(url: &str, per_minute: u32) -> TestHub {
    TestHub::start_with(|c| {
        c.store.backend = Backend::Postgres;
        c.store.url = Some(url.to_owned());
        c.limits.requests_per_minute = per_minute;
    })
    .await
}

/// How many of `user`'s requests, alternating between `hubs`, are let through (answered
/// anything but `429`) before 20 in a row are refused. Every refusal is `429 rate_limited`
/// with `Retry-After`.
async fn let_through(hubs: &[&TestHub], user: &str) -> u32 {
    let pages: Vec<SiteClient> = hubs.iter().map(|hub| hub.page("roflfaucet", user)).collect();
    let (mut passed, mut refused_in_a_row) = (0, 0);
    for page in pages.iter().cycle() {
        let reply = page.timestamp("balance").await;
        if reply.status == 429 {
            assert_rate_limited(&reply);
            refused_in_a_row += 1;
            if refused_in_a_row == 20 {
                return passed;
            }
        } else {
            passed += 1;
            refused_in_a_row = 0;
        }
    }
    unreachable!("the pages cycle without end")
}

#[track_caller]
fn assert_rate_limited(reply: &Reply) {
    reply.assert_refused(429, "rate_limited");
    let retry_after: u64 = reply.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After: {retry_after}");
}

/// A counter of `hub`'s `/metrics`, 0 while it has no sample.
async fn counter(hub: &TestHub, name: &str) -> f64 {
    let text = hub.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    sample(&text, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_let_a_user_through_the_limit_and_no_more_than_a_tenth_above() {
    let url = Cluster::shared().database();
    let (a, b) = (hub_on(&url, 100).await, hub_on(&url, 100).await);

    let passed = let_through(&[&a, &b], USER).await;
    // Every cell leased is spent: one instance's last lease is the quota's last cells.
    assert!((97..=110).contains(&passed), "{passed} of a limit of 100 let through");

    let leases =
        counter(&a, "hub_rate_limit_leases_total").await + counter(&b, "hub_rate_limit_leases_total").await;
    assert!(leases <= f64::from(passed / 4 + 2), "{leases} leases for {passed} requests: 4 cells a lease");
    assert_eq!(counter(&a, "hub_rate_limit_fallbacks_total").await, 0.0);
}

/// The worst case: each instance holds the cells of a lease unspent (3 of 4) while the user's
/// quota recovers, a minute later, and spends them on top of the full quota.
#[tokio::test(flavor = "multi_thread")]
async fn cells_held_while_the_quota_recovers_give_no_more_than_a_tenth_above_the_limit() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let (a, b) = (hub_on(&url, 100).await, hub_on(&url, 100).await);
    for hub in [&a, &b] {
        hub.page("roflfaucet", USER).timestamp("balance").await.assert_ok();
    }
    // A minute without requests, as the database sees it.
    cluster.psql(&url, "UPDATE rate_limits SET tat_us = 0");

    let passed = let_through(&[&a, &b], USER).await;
    assert!((100..=110).contains(&passed), "{passed} of a limit of 100 let through");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_instance_on_sqlite_lets_exactly_the_limit_through() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 10).await;
    assert_eq!(let_through(&[&hub], USER).await, 10);
    assert!(
        !hub.request(Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("rate_limit_leases"),
        "nothing is leased from a store of one instance"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn while_the_database_is_away_each_instance_limits_a_user_on_its_own() {
    let mut cluster = Cluster::start();
    let url = cluster.database();
    let (a, b) = (hub_on(&url, 10).await, hub_on(&url, 10).await);
    assert_eq!(let_through(&[&a, &b], "before").await, 10);

    cluster.crash();
    // Requests let through are then answered 503, the store being away too.
    assert_eq!(let_through(&[&a, &b], USER).await, 20, "10 by each instance");
    assert!(counter(&a, "hub_rate_limit_fallbacks_total").await >= 10.0);
    assert!(counter(&b, "hub_rate_limit_fallbacks_total").await >= 10.0);

    cluster.start_again();
    // The instances ask the database again a second after it last failed them.
    let leases = counter(&a, "hub_rate_limit_leases_total").await;
    let page = a.page("roflfaucet", "after");
    while counter(&a, "hub_rate_limit_leases_total").await == leases {
        page.timestamp("balance").await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let passed = let_through(&[&a, &b], "again").await;
    assert!((10..=11).contains(&passed), "{passed} of a limit of 10 let through");
}
