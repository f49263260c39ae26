//! Request rate limits: per user for authenticated requests, per IP address for requests
//! without a valid token. Memory is bounded by the keys seen within one limit window:
//! [`RateLimits::purge`] (run every few seconds) forgets every key that has fully recovered.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Cells a request of `n` ops takes: one per op, but no more than a whole minute's quota, so
/// that a batch larger than the limit can still pass once the user's bucket is full.
fn cells(n: u32, quota: NonZeroU32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN).min(quota)
}

type Keyed<K, C> = RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Both limiters of the hub.
pub struct RateLimits<C: Clock = DefaultClock> {
    users: Keyed<String, C>,
    /// The users' quota per minute, which a batch never needs more of.
    per_user: NonZeroU32,
    addresses: Keyed<IpAddr, C>,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for RateLimits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("users", &self.users.len())
            .field("addresses", &self.addresses.len())
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
        }
    }

    /// Counts one request of `user`.
    pub fn check_user(&self, user: &str) -> Result<(), RetryAfter> {
        check(&self.users, &user.to_owned(), &self.clock)
    }

    /// Counts `ops` requests of `user` at once (a batch): all of them, or none.
    pub fn check_user_ops(&self, user: &str, ops: u32) -> Result<(), RetryAfter> {
        match self.users.check_key_n(&user.to_owned(), cells(ops, self.per_user)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(wait(not_until.wait_time_from(self.clock.now()))),
            // `cells` never asks for more than the quota.
            Err(_) => Err(RetryAfter(60)),
        }
    }

    /// Counts the ops of a batch beyond its first, which the batch's admission counted as one
    /// request before its body was read: no more than the quota less one, so that a batch
    /// larger than the limit still passes when the user's bucket is full.
    pub fn check_user_rest(&self, user: &str, ops: u32) -> Result<(), RetryAfter> {
        match ops.saturating_sub(1).min(self.per_user.get() - 1) {
            0 => Ok(()),
            rest => self.check_user_ops(user, rest),
        }
    }

    /// Counts one request without a valid token from `ip`. IPv6 addresses count per /64,
    /// the block one subscriber usually holds.
    pub fn check_address(&self, ip: IpAddr) -> Result<(), RetryAfter> {
        let key = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
            v4 => v4,
        };
        check(&self.addresses, &key, &self.clock)
    }

    /// Forgets every key whose limit has fully recovered, and returns the memory.
    pub fn purge(&self) {
        for limiter in [&self.users as &dyn Purge, &self.addresses] {
            limiter.purge();
        }
    }

    /// Keys currently remembered.
    pub fn tracked(&self) -> usize {
        self.users.len() + self.addresses.len()
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
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    #[test]
    fn the_request_over_the_limit_is_refused_with_a_wait() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(100, 10, clock.clone());
        for _ in 0..100 {
            assert!(limits.check_user("8-evans").is_ok());
        }
        let RetryAfter(secs) = limits.check_user("8-evans").unwrap_err();
        assert!((1..=60).contains(&secs), "{secs}");
        assert!(limits.check_user("someone-else").is_ok());
        clock.advance(Duration::from_secs(secs));
        assert!(limits.check_user("8-evans").is_ok());
    }

    #[test]
    fn a_batch_takes_a_cell_per_op_or_none() {
        let limits = RateLimits::with_clock(10, 10, FakeRelativeClock::default());
        assert!(limits.check_user_ops("u", 8).is_ok());
        assert!(limits.check_user_ops("u", 3).is_err(), "3 more than the 2 left");
        assert!(limits.check_user_ops("u", 2).is_ok(), "the refused batch took nothing");
        assert!(limits.check_user("u").is_err());
        // A batch larger than the quota passes when the bucket is full.
        let limits = RateLimits::with_clock(10, 10, FakeRelativeClock::default());
        assert!(limits.check_user_ops("v", 32).is_ok());
        assert!(limits.check_user("v").is_err());
    }

    #[test]
    fn a_batch_admitted_as_one_request_takes_the_rest_of_its_ops_after() {
        let limits = RateLimits::with_clock(10, 10, FakeRelativeClock::default());
        assert!(limits.check_user("u").is_ok());
        assert!(limits.check_user_rest("u", 8).is_ok(), "7 more");
        assert!(limits.check_user_rest("u", 4).is_err(), "3 more than the 2 left");
        assert!(limits.check_user_rest("u", 1).is_ok(), "a single op took its cell at admission");
        // A batch larger than the quota passes when the bucket is full: one cell, then 9.
        let limits = RateLimits::with_clock(10, 10, FakeRelativeClock::default());
        assert!(limits.check_user("v").is_ok());
        assert!(limits.check_user_rest("v", 32).is_ok());
        assert!(limits.check_user("v").is_err());
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
}
