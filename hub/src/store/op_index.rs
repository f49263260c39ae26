//! Where each op id in the store's op log is, in memory.
//!
//! Every delta carries an op id that must be looked up (is it a retry?) and then remembered.
//! Remembered in a table keyed by user, each new op id is an insert at a random place: one
//! more page written to the WAL and later to the database file, for every write. The op log
//! is appended to in arrival order instead, so the op ids of a batch share a page or two, and
//! this index finds an op id's log row without reading any page.
//!
//! An entry is a hash of `(user, op id)` and the log row's id, 16 bytes. Two op ids may share
//! a hash: a lookup yields every row id with that hash, and the store compares each row it
//! reads with the op id it looks for. What a batch adds or removes is pending until the batch
//! commits (`commit`) or its transaction is rolled back (`discard`).
//!
//! Exactly-once rests on one property: every committed row of the log is in the index (an
//! op id missing from it would be applied again). An entry whose row is gone is harmless, as
//! every row read is compared. The store reads the index back from the log after any batch
//! that failed, whatever its rollback undid. Knows nothing of SQLite.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

/// Pending entries whose room is kept between batches: a batch's worth of writes.
const PENDING_KEPT: usize = 1024;

#[derive(Default)]
pub struct OpIndex {
    hasher: DefaultHashBuilder,
    /// `(hash, row id)` of every committed log row.
    rows: HashTable<(u64, i64)>,
    /// Rows the open batch added, not committed yet.
    added: Vec<(u64, i64)>,
    /// Rows the open batch removed from the log, not committed yet.
    removed: Vec<(u64, i64)>,
}

impl OpIndex {
    pub fn hash(&self, user: &str, op_id: &str) -> u64 {
        self.hasher.hash_one((user, op_id))
    }

    /// The log rows that may hold the op id with this hash: committed ones and those the open
    /// batch added.
    pub fn candidates(&self, hash: u64) -> impl Iterator<Item = i64> + '_ {
        let committed = self.rows.iter_hash(hash).filter(move |e| e.0 == hash);
        let pending = self.added.iter().filter(move |e| e.0 == hash);
        committed.chain(pending).map(|e| e.1)
    }

    pub fn add(&mut self, hash: u64, row: i64) {
        self.added.push((hash, row));
    }

    /// Adds a row the database already holds, outside any batch (loading the log at start).
    pub fn insert_committed(&mut self, hash: u64, row: i64) {
        self.rows.insert_unique(hash, (hash, row), |e| e.0);
    }

    pub fn remove(&mut self, hash: u64, row: i64) {
        self.removed.push((hash, row));
    }

    /// How many rows the open batch has added so far; `forget_since` drops those after it.
    pub fn mark(&self) -> usize {
        self.added.len()
    }

    /// Drops what the open batch added after `mark`: its write was rolled back.
    pub fn forget_since(&mut self, mark: usize) {
        self.added.truncate(mark);
    }

    /// The open batch committed: what it added and removed now holds.
    pub fn commit(&mut self) {
        for (hash, row) in self.added.drain(..) {
            self.rows.insert_unique(hash, (hash, row), |e| e.0);
        }
        for entry in self.removed.drain(..) {
            if let Ok(found) = self.rows.find_entry(entry.0, |e| *e == entry) {
                found.remove();
            }
        }
        self.shrink_pending();
    }

    /// A prune may remove the whole log in one batch; its list need not stay that long.
    fn shrink_pending(&mut self) {
        self.added.shrink_to(PENDING_KEPT);
        self.removed.shrink_to(PENDING_KEPT);
    }

    /// The open batch was rolled back: nothing it added or removed happened.
    pub fn discard(&mut self) {
        self.added.clear();
        self.removed.clear();
        self.shrink_pending();
    }

    /// Log rows indexed, counting what the open batch added and removed.
    pub fn len(&self) -> usize {
        (self.rows.len() + self.added.len()).saturating_sub(self.removed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_added_by_a_batch_are_found_before_and_after_it_commits() {
        let mut index = OpIndex::default();
        let hash = index.hash("alice", "op-1");
        index.add(hash, 7);
        assert_eq!(index.candidates(hash).collect::<Vec<_>>(), [7]);
        index.commit();
        assert_eq!(index.candidates(hash).collect::<Vec<_>>(), [7]);
        assert_eq!(index.candidates(index.hash("bob", "op-1")).count(), 0);
    }

    #[test]
    fn a_discarded_batch_leaves_nothing_behind() {
        let mut index = OpIndex::default();
        let kept = index.hash("alice", "op-1");
        index.add(kept, 1);
        index.commit();
        let dropped = index.hash("alice", "op-2");
        index.add(dropped, 2);
        index.remove(kept, 1);
        index.discard();
        assert_eq!(index.candidates(dropped).count(), 0);
        assert_eq!(index.candidates(kept).collect::<Vec<_>>(), [1]);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn a_rolled_back_write_forgets_only_its_own_rows() {
        let mut index = OpIndex::default();
        let first = index.hash("alice", "op-1");
        index.add(first, 1);
        let mark = index.mark();
        let second = index.hash("alice", "op-2");
        index.add(second, 2);
        index.forget_since(mark);
        index.commit();
        assert_eq!(index.candidates(first).collect::<Vec<_>>(), [1]);
        assert_eq!(index.candidates(second).count(), 0);
    }

    #[test]
    fn every_row_sharing_a_hash_is_a_candidate_until_removed() {
        let mut index = OpIndex::default();
        index.add(42, 1);
        index.add(42, 2);
        index.commit();
        let mut both: Vec<_> = index.candidates(42).collect();
        both.sort_unstable();
        assert_eq!(both, [1, 2]);
        index.remove(42, 1);
        index.commit();
        assert_eq!(index.candidates(42).collect::<Vec<_>>(), [2]);
        assert_eq!(index.len(), 1);
    }
}
