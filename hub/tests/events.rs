//! The hub's realtime events (`GET /api/events`) over real HTTP: each acknowledged change of a
//! user reaches that user's open streams once, in commit order, and nothing else does (not a
//! refused or replayed write, not another user's change, not a type the stream did not ask
//! for); a reconnect with `Last-Event-ID` gets exactly what it missed, or `resync` when the hub
//! cannot know; streams are refused as the sync API refuses (no token, an expired, tampered or
//! borrowed token, a grant, a token in the URL), capped per user and per address, counted in
//! `/metrics`, kept open by heartbeats past the idle timeout, ended at their token's expiry, at
//! the hub's stop and when their reader falls behind; CORS and HTTP/2 as for the sync API.
//! nginx in front: `events_proxy.rs`.

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::future::join_all;
use hub::auth::Claims;
use hub::config::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use reqwest::{Method, Version};
use serde_json::{Value, json};
use support::events::{
    EventStream, Frame, Next, RawStream, WAIT, accepted, assert_change, changes, epoch_of, metric, open,
    position, resume, stream_client, stream_request,
};
use support::{Deployment, Reply, TestHub, site_secret};

const SITE: &str = "roflfaucet";
const OTHER_SITE: &str = "clickforcharity";
const ORIGIN: &str = "https://roflfaucet.com";
const USER: &str = "8-evans";
const VICTIM: &str = "13-alice";

/// `user`'s stream, opened by a page of `site` with its page token.
async fn listen_as(hub: &TestHub, site: &str, user: &str, extra: &str) -> EventStream {
    let token = hub.token(site, user);
    accepted(stream_request(&stream_client(), &hub.url, user, extra, Some(&token)), "a page's stream").await
}

/// `user`'s stream, opened by a page of the faucet, read up to its `ready` event.
async fn listen(hub: &TestHub, user: &str) -> EventStream {
    let mut stream = listen_as(hub, SITE, user, "").await;
    stream.ready().await;
    stream
}

/// A page's token for `user` of [`SITE`], expiring `exp` (seconds since the epoch).
fn token_expiring(user: &str, iat: u64, exp: u64) -> String {
    let claims = Claims {
        iss: SITE.into(),
        sub: user.into(),
        aud: "test-hub".into(),
        exp,
        iat: Some(iat),
        nbf: None,
        adm: false,
        scope: None,
    };
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(site_secret(SITE).as_bytes()))
        .unwrap()
}

#[tokio::test]
async fn a_write_reaches_the_users_open_stream_once_acknowledged_and_nothing_else_does() {
    let hub = TestHub::start_with(|c| c.events.retry_ms = 1500).await;
    let faucet = hub.site(SITE, USER);
    let epoch = faucet.timestamp("balance").await.assert_ok()["epoch"].clone();

    let mut stream = listen_as(&hub, SITE, USER, "").await;
    assert!(
        stream.header("content-type").is_some_and(|t| t.starts_with("text/event-stream")),
        "{:?}",
        stream.headers
    );
    assert_eq!(stream.header("cache-control"), Some("no-store"));
    assert_eq!(stream.header("x-accel-buffering"), Some("no"));
    let retry = stream.event("the retry hint").await;
    assert_eq!(retry.retry, Some(1500), "the first frame is the configured retry hint: {retry:?}");
    let ready = stream.event("the ready event").await;
    assert_eq!(ready.kind(), "ready", "{ready:?}");
    assert!(!ready.id().is_empty(), "{ready:?}");
    assert_eq!(ready.json(), json!({"epoch": epoch, "resumed": false}));

    let credit = faucet.delta("balance", 10, "credit-1").await.assert_ok().clone();
    let frame = stream.event("the credit's event").await;
    assert!(frame.is_change(), "{frame:?}");
    assert_ne!(frame.id(), ready.id());
    assert_eq!(epoch_of(frame.id()), epoch.as_str().unwrap());
    let event = frame.json();
    assert_change(&event, "balance", &credit);
    assert_eq!(event["data"], json!({"coins": 10}));

    let named = faucet.push("profile", json!({"display_name": "Evans"})).await.assert_ok().clone();
    // Writes that change nothing: refused for the record's state, refused as bad input, an
    // op sent again, a merge patch that leaves the record as it is.
    faucet.delta("balance", -1000, "overdraw").await.assert_refused(409, "insufficient_funds");
    faucet
        .push("profile", json!({"website": "javascript:alert(1)"}))
        .await
        .assert_refused(400, "invalid_url");
    assert_eq!(faucet.delta("balance", 10, "credit-1").await.assert_ok()["replayed"], true);
    let same = faucet.push("profile", json!({"display_name": "Evans"})).await.assert_ok().clone();
    assert_eq!(same["version"], named["version"], "a patch that changes nothing is no new version");
    let sentinel = faucet.push("settings", json!({"theme": "dark"})).await.assert_ok().clone();

    let event = stream.change("the profile's event").await;
    assert_change(&event, "profile", &named);
    assert_eq!(event["data"]["display_name"], "Evans");
    let event = stream.change("the settings' event, right after the profile's").await;
    assert_change(&event, "settings", &sentinel);
    assert_eq!(event["data"], json!({"theme": "dark"}));

    assert!(metric(&hub.url, "hub_events_sent_total").await >= 3.0);
}

