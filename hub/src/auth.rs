//! Site tokens and grants. Every request carries a token minted by a site's backend; a page's
//! credit also carries a grant, a JWT the same backend signed for exactly that op. The token's
//! `iss` picks the site, the header's `kid` one of its keys, and each key has one algorithm:
//! nothing in a token can change which algorithm is accepted. Each site's configuration says
//! what its key may sign (scopes, admin), for how long, and since when.
//!
//! Checks signatures and claims only; what a verified token or grant may write is the
//! domain's rule.

use std::collections::HashMap;

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use protocol::{Refusal, Scope, Scopes, SiteId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::bounded::BoundedMap;
use crate::config::{Config, KeyMaterial, Site};
use crate::domain::{Ceilings, Grant};

/// Seconds of clock difference tolerated between a site and the hub.
const LEEWAY_SECS: u64 = 30;
/// Verified tokens remembered at most (a few hundred bytes each).
const REMEMBERED_TOKENS: usize = 65_536;
/// The header `typ` of a grant. A token with it is no token, and a grant without it no grant.
pub const GRANT_TYP: &str = "grant+jwt";
/// Longest life of a grant: a page asks its backend for one just before it credits.
pub const MAX_GRANT_TTL_SECS: u64 = 600;
/// Longest token or grant read. Real ones are a few hundred bytes; a longer one is refused
/// before it is decoded, and never remembered.
const MAX_JWT_BYTES: usize = 8 * 1024;

/// The claims of a token.
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
    /// Admin tokens may write `global_roles`; only sites configured `admin` may sign them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adm: bool,
    /// What the token may do, space-separated; absent, the page set ([`Scopes::PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// The claims of a grant: one credit the site's backend allows, for one op.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// The op this grant is for: it credits under this id, once.
    pub op_id: String,
    pub data_type: String,
    /// The exact amounts object of the op, e.g. `{"coins": 10}`.
    pub delta: Map<String, Value>,
}

/// Who a verified token speaks for, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub site: SiteId,
    pub user: UserId,
    pub admin: bool,
    pub scopes: Scopes,
    /// The token's site's credit ceilings.
    pub ceilings: Ceilings,
    /// The token's `exp`, in seconds since the Unix epoch.
    pub expires: u64,
}

/// Why a token was refused. Every variant becomes a 401: it is about the token itself. The
/// message helps the site's developer without telling an attacker more than that.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("an Authorization: Bearer token is required")]
    Missing,
    /// A token its site signed for this hub, but past its `exp` (and the leeway): the page
    /// needs a fresh one. It still names its site and user, so that the request counts
    /// against that user's rate limit and not against its address's.
    #[error("the token has expired; ask the site for a fresh one")]
    Expired { site: SiteId, user: UserId },
    #[error("the token is malformed")]
    Malformed,
    #[error("the token is longer than 8 KiB")]
    TooLong,
    #[error("the token's issuer is not a configured site")]
    UnknownIssuer,
    #[error("the token was refused: {0}")]
    Invalid(String),
    /// The token claims a scope its site's key may not sign (or no scope at all).
    #[error("{0}")]
    ScopeNotAllowed(String),
    #[error("the token claims adm, and its site may not sign admin tokens")]
    AdminNotAllowed,
    /// Longer than the site's `max_token_ttl_secs`.
    #[error("{0}")]
    Lifetime(String),
    /// Issued before the site's `tokens_issued_after`.
    #[error("{0}")]
    Revoked(String),
}

impl AuthError {
    /// The stable code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Expired { .. } => protocol::wire::code::TOKEN_EXPIRED,
            AuthError::ScopeNotAllowed(_) => "scope_not_allowed",
            AuthError::AdminNotAllowed => "admin_not_allowed",
            AuthError::Lifetime(_) => "token_lifetime",
            AuthError::Revoked(_) => "token_revoked",
            AuthError::Malformed | AuthError::TooLong | AuthError::UnknownIssuer | AuthError::Invalid(_) => {
                "invalid_token"
            }
        }
    }
}

