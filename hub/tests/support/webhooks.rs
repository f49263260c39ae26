//! A hub with sites' webhooks for the webhook tests, and what they read of its deliveries:
//! `/metrics` by site, and each site's queue.

use std::path::Path;
use std::time::{Duration, Instant};

use hub::App;
use hub::config::Config;
use reqwest::Method;

use super::receiver::secret;
use super::{TestHub, sample, test_config};

/// A site's webhook in a test: its receiver's URL, and its secret, given to the hub in a
/// variable named for the test alone (the tests share one process).
pub struct Hook {
    pub site: &'static str,
    pub url: String,
    pub var: String,
    pub secret: String,
}

impl Hook {
    pub fn new(test: &str, site: &'static str, url: &str, seed: u8) -> Hook {
        let var = format!("WEBHOOK_TEST_{}_{}", test.to_uppercase(), site.to_uppercase());
        Hook { site, url: url.to_owned(), var, secret: secret(seed) }
    }
}

/// Opens a hub on `data_dir` with `hooks`, as `tweak` changes its configuration, with each
/// hook's secret in its variable while the hub reads them.
// figment's `Jail` fixes the closure's error type to its own large `figment::Error`.
#[allow(clippy::result_large_err)]
pub fn open(data_dir: &Path, hooks: &[Hook], tweak: impl FnOnce(&mut Config)) -> anyhow::Result<App> {
    let mut config = test_config(data_dir);
    for hook in hooks {
        let site = config.sites.iter_mut().find(|s| s.id == hook.site).unwrap();
        site.webhook_url = Some(hook.url.clone());
        site.webhook_secret_env = Some(hook.var.clone());
    }
    tweak(&mut config);
    let mut opened = None;
    // figment's `Jail` sets the variables for this closure alone: the 2024 edition makes
    // `std::env::set_var` unsafe, which this workspace forbids.
    figment::Jail::expect_with(|jail| {
        for hook in hooks {
            jail.set_env(&hook.var, &hook.secret);
        }
        opened = Some(App::open(config));
        Ok(())
    });
    opened.unwrap()
}

/// A hub serving on `data_dir` with `hooks`; [`open`] must succeed.
pub async fn start(data_dir: &Path, hooks: &[Hook], tweak: impl FnOnce(&mut Config)) -> TestHub {
    TestHub::serve(open(data_dir, hooks, tweak).unwrap(), tempfile::tempdir().unwrap()).await
}

/// Retries that come back within a test's patience.
pub fn quick_retries(config: &mut Config) {
    config.webhooks.first_retry_ms = 200;
    config.webhooks.max_retry_ms = 1000;
}

pub async fn metrics(hub: &TestHub) -> String {
    hub.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap()
}

/// The value of `name{site="site"}` in `/metrics` (0 when absent).
pub async fn metric(hub: &TestHub, name: &str, site: &str) -> f64 {
    sample(&metrics(hub).await, &format!("{name}{{site=\"{site}\"}}")).unwrap_or(0.0)
}

/// Waits until `name{site="site"}` reaches `at_least`, for `patience` at most.
pub async fn wait_metric(hub: &TestHub, name: &str, site: &str, at_least: f64, patience: Duration) {
    let deadline = Instant::now() + patience;
    loop {
        let value = metric(hub, name, site).await;
        if value >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{name} of {site} stayed at {value}, short of {at_least}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until nothing waits in `site`'s queue: whatever was queued for it was delivered or
/// given up, each delivery acknowledged by its receiver first.
pub async fn drained(hub: &TestHub, site: &str) {
    let deadline = Instant::now() + super::receiver::PATIENCE;
    loop {
        let stats = hub.app.domain().store().webhook_stats().await.unwrap();
        if !stats.iter().any(|s| s.site.as_str() == site && s.queued > 0) {
            return;
        }
        assert!(Instant::now() < deadline, "{site}'s queue did not empty: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
