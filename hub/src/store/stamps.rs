//! The stamps (version and time of last change) of recently seen users' records, in memory,
//! so that a timestamp check — the request every tab return makes — reads no database page.
//!
//! The store's writer merges each applied write's stamp in after its commit and before any
//! reply goes out; a check that misses loads the user's stamps from the database and merges
//! them in. Versions only grow, so keeping the higher version of the two makes the order of a
//! load and a concurrent update irrelevant. Bounded: a shard that fills up is emptied, and its
//! users' stamps load again on their next check. Knows nothing of SQLite.

use protocol::DataType;

use super::Stamp;
use crate::bounded::BoundedMap;

/// What is known of one user: a stamp per data type, `None` where not known yet.
type Entry = [Option<Stamp>; DataType::ALL.len()];

#[derive(Debug)]
pub struct StampCache {
    users: BoundedMap<Entry>,
}

fn slot(data_type: DataType) -> usize {
    DataType::ALL.iter().position(|t| *t == data_type).expect("every data type is in ALL")
}

impl StampCache {
    /// A cache that holds about `users` users.
    pub fn new(users: usize) -> StampCache {
        StampCache { users: BoundedMap::new(users) }
    }

    /// The stamps of `types`, in order, if every one of them is known.
    pub fn get(&self, user: &str, types: &[DataType]) -> Option<Vec<Stamp>> {
        self.users.get(user, |entry| types.iter().map(|t| entry[slot(*t)]).collect()).flatten()
    }

    /// Merges `stamps` in, keeping the higher version of each.
    pub fn merge(&self, user: &str, stamps: impl IntoIterator<Item = (DataType, Stamp)>) {
        self.users.update(
            user,
            || [None; DataType::ALL.len()],
            |entry| {
                for (data_type, stamp) in stamps {
                    let known = &mut entry[slot(data_type)];
                    if known.is_none_or(|k| k.version < stamp.version) {
                        *known = Some(stamp);
                    }
                }
            },
        );
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
}
