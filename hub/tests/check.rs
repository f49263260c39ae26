//! What each command needs, run on the real binary as an operator would: `hub check` finds
//! every problem a start would meet — one line per item with its fix, exit 1 — and `hub
//! serve` refuses the same before it creates a database, and binds its port before it does
//! either; a reload refuses a mismatched key pair and keeps the sites it has; `hub token`
//! reads only its own site's key; a site given only its private key verifies and mints.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use hub::auth::Keys;
use hub::config::{Config, Site};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand_core::OsRng;
use support::{PATIENCE, test_config};
use tempfile::TempDir;

const SECRET_ENV: &str = "CHECK_TEST_ROFLFAUCET_SECRET";
const METRICS_ENV: &str = "CHECK_TEST_METRICS_TOKEN";

/// An Ed25519 key pair as PEM: (PKCS#8 private key, SPKI public key).
fn ed25519_pems() -> (String, String) {
    let key = SigningKey::generate(&mut OsRng);
    let private = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let public = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    (private, public)
}

/// A self-signed certificate for `localhost` and its key, as PEM.
fn certificate() -> (String, String) {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    (issued.cert.pem(), issued.signing_key.serialize_pem())
}

/// A self-signed certificate for `localhost` as `tweak` makes it, and its key, as PEM.
fn certificate_with(tweak: impl FnOnce(&mut rcgen::CertificateParams)) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    tweak(&mut params);
    let key = rcgen::KeyPair::generate().unwrap();
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// A deployment's configuration as an operator writes it, in a folder of its own: roflfaucet
/// signs with HS256 from `secret_env`, clickforcharity with an Ed25519 pair, wrc with HS256
/// from `secret_file`; HTTPS with a certificate and its key; a metrics token from
/// `token_env`; a data dir not created yet. [`Setup::run`] gives the variables it names.
struct Setup {
    dir: TempDir,
    config: Config,
    env: Vec<(&'static str, String)>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&dir.path().join("data"));
        let (private, public) = ed25519_pems();
        let secret_file = dir.path().join("wrc.secret");
        std::fs::write(&secret_file, format!("{}\n", support::site_secret("wrc"))).unwrap();
        for site in &mut config.sites {
            site.secret = None;
            match site.id.as_str() {
                "roflfaucet" => site.secret_env = Some(SECRET_ENV.into()),
                "clickforcharity" => {
                    site.public_key_pem = Some(public.clone());
                    site.private_key_pem = Some(private.clone());
                }
                _ => site.secret_file = Some(secret_file.clone()),
            }
        }
        let (cert, key) = certificate();
        for (name, pem) in [("cert.pem", cert), ("key.pem", key)] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        config.tls_cert = Some(dir.path().join("cert.pem"));
        config.tls_key = Some(dir.path().join("key.pem"));
        config.metrics.token_env = Some(METRICS_ENV.into());
        let env = vec![
            (SECRET_ENV, support::site_secret("roflfaucet")),
            (METRICS_ENV, "a-metrics-token-for-the-check-tests".to_owned()),
        ];
        Setup { dir, config, env }
    }

    fn site(&mut self, id: &str) -> &mut Site {
        self.config.sites.iter_mut().find(|s| s.id == id).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `hub <args> --config hub.toml` with the variables the setup gives, and none of the
    /// test's `HUB_*`.
    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn command(&self, args: &[&str]) -> Command {
        let config = self.path("hub.toml");
        std::fs::write(&config, toml::to_string(&self.config).unwrap()).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_hub"));
        command.args(args).arg("--config").arg(&config).env("RUST_LOG", "warn");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("HUB_") {
                command.env_remove(name);
            }
        }
        command.envs(self.env.iter().map(|(name, value)| (name, value)));
        command
    }

