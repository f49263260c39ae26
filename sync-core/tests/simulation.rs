//! A randomized simulation, property style: for each seed, two or three tabs on one or two
//! sites make deltas (mostly small gains, each with a grant from its site's backend, some
//! spends) and pushes, come back to view, reload (with or without a keepalive flush), leave
//! with several writes pending (sent in keepalive batches), go offline; the hub goes down,
//! restarts in place, answers 429 and 503, fails a batch half way, lets tokens expire and
//! refuses grants that expired (the world's grants live 10 minutes, a minute or 5 seconds),
//! and the pages get fresh ones for the same ops; something in front of the hub answers for
//! it (a proxy's 400, 403, 404 or 502, a bare 200); in some worlds the hub forgets op ids
//! after a few minutes and refuses older unknown ones (`op_expired`), the devices' clocks are a
//! month off the hub's, and tabs of one site learn of each other's writes only through the
//! storage they share (as in a browser), not at once; the network drops, duplicates, delays
//! and reorders packets. In half the worlds the tabs keep the hub's event stream: one tab per
//! site holds it and shares its events, streams break where a packet is lost, their events
//! come twice or late (overtaking other traffic, never their own stream's), the hub ends them
//! when it goes down or tokens expire, forgets the changes kept for resuming (`resync`), and
//! in some worlds sends changes without their data (fetched). Before the end of such a world,
//! every tab comes back to view, one more change is written on the hub, and every tab that
//! says it is live must cache it without any check. At the end the hub is up, the network
//! heals, every tab gets a forced check, and the world runs until quiescent. Then:
//!
//! - no op id any engine made was applied more than once;
//! - every op not refused was applied exactly once, only balance refusals and `op_expired`
//!   happened, and nothing the hub did not answer was rolled back;
//! - the hub's amounts are the sum of the applied deltas, never below zero;
//! - every open tab has no pending write and caches exactly the hub's records;
//! - no cached record was ever replaced by an older version, every write was stored before
//!   it was first sent, every check a page waited for ended, and no engine asked to be woken
//!   in the past (unless it had given up on auth).
//!
//! Each run draws a random first seed and runs `SYNC_SIM_SEEDS` seeds from it (default
//! 2,000), so that every run explores worlds no run saw before; it prints the first seed.
//! `SYNC_SIM_FIRST_SEED=F` starts from F instead (to repeat a whole run), and
//! `SYNC_SIM_SEED=S` runs seed S alone, with the engines' debug lines. A failure prints the
//! story of its world and the exact command that replays it. A run of 100 seeds or more also
//! checks that it exercised every kind of fault: dropped, duplicated and reordered packets,
//! requests the hub left unanswered or refused while down, answers that were not the hub's,
//! page reloads, pages that left several writes in one keepalive batch, batches the hub
//! stopped half way, ops refused as expired, tabs sharing storage, and credits granted again
//! after their grants expired.
//!
//! The simulation proves properties of the engine against a fake hub with the real hub's
//! rules; it says nothing about the real hub's own storage or HTTP (see `hub/tests`).

mod support;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;
use support::hub::{GRANT_TTL_MS, Mode};
use support::net::Faults;
use support::{Sim, Tab, USER};
use sync_core::{DataType, Trigger};

/// A minute and a day of the fake clock.
const MINUTE_MS: u64 = 60 * 1000;
const DAY_MS: u64 = 24 * 60 * MINUTE_MS;

const SITES: [&str; 2] = ["roflfaucet", "clickforcharity"];
const DEFAULT_SEEDS: u64 = 2_000;
/// A run of at least this many seeds must have exercised every kind of fault.
const SEEDS_FOR_COVERAGE: usize = 100;

