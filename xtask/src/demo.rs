//! `cargo xtask demo`: builds the hub in release mode and serves it with the development
//! sites on 127.0.0.1:8787, data in `./hub-data`, after printing ready-to-paste curl
//! commands. Stops when the hub stops; Ctrl-C stops the hub, which shuts down gracefully.
//! (The demo sites and the browser client are not built yet.)

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::process::{command, output, root, shown, step, target_dir};

const LISTEN: &str = "127.0.0.1:8787";
const DATA_DIR: &str = "./hub-data";
const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

pub fn run() -> anyhow::Result<()> {
    step("cargo", &["build", "--release", "-p", "hub"])?;
    let hub = target_dir().join("release").join("hub");
    let hub = hub.to_str().context("the target directory's path is not UTF-8")?;
    // Shown relative to the workspace root, where every command runs.
    let shown_hub = hub.strip_prefix(&format!("{}/", root().display())).unwrap_or(hub);

    // Minting first also creates the development sites' keys, which `serve` then reads.
    let mint = ["token", "--dev", "--data-dir", DATA_DIR, "--site", SITE, "--user", USER];
    let token = output(hub, &mint)?.trim().to_owned();
    print_guide(&shown(shown_hub, &mint), &token);

    let serve = ["serve", "--dev", "--data-dir", DATA_DIR, "--listen", LISTEN];
    println!("==> {}", shown(shown_hub, &serve));
    let mut child = command(hub, &serve).spawn().with_context(|| format!("cannot start {hub}"))?;
    pass_interrupts_to(child.id())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("the hub exited with {status}");
    }
    println!("==> the hub stopped");
    Ok(())
}

/// Keeps xtask alive on Ctrl-C (and SIGTERM, SIGHUP) until the hub has shut down, and
/// makes sure the hub hears it: a terminal interrupts the whole process group, but a
/// signal aimed at xtask alone would otherwise leave the hub running, orphaned.
fn pass_interrupts_to(hub: u32) -> anyhow::Result<()> {
    let pid = hub.to_string();
    ctrlc::set_handler(move || {
        // The hub treats a second interrupt like the first; `kill` fails harmlessly if it is gone.
        let _ = command("kill", &["-INT", &pid]).status();
    })
    .context("cannot install the interrupt handler")
}

fn print_guide(mint: &str, token: &str) {
    let url = format!("http://{LISTEN}");
    let op_id = format!(
        "demo-{}",
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default()
    );
    println!(
        r#"
The hub will serve the sync API at {url}/api/sync.php (also {url}/api/sync; health at {url}/healthz).
The development sites and their keys are kept in {DATA_DIR}/dev-sites.toml. The commands below carry a
token for user {USER} on {SITE}, valid for an hour; mint another with
  {mint}

Timestamp check of three records:

  curl -s -H 'Authorization: Bearer {token}' '{url}/api/sync.php?action=timestamp&user_id={USER}&data_type=balance,profile,roles'

Delta push of +10 coins (send it twice: the second answer is "replayed" and the balance moves once):

  curl -s -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{"action":"delta","user_id":"{USER}","site_id":"{SITE}","data_type":"balance","delta":{{"coins":10}},"op_id":"{op_id}","reason":"demo"}}' {url}/api/sync.php

Ctrl-C stops the hub.
"#
    );
}
