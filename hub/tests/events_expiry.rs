//! Streams the hub has ended but whose connections it cannot close yet: one dropped for
//! reading nothing still holds its user's slot until its connection goes, and one whose client
//! never reads is cut off from every change at its token's expiry.

mod support;

use std::time::Duration;

use jsonwebtoken::get_current_timestamp;
use serde_json::{Value, json};
use support::TestHub;
use support::events::{Next, RawStream, accepted, metric, open, stream_request};

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// Pushes settings of ~1 KiB, 32 at a time, until the hub drops a slow stream.
async fn write_until_a_stream_is_dropped(hub: &TestHub) {
    let faucet = hub.site(SITE, USER);
    let dropped = "hub_event_streams_ended_total{reason=\"slow\"}";
    let mut written = 0;
    while metric(&hub.url, dropped).await < 1.0 {
        assert!(written < 20_000, "{written} changes unread and the stream is still fed");
        let ops: Vec<Value> = (0..32)
            .map(|i| {
                let n = written + i;
                json!({"action": "push", "op_id": format!("op-{n}"), "data_type": "settings", "data": {"a": format!("{n:0>900}")}})
            })
            .collect();
        faucet
            .post(&json!({"action": "batch", "user_id": USER, "site_id": SITE, "ops": ops}))
            .await
            .assert_ok();
        written += 32;
    }
}

/// `max_streams_per_user` is "streams one user may hold". A stream the broker gave up as slow
/// still holds its connection, its queued frames and its place in `hub_event_streams` until
/// its client reads it or the connection's stall timeout closes it; meanwhile the user may
/// open more, past the cap.
#[tokio::test]
async fn a_slow_stream_still_open_counts_against_its_users_cap() {
    let hub = TestHub::start_with(|c| {
        c.limits.requests_per_minute = 1_000_000;
        c.events.max_streams_per_user = 1;
    })
    .await;
    let token = hub.token(SITE, USER);
    let (frozen, _) = RawStream::frozen(&hub, USER, &token).await;
    write_until_a_stream_is_dropped(&hub).await;
    // The frozen stream's connection is open, its frames queued for it, counted as open.
    assert_eq!(metric(&hub.url, "hub_event_streams").await, 1.0, "the frozen stream is still counted open");
    let second =
        open(stream_request(&support::events::stream_client(), &hub.url, USER, "", Some(&token))).await;
    let open_now = metric(&hub.url, "hub_event_streams").await;
    assert!(
        second.is_err(),
        "a second stream of a user capped at 1 was opened while the first is still held ({open_now} open)"
    );
    drop(frozen);
}

/// A stream ends when its token expires, whether or not its client reads: an HTTP/2 stream
/// its client never reads (window closed), beside another stream on the same connection that
/// stays active, is never polled, so its own timer never fires; the broker's heartbeat cuts it
/// off from every change at its expiry. (Its slot is held until its connection goes: nothing
/// reaches a body hyper does not poll.)
#[tokio::test]
async fn an_unread_http2_stream_beside_an_active_one_is_cut_off_at_its_tokens_expiry() {
    let hub = TestHub::start_with(|c| {
        c.limits.requests_per_minute = 1_000_000;
        c.events.heartbeat_secs = 1;
        c.limits.request_timeout_secs = 2;
        c.limits.idle_timeout_secs = 2;
        c.limits.body_timeout_secs = 1;
    })
    .await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .http2_adaptive_window(false)
        .http2_initial_stream_window_size(1024)
        .http2_initial_connection_window_size(1 << 20)
        .build()
        .unwrap();
    // The stream left unread: a token that expires in 4 s.
    let now = get_current_timestamp();
    let short = hub.app.sites().keys().unwrap().mint(SITE, USER, 4).unwrap();
    let mut unread =
        accepted(stream_request(&client, &hub.url, USER, "", Some(&short)), "the unread stream").await;
    assert_eq!(unread.version, reqwest::Version::HTTP_2);
    unread.ready().await;
    // Its window fills: a few changes of ~1 KiB its client never reads.
    let faucet = hub.site(SITE, USER);
    for n in 0..4 {
        faucet.push("settings", json!({"a": format!("{n:0>900}")})).await.assert_ok();
    }
    // Another stream on the same connection, read, with a long token.
    let long = hub.token(SITE, "13-alice");
    let mut active =
        accepted(stream_request(&client, &hub.url, "13-alice", "", Some(&long)), "the active stream").await;
    active.ready().await;
    assert_eq!(metric(&hub.url, "hub_event_streams").await, 2.0);
    // Reading the active stream only, until the hub has ended the unread one for its token.
    let expired = r#"hub_event_streams_ended_total{reason="expired"}"#;
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while metric(&hub.url, expired).await < 1.0 {
        assert!(tokio::time::Instant::now() < until, "the unread stream was not ended at its token's expiry");
        match active.next_within(Duration::from_millis(500)).await {
            Next::Frame(_) | Next::Quiet => {}
            other => panic!("the active stream: {other:?}"),
        }
    }
    assert!(get_current_timestamp() >= now + 4, "ended before its token expired");
    assert_eq!(metric(&hub.url, expired).await, 1.0, "only the short token's stream expired");
}
