//! The engine's behaviour, one story per test, through the fake hub, the fake clock and the
//! network of `support`: checks and fetches, the spinner, the inactivity fallback, local
//! writes and their outbox, hub outages, tokens, page unloads, and tabs of one site.
//!
//! Tests marked `` show a bug the engine still has; run them with
//! `cargo test -p sync-core --test scenarios -- --ignored`.

mod support;

use std::collections::BTreeSet;

use serde_json::json;
use support::hub::Mode;
use support::net::{Faults, Packet};
use support::{
    GrantAnswer, START_MS, Sim, Tab, TokenAnswer, USER, action_of, data_type_of, op_id_of, op_ids_of,
};
use sync_core::{
    Config, DataType, Engine, Event, Grant, Json, Method, OpKind, Reason, Request, Source, Status, Trigger,
};

const SITE_A: &str = "roflfaucet";
const SITE_B: &str = "clickforcharity";

fn actions(sent: &[(u64, Request)]) -> Vec<String> {
    sent.iter().map(|(_, r)| action_of(r)).collect()
}

/// The data types fetched (`action=get`), sorted.
fn fetched(sent: &[(u64, Request)]) -> Vec<String> {
    let mut types: Vec<String> =
        sent.iter().filter(|(_, r)| action_of(r) == "get").map(|(_, r)| data_type_of(r)).collect();
    types.sort();
    types
}

/// Send times of the write requests carrying `op_id`, alone or in a batch.
fn sends_of(sent: &[(u64, Request)], op_id: &str) -> Vec<u64> {
    sent.iter().filter(|(_, r)| op_ids_of(r).iter().any(|o| o == op_id)).map(|(at, _)| *at).collect()
}

/// The op ids each write request carried, in order.
fn writes(sent: &[(u64, Request)]) -> Vec<Vec<String>> {
    sent.iter().map(|(_, r)| op_ids_of(r)).filter(|ops| !ops.is_empty()).collect()
}

/// The tab's cache holds exactly the hub's records.
fn assert_in_step(sim: &Sim, tab: &Tab) {
    for data_type in tab.data_types() {
        let hub = sim.hub().record(USER, data_type);
        let cached = tab.record(data_type).unwrap_or_else(|| panic!("{}: no {data_type} cached", tab.name()));
        assert_eq!(serde_json::Value::from(&cached.data), hub.data, "{}: {data_type} data", tab.name());
        assert_eq!(cached.version, hub.version, "{}: {data_type} version", tab.name());
        assert_eq!(cached.last_updated, hub.last_updated(), "{}: {data_type} last_updated", tab.name());
    }
}

/// A hub where the user has 100 coins, and a signed-in tab of `SITE_A`.
fn signed_in() -> (Sim, Tab) {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let tab = sim.open(SITE_A);
    assert!(tab.login());
    (sim, tab)
}

// ---- checks ----

#[test]
fn login_fetches_every_data_type() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    sim.hub_write(DataType::Profile, json!({"display_name": "Evans"}));
    let tab = sim.open(SITE_A);
    let mark = tab.mark();
    assert!(tab.login());
    let sent = tab.requests_since(mark);
    assert_eq!(actions(&sent), ["timestamp", "get", "get", "get"]);
    assert_eq!(data_type_of(&sent[0].1), "balance,points,profile");
    assert_eq!(fetched(&sent), ["balance", "points", "profile"]);
    assert!(sent.iter().all(|(_, r)| r.if_none_match.is_none()), "nothing is cached to revalidate");
    assert_eq!(tab.coins(), 100);
    assert_eq!(tab.view(DataType::Profile), Some(json!({"display_name": "Evans"})));
    assert_in_step(&sim, &tab);
    assert_eq!(tab.status(), Status::Idle);
}

#[test]
fn a_tab_return_with_nothing_changed_sends_one_request_and_fetches_nothing() {
    let (_sim, tab) = signed_in();
    let mark = tab.mark();
    assert!(tab.tab_returns());
    assert_eq!(actions(&tab.requests_since(mark)), ["timestamp"]);
    let news = tab.events_since(mark);
    assert!(!news.iter().any(|e| matches!(e, Event::Data { .. } | Event::Persist)), "{news:?}");
}

#[test]
fn a_change_pushed_by_another_site_is_fetched_on_the_next_check_and_only_that_type() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let (site_a, site_b) = (sim.open(SITE_A), sim.open(SITE_B));
    site_a.login();
    site_b.login();
    site_a.delta(10);
    let mark = site_b.mark();
    site_b.tab_returns();
    assert_eq!(site_b.coins(), 110);
    let sent = site_b.requests_since(mark);
    assert_eq!(actions(&sent), ["timestamp", "get"]);
    assert_eq!(fetched(&sent), ["balance"]);
    let tag = format!("\"{}-1\"", sim.hub().epoch());
    assert_eq!(sent[1].1.if_none_match.as_deref(), Some(tag.as_str()), "sends back the ETag the hub gave");
    assert!(site_b.events_since(mark).iter().any(|e| matches!(
        e,
        Event::Data { data_type: DataType::Balance, source: Source::Hub, version: 2, .. }
    )));
    assert_in_step(&sim, &site_b);
}

#[test]
fn concurrent_triggers_share_one_check() {
    let (sim, tab) = signed_in();
    sim.hub_write(DataType::Balance, json!({"coins": 150}));
    let mark = tab.mark();
    let visible = tab.trigger(Trigger::TabVisible);
    let before_game = tab.trigger(Trigger::EnsureFresh);
    sim.run_for(1);
    // A trigger while the timestamp request is on the way joins it too.
    let restored = tab.trigger(Trigger::PageShow);
    sim.drive();
    assert_eq!(actions(&tab.requests_since(mark)), ["timestamp", "get"]);
    for ticket in [visible, before_game, restored] {
        assert_eq!(tab.check_done(ticket), Some(true), "ticket {ticket}");
    }
    assert_eq!(tab.coins(), 150);
}

#[test]
fn the_first_check_after_start_fetches_only_what_the_cache_lacks() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    sim.hub_write(DataType::Profile, json!({"bio": "Hi"}));
    let balance_only = sim.open_with(SITE_A, |c| c.data_types = vec![DataType::Balance]);
    balance_only.login();
    balance_only.close();
    let page = sim.open(SITE_A);
    assert_eq!(page.coins(), 100, "the cache is shown before any check");
    let mark = page.mark();
    assert!(page.login());
    assert_eq!(fetched(&page.requests_since(mark)), ["points", "profile"]);
    assert_in_step(&sim, &page);
}

#[test]
fn a_restored_cache_is_announced_at_once_from_the_cache() {
    let (sim, tab) = signed_in();
    let mark = tab.mark();
    tab.reload();
    assert!(tab.requests_since(mark).is_empty(), "nothing is sent before a trigger");
    let restored = tab.events_since(mark);
    let balance = restored.iter().find_map(|e| match e {
        Event::Data { data_type: DataType::Balance, data, version, source, pending, .. } => {
            Some((serde_json::Value::from(data), *version, *source, *pending))
        }
        _ => None,
    });
    assert_eq!(balance, Some((json!({"coins": 100}), 1, Source::Cache, 0)));
    assert_eq!(sim.now(), START_MS + 20, "no time passed since the login");
}

#[test]
fn a_new_hub_epoch_drops_the_cache() {
    let (sim, tab) = signed_in();
    sim.hub().replace_database("epoch-2");
    // The new database's record has the same version as the cached one, other data.
    sim.hub_write(DataType::Balance, json!({"coins": 7}));
    assert_eq!(tab.record(DataType::Balance).map(|r| r.version), Some(1));
    let mark = tab.mark();
    assert!(tab.tab_returns());
    assert_eq!(tab.coins(), 7);
    assert_eq!(fetched(&tab.requests_since(mark)), ["balance", "points", "profile"]);
    assert_eq!(sim.storage(SITE_A).and_then(|s| s.epoch).as_deref(), Some("epoch-2"));
    assert_in_step(&sim, &tab);
}

#[test]
fn an_older_answer_arriving_late_never_replaces_a_newer_record() {
    let (sim, tab) = signed_in();
    sim.hub_write(DataType::Balance, json!({"coins": 150}));
    // The check's fetch answer (v2, 150 coins) is held on its way back.
    sim.net().hold_when(|p| p.is_reply() && action_of(p.request()) == "get");
    let ticket = tab.trigger(Trigger::TabVisible);
    sim.run_for(100);
    sim.net().stop_holding();
    // Meanwhile a delta's answer brings v3.
    tab.apply_delta(10).unwrap();
    sim.run_for(100);
    assert_eq!(tab.record(DataType::Balance).map(|r| r.version), Some(3));
    sim.release();
    sim.drive();
    assert_eq!(tab.check_done(ticket), Some(true));
    assert_eq!(tab.record(DataType::Balance).map(|r| r.version), Some(3));
    assert_eq!(tab.coins(), 160);
    assert_eq!(tab.version_regressions(), Vec::<String>::new());
}

