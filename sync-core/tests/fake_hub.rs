//! The fake hub answers as the real hub does: these pin the semantics the engine's tests
//! rely on (replays, op id reuse, refusals kept for good, ETag/304, tokens, grants).

mod support;

use serde_json::{Value, json};
use support::hub::{FakeHub, GRANT_TTL_MS, Mode, rfc3339_ms};
use support::{START_MS, USER};
use sync_core::{DataType, Json, Method, Reply, Request};

fn post(id: u64, token: Option<&str>, body: Value) -> Request {
    Request {
        id,
        method: Method::Post,
        query: None,
        body: Some(Json::from(&body)),
        if_none_match: None,
        token: token.map(str::to_owned),
        keepalive: false,
    }
}

fn get(id: u64, token: Option<&str>, query: &str, if_none_match: Option<&str>) -> Request {
    Request {
        id,
        method: Method::Get,
        query: Some(query.into()),
        body: None,
        if_none_match: if_none_match.map(str::to_owned),
        token: token.map(str::to_owned),
        keepalive: false,
    }
}

fn delta(op_id: &str, coins: i64) -> Value {
    json!({"action":"delta","user_id":USER,"site_id":"roflfaucet","data_type":"balance",
           "delta":{"coins":coins},"op_id":op_id,"reason":"game"})
}

/// A credit with a grant the site minted for it at `now`.
fn credit(hub: &mut FakeHub, now: u64, op_id: &str, coins: i64) -> Value {
    let grant = hub.mint_grant(now, "roflfaucet", USER, op_id, DataType::Balance, coins);
    with_grant(delta(op_id, coins), &grant)
}

fn with_grant(mut body: Value, grant: &str) -> Value {
    body["grant"] = json!(grant);
    body
}

fn answer(reply: Reply) -> (u16, Value) {
    match reply {
        Reply::Answer { status, body, .. } => (status, Value::from(&body)),
        Reply::NetworkError => panic!("no answer"),
    }
}

fn hub_with_token() -> (FakeHub, String) {
    let mut hub = FakeHub::new("epoch-1");
    let token = hub.mint_token("roflfaucet", USER);
    (hub, token)
}

#[test]
fn last_updated_is_rfc_3339_with_milliseconds() {
    assert_eq!(rfc3339_ms(START_MS), "2025-11-09T18:45:30.123Z");
    assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
}

#[test]
fn a_repeated_delta_answers_the_first_result_again_and_applies_once() {
    let (mut hub, token) = hub_with_token();
    let body = credit(&mut hub, START_MS, "op-1", 10);
    let (status, first) = answer(hub.handle(START_MS, &post(1, Some(&token), body.clone())));
    assert_eq!(
        (status, first["data"]["coins"].as_i64(), first["version"].as_u64()),
        (200, Some(10), Some(1))
    );
    let other = credit(&mut hub, START_MS, "op-2", 5);
    answer(hub.handle(START_MS + 1, &post(2, Some(&token), other)));
    let (status, again) = answer(hub.handle(START_MS + 2, &post(3, Some(&token), body)));
    assert_eq!(status, 200);
    assert_eq!(again["replayed"], json!(true));
    assert_eq!((again["data"]["coins"].as_i64(), again["version"].as_u64()), (Some(10), Some(1)));
    assert_eq!(hub.applied("op-1"), 1);
    assert_eq!(hub.record(USER, DataType::Balance).data, json!({"coins": 15}));
    let changed = credit(&mut hub, START_MS, "op-1", 11);
    let (status, reused) = answer(hub.handle(START_MS + 3, &post(4, Some(&token), changed)));
    assert_eq!((status, reused["code"].as_str()), (422, Some("op_id_reused")));
}

