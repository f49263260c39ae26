//! `cargo xtask demo`: builds the package and the hub (release), starts the hub with the
//! development sites and its data in `./hub-data`, and serves the two demo sites — ROFLFaucet
//! from `www/faucet/` and Click for Charity from `www/charity/` — on their own origins with
//! their own small backends (see `sites`), which sign the pages' tokens and decide their
//! credits. Runs until Ctrl-C (or SIGTERM, SIGHUP), then stops
//! the sites and the hub and waits for the hub to finish; stops everything if the hub exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tokio::process::Child;

use crate::process::{command, root, shown, step, target_dir};
use crate::sites::{self, Secret, Setup, Site, SiteKind};

const USER: &str = "8-evans";
/// The sites' backends' own secret, beside the hub's development keys in the data dir.
const BACKENDS_SECRET_FILE: &str = "demo-backends.key";
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
    step("cargo", &["build", "--release", "-p", "hub"])?;

    // Loaded as the hub loads it, so both sides read the same keys; loading first also
    // creates the development keys, which the hub then reads.
    let mut config = hub::config::Config::load(None)?;
    config.data_dir = root().join(&args.data_dir);
    let config = config.with_dev_sites()?;
    let keys = Arc::new(hub::auth::Keys::from_config(&config)?);
    let secret = Secret::load_or_create(&config.data_dir.join(BACKENDS_SECRET_FILE))?;

    let sites = [
        Site {
            id: "roflfaucet",
            name: "ROFLFaucet",
            folder: "faucet",
            port: args.faucet_port,
            kind: SiteKind::Faucet,
        },
        Site {
            id: "clickforcharity",
            name: "Click for Charity",
            folder: "charity",
            port: args.charity_port,
            kind: SiteKind::Charity,
        },
    ];
    let hub_addr = SocketAddr::from(([127, 0, 0, 1], args.hub_port));
    let setup = Setup {
        hub_url: format!("http://{hub_addr}"),
        keys: Arc::clone(&keys),
        secret,
        claim_every_secs: args.claim_every_secs,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let running = sites::start(&sites, &setup).await?;
        let outcome = run_hub(&args, hub_addr, &sites, &keys).await;
        running.stop().await?;
        outcome
    })
}

/// Starts the hub, tells how to use the demo once it accepts connections, and waits for it
/// to exit: on its own, or after an interrupt, which it is passed on.
async fn run_hub(
    args: &Args,
    addr: SocketAddr,
    sites: &[Site],
    keys: &hub::auth::Keys,
) -> anyhow::Result<()> {
    let hub = target_dir().join("release").join("hub");
    let hub = hub.to_str().context("the target directory's path is not UTF-8")?;
    let listen = addr.to_string();
    let serve = ["serve", "--dev", "--data-dir", &args.data_dir, "--listen", &listen];
    // Shown relative to the workspace root, where every command runs.
    let shown_hub = hub.strip_prefix(&format!("{}/", root().display())).unwrap_or(hub);
    println!("==> {}", shown(shown_hub, &serve));
    let mut child = tokio::process::Command::from(command(hub, &serve))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {hub}"))?;

    let status = tokio::select! {
        ready = accepting(addr) => {
            ready?;
            print_guide(addr, sites, &args.data_dir, keys)?;
            tokio::select! {
                status = child.wait() => status?,
                () = interrupted() => stop(&mut child).await?,
            }
        }
        status = child.wait() => status?,
        () = interrupted() => stop(&mut child).await?,
    };
    if !status.success() {
        bail!("the hub exited with {status}");
    }
    println!("==> the demo stopped");
    Ok(())
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
/// but a signal aimed at xtask alone would otherwise leave the hub running, orphaned.
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

/// Interrupts the hub, which shuts down gracefully, and waits for it.
async fn stop(child: &mut Child) -> anyhow::Result<std::process::ExitStatus> {
    println!("==> stopping the demo");
    if let Some(pid) = child.id() {
        // The hub treats a second interrupt like the first; `kill` fails harmlessly if it is gone.
        let _ = command("kill", &["-INT", &pid.to_string()]).status();
    }
    Ok(child.wait().await?)
}

fn print_guide(
    hub: SocketAddr,
    sites: &[Site],
    data_dir: &str,
    keys: &hub::auth::Keys,
) -> anyhow::Result<()> {
    let url = format!("http://{hub}");
    let scopes = keys.signable(sites[0].id).context("the demo's sites are configured")?;
    let token = keys.mint_scoped(sites[0].id, USER, 3600, scopes, false)?;
    let op_id = format!(
        "demo-{}",
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default()
    );
    let site_lines: String =
        sites.iter().map(|s| format!("  {:<18} {}/   (site {})\n", s.name, s.url(), s.id)).collect();
    println!(
        r#"
The demo is running:

  Hub                {url}/api/sync   (health at {url}/healthz)
  Dashboard          {url}/dashboard/   (metrics for Prometheus at {url}/metrics)
{site_lines}
Open both sites, earn coins on one, then come back to the other tab: it shows them. Each
site's backend signs a token for the signed-in user at /api/token?user=ID with the site's key
from {data_dir}/dev-sites.toml; the browser never sees a key. What a user earns, the site's
backend decides and grants (the faucet's claims and dice, the charity's clicks); the page
only passes the grant on. {faucet_name}'s grant for {USER}'s free claim:

  curl -s -X POST '{faucet}/api/claim?user={USER}'

Or talk to the hub directly, as {site}'s backend for {USER} (the token is valid for an hour
and holds every scope the site may sign; a page's token could not credit):

  curl -s -H 'Authorization: Bearer {token}' '{url}/api/sync?action=timestamp&user_id={USER}&data_type=balance,profile,roles'

  curl -s -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{"action":"delta","user_id":"{USER}","site_id":"{site}","data_type":"balance","delta":{{"coins":10}},"op_id":"{op_id}","reason":"demo"}}' {url}/api/sync

Ctrl-C stops everything.
"#,
        site = sites[0].id,
        faucet = sites[0].url(),
        faucet_name = sites[0].name,
    );
    Ok(())
}