// ---- spinner and inactivity ----

#[test]
fn a_check_answered_before_the_spinner_delay_never_shows_the_spinner() {
    let (sim, tab) = signed_in();
    sim.hub_write(DataType::Balance, json!({"coins": 1}));
    assert!(tab.tab_returns());
    assert_eq!(tab.spinner(), []);
}

#[test]
fn a_slow_check_shows_the_spinner_then_hides_it() {
    let sim = Sim::new();
    sim.net().latency_ms = 200;
    let tab = sim.open(SITE_A);
    let started = sim.now();
    assert!(tab.login());
    // Timestamp and fetches: two round trips of 400 ms.
    assert_eq!(tab.spinner(), [(started + 150, true), (started + 800, false)]);
}

#[test]
fn the_inactivity_fallback_checks_while_visible() {
    let (sim, tab) = signed_in();
    sim.hub_write(DataType::Balance, json!({"coins": 42}));
    let mark = tab.mark();
    sim.run_for(5 * 60 * 1000 - 1);
    assert!(tab.requests_since(mark).is_empty(), "no check before 5 minutes");
    sim.run_for(1);
    assert_eq!(actions(&tab.requests_since(mark)), ["timestamp"]);
    sim.drive();
    assert_eq!(tab.coins(), 42);
}

#[test]
fn no_inactivity_check_while_hidden() {
    let (sim, tab) = signed_in();
    tab.hide();
    let mark = tab.mark();
    sim.run_for(30 * 60 * 1000);
    assert!(tab.requests_since(mark).is_empty());
    assert_eq!(tab.timer(), None);
}

// ---- local writes ----

#[test]
fn a_delta_is_shown_at_once_and_stored_before_its_request_is_polled() {
    let mut config = Config::new(SITE_A, USER, vec![DataType::Balance]);
    config.needs_token = false;
    let mut engine = Engine::new(config, None, START_MS);
    let op_id = engine.apply_delta(START_MS, DataType::Balance, 10, None).unwrap();
    assert_eq!(engine.view(DataType::Balance).and_then(|v| v.get("coins").and_then(Json::as_i64)), Some(10));
    let events: Vec<Event> = std::iter::from_fn(|| engine.poll_event()).collect();
    assert!(events.contains(&Event::Persist), "{events:?}");
    let shown =
        events.iter().position(|e| matches!(e, Event::Data { source: Source::Local, pending: 1, .. }));
    assert!(shown.is_some(), "{events:?}");
    // What the shell stores on that Persist already holds the op, before any request is polled.
    let stored: Vec<String> = engine.persisted().outbox.into_iter().map(|op| op.op_id).collect();
    assert_eq!(stored, std::slice::from_ref(&op_id));
    let request = engine.poll_request().expect("the delta is sent");
    assert_eq!(op_id_of(&request), Some(op_id));
}

#[test]
fn a_delta_reaches_the_hub_exactly_once() {
    let (sim, tab) = signed_in();
    let op_id = tab.apply_delta(10).unwrap();
    assert_eq!(tab.coins(), 110, "shown at once");
    assert_eq!(tab.pending().len(), 1);
    assert_eq!(sim.hub_coins(), 100, "no time has passed");
    sim.drive();
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(sim.hub_coins(), 110);
    assert_eq!(tab.coins(), 110);
    assert!(tab.pending().is_empty());
    assert!(sim.unstored_sends().is_empty());
    assert_in_step(&sim, &tab);
}

#[test]
fn a_delta_refused_for_insufficient_funds_is_rolled_back() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let (site_a, site_b) = (sim.open(SITE_A), sim.open(SITE_B));
    site_a.login();
    site_b.login();
    site_a.spend(80);
    // Site B has not checked since: it still shows 100 and lets the page spend 50.
    let op_id = site_b.apply_delta(-50).unwrap();
    assert_eq!(site_b.coins(), 50);
    sim.drive();
    assert_eq!(site_b.refused(), [(op_id.clone(), "insufficient_funds".to_owned())]);
    assert_eq!(site_b.coins(), 20, "rolled back onto the hub's current record");
    assert!(site_b.pending().is_empty());
    assert_eq!(sim.hub().applied(&op_id), 0);
    assert_eq!(sim.hub_coins(), 20);
    assert_in_step(&sim, &site_b);
}

#[test]
fn ensure_fresh_before_a_purchase_sees_what_another_site_spent() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let (site_a, site_b) = (sim.open(SITE_A), sim.open(SITE_B));
    site_a.login();
    site_b.login();
    site_a.spend(70);
    assert!(site_b.ensure_fresh());
    assert_eq!(site_b.coins(), 30);
    assert_eq!(site_b.apply_delta(-50).unwrap_err().code, "insufficient_funds");
}

#[test]
fn a_local_delta_below_zero_is_refused_at_once_without_a_request() {
    let (_sim, tab) = signed_in();
    let mark = tab.mark();
    let refusal = tab.apply_delta(-101).unwrap_err();
    assert_eq!(refusal.code, "insufficient_funds");
    assert!(tab.requests_since(mark).is_empty());
    assert!(tab.pending().is_empty());
    assert_eq!(tab.coins(), 100);
}

#[test]
fn a_push_is_merged_on_the_hub_and_shown_at_once() {
    let (sim, tab) = signed_in();
    sim.hub_write(DataType::Profile, json!({"display_name": "Evans", "bio": "Old"}));
    tab.tab_returns();
    let op_id = tab.push(DataType::Profile, json!({"bio": "Hi", "location": "Leeds"}));
    let merged = json!({"display_name": "Evans", "bio": "Hi", "location": "Leeds"});
    assert_eq!(tab.view(DataType::Profile), Some(merged.clone()));
    sim.drive();
    assert_eq!(sim.hub().record(USER, DataType::Profile).data, merged);
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_in_step(&sim, &tab);
}

#[test]
fn a_push_the_hub_refuses_is_rolled_back() {
    let (sim, tab) = signed_in();
    let op_id = tab.push(DataType::Profile, json!({"age": 30}));
    assert_eq!(tab.view(DataType::Profile), Some(json!({"age": 30})));
    sim.drive();
    let refused = tab.refused();
    assert_eq!(refused.iter().map(|(op, _)| op.clone()).collect::<Vec<_>>(), [op_id]);
    assert_eq!(tab.view(DataType::Profile), Some(json!({})));
    assert_in_step(&sim, &tab);
}

#[test]
fn pushes_to_one_record_reach_the_hub_in_the_order_they_were_made() {
    let (sim, tab) = signed_in();
    sim.net().faults = Faults { delay: 0.5, max_delay_ms: 3_000, ..Faults::default() };
    for bio in ["one", "two", "three", "four"] {
        tab.push(DataType::Profile, json!({ "bio": bio }));
    }
    sim.drive();
    assert_eq!(sim.hub().record(USER, DataType::Profile).data, json!({"bio": "four"}));
}

// ---- outages ----

#[test]
fn deltas_made_during_an_outage_are_delivered_once_when_the_hub_returns() {
    let (sim, tab) = signed_in();
    sim.hub().down();
    let mark = tab.mark();
    let ops: Vec<String> = [10, 5, 7].into_iter().map(|n| tab.apply_delta(n).unwrap()).collect();
    sim.run_for(10 * 60 * 1000);
    assert_eq!(tab.status(), Status::Offline);
    assert_eq!(tab.coins(), 122, "the page keeps showing the queued deltas");
    let sent = tab.requests_since(mark);
    let posts = writes(&sent);
    assert_eq!(posts[0], ops[..1], "the first went alone, before the others were made");
    assert!(posts[1..].iter().all(|p| *p == ops), "then the three, in order, in one batch: {posts:?}");
    // Retry n waits between half of and all of min(1 s · 2^(n-1), 60 s) after the failure,
    // which comes back one round trip (10 ms) after the send.
    let sends = sends_of(&sent, &ops[0]);
    assert!(sends.len() >= 10, "{sends:?}");
    let mut fractions = BTreeSet::new();
    for (n, pair) in sends.windows(2).enumerate() {
        let (wait, cap) = (pair[1] - pair[0] - 10, (1000u64 << n.min(20)).min(60_000));
        assert!((cap / 2..=cap).contains(&wait), "retry {}: waited {wait} ms, cap {cap} ms", n + 1);
        fractions.insert(wait * 100 / cap);
    }
    assert!(fractions.len() > 3, "the waits are jittered: {fractions:?}");
    sim.hub().up();
    sim.drive();
    for op_id in &ops {
        assert_eq!(sim.hub().applied(op_id), 1);
    }
    assert_eq!(sim.hub_coins(), 122);
    assert!(tab.pending().is_empty());
    assert_eq!(tab.status(), Status::Idle);
    assert_in_step(&sim, &tab);
}