/// How often each kind of fault happened, over one world or a whole run.
#[derive(Debug, Default, Clone, Copy)]
struct Exercised {
    dropped: u64,
    duplicated: u64,
    reordered: u64,
    /// Requests the hub received while down (no answer) or unavailable (503).
    outages: u64,
    /// Page loads after the first: engines rebuilt from what the previous page stored.
    reloads: u64,
    /// Fresh grants the engines asked for, for credits whose grants expired unapplied.
    regrants: u64,
    /// Answers that something in front of the hub gave instead of it.
    foreign: u64,
    /// Keepalive batches of several writes, from pages leaving.
    exit_batches: u64,
    /// Batches the hub stopped half way (an op failed; the ones after it not attempted).
    stopped_batches: u64,
    /// Ops the hub refused as expired.
    expired: u64,
    /// Worlds whose tabs of one site, learning of each other's writes only through storage,
    /// both wrote.
    shared_storage: u64,
    /// Event streams that resumed after a `Last-Event-ID`.
    resumed_streams: u64,
    /// Changes that reached a tab through an event stream.
    streamed_changes: u64,
}

impl Exercised {
    fn add(&mut self, other: Exercised) {
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.outages += other.outages;
        self.reloads += other.reloads;
        self.regrants += other.regrants;
        self.foreign += other.foreign;
        self.exit_batches += other.exit_batches;
        self.stopped_batches += other.stopped_batches;
        self.expired += other.expired;
        self.shared_storage += other.shared_storage;
        self.resumed_streams += other.resumed_streams;
        self.streamed_changes += other.streamed_changes;
    }
}

