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
    println!("==> all checks and tests passed");
    Ok(())
}
