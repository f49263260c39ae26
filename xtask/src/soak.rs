//! `cargo xtask soak`: the long versions of the reliability suites that `cargo xtask test`
//! runs short — the hub killed with SIGKILL 50 times under clients that retry and duplicate
//! (`hub/tests/durability.rs`), 2,000 held and 500 slowloris connections for five minutes
//! (`hub/tests/load.rs`), and 50,000 seeds of the client simulation
//! (`sync-core/tests/simulation.rs`). Each is the same test with one environment variable
//! raised, built in release so that a run covers more in its time, and run with
//! `--nocapture` so that what it measured (and the simulation's first seed, to repeat it)
//! is printed. Then the release: `cargo xtask dist` builds it, and its static hub is started
//! with a configuration of its own, asked `/healthz` and stopped, and the artifacts are
//! checked against `SHA256SUMS` (`--release-only` does this part alone). Stops at the first
//! failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::{command, step_with, target_dir};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only the release: build it with `cargo xtask dist`, smoke its static hub, check
    /// SHA256SUMS.
    #[arg(long)]
    release_only: bool,
}

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

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.release_only {
        for (variable, value, args) in RUNS {
            let mut cargo = command("cargo", args);
            cargo.env(variable, value);
            step_with(cargo, &format!("{variable}={value} cargo"), args)?;
        }
        println!("==> the long reliability suites passed");
    }
    let release = crate::dist::build()?;
    smoke(&release.hub)?;
    crate::dist::verify_sums(&release.dir)?;
    println!("==> the release {} in {} passed its smoke test", release.version, release.dir.display());
    Ok(())
}

/// Starts the release's hub as an operator would — its own configuration file, data dir
/// and a site's secret in the environment — on a free port of 127.0.0.1; checks that it
/// answers `/healthz` and stops cleanly on SIGTERM.
fn smoke(hub: &std::path::Path) -> anyhow::Result<()> {
    let work = target_dir().join("release-smoke");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = work.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "hub_id = \"release-smoke\"\nlisten = \"{addr}\"\ndata_dir = {:?}\n\n\
             [[sites]]\nid = \"smoke\"\norigins = [\"https://smoke.example\"]\nsecret_env = \"SMOKE_HUB_SECRET\"\n",
            work.join("data")
        ),
    )?;
    let log = work.join("hub.log");
    println!("==> {} serve --config {} (log: {})", hub.display(), config.display(), log.display());
    let mut serve = Command::new(hub);
    serve.arg("serve").arg("--config").arg(&config);
    // The hub refuses HUB_* variables that name no setting of its.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HUB_") {
            serve.env_remove(name);
        }
    }
    let child = serve
        .env("SMOKE_HUB_SECRET", "release-smoke-secret-of-at-least-thirty-two-bytes")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("cannot start {}", hub.display()))?;
    let mut running = Running(child);
    let answer = healthz_when_up(&mut running, addr)
        .with_context(|| format!("the release's hub did not answer /healthz (its log: {})", log.display()))?;
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 200") && answer.contains(r#""status":"ok""#),
        "the release's hub answered /healthz with {answer:?}"
    );
    println!("GET http://{addr}/healthz: {}", answer.lines().last().unwrap_or_default());
    let status = running.stop()?;
    anyhow::ensure!(
        status.success(),
        "the release's hub ended {status} on SIGTERM (its log: {})",
        log.display()
    );
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Asks `/healthz` until the hub answers (it is still starting while its port refuses).
fn healthz_when_up(hub: &mut Running, addr: SocketAddr) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match healthz(addr) {
            Ok(answer) => return Ok(answer),
            Err(e) if Instant::now() > deadline => return Err(e.context("still no answer after 30 s")),
            Err(_) => {}
        }
        if let Some(status) = hub.0.try_wait()? {
            bail!("it exited ({status})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `GET /healthz` over HTTP/1.1: the whole answer, head and body.
fn healthz(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// The hub under test, killed if the smoke test fails before stopping it.
struct Running(Child);

impl Running {
    /// SIGTERM, the graceful stop; waits for the hub to end.
    fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.0.id().to_string();
        let status = command("kill", &["-TERM", &pid]).status().context("cannot start kill")?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed ({status})");
        Ok(self.0.wait()?)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