#[tokio::test]
async fn events_arrive_in_commit_order() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 10_000).await;
    let mut stream = listen(&hub, USER).await;
    let faucet = hub.site(SITE, USER);
    // Forty writes at once, twenty to each of two records.
    let writes = (0..40).map(|i| {
        let faucet = faucet.clone();
        async move {
            let data_type = if i % 2 == 0 { "balance" } else { "points" };
            let reply = faucet.delta(data_type, 1, &format!("op-{i}")).await;
            (data_type, reply.assert_ok().clone())
        }
    });
    let mut answers: BTreeMap<(&str, u64), Value> = BTreeMap::new();
    for (data_type, answer) in join_all(writes).await {
        answers.insert((data_type, answer["version"].as_u64().unwrap()), answer);
    }
    assert_eq!(answers.len(), 40);

    let mut next_version: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_position = (0, 0);
    for i in 0..40 {
        let frame = stream.event(&format!("event {i} of 40")).await;
        assert!(frame.is_change(), "{frame:?}");
        let at = position(frame.id());
        assert!(at > last_position, "event ids go back: {at:?} after {last_position:?}");
        last_position = at;
        let event = frame.json();
        let data_type = event["data_type"].as_str().unwrap().to_owned();
        let expected = next_version.entry(data_type.clone()).or_insert(1);
        assert_eq!(event["version"], *expected, "{data_type}'s versions out of order: {event}");
        let answer = &answers[&(if data_type == "balance" { "balance" } else { "points" }, *expected)];
        assert_change(&event, &data_type, answer);
        *expected += 1;
    }
    assert_eq!(next_version, BTreeMap::from([("balance".into(), 21), ("points".into(), 21)]));
}

#[tokio::test]
async fn a_stream_asking_for_some_types_gets_only_those() {
    let hub = TestHub::start().await;
    let mut stream = listen_as(&hub, SITE, USER, "&data_type=balance,profile").await;
    stream.ready().await;
    let faucet = hub.site(SITE, USER);
    faucet.delta("points", 5, "points-1").await.assert_ok();
    let balance = faucet.delta("balance", 5, "balance-1").await.assert_ok().clone();
    faucet.push("settings", json!({"theme": "dark"})).await.assert_ok();
    faucet.push("roles", json!({"site_roles": {SITE: ["player"]}})).await.assert_ok();
    let profile = faucet.push("profile", json!({"bio": "hi"})).await.assert_ok().clone();
    faucet.delta("points", 5, "points-2").await.assert_ok();
    let again = faucet.delta("balance", 5, "balance-2").await.assert_ok().clone();

    assert_change(&stream.change("the balance's event").await, "balance", &balance);
    assert_change(&stream.change("the profile's event").await, "profile", &profile);
    assert_change(&stream.change("the second balance event").await, "balance", &again);

    // A filter naming no data type, or a user id that is none, is refused.
    let token = hub.token(SITE, USER);
    for (user, extra, case) in [
        (USER, "&data_type=coins", "an unknown data type"),
        (USER, "&data_type=balance,coins", "a list with an unknown data type"),
        ("8 evans", "", "a user id with a space"),
    ] {
        let user = user.replace(' ', "%20");
        let refused = open(stream_request(&stream_client(), &hub.url, &user, extra, Some(&token))).await;
        let reply = refused.err().unwrap_or_else(|| panic!("{case}: a stream was opened"));
        assert_eq!(reply.status, 400, "{case}: {}", reply.body);
    }
}

