//! Everything a start needs, checked item by item: the settings, every site's keys (their
//! secrets present, their PEMs parsed, each private key the pair of its public key), the TLS
//! certificate and key, the data dir, the metrics token. `hub check` prints every item;
//! `App::open` runs the same checks and refuses to start on any problem,
//! before it creates or opens the database.
//!
//! Reads files and the environment and writes nothing, but for a probe file it removes at
//! once; binds no port, since the hub being checked may be serving on it, and opens no
//! database, which a serving hub holds.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::auth::{self, Keys};
use crate::config::Config;
use crate::store::sqlite::DB_FILE;
use crate::tls::Tls;

/// What was found about one thing a start needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// What was checked: `settings`, `site roflfaucet`, `TLS`, `data dir`, `metrics`.
    pub subject: String,
    /// What was found when it is fine, or the problem and its fix.
    pub finding: Result<String, String>,
}

impl fmt::Display for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.finding {
            Ok(found) => write!(f, "ok    {}: {found}", self.subject),
            Err(problem) => write!(f, "FAIL  {}: {problem}", self.subject),
        }
    }
}

/// Every item of a check, in the order a start needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.items.iter().all(|item| item.finding.is_ok())
    }

    pub fn problems(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|item| item.finding.is_err())
    }

    /// `Ok` when all is well; else an error naming every problem, what a refused start says.
    pub fn into_result(self) -> anyhow::Result<()> {
        let problems: Vec<String> = self
            .items
            .iter()
            .filter_map(|item| {
                item.finding.as_ref().err().map(|problem| format!("{}: {problem}", item.subject))
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
    if config.auth {
        items.extend(sites(config));
    }
    items.push(item("TLS", tls(config)));
    items.push(item(format!("data dir {}", config.data_dir.display()), data_dir(&config.data_dir)));
    items.push(item("metrics", metrics(config)));
    Report { items }
}

fn item(subject: impl Into<String>, finding: Result<String, String>) -> Item {
    Item { subject: subject.into(), finding }
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
    if items.iter().all(|item| item.finding.is_ok()) && config.sites.len() > 1 {
        let together = Keys::from_config(config)
            .map(|_| format!("{} sites, no two share a key", config.sites.len()))
            .map_err(|e| format!("{e:#}"));
        items.push(item("sites", together));
    }
    items
}

fn tls(config: &Config) -> Result<String, String> {
    let Some((cert, key)) = config.tls_files() else {
        return Ok("none configured: the hub speaks plain HTTP (behind a proxy that terminates HTTPS)".into());
    };
    Tls::load(cert, key).map_err(|e| {
        format!(
            "{e:#}; point tls_cert at the certificate chain and tls_key at its own private key (PEM), \
             both readable by the user the hub runs as"
        )
    })?;
    Ok(format!("certificate {} and key {} load and belong together", cert.display(), key.display()))
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

fn metrics(config: &Config) -> Result<String, String> {
    let token = config.metrics.token().map_err(|e| format!("{e:#}"))?;
    Ok(match (token, config.metrics.allow_loopback) {
        (Some(_), true) => "readable on this machine, and elsewhere with the token".into(),
        (Some(_), false) => "readable with the token only".into(),
        (None, true) => "readable on this machine only (no token configured)".into(),
        (None, false) => "readable by no one (allow_loopback = false and no token)".into(),
    })
}