#[test]
fn a_refused_delta_carries_the_current_record_and_stays_refused() {
    let (mut hub, token) = hub_with_token();
    let body = credit(&mut hub, START_MS, "op-1", 10);
    answer(hub.handle(START_MS, &post(1, Some(&token), body)));
    let (status, refused) = answer(hub.handle(START_MS, &post(2, Some(&token), delta("op-2", -20))));
    assert_eq!((status, refused["code"].as_str()), (409, Some("insufficient_funds")));
    assert_eq!(refused["current"]["data"], json!({"coins": 10}));
    let body = credit(&mut hub, START_MS, "op-3", 10);
    answer(hub.handle(START_MS, &post(3, Some(&token), body)));
    let (status, later) = answer(hub.handle(START_MS, &post(4, Some(&token), delta("op-2", -20))));
    assert_eq!((status, later["code"].as_str()), (409, Some("insufficient_funds")));
    assert_eq!(later["current"]["data"], json!({"coins": 10}));
    assert_eq!(hub.applied("op-2"), 0);
    assert_eq!(hub.record(USER, DataType::Balance).data, json!({"coins": 20}));
}

#[test]
fn a_get_with_a_matching_etag_is_answered_304() {
    let (mut hub, token) = hub_with_token();
    hub.write(START_MS, USER, DataType::Balance, json!({"coins": 7}));
    let query = format!("action=get&user_id={USER}&data_type=balance");
    let reply = hub.handle(START_MS, &get(1, Some(&token), &query, None));
    let Reply::Answer { etag, .. } = &reply else { panic!("no answer") };
    assert_eq!(etag.as_deref(), Some("\"epoch-1-1\""), "the epoch and the version");
    let (status, body) = answer(reply);
    assert_eq!((status, body["version"].as_u64(), body["epoch"].as_str()), (200, Some(1), Some("epoch-1")));
    let (status, _) = answer(hub.handle(START_MS, &get(2, Some(&token), &query, Some("\"1\""))));
    assert_eq!(status, 200, "a tag without the epoch names no record of this database");
    let reply = hub.handle(START_MS, &get(3, Some(&token), &query, Some("\"epoch-1-1\"")));
    let Reply::Answer { status, body, date, .. } = reply else { panic!("no answer") };
    assert_eq!((status, body), (304, Json::Null));
    assert_eq!(date, Some(START_MS / 1000 * 1000), "every answer is dated, in whole seconds");
}

#[test]
fn a_check_lists_every_type_with_the_epoch() {
    let (mut hub, token) = hub_with_token();
    hub.write(START_MS, USER, DataType::Balance, json!({"coins": 7}));
    let query = format!("action=timestamp&user_id={USER}&data_type=balance,profile");
    let (status, body) = answer(hub.handle(START_MS, &get(1, Some(&token), &query, None)));
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"success":true,"epoch":"epoch-1","timestamps":{
            "balance":{"version":1,"last_updated":"2025-11-09T18:45:30.123Z"},
            "profile":{"version":0,"last_updated":null}}})
    );
}

#[test]
fn tokens_modes_and_merge_patches() {
    let (mut hub, token) = hub_with_token();
    let push = |bio: Value| {
        json!({"action":"push","user_id":USER,"site_id":"roflfaucet","data_type":"profile",
               "data":{"bio":bio,"display_name":"Evans"},"op_id":"p-1"})
    };
    assert_eq!(answer(hub.handle(START_MS, &post(1, None, push(json!("Hi"))))).0, 401);
    assert_eq!(answer(hub.handle(START_MS, &post(2, Some("forged"), push(json!("Hi"))))).0, 401);
    let other_site = hub.mint_token("clickforcharity", USER);
    assert_eq!(answer(hub.handle(START_MS, &post(3, Some(&other_site), push(json!("Hi"))))).0, 403);
    let (status, pushed) = answer(hub.handle(START_MS, &post(4, Some(&token), push(json!("Hi")))));
    assert_eq!((status, pushed["data"].clone()), (200, json!({"bio":"Hi","display_name":"Evans"})));
    hub.script([Mode::Down, Mode::Busy { retry_after: 7 }, Mode::Unavailable]);
    assert_eq!(hub.handle(START_MS, &post(5, Some(&token), push(json!("Hi")))), Reply::NetworkError);
    let Reply::Answer { status, retry_after, .. } =
        hub.handle(START_MS, &post(6, Some(&token), push(json!("Hi"))))
    else {
        panic!("busy answers")
    };
    assert_eq!((status, retry_after), (429, Some(7)));
    assert_eq!(answer(hub.handle(START_MS, &post(7, Some(&token), push(json!("Hi"))))).0, 503);
    let (status, replayed) = answer(hub.handle(START_MS, &post(8, Some(&token), push(json!("Hi")))));
    assert_eq!((status, replayed["replayed"].clone()), (200, json!(true)));
    hub.expire_tokens();
    assert_eq!(answer(hub.handle(START_MS, &post(9, Some(&token), push(json!("Hi"))))).0, 401);
}