#[tokio::test]
async fn a_large_record_arrives_without_its_data() {
    let hub = TestHub::start().await;
    let mut stream = listen(&hub, USER).await;
    let faucet = hub.site(SITE, USER);
    let value = |c: char| c.to_string().repeat(900);
    // Two values of 900 characters: under 2 KiB as JSON, sent whole.
    let small = faucet.push("settings", json!({"a": value('a'), "b": value('b')})).await.assert_ok().clone();
    // Four: near the 4 KiB settings limit, sent as its version alone.
    let large = faucet.push("settings", json!({"c": value('c'), "d": value('d')})).await.assert_ok().clone();

    let event = stream.change("the small settings' event").await;
    assert_change(&event, "settings", &small);
    assert_eq!(event["data"], json!({"a": value('a'), "b": value('b')}));
    let event = stream.change("the large settings' event").await;
    assert_change(&event, "settings", &large);
    assert!(event.get("data").is_none(), "a record of nearly 4 KiB came with its data");
    let record = faucet.get("settings").await;
    assert_eq!(
        record.assert_ok()["version"],
        event["version"],
        "the get that follows has what the event named"
    );
}
#[tokio::test]
async fn a_reconnect_with_last_event_id_gets_exactly_what_it_missed() {
    let hub = TestHub::start().await;
    let faucet = hub.site(SITE, USER);
    let token = hub.token(SITE, USER);
    let mut stream = listen_as(&hub, SITE, USER, "").await;
    let at_start = stream.ready().await;
    let first = faucet.delta("balance", 10, "credit-1").await.assert_ok().clone();
    let seen = stream.event("the first change").await;
    assert_change(&seen.json(), "balance", &first);
    drop(stream);

    let missed = [
        ("balance", faucet.delta("balance", -3, "spend-1").await.assert_ok().clone()),
        ("profile", faucet.push("profile", json!({"bio": "away"})).await.assert_ok().clone()),
        ("balance", faucet.delta("balance", 5, "credit-2").await.assert_ok().clone()),
    ];
    let (mut stream, between, ready) = resume(&hub.url, &token, USER, seen.id()).await;
    assert_eq!(between.len(), 3, "the three missed changes and nothing else: {between:?}");
    for (frame, (data_type, answer)) in between.iter().zip(&missed) {
        assert!(frame.is_change(), "{frame:?}");
        assert_change(&frame.json(), data_type, answer);
    }
    assert_eq!(ready.json()["resumed"], true, "{ready:?}");
    // Live again, and nothing sent twice: the next event is the next write's.
    let after = faucet.push("settings", json!({"theme": "dark"})).await.assert_ok().clone();
    let last = stream.event("the change after the resume").await;
    assert_change(&last.json(), "settings", &after);
    drop(stream);

    // From the first stream's start: every change since, in order.
    let (_stream, between, ready) = resume(&hub.url, &token, USER, at_start.id()).await;
    let expected = [("balance", 1), ("balance", 2), ("profile", 1), ("balance", 3), ("settings", 1)];
    assert_eq!(changes(&between), expected.map(|(t, v)| (t.to_owned(), v)));
    assert_eq!(ready.json()["resumed"], true, "{ready:?}");
    // From the last change: nothing missed.
    let (_stream, between, ready) = resume(&hub.url, &token, USER, last.id()).await;
    assert!(between.is_empty(), "{between:?}");
    assert_eq!(ready.json()["resumed"], true, "{ready:?}");
}

