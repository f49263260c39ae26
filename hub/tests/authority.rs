//! Who may change what, tried over real HTTP against a hub configured as a real deployment
//! would be: every attack a signed-in user (holding a page's token) or a site's leaked key
//! could try is refused with its status and code, and the store — records, remembered op
//! ids, ledger, credit counts — is left exactly as it was. Beside each attack, the honest
//! path it must not break: credits with grants, exactly once; server tokens; key rotation.

mod support;

use std::time::Duration;

use hub::config::Config;
use protocol::{Scope, Scopes};
use serde_json::json;
use support::authority::*;
use support::{Deployment, Reply, SiteClient, TestHub, site_secret};

/// A hub configured by [`deployment`] (and `tweak`), holding records of [`USER`] and
/// [`VICTIM`] — 100 coins each, credited by the faucet's backend — and a snapshot of its
/// store taken after them.
struct Guarded {
    hub: TestHub,
    before: Vec<String>,
}

impl Guarded {
    async fn start() -> Guarded {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut Config)) -> Guarded {
        let hub = TestHub::start_with(|config| {
            deployment(config);
            tweak(config);
        })
        .await;
        for user in [USER, VICTIM] {
            let backend = hub.site(FAUCET, user);
            backend.delta("balance", 100, &format!("seed-{user}")).await.assert_ok();
            backend.push("profile", json!({"display_name": user})).await.assert_ok();
        }
        let before = hub.snapshot();
        Guarded { hub, before }
    }

    /// Asserts that `reply` is the refusal `status` `code`, and that nothing was stored.
    #[track_caller]
    fn assert_refused(&self, case: &str, reply: &Reply, status: u16, code: &str) {
        assert_eq!((reply.status.as_u16(), reply.code()), (status, code), "{case}: {}", reply.body);
        assert!(reply.body["error"].as_str().is_some_and(|e| !e.is_empty()), "{case}: {}", reply.body);
        assert_eq!(self.hub.snapshot(), self.before, "{case}: the store changed");
    }

    /// Like [`Guarded::assert_refused`] for a refusal that depends on the record's state and
    /// so stays the op's answer for good: records and ledger are unchanged, and the only row
    /// added is `op_id` remembered. Takes the snapshot again.
    #[track_caller]
    fn assert_refused_for_good(&mut self, case: &str, reply: &Reply, code: &str, op_id: &str) {
        assert_eq!((reply.status.as_u16(), reply.code()), (403, code), "{case}: {}", reply.body);
        let after = self.hub.snapshot();
        let added: Vec<&String> = after.iter().filter(|row| !self.before.contains(row)).collect();
        assert!(self.before.iter().all(|row| after.contains(row)), "{case}: a row changed or went");
        assert_eq!(added.len(), 1, "{case}: {added:?}");
        assert!(added[0].starts_with(&format!("{USER}|{op_id}|")), "{case}: {added:?}");
        self.before = after;
    }

    /// Takes the snapshot again after the test's own legitimate writes.
    fn settle(&mut self) {
        self.before = self.hub.snapshot();
    }
}

