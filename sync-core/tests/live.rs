//! The hub's event stream, one story per test, through the fake hub, the fake clock and the
//! network of `support`: changes reaching open tabs without a request, one stream per site
//! shared with the site's other tabs, the grace of a hidden tab and the resume on its return,
//! events without data, duplicates and stale events, a hub without events, backoff, `reauth`,
//! `resync` and a new epoch, and pending writes kept on top of what events bring.

mod support;

use serde_json::json;
use support::hub::Mode;
use support::{Sim, Tab, action_of};
use sync_core::{
    DataType, Event, Json, Method, Reason, STREAM_GRACE_MS, STREAM_READY_WAIT_MS, STREAM_SILENCE_MS, Source,
    Status, StreamEvent, StreamInput, Trigger,
};

const SITE_A: &str = "roflfaucet";
const SITE_B: &str = "clickforcharity";

/// The sync requests (`timestamp`, `get`, `delta`, …) a tab sent since `mark`.
fn actions_since(tab: &Tab, mark: support::Mark) -> Vec<String> {
    tab.requests_since(mark).iter().map(|(_, r)| action_of(r)).collect()
}

/// A hub where the user has 100 coins and a live, signed-in tab of each site.
fn two_sites() -> (Sim, Tab, Tab) {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({ "coins": 100 }));
    let (a, b) = (sim.open_live(SITE_A), sim.open_live(SITE_B));
    assert!(a.login() && b.login());
    assert!(a.live() && b.live(), "both tabs are live once signed in");
    (sim, a, b)
}

