//! What the agent reads of the hub's configuration (the `hub.toml` format): `hub_id`, and
//! its own site's keys, scopes and token lifetime, read as the hub reads them. Every other
//! key is ignored and no other site is read: a key elsewhere that would not load is the
//! hub's to report. Checks only what the agent uses; whether the hub accepts its tokens is
//! the hub's check.

use std::path::PathBuf;

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey};
use protocol::{Scope, Scopes, SiteId};
use serde::Deserialize;

/// The hub's id, and the lifetime a site's tokens may have, when the configuration names
/// none: the hub's own defaults.
const DEFAULT_HUB_ID: &str = "unified-sync-hub";
const DEFAULT_MAX_TOKEN_TTL_SECS: u64 = 3600;
/// Shortest HS256 secret the hub accepts.
const MIN_SECRET_BYTES: usize = 32;

/// The part of the hub's configuration the agent needs. No `Debug`: it holds secrets.
#[derive(Clone, Deserialize)]
pub struct Config {
    /// The hub's name: the `aud` of every token.
    #[serde(default = "default_hub_id")]
    hub_id: String,
    #[serde(default)]
    sites: Vec<Site>,
}

/// One `[[sites]]` entry, as far as signing goes.
#[derive(Clone, Deserialize)]
struct Site {
    id: String,
    /// The site's key without a `kid`, when any of its fields is given.
    #[serde(flatten)]
    key: Key,
    /// `[[sites.keys]]`: more keys, each named by the `kid` its tokens carry.
    #[serde(default)]
    keys: Vec<NamedKey>,
    /// The scopes the site's key may sign; the hub's default set when absent.
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// The hub refuses the site's tokens that live longer.
    #[serde(default = "default_max_token_ttl_secs")]
    max_token_ttl_secs: u64,
}

/// Where one key's material is: an HS256 secret (in the file, the environment or a file of
/// its own), or an Ed25519 key pair.
#[derive(Clone, Default, Deserialize)]
struct Key {
    secret: Option<String>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    public_key_pem: Option<String>,
    private_key_pem: Option<String>,
}

#[derive(Clone, Deserialize)]
struct NamedKey {
    kid: String,
    #[serde(flatten)]
    key: Key,
}

fn default_hub_id() -> String {
    DEFAULT_HUB_ID.to_owned()
}

fn default_max_token_ttl_secs() -> u64 {
    DEFAULT_MAX_TOKEN_TTL_SECS
}

/// What the agent's tokens for one site are made of.
pub(crate) struct SiteSigning {
    pub(crate) hub_id: String,
    /// The key's `kid`, named in every token's header; `None` for the site's key without one.
    pub(crate) kid: Option<String>,
    pub(crate) algorithm: Algorithm,
    pub(crate) key: EncodingKey,
    pub(crate) max_token_ttl_secs: u64,
}

impl Config {
    /// `site`'s first key that can sign, in the hub's order (the key without a `kid`, then
    /// `[[sites.keys]]`), after checking that the site may sign `scopes`.
    pub(crate) fn signing(&self, site: &SiteId, scopes: Scopes) -> anyhow::Result<SiteSigning> {
        let entry = self
            .sites
            .iter()
            .find(|s| s.id == site.as_str())
            .with_context(|| format!("no site {site} is configured"))?;
        let given = entry.key.is_given();
        let keys = (given || entry.keys.is_empty())
            .then_some((None, &entry.key))
            .into_iter()
            .chain(entry.keys.iter().map(|k| (Some(k.kid.as_str()), &k.key)));
        let (kid, key) = keys.into_iter().find(|(_, key)| key.can_sign()).with_context(|| {
            format!(
                "site {site} has no key to sign with: give secret, secret_env, secret_file or \
                 private_key_pem"
            )
        })?;
        let (algorithm, key) = key.load().with_context(|| match kid {
            Some(kid) => format!("site {site}, key {kid}"),
            None => format!("site {site}, its key"),
        })?;
        let signable = entry.signable_scopes()?;
        if let Some(missing) = scopes.without(signable).iter().next() {
            bail!("site {site} may not sign {missing}; add it to the site's scopes");
        }
        Ok(SiteSigning {
            hub_id: self.hub_id.clone(),
            kid: kid.map(str::to_owned),
            algorithm,
            key,
            max_token_ttl_secs: entry.max_token_ttl_secs,
        })
    }
}

impl Site {
    fn signable_scopes(&self) -> anyhow::Result<Scopes> {
        let Some(names) = &self.scopes else { return Ok(Scopes::SITE_DEFAULT) };
        names
            .iter()
            .map(|name| {
                Scope::from_name(name).with_context(|| {
                    format!(
                        "site {}: unknown scope {name:?} in scopes; the scopes are {}",
                        self.id,
                        Scopes::ALL
                    )
                })
            })
            .collect()
    }
}

impl Key {
    fn is_given(&self) -> bool {
        self.secret.is_some()
            || self.secret_env.is_some()
            || self.secret_file.is_some()
            || self.public_key_pem.is_some()
            || self.private_key_pem.is_some()
    }

    fn has_secret(&self) -> bool {
        self.secret.is_some() || self.secret_env.is_some() || self.secret_file.is_some()
    }

    fn can_sign(&self) -> bool {
        self.has_secret() || self.private_key_pem.is_some()
    }

    /// The key's algorithm and signing key: HS256 with the secret, read from wherever it is
    /// kept, or EdDSA with the private key.
    fn load(&self) -> anyhow::Result<(Algorithm, EncodingKey)> {
        if self.has_secret() {
            if self.public_key_pem.is_some() {
                bail!("give either an HS256 secret or an EdDSA public key, not both");
            }
            let secret = self.secret()?;
            if secret.len() < MIN_SECRET_BYTES {
                bail!("the HS256 secret must be at least {MIN_SECRET_BYTES} bytes");
            }
            return Ok((Algorithm::HS256, EncodingKey::from_secret(secret.as_bytes())));
        }
        let pem = self.private_key_pem.as_deref().context("no key to sign with")?;
        let key =
            EncodingKey::from_ed_pem(pem.as_bytes()).context("private_key_pem is not an Ed25519 key")?;
        Ok((Algorithm::EdDSA, key))
    }

    /// The HS256 secret: as written, from the environment, or from its file (without the
    /// line end that editors add).
    fn secret(&self) -> anyhow::Result<String> {
        match (&self.secret, &self.secret_env, &self.secret_file) {
            (Some(secret), None, None) => Ok(secret.clone()),
            (None, Some(var), None) => {
                std::env::var(var).with_context(|| format!("environment variable {var} is not set"))
            }
            (None, None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read secret_file {}", path.display()))?;
                Ok(text.trim_end_matches(['\n', '\r']).to_owned())
            }
            _ => bail!("give one of secret, secret_env and secret_file"),
        }
    }
}