/// One key of a site.
struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    /// Checks a token's claims: `exp`, `nbf`, `iss`, `aud`.
    tokens: Validation,
    /// Checks a grant's claims but its expiry, which only a new op cares about; and an
    /// expired token's other claims, to tell whose it is.
    grants: Validation,
}

/// What a site's key may sign, and for how long.
#[derive(Debug, Clone)]
struct Policy {
    scopes: Scopes,
    admin: bool,
    max_token_ttl_secs: u64,
    /// Tokens with an older `iat`, or none, are refused.
    tokens_issued_after: Option<u64>,
    ceilings: Ceilings,
}

struct SiteKeys {
    keys: Vec<Key>,
    policy: Policy,
}

impl SiteKeys {
    /// The key a token's header names: its `kid`, or the site's key without one.
    fn key(&self, site: &str, kid: Option<&str>) -> Result<&Key, String> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| format!("{site} has no key with kid {:?}", truncate(kid))),
            None => self
                .keys
                .iter()
                .find(|k| k.kid.is_none())
                .ok_or_else(|| format!("the header names no kid, and every key of {site} has one")),
        }
    }
}

/// Every configured site's keys and policies.
pub struct Keys {
    hub_id: String,
    sites: HashMap<String, SiteKeys>,
    /// Tokens verified lately, by their exact text, with their `exp`. A page sends the same
    /// token with every request until it expires: a remembered one costs a hash lookup, not
    /// two base64 decodes, two JSON parses and a signature check. Only the expiry can change
    /// a verified token's answer while these keys serve; new keys come with an empty memory.
    recent: BoundedMap<(Verified, u64)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("hub_id", &self.hub_id).field("sites", &self.sites.keys()).finish()
    }
}

/// What [`jsonwebtoken::dangerous::insecure_decode`] reads before the key is known.
#[derive(Deserialize)]
struct Issuer {
    iss: String,
}

impl Keys {
    /// The configured site a token claims to come from (its `iss`), read without checking
    /// its signature: only to name the site in the operator's log of a refused token, never
    /// to decide anything. `None` for a token naming no configured site.
    pub fn claimed_site(&self, token: &str) -> Option<&str> {
        let claimed = jsonwebtoken::dangerous::insecure_decode::<Issuer>(token).ok()?.claims.iss;
        self.sites.get_key_value(&claimed).map(|(site, _)| site.as_str())
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

impl Keys {
    pub fn from_config(config: &Config) -> anyhow::Result<Keys> {
        let mut sites = HashMap::new();
        let mut owners: HashMap<String, &str> = HashMap::new();
        for site in &config.sites {
            let (keys, materials) =
                site_keys(site, &config.hub_id).with_context(|| format!("site {}", site.id))?;
            for material in materials {
                match owners.insert(material, &site.id) {
                    Some(other) if other != site.id => bail!(
                        "sites {other} and {} share a key: either could sign as the other, with its \
                         scopes and ceilings; give each site its own",
                        site.id
                    ),
                    _ => {}
                }
            }
            sites.insert(site.id.clone(), keys);
        }
        Ok(Keys { hub_id: config.hub_id.clone(), sites, recent: BoundedMap::new(REMEMBERED_TOKENS) })
    }

    /// Verifies a token: known issuer, the key its header names, that key's algorithm, our
    /// audience, unexpired, already valid, not issued in the future, within its site's
    /// lifetime and revocation time, claiming only scopes its site may sign, with a
    /// well-formed subject.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        if let Some((verified, exp)) = self.recent.get(token, Clone::clone) {
            // The rule jsonwebtoken applies: expired once `exp` is more than the leeway ago.
            let lifetime = self.sites.get(verified.site.as_str()).map_or(0, |s| s.policy.max_token_ttl_secs);
            return if exp.saturating_add(LEEWAY_SECS) >= now() {
                Ok(verified)
            } else if exp.saturating_add(lifetime) >= now() {
                Err(AuthError::Expired { site: verified.site, user: verified.user })
            } else {
                Err(AuthError::Invalid(LONG_EXPIRED.into()))
            };
        }
        let (verified, exp) = self.verify_fully(token)?;
        self.recent.insert(token, (verified.clone(), exp));
        Ok(verified)
    }

