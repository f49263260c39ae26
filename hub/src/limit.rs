//! Request rate limits: per user for authenticated requests, per IP address for requests
//! without a valid token. Memory is bounded by the keys seen within one limit window:
//! [`RateLimits::purge`] (run every few seconds) forgets every key that has fully recovered.
//!
//! With a store several hub instances share, the per-user limit is the deployment's: each
//! instance leases a few cells at a time of the user's quota from a [`SharedQuota`] kept in
//! that store, and spends them itself; the database sees one round trip per lease, not per
//! request. While the store cannot be reached, each instance limits its users on its own,
//! as it does with a store of its own. The per-address limit is always per instance.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::store::{SharedQuota, StoreError, Taken};

/// Cells a request of `n` ops takes: one per op, but no more than a whole minute's quota, so
/// that a batch larger than the limit can still pass once the user's bucket is full.
fn cells(n: u32, quota: NonZeroU32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN).min(quota)
}

/// Cells an instance leases at once from a shared quota of `per_minute`: a twenty-fifth of it.
/// Each instance may hold up to one lease less one cell unspent, which the others cannot have
/// (so a user is refused a little early) and which it may spend after the quota has recovered
/// (so a user gets a little more): with two instances, up to 8 % of the limit either way.
fn lease_size(per_minute: NonZeroU32) -> u32 {
    (per_minute.get() / 25).max(1)
}

/// How long leased cells stay spendable: past it, a user's unspent cells are forgotten, so
/// that memory holds only the users of the last minute.
const LEASE_LIFETIME: Duration = Duration::from_secs(60);

/// After the shared quota failed to answer, how long the instance's own limiter counts alone
/// before the shared quota is asked again: a database that is away costs one failed request
/// a second, not one per request.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// How often the shared quota forgets the users who have fully recovered.
const FORGET_EVERY: Duration = Duration::from_secs(600);

type Keyed<K, C> = RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Both limiters of the hub.
pub struct RateLimits<C: Clock = DefaultClock> {
    /// Each user's limit on this instance: the whole limit with a store of its own, and the
    /// fallback with a shared one while it cannot be reached.
    users: Keyed<String, C>,
    /// The users' quota per minute, which a batch never needs more of.
    per_user: NonZeroU32,
    addresses: Keyed<IpAddr, C>,
    clock: C,
    /// The users' limit shared with the other instances on the same store; `None` with a
    /// store one instance serves (SQLite), where `users` counts alone.
    shared: Option<Shared<C::Instant>>,
}

impl<C: Clock> std::fmt::Debug for RateLimits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("users", &self.users.len())
            .field("addresses", &self.addresses.len())
            .field("shared", &self.shared.as_ref().map(|s| s.held().len()))
            .finish()
    }
}

/// A refused request: retry after this many whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RetryAfter(pub u64);

