//! A randomized simulation, property style: for each seed, two or three tabs on one or two
//! sites make deltas (mostly small gains, some spends) and pushes, come back to view, reload
//! (with or without a keepalive flush), go offline; the hub goes down, restarts in place,
//! answers 429 and 503, lets tokens expire; the network drops, duplicates, delays and
//! reorders packets. At the end the hub is up, the network heals, every tab gets a forced
//! check, and the world runs until quiescent. Then:
//!
//! - no op id any engine made was applied more than once;
//! - every op not refused was applied exactly once, and only balance refusals happened;
//! - the hub's amounts are the sum of the applied deltas, never below zero;
//! - every open tab has no pending write and caches exactly the hub's records;
//! - no cached record was ever replaced by an older version, every write was stored before
//!   it was first sent, every check a page waited for ended, and no engine asked to be woken
//!   in the past (unless it had given up on auth).
//!
//! `SYNC_SIM_SEEDS=N` runs N seeds (default 2,000); `SYNC_SIM_SEED=S` runs seed S alone.
//! A failure prints its seed and the story of that run.

mod support;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;
use support::hub::Mode;
use support::net::Faults;
use support::{Sim, Tab, USER};
use sync_core::{DataType, Trigger};

const SITES: [&str; 2] = ["roflfaucet", "clickforcharity"];
const DEFAULT_SEEDS: u64 = 2_000;

#[test]
fn random_worlds_apply_every_delta_once_and_converge() {
    let seeds: Vec<u64> = match std::env::var("SYNC_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SYNC_SIM_SEED is a number")],
        Err(_) => {
            let count = std::env::var("SYNC_SIM_SEEDS")
                .map(|n| n.parse().expect("SYNC_SIM_SEEDS is a number"))
                .unwrap_or(DEFAULT_SEEDS);
            (0..count).collect()
        }
    };
    // Debug lines cost time; a single seed, rerun after a failure, shows them.
    let debug = seeds.len() == 1;
    // Seeds are independent worlds: spread them over the cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for first in 0..threads {
            let (seeds, failed) = (&seeds, &failed);
            scope.spawn(move || {
                for &seed in seeds.iter().skip(first).step_by(threads) {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let story = RefCell::new(Vec::new());
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(seed, debug, &story))) {
                        failed.store(true, Ordering::Relaxed);
                        eprintln!(
                            "simulation failed for seed {seed}; rerun it alone with \
                             SYNC_SIM_SEED={seed} cargo test -p sync-core --test simulation\nstory:\n{}",
                            story.borrow().join("\n")
                        );
                        resume_unwind(panic);
                    }
                }
            });
        }
    });
}

/// One random world. Appends what happens to `story`.
fn run(seed: u64, debug: bool, story: &RefCell<Vec<String>>) {
    let tell = |line: String| story.borrow_mut().push(line);
    let sim = Sim::with_seed(seed);
    sim.set_debug(debug);
    // The world's rng drives the network and the engines' seeds; this one picks the story.
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_5eed_5eed_5eed);
    let initial = rng.i64(0..=200);
    sim.hub_write(DataType::Balance, json!({ "coins": initial }));
    let sites = if rng.bool() { &SITES[..1] } else { &SITES[..] };
    let tabs: Vec<Tab> = (0..rng.usize(2..=3)).map(|i| sim.open(sites[i % sites.len()])).collect();
    let faults = Faults {
        drop: *rng.choice(&[0.0, 0.0, 0.02, 0.1]).unwrap(),
        duplicate: *rng.choice(&[0.0, 0.05, 0.2]).unwrap(),
        delay: *rng.choice(&[0.0, 0.1, 0.3]).unwrap(),
        max_delay_ms: rng.u64(1..=25_000),
    };
    sim.net().latency_ms = rng.u64(1..=30);
    sim.net().faults = faults;
    tell(format!("{initial} coins; tabs {:?}; {faults:?}", tabs.iter().map(Tab::name).collect::<Vec<_>>()));
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
            64..=67 => {
                tab.unload_and_reload();
                format!("{} unloads (keepalive) and reloads", tab.name())
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
            85..=86 => {
                sim.hub().set_mode(Mode::Unavailable);
                "hub answers 503".to_owned()
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

    tell("the hub comes up, the network heals, every tab is online and forces checks".into());
    sim.hub().up();
    sim.net().heal();
    for tab in &tabs {
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
}

/// Checks the run's outcome.
fn check(sim: &Sim, tabs: &[Tab], initial: i64, tickets: &[(usize, u32, u64)]) {
    let applied = sim.hub().applied_ops().clone();
    let ledger = sim.hub().ledger().to_vec();
    let record = |data_type| sim.hub().record(USER, data_type);
    let made: BTreeSet<String> = tabs.iter().flat_map(Tab::ops).collect();
    let refused: Vec<(String, String)> = tabs.iter().flat_map(Tab::refused).collect();
    for (op_id, code) in &refused {
        assert_eq!(code, "insufficient_funds", "{op_id} refused");
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