    /// Every check of a token, returning what it may do and its `exp`.
    fn verify_fully(&self, token: &str) -> Result<(Verified, u64), AuthError> {
        if token.len() > MAX_JWT_BYTES {
            return Err(AuthError::TooLong);
        }
        let unverified =
            jsonwebtoken::dangerous::insecure_decode::<Issuer>(token).map_err(|_| AuthError::Malformed)?;
        if is_grant(&unverified.header) {
            return Err(AuthError::Invalid("a grant is not a token; send it as the delta's grant".into()));
        }
        let site_id = unverified.claims.iss;
        let site = self.sites.get(&site_id).ok_or(AuthError::UnknownIssuer)?;
        let key = site.key(&site_id, unverified.header.kid.as_deref()).map_err(AuthError::Invalid)?;
        let claims = match jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.tokens) {
            Ok(decoded) => decoded.claims,
            Err(e) if *e.kind() == ErrorKind::ExpiredSignature => {
                return Err(expired(token, key, &site_id, &site.policy));
            }
            Err(e) => return Err(AuthError::Invalid(e.to_string())),
        };
        let now = now();
        if claims.iat.is_some_and(|iat| iat > now.saturating_add(LEEWAY_SECS)) {
            return Err(AuthError::Invalid("issued in the future".into()));
        }
        let policy = &site.policy;
        let lifetime = claims.exp.saturating_sub(claims.iat.unwrap_or(now));
        let slack = if claims.iat.is_some() { 0 } else { LEEWAY_SECS };
        if lifetime > policy.max_token_ttl_secs.saturating_add(slack) {
            return Err(AuthError::Lifetime(format!(
                "the token lives {lifetime} s; {site_id}'s tokens live at most {} s",
                policy.max_token_ttl_secs
            )));
        }
        if let Some(after) = policy.tokens_issued_after {
            match claims.iat {
                Some(iat) if iat >= after => {}
                Some(_) => {
                    return Err(AuthError::Revoked(format!(
                        "the token was issued before {site_id}'s tokens_issued_after; get a new one"
                    )));
                }
                None => {
                    return Err(AuthError::Revoked(format!(
                        "{site_id} accepts only tokens with iat (tokens_issued_after is set)"
                    )));
                }
            }
        }
        if claims.adm && !policy.admin {
            return Err(AuthError::AdminNotAllowed);
        }
        let scopes = match &claims.scope {
            None => Scopes::PAGE,
            Some(claim) => Scopes::parse(claim).map_err(|name| {
                AuthError::ScopeNotAllowed(format!(
                    "the token claims {:?}, which is no scope; the scopes are {}",
                    truncate(&name),
                    Scopes::ALL
                ))
            })?,
        };
        if let Some(missing) = scopes.without(policy.scopes).iter().next() {
            let asked = if claims.scope.is_some() {
                "claims"
            } else {
                "has no scope, so it asks for the page set, which includes"
            };
            return Err(AuthError::ScopeNotAllowed(format!(
                "the token {asked} {missing}, which {site_id}'s key may not sign"
            )));
        }
        let user =
            UserId::parse(&claims.sub).map_err(|_| AuthError::Invalid("sub is not a user id".into()))?;
        let site_id = SiteId::parse(&site_id).map_err(|_| AuthError::UnknownIssuer)?;
        let verified = Verified {
            site: site_id,
            user,
            admin: claims.adm,
            scopes,
            ceilings: policy.ceilings,
            expires: claims.exp,
        };
        Ok((verified, claims.exp))
    }

    /// Verifies a grant's signature and claims (but its expiry, see [`Grant`]): a
    /// `grant+jwt` header, a configured issuer that may sign credits, the key its header
    /// names, our audience, a life of at most [`MAX_GRANT_TTL_SECS`].
    pub fn verify_grant(&self, grant: &str) -> Result<Grant, Refusal> {
        let invalid =
            |why: String| Refusal::forbidden("grant_invalid", format!("the grant is refused: {why}"));
        if grant.len() > MAX_JWT_BYTES {
            return Err(invalid("it is longer than 8 KiB".into()));
        }
        let unverified = jsonwebtoken::dangerous::insecure_decode::<Issuer>(grant)
            .map_err(|_| invalid("it is not a JWT with an iss".into()))?;
        if !is_grant(&unverified.header) {
            return Err(invalid(format!("its header's typ is not {GRANT_TYP} (a token is no grant)")));
        }
        let site_id = unverified.claims.iss;
        let site =
            self.sites.get(&site_id).ok_or_else(|| invalid("its issuer is not a configured site".into()))?;
        if !site.policy.scopes.contains(Scope::AmountsCredit) {
            return Err(invalid(format!("{site_id}'s key may not sign credits (amounts:credit)")));
        }
        let key = site.key(&site_id, unverified.header.kid.as_deref()).map_err(invalid)?;
        let claims = jsonwebtoken::decode::<GrantClaims>(grant, &key.decoding, &key.grants)
            .map_err(|e| invalid(e.to_string()))?
            .claims;
        let now = now();
        if claims.iat.is_some_and(|iat| iat > now.saturating_add(LEEWAY_SECS)) {
            return Err(invalid("it was issued in the future".into()));
        }
        let lifetime = claims.exp.saturating_sub(claims.iat.unwrap_or(now).min(now));
        if lifetime > MAX_GRANT_TTL_SECS + LEEWAY_SECS {
            return Err(invalid(format!(
                "it lives {lifetime} s; a grant lives at most {MAX_GRANT_TTL_SECS} s"
            )));
        }
        let site_id = SiteId::parse(&site_id).map_err(|e| invalid(e.message))?;
        Ok(Grant {
            site: site_id,
            user: claims.sub,
            op_id: claims.op_id,
            data_type: claims.data_type,
            delta: claims.delta,
            valid_until: claims.exp.saturating_add(LEEWAY_SECS),
        })
    }

    /// Mints a page's token (no `scope`: the page set), as the site's backend would.
    pub fn mint(&self, site: &str, user: &str, ttl_secs: u64) -> anyhow::Result<String> {
        self.mint_token(site, user, ttl_secs, None, false)
    }

    /// Mints a token with `scopes` (and `adm` when `admin`), for the site's backend itself:
    /// `hub token --scope`, `hub agent`, tests. Fails unless the site may sign it.
    pub fn mint_scoped(
        &self,
        site: &str,
        user: &str,
        ttl_secs: u64,
        scopes: Scopes,
        admin: bool,
    ) -> anyhow::Result<String> {
        self.mint_token(site, user, ttl_secs, Some(scopes), admin)
    }

    fn mint_token(
        &self,
        site: &str,
        user: &str,
        ttl_secs: u64,
        scopes: Option<Scopes>,
        admin: bool,
    ) -> anyhow::Result<String> {
        let (entry, key, encoding) = self.signing_key(site)?;
        let policy = &entry.policy;
        if let Some(missing) = scopes.unwrap_or(Scopes::PAGE).without(policy.scopes).iter().next() {
            bail!("site {site} may not sign {missing}; add it to the site's scopes");
        }
        if admin && !policy.admin {
            bail!("site {site} may not sign admin tokens; set admin = true for it");
        }
        if ttl_secs > policy.max_token_ttl_secs {
            bail!("site {site}'s tokens live at most {} s (max_token_ttl_secs)", policy.max_token_ttl_secs);
        }
        let now = now();
        let claims = Claims {
            iss: site.into(),
            sub: user.into(),
            aud: self.hub_id.clone(),
            exp: now.saturating_add(ttl_secs),
            iat: Some(now),
            nbf: None,
            adm: admin,
            scope: scopes.map(|s| s.to_string()),
        };
        Ok(jsonwebtoken::encode(&header(key, None), &claims, encoding)?)
    }

    /// Mints a grant for one credit, as the site's backend does when it decides a user
    /// earned it.
    pub fn mint_grant(
        &self,
        site: &str,
        user: &str,
        op_id: &str,
        data_type: &str,
        delta: Map<String, Value>,
        ttl_secs: u64,
    ) -> anyhow::Result<String> {
        let (_, key, encoding) = self.signing_key(site)?;
        let now = now();
        let claims = GrantClaims {
            iss: site.into(),
            sub: user.into(),
            aud: self.hub_id.clone(),
            exp: now + ttl_secs.min(MAX_GRANT_TTL_SECS),
            iat: Some(now),
            op_id: op_id.into(),
            data_type: data_type.into(),
            delta,
        };
        Ok(jsonwebtoken::encode(&header(key, Some(GRANT_TYP)), &claims, encoding)?)
    }

    /// The scopes `site`'s key may sign, if it is configured.
    pub fn signable(&self, site: &str) -> Option<Scopes> {
        self.sites.get(site).map(|s| s.policy.scopes)
    }

    /// Fails, saying why, unless the site can sign tokens with `scopes`: a program that will
    /// mint tokens for a long time (`hub agent`) checks this once at start.
    pub fn check_can_mint(&self, site: &str, scopes: Scopes) -> anyhow::Result<()> {
        let (entry, _, _) = self.signing_key(site)?;
        if let Some(missing) = scopes.without(entry.policy.scopes).iter().next() {
            bail!("site {site} may not sign {missing}; add it to the site's scopes");
        }
        Ok(())
    }

    /// The site's first key that can sign, in configuration order.
    fn signing_key(&self, site: &str) -> anyhow::Result<(&SiteKeys, &Key, &EncodingKey)> {
        let entry = self.sites.get(site).with_context(|| format!("no site {site} is configured"))?;
        entry.keys.iter().find_map(|k| k.encoding.as_ref().map(|e| (entry, k, e))).with_context(|| {
            format!("site {site} has only public keys; add private_key_pem to mint its tokens")
        })
    }
}

