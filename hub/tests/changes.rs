//! The change feed (`GET /api/changes`) over real HTTP, as a site's backend reads it: every
//! record once from the start, then page by page with the cursor, losing and repeating nothing
//! while writes go on; `own` for the site's own backend's writes only; the site's subscribed
//! types only; small data inline; a long poll that answers when a write comes, or empty with
//! the same cursor when none does (events off too); the same as Server-Sent Events, resumed
//! after `Last-Event-ID`, kept alive by heartbeats and ended at the token's expiry; refused
//! without a backend's token or with a cursor it never gave; read on from its cursor after a
//! restart.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hub::auth::Claims;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};
use support::events::{EventStream, Frame, Next, WAIT, accepted, stream_client};
use support::{Reply, TestHub, client, site_secret};

const SITE: &str = "roflfaucet";
const OTHER_SITE: &str = "clickforcharity";
/// The user a backend's feed token names: only its rate limit counts it.
const READER: &str = "feed-reader";

/// A site's backend reading the feed, with a token that carries `changes:read`.
struct Feed {
    url: String,
    token: String,
}

impl Feed {
    fn of(hub: &TestHub, site: &str) -> Feed {
        Feed { url: hub.url.clone(), token: hub.backend_token(site, READER) }
    }

    fn request(&self, query: &str) -> RequestBuilder {
        client().get(format!("{}/api/changes?{query}", self.url)).bearer_auth(&self.token)
    }

    async fn get(&self, query: &str) -> Reply {
        Reply::from(self.request(query).send().await.unwrap()).await
    }

    /// One page, which must be answered.
    async fn page(&self, query: &str) -> Value {
        self.get(query).await.assert_ok().clone()
    }

    /// Every change after `cursor` (from the start without one), page by page of `limit`,
    /// and the cursor after them.
    async fn drain(&self, cursor: Option<&str>, limit: usize) -> (Vec<Value>, String) {
        let mut cursor = cursor.map(str::to_owned);
        let mut changes = Vec::new();
        loop {
            let query = match &cursor {
                Some(cursor) => format!("limit={limit}&cursor={cursor}"),
                None => format!("limit={limit}"),
            };
            let page = self.page(&query).await;
            let got = page["changes"].as_array().unwrap();
            assert!(got.len() <= limit, "a page beyond its limit: {page}");
            changes.extend(got.iter().cloned());
            cursor = Some(page["cursor"].as_str().unwrap().to_owned());
            if page["more"] == false {
                return (changes, cursor.unwrap());
            }
        }
    }

    /// The feed as Server-Sent Events, from `cursor` (the start without one).
    async fn stream(&self, last_event_id: Option<&str>) -> EventStream {
        let request = stream_client()
            .get(format!("{}/api/changes", self.url))
            .bearer_auth(&self.token)
            .header("accept", "text/event-stream");
        let request = match last_event_id {
            Some(id) => request.header("last-event-id", id),
            None => request,
        };
        let mut stream = accepted(request, "the feed's stream").await;
        let retry = stream.event("the retry hint").await;
        assert!(retry.retry.is_some(), "the first frame is not a retry hint: {retry:?}");
        stream
    }
}

/// Each change's user and data type.
fn records(changes: &[Value]) -> Vec<(String, String)> {
    changes
        .iter()
        .map(|c| (c["user_id"].as_str().unwrap().into(), c["data_type"].as_str().unwrap().into()))
        .collect()
}

/// The change event that comes next on `stream`, with its id.
async fn next_change(stream: &mut EventStream, what: &str) -> (String, Value) {
    let frame = stream.event(what).await;
    assert_eq!(frame.kind(), "change", "waiting for {what}: {frame:?}");
    (frame.id().to_owned(), frame.json())
}

