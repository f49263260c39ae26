//! `bench`: the measuring tools behind `cargo xtask bench`, built in release so that the
//! load generator is never what limits a result. Each subcommand prints one JSON line on
//! stdout for xtask to read; xtask starts the servers, runs the scenarios and writes the
//! report.

mod bare;
mod events;
mod flood;
mod load;
mod scenario;
mod user_day;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use http_body_util::BodyExt;
use serde::Serialize;

use scenario::{Requests, Scenario};

#[derive(Parser)]
#[command(name = "bench", about = "Load generator and bare server for cargo xtask bench")]
struct Cli {
    /// Worker threads of this process's runtime.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the fixed JSON body; prints the bound address.
    Bare {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Give every benchmark user a balance and a profile (version 1 each).
    Prepare(Target),
    /// Drive one scenario and print what it measured.
    Load {
        #[command(flatten)]
        target: Target,
        /// Another instance of the same hub (the same database and sites), repeated for each:
        /// the connections go to `--addr` and these in turn, with no proxy between.
        #[arg(long)]
        also: Vec<SocketAddr>,
        #[arg(long, value_enum)]
        scenario: Scenario,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 2.0)]
        warmup_secs: f64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Requests per second in all (open loop); without it, as fast as answered.
        #[arg(long)]
        rate: Option<f64>,
        /// The local address to connect from, e.g. `127.0.0.3`: another client than the
        /// others on this machine, to the hub's per-address limits.
        #[arg(long)]
        source: Option<IpAddr>,
    },
    /// Open this many keep-alive connections, one request on each, and report the memory
    /// of the server process `pid` while they stay open.
    Idle {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        pid: u32,
    },
    /// Flood the hub from many client addresses, each holding its share of connections
    /// (idle keep-alives and HTTP/2 connections busy with trickled uploads, as many of each
    /// as the hub's config allows an address) and trying more; prints one line once in
    /// place, then holds it until killed.
    Flood {
        #[command(flatten)]
        target: Target,
        /// The first client address; the others follow it (127.0.0.10, 127.0.0.11, …).
        #[arg(long, default_value = "127.0.0.10")]
        first_source: Ipv4Addr,
        #[arg(long, default_value_t = 38)]
        addresses: u32,
        /// Connections each address keeps trying beyond its share.
        #[arg(long, default_value_t = 8)]
        extra: usize,
        /// Seconds between two bytes of an upload.
        #[arg(long, default_value_t = 2.0)]
        trickle_secs: f64,
    },
    /// Hold one event stream open per user, from as many addresses as the hub's per-address
    /// stream limit asks; prints one line once they are all open, then answers `count` and
    /// `latency` read on standard input, until it ends.
    Streams {
        #[command(flatten)]
        target: Target,
        /// The instance the latency's writes go to (another of the same hub); without it,
        /// the streams' own.
        #[arg(long)]
        writes_at: Option<SocketAddr>,
        /// The first client address; the others follow it (127.0.1.2, 127.0.1.3, …).
        #[arg(long, default_value = "127.0.1.1")]
        first_source: Ipv4Addr,
        /// The latency's writes, spread over the users.
        #[arg(long, default_value_t = 3_000)]
        writes: usize,
        /// The latency's writes per second, in all.
        #[arg(long, default_value_t = 1_000.0)]
        rate: f64,
    },
    /// Print the value of one sample of the server's `/metrics` (an unlabelled one).
    Metric {
        /// The server, `host:port`.
        #[arg(long)]
        addr: SocketAddr,
        /// The sample's name, e.g. `hub_store_op_log_ids`.
        #[arg(long)]
        name: String,
    },
    /// Drive the client engine through a simulated day of one user against the hub, and
    /// print what it cost (the report on stderr).
    UserDay {
        /// The hub, `host:port`.
        #[arg(long)]
        addr: SocketAddr,
        /// The hub's config file: its sites' keys sign the pages' tokens and grants.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct Target {
    /// The server, `host:port`.
    #[arg(long)]
    addr: SocketAddr,
    /// The hub's config file: its `bench` site key signs the users' tokens.
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    users: usize,
}

