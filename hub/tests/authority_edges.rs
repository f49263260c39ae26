//! The edges of who may change what, beyond `tests/authority.rs`'s catalogue, tried over real
//! HTTP as a signed-in user with curl, as the holder of one site's leaked key, and as a
//! careless operator: odd forms of scope claims and grants, one site with keys of two
//! algorithms, credits racing a ceiling, two sites sharing a key, and what a reload changes
//! for tokens and ops the hub has already seen.

mod support;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
use hub::config::{Config, SiteKey};
use jsonwebtoken::{Algorithm, EncodingKey};
use rand_core::OsRng;
use serde_json::{Value, json};
use support::authority::*;
use support::{Reply, TestHub, site_secret};

/// A hub with [`deployment`] (then `tweak`), 100 coins credited to [`USER`] and
/// [`VICTIM`] by the faucet's backend.
async fn hub_with(tweak: impl FnOnce(&mut Config)) -> TestHub {
    let hub = TestHub::start_with(|config| {
        deployment(config);
        tweak(config);
    })
    .await;
    for user in [USER, VICTIM] {
        hub.site(FAUCET, user).delta("balance", 100, &format!("seed-{user}")).await.assert_ok();
    }
    hub
}

#[track_caller]
fn refused(case: &str, reply: &Reply, status: u16, code: &str) {
    assert_eq!((reply.status.as_u16(), reply.code()), (status, code), "{case}: {}", reply.body);
}

/// Two sites configured with the same key (a copy-pasted `secret`, one `secret_env` named
/// twice): with the small site's leaked secret, a token naming the admin site as `iss` would
/// get that site's policy — `adm`, `amounts:set`, its ceilings. The hub refuses to start on
/// such a configuration, and a reload refuses it too.
#[tokio::test]
async fn two_sites_sharing_one_secret_are_refused_at_start() {
    let shared = |config: &mut Config| {
        site_mut(config, CHARITY).secret = Some(site_secret(OFFICE));
    };
    let mut config = support::test_config(std::path::Path::new("unused"));
    deployment(&mut config);
    shared(&mut config);
    let at_start = hub::auth::Keys::from_config(&config).unwrap_err().to_string();
    assert!(at_start.contains("share a key"), "{at_start}");
    let hub = hub_with(|_| {}).await;
    let reload = hub.app.reload_sites(&config_of(&hub, shared));
    assert!(reload.is_err_and(|e| format!("{e:#}").contains("share a key")));
    // The charity's secret still signs for the charity only.
    let mut claims = token_claims(OFFICE, VICTIM);
    claims["adm"] = json!(true);
    let attacker = client(&hub, OFFICE, VICTIM, hs256(&site_secret(CHARITY), None, None, &claims));
    refused(
        "the charity's key posing as the office",
        &attacker.timestamp("balance").await,
        401,
        "invalid_token",
    );
}

/// A page's credit was applied but its answer lost; then the site rotates its key (the old
/// kid removed) or the operator takes `amounts:credit` from the site. The outbox resends the
/// op with the grant it stored: it answers as it did, a replay — not a final
/// `grant_invalid` that would make the client roll back a credit the hub holds.
#[tokio::test]
async fn an_applied_credit_replays_after_its_grants_key_is_removed_or_its_site_may_no_longer_credit() {
    let with_kids = |kids: &[&str]| {
        let keys: Vec<SiteKey> = kids.iter().map(|k| hs_key(k)).collect();
        move |config: &mut Config| site_mut(config, FAUCET).keys = keys
    };
    let hub = hub_with(with_kids(&["2026-old", "2026-new"])).await;
    let page = hub.page(FAUCET, USER);
    let old_grant = hs256(
        &kid_secret("2026-old"),
        Some("2026-old"),
        Some("grant+jwt"),
        &grant_claims(FAUCET, USER, "claim-1", 10),
    );
    page.delta_with_grant("balance", 10, "claim-1", &old_grant).await.assert_ok();
    let plain_grant = grant(FAUCET, &grant_claims(FAUCET, USER, "claim-2", 5));
    page.delta_with_grant("balance", 5, "claim-2", &plain_grant).await.assert_ok();
    let before = hub.snapshot();

    let mut failures = Vec::new();
    // The key rotation: the old kid goes.
    hub.app.reload_sites(&config_of(&hub, with_kids(&["2026-new"]))).unwrap();
    let retry = page.delta_with_grant("balance", 10, "claim-1", &old_grant).await;
    if !(retry.status == 200 && retry.body["replayed"] == true) {
        failures.push(format!("after the grant's kid was removed: {} {}", retry.status, retry.body));
    }
    // The operator takes credits from the faucet (say, while investigating abuse).
    hub.app
        .reload_sites(&config_of(&hub, |c| {
            with_kids(&["2026-new"])(c);
            site_mut(c, FAUCET).scopes.retain(|s| s != "amounts:credit");
        }))
        .unwrap();
    let page = hub.page(FAUCET, USER);
    let retry = page.delta_with_grant("balance", 5, "claim-2", &plain_grant).await;
    if !(retry.status == 200 && retry.body["replayed"] == true) {
        failures.push(format!("after the site lost amounts:credit: {} {}", retry.status, retry.body));
    }
    assert_eq!(hub.snapshot(), before, "a retry stored something");
    assert!(failures.is_empty(), "applied credits did not replay:\n{}", failures.join("\n"));
}

