//! `cargo xtask bench`: measures the hub against the ceiling of this machine, in one run.
//!
//! Builds the hub and the `bench` tools in release, starts a bare hyper server (`bench
//! bare`) and the real hub binary on a fresh data dir, drives both with the same load
//! generator (`bench load`), and reports every hub result as a fraction of the bare
//! server's, next to the targets of SPEC §6. Also measures the hub's memory with 10,000
//! idle keep-alive connections, the package's gzipped size, the requests of a simulated
//! day of one user (`bench user-day`), another address's latency and the hub's memory
//! while many addresses hold every connection and upload the default limits allow (`bench
//! flood`; alone with `--flood`), and 10,000 idle event streams held open (`bench streams`;
//! alone with `--events`): their events' latency, the hub's memory per stream beside its
//! memory per idle keep-alive connection, and durable deltas with and without them. Then
//! the hub on PostgreSQL: a throwaway cluster (`crate::postgres`) of the run, pgbench's
//! single-row UPDATE on it (one client, then as many as the load's connections), and one hub
//! instance and then two on one database, each load's CPU split between the hub, the
//! database and the rest of the machine. Writes the tables to `BENCHMARKS.md` with the
//! machine it ran on.
//!
//! Every request is authenticated and rate-limited as in production: the benchmark users
//! get a high limit through the config file, like any operator would set it.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::postgres::Cluster;
use crate::process::{command, root, step, target_dir};

/// Connections of every throughput scenario.
const CONNECTIONS: usize = 64;
/// Users the requests are spread over.
const USERS: usize = 10_000;
/// Idle keep-alive connections held open while the hub's memory is read.
const IDLE_CONNECTIONS: usize = 10_000;
/// Client addresses of the connection flood, each holding the hub's default share (256
/// connections): 9,728 of the default 10,000 connection slots, which leaves the measured
/// client's connections room.
const FLOOD_ADDRESSES: usize = 38;
/// The rate of the client measured beside the flood (a fixed one, well below the peak).
const FLOOD_RATE: f64 = 2_000.0;
/// The address of the client measured beside the flood.
const MEASURED_SOURCE: &str = "127.0.0.3";
/// Idle event streams held open while the hub's memory, its event latency and its durable
/// deltas are measured: one per user, each on a connection of its own.
const STREAMS: usize = 10_000;
/// The writes whose events are timed, at [`EVENT_WRITE_RATE`] a second.
const EVENT_WRITES: usize = 3_000;
const EVENT_WRITE_RATE: f64 = 1_000.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A short run (a few seconds per scenario) that does not write BENCHMARKS.md.
    #[arg(long)]
    quick: bool,
    /// Seconds each throughput scenario is measured (after a warm-up).
    #[arg(long)]
    secs: Option<f64>,
    /// Only the connection flood: another address's requests with and without it, and the
    /// hub's memory with its limits full; prints the figures and does not write BENCHMARKS.md.
    #[arg(long)]
    flood: bool,
    /// Only the event streams on SQLite: event latency, memory and durable deltas with
    /// 10,000 idle streams; prints the figures and does not write BENCHMARKS.md.
    #[arg(long)]
    events: bool,
}

/// What `bench load` prints.
#[derive(Debug, Clone, Deserialize)]
struct Outcome {
    requests: u64,
    errors: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    requests_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    mean_body_bytes: f64,
}

/// What `bench idle` prints.
#[derive(Debug, Deserialize)]
struct Memory {
    connections: usize,
    vm_rss_kib: u64,
    vm_hwm_kib: u64,
}

/// What `bench streams` prints once its streams are open.
#[derive(Debug, Clone, Copy, Deserialize)]
struct StreamsInPlace {
    addresses: usize,
    secs: f64,
}

/// What `bench streams` answers to `count`.
#[derive(Debug, Deserialize)]
struct StreamCounts {
    open: usize,
    events: u64,
}

/// What `bench streams` answers to `latency`: from each write's answer to its event.
#[derive(Debug, Deserialize)]
struct EventLatency {
    writes: u64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    sent_p50_us: u64,
    sent_p99_us: u64,
    before_answer: u64,
    missing: u64,
    failed: u64,
}

/// The `bench streams` process, ended when dropped.
struct Streams {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    in_place: StreamsInPlace,
}