    /// Runs `hub serve` on `listen`, which must fail to start: a hub that serves instead is
    /// killed after [`PATIENCE`] and fails the test.
    async fn serve_refused(&self, listen: &str) -> Output {
        let mut command = tokio::process::Command::from(self.command(&["serve", "--listen", listen]));
        command.kill_on_drop(true).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let serving = command.spawn().unwrap().wait_with_output();
        let out = tokio::time::timeout(PATIENCE, serving)
            .await
            .unwrap_or_else(|_| panic!("the hub started on {listen} instead of refusing to"))
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        out
    }

    fn without_env(mut self, name: &str) -> Setup {
        self.env.retain(|(n, _)| *n != name);
        self
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `hub check` and asserts that it fails on exactly one item, whose line starts with
/// `fail` and says each of `says`; every other item is ok.
#[track_caller]
fn check_fails(setup: &Setup, fail: &str, says: &[&str]) {
    let out = setup.run(&["check"]);
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{report}{}", stderr(&out));
    let failed: Vec<&str> = report.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(failed.len(), 1, "one problem, one FAIL line:\n{report}");
    assert!(failed[0].starts_with(fail), "{fail}:\n{report}");
    for said in says {
        assert!(failed[0].contains(said), "{said:?}:\n{report}");
    }
    assert!(stderr(&out).contains("1 problem(s); `hub serve` would not start"), "{}", stderr(&out));
}

#[test]
fn check_passes_a_good_configuration_item_by_item_and_writes_nothing() {
    let setup = Setup::new();
    let out = setup.run(&["check"]);
    let report = stdout(&out);
    assert!(out.status.success(), "{report}{}", stderr(&out));
    for line in [
        "ok    settings: hub_id \"test-hub\", listen 127.0.0.1:0, auth on, 3 site(s)",
        "ok    site roflfaucet: verifies tokens signed with HS256 (no kid); `hub token` and `hub agent` can mint",
        "ok    site clickforcharity: verifies tokens signed with EdDSA (no kid); `hub token` and `hub agent` can mint",
        "ok    site wrc: verifies tokens signed with HS256 (no kid)",
        "ok    sites: 3 sites, no two share a key",
        "ok    TLS: certificate",
        "ok    data dir",
        "ok    access log: off",
        "ok    metrics: readable on this machine, and elsewhere with the token",
        "all is well",
    ] {
        assert!(report.lines().any(|l| l.starts_with(line)), "{line:?}:\n{report}");
    }
    assert!(report.contains("does not exist yet; it will be created at start"), "{report}");
    assert!(!setup.path("data").exists(), "hub check created the data dir");
}

#[test]
fn check_refuses_a_private_key_that_is_not_the_pair_of_the_public_key() {
    let mut setup = Setup::new();
    let (stranger, _) = ed25519_pems();
    setup.site("clickforcharity").private_key_pem = Some(stranger);
    check_fails(
        &setup,
        "FAIL  site clickforcharity:",
        &["private_key_pem does not belong to public_key_pem", "401", "openssl pkey -in private.pem -pubout"],
    );
}

#[tokio::test]
async fn a_reload_refuses_a_private_key_that_is_not_the_pair_of_the_public_key() {
    let (private, public) = ed25519_pems();
    let pair = move |site: &mut Site| {
        site.secret = None;
        site.public_key_pem = Some(public);
        site.private_key_pem = Some(private);
    };
    let mut config = None;
    let hub = support::TestHub::start_with(|c| {
        pair(c.sites.iter_mut().find(|s| s.id == "clickforcharity").unwrap());
        config = Some(c.clone());
    })
    .await;
    let mut mismatched = config.unwrap();
    let (stranger, _) = ed25519_pems();
    mismatched.sites.iter_mut().find(|s| s.id == "clickforcharity").unwrap().private_key_pem = Some(stranger);
    let error = format!("{:#}", hub.app.reload_sites(&mismatched).unwrap_err());
    assert!(
        error.contains("site clickforcharity: its key: private_key_pem does not belong to public_key_pem"),
        "{error}"
    );
    // The sites in use stay: the hub still mints with the pair it had, and accepts what it mints.
    hub.page("clickforcharity", "8-evans").timestamp("balance").await.assert_ok();
    hub.stop().await;
}

#[test]
fn check_names_a_secret_env_that_is_not_set() {
    let setup = Setup::new().without_env(SECRET_ENV);
    check_fails(
        &setup,
        "FAIL  site roflfaucet:",
        &[&format!("environment variable {SECRET_ENV} (secret_env) is not set"), "EnvironmentFile"],
    );
}

#[test]
fn check_names_a_secret_file_it_cannot_read() {
    let mut setup = Setup::new();
    // A folder: it cannot be read as a file, whoever the test runs as.
    let unreadable = setup.path("secrets");
    std::fs::create_dir(&unreadable).unwrap();
    setup.site("wrc").secret_file = Some(unreadable.clone());
    check_fails(
        &setup,
        "FAIL  site wrc:",
        &[
            &format!("cannot read secret_file {}", unreadable.display()),
            "readable by the user the hub runs as",
        ],
    );
}

#[test]
fn check_refuses_a_tls_key_that_is_not_the_certificates() {
    let mut setup = Setup::new();
    let (_, other_key) = certificate();
    std::fs::write(setup.path("other-key.pem"), other_key).unwrap();
    setup.config.tls_key = Some(setup.path("other-key.pem"));
    check_fails(&setup, "FAIL  TLS:", &["does not belong to the certificate", "point tls_cert at"]);

    setup.config.tls_key = Some(setup.path("missing-key.pem"));
    check_fails(&setup, "FAIL  TLS:", &["cannot read TLS key", "missing-key.pem"]);
}

#[test]
fn check_refuses_a_data_dir_it_cannot_write_in_or_create() {
    let mut setup = Setup::new();
    let file = setup.path("a-file");
    std::fs::write(&file, "").unwrap();
    setup.config.data_dir = file.join("data");
    check_fails(&setup, "FAIL  data dir", &["cannot be created in", "install -d -m 0700"]);
    setup.config.data_dir = file;
    check_fails(&setup, "FAIL  data dir", &["it is not a directory"]);

    // Permissions stop every user but root, which only a read-only file system stops.
    let owned_by_root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(setup.path("a-file")).unwrap().uid() == 0
    };
    if !owned_by_root {
        use std::os::unix::fs::PermissionsExt;
        let read_only = setup.path("read-only");
        std::fs::create_dir(&read_only).unwrap();
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o500)).unwrap();
        setup.config.data_dir = read_only;
        check_fails(&setup, "FAIL  data dir", &["this user cannot write in it"]);
    }
}

