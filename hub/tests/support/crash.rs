//! The clients of the crash suites (`durability.rs` on SQLite, `durability_postgres.rs` on
//! PostgreSQL) and the checks of a database after a crash. Clients are pages on a bad
//! network: they send deltas with op ids of their own to one hub instance or several, twice
//! at times, and again after every timeout, and keep a journal of what they were told. The
//! checks hold a database's balance records and ledger against that journal. Starts and
//! kills no hub and opens no database: each suite does that its own way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::{Deployment, PATIENCE, SITES, SiteClient};

/// Clients sending deltas at once; client `i` is a page of `SITES[i % 3]` for `USERS[i % 4]`,
/// so every user is written from every site.
pub const CLIENTS: usize = 16;
pub const USERS: [&str; 4] = ["8-evans", "12-okafor", "31-lindqvist", "47-moreau"];
/// Share of sends that go out twice.
const DUPLICATED: f64 = 0.2;
/// Share of deltas that spend. Spends are rarer than gains but larger, so balances hover
/// near zero and the hub refuses overdrafts often.
const SPENDS: f64 = 0.4;
/// How long a client waits before sending again after no answer.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// What the hubs' store may do while the clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Database {
    /// Always answers: a `503` fails the test. SQLite, a file in the hub's own data dir.
    Steady,
    /// Is away at times, as a database server that crashes is: a `503 store_unavailable`,
    /// which must say `Retry-After`, is no answer, and the client sends again after the
    /// time it says.
    Crashes,
}

/// One delta as a client made it: what every copy and every resend of it carries.
#[derive(Debug, Clone)]
pub struct Delta {
    pub client: usize,
    pub user: &'static str,
    pub site: &'static str,
    pub op_id: String,
    pub amount: i64,
}

/// What a client knows of one of its deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No answer came yet.
    Unanswered,
    /// Every answer was `insufficient_funds`.
    Refused,
    /// An answer was 200: the hub applied it.
    Acknowledged,
}

/// One full answer of the hub to one copy of a delta.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// 200; `fresh` unless the answer says `replayed`.
    Applied { fresh: bool },
    /// `409 insufficient_funds`.
    Refused,
    /// `503 store_unavailable` (only from a [`Database::Crashes`]): the hub could not reach
    /// its store and tells nothing of the delta but when to send it again.
    Unavailable { retry_after: Duration },
}

#[derive(Debug, Clone)]
struct Tracked {
    delta: Delta,
    outcome: Outcome,
    /// Answers that applied the delta rather than replaying an earlier application.
    fresh_answers: u32,
}

/// Every delta the clients made and what they heard about it, by op id (op ids sort in the
/// order each client made its deltas).
#[derive(Debug, Clone, Default)]
pub struct Journal {
    deltas: BTreeMap<String, Tracked>,
    pub acknowledged: usize,
    pub refusals: usize,
    /// `503 store_unavailable` answers.
    pub unavailable: usize,
}

impl Journal {
    fn issue(&mut self, delta: Delta) {
        let op_id = delta.op_id.clone();
        self.deltas.insert(op_id, Tracked { delta, outcome: Outcome::Unanswered, fresh_answers: 0 });
    }

    /// Takes in the answers to one send (`None`: no full answer) and returns the outcome.
    fn hear(&mut self, op_id: &str, answers: impl IntoIterator<Item = Option<Answer>>) -> Outcome {
        let tracked = self.deltas.get_mut(op_id).expect("deltas are issued before they are sent");
        for answer in answers.into_iter().flatten() {
            match answer {
                Answer::Applied { fresh } => {
                    if tracked.outcome != Outcome::Acknowledged {
                        tracked.outcome = Outcome::Acknowledged;
                        self.acknowledged += 1;
                    }
                    tracked.fresh_answers += u32::from(fresh);
                    assert!(tracked.fresh_answers <= 1, "{op_id} was answered as freshly applied twice");
                }
                Answer::Refused => {
                    self.refusals += 1;
                    if tracked.outcome == Outcome::Unanswered {
                        tracked.outcome = Outcome::Refused;
                    }
                }
                Answer::Unavailable { .. } => self.unavailable += 1,
            }
        }
        tracked.outcome
    }

    pub fn with_outcome(&self, outcome: Outcome) -> impl Iterator<Item = &Delta> {
        self.deltas.values().filter(move |t| t.outcome == outcome).map(|t| &t.delta)
    }
}