impl RateLimits<DefaultClock> {
    pub fn new(per_user_per_minute: u32, per_address_per_minute: u32) -> Self {
        Self::with_clock(per_user_per_minute, per_address_per_minute, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    pub fn with_clock(per_user_per_minute: u32, per_address_per_minute: u32, clock: C) -> Self {
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        RateLimits {
            per_user: NonZeroU32::new(per_user_per_minute).unwrap_or(NonZeroU32::MIN),
            users: RateLimiter::new(
                quota(per_user_per_minute),
                DefaultKeyedStateStore::default(),
                clock.clone(),
            ),
            addresses: RateLimiter::new(
                quota(per_address_per_minute),
                DefaultKeyedStateStore::default(),
                clock.clone(),
            ),
            clock,
            shared: None,
        }
    }

    /// Counts the users' requests against `quota`, which every instance on the same store
    /// shares, when the store has one ([`crate::store::Store::shared_rate_limit`]).
    pub fn sharing(mut self, quota: Option<Arc<dyn SharedQuota>>) -> Self {
        self.shared = quota.map(|quota| Shared {
            quota,
            lease: lease_size(self.per_user),
            interval: Duration::from_secs(60) / self.per_user.get(),
            held: Mutex::new(HashMap::new()),
            reach: Mutex::new(Reach::Answers),
            forgotten_at: Mutex::new(None),
            leases: Counter::default(),
            fallbacks: Counter::default(),
        });
        self
    }

    /// Adds the shared limit's counters to `/metrics`; nothing without one.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let Some(shared) = &self.shared else { return };
        registry.register(
            "rate_limit_leases",
            "Leases of users' cells taken from the rate limit the instances share, each a round trip to the database",
            shared.leases.clone(),
        );
        registry.register(
            "rate_limit_fallbacks",
            "Requests of users counted by this instance's own limiter because the shared rate limit's database could not be reached",
            shared.fallbacks.clone(),
        );
    }

    /// Counts one request of `user`.
    pub async fn check_user(&self, user: &str) -> Result<(), RetryAfter> {
        self.check_user_ops(user, 1).await
    }

    /// Counts `ops` requests of `user` at once (a batch): all of them, or none.
    pub async fn check_user_ops(&self, user: &str, ops: u32) -> Result<(), RetryAfter> {
        let cells = cells(ops, self.per_user);
        match &self.shared {
            None => self.check_here(user, cells),
            Some(shared) => self.check_shared(shared, user, cells).await,
        }
    }

    /// Counts the ops of a batch beyond its first, which the batch's admission counted as one
    /// request before its body was read: no more than the quota less one, so that a batch
    /// larger than the limit still passes when the user's bucket is full.
    pub async fn check_user_rest(&self, user: &str, ops: u32) -> Result<(), RetryAfter> {
        match ops.saturating_sub(1).min(self.per_user.get() - 1) {
            0 => Ok(()),
            rest => self.check_user_ops(user, rest).await,
        }
    }

    /// Counts `cells` of `user` on this instance alone.
    fn check_here(&self, user: &str, cells: NonZeroU32) -> Result<(), RetryAfter> {
        match self.users.check_key_n(&user.to_owned(), cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(wait(not_until.wait_time_from(self.clock.now()))),
            // `cells` never asks for more than the quota.
            Err(_) => Err(RetryAfter(60)),
        }
    }

    /// Counts `cells` of `user` against the shared quota: from the cells this instance holds
    /// unspent, then from a new lease. A refusal is remembered until the shared quota said
    /// it would have a cell again, so that a user over the limit costs the database nothing.
    async fn check_shared(
        &self,
        shared: &Shared<C::Instant>,
        user: &str,
        cells: NonZeroU32,
    ) -> Result<(), RetryAfter> {
        let need = cells.get();
        let refused = |until: C::Instant, now: C::Instant| {
            Err(wait((until.duration_since(now) + Nanos::from(shared.interval * (need - 1))).into()))
        };
        let leasing = match shared.spend(user, need, self.clock.now()) {
            Spent::All => return Ok(()),
            Spent::Empty(until) => return refused(until, self.clock.now()),
            Spent::Short(leasing) => leasing,
        };
        // One lease at a time for a user on this instance: the requests that arrive while it
        // is taken wait for it, and spend its cells.
        let _leasing = leasing.lock().await;
        let now = self.clock.now();
        match shared.spend(user, need, now) {
            Spent::All => return Ok(()),
            Spent::Empty(until) => return refused(until, now),
            Spent::Short(_) => {}
        }
        let spent = shared.take_held(user);
        if !shared.may_ask(now) {
            shared.keep(user, spent, now);
            shared.fallbacks.inc();
            return self.check_here(user, cells);
        }
        let asked = need - spent;
        match shared.quota.take(user, asked, asked.max(shared.lease), self.per_user).await {
            Ok(taken) => {
                shared.answered();
                let now = self.clock.now();
                match taken {
                    Taken::Cells(leased) => {
                        shared.leases.inc();
                        shared.keep(user, leased.saturating_sub(asked), now);
                        Ok(())
                    }
                    Taken::Refused(after) => {
                        // Empty for every request until one cell is back.
                        let one_back = after.saturating_sub(shared.interval * (asked - 1));
                        shared.refused(user, spent, now + Nanos::from(one_back), now);
                        Err(wait(after))
                    }
                }
            }
            Err(error) => {
                shared.failed(self.clock.now(), &error);
                shared.keep(user, spent, now);
                shared.fallbacks.inc();
                self.check_here(user, cells)
            }
        }
    }

    /// Counts one request without a valid token from `ip`, by its network
    /// ([`client_network`](crate::config::client_network)).
    pub fn check_address(&self, ip: IpAddr) -> Result<(), RetryAfter> {
        check(&self.addresses, &crate::config::client_network(ip).addr(), &self.clock)
    }

    /// Forgets every key whose limit has fully recovered, and returns the memory; with a
    /// shared quota, every few minutes has it forget its recovered users too.
    pub fn purge(&self) {
        for limiter in [&self.users as &dyn Purge, &self.addresses] {
            limiter.purge();
        }
        if let Some(shared) = &self.shared {
            shared.purge(self.clock.now());
        }
    }

    /// Keys currently remembered.
    pub fn tracked(&self) -> usize {
        let shared = self.shared.as_ref().map_or(0, |s| s.held().len());
        self.users.len() + self.addresses.len() + shared
    }
}

/// The users' limit shared with other instances, and what this instance holds of it.
struct Shared<I> {
    quota: Arc<dyn SharedQuota>,
    /// Cells asked for at once ([`lease_size`]).
    lease: u32,
    /// The time one cell takes to come back: a minute over the limit.
    interval: Duration,
    /// What this instance holds of each user's quota.
    held: Mutex<HashMap<String, Held<I>>>,
    reach: Mutex<Reach<I>>,
    /// When the quota last forgot its recovered users.
    forgotten_at: Mutex<Option<I>>,
    leases: Counter,
    fallbacks: Counter,
}

/// What one instance holds of one user's shared quota.
struct Held<I> {
    /// Cells leased and not yet spent: at most a lease less one.
    cells: u32,
    /// When the cells unspent are forgotten.
    cells_until: I,
    /// Until when the shared quota, as its last refusal said, has no cell for this user.
    empty_until: Option<I>,
    /// Held by the request taking a lease for this user: requests that arrive together take
    /// one lease after the other, each spent by the next, rather than a lease each, most of
    /// which they could not hold.
    leasing: Arc<tokio::sync::Mutex<()>>,
}

impl<I> Held<I> {
    fn new(now: I) -> Held<I> {
        Held { cells: 0, cells_until: now, empty_until: None, leasing: Arc::default() }
    }
}

/// How the last request to the shared quota went.
enum Reach<I> {
    Answers,
    /// It failed: the instance's own limiter counts alone until `ask_again`.
    Away {
        ask_again: I,
    },
}

/// What a user's held cells gave a request.
enum Spent<I> {
    /// Every cell it needs.
    All,
    /// Nothing: fewer cells held than it needs. A lease is taken holding this lock.
    Short(Arc<tokio::sync::Mutex<()>>),
    /// Nothing, and no lease can have a cell before this.
    Empty(I),
}

impl<I: Reference> Shared<I> {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held<I>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spends `need` of `user`'s unspent cells, if this instance holds that many.
    fn spend(&self, user: &str, need: u32, now: I) -> Spent<I> {
        let mut held = self.held();
        let h = held.entry(user.to_owned()).or_insert_with(|| Held::new(now));
        if h.cells_until <= now {
            h.cells = 0;
        }
        if h.cells >= need {
            h.cells -= need;
            return Spent::All;
        }
        match h.empty_until {
            Some(until) if until > now => Spent::Empty(until),
            _ => Spent::Short(h.leasing.clone()),
        }
    }