#[test]
fn a_429_is_retried_no_sooner_than_retry_after() {
    let (sim, tab) = signed_in();
    sim.hub().set_mode(Mode::Busy { retry_after: 30 });
    let mark = tab.mark();
    let op_id = tab.apply_delta(10).unwrap();
    sim.run_for(4 * 60 * 1000);
    let sends = sends_of(&tab.requests_since(mark), &op_id);
    assert!(sends.len() >= 4, "{sends:?}");
    // The 429 arrives one round trip (10 ms) after the send.
    assert_eq!(sends[1] - sends[0], 10 + 30_000, "the first retry waits exactly Retry-After");
    assert!(sends.windows(2).all(|p| p[1] - p[0] >= 10 + 30_000), "{sends:?}");
    sim.hub().up();
    sim.drive();
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(sim.hub_coins(), 110);
}

#[test]
fn a_503_is_retried_and_applied_once() {
    let (sim, tab) = signed_in();
    sim.hub().script([Mode::Unavailable, Mode::Unavailable]);
    let mark = tab.mark();
    let op_id = tab.delta(10);
    assert_eq!(sends_of(&tab.requests_since(mark), &op_id).len(), 3);
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(sim.hub_coins(), 110);
    assert_in_step(&sim, &tab);
}

#[test]
fn a_reload_during_an_outage_resends_the_same_op_ids() {
    let (sim, tab) = signed_in();
    sim.hub().down();
    let ops = vec![tab.apply_delta(10).unwrap(), tab.apply_delta(5).unwrap()];
    sim.run_for(5_000);
    sim.hub().up();
    let mark = tab.mark();
    tab.reload();
    let pending: Vec<String> = tab.pending().into_iter().map(|op| op.op_id).collect();
    assert_eq!(pending, ops);
    assert_eq!(tab.coins(), 115);
    sim.drive();
    let sent = tab.requests_since(mark);
    for op_id in &ops {
        assert_eq!(sends_of(&sent, op_id).len(), 1, "the new page sends {op_id}");
        assert_eq!(sim.hub().applied(op_id), 1);
    }
    assert_eq!(sim.hub_coins(), 115);
    assert_in_step(&sim, &tab);
}

#[test]
fn a_write_whose_answer_was_lost_is_replayed_not_applied_again() {
    let (sim, tab) = signed_in();
    sim.net().hold_when(|p| p.is_reply() && p.request().method == Method::Post);
    let op_id = tab.apply_delta(10).unwrap();
    sim.run_for(100);
    assert_eq!(sim.hub().applied(&op_id), 1, "the hub applied it; the answer is lost");
    sim.net().drop_held();
    // The request times out and is sent again; a reload in between changes nothing.
    sim.run_for(16_000);
    tab.reload();
    sim.drive();
    assert_eq!(sim.hub().applied(&op_id), 1);
    let answers: Vec<Option<u16>> =
        sim.hub().seen().iter().filter(|s| s.op_id.as_deref() == Some(&op_id)).map(|s| s.status).collect();
    assert!(answers.len() >= 2 && answers.iter().all(|s| *s == Some(200)), "{answers:?}");
    assert_eq!(tab.coins(), 110);
    assert!(tab.pending().is_empty());
    assert_in_step(&sim, &tab);
}

#[test]
fn a_faulty_network_never_applies_a_delta_twice() {
    let (sim, tab) = signed_in();
    sim.net().faults = Faults { drop: 0.3, duplicate: 0.5, delay: 0.3, max_delay_ms: 20_000 };
    let ops: Vec<String> = (1..=5).map(|n| tab.apply_delta(n).unwrap()).collect();
    sim.run_for(10 * 60 * 1000);
    sim.net().heal();
    sim.drive();
    for op_id in &ops {
        assert_eq!(sim.hub().applied(op_id), 1, "{op_id}");
    }
    assert_eq!(sim.hub_coins(), 115);
    assert!(tab.force_sync());
    assert_in_step(&sim, &tab);
}

#[test]
fn going_offline_ends_checks_with_cached_data_and_holds_writes() {
    let (sim, tab) = signed_in();
    tab.go_offline();
    assert_eq!(tab.status(), Status::Offline);
    let mark = tab.mark();
    let ticket = tab.trigger(Trigger::EnsureFresh);
    assert_eq!(tab.check_done(ticket), Some(false), "answered at once from the cache");
    let op_id = tab.apply_delta(10).unwrap();
    sim.run_for(10 * 60 * 1000);
    assert!(tab.requests_since(mark).is_empty());
    tab.come_online();
    sim.drive();
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(tab.status(), Status::Idle);
    assert_in_step(&sim, &tab);
}

// ---- tokens ----

#[test]
fn an_expired_token_is_refreshed_once_and_the_write_goes_through() {
    let (sim, tab) = signed_in();
    assert_eq!(tab.token_asks(), 1);
    sim.hub().expire_tokens();
    let op_id = tab.delta(10);
    assert_eq!(tab.token_asks(), 2);
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert!(!tab.statuses().contains(&Status::Error));
    assert_eq!(tab.status(), Status::Idle);
    // The fresh token serves the next check.
    assert!(tab.tab_returns());
    assert_eq!(tab.token_asks(), 2);
}

#[test]
fn a_second_401_sets_status_error() {
    let (sim, tab) = signed_in();
    sim.hub().expire_tokens();
    tab.script_tokens([TokenAnswer::Bad]);
    assert!(!tab.tab_returns());
    assert_eq!(tab.status(), Status::Error);
    assert_eq!(tab.token_asks(), 2, "one fresh token, then no more asking");
    // The page is told the hub refused the token, and the hub's own code.
    assert_eq!(tab.status_reason(), Some(Reason::Unauthorized));
    assert_eq!(tab.errors(), [Reason::Unauthorized]);
    assert_eq!(tab.error_hub_codes(), [Some("invalid_token".to_owned())]);
    let mark = tab.mark();
    sim.run_for(10 * 60 * 1000);
    assert!(tab.requests_since(mark).is_empty(), "no retry loop against a hub that refuses us");
}

#[test]
fn a_token_for_another_user_is_refused_outright_with_the_hubs_code() {
    let sim = Sim::new();
    let tab = sim.open_with(SITE_A, |config| config.user_id = "someone-else".to_owned());
    assert!(!tab.login());
    assert_eq!((tab.status(), tab.status_reason()), (Status::Error, Some(Reason::Unauthorized)));
    assert_eq!(tab.error_hub_codes(), [Some("wrong_user".to_owned())]);
    assert_eq!(tab.token_asks(), 1, "a 403 is not cured by a fresh token");
}

#[test]
fn no_token_at_all_sets_status_error_without_a_request() {
    let sim = Sim::new();
    let tab = sim.open(SITE_A);
    tab.script_tokens([TokenAnswer::Unavailable]);
    assert!(!tab.login());
    assert_eq!((tab.status(), tab.status_reason()), (Status::Error, Some(Reason::TokenFailed)));
    assert_eq!(tab.errors(), [Reason::TokenFailed]);
    assert_eq!(tab.error_hub_codes(), [None], "the page's own getToken failed, not the hub");
    assert!(tab.requests().is_empty());
}

#[test]
fn after_the_pages_backend_failed_to_give_a_token_a_tab_return_asks_it_again() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 30}));
    let tab = sim.open(SITE_A);
    tab.script_tokens([TokenAnswer::Unavailable]);
    assert!(!tab.login());
    assert_eq!(tab.status_reason(), Some(Reason::TokenFailed));
    // The backend is back: the next tab return asks it, and syncs, without an explicit call.
    assert!(tab.tab_returns(), "{}", tab.debug_log());
    assert_eq!(tab.token_asks(), 2);
    assert_eq!((tab.status(), tab.status_reason(), tab.coins()), (Status::Idle, None, 30));
}

#[test]
fn after_the_hub_refused_the_token_a_tab_return_sends_nothing() {
    let (sim, tab) = signed_in();
    sim.hub().expire_tokens();
    tab.script_tokens([TokenAnswer::Bad]);
    assert!(!tab.tab_returns());
    assert_eq!(tab.status_reason(), Some(Reason::Unauthorized));
    let mark = tab.mark();
    assert!(!tab.tab_returns());
    assert!(tab.requests_since(mark).is_empty(), "a refused identity is not sent again");
    assert_eq!(tab.token_asks(), 2);
}