#[tokio::test]
async fn a_last_event_id_the_hub_cannot_resume_from_gets_resync() {
    let hub = TestHub::start().await;
    let other_epoch =
        TestHub::start().await.site(SITE, USER).timestamp("balance").await.body["epoch"].clone();
    let faucet = hub.site(SITE, USER);
    let token = hub.token(SITE, USER);
    let mut stream = listen(&hub, USER).await;
    faucet.delta("balance", 10, "credit-1").await.assert_ok();
    let seen = stream.event("a change").await;
    drop(stream);
    let epoch = epoch_of(seen.id()).to_owned();
    let (era, seq) = position(seen.id());
    let resyncs = metric(&hub.url, "hub_event_resyncs_total").await;

    let cases = [
        ("an id of another database", format!("{}.{era}.{seq}", other_epoch.as_str().unwrap())),
        ("garbage", "garbage".to_owned()),
        ("an id without its epoch", format!("{era}.{seq}")),
        ("a negative position", format!("{epoch}.{era}.-1")),
        ("a position too large for its numbers", format!("{epoch}.{era}.99999999999999999999999")),
    ];
    let mut wrong = Vec::new();
    for (case, id) in &cases {
        let (_stream, between, ready) = resume(&hub.url, &token, USER, id).await;
        let resync = between.first().filter(|f| f.kind() == "resync" && f.id.is_some());
        if between.len() != 1 || resync.is_none_or(|r| r.json() != json!({"epoch": epoch})) {
            wrong.push(format!("{case} ({id}): {between:?} before ready, not one resync"));
        }
        assert_eq!(ready.json()["epoch"], json!(epoch), "{case}");
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let counted = metric(&hub.url, "hub_event_resyncs_total").await - resyncs;
    assert_eq!(counted, cases.len() as f64, "hub_event_resyncs_total");
}

#[tokio::test]
async fn an_id_older_than_the_resume_window_gets_resync() {
    let hub = TestHub::start_with(|c| c.events.resume_window = 4).await;
    let faucet = hub.site(SITE, USER);
    let token = hub.token(SITE, USER);
    let mut stream = listen_as(&hub, SITE, USER, "").await;
    let old = stream.ready().await;
    drop(stream);
    for i in 0..10 {
        faucet.delta("balance", 1, &format!("op-{i}")).await.assert_ok();
    }
    let (_stream, between, ready) = resume(&hub.url, &token, USER, old.id()).await;
    assert_eq!(between.first().map(Frame::kind), Some("resync"), "resync before any change: {between:?}");
    assert_eq!(ready.json()["epoch"], between[0].json()["epoch"]);

    // Within the window, the missed changes themselves.
    let recent = ready;
    for i in 10..13 {
        faucet.delta("balance", 1, &format!("op-{i}")).await.assert_ok();
    }
    let (_stream, between, _ready) = resume(&hub.url, &token, USER, recent.id()).await;
    assert_eq!(changes(&between), [11, 12, 13].map(|v| ("balance".to_owned(), v)));
}

#[tokio::test]
async fn an_id_from_before_a_restart_gets_resync() {
    let deployment = Deployment::new(|_| {});
    let mut hub = deployment.start().await;
    let token = deployment.token(SITE, USER);
    let writer = deployment.backend(SITE, USER, WAIT);
    let request = || stream_request(&stream_client(), &deployment.url(), USER, "", Some(&token));
    let mut stream = accepted(request(), "a stream before the restart").await;
    let before = stream.ready().await;
    let written = writer.delta("balance", 10, "credit-1").await.assert_ok().clone();
    let seen = stream.event("the change before the restart").await;
    assert_change(&seen.json(), "balance", &written);
    hub.kill().await.unwrap();
    drop(stream);

    let _hub = deployment.start().await;
    // A change while the page is away: the timestamp check after the resync finds it.
    writer.push("profile", json!({"bio": "back"})).await.assert_ok();
    let mut stream =
        accepted(request().header("Last-Event-ID", seen.id()), "a stream after the restart").await;
    let (between, ready) = stream.opening().await;
    assert_eq!(between.first().map(Frame::kind), Some("resync"), "resync before any change: {between:?}");
    let epoch = before.json()["epoch"].clone();
    assert_eq!(between[0].json(), json!({"epoch": epoch}), "the same database, another boot");
    assert_eq!(ready.json()["epoch"], epoch);
    let after = writer.delta("balance", 5, "credit-2").await.assert_ok().clone();
    assert_change(&stream.change("the change after the restart").await, "balance", &after);
}

#[tokio::test]
async fn streams_are_refused_as_the_sync_api_refuses() {
    let hub = TestHub::start_with(|c| c.limits.unauthenticated_requests_per_minute = 10_000).await;
    let now = get_current_timestamp();
    let genuine = hub.token(SITE, USER);
    let parts: Vec<&str> = genuine.split('.').collect();
    let victims_claims = json!({"iss": SITE, "sub": VICTIM, "aud": "test-hub", "exp": now + 600, "iat": now});
    let payload =
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, victims_claims.to_string());
    let mut signature = parts[2].to_owned();
    signature.replace_range(..1, if signature.starts_with('A') { "B" } else { "A" });
    let grant = hub.grant(SITE, USER, "credit-1", "balance", json!({"coins": 10}));

    let cases: [(&str, &str, Option<String>, u16, &str); 8] = [
        ("no token", USER, None, 401, "missing_token"),
        ("an expired token", USER, Some(token_expiring(USER, now - 3600, now - 3000)), 401, "token_expired"),
        (
            "a token whose subject was changed",
            VICTIM,
            Some(format!("{}.{payload}.{}", parts[0], parts[2])),
            401,
            "invalid_token",
        ),
        (
            "a token whose signature was changed",
            USER,
            Some(format!("{}.{}.{signature}", parts[0], parts[1])),
            401,
            "invalid_token",
        ),
        ("garbage", USER, Some("not-a-token".into()), 401, "invalid_token"),
        ("a grant as the token", USER, Some(grant), 401, "invalid_token"),
        ("another user's token", VICTIM, Some(genuine.clone()), 403, "wrong_user"),
        ("another user's admin token", VICTIM, Some(hub.admin_token(SITE, USER)), 403, "wrong_user"),
    ];
    for (case, user, token, status, code) in cases {
        let refused = open(stream_request(&stream_client(), &hub.url, user, "", token.as_deref())).await;
        let reply = refused.err().unwrap_or_else(|| panic!("{case}: the stream was opened"));
        reply.assert_refused(status, code);
        let mut sync = hub.page(SITE, user);
        sync.token = token;
        let answer = sync.timestamp("balance").await;
        assert_eq!(
            (answer.status, answer.code()),
            (reply.status, reply.code()),
            "{case}: the sync API answers otherwise"
        );
    }
    // The token travels in the header only: never in the URL.
    for param in ["token", "access_token"] {
        let request = stream_client().get(format!("{}/api/events?user_id={USER}&{param}={genuine}", hub.url));
        let refused = open(request).await.err().unwrap_or_else(|| panic!("?{param}= opened a stream"));
        refused.assert_refused(401, "missing_token");
    }
}