/// Why a token that expired longer ago than its site's token lifetime is refused: it no longer
/// names its user, so that an old token, leaked, cannot use up that user's rate limit.
const LONG_EXPIRED: &str = "the token expired longer ago than its site's tokens live";

/// Why a token jsonwebtoken found expired is refused: [`AuthError::Expired`] when every other
/// claim holds (its signature, issuer, audience and subject, and it was not revoked) and it
/// expired within its site's token lifetime, so that only a token its site really issued for
/// this hub, lately, names a user; else why not.
fn expired(token: &str, key: &Key, site_id: &str, policy: &Policy) -> AuthError {
    let claims = match jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.grants) {
        Ok(decoded) => decoded.claims,
        Err(e) => return AuthError::Invalid(e.to_string()),
    };
    if claims.exp.saturating_add(policy.max_token_ttl_secs) < now() {
        return AuthError::Invalid(LONG_EXPIRED.into());
    }
    if policy.tokens_issued_after.is_some_and(|after| claims.iat.is_none_or(|iat| iat < after)) {
        return AuthError::Revoked(format!("the token was issued before {site_id}'s tokens_issued_after"));
    }
    match (SiteId::parse(site_id), UserId::parse(&claims.sub)) {
        (Ok(site), Ok(user)) => AuthError::Expired { site, user },
        _ => AuthError::Invalid("sub is not a user id".into()),
    }
}

