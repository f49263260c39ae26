//! `cargo xtask demo`: builds the package, the hub and the demo sites (release), starts the
//! hub with the development sites and its data in `./hub-data`, then the two demo sites
//! (`demo-sites`, the `demo/` crate: ROFLFaucet and Click for Charity, each on its own origin
//! with its own backend), which print how to use the demo. Runs until Ctrl-C (or SIGTERM,
//! SIGHUP), then stops the sites and the hub and waits for both; stops everything if either
//! exits. With `--postgres` the hub's port is nginx's, in front of two hub instances on one
//! throwaway PostgreSQL database (`postgres`); with `--check` the demo checks that it answers,
//! and stops (`check`).

mod check;
mod postgres;

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::Child;

use crate::process::{command, root, shown, step, target_dir};

/// How long a server the demo starts may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the demo listens; tests pick free ports.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Port of the hub on 127.0.0.1 (with --postgres, nginx's, in front of the instances).
    #[arg(long, env = "DEMO_HUB_PORT", default_value_t = 8787)]
    hub_port: u16,
    /// Port of the faucet site (roflfaucet) on 127.0.0.1.
    #[arg(long, env = "DEMO_FAUCET_PORT", default_value_t = 8801)]
    faucet_port: u16,
    /// Port of the charity site (clickforcharity) on 127.0.0.1.
    #[arg(long, env = "DEMO_CHARITY_PORT", default_value_t = 8802)]
    charity_port: u16,
    /// The hub's data directory (database and development keys), relative to the workspace.
    /// With --postgres it holds only the keys, which both instances read.
    #[arg(long, env = "DEMO_DATA_DIR", default_value = "./hub-data")]
    data_dir: String,
    /// How often a user may claim free coins on the faucet, in seconds.
    #[arg(long, env = "DEMO_CLAIM_EVERY_SECS", default_value_t = 30)]
    claim_every_secs: u64,
    /// Run two hub instances on one throwaway PostgreSQL database, behind nginx on the hub's
    /// port, which sends requests to each in turn.
    #[arg(long)]
    postgres: bool,
    /// Check that the demo answers (a site's token; a write through the hub's port read back
    /// through it, by the other instance with --postgres), then stop: no one at the keyboard.
    #[arg(long)]
    check: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::prereq::ensure(crate::prereq::FOR_DEMO)?;
    if args.postgres {
        crate::prereq::ensure(crate::prereq::FOR_DEMO_POSTGRES)?;
    }
    if args.check {
        crate::prereq::ensure(crate::prereq::FOR_DEMO_CHECK)?;
    }
    println!("==> cargo xtask build-pkg");
    crate::build_pkg::run()?;
    step("cargo", &["build", "--release", "-p", "hub", "-p", "demo-sites"])?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run_demo(&args))
}

/// What the sites' pages and backends reach on the hub's port.
enum Hub {
    /// One `hub serve`, its SQLite database in the data dir.
    Single(Child),
    /// nginx in front of two `hub serve` instances on one PostgreSQL database.
    Balanced(Box<postgres::Balanced>),
}

impl Hub {
    /// Starts the hub (with `--postgres`, the cluster, the instances and nginx), which then
    /// needs only to accept connections on [`Hub::listening`].
    async fn start(args: &Args, addr: SocketAddr) -> anyhow::Result<Hub> {
        if args.postgres {
            return Ok(Hub::Balanced(Box::new(postgres::Balanced::start(addr, &args.data_dir).await?)));
        }
        let listen = addr.to_string();
        Ok(Hub::Single(start("hub", &["serve", "--dev", "--data-dir", &args.data_dir, "--listen", &listen])?))
    }

    /// What must accept connections before the sites start, and where.
    fn listening(&self, addr: SocketAddr) -> Vec<(String, SocketAddr)> {
        match self {
            Hub::Single(_) => vec![("the hub".to_owned(), addr)],
            Hub::Balanced(balanced) => balanced.listening(),
        }
    }

    /// The first of its processes to exit, named.
    async fn exited(&mut self) -> anyhow::Result<(String, ExitStatus)> {
        match self {
            Hub::Single(hub) => Ok(("the hub".to_owned(), hub.wait().await?)),
            Hub::Balanced(balanced) => balanced.exited().await,
        }
    }

    /// Stops every process it started (and with `--postgres` the cluster, whose directory it
    /// removes); fails naming one that did not exit successfully.
    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Hub::Single(mut hub) => {
                let status = stop(&mut hub).await?;
                if !status.success() {
                    bail!("the hub exited with {status}");
                }
                Ok(())
            }
            Hub::Balanced(balanced) => (*balanced).stop().await,
        }
    }
}