#[tokio::test]
async fn no_event_of_one_user_reaches_another_users_stream() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 10_000).await;
    let mut streams = Vec::new();
    for (site, user) in [(SITE, USER), (OTHER_SITE, USER), (SITE, VICTIM)] {
        let mut stream = listen_as(&hub, site, user, "").await;
        stream.ready().await;
        streams.push((user, stream));
    }
    // Both users write at once: credits of their own size, profiles of their own name.
    let writes = [USER, VICTIM].into_iter().flat_map(|user| {
        let writer = hub.site(SITE, user);
        let amount = if user == USER { 1 } else { 1000 };
        (0..15).map(move |i| {
            let writer = writer.clone();
            async move {
                let (data_type, reply) = if i % 3 == 2 {
                    ("profile", writer.push("profile", json!({"display_name": format!("{user} {i}")})).await)
                } else {
                    ("balance", writer.delta("balance", amount, &format!("{user}-{i}")).await)
                };
                (user, data_type, reply.assert_ok().clone())
            }
        })
    });
    let mut answers: BTreeMap<&str, BTreeMap<(&str, u64), Value>> = BTreeMap::new();
    for (user, data_type, answer) in join_all(writes).await {
        answers.entry(user).or_default().insert((data_type, answer["version"].as_u64().unwrap()), answer);
    }

    for (user, stream) in &mut streams {
        let mut expected = answers[user].clone();
        while !expected.is_empty() {
            let frame = stream.event(&format!("{user}'s changes ({} to come)", expected.len())).await;
            assert!(frame.is_change(), "{user}'s stream: {frame:?}");
            let event = frame.json();
            let data_type = if event["data_type"] == "balance" { "balance" } else { "profile" };
            let key = (data_type, event["version"].as_u64().unwrap());
            let answer = expected
                .remove(&key)
                .unwrap_or_else(|| panic!("{user}'s stream got an event of no write of {user}'s: {event}"));
            assert_change(&event, data_type, &answer);
            if data_type == "profile" {
                let name = event["data"]["display_name"].as_str().unwrap();
                assert!(name.starts_with(&format!("{user} ")), "{user}'s stream got {event}");
            }
        }
    }
    // Every write of both is committed: anything of the other user's would come before each
    // user's last word.
    let mut last_words = BTreeMap::new();
    for user in [USER, VICTIM] {
        let answer = hub.site(SITE, user).push("settings", json!({"last": user})).await.assert_ok().clone();
        last_words.insert(user, answer);
    }
    for (user, stream) in &mut streams {
        let event = stream.change(&format!("{user}'s last word")).await;
        assert_change(&event, "settings", &last_words[user]);
        assert_eq!(event["data"], json!({"last": user}));
    }
}