#[test]
fn a_credit_without_a_grant_is_refused_for_insufficient_scope_and_a_spend_needs_none() {
    let (mut hub, token) = hub_with_token();
    hub.write(START_MS, USER, DataType::Balance, json!({"coins": 10}));
    let (status, refused) = answer(hub.handle(START_MS, &post(1, Some(&token), delta("op-1", 10))));
    assert_eq!((status, refused["code"].as_str()), (403, Some("insufficient_scope")));
    assert_eq!(hub.applied("op-1"), 0);
    assert_eq!(answer(hub.handle(START_MS, &post(2, Some(&token), delta("op-2", -3)))).0, 200);
    assert_eq!(hub.record(USER, DataType::Balance).data, json!({"coins": 7}));
}

#[test]
fn a_grant_credits_only_its_own_site_user_op_data_type_and_amount() {
    let (mut hub, token) = hub_with_token();
    let code = |hub: &mut FakeHub, body: Value| {
        answer(hub.handle(START_MS, &post(1, Some(&token), body))).1["code"].clone()
    };
    let mut other_user =
        hub.mint_grant(START_MS, "roflfaucet", "someone-else", "op-1", DataType::Balance, 10);
    assert_eq!(code(&mut hub, with_grant(delta("op-1", 10), &other_user)), json!("grant_invalid"));
    for grant in [
        hub.mint_grant(START_MS, "clickforcharity", USER, "op-1", DataType::Balance, 10),
        hub.mint_grant(START_MS, "roflfaucet", USER, "op-0", DataType::Balance, 10),
        hub.mint_grant(START_MS, "roflfaucet", USER, "op-1", DataType::Points, 10),
        hub.mint_grant(START_MS, "roflfaucet", USER, "op-1", DataType::Balance, 11),
    ] {
        assert_eq!(code(&mut hub, with_grant(delta("op-1", 10), &grant)), json!("grant_invalid"), "{grant}");
    }
    other_user.push('x');
    assert_eq!(code(&mut hub, with_grant(delta("op-1", 10), &other_user)), json!("grant_invalid"), "forged");
    assert_eq!(hub.applied("op-1"), 0);
    assert_eq!(hub.record(USER, DataType::Balance).version, 0);
}

#[test]
fn a_credit_over_the_sites_ceiling_stays_refused_with_the_current_record() {
    let (mut hub, token) = hub_with_token();
    hub.set_max_credit_per_op(5);
    let body = credit(&mut hub, START_MS, "op-1", 10);
    for id in 1..=2 {
        let (status, refused) = answer(hub.handle(START_MS, &post(id, Some(&token), body.clone())));
        assert_eq!((status, refused["code"].as_str()), (403, Some("credit_limit")));
        assert_eq!(refused["current"]["version"], json!(0));
    }
    assert_eq!(hub.applied("op-1"), 0);
}