#[tokio::test]
async fn the_feed_gives_every_record_once_and_its_pages_lose_and_repeat_nothing_while_writes_go_on() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 100_000).await;
    let users: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    for user in &users {
        hub.site(SITE, user).delta("balance", 10, &format!("{user}-seed")).await.assert_ok();
    }
    hub.site(SITE, &users[0]).push("profile", json!({"display_name": "Zero"})).await.assert_ok();

    let feed = Feed::of(&hub, SITE);
    let (everything, _) = feed.drain(None, 1000).await;
    let mut expected: BTreeSet<(String, String)> =
        users.iter().map(|u| (u.clone(), "balance".into())).collect();
    expected.insert((users[0].clone(), "profile".into()));
    assert_eq!(records(&everything).into_iter().collect::<BTreeSet<_>>(), expected);
    assert_eq!(everything.len(), expected.len(), "a record came twice: {everything:?}");

    // Writers go on while the reader pages through from the start, 3 changes at a time.
    let writers: Vec<_> = users
        .iter()
        .map(|user| {
            let writer = hub.site(SITE, user);
            tokio::spawn(async move {
                for i in 0..12 {
                    writer.delta("balance", 1, &format!("{}-{i}", writer.user)).await.assert_ok();
                }
            })
        })
        .collect();
    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    while writers.iter().any(|w| !w.is_finished()) {
        let (changes, after) = feed.drain(cursor.as_deref(), 3).await;
        seen.extend(changes);
        cursor = Some(after);
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let (changes, _) = feed.drain(cursor.as_deref(), 3).await;
    seen.extend(changes);

    let mut versions: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for change in &seen {
        let record = (
            change["user_id"].as_str().unwrap().to_owned(),
            change["data_type"].as_str().unwrap().to_owned(),
        );
        versions.entry(record).or_default().push(change["version"].as_u64().unwrap());
    }
    for (record, versions) in &versions {
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{record:?} came back without a newer version: {versions:?}"
        );
    }
    for user in &users {
        let current = hub.site(SITE, user).get("balance").await.assert_ok()["version"].as_u64().unwrap();
        let last = versions[&(user.clone(), "balance".to_owned())].last().copied();
        assert_eq!(last, Some(current), "{user}'s final version was not read");
    }
    let (again, _) = feed.drain(None, 1000).await;
    assert_eq!(again.len(), expected.len(), "read from the start, a record came twice: {again:?}");
    hub.stop().await;
}

#[tokio::test]
async fn own_is_true_only_for_the_writes_of_the_sites_own_backend() {
    let hub = TestHub::start().await;
    hub.site(SITE, "by-backend").delta("balance", 5, "backend-1").await.assert_ok();
    hub.page(SITE, "by-page").push("profile", json!({"display_name": "Page"})).await.assert_ok();
    hub.site(OTHER_SITE, "by-other").delta("balance", 5, "other-1").await.assert_ok();

    for (site, own) in [(SITE, "by-backend"), (OTHER_SITE, "by-other")] {
        let (changes, _) = Feed::of(&hub, site).drain(None, 100).await;
        let flags: BTreeMap<&str, bool> =
            changes.iter().map(|c| (c["user_id"].as_str().unwrap(), c["own"].as_bool().unwrap())).collect();
        let expected: BTreeMap<&str, bool> =
            ["by-backend", "by-page", "by-other"].into_iter().map(|u| (u, u == own)).collect();
        assert_eq!(flags, expected, "{site}'s feed");
    }
    hub.stop().await;
}

#[tokio::test]
async fn the_feed_carries_the_sites_subscribed_types_and_those_the_query_names() {
    let hub = TestHub::start_with(|c| {
        let site = c.sites.iter_mut().find(|s| s.id == SITE).unwrap();
        site.webhook_data_types = Some(vec!["balance".into(), "profile".into()]);
    })
    .await;
    let writer = hub.site(SITE, "typed");
    writer.delta("balance", 5, "typed-1").await.assert_ok();
    writer.delta("points", 5, "typed-2").await.assert_ok();
    writer.push("profile", json!({"display_name": "Typed"})).await.assert_ok();
    writer.push("settings", json!({"theme": "dark"})).await.assert_ok();
    let types = |changes: &[Value]| -> BTreeSet<String> {
        changes.iter().map(|c| c["data_type"].as_str().unwrap().to_owned()).collect()
    };

    let feed = Feed::of(&hub, SITE);
    let (subscribed, _) = feed.drain(None, 100).await;
    assert_eq!(types(&subscribed), BTreeSet::from(["balance".into(), "profile".into()]));
    let balance = feed.page("data_type=balance").await;
    assert_eq!(types(balance["changes"].as_array().unwrap()), BTreeSet::from(["balance".into()]));
    // A type the site does not subscribe to is refused: left out, its reader would wait forever.
    let refused = feed.get("data_type=balance,points").await;
    refused.assert_refused(400, "invalid_data_type");
    assert!(refused.body["error"].as_str().unwrap().contains("webhook_data_types"), "{}", refused.body);
    feed.get("data_type=coins").await.assert_refused(400, "invalid_data_type");

    let (everything, _) = Feed::of(&hub, OTHER_SITE).drain(None, 100).await;
    assert_eq!(everything.len(), 4, "a site without webhook_data_types reads every type: {everything:?}");
    hub.stop().await;
}