/// How long a client waits for an answer before it sends again.
#[derive(Debug, Clone, Copy)]
pub enum Patience {
    /// A random 5 to 100 ms for each send: often less than the hub takes, so that resends
    /// overlap copies the hub is still working on.
    Short,
    /// [`PATIENCE`]: every answer the hub gives arrives.
    Full,
}

impl Patience {
    fn timeout(self) -> Duration {
        match self {
            Patience::Short => Duration::from_millis(rand::random_range(5..100)),
            Patience::Full => PATIENCE,
        }
    }
}

/// Sends one copy of `delta`: `None` when no full answer came within `patience` (or the
/// connection was lost or refused). Any answer but a 200, a justified `insufficient_funds`,
/// or, from a `database` that crashes, a `store_unavailable` saying `Retry-After`, fails the
/// test.
async fn send(page: &SiteClient, delta: &Delta, patience: Patience, database: Database) -> Option<Answer> {
    let body = json!({
        "action": "delta", "user_id": delta.user, "site_id": delta.site, "data_type": "balance",
        "delta": { "coins": delta.amount }, "op_id": delta.op_id, "reason": "game",
    });
    let request =
        page.client.post(format!("{}/api/sync.php", page.url)).json(&body).timeout(patience.timeout());
    let response = request.bearer_auth(page.token.as_deref().unwrap()).send().await.ok()?;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().map(str::to_owned));
    let bytes = response.bytes().await.ok()?;
    let answer: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{} got a full answer that is not JSON ({e}): {bytes:?}", delta.op_id));
    match (status, answer["code"].as_str()) {
        (200, _) => {
            assert_eq!(answer["success"], true, "{}: {answer}", delta.op_id);
            let coins = answer["data"]["coins"].as_i64();
            assert!(coins.is_some_and(|c| c >= 0), "{} left the balance at {answer}", delta.op_id);
            Some(Answer::Applied { fresh: answer.get("replayed").is_none() })
        }
        (409, Some("insufficient_funds")) => {
            let coins = answer["current"]["data"]["coins"].as_i64().unwrap_or(0);
            assert!(coins + delta.amount < 0, "{} was refused at a balance of {coins}", delta.op_id);
            Some(Answer::Refused)
        }
        (503, Some("store_unavailable")) if database == Database::Crashes => {
            let secs = retry_after.and_then(|v| v.ok()?.parse::<u64>().ok()).unwrap_or_else(|| {
                panic!("{} was answered 503 without a Retry-After: {answer}", delta.op_id)
            });
            Some(Answer::Unavailable { retry_after: Duration::from_secs(secs) })
        }
        _ => panic!("{} was answered {status}: {answer}", delta.op_id),
    }
}

/// One of the pages, each of one hub instance, at random.
fn any(pages: &[SiteClient]) -> &SiteClient {
    &pages[rand::random_range(0..pages.len())]
}

/// Sends `delta` once, or, for a [`DUPLICATED`] share of sends, twice: both copies at once
/// or one after the other. Each copy goes to one of `pages` (one per hub instance) at
/// random.
async fn send_maybe_twice(
    pages: &[SiteClient],
    delta: &Delta,
    patience: Patience,
    database: Database,
) -> Vec<Option<Answer>> {
    let send = || send(any(pages), delta, patience, database);
    if !rand::random_bool(DUPLICATED) {
        return vec![send().await];
    }
    if rand::random_bool(0.5) {
        let (first, second) = tokio::join!(send(), send());
        vec![first, second]
    } else {
        vec![send().await, send().await]
    }
}

/// A gain of 1..=10 coins or a spend of 1..=15.
fn random_amount() -> i64 {
    if rand::random_bool(SPENDS) { -rand::random_range(1..=15) } else { rand::random_range(1..=10) }
}

/// Client `client`'s pages: its site's backend signed in as its user, one for each of `hubs`.
fn pages(hubs: &[&Deployment], client: usize) -> Vec<SiteClient> {
    let (user, site) = (USERS[client % USERS.len()], SITES[client % SITES.len()].0);
    hubs.iter().map(|hub| hub.backend(site, user, PATIENCE)).collect()
}