#[test]
fn a_grant_is_not_a_token() {
    let (mut hub, token) = hub_with_token();
    let grant = hub.mint_grant(START_MS, "roflfaucet", USER, "op-1", DataType::Balance, 10);
    let body = with_grant(delta("op-1", 10), &grant);
    assert_eq!(answer(hub.handle(START_MS, &post(1, Some(&grant), body.clone()))).0, 401);
    assert_eq!(
        answer(hub.handle(START_MS, &post(2, Some(&token), with_grant(delta("op-1", 10), &token)))).0,
        403
    );
    assert_eq!(answer(hub.handle(START_MS, &post(3, Some(&token), body))).0, 200);
}

#[test]
fn an_expired_grant_refuses_a_new_op_but_not_the_replay_of_an_applied_one() {
    let (mut hub, token) = hub_with_token();
    let applied = credit(&mut hub, START_MS, "op-1", 10);
    let late = credit(&mut hub, START_MS, "op-2", 5);
    assert_eq!(answer(hub.handle(START_MS, &post(1, Some(&token), applied.clone()))).0, 200);
    let expired = START_MS + GRANT_TTL_MS;
    let (status, refused) = answer(hub.handle(expired, &post(2, Some(&token), late)));
    assert_eq!((status, refused["code"].as_str()), (403, Some("grant_expired")));
    let (status, replayed) = answer(hub.handle(expired, &post(3, Some(&token), applied)));
    assert_eq!((status, replayed["replayed"].clone()), (200, json!(true)));
    // A grant minted again for the never-applied op is a retry, not a reuse of its op id.
    let regranted = credit(&mut hub, expired, "op-2", 5);
    assert_eq!(answer(hub.handle(expired, &post(4, Some(&token), regranted))).0, 200);
    assert_eq!((hub.applied("op-1"), hub.applied("op-2")), (1, 1));
    assert_eq!(hub.record(USER, DataType::Balance).data, json!({"coins": 15}));
}

fn batch(ops: Vec<Value>) -> Value {
    json!({"action": "batch", "user_id": USER, "site_id": "roflfaucet", "ops": ops})
}

#[test]
fn a_batch_applies_its_ops_in_order_each_answered_as_if_alone() {
    let (mut hub, token) = hub_with_token();
    hub.write(START_MS, USER, DataType::Balance, json!({"coins": 5}));
    let credit = credit(&mut hub, START_MS, "op-1", 10);
    let (status, answer) = answer(hub.handle(
        START_MS,
        &post(1, Some(&token), batch(vec![credit, delta("op-2", -15), delta("op-3", -1)])),
    ));
    assert_eq!((status, answer["success"].clone()), (200, json!(true)));
    let results: Vec<(Value, Value, Value)> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (r["op_id"].clone(), r["status"].clone(), r.get("code").cloned().unwrap_or(r["data"].clone()))
        })
        .collect();
    assert_eq!(
        results,
        [
            (json!("op-1"), json!(200), json!({"coins": 15})),
            (json!("op-2"), json!(200), json!({"coins": 0})),
            (json!("op-3"), json!(409), json!("insufficient_funds")),
        ]
    );
    assert_eq!(hub.record(USER, DataType::Balance).data, json!({"coins": 0}));
    let inner: Vec<(bool, Option<u16>)> =
        hub.seen().iter().filter(|s| s.in_batch).map(|s| (s.in_batch, s.status)).collect();
    assert_eq!(inner, [(true, Some(200)), (true, Some(200)), (true, Some(409))]);
}