impl Streams {
    /// Sends `command` and reads its answer's line.
    fn ask<T: serde::de::DeserializeOwned>(&mut self, command: &str) -> anyhow::Result<T> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("bench streams answered {command} with {line:?}"))
    }

    /// The streams' counts, failing unless every one of them is still open.
    fn all_open(&mut self) -> anyhow::Result<StreamCounts> {
        let counts: StreamCounts = self.ask("count")?;
        if counts.open != STREAMS {
            bail!("only {} of {STREAMS} event streams are still open", counts.open);
        }
        Ok(counts)
    }

    /// The event latency of [`EVENT_WRITES`] writes, failing unless each had its event.
    fn latency(&mut self) -> anyhow::Result<EventLatency> {
        let latency: EventLatency = self.ask("latency")?;
        if latency.missing > 0 || latency.failed > 0 {
            bail!(
                "of {EVENT_WRITES} writes, {} were refused and {} had no event on their user's stream",
                latency.failed,
                latency.missing
            );
        }
        println!(
            "    event latency       p50 {:>6} µs  p99 {:>6} µs  max {:>6} µs  ({} writes, {} read before the answer; from the write sent p50 {} µs, p99 {} µs)",
            latency.p50_us,
            latency.p99_us,
            latency.max_us,
            latency.writes,
            latency.before_answer,
            latency.sent_p50_us,
            latency.sent_p99_us
        );
        Ok(latency)
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Event streams on SQLite: their latency, their memory beside idle keep-alive connections',
/// and durable deltas with and without them.
struct Events {
    in_place: StreamsInPlace,
    latency: EventLatency,
    /// The hub's memory before the streams opened, and with them open.
    streams_memory: [ProcMemory; 2],
    /// The other hub's before the keep-alive connections opened, and with them open.
    keep_alive_memory: [ProcMemory; 2],
    /// Durable deltas on a hub without streams, then on the hub holding them, twice.
    deltas: Vec<[Outcome; 2]>,
    /// Seconds each of those loads was measured.
    load_secs: f64,
    /// The change events the streams read during the deltas' load.
    delivered: u64,
}

impl Events {
    /// The section of the report; `across` is the latency from one instance on PostgreSQL to
    /// another.
    fn render(&self, across: &EventLatency) -> anyhow::Result<String> {
        let mut out = String::new();
        writeln!(
            out,
            "## Event streams
"
        )?;
        writeln!(
            out,
            "{STREAMS} idle event streams (`GET /api/events`) are held open by `bench streams` \
             (`bench/src/events.rs`): one per user, each a TCP connection of its own with an HTTP/1.1 \
             request written by hand, from {} loopback addresses holding the default \
             `max_streams_per_address` (64) each; the hub's `max_connections` and \
             `max_connections_per_address` are raised to {} for them, the other `[events]` settings \
             are the defaults (a heartbeat every 15 s). While they are open, {EVENT_WRITES} durable \
             deltas at {EVENT_WRITE_RATE:.0} a second over 16 connections, each to a user whose stream \
             is open, are timed from the write's answer (its last byte read by the writer) to its \
             event (the read that brought its frame to the stream's client); an event read before its \
             write's answer counts as 0; the last column times the same events from the write's \
             request sent. The streams opened in {:.1} s. On PostgreSQL, two instances \
             share the database of the section above: the streams are held on one and the writes go \
             to the other, whose change reaches the first through the change log (NOTIFY after the \
             commit, then a read by position).\n",
            self.in_place.addresses,
            STREAMS * 2,
            self.in_place.secs,
        )?;
        writeln!(
            out,
            "| write answered → event read | writes | p50 | p99 | max | read before the answer | from the write sent: p50, p99 |"
        )?;
        writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        let mut latency_row = |what: &str, l: &EventLatency| {
            writeln!(
                out,
                "| {what} | {} | {} | {} | {} | {} | {}, {} |",
                l.writes,
                micros(l.p50_us),
                micros(l.p99_us),
                micros(l.max_us),
                l.before_answer,
                micros(l.sent_p50_us),
                micros(l.sent_p99_us)
            )
        };
        latency_row("SQLite, one instance", &self.latency)?;
        latency_row("PostgreSQL, written through one instance, streamed by another", across)?;
        let per = |[before, with]: &[ProcMemory; 2]| {
            with.vm_rss_kib.saturating_sub(before.vm_rss_kib) as f64 * 1024.0 / STREAMS as f64 / 1000.0
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        writeln!(
            out,
            "\nThe hub's memory (RSS, `/proc/<pid>/status`) just before the {STREAMS} streams opened and \
             with them open, and likewise on another hub, prepared alike, for {STREAMS} idle HTTP/1.1 \
             keep-alive connections that asked one timestamp check each (`bench idle`). A stream's \
             figure includes its connection; KB are 1,000 bytes.\n"
        )?;
        writeln!(out, "| hub RSS | before | with {STREAMS} | per connection |")?;
        writeln!(out, "| --- | ---: | ---: | ---: |")?;
        for (what, memory) in [
            ("idle event streams", &self.streams_memory),
            ("idle keep-alive connections", &self.keep_alive_memory),
        ] {
            writeln!(
                out,
                "| {what} | {:.1} MiB | {:.1} MiB | {:.1} KB |",
                mib(memory[0].vm_rss_kib),
                mib(memory[1].vm_rss_kib),
                per(memory)
            )?;
        }
        writeln!(
            out,
            "\nDurable deltas as in the first table ({CONNECTIONS} connections, group commit), on a hub \
             without streams and on the hub holding the {STREAMS} streams, each on a data dir of its \
             own, prepared alike, {:.1} s each after a warm-up, in turn and twice, so that what else \
             runs on the machine meanwhile weighs on both alike. With the streams open every delta is \
             an event on its user's stream ({} read by the streams' client during the loads).\n",
            self.load_secs, self.delivered
        )?;
        writeln!(out, "| durable delta | requests/s | p50 | p99 | p99.9 |")?;
        writeln!(out, "| --- | ---: | ---: | ---: | ---: |")?;
        for (round, pair) in self.deltas.iter().enumerate() {
            for (what, o) in pair.iter().enumerate() {
                let what = if what == 0 {
                    "without streams".to_owned()
                } else {
                    format!("with {STREAMS} streams open")
                };
                writeln!(
                    out,
                    "| {what}, round {} | {:.0} | {} | {} | {} |",
                    round + 1,
                    o.requests_per_sec,
                    micros(o.p50_us),
                    micros(o.p99_us),
                    micros(o.p999_us)
                )?;
            }
        }
        let total = |i: usize| self.deltas.iter().map(|pair| pair[i].requests_per_sec).sum::<f64>();
        let ratio = 100.0 * total(1) / total(0);
        let stream_bytes = per(&self.streams_memory);
        writeln!(out, "\n| target (issue 20) | measured | met |")?;
        writeln!(out, "| --- | --- | --- |")?;
        let mut target = |what: &str, measured: String, met: bool| {
            writeln!(out, "| {what} | {measured} | {} |", if met { "yes" } else { "**no**" })
        };
        target(
            "event p99 ≤ 20 ms within one instance",
            micros(self.latency.p99_us),
            self.latency.p99_us <= 20_000,
        )?;
        target(
            "event p99 ≤ 100 ms across instances",
            format!("{} (PostgreSQL)", micros(across.p99_us)),
            across.p99_us <= 100_000,
        )?;
        target(
            "an idle stream ≤ 20 KB of hub memory",
            format!("{stream_bytes:.1} KB"),
            stream_bytes <= 20.0,
        )?;
        target(
            "durable deltas with 10,000 streams ≥ 80 % of without",
            format!("{ratio:.0} %"),
            ratio >= 80.0,
        )?;
        Ok(out)
    }
}

/// What `bench user-day` prints: the simulated day of one user, against the seed's figures.
#[derive(Debug, Deserialize)]
struct Day {
    requests_per_active_hour: f64,
    peak_hour_requests: u64,
    polling_per_hour: u64,
    seed_estimate_per_hour: (u64, u64),
    unchanged_returns: Returns,
}

/// Tab returns when nothing had changed, in the day.
#[derive(Debug, Deserialize)]
struct Returns {
    max_requests: u64,
    max_response_bytes: u64,
}

/// What `bench flood` prints once its connections are all open.
#[derive(Debug, Deserialize)]
struct InPlace {
    addresses: usize,
    http1_connections: usize,
    http2_connections: usize,
    uploads: usize,
}

/// The `bench flood` process, ended when dropped.
struct Flooding(Child);

impl Drop for Flooding {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process's memory at one moment, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct ProcMemory {
    vm_rss_kib: u64,
    vm_hwm_kib: u64,
}

fn memory_of(pid: u32) -> anyhow::Result<ProcMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read the memory of process {pid}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
        Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
    };
    Ok(ProcMemory { vm_rss_kib: field("VmRSS:")?, vm_hwm_kib: field("VmHWM:")? })
}

/// What the flooded hub's `/metrics` showed once the measured client was done.
#[derive(Debug)]
struct Held {
    open: f64,
    active: f64,
    idle: f64,
    /// Since the hub started, like the two counts of bodies.
    refused_per_address: f64,
    body_bytes: f64,
    body_bytes_limit: f64,
    bodies_busy: f64,
    bodies_timed_out: f64,
}

/// Another address's requests beside the connection flood, and the hub's memory under it.
struct Flood {
    in_place: InPlace,
    unloaded: Outcome,
    flooded: Outcome,
    /// The hub's memory after the unloaded run, before the flood.
    before: ProcMemory,
    /// After the flooded run, the flood still in place.
    during: ProcMemory,
    held: Held,
}

impl Flood {
    fn render_latency(&self) -> anyhow::Result<String> {
        let f = &self.in_place;
        let mut out = String::new();
        writeln!(
            out,
            "## Another address under a connection flood
"
        )?;
        writeln!(
            out,
            "A hub with the default connection and body limits (`max_connections` 10,000, \
             `max_connections_per_address` 256, `http2_max_concurrent_streams` 32, \
             `max_body_bytes_in_flight` 16 MiB, `body_timeout_secs` 10; the rate limit raised as \
             above) is flooded by `bench flood` (`bench/src/flood.rs`) from {} addresses (127.0.0.10 \
             on), each holding its 256 connections: {} HTTP/1.1 keep-alives in all, asking \
             `/healthz` every 8 s and silent otherwise, and {} HTTP/2 connections keeping {} pushes \
             going, each with a valid token, declaring 64 KiB and sending a byte every 2 s until the \
             hub cuts it (`408 body_timeout`) or refuses it for the bytes in flight (`503 busy`, \
             retried after the second it asks), then starting another; each address also tries 8 \
             more connections a second. A client on {MEASURED_SOURCE} sends timestamp checks at a \
             fixed {FLOOD_RATE:.0} requests/s over {CONNECTIONS} connections to the same hub, alone \
             and then while the flood holds; every one of its requests must be answered `200`.\n",
            f.addresses, f.http1_connections, f.http2_connections, f.uploads
        )?;
        writeln!(
            out,
            "| client on {MEASURED_SOURCE}, {FLOOD_RATE:.0} checks/s | requests/s | p50 | p99 | p99.9 |"
        )?;
        writeln!(out, "| --- | ---: | ---: | ---: | ---: |")?;
        for (what, o) in [("hub alone", &self.unloaded), ("hub flooded", &self.flooded)] {
            writeln!(
                out,
                "| {what} | {:.0} | {} | {} | {} |",
                o.requests_per_sec,
                micros(o.p50_us),
                micros(o.p99_us),
                micros(o.p999_us)
            )?;
        }
        writeln!(
            out,
            "\nUnder the flood, its p99 is {:.1}× the unloaded hub's.",
            self.flooded.p99_us as f64 / self.unloaded.p99_us.max(1) as f64
        )?;
        Ok(out)
    }

