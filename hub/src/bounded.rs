//! A map from text keys to values that holds about a given number of entries: the keys are
//! spread over shards, each behind its own lock, and a shard that fills up is emptied rather
//! than grown. For what the hub remembers only to save work (users' stamps, verified tokens):
//! a forgotten entry is looked up again.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

const SHARDS: usize = 16;

type Shard<V> = HashMap<Box<str>, V>;

#[derive(Debug)]
pub struct BoundedMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    per_shard: usize,
    hasher: RandomState,
}

impl<V> BoundedMap<V> {
    /// A map that holds about `capacity` entries.
    pub fn new(capacity: usize) -> BoundedMap<V> {
        BoundedMap {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard<V>> {
        let index = usize::try_from(self.hasher.hash_one(key)).unwrap_or(0) % SHARDS;
        self.shards[index].lock().expect("bounded map shard")
    }

    /// What `read` makes of the value at `key`, if there is one.
    pub fn get<R>(&self, key: &str, read: impl FnOnce(&V) -> R) -> Option<R> {
        self.shard(key).get(key).map(read)
    }

    /// Changes the value at `key` with `update`, starting from `fresh()` when there is none.
    /// A key already held is neither hashed twice nor copied.
    pub fn update(&self, key: &str, fresh: impl FnOnce() -> V, update: impl FnOnce(&mut V)) {
        let mut shard = self.shard(key);
        match shard.get_mut(key) {
            Some(value) => update(value),
            None => {
                let mut value = fresh();
                update(&mut value);
                self.add(&mut shard, key, value);
            }
        }
    }

    /// Sets the value at `key`.
    pub fn insert(&self, key: &str, value: V) {
        let mut shard = self.shard(key);
        match shard.get_mut(key) {
            Some(held) => *held = value,
            None => self.add(&mut shard, key, value),
        }
    }

    /// Forgets every key.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().expect("bounded map shard").clear();
        }
    }

    /// Adds a key `shard` does not hold, emptying the shard first if it is full.
    fn add(&self, shard: &mut Shard<V>, key: &str, value: V) {
        if shard.len() >= self.per_shard {
            shard.clear();
        }
        shard.insert(key.into(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_forgets_rather_than_grows() {
        let map = BoundedMap::new(SHARDS);
        for key in 0..10 * SHARDS {
            map.update(&key.to_string(), || 0, |v| *v += 1);
        }
        let held: usize = map.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= SHARDS, "{held} entries held");
    }

    #[test]
    fn an_update_starts_from_fresh_only_when_the_key_is_new() {
        let map = BoundedMap::new(100);
        map.update("k", || 10, |v| *v += 1);
        map.update("k", || 10, |v| *v += 1);
        assert_eq!(map.get("k", |v| *v), Some(12));
        map.insert("k", 1);
        assert_eq!(map.get("k", |v| *v), Some(1));
        assert_eq!(map.get("other", |v| *v), None);
    }
}
