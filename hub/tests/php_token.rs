//! The PHP endpoint of the deployment guide (`docs/examples/sync-token.php`) mints tokens and
//! grants the real hub accepts: run from the command line with a test site's secret, it
//! prints a token that reads the user's versions, and a grant with which that page's token
//! credits the example's daily bonus once; either with a tampered signature is refused, and
//! so is the grant for an amount the page changed. The bonus's op id is a UUIDv7 dated at the
//! start of its UTC day, the user's own, so that the hub can date it.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::{SiteClient, TestHub, client, site_secret};

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// What `php docs/examples/sync-token.php USER ARGS…` prints with `SITE`'s test secret, or
/// `None` when it exits with 1 (nothing to grant).
fn php(hub_id: &str, args: &[&str]) -> Option<String> {
    php_as(USER, hub_id, args)
}

/// What `php docs/examples/sync-token.php user ARGS…` prints, as [`php`].
fn php_as(user: &str, hub_id: &str, args: &[&str]) -> Option<String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/sync-token.php");
    let output = Command::new("php")
        .arg(&script)
        .arg(user)
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

/// The time (Unix ms) of `op_id`, which must be a UUIDv7 as RFC 9562 spells it: lowercase
/// 8-4-4-4-12 hex, version 7, variant `10`, the first 48 bits the time.
fn uuidv7_ms(op_id: &str) -> u64 {
    let groups: Vec<&str> = op_id.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|group| group.len()).collect();
    assert_eq!(lengths, [8, 4, 4, 4, 12], "not a UUID: {op_id}");
    let hex = groups.concat();
    assert!(hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "not lowercase hex: {op_id}");
    let bits = u128::from_str_radix(&hex, 16).unwrap();
    assert_eq!((bits >> 76 & 0xf, bits >> 62 & 0b11), (7, 0b10), "not a UUIDv7: {op_id}");
    (bits >> 80) as u64
}

/// The start of the UTC day, in Unix ms.
fn day_start_ms() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    now - now % 86_400_000
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
    let day = day_start_ms();
    let bonus = php_grant(&hub_id, "credit", "daily").expect("the example's rule grants a daily bonus");
    assert_eq!((&bonus["data_type"], &bonus["delta"]), (&json!("balance"), &json!({ "coins": 10 })));
    let op_id = bonus["op_id"].as_str().unwrap();
    let dated = uuidv7_ms(op_id);
    assert!([day, day_start_ms()].contains(&dated), "{op_id} is not dated at the UTC day's start");
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
    // Another user's bonus of the day is another op, and theirs only.
    let theirs = php_as("9-other", &hub_id, &["credit", "daily"]).unwrap();
    let theirs: Value = serde_json::from_str(&theirs).unwrap();
    let their_op = theirs["op_id"].as_str().unwrap();
    assert_eq!(uuidv7_ms(their_op), dated);
    assert_ne!(their_op, op_id);
    assert_eq!(php_as("9-other", &hub_id, &["again", op_id]), None);
    assert_eq!(php_grant(&hub_id, "again", their_op), None);
    // Nor does it grant an op of the day's time with other bits.
    let made_up = format!("{}{}", &op_id[..24], "0".repeat(12));
    assert_eq!(php_grant(&hub_id, "again", &made_up), None);
    assert_eq!(php_grant(&hub_id, "credit", "jackpot"), None);
    hub.stop().await;
}