/// The seeds of this run, and the command that runs them again.
fn seeds() -> (Vec<u64>, String) {
    let number = |name: &str| {
        std::env::var(name).ok().map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{name} is a number")))
    };
    if let Some(seed) = number("SYNC_SIM_SEED") {
        return (vec![seed], replay_command(seed));
    }
    let count = number("SYNC_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    assert!(count > 0, "SYNC_SIM_SEEDS is at least 1");
    let first = number("SYNC_SIM_FIRST_SEED").unwrap_or_else(|| RandomState::new().hash_one("first seed"));
    let seeds = (0..count).map(|i| first.wrapping_add(i)).collect();
    let again = format!(
        "SYNC_SIM_FIRST_SEED={first} SYNC_SIM_SEEDS={count} cargo test -p sync-core --test simulation"
    );
    (seeds, again)
}

fn replay_command(seed: u64) -> String {
    format!("SYNC_SIM_SEED={seed} cargo test -p sync-core --test simulation")
}

#[test]
fn random_worlds_apply_every_delta_once_and_converge() {
    let (seeds, again) = seeds();
    eprintln!("simulation: {} seeds; to run them again: {again}", seeds.len());
    // Debug lines cost time; a single seed, rerun after a failure, shows them.
    let debug = seeds.len() == 1;
    // Seeds are independent worlds: spread them over the cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    let failed = AtomicBool::new(false);
    let failure: Mutex<Option<(u64, String, String)>> = Mutex::new(None);
    let exercised = Mutex::new(Exercised::default());
    std::thread::scope(|scope| {
        for lane in 0..threads {
            let (seeds, failed, failure, exercised) = (&seeds, &failed, &failure, &exercised);
            scope.spawn(move || {
                for &seed in seeds.iter().skip(lane).step_by(threads) {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let story = RefCell::new(Vec::new());
                    match catch_unwind(AssertUnwindSafe(|| run(seed, debug, &story))) {
                        Ok(world) => exercised.lock().unwrap().add(world),
                        Err(panic) => {
                            failed.store(true, Ordering::Relaxed);
                            let message = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|m| (*m).to_owned()))
                                .unwrap_or_default();
                            failure.lock().unwrap().get_or_insert((seed, message, story.take().join("\n")));
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some((seed, message, story)) = failure.into_inner().unwrap() {
        panic!(
            "simulation failed for seed {seed}: {message}\n\nthe story of that world:\n{story}\n\n\
             replay it alone with:\n    {}",
            replay_command(seed)
        );
    }
    let exercised = exercised.into_inner().unwrap();
    eprintln!("simulation: {exercised:?}");
    if seeds.len() >= SEEDS_FOR_COVERAGE {
        let Exercised {
            dropped,
            duplicated,
            reordered,
            outages,
            reloads,
            regrants,
            foreign,
            exit_batches,
            stopped_batches,
            expired,
            shared_storage,
            resumed_streams,
            streamed_changes,
        } = exercised;
        for (kind, count) in [
            ("dropped packets", dropped),
            ("duplicated packets", duplicated),
            ("reordered packets", reordered),
            ("requests during hub outages", outages),
            ("page reloads", reloads),
            ("credits granted again", regrants),
            ("answers that are not the hub's", foreign),
            ("pages leaving several writes in one batch", exit_batches),
            ("batches stopped half way", stopped_batches),
            ("ops refused as expired", expired),
            ("tabs sharing storage", shared_storage),
            ("event streams resuming", resumed_streams),
            ("changes through event streams", streamed_changes),
        ] {
            assert!(count > 0, "{} seeds never exercised {kind}; to run them again: {again}", seeds.len());
        }
    }
}

/// One random world. Appends what happens to `story`; returns the faults it exercised.
fn run(seed: u64, debug: bool, story: &RefCell<Vec<String>>) -> Exercised {
    let tell = |line: String| story.borrow_mut().push(line);
    let sim = Sim::with_seed(seed);
    sim.set_debug(debug);
    // The world's rng drives the network and the engines' seeds; this one picks the story.
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_5eed_5eed_5eed);
    let initial = rng.i64(0..=200);
    sim.hub_write(DataType::Balance, json!({ "coins": initial }));
    let sites = if rng.bool() { &SITES[..1] } else { &SITES[..] };
    let live = rng.bool();
    let inline_limit = *rng.choice(&[2048, 2048, 0]).unwrap();
    sim.hub().set_inline_limit(inline_limit);
    let tabs: Vec<Tab> = (0..rng.usize(2..=3))
        .map(|i| {
            sim.open_with(sites[i % sites.len()], |config| {
                if live {
                    support::live(config);
                }
            })
        })
        .collect();
    let faults = Faults {
        drop: *rng.choice(&[0.0, 0.0, 0.02, 0.1]).unwrap(),
        duplicate: *rng.choice(&[0.0, 0.05, 0.2]).unwrap(),
        delay: *rng.choice(&[0.0, 0.1, 0.3]).unwrap(),
        max_delay_ms: rng.u64(1..=25_000),
    };
    sim.net().latency_ms = rng.u64(1..=30);
    sim.net().faults = faults;
    let grant_ttl_ms = *rng.choice(&[GRANT_TTL_MS, 60_000, 5_000]).unwrap();
    sim.hub().set_grant_ttl(grant_ttl_ms);
    let retention_ms = *rng.choice(&[None, None, Some(10 * MINUTE_MS), Some(3 * MINUTE_MS)]).unwrap();
    if let Some(ms) = retention_ms {
        sim.hub().set_retention(ms);
    }
    let skew_ms = *rng.choice(&[0, 0, 30 * DAY_MS as i64, -30 * DAY_MS as i64]).unwrap();
    sim.hub().set_skew(skew_ms);
    let storage_events = rng.bool();
    sim.set_storage_events(storage_events);
    tell(format!(
        "{initial} coins; tabs {:?}; {faults:?}; grants live {grant_ttl_ms} ms; op ids kept {retention_ms:?} \
         ms; the hub's clock {skew_ms:+} ms off the devices'; storage events {storage_events}; event streams \
         {live}, changes inline up to {inline_limit} bytes",
        tabs.iter().map(Tab::name).collect::<Vec<_>>()
    ));
    // Tickets the pages wait for, with the page load that asked.
    let mut tickets: Vec<(usize, u32, u64)> = Vec::new();
    let mut ask =
        |tab: &Tab, trigger: Trigger| tickets.push((tab.id(), tab.generation(), tab.trigger(trigger)));
    for tab in &tabs {
        ask(tab, Trigger::Login);
    }
    for _ in 0..rng.usize(15..=40) {
        let tab = &tabs[rng.usize(..tabs.len())];
        let action = rng.u32(0..100);
        let line = match action {
            0..=34 => {
                let data_type = if rng.u32(0..5) == 0 { DataType::Points } else { DataType::Balance };
                let amount = if rng.u32(0..10) < 7 { rng.i64(1..=20) } else { -rng.i64(1..=60) };
                match tab.apply(data_type, amount) {
                    Ok(op_id) => format!("{} {data_type} {amount:+} → {op_id}", tab.name()),
                    Err(refusal) => {
                        format!("{} {data_type} {amount:+} refused locally: {}", tab.name(), refusal.code)
                    }
                }
            }
            35..=42 => {
                let bio = format!("bio {}", rng.u32(..1000));
                let op_id = tab.push(DataType::Profile, json!({ "bio": bio }));
                format!("{} push {bio:?} → {op_id}", tab.name())
            }
            43..=54 => {
                let trigger = *rng
                    .choice(&[Trigger::TabVisible, Trigger::EnsureFresh, Trigger::PageShow, Trigger::Force])
                    .unwrap();
                if trigger == Trigger::TabVisible {
                    tab.hide();
                }
                ask(tab, trigger);
                format!("{} {trigger:?}", tab.name())
            }
            55..=58 => {
                tab.hide();
                format!("{} hidden", tab.name())
            }
            59..=63 => {
                if rng.bool() {
                    tab.reload_aborting();
                    format!("{} reloads, aborting its requests", tab.name())
                } else {
                    tab.reload();
                    format!("{} reloads", tab.name())
                }
            }
            64..=65 => {
                tab.unload_and_reload();
                format!("{} unloads (keepalive) and reloads", tab.name())
            }
            66..=67 => {
                // The hub is out of reach while the page makes several writes, then it leaves.
                let mode = sim.hub().mode();
                sim.hub().down();
                let amounts: Vec<i64> = (0..rng.usize(2..=4)).map(|_| -rng.i64(1..=5)).collect();
                let ops: Vec<String> = amounts.iter().filter_map(|&n| tab.apply_delta(n).ok()).collect();
                sim.run_for(rng.u64(10..=2_000));
                if rng.bool() {
                    sim.hub().set_mode(mode);
                }
                tab.unload_and_reload();
                format!("{} spends {amounts:?} → {ops:?} while the hub is away, and leaves", tab.name())
            }
            68..=72 => {
                sim.hub().down();
                "hub down".to_owned()
            }
            73..=78 => {
                sim.hub().up();
                "hub up".to_owned()
            }
            79..=81 => {
                let mode = sim.hub().mode();
                let pause = rng.u64(100..=5_000);
                sim.hub().down();
                sim.run_for(pause);
                sim.hub().set_mode(mode);
                format!("hub restarts in place ({pause} ms)")
            }
            82..=84 => {
                let retry_after = rng.u64(1..=20);
                sim.hub().set_mode(Mode::Busy { retry_after });
                format!("hub answers 429, Retry-After {retry_after}")
            }
            85 => {
                sim.hub().set_mode(Mode::Unavailable);
                "hub answers 503".to_owned()
            }
            86 => {
                let status = *rng.choice(&[200, 400, 403, 404, 502]).unwrap();
                sim.hub().set_mode(Mode::Foreign { status });
                format!("a proxy answers {status} for the hub")
            }
            87..=89 => {
                let pause = rng.u64(100..=30_000);
                sim.net().faults.drop = 1.0;
                sim.run_for(pause);
                sim.net().faults = faults;
                format!("network partition ({pause} ms)")
            }
            90..=92 => {
                tab.go_offline();
                format!("{} offline", tab.name())
            }
            93..=96 => {
                ask(tab, Trigger::Online);
                format!("{} online", tab.name())
            }
            97 => {
                let at = rng.usize(0..3);
                sim.hub().fail_next_batch_at(at);
                format!("the hub's next batch fails at op {at}")
            }
            98 => {
                sim.hub().forget_changes();
                "the hub forgets the changes kept for resuming streams".to_owned()
            }
            _ => {
                sim.hub().expire_tokens();
                "tokens expire".to_owned()
            }
        };
        tell(format!("+{}ms {line}", sim.now() - support::START_MS));
        let pause = match rng.u32(0..100) {
            0..=69 => rng.u64(0..50),
            70..=89 => rng.u64(50..5_000),
            90..=97 => rng.u64(5_000..120_000),
            _ => rng.u64(300_000..400_000),
        };
        sim.run_for(pause);
    }

    if live {
        tell(
            "the hub comes up, the network heals, every tab is back online and in view; one more change"
                .into(),
        );
        sim.hub().up();
        sim.net().heal();
        for tab in tabs.iter().filter(|t| t.is_open()) {
            ask(tab, Trigger::Online);
            ask(tab, Trigger::TabVisible);
        }
        // Streams open again within their backoff (at most a minute).
        sim.run_for(5 * MINUTE_MS);
        let written = sim.hub_write(DataType::Profile, json!({ "bio": "the last word" }));
        sim.run_for(MINUTE_MS);
        for tab in tabs.iter().filter(|t| t.is_open() && t.live()) {
            let version = tab.record(DataType::Profile).map_or(0, |r| r.version);
            assert!(
                version >= written.version && tab.streamed().contains(&(DataType::Profile, written.version)),
                "{} is live and the change did not reach it on a stream\n{}",
                tab.name(),
                tab.debug_log()
            );
        }
    }
    tell("the hub comes up, the network heals, every tab is online and forces checks".into());
    sim.hub().up();
    sim.net().heal();
    for tab in &tabs {
        // Hidden, a tab runs no inactivity check: two tabs whose last checks ended more than a
        // minute apart would otherwise always have one due sooner than the world counts as
        // quiet. The checks forced below still run.
        tab.hide();
        ask(tab, Trigger::Online);
    }
    sim.drive();
    for tab in &tabs {
        ask(tab, Trigger::Force);
    }
    sim.drive();
    for tab in &tabs {
        assert!(
            tab.pending().is_empty(),
            "{} still has writes pending: {:?}\n{}",
            tab.name(),
            tab.pending(),
            tab.debug_log()
        );
    }
    // The last writes may have landed after another tab's check.
    for tab in &tabs {
        ask(tab, Trigger::Force);
    }
    sim.drive();
    check(&sim, &tabs, initial, &tickets);
    let net = sim.net();
    let (dropped, duplicated, reordered) = (net.dropped, net.duplicated, net.reordered);
    drop(net);
    let outages =
        sim.hub().seen().iter().filter(|s| s.status.is_none_or(|status| status == 503)).count() as u64;
    let reloads = tabs.iter().map(|t| u64::from(t.generation())).sum();
    let regrants = tabs.iter().map(|t| t.grant_asks().len() as u64).sum();
    let hub = sim.hub();
    let seen = hub.seen();
    let foreign = seen.iter().filter(|s| s.foreign).count() as u64;
    let exit_batches = seen.iter().filter(|s| s.keepalive && s.writes > 1 && !s.in_batch).count() as u64;
    let stopped_batches = seen.iter().filter(|s| s.in_batch && s.status == Some(503)).count() as u64;
    drop(hub);
    let expired = tabs.iter().flat_map(Tab::refused).filter(|(_, code)| code == "op_expired").count() as u64;
    let writers = |site: &str| tabs.iter().filter(|t| t.site() == site && !t.ops().is_empty()).count();
    let shared_storage = u64::from(!storage_events && sites.iter().any(|site| writers(site) > 1));
    let streams = tabs.iter().flat_map(Tab::streams);
    let resumed_streams = streams.filter(|s| s.last_event_id.is_some()).count() as u64;
    let streamed_changes = tabs.iter().map(|t| t.streamed().len() as u64).sum();
    Exercised {
        dropped,
        duplicated,
        reordered,
        outages,
        reloads,
        regrants,
        foreign,
        exit_batches,
        stopped_batches,
        expired,
        shared_storage,
        resumed_streams,
        streamed_changes,
    }
}

/// Checks the run's outcome.
fn check(sim: &Sim, tabs: &[Tab], initial: i64, tickets: &[(usize, u32, u64)]) {
    let applied = sim.hub().applied_ops().clone();
    let ledger = sim.hub().ledger().to_vec();
    let record = |data_type| sim.hub().record(USER, data_type);
    let made: BTreeSet<String> = tabs.iter().flat_map(Tab::ops).collect();
    let refused: Vec<(String, String)> = tabs.iter().flat_map(Tab::refused).collect();
    for (op_id, code) in &refused {
        assert!(["insufficient_funds", "op_expired"].contains(&code.as_str()), "{op_id} refused: {code}");
    }
    let refused: BTreeSet<String> = refused.into_iter().map(|(op_id, _)| op_id).collect();
    for (op_id, count) in &applied {
        assert!(made.contains(op_id), "the hub applied {op_id}, which no engine made");
        assert_eq!(*count, 1, "{op_id} applied {count} times");
    }
    for op_id in made.difference(&refused) {
        let count = applied.get(op_id).copied().unwrap_or(0);
        assert_eq!(count, 1, "{op_id} was never refused, and applied {count} times");
    }
    for (data_type, start) in [(DataType::Balance, initial), (DataType::Points, 0)] {
        let field = protocol::amount_field(data_type).unwrap();
        let entries: Vec<_> = ledger.iter().filter(|e| e.data_type == data_type).collect();
        assert!(entries.iter().all(|e| e.result >= 0), "{data_type} went below zero");
        let sum: i64 = entries.iter().map(|e| e.delta).sum();
        let amount = record(data_type).data[field].as_i64().unwrap_or(0);
        assert_eq!(amount, start + sum, "the hub's {data_type} is not the sum of its applied deltas");
    }
    assert!(sim.unstored_sends().is_empty(), "sent before stored: {:?}", sim.unstored_sends());
    for tab in tabs.iter().filter(|t| t.is_open()) {
        assert!(tab.pending().is_empty(), "{} has writes pending", tab.name());
        for data_type in tab.data_types() {
            let record = record(data_type);
            let cached = tab.record(data_type).unwrap_or_else(|| panic!("{} has no {data_type}", tab.name()));
            let cached_data = serde_json::Value::from(&cached.data);
            assert_eq!(
                (&cached_data, cached.version, &cached.last_updated),
                (&record.data, record.version, &record.last_updated()),
                "{}: {data_type} is not the hub's\n{}",
                tab.name(),
                tab.debug_log()
            );
            assert_eq!(tab.view(data_type), Some(record.data.clone()), "{}: {data_type} view", tab.name());
        }
        assert_eq!(
            tab.version_regressions(),
            Vec::<String>::new(),
            "{}: a record went back in time",
            tab.name()
        );
        assert_eq!(tab.stale_wakeups(), 0, "{} asked to be woken in the past", tab.name());
        for (_, _, ticket) in
            tickets.iter().filter(|(id, generation, _)| *id == tab.id() && *generation == tab.generation())
        {
            assert!(tab.check_done(*ticket).is_some(), "{}: ticket {ticket} never got CheckDone", tab.name());
        }
    }
}
