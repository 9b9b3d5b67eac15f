//! The shard's caches, bounded in bytes with CLOCK eviction (second chance): a hit sets a
//! bit, the hand clears bits until it finds an entry not used since its last pass, so hits
//! cost no list surgery. Direct I/O bypasses the page cache, so the engine keeps what it
//! reads itself: table blocks ([`BlockCache`]) and rows (`rows.rs`).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::rc::Rc;

#[derive(Debug)]
struct Slot<K, V> {
    key: K,
    value: V,
    size: usize,
    referenced: bool,
}

/// Values under keys, each with the size it counts for, within a capacity in bytes.
#[derive(Debug)]
pub struct ClockCache<K, V> {
    capacity: usize,
    size: usize,
    slots: Vec<Option<Slot<K, V>>>,
    free: Vec<usize>,
    positions: HashMap<K, usize, ahash::RandomState>,
    hand: usize,
    pub hit_count: u64,
    pub miss_count: u64,
}

impl<K, V> Default for ClockCache<K, V> {
    fn default() -> Self {
        ClockCache {
            capacity: 0,
            size: 0,
            slots: Vec::new(),
            free: Vec::new(),
            positions: HashMap::default(),
            hand: 0,
            hit_count: 0,
            miss_count: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> ClockCache<K, V> {
    pub fn new(capacity: usize) -> ClockCache<K, V> {
        ClockCache { capacity, ..ClockCache::default() }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Changes the capacity, evicting at once if the cache is now too large.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.evict_to(capacity);
    }

    /// The value under `key`, counting a hit (misses are the caller's to count: a lookup
    /// that is retried elsewhere should count once).
    pub fn get<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let &position = self.positions.get(key)?;
        let slot = self.slots[position].as_mut().expect("positions point at occupied slots");
        slot.referenced = true;
        self.hit_count += 1;
        Some(slot.value.clone())
    }

    /// Keeps `value` under `key` (replacing what was there), counting `size` bytes; a value
    /// over an eighth of the capacity is not kept (it would flush everything else out).
    pub fn insert(&mut self, key: K, value: V, size: usize) {
        // What was under the key goes even when the new value is not kept: it is stale.
        self.remove(&key);
        if size > self.capacity / 8 {
            return;
        }
        self.evict_to(self.capacity - size);
        self.size += size;
        let slot = Some(Slot { key: key.clone(), value, size, referenced: false });
        let position = match self.free.pop() {
            Some(position) => {
                self.slots[position] = slot;
                position
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.positions.insert(key, position);
    }

    pub fn contains<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.positions.contains_key(key)
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
    {
        if let Some(&position) = self.positions.get(key) {
            self.remove_at(position);
        }
    }

    /// Drops every entry whose key fails `keep`.
    pub fn retain(&mut self, keep: impl Fn(&K) -> bool) {
        for position in 0..self.slots.len() {
            if self.slots[position].as_ref().is_some_and(|slot| !keep(&slot.key)) {
                self.remove_at(position);
            }
        }
    }

    fn remove_at(&mut self, position: usize) {
        if let Some(slot) = self.slots[position].take() {
            self.size -= slot.size;
            self.positions.remove(&slot.key);
            self.free.push(position);
        }
    }

    fn evict_to(&mut self, target: usize) {
        while self.size > target {
            let position = self.hand % self.slots.len().max(1);
            self.hand = position + 1;
            match &mut self.slots[position] {
                Some(slot) if slot.referenced => slot.referenced = false,
                Some(_) => self.remove_at(position),
                None => {}
            }
        }
    }
}

/// A block: the table it belongs to and its offset there.
pub type BlockId = (u64, u64);

/// Verified table blocks, read with direct I/O.
pub type BlockCache = ClockCache<BlockId, Rc<[u8]>>;

impl BlockCache {
    /// Keeps a verified block.
    pub fn insert_block(&mut self, id: BlockId, bytes: Rc<[u8]>) {
        if !self.contains(&id) {
            let size = bytes.len();
            self.insert(id, bytes, size);
        }
    }

    /// Drops every block of a table that no longer exists.
    pub fn remove_table(&mut self, table_id: u64) {
        self.retain(|&(table, _)| table != table_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_capacity_and_keeps_hot_blocks() {
        let mut cache = BlockCache::new(64 * 1024);
        let block = |byte| Rc::from(vec![byte; 4096]);
        cache.insert_block((1, 0), block(1));
        for i in 1..100u64 {
            assert!(cache.get(&(1, 0)).is_some(), "the hot block stays (round {i})");
            cache.insert_block((2, i * 4096), block(2));
            assert!(cache.size() <= cache.capacity());
        }
        cache.remove_table(1);
        assert!(cache.get(&(1, 0)).is_none());
        cache.set_capacity(8192);
        assert!(cache.size() <= 8192);
    }
}
