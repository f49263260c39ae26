//! Site tokens: every request carries a JWT minted by a site's backend. Each site has one
//! key and one algorithm; the token's `iss` picks the key, and nothing in the token can
//! change which algorithm is accepted.

use std::collections::HashMap;

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use protocol::{SiteId, UserId};
use serde::{Deserialize, Serialize};

use crate::bounded::BoundedMap;
use crate::config::{Config, Site};

/// Seconds of clock difference tolerated between a site and the hub.
const LEEWAY_SECS: u64 = 30;
/// Verified tokens remembered at most (a few hundred bytes each).
const REMEMBERED_TOKENS: usize = 65_536;

/// The claims the hub reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The site that minted the token.
    pub iss: String,
    /// The user the token speaks for.
    pub sub: String,
    /// The hub's id.
    pub aud: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Admin tokens may write `global_roles`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adm: bool,
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub site: SiteId,
    pub user: UserId,
    pub admin: bool,
}

/// Why a token was refused. Every variant becomes a 401; the message helps the site's
/// developer without telling an attacker more than that.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("an Authorization: Bearer token is required")]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's issuer is not a configured site")]
    UnknownIssuer,
    #[error("the token was refused: {0}")]
    Invalid(String),
}

struct SiteKey {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
}

/// Keys of every configured site.
pub struct Keys {
    hub_id: String,
    sites: HashMap<String, SiteKey>,
    /// Tokens verified lately, by their exact text, with their `exp`. A page sends the same
    /// token with every request until it expires: a remembered one costs a hash lookup, not
    /// two base64 decodes, two JSON parses and a signature check. Only the expiry can change
    /// a verified token's answer, and it is checked on every use.
    recent: BoundedMap<(Verified, u64)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("hub_id", &self.hub_id).field("sites", &self.sites.keys()).finish()
    }
}

impl Keys {
    pub fn from_config(config: &Config) -> anyhow::Result<Keys> {
        let mut sites = HashMap::new();
        for site in &config.sites {
            let key = site_key(site, &config.hub_id).with_context(|| format!("site {}", site.id))?;
            sites.insert(site.id.clone(), key);
        }
        Ok(Keys { hub_id: config.hub_id.clone(), sites, recent: BoundedMap::new(REMEMBERED_TOKENS) })
    }

    /// Verifies a token: known issuer, that issuer's algorithm and key, our audience,
    /// unexpired, already valid, not issued in the future, with a well-formed subject.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        if let Some((verified, exp)) = self.recent.get(token, Clone::clone) {
            // The rule jsonwebtoken applies: expired once `exp` is more than the leeway ago.
            return if exp.saturating_add(LEEWAY_SECS) >= jsonwebtoken::get_current_timestamp() {
                Ok(verified)
            } else {
                Err(AuthError::Invalid(
                    jsonwebtoken::errors::Error::from(jsonwebtoken::errors::ErrorKind::ExpiredSignature)
                        .to_string(),
                ))
            };
        }
        let (verified, exp) = self.verify_fully(token)?;
        self.recent.insert(token, (verified.clone(), exp));
        Ok(verified)
    }

    /// Every check of a token, returning whom it speaks for and its `exp`.
    fn verify_fully(&self, token: &str) -> Result<(Verified, u64), AuthError> {
        #[derive(Deserialize)]
        struct Issuer {
            iss: String,
        }
        let issuer: Issuer =
            jsonwebtoken::dangerous::insecure_decode_claims(token).map_err(|_| AuthError::Malformed)?;
        let key = self.sites.get(&issuer.iss).ok_or(AuthError::UnknownIssuer)?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        if claims.iat.is_some_and(|iat| iat > jsonwebtoken::get_current_timestamp() + LEEWAY_SECS) {
            return Err(AuthError::Invalid("issued in the future".into()));
        }
        let user =
            UserId::parse(&claims.sub).map_err(|_| AuthError::Invalid("sub is not a user id".into()))?;
        let site = SiteId::parse(&claims.iss).map_err(|_| AuthError::UnknownIssuer)?;
        Ok((Verified { site, user, admin: claims.adm }, claims.exp))
    }

    /// Mints a token as the site's backend would (for `hub token`, `hub agent`, the demo and
    /// tests).
    pub fn mint(&self, site: &str, user: &str, ttl_secs: u64, admin: bool) -> anyhow::Result<String> {
        let (key, encoding) = self.signing_key(site)?;
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: site.into(),
            sub: user.into(),
            aud: self.hub_id.clone(),
            exp: now + ttl_secs,
            iat: Some(now),
            nbf: None,
            adm: admin,
        };
        Ok(jsonwebtoken::encode(&Header::new(key.algorithm), &claims, encoding)?)
    }

    /// Fails, saying why, unless [`Keys::mint`] can sign for `site`: a program that will mint
    /// tokens for a long time (`hub agent`) checks this once at start.
    pub fn check_can_mint(&self, site: &str) -> anyhow::Result<()> {
        self.signing_key(site).map(|_| ())
    }

    fn signing_key(&self, site: &str) -> anyhow::Result<(&SiteKey, &EncodingKey)> {
        let key = self.sites.get(site).with_context(|| format!("no site {site} is configured"))?;
        let encoding = key.encoding.as_ref().with_context(|| {
            format!("site {site} has only a public key; add private_key_pem to mint its tokens")
        })?;
        Ok((key, encoding))
    }
}

fn site_key(site: &Site, hub_id: &str) -> anyhow::Result<SiteKey> {
    let secret = match (&site.secret, &site.secret_env) {
        (Some(secret), None) => Some(secret.clone()),
        (None, Some(var)) => {
            Some(std::env::var(var).with_context(|| format!("environment variable {var} is not set"))?)
        }
        (None, None) => None,
        (Some(_), Some(_)) => bail!("give either secret or secret_env, not both"),
    };
    let (algorithm, decoding, encoding) = match (secret, &site.public_key_pem) {
        (Some(secret), None) => {
            if secret.len() < 32 {
                bail!("the HS256 secret must be at least 32 bytes");
            }
            let bytes = secret.as_bytes();
            (Algorithm::HS256, DecodingKey::from_secret(bytes), Some(EncodingKey::from_secret(bytes)))
        }
        (None, Some(public)) => {
            let decoding = DecodingKey::from_ed_pem(public.as_bytes())
                .context("public_key_pem is not an Ed25519 key")?;
            let encoding = site
                .private_key_pem
                .as_ref()
                .map(|pem| EncodingKey::from_ed_pem(pem.as_bytes()))
                .transpose()
                .context("private_key_pem is not an Ed25519 key")?;
            (Algorithm::EdDSA, decoding, encoding)
        }
        (Some(_), Some(_)) => bail!("give either an HS256 secret or an EdDSA public key, not both"),
        (None, None) => bail!("no key: give secret, secret_env or public_key_pem"),
    };
    let mut validation = Validation::new(algorithm);
    validation.set_issuer(&[&site.id]);
    validation.set_audience(&[hub_id]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.validate_nbf = true;
    validation.leeway = LEEWAY_SECS;
    Ok(SiteKey { algorithm, decoding, encoding, validation })
}