/// Scope claims that are not the plain space-separated names: the hub never reads more into
/// them than they say — an empty claim is no scope at all (not the page set), separators other
/// than a space and other cases are no scope names, a non-string claim is no token.
#[tokio::test]
async fn odd_scope_claims_never_widen_a_token() {
    let hub = hub_with(|_| {}).await;
    let before = hub.snapshot();
    let with_scope = |scope: Value| {
        let mut claims = token_claims(FAUCET, USER);
        claims["scope"] = scope;
        client(&hub, FAUCET, USER, token(FAUCET, &claims))
    };
    // Present but empty: nothing at all, not even a read.
    for empty in [json!(""), json!(" "), json!("   ")] {
        let page = with_scope(empty.clone());
        refused(&format!("scope {empty}: read"), &page.timestamp("balance").await, 403, "insufficient_scope");
        refused(
            &format!("scope {empty}: spend"),
            &page.delta("balance", -1, "s-1").await,
            403,
            "insufficient_scope",
        );
    }
    // Not names of scopes: the token is refused whole.
    for odd in [
        "sync:read\tamounts:credit",
        "sync:read,amounts:credit",
        "sync:read\namounts:credit",
        "sync:read\u{a0}amounts:credit",
        "Amounts:Credit",
        "amounts:credit\u{0}",
        "amounts:*",
        "*",
    ] {
        let page = with_scope(json!(odd));
        refused(&format!("scope {odd:?}"), &page.delta("balance", 10, "c-1").await, 401, "scope_not_allowed");
    }
    // Not a string.
    for odd in [json!(["amounts:credit"]), json!({"amounts:credit": true}), json!(1), json!(true)] {
        let page = with_scope(odd.clone());
        refused(&format!("scope {odd}"), &page.delta("balance", 10, "c-1").await, 401, "invalid_token");
    }
    // Repeats and extra spaces read as the names they repeat; null reads as absent: the page set.
    let page = with_scope(json!("  sync:read  sync:read amounts:spend "));
    page.timestamp("balance").await.assert_ok();
    refused("repeated names: credit", &page.delta("balance", 10, "c-1").await, 403, "insufficient_scope");
    refused(
        "repeated names: profile",
        &page.push("profile", json!({"bio": "x"})).await,
        403,
        "insufficient_scope",
    );
    let page = with_scope(Value::Null);
    page.timestamp("balance").await.assert_ok();
    refused("scope null: credit", &page.delta("balance", 10, "c-1").await, 403, "insufficient_scope");
    // `scp` (another issuer's claim name) is ignored, not read as a scope.
    let mut claims = token_claims(FAUCET, USER);
    claims["scp"] = json!(["amounts:credit", "amounts:set"]);
    let page = client(&hub, FAUCET, USER, token(FAUCET, &claims));
    refused("scp", &page.delta("balance", 10, "c-1").await, 403, "insufficient_scope");
    assert_eq!(page.delta("balance", -1, "spend-1").await.assert_ok()["data"]["coins"], 99);
    let after = hub.snapshot();
    assert_eq!(after.len(), before.len() + 2, "only the spend's op id and ledger row are new");
}

/// An Ed25519 key pair as PEM: (PKCS#8 private key, SPKI public key).
fn ed25519_pems() -> (String, String) {
    let key = SigningKey::generate(&mut OsRng);
    let private = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let public = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    (private, public)
}

