//! Every action and data type over real HTTP against a real hub and SQLite file: the
//! documented answer shapes, versions, comma lists, ETag/304, the epoch, and the seed
//! design's own request examples.

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::TestHub;

#[tokio::test]
async fn a_never_written_record_is_version_0_with_empty_data() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    let stamp = faucet.timestamp("balance").await;
    let body = stamp.assert_ok();
    assert_eq!(body["data_type"], "balance");
    assert_eq!(body["version"], 0);
    assert_eq!(body["last_updated"], Value::Null);
    assert!(body["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    let all = faucet.get("balance,points,profile,roles,settings").await;
    let records = &all.assert_ok()["records"];
    assert_eq!(records["balance"]["data"], json!({"coins": 0}));
    assert_eq!(records["points"]["data"], json!({"points": 0}));
    assert_eq!(records["profile"]["data"], json!({}));
    assert_eq!(records["roles"]["data"], json!({"global_roles": [], "site_roles": {}}));
    assert_eq!(records["settings"]["data"], json!({}));
}

#[tokio::test]
async fn a_tab_return_check_with_nothing_changed_is_one_small_answer() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.delta("balance", 5, "op-1").await.assert_ok();
    faucet.push("profile", json!({"display_name": "Evans"})).await.assert_ok();
    let check = faucet.timestamp("balance,profile,roles").await;
    let body = check.assert_ok();
    assert!(check.len <= 300, "{} bytes: {body}", check.len);
    assert_eq!(body["timestamps"]["balance"]["version"], 1);
    assert_eq!(body["timestamps"]["profile"]["version"], 1);
    assert_eq!(body["timestamps"]["roles"], json!({"last_updated": null, "version": 0}));
    assert_eq!(check.header("cache-control"), Some("no-store"));
}

#[tokio::test]
async fn balance_and_points_push_absolute_values_and_ledger_them() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    let pushed = faucet.push("balance", json!({"coins": 199})).await;
    let body = pushed.assert_ok();
    assert_eq!((body["version"].clone(), body["data"].clone()), (json!(1), json!({"coins": 199})));
    assert_eq!(body["timestamp"], body["last_updated"]);
    faucet.push("points", json!({"points": 7})).await.assert_ok();
    let records = faucet.get("balance,points").await;
    assert_eq!(records.assert_ok()["records"]["points"]["data"], json!({"points": 7}));
    let ledger: Vec<String> = hub.snapshot().into_iter().filter(|r| r.contains("||")).collect();
    assert_eq!(ledger, vec!["8-evans|balance||199|199", "8-evans|points||7|7"]);
}

#[tokio::test]
async fn pushing_an_unchanged_value_keeps_the_version() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.push("profile", json!({"bio": "same"})).await.assert_ok();
    let again = faucet.push("profile", json!({"bio": "same"})).await;
    assert_eq!(again.assert_ok()["version"], 1);
}

#[tokio::test]
async fn base_version_guards_an_absolute_push() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.push("balance", json!({"coins": 10})).await.assert_ok();
    let base = |v: u64, coins: i64| {
        json!({"action": "push", "user_id": "8-evans", "site_id": "roflfaucet", "data_type": "balance",
               "data": {"coins": coins}, "base_version": v})
    };
    faucet.post(&base(1, 20)).await.assert_ok();
    let stale = faucet.post(&base(1, 30)).await;
    stale.assert_refused(409, "version_conflict");
    assert_eq!(stale.body["current"]["version"], 2);
    assert_eq!(stale.body["current"]["data"], json!({"coins": 20}));
    assert_eq!(faucet.coins().await, 20);
}

#[tokio::test]
async fn profile_and_settings_pushes_are_merge_patches() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.push("profile", json!({"display_name": "Evans", "bio": "Kenya reforestation"})).await.assert_ok();
    let merged = faucet.push("profile", json!({"bio": null, "avatar": "👤", "location": "Kenya"})).await;
    assert_eq!(
        merged.assert_ok()["data"],
        json!({"display_name": "Evans", "avatar": "👤", "location": "Kenya"})
    );
    faucet.push("settings", json!({"theme": "dark", "sound": true})).await.assert_ok();
    let settings = faucet.push("settings", json!({"sound": null, "volume": 3})).await;
    assert_eq!(settings.assert_ok()["data"], json!({"theme": "dark", "volume": 3}));
    assert_eq!(settings.body["version"], 2);
}

