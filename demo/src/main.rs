//! `demo-sites`: the two demo sites of `cargo xtask demo` — ROFLFaucet from `www/faucet/` and
//! Click for Charity from `www/charity/` — each on its own origin with its own small backend
//! (see `sites`), which signs its pages' tokens with the site's development key and decides
//! their credits. Reads the keys the hub keeps in its data dir in development mode (`hub
//! serve --dev`, started first), prints how to use the demo once both sites serve, and runs
//! until SIGINT or SIGTERM. Starts no hub: `cargo xtask demo` starts both and stops both.

mod sites;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use hub::auth::Keys;
use hub::config::Config;

use crate::sites::{Secret, Setup, Site, SiteKind};

/// The user the guide's commands speak for.
const USER: &str = "8-evans";
/// The sites' backends' own secret, beside the hub's development keys in the data dir.
const BACKENDS_SECRET_FILE: &str = "demo-backends.key";

#[derive(Parser)]
#[command(name = "demo-sites", about = "The demo sites and their backends, beside a development hub")]
struct Args {
    /// The hub's base URL, as the pages and the backends reach it.
    #[arg(long, default_value = "http://127.0.0.1:8787")]
    hub_url: String,
    /// Port of the faucet site (roflfaucet) on 127.0.0.1.
    #[arg(long, default_value_t = 8801)]
    faucet_port: u16,
    /// Port of the charity site (clickforcharity) on 127.0.0.1.
    #[arg(long, default_value_t = 8802)]
    charity_port: u16,
    /// The hub's data directory, where its development keys are.
    #[arg(long, default_value = "./hub-data")]
    data_dir: PathBuf,
    /// How often a user may claim free coins on the faucet, in seconds (at most a day).
    #[arg(long, default_value_t = 30)]
    claim_every_secs: u64,
}

/// The workspace root, whose `www/` and `pkg/` the sites serve.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("demo/ lives inside the workspace")
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-sites: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Loaded as the hub loads it, so both sides read the same keys.
    let mut config = Config::load(None)?;
    config.data_dir.clone_from(&args.data_dir);
    let config = config.with_dev_sites()?;
    let keys = Arc::new(Keys::from_config(&config)?);
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
    let setup = Setup {
        hub_url: args.hub_url.clone(),
        keys: Arc::clone(&keys),
        secret,
        claim_every_secs: args.claim_every_secs,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let running = sites::start(&sites, &setup).await?;
        print_guide(&args, &sites, &keys)?;
        stopped().await;
        running.stop().await
    })
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn print_guide(args: &Args, sites: &[Site], keys: &Keys) -> anyhow::Result<()> {
    let url = &args.hub_url;
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
        data_dir = args.data_dir.display(),
        site = sites[0].id,
        faucet = sites[0].url(),
        faucet_name = sites[0].name,
    );
    Ok(())
}