/// The sources of the balance's `Data` events since `mark`.
fn balance_sources(tab: &Tab, mark: support::Mark) -> Vec<(i64, Source)> {
    tab.events_since(mark)
        .into_iter()
        .filter_map(|event| match event {
            Event::Data { data_type: DataType::Balance, data, source, .. } => {
                Some((data.get("coins").and_then(Json::as_i64).unwrap_or(-1), source))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_change_on_one_site_reaches_the_other_sites_open_tab_without_a_request() {
    let (sim, a, b) = two_sites();
    let mark = b.mark();
    a.delta(10);
    sim.drive();
    assert_eq!(b.coins(), 110);
    assert_eq!(actions_since(&b, mark), Vec::<String>::new(), "b asked the hub nothing");
    assert_eq!(balance_sources(&b, mark), [(110, Source::Hub)]);
    assert_eq!(b.streams().len(), 1, "one stream, opened once");
}

#[test]
fn a_tab_return_while_the_stream_is_open_sends_nothing() {
    let (sim, a, _) = two_sites();
    let mark = a.mark();
    a.hide();
    sim.run_for(STREAM_GRACE_MS - 1_000);
    let ticket = a.show();
    sim.drive();
    assert_eq!(a.check_done(ticket), Some(true));
    assert_eq!(actions_since(&a, mark), Vec::<String>::new());
    assert_eq!(a.streams().len(), 1, "the stream stayed open through the grace");
}

#[test]
fn hidden_past_the_grace_the_stream_closes_and_on_return_resumes_with_no_check() {
    let (sim, a, b) = two_sites();
    a.hide();
    sim.run_for(STREAM_GRACE_MS + 1);
    assert!(!a.live(), "a hidden tab's stream closes after the grace");
    assert!(!a.holds_stream_lock(), "and lets go of the site's lock");
    // Nothing changed meanwhile: the return is the stream alone.
    let mark = a.mark();
    let ticket = a.show();
    sim.drive();
    assert_eq!(a.check_done(ticket), Some(true));
    assert_eq!(actions_since(&a, mark), Vec::<String>::new(), "no timestamp check");
    let streams = a.streams();
    assert_eq!(streams.len(), 2);
    assert!(streams[1].last_event_id.is_some(), "the second stream resumes");
    assert!(a.live());

    // A change made while it is hidden comes with the resumed stream.
    a.hide();
    sim.run_for(STREAM_GRACE_MS + 1);
    b.delta(5);
    let mark = a.mark();
    a.show();
    sim.drive();
    assert_eq!(a.coins(), 105);
    assert_eq!(actions_since(&a, mark), Vec::<String>::new());
}

#[test]
fn a_stream_that_does_not_come_back_leaves_the_tab_return_to_a_check() {
    let (sim, a, _) = two_sites();
    a.hide();
    sim.run_for(STREAM_GRACE_MS + 1);
    // The hub is still there, but the stream's opening goes nowhere.
    sim.hub().script([Mode::Down]);
    let mark = a.mark();
    a.show();
    sim.run_for(STREAM_READY_WAIT_MS);
    sim.drive();
    assert_eq!(actions_since(&a, mark)[0], "timestamp", "the check of today, once the stream failed");
    assert_eq!(a.status(), Status::Idle, "a broken stream shows no error");
}

#[test]
fn one_tab_per_site_keeps_the_stream_and_the_others_take_its_events() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({ "coins": 100 }));
    let first = sim.open_live(SITE_A);
    let second = sim.open_live(SITE_A);
    let other_site = sim.open_live(SITE_B);
    for tab in [&first, &second, &other_site] {
        assert!(tab.login());
    }
    assert_eq!(first.streams().len() + second.streams().len(), 1, "one stream for the site");
    assert!(first.live() && second.live(), "the tab without the stream is live through the other");
    let follower = if first.holds_stream_lock() { &second } else { &first };
    let mark = follower.mark();
    other_site.delta(7);
    sim.drive();
    assert_eq!(follower.coins(), 107);
    assert_eq!(balance_sources(follower, mark), [(107, Source::Hub)]);
    assert_eq!(actions_since(follower, mark), Vec::<String>::new());
}

#[test]
fn when_the_tab_holding_the_stream_closes_another_takes_it_and_resumes() {
    let sim = Sim::new();
    let first = sim.open_live(SITE_A);
    let second = sim.open_live(SITE_A);
    assert!(first.login() && second.login());
    let (holder, follower) = if first.holds_stream_lock() { (first, second) } else { (second, first) };
    holder.close();
    sim.drive();
    assert!(follower.holds_stream_lock());
    let streams = follower.streams();
    assert_eq!(streams.len(), 1);
    assert!(streams[0].last_event_id.is_some(), "it resumes where the other tab's stream was");
    assert!(follower.live());
    sim.hub_write(DataType::Balance, json!({ "coins": 3 }));
    sim.drive();
    assert_eq!(follower.coins(), 3);
}

#[test]
fn a_change_too_large_to_come_with_its_data_is_fetched_by_the_tab_holding_the_stream() {
    let sim = Sim::new();
    sim.hub().set_inline_limit(0);
    let holder = sim.open_live(SITE_A);
    assert!(holder.login());
    let follower = sim.open_live(SITE_A);
    assert!(follower.login());
    let (holder_mark, follower_mark) = (holder.mark(), follower.mark());
    sim.hub_write(DataType::Profile, json!({ "bio": "hi" }));
    sim.drive();
    assert_eq!(actions_since(&holder, holder_mark), ["get"]);
    assert_eq!(actions_since(&follower, follower_mark), Vec::<String>::new(), "shared, not fetched again");
    assert_eq!(follower.view(DataType::Profile), Some(json!({ "bio": "hi" })));
}

#[test]
fn duplicated_and_stale_events_change_nothing() {
    let (sim, a, _) = two_sites();
    let current = a.record(DataType::Balance).unwrap();
    let mark = a.mark();
    let stale = |version: u64, coins: i64| {
        let data = Json::object()
            .with("data_type", "balance")
            .with("version", version)
            .with("last_updated", "2025-11-09T18:45:30.123Z")
            .with("data", Json::object().with("coins", coins));
        StreamInput::Event(StreamEvent { name: String::new(), id: Some("epoch-1.1".into()), data })
    };
    a.stream_input(stale(current.version, 1));
    a.stream_input(stale(current.version - 1, 2));
    a.stream_input(StreamInput::Shared(StreamEvent {
        name: String::new(),
        id: None,
        data: Json::object().with("data_type", "balance").with("version", current.version),
    }));
    sim.drive();
    assert_eq!(a.record(DataType::Balance).unwrap(), current);
    assert_eq!(balance_sources(&a, mark), []);
    assert_eq!(actions_since(&a, mark), Vec::<String>::new());
}

#[test]
fn an_event_never_hides_a_pending_write() {
    let (sim, a, b) = two_sites();
    // a's spend waits for its retry; meanwhile b's credit reaches a through the stream.
    sim.hub().script([Mode::Unavailable]);
    a.apply_delta(-5).unwrap();
    sim.run_for(50);
    assert_eq!(a.pending().len(), 1);
    b.apply(DataType::Balance, 10).unwrap();
    sim.run_for(50);
    assert_eq!(a.record(DataType::Balance).unwrap().data, Json::object().with("coins", 110i64));
    assert_eq!(a.coins(), 105, "the hub's 110 and the pending spend on top");
    sim.drive();
    assert_eq!(a.coins(), 105);
    assert_eq!(sim.hub_coins(), 105);
}

#[test]
fn the_tabs_own_write_is_not_shown_twice_while_its_answer_is_on_its_way() {
    let (sim, a, _) = two_sites();
    sim.net().hold_when(|p| p.is_reply() && p.request().method == Method::Post);
    a.apply_delta(-5).unwrap();
    sim.run_for(100);
    assert_eq!(sim.hub_coins(), 95, "applied; its answer is held");
    assert_eq!(a.coins(), 95, "the event of its own write waits for the answer");
    sim.release();
    sim.drive();
    assert_eq!(a.coins(), 95);
    assert!(a.pending().is_empty());
}

#[test]
fn a_hub_without_events_keeps_todays_checks_and_shows_no_error() {
    let sim = Sim::new();
    sim.hub().set_events(false);
    let a = sim.open_live(SITE_A);
    assert!(a.login());
    assert!(!a.live());
    assert!(!a.holds_stream_lock(), "the lock goes back");
    assert_eq!(a.status(), Status::Idle);
    assert_eq!(a.status_reason(), None);
    let mark = a.mark();
    assert!(a.tab_returns());
    assert_eq!(actions_since(&a, mark), ["timestamp"], "a tab return checks as today");
    a.hide();
    sim.run_for(STREAM_GRACE_MS * 10);
    assert!(a.tab_returns());
    assert_eq!(a.streams().len(), 1, "never tried again");
}

#[test]
fn a_dropped_stream_reconnects_with_backoff_and_resumes() {
    let (sim, a, _) = two_sites();
    sim.hub().down();
    sim.run_for(20_000);
    sim.hub().up();
    sim.drive();
    assert!(a.live());
    let streams = a.streams();
    assert!(streams.len() > 3, "it tried again: {}", streams.len());
    assert!(streams[1..].iter().all(|s| s.last_event_id.is_some()), "every reconnect resumes");
    let times = a.stream_times();
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[1] > gaps[0] && gaps[2] > gaps[1], "each try waits longer: {gaps:?}");
    assert!(gaps[0] <= 1_100, "the first try again comes soon: {gaps:?}");
    assert_eq!(a.status(), Status::Idle, "a broken stream shows no error");
}

#[test]
fn a_silent_stream_counts_as_broken_and_the_hub_as_unreachable() {
    let sim = Sim::new();
    // The hub's heartbeats (which the fake hub does not send) would keep a quiet stream: this
    // one is silent from the start.
    let a = sim.open_with(SITE_A, |config| config.live = true);
    a.trigger(Trigger::Login);
    sim.run_for(1_000);
    assert!(a.live());
    // The hub is frozen: nothing comes on the stream, not even its heartbeat.
    sim.freeze_streams(true);
    sim.hub().down();
    sim.run_for(STREAM_SILENCE_MS - 1_000);
    assert!(a.live(), "a quiet stream is not broken yet");
    sim.run_for(2_000);
    assert!(!a.live());
    assert_eq!((a.status(), a.status_reason()), (Status::Offline, Some(Reason::Unreachable)));
    let tried = a.streams().len();
    sim.freeze_streams(false);
    sim.hub().up();
    sim.run_for(10_000);
    assert!(a.streams().len() > tried, "it opens the stream again");
    assert!(a.live());
    assert_eq!(a.status(), Status::Idle, "the stream's ready ends the outage");
}

#[test]
fn too_many_streams_waits_for_retry_after() {
    let sim = Sim::new();
    sim.hub().script([Mode::Busy { retry_after: 30 }]);
    let a = sim.open_live(SITE_A);
    sim.run_for(29_000);
    assert_eq!(a.streams().len(), 1, "no second try before Retry-After");
    sim.run_for(2_000);
    sim.drive();
    assert_eq!(a.streams().len(), 2);
    assert!(a.live());
}

#[test]
fn reauth_gets_a_fresh_token_and_reconnects_where_it_was() {
    let (sim, a, _) = two_sites();
    let before = a.token_asks();
    sim.hub().expire_tokens();
    sim.drive();
    assert_eq!(a.token_asks(), before + 1, "one fresh token");
    let streams = a.streams();
    assert_eq!(streams.len(), 2);
    assert_ne!(streams[0].token, streams[1].token);
    assert!(streams[1].last_event_id.is_some());
    assert!(a.live());
}

#[test]
fn a_fresh_stream_checks_once_unless_a_check_ended_since_it_began_opening() {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({ "coins": 4 }));
    // No login: the fresh stream's `ready` asks for the check.
    let a = sim.open_live(SITE_A);
    sim.drive();
    assert_eq!(a.coins(), 4);
    assert_eq!(a.requests().iter().filter(|r| action_of(r) == "timestamp").count(), 1);
    // A login as the page starts: the stream's `ready` needs no second check.
    let b = sim.open_live(SITE_B);
    assert!(b.login());
    assert_eq!(b.requests().iter().filter(|r| action_of(r) == "timestamp").count(), 1);
}