#[tokio::test]
async fn each_site_writes_its_own_site_roles_and_an_admin_writes_global_roles() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    let charity = hub.site("clickforcharity", "8-evans");
    faucet.push("roles", json!({"site_roles": {"roflfaucet": ["recipient"]}})).await.assert_ok();
    charity.push("roles", json!({"site_roles": {"clickforcharity": ["member"]}})).await.assert_ok();
    let mut admin = hub.site("wrc", "8-evans");
    admin.token = Some(hub.admin_token("wrc", "8-evans"));
    let roles = admin.push("roles", json!({"global_roles": ["verified"]})).await;
    assert_eq!(
        roles.assert_ok()["data"],
        json!({"global_roles": ["verified"], "site_roles": {"roflfaucet": ["recipient"], "clickforcharity": ["member"]}})
    );
}

#[tokio::test]
async fn deltas_are_idempotent_by_op_id() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    let first = faucet.delta("balance", 10, "op-a").await;
    assert_eq!(first.assert_ok()["data"], json!({"coins": 10}));
    assert!(first.body.get("replayed").is_none());
    faucet.delta("balance", 5, "op-b").await.assert_ok();
    let again = faucet.delta("balance", 10, "op-a").await;
    assert_eq!(again.assert_ok()["replayed"], true);
    assert_eq!((again.body["version"].clone(), again.body["data"].clone()), (json!(1), json!({"coins": 10})));
    faucet.delta("balance", 11, "op-a").await.assert_refused(422, "op_id_reused");
    assert_eq!(faucet.coins().await, 15);
}

#[tokio::test]
async fn a_delta_below_zero_is_refused_and_changes_nothing() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.delta("points", 3, "earn").await.assert_ok();
    let before = hub.snapshot();
    let spend = faucet.delta("points", -4, "spend").await;
    spend.assert_refused(409, "insufficient_funds");
    assert_eq!(spend.body["current"]["data"], json!({"points": 3}));
    // Records and ledger are untouched; the op id keeps its answer.
    let after = hub.snapshot();
    assert_eq!(after.iter().filter(|row| !before.contains(row)).count(), 1);
    assert!(after.iter().any(|row| row.starts_with("8-evans|spend|")), "{after:?}");
    assert!(before.iter().all(|row| after.contains(row)));
}

#[tokio::test]
async fn a_refused_spend_stays_refused_when_a_copy_arrives_after_funds_do() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.delta("balance", 3, "earn").await.assert_ok();
    faucet.delta("balance", -4, "spend").await.assert_refused(409, "insufficient_funds");
    faucet.delta("balance", 5, "earn-2").await.assert_ok();
    // A retry or a delayed duplicate of the refused op gets the same answer, with the
    // balance it was refused against, and is never applied behind the client's back.
    let copy = faucet.delta("balance", -4, "spend").await;
    copy.assert_refused(409, "insufficient_funds");
    assert_eq!(copy.body["current"]["data"], json!({"coins": 3}));
    assert_eq!(faucet.coins().await, 8);
    // The user can still spend, as a new operation.
    faucet.delta("balance", -4, "spend-again").await.assert_ok();
    assert_eq!(faucet.coins().await, 4);
}

#[tokio::test]
async fn a_stale_push_with_an_op_id_stays_a_conflict() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    let push = |coins: i64, base: u64, op: &str| {
        json!({"action": "push", "user_id": "8-evans", "site_id": "roflfaucet", "data_type": "balance",
               "data": {"coins": coins}, "base_version": base, "op_id": op})
    };
    faucet.post(&push(10, 0, "first")).await.assert_ok();
    faucet.post(&push(20, 0, "stale")).await.assert_refused(409, "version_conflict");
    faucet.post(&push(30, 1, "second")).await.assert_ok();
    let copy = faucet.post(&push(20, 0, "stale")).await;
    copy.assert_refused(409, "version_conflict");
    assert_eq!(copy.body["current"]["version"], 1);
    assert_eq!(faucet.coins().await, 30);
}

#[tokio::test]
async fn ledger_rows_record_op_site_delta_and_result() {
    let hub = TestHub::start().await;
    hub.site("roflfaucet", "8-evans").delta("balance", 10, "op-1").await.assert_ok();
    hub.site("clickforcharity", "8-evans").delta("balance", -3, "op-2").await.assert_ok();
    let conn = rusqlite::Connection::open(hub.dir.path().join("hub.sqlite3")).unwrap();
    let rows: Vec<(String, String, i64, i64)> = conn
        .prepare("SELECT site_id, op_id, delta, result FROM ledger ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        rows,
        vec![("roflfaucet".into(), "op-1".into(), 10, 10), ("clickforcharity".into(), "op-2".into(), -3, 7)]
    );
}