fn header(key: &Key, typ: Option<&str>) -> Header {
    let mut header = Header::new(key.algorithm);
    header.kid.clone_from(&key.kid);
    if let Some(typ) = typ {
        header.typ = Some(typ.into());
    }
    header
}

/// Whether a header's `typ` says grant (compared as RFC 8725 asks: without case, and
/// with or without the `application/` prefix).
fn is_grant(header: &Header) -> bool {
    header.typ.as_deref().is_some_and(|typ| {
        let typ = typ.to_ascii_lowercase();
        typ.strip_prefix("application/").unwrap_or(&typ) == GRANT_TYP
    })
}

/// The start of a long value, for a message.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// What `site`'s keys let it do, once every one of them loads: each key's algorithm and
/// `kid`, and whether `hub token` and `hub agent` can mint its tokens (only with a secret or
/// a private key). For `hub check`; the error of a key that does not load names the key.
pub fn describe_site(site: &Site, hub_id: &str) -> anyhow::Result<String> {
    let (keys, _) = site_keys(site, hub_id)?;
    let name = |key: &Key| {
        let kid = key.kid.as_deref().map_or_else(|| "no kid".to_owned(), |kid| format!("kid {kid}"));
        format!("{:?} ({kid}", key.algorithm)
    };
    let verifies: Vec<String> = site
        .key_materials()
        .iter()
        .zip(&keys.keys)
        .map(|(m, key)| {
            let derived = if m.public_key_pem.is_none() && m.private_key_pem.is_some() {
                ", its public key derived from private_key_pem"
            } else {
                ""
            };
            format!("{}{derived})", name(key))
        })
        .collect();
    let mints = match keys.keys.iter().find(|k| k.encoding.is_some()) {
        Some(key) => format!("`hub token` and `hub agent` can mint its tokens, with {})", name(key)),
        None => "`hub token` and `hub agent` cannot mint its tokens (only public keys; add \
                 private_key_pem to mint)"
            .to_owned(),
    };
    Ok(format!("verifies tokens signed with {}; {mints}", verifies.join(", ")))
}

