//! The stamps (version and time of last change) of recently seen users' records, in memory,
//! so that a timestamp check — the request every tab return makes — reads no database page.
//!
//! The store's writer merges each applied write's stamp in after its commit and before any
//! reply goes out; a check that misses loads the user's stamps from the database and merges
//! them in. Versions only grow, so keeping the higher version of the two makes the order of a
//! load and a concurrent update irrelevant. Bounded: a shard that fills up is emptied, and its
//! users' stamps load again on their next check. Knows nothing of SQLite.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use protocol::DataType;

use super::Stamp;

const SHARDS: usize = 16;

/// What is known of one user: a stamp per data type, `None` where not known yet.
type Entry = [Option<Stamp>; DataType::ALL.len()];

#[derive(Debug)]
pub struct StampCache {
    shards: Box<[Mutex<HashMap<String, Entry>>]>,
    users_per_shard: usize,
    hasher: RandomState,
}

fn slot(data_type: DataType) -> usize {
    DataType::ALL.iter().position(|t| *t == data_type).expect("every data type is in ALL")
}

impl StampCache {
    /// A cache that holds about `users` users.
    pub fn new(users: usize) -> StampCache {
        StampCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            users_per_shard: users.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, user: &str) -> &Mutex<HashMap<String, Entry>> {
        &self.shards[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    /// The stamps of `types`, in order, if every one of them is known.
    pub fn get(&self, user: &str, types: &[DataType]) -> Option<Vec<Stamp>> {
        let shard = self.shard(user).lock().expect("stamp cache");
        let entry = shard.get(user)?;
        types.iter().map(|t| entry[slot(*t)]).collect()
    }

    /// Merges `stamps` in, keeping the higher version of each.
    pub fn merge(&self, user: &str, stamps: impl IntoIterator<Item = (DataType, Stamp)>) {
        let mut shard = self.shard(user).lock().expect("stamp cache");
        if !shard.contains_key(user) && shard.len() >= self.users_per_shard {
            shard.clear();
        }
        let entry = shard.entry(user.to_owned()).or_insert([None; DataType::ALL.len()]);
        for (data_type, stamp) in stamps {
            let known = &mut entry[slot(data_type)];
            if known.is_none_or(|k| k.version < stamp.version) {
                *known = Some(stamp);
            }
        }
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
        cache.merge("u", [(DataType::Balance, stamp(2))]);
        cache.merge("u", [(DataType::Balance, stamp(1)), (DataType::Profile, stamp(0))]);
        assert_eq!(cache.get("u", &[DataType::Balance, DataType::Profile]), Some(vec![stamp(2), stamp(0)]));
    }

    #[test]
    fn a_check_misses_until_every_asked_type_is_known() {
        let cache = StampCache::new(100);
        cache.merge("u", [(DataType::Balance, stamp(3))]);
        assert_eq!(cache.get("u", &[DataType::Balance]), Some(vec![stamp(3)]));
        assert_eq!(cache.get("u", &[DataType::Balance, DataType::Roles]), None);
        assert_eq!(cache.get("someone-else", &[DataType::Balance]), None);
    }

    #[test]
    fn a_full_cache_forgets_rather_than_grows() {
        let cache = StampCache::new(SHARDS);
        for user in 0..10 * SHARDS {
            cache.merge(&user.to_string(), [(DataType::Balance, stamp(1))]);
        }
        let held: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= SHARDS, "{held} users held");
    }
}