#[tokio::test]
async fn a_single_get_carries_an_etag_of_its_epoch_and_version_and_answers_304_when_it_matches() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.push("profile", json!({"bio": "v1"})).await.assert_ok();
    let got = faucet.get("profile").await;
    let epoch = got.body["epoch"].as_str().unwrap().to_owned();
    let tag = |version: u64| format!("\"{epoch}-{version}\"");
    assert_eq!(got.header("etag"), Some(tag(1).as_str()));
    assert_eq!(got.header("cache-control"), Some("no-store"), "a browser's cache must not revalidate it");
    let url = format!("{}/api/sync.php?action=get&user_id=8-evans&data_type=profile", hub.url);
    let token = faucet.token.clone().unwrap();
    let conditional =
        |tag: String| support::client().get(&url).bearer_auth(&token).header("If-None-Match", tag).send();
    let same = support::Reply::from(conditional(tag(1)).await.unwrap()).await;
    assert_eq!(same.status, 304);
    assert_eq!(same.len, 0);
    assert_eq!(same.header("etag"), Some(tag(1).as_str()));
    assert_eq!(same.header("cache-control"), Some("no-store"), "nor keep the 304");
    let weak = support::Reply::from(conditional(format!("W/{}, W/{}", tag(0), tag(1))).await.unwrap()).await;
    assert_eq!(weak.status, 304);
    // The same version of another database (a restore's, a version-only tag) is no match.
    for other in ["\"1\"".to_owned(), "\"AAAAAAAAAAAAAAAA-1\"".to_owned()] {
        let other_database = support::Reply::from(conditional(other.clone()).await.unwrap()).await;
        assert_eq!(other_database.assert_ok()["data"]["bio"], "v1", "{other}");
    }
    faucet.push("profile", json!({"bio": "v2"})).await.assert_ok();
    let changed = support::Reply::from(conditional(tag(1)).await.unwrap()).await;
    assert_eq!(changed.assert_ok()["data"]["bio"], "v2");
    assert_eq!(changed.header("etag"), Some(tag(2).as_str()));
}

#[tokio::test]
async fn last_updated_has_milliseconds_and_grows_with_every_write() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    let mut previous = String::new();
    for i in 1..=20 {
        let answer = faucet.delta("balance", 1, &format!("op-{i}")).await;
        let stamp = answer.assert_ok()["last_updated"].as_str().unwrap().to_owned();
        assert_eq!(stamp.len(), "2025-11-09T18:45:30.123Z".len(), "{stamp}");
        assert!(stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.', "{stamp}");
        assert!(stamp > previous, "{stamp} after {previous}");
        previous = stamp;
    }
}

#[tokio::test]
async fn the_epoch_survives_a_restart_and_differs_between_databases() {
    let hub = TestHub::start().await;
    let epoch = hub.site("roflfaucet", "u").timestamp("balance").await.body["epoch"].clone();
    let other = TestHub::start().await;
    assert_ne!(other.site("roflfaucet", "u").timestamp("balance").await.body["epoch"], epoch);
    let dir = hub.stop().await;
    let config = support::test_config(dir.path());
    let reopened = hub::App::open(config).unwrap();
    assert_eq!(reopened.domain().epoch(), epoch.as_str().unwrap());
}

#[tokio::test]
async fn both_paths_serve_the_api_and_every_answer_has_a_request_id() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    let token = faucet.token.clone().unwrap();
    for path in ["/api/sync.php", "/api/sync"] {
        let url = format!("{}{path}?action=timestamp&user_id=8-evans&data_type=balance", hub.url);
        let reply =
            support::Reply::from(support::client().get(url).bearer_auth(&token).send().await.unwrap()).await;
        reply.assert_ok();
        assert!(reply.header("x-request-id").is_some_and(|id| !id.is_empty()));
    }
    let refused = support::Reply::from(hub.request(Method::GET, "/nowhere").send().await.unwrap()).await;
    refused.assert_refused(404, "not_found");
    assert!(refused.header("x-request-id").is_some());
}

#[tokio::test]
async fn healthz_reports_a_working_store() {
    let hub = TestHub::start().await;
    let reply = support::Reply::from(hub.request(Method::GET, "/healthz").send().await.unwrap()).await;
    assert_eq!(reply.assert_ok()["status"], "ok");
}

/// The seed design's JavaScript and curl calls, unchanged, against a hub with auth off
/// (allowed on loopback only): the documented fields are all there.
mod seed_examples {
    use super::*;

    async fn open_hub() -> TestHub {
        TestHub::start_with(|c| c.auth = false).await
    }

