//! The memtable: the newest version of every key written since the last flush, owned by the
//! shard's thread (no lock). A hash map, not a sorted one: point reads and writes are all
//! the request path does, and a flush sorts once, off the request path's hot loop.

use std::collections::HashMap;
use std::rc::Rc;

use crate::table::format::{self as table_format, EntryKind};

/// Bytes of bookkeeping a memtable entry costs beyond its key and value (hash map slot,
/// boxed key and shared value headers, allocator rounding), for the memory budget.
pub const ENTRY_OVERHEAD: usize = 96;

/// One version of a key. `value: None` is a deletion (a tombstone), kept until compaction
/// shows that no older version can come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Option<Rc<[u8]>>,
    pub timestamp_us: u64,
    /// Unix milliseconds; 0 for never.
    pub expires_at_ms: u64,
    pub seq: u64,
}

impl Entry {
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.value.is_some() && (self.expires_at_ms == 0 || now_ms < self.expires_at_ms)
    }

    pub fn from_table(entry: &table_format::EntryRef<'_>) -> Entry {
        Entry {
            value: match entry.kind {
                EntryKind::Put => Some(Rc::from(entry.value)),
                EntryKind::Delete => None,
            },
            timestamp_us: entry.timestamp_us,
            expires_at_ms: entry.expires_at_ms,
            seq: entry.seq,
        }
    }
}

#[derive(Debug, Default)]
pub struct Memtable {
    map: HashMap<Box<[u8]>, Entry, ahash::RandomState>,
    /// Accounted bytes: keys, values and [`ENTRY_OVERHEAD`] per entry.
    size: usize,
    max_seq: u64,
}

fn accounted(key: &[u8], entry: &Entry) -> usize {
    key.len() + entry.value.as_ref().map_or(0, |value| value.len()) + ENTRY_OVERHEAD
}

impl Memtable {
    pub fn with_capacity(key_count: usize) -> Memtable {
        Memtable {
            map: HashMap::with_capacity_and_hasher(key_count, ahash::RandomState::new()),
            ..Memtable::default()
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(key)
    }

    pub fn insert(&mut self, key: &[u8], entry: Entry) {
        debug_assert!(entry.seq > self.max_seq, "sequence numbers only grow");
        self.max_seq = entry.seq;
        self.size += accounted(key, &entry);
        // An overwrite keeps the key's allocation.
        match self.map.get_mut(key) {
            Some(slot) => {
                let old = std::mem::replace(slot, entry);
                self.size -= accounted(key, &old);
            }
            None => {
                self.map.insert(Box::from(key), entry);
            }
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The highest sequence number in the memtable (0 when empty).
    pub fn max_seq(&self) -> u64 {
        self.max_seq
    }

    /// The entries whose tokens fall in `first..=last`, unordered.
    pub fn in_token_range(&self, first: u64, last: u64) -> impl Iterator<Item = (u64, &[u8], &Entry)> {
        self.map.iter().filter_map(move |(key, entry)| {
            let token = schema::key_hash(key);
            (first <= token && token <= last).then_some((token, &key[..], entry))
        })
    }

    /// Every entry with its token, in table order: (token, key).
    pub fn sorted(&self) -> Vec<(u64, &[u8], &Entry)> {
        let mut entries: Vec<(u64, &[u8], &Entry)> =
            self.map.iter().map(|(key, entry)| (schema::key_hash(key), &key[..], entry)).collect();
        entries.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        entries
    }
}