impl Target {
    fn requests(&self, scenario: Scenario) -> anyhow::Result<Arc<Requests>> {
        Ok(Arc::new(Requests::new(scenario, &self.addr.to_string(), &self.config, self.users)?))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The day is plain blocking code around an HTTP connection with a runtime of its own.
    if let Command::UserDay { addr, config } = &cli.command {
        return user_day::run(*addr, config);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Bare { listen } => bare::serve(listen).await,
            Command::Prepare(target) => prepare(&target).await,
            Command::Load { target, also, scenario, connections, warmup_secs, secs, rate, source } => {
                let plan = load::Plan {
                    connections,
                    warmup: Duration::from_secs_f64(warmup_secs),
                    duration: Duration::from_secs_f64(secs),
                    rate,
                    source,
                };
                let addrs: Vec<SocketAddr> = std::iter::once(target.addr).chain(also).collect();
                let outcome = load::run(&addrs, target.requests(scenario)?, plan).await?;
                println!("{}", serde_json::to_string(&outcome)?);
                Ok(())
            }
            Command::Idle { target, connections, pid } => idle(&target, connections, pid).await,
            Command::Flood { target, first_source, addresses, extra, trickle_secs } => {
                let limits = hub::config::Config::load(Some(&target.config))?.limits;
                let plan = flood::Plan {
                    sources: (0..addresses)
                        .map(|n| Ipv4Addr::from(u32::from(first_source) + n).into())
                        .collect(),
                    per_address: limits.max_connections_per_address,
                    streams: usize::try_from(limits.http2_max_concurrent_streams)?,
                    extra,
                    trickle: Duration::from_secs_f64(trickle_secs),
                };
                flood::run(target.addr, target.requests(Scenario::Push)?, plan).await
            }
            Command::Streams { target, writes_at, first_source, writes, rate } => {
                let per_address =
                    hub::config::Config::load(Some(&target.config))?.events.max_streams_per_address;
                let writes_at = writes_at.unwrap_or(target.addr);
                let requests = Arc::new(Requests::new(
                    Scenario::Delta,
                    &writes_at.to_string(),
                    &target.config,
                    target.users,
                )?);
                let addresses = u32::try_from(target.users.div_ceil(per_address))?;
                let plan = events::Plan {
                    streams_at: target.addr,
                    writes_at,
                    streams: target.users,
                    sources: (0..addresses)
                        .map(|n| Ipv4Addr::from(u32::from(first_source) + n).into())
                        .collect(),
                    per_address,
                    writes,
                    rate,
                };
                events::run(requests, plan).await
            }
            Command::Metric { addr, name } => {
                println!("{}", metric(addr, &name).await?);
                Ok(())
            }
            Command::UserDay { .. } => unreachable!("run before the runtime starts"),
        }
    })
}

/// The value of the unlabelled sample `name` in the `/metrics` of the server at `addr`.
async fn metric(addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let mut sender = load::connect(addr).await?;
    let request = hyper::Request::get("/metrics")
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        bail!("{addr}/metrics answered {}", response.status());
    }
    let text = String::from_utf8(response.into_body().collect().await?.to_bytes().to_vec())?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("{addr}/metrics has no sample {name}"))
}

/// One balance push and one profile push per user, 32 users at a time.
async fn prepare(target: &Target) -> anyhow::Result<()> {
    let requests = Requests::new(Scenario::Push, &target.addr.to_string(), &target.config, target.users)?;
    let requests = Arc::new(requests);
    let tasks: Vec<_> = (0..32)
        .map(|lane| {
            let (requests, addr, users) = (requests.clone(), target.addr, target.users);
            tokio::spawn(async move {
                let mut sender = load::connect(addr).await?;
                for user in (lane..users).step_by(32) {
                    for request in requests.seed(user) {
                        sender.ready().await?;
                        let response = sender.send_request(request).await?;
                        let status = response.status();
                        let body = response.into_body().collect().await?.to_bytes();
                        if !status.is_success() {
                            bail!("seeding user {user} failed: {status} {}", String::from_utf8_lossy(&body));
                        }
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    println!("{{\"users\":{}}}", target.users);
    Ok(())
}

#[derive(Serialize)]
struct Memory {
    connections: usize,
    vm_rss_kib: u64,
    vm_hwm_kib: u64,
}

async fn idle(target: &Target, connections: usize, pid: u32) -> anyhow::Result<()> {
    let requests = target.requests(Scenario::Timestamp)?;
    let mut open = Vec::with_capacity(connections);
    for conn in 0..connections {
        let mut sender = load::connect(target.addr).await.with_context(|| format!("connection {conn}"))?;
        sender.ready().await?;
        let response = sender.send_request(requests.build(conn, 0)).await?;
        let status = response.status();
        response.into_body().collect().await?;
        if !status.is_success() {
            bail!("connection {conn}: the server answered {status}");
        }
        open.push(sender);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still_open = open.iter().filter(|s| !s.is_closed()).count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read the memory of process {pid}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
        Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
    };
    let memory =
        Memory { connections: still_open, vm_rss_kib: field("VmRSS:")?, vm_hwm_kib: field("VmHWM:")? };
    println!("{}", serde_json::to_string(&memory)?);
    Ok(())
}