    fn render_memory(&self) -> anyhow::Result<String> {
        let h = &self.held;
        let mib = |kib: u64| kib as f64 / 1024.0;
        let mut out = String::new();
        writeln!(out, "| hub under the connection flood (above) | RSS | peak RSS |")?;
        writeln!(out, "| --- | ---: | ---: |")?;
        writeln!(
            out,
            "| alone, after the measured client's run | {:.1} MiB | {:.1} MiB |",
            mib(self.before.vm_rss_kib),
            mib(self.before.vm_hwm_kib)
        )?;
        writeln!(
            out,
            "| with its limits full: {:.0} connections open ({:.0} with a request in progress, {:.0} idle), \
             {:.1} of {:.0} MiB of bodies in flight | {:.1} MiB | {:.1} MiB |",
            h.open,
            h.active,
            h.idle,
            h.body_bytes / 1024.0 / 1024.0,
            h.body_bytes_limit / 1024.0 / 1024.0,
            mib(self.during.vm_rss_kib),
            mib(self.during.vm_hwm_kib)
        )?;
        writeln!(
            out,
            "\nBy then the hub had closed {:.0} connections at once for their address's limit, refused \
             {:.0} bodies `503 busy` and cut {:.0} `408 body_timeout` (`/metrics`).",
            h.refused_per_address, h.bodies_busy, h.bodies_timed_out
        )?;
        Ok(out)
    }
}

/// The database of the hub on PostgreSQL.
const HUB_DATABASE: &str = "unified_sync";
/// The database of pgbench, beside the hub's on the same cluster.
const PGBENCH_DATABASE: &str = "pgbench";
/// pgbench's script: one account's balance changed, a random one of `pgbench -i`'s, in a
/// transaction of its own.
const PGBENCH_UPDATE: &str = "\\set aid random(1, 100000 * :scale)\n\\set delta random(-5000, 5000)\nUPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n";

/// The hub on PostgreSQL, beside pgbench on the same throwaway cluster, in the same run.
struct OnPostgres {
    /// The server's major version.
    major: String,
    /// The settings that decide what a commit costs, as the server reported them.
    settings: String,
    /// The single-row UPDATE with one client, then with [`CONNECTIONS`].
    pgbench: [PgbenchRun; 2],
    /// One instance, then two on one database.
    hub: Vec<OnInstances>,
    /// Events written through one instance and streamed by the other, with [`STREAMS`] open.
    events: EventLatency,
}

/// One run of pgbench's single-row UPDATE.
struct PgbenchRun {
    clients: usize,
    transactions_per_sec: f64,
    latency_ms: f64,
    cpu: Cpu,
}

/// One load of hub instances on PostgreSQL.
struct OnInstances {
    row: Row,
    cpu: Cpu,
    /// What the instances' writers committed during the load, for writes.
    commits: Option<Commits>,
}

/// Cores busy on average during a run.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    /// The hub instances' processes.
    hub: f64,
    /// The cluster's server processes (the postmaster and its children).
    postgres: f64,
    /// The whole machine: the load generator, and anything else running, included.
    machine: f64,
}

/// CPU time used so far, in clock ticks, and when it was read.
struct CpuTimes {
    at: Instant,
    hub: u64,
    postgres: u64,
    machine: u64,
}

impl CpuTimes {
    /// The hub processes `hubs`, the server processes of the cluster whose postmaster is
    /// `postmaster`, and the machine's, from /proc.
    fn now(hubs: &[u32], postmaster: u32) -> anyhow::Result<CpuTimes> {
        let at = Instant::now();
        // The postmaster's own time and its ended children's, which it has waited for (a
        // session's backend lives only as long as its connection), then the living children's.
        let mut postgres = process_ticks(postmaster)
            .map(|ticks| ticks.own + ticks.children)
            .with_context(|| format!("no postmaster {postmaster}"))?;
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
                continue;
            };
            // A process that ended meanwhile is skipped.
            if let Some(ticks) = process_ticks(pid)
                && ticks.parent == postmaster
            {
                postgres += ticks.own;
            }
        }
        let mut hub = 0;
        for &pid in hubs {
            hub += process_ticks(pid).with_context(|| format!("no hub process {pid}"))?.own;
        }
        let stat = std::fs::read_to_string("/proc/stat")?;
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .context("/proc/stat has no cpu line")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        // user nice system idle iowait irq softirq steal; guest time is counted in user.
        let machine =
            fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
        Ok(CpuTimes { at, hub, postgres, machine })
    }

    /// The cores busy on average from `before` to this, at `ticks` clock ticks a second.
    fn since(&self, before: &CpuTimes, ticks: f64) -> Cpu {
        let secs = (self.at - before.at).as_secs_f64().max(1e-9);
        let cores = |now: u64, then: u64| now.saturating_sub(then) as f64 / ticks / secs;
        Cpu {
            hub: cores(self.hub, before.hub),
            postgres: cores(self.postgres, before.postgres),
            machine: cores(self.machine, before.machine),
        }
    }
}

/// A process's parent and CPU time (user and system, in clock ticks).
struct ProcessTicks {
    parent: u32,
    /// Its own, threads included.
    own: u64,
    /// Its children's that ended and that it waited for.
    children: u64,
}

/// What /proc says of process `pid`; `None` if it is gone.
fn process_ticks(pid: u32) -> Option<ProcessTicks> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the name in parentheses: state, ppid, … utime, stime, cutime and cstime (the 14th
    // to 17th fields).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n)?.parse::<u64>().ok();
    Some(ProcessTicks {
        parent: u32::try_from(field(1)?).ok()?,
        own: field(11)? + field(12)?,
        children: field(13)? + field(14)?,
    })
}

/// What hub instances' writers committed, from their `/metrics`.
#[derive(Debug, Clone, Copy)]
struct Commits {
    writes: f64,
    commits: f64,
    /// Time spent in COMMITs, until durable.
    commit_secs: f64,
}

impl Commits {
    fn since(&self, before: &Commits) -> Commits {
        Commits {
            writes: self.writes - before.writes,
            commits: self.commits - before.commits,
            commit_secs: self.commit_secs - before.commit_secs,
        }
    }

    fn writes_per_commit(&self) -> f64 {
        self.writes / self.commits.max(1.0)
    }

    fn mean_commit(&self) -> Duration {
        Duration::from_secs_f64(self.commit_secs / self.commits.max(1.0))
    }
}