#[tokio::test]
async fn a_reader_of_one_type_moves_past_the_other_types_changes_and_misses_none_of_its_own() {
    let hub = TestHub::start().await;
    let writer = hub.site(SITE, "one-type");
    writer.delta("balance", 5, "one-type-1").await.assert_ok();
    let feed = Feed::of(&hub, SITE);
    let first = feed.page("data_type=balance").await;
    assert_eq!(first["changes"].as_array().unwrap().len(), 1, "{first}");
    let at_balance = first["cursor"].as_str().unwrap().to_owned();

    for i in 0..5 {
        hub.site(SITE, &format!("other-{i}"))
            .push("profile", json!({"display_name": "Other"}))
            .await
            .assert_ok();
    }
    let quiet = feed.page(&format!("data_type=balance&cursor={at_balance}")).await;
    assert_eq!(quiet["changes"], json!([]), "{quiet}");
    let past = quiet["cursor"].as_str().unwrap().to_owned();
    assert_ne!(past, at_balance, "the cursor stays behind the profiles it stepped over: {quiet}");

    writer.delta("balance", 5, "one-type-2").await.assert_ok();
    let next = feed.page(&format!("data_type=balance&cursor={past}")).await;
    let changes = next["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{next}");
    assert_eq!(
        (changes[0]["data_type"].as_str(), changes[0]["version"].as_u64()),
        (Some("balance"), Some(2))
    );
    let all = feed.page(&format!("cursor={past}")).await;
    assert_eq!(all["changes"].as_array().unwrap().len(), 1, "no profile after the moved cursor: {all}");
    hub.stop().await;
}

#[tokio::test]
async fn data_comes_inline_up_to_2_kib_and_not_beyond() {
    let hub = TestHub::start().await;
    let small = json!({"note": "x".repeat(1000)});
    let large = json!({"a": "x".repeat(1000), "b": "x".repeat(1000), "c": "x".repeat(1000)});
    hub.site(SITE, "small").push("settings", small.clone()).await.assert_ok();
    hub.site(SITE, "large").push("settings", large).await.assert_ok();

    let (changes, _) = Feed::of(&hub, SITE).drain(None, 100).await;
    let by_user: BTreeMap<&str, &Value> =
        changes.iter().map(|c| (c["user_id"].as_str().unwrap(), c)).collect();
    assert_eq!(by_user["small"]["data"], small, "{:?}", by_user["small"]);
    assert!(by_user["large"].get("data").is_none(), "data beyond 2 KiB came inline");
    for change in by_user.values() {
        assert!(change["last_updated"].as_str().is_some_and(|t| t.ends_with('Z')), "{change}");
        assert!(change["version"].as_u64().is_some_and(|v| v >= 1), "{change}");
    }
    hub.stop().await;
}

#[tokio::test]
async fn a_long_poll_answers_with_a_write_that_comes_while_it_waits() {
    let hub = TestHub::start().await;
    let feed = Feed::of(&hub, SITE);
    let (_, cursor) = feed.drain(None, 100).await;
    let poll = tokio::spawn({
        let request = feed.request(&format!("wait=25&cursor={cursor}"));
        async move { Reply::from(request.send().await.unwrap()).await }
    });
    // Most likely the poll is waiting by now; had the write come first it would answer the same.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = hub.site(SITE, "waited-for").delta("balance", 7, "waited-1").await;
    let answer = poll.await.unwrap();
    let page = answer.assert_ok();
    let changes = page["changes"].as_array().unwrap();
    assert_eq!(records(changes), [("waited-for".to_owned(), "balance".to_owned())], "{page}");
    assert_eq!(changes[0]["version"], written.assert_ok()["version"]);
    assert_ne!(page["cursor"], cursor.as_str(), "the cursor did not move past the write");
    hub.stop().await;
}

