//! Several hub instances on one PostgreSQL database: what only exists with more than one
//! writer. The same op sent to two instances at once is applied once and answered alike;
//! deltas spread over instances sum exactly and never go below zero; skewed clocks move no
//! version or stamp back; a write one instance acknowledged is read by the other; the daily
//! credit ceiling holds across instances; instances starting together migrate the schema
//! once; a newer schema is refused; a database that stops makes the hub answer `503` until it
//! is back, with no restart of the hub; a burst of one user's requests is counted by the rate
//! limit the instances share as the requests it is.
//!
//! Instances are two `TestHub`s (the real hub over HTTP) on one database URL of the shared
//! test cluster, or two `PostgresStore`s when a test sets their clocks; the crash test has a
//! cluster of its own.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hub::config::{Backend, StoreConfig};
use hub::domain::{Caller, Ceilings, Domain, Written};
use hub::store::postgres::{PostgresStore, SCHEMA_VERSION};
use hub::store::{Stamp, Store, StoreError, StoreMetrics, WriteOutcome};
use protocol::{DataType, Scopes, SiteId};
use serde_json::{Value, json};
use support::postgres::{Cluster, hub_on};
use support::store::{
    DAY, LedgerRow, RETENTION, T, TestClock, add, applied, open_postgres, over_ceiling, postgres_ledger,
    postgres_options, user,
};
use support::{Reply, TestHub};
use tokio::task::JoinSet;

const USER: &str = "8-evans";

/// Two hub instances on one fresh database of the shared cluster, and its URL.
async fn two_hubs() -> (TestHub, TestHub, String) {
    let url = Cluster::shared().database();
    let a = hub_on(&url).await;
    let b = hub_on(&url).await;
    (a, b, url)
}

/// `USER`'s balance ledger in the database at `url` of `cluster`, oldest first.
fn ledger(cluster: &Cluster, url: &str) -> Vec<LedgerRow> {
    postgres_ledger(cluster, url, USER, "balance")
}

/// Asserts that `ledger` is a running sum that never goes below zero and ends at `coins`, one
/// row per version with none skipped (`support::store`'s), and holds each op once.
#[track_caller]
fn assert_ledger_adds_up_to(ledger: &[LedgerRow], coins: i64) {
    support::store::assert_ledger_adds_up_to(ledger, coins);
    let mut ops: Vec<Option<&str>> = ledger.iter().map(|row| row.op_id.as_deref()).collect();
    ops.sort_unstable();
    ops.dedup();
    assert_eq!(ops.len(), ledger.len(), "an op has two ledger rows: {ledger:?}");
}

/// The `version`, `data` and `last_updated` of an accepted write: what a replay repeats.
#[track_caller]
fn answer(reply: &Reply) -> (Value, Value, Value) {
    let body = reply.assert_ok();
    (body["version"].clone(), body["data"].clone(), body["last_updated"].clone())
}

