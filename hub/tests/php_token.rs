//! The PHP endpoint of the deployment guide (`docs/examples/sync-token.php`) mints tokens and
//! grants the real hub accepts: run from the command line with a test site's secret, it
//! prints a token that reads the user's versions, and a grant with which that page's token
//! credits the example's daily bonus once; either with a tampered signature is refused, and
//! so is the grant for an amount the page changed. The bonus's op id is a UUIDv7 dated at the
//! start of its UTC day, the user's own, so that the hub can date it. Its EdDSA variant
//! (`docs/examples/sync-token-eddsa.php`), with a key pair made by openssl as the guide says,
//! mints tokens and grants that a hub holding only the public key accepts, and that a hub
//! holding another key, or none of the site's HS256 kind, refuses.

mod support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
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
    run_php(&Endpoint::Hs256, user, hub_id, args)
}

/// One of the documented endpoints, with the key it signs with.
enum Endpoint<'a> {
    /// `sync-token.php`, with `SITE`'s test secret.
    Hs256,
    /// `sync-token-eddsa.php`, with the Ed25519 private key of this PEM file.
    EdDsa(&'a Path),
}

/// What `php docs/examples/<endpoint> user ARGS…` prints, as [`php`].
fn run_php(endpoint: &Endpoint<'_>, user: &str, hub_id: &str, args: &[&str]) -> Option<String> {
    let (file, setting, key) = match endpoint {
        Endpoint::Hs256 => ("sync-token.php", "SYNC_SECRET", OsString::from(site_secret(SITE))),
        Endpoint::EdDsa(pem) => ("sync-token-eddsa.php", "SYNC_PRIVATE_KEY_FILE", pem.as_os_str().to_owned()),
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples").join(file);
    let output = Command::new("php")
        .arg(&script)
        .arg(user)
        .args(args)
        .env("SYNC_SITE_ID", SITE)
        .env("SYNC_HUB_ID", hub_id)
        .env(setting, key)
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

/// PHP's sodium extension, which the EdDSA endpoint signs with.
fn assert_php_has_sodium() {
    let modules = Command::new("php").arg("-m").output().unwrap_or_else(|e| {
        panic!("cannot run `php` ({e}): install the Debian package php-cli (`apt-get install php-cli`)")
    });
    assert!(
        String::from_utf8_lossy(&modules.stdout).lines().any(|module| module.trim() == "sodium"),
        "PHP's sodium extension is missing (`php -m` does not list it): install the Debian package \
         php-cli, whose PHP has it built in"
    );
}

/// An Ed25519 key pair made as docs/deployment.md makes one: the private key's PEM file, and
/// the public key's PEM text for the hub's `public_key_pem`.
fn openssl_ed25519_pair(dir: &Path, name: &str) -> (PathBuf, String) {
    let (private, public) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.pub.pem")));
    let openssl = |args: &[&std::ffi::OsStr]| {
        let status = Command::new("openssl").args(args).status().unwrap_or_else(|e| {
            panic!(
                "cannot run `openssl` ({e}): install the Debian package openssl (`apt-get install openssl`)"
            )
        });
        assert!(status.success(), "openssl {args:?} failed ({status})");
    };
    openssl(&[
        "genpkey".as_ref(),
        "-algorithm".as_ref(),
        "ed25519".as_ref(),
        "-out".as_ref(),
        private.as_ref(),
    ]);
    openssl(&[
        "pkey".as_ref(),
        "-in".as_ref(),
        private.as_ref(),
        "-pubout".as_ref(),
        "-out".as_ref(),
        public.as_ref(),
    ]);
    (private, std::fs::read_to_string(public).unwrap())
}

/// A hub whose site `SITE` has only the public key `public_pem`.
async fn hub_with_public_key(public_pem: &str) -> TestHub {
    TestHub::start_with(|config| {
        let site = config.sites.iter_mut().find(|site| site.id == SITE).unwrap();
        site.secret = None;
        site.public_key_pem = Some(public_pem.to_owned());
    })
    .await
}

/// The `alg` a JWT's header names.
fn alg(jwt: &str) -> String {
    use base64::Engine;
    let header =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwt.split('.').next().unwrap()).unwrap();
    serde_json::from_slice::<Value>(&header).unwrap()["alg"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_hub_accepts_the_eddsa_php_token_and_grant_with_the_sites_public_key_alone() {
    assert_php_has_sodium();
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = openssl_ed25519_pair(keys.path(), "roflfaucet");
    let hub = hub_with_public_key(&public).await;
    let hub_id = hub.app.config().hub_id.clone();
    let eddsa = Endpoint::EdDsa(&private);

    let token = run_php(&eddsa, USER, &hub_id, &[]).expect("a token");
    assert_eq!(alg(&token), "EdDSA");
    let page = page(&hub, token.clone());
    assert_eq!(page.timestamp("balance").await.assert_ok()["version"], 0);
    self::page(&hub, tampered(&token)).timestamp("balance").await.assert_refused(401, "invalid_token");

    let day = day_start_ms();
    let bonus: Value =
        serde_json::from_str(&run_php(&eddsa, USER, &hub_id, &["credit", "daily"]).unwrap()).unwrap();
    let (op_id, grant) = (bonus["op_id"].as_str().unwrap(), bonus["grant"].as_str().unwrap());
    assert_eq!(alg(grant), "EdDSA");
    assert!([day, day_start_ms()].contains(&uuidv7_ms(op_id)), "{op_id} is not dated at the UTC day's start");
    let before = hub.snapshot();
    page.delta_with_grant("balance", 10, op_id, &tampered(grant)).await.assert_refused(403, "grant_invalid");
    page.delta_with_grant("balance", 1000, op_id, grant).await.assert_refused(403, "grant_invalid");
    assert_eq!(hub.snapshot(), before);
    page.delta_with_grant("balance", 10, op_id, grant).await.assert_ok();
    let again: Value =
        serde_json::from_str(&run_php(&eddsa, USER, &hub_id, &["again", op_id]).unwrap()).unwrap();
    assert_eq!(again["op_id"], bonus["op_id"], "the endpoint names the day's bonus alike every time");
    let replayed = page.delta_with_grant("balance", 10, op_id, again["grant"].as_str().unwrap()).await;
    assert_eq!(replayed.assert_ok()["replayed"], true);
    assert_eq!(page.coins().await, 10);
    hub.stop().await;
}

#[tokio::test]
async fn a_hub_refuses_eddsa_php_tokens_and_grants_signed_with_another_key() {
    assert_php_has_sodium();
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = openssl_ed25519_pair(keys.path(), "roflfaucet");
    let (other, _) = openssl_ed25519_pair(keys.path(), "someone-else");
    let hub = hub_with_public_key(&public).await;
    let hub_id = hub.app.config().hub_id.clone();
    let before = hub.snapshot();

    let forged = Endpoint::EdDsa(&other);
    let token = run_php(&forged, USER, &hub_id, &[]).unwrap();
    page(&hub, token).timestamp("balance").await.assert_refused(401, "invalid_token");
    // The HS256 endpoint signs with a secret this hub does not hold for the site.
    page(&hub, php_token(&hub_id)).timestamp("balance").await.assert_refused(401, "invalid_token");

    let page = page(&hub, run_php(&Endpoint::EdDsa(&private), USER, &hub_id, &[]).unwrap());
    let bonus: Value =
        serde_json::from_str(&run_php(&forged, USER, &hub_id, &["credit", "daily"]).unwrap()).unwrap();
    let (op_id, grant) = (bonus["op_id"].as_str().unwrap(), bonus["grant"].as_str().unwrap());
    page.delta_with_grant("balance", 10, op_id, grant).await.assert_refused(403, "grant_invalid");
    assert_eq!(hub.snapshot(), before);
    hub.stop().await;
}

/// The part of `text` from the line starting with `from` up to the one starting with `to` (or
/// the end), which must be there.
fn section<'a>(text: &'a str, from: &str, to: Option<&str>, file: &str) -> &'a str {
    let start = text.find(&format!("\n{from}")).unwrap_or_else(|| panic!("{file} has no line {from:?}"));
    let rest = &text[start..];
    match to {
        Some(to) => {
            &rest[..rest.find(&format!("\n{to}")).unwrap_or_else(|| panic!("{file} has no line {to:?}"))]
        }
        None => rest,
    }
}

/// The two endpoints are one file each, for a site owner to copy whole, and differ only in how
/// they sign: the site's rule and the answers to the page are the same text in both, so that
/// a change to one that the other lacks fails here.
#[test]
fn the_eddsa_endpoint_decides_and_answers_as_the_hs256_one_does() {
    let read = |name: &str| {
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples").join(name))
            .unwrap()
    };
    let (hs256, eddsa) = (read("sync-token.php"), read("sync-token-eddsa.php"));
    for (from, to) in [("function site_credit(", Some("function sync_setting(")), ("session_start();", None)]
    {
        assert_eq!(
            section(&eddsa, from, to, "sync-token-eddsa.php"),
            section(&hs256, from, to, "sync-token.php"),
            "the endpoints differ from {from:?}"
        );
    }
}