#[tokio::test]
async fn a_long_poll_with_nothing_to_read_answers_empty_with_the_same_cursor() {
    let hub = TestHub::start().await;
    hub.site(SITE, "before").delta("balance", 1, "before-1").await.assert_ok();
    let feed = Feed::of(&hub, SITE);
    let (_, cursor) = feed.drain(None, 100).await;
    let page = feed.page(&format!("wait=1&cursor={cursor}")).await;
    assert_eq!(page["changes"], json!([]));
    assert_eq!(page["cursor"], cursor.as_str());
    assert_eq!(page["more"], false);
    assert!(page["epoch"].as_str().is_some_and(|e| cursor.starts_with(e)), "{page}");
    hub.stop().await;
}

#[tokio::test]
async fn with_events_off_a_long_poll_still_answers_a_write() {
    let hub = TestHub::start_with(|c| c.events.enabled = false).await;
    let feed = Feed::of(&hub, SITE);
    let (_, cursor) = feed.drain(None, 100).await;
    let poll = tokio::spawn({
        let request = feed.request(&format!("wait=25&cursor={cursor}"));
        async move { Reply::from(request.send().await.unwrap()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.site(SITE, "untold").delta("balance", 7, "untold-1").await.assert_ok();
    let answer = poll.await.unwrap();
    assert_eq!(
        records(answer.assert_ok()["changes"].as_array().unwrap()),
        [("untold".to_owned(), "balance".to_owned())]
    );
    hub.stop().await;
}

#[tokio::test]
async fn the_stream_sends_each_change_with_its_cursor_and_resumes_right_after_the_last_event_id() {
    let hub = TestHub::start().await;
    for user in ["s-1", "s-2"] {
        hub.site(SITE, user).delta("balance", 1, &format!("{user}-op")).await.assert_ok();
    }
    let feed = Feed::of(&hub, SITE);
    let mut stream = feed.stream(None).await;
    assert!(stream.header("content-type").is_some_and(|t| t.starts_with("text/event-stream")));
    assert_eq!(stream.header("x-accel-buffering"), Some("no"));
    assert_eq!(stream.header("cache-control"), Some("no-store"));
    let (_, first) = next_change(&mut stream, "the first record").await;
    let (second_id, second) = next_change(&mut stream, "the second record").await;
    assert_eq!([first["user_id"].clone(), second["user_id"].clone()], [json!("s-1"), json!("s-2")]);
    // A change written while the stream is open comes as it is written.
    hub.site(SITE, "s-3").delta("balance", 1, "s-3-op").await.assert_ok();
    let (third_id, third) = next_change(&mut stream, "a change written while open").await;
    assert_eq!(third["user_id"], "s-3");
    assert_eq!(third["own"], true);
    drop(stream);

    hub.site(SITE, "s-4").delta("balance", 1, "s-4-op").await.assert_ok();
    let mut resumed = feed.stream(Some(&second_id)).await;
    let (id, again) = next_change(&mut resumed, "the change after the last event id").await;
    assert_eq!((id.as_str(), &again["user_id"]), (third_id.as_str(), &json!("s-3")));
    let (_, missed) = next_change(&mut resumed, "the change written while away").await;
    assert_eq!(missed["user_id"], "s-4");
    match resumed.next_within(Duration::from_millis(500)).await {
        Next::Quiet => {}
        Next::Frame(frame) if frame.is_heartbeat() => {}
        other => panic!("after the missed changes, more came: {other:?}"),
    }
    hub.stop().await;
}

#[tokio::test]
async fn an_idle_stream_is_kept_alive_and_ends_with_reauth_when_its_token_expires() {
    let hub = TestHub::start_with(|c| c.events.heartbeat_secs = 1).await;
    let mut feed = Feed::of(&hub, SITE);
    feed.token = {
        let sites = hub.app.sites();
        let keys = sites.keys().unwrap();
        keys.mint_scoped(SITE, READER, 3, keys.signable(SITE).unwrap(), false).unwrap()
    };
    let issued = get_current_timestamp();
    let mut stream = feed.stream(None).await;
    let heartbeat = stream.frame("a heartbeat").await;
    assert!(heartbeat.is_heartbeat(), "an idle stream sent {heartbeat:?}");
    let frames = stream.end_within(WAIT, "the stream of an expiring token").await;
    let last: Option<&Frame> = frames.last();
    assert_eq!(last.map(Frame::kind), Some("reauth"), "{frames:?}");
    assert!(frames[..frames.len() - 1].iter().all(Frame::is_heartbeat), "{frames:?}");
    assert!(get_current_timestamp() >= issued + 3, "ended before its token expired");
    hub.stop().await;
}

#[tokio::test]
async fn a_site_holds_a_bounded_number_of_feed_readers() {
    let hub = TestHub::start_with(|c| c.events.max_streams_per_user = 2).await;
    let feed = Feed::of(&hub, SITE);
    let first = feed.stream(None).await;
    let _second = feed.stream(None).await;
    let request = || {
        stream_client()
            .get(format!("{}/api/changes", feed.url))
            .bearer_auth(&feed.token)
            .header("accept", "text/event-stream")
    };
    let Err(refused) = support::events::open(request()).await else { panic!("a third stream was opened") };
    refused.assert_refused(429, "too_many_streams");
    assert!(refused.headers.contains_key("retry-after"), "{:?}", refused.headers);
    feed.get("wait=0").await.assert_refused(429, "too_many_streams");
    let _other = Feed::of(&hub, OTHER_SITE).stream(None).await;

    // Once a reader goes, its place is free again.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match support::events::open(request()).await {
            Ok(_third) => break,
            Err(reply) if tokio::time::Instant::now() < deadline => {
                reply.assert_refused(429, "too_many_streams")
            }
            Err(reply) => {
                panic!("the place of a closed stream was not freed: {} {}", reply.status, reply.body)
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.stop().await;
}

#[tokio::test]
async fn an_open_stream_ends_cleanly_when_the_hub_stops() {
    let hub = TestHub::start().await;
    let mut stream = Feed::of(&hub, SITE).stream(None).await;
    hub.stop().await;
    let frames = stream.end_within(WAIT, "a stream as the hub stops").await;
    assert!(frames.iter().all(Frame::is_heartbeat), "{frames:?}");
}

#[tokio::test]
async fn a_feed_is_refused_without_a_backends_token_or_with_a_cursor_it_never_gave() {
    let hub = TestHub::start_with(|c| {
        let wrc = c.sites.iter_mut().find(|s| s.id == "wrc").unwrap();
        wrc.scopes = protocol::Scopes::PAGE.iter().map(|s| s.as_str().to_owned()).collect();
    })
    .await;
    hub.site(SITE, "someone").delta("balance", 1, "someone-1").await.assert_ok();
    let feed = Feed::of(&hub, SITE);
    let (_, cursor) = feed.drain(None, 100).await;
    let url = |query: &str| format!("{}/api/changes?{query}", hub.url);
    let unsignable = {
        let now = get_current_timestamp();
        let claims = Claims {
            iss: "wrc".into(),
            sub: READER.into(),
            aud: "test-hub".into(),
            exp: now + 300,
            iat: Some(now),
            nbf: None,
            adm: false,
            scope: Some("changes:read".into()),
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(site_secret("wrc").as_bytes()),
        )
        .unwrap()
    };
    let grant = hub.grant(SITE, READER, "op-1", "balance", json!({"coins": 1}));
    let tokens = [
        ("no token", None, 401, "missing_token"),
        ("a page's token", Some(hub.token(SITE, READER)), 403, "insufficient_scope"),
        ("changes:read from a site that may not sign it", Some(unsignable), 401, "scope_not_allowed"),
        ("a grant as the token", Some(grant), 401, "invalid_token"),
    ];
    for (case, token, status, code) in tokens {
        let request = client().get(url(""));
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let reply = Reply::from(request.send().await.unwrap()).await;
        assert_eq!((reply.status.as_u16(), reply.code()), (status, code), "{case}: {}", reply.body);
    }
    // The token travels in the header only: never in the URL.
    for param in ["token", "access_token"] {
        let reply =
            Reply::from(client().get(url(&format!("{param}={}", feed.token))).send().await.unwrap()).await;
        reply.assert_refused(401, "missing_token");
    }

    let (epoch, position) = cursor.split_once('.').unwrap();
    let (xid, seq) = position.split_once('.').unwrap();
    let past_the_end = format!("{epoch}.{xid}.{}", seq.parse::<u64>().unwrap() + 1000);
    let queries = [
        ("cursor=garbage".to_owned(), 400, "bad_cursor"),
        (format!("cursor={epoch}.{xid}"), 400, "bad_cursor"),
        (format!("cursor={epoch}.{xid}.-1"), 400, "bad_cursor"),
        (format!("cursor=another-epoch.{position}"), 410, "cursor_reset"),
        (format!("cursor={past_the_end}"), 410, "cursor_reset"),
        ("limit=0".to_owned(), 400, "invalid_query"),
        ("limit=1001".to_owned(), 400, "invalid_query"),
        ("wait=26".to_owned(), 400, "invalid_query"),
        ("wait=soon".to_owned(), 400, "invalid_query"),
        ("data_type=coins".to_owned(), 400, "invalid_data_type"),
        (format!("site_id={OTHER_SITE}"), 403, "wrong_site"),
    ];
    for (query, status, code) in queries {
        feed.get(&query).await.assert_refused(status, code);
    }
    let reset = feed.get(&format!("cursor=another-epoch.{position}")).await;
    assert!(reset.body["error"].as_str().unwrap().contains("without a cursor"), "{}", reset.body);
    // Its own epoch's cursor, and its own site's name, read on.
    feed.page(&format!("cursor={cursor}&site_id={SITE}")).await;

    let post = Reply::from(client().post(url("")).bearer_auth(&feed.token).send().await.unwrap()).await;
    post.assert_refused(405, "method_not_allowed");
    // A server-to-server call needs no CORS, but a page's preflight is answered as anywhere.
    let preflight = hub
        .request(Method::OPTIONS, "/api/changes")
        .header("origin", "https://roflfaucet.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        preflight.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("https://roflfaucet.com")
    );
    let metrics = support::events::metrics(&hub.url).await;
    assert!(metrics.contains(r#"action="changes""#), "no request counted as changes: {metrics}");
    hub.stop().await;
}

#[tokio::test]
async fn with_auth_off_the_feed_is_the_named_sites() {
    let hub = TestHub::start_with(|c| c.auth = false).await;
    hub.site(SITE, "dev-user").delta("balance", 3, "dev-1").await.assert_ok();
    for (query, own) in [("site_id=roflfaucet", true), ("site_id=clickforcharity", false), ("", false)] {
        let reply =
            Reply::from(client().get(format!("{}/api/changes?{query}", hub.url)).send().await.unwrap()).await;
        let changes = reply.assert_ok()["changes"].as_array().unwrap().clone();
        assert_eq!(records(&changes), [("dev-user".to_owned(), "balance".to_owned())], "{query}");
        assert_eq!(changes[0]["own"], own, "{query}");
    }
    hub.stop().await;
}

#[tokio::test]
async fn a_cursor_reads_on_after_a_restart_repeating_nothing() {
    let first = TestHub::start().await;
    for user in ["r-1", "r-2"] {
        first.site(SITE, user).delta("balance", 1, &format!("{user}-op")).await.assert_ok();
    }
    let (before, cursor) = Feed::of(&first, SITE).drain(None, 100).await;
    assert_eq!(before.len(), 2);
    let data = first.stop().await;

    let second = TestHub::start_with(|c| c.data_dir = data.path().to_path_buf()).await;
    let feed = Feed::of(&second, SITE);
    assert_eq!(
        feed.page(&format!("cursor={cursor}")).await["changes"],
        json!([]),
        "read again after a restart"
    );
    second.site(SITE, "r-3").delta("balance", 1, "r-3-op").await.assert_ok();
    second.site(SITE, "r-1").delta("balance", 1, "r-1-again").await.assert_ok();
    let (after, _) = feed.drain(Some(&cursor), 100).await;
    assert_eq!(
        records(&after),
        [("r-3".to_owned(), "balance".to_owned()), ("r-1".to_owned(), "balance".to_owned())],
        "{after:?}"
    );
    assert_eq!(after[1]["version"], 2);
    second.stop().await;
}
