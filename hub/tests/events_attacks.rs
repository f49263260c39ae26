//! Reviewer's attacks on `/api/events` (issue 20) that the hub withstands: guards.

mod support;

use hub::auth::Claims;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use reqwest::Method;
use serde_json::json;
use support::events::{accepted, changes, open, resume, stream_client, stream_request, wait_for_metric};
use support::{TestHub, site_secret};

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";
const VICTIM: &str = "13-alice";

/// A `Last-Event-ID` taken from another user's stream, or made up, resumes the caller's own
/// changes only, or tells it to resync; never a 5xx, never another user's change.
#[tokio::test]
async fn a_crafted_last_event_id_yields_only_the_callers_own_changes() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 10_000).await;
    let victim_token = hub.token(SITE, VICTIM);
    let mut victims =
        accepted(stream_request(&stream_client(), &hub.url, VICTIM, "", Some(&victim_token)), "victim").await;
    let ready = victims.ready().await;
    let first = ready.id().to_owned();
    let epoch = support::events::epoch_of(&first).to_owned();
    for n in 0..5 {
        hub.site(SITE, VICTIM)
            .push("profile", json!({"display_name": format!("secret {n}")}))
            .await
            .assert_ok();
    }
    let own = hub.site(SITE, USER).push("settings", json!({"mine": 1})).await.assert_ok().clone();
    let token = hub.token(SITE, USER);
    let ids = [
        first.clone(),
        format!("{epoch}.0.0"),
        format!("{epoch}.18446744073709551615.18446744073709551615"),
        format!("{epoch}.99999999999999999999999.1"),
        format!("{epoch}.-1.-1"),
        format!("{epoch}..."),
        "x".repeat(8000),
        ".".repeat(500),
        format!(" {first} "),
    ];
    for id in ids {
        let (_stream, between, ready) = resume(&hub.url, &token, USER, &id).await;
        assert_eq!(ready.kind(), "ready");
        for frame in &between {
            if frame.kind() == "resync" {
                continue;
            }
            assert!(frame.is_change(), "{id:.40}: {frame:?}");
            let event = frame.json();
            assert_eq!(event["data_type"], "settings", "{id:.40}: another user's change: {event}");
            assert_eq!(event["version"], own["version"], "{id:.40}: {event}");
        }
        if id == first {
            assert_eq!(changes(&between).len(), 1, "{between:?}");
        }
    }
}

/// HEAD of the stream (routed to the GET handler) leaves no stream held at the hub.
#[tokio::test]
async fn a_head_request_holds_no_stream() {
    let hub = TestHub::start_with(|c| c.events.max_streams_per_user = 1).await;
    let token = hub.token(SITE, USER);
    for _ in 0..3 {
        let answer = hub
            .request(Method::HEAD, &format!("/api/events?user_id={USER}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert!(answer.status().as_u16() < 500, "{}", answer.status());
    }
    wait_for_metric(&hub.url, "hub_event_streams", "HEAD streams gone", |v| v == 0.0).await;
    let mut stream =
        accepted(stream_request(&stream_client(), &hub.url, USER, "", Some(&token)), "a GET after HEADs")
            .await;
    stream.ready().await;
}

/// A token expired but within the leeway opens a stream that ends with `reauth` before any
/// change: it is not a way to listen past `exp`.
#[tokio::test]
async fn a_token_within_its_leeway_gets_reauth_at_once() {
    let hub = TestHub::start().await;
    let now = get_current_timestamp();
    let claims = Claims {
        iss: SITE.into(),
        sub: USER.into(),
        aud: "test-hub".into(),
        exp: now - 5,
        iat: Some(now - 60),
        nbf: None,
        adm: false,
        scope: None,
    };
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(site_secret(SITE).as_bytes()),
    )
    .unwrap();
    match open(stream_request(&stream_client(), &hub.url, USER, "", Some(&token))).await {
        Err(reply) => reply.assert_refused(401, "token_expired"),
        Ok(mut stream) => {
            let frames = stream.end_within(std::time::Duration::from_secs(5), "a stream past exp").await;
            assert!(frames.iter().all(|f| !f.is_change()), "{frames:?}");
            assert_eq!(frames.last().map(|f| f.kind()), Some("reauth"), "{frames:?}");
        }
    }
    wait_for_metric(&hub.url, "hub_event_streams", "the expired stream gone", |v| v == 0.0).await;
}
