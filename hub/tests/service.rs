//! The real `hub serve` as systemd runs it: readiness and stopping told through
//! `$NOTIFY_SOCKET` (`Type=notify`), the drain a load balancer needs before a stop, and the
//! modes of the data dir and database it creates.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::json;
use support::{Deployment, PATIENCE, Reply};
use tempfile::TempDir;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

/// What systemd listens on for a `Type=notify` service: a datagram socket whose path the
/// service finds in `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        NotifySocket { socket: UnixDatagram::bind(&path).unwrap(), path, _dir: dir }
    }

    /// The next message the hub sent, one `NAME=value` per line.
    async fn next(&self, hub: &Deployment) -> String {
        let mut buf = vec![0u8; 4096];
        let received = tokio::time::timeout(PATIENCE, self.socket.recv(&mut buf)).await;
        let n = received
            .unwrap_or_else(|_| panic!("no notification within {PATIENCE:?}; the hub's log:\n{}", hub.log()))
            .unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// Messages sent and not yet read; only meaningful once the sender has exited.
    fn unread(&self) -> Vec<String> {
        let mut buf = vec![0u8; 4096];
        std::iter::from_fn(|| {
            let n = self.socket.try_recv(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .collect()
    }
}

/// Starts `hub serve` for `hub` under umask 022 — what a shell usually has, which would leave
/// a new file readable by all — telling `notify` when it is ready.
fn spawn(hub: &Deployment, notify: &NotifySocket) -> Child {
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(hub.dir.path().join("hub.log")).unwrap();
    let mut command = Command::new("sh");
    command
        .args(["-c", "umask 022 && exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_hub"), "serve", "--config"])
        .arg(hub.dir.path().join("hub.toml"))
        .arg("--data-dir")
        .arg(&hub.data_dir)
        .arg("--listen")
        .arg(hub.addr())
        .env("NOTIFY_SOCKET", &notify.path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HUB_") {
            command.env_remove(name);
        }
    }
    command.spawn().unwrap()
}

/// Starts the hub and waits for it to say it is ready, as systemd does.
async fn start(hub: &Deployment, notify: &NotifySocket) -> Child {
    let child = spawn(hub, notify);
    let ready = notify.next(hub).await;
    assert!(ready.lines().any(|l| l == "READY=1"), "the first notification is not READY=1: {ready:?}");
    child
}

/// Sends `signal` (TERM, INT) to the hub: kill(1), since this workspace forbids unsafe code.
async fn send(hub: &Child, signal: &str) {
    let pid = hub.id().expect("the hub is running").to_string();
    let status = Command::new("kill").args([&format!("-{signal}"), &pid]).status().await.unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

async fn exits(hub: &mut Child, deployment: &Deployment) -> ExitStatus {
    tokio::time::timeout(PATIENCE, hub.wait())
        .await
        .unwrap_or_else(|_| {
            panic!("the hub did not exit within {PATIENCE:?}; its log:\n{}", deployment.log())
        })
        .unwrap()
}

async fn healthz(hub: &Deployment) -> Reply {
    Reply::from(support::client().get(format!("{}/healthz", hub.url())).send().await.unwrap()).await
}

async fn port_is_closed(hub: &Deployment) -> bool {
    tokio::net::TcpStream::connect(hub.addr()).await.is_err()
}

/// The file's permission bits, in octal as `chmod` takes them.
fn mode(path: &Path) -> String {
    let metadata = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    format!("{:o}", metadata.permissions().mode() & 0o777)
}

#[tokio::test]
async fn ready_is_told_once_the_port_answers_and_stopping_at_sigterm() {
    let hub = Deployment::new(|_| {});
    let notify = NotifySocket::new();
    let mut child = spawn(&hub, &notify);
    let ready = notify.next(&hub).await;
    assert_eq!(
        ready.lines().collect::<Vec<_>>(),
        ["READY=1", &format!("STATUS=serving on {}", hub.url())],
        "{ready:?}"
    );
    // Told ready, the hub answers at once: no retry.
    let health = healthz(&hub).await;
    assert_eq!(health.body["status"], "ok", "{health:?}");

    send(&child, "TERM").await;
    let stopping = notify.next(&hub).await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let extend = stopping.lines().find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC=")).map(str::parse::<u64>);
    assert!(
        extend.is_some_and(|usec| usec.unwrap() >= 10_000_000),
        "the stop asks for the in-flight requests' 10 s grace: {stopping:?}"
    );
    assert!(exits(&mut child, &hub).await.success(), "{}", hub.log());
}

#[tokio::test]
async fn a_hub_that_cannot_start_exits_without_telling_ready() {
    let invalid = Deployment::new(|config| config.limits.op_retention_days = 1);
    // A port another process holds.
    let busy = Deployment::new(|_| {});
    let _holder = std::net::TcpListener::bind(busy.addr()).unwrap();
    let busy_addr = busy.addr();
    for (hub, says) in [(&invalid, "op_retention_days must be at least 7"), (&busy, busy_addr.as_str())] {
        let notify = NotifySocket::new();
        let mut child = spawn(hub, &notify);
        let status = exits(&mut child, hub).await;
        assert!(!status.success(), "{}", hub.log());
        assert!(hub.log().contains(says), "the log names {says:?}:\n{}", hub.log());
        assert_eq!(notify.unread(), Vec::<String>::new(), "{}", hub.log());
    }
}

#[tokio::test]
async fn while_draining_healthz_is_503_and_requests_are_served_until_a_second_sigterm() {
    let hub = Deployment::new(|config| config.drain_secs = 3600);
    let notify = NotifySocket::new();
    let mut child = start(&hub, &notify).await;
    let page = hub.backend("roflfaucet", "8-evans", Duration::from_secs(30));
    page.push("profile", json!({"bio": "before"})).await.assert_ok();

    send(&child, "TERM").await;
    let stopping = notify.next(&hub).await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let extend = stopping.lines().find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC=")).unwrap();
    assert!(extend.parse::<u64>().unwrap() > 3_600_000_000, "the stop asks for the drain: {extend}");
    let health = healthz(&hub).await;
    assert_eq!(
        (health.status.as_u16(), &health.body),
        (503, &json!({"success": false, "status": "draining"}))
    );

    // A new connection, a write and a read: served as before.
    let fresh = hub.backend("roflfaucet", "8-evans", Duration::from_secs(30));
    fresh.push("profile", json!({"bio": "while draining"})).await.assert_ok();
    assert_eq!(fresh.get("profile").await.assert_ok()["data"]["bio"], "while draining");
    assert!(child.try_wait().unwrap().is_none(), "the hub stopped during its drain:\n{}", hub.log());

    send(&child, "TERM").await;
    assert!(exits(&mut child, &hub).await.success(), "{}", hub.log());
    assert!(port_is_closed(&hub).await);
    assert!(hub.log().contains("SIGTERM: stopping before the drain's end"), "{}", hub.log());
}

#[tokio::test]
async fn after_its_drain_the_hub_stops_by_itself() {
    let hub = Deployment::new(|config| config.drain_secs = 1);
    let notify = NotifySocket::new();
    let mut child = start(&hub, &notify).await;
    send(&child, "INT").await;
    assert!(exits(&mut child, &hub).await.success(), "{}", hub.log());
    assert!(port_is_closed(&hub).await);
    let log = hub.log();
    let drained = log.find("drained").unwrap_or_else(|| panic!("no drain in the log:\n{log}"));
    assert!(log[drained..].contains("store closed"), "{log}");
}

#[tokio::test]
async fn the_data_dir_and_database_it_creates_are_its_users_alone() {
    let hub = Deployment::new(|_| {});
    assert!(!hub.data_dir.exists());
    let notify = NotifySocket::new();
    let mut child = start(&hub, &notify).await;
    hub.backend("roflfaucet", "8-evans", Duration::from_secs(30))
        .push("profile", json!({"bio": "x"}))
        .await
        .assert_ok();
    assert_eq!(mode(&hub.data_dir), "700");
    for file in ["hub.sqlite3", "hub.sqlite3-wal", "hub.sqlite3-shm"] {
        assert_eq!(mode(&hub.data_dir.join(file)), "600", "{file}");
    }
    send(&child, "TERM").await;
    assert!(exits(&mut child, &hub).await.success(), "{}", hub.log());
}
