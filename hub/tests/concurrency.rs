//! Many clients writing one record at once, over real HTTP against a real hub and SQLite
//! file: every delta is applied exactly once, no spend takes a balance below zero, a
//! replayed op id changes nothing, and versions and stamps stay strictly ordered.

mod support;

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Value, json};
use support::{Reply, SITES, TestHub};

const USER: &str = "8-evans";

/// A hub whose rate limit never gets in the way of the load these tests make.
async fn unthrottled_hub() -> TestHub {
    TestHub::start_with(|c| c.limits.requests_per_minute = 1_000_000).await
}

/// One audit ledger row.
#[derive(Debug)]
struct LedgerRow {
    op_id: Option<String>,
    delta: i64,
    result: i64,
    version: i64,
}

/// The user's balance ledger, oldest first.
fn balance_ledger(dir: &Path, user: &str) -> Vec<LedgerRow> {
    let conn = rusqlite::Connection::open(dir.join("hub.sqlite3")).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT op_id, delta, result, version FROM ledger
             WHERE user_id = ?1 AND data_type = 'balance' ORDER BY id",
        )
        .unwrap();
    stmt.query_map([user], |r| {
        Ok(LedgerRow { op_id: r.get(0)?, delta: r.get(1)?, result: r.get(2)?, version: r.get(3)? })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Asserts that the ledger is a running sum ending at `coins`, one row per version.
#[track_caller]
fn assert_ledger_adds_up_to(ledger: &[LedgerRow], coins: i64) {
    let mut running = 0;
    for (i, row) in ledger.iter().enumerate() {
        running += row.delta;
        assert_eq!(row.result, running, "ledger row {i} does not follow from the rows before it: {row:?}");
        assert_eq!(
            row.version,
            i64::try_from(i).unwrap() + 1,
            "ledger row {i} has a skipped version: {row:?}"
        );
    }
    assert_eq!(running, coins, "the ledger sums to {running} but the balance is {coins}");
}

/// The `version` and `last_updated` of an accepted write.
fn stamp(reply: &Reply) -> (u64, String) {
    let body = reply.assert_ok();
    let last_updated = body["last_updated"].as_str().expect("an accepted write has a last_updated");
    // `2025-11-09T18:45:30.123Z`: fixed width, so text order is time order.
    assert!(last_updated.len() == 24 && last_updated.ends_with('Z'), "odd stamp {last_updated:?}");
    (body["version"].as_u64().unwrap(), last_updated.to_owned())
}

/// Asserts that the writes' versions are exactly `1..=count` and that `last_updated`
/// strictly increases with the version.
#[track_caller]
fn assert_versions_and_stamps_strictly_ordered(mut stamps: Vec<(u64, String)>, count: u64) {
    stamps.sort();
    let versions: Vec<u64> = stamps.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (1..=count).collect::<Vec<_>>(), "each write gets its own version");
    for pair in stamps.windows(2) {
        assert!(
            pair[0].1 < pair[1].1,
            "last_updated does not strictly increase: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_deltas_on_one_balance_are_each_applied_exactly_once() {
    const CLIENTS: usize = 16;
    const DELTAS_EACH: usize = 500;
    let hub = unthrottled_hub().await;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let page = hub.site(SITES[c % SITES.len()].0, USER);
            tokio::spawn(async move {
                let mut sent = Vec::with_capacity(DELTAS_EACH);
                for n in 0..DELTAS_EACH {
                    let (op_id, amount) = (format!("client{c}-delta{n}"), rand::random_range(1..=5));
                    let reply = page.delta("balance", amount, &op_id).await;
                    assert_eq!(
                        reply.body.get("replayed"),
                        None,
                        "a fresh op id was replayed: {}",
                        reply.body
                    );
                    sent.push((op_id, amount, stamp(&reply)));
                }
                sent
            })
        })
        .collect();
    let mut sent = Vec::with_capacity(CLIENTS * DELTAS_EACH);
    for client in clients {
        sent.extend(client.await.unwrap());
    }

    let total: i64 = sent.iter().map(|(_, amount, _)| amount).sum();
    let reader = hub.site("wrc", USER);
    let record = reader.get("balance").await;
    assert_eq!(record.assert_ok()["data"]["coins"], total);
    assert_eq!(record.body["version"], sent.len());
    assert_versions_and_stamps_strictly_ordered(
        sent.iter().map(|(_, _, stamp)| stamp.clone()).collect(),
        u64::try_from(sent.len()).unwrap(),
    );

    let dir = hub.stop().await;
    let ledger = balance_ledger(dir.path(), USER);
    assert_eq!(ledger.len(), sent.len(), "one ledger row per applied delta");
    let by_op: HashMap<&str, i64> = ledger
        .iter()
        .map(|row| (row.op_id.as_deref().expect("a delta's row names its op id"), row.delta))
        .collect();
    assert_eq!(by_op.len(), ledger.len(), "an op id appears twice in the ledger");
    for (op_id, amount, _) in &sent {
        assert_eq!(by_op.get(op_id.as_str()), Some(amount), "ledger row of {op_id}");
    }
    assert_ledger_adds_up_to(&ledger, total);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_spends_never_take_a_balance_below_zero() {
    const START: i64 = 100;
    const PRICE: i64 = 7;
    const SPENDERS: usize = 32;
    const TRIES_EACH: usize = 5;
    let hub = unthrottled_hub().await;
    hub.site("roflfaucet", USER).delta("balance", START, "fund").await.assert_ok();

    let spenders: Vec<_> = (0..SPENDERS)
        .map(|s| {
            let page = hub.site(SITES[s % SITES.len()].0, USER);
            tokio::spawn(async move {
                let mut replies = Vec::with_capacity(TRIES_EACH);
                for n in 0..TRIES_EACH {
                    replies.push(page.delta("balance", -PRICE, &format!("spender{s}-try{n}")).await);
                }
                replies
            })
        })
        .collect();
    let mut successes = 0;
    for spender in spenders {
        for reply in spender.await.unwrap() {
            if reply.status.is_success() {
                let coins = reply.assert_ok()["data"]["coins"].as_i64().unwrap();
                assert!(coins >= 0, "a spend answered with {coins} coins");
                successes += 1;
            } else {
                reply.assert_refused(409, "insufficient_funds");
                let current = &reply.body["current"];
                let coins =
                    current["data"]["coins"].as_i64().unwrap_or_else(|| panic!("no current: {}", reply.body));
                assert!((0..PRICE).contains(&coins), "refused a spend of {PRICE} with {coins} coins left");
                assert!(current["version"].as_u64().is_some(), "current carries no version: {current}");
            }
        }
    }

    let coins = hub.site("wrc", USER).coins().await;
    assert!(successes * PRICE <= START, "{successes} spends of {PRICE} succeeded out of {START}");
    assert_eq!(coins, START - PRICE * successes);
    // Far more spends were tried than the balance covers, and refusals leave less than one
    // price: every spend the balance could pay for went through.
    assert_eq!(successes, START / PRICE);

    let dir = hub.stop().await;
    let ledger = balance_ledger(dir.path(), USER);
    assert_eq!(
        ledger.len(),
        1 + usize::try_from(successes).unwrap(),
        "one row for the funding, one per spend"
    );
    assert!(ledger.iter().all(|row| row.result >= 0), "the ledger went below zero: {ledger:?}");
    assert_ledger_adds_up_to(&ledger, coins);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_op_id_is_applied_once() {
    const COPIES: usize = 20;
    let hub = unthrottled_hub().await;
    let copies: Vec<_> = (0..COPIES)
        .map(|_| {
            let page = hub.site("clickforcharity", USER);
            tokio::spawn(async move { page.delta("balance", 25, "tab-return-bonus").await })
        })
        .collect();
    let mut replies = Vec::with_capacity(COPIES);
    for copy in copies {
        replies.push(copy.await.unwrap());
    }

    let first = replies.iter().find(|r| r.body.get("replayed").is_none()).expect("one copy is applied");
    let answer = |r: &Reply| -> (Value, Value, Value) {
        let body = r.assert_ok();
        (body["version"].clone(), body["data"].clone(), body["last_updated"].clone())
    };
    assert_eq!((&first.body["version"], &first.body["data"]), (&json!(1), &json!({"coins": 25})));
    for reply in &replies {
        assert_eq!(answer(reply), answer(first), "every copy gets the first answer");
    }
    let replayed = replies.iter().filter(|r| r.body["replayed"] == true).count();
    assert_eq!(replayed, COPIES - 1, "all copies but one say replayed");

    let page = hub.site("clickforcharity", USER);
    page.delta("balance", 5, "later-delta").await.assert_ok();
    let again = page.delta("balance", 25, "tab-return-bonus").await;
    assert_eq!(again.body["replayed"], true);
    assert_eq!(answer(&again), answer(first), "a later replay still gets the first answer");

    let before = hub.snapshot();
    page.delta("balance", 26, "tab-return-bonus").await.assert_refused(422, "op_id_reused");
    assert_eq!(hub.snapshot(), before, "a reused op id stores nothing");
    assert_eq!(page.coins().await, 30);

    let dir = hub.stop().await;
    let ledger = balance_ledger(dir.path(), USER);
    assert_eq!(ledger.iter().filter(|row| row.op_id.as_deref() == Some("tab-return-bonus")).count(), 1);
    assert_ledger_adds_up_to(&ledger, 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_in_the_same_millisecond_get_strictly_increasing_stamps() {
    const WRITERS: usize = 50;
    const PUSHES_EACH: usize = 4;
    let hub = unthrottled_hub().await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let page = hub.site(SITES[w % SITES.len()].0, USER);
            tokio::spawn(async move {
                let mut stamps = Vec::with_capacity(PUSHES_EACH);
                for n in 0..PUSHES_EACH {
                    // Distinct amounts, so that every push changes the record.
                    let coins = 1 + w * PUSHES_EACH + n;
                    let reply = page.push("balance", json!({ "coins": coins })).await;
                    assert_eq!(reply.assert_ok()["timestamp"], reply.body["last_updated"]);
                    stamps.push(stamp(&reply));
                }
                stamps
            })
        })
        .collect();
    let mut stamps = Vec::with_capacity(WRITERS * PUSHES_EACH);
    for writer in writers {
        stamps.extend(writer.await.unwrap());
    }
    let count = u64::try_from(stamps.len()).unwrap();
    let newest = stamps.iter().max().cloned().unwrap();
    assert_versions_and_stamps_strictly_ordered(stamps, count);

    let stored = hub.site("wrc", USER).timestamp("balance").await;
    assert_eq!(stored.assert_ok()["version"], newest.0);
    assert_eq!(stored.body["last_updated"], newest.1);
    hub.stop().await;
}
