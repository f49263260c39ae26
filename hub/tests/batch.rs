//! `action=batch`, over real HTTP: several pushes and deltas of one user applied in the
//! order given, each exactly once and answered as if sent alone; the batch refused whole
//! when it is malformed or over the rate limit; stopped, in order, at the first op that fails
//! for a reason worth retrying; and who may do what checked op by op, as for single writes.

mod support;

use serde_json::{Value, json};
use support::authority::{FAUCET, USER, deployment, grant, grant_claims};
use support::{Reply, SiteClient, TestHub};

const SITE: &str = "roflfaucet";

fn delta(op_id: &str, coins: i64) -> Value {
    json!({"action": "delta", "op_id": op_id, "data_type": "balance", "delta": {"coins": coins}})
}

fn push(op_id: &str, data_type: &str, data: Value) -> Value {
    json!({"action": "push", "op_id": op_id, "data_type": data_type, "data": data})
}

async fn batch(client: &SiteClient, ops: Vec<Value>) -> Reply {
    client.post(&json!({"action": "batch", "user_id": client.user, "site_id": client.site, "ops": ops})).await
}

/// Each result's (status, code or "ok", op_id).
fn outcomes(reply: &Reply) -> Vec<(u64, String, String)> {
    reply.assert_ok()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let code = r["code"].as_str().unwrap_or("ok").to_owned();
            (r["status"].as_u64().unwrap(), code, r["op_id"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_batch_applies_its_ops_in_order_each_exactly_once() {
    let hub = TestHub::start().await;
    let faucet = hub.site(SITE, USER);
    faucet.delta("balance", 5, "seed").await.assert_ok();
    // +10 then −15 on a balance of 5: in this order, and only in this order, both go through.
    let ops = vec![delta("plus", 10), delta("minus", -15), push("bio", "profile", json!({"bio": "left"}))];
    let reply = batch(&faucet, ops.clone()).await;
    assert_eq!(
        outcomes(&reply),
        [
            (200, "ok".into(), "plus".into()),
            (200, "ok".into(), "minus".into()),
            (200, "ok".into(), "bio".into())
        ]
    );
    let results = &reply.body["results"];
    assert_eq!(
        (results[0]["data"]["coins"].clone(), results[1]["data"]["coins"].clone()),
        (json!(15), json!(0))
    );
    assert_eq!(results[2]["data"]["bio"], "left");
    // Sent again (a page that never saw the answer), every op replays and nothing changes.
    let before = hub.snapshot();
    let again = batch(&faucet, ops).await;
    assert!(
        again.body["results"].as_array().unwrap().iter().all(|r| r["replayed"] == true),
        "{}",
        again.body
    );
    assert_eq!(hub.snapshot(), before);
    // Each op is the op it would be alone: sent alone, it replays too.
    assert_eq!(faucet.delta("balance", -15, "minus").await.assert_ok()["replayed"], true);
}

#[tokio::test]
async fn final_refusals_are_answered_op_by_op_and_do_not_stop_the_batch() {
    let hub = TestHub::start().await;
    let faucet = hub.site(SITE, USER);
    faucet.delta("balance", 5, "seed").await.assert_ok();
    let reply = batch(
        &faucet,
        vec![
            delta("too-much", -100),
            push("name", "profile", json!({"display_name": "Evans"})),
            push("bad", "profile", json!({"email": "x@example.org"})),
            delta("fine", -5),
        ],
    )
    .await;
    assert_eq!(
        outcomes(&reply),
        [
            (409, "insufficient_funds".into(), "too-much".into()),
            (200, "ok".into(), "name".into()),
            (400, "unknown_field".into(), "bad".into()),
            (200, "ok".into(), "fine".into()),
        ]
    );
    assert_eq!(reply.body["results"][0]["current"]["data"]["coins"], 5, "the refusal carries the record");
    // The remembered refusal stays the op's answer, in a batch or alone.
    faucet.delta("balance", -100, "too-much").await.assert_refused(409, "insufficient_funds");
    assert_eq!(faucet.coins().await, 0);
}

#[tokio::test]
async fn a_malformed_batch_is_refused_whole_and_applies_nothing() {
    let hub = TestHub::start().await;
    let faucet = hub.site(SITE, USER);
    faucet.delta("balance", 50, "seed").await.assert_ok();
    let before = hub.snapshot();
    let thirty_three: Vec<Value> = (0..33).map(|i| delta(&format!("op-{i}"), -1)).collect();
    let nested = json!({"action": "batch", "ops": [delta("inner", -1)]});
    let mut other_user = delta("u", -1);
    other_user["user_id"] = json!("13-alice");
    let mut other_site = delta("s", -1);
    other_site["site_id"] = json!("clickforcharity");
    let mut same_user = delta("same", -1);
    same_user["user_id"] = json!(USER);
    let no_op_id = json!({"action": "push", "data_type": "profile", "data": {"bio": "x"}});
    let timestamp = json!({"action": "timestamp", "op_id": "t", "data_type": "balance"});
    let cases = [
        ("no ops", vec![], "invalid_batch"),
        ("33 ops", thirty_three, "invalid_batch"),
        ("a nested batch", vec![delta("first", -1), nested], "invalid_batch"),
        ("a read inside", vec![timestamp], "invalid_batch"),
        ("another user inside", vec![delta("first", -1), other_user], "invalid_batch"),
        ("another site inside", vec![other_site], "invalid_batch"),
        ("an op without op_id", vec![delta("first", -1), no_op_id], "missing_field"),
    ];
    for (case, ops, code) in cases {
        let reply = batch(&faucet, ops).await;
        assert_eq!((reply.status.as_u16(), reply.code()), (400, code), "{case}: {}", reply.body);
        assert_eq!(hub.snapshot(), before, "{case}: the store changed");
    }
    // The body limit applies to the whole.
    let mut long = delta("long", -1);
    long["reason"] = json!("x".repeat(70_000));
    let reply = batch(&faucet, vec![long]).await;
    assert_eq!((reply.status.as_u16(), reply.code()), (413, "body_too_large"), "{}", reply.body);
    assert_eq!(hub.snapshot(), before);
    // Naming the batch's own user inside is allowed.
    assert_eq!(outcomes(&batch(&faucet, vec![same_user]).await)[0].0, 200);
    // An op with a field twice is as ambiguous inside a batch as alone.
    let twice = format!(
        r#"{{"action":"batch","user_id":"{USER}","site_id":"{SITE}","ops":[{{"action":"delta","op_id":"d","data_type":"balance","delta":{{"coins":-1}},"delta":{{"coins":1000}}}}]}}"#
    );
    let raw = faucet
        .client
        .post(format!("{}/api/sync", faucet.url))
        .bearer_auth(faucet.token.as_ref().unwrap())
        .header("content-type", "application/json")
        .body(twice)
        .send()
        .await
        .unwrap();
    Reply::from(raw).await.assert_refused(400, "invalid_request");
}

#[tokio::test]
async fn the_rate_limit_counts_each_op_and_refuses_a_batch_whole() {
    let hub = TestHub::start_with(|c| c.limits.requests_per_minute = 10).await;
    let faucet = hub.site(SITE, USER);
    faucet.delta("balance", 50, "seed").await.assert_ok();
    let ops = |from: usize, n: usize| (from..from + n).map(|i| delta(&format!("op-{i}"), -1)).collect();
    assert!(outcomes(&batch(&faucet, ops(0, 7)).await).iter().all(|o| o.0 == 200));
    let before = hub.snapshot();
    // 8 requests counted: a batch of 3 more does not fit, and none of its ops is applied. Its
    // admission, before its body told how many ops it holds, counted one request: 9.
    let refused = batch(&faucet, ops(7, 3)).await;
    refused.assert_refused(429, "rate_limited");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(hub.snapshot(), before);
    assert!(outcomes(&batch(&faucet, ops(7, 1)).await).iter().all(|o| o.0 == 200), "1 fits");
    faucet.timestamp("balance").await.assert_refused(429, "rate_limited");
}

#[tokio::test]
async fn a_batch_stops_at_the_first_op_the_store_cannot_take_and_resent_keeps_its_order() {
    let hub = TestHub::start().await;
    let faucet = hub.site(SITE, USER);
    faucet.delta("balance", 5, "seed").await.assert_ok();
    let ops = vec![delta("plus", 10), delta("minus", -15)];
    // Another process holds the database's write lock past the writer's patience.
    let blocker = rusqlite::Connection::open(hub.dir.path().join("hub.sqlite3")).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE; DELETE FROM ops WHERE 0;").unwrap();
    let reply = batch(&faucet, ops.clone()).await;
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(
        outcomes(&reply),
        [(503, "store_unavailable".into(), "plus".into()), (503, "not_attempted".into(), "minus".into())]
    );
    assert_eq!(faucet.coins().await, 5, "nothing was applied");
    let again = batch(&faucet, ops).await;
    assert_eq!(outcomes(&again), [(200, "ok".into(), "plus".into()), (200, "ok".into(), "minus".into())]);
    assert_eq!(faucet.coins().await, 0);
}

#[tokio::test]
async fn a_pages_batch_holds_only_what_its_token_may_do_alone() {
    let hub = TestHub::start_with(deployment).await;
    hub.site(FAUCET, USER).delta("balance", 100, "seed").await.assert_ok();
    let page = hub.page(FAUCET, USER);
    let before = hub.snapshot();
    let mut credit_with_grant = delta("claim-1", 10);
    credit_with_grant["grant"] = json!(grant(FAUCET, &grant_claims(FAUCET, USER, "claim-1", 10)));
    let mut wrong_grant = delta("claim-2", 10);
    wrong_grant["grant"] = json!(grant(FAUCET, &grant_claims(FAUCET, USER, "claim-1", 10)));
    let reply = batch(
        &page,
        vec![
            push("set", "balance", json!({"coins": 1_000_000})),
            delta("mint", 1_000),
            push("roles", "roles", json!({"site_roles": {FAUCET: ["moderator"]}})),
            push("admin", "roles", json!({"global_roles": ["admin"]})),
            wrong_grant,
        ],
    )
    .await;
    assert_eq!(
        outcomes(&reply),
        [
            (403, "insufficient_scope".into(), "set".into()),
            (403, "insufficient_scope".into(), "mint".into()),
            (403, "insufficient_scope".into(), "roles".into()),
            (403, "admin_required".into(), "admin".into()),
            (403, "grant_invalid".into(), "claim-2".into()),
        ]
    );
    assert_eq!(hub.snapshot(), before, "a refused op stored something");
    // What the page may do alone, it may do in a batch: spend, and credit with its grant.
    let reply = batch(&page, vec![delta("spend", -30), credit_with_grant]).await;
    assert_eq!(outcomes(&reply), [(200, "ok".into(), "spend".into()), (200, "ok".into(), "claim-1".into())]);
    assert_eq!(page.coins().await, 80);
}