#[test]
fn an_explicit_check_after_an_auth_error_tries_again() {
    let (sim, tab) = signed_in();
    sim.hub().expire_tokens();
    tab.script_tokens([TokenAnswer::Bad]);
    assert!(!tab.tab_returns());
    assert_eq!(tab.status(), Status::Error);
    assert!(tab.force_sync());
    assert_eq!(tab.status(), Status::Idle);
}

#[test]
fn with_auth_off_no_token_is_asked_for_or_sent() {
    let sim = Sim::new();
    sim.hub().set_tokens_required(false);
    let tab = sim.open(SITE_A);
    assert!(tab.login());
    tab.delta(10);
    assert_eq!(tab.token_asks(), 0);
    assert!(tab.requests().iter().all(|r| r.token.is_none()));
    assert_eq!(sim.hub_coins(), 10);
}

#[test]

fn requests_in_flight_with_an_expired_token_share_one_refresh() {
    let (sim, tab) = signed_in();
    sim.hub().expire_tokens();
    // A write and a check leave together, both with the token that just expired.
    let op_id = tab.apply_delta(10).unwrap();
    let ticket = tab.trigger(Trigger::TabVisible);
    sim.drive();
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(tab.token_asks(), 2, "one fresh token serves both");
    assert_eq!(
        tab.check_done(ticket),
        Some(true),
        "the check's 401 came for the old token; the fresh one was already there:\n{}",
        tab.debug_log()
    );
    assert_eq!(tab.status(), Status::Idle);
}

#[test]
fn an_expired_token_is_replaced_at_once_and_the_fresh_one_lifts_the_hubs_hold() {
    let (sim, tab) = signed_in();
    sim.hub().expire_tokens();
    // A write and a check leave together with the token that just expired: the write is
    // answered 429 with a ten-minute Retry-After, the check 401 token_expired.
    sim.hub().script([Mode::Busy { retry_after: 600 }]);
    let op_id = tab.apply_delta(10).unwrap();
    let ticket = tab.trigger(Trigger::TabVisible);
    sim.run_for(5_000);
    assert_eq!(
        tab.token_asks(),
        2,
        "a fresh token was asked for during the hold:
{}",
        tab.debug_log()
    );
    assert_eq!(
        sim.hub().applied(&op_id),
        1,
        "the hold came with the expired token's answers; the fresh token's write went at once:
{}",
        tab.debug_log()
    );
    assert!(tab.check_done(ticket).is_some());
    sim.run_for(5_000);
    assert_eq!(tab.status(), Status::Idle);
    assert_in_step(&sim, &tab);
}

#[test]
fn an_expired_token_is_replaced_once_the_browser_is_back_online_not_before() {
    let (sim, tab) = signed_in();
    sim.hub().expire_tokens();
    // The check's 401 token_expired arrives after the browser said it went offline: the
    // page could not reach its backend for a fresh token, so none is asked for yet.
    sim.net().hold_when(|p| p.is_reply() && action_of(p.request()) == "timestamp");
    let ticket = tab.trigger(Trigger::TabVisible);
    sim.run_for(1_000);
    tab.go_offline();
    sim.release();
    sim.run_for(1_000);
    assert_eq!(tab.check_done(ticket), Some(false), "offline: the check ended with cached data");
    assert_eq!(tab.token_asks(), 1, "{}", tab.debug_log());
    tab.come_online();
    sim.drive();
    assert_eq!(tab.token_asks(), 2, "{}", tab.debug_log());
    assert_eq!(tab.status(), Status::Idle);
    assert_in_step(&sim, &tab);
}

#[test]
fn a_page_whose_anonymous_requests_are_limited_recovers_with_a_fresh_token() {
    let (sim, tab) = signed_in();
    // Anonymous clients at the page's address have used up its limit: requests without a
    // token the hub knows get 429 for a minute. The page's token expires; an expired token is
    // not anonymous, so the hub says so instead of 429.
    sim.hub().set_anonymous_limited(Some(60));
    sim.hub().expire_tokens();
    let op_id = tab.delta(10);
    assert_eq!(sim.hub().applied(&op_id), 1, "{}", tab.debug_log());
    assert_eq!(tab.token_asks(), 2);
    let statuses: Vec<Option<u16>> = sim.hub().seen().iter().map(|s| s.status).collect();
    assert!(!statuses.contains(&Some(429)), "{statuses:?}");
    assert!(tab.tab_returns());
    assert_eq!(tab.status(), Status::Idle);
    assert_in_step(&sim, &tab);
}

#[test]
fn a_fresh_token_that_has_expired_already_sets_status_error_without_a_loop() {
    let (sim, tab) = signed_in();
    sim.hub().expire_tokens();
    // The site's backend hands out a token it kept too long.
    tab.script_tokens([TokenAnswer::Expired]);
    assert!(!tab.tab_returns());
    assert_eq!(tab.status(), Status::Error);
    assert_eq!(tab.token_asks(), 2, "one fresh token, then no more asking");
    let mark = tab.mark();
    sim.run_for(10 * 60 * 1000);
    assert!(tab.requests_since(mark).is_empty(), "no loop against a backend whose tokens are stale");
    assert!(tab.force_sync(), "an explicit check asks again, and the next token is good");
}

#[test]

fn an_engine_waiting_on_auth_does_not_ask_to_be_woken_in_the_past() {
    let (sim, tab) = signed_in();
    sim.hub().expire_tokens();
    tab.script_tokens([TokenAnswer::Bad]);
    tab.apply_delta(10).unwrap();
    sim.run_for(60_000);
    assert_eq!(tab.status(), Status::Error);
    let (now, timer) = (sim.now(), tab.timer());
    assert!(
        timer.is_none_or(|at| at > now),
        "poll_timeout says {:?} ms from now: the shell re-arms a zero-delay timer forever",
        timer.map(|at| at as i64 - now as i64)
    );
    assert_eq!(tab.stale_wakeups(), 0);
    // The same with no token at all.
    let other = sim.open(SITE_B);
    other.script_tokens([TokenAnswer::Unavailable]);
    other.apply_delta(5).unwrap();
    sim.run_for(1_000);
    assert_eq!(other.stale_wakeups(), 0);
}

#[test]

fn an_auth_error_after_an_outage_is_reported_as_an_error_not_offline() {
    let (sim, tab) = signed_in();
    sim.hub().down();
    tab.apply_delta(10).unwrap();
    sim.run_for(100);
    assert_eq!(tab.status(), Status::Offline);
    // The hub is back, but it refuses the tab's token, and the fresh one too.
    sim.hub().up();
    sim.hub().expire_tokens();
    tab.script_tokens([TokenAnswer::Bad]);
    sim.run_for(5_000);
    tab.trigger(Trigger::TabVisible);
    sim.run_for(5_000);
    assert_eq!(tab.status(), Status::Error, "the hub answers (401); the page is told it is offline");
}

// ---- page unload ----

#[test]
fn unload_resends_pending_writes_with_keepalive_and_the_next_page_applies_nothing_twice() {
    let (sim, tab) = signed_in();
    // The first write is answered 429 with a long Retry-After; the second waits behind it.
    sim.hub().script([Mode::Busy { retry_after: 600 }]);
    let ops = vec![tab.apply_delta(10).unwrap(), tab.apply_delta(5).unwrap()];
    sim.run_for(1_000);
    assert_eq!(sim.hub_coins(), 100);
    let mark = tab.mark();
    tab.unload();
    let sent = tab.requests_since(mark);
    assert!(sent.iter().all(|(_, r)| r.keepalive && r.method == Method::Post));
    assert_eq!(writes(&sent), std::slice::from_ref(&ops), "one keepalive batch, in order");
    tab.reload();
    sim.drive();
    for op_id in &ops {
        assert_eq!(sim.hub().applied(op_id), 1);
        let seen: Vec<(bool, Option<u16>)> = sim
            .hub()
            .seen()
            .iter()
            .filter(|s| s.op_id.as_deref() == Some(op_id))
            .map(|s| (s.keepalive, s.status))
            .collect();
        assert_eq!(seen[seen.len() - 2..], [(true, Some(200)), (false, Some(200))], "{op_id}: {seen:?}");
    }
    assert_eq!(sim.hub_coins(), 115);
    assert_eq!(tab.coins(), 115);
    assert_in_step(&sim, &tab);
}

#[test]

fn unload_also_resends_the_write_in_flight() {
    let (sim, tab) = signed_in();
    // The first write's request is still on its way when the page goes away.
    sim.net().hold_when(|p| !p.is_reply() && p.request().method == Method::Post && !p.request().keepalive);
    let first = tab.apply_delta(10).unwrap();
    let second = tab.apply_delta(5).unwrap();
    let mark = tab.mark();
    tab.unload();
    let keepalive = writes(&tab.requests_since(mark));
    // The browser aborts the ordinary fetch; the user does not come back to this site.
    sim.net().drop_held();
    tab.close();
    sim.drive();
    assert_eq!(sim.hub().applied(&second), 1);
    assert_eq!(
        sim.hub().applied(&first),
        1,
        "the write in flight at unload is lost; keepalive requests went for {keepalive:?} only"
    );
}

