//! Crash safety of the real `hub` binary under clients that behave like pages on a bad
//! network. Sixteen clients, four users spread over the three sites, send deltas — gains
//! and spends — with op ids they made themselves; they send about a fifth of their
//! requests twice (half the time both copies at once), and send again, same op id and
//! body, after every timeout or lost connection — their timeouts are short, so resends
//! often overlap a copy the hub is still working on. Meanwhile the hub is killed with
//! SIGKILL at random moments (`HUB_CRASH_KILLS` times, default 3) and restarted on the same
//! data dir, or stopped with SIGTERM (then the clients wait for every answer). Afterwards
//! every delta the clients never saw acknowledged is sent once more.
//!
//! What an answer tells a client: a 200 acknowledges the delta (applied now, or earlier
//! when it says `replayed`); a `409 insufficient_funds` refuses it for good — the hub
//! remembers the refusal, so no other copy still on its way, and no later resend, is ever
//! applied; no answer tells nothing.
//!
//! Checked on the database file after every kill (with the hub down) and at the end: the
//! SQLite integrity check passes; each user's ledger is a running sum that never goes below
//! zero, one row per version, ending at the balance and version of the user's record; no
//! op id is in the ledger twice, and each has its remembered op; every ledger row is a
//! delta a client sent, with its user, site and amount; every delta acknowledged before the
//! hub died is in the ledger. At the end, when nothing is in flight and every delta has had
//! an answer: the ledger holds exactly the acknowledged deltas, no delta was answered as
//! freshly applied twice, and each user's balance as the hub serves it is the sum of that
//! user's acknowledged deltas. A graceful stop, besides, applies nothing it did not answer.
//!
//! Every wait is bounded; nothing asserts how fast anything is.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use support::crash::{
    Books, Clients, Database, Entry, LedgerRow, Outcome, Patience, assert_acknowledged_applied,
    assert_settled, resend_unacknowledged, times,
};
use support::{Deployment, PATIENCE};
use tokio::process::{Child, Command};

/// Kills of the hub in one run of the SIGKILL test unless `HUB_CRASH_KILLS` says otherwise.
const DEFAULT_KILLS: usize = 3;

/// Lets the clients' stream run into the hub for a random moment, once it has acknowledged
/// more than `mark` deltas, then kills the hub with SIGKILL and reaps it.
async fn kill_mid_stream(hub: &mut Child, clients: &Clients, mark: usize) {
    clients.run_beyond(mark).await;
    hub.kill().await.unwrap();
}

/// Reads the database file and checks it on its own: SQLite's integrity check passes; each
/// user's ledger is a running sum that never goes below zero, one row per version, ending at
/// the record's balance and version; no op id is there twice and each has its remembered
/// op. Returns the ledger by op id.
fn read_ledger(deployment: &Deployment) -> HashMap<String, Entry> {
    let conn = rusqlite::Connection::open(deployment.database()).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");

    let mut records =
        conn.prepare("SELECT user_id, data, version FROM records WHERE data_type = 'balance'").unwrap();
    let balances: HashMap<String, (i64, i64)> = records
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
        .unwrap()
        .map(|row| {
            let (user, data, version) = row.unwrap();
            let data: Value = serde_json::from_str(&data).unwrap();
            (user, (data["coins"].as_i64().unwrap(), version))
        })
        .collect();

    let mut rows = conn
        .prepare(
            "SELECT user_id, site_id, op_id, delta, result, version FROM ledger
             WHERE data_type = 'balance' ORDER BY user_id, id",
        )
        .unwrap();
    let ledger = rows
        .query_map([], |r| {
            Ok(LedgerRow {
                user: r.get(0)?,
                site: r.get(1)?,
                op_id: r.get(2)?,
                delta: r.get(3)?,
                result: r.get(4)?,
                version: r.get(5)?,
            })
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();

    let forgotten: i64 = conn
        .query_row(
            // A set difference: the op log has no index by op id to look each ledger row up in.
            "SELECT COUNT(*) FROM
             (SELECT user_id, op_id FROM ledger EXCEPT SELECT user_id, op_id FROM remembered_ops)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    Books { balances, ledger, forgotten }.check()
}

/// The number of kills: `HUB_CRASH_KILLS`, or [`DEFAULT_KILLS`].
fn kills() -> usize {
    times("HUB_CRASH_KILLS", DEFAULT_KILLS, 1)
}

fn deployment() -> Deployment {
    Deployment::new(|config| config.limits.requests_per_minute = 1_000_000)
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_deltas_survive_sigkill() {
    let deployment = deployment();
    let mut hub = deployment.start().await;
    let clients = Clients::start(&[&deployment], Patience::Short, Database::Steady);
    let mut mark = 0;
    for _ in 1..kills() {
        kill_mid_stream(&mut hub, &clients, mark).await;
        assert_acknowledged_applied(&read_ledger(&deployment), &clients.journal());
        hub = deployment.start().await;
        mark = clients.acknowledged();
    }
    // The last kill also ends the clients, so that none of their requests is left inside a
    // hub when the final resends begin: each of those answers is then the last word.
    kill_mid_stream(&mut hub, &clients, mark).await;
    let mut journal = clients.finish().await;

    assert_acknowledged_applied(&read_ledger(&deployment), &journal);

    let mut hub = deployment.start().await;
    resend_unacknowledged(&[&deployment], &mut journal, Database::Steady).await;
    let ledger = read_ledger(&deployment);
    assert_settled(&[&deployment], &ledger, &journal).await;
    // The run did test overdrafts: some spends were applied, some refused.
    assert!(ledger.values().any(|e| e.delta < 0), "no spend was applied");
    assert!(journal.refusals > 0, "no overdraft was refused");
    hub.kill().await.unwrap();
}

/// Asks the hub to stop gracefully. `unsafe_code` is forbidden in this workspace, so the
/// signal goes through kill(1) rather than libc.
async fn terminate(hub: &Child) {
    let pid = hub.id().expect("the hub is running").to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(status.success(), "kill -TERM {pid} failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_answered_before_a_graceful_stop_survive_it() {
    let deployment = deployment();
    let mut hub = deployment.start().await;
    // Patient clients: a graceful stop answers every request it took in.
    let clients = Clients::start(&[&deployment], Patience::Full, Database::Steady);
    clients.until_acknowledged_beyond(0).await;
    tokio::time::sleep(Duration::from_millis(rand::random_range(10..1500))).await;
    terminate(&hub).await;
    let status = tokio::time::timeout(PATIENCE, hub.wait())
        .await
        .unwrap_or_else(|_| panic!("the hub did not stop within {PATIENCE:?} of SIGTERM"))
        .unwrap();
    assert!(status.success(), "the hub's graceful stop ended with {status}; its log:\n{}", deployment.log());
    let mut journal = clients.finish().await;
    let ledger = read_ledger(&deployment);
    assert_acknowledged_applied(&ledger, &journal);
    let acknowledged: HashSet<&str> =
        journal.with_outcome(Outcome::Acknowledged).map(|d| d.op_id.as_str()).collect();
    let unanswered: Vec<&String> =
        ledger.keys().filter(|op_id| !acknowledged.contains(op_id.as_str())).collect();
    assert!(unanswered.is_empty(), "a graceful stop applied writes it never answered: {unanswered:?}");

    let mut hub = deployment.start().await;
    resend_unacknowledged(&[&deployment], &mut journal, Database::Steady).await;
    assert_settled(&[&deployment], &read_ledger(&deployment), &journal).await;
    hub.kill().await.unwrap();
}
