//! A catalogue of token attacks against a real hub over real HTTP: forged, stale, misdirected
//! and borrowed tokens are refused with 401 or 403 and store nothing; the ways a token may
//! legitimately travel (the `Authorization` header, never a body or a URL; EdDSA signatures;
//! the admin claim) are accepted.

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use hub::auth::Claims;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use rand_core::OsRng;
use reqwest::Method;
use serde::Serialize;
use serde_json::{Value, json};
use support::{Reply, SiteClient, TestHub, site_secret};

/// The test hub's id: every token's `aud`.
const HUB_ID: &str = "test-hub";
const SITE: &str = "roflfaucet";
const OTHER_SITE: &str = "clickforcharity";
const USER: &str = "8-evans";
const VICTIM: &str = "13-alice";

/// Claims `site`'s backend would put in a fresh token for `user`.
fn claims(site: &str, user: &str) -> Claims {
    let now = get_current_timestamp();
    Claims {
        iss: site.into(),
        sub: user.into(),
        aud: HUB_ID.into(),
        exp: now + 600,
        iat: Some(now),
        nbf: None,
        adm: false,
        scope: None,
    }
}

fn hs256(claims: &impl Serialize, secret: &[u8]) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// A token signed with `site`'s own secret: what its backend mints.
fn genuine(claims: &impl Serialize, site: &str) -> String {
    hs256(claims, site_secret(site).as_bytes())
}

fn b64(json: &Value) -> String {
    URL_SAFE_NO_PAD.encode(json.to_string())
}

/// An Ed25519 key pair as PEM: (PKCS#8 private key, SPKI public key).
fn ed25519_pems() -> (String, String) {
    let key = SigningKey::generate(&mut OsRng);
    let private = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let public = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    (private, public)
}

fn eddsa(claims: &impl Serialize, private_pem: &str) -> String {
    let key = EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::EdDSA), claims, &key).unwrap()
}

/// A hub holding records of [`USER`] and [`VICTIM`], written by `writer` (a site whose
/// tokens the hub can mint), and a snapshot of its store taken after them.
struct Guarded {
    hub: TestHub,
    before: Vec<String>,
}

impl Guarded {
    async fn start() -> Guarded {
        Self::start_with(SITE, |_| {}).await
    }

    async fn start_with(writer: &str, tweak: impl FnOnce(&mut hub::config::Config)) -> Guarded {
        // Attacks are many requests without a valid token from one address: let each reach
        // the token check rather than the per-address rate limit.
        let hub = TestHub::start_with(|config| {
            config.limits.unauthenticated_requests_per_minute = 10_000;
            config.limits.requests_per_minute = 10_000;
            tweak(config);
        })
        .await;
        for user in [USER, VICTIM] {
            let page = hub.site(writer, user);
            page.delta("balance", 100, &format!("seed-{user}")).await.assert_ok();
            page.push("profile", json!({"display_name": user})).await.assert_ok();
        }
        let before = hub.snapshot();
        assert!(!before.is_empty());
        Guarded { hub, before }
    }

    /// A page of `site` acting for `user` that presents `token` (no header when `None`).
    fn page(&self, site: &str, user: &str, token: Option<String>) -> SiteClient {
        SiteClient {
            url: self.hub.url.clone(),
            client: support::client(),
            token,
            site: site.into(),
            user: user.into(),
        }
    }

    #[track_caller]
    fn assert_untouched(&self, case: &str) {
        assert_eq!(self.hub.snapshot(), self.before, "{case}: the store changed");
    }

    /// Asserts that `page` can neither read nor write its user's records: each of a
    /// timestamp check, a get, a push and a delta is answered `status` `code`, and nothing
    /// is stored.
    async fn assert_locked_out(&self, case: &str, page: &SiteClient, status: u16, code: &str) {
        let attempts = [
            ("timestamp", page.timestamp("balance,profile").await),
            ("get", page.get("balance").await),
            ("push", page.push("profile", json!({"bio": "pwned"})).await),
            ("delta", page.delta("balance", 1_000, "attack-op").await),
        ];
        for (action, reply) in attempts {
            assert_refused(&format!("{case} ({action})"), &reply, status, code);
        }
        self.assert_untouched(case);
    }
}