// ---- tabs of one site ----

#[test]
fn two_tabs_of_one_site_apply_each_op_once_and_converge() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let (tab1, tab2) = (sim.open(SITE_A), sim.open(SITE_A));
    tab1.login();
    tab2.login();
    let op_id = tab1.apply_delta(10).unwrap();
    assert!(tab2.pending().iter().any(|op| op.op_id == op_id), "the other tab adopts it from storage");
    let other = tab2.apply_delta(-30).unwrap();
    sim.drive();
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(sim.hub().applied(&other), 1);
    assert_eq!(sim.hub_coins(), 80);
    for tab in [&tab1, &tab2] {
        assert_eq!(tab.coins(), 80);
        assert!(tab.pending().is_empty());
        assert_in_step(&sim, tab);
    }
}

#[test]
fn fresh_data_is_shared_with_the_other_tabs_of_the_site() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let (tab1, tab2, site_b) = (sim.open(SITE_A), sim.open(SITE_A), sim.open(SITE_B));
    for tab in [&tab1, &tab2, &site_b] {
        tab.login();
    }
    site_b.delta(10);
    let mark = tab2.mark();
    tab1.tab_returns();
    assert_eq!(tab2.coins(), 110);
    assert!(tab2.requests_since(mark).is_empty(), "the other tab learns it without asking the hub");
    assert!(tab2.events_since(mark).iter().any(|e| matches!(
        e,
        Event::Data { data_type: DataType::Balance, source: Source::Tab, version: 2, .. }
    )));
    assert_in_step(&sim, &tab2);
}

#[test]
fn writes_a_closed_tab_left_are_delivered_by_another_tab_or_the_next_page() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let (tab1, tab2) = (sim.open(SITE_A), sim.open(SITE_A));
    tab1.login();
    tab2.login();
    sim.hub().down();
    let adopted = tab1.apply_delta(10).unwrap();
    sim.run_for(2_000);
    tab1.close();
    sim.hub().up();
    sim.drive();
    assert_eq!(sim.hub().applied(&adopted), 1, "the open tab delivers it");
    // A write left by the last tab of the site waits in storage for the next page.
    sim.hub().down();
    let stored = tab2.apply_delta(5).unwrap();
    sim.run_for(2_000);
    tab2.close();
    sim.hub().up();
    let page = sim.open(SITE_A);
    sim.drive();
    assert_eq!(sim.hub().applied(&stored), 1, "the next page delivers it");
    assert_eq!(sim.hub_coins(), 115);
    assert_eq!(page.coins(), 115);
}

#[test]

fn a_delta_confirmed_by_another_tab_is_never_shown_twice() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let (tab1, tab2) = (sim.open(SITE_A), sim.open(SITE_A));
    tab1.login();
    tab2.login();
    // Tab 2's own write is on its way (held), so the delta it adopts from tab 1 waits.
    let tab2_id = tab2.id();
    sim.net().hold_when(move |p| p.page().tab == tab2_id && !p.is_reply());
    tab2.apply_delta(1).unwrap();
    sim.net().stop_holding();
    let mark = tab2.mark();
    tab1.apply_delta(10).unwrap();
    sim.drive();
    assert_eq!(sim.hub_coins(), 111);
    let shown: Vec<i64> = tab2
        .events_since(mark)
        .iter()
        .filter_map(|e| match e {
            Event::Data { data_type: DataType::Balance, data, .. } => {
                data.get("coins").and_then(Json::as_i64)
            }
            _ => None,
        })
        .collect();
    assert!(shown.iter().all(|&coins| coins <= 111), "tab 2 showed {shown:?}; it is {}", tab2.coins());
}

#[test]

fn a_write_refused_in_one_tab_is_not_applied_later_by_another() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let (tab1, tab2, site_b) = (sim.open(SITE_A), sim.open(SITE_A), sim.open(SITE_B));
    for tab in [&tab1, &tab2, &site_b] {
        tab.login();
    }
    // Tab 2's own write is on its way (held): what it adopts from tab 1 waits behind it.
    let tab2_id = tab2.id();
    sim.net().hold_when(move |p| p.page().tab == tab2_id && !p.is_reply());
    tab2.apply_delta(1).unwrap();
    sim.run_for(1_000);
    site_b.apply_delta(-60).unwrap();
    sim.run_for(1_000);
    // Tab 1 still believes in 101 coins; the hub has 41 and refuses the purchase.
    let purchase = tab1.apply_delta(-80).unwrap();
    sim.run_for(1_000);
    assert_eq!(tab1.refused(), [(purchase.clone(), "insufficient_funds".to_owned())]);
    assert_eq!(tab1.coins(), 41);
    // Later the user earns coins on site B, and tab 2's own write gets through.
    site_b.apply_delta(100).unwrap();
    sim.run_for(1_000);
    sim.release();
    sim.drive();
    let charged = sim.hub().applied(&purchase);
    let balance = sim.hub_coins();
    assert_eq!(
        charged, 0,
        "the page was told the purchase was refused, yet the hub charged it (balance {balance})"
    );
}

// ---- checks that fail half way ----

#[test]

fn a_late_fetch_from_an_abandoned_check_does_not_complete_the_next_check() {
    let (sim, tab) = signed_in();
    sim.hub_write(DataType::Balance, json!({"coins": 50}));
    sim.hub_write(DataType::Profile, json!({"bio": "Hi"}));
    let balance_reply = |p: &Packet| {
        p.is_reply() && action_of(p.request()) == "get" && data_type_of(p.request()) == "balance"
    };
    sim.net().hold_when(balance_reply);
    // The check's timestamp and balance fetch are answered (the answer is held on its
    // way), the profile fetch gets a 503: the check ends with cached data.
    sim.hub().script([Mode::Up, Mode::Up, Mode::Unavailable]);
    let first = tab.trigger(Trigger::TabVisible);
    sim.run_for(1_000);
    assert_eq!(tab.check_done(first), Some(false));
    sim.hub_write(DataType::Balance, json!({"coins": 30}));
    let before_purchase = tab.trigger(Trigger::EnsureFresh);
    sim.run_for(1_000);
    // The first check's answer (50 coins, v2) arrives while the new fetch (v3) is still away.
    let oldest = sim.net().held().first().map(|p| p.request().id);
    sim.release_if(move |p| Some(p.request().id) == oldest);
    sim.run_for(1_000);
    if tab.check_done(before_purchase) == Some(true) {
        assert_eq!(tab.coins(), 30, "ensureFresh reported fresh data, but the page shows the older answer");
    }
    sim.release();
    sim.drive();
    assert_eq!(tab.check_done(before_purchase), Some(true));
    assert_eq!(tab.coins(), 30);
}

#[test]
fn a_confirmed_write_is_announced_even_when_the_shown_data_is_unchanged() {
    let (sim, tab) = signed_in();
    let mark = tab.mark();
    tab.delta(5);
    sim.drive();
    let announced: Vec<(u64, usize)> = tab
        .events_since(mark)
        .into_iter()
        .filter_map(|e| match e {
            Event::Data { data_type: DataType::Balance, version, pending, .. } => Some((version, pending)),
            _ => None,
        })
        .collect();
    let hub_version = sim.hub().record(USER, DataType::Balance).version;
    assert_eq!(announced.last(), Some(&(hub_version, 0)), "{announced:?}");
}

#[test]
fn checks_wait_out_a_retry_after_and_use_the_cache_meanwhile() {
    let (sim, tab) = signed_in();
    sim.hub().set_mode(Mode::Busy { retry_after: 30 });
    let mark = tab.mark();
    assert!(!tab.tab_returns(), "a 429 leaves the page with cached data");
    let busy_at = tab.requests_since(mark)[0].0;
    assert_eq!(tab.requests_since(mark).len(), 1);
    sim.hub().up();
    sim.hub_write(DataType::Balance, json!({"coins": 70}));
    let mark = tab.mark();
    assert!(!tab.tab_returns(), "within Retry-After the check ends at once with cached data");
    let sent = tab.requests_since(mark);
    assert_eq!(actions(&sent), ["timestamp", "get"], "the skipped check runs when the wait ends");
    assert!(sent[0].0 >= busy_at + 30_000, "asked again {} ms after the 429", sent[0].0 - busy_at);
    assert_eq!(tab.coins(), 70);
}

// ---- credits and their grants ----

/// The grant the outbox `persisted` holds for `op_id`.
fn stored_grant(persisted: &sync_core::Persisted, op_id: &str) -> Option<String> {
    persisted.outbox.iter().find(|op| op.op_id == op_id).and_then(|op| match &op.kind {
        OpKind::Delta { grant, .. } => grant.clone(),
        OpKind::Push { .. } => None,
    })
}