fn version(reply: &Reply) -> u64 {
    reply.assert_ok()["version"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_op_sent_to_two_instances_at_once_is_applied_once_and_answered_alike() {
    let (a, b, url) = two_hubs().await;
    let (site_a, site_b) = (a.site("wrc", USER), b.site("wrc", USER));
    let send_to_both = |i: i64| {
        let (site_a, site_b) = (site_a.clone(), site_b.clone());
        async move {
            let op = format!("op-{i}");
            let (to_a, to_b) = tokio::join!(
                site_a.delta("balance", i % 5 + 1, &op),
                site_b.delta("balance", i % 5 + 1, &op)
            );
            (i, to_a, to_b)
        }
    };
    // Forty ops at once, each to both instances at once; then ten more, one after the other.
    let mut pairs = JoinSet::new();
    for i in 0..40 {
        pairs.spawn(send_to_both(i));
    }
    let mut answers = pairs.join_all().await;
    for i in 40..50 {
        answers.push(send_to_both(i).await);
    }

    let mut versions = Vec::new();
    for (i, to_a, to_b) in &answers {
        assert_eq!(answer(to_a), answer(to_b), "op-{i}: the instances answered differently");
        let replayed = [to_a, to_b].iter().filter(|r| r.body["replayed"] == true).count();
        assert_eq!(replayed, 1, "op-{i}: not applied by one and replayed by the other: {to_a:?} {to_b:?}");
        versions.push(version(to_a));
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=50).collect::<Vec<u64>>(), "each op gets a version of its own");

    let sum: i64 = (0..50).map(|i| i % 5 + 1).sum();
    assert_eq!((site_a.coins().await, site_b.coins().await), (sum, sum));
    let ledger = ledger(Cluster::shared(), &url);
    assert_ledger_adds_up_to(&ledger, sum);
    assert_eq!(ledger.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deltas_over_two_instances_sum_exactly_and_never_go_below_zero() {
    let (a, b, url) = two_hubs().await;
    let sites = [a.site("wrc", USER), b.site("wrc", USER)];
    // Sixty credits of 5 and sixty spends of 7, all at once, spread over both instances:
    // the spends ask 420 of at most 300, so at least 18 must be refused.
    let mut deltas = JoinSet::new();
    for i in 0..120 {
        let site = sites[i % 2].clone();
        let (op, amount) = if i % 4 < 2 { (format!("credit-{i}"), 5) } else { (format!("spend-{i}"), -7) };
        deltas.spawn(async move {
            let reply = site.delta("balance", amount, &op).await;
            (i, op, amount, reply)
        });
    }
    let deltas = deltas.join_all().await;
    let mut versions = Vec::new();
    let mut refused = Vec::new();
    for (i, op, amount, reply) in &deltas {
        if *amount < 0 && reply.code() == "insufficient_funds" {
            refused.push((*i, op.clone()));
            continue;
        }
        versions.push(version(reply));
    }
    let spent = 60 - i64::try_from(refused.len()).unwrap();
    assert!(refused.len() >= 18, "{} spends refused, 300 coins pay 42 at most", refused.len());
    versions.sort_unstable();
    let applied = u64::try_from(versions.len()).unwrap();
    assert_eq!(versions, (1..=applied).collect::<Vec<_>>(), "versions skipped or given twice");
    let coins = 300 - 7 * spent;
    assert_eq!((sites[0].coins().await, sites[1].coins().await), (coins, coins));
    let ledger = ledger(Cluster::shared(), &url);
    assert_ledger_adds_up_to(&ledger, coins);
    assert_eq!(ledger.len(), deltas.len() - refused.len());

    // Each answer is the op's for good, on either instance: a refused spend sent again to the
    // other instance is refused still, though the balance may cover it now, and an applied
    // op replays there.
    assert!(coins >= 0);
    for (i, op) in &refused {
        sites[(i + 1) % 2].delta("balance", -7, op).await.assert_refused(409, "insufficient_funds");
    }
    for (i, op, amount, reply) in deltas.iter().filter(|(_, _, _, r)| r.status == 200) {
        let again = sites[(i + 1) % 2].delta("balance", *amount, op).await;
        assert_eq!((answer(&again), &again.body["replayed"]), (answer(reply), &json!(true)), "{op}");
    }
    assert_eq!(sites[0].coins().await, coins);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skewed_clocks_move_neither_versions_nor_stamps_back() {
    let url = Cluster::shared().database();
    // Instance b's clock is seven seconds behind a's.
    let (clock_a, clock_b) = (TestClock::at(T), TestClock::at(T - 7_000));
    let (a, b) = (open_postgres(&url, &clock_a), open_postgres(&url, &clock_b));

    // Turn about, a millisecond apart: b's writes, dated before a's last, come after it.
    for i in 0..20 {
        let store = if i % 2 == 0 { &a } else { &b };
        let record = applied(store.write(add(USER, &format!("turn-{i}"), 1)).await);
        let expected = Stamp { version: u64::try_from(i).unwrap() + 1, updated_ms: Some(T + i) };
        assert_eq!(Stamp { version: record.version, updated_ms: record.updated_ms }, expected, "turn {i}");
        for reader in [&a, &b] {
            assert_eq!(reader.stamps(&user(USER), &[DataType::Balance]).await.unwrap(), [expected]);
        }
        clock_a.pass(1);
        clock_b.pass(1);
    }

    // All at once, while b's clock is set back an hour more.
    let mut writes = JoinSet::new();
    for i in 0..100 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        if i == 50 {
            clock_b.set_wall(T - 3_600_000);
        }
        writes.spawn(async move { applied(store.write(add(USER, &format!("at-once-{i}"), 1)).await) });
    }
    let mut records = writes.join_all().await;
    records.sort_by_key(|r| r.version);
    let versions: Vec<u64> = records.iter().map(|r| r.version).collect();
    assert_eq!(versions, (21..=120).collect::<Vec<_>>());
    let mut last = Some(T + 19);
    for record in &records {
        assert!(
            record.updated_ms > last,
            "v{} is stamped {:?}, after {last:?}",
            record.version,
            record.updated_ms
        );
        last = record.updated_ms;
    }
    let newest = Stamp { version: 120, updated_ms: last };
    for reader in [&a, &b] {
        assert_eq!(reader.stamps(&user(USER), &[DataType::Balance]).await.unwrap(), [newest]);
    }
    assert_ledger_adds_up_to(&ledger(Cluster::shared(), &url), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_acknowledged_by_one_instance_is_read_by_the_other() {
    let (a, b, _) = two_hubs().await;
    let sites = [a.site("wrc", USER), b.site("wrc", USER)];
    // Other writes to the same record keep landing on both instances meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let background = tokio::spawn({
        let (sites, stop) = (sites.clone(), stop.clone());
        async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                sites[n % 2].delta("balance", 1, &format!("background-{n}")).await.assert_ok();
                n += 1;
            }
        }
    });

    for i in 0..40 {
        let (writer, reader) = (&sites[i % 2], &sites[(i + 1) % 2]);
        let ack = writer.delta("balance", 1, &format!("mine-{i}")).await;
        let (acked, coins) = (version(&ack), ack.body["data"]["coins"].as_i64().unwrap());
        let stamp = reader.timestamp("balance").await;
        assert!(
            version(&stamp) >= acked,
            "round {i}: acked v{acked}, the other instance says {}",
            stamp.body
        );
        let got = reader.get("balance").await;
        assert!(version(&got) >= acked, "round {i}: acked v{acked}, the other instance has {}", got.body);
        assert!(got.body["data"]["coins"].as_i64().unwrap() >= coins, "round {i}: {}", got.body);

        let note = format!("note {i}");
        let pushed = writer
            .post(&json!({
                "action": "push", "user_id": USER, "site_id": "wrc", "data_type": "profile",
                "data": { "bio": note },
            }))
            .await;
        let got = reader.get("profile").await;
        assert_eq!((version(&got), &got.body["data"]["bio"]), (version(&pushed), &json!(note)), "round {i}");
    }
    stop.store(true, Ordering::SeqCst);
    background.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daily_credit_ceiling_holds_exactly_across_instances() {
    let url = Cluster::shared().database();
    // Noon, the instances' clocks three seconds apart: one UTC day for both.
    let (clock_a, clock_b) = (TestClock::at(T + DAY / 2), TestClock::at(T + DAY / 2 - 3_000));
    let instances = [
        Domain::new(open_postgres(&url, &clock_a), protocol::Limits::default()),
        Domain::new(open_postgres(&url, &clock_b), protocol::Limits::default()),
    ];
    let caller = Caller {
        site: SiteId::parse("wrc").unwrap(),
        user: user(USER),
        admin: false,
        scopes: Scopes::ALL,
        ceilings: Ceilings { per_op: 50, per_user_per_day: 100 },
        expires: None,
    };
    let delta = |instance: usize, op_id: &str, coins: i64| {
        support::store::delta(&instances[instance % 2], &caller, op_id, coins)
    };

    // One after the other, turn about: each instance counts what the other credited.
    delta(0, "fifty", 50).await.unwrap();
    delta(1, "forty", 40).await.unwrap();
    assert!(over_ceiling(&delta(0, "eleven-a", 11).await));
    assert!(over_ceiling(&delta(1, "eleven-b", 11).await));
    delta(1, "ten", 10).await.unwrap();
    assert!(over_ceiling(&delta(0, "one-a", 1).await));

    // The next day, forty credits of 7 at once, half through each instance: fourteen fit.
    clock_a.pass(DAY);
    clock_b.pass(DAY);
    let mut credits = JoinSet::new();
    for i in 0..40 {
        let credit = delta(i, &format!("credit-{i}"), 7);
        credits.spawn(async move { (i, credit.await) });
    }
    let credits = credits.join_all().await;
    let applied = credits.iter().filter(|(_, r)| r.is_ok()).count();
    let refused = credits.iter().filter(|(_, r)| over_ceiling(r)).count();
    assert_eq!((applied, refused), (14, 26), "{credits:?}");

    assert!(over_ceiling(&delta(0, "three", 3).await));
    delta(1, "two", 2).await.unwrap();
    assert!(over_ceiling(&delta(0, "one", 1).await));
    assert!(over_ceiling(&delta(1, "one-more", 1).await));
    // Each credit sent again to the other instance answers as it did.
    for (i, result) in &credits {
        let again = delta(i + 1, &format!("credit-{i}"), 7).await;
        match result {
            Ok(first) => assert_eq!(again.unwrap(), Written { replayed: true, ..first.clone() }),
            Err(_) => assert!(over_ceiling(&again), "credit-{i}: {again:?}"),
        }
    }

    let balance = instances[1].store().records(&user(USER), &[DataType::Balance]).await.unwrap().remove(0);
    assert_eq!(balance.data, json!({ "coins": 200 }));
    let ledger = ledger(Cluster::shared(), &url);
    assert_ledger_adds_up_to(&ledger, 200);
    assert_eq!(ledger.len(), 3 + 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_together_on_an_empty_database_migrate_it_once() {
    let cluster = Cluster::shared();
    for round in 0..4 {
        let url = cluster.database();
        let clock = TestClock::at(T);
        let start = std::sync::Barrier::new(2);
        let opened: Vec<Result<PostgresStore, StoreError>> = std::thread::scope(|s| {
            let starts: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        PostgresStore::open(postgres_options(&url, &clock))
                    })
                })
                .collect();
            starts.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let [a, b] = <[_; 2]>::try_from(opened).unwrap().map(|instance| {
            instance.unwrap_or_else(|e| panic!("round {round}: an instance did not open: {e}"))
        });
        let steps: Vec<String> = (1..=SCHEMA_VERSION).map(|v| format!("{v}|1")).collect();
        let migrated = cluster
            .psql(&url, "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY version");
        assert_eq!(migrated, steps.join("\n"), "round {round}");
        let meta = cluster.psql(&url, "SELECT key, count(*) FROM meta GROUP BY key ORDER BY key");
        assert_eq!(meta, "change_log_kept_from|1\nepoch|1\nop_horizon_ms|1", "round {round}");
        let epoch = cluster.psql(&url, "SELECT value FROM meta WHERE key = 'epoch'");
        assert_eq!((a.epoch(), b.epoch()), (epoch.as_str(), epoch.as_str()), "round {round}");

        // Both serve the one schema: an op applied by one is replayed by the other.
        let first = applied(a.write(add(USER, "op-1", 5)).await);
        match b.write(add(USER, "op-1", 5)).await {
            Ok(WriteOutcome::Replayed(record)) => assert_eq!(record, first),
            other => panic!("round {round}: {other:?}"),
        }
        a.close().await;
        b.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_schema_newer_than_the_hub_is_refused_and_left_as_it_is() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { backend: Backend::Postgres, url: Some(url.clone()), ..StoreConfig::default() };
    let open = || hub::store::open(&config, dir.path(), RETENTION, StoreMetrics::default());
    let store = open().unwrap();
    applied(store.write(add(USER, "op-1", 5)).await);
    store.close().await;

    let newer = SCHEMA_VERSION + 1;
    cluster.psql(&url, &format!("INSERT INTO schema_migrations (version, applied_ms) VALUES ({newer}, 0)"));
    let contents = || {
        [
            "SELECT * FROM schema_migrations ORDER BY 1",
            "SELECT * FROM meta ORDER BY 1",
            "SELECT * FROM records",
        ]
        .map(|query| cluster.psql(&url, query))
    };
    let before = contents();

    let refused = format!("{:#}", open().err().expect("a hub opened a schema newer than its own"));
    assert!(
        refused.contains("newer")
            && refused.contains(&newer.to_string())
            && refused.contains(&SCHEMA_VERSION.to_string()),
        "not a clear refusal: {refused}"
    );
    let mut hub_config = support::test_config(dir.path());
    hub_config.store = config.clone();
    let refused = format!("{:#}", hub::App::open(hub_config).expect_err("a hub started on a newer schema"));
    assert!(refused.contains("newer"), "not a clear refusal: {refused}");

    assert_eq!(contents(), before, "a refused start changed the database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_database_makes_the_hub_answer_503_until_it_is_back_without_a_restart() {
    let mut cluster = Cluster::start();
    let url = cluster.database();
    let hub = hub_on(&url).await;
    let site = hub.site("wrc", USER);
    site.delta("balance", 10, "before").await.assert_ok();
    let epoch = site.timestamp("balance").await.assert_ok()["epoch"].clone();

    cluster.crash();
    let unavailable = |reply: &Reply| {
        reply.assert_refused(503, "store_unavailable");
        assert!(reply.header("retry-after").is_some(), "a 503 without Retry-After: {reply:?}");
    };
    unavailable(&site.delta("balance", 5, "during").await);
    unavailable(&site.timestamp("balance").await);
    unavailable(&site.get("balance").await);
    unavailable(&site.delta("balance", 5, "during").await);

    cluster.start_again();
    // The client's retry of the op it was refused, until the hub takes it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let retried = loop {
        let reply = site.delta("balance", 5, "during").await;
        if reply.status == 200 {
            break reply;
        }
        unavailable(&reply);
        assert!(Instant::now() < deadline, "the hub did not recover within a minute of the database");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Whether or not a 503'd send was applied, its retry leaves it applied once.
    assert_eq!(retried.body["data"], json!({ "coins": 15 }));
    let stamp = site.timestamp("balance").await;
    assert_eq!((&stamp.assert_ok()["version"], &stamp.body["epoch"]), (&json!(2), &epoch));
    assert_eq!(site.coins().await, 15);
    site.delta("balance", 1, "after").await.assert_ok();
    let ledger = ledger(&cluster, &url);
    assert_ledger_adds_up_to(&ledger, 16);
    let ops: Vec<Option<&str>> = ledger.iter().map(|row| row.op_id.as_deref()).collect();
    assert_eq!(ops, [Some("before"), Some("during"), Some("after")]);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_one_users_requests_under_the_shared_rate_limit_is_not_refused() {
    let url = Cluster::shared().database();
    let hub_at = |url: String| {
        TestHub::start_with(move |c| {
            c.limits.requests_per_minute = 100;
            c.store.backend = Backend::Postgres;
            c.store.url = Some(url);
        })
    };
    let (a, b) = (hub_at(url.clone()).await, hub_at(url).await);
    // Twenty requests at once on each instance: forty of the user's hundred a minute. Each
    // client has its connection open first, so that the requests arrive together.
    let together = Arc::new(tokio::sync::Barrier::new(40));
    let mut reads = JoinSet::new();
    for i in 0..40 {
        let (hub, together) = (if i % 2 == 0 { &a } else { &b }, together.clone());
        let site = hub.site("wrc", USER);
        let health = format!("{}/healthz", hub.url);
        reads.spawn(async move {
            site.client.get(health).send().await.unwrap();
            together.wait().await;
            site.timestamp("balance").await
        });
    }
    let refused: Vec<Reply> = reads.join_all().await.into_iter().filter(|r| r.status != 200).collect();
    assert!(
        refused.is_empty(),
        "{} of 40 requests refused, the limit being 100 a minute: {:?}",
        refused.len(),
        refused.first()
    );
}