    #[tokio::test]
    async fn check_timestamp() {
        let hub = open_hub().await;
        let reply = support::Reply::from(
            hub.request(Method::GET, "/api/sync.php?action=timestamp&user_id=8-evans&data_type=profile")
                .send()
                .await
                .unwrap(),
        )
        .await;
        let body = reply.assert_ok();
        assert_eq!(body["data_type"], "profile");
        assert!(body.get("last_updated").is_some());
    }

    #[tokio::test]
    async fn push_then_fetch_full_data() {
        let hub = open_hub().await;
        let push = hub
            .request(Method::POST, "/api/sync.php")
            .header("Content-Type", "application/json")
            .body(
                json!({
                    "action": "push",
                    "user_id": "8-evans",
                    "site_id": "roflfaucet",
                    "data_type": "profile",
                    "data": {
                        "display_name": "New Name",
                        "bio": "Updated bio"
                    }
                })
                .to_string(),
            )
            .send()
            .await
            .unwrap();
        let pushed = support::Reply::from(push).await;
        let timestamp = pushed.assert_ok()["timestamp"].as_str().unwrap().to_owned();
        let get = support::Reply::from(
            hub.request(Method::GET, "/api/sync.php?action=get&user_id=8-evans&data_type=profile")
                .send()
                .await
                .unwrap(),
        )
        .await;
        let body = get.assert_ok();
        assert_eq!(body["data"], json!({"display_name": "New Name", "bio": "Updated bio"}));
        assert_eq!(body["last_updated"], timestamp.as_str());
    }

    #[tokio::test]
    async fn roflfaucet_balance_check_with_site_id() {
        let hub = open_hub().await;
        let reply = support::Reply::from(
            hub.request(
                Method::GET,
                "/api/sync.php?action=timestamp&user_id=8-evans&data_type=balance&site_id=roflfaucet",
            )
            .send()
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(reply.assert_ok()["data_type"], "balance");
    }

    #[tokio::test]
    async fn the_seed_string_comparison_of_last_updated_sees_a_newer_write() {
        let hub = open_hub().await;
        let faucet = hub.site("roflfaucet", "8-evans");
        faucet.push("balance", json!({"coins": 1})).await.assert_ok();
        let local = faucet.timestamp("balance").await.body["last_updated"].as_str().unwrap().to_owned();
        faucet.push("balance", json!({"coins": 2})).await.assert_ok();
        let server = faucet.timestamp("balance").await.body["last_updated"].as_str().unwrap().to_owned();
        // `if (data.last_updated > this.localTimestamp)` in the seed's SyncManager.
        assert!(server > local, "{server} vs {local}");
    }
}

#[tokio::test]
async fn reads_are_answered_while_the_writer_waits_for_the_database() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.delta("balance", 10, "op-1").await.assert_ok();
    // Another process holds the write lock: the hub's writer must wait for it.
    let blocker = rusqlite::Connection::open(hub.dir.path().join("hub.sqlite3")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE; DELETE FROM ops WHERE 0;").unwrap();
    let pending = tokio::spawn({
        let faucet = faucet.clone();
        async move { faucet.delta("balance", 5, "op-2").await }
    });
    assert_eq!(faucet.coins().await, 10);
    faucet.timestamp("balance,profile").await.assert_ok();
    blocker.execute_batch("ROLLBACK").unwrap();
    let applied = pending.await.unwrap();
    assert_eq!(applied.assert_ok()["data"], json!({"coins": 15}));
}

/// A UUIDv7 op id dated `ms` after the Unix epoch.
fn uuid7(ms: i64) -> String {
    let hex = format!("{ms:012x}");
    format!("{}-{}-7abc-9def-0123456789ab", &hex[..8], &hex[8..])
}

#[tokio::test]
async fn an_op_dated_before_what_the_hub_remembers_is_refused_and_never_applied() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.delta("balance", 10, "seed").await.assert_ok();
    let now = i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
    )
    .unwrap();
    let before = hub.snapshot();
    // The hub remembers op ids for 30 days (the default): one made 31 days ago may have been
    // applied and forgotten.
    let old = uuid7(now - 31 * 86_400_000);
    faucet.delta("balance", -5, &old).await.assert_refused(422, "op_expired");
    let push = json!({"action": "push", "user_id": "8-evans", "site_id": "roflfaucet",
        "data_type": "profile", "data": {"bio": "old"}, "op_id": old});
    faucet.post(&push).await.assert_refused(422, "op_expired");
    assert_eq!(hub.snapshot(), before, "an expired op stored something");
    // Made a day ago, or named in another shape: applied as always.
    faucet.delta("balance", -5, &uuid7(now - 86_400_000)).await.assert_ok();
    faucet.delta("balance", -1, "not-a-uuid").await.assert_ok();
    assert_eq!(faucet.coins().await, 4);
}