impl OnPostgres {
    /// The section of the report; `bare` is the bare server's requests per second.
    fn render(&self, bare: f64, secs: f64) -> anyhow::Result<String> {
        let mut out = String::new();
        let cores = cores()?;
        let [serial, concurrent] = &self.pgbench;
        writeln!(out, "## PostgreSQL\n")?;
        writeln!(
            out,
            "The hub on PostgreSQL {} (`[store] backend = \"postgres\"`: each instance has one writer, \
             which gathers the writes waiting into one transaction, and the default pool of 16 \
             connections), on a cluster the run creates (`initdb`) and starts on this machine, its data \
             dir on the same disk as the SQLite data dirs above, with PostgreSQL's defaults: {}. The hub \
             is driven as above ({CONNECTIONS} connections, {secs:.0} s measured after a warm-up), and \
             its figures are fractions of the same bare server's. Before the loads, the database is \
             filled (`bench prepare`, then a few seconds of deltas left out of the figures) and \
             analyzed (`ANALYZE`), as autovacuum does of itself a minute or two after tables fill. Two \
             instances share one database; the load generator's connections go to each in turn, with \
             no proxy between them. CPU is the cores busy on average over each whole load, warm-up \
             included, of the machine's {cores}: the hub instances, the cluster's server processes, and \
             the whole machine (the load generator and anything else running included).\n",
            self.major, self.settings
        )?;
        writeln!(
            out,
            "| scenario | requests/s | of bare | p50 | p99 | p99.9 | writes per commit | mean COMMIT | CPU: hub, PostgreSQL, machine |"
        )?;
        writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        for measured in &self.hub {
            let o = &measured.row.outcome;
            let (per_commit, commit) = measured.commits.map_or_else(
                || ("—".to_owned(), "—".to_owned()),
                |c| (format!("{:.1}", c.writes_per_commit()), micros(c.mean_commit().as_micros() as u64)),
            );
            let cpu = measured.cpu;
            writeln!(
                out,
                "| {} | {:.0} | {:.0} % | {} | {} | {} | {per_commit} | {commit} | {:.2}, {:.2}, {:.2} |",
                measured.row.what,
                o.requests_per_sec,
                100.0 * o.requests_per_sec / bare,
                micros(o.p50_us),
                micros(o.p99_us),
                micros(o.p999_us),
                cpu.hub,
                cpu.postgres,
                cpu.machine
            )?;
        }
        writeln!(
            out,
            "\nBeside it, on the same cluster in the same run, `pgbench` in a database of its own \
             (`pgbench -i`: 100,000 accounts) runs a single-row UPDATE (`UPDATE pgbench_accounts SET \
             abalance = abalance + :delta WHERE aid = :aid`, a random aid), each in a transaction of \
             its own, for {secs:.0} s after a warm-up. With 1 client every transaction waits for a \
             durable commit of its own: the ceiling of a writer that commits its writes one at a time. \
             With {CONNECTIONS} clients (`-c {CONNECTIONS} -j 2`) the database shares each flush of its \
             log among the sessions waiting: its own group commit, across sessions.\n"
        )?;
        writeln!(
            out,
            "| pgbench, single-row UPDATE | transactions/s | mean latency | CPU: PostgreSQL, machine |"
        )?;
        writeln!(out, "| --- | ---: | ---: | ---: |")?;
        for run in &self.pgbench {
            writeln!(
                out,
                "| {} client{} | {:.0} | {:.2} ms | {:.2}, {:.2} |",
                run.clients,
                if run.clients == 1 { "" } else { "s" },
                run.transactions_per_sec,
                run.latency_ms,
                run.cpu.postgres,
                run.cpu.machine
            )?;
        }
        writeln!(
            out,
            "\n| durable deltas on PostgreSQL | requests/s | ÷ pgbench, 1 client | ÷ pgbench, {CONNECTIONS} clients |"
        )?;
        writeln!(out, "| --- | ---: | ---: | ---: |")?;
        for measured in self.hub.iter().filter(|m| m.commits.is_some()) {
            let rps = measured.row.outcome.requests_per_sec;
            writeln!(
                out,
                "| {} | {rps:.0} | {:.1}× | {:.2}× |",
                measured.row.what,
                rps / serial.transactions_per_sec,
                rps / concurrent.transactions_per_sec
            )?;
        }
        writeln!(
            out,
            "\nA durable delta asks more of the database than pgbench's UPDATE: its record locked, its op \
             id looked for and remembered, the record and a ledger row written, in three round trips \
             per batch of the writer whatever the batch's size (its start, its writes, its COMMIT). Above 1× against one client, the \
             writer's batches beat a writer that commits each write alone; against {CONNECTIONS} clients, \
             the bar is the database's own gathering of commits across sessions. docs/performance.md \
             tells what limits the hub's deltas here."
        )?;
        Ok(out)
    }
}

/// One measured line of the report.
struct Row {
    what: String,
    outcome: Outcome,
    /// The status every answer must have, or the run is void.
    expect: u16,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.events {
        crate::prereq::ensure(crate::prereq::FOR_BENCH_EVENTS)?;
    } else if !args.flood {
        crate::prereq::ensure(crate::prereq::FOR_BENCH)?;
    }
    let (warmup, secs) =
        if args.quick { (1.0, args.secs.unwrap_or(3.0)) } else { (3.0, args.secs.unwrap_or(15.0)) };
    step("cargo", &["build", "--release", "-p", "hub", "-p", "bench"])?;
    let work = target_dir().join("bench-run");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let tools = Tools { release: target_dir().join("release"), work: work.clone(), warmup, secs };
    if args.flood {
        let flood = tools.flood()?;
        println!("\n{}", flood.render_latency()?);
        println!("{}", flood.render_memory()?);
        return Ok(());
    }
    if args.events {
        let events = tools.events()?;
        let across = tools.events_across_instances()?;
        println!("\n{}", events.render(&across)?);
        return Ok(());
    }
    let fsync = fsync_latency(&work)?;

    let bare = tools.start_bare()?;
    let grouped = tools.start_hub("group", Store::Sqlite { group_commit: true }, Caps::Raised)?;
    tools.prepare(grouped.addr, &grouped.config)?;

    let mut rows = Vec::new();
    let ceiling = tools.load(bare.addr, &grouped.config, "timestamp", None)?;
    rows.push(Row {
        what: "bare hyper server, fixed JSON body".into(),
        outcome: ceiling.clone(),
        expect: 200,
    });
    let scenarios = [
        ("timestamp", "timestamp check, 3 data types, 10,000 users", 200),
        ("get", "get, answered in full", 200),
        ("get-not-modified", "get with a matching If-None-Match", 304),
        ("push", "merge-patch push (profile)", 200),
        ("delta", "durable delta, group commit", 200),
    ];
    for (scenario, what, expect) in scenarios {
        let outcome = tools.load(grouped.addr, &grouped.config, scenario, None)?;
        rows.push(Row { what: what.into(), outcome, expect });
    }
    let peak_checks = rows[1].outcome.requests_per_sec;
    let peak_deltas = rows[5].outcome.requests_per_sec;
    let half_checks = tools.load(grouped.addr, &grouped.config, "timestamp", Some(peak_checks / 2.0))?;
    rows.push(Row {
        what: "timestamp check at half of its peak rate".into(),
        outcome: half_checks,
        expect: 200,
    });
    let half_deltas = tools.load(grouped.addr, &grouped.config, "delta", Some(peak_deltas / 2.0))?;
    rows.push(Row {
        what: "durable delta at half of its peak rate".into(),
        outcome: half_deltas,
        expect: 200,
    });

    let day = tools.user_day(grouped.addr, &grouped.config)?;
    grouped.stop()?;

    let single = tools.start_hub("single", Store::Sqlite { group_commit: false }, Caps::Raised)?;
    let fsync_each = tools.load(single.addr, &single.config, "delta", None)?;
    rows.push(Row { what: "durable delta, one fsync per request".into(), outcome: fsync_each, expect: 200 });
    single.stop()?;

    let on_postgres = tools.on_postgres()?;

    // Memory on a fresh process, so that its peak is the idle connections' and not the load's.
    let idle_hub = tools.start_hub("group", Store::Sqlite { group_commit: true }, Caps::Raised)?;
    let op_log_ids = tools.op_log_ids(idle_hub.addr)?;
    let hub_memory = tools.idle(idle_hub.addr, &idle_hub.config, idle_hub.pid())?;
    let bare_memory = tools.idle(bare.addr, &idle_hub.config, bare.pid())?;
    bare.stop()?;
    idle_hub.stop()?;
    let flood = tools.flood()?;
    let events = tools.events()?;

    for row in rows.iter().chain(on_postgres.hub.iter().map(|measured| &measured.row)) {
        all_answered(&row.what, &row.outcome, row.expect)?;
    }

    println!("==> cargo xtask build-pkg");
    let package_bytes = crate::build_pkg::run()?;
    let report = Report {
        rows,
        hub_memory,
        op_log_ids,
        bare_memory,
        package_bytes,
        day,
        flood,
        events,
        on_postgres,
        fsync,
        secs,
        quick: args.quick,
    };
    let text = report.render()?;
    println!("\n{text}");
    if args.quick {
        println!("==> a quick run: BENCHMARKS.md is left as it was");
    } else {
        std::fs::write(root().join("BENCHMARKS.md"), text)?;
        println!("==> wrote BENCHMARKS.md");
    }
    Ok(())
}

