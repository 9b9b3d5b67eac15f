//! The block cache: direct I/O bypasses the page cache, so each shard keeps recently read
//! table blocks itself, bounded in bytes. Eviction is CLOCK (second chance): a hit sets a
//! bit, the hand clears bits until it finds a block not used since its last pass, so hits
//! cost no list surgery.

use std::collections::HashMap;
use std::rc::Rc;

/// A block: the table it belongs to and its offset there.
pub type BlockId = (u64, u64);

#[derive(Debug)]
struct Slot {
    id: BlockId,
    bytes: Rc<[u8]>,
    referenced: bool,
}

#[derive(Debug, Default)]
pub struct BlockCache {
    capacity: usize,
    size: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    positions: HashMap<BlockId, usize, ahash::RandomState>,
    hand: usize,
    pub hit_count: u64,
    pub miss_count: u64,
}

impl BlockCache {
    pub fn new(capacity: usize) -> BlockCache {
        BlockCache { capacity, ..BlockCache::default() }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the capacity, evicting at once if the cache is now too large.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.evict_to(capacity);
    }

    pub fn get(&mut self, id: BlockId) -> Option<Rc<[u8]>> {
        let Some(&position) = self.positions.get(&id) else {
            self.miss_count += 1;
            return None;
        };
        let slot = self.slots[position].as_mut().expect("positions point at occupied slots");
        slot.referenced = true;
        self.hit_count += 1;
        Some(slot.bytes.clone())
    }

    /// A block if the cache holds it, counting only hits (a miss here is retried by a read
    /// that goes to the disk, which counts it).
    pub fn get_cached(&mut self, id: BlockId) -> Option<Rc<[u8]>> {
        let &position = self.positions.get(&id)?;
        let slot = self.slots[position].as_mut().expect("positions point at occupied slots");
        slot.referenced = true;
        self.hit_count += 1;
        Some(slot.bytes.clone())
    }

    pub fn insert(&mut self, id: BlockId, bytes: Rc<[u8]>) {
        if bytes.len() > self.capacity / 8 || self.positions.contains_key(&id) {
            return; // A huge block would flush everything else out.
        }
        self.evict_to(self.capacity - bytes.len());
        self.size += bytes.len();
        let slot = Some(Slot { id, bytes, referenced: false });
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
        self.positions.insert(id, position);
    }

    /// Drops every block of a table that no longer exists.
    pub fn remove_table(&mut self, table_id: u64) {
        for position in 0..self.slots.len() {
            if self.slots[position].as_ref().is_some_and(|slot| slot.id.0 == table_id) {
                self.remove_at(position);
            }
        }
    }

    fn remove_at(&mut self, position: usize) {
        if let Some(slot) = self.slots[position].take() {
            self.size -= slot.bytes.len();
            self.positions.remove(&slot.id);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_capacity_and_keeps_hot_blocks() {
        let mut cache = BlockCache::new(64 * 1024);
        let block = |byte| Rc::from(vec![byte; 4096]);
        cache.insert((1, 0), block(1));
        for i in 1..100u64 {
            assert!(cache.get((1, 0)).is_some(), "the hot block stays (round {i})");
            cache.insert((2, i * 4096), block(2));
            assert!(cache.size() <= cache.capacity());
        }
        cache.remove_table(1);
        assert!(cache.get((1, 0)).is_none());
        cache.set_capacity(8192);
        assert!(cache.size() <= 8192);
    }
}
