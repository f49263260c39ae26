//! Crash safety of two real `hub` instances sharing one PostgreSQL database, under the
//! clients of `durability.rs` (`support::crash`): sixteen clients, four users spread over
//! the three sites, send deltas — gains and spends — with op ids they made themselves; they
//! send about a fifth of their requests twice (half the time both copies at once), and send
//! again, same op id and body, after every timeout or lost connection, their timeouts short.
//! Each copy goes to one instance or the other at random, so that the two copies of a
//! duplicate often race each other through both. Meanwhile, at random moments and in a
//! random order, one instance or the other is killed with SIGKILL and started again
//! (`HUB_CRASH_KILLS` times, default 2), and the database server crashes (`pg_ctl stop -m
//! immediate`, `HUB_CRASH_DB_CRASHES` times, default 1) and is started again, recovering
//! from its write-ahead log. At the end both instances are killed and started again, and
//! every delta the clients never saw acknowledged is sent once more.
//!
//! What an answer tells a client: a 200 acknowledges the delta (applied now, or earlier
//! when it says `replayed`); a `409 insufficient_funds` refuses it for good; a `503
//! store_unavailable`, which must say `Retry-After`, tells nothing, and the client sends
//! again after the time it says; no answer tells nothing. Any other answer, another 5xx
//! above all, fails the test.
//!
//! While the database is away each instance answers a write and a read `503
//! store_unavailable` with `Retry-After`, and the clients hear such answers too. Once it is
//! back, each instance, still the same process, applies a write again.
//!
//! Checked on the database through psql, each time in one statement — one snapshot, while
//! the instances write on — after every kill and every return of the database, and at the
//! end: each user's ledger is a running sum that never goes below zero, one row per version,
//! ending at the balance and version of the user's record; no op id is in the ledger twice,
//! and each has its remembered op; every ledger row is a delta a client sent, with its user,
//! site and amount; every delta acknowledged before the check is in the ledger. At the end,
//! when nothing is in flight and every delta has had an answer: the ledger holds exactly
//! the acknowledged deltas, no delta was answered as freshly applied twice, and each user's
//! balance as each instance serves it is the sum of that user's acknowledged deltas.
//!
//! Every wait is bounded; nothing asserts how fast anything is.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hub::config::Backend;
use rand::seq::SliceRandom;
use support::crash::{
    Books, Clients, Database, LedgerRow, Patience, assert_acknowledged_applied, assert_acknowledged_kept,
    assert_ledger_was_sent, assert_settled, resend_unacknowledged, times,
};
use support::postgres::Cluster;
use support::{Deployment, PATIENCE, Reply};
use tokio::process::Child;

/// Kills of an instance in one run unless `HUB_CRASH_KILLS` says otherwise.
const DEFAULT_KILLS: usize = 2;
/// Crashes of the database in one run unless `HUB_CRASH_DB_CRASHES` says otherwise.
const DEFAULT_DB_CRASHES: usize = 1;
/// How long an instance may take to write again once the database is back.
const RECOVERY: Duration = Duration::from_secs(60);
/// The user the test's own probes write for, in points: the clients' balances and their
/// ledger stay theirs alone.
const PROBE_USER: &str = "90-probe";

/// What befalls the deployment at a random moment.
#[derive(Debug, Clone, Copy)]
enum Blow {
    /// One instance, either, is killed with SIGKILL and started again.
    Kill,
    /// The database server crashes and is started again; the instances run on.
    DatabaseCrash,
}

/// An instance of the hub: settings, port and log of its own, the database `url`.
fn instance(url: &str) -> Deployment {
    Deployment::new(|config| {
        config.limits.requests_per_minute = 1_000_000;
        config.store.backend = Backend::Postgres;
        config.store.url = Some(url.to_owned());
    })
}

/// The database's balance records, balance ledger and forgotten op ids, read in one
/// statement and so from one snapshot, however the instances write meanwhile.
fn read_books(cluster: &Cluster, url: &str) -> Books {
    const BOOKS: &str = "
        SELECT 'record', user_id, '', '', (data::json ->> 'coins')::BIGINT, 0, version, 0
        FROM records WHERE data_type = 'balance'
        UNION ALL
        SELECT 'ledger', user_id, site_id, op_id, delta, result, version, id
        FROM ledger WHERE data_type = 'balance'
        UNION ALL
        SELECT 'forgotten', '', '', '', COUNT(*), 0, 0, 0
        FROM (SELECT user_id, op_id FROM ledger EXCEPT SELECT user_id, op_id FROM ops) AS forgotten
        ORDER BY 1, 2, 8";
    let mut books = Books::default();
    for line in cluster.psql(url, BOOKS).lines() {
        let fields: Vec<&str> = line.split('|').collect();
        assert_eq!(fields.len(), 8, "psql printed {line:?}");
        let number = |i: usize| -> i64 {
            fields[i].parse().unwrap_or_else(|_| panic!("column {i} of {line:?} is not a number"))
        };
        match fields[0] {
            "record" => {
                books.balances.insert(fields[1].to_owned(), (number(4), number(6)));
            }
            "ledger" => books.ledger.push(LedgerRow {
                user: fields[1].to_owned(),
                site: fields[2].to_owned(),
                op_id: fields[3].to_owned(),
                delta: number(4),
                result: number(5),
                version: number(6),
            }),
            "forgotten" => books.forgotten = number(4),
            _ => panic!("psql printed {line:?}"),
        }
    }
    books
}

