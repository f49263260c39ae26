//! `cargo xtask demo`: builds the package, the hub and the demo sites (release), starts the
//! hub with the development sites and its data in `./hub-data`, then the two demo sites
//! (`demo-sites`, the `demo/` crate: ROFLFaucet and Click for Charity, each on its own origin
//! with its own backend), which print how to use the demo. Runs until Ctrl-C (or SIGTERM,
//! SIGHUP), then stops the sites and the hub and waits for both; stops everything if either
//! exits.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::Child;

use crate::process::{command, root, shown, step, target_dir};

/// How long the hub may take to accept connections after it starts.
const HUB_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the demo listens; tests pick free ports.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Port of the hub on 127.0.0.1.
    #[arg(long, env = "DEMO_HUB_PORT", default_value_t = 8787)]
    hub_port: u16,
    /// Port of the faucet site (roflfaucet) on 127.0.0.1.
    #[arg(long, env = "DEMO_FAUCET_PORT", default_value_t = 8801)]
    faucet_port: u16,
    /// Port of the charity site (clickforcharity) on 127.0.0.1.
    #[arg(long, env = "DEMO_CHARITY_PORT", default_value_t = 8802)]
    charity_port: u16,
    /// The hub's data directory (database and development keys), relative to the workspace.
    #[arg(long, env = "DEMO_DATA_DIR", default_value = "./hub-data")]
    data_dir: String,
    /// How often a user may claim free coins on the faucet, in seconds.
    #[arg(long, env = "DEMO_CLAIM_EVERY_SECS", default_value_t = 30)]
    claim_every_secs: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::prereq::ensure(crate::prereq::FOR_DEMO)?;
    println!("==> cargo xtask build-pkg");
    crate::build_pkg::run()?;
    step("cargo", &["build", "--release", "-p", "hub", "-p", "demo-sites"])?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run_demo(&args))
}

/// What ended the demo.
enum Ended {
    Interrupted,
    Hub(std::process::ExitStatus),
    Sites(std::process::ExitStatus),
}

/// Starts the hub, then, once it accepts connections, the sites (which read the development
/// keys the hub made); waits for an interrupt, which they are passed on, or for either to
/// exit, and stops the other.
async fn run_demo(args: &Args) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], args.hub_port));
    let listen = addr.to_string();
    let mut hub = start("hub", &["serve", "--dev", "--data-dir", &args.data_dir, "--listen", &listen])?;
    tokio::select! {
        ready = accepting(addr) => ready?,
        status = hub.wait() => bail!("the hub exited with {} before it accepted connections", status?),
        () = interrupted() => {
            let status = stop(&mut hub).await?;
            return if status.success() { Ok(()) } else { bail!("the hub exited with {status}") };
        }
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
            stop(&mut hub).await?;
            return Err(e);
        }
    };
    let ended = tokio::select! {
        status = hub.wait() => Ended::Hub(status?),
        status = sites.wait() => Ended::Sites(status?),
        () = interrupted() => Ended::Interrupted,
    };
    println!("==> stopping the demo");
    let sites_status = stop(&mut sites).await?;
    let hub_status = stop(&mut hub).await?;
    match ended {
        Ended::Hub(status) => bail!("the hub exited with {status}"),
        Ended::Sites(status) => bail!("the demo sites exited with {status}"),
        Ended::Interrupted if !hub_status.success() => bail!("the hub exited with {hub_status}"),
        Ended::Interrupted if !sites_status.success() => bail!("the demo sites exited with {sites_status}"),
        Ended::Interrupted => {
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

/// Waits until something accepts connections at `addr`.
async fn accepting(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + HUB_START_TIMEOUT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("the hub did not accept connections on {addr} within {HUB_START_TIMEOUT:?}");
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

/// Interrupts a child (the hub or the sites), which shuts down gracefully, and waits for it;
/// a child that already exited is only waited for.
async fn stop(child: &mut Child) -> anyhow::Result<std::process::ExitStatus> {
    if let Some(pid) = child.id() {
        // Each treats a second interrupt like the first; `kill` fails harmlessly if it is gone.
        let _ = command("kill", &["-INT", &pid.to_string()]).status();
    }
    Ok(child.wait().await?)
}