/// The grants the hub received with `op_id`, in order, with the status each got.
fn grants_seen(sim: &Sim, op_id: &str) -> Vec<(Option<String>, Option<u16>)> {
    sim.hub()
        .seen()
        .iter()
        .filter(|s| s.op_id.as_deref() == Some(op_id))
        .map(|s| (s.grant.clone(), s.status))
        .collect()
}

#[test]
fn a_credit_takes_its_grants_op_id_and_carries_the_grant_to_the_hub() {
    let (sim, tab) = signed_in();
    let grant = tab.grant(DataType::Balance, 10);
    let op_id = tab.apply_with_grant(DataType::Balance, 10, &grant).unwrap();
    assert_eq!(Some(op_id.as_str()), Grant::from_jwt(&grant).as_ref().map(Grant::op_id));
    assert_eq!(tab.coins(), 110, "shown at once");
    assert_eq!(
        stored_grant(&sim.storage(SITE_A).unwrap(), &op_id),
        Some(grant.clone()),
        "stored with its op"
    );
    sim.drive();
    assert_eq!(grants_seen(&sim, &op_id), [(Some(grant), Some(200))]);
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(sim.hub_coins(), 110);
    assert!(tab.pending().is_empty());
    assert_in_step(&sim, &tab);
}

#[test]
fn a_granted_credit_lands_exactly_once_across_lost_answers_and_a_reload() {
    let (sim, tab) = signed_in();
    sim.net().hold_when(|p| p.is_reply() && p.request().method == Method::Post);
    let op_id = tab.apply_delta(10).unwrap();
    sim.run_for(100);
    assert_eq!(sim.hub().applied(&op_id), 1, "the hub applied it; the answer is lost");
    // The request times out and is sent again, its answer lost too; then the page reloads.
    sim.run_for(16_000);
    sim.net().drop_held();
    tab.reload();
    assert_eq!(tab.coins(), 110, "the next page shows the credit from storage");
    sim.drive();
    let seen = grants_seen(&sim, &op_id);
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(seen.iter().all(|(grant, status)| grant.is_some() && *status == Some(200)), "{seen:?}");
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(sim.hub_coins(), 110);
    assert_eq!(tab.coins(), 110);
    assert!(tab.pending().is_empty());
    assert_in_step(&sim, &tab);
}

#[test]
fn a_credit_queued_offline_past_its_grants_life_is_granted_again_and_lands_once() {
    let (sim, tab) = signed_in();
    tab.go_offline();
    let op_id = tab.apply_delta(10).unwrap();
    let first = stored_grant(&tab.persisted(), &op_id).expect("the credit carries its grant");
    // A spend queued behind the credit goes in the same batch; the hub's refusal of the
    // expired grant does not stop the batch, so the spend lands while the credit is regranted.
    let spend = tab.apply_delta(-5).unwrap();
    sim.run_for(15 * 60 * 1000);
    let mark = tab.mark();
    tab.come_online();
    sim.drive();
    assert_eq!(tab.grant_asks(), std::slice::from_ref(&op_id), "asked once, for the same op");
    let fresh = stored_grant(&sim.storage(SITE_A).unwrap_or_default(), &op_id);
    assert_eq!(fresh, None, "confirmed: no longer stored");
    let seen = grants_seen(&sim, &op_id);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], (Some(first.clone()), Some(403)), "the expired grant is refused");
    assert!(seen[1].0.as_ref().is_some_and(|g| *g != first) && seen[1].1 == Some(200), "{seen:?}");
    assert!(sim.unstored_sends().is_empty(), "the fresh grant was stored before it was sent");
    let posts = writes(&tab.requests_since(mark));
    assert_eq!(
        posts,
        [vec![op_id.clone(), spend.clone()], vec![op_id.clone()]],
        "a batch, then the credit again"
    );
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(sim.hub().applied(&spend), 1);
    assert_eq!(sim.hub_coins(), 105);
    assert!(tab.refused().is_empty());
    assert_in_step(&sim, &tab);
}

#[test]
fn without_get_grant_a_credit_whose_grant_expired_is_refused_and_rolled_back() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let tab = sim.open_with(SITE_A, |config| config.asks_for_grants = false);
    tab.login();
    sim.hub().down();
    let op_id = tab.apply_delta(10).unwrap();
    let spend = tab.apply_delta(-5).unwrap();
    sim.run_for(11 * 60 * 1000);
    sim.hub().up();
    sim.drive();
    assert!(tab.grant_asks().is_empty());
    assert_eq!(tab.refused(), [(op_id.clone(), "grant_expired".to_owned())]);
    assert_eq!(sim.hub().applied(&op_id), 0);
    assert_eq!(sim.hub().applied(&spend), 1, "the writes behind it go on");
    assert_eq!(tab.coins(), 95, "the credit is rolled back");
    assert!(tab.pending().is_empty());
    assert_in_step(&sim, &tab);
}

#[test]
fn get_grant_answering_null_rolls_the_credit_back() {
    let (sim, tab) = signed_in();
    sim.hub().set_grant_ttl(1_000);
    sim.hub().down();
    let op_id = tab.apply_delta(10).unwrap();
    tab.script_grants([GrantAnswer::Declined]);
    sim.run_for(5_000);
    sim.hub().up();
    sim.drive();
    assert_eq!(tab.grant_asks(), std::slice::from_ref(&op_id));
    assert_eq!(tab.refused(), [(op_id.clone(), "grant_expired".to_owned())]);
    assert_eq!(sim.hub().applied(&op_id), 0);
    assert_eq!(tab.coins(), 100);
    assert!(tab.pending().is_empty());
    assert!(sim.storage(SITE_A).unwrap().outbox.is_empty(), "the refusal is stored too");
    assert_in_step(&sim, &tab);
}

#[test]
fn a_credit_applied_before_its_grant_expired_is_replayed_not_granted_again() {
    let (sim, tab) = signed_in();
    sim.hub().set_grant_ttl(1_000);
    sim.net().hold_when(|p| p.is_reply() && p.request().method == Method::Post);
    let op_id = tab.apply_delta(10).unwrap();
    sim.run_for(100);
    sim.net().drop_held();
    assert_eq!(sim.hub().applied(&op_id), 1);
    sim.drive();
    assert!(tab.grant_asks().is_empty(), "the hub replays the applied op whatever its grant's age");
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(tab.coins(), 110);
    assert!(tab.pending().is_empty());
    assert_in_step(&sim, &tab);
}

#[test]
fn a_spend_needs_no_grant_works_offline_and_syncs_later() {
    let (sim, tab) = signed_in();
    tab.go_offline();
    let op_id = tab.apply_delta(-30).unwrap();
    assert_eq!(tab.coins(), 70, "shown at once, offline");
    sim.run_for(30 * 60 * 1000);
    tab.come_online();
    sim.drive();
    assert_eq!(grants_seen(&sim, &op_id), [(None, Some(200))]);
    assert!(tab.grant_asks().is_empty());
    assert_eq!(sim.hub_coins(), 70);
    assert_in_step(&sim, &tab);
}

#[test]
fn credits_the_hub_refuses_for_scope_limit_or_grant_roll_back_without_refreshing_the_token() {
    type Credit = fn(&Sim, &Tab) -> String;
    let cases: [(&str, Credit); 4] = [
        ("insufficient_scope", |_, tab| tab.apply_ungranted(DataType::Balance, 10).unwrap()),
        ("credit_limit", |sim, tab| {
            sim.hub().set_max_credit_per_op(5);
            tab.apply_delta(10).unwrap()
        }),
        ("grant_invalid", |_, tab| {
            let other_amount = tab.grant(DataType::Balance, 11);
            tab.apply_with_grant(DataType::Balance, 10, &other_amount).unwrap()
        }),
        ("grant_invalid", |sim, tab| {
            let now = sim.now();
            let other_user =
                sim.hub().mint_grant(now, SITE_A, "someone-else", "claim-9", DataType::Balance, 10);
            tab.apply_with_grant(DataType::Balance, 10, &other_user).unwrap()
        }),
    ];
    for (code, credit) in cases {
        let (sim, tab) = signed_in();
        let asks = tab.token_asks();
        let mark = tab.mark();
        let op_id = credit(&sim, &tab);
        assert_eq!(tab.coins(), 110);
        sim.drive();
        assert_eq!(tab.refused(), [(op_id.clone(), code.to_owned())]);
        assert_eq!(tab.token_asks(), asks, "{code}: a 403 is no reason for a fresh token");
        assert_eq!(sends_of(&tab.requests_since(mark), &op_id).len(), 1, "{code}: final, never retried");
        assert!(tab.grant_asks().is_empty(), "{code}: only an expired grant is asked again");
        assert_eq!(sim.hub().applied(&op_id), 0);
        assert_eq!(tab.coins(), 100, "{code}: rolled back");
        assert_ne!(tab.status(), Status::Error, "{code}: the token is fine");
        assert!(tab.pending().is_empty());
    }
}