/// Reads the database while the clients go on, and checks it: on its own
/// ([`Books::check`]), against what the clients sent, and against what they had heard
/// acknowledged before it was read.
fn assert_books_hold(cluster: &Cluster, url: &str, clients: &Clients) {
    let heard = clients.journal();
    let ledger = read_books(cluster, url).check();
    assert_acknowledged_kept(&ledger, &heard);
    assert_ledger_was_sent(&ledger, &clients.journal());
}

/// The seconds an answer's `Retry-After` says, which it must say.
fn retry_after(reply: &Reply) -> Duration {
    let secs = reply.header("retry-after").and_then(|v| v.parse().ok());
    Duration::from_secs(secs.unwrap_or_else(|| panic!("a 503 without a Retry-After: {}", reply.body)))
}

/// While the database is down: each instance answers a write and a read `503
/// store_unavailable` with `Retry-After`. `outage` numbers the probes' op ids.
async fn assert_each_answers_unavailable(hubs: &[Deployment; 2], outage: usize) {
    for (i, hub) in hubs.iter().enumerate() {
        let page = hub.backend("wrc", PROBE_USER, PATIENCE);
        let write = page.delta("points", 1, &format!("away-{outage}-{i}")).await;
        let read = page.get("points").await;
        for reply in [write, read] {
            reply.assert_refused(503, "store_unavailable");
            retry_after(&reply);
        }
    }
}

/// Once the database is back: each instance, still the same process, applies a write
/// within [`RECOVERY`], answering `503 store_unavailable` with `Retry-After` until it does.
async fn until_each_writes_again(hubs: &[Deployment; 2], outage: usize) {
    for (i, hub) in hubs.iter().enumerate() {
        let page = hub.backend("wrc", PROBE_USER, PATIENCE);
        let op_id = format!("back-{outage}-{i}");
        let deadline = Instant::now() + RECOVERY;
        loop {
            let reply = page.delta("points", 1, &op_id).await;
            if reply.status == 200 {
                break;
            }
            reply.assert_refused(503, "store_unavailable");
            assert!(
                Instant::now() < deadline,
                "instance {i} did not write within {RECOVERY:?} of the database's return: {}",
                reply.body
            );
            tokio::time::sleep(retry_after(&reply)).await;
        }
    }
}

/// Prints the instances' and the database server's logs when the test fails: their
/// directories go with it.
struct LogsOnFailure(Vec<PathBuf>);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in &self.0 {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(300).collect();
                eprintln!("--- the last lines of {}:", log.display());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_deltas_survive_killed_instances_and_database_crashes() {
    let kills = times("HUB_CRASH_KILLS", DEFAULT_KILLS, 1);
    let crashes = times("HUB_CRASH_DB_CRASHES", DEFAULT_DB_CRASHES, 1);
    let mut cluster = Cluster::start();
    let url = cluster.database();
    let hubs = [instance(&url), instance(&url)];
    let _logs = LogsOnFailure(
        hubs.iter().map(|hub| hub.dir.path().join("hub.log")).chain([cluster.dir().join("log")]).collect(),
    );
    let mut running: [Child; 2] = [hubs[0].start().await, hubs[1].start().await];
    let both = [&hubs[0], &hubs[1]];
    let clients = Clients::start(&both, Patience::Short, Database::Crashes);

    let mut blows = [vec![Blow::Kill; kills], vec![Blow::DatabaseCrash; crashes]].concat();
    blows.shuffle(&mut rand::rng());
    let mut mark = 0;
    let mut outages = 0;
    for blow in blows {
        clients.run_beyond(mark).await;
        match blow {
            Blow::Kill => {
                let i = rand::random_range(0..running.len());
                running[i].kill().await.unwrap();
                assert_books_hold(&cluster, &url, &clients);
                running[i] = hubs[i].start().await;
            }
            Blow::DatabaseCrash => {
                outages += 1;
                let heard = clients.unavailable();
                cluster.crash();
                assert_each_answers_unavailable(&hubs, outages).await;
                clients.until_unavailable_beyond(heard).await;
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..1500))).await;
                cluster.start_again();
                for (i, hub) in running.iter_mut().enumerate() {
                    let exited = hub.try_wait().unwrap();
                    assert!(exited.is_none(), "instance {i} ended ({exited:?}) while the database was away");
                }
                until_each_writes_again(&hubs, outages).await;
                assert_books_hold(&cluster, &url, &clients);
            }
        }
        mark = clients.acknowledged();
    }
    // Both instances end with the clients, so that none of their requests is left inside
    // one when the final resends begin: each of those answers is then the last word.
    let mut journal = clients.finish().await;
    for hub in &mut running {
        hub.kill().await.unwrap();
    }
    assert_acknowledged_applied(&read_books(&cluster, &url).check(), &journal);

    let mut running = [hubs[0].start().await, hubs[1].start().await];
    resend_unacknowledged(&both, &mut journal, Database::Crashes).await;
    let ledger = read_books(&cluster, &url).check();
    assert_settled(&both, &ledger, &journal).await;
    // The run did test overdrafts: some spends were applied, some refused.
    assert!(ledger.values().any(|e| e.delta < 0), "no spend was applied");
    assert!(journal.refusals > 0, "no overdraft was refused");
    for hub in &mut running {
        hub.kill().await.unwrap();
    }
    println!(
        "{kills} kills of an instance, {crashes} crashes of the database: {} deltas acknowledged, \
         {} refusals, {} store_unavailable answers heard by the clients",
        journal.acknowledged, journal.refusals, journal.unavailable
    );
}