/// One site, two algorithms: its key without kid is HS256, kid `ed` is Ed25519. Whatever a
/// header says, each kid's algorithm is the only one accepted with it — for tokens and grants.
#[tokio::test]
async fn a_site_with_an_hs256_and_an_eddsa_key_accepts_each_kid_only_with_its_own_algorithm() {
    let (private, public) = ed25519_pems();
    let public_for_config = public.clone();
    let hub = hub_with(move |config| {
        site_mut(config, FAUCET).keys =
            vec![SiteKey { kid: "ed".into(), public_key_pem: Some(public_for_config), ..SiteKey::default() }];
    })
    .await;
    let before = hub.snapshot();
    let ed = EncodingKey::from_ed_pem(private.as_bytes()).unwrap();
    let claims = token_claims(FAUCET, USER);
    let genuine_ed = sign_with(Algorithm::EdDSA, &ed, Some("ed"), None, &claims);
    let genuine_hs = hs256(&site_secret(FAUCET), None, None, &claims);
    client(&hub, FAUCET, USER, genuine_ed).timestamp("balance").await.assert_ok();
    client(&hub, FAUCET, USER, genuine_hs).timestamp("balance").await.assert_ok();
    let cases = [
        ("HS256 keyed with the kid's public PEM", hs256(&public, Some("ed"), None, &claims)),
        ("HS256 with the kid's public PEM, no kid", hs256(&public, None, None, &claims)),
        (
            "HS256 signed right but naming the Ed25519 kid",
            hs256(&site_secret(FAUCET), Some("ed"), None, &claims),
        ),
        ("EdDSA naming no kid (the HS256 key)", sign_with(Algorithm::EdDSA, &ed, None, None, &claims)),
        ("EdDSA naming the kid in another case", sign_with(Algorithm::EdDSA, &ed, Some("ED"), None, &claims)),
    ];
    for (case, token) in cases {
        refused(case, &client(&hub, FAUCET, USER, token).timestamp("balance").await, 401, "invalid_token");
    }
    // Grants: the same rules.
    let page = hub.page(FAUCET, USER);
    let g = grant_claims(FAUCET, USER, "claim-1", 10);
    let grants = [
        ("HS256 grant keyed with the public PEM", hs256(&public, Some("ed"), Some("grant+jwt"), &g)),
        (
            "HS256 grant signed right, naming the Ed25519 kid",
            hs256(&site_secret(FAUCET), Some("ed"), Some("grant+jwt"), &g),
        ),
        ("EdDSA grant naming no kid", sign_with(Algorithm::EdDSA, &ed, None, Some("grant+jwt"), &g)),
    ];
    for (case, grant) in grants {
        refused(case, &page.delta_with_grant("balance", 10, "claim-1", &grant).await, 403, "grant_invalid");
    }
    assert_eq!(hub.snapshot(), before, "a refusal stored something");
    let genuine = sign_with(Algorithm::EdDSA, &ed, Some("ed"), Some("GRANT+JWT"), &g);
    assert_eq!(
        page.delta_with_grant("balance", 10, "claim-1", &genuine).await.assert_ok()["data"]["coins"],
        110
    );
}

/// Tokens verified before a SIGHUP are verified again after it against the new policy: a
/// lowered ceiling or a withdrawn scope applies at once to a token the hub remembers.
#[tokio::test]
async fn a_remembered_token_meets_the_policy_a_sighup_brings() {
    let hub = hub_with(|_| {}).await;
    let backend = hub.site(FAUCET, USER);
    let page = hub.page(FAUCET, USER);
    backend.delta("balance", 10, "credit-1").await.assert_ok();
    page.timestamp("balance").await.assert_ok();

    // Today's credits: 100 (seed) + 10. The daily ceiling drops to 150.
    hub.app
        .reload_sites(&config_of(&hub, |c| site_mut(c, FAUCET).max_credits_per_user_per_day = 150))
        .unwrap();
    let before = hub.snapshot();
    refused(
        "a credit over the new ceiling",
        &backend.delta("balance", 41, "credit-2").await,
        403,
        "credit_limit",
    );
    backend.delta("balance", 40, "credit-3").await.assert_ok();
    assert_ne!(hub.snapshot(), before);

    // The faucet may no longer sign spends: its page tokens (the page set) go, at once.
    hub.app
        .reload_sites(&config_of(&hub, |c| site_mut(c, FAUCET).scopes.retain(|s| s != "amounts:spend")))
        .unwrap();
    let before = hub.snapshot();
    refused("a remembered page token", &page.timestamp("balance").await, 401, "scope_not_allowed");
    refused(
        "a remembered server token",
        &backend.delta("balance", 1, "credit-4").await,
        401,
        "scope_not_allowed",
    );
    assert_eq!(hub.snapshot(), before);
}

