//! `cargo xtask fuzz`: runs the protocol's fuzz targets (the cargo-fuzz crate in `fuzz/`)
//! one after another, each for a set time, on the stable toolchain; and [`check`], with which
//! `cargo xtask test` proves that they still build and lint clean. What each target proves:
//! docs/fuzzing.md.
//!
//! cargo-fuzz passes the compiler flags of its coverage instrumentation, which stable rustc
//! accepts only with `RUSTC_BOOTSTRAP=1`. The targets run without a sanitizer: `protocol`
//! has no unsafe code for one to watch, and a failed assertion or panic is what they look for.

use anyhow::Context;

use crate::prereq::{self, Install, Need};
use crate::process::{command, root, step, step_with, succeeds};

/// Every fuzz target, in the order they run.
const TARGETS: &[&str] = &["post_body", "validate", "get_query", "merge_patch", "text"];

/// What fuzzing needs beyond cargo: cargo-fuzz, and a C++ compiler to build libFuzzer.
const NEEDS: &[Need] = &[
    Need {
        name: "a C++ compiler",
        present: || succeeds("c++", &["--version"]),
        install: Install::Apt(&["g++"]),
    },
    Need {
        name: "cargo-fuzz",
        present: || succeeds("cargo", &["fuzz", "--version"]),
        install: Install::Cargo(&["install", "cargo-fuzz", "--locked"]),
    },
];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds to fuzz each target.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Fuzz only this target.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    target: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    prereq::ensure(NEEDS)?;
    let targets: Vec<&str> = match &args.target {
        Some(target) => vec![target.as_str()],
        None => TARGETS.to_vec(),
    };
    let mut build = vec!["fuzz", "build", "--sanitizer", "none"];
    build.extend(args.target.as_deref());
    cargo_fuzz(&build)?;
    for target in targets {
        fuzz(target, args.secs)?;
    }
    println!("==> no fuzz target found a failure");
    Ok(())
}

/// Runs one target for `secs` seconds. New inputs go to `fuzz/corpus/TARGET` (not in git),
/// which starts from the seeds in `fuzz/seeds/TARGET`; a failing input is kept in
/// `fuzz/artifacts/TARGET` and cargo-fuzz prints how to reproduce it.
fn fuzz(target: &str, secs: u64) -> anyhow::Result<()> {
    let dir = root().join("fuzz");
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    let seeds = dir.join("seeds").join(target);
    let dict = dir.join("dicts").join(format!("{target}.dict"));
    let mut args: Vec<String> = ["fuzz", "run", "--sanitizer", "none", target].map(String::from).into();
    args.push(corpus.display().to_string());
    if seeds.is_dir() {
        args.push(seeds.display().to_string());
    }
    args.push("--".into());
    args.push(format!("-max_total_time={secs}"));
    if dict.is_file() {
        args.push(format!("-dict={}", dict.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cargo_fuzz(&args).with_context(|| {
        format!("fuzz target {target} failed; a failing input is kept in fuzz/artifacts/{target}")
    })
}

/// `cargo fuzz …` on whichever toolchain runs xtask, nightly features allowed.
fn cargo_fuzz(args: &[&str]) -> anyhow::Result<()> {
    let mut cargo = command("cargo", args);
    cargo.env("RUSTC_BOOTSTRAP", "1");
    step_with(cargo, "RUSTC_BOOTSTRAP=1 cargo", args)
}

/// The fuzz crate is formatted, and its targets type-check and lint clean on stable. Skips
/// libFuzzer itself (C++), which only running a target needs.
pub fn check() -> anyhow::Result<()> {
    let manifest = root().join("fuzz").join("Cargo.toml").display().to_string();
    step("cargo", &["fmt", "--manifest-path", &manifest, "--check"])?;
    step(
        "cargo",
        &[
            "clippy",
            "--manifest-path",
            &manifest,
            "--all-targets",
            "--no-default-features",
            "--",
            "-D",
            "warnings",
        ],
    )
}
