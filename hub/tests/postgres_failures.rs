//! How the PostgreSQL store fails, and recovers, when the database or the network around it
//! misbehaves, and what it refuses to do:
//!
//! - Exactly once: an op id dated more than a day ahead of the hub's clock is refused; one
//!   dated within the day is remembered until the horizon passes its date.
//! - Forgetting expired op ids, a million at once, goes on in chunks between writes and while
//!   none waits, never holding the writer; moving the horizon never waits behind a slow batch.
//! - A transaction left open by an instance cut off mid-batch is ended by the server
//!   (`idle_in_transaction_session_timeout`), and its records are writable again.
//! - A locked record fails only the writes to it (`Busy`, passing), not its whole batch.
//! - A database that stops answering fails writes, reads and rate-limit leases
//!   `Unavailable` within a bounded time: every call of the hub waits at most a statement
//!   timeout and a margin.
//! - The first write after the server closed the writer's idle connection is applied, on a
//!   new one.
//! - An instance waiting for another's migration waits as long as that takes.
//! - The URL's own `options` (a `search_path`, say) are kept, before the hub's.
//! - With `sslmode=require` the password is never sent to a server that declines TLS.
//! - `StoreConfig`'s `Debug` hides the URL.

mod support;

use std::io::{Read, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hub::config::{Backend, StoreConfig};
use hub::store::postgres::{PostgresOptions, PostgresStore};
use hub::store::{Rejection, Store, StoreError, WriteOutcome};
use protocol::{DataType, UserId};
use support::postgres::Cluster;
use support::store::{DAY, RETENTION, T, TestClock, add, applied, postgres_options, uuid7};

const USER: &str = "8-evans";
/// The store's private migration lock (`MIGRATION_LOCK` in postgres.rs).
const MIGRATION_LOCK: i64 = 0x6875_625f_6d69_6772;

/// The test's options (`support::store`'s) with `statement_timeout`, on a clock of their own.
fn options(url: &str, statement_timeout: Duration) -> PostgresOptions {
    clocked_options(url, statement_timeout, &TestClock::at(T))
}

/// The test's options with `statement_timeout`, on `clock`, a clock the test moves.
fn clocked_options(url: &str, statement_timeout: Duration, clock: &Arc<TestClock>) -> PostgresOptions {
    PostgresOptions { statement_timeout, ..postgres_options(url, clock) }
}

/// Opens the store off the runtime's threads: opening blocks until the writer has migrated.
async fn open(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
    tokio::task::spawn_blocking(move || PostgresStore::open(options)).await.unwrap()
}

// ---------------------------------------------------------------------------------------
// Forgetting expired op ids.

/// Op ids past the horizon pile up (a busy deployment: ten minutes of op ids to forget at
/// once, or the first prune after the instances were stopped a while), more than one
/// statement could delete within the statement timeout: the writer deletes them a chunk at a
/// time, between writes and while none waits; every write is applied meanwhile, and all of
/// them are forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prune_that_outlasts_the_statement_timeout_neither_stalls_every_write_nor_is_never_done() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let timeout = Duration::from_millis(250);
    let store = open(options(&url, timeout)).await.unwrap();
    // A million op ids remembered long ago: created_ms 0 is far behind the horizon.
    cluster.psql(
        &url,
        "INSERT INTO ops (user_id, op_id, fingerprint, data, version, updated_ms, created_ms, refusal)
         SELECT 'old-' || (g % 1000), 'op-' || g, 'f', '{}', 1, 0, 0, NULL
         FROM generate_series(1, 1000000) g",
    );

    for i in 0..12 {
        applied(store.write(add(USER, &format!("prune-{i}"), 1)).await);
    }
    // Forgetting goes on between writes, a chunk at a time, and while none waits.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut more = 0;
    let left = loop {
        let left: u64 = cluster.psql(&url, "SELECT count(*) FROM ops WHERE created_ms = 0").parse().unwrap();
        if left == 0 || Instant::now() > deadline {
            break left;
        }
        more += 1;
        applied(store.write(add(USER, &format!("prune-more-{more}"), 1)).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    store.close().await;

    assert_eq!(left, 0, "the expired op ids are never forgotten: the DELETE is cancelled every time");
}

// ---------------------------------------------------------------------------------------
// A database that stops answering.

/// A TCP relay between the hub and the database that can freeze: from then on it passes
/// nothing either way, but keeps every connection open, as a stuck server or a network that
/// drops packets does (the database's statement timeout cannot fire: the statement never
/// reaches it, or its answer never comes back).
struct Relay {
    port: u16,
    frozen: Arc<AtomicBool>,
    /// Freeze as the next `COMMIT` goes to the server, before it does.
    at_commit: Arc<AtomicBool>,
}

impl Relay {
    fn to(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let at_commit = Arc::new(AtomicBool::new(false));
        let (relay_frozen, relay_at_commit) = (frozen.clone(), at_commit.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { return };
                for (from, to, upstream) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap(), true),
                    (server, client, false),
                ] {
                    let frozen = relay_frozen.clone();
                    let at_commit = relay_at_commit.clone();
                    std::thread::spawn(move || {
                        pass(from, to, &frozen, upstream.then_some(&*at_commit));
                    });
                }
            }
        });
        Relay { port, frozen, at_commit }
    }

    fn freeze_at_next_commit(&self) {
        self.at_commit.store(true, Ordering::SeqCst);
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until frozen, then holds both open and passes nothing. Going to the
/// server (`at_commit` given), freezes first when armed and the bytes hold a `COMMIT`.
fn pass(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool, at_commit: Option<&AtomicBool>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if at_commit.is_some_and(|armed| armed.load(Ordering::SeqCst))
            && buf[..n].windows(6).any(|w| w == b"COMMIT")
        {
            frozen.store(true, Ordering::SeqCst);
        }
        while frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// `url` with its port replaced by `port`.
fn via(url: &str, cluster: &Cluster, port: u16) -> String {
    url.replace(&format!(":{}/", cluster.port), &format!(":{port}/"))
}

/// While the database answers nothing (frozen, or cut off without the network saying so), a
/// write fails `Unavailable` once the hub has waited a statement timeout and a margin, rather
/// than holding the writer and every write queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_to_a_database_that_stops_answering_fails_unavailable_within_bounds() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let relay = Relay::to(cluster.port);
    let store = open(options(&via(&url, cluster, relay.port), Duration::from_secs(1))).await.unwrap();
    applied(store.write(add(USER, "before", 5)).await);

    relay.freeze();
    let bound = Duration::from_secs(20);
    let outcome = tokio::time::timeout(bound, store.write(add(USER, "while-frozen", 5))).await;
    match outcome {
        Ok(Err(StoreError::Unavailable(_))) => {}
        Ok(other) => panic!("expected the write to fail as unavailable, got {other:?}"),
        Err(_) => panic!(
            "a write to a database that answers nothing was still waiting after {bound:?} \
             (statement timeout 1 s, connect timeout 5 s): the writer has no client-side timeout"
        ),
    }
}

/// The same for reads and for the shared rate limit's lease, which every authenticated
/// request takes first: each is bounded like the writer's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_and_rate_limit_leases_on_a_database_that_stops_answering_fail_within_bounds() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let relay = Relay::to(cluster.port);
    let store = open(options(&via(&url, cluster, relay.port), Duration::from_secs(1))).await.unwrap();
    let user = UserId::parse(USER).unwrap();
    let quota = store.shared_rate_limit().expect("PostgreSQL shares its rate limit");
    let per_minute = std::num::NonZeroU32::new(100).unwrap();
    // Warm the pool: connections and prepared statements exist before the freeze.
    store.stamps(&user, &[DataType::Balance]).await.unwrap();
    quota.take(USER, 1, 4, per_minute).await.unwrap();

    relay.freeze();
    let bound = Duration::from_secs(20);
    let read = tokio::time::timeout(bound, store.stamps(&user, &[DataType::Balance])).await;
    let lease = tokio::time::timeout(bound, quota.take(USER, 1, 4, per_minute)).await;
    let read = read.map(|r| r.map(|_| ()));
    assert!(
        matches!(read, Ok(Err(StoreError::Unavailable(_)))) && matches!(lease, Ok(Err(_))),
        "on a database that answers nothing, after {bound:?} (Err(Elapsed) = still waiting): \
         a timestamp read {read:?}, a rate-limit lease {lease:?} (the limiter never falls back to \
         counting alone: every authenticated request hangs until the request timeout)"
    );
}

