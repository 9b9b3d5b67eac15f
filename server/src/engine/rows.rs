//! The row cache: the newest version of keys recently read from the tables, so that a hot
//! key's GET costs one hash lookup instead of a filter probe per table, a block search and a
//! copy of the value out of the block. A [`ClockCache`] like the block cache. It holds a
//! key's row only while no newer version exists: a write drops the key's row (the write's
//! version shadows it from the memtable, and would stop doing so once flushed), and tables
//! gain versions only from memtables.
//!
//! Rows are denser than blocks: a 4 KiB block holds a few entries, of which a random read
//! wants one (the others are often older versions), so most of the cache budget goes here.

use std::rc::Rc;

use super::cache::ClockCache;
use super::memtable::Entry;

/// Bytes of bookkeeping a row costs beyond its key and value (map slot, slot, shared headers
/// and allocator rounding of the key and the value), for the budget.
pub const ROW_OVERHEAD: usize = 160;

pub type RowCache = ClockCache<Rc<[u8]>, Entry>;

impl RowCache {
    /// Keeps `entry` as the newest version of `key` (read from the tables).
    pub fn insert_row(&mut self, key: &[u8], entry: Entry) {
        let size = key.len() + entry.value.as_ref().map_or(0, |value| value.len()) + ROW_OVERHEAD;
        self.insert(Rc::from(key), entry, size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(byte: u8, seq: u64) -> Entry {
        Entry { value: Some(Rc::from(vec![byte; 1000])), timestamp_us: seq, expires_at_ms: 0, seq }
    }

    #[test]
    fn stays_within_capacity_keeps_hot_rows_and_forgets_written_ones() {
        let mut rows = RowCache::new(16 * (1000 + 8 + ROW_OVERHEAD));
        rows.insert_row(b"hot", entry(1, 1));
        for i in 0..200u64 {
            assert_eq!(rows.get(b"hot".as_slice()).map(|e| e.seq), Some(1), "the hot row stays (round {i})");
            rows.insert_row(format!("cold{i:04}").as_bytes(), entry(2, i + 2));
            assert!(rows.size() <= rows.capacity());
        }
        rows.insert_row(b"hot", entry(3, 500));
        assert_eq!(rows.get(b"hot".as_slice()).map(|e| e.seq), Some(500), "a second insert replaces the row");
        // A version too large to keep still removes the one it supersedes.
        let large =
            Entry { value: Some(Rc::from(vec![4u8; 4000])), timestamp_us: 501, expires_at_ms: 0, seq: 501 };
        rows.insert_row(b"hot", large);
        assert!(rows.get(b"hot".as_slice()).is_none(), "no stale row outlives a newer version");
        rows.insert_row(b"hot", entry(3, 502));
        rows.remove(b"hot".as_slice());
        assert!(rows.get(b"hot".as_slice()).is_none());
        rows.set_capacity(2000);
        assert!(rows.size() <= 2000);
    }
}
