//! One helper per boundary for the hub's HTTP tests: [`TestHub`] starts the real hub on
//! `127.0.0.1:0` over a real SQLite file in a temporary directory, [`Deployment`] runs the
//! real `hub` binary (to kill it, restart it, or watch its memory), and [`SiteClient`]
//! talks to either the way a site's page does, with a token the site minted.

#![allow(dead_code)]

pub mod agent;
pub mod authority;
pub mod certs;
pub mod crash;
pub mod events;
pub mod feed;
pub mod nginx;
pub mod postgres;
pub mod receiver;
pub mod store;
pub mod webhooks;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hub::App;
use hub::auth::Keys;
use hub::config::{Config, Site};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The demo sites every test hub knows, each with its own HS256 secret and origin.
pub const SITES: [(&str, &str); 3] = [
    ("roflfaucet", "https://roflfaucet.com"),
    ("clickforcharity", "https://clickforcharity.net"),
    ("wrc", "https://wrc.org"),
];

pub fn site_secret(site: &str) -> String {
    format!("{site}-test-secret-that-is-at-least-32-bytes-long")
}

/// A hub's configuration for tests: the three sites, the given data dir. Every site is
/// trusted with everything — every scope, admin tokens, no practical credit ceiling — as a
/// hub whose sites' own backends write every kind of record: most tests are about the API's
/// rules, not about who may use them. `tests/authority.rs` starts from the default policies.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    Config {
        hub_id: "test-hub".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        sites: SITES.iter().map(|(id, origin)| trusted_site(id, origin)).collect(),
        ..Config::default()
    }
}

/// A site with the test secret for `id`, allowed to sign everything.
pub fn trusted_site(id: &str, origin: &str) -> Site {
    Site {
        origins: vec![origin.into()],
        secret: Some(site_secret(id)),
        admin: true,
        scopes: protocol::Scopes::ALL.iter().map(|s| s.as_str().to_owned()).collect(),
        max_credit_per_op: protocol::MAX_AMOUNT,
        max_credits_per_user_per_day: protocol::MAX_AMOUNT,
        ..Site::new(id)
    }
}

/// A token of `site`'s backend for `user`: every scope the site may sign.
pub fn backend_token(keys: &Keys, site: &str, user: &str, ttl_secs: u64) -> String {
    keys.mint_scoped(site, user, ttl_secs, keys.signable(site).expect("a configured site"), false).unwrap()
}

/// A running hub.
pub struct TestHub {
    pub url: String,
    pub app: App,
    pub dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    /// Starts a hub whose configuration `tweak` may change first.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tweak(&mut config);
        Self::serve(App::open(config).unwrap(), dir).await
    }

    /// Starts the test hub over `store`, a store the test opened itself (with a clock it
    /// sets, say), whatever its backend.
    pub async fn over(
        store: std::sync::Arc<dyn hub::store::Store>,
        tweak: impl FnOnce(&mut Config),
    ) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let metrics =
            hub::metrics::Metrics::new(config.sites.iter().map(|s| s.id.as_str()), hub::time::now_ms());
        Self::serve(App::with_store(config, store, metrics).unwrap(), dir).await
    }

    /// Serves `app`, which the test opened itself (with the variables its configuration names
    /// set, say); `dir` is kept as long as the hub.
    pub async fn serve(app: App, dir: TempDir) -> TestHub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if app.tls().is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let app = app.clone();
            async move {
                hub::serve(listener, app, async {
                    let _ = stop.await;
                })
                .await
                .unwrap();
            }
        });
        TestHub { url, app, dir, shutdown: Some(shutdown), task: Some(task) }
    }

    /// A page's token, as `site`'s backend would mint it for `user` (no scope: the page set).
    pub fn token(&self, site: &str, user: &str) -> String {
        self.app.sites().keys().expect("auth is on").mint(site, user, 600).unwrap()
    }

    /// A token of `site`'s backend itself: every scope the site may sign.
    pub fn backend_token(&self, site: &str, user: &str) -> String {
        backend_token(self.app.sites().keys().expect("auth is on"), site, user, 600)
    }

    /// An admin token with every scope the site may sign.
    pub fn admin_token(&self, site: &str, user: &str) -> String {
        let sites = self.app.sites();
        let keys = sites.keys().expect("auth is on");
        keys.mint_scoped(site, user, 600, keys.signable(site).unwrap(), true).unwrap()
    }

    /// A grant of `site`'s backend for one credit of `user`'s `data_type`.
    pub fn grant(&self, site: &str, user: &str, op_id: &str, data_type: &str, delta: Value) -> String {
        let Value::Object(delta) = delta else { panic!("a grant's delta is an object") };
        self.app
            .sites()
            .keys()
            .expect("auth is on")
            .mint_grant(site, user, op_id, data_type, delta, 300)
            .unwrap()
    }

    /// `site`'s backend, signed in as `user` with every scope the site may sign: what most
    /// tests of the API's rules use, since a page's token may neither credit nor set amounts.
    pub fn site(&self, site: &str, user: &str) -> SiteClient {
        let token = self.app.sites().keys().map(|_| self.backend_token(site, user));
        SiteClient { url: self.url.clone(), client: client(), token, site: site.into(), user: user.into() }
    }

    /// A page of `site` signed in as `user`, with a page's token.
    pub fn page(&self, site: &str, user: &str) -> SiteClient {
        let token = self.app.sites().keys().map(|_| self.token(site, user));
        SiteClient { url: self.url.clone(), client: client(), token, site: site.into(), user: user.into() }
    }

    /// A bare request to `path` (e.g. `/api/sync.php?...`), with no token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        client().request(method, format!("{}{path}", self.url))
    }

    /// Every stored row (records, remembered ops, ledger) as text: equal snapshots mean
    /// nothing was stored in between.
    pub fn snapshot(&self) -> Vec<String> {
        snapshot(self.dir.path())
    }

    /// Stops accepting, finishes in-flight requests, closes the store.
    pub async fn stop(mut self) -> TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        self.dir
    }
}