// ---------------------------------------------------------------------------------------
// Migrations.

/// Instances that start together take turns on the migration lock, and one waits for
/// another's migration as long as it takes: neither the wait nor a step is bound by the
/// statement timeout the instances serve with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_waiting_for_another_ones_migration_waits_longer_than_a_statement_timeout() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    // Another instance migrating: it holds the lock for three seconds.
    let mut migrating = std::process::Command::new("psql")
        .args(["-X", "-q", "-d", &url, "-c"])
        .arg(format!("SELECT pg_advisory_lock({MIGRATION_LOCK}); SELECT pg_sleep(3);"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let held = Instant::now();
    while cluster.psql(
        &url,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    ) != "1"
    {
        assert!(held.elapsed() < Duration::from_secs(10), "psql never took the migration lock");
        std::thread::sleep(Duration::from_millis(20));
    }

    let opened = open(options(&url, Duration::from_millis(500))).await;
    migrating.wait().unwrap();
    match opened {
        Ok(store) => store.close().await,
        Err(e) => panic!(
            "the instance gave up waiting for the other's migration after one statement timeout \
             (500 ms) and does not start: {e}"
        ),
    }
}

// ---------------------------------------------------------------------------------------
// The URL.

/// The URL's own `options` are kept before the hub's settings: a deployment that keeps the
/// hub in a schema of its own (`?options=-c search_path=…`, the usual way in a shared
/// database) gets the hub's tables there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_urls_own_options_are_kept() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    cluster.psql(&url, "CREATE SCHEMA hub_schema");
    let with_path = format!("{url}?options=-c%20search_path%3Dhub_schema");
    let store = open(options(&with_path, Duration::from_secs(5))).await.unwrap();
    store.close().await;
    let where_records = cluster.psql(
        &url,
        "SELECT table_schema FROM information_schema.tables WHERE table_name = 'records' ORDER BY 1",
    );
    assert_eq!(
        where_records, "hub_schema",
        "the URL asked for search_path=hub_schema; the hub's tables went to {where_records:?}"
    );
}

