//! `cargo xtask soak`: the long versions of the reliability suites that `cargo xtask test`
//! runs short — the hub killed with SIGKILL 50 times under clients that retry and duplicate
//! (`hub/tests/durability.rs`), 2,000 held and 500 slowloris connections for five minutes
//! (`hub/tests/load.rs`), and 50,000 seeds of the client simulation
//! (`sync-core/tests/simulation.rs`). Each is the same test with one environment variable
//! raised, built in release so that a run covers more in its time, and run with
//! `--nocapture` so that what it measured (and the simulation's first seed, to repeat it)
//! is printed. Stops at the first failure.

use crate::process::{command, step_with};

/// Each long run: the variable that lengthens it, its value, and cargo's arguments.
const RUNS: [(&str, &str, &[&str]); 3] = [
    (
        "HUB_CRASH_KILLS",
        "50",
        &["test", "--release", "-p", "hub", "--test", "durability", "--", "--nocapture"],
    ),
    ("HUB_LOAD_SECS", "300", &["test", "--release", "-p", "hub", "--test", "load", "--", "--nocapture"]),
    (
        "SYNC_SIM_SEEDS",
        "50000",
        &["test", "--release", "-p", "sync-core", "--test", "simulation", "--", "--nocapture"],
    ),
];

pub fn run() -> anyhow::Result<()> {
    for (variable, value, args) in RUNS {
        let mut cargo = command("cargo", args);
        cargo.env(variable, value);
        step_with(cargo, &format!("{variable}={value} cargo"), args)?;
    }
    println!("==> the long reliability suites passed");
    Ok(())
}