#[track_caller]
fn assert_refused(case: &str, reply: &Reply, status: u16, code: &str) {
    assert_eq!((reply.status.as_u16(), reply.code()), (status, code), "{case}: {}", reply.body);
    assert_eq!(reply.body["success"], false, "{case}");
    assert!(
        reply.body["error"].as_str().is_some_and(|e| !e.trim().is_empty()),
        "{case}: no message: {}",
        reply.body
    );
}

#[tokio::test]
async fn requests_without_a_token_are_refused() {
    let g = Guarded::start().await;
    g.assert_locked_out("no Authorization header", &g.page(SITE, USER, None), 401, "missing_token").await;
    let valid = g.hub.token(SITE, USER);
    for header in ["Basic dXNlcjpwYXNz".to_owned(), format!("Token {valid}"), format!("Bearer{valid}"), valid]
    {
        let reply = g
            .hub
            .request(Method::GET, "/api/sync.php?action=timestamp&user_id=8-evans&data_type=balance")
            .header("authorization", &header)
            .send()
            .await
            .unwrap();
        assert_refused(&format!("Authorization: {header}"), &Reply::from(reply).await, 401, "missing_token");
    }
    g.assert_untouched("not a bearer token");
    g.hub.stop().await;
}

#[tokio::test]
async fn garbage_bearer_tokens_are_refused() {
    let g = Guarded::start().await;
    let genuine_token = g.hub.token(SITE, USER);
    let (header, payload, _) = {
        let mut parts = genuine_token.split('.');
        (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
    };
    for garbage in [
        "garbage".to_owned(),
        "a.b.c".into(),
        "..".into(),
        "x".repeat(4000),
        format!("{header}.{payload}"),
        format!("{header}.{payload}.not-base64!"),
        format!("{header}.{payload}.{payload}"),
        format!("{genuine_token}.extra"),
        format!("{}.{}.", b64(&json!({"alg": "HS256"})), URL_SAFE_NO_PAD.encode("not json")),
        format!("{}.{}.sig", b64(&json!({"alg": "HS256"})), b64(&json!(["iss", SITE]))),
    ] {
        let page = g.page(SITE, USER, Some(garbage.clone()));
        g.assert_locked_out(&format!("Bearer {garbage:.40}"), &page, 401, "invalid_token").await;
    }
    g.hub.stop().await;
}

#[tokio::test]
async fn alg_none_tokens_are_refused() {
    let g = Guarded::start().await;
    let payload = b64(&serde_json::to_value(claims(SITE, USER)).unwrap());
    let genuine_signature = g.hub.token(SITE, USER).rsplit('.').next().unwrap().to_owned();
    for alg in ["none", "None", "NONE", "nOnE", ""] {
        let header = b64(&json!({"alg": alg, "typ": "JWT"}));
        for signature in ["", genuine_signature.as_str()] {
            let token = format!("{header}.{payload}.{signature}");
            let page = g.page(SITE, USER, Some(token));
            let case = format!("alg {alg:?}, signed: {}", !signature.is_empty());
            g.assert_locked_out(&case, &page, 401, "invalid_token").await;
        }
    }
    // Signature stripping: the site's own algorithm, no signature.
    let header = b64(&json!({"alg": "HS256", "typ": "JWT"}));
    let page = g.page(SITE, USER, Some(format!("{header}.{payload}.")));
    g.assert_locked_out("HS256 with an empty signature", &page, 401, "invalid_token").await;
    g.hub.stop().await;
}

#[tokio::test]
async fn tokens_signed_with_another_sites_secret_are_refused() {
    let g = Guarded::start().await;
    let forged = hs256(&claims(SITE, USER), site_secret(OTHER_SITE).as_bytes());
    g.assert_locked_out(
        "iss roflfaucet, clickforcharity's secret",
        &g.page(SITE, USER, Some(forged)),
        401,
        "invalid_token",
    )
    .await;
    let guessed = hs256(&claims(SITE, USER), b"secret");
    g.assert_locked_out("a guessed secret", &g.page(SITE, USER, Some(guessed)), 401, "invalid_token").await;
    g.hub.stop().await;
}

#[tokio::test]
async fn hmac_algorithms_other_than_the_sites_are_refused() {
    let g = Guarded::start().await;
    let secret = site_secret(SITE);
    for algorithm in [Algorithm::HS384, Algorithm::HS512] {
        let token = encode(
            &Header::new(algorithm),
            &claims(SITE, USER),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let page = g.page(SITE, USER, Some(token));
        g.assert_locked_out(&format!("{algorithm:?} with the right secret"), &page, 401, "invalid_token")
            .await;
    }
    g.hub.stop().await;
}

#[tokio::test]
async fn tampered_tokens_are_refused() {
    let g = Guarded::start().await;
    let token = g.hub.token(SITE, USER);
    // Used once, the genuine token is remembered as verified; no altered copy may pass as it.
    g.page(SITE, USER, Some(token.clone())).timestamp("balance").await.assert_ok();
    let parts: Vec<&str> = token.split('.').collect();
    let mut tampered = claims(SITE, VICTIM);
    let page = |payload: &Claims, user: &str| {
        let payload = b64(&serde_json::to_value(payload).unwrap());
        g.page(SITE, user, Some(format!("{}.{payload}.{}", parts[0], parts[2])))
    };
    g.assert_locked_out("sub changed to the victim", &page(&tampered, VICTIM), 401, "invalid_token").await;
    tampered = claims(SITE, USER);
    tampered.adm = true;
    g.assert_locked_out("adm added", &page(&tampered, USER), 401, "invalid_token").await;
    tampered = claims(SITE, USER);
    tampered.exp += 365 * 24 * 3600;
    g.assert_locked_out("exp extended", &page(&tampered, USER), 401, "invalid_token").await;
    let mut signature = parts[2].to_owned();
    let first = if signature.starts_with('A') { "B" } else { "A" };
    signature.replace_range(..1, first);
    let flipped = g.page(SITE, USER, Some(format!("{}.{}.{signature}", parts[0], parts[1])));
    g.assert_locked_out("signature altered", &flipped, 401, "invalid_token").await;
    g.hub.stop().await;
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let g = Guarded::start().await;
    let now = get_current_timestamp();
    // Told to fetch a fresh one while it expired within its site's token lifetime (an hour);
    // older, it no longer names its user.
    for (exp, code) in [
        (now - 120, "token_expired"),
        (now - 3000, "token_expired"),
        (now - 7200, "invalid_token"),
        (0, "invalid_token"),
    ] {
        let mut expired = claims(SITE, USER);
        expired.iat = Some(exp.saturating_sub(600));
        expired.exp = exp;
        let page = g.page(SITE, USER, Some(genuine(&expired, SITE)));
        g.assert_locked_out(&format!("exp {} s ago", now - exp), &page, 401, code).await;
    }
    // Within the 30 s leeway for clock skew, a just-expired token still reads.
    let mut just_expired = claims(SITE, USER);
    just_expired.exp = now - 5;
    g.page(SITE, USER, Some(genuine(&just_expired, SITE))).timestamp("balance").await.assert_ok();
    g.assert_untouched("a read within the leeway");
    g.hub.stop().await;
}

#[tokio::test]
async fn a_token_already_accepted_is_refused_once_it_expires() {
    let g = Guarded::start().await;
    let now = get_current_timestamp();
    // Valid for two more seconds, within the 30 s leeway.
    let mut ending = claims(SITE, USER);
    ending.exp = now - 28;
    let page = g.page(SITE, USER, Some(genuine(&ending, SITE)));
    page.timestamp("balance").await.assert_ok();
    while get_current_timestamp() <= ending.exp + 30 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    g.assert_locked_out("expired after its first use", &page, 401, "token_expired").await;
    g.hub.stop().await;
}

#[tokio::test]
async fn tokens_not_yet_valid_are_refused() {
    let g = Guarded::start().await;
    let mut early = claims(SITE, USER);
    early.nbf = Some(get_current_timestamp() + 600);
    let page = g.page(SITE, USER, Some(genuine(&early, SITE)));
    g.assert_locked_out("nbf in 10 minutes", &page, 401, "invalid_token").await;
    g.hub.stop().await;
}

#[tokio::test]
async fn tokens_issued_in_the_future_are_refused() {
    let g = Guarded::start().await;
    let now = get_current_timestamp();
    let mut future = claims(SITE, USER);
    future.iat = Some(now + 3600);
    future.exp = now + 7200;
    let page = g.page(SITE, USER, Some(genuine(&future, SITE)));
    g.assert_locked_out("iat in an hour", &page, 401, "invalid_token").await;
    g.hub.stop().await;
}

#[tokio::test]
async fn tokens_for_another_audience_are_refused() {
    let g = Guarded::start().await;
    for aud in ["other-hub", "", "TEST-HUB", "test-hub "] {
        let mut claims = claims(SITE, USER);
        claims.aud = aud.into();
        let page = g.page(SITE, USER, Some(genuine(&claims, SITE)));
        g.assert_locked_out(&format!("aud {aud:?}"), &page, 401, "invalid_token").await;
    }
    g.hub.stop().await;
}

#[tokio::test]
async fn tokens_from_unknown_issuers_are_refused() {
    let g = Guarded::start().await;
    let evil_secret = b"evil-site-secret-that-is-at-least-32-bytes-long";
    for iss in ["evil-site", "", "ROFLFAUCET", "roflfaucet "] {
        let mut claims = claims(SITE, USER);
        claims.iss = iss.into();
        let page = g.page(SITE, USER, Some(hs256(&claims, evil_secret)));
        g.assert_locked_out(&format!("iss {iss:?}"), &page, 401, "invalid_token").await;
    }
    let no_iss = json!({"sub": USER, "aud": HUB_ID, "exp": get_current_timestamp() + 600});
    let page = g.page(SITE, USER, Some(genuine(&no_iss, SITE)));
    g.assert_locked_out("no iss", &page, 401, "invalid_token").await;
    g.hub.stop().await;
}

#[tokio::test]
async fn tokens_missing_a_required_claim_are_refused() {
    let g = Guarded::start().await;
    let now = get_current_timestamp();
    let full = json!({"iss": SITE, "sub": USER, "aud": HUB_ID, "exp": now + 600, "iat": now});
    for claim in ["exp", "sub", "aud"] {
        let mut partial = full.clone();
        partial.as_object_mut().unwrap().remove(claim);
        let page = g.page(SITE, USER, Some(genuine(&partial, SITE)));
        g.assert_locked_out(&format!("no {claim}"), &page, 401, "invalid_token").await;
    }
    for (claim, value) in [("exp", json!("tomorrow")), ("exp", json!(null)), ("sub", json!(8))] {
        let mut odd = full.clone();
        odd[claim] = value.clone();
        let page = g.page(SITE, USER, Some(genuine(&odd, SITE)));
        g.assert_locked_out(&format!("{claim}: {value}"), &page, 401, "invalid_token").await;
    }
    g.hub.stop().await;
}

#[tokio::test]
async fn tokens_whose_subject_is_not_a_user_id_are_refused() {
    let g = Guarded::start().await;
    for sub in ["../etc/passwd", "..", "", "a/b", &"x".repeat(65)] {
        let token = genuine(&claims(SITE, sub), SITE);
        let page = g.page(SITE, USER, Some(token));
        g.assert_locked_out(&format!("sub {sub:?}"), &page, 401, "invalid_token").await;
    }
    g.hub.stop().await;
}

/// A hub where [`SITE`] signs with Ed25519 and the hub holds only its public key.
async fn eddsa_hub(public_pem: &str) -> Guarded {
    Guarded::start_with(OTHER_SITE, |config| {
        let site = config.sites.iter_mut().find(|s| s.id == SITE).unwrap();
        site.secret = None;
        site.public_key_pem = Some(public_pem.to_owned());
    })
    .await
}

#[tokio::test]
async fn eddsa_tokens_signed_with_the_sites_key_are_accepted() {
    let (private, public) = ed25519_pems();
    let g = eddsa_hub(&public).await;
    let page = g.page(SITE, USER, Some(eddsa(&claims(SITE, USER), &private)));
    page.timestamp("balance").await.assert_ok();
    assert_eq!(page.coins().await, 100);
    let reply = page.delta("balance", -10, "eddsa-op").await;
    assert_eq!(reply.assert_ok()["data"]["coins"], 90);
    page.push("profile", json!({"bio": "signed with Ed25519"})).await.assert_ok();
    g.hub.stop().await;
}

#[tokio::test]
async fn algorithm_confusion_with_an_eddsa_sites_public_key_is_refused() {
    let (private, public) = ed25519_pems();
    let g = eddsa_hub(&public).await;
    let confused = hs256(&claims(SITE, USER), public.as_bytes());
    g.assert_locked_out(
        "HS256 keyed with the public PEM",
        &g.page(SITE, USER, Some(confused)),
        401,
        "invalid_token",
    )
    .await;
    let encoded = URL_SAFE_NO_PAD.encode(public.as_bytes());
    let confused = hs256(&claims(SITE, USER), encoded.as_bytes());
    g.assert_locked_out(
        "HS256 keyed with encoded PEM",
        &g.page(SITE, USER, Some(confused)),
        401,
        "invalid_token",
    )
    .await;

    let (stranger, _) = ed25519_pems();
    let forged = eddsa(&claims(SITE, USER), &stranger);
    g.assert_locked_out("EdDSA with another key", &g.page(SITE, USER, Some(forged)), 401, "invalid_token")
        .await;
    // The site's genuine key signs only its own tokens: an HS256 site's iss is refused.
    let crossed = eddsa(&claims(OTHER_SITE, USER), &private);
    g.assert_locked_out(
        "EdDSA for an HS256 site",
        &g.page(OTHER_SITE, USER, Some(crossed)),
        401,
        "invalid_token",
    )
    .await;
    g.hub.stop().await;
}

#[tokio::test]
async fn a_token_for_one_user_never_reads_or_writes_another() {
    let g = Guarded::start().await;
    let attacker = g.page(SITE, VICTIM, Some(g.hub.token(SITE, USER)));
    g.assert_locked_out("USER's token on VICTIM", &attacker, 403, "wrong_user").await;
    let admin = g.page(SITE, VICTIM, Some(g.hub.admin_token(SITE, USER)));
    g.assert_locked_out("USER's admin token on VICTIM", &admin, 403, "wrong_user").await;
    let reply = admin.push("roles", json!({"global_roles": ["admin"]})).await;
    assert_refused("an admin granting VICTIM a global role", &reply, 403, "wrong_user");
    g.assert_untouched("wrong user");
    g.hub.stop().await;
}

#[tokio::test]
async fn site_id_must_be_the_tokens_issuer() {
    let g = Guarded::start().await;
    let posing = g.page(OTHER_SITE, USER, Some(g.hub.token(SITE, USER)));
    let reply = posing.push("profile", json!({"bio": "posing"})).await;
    assert_refused("push naming another site", &reply, 403, "wrong_site");
    let reply = posing.delta("balance", 10, "posing-op").await;
    assert_refused("delta naming another site", &reply, 403, "wrong_site");
    let reply = g
        .hub
        .request(
            Method::GET,
            &format!("/api/sync.php?action=get&user_id={USER}&data_type=balance&site_id={OTHER_SITE}"),
        )
        .bearer_auth(g.hub.token(SITE, USER))
        .send()
        .await
        .unwrap();
    assert_refused("GET naming another site", &Reply::from(reply).await, 403, "wrong_site");
    g.assert_untouched("wrong site");
    g.hub.stop().await;
}

#[tokio::test]
async fn a_site_cannot_write_another_sites_roles() {
    let g = Guarded::start().await;
    let page = g.hub.site(SITE, USER);
    let admin = g.page(SITE, USER, Some(g.hub.admin_token(SITE, USER)));
    for roles in [
        json!({"site_roles": {OTHER_SITE: ["admin"]}}),
        json!({"site_roles": {SITE: ["recipient"], OTHER_SITE: ["admin"]}}),
        json!({"site_roles": {"ROFLFAUCET": ["admin"]}}),
    ] {
        for writer in [&page, &admin] {
            let reply = writer.push("roles", roles.clone()).await;
            assert_refused(&format!("{roles}"), &reply, 403, "foreign_site_roles");
        }
    }
    g.assert_untouched("foreign site roles");
    g.hub.stop().await;
}

#[tokio::test]
async fn global_roles_need_an_admin_token() {
    let g = Guarded::start().await;
    let page = g.hub.site(SITE, USER);
    for roles in [
        json!({"global_roles": ["admin"]}),
        json!({"global_roles": []}),
        json!({"global_roles": null}),
        json!({"site_roles": {SITE: ["recipient"]}, "global_roles": ["verified"]}),
    ] {
        let reply = page.push("roles", roles.clone()).await;
        assert_refused(&format!("{roles}"), &reply, 403, "admin_required");
    }
    let mut claims = claims(SITE, USER);
    claims.adm = true;
    let forged = hs256(&claims, site_secret(OTHER_SITE).as_bytes());
    let reply = g.page(SITE, USER, Some(forged)).push("roles", json!({"global_roles": ["admin"]})).await;
    assert_refused("adm in a forged token", &reply, 401, "invalid_token");
    g.assert_untouched("global roles without admin");

    let admin = g.page(SITE, USER, Some(g.hub.admin_token(SITE, USER)));
    admin.push("roles", json!({"global_roles": ["verified"]})).await.assert_ok();
    let reply = page.get("roles").await;
    assert_eq!(reply.assert_ok()["data"]["global_roles"], json!(["verified"]));
    g.hub.stop().await;
}

#[tokio::test]
async fn a_token_in_a_post_body_is_refused_with_or_without_one_in_the_header() {
    let g = Guarded::start().await;
    let token = g.hub.token(SITE, USER);
    let bodies = [
        json!({
            "action": "delta", "user_id": USER, "site_id": SITE, "data_type": "balance",
            "delta": {"coins": -7}, "op_id": "beacon-op", "token": token,
        }),
        json!({
            "action": "push", "user_id": USER, "site_id": SITE, "data_type": "profile",
            "data": {"bio": "sent on pagehide"}, "token": token,
        }),
    ];
    // Without the header the body is never read: the token is checked first.
    let bare = g.page(SITE, USER, None);
    for body in &bodies {
        assert_refused("a body token, no header", &bare.post(body).await, 401, "missing_token");
    }
    let page = g.page(SITE, USER, Some(token.clone()));
    for body in &bodies {
        let reply = page.post(body).await;
        assert_refused("a body token, a header too", &reply, 400, "invalid_request");
        assert!(reply.body["error"].as_str().unwrap().contains("token"), "{}", reply.body);
    }
    g.assert_untouched("tokens in bodies");
    g.hub.stop().await;
}

#[tokio::test]
async fn gets_take_their_token_from_the_header_only() {
    let g = Guarded::start().await;
    let token = g.hub.token(SITE, USER);
    for action in ["timestamp", "get"] {
        let base = format!("/api/sync.php?action={action}&user_id={USER}&data_type=balance");
        for param in ["access_token", "token"] {
            let reply = g.hub.request(Method::GET, &format!("{base}&{param}={token}")).send().await.unwrap();
            assert_refused(
                &format!("{action} with ?{param}="),
                &Reply::from(reply).await,
                401,
                "missing_token",
            );
        }
        let reply = g.hub.request(Method::GET, &base).json(&json!({"token": token})).send().await.unwrap();
        assert_refused(
            &format!("{action} with a body token"),
            &Reply::from(reply).await,
            401,
            "missing_token",
        );
    }
    g.assert_untouched("GET tokens outside the header");
    g.hub.stop().await;
}
