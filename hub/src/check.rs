//! Everything a start needs, checked item by item: the settings, every site's keys (their
//! secrets present, their PEMs parsed, each private key the pair of its public key), their
//! webhooks' secrets (present, of the Standard Webhooks form) and authorities file, the TLS
//! certificate and key (not expired), the data dir and the database's files (writable, of a
//! schema this hub knows), the access log's file, the metrics token. `hub check` prints every
//! item; `App::open` runs the same checks and refuses to start on any problem, before it
//! creates or opens the database. A warning (a certificate about to expire, a port that needs
//! a capability) is printed and does not stop a start.
//!
//! Reads files and the environment and writes nothing, but for a probe file it removes at
//! once; binds no port, since the hub being checked may be serving on it, and opens no
//! database, which a serving hub holds: the database's schema version is read from its
//! file's header.

use std::cmp::Ordering;
use std::fmt;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use crate::auth::{self, Keys};
use crate::config::Backend;
use crate::config::{AccessLogConfig, Config};
use crate::store::sqlite::{DB_FILE, LOCK_FILE, SCHEMA_VERSION, open_in_data_dir};
use crate::time::{now_ms, rfc3339_ms};
use crate::tls::Tls;

/// Days before its expiry from which a certificate is warned about: the dashboard's tile
/// turns amber then too.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// What was found about one thing a start needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// What was checked: `settings`, `site roflfaucet`, `TLS`, `data dir`, `metrics`.
    pub subject: String,
    pub finding: Finding,
}

/// What was found about one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Fine: what was found.
    Ok(String),
    /// A start goes ahead, but something is likely to fail later or for some clients: what,
    /// and its fix.
    Warning(String),
    /// A start would be refused: the problem and its fix.
    Problem(String),
}

impl From<Result<String, String>> for Finding {
    fn from(found: Result<String, String>) -> Finding {
        found.map_or_else(Finding::Problem, Finding::Ok)
    }
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.finding {
            Finding::Ok(found) => write!(f, "ok    {}: {found}", self.subject),
            Finding::Warning(warning) => write!(f, "warn  {}: {warning}", self.subject),
            Finding::Problem(problem) => write!(f, "FAIL  {}: {problem}", self.subject),
        }
    }
}

/// Every item of a check, in the order a start needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    /// Whether a start would go ahead: no problem, warnings or not.
    pub fn is_ok(&self) -> bool {
        self.problems().next().is_none()
    }

    pub fn problems(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|item| matches!(item.finding, Finding::Problem(_)))
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|item| matches!(item.finding, Finding::Warning(_)))
    }

    /// `Ok` when all is well; else an error naming every problem, what a refused start says.
    pub fn into_result(self) -> anyhow::Result<()> {
        let problems: Vec<String> = self
            .items
            .iter()
            .filter_map(|item| match &item.finding {
                Finding::Problem(problem) => Some(format!("{}: {problem}", item.subject)),
                Finding::Ok(_) | Finding::Warning(_) => None,
            })
            .collect();
        match problems.as_slice() {
            [] => Ok(()),
            [one] => Err(anyhow::anyhow!("{one}")),
            many => Err(anyhow::anyhow!("{} problems:\n  {}", many.len(), many.join("\n  "))),
        }
    }
}

/// Checks everything a start of a hub with `config` needs.
pub fn check(config: &Config) -> Report {
    let mut items = vec![item("settings", settings(config))];
    if let Some(warning) = privileged_port(config.listen.port()) {
        items.push(item("listen", Finding::Warning(warning)));
    }
    if config.auth {
        items.extend(sites(config));
    }
    if let Some(found) = crate::webhooks::describe(config) {
        items.push(item("webhooks", found));
    }
    items.push(item("TLS", tls(config)));
    items.push(item(format!("data dir {}", config.data_dir.display()), data_dir(&config.data_dir)));
    match config.store.backend {
        Backend::Sqlite => {
            if let Some(found) = database(&config.data_dir) {
                items.push(item(format!("database {}", config.data_dir.join(DB_FILE).display()), found));
            }
        }
        Backend::Postgres => {
            let found = crate::store::postgres::Database::of(&config.store)
                .map_err(|e| e.to_string())
                .and_then(crate::store::postgres::schema_status);
            items.push(item("database (PostgreSQL)", found));
        }
    }
    items.push(item("access log", access_log(&config.access_log)));
    items.push(item("metrics", metrics(config)));
    Report { items }
}

fn item(subject: impl Into<String>, finding: impl Into<Finding>) -> Item {
    Item { subject: subject.into(), finding: finding.into() }
}

/// A warning when `port` is one only a privileged process may bind: this check binds none,
/// and whether the hub may depends on how it is started.
fn privileged_port(port: u16) -> Option<String> {
    // Linux lets every process bind the ports from this one up (1024 unless lowered).
    let unprivileged = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    (port != 0 && port < unprivileged).then(|| {
        format!(
            "port {port} is below {unprivileged}: binding it needs the capability CAP_NET_BIND_SERVICE; \
             under the systemd unit, which grants none, give it with the drop-in of the deployment \
             guide (HTTPS, \"Let it bind port 443\"), or listen on a higher port behind a proxy"
        )
    })
}

