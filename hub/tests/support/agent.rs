//! `hub agent`, the real binary, beside a site's folder of balance files ([`Files`]), for the
//! agent's tests: [`Agent`] starts it for a site, reads its log, stops it with SIGTERM or
//! kills it.

use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::test_config;

/// How long anything may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A site's folder of per-user balance files, written the ways a site's backend writes them.
pub struct Files {
    pub dir: TempDir,
}

impl Files {
    pub fn new() -> Files {
        Files { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `<user>.json`.
    pub fn file(&self, user: &str) -> PathBuf {
        self.path(&format!("{user}.json"))
    }

    /// Writes `<user>.json` in place, as PHP's `file_put_contents` does.
    pub fn write(&self, user: &str, coins: i64) {
        let body = json!({ "coins": coins, "last_updated": "2025-11-09 18:45:30" });
        std::fs::write(self.file(user), body.to_string()).unwrap();
    }

    /// Writes a temporary file and renames it over `<user>.json`.
    pub fn replace(&self, user: &str, coins: i64) {
        let tmp = self.path(&format!(".{user}.json.tmp"));
        std::fs::write(&tmp, json!({ "balance": coins.to_string() }).to_string()).unwrap();
        std::fs::rename(tmp, self.file(user)).unwrap();
    }

    /// Adds `change` to the coins `<user>.json` shows and writes it back in place, as a
    /// careful site's PHP does when the user earns or spends: under the file's lock
    /// (`flock($fp, LOCK_EX)`), opening the file again if it was replaced while the lock was
    /// awaited (the agent renames its writes into place), so that no write is lost between the
    /// read and the write.
    pub fn add(&self, user: &str, change: i64) {
        let name = format!("{user}.json");
        let (mut file, bytes) = self.lock(user);
        let coins = hub_agent::balance_file::parse(&name, &bytes).expect("a balance").coins;
        let body = json!({ "coins": coins + change, "last_updated": "2025-11-09 18:45:30" }).to_string();
        file.set_len(0).unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.write_all(body.as_bytes()).unwrap();
    }

    /// `<user>.json`, opened for writing and locked (`flock`, as PHP's `flock()`), and what it
    /// holds; the lock lasts as long as the file is open.
    pub fn lock(&self, user: &str) -> (std::fs::File, Vec<u8>) {
        loop {
            let mut file = std::fs::OpenOptions::new().read(true).write(true).open(self.file(user)).unwrap();
            file.lock().unwrap();
            let (held, now) = (file.metadata().unwrap(), std::fs::metadata(self.file(user)).unwrap());
            if (held.dev(), held.ino()) != (now.dev(), now.ino()) {
                continue;
            }
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).unwrap();
            return (file, bytes);
        }
    }

    /// The coins `<user>.json` shows, if it is there and a balance.
    pub fn coins(&self, user: &str) -> Option<i64> {
        let bytes = std::fs::read(self.file(user)).ok()?;
        hub_agent::balance_file::parse(&format!("{user}.json"), &bytes).ok().map(|b| b.coins)
    }

    /// `<user>.json` as JSON.
    pub fn json(&self, user: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.file(user)).unwrap()).unwrap()
    }

    pub fn state_file(&self) -> PathBuf {
        self.path(hub_agent::STATE_FILE)
    }

    /// The agent's state file as JSON (`null` when there is none).
    pub fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.state_file()).unwrap_or_default()).unwrap_or(Value::Null)
    }
}

/// A running `hub agent`; its log is kept in a file of its own.
pub struct Agent {
    child: Child,
    log_dir: TempDir,
}

impl Agent {
    /// Starts the agent for `site` on `files`, with more arguments, and waits until it has
    /// compared every file with the hub.
    pub async fn start_for(
        site: &str,
        hub_url: &str,
        config: &Path,
        files: &Files,
        more: &[&OsStr],
    ) -> Agent {
        let agent = Agent::spawn_for(site, hub_url, config, files, more);
        agent.wait_for_log("balance files against the hub").await;
        agent
    }

    /// Starts the agent for `site` on `files`, with more arguments, without waiting for
    /// anything.
    pub fn spawn_for(site: &str, hub_url: &str, config: &Path, files: &Files, more: &[&OsStr]) -> Agent {
        let log_dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(log_dir.path().join("agent.log")).unwrap();
        let mut command = super::hub_command();
        command
            .arg("agent")
            .arg("--config")
            .arg(config)
            .arg("--watch")
            .arg(files.dir.path())
            .arg("--site")
            .arg(site)
            .arg("--hub")
            .arg(hub_url)
            .args(more)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        Agent { child: command.spawn().unwrap(), log_dir }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir.path().join("agent.log")).unwrap_or_default()
    }

    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "the agent never logged {needle:?}; its log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts that the agent still runs.
    pub fn assert_running(&mut self) {
        let status = self.child.try_wait().unwrap();
        assert!(status.is_none(), "the agent exited ({status:?}); its log:\n{}", self.log());
    }

    /// Stops the agent with SIGTERM and asserts that it exits cleanly; returns its log.
    pub async fn stop(mut self) -> String {
        self.assert_running();
        let pid = self.child.id().unwrap().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        assert!(sent.success(), "kill -TERM {pid} failed");
        let status =
            tokio::time::timeout(PATIENCE, self.child.wait()).await.expect("the agent stops").unwrap();
        let log = self.log();
        assert!(status.success(), "the agent exited with {status} on SIGTERM; its log:\n{log}");
        assert!(log.contains("agent stopped"), "{log}");
        log
    }

    /// Kills the agent with SIGKILL, wherever it is; returns its log.
    pub async fn kill(mut self) -> String {
        self.assert_running();
        self.child.kill().await.unwrap();
        self.log()
    }
}

/// The hub's configuration as a file, for an agent of a [`super::TestHub`].
pub fn config_file(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("hub.toml");
    std::fs::write(&path, toml::to_string(&test_config(&dir.path().join("unused"))).unwrap()).unwrap();
    path
}