/// The real `hub` binary, killed when dropped, reading no stdin and none of the `HUB_*`
/// variables of the environment the tests run in: only what the test passes configures it.
pub fn hub_command() -> Command {
    apart_from_the_test(Command::new(env!("CARGO_BIN_EXE_hub")))
}

/// `command` without the test's stdin and `HUB_*` variables, killed when dropped.
fn apart_from_the_test(mut command: Command) -> Command {
    command.stdin(Stdio::null()).kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HUB_") {
            command.env_remove(name);
        }
    }
    command
}

/// How long a `hub` process may take to come up before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A raw TCP connection to `addr` from the loopback address `from` (127.0.0.x): another user,
/// for the hub's per-address limits.
pub async fn connect_from(addr: std::net::SocketAddr, from: std::net::Ipv4Addr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), socket.connect(addr))
        .await
        .unwrap_or_else(|_| panic!("{addr} accepted no connection from {from} within a minute"))
        .unwrap()
}

/// A home for the real `hub` binary: config file, data dir, log and port, which outlive
/// each of its processes, so that a hub can be killed and restarted on the same data.
pub struct Deployment {
    pub dir: TempDir,
    pub data_dir: PathBuf,
    pub port: u16,
    /// The sites' keys, to mint tokens as their backends would.
    pub keys: Keys,
    /// Whether the hub serves HTTPS (its configuration names a certificate).
    pub tls: bool,
    /// The hub's `RUST_LOG` (`warn` unless a test reads its `info` lines).
    pub rust_log: &'static str,
    /// The umask the hub starts under, as a unit's `UMask=` sets it; the test's own if `None`.
    pub umask: Option<&'static str>,
}

impl Deployment {
    /// The test configuration (see [`test_config`]) as `tweak` changes it.
    pub fn new(tweak: impl FnOnce(&mut Config)) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let mut config = test_config(&data_dir);
        tweak(&mut config);
        std::fs::write(dir.path().join("hub.toml"), toml::to_string(&config).unwrap()).unwrap();
        let keys = Keys::from_config(&config).unwrap();
        Deployment {
            dir,
            data_dir,
            port: free_port(),
            keys,
            tls: config.tls_files().is_some(),
            rust_log: "warn",
            umask: None,
        }
    }

    /// `127.0.0.1:port`, for raw TCP connections.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    /// The SQLite file every hub process of this deployment uses.
    pub fn database(&self) -> PathBuf {
        self.data_dir.join("hub.sqlite3")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("hub.log")
    }

    /// Everything every hub process of this deployment wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `hub serve` on the deployment's port and data dir, and waits until it answers
    /// `/healthz`. The hub's environment holds no `HUB_*` variable of the test's (the hub
    /// refuses to start on one that names no configuration key).
    pub async fn start(&self) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut command = match self.umask {
            None => hub_command(),
            Some(umask) => {
                let mut shell = Command::new("sh");
                let script = format!("umask {umask} && exec \"$0\" \"$@\"");
                shell.args(["-c", &script, env!("CARGO_BIN_EXE_hub")]);
                apart_from_the_test(shell)
            }
        };
        command
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("hub.toml"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(self.addr())
            .env("RUST_LOG", self.rust_log)
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = command.spawn().unwrap();
        // Only whether it answers: the TLS tests check the certificate themselves.
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .danger_accept_invalid_certs(self.tls)
            .build()
            .unwrap();
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the hub exited ({status}) before answering /healthz; its log:\n{}", self.log());
            }
            let health = probe.get(format!("{}/healthz", self.url())).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return child;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the hub did not answer /healthz within {PATIENCE:?}; its log:\n{}", self.log());
    }

    /// A token of `site`'s backend for `user` (every scope the site may sign), valid for an
    /// hour.
    pub fn token(&self, site: &str, user: &str) -> String {
        backend_token(&self.keys, site, user, 3600)
    }

    /// `site`'s backend signed in as `user`, giving up on an answer after `timeout`.
    pub fn backend(&self, site: &str, user: &str, timeout: Duration) -> SiteClient {
        SiteClient {
            url: self.url(),
            client: reqwest::Client::builder().timeout(timeout).build().unwrap(),
            token: Some(self.token(site, user)),
            site: site.into(),
            user: user.into(),
        }
    }
}

