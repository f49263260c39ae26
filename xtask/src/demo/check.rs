//! `cargo xtask demo --check`: once the demo runs, tries what a person would try first, through
//! the hub's port, and lets the demo stop — a smoke test with no one at the keyboard. The
//! faucet's backend signs a page's token; a profile written with it is read back. With
//! `--postgres` the read must be answered by the other instance than the write (nginx names
//! each in its answer), so the record went through the database they share. Speaks HTTP
//! through curl, as the demo's guide does; changes no user but one of its own.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::postgres::INSTANCE_HEADER;
use super::{Args, accepting};
use crate::process::command;

/// Reads through nginx before the other instance must have answered one: it takes them in
/// turn, so the first read after the write should already be the other's.
const READS: usize = 4;

pub async fn run(args: &Args, hub_url: &str) -> anyhow::Result<()> {
    let faucet = SocketAddr::from(([127, 0, 0, 1], args.faucet_port));
    accepting("the faucet", faucet).await?;
    accepting("the charity site", SocketAddr::from(([127, 0, 0, 1], args.charity_port))).await?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    let user = format!("demo-check-{now}");

    let token = curl(&[&format!("http://{faucet}/api/token?user={user}")]).await?.body;
    println!("==> check: the faucet's backend signed a page's token for {user}");
    let authorization = format!("Authorization: Bearer {}", token.trim());
    let bio = format!("checked at {now}");
    let push = json!({
        "action": "push", "user_id": user, "site_id": "roflfaucet",
        "data_type": "profile", "data": { "bio": bio },
    });
    let sync = format!("{hub_url}/api/sync");
    let written =
        curl(&["-H", &authorization, "-H", "Content-Type: application/json", "-d", &push.to_string(), &sync])
            .await?;
    let version = written.json()?["version"].clone();
    let writer = written.instance();
    println!("==> check: a profile pushed through {hub_url}: version {version}, answered by {writer}");

    let get = format!("{sync}?action=get&user_id={user}&data_type=profile");
    for _ in 0..READS {
        let read = curl(&["-H", &authorization, &get]).await?;
        let answer = read.json()?;
        let reader = read.instance();
        if answer["data"]["bio"] != bio || answer["version"] != version {
            bail!("{reader} answered the profile just written (version {version}) with {answer}");
        }
        if !args.postgres || reader != writer {
            println!("==> check: the same profile read back through {hub_url}, answered by {reader}");
            println!("==> check passed");
            return Ok(());
        }
    }
    bail!(
        "nginx sent {READS} reads in a row to {writer}, which took the write, rather than to each instance in turn"
    )
}

/// An HTTP answer, as curl received it.
struct Answer {
    status: String,
    /// The header lines, `Name: value`.
    headers: Vec<String>,
    body: String,
}

impl Answer {
    /// The body, which must be a successful answer of the sync API.
    fn json(&self) -> anyhow::Result<Value> {
        let value: Value = serde_json::from_str(&self.body)
            .with_context(|| format!("the hub answered {} with no JSON: {}", self.status, self.body))?;
        if value["success"] != true {
            bail!("the hub answered {}: {}", self.status, self.body);
        }
        Ok(value)
    }

    /// The instance nginx names in its answer, or "the hub" when it names none.
    fn instance(&self) -> String {
        let prefix = format!("{}:", INSTANCE_HEADER.to_ascii_lowercase());
        self.headers
            .iter()
            .find(|line| line.to_ascii_lowercase().starts_with(&prefix))
            .map_or_else(|| "the hub".to_owned(), |line| line[prefix.len()..].trim().to_owned())
    }
}

/// `curl -i` with `args`; fails unless the answer is a 2xx.
async fn curl(args: &[&str]) -> anyhow::Result<Answer> {
    let args = [&["-sS", "-i", "--max-time", "10"], args].concat();
    let url = args.last().copied().unwrap_or_default();
    let out =
        tokio::process::Command::from(command("curl", &args)).output().await.context("cannot start curl")?;
    if !out.status.success() {
        bail!("curl {url} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim_end());
    }
    let text = String::from_utf8(out.stdout).with_context(|| format!("{url} answered with no UTF-8"))?;
    let (head, body) =
        text.split_once("\r\n\r\n").with_context(|| format!("{url} answered no HTTP: {text}"))?;
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_owned();
    if !status.split(' ').nth(1).is_some_and(|code| code.starts_with('2')) {
        bail!("{url} answered {status}: {body}");
    }
    Ok(Answer { status, headers: lines.map(str::to_owned).collect(), body: body.to_owned() })
}