/// What ended the demo.
enum Ended {
    Interrupted,
    /// `--check` ran to its end.
    Checked(anyhow::Result<()>),
    /// A process exited by itself: which one, and how.
    Exited(String, ExitStatus),
}

/// Starts the hub, then, once it accepts connections, the sites (which read the development
/// keys the hub made); waits for an interrupt, which they are passed on, for either to exit,
/// or for `--check` to end, and stops them.
async fn run_demo(args: &Args) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], args.hub_port));
    let mut hub = Hub::start(args, addr).await?;
    let listening = hub.listening(addr);
    tokio::select! {
        ready = all_accepting(&listening) => ready?,
        exited = hub.exited() => {
            let (name, status) = exited?;
            bail!("{name} exited with {status} before it accepted connections");
        }
        () = interrupted() => return hub.stop().await,
    }
    if let Hub::Balanced(balanced) = &hub {
        balanced.describe(&args.data_dir);
    }
    let hub_url = format!("http://{addr}");
    let (faucet_port, charity_port, claim_every_secs) =
        (args.faucet_port.to_string(), args.charity_port.to_string(), args.claim_every_secs.to_string());
    let sites_args = [
        "--hub-url",
        &hub_url,
        "--faucet-port",
        &faucet_port,
        "--charity-port",
        &charity_port,
        "--data-dir",
        &args.data_dir,
        "--claim-every-secs",
        &claim_every_secs,
    ];
    let mut sites = match start("demo-sites", &sites_args) {
        Ok(sites) => sites,
        Err(e) => {
            hub.stop().await?;
            return Err(e);
        }
    };
    let ended = tokio::select! {
        exited = hub.exited() => {
            let (name, status) = exited?;
            Ended::Exited(name, status)
        }
        status = sites.wait() => Ended::Exited("the demo sites".to_owned(), status?),
        () = interrupted() => Ended::Interrupted,
        checked = check::run(args, &hub_url), if args.check => Ended::Checked(checked),
    };
    println!("==> stopping the demo");
    let sites_stopped = stop(&mut sites).await;
    let hub_stopped = hub.stop().await;
    match ended {
        Ended::Exited(name, status) => bail!("{name} exited with {status}"),
        Ended::Checked(Err(e)) => Err(e.context("the demo's check failed")),
        Ended::Interrupted | Ended::Checked(Ok(())) => {
            hub_stopped?;
            let sites_status = sites_stopped?;
            if !sites_status.success() {
                bail!("the demo sites exited with {sites_status}");
            }
            println!("==> the demo stopped");
            Ok(())
        }
    }
}

/// Starts the release build of the workspace's binary `name`, killed if xtask drops it.
fn start(name: &str, args: &[&str]) -> anyhow::Result<Child> {
    let program = target_dir().join("release").join(name);
    let program = program.to_str().context("the target directory's path is not UTF-8")?;
    // Shown relative to the workspace root, where every command runs.
    let shown_program = program.strip_prefix(&format!("{}/", root().display())).unwrap_or(program);
    println!("==> {}", shown(shown_program, args));
    tokio::process::Command::from(command(program, args))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {program}"))
}

/// Waits until each of `servers` (named, for the error) accepts connections at its address.
async fn all_accepting(servers: &[(String, SocketAddr)]) -> anyhow::Result<()> {
    for (name, addr) in servers {
        accepting(name, *addr).await?;
    }
    Ok(())
}

/// Waits until something accepts connections at `addr`; `name` is what should.
async fn accepting(name: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{name} did not accept connections on {addr} within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Completes on Ctrl-C, SIGTERM or SIGHUP. A terminal interrupts the whole process group,
/// but a signal aimed at xtask alone would otherwise leave the hub and the sites running,
/// orphaned.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut hangup)) =
            (signal(SignalKind::terminate()), signal(SignalKind::hangup()))
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = hangup.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Interrupts a child (a hub, nginx or the sites), which shuts down gracefully, and waits for
/// it; a child that already exited is only waited for.
async fn stop(child: &mut Child) -> anyhow::Result<ExitStatus> {
    if let Some(pid) = child.id() {
        // Each treats a second interrupt like the first; `kill` fails harmlessly if it is gone.
        let _ = command("kill", &["-INT", &pid.to_string()]).status();
    }
    Ok(child.wait().await?)
}