#[test]
fn a_grant_already_pending_or_done_is_refused_locally_as_a_duplicate() {
    let (sim, tab) = signed_in();
    let grant = tab.grant(DataType::Balance, 10);
    let mark = tab.mark();
    tab.apply_with_grant(DataType::Balance, 10, &grant).unwrap();
    assert_eq!(tab.apply_with_grant(DataType::Balance, 10, &grant).unwrap_err().code, "duplicate_op");
    assert_eq!(tab.coins(), 110, "pending: counted once");
    sim.drive();
    assert_eq!(tab.apply_with_grant(DataType::Balance, 10, &grant).unwrap_err().code, "duplicate_op");
    assert_eq!(tab.coins(), 110, "done: counted once");
    assert_eq!(tab.requests_since(mark).iter().filter(|(_, r)| r.method == Method::Post).count(), 1);
    assert_eq!(sim.hub_coins(), 110);
}

#[test]
fn writes_behind_a_credit_waiting_for_its_fresh_grant_wait_and_unload_leaves_the_credit_out() {
    let (sim, tab) = signed_in();
    sim.hub().set_grant_ttl(1_000);
    tab.go_offline();
    let op_id = tab.apply_delta(10).unwrap();
    sim.run_for(5_000);
    // The site's backend is slow to answer getGrant.
    tab.script_grants([GrantAnswer::Later]);
    tab.come_online();
    sim.drive();
    assert_eq!(tab.grant_asks(), std::slice::from_ref(&op_id));
    let spend = tab.apply_delta(-5).unwrap();
    sim.drive();
    assert_eq!(sim.hub().applied(&spend), 0, "the spend waits behind the credit");
    assert_eq!(tab.coins(), 105, "both still shown");
    let mark = tab.mark();
    tab.unload();
    let sent = writes(&tab.requests_since(mark));
    assert_eq!(sent, [vec![spend.clone()]], "the credit's grant is known to have expired");
    tab.answer_grant(&op_id, Some(10));
    sim.drive();
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(sim.hub().applied(&spend), 1);
    assert_eq!(tab.grant_asks().len(), 1);
    assert_eq!(sim.hub_coins(), 105);
    assert_in_step(&sim, &tab);
}

// ---- only the hub's own answer settles a write ----

#[test]
fn a_proxy_answer_without_the_hubs_body_leaves_the_write_pending_and_says_why() {
    let (sim, tab) = signed_in();
    for (round, status) in [403u16, 404, 400, 502].into_iter().enumerate() {
        sim.hub().set_mode(Mode::Foreign { status });
        let mark = tab.mark();
        let op_id = tab.apply_delta(-10).unwrap();
        sim.run_for(30_000);
        assert!(tab.refused().is_empty(), "{status}: rolled back for an answer that is not the hub's");
        assert!(tab.pending().iter().any(|op| op.op_id == op_id), "{status}: no longer pending");
        assert_eq!(tab.coins(), 90 - 10 * round as i64, "{status}: still shown");
        assert_eq!((tab.status(), tab.status_reason()), (Status::Error, Some(Reason::UnexpectedAnswer)));
        assert!(sends_of(&tab.requests_since(mark), &op_id).len() >= 3, "{status}: retried with backoff");
        assert!(tab.debug_log().contains(&format!("HTTP {status} without the hub's body")), "{status}");
        sim.hub().up();
        sim.drive();
        assert_eq!(sim.hub().applied(&op_id), 1, "{status}");
        assert_eq!((tab.status(), tab.status_reason()), (Status::Idle, None), "{status}");
    }
    assert_eq!(tab.errors(), [Reason::UnexpectedAnswer; 4], "one error event each time");
    assert_eq!(sim.hub_coins(), 60);
    assert_in_step(&sim, &tab);
}

#[test]
fn a_200_without_the_hubs_body_confirms_nothing() {
    let (sim, tab) = signed_in();
    sim.hub().script([Mode::Foreign { status: 200 }]);
    let op_id = tab.apply_delta(-10).unwrap();
    sim.run_for(100);
    assert_eq!(sim.hub().applied(&op_id), 0);
    assert!(tab.pending().iter().any(|op| op.op_id == op_id), "a captive portal's 200 is no confirmation");
    assert_eq!(tab.status_reason(), Some(Reason::UnexpectedAnswer));
    sim.drive();
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert!(tab.pending().is_empty());
    assert_eq!((tab.coins(), tab.status()), (90, Status::Idle));
    assert_in_step(&sim, &tab);
}

#[test]
fn a_proxy_403_on_a_check_is_not_taken_for_a_refused_token() {
    let (sim, tab) = signed_in();
    sim.hub().script([Mode::Foreign { status: 403 }]);
    assert!(!tab.tab_returns());
    assert_eq!((tab.status(), tab.status_reason()), (Status::Error, Some(Reason::UnexpectedAnswer)));
    // The page's token was not given up on: the next write goes without an explicit check.
    let op_id = tab.spend(5);
    assert_eq!(sim.hub().applied(&op_id), 1);
    assert_eq!(tab.token_asks(), 1);
    assert_eq!((tab.status(), tab.status_reason()), (Status::Idle, None));
}

// ---- batches ----

#[test]
fn a_credit_and_a_spend_left_at_pagehide_land_in_order_in_one_batch() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({"coins": 5}));
    let tab = sim.open(SITE_A);
    tab.login();
    sim.hub().down();
    let credit = tab.apply_delta(10).unwrap();
    let spend = tab.apply_delta(-15).unwrap();
    sim.run_for(100);
    assert_eq!(tab.coins(), 0);
    sim.hub().up();
    // A page's last requests may reach the hub in any order: hold them, release the spend's
    // first.
    sim.net().hold_when(|p| !p.is_reply() && p.request().keepalive);
    let mark = tab.mark();
    tab.unload();
    tab.close();
    assert_eq!(
        writes(&tab.requests_since(mark)),
        [vec![credit.clone(), spend.clone()]],
        "one batch, in order"
    );
    sim.release_if(|p| op_ids_of(p.request()).contains(&spend));
    sim.run_for(1_000);
    sim.release();
    sim.drive();
    assert_eq!(sim.hub().applied(&credit), 1);
    assert_eq!(sim.hub().applied(&spend), 1, "the spend came after the credit");
    assert_eq!(sim.hub_coins(), 0);
}

#[test]
fn a_batch_the_hub_stops_half_way_keeps_the_rest_pending_in_order() {
    let (sim, tab) = signed_in();
    sim.hub().down();
    let ops: Vec<String> = [-1, -2, -3].into_iter().map(|n| tab.apply_delta(n).unwrap()).collect();
    sim.run_for(100);
    sim.hub().up();
    sim.hub().fail_next_batch_at(1);
    let mark = tab.mark();
    tab.come_online();
    sim.drive();
    assert_eq!(writes(&tab.requests_since(mark)), [ops.clone(), ops[1..].to_vec()]);
    let statuses: Vec<Option<u16>> =
        sim.hub().seen().iter().filter(|s| s.in_batch).map(|s| s.status).take(3).collect();
    assert_eq!(statuses, [Some(200), Some(503), Some(503)], "applied, failed, not attempted");
    for op_id in &ops {
        assert_eq!(sim.hub().applied(op_id), 1);
    }
    assert!(tab.refused().is_empty());
    assert_eq!(sim.hub_coins(), 94);
    assert_in_step(&sim, &tab);
}

#[test]
fn writes_go_one_at_a_time_to_a_hub_that_refuses_batches() {
    let (sim, tab) = signed_in();
    sim.hub().set_refuses_batches(true);
    sim.hub().down();
    let ops: Vec<String> = [-1, -2, -3].into_iter().map(|n| tab.apply_delta(n).unwrap()).collect();
    sim.run_for(100);
    sim.hub().up();
    let mark = tab.mark();
    tab.come_online();
    sim.drive();
    let one = |i: usize| vec![ops[i].clone()];
    assert_eq!(writes(&tab.requests_since(mark)), [ops.clone(), one(0), one(1), one(2)]);
    assert!(tab.refused().is_empty(), "a batch refused as a whole rolls nothing back");
    assert_eq!(sim.hub_coins(), 94);
    assert_in_step(&sim, &tab);
}

