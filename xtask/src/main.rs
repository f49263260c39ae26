//! `cargo xtask`: the project's build tasks, written in Rust so that they run wherever cargo
//! does. Drives cargo, rustup and git as child processes from the workspace root; installs
//! nothing but the prerequisites listed in `prereq`, and writes nothing outside the
//! workspace except through those installs.

mod bench;
mod build_pkg;
mod deb;
mod demo;
mod dist;
mod fuzz;
mod postgres;
mod prereq;
mod process;
mod soak;
mod suite;
mod tidy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build tasks of the unified-sync workspace"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build everything, start the hub on 127.0.0.1:8787 and serve the two demo sites (with
    /// --postgres, two hub instances on PostgreSQL behind nginx on that port).
    Demo(demo::Args),
    /// Install missing prerequisites, then run every check and test; stop at the first failure.
    Test,
    /// Run the long reliability suites: 50 hub kills, 300 s of load, 50,000 simulation seeds;
    /// then build the release and smoke its static hub.
    Soak(soak::Args),
    /// Check the architecture invariants (dependency absences, no tracked build outputs).
    Tidy,
    /// Measure the hub against a bare hyper server and the targets; write BENCHMARKS.md.
    Bench(bench::Args),
    /// Run the protocol's fuzz targets, each for a while (cargo-fuzz, on stable).
    Fuzz(fuzz::Args),
    /// Build the npm package `unified-balance` into pkg/ and print its sizes.
    BuildPkg,
    /// Build a release into target/dist/: the npm tarball, the plain-script zip, the hub as a
    /// static Linux binary, and SHA256SUMS.
    Dist,
}

/// Prints a failure as its message and causes, without a backtrace: what failed is named
/// by the message, and the failing tool has printed its own details above it.
fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Demo(args) => demo::run(args),
        Task::Test => suite::run(),
        Task::Tidy => tidy::run(),
        Task::BuildPkg => build_pkg::run().map(drop),
        Task::Dist => dist::run(),
        Task::Bench(args) => bench::run(args),
        Task::Soak(args) => soak::run(args),
        Task::Fuzz(args) => fuzz::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