/// Fails unless every answer of `outcome` had the status `expect` and no connection failed.
fn all_answered(what: &str, outcome: &Outcome, expect: u16) -> anyhow::Result<()> {
    let total: u64 = outcome.statuses.values().sum();
    if outcome.statuses.get(&expect) != Some(&total) || outcome.errors > 0 || total == 0 {
        bail!(
            "{what}: expected every answer to be {expect}, got {:?} and {} connection errors",
            outcome.statuses,
            outcome.errors
        );
    }
    Ok(())
}

struct Tools {
    release: PathBuf,
    work: PathBuf,
    warmup: f64,
    secs: f64,
}

/// A server process, stopped (and reaped) when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let _ = command("kill", &["-TERM", &self.child.id().to_string()]).status();
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tools {
    fn bench(&self) -> Command {
        Command::new(self.release.join("bench"))
    }

    fn start_bare(&self) -> anyhow::Result<Server> {
        let mut child = self
            .bench()
            .args(["--threads", "2", "bare", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start bench bare")?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().context("bench bare has no stdout")?),
            &mut line,
        )?;
        let addr = line.trim().parse().with_context(|| format!("bench bare printed {line:?}"))?;
        Ok(Server { child, addr, config: PathBuf::new() })
    }

    /// Starts `hub serve` with its own config, data dir and log `name` (the config and data
    /// kept across starts, the log in `target/bench-run/name.log` written anew).
    fn start_hub(&self, name: &str, store: Store<'_>, caps: Caps) -> anyhow::Result<Server> {
        let config = self.work.join(format!("{name}.toml"));
        if !config.exists() {
            std::fs::write(&config, hub_config(&self.work.join(name), store, caps))?;
        }
        let addr = free_addr()?;
        // The hub's log: a flood's refusals would fill the terminal.
        let log = std::fs::File::create(self.work.join(format!("{name}.log")))?;
        let child = Command::new(self.release.join("hub"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(addr.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start the hub")?;
        let server = Server { child, addr, config };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("the hub did not accept connections on {addr} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    fn prepare(&self, addr: SocketAddr, config: &Path) -> anyhow::Result<()> {
        self.run_bench(&["prepare", "--addr", &addr.to_string(), "--config", path(config)?])?;
        Ok(())
    }

    fn load(
        &self,
        addr: SocketAddr,
        config: &Path,
        scenario: &str,
        rate: Option<f64>,
    ) -> anyhow::Result<Outcome> {
        self.load_from(&[addr], config, scenario, rate, None)
    }

    /// [`Tools::load`] over the instances `addrs` of one hub (the connections going to each
    /// in turn), from the local address `source`, a client of its own to the hub.
    fn load_from(
        &self,
        addrs: &[SocketAddr],
        config: &Path,
        scenario: &str,
        rate: Option<f64>,
        source: Option<&str>,
    ) -> anyhow::Result<Outcome> {
        let (connections, warmup, secs) =
            (CONNECTIONS.to_string(), self.warmup.to_string(), self.secs.to_string());
        let (first, others) = addrs.split_first().context("no hub to load")?;
        let mut args = vec![
            "load",
            "--addr",
            &first.to_string(),
            "--config",
            path(config)?,
            "--scenario",
            scenario,
            "--connections",
            &connections,
            "--warmup-secs",
            &warmup,
            "--secs",
            &secs,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        if let Some(rate) = rate {
            args.extend(["--rate".to_owned(), format!("{rate:.0}")]);
        }
        if let Some(source) = source {
            args.extend(["--source".to_owned(), source.to_owned()]);
        }
        for other in others {
            args.extend(["--also".to_owned(), other.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let printed = self.run_bench(&args)?;
        let outcome: Outcome =
            serde_json::from_str(&printed).with_context(|| format!("bench load printed {printed:?}"))?;
        println!(
            "    {scenario:<18} {}{:>9.0} req/s  p50 {:>6} µs  p99 {:>6} µs  ({} requests)",
            if rate.is_some() { "(paced) " } else { "" },
            outcome.requests_per_sec,
            outcome.p50_us,
            outcome.p99_us,
            outcome.requests
        );
        Ok(outcome)
    }

    fn idle(&self, addr: SocketAddr, config: &Path, pid: u32) -> anyhow::Result<Memory> {
        let printed = self.run_bench(&[
            "idle",
            "--addr",
            &addr.to_string(),
            "--config",
            path(config)?,
            "--connections",
            &IDLE_CONNECTIONS.to_string(),
            "--pid",
            &pid.to_string(),
        ])?;
        let memory: Memory =
            serde_json::from_str(&printed).with_context(|| format!("bench idle printed {printed:?}"))?;
        if memory.connections != IDLE_CONNECTIONS {
            bail!("only {} of {IDLE_CONNECTIONS} idle connections stayed open", memory.connections);
        }
        Ok(memory)
    }

    /// The op ids the hub at `addr` indexes in memory, from its `/metrics`.
    fn op_log_ids(&self, addr: SocketAddr) -> anyhow::Result<u64> {
        Ok(self.metric(addr, "hub_store_op_log_ids")? as u64)
    }

    /// The value of the sample `name` (with its labels) in the `/metrics` of the hub at `addr`.
    fn metric(&self, addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
        let printed = self.run_bench(&["metric", "--addr", &addr.to_string(), "--name", name])?;
        printed.parse().with_context(|| format!("bench metric printed {printed:?}"))
    }

    /// Another address's timestamp checks at [`FLOOD_RATE`] against a hub with the default
    /// connection limits, alone and then while `bench flood` holds them full from
    /// [`FLOOD_ADDRESSES`] addresses; the hub's memory and what its `/metrics` showed held.
    fn flood(&self) -> anyhow::Result<Flood> {
        let hub = self.start_hub("flood", Store::Sqlite { group_commit: true }, Caps::Default)?;
        let checks = |hub: &Server| {
            self.load_from(&[hub.addr], &hub.config, "timestamp", Some(FLOOD_RATE), Some(MEASURED_SOURCE))
        };
        let unloaded = checks(&hub)?;
        all_answered("timestamp checks of a hub alone", &unloaded, 200)?;
        let before = memory_of(hub.pid())?;
        let (addr, addresses) = (hub.addr.to_string(), FLOOD_ADDRESSES.to_string());
        let args = ["flood", "--addr", &addr, "--config", path(&hub.config)?, "--addresses", &addresses];
        println!("==> bench {}", args.join(" "));
        let mut child =
            self.bench().args(args).stdout(Stdio::piped()).spawn().context("cannot start bench flood")?;
        let stdout = child.stdout.take().context("bench flood has no stdout")?;
        let flooding = Flooding(child);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let in_place: InPlace =
            serde_json::from_str(&line).with_context(|| format!("bench flood printed {line:?}"))?;
        // Past the body timeout, so that every upload has been cut or refused and started again.
        std::thread::sleep(Duration::from_secs(12));
        let flooded = checks(&hub)?;
        all_answered("timestamp checks of a flooded hub", &flooded, 200)?;
        let during = memory_of(hub.pid())?;
        let metric = |name: &str| self.metric(hub.addr, name);
        let held = Held {
            open: metric("hub_open_connections")?,
            active: metric(r#"hub_connections{state="active"}"#)?,
            idle: metric(r#"hub_connections{state="idle"}"#)?,
            refused_per_address: metric(r#"hub_connections_refused_total{limit="per_address"}"#)?,
            body_bytes: metric("hub_request_body_bytes_in_flight")?,
            body_bytes_limit: metric("hub_request_body_bytes_in_flight_limit")?,
            bodies_busy: metric(r#"hub_request_bodies_refused_total{reason="busy"}"#)?,
            bodies_timed_out: metric(r#"hub_request_bodies_refused_total{reason="timeout"}"#)?,
        };
        drop(flooding);
        hub.stop()?;
        Ok(Flood { in_place, unloaded, flooded, before, during, held })
    }

    /// Event streams on SQLite ([`Events`]): durable deltas and the memory of idle keep-alive
    /// connections on one hub, then the streams' memory, their events' latency and durable
    /// deltas on another, each on a fresh data dir, prepared alike.
    fn events(&self) -> anyhow::Result<Events> {
        enough_files(STREAMS)?;
        let alone = self.start_hub("events-alone", Store::Sqlite { group_commit: true }, Caps::Raised)?;
        self.prepare(alone.addr, &alone.config)?;
        let before = memory_of(alone.pid())?;
        let idle = self.idle(alone.addr, &alone.config, alone.pid())?;
        let keep_alive_memory =
            [before, ProcMemory { vm_rss_kib: idle.vm_rss_kib, vm_hwm_kib: idle.vm_hwm_kib }];

        let hub = self.start_hub("events", Store::Sqlite { group_commit: true }, Caps::Raised)?;
        self.prepare(hub.addr, &hub.config)?;
        let before = memory_of(hub.pid())?;
        let mut streams = self.hold_streams(&hub, None)?;
        let streams_memory = [before, memory_of(hub.pid())?];
        let latency = streams.latency()?;
        let counted = streams.all_open()?.events;
        // Half as long each, twice in turn, so that what else runs on the machine meanwhile
        // weighs on both hubs alike.
        let halves = Tools {
            release: self.release.clone(),
            work: self.work.clone(),
            warmup: self.warmup,
            secs: self.secs / 2.0,
        };
        let mut deltas = Vec::new();
        for _ in 0..2 {
            let without = halves.load(alone.addr, &alone.config, "delta", None)?;
            let with = halves.load(hub.addr, &hub.config, "delta", None)?;
            deltas.push([without, with]);
        }
        let delivered = streams.all_open()?.events - counted;
        let in_place = streams.in_place;
        drop(streams);
        alone.stop()?;
        hub.stop()?;
        Ok(Events {
            in_place,
            latency,
            streams_memory,
            keep_alive_memory,
            deltas,
            load_secs: halves.secs,
            delivered,
        })
    }

    /// Opens [`STREAMS`] idle event streams on `hub` with `bench streams`, their latency's
    /// writes going to `writes_at` (another instance of the same hub) or to `hub`.
    fn hold_streams(&self, hub: &Server, writes_at: Option<&Server>) -> anyhow::Result<Streams> {
        let (addr, users) = (hub.addr.to_string(), STREAMS.to_string());
        let (writes, rate) = (EVENT_WRITES.to_string(), EVENT_WRITE_RATE.to_string());
        let writer = writes_at.map(|w| w.addr.to_string());
        let mut args = vec![
            "streams",
            "--addr",
            &addr,
            "--config",
            path(&hub.config)?,
            "--users",
            &users,
            "--writes",
            &writes,
            "--rate",
            &rate,
        ];
        if let Some(writer) = &writer {
            args.extend(["--writes-at", writer]);
        }
        println!("==> bench {}", args.join(" "));
        let mut child = self
            .bench()
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start bench streams")?;
        let stdin = child.stdin.take().context("bench streams has no stdin")?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("bench streams has no stdout")?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line)?;
        let in_place: StreamsInPlace = match serde_json::from_str(&line) {
            Ok(in_place) => in_place,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("bench streams did not open its streams (it printed {line:?})");
            }
        };
        println!(
            "    {STREAMS} event streams open from {} addresses in {:.1} s",
            in_place.addresses, in_place.secs
        );
        // The streams' last frames sent and their buffers settled before the hub's memory is read.
        std::thread::sleep(Duration::from_secs(1));
        Ok(Streams { child, stdin, stdout, in_place })
    }

    /// The hub on a throwaway PostgreSQL cluster, one instance and then two on one database,
    /// beside pgbench's single-row UPDATE on the same cluster first.
    fn on_postgres(&self) -> anyhow::Result<OnPostgres> {
        let cluster = Cluster::start(&self.work, "bench")?;
        let settings = cluster.psql(
            "postgres",
            "SELECT string_agg(name || ' ' || current_setting(name), ', ' ORDER BY name) FROM pg_settings \
             WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method', 'full_page_writes', \
             'commit_delay', 'shared_buffers')",
        )?;
        let postmaster = cluster.postmaster_pid()?;
        let ticks: f64 = crate::process::output("getconf", &["CLK_TCK"])?.trim().parse()?;
        let pgbench = self.pgbench(&cluster, postmaster, ticks)?;

        let url = cluster.create_database(HUB_DATABASE)?;
        let a = self.start_hub("postgres-a", Store::Postgres(&url), Caps::Raised)?;
        self.prepare(a.addr, &a.config)?;
        // A database in service: op ids remembered, and its tables analyzed, as autovacuum
        // does of itself a minute or two after they fill. The writer keeps the plans of its
        // prepared statements until the statistics change, and plans made while the tables
        // were nearly empty read them whole on every batch (docs/performance.md).
        let (addr, config, secs) = (a.addr.to_string(), path(&a.config)?, self.warmup.to_string());
        self.run_bench(&[
            "load",
            "--addr",
            &addr,
            "--config",
            config,
            "--scenario",
            "delta",
            "--warmup-secs",
            "0",
            "--secs",
            &secs,
        ])?;
        println!("==> psql -c ANALYZE {HUB_DATABASE}");
        cluster.psql(HUB_DATABASE, "ANALYZE")?;
        let on = |hubs: &[&Server], scenario: &str, what: &str| {
            self.on_instances(hubs, postmaster, ticks, scenario, what)
        };
        let mut hub = vec![
            on(&[&a], "timestamp", "timestamp check, one instance")?,
            on(&[&a], "delta", "durable delta, one instance")?,
        ];
        let b = self.start_hub("postgres-b", Store::Postgres(&url), Caps::Raised)?;
        hub.push(on(&[&a, &b], "delta", "durable delta, two instances")?);
        hub.push(on(&[&a, &b], "timestamp", "timestamp check, two instances")?);
        let events = self.event_latency_across(&a, &b)?;
        a.stop()?;
        b.stop()?;
        let major = cluster.major().to_owned();
        cluster.stop();
        Ok(OnPostgres { major, settings, pgbench, hub, events })
    }

    /// The events' latency across two hub instances on a throwaway PostgreSQL cluster, alone.
    fn events_across_instances(&self) -> anyhow::Result<EventLatency> {
        let cluster = Cluster::start(&self.work, "bench")?;
        let url = cluster.create_database(HUB_DATABASE)?;
        let a = self.start_hub("postgres-a", Store::Postgres(&url), Caps::Raised)?;
        self.prepare(a.addr, &a.config)?;
        // As in `on_postgres`: the tables analyzed once filled, as autovacuum does of itself.
        println!("==> psql -c ANALYZE {HUB_DATABASE}");
        cluster.psql(HUB_DATABASE, "ANALYZE")?;
        let b = self.start_hub("postgres-b", Store::Postgres(&url), Caps::Raised)?;
        let latency = self.event_latency_across(&a, &b)?;
        a.stop()?;
        b.stop()?;
        cluster.stop();
        Ok(latency)
    }

    /// [`STREAMS`] streams held on `b`, and the latency of events written through `a`.
    fn event_latency_across(&self, a: &Server, b: &Server) -> anyhow::Result<EventLatency> {
        enough_files(STREAMS)?;
        let mut streams = self.hold_streams(b, Some(a))?;
        let latency = streams.latency()?;
        streams.all_open()?;
        Ok(latency)
    }

    /// pgbench's single-row UPDATE on `cluster`, in a database of its own: a warm-up, then one
    /// client, then [`CONNECTIONS`].
    fn pgbench(&self, cluster: &Cluster, postmaster: u32, ticks: f64) -> anyhow::Result<[PgbenchRun; 2]> {
        cluster.create_database(PGBENCH_DATABASE)?;
        cluster.pgbench(PGBENCH_DATABASE, &["-i", "-q"])?;
        let script = cluster.dir().join("update.sql");
        std::fs::write(&script, PGBENCH_UPDATE)?;
        let script = path(&script)?;
        let run = |clients: usize, secs: f64| -> anyhow::Result<PgbenchRun> {
            let (c, j) = (clients.to_string(), clients.min(2).to_string());
            // pgbench counts whole seconds.
            let secs = (secs.ceil() as u64).max(1).to_string();
            let before = CpuTimes::now(&[], postmaster)?;
            let printed =
                cluster.pgbench(PGBENCH_DATABASE, &["-n", "-f", script, "-c", &c, "-j", &j, "-T", &secs])?;
            let cpu = CpuTimes::now(&[], postmaster)?.since(&before, ticks);
            Ok(PgbenchRun {
                clients,
                transactions_per_sec: pgbench_figure(&printed, "tps = ")?,
                latency_ms: pgbench_figure(&printed, "latency average = ")?,
                cpu,
            })
        };
        run(CONNECTIONS, self.warmup)?;
        let measured = [run(1, self.secs)?, run(CONNECTIONS, self.secs)?];
        for run in &measured {
            println!(
                "    pgbench, {:>2} client(s) {:>9.0} tps      mean {:>6.2} ms",
                run.clients, run.transactions_per_sec, run.latency_ms
            );
        }
        Ok(measured)
    }

    /// `scenario` driven over the instances `hubs` (on the cluster whose postmaster is
    /// `postmaster`), with the CPU it took and, for writes, what the writers committed.
    fn on_instances(
        &self,
        hubs: &[&Server],
        postmaster: u32,
        ticks: f64,
        scenario: &str,
        what: &str,
    ) -> anyhow::Result<OnInstances> {
        let addrs: Vec<SocketAddr> = hubs.iter().map(|hub| hub.addr).collect();
        let pids: Vec<u32> = hubs.iter().map(|hub| hub.pid()).collect();
        let writes = scenario == "delta";
        let committed_before = if writes { Some(self.commits(&addrs)?) } else { None };
        let before = CpuTimes::now(&pids, postmaster)?;
        let outcome = self.load_from(&addrs, &hubs[0].config, scenario, None, None)?;
        let cpu = CpuTimes::now(&pids, postmaster)?.since(&before, ticks);
        let commits = match committed_before {
            Some(before) => Some(self.commits(&addrs)?.since(&before)),
            None => None,
        };
        Ok(OnInstances { row: Row { what: what.into(), outcome, expect: 200 }, cpu, commits })
    }

    /// What the writers of the hub instances at `addrs` have committed since they started.
    fn commits(&self, addrs: &[SocketAddr]) -> anyhow::Result<Commits> {
        let mut sum = Commits { writes: 0.0, commits: 0.0, commit_secs: 0.0 };
        for &addr in addrs {
            sum.writes += self.metric(addr, "hub_store_commit_batch_writes_sum")?;
            sum.commits += self.metric(addr, "hub_store_commit_batch_writes_count")?;
            sum.commit_secs += self.metric(addr, "hub_store_commit_seconds_sum")?;
        }
        Ok(sum)
    }

    /// The simulated day of one user against the hub at `addr` (its report goes to stderr).
    fn user_day(&self, addr: SocketAddr, config: &Path) -> anyhow::Result<Day> {
        let printed =
            self.run_bench(&["user-day", "--addr", &addr.to_string(), "--config", path(config)?])?;
        serde_json::from_str(&printed).with_context(|| format!("bench user-day printed {printed:?}"))
    }

    fn run_bench(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("==> bench {}", args.join(" "));
        let out = self.bench().args(args).stderr(Stdio::inherit()).output().context("cannot start bench")?;
        if !out.status.success() {
            bail!("bench {} failed ({})", args.join(" "), out.status);
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }
}

/// The number after `prefix` on the first line of pgbench's report that starts with it.
fn pgbench_figure(printed: &str, prefix: &str) -> anyhow::Result<f64> {
    printed
        .lines()
        .find_map(|line| line.strip_prefix(prefix)?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("pgbench printed no `{prefix}…`:\n{printed}"))
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("the target directory's path is not UTF-8")
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// How many connections the benchmark's hub allows.
#[derive(Debug, Clone, Copy)]
enum Caps {
    /// Room for the idle connections, which all come from one address: the per-address
    /// connection limit is raised with the total.
    Raised,
    /// The hub's defaults, which the flood fills.
    Default,
}

/// Where the benchmark's hub keeps its records.
#[derive(Debug, Clone, Copy)]
enum Store<'a> {
    /// SQLite in the hub's data dir; without group commit, each write is committed and
    /// fsynced alone.
    Sqlite { group_commit: bool },
    /// The PostgreSQL database at this URL, with group commit (each instance's writer
    /// gathers the writes waiting into one transaction).
    Postgres(&'a str),
}

/// The hub's config for the benchmark: the `bench` site, the two sites of the simulated day,
/// a rate limit no benchmark user reaches, the connection limits `caps`, and the store. The
/// sites' backends may sign every scope, day-long tokens, and credits no run reaches the
/// ceilings of: the load's deltas are credits of the `bench` site's backend.
fn hub_config(data_dir: &Path, store: Store<'_>, caps: Caps) -> String {
    let scopes: Vec<String> = protocol::Scopes::ALL.iter().map(|s| format!("\"{s}\"")).collect();
    let sites: String = ["bench", "roflfaucet", "clickforcharity"]
        .iter()
        .map(|site| {
            format!(
                "[[sites]]\nid = \"{site}\"\norigins = [\"http://{site}.localhost\"]\nsecret = \"{site}-benchmark-secret-of-at-least-32-bytes\"\nscopes = [{}]\nmax_token_ttl_secs = 86400\nmax_credit_per_op = {max}\nmax_credits_per_user_per_day = {max}\n\n",
                scopes.join(", "),
                max = protocol::MAX_AMOUNT,
            )
        })
        .collect();
    let connections = match caps {
        Caps::Raised => {
            format!(
                "max_connections = {max}\nmax_connections_per_address = {max}\n",
                max = IDLE_CONNECTIONS * 2
            )
        }
        Caps::Default => String::new(),
    };
    let store = match store {
        Store::Sqlite { group_commit } => format!("group_commit = {group_commit}"),
        Store::Postgres(url) => format!("backend = \"postgres\"\nurl = \"{url}\""),
    };
    format!(
        "hub_id = \"bench-hub\"\ndata_dir = \"{}\"\n\n[limits]\nrequests_per_minute = 100000000\n{connections}\n[store]\n{store}\n\n{sites}",
        data_dir.display(),
    )
}

struct Report {
    rows: Vec<Row>,
    hub_memory: Memory,
    /// Op ids the hub's op log held when its memory was read, indexed in memory.
    op_log_ids: u64,
    bare_memory: Memory,
    package_bytes: crate::build_pkg::Sizes,
    day: Day,
    flood: Flood,
    events: Events,
    on_postgres: OnPostgres,
    /// How long one write and fsync of a page takes on the disk of the data dir.
    fsync: Duration,
    secs: f64,
    quick: bool,
}

impl Report {
    fn render(&self) -> anyhow::Result<String> {
        let bare = self.rows[0].outcome.requests_per_sec;
        let rps = |i: usize| self.rows[i].outcome.requests_per_sec;
        let mut out = String::new();
        writeln!(out, "# Benchmarks\n")?;
        writeln!(
            out,
            "Measured by `cargo xtask bench`{} on {}. The hub and a bare hyper server run in the same \
             run on the same machine, driven by the same load generator (`bench/`: {CONNECTIONS} keep-alive \
             HTTP/1.1 connections, {:.0} s measured after a warm-up); every hub figure is also given as a \
             fraction of the bare server's. Every hub request carries a site-signed token for one of \
             {USERS} users and the site's `Origin`, and passes the rate limiter (set high in the config). \
             The hub logs at `RUST_LOG=warn`: at the default `info` it logs one line per applied write, \
             which costs durable deltas about a tenth of their rate on this machine.\n",
            if self.quick { " --quick" } else { "" },
            machine()?,
            self.secs
        )?;
        writeln!(out, "## Throughput and latency\n")?;
        writeln!(out, "| scenario | requests/s | of bare | p50 | p99 | p99.9 | body bytes |")?;
        writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        for row in &self.rows {
            let o = &row.outcome;
            writeln!(
                out,
                "| {} | {:.0} | {:.0} % | {} | {} | {} | {:.0} |",
                row.what,
                o.requests_per_sec,
                100.0 * o.requests_per_sec / bare,
                micros(o.p50_us),
                micros(o.p99_us),
                micros(o.p999_us),
                o.mean_body_bytes
            )?;
        }
        let fsync_each = rps(self.rows.len() - 1);
        let half = &self.rows[6].outcome;
        let half_deltas = &self.rows[7].outcome;
        let checks = 100.0 * rps(1) / bare;
        let deltas = 100.0 * rps(5) / bare;
        let group_gain = rps(5) / fsync_each;
        let kib = |bytes: u64| bytes as f64 / 1024.0;
        let package = self.package_bytes;
        let day = &self.day;
        writeln!(out, "\n## Against the targets (SPEC §6)\n")?;
        writeln!(out, "| target | measured | met |")?;
        writeln!(out, "| --- | --- | --- |")?;
        let mut target = |what: &str, measured: String, met: bool| {
            writeln!(out, "| {what} | {measured} | {} |", if met { "yes" } else { "**no**" })
        };
        target("timestamp checks ≥ 50 % of bare", format!("{checks:.0} %"), checks >= 50.0)?;
        target("durable deltas ≥ 20 % of bare", format!("{deltas:.0} %"), deltas >= 20.0)?;
        target(
            "group commit ≥ 20× one fsync per request",
            format!("{group_gain:.1}× (an fsync takes {} µs on this disk)", self.fsync.as_micros()),
            group_gain >= 20.0,
        )?;
        target("p99 at half of peak ≤ 5 ms: timestamp checks", micros(half.p99_us), half.p99_us <= 5_000)?;
        target(
            "p99 at half of peak ≤ 5 ms: durable deltas",
            micros(half_deltas.p99_us),
            half_deltas.p99_us <= 5_000,
        )?;
        target(
            "wasm + JS glue ≤ 40,000 bytes gzipped",
            format!(
                "module {} bytes ({:.1} KiB), plain script {} bytes ({:.1} KiB)",
                package.module,
                kib(package.module),
                package.script,
                kib(package.script)
            ),
            package.module.max(package.script) <= crate::build_pkg::MAX_BYTES,
        )?;
        target(
            "a tab return with nothing changed: 1 request, body ≤ 300 bytes",
            format!(
                "{} request(s), ≤ {} bytes",
                day.unchanged_returns.max_requests, day.unchanged_returns.max_response_bytes
            ),
            day.unchanged_returns.max_requests == 1 && day.unchanged_returns.max_response_bytes <= 300,
        )?;
        writeln!(
            out,
            "\nWhat group commit buys depends on the disk: one fsync per request caps the writer at \
             one write per fsync ({} µs here, so about {:.0} writes/s before any other work), while a \
             group commit shares one fsync among every write waiting. Where an fsync is as cheap \
             as on this disk, the writer's own work per write, not the fsync, is what limits both.",
            self.fsync.as_micros(),
            1.0 / self.fsync.as_secs_f64().max(1e-9)
        )?;
        writeln!(out, "\n{}", self.on_postgres.render(bare, self.secs)?)?;
        writeln!(out, "{}", self.flood.render_latency()?)?;
        writeln!(out, "{}", self.events.render(&self.on_postgres.events)?)?;
        writeln!(out, "## Memory\n")?;
        writeln!(out, "| process, {IDLE_CONNECTIONS} idle keep-alive connections | peak RSS |")?;
        writeln!(out, "| --- | ---: |")?;
        writeln!(
            out,
            "| hub (fresh process on the runs' data dir, {} op ids indexed in memory) | {:.1} MiB |",
            self.op_log_ids,
            self.hub_memory.vm_hwm_kib as f64 / 1024.0
        )?;
        writeln!(
            out,
            "| bare hyper server (after its runs) | {:.1} MiB |",
            self.bare_memory.vm_hwm_kib as f64 / 1024.0
        )?;
        writeln!(out, "\n{}", self.flood.render_memory()?)?;
        writeln!(out, "## A simulated day of one user\n")?;
        writeln!(
            out,
            "`sync-core` driven natively through the seed's typical usage (`bench user-day`, \
             `bench/src/user_day.rs`: two sites in two tabs, claims, dice, clicks and donations, tab returns, a lunch break) against the real hub.\n"
        )?;
        writeln!(out, "| | requests per active hour |")?;
        writeln!(out, "| --- | ---: |")?;
        writeln!(
            out,
            "| this client | {:.1} (busiest hour {}) |",
            day.requests_per_active_hour, day.peak_hour_requests
        )?;
        writeln!(out, "| the seed's 10-second polling | {} |", day.polling_per_hour)?;
        let (low, high) = day.seed_estimate_per_hour;
        writeln!(out, "| the seed's claim for its design | {low}–{high} |")?;
        writeln!(out, "\n## Reproduce\n")?;
        writeln!(
            out,
            "```\ncargo xtask bench          # writes this file\ncargo xtask bench --quick  # a short run; prints the table only\ncargo xtask bench --events # the event streams alone; prints their tables only\n```\n"
        )?;
        writeln!(
            out,
            "The load generator shares the machine with the server it measures (one worker thread \
             against the server's two), so on {} the ceiling is the machine's, not the server's alone. \
             To see where the hub spends its time: `cargo build --profile profiling -p hub`, start \
             `target/profiling/hub` and record it with `perf record -g` while a `bench load` runs; \
             docs/performance.md tells what profiling found and what is still short of the targets.",
            cores()?
        )?;
        Ok(out)
    }
}

/// Fails unless this process, and so the hub and the load generator it starts, may open
/// `connections` files and a thousand more (the data dir's, the listener, the load's).
fn enough_files(connections: usize) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let soft: usize = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files")?.split_whitespace().next()?.parse().ok())
        .context("/proc/self/limits names no limit of open files")?;
    let needed = connections + 1_000;
    if soft < needed {
        bail!(
            "the event streams need {needed} open files in the hub and in the load generator, and this \
             process may open {soft}: raise the limit (`ulimit -n {needed}`) and run again"
        );
    }
    Ok(())
}

/// The mean time of appending a 4 KiB page to a file in `dir` and fsyncing it: what one
/// commit costs the disk, and so what bounds writes that are not grouped.
fn fsync_latency(dir: &Path) -> anyhow::Result<Duration> {
    use std::io::Write;
    const ROUNDS: u32 = 200;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let page = [0x5au8; 4096];
    let start = Instant::now();
    for _ in 0..ROUNDS {
        file.write_all(&page)?;
        file.sync_all()?;
    }
    let mean = start.elapsed() / ROUNDS;
    std::fs::remove_file(&path)?;
    Ok(mean)
}

fn micros(us: u64) -> String {
    if us >= 1000 { format!("{:.1} ms", us as f64 / 1000.0) } else { format!("{us} µs") }
}

fn cores() -> anyhow::Result<String> {
    let n = std::thread::available_parallelism()?.get();
    Ok(format!("{n} core{}", if n == 1 { "" } else { "s" }))
}

/// The machine, as /proc and the toolchain describe it.
fn machine() -> anyhow::Result<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "an unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok())
        })
        .map_or_else(String::new, |kib| format!(", {:.0} GiB", kib as f64 / 1024.0 / 1024.0));
    let rustc = crate::process::output("rustc", &["--version"])?.trim().to_owned();
    let date = crate::process::output("date", &["-u", "+%Y-%m-%d"])?.trim().to_owned();
    Ok(format!("{date}, {} ({model}{memory}), Linux, {rustc}", cores()?))
}