#[test]
fn batches_carry_at_most_max_batch_ops_and_fit_the_hubs_body_limit() {
    let (sim, tab) = signed_in();
    sim.hub().down();
    let spends: Vec<String> = (0..40).map(|_| tab.apply_delta(-1).unwrap()).collect();
    sim.run_for(100);
    sim.hub().up();
    let mark = tab.mark();
    tab.come_online();
    sim.drive();
    let sizes: Vec<usize> = writes(&tab.requests_since(mark)).iter().map(Vec::len).collect();
    assert_eq!(sizes, [protocol::MAX_BATCH_OPS, 40 - protocol::MAX_BATCH_OPS]);
    assert!(spends.iter().all(|op_id| sim.hub().applied(op_id) == 1));

    // Settings pushes of 3 KB each (a setting holds 1,000 characters): a batch holds what fits
    // 64 KiB.
    sim.hub().down();
    let note = "€".repeat(995);
    let pushes: Vec<String> =
        (0..40).map(|i| tab.push(DataType::Settings, json!({ "note": format!("{i}{note}") }))).collect();
    sim.run_for(100);
    sim.hub().up();
    let mark = tab.mark();
    tab.come_online();
    sim.drive();
    let sent = tab.requests_since(mark);
    let batches: Vec<&Request> = sent.iter().map(|(_, r)| r).filter(|r| op_ids_of(r).len() > 1).collect();
    assert!(batches.len() >= 2, "{} batches", batches.len());
    for batch in &batches {
        let bytes = batch.body.as_ref().unwrap().to_text().len();
        assert!(bytes <= protocol::wire::MAX_BODY_BYTES, "a batch of {bytes} bytes");
    }
    assert_eq!(tab.refused(), []);
    assert!(pushes.iter().all(|op_id| sim.hub().applied(op_id) == 1));
    assert_eq!(
        sim.hub().record(USER, DataType::Settings).data["note"],
        json!(format!("39{note}")),
        "in order"
    );
}

#[test]
fn unload_sends_what_fits_the_keepalive_budget_and_leaves_the_rest_to_the_next_page() {
    let (sim, tab) = signed_in();
    sim.hub().down();
    let note = "€".repeat(995);
    let pushes: Vec<String> =
        (0..40).map(|i| tab.push(DataType::Settings, json!({ "note": format!("{i}{note}") }))).collect();
    sim.run_for(100);
    sim.hub().up();
    let mark = tab.mark();
    tab.unload();
    let sent = tab.requests_since(mark);
    let bytes: usize = sent.iter().map(|(_, r)| r.body.as_ref().unwrap().to_text().len()).sum();
    assert!(bytes <= protocol::wire::MAX_BODY_BYTES, "{bytes} bytes of keepalive bodies");
    let carried: Vec<String> = sent.iter().flat_map(|(_, r)| op_ids_of(r)).collect();
    assert!(carried.len() >= 10, "{} writes carried", carried.len());
    assert_eq!(carried, pushes[..carried.len()], "the oldest, in order");
    tab.close();
    sim.drive();
    let page = sim.open(SITE_A);
    sim.drive();
    assert!(pushes.iter().all(|op_id| sim.hub().applied(op_id) == 1), "the next page sends the rest");
    assert!(page.pending().is_empty());
}

// ---- op ids the hub can date ----

const MINUTE_MS: u64 = 60 * 1000;
const DAY_MS: u64 = 24 * 60 * MINUTE_MS;

#[test]
fn op_ids_are_uuid7_dated_by_the_hubs_clock_when_the_devices_is_a_month_behind() {
    let sim = Sim::new();
    sim.hub().set_skew(30 * DAY_MS as i64);
    sim.hub().set_retention(7 * DAY_MS);
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let tab = sim.open(SITE_A);
    tab.login();
    let dated =
        |op_id: &str| protocol::uuid7_ms(op_id).unwrap_or_else(|| panic!("{op_id}: not a UUIDv7")) as u64;
    let op_id = tab.spend(10);
    let now = sim.now();
    let hub_now = sim.hub().clock(now);
    assert!(
        hub_now.abs_diff(dated(&op_id)) < 2_000,
        "dated {} ms from the hub's clock",
        hub_now.abs_diff(dated(&op_id))
    );
    assert_eq!(sim.hub().applied(&op_id), 1);
    // The next page dates its ids by what this one learned before any answer comes.
    tab.reload();
    tab.go_offline();
    let offline = tab.apply_delta(-5).unwrap();
    let now = sim.now();
    let hub_now = sim.hub().clock(now);
    assert!(
        hub_now.abs_diff(dated(&offline)) < 2_000,
        "dated {} ms from the hub's clock",
        hub_now.abs_diff(dated(&offline))
    );
    tab.come_online();
    sim.drive();
    assert_eq!(sim.hub().applied(&offline), 1);
    assert!(tab.refused().is_empty());
    assert_eq!(sim.hub_coins(), 85);
}

#[test]
fn an_op_older_than_the_hubs_retention_is_dropped_refetched_and_refused_op_expired() {
    let (sim, tab) = signed_in();
    sim.hub().set_retention(10 * MINUTE_MS);
    sim.hub().down();
    let op_id = tab.apply_delta(-10).unwrap();
    sim.run_for(20 * MINUTE_MS);
    sim.hub().up();
    let mark = tab.mark();
    sim.drive();
    assert_eq!(tab.refused(), [(op_id.clone(), "op_expired".to_owned())]);
    assert_eq!(sim.hub().applied(&op_id), 0);
    assert!(tab.pending().is_empty(), "dropped from the outbox");
    let sent = tab.requests_since(mark);
    let refused_at = sent.iter().rposition(|(_, r)| op_ids_of(r).contains(&op_id)).unwrap();
    assert_eq!(actions(&sent[refused_at + 1..])[..1], ["timestamp"], "the record is checked again");
    assert_eq!(tab.coins(), 100, "the hub's record");
    assert_in_step(&sim, &tab);
}

#[test]
fn an_op_applied_then_forgotten_is_refused_op_expired_and_the_refetch_shows_it_once() {
    let (sim, tab) = signed_in();
    sim.hub().set_retention(10 * MINUTE_MS);
    // The hub applies the spend but its answer is lost, and then it is out of reach long
    // enough to forget the op.
    sim.net().hold_when(|p| p.is_reply() && p.request().method == Method::Post);
    let op_id = tab.apply_delta(-10).unwrap();
    sim.run_for(100);
    assert_eq!(sim.hub().applied(&op_id), 1);
    sim.net().drop_held();
    sim.hub().down();
    sim.run_for(20 * MINUTE_MS);
    sim.hub().up();
    sim.drive();
    assert_eq!(tab.refused(), [(op_id.clone(), "op_expired".to_owned())]);
    assert_eq!(sim.hub().applied(&op_id), 1, "never applied twice");
    assert_eq!((tab.coins(), sim.hub_coins()), (90, 90), "the refetched record shows it applied");
    assert_in_step(&sim, &tab);
}

// ---- storage ----

#[test]
fn a_storage_that_refuses_is_an_error_until_a_store_succeeds() {
    let (sim, tab) = signed_in();
    sim.set_storage_refuses(SITE_A, true);
    let op_id = tab.apply_delta(-10).unwrap();
    assert_eq!((tab.status(), tab.status_reason()), (Status::Error, Some(Reason::StorageFailed)));
    assert_eq!(tab.errors(), [Reason::StorageFailed]);
    sim.drive();
    assert_eq!(sim.hub().applied(&op_id), 1, "the write is sent all the same");
    assert_eq!(
        tab.status_reason(),
        Some(Reason::StorageFailed),
        "the confirmation could not be stored either"
    );
    sim.set_storage_refuses(SITE_A, false);
    tab.spend(1);
    assert_eq!((tab.status(), tab.status_reason()), (Status::Idle, None));
    assert_eq!(tab.errors(), [Reason::StorageFailed]);
}

#[test]
fn tabs_that_learn_of_each_others_writes_only_through_storage_deliver_each_once() {
    let sim = Sim::new();
    sim.set_storage_events(false);
    sim.hub_write(DataType::Balance, json!({"coins": 100}));
    let (tab1, tab2) = (sim.open(SITE_A), sim.open(SITE_A));
    tab1.login();
    tab2.login();
    sim.hub().down();
    let first = tab1.apply_delta(-1).unwrap();
    let second = tab2.apply_delta(-2).unwrap();
    let stored: BTreeSet<String> =
        sim.storage(SITE_A).unwrap().outbox.into_iter().map(|op| op.op_id).collect();
    assert_eq!(
        stored,
        BTreeSet::from([first.clone(), second.clone()]),
        "the second tab kept the first's write when it stored"
    );
    tab1.close();
    tab2.close();
    sim.hub().up();
    let page = sim.open(SITE_A);
    sim.drive();
    assert_eq!(sim.hub().applied(&first), 1);
    assert_eq!(sim.hub().applied(&second), 1);
    assert_eq!(page.coins(), 97);
}