/// A site's keys and policies, and each key's material (see [`load_key`]).
fn site_keys(site: &Site, hub_id: &str) -> anyhow::Result<(SiteKeys, Vec<String>)> {
    let materials = site.key_materials();
    let (keys, materials): (Vec<Key>, Vec<String>) = materials
        .iter()
        .map(|m| {
            load_key(m, &site.id, hub_id).with_context(|| match m.kid {
                Some(kid) => format!("key {kid}"),
                None => "its key".into(),
            })
        })
        .collect::<anyhow::Result<Vec<(Key, String)>>>()?
        .into_iter()
        .unzip();
    let policy = Policy {
        scopes: site.signable_scopes()?,
        admin: site.admin,
        max_token_ttl_secs: site.max_token_ttl_secs,
        tokens_issued_after: site.tokens_issued_after_secs()?,
        ceilings: Ceilings {
            per_op: site.max_credit_per_op,
            per_user_per_day: site.max_credits_per_user_per_day,
        },
    };
    Ok((SiteKeys { keys, policy }, materials))
}

/// The HS256 secret a key names, from wherever it is kept: the file, the environment (read
/// at start only: a running process keeps the environment it started with), or a file
/// (reread on every SIGHUP). Each failure says what to do about it.
fn secret_of(m: &KeyMaterial<'_>) -> anyhow::Result<Option<String>> {
    Ok(match (m.secret, m.secret_env, m.secret_file) {
        (Some(secret), None, None) => Some(secret.to_owned()),
        (None, Some(var), None) => Some(std::env::var(var).map_err(|_| {
            anyhow!(
                "environment variable {var} (secret_env) is not set; set it in the hub's environment \
                 (under systemd, a line {var}=… in the unit's EnvironmentFile)"
            )
        })?),
        (None, None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow!(
                    "cannot read secret_file {}: {e}; make it readable by the user the hub runs as",
                    path.display()
                )
            })?;
            Some(text.trim_end_matches(['\n', '\r']).to_owned())
        }
        (None, None, None) => None,
        _ => bail!("give one of secret, secret_env and secret_file"),
    })
}

/// How to get the public key of an Ed25519 private key, for a message.
const DERIVE_PUBLIC: &str = "openssl pkey -in private.pem -pubout";