/// A server that declines TLS and asks for the password in clear, as a man in the middle
/// between the hub and its database can: with `sslmode=require` (what the hub takes when the
/// URL names another host and no `sslmode`; `client.rs`'s unit tests check that choice), the
/// hub never sends the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_password_is_never_sent_in_clear_to_a_server_that_declines_tls() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let heard = std::thread::spawn(move || -> Option<String> {
        let (mut s, _) = listener.accept().ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let read_message = |s: &mut TcpStream| -> Option<Vec<u8>> {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).ok()?;
            let mut body = vec![0u8; usize::try_from(i32::from_be_bytes(len)).ok()?.checked_sub(4)?];
            s.read_exact(&mut body).ok()?;
            Some(body)
        };
        // SSLRequest (80877103): no.
        let first = read_message(&mut s)?;
        if first == 80_877_103i32.to_be_bytes() {
            s.write_all(b"N").ok()?;
            read_message(&mut s)?; // the startup message
        }
        // AuthenticationCleartextPassword.
        s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).ok()?;
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).ok()?;
        let body = read_message(&mut s)?;
        Some(String::from_utf8_lossy(&body).trim_end_matches('\0').to_owned())
    });

    // A URL that insists on TLS, pointed at the man in the middle.
    let url =
        format!("postgres://unified_sync:s3cret-PASSWORD@127.0.0.1:{port}/unified_sync?sslmode=require");
    let _ = open(options(&url, Duration::from_secs(5))).await;
    let password = heard.join().unwrap();
    assert_ne!(
        password.as_deref(),
        Some("s3cret-PASSWORD"),
        "the hub sent its database password in clear to a server that declined TLS"
    );
}

/// `StoreConfig` (and `Config`, which holds it) show no URL in their `Debug`: the password
/// stays out of any log line or panic message.
#[test]
fn the_store_configs_debug_never_shows_the_password() {
    let store = StoreConfig {
        backend: Backend::Postgres,
        url: Some("postgres://unified_sync:s3cret-PASSWORD@db.internal/unified_sync".into()),
        ..StoreConfig::default()
    };
    let printed = format!("{store:?}");
    assert!(!printed.contains("s3cret-PASSWORD"), "Debug of StoreConfig prints the password: {printed}");
}

// ---------------------------------------------------------------------------------------
// One slow transaction, every instance's writes.

