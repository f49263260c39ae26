//! `cargo xtask soak`: the long versions of the reliability suites that `cargo xtask test`
//! runs short — the hub killed with SIGKILL 50 times under clients that retry and duplicate
//! (`hub/tests/durability.rs`), the same clients on two instances sharing one PostgreSQL
//! database while an instance is killed 50 times and the database crashes 20 times
//! (`hub/tests/durability_postgres.rs`), 2,000 held and 500 slowloris connections for five
//! minutes (`hub/tests/load.rs`), and 50,000 seeds of the client simulation
//! (`sync-core/tests/simulation.rs`). Each is the same test with its environment variables
//! raised, built in release so that a run covers more in its time, and run with
//! `--nocapture` so that what it measured (and the simulation's first seed, to repeat it)
//! is printed. Then the release: `cargo xtask dist` builds it, its Debian package is unpacked
//! and the hub in it started as its systemd unit would start it, with the package's
//! configuration, told ready, asked `/healthz` and stopped, and the artifacts are checked
//! against `SHA256SUMS` (`--release-only` does this part alone). Stops at the first failure.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::deb::Unpacked;
use crate::process::{command, step_with, target_dir};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only the release: build it with `cargo xtask dist`, smoke the hub of its Debian
    /// package, check SHA256SUMS.
    #[arg(long)]
    release_only: bool,
}

/// A long run: the variables that lengthen it, with their values, and cargo's arguments.
struct Run {
    variables: &'static [(&'static str, &'static str)],
    cargo: &'static [&'static str],
}

const RUNS: [Run; 4] = [
    Run {
        variables: &[("HUB_CRASH_KILLS", "50")],
        cargo: &["test", "--release", "-p", "hub", "--test", "durability", "--", "--nocapture"],
    },
    Run {
        variables: &[("HUB_CRASH_KILLS", "50"), ("HUB_CRASH_DB_CRASHES", "20")],
        cargo: &["test", "--release", "-p", "hub", "--test", "durability_postgres", "--", "--nocapture"],
    },
    Run {
        variables: &[("HUB_LOAD_SECS", "300")],
        cargo: &["test", "--release", "-p", "hub", "--test", "load", "--", "--nocapture"],
    },
    Run {
        variables: &[("SYNC_SIM_SEEDS", "50000")],
        cargo: &["test", "--release", "-p", "sync-core", "--test", "simulation", "--", "--nocapture"],
    },
];

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.release_only {
        crate::prereq::ensure(crate::prereq::FOR_SOAK)?;
        for Run { variables, cargo: args } in RUNS {
            let mut cargo = command("cargo", args);
            cargo.envs(variables.iter().copied());
            let shown: Vec<String> =
                variables.iter().map(|(name, value)| format!("{name}={value}")).collect();
            step_with(cargo, &format!("{} cargo", shown.join(" ")), args)?;
        }
        println!("==> the long reliability suites passed");
    }
    crate::prereq::ensure(crate::prereq::FOR_RELEASE_SMOKE)?;
    let release = crate::dist::build()?;
    smoke(&release.deb)?;
    crate::dist::verify_sums(&release.dir)?;
    println!("==> the release {} in {} passed its smoke test", release.version, release.dir.display());
    Ok(())
}

/// How long the packaged hub may take to say it is ready, or to say it is stopping.
const PATIENCE: Duration = Duration::from_secs(30);