    /// Takes out every cell `user` holds, to be spent with a new lease's.
    fn take_held(&self, user: &str) -> u32 {
        self.held().get_mut(user).map_or(0, |h| std::mem::take(&mut h.cells))
    }

    /// Keeps `cells` more of `user`'s, which a lease brought or a request did not spend after
    /// all: at most a lease less one in all, the others left unspent.
    fn keep(&self, user: &str, cells: u32, now: I) {
        let mut held = self.held();
        let h = held.entry(user.to_owned()).or_insert_with(|| Held::new(now));
        self.add(h, cells, now);
        h.empty_until = None;
    }

    /// Keeps `cells` of `user`'s, which a refused request had taken out, and remembers that
    /// the shared quota has no cell for `user` before `empty_until`.
    fn refused(&self, user: &str, cells: u32, empty_until: I, now: I) {
        let mut held = self.held();
        let h = held.entry(user.to_owned()).or_insert_with(|| Held::new(now));
        self.add(h, cells, now);
        h.empty_until = Some(empty_until);
    }

    /// Adds `cells` to `h`, spendable for [`LEASE_LIFETIME`] from `now`.
    fn add(&self, h: &mut Held<I>, cells: u32, now: I) {
        if cells > 0 {
            h.cells = (h.cells + cells).min(self.lease - 1);
            h.cells_until = now + Nanos::from(LEASE_LIFETIME);
        }
    }