/// [`CLIENTS`] tasks making deltas one after the other, each sent until it has an answer.
pub struct Clients {
    journal: Arc<Mutex<Journal>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Clients {
    /// Starts the clients, each sending to `hubs` (one or more instances of one hub) and
    /// waiting as `patience` says for an answer before it sends again.
    pub fn start(hubs: &[&Deployment], patience: Patience, database: Database) -> Clients {
        let journal = Arc::new(Mutex::new(Journal::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..CLIENTS)
            .map(|client| {
                let (user, site) = (USERS[client % USERS.len()], SITES[client % SITES.len()].0);
                let pages = pages(hubs, client);
                let (journal, stop) = (journal.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let op_id = format!("c{client:02}-{n:07}");
                        let delta = Delta { client, user, site, op_id, amount: random_amount() };
                        journal.lock().unwrap().issue(delta.clone());
                        while !stop.load(Ordering::Relaxed) {
                            let answers = send_maybe_twice(&pages, &delta, patience, database).await;
                            let pause = answers
                                .iter()
                                .filter_map(|a| match a {
                                    Some(Answer::Unavailable { retry_after }) => Some(*retry_after),
                                    _ => None,
                                })
                                .max()
                                .unwrap_or(RETRY_PAUSE);
                            if journal.lock().unwrap().hear(&delta.op_id, answers) != Outcome::Unanswered {
                                break;
                            }
                            tokio::time::sleep(pause).await;
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        Clients { journal, stop, tasks }
    }

    pub fn acknowledged(&self) -> usize {
        self.journal.lock().unwrap().acknowledged
    }

    pub fn unavailable(&self) -> usize {
        self.journal.lock().unwrap().unavailable
    }

    /// Waits until the clients have heard more than `mark` acknowledgements in all.
    pub async fn until_acknowledged_beyond(&self, mark: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.acknowledged() <= mark {
            assert!(Instant::now() < deadline, "the hub acknowledged no delta within {PATIENCE:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until the clients have heard more than `mark` `store_unavailable` answers in all.
    pub async fn until_unavailable_beyond(&self, mark: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.unavailable() <= mark {
            assert!(
                Instant::now() < deadline,
                "no client was answered store_unavailable within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Lets the clients' stream run into the hub for a random moment, once it has
    /// acknowledged more than `mark` deltas.
    pub async fn run_beyond(&self, mark: usize) {
        self.until_acknowledged_beyond(mark).await;
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..3000))).await;
    }

    /// What the clients have heard so far.
    pub fn journal(&self) -> Journal {
        self.journal.lock().unwrap().clone()
    }

    /// Stops the clients (a delta still unanswered stays so) and returns what they heard.
    pub async fn finish(self) -> Journal {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.journal.lock().unwrap().clone()
    }
}

/// Sends once more every delta the clients never saw acknowledged — each client its own,
/// in the order it made them, each to one of `hubs` at random — and takes in the answers,
/// which must all come. A `store_unavailable` (from a [`Database::Crashes`]) is followed by
/// the same delta again after the time it says, for up to [`PATIENCE`].
pub async fn resend_unacknowledged(hubs: &[&Deployment], journal: &mut Journal, database: Database) {
    let mut shares: Vec<Vec<Delta>> = vec![Vec::new(); CLIENTS];
    for delta in journal.deltas.values().filter(|t| t.outcome != Outcome::Acknowledged) {
        shares[delta.delta.client].push(delta.delta.clone());
    }
    let tasks: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(client, share)| {
            let pages = pages(hubs, client);
            tokio::spawn(async move {
                let mut answers = Vec::with_capacity(share.len());
                for delta in share {
                    let deadline = Instant::now() + PATIENCE;
                    loop {
                        let answer = send(any(&pages), &delta, Patience::Full, database).await;
                        assert!(answer.is_some(), "the hub did not answer a resend of {}", delta.op_id);
                        answers.push((delta.op_id.clone(), answer));
                        let Some(Answer::Unavailable { retry_after }) = answer else { break };
                        assert!(
                            Instant::now() < deadline,
                            "the hub answered resends of {} store_unavailable for {PATIENCE:?}",
                            delta.op_id
                        );
                        tokio::time::sleep(retry_after).await;
                    }
                }
                answers
            })
        })
        .collect();
    for task in tasks {
        for (op_id, answer) in task.await.unwrap() {
            journal.hear(&op_id, [answer]);
        }
    }
}

/// One ledger row: a change to a user's balance.
#[derive(Debug)]
pub struct Entry {
    pub user: String,
    pub site: String,
    pub delta: i64,
}

/// One row of a balance ledger as the database holds it.
#[derive(Debug)]
pub struct LedgerRow {
    pub user: String,
    pub site: String,
    pub op_id: String,
    pub delta: i64,
    pub result: i64,
    pub version: i64,
}

/// A database's balance records and balance ledger, as they stood at one moment.
#[derive(Debug, Default)]
pub struct Books {
    /// Each user's balance record: (coins, version).
    pub balances: HashMap<String, (i64, i64)>,
    /// The ledger's rows, by user, each user's in the order they were written.
    pub ledger: Vec<LedgerRow>,
    /// Ledger rows (of any data type) whose op id the hub does not remember.
    pub forgotten: i64,
}

impl Books {
    /// Checks the books on their own: each user's ledger is a running sum that never goes
    /// below zero, one row per version, ending at the record's balance and version; no op
    /// id is there twice and each has its remembered op. Returns the ledger by op id.
    pub fn check(self) -> HashMap<String, Entry> {
        let mut ledger = HashMap::new();
        let mut sums: HashMap<String, (i64, i64)> = HashMap::new();
        for LedgerRow { user, site, op_id, delta, result, version } in self.ledger {
            let (running, count) = sums.entry(user.clone()).or_default();
            *running += delta;
            *count += 1;
            assert_eq!(
                result, *running,
                "{user}'s ledger row of {op_id} does not follow from the rows before it"
            );
            assert!(result >= 0, "{op_id} took {user}'s balance to {result}");
            assert_eq!(version, *count, "{user}'s ledger row of {op_id} skips a version");
            let twice = ledger.insert(op_id.clone(), Entry { user, site, delta });
            assert!(twice.is_none(), "{op_id} is twice in the ledger");
        }
        assert_eq!(
            sums, self.balances,
            "the ledger's (sum, rows) per user disagree with the balance records"
        );
        assert_eq!(self.forgotten, 0, "ledger rows whose op id the hub does not remember");
        ledger
    }
}

/// Every ledger row is a delta some client sent — `journal` was taken after the ledger was
/// read — with its user, site and amount.
pub fn assert_ledger_was_sent(ledger: &HashMap<String, Entry>, journal: &Journal) {
    for (op_id, entry) in ledger {
        let sent = &journal.deltas.get(op_id).unwrap_or_else(|| panic!("{op_id} was never sent")).delta;
        assert_eq!(
            (entry.user.as_str(), entry.site.as_str(), entry.delta),
            (sent.user, sent.site, sent.amount),
            "{op_id} is in the ledger otherwise than it was sent"
        );
    }
}

/// Every delta acknowledged in `journal` — taken before the ledger was read — is in the
/// ledger.
pub fn assert_acknowledged_kept(ledger: &HashMap<String, Entry>, journal: &Journal) {
    for delta in journal.with_outcome(Outcome::Acknowledged) {
        assert!(ledger.contains_key(&delta.op_id), "acknowledged {} was lost", delta.op_id);
    }
}

/// Every ledger row is a delta some client sent, with its user, site and amount, and every
/// delta acknowledged in `journal` is in the ledger: `journal` is all the clients heard, as
/// nothing was sent while the ledger was read.
pub fn assert_acknowledged_applied(ledger: &HashMap<String, Entry>, journal: &Journal) {
    assert_ledger_was_sent(ledger, journal);
    assert_acknowledged_kept(ledger, journal);
}

/// Once every delta has had an answer with nothing in flight: the ledger holds exactly the
/// acknowledged deltas, and each user's balance as each of `hubs` serves it is their sum.
pub async fn assert_settled(hubs: &[&Deployment], ledger: &HashMap<String, Entry>, journal: &Journal) {
    assert_acknowledged_applied(ledger, journal);
    let acknowledged: HashSet<&str> =
        journal.with_outcome(Outcome::Acknowledged).map(|d| d.op_id.as_str()).collect();
    let applied: HashSet<&str> = ledger.keys().map(String::as_str).collect();
    assert_eq!(applied, acknowledged, "the ledger holds other deltas than those acknowledged");
    for hub in hubs {
        for user in USERS {
            let sum: i64 = journal
                .with_outcome(Outcome::Acknowledged)
                .filter(|d| d.user == user)
                .map(|d| d.amount)
                .sum();
            let page = hub.backend("wrc", user, PATIENCE);
            let served = page.get("balance").await.assert_ok()["data"]["coins"].as_i64().unwrap_or(0);
            assert_eq!(served, sum, "{user}'s balance is not the sum of their acknowledged deltas");
        }
    }
}

/// A number of times from the environment variable `variable` (`HUB_CRASH_KILLS`), or
/// `default`; at least `least`.
pub fn times(variable: &str, default: usize, least: usize) -> usize {
    let times = std::env::var(variable)
        .map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{variable} is a number of times")));
    assert!(times >= least, "{variable} must be at least {least}");
    times
}
