//! A reviewer's probes of the change feed (`GET /api/changes`) against the real hub: a long
//! poll under the hub's own connection timeouts, who may read which site's feed, and a stream
//! following writes that commit together in the writer's batches.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::events::{EventStream, accepted, stream_client};
use support::{Reply, TestHub, client};

const SITE: &str = "roflfaucet";
const OTHER_SITE: &str = "clickforcharity";
const READER: &str = "feed-reader";

fn feed_url(hub: &TestHub, query: &str) -> String {
    format!("{}/api/changes?{query}", hub.url)
}

async fn page(hub: &TestHub, token: &str, query: &str) -> Reply {
    Reply::from(client().get(feed_url(hub, query)).bearer_auth(token).send().await.unwrap()).await
}

/// Every change after `cursor`, page by page, and the cursor after them.
async fn drain(hub: &TestHub, token: &str, cursor: Option<&str>) -> (Vec<Value>, String) {
    let mut cursor = cursor.map(str::to_owned);
    let mut changes = Vec::new();
    loop {
        let query = cursor.as_ref().map_or("limit=100".to_owned(), |c| format!("limit=100&cursor={c}"));
        let reply = page(hub, token, &query).await;
        let body = reply.assert_ok().clone();
        changes.extend(body["changes"].as_array().unwrap().iter().cloned());
        cursor = Some(body["cursor"].as_str().unwrap().to_owned());
        if body["more"] == false {
            return (changes, cursor.unwrap());
        }
    }
}

#[tokio::test]
async fn a_long_poll_is_answered_whatever_the_hubs_idle_and_request_timeouts() {
    let hub = TestHub::start_with(|c| {
        c.limits.request_timeout_secs = 4;
        c.limits.body_timeout_secs = 2;
        c.limits.idle_timeout_secs = 1;
        c.events.heartbeat_secs = 3;
    })
    .await;
    hub.site(SITE, "before").delta("balance", 1, "before-1").await.assert_ok();
    let token = hub.backend_token(SITE, READER);
    let (_, cursor) = drain(&hub, &token, None).await;

    let answer = client()
        .get(feed_url(&hub, &format!("wait=20&cursor={cursor}")))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(60))
        .send()
        .await;
    let response = match answer {
        Ok(response) => response,
        Err(e) => panic!("a long poll of wait=20 got no answer: {e:?}"),
    };
    let reply = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => panic!("a long poll of wait=20 was cut off mid-answer: {e:?}"),
    };
    let body: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(body["changes"], json!([]), "{body}");
    hub.stop().await;
}

/// Only a site's backend reads its site's feed: an admin token of another site may not name
/// it, a page's token may not read even its own site's, nor may a page's token pass a grant
/// or the `site_id` of a site whose feed it wants.
#[tokio::test]
async fn no_token_but_the_sites_own_backends_reads_its_feed() {
    let hub = TestHub::start().await;
    hub.page(SITE, "private").push("settings", json!({ "secret_note": "mine" })).await.assert_ok();
    let admin_of_other = hub.admin_token(OTHER_SITE, READER);
    page(&hub, &admin_of_other, &format!("site_id={SITE}")).await.assert_refused(403, "wrong_site");
    let page_token = hub.token(SITE, "private");
    page(&hub, &page_token, "").await.assert_refused(403, "insufficient_scope");
    page(&hub, &page_token, &format!("site_id={SITE}")).await.assert_refused(403, "insufficient_scope");
    // What an admin token of the other site reads is its own site's feed.
    let theirs = page(&hub, &admin_of_other, "").await;
    let changes = theirs.assert_ok()["changes"].as_array().unwrap().clone();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0]["own"], false, "a page's write is no one's own: {changes:?}");
    hub.stop().await;
}

/// A stream of the feed follows many writes committed together (the SQLite writer gathers
/// what waits into one transaction): every record's final version comes, in version order.
#[tokio::test]
async fn a_stream_misses_no_write_of_the_writers_group_commits() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 100_000).await;
    let token = hub.backend_token(SITE, READER);
    let request = stream_client()
        .get(format!("{}/api/changes?limit=5", hub.url))
        .bearer_auth(&token)
        .header("accept", "text/event-stream");
    let mut stream: EventStream = accepted(request, "the feed's stream").await;
    stream.event("the retry hint").await;

    let users: Vec<String> = (0..24).map(|i| format!("group-{i}")).collect();
    let mut writes = tokio::task::JoinSet::new();
    for round in 0..4 {
        for user in &users {
            let writer = hub.site(OTHER_SITE, user);
            writes
                .spawn(async move { writer.delta("balance", 1, &format!("{}-{round}", writer.user)).await });
        }
    }
    while let Some(written) = writes.join_next().await {
        written.unwrap().assert_ok();
    }
    let mut finals = BTreeMap::new();
    for user in &users {
        let version =
            hub.site(OTHER_SITE, user).get("balance").await.assert_ok()["version"].as_u64().unwrap();
        finals.insert(user.clone(), version);
    }

    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while users.iter().any(|u| seen.get(u).and_then(|v| v.last()) != finals.get(u)) {
        assert!(Instant::now() < deadline, "the stream fell short: seen {seen:?}, final {finals:?}");
        let frame = stream.event("a change").await;
        if frame.kind() != "change" {
            continue;
        }
        let change = frame.json();
        seen.entry(change["user_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(change["version"].as_u64().unwrap());
    }
    for (user, versions) in &seen {
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{user}: {versions:?}");
    }
    hub.stop().await;
}
