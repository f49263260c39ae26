//! What the authority tests share: a hub configured as a real deployment would be, and
//! tokens and grants signed by hand, as a site's backend — or an attacker holding its key —
//! would sign them.

use hub::config::{Config, Site, SiteKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use protocol::Scope;
use serde_json::{Value, json};

use super::{SiteClient, TestHub, site_secret};

/// The test hub's id: every token's and grant's `aud`.
pub const HUB_ID: &str = "test-hub";
/// A faucet with every default policy: its pages spend, its backend grants credits.
pub const FAUCET: &str = "roflfaucet";
/// Another site with every default policy.
pub const CHARITY: &str = "clickforcharity";
/// The site whose backend runs the agent and the network's admin tools: given
/// `amounts:set` and `admin`, with small ceilings.
pub const OFFICE: &str = "wrc";
/// A site configured to sign reads and sets only, like an agent-only site.
pub const READER: &str = "ledger-reader";
pub const USER: &str = "8-evans";
pub const VICTIM: &str = "13-alice";

pub fn now() -> u64 {
    get_current_timestamp()
}

/// The deployment: default policies for the faucet and the charity, a trusted office with
/// small ceilings, and a narrow reader; rate limits out of the way of the attacks.
pub fn deployment(config: &mut Config) {
    let site = |id: &str| Site {
        origins: vec![format!("https://{id}.example")],
        secret: Some(site_secret(id)),
        ..Site::new(id)
    };
    let mut office = site(OFFICE);
    office.scopes.push(Scope::AmountsSet.as_str().into());
    office.admin = true;
    office.max_credit_per_op = 1_000;
    office.max_credits_per_user_per_day = 1_500;
    let mut reader = site(READER);
    reader.scopes = vec!["sync:read".into(), "amounts:set".into()];
    config.sites = vec![site(FAUCET), site(CHARITY), office, reader];
    config.limits.requests_per_minute = 100_000;
    config.limits.unauthenticated_requests_per_minute = 100_000;
}

/// The configuration a hub started with [`deployment`] and `tweak` has, read again (what a
/// SIGHUP rereads).
pub fn config_of(hub: &TestHub, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = super::test_config(hub.dir.path());
    deployment(&mut config);
    tweak(&mut config);
    config
}

pub fn site_mut<'a>(config: &'a mut Config, id: &str) -> &'a mut Site {
    config.sites.iter_mut().find(|s| s.id == id).unwrap()
}

/// The secret of the key named `kid`.
pub fn kid_secret(kid: &str) -> String {
    format!("{kid}-a-secret-of-at-least-thirty-two-bytes")
}

/// An HS256 key named `kid`, with [`kid_secret`].
pub fn hs_key(kid: &str) -> SiteKey {
    SiteKey { kid: kid.into(), secret: Some(kid_secret(kid)), ..SiteKey::default() }
}

/// Signs `claims` with `algorithm` and `key`, with a header naming `kid` and `typ` if given.
pub fn sign_with(
    algorithm: Algorithm,
    key: &EncodingKey,
    kid: Option<&str>,
    typ: Option<&str>,
    claims: &Value,
) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    if typ.is_some() {
        header.typ = typ.map(str::to_owned);
    }
    encode(&header, claims, key).unwrap()
}

/// Signs `claims` with HS256 and `secret`.
pub fn hs256(secret: &str, kid: Option<&str>, typ: Option<&str>, claims: &Value) -> String {
    sign_with(Algorithm::HS256, &EncodingKey::from_secret(secret.as_bytes()), kid, typ, claims)
}

/// What `site`'s backend puts in a fresh token for `user`.
pub fn token_claims(site: &str, user: &str) -> Value {
    json!({"iss": site, "sub": user, "aud": HUB_ID, "iat": now(), "exp": now() + 600})
}

/// What `site`'s backend puts in a fresh grant of `amount` coins for `user`'s op.
pub fn grant_claims(site: &str, user: &str, op_id: &str, amount: i64) -> Value {
    json!({
        "iss": site, "sub": user, "aud": HUB_ID, "iat": now(), "exp": now() + 300,
        "op_id": op_id, "data_type": "balance", "delta": {"coins": amount},
    })
}

/// A token signed with `site`'s secret.
pub fn token(site: &str, claims: &Value) -> String {
    hs256(&site_secret(site), None, None, claims)
}

/// A grant signed with `site`'s secret.
pub fn grant(site: &str, claims: &Value) -> String {
    hs256(&site_secret(site), None, Some("grant+jwt"), claims)
}

/// A client of `site` acting for `user` with `token`.
pub fn client(hub: &TestHub, site: &str, user: &str, token: String) -> SiteClient {
    SiteClient {
        url: hub.url.clone(),
        client: super::client(),
        token: Some(token),
        site: site.into(),
        user: user.into(),
    }
}