fn settings(config: &Config) -> Result<String, String> {
    config.validate().map_err(|e| format!("{e:#}"))?;
    let auth = if config.auth {
        format!("auth on, {} site(s)", config.sites.len())
    } else {
        "auth OFF: any caller may act as any user (development only)".to_owned()
    };
    Ok(format!("hub_id {:?}, listen {}, {auth}", config.hub_id, config.listen))
}

/// One item per site, then one for what only the sites together can break: a key two sites
/// share.
fn sites(config: &Config) -> Vec<Item> {
    let mut items: Vec<Item> = config
        .sites
        .iter()
        .map(|site| {
            item(
                format!("site {}", site.id),
                auth::describe_site(site, &config.hub_id).map_err(|e| format!("{e:#}")),
            )
        })
        .collect();
    if items.iter().all(|item| matches!(item.finding, Finding::Ok(_))) && config.sites.len() > 1 {
        let together = Keys::from_config(config)
            .map(|_| format!("{} sites, no two share a key", config.sites.len()))
            .map_err(|e| format!("{e:#}"));
        items.push(item("sites", together));
    }
    items
}

fn tls(config: &Config) -> Finding {
    let Some((cert, key)) = config.tls_files() else {
        return Finding::Ok(
            "none configured: the hub speaks plain HTTP (behind a proxy that terminates HTTPS)".into(),
        );
    };
    let tls = match Tls::load(cert, key) {
        Ok(tls) => tls,
        Err(e) => {
            return Finding::Problem(format!(
                "{e:#}; point tls_cert at the certificate chain and tls_key at its own private key (PEM), \
                 both readable by the user the hub runs as"
            ));
        }
    };
    let not_after_ms = tls.not_after().saturating_mul(1000);
    let expires = rfc3339_ms(not_after_ms);
    let renew = "renew it and give the hub the new files (systemctl reload reads them)";
    let days_left = (not_after_ms - now_ms()).div_euclid(86_400_000);
    if days_left < 0 {
        return Finding::Problem(format!(
            "the certificate {} expired at {expires}: every client refuses it; {renew}",
            cert.display()
        ));
    }
    let mut warnings = Vec::new();
    if days_left < EXPIRY_WARNING_DAYS {
        warnings.push(format!("the certificate expires at {expires}, in {days_left} day(s); {renew}"));
    }
    if is_authority(cert) {
        warnings.push(
            "the certificate is marked as an authority's (basicConstraints CA:TRUE): the hub serves it, \
             but clients built on webpki, `hub agent` among them, refuse it as a server's \
             (CaUsedAsEndEntity); make it with basicConstraints=critical,CA:FALSE (the deployment \
             guide, section 6, shows how)"
                .to_owned(),
        );
    }
    if warnings.is_empty() {
        Finding::Ok(format!(
            "certificate {} and key {} load and belong together; valid until {expires}",
            cert.display(),
            key.display()
        ))
    } else {
        Finding::Warning(warnings.join("; "))
    }
}

/// Whether the first certificate of the PEM file `cert`, the server's own, says it is an
/// authority's. Read after [`Tls::load`] accepted the file.
fn is_authority(cert: &Path) -> bool {
    let Some(Ok(first)) = CertificateDer::pem_file_iter(cert).ok().and_then(|mut certs| certs.next()) else {
        return false;
    };
    x509_parser::parse_x509_certificate(&first)
        .ok()
        .and_then(|(_, parsed)| parsed.basic_constraints().ok().flatten().map(|c| c.value.ca))
        .unwrap_or(false)
}

/// The data dir exists and this user may write in it, or it can be created.
fn data_dir(dir: &Path) -> Result<String, String> {
    let fix = "give the user the hub runs as a directory of its own (install -d -m 0700 -o USER DIR), \
               or point data_dir (--data-dir) at one";
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => Err(format!("it is not a directory; {fix}")),
        Ok(_) => {
            probe(dir).map_err(|e| format!("this user cannot write in it ({e}); {fix}"))?;
            Ok(if dir.join(DB_FILE).exists() {
                format!("writable, holds the database {DB_FILE}")
            } else {
                format!("writable; the database {DB_FILE} will be created at start")
            })
        }
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            let parent = existing_ancestor(dir);
            let created = match std::fs::metadata(&parent) {
                Ok(meta) if meta.is_dir() => probe(&parent),
                Ok(_) => Err(std::io::Error::new(ErrorKind::NotADirectory, "not a directory")),
                Err(e) => Err(e),
            };
            created.map_err(|e| {
                format!("it does not exist and cannot be created in {} ({e}); {fix}", parent.display())
            })?;
            Ok("does not exist yet; it will be created at start".into())
        }
        Err(e) => Err(format!("cannot be read ({e}); {fix}")),
    }
}

