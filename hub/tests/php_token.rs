//! The PHP endpoint of the deployment guide (`docs/examples/sync-token.php`) mints tokens and
//! grants the real hub accepts: run from the command line with a test site's secret, it
//! prints a token that reads the user's versions, and a grant with which that page's token
//! credits the example's daily bonus once; either with a tampered signature is refused, and
//! so is the grant for an amount the page changed.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use support::{SiteClient, TestHub, client, site_secret};

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// What `php docs/examples/sync-token.php USER ARGS…` prints with `SITE`'s test secret, or
/// `None` when it exits with 1 (nothing to grant).
fn php(hub_id: &str, args: &[&str]) -> Option<String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/sync-token.php");
    let output = Command::new("php")
        .arg(&script)
        .arg(USER)
        .args(args)
        .env("SYNC_SITE_ID", SITE)
        .env("SYNC_HUB_ID", hub_id)
        .env("SYNC_SECRET", site_secret(SITE))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `php` ({e}): install the Debian package php-cli (`apt-get install php-cli`)")
        });
    let stdout = String::from_utf8(output.stdout).unwrap();
    if output.status.code() == Some(1) {
        return None;
    }
    assert!(
        output.status.success(),
        "{} failed ({}): {}{}",
        script.display(),
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    Some(stdout.trim().to_owned())
}

/// The page's token the endpoint signs.
fn php_token(hub_id: &str) -> String {
    php(hub_id, &[]).expect("a token")
}

/// The endpoint's answer to a credit (`credit NAME`) or a fresh grant (`again OP_ID`).
fn php_grant(hub_id: &str, what: &str, name: &str) -> Option<Value> {
    php(hub_id, &[what, name]).map(|text| serde_json::from_str(&text).unwrap())
}

fn page(hub: &TestHub, token: String) -> SiteClient {
    SiteClient {
        url: hub.url.clone(),
        client: client(),
        token: Some(token),
        site: SITE.into(),
        user: USER.into(),
    }
}

/// The JWT with one character of its signature changed.
fn tampered(token: &str) -> String {
    let signature = token.rfind('.').unwrap() + 1;
    let mut bytes = token.as_bytes().to_vec();
    bytes[signature] = if bytes[signature] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn the_hub_accepts_the_php_token_and_refuses_it_tampered() {
    let hub = TestHub::start().await;
    let token = php_token(&hub.app.config().hub_id);

    let body = page(&hub, token.clone()).timestamp("balance").await;
    assert_eq!(body.assert_ok()["version"], 0, "body: {}", body.body);

    page(&hub, tampered(&token)).timestamp("balance").await.assert_refused(401, "invalid_token");
    hub.stop().await;
}

#[tokio::test]
async fn a_php_grant_credits_the_page_once_and_only_as_granted() {
    let hub = TestHub::start().await;
    let hub_id = hub.app.config().hub_id.clone();
    let page = page(&hub, php_token(&hub_id));
    let bonus = php_grant(&hub_id, "credit", "daily").expect("the example's rule grants a daily bonus");
    assert_eq!((&bonus["data_type"], &bonus["delta"]), (&json!("balance"), &json!({ "coins": 10 })));
    let op_id = bonus["op_id"].as_str().unwrap();
    let grant = bonus["grant"].as_str().unwrap();
    let before = hub.snapshot();

    // Tampered, or for another amount than the site decided: refused, nothing stored.
    page.delta_with_grant("balance", 10, op_id, &tampered(grant)).await.assert_refused(403, "grant_invalid");
    page.delta_with_grant("balance", 1000, op_id, grant).await.assert_refused(403, "grant_invalid");
    page.delta("balance", 10, op_id).await.assert_refused(403, "insufficient_scope");
    assert_eq!(hub.snapshot(), before);

    page.delta_with_grant("balance", 10, op_id, grant).await.assert_ok();
    assert_eq!(page.coins().await, 10);

    // Asked again, the endpoint grants the same op, which the hub replays; any other op it
    // does not grant at all.
    let again = php_grant(&hub_id, "again", op_id).expect("today's bonus is granted again");
    assert_eq!(again["op_id"], bonus["op_id"]);
    let replayed = page.delta_with_grant("balance", 10, op_id, again["grant"].as_str().unwrap()).await;
    assert_eq!(replayed.assert_ok()["replayed"], true);
    let again = php_grant(&hub_id, "credit", "daily").unwrap();
    page.delta_with_grant("balance", 10, op_id, again["grant"].as_str().unwrap()).await.assert_ok();
    assert_eq!(page.coins().await, 10, "the daily bonus is credited once a day");
    assert_eq!(php_grant(&hub_id, "again", "daily-2000-01-01"), None);
    assert_eq!(php_grant(&hub_id, "credit", "jackpot"), None);
    hub.stop().await;
}
