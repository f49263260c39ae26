//! `cargo xtask test`: every check and test of the workspace, in one fixed order, stopping
//! at the first failure. The README's test command and CI's only command; installs missing
//! prerequisites first (see `prereq`).

use crate::prereq::{self, WASM_TARGET};
use crate::process::step;

pub fn run() -> anyhow::Result<()> {
    prereq::ensure(prereq::FOR_TESTS)?;
    step("cargo", &["fmt", "--all", "--check"])?;
    step("cargo", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    println!("==> cargo xtask tidy");
    crate::tidy::run()?;
    step("cargo", &["build", "-p", "protocol", "--target", WASM_TARGET])?;
    step("cargo", &["clippy", "-p", "client-wasm", "--target", WASM_TARGET, "--", "-D", "warnings"])?;
    step("cargo", &["test", "--workspace"])?;
    crate::fuzz::check()?;
    println!("==> cargo xtask build-pkg");
    crate::build_pkg::check_size(crate::build_pkg::run()?)?;
    crate::build_pkg::check_contents()?;
    step("cargo", &["build", "-p", "hub"])?;
    step("npm", &["ci", "--prefix", "tests/browser", "--no-audit", "--no-fund"])?;
    step("npm", &["test", "--prefix", "tests/browser"])?;
    // The seed's own acceptance list, against the real `cargo xtask demo`, whose release
    // builds of the hub and the demo sites are made here so that no test waits for a compiler.
    step("cargo", &["build", "-p", "xtask"])?;
    step("cargo", &["build", "--release", "-p", "hub", "-p", "demo-sites"])?;
    step("npm", &["ci", "--prefix", "tests/e2e", "--no-audit", "--no-fund"])?;
    step("npm", &["test", "--prefix", "tests/e2e"])?;
    // The demo on two hub instances behind nginx on one PostgreSQL, as a user starts it: a
    // write through nginx read back from the other instance.
    demo_on_postgres()?;
    println!("==> all checks and tests passed");
    Ok(())
}

/// `cargo xtask demo --postgres --check`, on free ports and a data dir of its own (its keys).
fn demo_on_postgres() -> anyhow::Result<()> {
    let ports: Vec<String> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().map(|a| a.port())))
        .collect::<Result<Result<Vec<u16>, _>, _>>()??
        .iter()
        .map(u16::to_string)
        .collect();
    let data = crate::process::target_dir().join("demo-postgres-check");
    if data.exists() {
        std::fs::remove_dir_all(&data)?;
    }
    let data_dir = data.to_str().ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", data.display()))?;
    step(
        "target/debug/xtask",
        &[
            "demo",
            "--postgres",
            "--check",
            "--hub-port",
            &ports[0],
            "--faucet-port",
            &ports[1],
            "--charity-port",
            &ports[2],
            "--data-dir",
            data_dir,
        ],
    )
}