/// Many credits at once, from the page with grants and from the backend, against one user's
/// daily ceiling: exactly what fits lands; the same op sent many times at once lands once.
#[tokio::test]
async fn concurrent_credits_never_pass_the_daily_ceiling_and_one_op_lands_once() {
    let hub = hub_with(|c| {
        let faucet = site_mut(c, FAUCET);
        faucet.max_credit_per_op = 100;
        faucet.max_credits_per_user_per_day = 250;
    })
    .await;
    let page = hub.page(FAUCET, USER);
    let backend = hub.site(FAUCET, USER);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..30 {
        let op = format!("race-{i}");
        let (page, backend) = (page.clone(), backend.clone());
        let g = grant(FAUCET, &grant_claims(FAUCET, USER, &op, 10));
        tasks.spawn(async move {
            if i % 2 == 0 {
                page.delta_with_grant("balance", 10, &op, &g).await
            } else {
                backend.delta("balance", 10, &op).await
            }
        });
    }
    let same = grant(FAUCET, &grant_claims(FAUCET, VICTIM, "same-op", 10));
    let victim_page = hub.page(FAUCET, VICTIM);
    for _ in 0..20 {
        let (p, g) = (victim_page.clone(), same.clone());
        tasks.spawn(async move { p.delta_with_grant("balance", 10, "same-op", &g).await });
    }
    let (mut applied, mut limited, mut replayed) = (0, 0, 0);
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.unwrap();
        match (reply.status.as_u16(), reply.code()) {
            (200, _) if reply.body["replayed"] == true => replayed += 1,
            (200, _) => applied += 1,
            (403, "credit_limit") => limited += 1,
            _ => panic!("unexpected answer: {} {}", reply.status, reply.body),
        }
    }
    // USER: 100 credited by the seed, room for 15 × 10. VICTIM: one op.
    assert_eq!((applied, limited, replayed), (15 + 1, 15, 19));
    assert_eq!(page.coins().await, 250);
    assert_eq!(victim_page.coins().await, 110);
}

/// Grants that look right to a lax reader: another hub's, a spend's sign flipped, amounts
/// written another way, the data type in another case, an op id in another case.
#[tokio::test]
async fn grants_that_differ_in_form_from_their_op_are_refused() {
    let hub = hub_with(|_| {}).await;
    let before = hub.snapshot();
    let page = hub.page(FAUCET, USER);
    let op = "claim-1";
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut claims = grant_claims(FAUCET, USER, op, 10);
        edit(&mut claims);
        grant(FAUCET, &claims)
    };
    let cases = [
        ("another hub's", with(&|c| c["aud"] = json!("other-hub"))),
        ("aud as a list holding ours", with(&|c| c["aud"] = json!([HUB_ID, "other-hub"]))),
        ("amount as a float", with(&|c| c["delta"] = json!({"coins": 10.0}))),
        ("amount as a string", with(&|c| c["delta"] = json!({"coins": "10"}))),
        ("amounts with an extra field", with(&|c| c["delta"] = json!({"coins": 10, "points": 10}))),
        ("data type in capitals", with(&|c| c["data_type"] = json!("BALANCE"))),
        ("op id in capitals", with(&|c| c["op_id"] = json!("CLAIM-1"))),
        ("no sub", with(&|c| drop(c.as_object_mut().unwrap().remove("sub")))),
        ("no exp", with(&|c| drop(c.as_object_mut().unwrap().remove("exp")))),
        ("iss not a string", with(&|c| c["iss"] = json!([FAUCET]))),
        (
            "typ with a space",
            hs256(&site_secret(FAUCET), None, Some("grant+jwt "), &grant_claims(FAUCET, USER, op, 10)),
        ),
        ("typ jwt", hs256(&site_secret(FAUCET), None, Some("JWT"), &grant_claims(FAUCET, USER, op, 10))),
    ];
    for (case, grant) in cases {
        refused(case, &page.delta_with_grant("balance", 10, op, &grant).await, 403, "grant_invalid");
    }
    // A grant for +10 does not allow -10 (nor does the page need one to spend).
    let plus = with(&|_| {});
    refused(
        "a credit's grant on a spend",
        &page.delta_with_grant("balance", -10, op, &plus).await,
        403,
        "grant_invalid",
    );
    // The same grant for points.
    let reply = page.delta_with_grant("points", 10, op, &plus).await;
    refused("a balance grant on points", &reply, 403, "grant_invalid");
    assert_eq!(hub.snapshot(), before);
}

