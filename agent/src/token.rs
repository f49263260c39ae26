//! The agent's tokens: signed with its site's key (jsonwebtoken), as the site's backend signs
//! its own, each for one user and a short while. Mints only; the hub verifies.

use jsonwebtoken::{EncodingKey, Header};
use protocol::{Scopes, SiteId, UserId};
use serde::Serialize;

use crate::config::Config;

/// Mints the agent's tokens for one site.
pub struct Signer {
    site: SiteId,
    /// The tokens' `aud`: the hub's id.
    hub_id: String,
    header: Header,
    key: EncodingKey,
    /// The tokens' `scope` claim.
    scope: String,
    ttl_secs: u64,
}

/// The claims the hub reads from a site's token; the agent's have no `nbf` and no `adm`.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
    scope: &'a str,
}

impl Signer {
    /// A signer with `site`'s key from `config`, for tokens with `scopes` that live
    /// `ttl_secs` (or the site's `max_token_ttl_secs`, if shorter). Fails, saying why, if the
    /// site is not configured, has no key to sign with, or may not sign `scopes`.
    pub fn new(config: &Config, site: SiteId, scopes: Scopes, ttl_secs: u64) -> anyhow::Result<Signer> {
        let signing = config.signing(&site, scopes)?;
        let mut header = Header::new(signing.algorithm);
        header.kid = signing.kid;
        Ok(Signer {
            site,
            hub_id: signing.hub_id,
            header,
            key: signing.key,
            scope: scopes.to_string(),
            ttl_secs: ttl_secs.min(signing.max_token_ttl_secs),
        })
    }

    /// A token for `user`, valid from now.
    pub fn mint(&self, user: &UserId) -> anyhow::Result<String> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: self.site.as_str(),
            sub: user.as_str(),
            aud: &self.hub_id,
            exp: now.saturating_add(self.ttl_secs),
            iat: now,
            scope: &self.scope,
        };
        Ok(jsonwebtoken::encode(&self.header, &claims, &self.key)?)
    }
}