/// Runs `sql` in the database at `url` through psql in the background, and returns once
/// `granted` (a query) prints `t`.
fn hold(cluster: &Cluster, url: &str, sql: &str, granted: &str) -> std::process::Child {
    let child = std::process::Command::new("psql")
        .args(["-X", "-q", "-d", url, "-c", sql])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let since = Instant::now();
    while cluster.psql(url, granted) != "t" {
        assert!(since.elapsed() < Duration::from_secs(10), "psql never took its lock: {sql}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// A batch that holds the horizon's shared lock a while (one waiting on a record's lock, or
/// that of an instance frozen in the middle of its batch) does not make the prune's
/// exclusive lock wait, and so every other batch behind it: the prune takes the lock only if
/// it is free at once, and tries again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prune_waiting_behind_one_slow_batch_does_not_stall_the_other_instances_writes() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let timeout = Duration::from_secs(2);
    let (clock_b, clock_c) = (TestClock::at(T), TestClock::at(T));
    let b = Arc::new(open(clocked_options(&url, timeout, &clock_b)).await.unwrap());
    let c = open(clocked_options(&url, timeout, &clock_c)).await.unwrap();
    // Each instance's first prune, after its first batch, done before anything is slow.
    applied(b.write(add(USER, "b-first", 1)).await);
    applied(c.write(add(USER, "c-first", 1)).await);

    // The slow batch: a transaction holding the shared side of the horizon's lock.
    let horizon = hub::store::postgres::HORIZON_LOCK;
    let mut slow = hold(
        cluster,
        &url,
        &format!("BEGIN; SELECT pg_advisory_xact_lock_shared({horizon}); SELECT pg_sleep(12); COMMIT;"),
        "SELECT count(*) = 1 FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock' AND granted
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    // Instance B's next prune is due; B goes on writing.
    clock_b.pass_monotonic(11 * 60 * 1000);
    let b_writes = {
        let b = b.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let _ = b.write(add(USER, &format!("b-{i}"), 1)).await;
                if i > 4 {
                    break;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Instance C's writes, one after the other, are applied: none waits behind instance B's
    // prune (itself waiting behind the slow batch) until its statement or lock times out.
    for i in 0..4 {
        applied(c.write(add(USER, &format!("c-{i}"), 1)).await);
    }
    let _ = b_writes.await;
    let _ = slow.kill();
    let _ = slow.wait();
}

/// A write whose record another transaction holds locked (a frozen instance's, an
/// operator's) waits at most the lock timeout and fails `Busy`, alone: the writes of other
/// users batched with it are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_is_not_failed_because_another_users_record_in_its_batch_is_locked() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let store = Arc::new(open(options(&url, Duration::from_secs(3))).await.unwrap());
    let to = |user: &str, op: &str| add(user, op, 1);
    for user in ["w-user", "x-user", "y-user"] {
        applied(store.write(to(user, &format!("{user}-first"))).await);
    }
    let locked = |user: &str| {
        format!(
            "SELECT count(*) = 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
             WHERE a.query LIKE '%{user}%FOR UPDATE%' AND a.state = 'active' AND l.locktype = 'transactionid'"
        )
    };
    // x-user's record, held for longer than a statement may wait; w-user's, for a moment,
    // so that the writer is busy while the next writes queue and are taken in one batch.
    let mut x_held = hold(
        cluster,
        &url,
        "BEGIN; SELECT * FROM records WHERE user_id = 'x-user' FOR UPDATE; SELECT pg_sleep(8); COMMIT;",
        &locked("x-user"),
    );
    let mut w_held = hold(
        cluster,
        &url,
        "BEGIN; SELECT * FROM records WHERE user_id = 'w-user' FOR UPDATE; SELECT pg_sleep(1.5); COMMIT;",
        &locked("w-user"),
    );
    let w = tokio::spawn({
        let store = store.clone();
        async move { store.write(to("w-user", "w-second")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (x, y) = tokio::join!(store.write(to("x-user", "x-second")), store.write(to("y-user", "y-second")));
    let _ = w.await;
    let _ = x_held.kill();
    let _ = x_held.wait();
    let _ = w_held.wait();
    assert!(
        matches!(y, Ok(WriteOutcome::Applied(_))),
        "y-user's write, batched with x-user's whose record was locked: {y:?} (x-user's: {x:?})"
    );
}

/// The server (`idle_session_timeout`, a restart, a proxy's or NAT's idle limit) closes the
/// writer's connection while it is idle: the next batch, of which nothing reached the
/// database, runs on a new connection and is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_write_after_the_server_closed_the_idle_writer_connection_is_applied() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let name = url.rsplit('/').next().unwrap().to_owned();
    cluster.psql(&url, &format!("ALTER DATABASE {name} SET idle_session_timeout = '300ms'"));
    let store = open(options(&url, Duration::from_secs(5))).await.unwrap();
    applied(store.write(add(USER, "before-idle", 1)).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcome = store.write(add(USER, "after-idle", 1)).await;
    store.close().await;
    assert!(
        matches!(outcome, Ok(WriteOutcome::Applied(_))),
        "the first write after the server closed the writer's idle connection: {outcome:?}"
    );
}

/// An instance cut off from the database in the middle of a batch (a network partition, a
/// frozen VM, a process stopped) leaves its transaction open on the server, idle, holding
/// its records `FOR UPDATE`: the server ends it after the hub's
/// `idle_in_transaction_session_timeout` (three statement timeouts), and another instance's
/// writes to those records are applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_an_instance_left_locked_when_cut_off_mid_batch_are_writable_again_soon() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let relay = Relay::to(cluster.port);
    let a = Arc::new(open(options(&via(&url, cluster, relay.port), Duration::from_secs(1))).await.unwrap());
    let c = open(options(&url, Duration::from_secs(1))).await.unwrap();
    applied(a.write(add(USER, "a-first", 1)).await);

    // Instance A sends a batch, and is cut off just before its COMMIT.
    relay.freeze_at_next_commit();
    let stuck = a.clone();
    tokio::spawn(async move { stuck.write(add(USER, "a-cut-off", 1)).await });
    let since = Instant::now();
    while cluster.psql(
        &url,
        "SELECT count(*) = 1 FROM pg_stat_activity WHERE datname = current_database()
         AND state = 'idle in transaction'",
    ) != "t"
    {
        assert!(since.elapsed() < Duration::from_secs(10), "instance A's batch never reached its COMMIT");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Instance C writes the same record, again and again as a client would.
    let bound = Duration::from_secs(20);
    let since = Instant::now();
    let mut last = None;
    while since.elapsed() < bound {
        let outcome = c.write(add(USER, &format!("c-{}", since.elapsed().as_millis()), 1)).await;
        if matches!(outcome, Ok(WriteOutcome::Applied(_))) {
            return;
        }
        last = Some(outcome);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!(
        "for {bound:?} every write to the record instance A left locked failed (the last: {last:?}): \
         its transaction stays open, idle, on the server"
    );
}

/// A write waiting on a record another transaction holds longer than the hub's lock timeout
/// (half its statement timeout) fails `Busy`: passing, answered `503` with `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_timeout_is_a_passing_failure() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let store = open(options(&url, Duration::from_secs(1))).await.unwrap();
    applied(store.write(add(USER, "first", 1)).await);
    let mut held = hold(
        cluster,
        &url,
        &format!(
            "BEGIN; SELECT * FROM records WHERE user_id = '{USER}' FOR UPDATE; SELECT pg_sleep(3); COMMIT;"
        ),
        &format!(
            "SELECT count(*) = 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
             WHERE a.query LIKE '%{USER}%FOR UPDATE%' AND a.state = 'active' AND l.locktype = 'transactionid'"
        ),
    );
    let outcome = store.write(add(USER, "while-locked", 1)).await;
    let _ = held.wait();
    store.close().await;
    match outcome {
        Err(e @ StoreError::Busy(_)) => assert!(e.retryable()),
        other => panic!("expected the lock wait to fail Busy, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Exactly once.

/// An op id dated more than a day ahead of the hub's clock (a client whose clock runs two
/// days fast) is refused: remembered only from its arrival, it would be forgotten after the
/// retention while its date no longer told a late copy from a new op, and a copy sent a
/// month later would be applied a second time. An op dated within the day ahead is applied,
/// remembered until the horizon passes its date, and never applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_op_dated_ahead_of_the_clock_is_not_applied_again_after_it_is_forgotten() {
    let cluster = Cluster::shared();
    let url = cluster.database();
    let clock = TestClock::at(T);
    let store = open(clocked_options(&url, Duration::from_secs(5), &clock)).await.unwrap();
    let ahead = uuid7(T + 2 * DAY, 1);
    match store.write(add(USER, &ahead, 10)).await {
        Ok(WriteOutcome::Rejected(Rejection::Refused(refusal))) => assert_eq!(refusal.code, "invalid_op_id"),
        other => panic!("an op dated two days ahead was answered {other:?}"),
    }
    let soon = uuid7(T + DAY / 2, 4);
    applied(store.write(add(USER, &soon, 10)).await);

    // A month and a day pass; a write, and the prune after it, forget what is older.
    let month_and_a_day = i64::try_from(RETENTION.as_millis()).unwrap() + DAY;
    clock.pass(month_and_a_day);
    applied(store.write(add(USER, &uuid7(T + month_and_a_day, 2), 1)).await);
    applied(store.write(add(USER, &uuid7(T + month_and_a_day, 3), 1)).await);

    let again = store.write(add(USER, &soon, 10)).await;
    let coins = cluster.psql(&url, &format!("SELECT data FROM records WHERE user_id = '{USER}'"));
    store.close().await;
    assert!(
        !matches!(again, Ok(WriteOutcome::Applied(_))),
        "op {soon} was applied a second time a month later: {again:?}; the balance is {coins}"
    );
}