/// Op ids of `user`'s ledger rows, in order.
fn ledger_ops(hub: &TestHub, user: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(hub.dir.path().join("hub.sqlite3")).unwrap();
    let mut stmt =
        conn.prepare("SELECT ifnull(op_id, '') FROM ledger WHERE user_id = ?1 ORDER BY id").unwrap();
    stmt.query_map([user], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

#[tokio::test]
async fn a_pages_token_can_neither_set_nor_credit_amounts_nor_write_roles() {
    let g = Guarded::start().await;
    let page = g.hub.page(FAUCET, USER);
    let cases = [
        ("push balance", page.push("balance", json!({"coins": 9_000_000})).await, "amounts:set"),
        ("push points", page.push("points", json!({"points": 9_000_000})).await, "amounts:set"),
        ("credit without grant", page.delta("balance", 1_000, "mint-1").await, "amounts:credit"),
        ("points credit without grant", page.delta("points", 1_000, "mint-2").await, "amounts:credit"),
        (
            "site_roles",
            page.push("roles", json!({"site_roles": {FAUCET: ["moderator"]}})).await,
            "roles:write",
        ),
        ("global_roles", page.push("roles", json!({"global_roles": ["admin"]})).await, "roles:write"),
    ];
    for (case, reply, scope) in cases {
        g.assert_refused(case, &reply, 403, "insufficient_scope");
        assert!(
            reply.body["error"].as_str().unwrap().contains(scope),
            "{case} names {scope}: {}",
            reply.body
        );
    }
    // What a page may do, it still does: spend, edit the profile and settings, read.
    assert_eq!(page.delta("balance", -30, "spend-1").await.assert_ok()["data"]["coins"], 70);
    page.push("profile", json!({"bio": "still editable"})).await.assert_ok();
    page.push("settings", json!({"theme": "dark"})).await.assert_ok();
    page.timestamp("balance,profile,settings").await.assert_ok();
}

#[tokio::test]
async fn a_grant_that_does_not_name_its_op_exactly_is_refused() {
    let g = Guarded::start().await;
    let page = g.hub.page(FAUCET, USER);
    let op = "claim-1";
    let mut longer = grant_claims(FAUCET, USER, op, 10);
    longer["exp"] = json!(now() + 3_600);
    let mut untyped = grant_claims(FAUCET, USER, op, 10);
    untyped["typ"] = json!("grant+jwt");
    let mut points = grant_claims(FAUCET, USER, op, 10);
    points["data_type"] = json!("points");
    points["delta"] = json!({"points": 10});
    let cases = [
        ("for another user", grant(FAUCET, &grant_claims(FAUCET, VICTIM, op, 10))),
        ("of another site", grant(CHARITY, &grant_claims(CHARITY, USER, op, 10))),
        ("for another op_id", grant(FAUCET, &grant_claims(FAUCET, USER, "claim-2", 10))),
        ("for another data type", grant(FAUCET, &points)),
        ("for another amount", grant(FAUCET, &grant_claims(FAUCET, USER, op, 9))),
        ("a token as a grant", g.hub.token(FAUCET, USER)),
        ("a server token as a grant", g.hub.backend_token(FAUCET, USER)),
        ("without the grant+jwt header", hs256(&site_secret(FAUCET), None, None, &untyped)),
        (
            "signed with another secret",
            hs256(&site_secret(CHARITY), None, Some("grant+jwt"), &grant_claims(FAUCET, USER, op, 10)),
        ),
        ("living an hour", grant(FAUCET, &longer)),
        ("of a site the hub does not know", grant(FAUCET, &grant_claims("evil", USER, op, 10))),
        ("not a JWT", "grant".to_owned()),
    ];
    for (case, grant) in cases {
        let reply = page.delta_with_grant("balance", 10, op, &grant).await;
        g.assert_refused(case, &reply, 403, "grant_invalid");
    }
    // A grant is no token either.
    let as_token = client(&g.hub, FAUCET, USER, grant(FAUCET, &grant_claims(FAUCET, USER, op, 10)));
    g.assert_refused(
        "a grant as the bearer token",
        &as_token.delta("balance", 10, op).await,
        401,
        "invalid_token",
    );
    g.assert_refused(
        "a grant as the bearer token (read)",
        &as_token.timestamp("balance").await,
        401,
        "invalid_token",
    );
}

#[tokio::test]
async fn a_grant_credits_once_under_its_own_op_id_whatever_is_resent() {
    let mut g = Guarded::start().await;
    let page = g.hub.page(FAUCET, USER);
    let claim = grant(FAUCET, &grant_claims(FAUCET, USER, "claim-1", 10));
    let first = page.delta_with_grant("balance", 10, "claim-1", &claim).await;
    assert_eq!(first.assert_ok()["data"]["coins"], 110);
    g.settle();

    let again = page.delta_with_grant("balance", 10, "claim-1", &claim).await;
    assert_eq!(
        (again.assert_ok()["replayed"].clone(), again.body["data"]["coins"].clone()),
        (json!(true), json!(110))
    );
    // A grant minted again for the same op is the same op: no op_id_reused, no second credit.
    let reminted = grant(FAUCET, &grant_claims(FAUCET, USER, "claim-1", 10));
    assert_eq!(
        page.delta_with_grant("balance", 10, "claim-1", &reminted).await.assert_ok()["replayed"],
        true
    );
    // Once applied, the op answers as it did, however old its grant has become.
    let mut old = grant_claims(FAUCET, USER, "claim-1", 10);
    old["iat"] = json!(now() - 3_000);
    old["exp"] = json!(now() - 2_700);
    assert_eq!(
        page.delta_with_grant("balance", 10, "claim-1", &grant(FAUCET, &old)).await.assert_ok()["replayed"],
        true
    );
    assert_eq!(g.hub.snapshot(), g.before, "a replay stored something");

    // The same grant under another op id is refused.
    let reused = page.delta_with_grant("balance", 10, "claim-2", &claim).await;
    g.assert_refused("a grant reused under a new op_id", &reused, 403, "grant_invalid");
    assert_eq!(ledger_ops(&g.hub, USER), ["seed-8-evans", "claim-1"]);
}

#[tokio::test]
async fn an_expired_grant_is_refused_for_a_new_op_and_a_fresh_one_credits_it_once() {
    let mut g = Guarded::start().await;
    let page = g.hub.page(FAUCET, USER);
    let mut expired = grant_claims(FAUCET, USER, "late-1", 10);
    expired["iat"] = json!(now() - 700);
    expired["exp"] = json!(now() - 100);
    let reply = page.delta_with_grant("balance", 10, "late-1", &grant(FAUCET, &expired)).await;
    g.assert_refused("an expired grant on a new op", &reply, 403, "grant_expired");
    // Not remembered: the page asks its backend again and the same op lands, once.
    let fresh = grant(FAUCET, &grant_claims(FAUCET, USER, "late-1", 10));
    assert_eq!(
        page.delta_with_grant("balance", 10, "late-1", &fresh).await.assert_ok()["data"]["coins"],
        110
    );
    assert_eq!(page.delta_with_grant("balance", 10, "late-1", &fresh).await.assert_ok()["replayed"], true);
    g.settle();
    assert_eq!(ledger_ops(&g.hub, USER), ["seed-8-evans", "late-1"]);
}

#[tokio::test]
async fn tokens_claiming_what_their_site_may_not_sign_are_refused_with_401() {
    let g = Guarded::start().await;
    let mut admin = token_claims(FAUCET, USER);
    admin["adm"] = json!(true);
    let scoped = |scope: &str| {
        let mut claims = token_claims(FAUCET, USER);
        claims["scope"] = json!(scope);
        token(FAUCET, &claims)
    };
    let cases = [
        ("a non-admin site's adm", token(FAUCET, &admin), "admin_not_allowed"),
        ("amounts:set from a site not given it", scoped("sync:read amounts:set"), "scope_not_allowed"),
        ("a scope that does not exist", scoped("sync:read coins:mint"), "scope_not_allowed"),
        (
            "a page token of a site that may not sign the page set",
            token(READER, &token_claims(READER, USER)),
            "scope_not_allowed",
        ),
    ];
    for (case, token, code) in cases {
        let site = if case.contains("page set") { READER } else { FAUCET };
        let attacker = client(&g.hub, site, USER, token);
        g.assert_refused(case, &attacker.push("balance", json!({"coins": 1_000_000})).await, 401, code);
        g.assert_refused(case, &attacker.timestamp("balance").await, 401, code);
    }
}

#[tokio::test]
async fn a_site_given_a_scope_uses_it_and_an_admin_site_writes_global_roles() {
    let g = Guarded::start().await;
    let set = g.hub.site(OFFICE, USER);
    assert_eq!(set.push("balance", json!({"coins": 900})).await.assert_ok()["data"]["coins"], 900);
    let roles = set.push("roles", json!({"site_roles": {OFFICE: ["staff"]}})).await;
    assert_eq!(roles.assert_ok()["data"]["site_roles"][OFFICE], json!(["staff"]));
    let admin = client(&g.hub, OFFICE, USER, g.hub.admin_token(OFFICE, USER));
    let roles = admin.push("roles", json!({"global_roles": ["verified"]})).await;
    assert_eq!(roles.assert_ok()["data"]["global_roles"], json!(["verified"]));
    // The faucet's backend credits without a grant and writes its own roles, but sets nothing.
    let faucet = g.hub.site(FAUCET, USER);
    assert_eq!(faucet.delta("balance", 50, "backend-credit").await.assert_ok()["data"]["coins"], 950);
    faucet.push("roles", json!({"site_roles": {FAUCET: ["player"]}})).await.assert_ok();
    faucet.push("balance", json!({"coins": 1})).await.assert_refused(403, "insufficient_scope");
}

#[tokio::test]
async fn tokens_living_longer_than_their_sites_cap_are_refused() {
    let g = Guarded::start_with(|config| {
        config.sites.iter_mut().find(|s| s.id == CHARITY).unwrap().max_token_ttl_secs = 600;
    })
    .await;
    let mut two_hours = token_claims(FAUCET, USER);
    two_hours["exp"] = json!(now() + 7_200);
    let mut no_iat = token_claims(FAUCET, USER);
    no_iat.as_object_mut().unwrap().remove("iat");
    no_iat["exp"] = json!(now() + 7_200);
    let mut charity_hour = token_claims(CHARITY, USER);
    charity_hour["exp"] = json!(now() + 3_600);
    let cases = [
        ("iat to exp beyond the default hour", FAUCET, token(FAUCET, &two_hours)),
        ("no iat, exp beyond the hour from now", FAUCET, token(FAUCET, &no_iat)),
        ("an hour on a site capped at ten minutes", CHARITY, token(CHARITY, &charity_hour)),
    ];
    for (case, site, token) in cases {
        let reply = client(&g.hub, site, USER, token).delta("balance", -1, "spend-1").await;
        g.assert_refused(case, &reply, 401, "token_lifetime");
    }
    let mut within = token_claims(FAUCET, USER);
    within.as_object_mut().unwrap().remove("iat");
    within["exp"] = json!(now() + 3_000);
    client(&g.hub, FAUCET, USER, token(FAUCET, &within)).timestamp("balance").await.assert_ok();
}

/// The faucet with keys named by `kids` beside its key without one.
fn with_kids(config: &mut Config, kids: &[&str]) {
    site_mut(config, FAUCET).keys = kids.iter().map(|kid| hs_key(kid)).collect();
}

#[tokio::test]
async fn keys_rotate_by_kid_and_a_removed_kid_is_refused_at_once() {
    let mut g = Guarded::start_with(|c| with_kids(c, &["2026-old", "2026-new"])).await;
    let signed = |kid: &str, secret: &str| hs256(secret, Some(kid), None, &token_claims(FAUCET, USER));
    let old = client(&g.hub, FAUCET, USER, signed("2026-old", &kid_secret("2026-old")));
    let new = client(&g.hub, FAUCET, USER, signed("2026-new", &kid_secret("2026-new")));
    let old_grant = hs256(
        &kid_secret("2026-old"),
        Some("2026-old"),
        Some("grant+jwt"),
        &grant_claims(FAUCET, USER, "claim-old", 5),
    );
    old.timestamp("balance").await.assert_ok();
    new.timestamp("balance").await.assert_ok();
    g.hub.page(FAUCET, USER).timestamp("balance").await.assert_ok();
    let cases = [
        ("a kid the site does not have", signed("2025", &kid_secret("2025"))),
        ("a kid signed with another key's secret", signed("2026-new", &kid_secret("2026-old"))),
        ("a kid signed with the key without kid", signed("2026-new", &site_secret(FAUCET))),
    ];
    for (case, token) in cases {
        g.assert_refused(
            case,
            &client(&g.hub, FAUCET, USER, token).timestamp("balance").await,
            401,
            "invalid_token",
        );
    }
    g.settle();

    // The old key leaked: it is removed, and SIGHUP rereads the sites.
    g.hub.app.reload_sites(&config_of(&g.hub, |c| with_kids(c, &["2026-new"]))).unwrap();
    g.assert_refused("a removed kid, verified before", &old.timestamp("balance").await, 401, "invalid_token");
    g.assert_refused(
        "a removed kid's grant",
        &new.delta_with_grant("balance", 5, "claim-old", &old_grant).await,
        403,
        "grant_invalid",
    );
    new.timestamp("balance").await.assert_ok();

    // A configuration that would not start a hub changes nothing.
    let broken = config_of(&g.hub, |c| {
        with_kids(c, &["2026-new"]);
        c.sites[0].keys[0].secret = Some("short".into());
    });
    assert!(g.hub.app.reload_sites(&broken).is_err());
    new.timestamp("balance").await.assert_ok();
    g.assert_refused(
        "a removed kid after a failed reload",
        &old.timestamp("balance").await,
        401,
        "invalid_token",
    );
}

#[tokio::test]
async fn tokens_issued_before_tokens_issued_after_are_refused() {
    let g = Guarded::start().await;
    let mut before = token_claims(FAUCET, USER);
    before["iat"] = json!(now() - 120);
    let mut without = token_claims(FAUCET, USER);
    without.as_object_mut().unwrap().remove("iat");
    let (before, without) = (token(FAUCET, &before), token(FAUCET, &without));
    client(&g.hub, FAUCET, USER, before.clone()).timestamp("balance").await.assert_ok();
    client(&g.hub, FAUCET, USER, without.clone()).timestamp("balance").await.assert_ok();

    // Every session of the faucet ends now.
    let cut = time::OffsetDateTime::from_unix_timestamp(i64::try_from(now() - 60).unwrap()).unwrap();
    let cut = cut.format(&time::format_description::well_known::Rfc3339).unwrap();
    g.hub.app.reload_sites(&config_of(&g.hub, |c| c.sites[0].tokens_issued_after = Some(cut))).unwrap();
    for (case, token) in [("iat before the cut", before), ("no iat while the cut is set", without)] {
        let reply = client(&g.hub, FAUCET, USER, token).delta("balance", -1, "spend-1").await;
        g.assert_refused(case, &reply, 401, "token_revoked");
    }
    client(&g.hub, FAUCET, USER, token(FAUCET, &token_claims(FAUCET, USER)))
        .timestamp("balance")
        .await
        .assert_ok();
    // The other sites' sessions go on.
    client(&g.hub, CHARITY, USER, token(CHARITY, &token_claims(CHARITY, USER)))
        .timestamp("balance")
        .await
        .assert_ok();
}

#[tokio::test]
async fn credits_beyond_a_sites_ceilings_are_refused_and_stay_refused() {
    let mut g = Guarded::start_with(|config| {
        let faucet = config.sites.iter_mut().find(|s| s.id == FAUCET).unwrap();
        faucet.max_credit_per_op = 100;
        faucet.max_credits_per_user_per_day = 250;
    })
    .await;
    let page = g.hub.page(FAUCET, USER);
    let backend = g.hub.site(FAUCET, USER);
    let grant_of = |op: &str, amount: i64| grant(FAUCET, &grant_claims(FAUCET, USER, op, amount));
    let big = page.delta_with_grant("balance", 101, "big-1", &grant_of("big-1", 101)).await;
    g.assert_refused_for_good("a grant over the per-op ceiling", &big, "credit_limit", "big-1");
    let big = backend.delta("balance", 101, "big-2").await;
    g.assert_refused_for_good("a server credit over the per-op ceiling", &big, "credit_limit", "big-2");

    // 100 (seed) + 100 + 50 = 250 credited today by the faucet: the ceiling.
    page.delta_with_grant("balance", 100, "c-1", &grant_of("c-1", 100)).await.assert_ok();
    backend.delta("balance", 50, "c-2").await.assert_ok();
    // Spending does not give the ceiling back.
    page.delta("balance", -200, "spend-1").await.assert_ok();
    g.settle();
    let over = page.delta_with_grant("balance", 1, "c-3", &grant_of("c-3", 1)).await;
    g.assert_refused_for_good("a grant over the daily ceiling", &over, "credit_limit", "c-3");
    // Remembered for its op id like insufficient_funds: the op never lands later.
    let again = page.delta_with_grant("balance", 1, "c-3", &grant_of("c-3", 1)).await;
    g.assert_refused("the same op again", &again, 403, "credit_limit");
    let server = backend.delta("balance", 1, "c-4").await;
    g.assert_refused_for_good("a server credit over the daily ceiling", &server, "credit_limit", "c-4");
    // Another site's key has its own count; another user of the faucet too.
    g.hub.site(CHARITY, USER).delta("balance", 40, "charity-1").await.assert_ok();
    g.hub.site(FAUCET, VICTIM).delta("balance", 100, "victim-1").await.assert_ok();
    assert_eq!(backend.coins().await, 90);
}

#[tokio::test]
async fn a_set_that_raises_an_amount_counts_as_a_credit_of_the_difference() {
    let mut g = Guarded::start().await;
    let office = g.hub.site(OFFICE, USER);
    // From 100: +1,001 is over the office's per-op ceiling of 1,000.
    g.assert_refused(
        "a set raising past the per-op ceiling",
        &office.push("balance", json!({"coins": 1_101})).await,
        403,
        "credit_limit",
    );
    office.push("balance", json!({"coins": 1_000})).await.assert_ok();
    // Lowering is no credit; raising again counts 900 + 700 > 1,500.
    office.push("balance", json!({"coins": 300})).await.assert_ok();
    g.settle();
    let over = office.push("balance", json!({"coins": 1_000})).await;
    g.assert_refused("a set raising past the daily ceiling", &over, 403, "credit_limit");
    let with_op_id = json!({
        "action": "push", "user_id": USER, "site_id": OFFICE, "data_type": "balance",
        "data": {"coins": 1_000}, "op_id": "set-1",
    });
    let over = office.post(&with_op_id).await;
    g.assert_refused_for_good("the same set with an op id", &over, "credit_limit", "set-1");
    office.push("balance", json!({"coins": 900})).await.assert_ok();
    assert_eq!(office.coins().await, 900);
}

#[tokio::test]
async fn the_seed_calls_work_with_a_server_token() {
    let hub = TestHub::start_with(deployment).await;
    let scopes = Scopes::of(&[Scope::SyncRead, Scope::ProfileWrite, Scope::AmountsSet]);
    let sites = hub.app.sites();
    let keys = sites.keys().unwrap();
    let server = client(&hub, OFFICE, USER, keys.mint_scoped(OFFICE, USER, 3_600, scopes, false).unwrap());
    let pushed = server.push("profile", json!({"display_name": "New Name", "bio": "Updated bio"})).await;
    let stamp = pushed.assert_ok()["timestamp"].clone();
    assert_eq!(server.timestamp("profile").await.assert_ok()["last_updated"], stamp);
    assert_eq!(server.get("profile").await.assert_ok()["data"]["bio"], "Updated bio");
    // The seed's sites push their balance outright.
    assert_eq!(server.push("balance", json!({"coins": 120})).await.assert_ok()["data"]["coins"], 120);
    // A site that may not sign amounts:set cannot be given it by its own backend.
    assert!(keys.mint_scoped(FAUCET, USER, 3_600, scopes, false).is_err());
}

#[tokio::test]
async fn sighup_rereads_the_sites_keys_without_dropping_connections_and_keeps_them_after_a_bad_file() {
    let deployment = Deployment::new(|config| with_kids(config, &["2026-old", "2026-new"]));
    let hub = deployment.start().await;
    let signed = |kid: &str| hs256(&kid_secret(kid), Some(kid), None, &token_claims(FAUCET, USER));
    // One connection, kept alive across the reload.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let at = |token: String| SiteClient {
        url: deployment.url(),
        client: http.clone(),
        token: Some(token),
        site: FAUCET.into(),
        user: USER.into(),
    };
    at(signed("2026-old")).timestamp("balance").await.assert_ok();

    let file = deployment.dir.path().join("hub.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut config: Config = toml::from_str(&text).unwrap();
    config.sites[0].keys.retain(|k| k.kid == "2026-new");
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    support::hang_up(&hub).await;
    wait_for(|| at(signed("2026-old")), 401).await;
    at(signed("2026-new")).timestamp("balance").await.assert_ok();

    std::fs::write(&file, "this is not = [valid toml").unwrap();
    support::hang_up(&hub).await;
    let log_says = "keeping the current sites";
    let deadline = std::time::Instant::now() + support::PATIENCE;
    while !deployment.log().contains(log_says) {
        assert!(std::time::Instant::now() < deadline, "no reload failure logged:\n{}", deployment.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    at(signed("2026-new")).timestamp("balance").await.assert_ok();
    at(signed("2026-old")).timestamp("balance").await.assert_refused(401, "invalid_token");
}

/// Waits until the client `make` returns gets `status` for a timestamp check.
async fn wait_for(make: impl Fn() -> SiteClient, status: u16) {
    let deadline = std::time::Instant::now() + support::PATIENCE;
    loop {
        let reply = make().timestamp("balance").await;
        if reply.status.as_u16() == status {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still {} after SIGHUP: {}", reply.status, reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_applied_credit_replays_as_it_did_after_the_ceilings_are_lowered() {
    let g = Guarded::start().await;
    let backend = g.hub.site(FAUCET, USER);
    let page = g.hub.page(FAUCET, USER);
    let claim = grant(FAUCET, &grant_claims(FAUCET, USER, "claim-1", 60));
    page.delta_with_grant("balance", 60, "claim-1", &claim).await.assert_ok();
    backend.delta("balance", 40, "credit-1").await.assert_ok();
    // The operator lowers the faucet's ceilings below both credits.
    let lowered = config_of(&g.hub, |c| c.sites[0].max_credit_per_op = 10);
    g.hub.app.reload_sites(&lowered).unwrap();
    let before = g.hub.snapshot();
    let again = page.delta_with_grant("balance", 60, "claim-1", &claim).await;
    assert_eq!(
        (again.assert_ok()["replayed"].clone(), again.body["data"]["coins"].clone()),
        (json!(true), json!(160))
    );
    assert_eq!(backend.delta("balance", 40, "credit-1").await.assert_ok()["replayed"], true);
    assert_eq!(g.hub.snapshot(), before);
}
