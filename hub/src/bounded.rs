//! A map from text keys to values that holds about a given number of entries, for what the
//! hub remembers only to save work (users' stamps, verified tokens): a forgotten entry is
//! looked up again. quick_cache (S3-FIFO): entries go one at a time as new ones come, the
//! ones read often last.

use quick_cache::sync::{Cache, EntryAction, EntryResult};

#[derive(Debug)]
pub struct BoundedMap<V: Clone> {
    cache: Cache<String, V>,
}

impl<V: Clone> BoundedMap<V> {
    /// A map that holds about `capacity` entries.
    pub fn new(capacity: usize) -> BoundedMap<V> {
        BoundedMap { cache: Cache::new(capacity.max(1)) }
    }

    /// What `read` makes of the value at `key`, if there is one.
    pub fn get<R>(&self, key: &str, read: impl FnOnce(&V) -> R) -> Option<R> {
        self.cache.get(key).map(|value| read(&value))
    }

    /// Changes the value at `key` with `update`, in place, starting from `fresh()` when there
    /// is none. A key already held is neither copied nor hashed twice.
    pub fn update(&self, key: &str, fresh: impl FnOnce() -> V, update: impl FnOnce(&mut V)) {
        let mut update = Some(update);
        let held = self.cache.entry(key, None, |_, value| {
            if let Some(update) = update.take() {
                update(value);
            }
            EntryAction::Retain(())
        });
        if let (EntryResult::Vacant(guard), Some(update)) = (held, update) {
            let mut value = fresh();
            update(&mut value);
            // A plain `insert` of the key meanwhile (the guard holds off other updates) wins.
            let _ = guard.insert(value);
        }
    }

    /// Sets the value at `key`.
    pub fn insert(&self, key: &str, value: V) {
        self.cache.insert(key.into(), value);
    }

    /// Forgets every key.
    #[cfg(test)]
    pub(crate) fn clear(&self) {
        self.cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_forgets_rather_than_grows() {
        let map = BoundedMap::new(100);
        for key in 0..10_000 {
            map.update(&key.to_string(), || 0, |v| *v += 1);
        }
        assert!(map.cache.len() <= 200, "{} entries held", map.cache.len());
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