    /// Whether to ask the shared quota now: always while it answers, once every
    /// [`ASK_AGAIN_AFTER`] while it does not.
    fn may_ask(&self, now: I) -> bool {
        let mut reach = self.reach.lock().unwrap_or_else(|e| e.into_inner());
        match *reach {
            Reach::Answers => true,
            Reach::Away { ask_again } if ask_again <= now => {
                *reach = Reach::Away { ask_again: now + Nanos::from(ASK_AGAIN_AFTER) };
                true
            }
            Reach::Away { .. } => false,
        }
    }

    fn answered(&self) {
        let mut reach = self.reach.lock().unwrap_or_else(|e| e.into_inner());
        if let Reach::Away { .. } = *reach {
            tracing::info!(
                "the shared rate limit answers again: users are counted across every instance again"
            );
            *reach = Reach::Answers;
        }
    }

    /// Logged once per outage, when the first request fails.
    fn failed(&self, now: I, error: &StoreError) {
        let mut reach = self.reach.lock().unwrap_or_else(|e| e.into_inner());
        if let Reach::Answers = *reach {
            tracing::warn!(
                %error,
                "the shared rate limit cannot be reached: until it can, this instance counts each user's requests on its own (limits.requests_per_minute per instance)"
            );
        }
        *reach = Reach::Away { ask_again: now + Nanos::from(ASK_AGAIN_AFTER) };
    }

