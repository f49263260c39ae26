//! Expired tokens against the real hub over real HTTP: a token its site really issued for this
//! hub, past its expiry, is told `401 token_expired` — never `429`, however many anonymous
//! requests flood the page's address — and counts against its own user, never against the
//! address; so a page behind a busy address can always learn that it needs a fresh token, and
//! is served once it has one. A token past its expiry that is also forged, misdirected or
//! revoked is refused for that, and counts against the address.
//!
//! The page and the flood share one loopback address (127.0.0.x), as tabs behind one NAT do.

mod support;

use std::net::{IpAddr, Ipv4Addr};

use hub::auth::Claims;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use reqwest::StatusCode;
use serde_json::json;
use support::{SiteClient, TestHub, sample, site_secret};

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// Claims of a page's token of `SITE` for `user`, issued `age` seconds ago and expired
/// `expired` seconds ago (well past the hub's 30 s of leeway).
fn claims(user: &str, age: u64, expired: u64) -> Claims {
    let now = get_current_timestamp();
    Claims {
        iss: SITE.into(),
        sub: user.into(),
        aud: "test-hub".into(),
        exp: now - expired,
        iat: Some(now - age),
        nbf: None,
        adm: false,
        scope: None,
    }
}

fn signed(claims: &Claims, secret: &str) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

/// A page's token its site issued an hour ago, expired 50 minutes ago.
fn expired(user: &str) -> String {
    signed(&claims(user, 3600, 3000), &site_secret(SITE))
}

/// A page at the loopback address `from` presenting `token` (none when `None`).
fn page(hub: &TestHub, from: Ipv4Addr, user: &str, token: Option<String>) -> SiteClient {
    SiteClient {
        url: hub.url.clone(),
        client: reqwest::Client::builder().local_address(IpAddr::V4(from)).build().unwrap(),
        token,
        site: SITE.into(),
        user: user.into(),
    }
}

#[tokio::test]
async fn an_expired_token_is_told_token_expired_while_anonymous_requests_flood_its_address() {
    let hub = TestHub::start_with(|c| c.limits.unauthenticated_requests_per_minute = 5).await;
    let shared = Ipv4Addr::new(127, 0, 0, 2);
    let flood = page(&hub, shared, USER, None);
    let mut limited = 0;
    for _ in 0..50 {
        let reply = flood.timestamp("balance").await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            limited += 1;
        } else {
            reply.assert_refused(401, "missing_token");
        }
    }
    assert!(limited >= 45, "only {limited} of 50 anonymous requests were limited");
    flood.push("settings", json!({"theme": "dark"})).await.assert_refused(429, "rate_limited");

    // The page's token expired: its check and its write are told so, not 429.
    let stale = page(&hub, shared, USER, Some(expired(USER)));
    stale.timestamp("balance").await.assert_refused(401, "token_expired");
    stale.push("settings", json!({"theme": "light"})).await.assert_refused(401, "token_expired");
    // With a fresh token from its site, the page is served at once.
    let fresh = page(&hub, shared, USER, Some(hub.token(SITE, USER)));
    fresh.push("settings", json!({"theme": "light"})).await.assert_ok();
    fresh.timestamp("balance").await.assert_ok();
    // The flood is still refused.
    flood.timestamp("balance").await.assert_refused(429, "rate_limited");
    hub.stop().await;
}

#[tokio::test]
async fn an_expired_token_counts_against_its_user_and_never_against_its_address() {
    let hub = TestHub::start_with(|c| {
        c.limits.requests_per_minute = 3;
        c.limits.unauthenticated_requests_per_minute = 3;
    })
    .await;
    let from = Ipv4Addr::new(127, 0, 0, 3);
    let stale = page(&hub, from, USER, Some(expired(USER)));
    for _ in 0..3 {
        stale.timestamp("balance").await.assert_refused(401, "token_expired");
    }
    // The user's three requests a minute are used up: by the expired token, and so for the
    // user's fresh one too.
    stale.timestamp("balance").await.assert_refused(429, "rate_limited");
    page(&hub, from, USER, Some(hub.token(SITE, USER)))
        .timestamp("balance")
        .await
        .assert_refused(429, "rate_limited");
    // The address's three anonymous requests are all still there, and other users are served.
    let anonymous = page(&hub, from, USER, None);
    for _ in 0..3 {
        anonymous.timestamp("balance").await.assert_refused(401, "missing_token");
    }
    anonymous.timestamp("balance").await.assert_refused(429, "rate_limited");
    page(&hub, from, "13-alice", Some(hub.token(SITE, "13-alice"))).timestamp("balance").await.assert_ok();
    let text =
        support::client().get(format!("{}/metrics", hub.url)).send().await.unwrap().text().await.unwrap();
    assert_eq!(sample(&text, r#"hub_rate_limited_total{scope="user"}"#), Some(2.0), "{text}");
    assert_eq!(sample(&text, r#"hub_rate_limited_total{scope="address"}"#), Some(1.0), "{text}");
    hub.stop().await;
}

#[tokio::test]
async fn a_token_past_its_expiry_is_token_expired_only_if_its_site_issued_it_for_this_hub() {
    let now = get_current_timestamp();
    // Tokens of SITE issued before this are revoked.
    let revoked_before = time::OffsetDateTime::from_unix_timestamp((now - 1800) as i64)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let hub = TestHub::start_with(|c| {
        c.limits.unauthenticated_requests_per_minute = 1_000;
        c.sites[0].tokens_issued_after = Some(revoked_before);
    })
    .await;
    assert_eq!(hub.app.config().sites[0].id, SITE);
    let before = hub.snapshot();
    let from = Ipv4Addr::new(127, 0, 0, 4);
    let secret = site_secret(SITE);
    let mut other_hub = claims(USER, 600, 300);
    other_hub.aud = "another-hub".into();
    let mut other_site = claims(USER, 600, 300);
    other_site.iss = "unknown-site".into();
    let mut no_user = claims(USER, 600, 300);
    no_user.sub = "not a user id".into();
    let cases = [
        (
            "signed with another key",
            signed(&claims(USER, 600, 300), "a-guessed-secret-of-at-least-32-bytes!"),
            "invalid_token",
        ),
        ("for another hub", signed(&other_hub, &secret), "invalid_token"),
        ("of an unknown site", signed(&other_site, &secret), "invalid_token"),
        ("naming no user", signed(&no_user, &secret), "invalid_token"),
        (
            "issued before the site's tokens_issued_after",
            signed(&claims(USER, 3600, 300), &secret),
            "token_revoked",
        ),
        (
            "expired longer ago than its site's tokens live (an old token, leaked)",
            signed(&claims(USER, 600, 7200), &secret),
            "invalid_token",
        ),
        ("genuine", signed(&claims(USER, 600, 300), &secret), "token_expired"),
    ];
    for (case, token, code) in cases {
        let stale = page(&hub, from, USER, Some(token));
        let reply = stale.timestamp("balance").await;
        assert_eq!((reply.status.as_u16(), reply.code()), (401, code), "{case}: {}", reply.body);
        let reply = stale.delta("balance", 10, "stale-op").await;
        assert_eq!((reply.status.as_u16(), reply.code()), (401, code), "{case}: {}", reply.body);
    }
    assert_eq!(hub.snapshot(), before, "a token past its expiry wrote something");
    hub.stop().await;
}