#[test]
fn check_names_a_metrics_token_env_that_is_not_set() {
    let setup = Setup::new().without_env(METRICS_ENV);
    check_fails(
        &setup,
        "FAIL  metrics:",
        &[&format!("metrics.token_env names {METRICS_ENV}, which is not set"), "or remove token_env"],
    );
}

#[test]
fn check_reports_a_configuration_that_does_not_load() {
    let setup = Setup::new();
    let config = setup.path("hub.toml");
    std::fs::write(&config, "hub_idd = \"typo\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hub"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .env_remove("HUB_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("FAIL  configuration: invalid configuration"), "{}", stdout(&out));
}

#[tokio::test]
async fn serve_refuses_a_mismatched_key_pair_before_it_creates_a_database() {
    let mut setup = Setup::new();
    let (stranger, _) = ed25519_pems();
    setup.site("clickforcharity").private_key_pem = Some(stranger);
    let out = setup.serve_refused("127.0.0.1:0").await;
    assert!(
        stderr(&out)
            .contains("site clickforcharity: its key: private_key_pem does not belong to public_key_pem"),
        "{}",
        stderr(&out)
    );
    assert!(!setup.path("data").exists(), "a refused start created the data dir");
}

#[tokio::test]
async fn serve_on_a_busy_port_leaves_no_data_dir_and_names_the_port() {
    let setup = Setup::new();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = setup.serve_refused(&addr).await;
    assert!(stderr(&out).contains(&format!("cannot listen on {addr}")), "{}", stderr(&out));
    assert!(!setup.path("data").exists(), "a hub that could not listen created the data dir");
}

/// The claims of the page token a site's backend mints.
fn page_claims(site: &str) -> serde_json::Value {
    let now = jsonwebtoken::get_current_timestamp();
    serde_json::json!({"iss": site, "sub": "8-evans", "aud": "test-hub", "exp": now + 600, "iat": now})
}

/// A config holding only `site`, as `tweak` leaves it.
fn only(setup: &Setup, site: &str, tweak: impl FnOnce(&mut Site)) -> Config {
    let mut config = setup.config.clone();
    config.sites.retain(|s| s.id == site);
    tweak(&mut config.sites[0]);
    config
}

#[test]
fn token_reads_only_the_key_of_its_own_site() {
    // An operator's shell: none of the service's variables, no TLS files.
    let mut setup = Setup::new().without_env(SECRET_ENV).without_env(METRICS_ENV);
    setup.config.tls_key = Some(setup.path("missing-key.pem"));
    std::fs::remove_file(setup.path("wrc.secret")).unwrap();

    let out = setup.run(&["token", "--site", "clickforcharity", "--user", "8-evans"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let keys = Keys::from_config(&only(&setup, "clickforcharity", |_| {})).unwrap();
    let verified = keys.verify(stdout(&out).trim()).unwrap();
    assert_eq!((verified.site.as_str(), verified.user.as_str()), ("clickforcharity", "8-evans"));

    let out = setup.run(&["token", "--site", "roflfaucet", "--user", "8-evans"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("environment variable {SECRET_ENV} (secret_env) is not set")));
}

#[test]
fn a_site_with_only_its_private_key_mints_and_verifies_and_check_says_so() {
    let mut setup = Setup::new();
    let site = setup.site("clickforcharity");
    let private = site.private_key_pem.clone().unwrap();
    let public = site.public_key_pem.take().unwrap();

    let out = setup.run(&["check"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(
            "ok    site clickforcharity: verifies tokens signed with EdDSA (no kid, its public key derived \
             from private_key_pem); `hub token` and `hub agent` can mint its tokens, with EdDSA (no kid)\n"
        ),
        "{}",
        stdout(&out)
    );

    // What `hub token` mints, a hub holding the public key accepts.
    let out = setup.run(&["token", "--site", "clickforcharity", "--user", "8-evans"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let public_only = only(&setup, "clickforcharity", |s| {
        s.private_key_pem = None;
        s.public_key_pem = Some(public);
    });
    Keys::from_config(&public_only).unwrap().verify(stdout(&out).trim()).unwrap();

    // What the site's backend signs, a hub holding only the private key accepts.
    let signed = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &page_claims("clickforcharity"),
        &EncodingKey::from_ed_pem(private.as_bytes()).unwrap(),
    )
    .unwrap();
    let private_only = only(&setup, "clickforcharity", |_| {});
    Keys::from_config(&private_only).unwrap().verify(&signed).unwrap();
    let (stranger, _) = ed25519_pems();
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &page_claims("clickforcharity"),
        &EncodingKey::from_ed_pem(stranger.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(Keys::from_config(&private_only).unwrap().verify(&forged).is_err());
}

#[test]
fn check_says_a_site_with_only_its_public_key_cannot_mint() {
    let mut setup = Setup::new();
    setup.site("clickforcharity").private_key_pem = None;
    let out = setup.run(&["check"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(
            "ok    site clickforcharity: verifies tokens signed with EdDSA (no kid); `hub token` and `hub agent` \
             cannot mint its tokens (only public keys; add private_key_pem to mint)"
        ),
        "{}",
        stdout(&out)
    );
    let out = setup.run(&["token", "--site", "clickforcharity", "--user", "8-evans"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("add private_key_pem to mint"), "{}", stderr(&out));
}

#[test]
fn check_refuses_a_drain_longer_than_an_hour() {
    let mut setup = Setup::new();
    setup.config.drain_secs = 3601;
    check_fails(&setup, "FAIL  settings:", &["drain_secs must be at most 3600"]);
}

#[tokio::test]
async fn an_access_log_that_cannot_be_created_fails_the_check_and_the_start_before_any_database() {
    let mut setup = Setup::new();
    let path = setup.path("no-such-folder").join("access.log");
    setup.config.access_log.enabled = true;
    setup.config.access_log.path = Some(path.clone());
    check_fails(
        &setup,
        "FAIL  access log:",
        &["it does not exist and cannot be created in", &path.display().to_string(), "LogsDirectory"],
    );

    let out = setup.serve_refused("127.0.0.1:0").await;
    assert!(stderr(&out).contains("access log: it does not exist"), "{}", stderr(&out));
    assert!(!setup.path("data").exists(), "a refused start created the data dir");

    std::fs::create_dir(setup.path("no-such-folder")).unwrap();
    let out = setup.run(&["check"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains(&format!("ok    access log: creates {} at start", path.display())));
    assert!(!path.exists(), "hub check created the access log");
}

#[test]
fn check_refuses_an_expired_certificate_and_warns_of_one_about_to_expire() {
    let mut setup = Setup::new();
    let now = time::OffsetDateTime::now_utc();
    let (expired, key) = certificate_with(|params| {
        params.not_before = now - time::Duration::days(90);
        params.not_after = now - time::Duration::days(1);
    });
    std::fs::write(setup.path("cert.pem"), expired).unwrap();
    std::fs::write(setup.path("key.pem"), key).unwrap();
    check_fails(&setup, "FAIL  TLS:", &["expired at", "every client refuses it", "renew it"]);

    let (expiring, key) =
        certificate_with(|params| params.not_after = now + time::Duration::hours(5 * 24 + 1));
    std::fs::write(setup.path("cert.pem"), expiring).unwrap();
    std::fs::write(setup.path("key.pem"), key).unwrap();
    let out = setup.run(&["check"]);
    assert!(out.status.success(), "a warning stops no start:\n{}", stdout(&out));
    assert!(stdout(&out).contains("warn  TLS: the certificate expires at "), "{}", stdout(&out));
    assert!(stdout(&out).contains(", in 5 day(s); renew it"), "{}", stdout(&out));
    assert!(stdout(&out).contains("see the 1 warning(s) above"), "{}", stdout(&out));
    setup.config.tls_cert = None;
    setup.config.tls_key = None;
    assert!(stdout(&setup.run(&["check"])).contains("all is well"));
}

#[test]
fn check_warns_that_clients_refuse_a_certificate_marked_as_an_authority() {
    let setup = Setup::new();
    let (authority, key) =
        certificate_with(|params| params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained));
    std::fs::write(setup.path("cert.pem"), authority).unwrap();
    std::fs::write(setup.path("key.pem"), key).unwrap();
    let out = setup.run(&["check"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let warning = stdout(&out).lines().find(|l| l.starts_with("warn  TLS:")).map(str::to_owned);
    let warning = warning.unwrap_or_else(|| panic!("no warning:\n{}", stdout(&out)));
    for said in ["marked as an authority's", "`hub agent` among them", "CaUsedAsEndEntity", "CA:FALSE"] {
        assert!(warning.contains(said), "{said:?}: {warning}");
    }
}

/// Makes the data dir hold a database whose header says schema version `version`.
fn database_of_schema(setup: &Setup, version: u32) -> PathBuf {
    let data = setup.path("data");
    std::fs::create_dir(&data).unwrap();
    let path = data.join("hub.sqlite3");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", version).unwrap();
    path
}

#[tokio::test]
async fn a_database_of_a_newer_hub_fails_the_check_and_the_start_untouched() {
    let setup = Setup::new();
    let newer = hub::store::sqlite::SCHEMA_VERSION + 1;
    let path = database_of_schema(&setup, newer);
    let before = std::fs::read(&path).unwrap();
    check_fails(
        &setup,
        "FAIL  database",
        &[&format!("its schema version is {newer}, newer than this hub's"), "hub restore"],
    );
    let out = setup.serve_refused("127.0.0.1:0").await;
    assert!(stderr(&out).contains("newer than this hub's"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&path).unwrap(), before, "the refused start changed the database");
}

#[test]
fn check_reads_the_schema_of_a_database_it_knows() {
    let setup = Setup::new();
    let version = hub::store::sqlite::SCHEMA_VERSION;
    database_of_schema(&setup, version);
    let out = setup.run(&["check"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains(&format!("schema version {version}, this hub's")), "{}", stdout(&out));
}

#[test]
fn check_refuses_database_files_this_user_cannot_write() {
    let setup = Setup::new();
    database_of_schema(&setup, hub::store::sqlite::SCHEMA_VERSION);
    // A folder where the lock file goes: no user may open it for writing, root neither.
    std::fs::create_dir(setup.path("data").join("hub.lock")).unwrap();
    check_fails(&setup, "FAIL  database", &["this user cannot write hub.lock", "chown USER"]);
    std::fs::remove_dir(setup.path("data").join("hub.lock")).unwrap();
    // A link, which the hub does not follow in its data dir.
    std::os::unix::fs::symlink(setup.path("cert.pem"), setup.path("data").join("hub.lock")).unwrap();
    check_fails(
        &setup,
        "FAIL  database",
        &["hub.lock (it is a symbolic link, which the hub does not follow)"],
    );
    std::fs::remove_file(setup.path("data").join("hub.lock")).unwrap();

    // What `sudo hub import` leaves to a hub running as another user: permissions stop every
    // user but root.
    let owned_by_root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(setup.path("data")).unwrap().uid() == 0
    };
    if !owned_by_root {
        use std::os::unix::fs::PermissionsExt;
        let wal = setup.path("data").join("hub.sqlite3-wal");
        std::fs::write(&wal, "").unwrap();
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o444)).unwrap();
        check_fails(&setup, "FAIL  database", &["this user cannot write hub.sqlite3-wal"]);
    }
}

#[test]
fn check_warns_that_a_privileged_port_needs_a_capability() {
    let mut setup = Setup::new();
    setup.config.listen = "127.0.0.1:443".parse().unwrap();
    let out = setup.run(&["check"]);
    assert!(out.status.success(), "a warning stops no start:\n{}", stdout(&out));
    // Linux lets every process bind the ports from this one up.
    let unprivileged: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .map_or(1024, |text| text.trim().parse().unwrap());
    let warning = stdout(&out).lines().find(|l| l.starts_with("warn  listen:")).map(str::to_owned);
    if unprivileged > 443 {
        let warning = warning.unwrap_or_else(|| panic!("no warning:\n{}", stdout(&out)));
        assert!(warning.contains("port 443 is below"), "{warning}");
        assert!(warning.contains("CAP_NET_BIND_SERVICE"), "{warning}");
    } else {
        assert_eq!(warning, None, "this machine lets any process bind port 443");
    }
}

#[tokio::test]
async fn dev_mode_writes_nothing_to_check_and_nothing_before_its_port_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let dev = |command: &str| {
        let mut hub = support::hub_command();
        hub.args([command, "--dev", "--data-dir"]).arg(&data).env("RUST_LOG", "warn");
        hub
    };
    let out = dev("check").output().await.unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("ok    site roflfaucet: verifies tokens"), "{}", stdout(&out));
    assert!(!data.exists(), "hub check --dev created the data dir");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = tokio::time::timeout(PATIENCE, dev("serve").args(["--listen", &addr]).output())
        .await
        .expect("the hub refuses to start")
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("cannot listen on {addr}")), "{}", stderr(&out));
    assert!(!data.exists(), "a hub that could not listen wrote its development keys");
}