    /// Forgets what is held of users with nothing left to spend nor wait for, and every
    /// [`FORGET_EVERY`] has the shared quota forget its recovered users, in the background.
    fn purge(&self, now: I) {
        self.held().retain(|_, h| {
            (h.cells > 0 && h.cells_until > now)
                || h.empty_until.is_some_and(|until| until > now)
                || Arc::strong_count(&h.leasing) > 1
        });
        let mut forgotten_at = self.forgotten_at.lock().unwrap_or_else(|e| e.into_inner());
        if forgotten_at.is_some_and(|at| Duration::from(now.duration_since(at)) < FORGET_EVERY) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        *forgotten_at = Some(now);
        let quota = self.quota.clone();
        runtime.spawn(async move {
            if let Err(error) = quota.forget_recovered().await {
                tracing::debug!(%error, "the shared rate limit could not forget its recovered users; it tries again later");
            }
        });
    }
}

trait Purge {
    fn purge(&self);
}

impl<K: Hash + Eq + Clone, C: Clock> Purge for Keyed<K, C> {
    fn purge(&self) {
        self.retain_recent();
        self.shrink_to_fit();
    }
}

fn check<K: Hash + Eq + Clone, C: Clock>(
    limiter: &Keyed<K, C>,
    key: &K,
    clock: &C,
) -> Result<(), RetryAfter> {
    limiter.check_key(key).map_err(|not_until| wait(not_until.wait_time_from(clock.now())))
}

/// A wait in whole seconds, rounded up, at least 1.
fn wait(wait: std::time::Duration) -> RetryAfter {
    RetryAfter(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(RetryAfter(1))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    #[tokio::test]
    async fn the_request_over_the_limit_is_refused_with_a_wait() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(100, 10, clock.clone());
        for _ in 0..100 {
            assert!(limits.check_user("8-evans").await.is_ok());
        }
        let RetryAfter(secs) = limits.check_user("8-evans").await.unwrap_err();
        assert!((1..=60).contains(&secs), "{secs}");
        assert!(limits.check_user("someone-else").await.is_ok());
        clock.advance(Duration::from_secs(secs));
        assert!(limits.check_user("8-evans").await.is_ok());
    }

    #[tokio::test]
    async fn a_batch_takes_a_cell_per_op_or_none() {
        let limits = RateLimits::with_clock(10, 10, FakeRelativeClock::default());
        assert!(limits.check_user_ops("u", 8).await.is_ok());
        assert!(limits.check_user_ops("u", 3).await.is_err(), "3 more than the 2 left");
        assert!(limits.check_user_ops("u", 2).await.is_ok(), "the refused batch took nothing");
        assert!(limits.check_user("u").await.is_err());
        // A batch larger than the quota passes when the bucket is full.
        let limits = RateLimits::with_clock(10, 10, FakeRelativeClock::default());
        assert!(limits.check_user_ops("v", 32).await.is_ok());
        assert!(limits.check_user("v").await.is_err());
    }

    #[tokio::test]
    async fn a_batch_admitted_as_one_request_takes_the_rest_of_its_ops_after() {
        let limits = RateLimits::with_clock(10, 10, FakeRelativeClock::default());
        assert!(limits.check_user("u").await.is_ok());
        assert!(limits.check_user_rest("u", 8).await.is_ok(), "7 more");
        assert!(limits.check_user_rest("u", 4).await.is_err(), "3 more than the 2 left");
        assert!(limits.check_user_rest("u", 1).await.is_ok(), "a single op took its cell at admission");
        // A batch larger than the quota passes when the bucket is full: one cell, then 9.
        let limits = RateLimits::with_clock(10, 10, FakeRelativeClock::default());
        assert!(limits.check_user("v").await.is_ok());
        assert!(limits.check_user_rest("v", 32).await.is_ok());
        assert!(limits.check_user("v").await.is_err());
    }

    #[test]
    fn ipv6_addresses_share_a_limit_per_64_block() {
        let limits = RateLimits::with_clock(100, 1, FakeRelativeClock::default());
        assert!(limits.check_address("2001:db8::1".parse().unwrap()).is_ok());
        assert!(limits.check_address("2001:db8::2".parse().unwrap()).is_err());
        assert!(limits.check_address("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn memory_is_returned_for_a_million_keys_once_they_recover() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(100, 60, clock.clone());
        for i in 0..1_000_000u32 {
            let _ = limits.check_address(IpAddr::V4(i.into()));
        }
        assert_eq!(limits.tracked(), 1_000_000);
        clock.advance(Duration::from_millis(100));
        limits.purge();
        assert_eq!(limits.tracked(), 1_000_000, "keys that have not yet recovered are kept");
        clock.advance(Duration::from_secs(2));
        limits.purge();
        assert_eq!(limits.tracked(), 0);
    }

    /// A shared quota in memory, on the tests' clock: the same GCRA as the database's, which
    /// can be made unreachable, and counts how often it is asked.
    #[derive(Default)]
    struct FakeQuota {
        clock: FakeRelativeClock,
        tat: Mutex<HashMap<String, Duration>>,
        away: AtomicBool,
        asked: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl SharedQuota for FakeQuota {
        async fn take(
            &self,
            user: &str,
            need: u32,
            want: u32,
            per_minute: NonZeroU32,
        ) -> Result<Taken, StoreError> {
            self.asked.fetch_add(1, Ordering::Relaxed);
            // A round trip: the requests arriving meanwhile run.
            tokio::task::yield_now().await;
            if self.away.load(Ordering::Relaxed) {
                return Err(StoreError::Unavailable("away".into()));
            }
            let now = Duration::from(self.clock.now());
            let interval = Duration::from_secs(60) / per_minute.get();
            let window = interval * per_minute.get();
            let mut tat = self.tat.lock().unwrap();
            let from = tat.get(user).copied().unwrap_or_default().max(now);
            let free = ((now + window).saturating_sub(from).as_nanos() / interval.as_nanos()) as u32;
            if free < need {
                return Ok(Taken::Refused(from + interval * need - now - window));
            }
            let cells = free.min(want);
            tat.insert(user.to_owned(), from + interval * cells);
            Ok(Taken::Cells(cells))
        }

        async fn forget_recovered(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// Two instances on one shared quota of `per_minute`.
    fn two_instances(per_minute: u32) -> (Arc<FakeQuota>, [RateLimits<FakeRelativeClock>; 2]) {
        let quota = Arc::new(FakeQuota::default());
        let instance = || {
            RateLimits::with_clock(per_minute, 10, quota.clock.clone())
                .sharing(Some(quota.clone() as Arc<dyn SharedQuota>))
        };
        (quota.clone(), [instance(), instance()])
    }

    /// Requests of `user` let through out of `n`, alternating between the instances.
    async fn let_through(instances: &[RateLimits<FakeRelativeClock>; 2], user: &str, n: usize) -> usize {
        let mut passed = 0;
        for i in 0..n {
            passed += usize::from(instances[i % 2].check_user(user).await.is_ok());
        }
        passed
    }

    #[tokio::test]
    async fn two_instances_sharing_a_quota_let_a_user_through_exactly_the_limit() {
        let (quota, instances) = two_instances(100);
        assert_eq!(let_through(&instances, "u", 300).await, 100);
        assert!(quota.asked.load(Ordering::Relaxed) <= 300 / 4 + 100, "leases of 4, then refusals");
        let RetryAfter(secs) = instances[0].check_user("u").await.unwrap_err();
        assert_eq!(secs, 1, "a cell comes back every 0.6 s");
    }

    #[tokio::test]
    async fn requests_arriving_together_on_one_instance_share_its_leases() {
        let (quota, instances) = two_instances(100);
        let instances = Arc::new(instances);
        let mut requests = tokio::task::JoinSet::new();
        for i in 0..80 {
            let instances = instances.clone();
            requests.spawn(async move { instances[i % 2].check_user("u").await.is_ok() });
        }
        let passed = requests.join_all().await.into_iter().filter(|ok| *ok).count();
        assert_eq!(passed, 80, "80 of a limit of 100");
        assert_eq!(quota.asked.load(Ordering::Relaxed), 20, "one lease of 4 per 4 requests");
    }

    #[tokio::test]
    async fn cells_held_when_the_quota_recovers_add_at_most_a_lease_less_one_per_instance() {
        let (quota, instances) = two_instances(100);
        assert_eq!(let_through(&instances, "u", 2).await, 2, "each instance leased 4 cells, spent 1");
        quota.clock.advance(Duration::from_secs(59));
        assert_eq!(let_through(&instances, "u", 300).await, 106, "the full quota and 3 held by each");
    }

    #[tokio::test]
    async fn a_user_refused_by_the_shared_quota_is_refused_without_asking_it_until_a_cell_is_back() {
        let (quota, instances) = two_instances(10);
        assert_eq!(let_through(&instances, "u", 10).await, 10);
        let asked = quota.asked.load(Ordering::Relaxed);
        assert_eq!(let_through(&instances, "u", 100).await, 0);
        assert_eq!(quota.asked.load(Ordering::Relaxed), asked + 2, "once by each instance");
        quota.clock.advance(Duration::from_secs(6));
        assert_eq!(let_through(&instances, "u", 100).await, 1, "one cell back after 6 s");
    }

    #[tokio::test]
    async fn a_batch_takes_its_cells_of_the_shared_quota_or_none() {
        let (_, [limits, _]) = two_instances(10);
        assert!(limits.check_user_ops("u", 8).await.is_ok());
        assert!(limits.check_user_ops("u", 3).await.is_err(), "3 more than the 2 left");
        assert!(limits.check_user_ops("u", 2).await.is_ok(), "the refused batch took nothing");
        assert!(limits.check_user("u").await.is_err());
        assert!(limits.check_user_ops("v", 32).await.is_ok(), "no more than a minute's quota");
        assert!(limits.check_user("v").await.is_err());
    }

    #[tokio::test]
    async fn while_the_shared_quota_is_away_each_instance_counts_alone_and_asks_again_a_second_later() {
        let (quota, instances) = two_instances(10);
        quota.away.store(true, Ordering::Relaxed);
        assert_eq!(let_through(&instances, "u", 30).await, 20, "10 by each instance");
        assert_eq!(quota.asked.load(Ordering::Relaxed), 2, "asked once by each, then not for a second");
        quota.away.store(false, Ordering::Relaxed);
        quota.clock.advance(ASK_AGAIN_AFTER);
        assert_eq!(let_through(&instances, "v", 30).await, 10, "one limit for both again");
    }

    #[test]
    fn a_lease_is_small_enough_for_two_instances_to_hold_within_a_tenth_of_the_limit() {
        for per_minute in [1, 10, 49, 50, 100, 1000, 12_345, 1_000_000] {
            let per_minute = NonZeroU32::new(per_minute).unwrap();
            let held = 2 * (lease_size(per_minute) - 1);
            assert!(held * 10 <= per_minute.get(), "{per_minute}: {held}");
        }
    }
}