/// Sends SIGHUP to a hub process. `unsafe_code` is forbidden in this workspace, so the
/// signal goes through kill(1) rather than libc.
pub async fn hang_up(hub: &Child) {
    let pid = hub.id().expect("the hub is running").to_string();
    let status = tokio::process::Command::new("kill").args(["-HUP", &pid]).status().await.unwrap();
    assert!(status.success(), "kill -HUP {pid} failed");
}

/// A port nothing listens on right now, to be reused by every restart of one hub.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn snapshot(dir: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(dir.join("hub.sqlite3")).unwrap();
    let mut rows = Vec::new();
    for query in [
        "SELECT user_id || '|' || data_type || '|' || data || '|' || version || '|' || updated_ms || '|' || ifnull(credits, '') FROM records ORDER BY 1",
        "SELECT user_id || '|' || op_id || '|' || fingerprint FROM remembered_ops ORDER BY 1",
        "SELECT user_id || '|' || data_type || '|' || ifnull(op_id, '') || '|' || delta || '|' || result FROM ledger ORDER BY id",
    ] {
        let mut stmt = conn.prepare(query).unwrap();
        rows.extend(stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap));
    }
    rows
}

/// The value of the `/metrics` sample named `series` (`name{labels}`), if `text` has it.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// An answer: status, headers and the body parsed as JSON (`Null` when empty).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub len: usize,
}

impl Reply {
    pub async fn from(response: reqwest::Response) -> Reply {
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        Reply { status, headers, body, len: bytes.len() }
    }

    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a refusal with this status and code.
    #[track_caller]
    pub fn assert_refused(&self, status: u16, code: &str) {
        assert_eq!((self.status.as_u16(), self.code()), (status, code), "body: {}", self.body);
        assert_eq!(self.body["success"], false);
        assert!(self.body["error"].as_str().is_some_and(|e| !e.is_empty()), "no message: {}", self.body);
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.body);
        assert_eq!(self.body["success"], true);
        &self.body
    }
}

/// A page of one site, signed in as one user.
#[derive(Clone)]
pub struct SiteClient {
    pub url: String,
    pub client: reqwest::Client,
    /// `None` when the hub runs with auth off.
    pub token: Option<String>,
    pub site: String,
    pub user: String,
}

impl SiteClient {
    fn authorized(&self, builder: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    pub async fn query(&self, action: &str, types: &str) -> Reply {
        let url =
            format!("{}/api/sync.php?action={action}&user_id={}&data_type={types}", self.url, self.user);
        Reply::from(self.authorized(self.client.get(url)).send().await.unwrap()).await
    }

    pub async fn timestamp(&self, types: &str) -> Reply {
        self.query("timestamp", types).await
    }

    pub async fn get(&self, types: &str) -> Reply {
        self.query("get", types).await
    }

    /// POSTs `body` as JSON.
    pub async fn post(&self, body: &Value) -> Reply {
        let request = self.client.post(format!("{}/api/sync.php", self.url)).json(body);
        Reply::from(self.authorized(request).send().await.unwrap()).await
    }

    pub async fn push(&self, data_type: &str, data: Value) -> Reply {
        self.post(&json!({
            "action": "push", "user_id": self.user, "site_id": self.site, "data_type": data_type, "data": data,
        }))
        .await
    }

    pub async fn delta(&self, data_type: &str, amount: i64, op_id: &str) -> Reply {
        let field = if data_type == "points" { "points" } else { "coins" };
        self.post(&json!({
            "action": "delta", "user_id": self.user, "site_id": self.site, "data_type": data_type,
            "delta": { field: amount }, "op_id": op_id,
        }))
        .await
    }

    /// A delta carrying `grant`, the credit's permission from the site's backend.
    pub async fn delta_with_grant(&self, data_type: &str, amount: i64, op_id: &str, grant: &str) -> Reply {
        let field = if data_type == "points" { "points" } else { "coins" };
        self.post(&json!({
            "action": "delta", "user_id": self.user, "site_id": self.site, "data_type": data_type,
            "delta": { field: amount }, "op_id": op_id, "grant": grant,
        }))
        .await
    }

    /// The user's coins as the hub has them now.
    pub async fn coins(&self) -> i64 {
        self.get("balance").await.assert_ok()["data"]["coins"].as_i64().unwrap()
    }
}