#[test]
fn a_batch_stopped_half_way_answers_the_rest_not_attempted() {
    let (mut hub, token) = hub_with_token();
    hub.write(START_MS, USER, DataType::Balance, json!({"coins": 10}));
    hub.fail_next_batch_at(1);
    let ops = vec![delta("op-1", -1), delta("op-2", -2), delta("op-3", -3)];
    let (_, answered) = answer(hub.handle(START_MS, &post(1, Some(&token), batch(ops))));
    let codes: Vec<(Value, Value)> = answered["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["status"].clone(), r["code"].clone()))
        .collect();
    assert_eq!(
        codes,
        [
            (json!(200), Value::Null),
            (json!(503), json!("store_unavailable")),
            (json!(503), json!("not_attempted"))
        ]
    );
    assert_eq!((hub.applied("op-1"), hub.applied("op-2"), hub.applied("op-3")), (1, 0, 0));
    hub.set_refuses_batches(true);
    let (status, refused) =
        answer(hub.handle(START_MS, &post(2, Some(&token), batch(vec![delta("op-2", -2)]))));
    assert_eq!(
        (status, refused["code"].clone()),
        (400, json!("unknown_action")),
        "a hub from before batches"
    );
}

#[test]
fn an_unknown_op_dated_before_the_horizon_is_op_expired_and_a_remembered_one_replays() {
    let (mut hub, token) = hub_with_token();
    hub.write(START_MS, USER, DataType::Balance, json!({"coins": 100}));
    hub.set_retention(60_000);
    let old = protocol::wire::uuid7(START_MS - 61_000, 1, 1);
    let (status, refused) = answer(hub.handle(START_MS, &post(1, Some(&token), delta(&old, -1))));
    assert_eq!((status, refused["code"].clone()), (422, json!("op_expired")));
    assert_eq!(hub.applied(&old), 0);
    // Applied while young, then out of sight: replayed while remembered, expired once forgotten.
    let young = protocol::wire::uuid7(START_MS, 2, 2);
    assert_eq!(answer(hub.handle(START_MS, &post(2, Some(&token), delta(&young, -1)))).0, 200);
    let (status, replayed) = answer(hub.handle(START_MS + 59_000, &post(3, Some(&token), delta(&young, -1))));
    assert_eq!((status, replayed["replayed"].clone()), (200, json!(true)));
    let (status, expired) = answer(hub.handle(START_MS + 61_000, &post(4, Some(&token), delta(&young, -1))));
    assert_eq!((status, expired["code"].clone()), (422, json!("op_expired")));
    assert_eq!(hub.applied(&young), 1);
    // Op ids of other shapes carry no date: forgotten, they are applied as new (today's rule).
    assert_eq!(answer(hub.handle(START_MS + 61_000, &post(5, Some(&token), delta("op-x", -1)))).0, 200);
}

#[test]
fn a_skewed_hub_dates_its_answers_and_its_horizon_by_its_own_clock() {
    let (mut hub, token) = hub_with_token();
    hub.write(START_MS, USER, DataType::Balance, json!({"coins": 100}));
    let month = 30 * 24 * 3600 * 1000;
    hub.set_skew(month);
    hub.set_retention(7 * 24 * 3600 * 1000);
    let by_device = protocol::wire::uuid7(START_MS, 1, 1);
    let reply = hub.handle(START_MS, &post(1, Some(&token), delta(&by_device, -1)));
    let Reply::Answer { status, date, .. } = reply else { panic!("no answer") };
    assert_eq!(status, 422, "dated by a device a month behind");
    assert_eq!(date, Some((START_MS + month as u64) / 1000 * 1000));
    let by_hub = protocol::wire::uuid7(hub.clock(START_MS), 2, 2);
    assert_eq!(answer(hub.handle(START_MS, &post(2, Some(&token), delta(&by_hub, -1)))).0, 200);
}

#[test]
fn something_in_front_of_the_hub_answers_without_the_hubs_body() {
    let (mut hub, token) = hub_with_token();
    hub.script([Mode::Foreign { status: 403 }]);
    let reply = hub.handle(START_MS, &post(1, Some(&token), delta("op-1", -1)));
    let Reply::Answer { status, body, date, .. } = reply else { panic!("no answer") };
    assert_eq!((status, date), (403, None));
    assert_eq!(protocol::wire::refusal(&body), None);
    assert!(!protocol::wire::succeeded(&body));
    assert_eq!(hub.applied("op-1"), 0);
    assert!(hub.seen()[0].foreign);
}