#[test]
fn resync_and_a_new_epoch_check_the_hub() {
    let (sim, a, _) = two_sites();
    a.hide();
    sim.run_for(STREAM_GRACE_MS + 1);
    sim.hub_write(DataType::Balance, json!({ "coins": 8 }));
    sim.hub().forget_changes();
    let mark = a.mark();
    a.show();
    sim.drive();
    assert_eq!(actions_since(&a, mark), ["timestamp", "get"], "resync: one check");
    assert_eq!(a.coins(), 8);

    a.hide();
    sim.run_for(STREAM_GRACE_MS + 1);
    sim.hub().replace_database("epoch-2");
    sim.hub_write(DataType::Balance, json!({ "coins": 1 }));
    a.show();
    sim.drive();
    assert_eq!(a.coins(), 1);
    assert_eq!(a.persisted().epoch.as_deref(), Some("epoch-2"));
}

#[test]
fn without_live_the_engine_never_asks_for_a_stream() {
    let sim = Sim::new();
    let a = sim.open(SITE_A);
    assert!(a.login());
    a.hide();
    sim.run_for(STREAM_GRACE_MS * 2);
    assert!(a.tab_returns());
    let asked = a
        .events_since(support::Mark::default())
        .iter()
        .any(|event| matches!(event, Event::StreamLock(_) | Event::Stream(_) | Event::Live(_)));
    assert!(!asked);
    assert!(!a.live());
}