/// Starts the hub of the release's Debian package as its systemd unit would — unpacked into a
/// folder, `serve` with the package's configuration (its example site in use, its secret in
/// the environment), a data dir of its own and a `NOTIFY_SOCKET` listened on here — on a free
/// port of 127.0.0.1; checks that it tells READY=1, answers `/healthz` at once, tells
/// STOPPING=1 at SIGTERM and stops cleanly, and, traced by strace meanwhile, made no system
/// call that its unit's `SystemCallFilter=@system-service` refuses.
fn smoke(deb: &Path) -> anyhow::Result<()> {
    let work = target_dir().join("release-smoke");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let unpacked = Unpacked::new(deb, work.join("root"))?;
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = work.join("hub.toml");
    let (secret_env, secret) = unpacked.example_config(&addr.to_string(), &config)?;
    let notify_path = work.join("notify");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_millis(100)))?;
    let log = work.join("hub.log");
    println!("==> {} serve --config {} (log: {})", unpacked.hub().display(), config.display(), log.display());
    // -D makes strace the hub's grandchild, so that the process started here is the hub itself.
    let trace = work.join("syscalls");
    let mut serve = command("strace", &["-D", "-f", "-q", "-o", path(&trace)?, path(&unpacked.hub())?]);
    crate::deb::without_hub_variables(&mut serve);
    let child = serve
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(work.join("data"))
        .env(secret_env, secret)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("cannot start {}", unpacked.hub().display()))?;
    let mut running = Running(child);
    let said = |what: &str| format!("the packaged hub did not tell {what} (its log: {})", log.display());
    let ready = receive(&notify, &mut running).with_context(|| said("READY=1"))?;
    anyhow::ensure!(ready.lines().any(|l| l == "READY=1"), "the packaged hub told {ready:?}, not READY=1");
    let answer = healthz(addr).context("the packaged hub told READY=1 but does not answer /healthz")?;
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 200") && answer.contains(r#""status":"ok""#),
        "the packaged hub answered /healthz with {answer:?}"
    );
    println!("GET http://{addr}/healthz: {}", answer.lines().last().unwrap_or_default());
    let status = running.stop()?;
    let stopping = receive(&notify, &mut running).with_context(|| said("STOPPING=1"))?;
    anyhow::ensure!(
        stopping.lines().any(|l| l == "STOPPING=1"),
        "the packaged hub told {stopping:?} at SIGTERM"
    );
    anyhow::ensure!(
        status.success(),
        "the packaged hub ended {status} on SIGTERM (its log: {})",
        log.display()
    );
    let hub = running.0.id();
    let calls = syscalls(&trace, hub).with_context(|| format!("in {}", trace.display()))?;
    let allowed = syscall_group("@system-service")?;
    let filtered: Vec<&String> = calls.iter().filter(|call| !allowed.contains(*call)).collect();
    anyhow::ensure!(
        filtered.is_empty(),
        "the packaged hub calls {filtered:?}, which its unit's SystemCallFilter=@system-service refuses"
    );
    println!("the packaged hub made {} kinds of system call, all in @system-service", calls.len());
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// The system calls named in `trace`, which strace writes for the process `pid` and its
/// threads, once it has written that `pid` exited (strace outlives it a little).
fn syscalls(trace: &Path, pid: u32) -> anyhow::Result<BTreeSet<String>> {
    // Each line starts with the thread's id, padded: `3502  +++ exited with 0 +++`.
    let pid = pid.to_string();
    let exited = |line: &str| line.split_whitespace().take(3).eq([pid.as_str(), "+++", "exited"]);
    let deadline = Instant::now() + PATIENCE;
    let text = loop {
        let text = std::fs::read_to_string(trace)?;
        if text.lines().any(exited) {
            break text;
        }
        anyhow::ensure!(Instant::now() < deadline, "strace wrote no end of the hub within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(text
        .lines()
        .filter_map(|line| {
            let (_pid, call) = line.split_once(' ')?;
            let (name, _) = call.trim_start().split_once('(')?;
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                .then(|| name.to_owned())
        })
        .collect())
}

/// The system calls of a `systemd-analyze syscall-filter` group, its groups expanded.
fn syscall_group(group: &str) -> anyhow::Result<BTreeSet<String>> {
    let listed = crate::process::output("systemd-analyze", &["syscall-filter", group])?;
    let mut calls = BTreeSet::new();
    for entry in listed.lines().skip(1).map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if entry.starts_with('@') {
            calls.extend(syscall_group(entry)?);
        } else {
            calls.insert(entry.to_owned());
        }
    }
    Ok(calls)
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a path that is not UTF-8")
}

/// The next notification the hub sent to its `NOTIFY_SOCKET` (whose reads time out), within
/// [`PATIENCE`]; a hub that ended without sending one fails at once.
fn receive(socket: &UnixDatagram, hub: &mut Running) -> anyhow::Result<String> {
    let deadline = Instant::now() + PATIENCE;
    let mut buf = [0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(status) = hub.0.try_wait()? {
            anyhow::bail!("it ended ({status})");
        }
        anyhow::ensure!(Instant::now() < deadline, "nothing within {PATIENCE:?}");
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