#[tokio::test]
async fn a_stream_ends_with_reauth_when_its_token_expires() {
    let hub = TestHub::start_with(|c| c.events.heartbeat_secs = 1).await;
    let now = get_current_timestamp();
    let token = token_expiring(USER, now, now + 2);
    let request = stream_request(&stream_client(), &hub.url, USER, "", Some(&token));
    let mut stream = accepted(request, "a stream whose token expires in two seconds").await;
    stream.ready().await;
    let frames = stream.end_within(Duration::from_secs(15), "a stream whose token expired").await;
    let last = frames.last().unwrap_or_else(|| panic!("the stream ended without reauth"));
    assert_eq!(last.kind(), "reauth", "the stream's last frame: {frames:?}");
    assert!(frames.iter().rev().skip(1).all(Frame::is_heartbeat), "{frames:?}");
    support::events::wait_for_metric(
        &hub.url,
        "hub_event_streams_ended_total{reason=\"expired\"}",
        "the expiry counted",
        |v| v >= 1.0,
    )
    .await;
}

/// The hub's 429 for a stream beyond a cap.
#[track_caller]
fn assert_too_many_streams(reply: &Reply) {
    reply.assert_refused(429, "too_many_streams");
    let retry_after =
        reply.header("retry-after").unwrap_or_else(|| panic!("no Retry-After: {:?}", reply.headers));
    assert!(retry_after.parse::<u64>().is_ok_and(|s| s >= 1), "Retry-After: {retry_after}");
}

#[tokio::test]
async fn a_users_streams_beyond_the_cap_are_refused_until_one_closes() {
    let hub = TestHub::start_with(|c| {
        c.events.max_streams_per_user = 2;
        c.events.heartbeat_secs = 1;
    })
    .await;
    let mut faucet = listen_as(&hub, SITE, USER, "").await;
    faucet.ready().await;
    let mut charity = listen_as(&hub, OTHER_SITE, USER, "").await;
    charity.ready().await;
    let token = hub.token(SITE, USER);
    let third = open(stream_request(&stream_client(), &hub.url, USER, "", Some(&token))).await;
    assert_too_many_streams(&third.err().expect("a third stream of one user was opened"));
    // Another user is not held back by it.
    let _victims = listen(&hub, VICTIM).await;
    assert_eq!(metric(&hub.url, "hub_event_streams").await, 3.0);
    assert_eq!(metric(&hub.url, "hub_event_streams_refused_total{reason=\"per_user\"}").await, 1.0);

    // The page that closes its stream gives its slot back.
    drop(charity);
    support::events::wait_for_metric(&hub.url, "hub_event_streams", "the closed stream uncounted", |v| {
        v == 2.0
    })
    .await;
    let mut again = accepted(
        stream_request(&stream_client(), &hub.url, USER, "", Some(&token)),
        "a stream in the freed slot",
    )
    .await;
    again.ready().await;
    let credit = hub.site(SITE, USER).delta("balance", 1, "credit-1").await.assert_ok().clone();
    assert_change(&again.change("a change on the new stream").await, "balance", &credit);
    assert_change(&faucet.change("a change on the first stream").await, "balance", &credit);
}

#[tokio::test]
async fn an_addresses_streams_beyond_the_cap_are_refused() {
    let hub = TestHub::start_with(|c| c.events.max_streams_per_address = 2).await;
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<IpAddr>().unwrap())
            .connect_timeout(WAIT)
            .build()
            .unwrap()
    };
    let (crowded, apart) = (from("127.0.0.2"), from("127.0.0.3"));
    let mut held = Vec::new();
    for user in ["user-1", "user-2"] {
        let token = hub.token(SITE, user);
        let mut stream = accepted(stream_request(&crowded, &hub.url, user, "", Some(&token)), user).await;
        stream.ready().await;
        held.push(stream);
    }
    let token = hub.token(SITE, "user-3");
    let refused = open(stream_request(&crowded, &hub.url, "user-3", "", Some(&token))).await;
    assert_too_many_streams(&refused.err().expect("a third stream from one address was opened"));
    let mut elsewhere =
        accepted(stream_request(&apart, &hub.url, "user-3", "", Some(&token)), "another address").await;
    elsewhere.ready().await;
    assert_eq!(metric(&hub.url, "hub_event_streams_refused_total{reason=\"per_address\"}").await, 1.0);
    assert_eq!(metric(&hub.url, "hub_event_streams").await, 3.0);
}

