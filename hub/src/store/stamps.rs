//! The stamps (version and time of last change) of recently seen users' records, in memory,
//! so that a timestamp check — the request every tab return makes — reads no database page.
//!
//! The store's writer merges each applied write's stamp in after its commit and before any
//! reply goes out; a check that misses loads the user's stamps from the database and merges
//! them in. Versions only grow, so keeping the higher version of the two makes the order of a
//! load and a concurrent update irrelevant — while the user's entry stays. An entry can go at
//! any time (the cache makes room for new ones), so a load that read the database before a
//! write committed must not be merged after that write's stamp went with its entry: each load
//! holds a [`Ticket`] of its user's stripe, which every write to a user of that stripe
//! punches, and a punched ticket's load is not kept. Knows nothing of SQLite.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

use protocol::DataType;

use super::Stamp;
use crate::bounded::BoundedMap;

/// What is known of one user: a stamp per data type, `None` where not known yet.
type Entry = [Option<Stamp>; DataType::ALL.len()];

/// Stripes of users whose writes and loads are ordered against each other.
const STRIPES: usize = 64;

#[derive(Debug)]
pub struct StampCache {
    users: BoundedMap<Entry>,
    /// Per stripe, the writes merged so far; its lock orders a write's merge against a load's.
    stripes: Box<[Mutex<u64>]>,
    hasher: RandomState,
}

/// Taken before a load reads the database: which writes to its user's stripe had been merged.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    stripe: usize,
    writes: u64,
}

impl StampCache {
    /// A cache that holds about `users` users.
    pub fn new(users: usize) -> StampCache {
        StampCache {
            users: BoundedMap::new(users),
            stripes: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            hasher: RandomState::new(),
        }
    }

    /// The stamps of `types`, in order, if every one of them is known.
    pub fn get(&self, user: &str, types: &[DataType]) -> Option<Vec<Stamp>> {
        self.users.get(user, |entry| types.iter().map(|t| entry[t.index()]).collect()).flatten()
    }

    fn stripe(&self, user: &str) -> (usize, MutexGuard<'_, u64>) {
        let stripe = usize::try_from(self.hasher.hash_one(user)).unwrap_or(0) % STRIPES;
        (stripe, self.stripes[stripe].lock().expect("stamp stripe"))
    }

    /// Before a load reads `user`'s stamps from the database.
    pub fn ticket(&self, user: &str) -> Ticket {
        let (stripe, writes) = self.stripe(user);
        Ticket { stripe, writes: *writes }
    }

    /// Merges in the stamps a load read under `ticket`, unless a write to its stripe has been
    /// merged since: that write's entry may have gone, and the load may be older than it.
    pub fn merge_loaded(
        &self,
        ticket: Ticket,
        user: &str,
        stamps: impl IntoIterator<Item = (DataType, Stamp)>,
    ) {
        let (stripe, writes) = self.stripe(user);
        if stripe == ticket.stripe && *writes == ticket.writes {
            self.merge(user, stamps);
        }
    }

    /// Merges in a committed write's stamps, punching every ticket of the user's stripe.
    pub fn merge_written(&self, user: &str, stamps: impl IntoIterator<Item = (DataType, Stamp)>) {
        let (_, mut writes) = self.stripe(user);
        *writes += 1;
        self.merge(user, stamps);
    }

    /// Merges `stamps` in, keeping the higher version of each. Called under the user's stripe.
    fn merge(&self, user: &str, stamps: impl IntoIterator<Item = (DataType, Stamp)>) {
        self.users.update(
            user,
            || [None; DataType::ALL.len()],
            |entry| {
                for (data_type, stamp) in stamps {
                    let known = &mut entry[data_type.index()];
                    if known.is_none_or(|k| k.version < stamp.version) {
                        *known = Some(stamp);
                    }
                }
            },
        );
    }

    /// Forgets every user, as the cache may forget any of them to make room.
    #[cfg(test)]
    fn forget_all(&self) {
        self.users.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(version: u64) -> Stamp {
        Stamp { version, updated_ms: Some(version as i64) }
    }

    #[test]
    fn a_load_that_read_an_older_version_does_not_undo_a_newer_write() {
        let cache = StampCache::new(100);
        let ticket = cache.ticket("u");
        cache.merge_written("u", [(DataType::Balance, stamp(2))]);
        cache.merge_loaded(ticket, "u", [(DataType::Balance, stamp(1)), (DataType::Profile, stamp(0))]);
        assert_eq!(cache.get("u", &[DataType::Balance]), Some(vec![stamp(2)]));
        let ticket = cache.ticket("u");
        cache.merge_loaded(ticket, "u", [(DataType::Balance, stamp(1)), (DataType::Profile, stamp(0))]);
        assert_eq!(cache.get("u", &[DataType::Balance, DataType::Profile]), Some(vec![stamp(2), stamp(0)]));
    }

    #[test]
    fn a_load_older_than_a_write_whose_entry_went_is_not_kept() {
        let cache = StampCache::new(100);
        // A check misses and reads version 1 from the database…
        let ticket = cache.ticket("u");
        let loaded = [(DataType::Balance, stamp(1))];
        // …meanwhile a write commits version 2 and merges it, and the entry goes.
        cache.merge_written("u", [(DataType::Balance, stamp(2))]);
        cache.forget_all();
        // The load must not bring version 1 back as if it were current.
        cache.merge_loaded(ticket, "u", loaded);
        assert_eq!(cache.get("u", &[DataType::Balance]), None, "a stale version was kept");
        // The next check loads afresh, and that load is kept.
        let ticket = cache.ticket("u");
        cache.merge_loaded(ticket, "u", [(DataType::Balance, stamp(2))]);
        assert_eq!(cache.get("u", &[DataType::Balance]), Some(vec![stamp(2)]));
    }

    #[test]
    fn a_check_misses_until_every_asked_type_is_known() {
        let cache = StampCache::new(100);
        cache.merge_written("u", [(DataType::Balance, stamp(3))]);
        assert_eq!(cache.get("u", &[DataType::Balance]), Some(vec![stamp(3)]));
        assert_eq!(cache.get("u", &[DataType::Balance, DataType::Roles]), None);
        assert_eq!(cache.get("someone-else", &[DataType::Balance]), None);
    }
}