/// The nearest of `dir`'s ancestors that exists (the current directory for a relative path).
fn existing_ancestor(dir: &Path) -> PathBuf {
    dir.ancestors()
        .skip(1)
        .map(|a| if a.as_os_str().is_empty() { Path::new(".") } else { a })
        .find(|a| a.exists())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Creates a file in `dir` and removes it: whether this user may write there, whatever the
/// reason it may not (permissions, a read-only file system, an ACL).
fn probe(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(format!(".hub-check-{}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
    std::fs::remove_file(&path)
}

/// The database's files in `dir`, when there are any: each a regular file, opened as the hub
/// opens it (through no symbolic link), and writable by this user (one another user made, a
/// `sudo hub import` say, is not); and the database of a schema this hub knows, read from its
/// header without opening it through SQLite.
fn database(dir: &Path) -> Option<Finding> {
    let files =
        [DB_FILE.to_owned(), format!("{DB_FILE}-wal"), format!("{DB_FILE}-shm"), LOCK_FILE.to_owned()];
    let present: Vec<&String> =
        files.iter().filter(|name| dir.join(name).symlink_metadata().is_ok()).collect();
    if present.is_empty() {
        return None;
    }
    let unwritable: Vec<String> = present
        .iter()
        .filter_map(|name| {
            let opened = open_in_data_dir(&dir.join(name), std::fs::OpenOptions::new().write(true));
            opened.err().map(|e| format!("{name} ({e})"))
        })
        .collect();
    if !unwritable.is_empty() {
        return Some(Finding::Problem(format!(
            "this user cannot write {}: files a command run as another user left (`sudo hub \
             import`, say); give them to the user the hub runs as (chown USER {}/hub.*)",
            unwritable.join(", "),
            dir.display()
        )));
    }
    Some(schema(&dir.join(DB_FILE)).into())
}

/// The schema version in the header of the database file `path` (SQLite's `user_version`,
/// bytes 60 to 63), against this hub's. The header holds the version of the last checkpoint:
/// a migration still only in the WAL, of a newer hub that crashed right after it, is seen by
/// the start alone, which then refuses the database.
fn schema(path: &Path) -> Result<String, String> {
    let mut header = Vec::with_capacity(100);
    match open_in_data_dir(path, std::fs::OpenOptions::new().read(true)) {
        Ok(file) => file.take(100).read_to_end(&mut header),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok("not created yet".into()),
        Err(e) => Err(e),
    }
    .map_err(|e| format!("this user cannot read it ({e}); give it to the user the hub runs as"))?;
    if header.is_empty() {
        return Ok("empty: the hub makes it a database at start".into());
    }
    if header.len() < 100 || !header.starts_with(b"SQLite format 3\0") {
        return Err(
            "it is not an SQLite database; move it away, and put a backup in its place with `hub restore`"
                .into(),
        );
    }
    let version = u32::from_be_bytes([header[60], header[61], header[62], header[63]]);
    match version.cmp(&SCHEMA_VERSION) {
        Ordering::Greater => Err(format!(
            "its schema version is {version}, newer than this hub's ({SCHEMA_VERSION}): a newer hub \
             migrated it; run that release, or restore the backup taken before the upgrade (hub restore)"
        )),
        Ordering::Equal => Ok(format!("schema version {version}, this hub's")),
        Ordering::Less => Ok(format!(
            "schema version {version}; the hub brings it to {SCHEMA_VERSION} at start (back it up \
             first: hub backup)"
        )),
    }
}

/// The access log's file, when there is one: this user may append to it, or create it.
fn access_log(config: &AccessLogConfig) -> Result<String, String> {
    if !config.enabled {
        return Ok("off".into());
    }
    let Some(path) = &config.path else {
        return Ok("to stderr, beside the hub's own log (under systemd, the journal)".into());
    };
    let fix = format!(
        "point [access_log] path at a file in a directory the user the hub runs as may write (under \
         the systemd unit, in /var/log/unified-sync/, its LogsDirectory=); {} is where it is now",
        path.display()
    );
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(format!("it is a directory; {fix}")),
        Ok(_) => {
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|e| format!("this user cannot append to it ({e}); {fix}"))?;
            Ok(format!("appends to {}", path.display()))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let parent = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            probe(parent).map_err(|e| {
                format!("it does not exist and cannot be created in {} ({e}); {fix}", parent.display())
            })?;
            Ok(format!("creates {} at start (mode 0640)", path.display()))
        }
        Err(e) => Err(format!("cannot be read ({e}); {fix}")),
    }
}

fn metrics(config: &Config) -> Result<String, String> {
    let token = config.metrics.token().map_err(|e| format!("{e:#}"))?;
    Ok(match (token, config.metrics.allow_loopback) {
        (Some(_), true) => "readable on this machine, and elsewhere with the token".into(),
        (Some(_), false) => "readable with the token only".into(),
        (None, true) => "readable on this machine only (no token configured)".into(),
        (None, false) => "readable by no one (allow_loopback = false and no token)".into(),
    })
}