#[tokio::test]
async fn heartbeats_keep_a_quiet_stream_open_past_the_idle_and_request_timeouts() {
    let hub = TestHub::start_with(|c| {
        c.events.heartbeat_secs = 1;
        c.limits.idle_timeout_secs = 2;
        c.limits.request_timeout_secs = 2;
        c.limits.body_timeout_secs = 1;
    })
    .await;
    let mut stream = listen(&hub, USER).await;
    // Three idle timeouts with nothing to say but heartbeats.
    let quiet = Duration::from_secs(6);
    let until = tokio::time::Instant::now() + quiet;
    let mut heartbeats = 0;
    while tokio::time::Instant::now() < until {
        match stream.next_within(until.saturating_duration_since(tokio::time::Instant::now())).await {
            Next::Frame(frame) if frame.is_heartbeat() => heartbeats += 1,
            Next::Quiet => {}
            other => panic!("a quiet stream after {heartbeats} heartbeats: {other:?}"),
        }
    }
    assert!(heartbeats >= 2, "{heartbeats} heartbeats in {quiet:?} with events.heartbeat_secs = 1");
    let credit = hub.site(SITE, USER).delta("balance", 1, "credit-1").await.assert_ok().clone();
    assert_change(&stream.change("a change after the quiet").await, "balance", &credit);
}

#[tokio::test]
async fn the_hubs_stop_ends_its_streams_cleanly_and_is_not_held_up_by_them() {
    let hub = TestHub::start().await;
    let mut http1 = listen(&hub, USER).await;
    let http2_client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let token = hub.token(SITE, VICTIM);
    let mut http2 =
        accepted(stream_request(&http2_client, &hub.url, VICTIM, "", Some(&token)), "an HTTP/2 stream").await;
    assert_eq!(http2.version, Version::HTTP_2);
    http2.ready().await;

    let stopping = tokio::spawn(hub.stop());
    // Well within the hub's grace for connections (10 s), which a held-up stop would wait out.
    let prompt = Duration::from_secs(8);
    http1.end_within(prompt, "an HTTP/1.1 stream at the hub's stop").await;
    http2.end_within(prompt, "an HTTP/2 stream at the hub's stop").await;
    tokio::time::timeout(prompt, stopping)
        .await
        .unwrap_or_else(|_| panic!("the hub did not stop within {prompt:?} of its streams' end"))
        .unwrap();
}