/// An Ed25519 key from its PEMs. With only the private key, the public key is derived from
/// it: the site then verifies and mints. With both, they must belong together.
fn ed25519(
    public_pem: Option<&str>,
    private_pem: Option<&str>,
) -> anyhow::Result<(DecodingKey, Option<EncodingKey>, String)> {
    let private = private_pem
        .map(|pem| {
            SigningKey::from_pkcs8_pem(pem)
                .map_err(|e| anyhow!("private_key_pem is not an Ed25519 private key in PKCS#8 PEM ({e})"))
        })
        .transpose()?;
    let public = match (public_pem, &private) {
        (Some(pem), _) => VerifyingKey::from_public_key_pem(pem).map_err(|e| {
            anyhow!("public_key_pem is not an Ed25519 public key in PEM ({e}); make it with {DERIVE_PUBLIC}")
        })?,
        (None, Some(private)) => private.verifying_key(),
        (None, None) => bail!("no Ed25519 key: give public_key_pem, private_key_pem or both"),
    };
    let encoding = private_pem
        .map(|pem| EncodingKey::from_ed_pem(pem.as_bytes()))
        .transpose()
        .context("private_key_pem is not an Ed25519 private key in PKCS#8 PEM")?;
    let material = format!("ed25519 {}", base64::engine::general_purpose::STANDARD.encode(public.as_bytes()));
    Ok((DecodingKey::from_ed_der(public.as_bytes()), encoding, material))
}

fn load_key(m: &KeyMaterial<'_>, site: &str, hub_id: &str) -> anyhow::Result<(Key, String)> {
    let secret = secret_of(m)?;
    // `material` is what two sites must never share: with one key, either site could speak
    // as the other.
    let (algorithm, decoding, encoding, material) = match (secret, m.public_key_pem, m.private_key_pem) {
        (Some(secret), None, None) => {
            if secret.len() < 32 {
                bail!("the HS256 secret must be at least 32 bytes; make one with `openssl rand -base64 48`");
            }
            let bytes = secret.as_bytes();
            let keys = (DecodingKey::from_secret(bytes), Some(EncodingKey::from_secret(bytes)));
            (Algorithm::HS256, keys.0, keys.1, format!("secret {secret}"))
        }
        (None, public, private) if public.is_some() || private.is_some() => {
            let (decoding, encoding, material) = ed25519(public, private)?;
            (Algorithm::EdDSA, decoding, encoding, material)
        }
        (Some(_), _, _) => {
            bail!("give either an HS256 secret or an Ed25519 key (public_key_pem, private_key_pem), not both")
        }
        (None, _, _) => bail!(
            "no key: give secret, secret_env or secret_file (HS256), or public_key_pem and/or \
             private_key_pem (Ed25519)"
        ),
    };
    let mut tokens = Validation::new(algorithm);
    tokens.set_issuer(&[site]);
    tokens.set_audience(&[hub_id]);
    tokens.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    tokens.validate_nbf = true;
    tokens.leeway = LEEWAY_SECS;
    let mut grants = tokens.clone();
    grants.validate_exp = false;
    let key = Key { kid: m.kid.map(str::to_owned), algorithm, decoding, encoding, tokens, grants };
    check_pair(&key, site, hub_id)?;
    Ok((key, material))
}

/// Fails unless a token the key signs passes its own check, as the tokens `hub token` and
/// the site's backend mint must: a private key that does not belong to the public key would
/// mint only tokens the hub refuses (`401 invalid_token`).
fn check_pair(key: &Key, site: &str, hub_id: &str) -> anyhow::Result<()> {
    let Some(encoding) = &key.encoding else { return Ok(()) };
    let now = now();
    let probe = Claims {
        iss: site.into(),
        sub: "hub-key-check".into(),
        aud: hub_id.into(),
        exp: now + 60,
        iat: Some(now),
        nbf: None,
        adm: false,
        scope: None,
    };
    let token =
        jsonwebtoken::encode(&header(key, None), &probe, encoding).context("cannot sign with the key")?;
    jsonwebtoken::decode::<Claims>(&token, &key.decoding, &key.tokens).map_err(|_| {
        anyhow!(
            "private_key_pem does not belong to public_key_pem: the tokens it signs would be refused \
             (401 invalid_token); put its own public key in public_key_pem ({DERIVE_PUBLIC}), or \
             remove private_key_pem"
        )
    })?;
    Ok(())
}