/// A grant's op id cannot be taken over by another op first: the page sends the op id its
/// grant names as a spend (or a credit of another amount) — the grant then meets
/// `op_id_reused` and credits nothing; the spend itself is an honest spend.
#[tokio::test]
async fn an_op_id_used_before_its_grant_arrives_never_credits() {
    let hub = hub_with(|_| {}).await;
    let page = hub.page(FAUCET, USER);
    page.delta("balance", -1, "claim-1").await.assert_ok();
    let g = grant(FAUCET, &grant_claims(FAUCET, USER, "claim-1", 10));
    refused(
        "the grant's op id, used by a spend",
        &page.delta_with_grant("balance", 10, "claim-1", &g).await,
        422,
        "op_id_reused",
    );
    // A remembered insufficient_funds under the grant's op id: the same.
    page.delta("balance", -1_000, "claim-2").await.assert_refused(409, "insufficient_funds");
    let g = grant(FAUCET, &grant_claims(FAUCET, USER, "claim-2", 10));
    refused(
        "the grant's op id, refused before",
        &page.delta_with_grant("balance", 10, "claim-2", &g).await,
        422,
        "op_id_reused",
    );
    assert_eq!(page.coins().await, 99);
}

/// A credit refused for the ceiling leaves the op id burned but counts nothing: another op
/// the same day that fits still lands, and the refused op's amount was not added to the day.
#[tokio::test]
async fn a_refused_credit_counts_nothing_against_the_day() {
    let hub = hub_with(|c| {
        let faucet = site_mut(c, FAUCET);
        faucet.max_credit_per_op = 1_000;
        faucet.max_credits_per_user_per_day = 300;
    })
    .await;
    let backend = hub.site(FAUCET, USER);
    // 100 today (seed); 250 more would be 350.
    refused("over the day", &backend.delta("balance", 250, "big").await, 403, "credit_limit");
    refused("over the op", &backend.delta("balance", 1_001, "bigger").await, 403, "credit_limit");
    backend.delta("balance", 200, "fits").await.assert_ok();
    refused("the day is full", &backend.delta("balance", 1, "one-more").await, 403, "credit_limit");
    // Points have their own count (documented: per amount).
    backend.delta("points", 300, "points-1").await.assert_ok();
}

/// A key kept in a file (`secret_file`) is reread on SIGHUP: a leaked kid is swapped for a
/// new one without a restart, and the leaked one is refused from the reload on. (A key in an
/// environment variable is read at start only: a running process keeps its environment.)
#[tokio::test]
async fn a_key_in_a_secret_file_rotates_on_reload_and_the_leaked_kid_is_refused() {
    let hub = hub_with(|c| site_mut(c, FAUCET).keys = vec![hs_key("2026-12")]).await;
    let signed = |kid: &str| hs256(&kid_secret(kid), Some(kid), None, &token_claims(FAUCET, USER));
    let leaked = client(&hub, FAUCET, USER, signed("2026-12"));
    leaked.timestamp("balance").await.assert_ok();
    let file = hub.dir.path().join("roflfaucet-2027-06.secret");
    std::fs::write(&file, format!("{}\n", kid_secret("2027-06"))).unwrap();
    let rotated = config_of(&hub, |c| {
        site_mut(c, FAUCET).keys =
            vec![SiteKey { kid: "2027-06".into(), secret_file: Some(file.clone()), ..SiteKey::default() }];
    });
    hub.app.reload_sites(&rotated).unwrap();
    refused("the leaked kid", &leaked.timestamp("balance").await, 401, "invalid_token");
    client(&hub, FAUCET, USER, signed("2027-06")).timestamp("balance").await.assert_ok();
    // A file that cannot be read keeps the keys in use.
    let missing = config_of(&hub, |c| {
        site_mut(c, FAUCET).keys = vec![SiteKey {
            kid: "2028-01".into(),
            secret_file: Some(hub.dir.path().join("missing.secret")),
            ..SiteKey::default()
        }];
    });
    let error = format!("{:#}", hub.app.reload_sites(&missing).unwrap_err());
    assert!(error.contains("cannot read secret_file"), "{error}");
    client(&hub, FAUCET, USER, signed("2027-06")).timestamp("balance").await.assert_ok();
}