#[tokio::test]
async fn a_sites_page_reads_the_stream_from_its_origin_only() {
    let hub = TestHub::start().await;
    let token = hub.token(SITE, USER);
    let preflight = |origin: &str| {
        hub.request(Method::OPTIONS, &format!("/api/events?user_id={USER}"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
            .header("Access-Control-Request-Headers", "authorization, last-event-id")
            .send()
    };
    let allowed = preflight(ORIGIN).await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(headers["access-control-allow-origin"], ORIGIN);
    assert_eq!(headers["access-control-max-age"], "7200");
    let methods = headers["access-control-allow-methods"].to_str().unwrap().to_ascii_uppercase();
    assert!(methods.contains("GET"), "{methods}");
    let allowed_headers = headers["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(
        allowed_headers.contains("authorization") && allowed_headers.contains("last-event-id"),
        "{allowed_headers}"
    );

    let request = stream_request(&stream_client(), &hub.url, USER, "", Some(&token)).header("Origin", ORIGIN);
    let mut stream = accepted(request, "a stream from the site's origin").await;
    assert_eq!(stream.header("access-control-allow-origin"), Some(ORIGIN));
    assert!(
        stream.header("vary").is_some_and(|v| v.to_ascii_lowercase().contains("origin")),
        "{:?}",
        stream.headers
    );
    stream.ready().await;

    let stranger = "https://evil.example";
    let refused = preflight(stranger).await.unwrap();
    assert!(refused.headers().get("access-control-allow-origin").is_none(), "{:?}", refused.headers());
    let request =
        stream_request(&stream_client(), &hub.url, USER, "", Some(&token)).header("Origin", stranger);
    let answer = request.send().await.unwrap();
    assert!(answer.headers().get("access-control-allow-origin").is_none(), "{:?}", answer.headers());
}

#[tokio::test]
async fn streams_over_http2_get_events() {
    let hub = TestHub::start().await;
    // Two streams on one connection, as two tabs of one browser would hold them.
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let mut streams = Vec::new();
    for site in [SITE, OTHER_SITE] {
        let token = hub.token(site, USER);
        let mut stream =
            accepted(stream_request(&client, &hub.url, USER, "", Some(&token)), "an HTTP/2 stream").await;
        assert_eq!(stream.version, Version::HTTP_2);
        stream.ready().await;
        streams.push(stream);
    }
    let credit = hub.site(SITE, USER).delta("balance", 7, "credit-1").await.assert_ok().clone();
    for stream in &mut streams {
        assert_change(&stream.change("a change over HTTP/2").await, "balance", &credit);
    }
}

#[tokio::test]
async fn a_stream_over_https_negotiates_http2_and_gets_events() {
    let pems = support::certs::loopback_signed_by("events test authority");
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    std::fs::write(&cert, &pems.cert).unwrap();
    std::fs::write(&key, &pems.key).unwrap();
    let hub = TestHub::start_with(|c: &mut Config| {
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pems.authority.as_bytes()).unwrap())
        .build()
        .unwrap();
    let token = hub.token(SITE, USER);
    let mut stream =
        accepted(stream_request(&client, &hub.url, USER, "", Some(&token)), "an HTTPS stream").await;
    assert_eq!(stream.version, Version::HTTP_2, "ALPN chose HTTP/2");
    stream.ready().await;
    let writer = support::SiteClient { client: client.clone(), ..hub.site(SITE, USER) };
    let credit = writer.delta("balance", 7, "credit-1").await.assert_ok().clone();
    assert_change(&stream.change("a change over HTTPS").await, "balance", &credit);
}

#[tokio::test]
async fn a_hub_with_events_off_has_no_stream() {
    let hub = TestHub::start_with(|c| c.events.enabled = false).await;
    let token = hub.token(SITE, USER);
    let refused = open(stream_request(&stream_client(), &hub.url, USER, "", Some(&token))).await;
    refused.err().expect("a stream on a hub with events off").assert_refused(404, "not_found");
    hub.page(SITE, USER).timestamp("balance").await.assert_ok();
}

#[tokio::test]
async fn only_get_opens_a_stream() {
    let hub = TestHub::start().await;
    let token = hub.token(SITE, USER);
    for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        let request = hub.request(method.clone(), &format!("/api/events?user_id={USER}")).bearer_auth(&token);
        let reply = Reply::from(request.send().await.unwrap()).await;
        assert_eq!(reply.status, 405, "{method}: {}", reply.body);
        assert_eq!(reply.body["success"], false, "{method}: {}", reply.body);
    }
}

#[tokio::test]
async fn a_reader_that_falls_behind_is_dropped_and_resumes_where_it_was() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 1_000_000).await;
    let token = hub.token(SITE, USER);
    // A page that reads its stream's opening, then nothing: a tab frozen, a network stalled.
    let (mut frozen, ready) = RawStream::frozen(&hub, USER, &token).await;

    // Settings of nearly 2 KiB, changed 32 at a time, until the hub gives the reader up.
    let faucet = hub.site(SITE, USER);
    faucet.push("settings", json!({"b": "b".repeat(900)})).await.assert_ok();
    let mut written = 1;
    let dropped = "hub_event_streams_ended_total{reason=\"slow\"}";
    while metric(&hub.url, dropped).await < 1.0 {
        assert!(
            written < 20_000,
            "{written} changes (~{} MiB of events) unread, and the stream is still held",
            written * 2 / 1024
        );
        let ops: Vec<Value> = (0..32)
            .map(|i| {
                let n = written + i;
                json!({"action": "push", "op_id": format!("op-{n}"), "data_type": "settings", "data": {"a": format!("{n:0>900}")}})
            })
            .collect();
        let reply =
            faucet.post(&json!({"action": "batch", "user_id": USER, "site_id": SITE, "ops": ops})).await;
        assert!(
            reply.assert_ok()["results"].as_array().unwrap().iter().all(|r| r["status"] == 200),
            "{}",
            reply.body
        );
        written += 32;
    }
    // Read at last, it has what the hub had queued for it, then its end.
    let (_frames, _clean) = frozen.drain_within(Duration::from_secs(30), "a dropped slow stream").await;
    support::events::wait_for_metric(&hub.url, "hub_event_streams", "the slow stream uncounted", |v| {
        v == 0.0
    })
    .await;

    // Back, it gets what it missed, or is told to check once.
    let (_stream, between, ready) = resume(&hub.url, &token, USER, ready.id()).await;
    if between.first().is_some_and(|f| f.kind() == "resync") {
        assert_eq!(between.len(), 1, "{:?}", &between[..2]);
    } else {
        let versions: Vec<u64> = changes(&between).into_iter().map(|(_, v)| v).collect();
        assert_eq!(versions, (1..=written).collect::<Vec<_>>(), "every change, once, in order");
        assert_eq!(ready.json()["resumed"], true);
    }
}
