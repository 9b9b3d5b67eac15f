//! A blocked bloom filter over key hashes, for sorted tables: answers "certainly absent"
//! without a disk read. A key's probes all fall in one 64-byte block (one cache line), chosen
//! from its 64-bit hash, so a lookup costs one cache miss per table rather than one per probe;
//! a read probes the filter of every table it passes, so this is on the hot path. Bits come
//! from the hash by double hashing: building and probing never rehash the key.
//!
//! Which block a key lands in: tables of format 3 and later take it from the hash mixed
//! ([`Placement::Mixed`]), because a table may hold a narrow range of tokens (a piece of a
//! merge's output, see `engine/compaction.rs`): placed by the hash's high bits, such a
//! table's keys would crowd the few blocks of their range and nearly every probe would
//! pass. Older tables, whose keys spanned every token, keep the high bits.

/// Bits per key: about 1 % false positives with [`PROBE_COUNT`] probes (slightly more than
/// an unblocked filter's, the price of one cache line per lookup).
pub const BITS_PER_KEY: usize = 10;
pub const PROBE_COUNT: u32 = 7;
/// Bytes per block: one cache line.
pub const BLOCK_BYTES: usize = 64;
const BLOCK_BITS: u64 = (BLOCK_BYTES * 8) as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// By the hash's high bits: table formats 1 and 2.
    HighBits,
    /// By the whole hash, mixed: table format 3.
    Mixed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bloom {
    bits: Vec<u8>,
    placement: Placement,
}

/// The block of `hash` (multiply-shift maps the hash onto the blocks without a division) and
/// the bit positions inside it.
fn probes(hash: u64, block_count: usize, placement: Placement) -> (usize, impl Iterator<Item = u64>) {
    let spread = match placement {
        Placement::HighBits => hash,
        // A multiply carries every bit of the hash into the high bits the block comes from.
        Placement::Mixed => (hash ^ (hash >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9),
    };
    let block = ((u128::from(spread) * block_count as u128) >> 64) as usize;
    let h1 = hash.rotate_left(21);
    let h2 = hash.rotate_left(42) | 1; // odd, so the probes cycle through every bit
    (block, (0..u64::from(PROBE_COUNT)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % BLOCK_BITS))
}

impl Bloom {
    /// A filter sized for `key_count` keys.
    pub fn with_capacity(key_count: usize) -> Bloom {
        let byte_count = (key_count.max(1) * BITS_PER_KEY).div_ceil(8).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        Bloom { bits: vec![0; byte_count], placement: Placement::Mixed }
    }

    fn block_count(&self) -> usize {
        self.bits.len() / BLOCK_BYTES
    }

    pub fn insert(&mut self, hash: u64) {
        let (block, bits) = probes(hash, self.block_count(), self.placement);
        let block = &mut self.bits[block * BLOCK_BYTES..][..BLOCK_BYTES];
        for bit in bits {
            block[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }

    /// False means the key was never inserted.
    pub fn may_contain(&self, hash: u64) -> bool {
        let (block, mut bits) = probes(hash, self.block_count(), self.placement);
        let block = &self.bits[block * BLOCK_BYTES..][..BLOCK_BYTES];
        bits.all(|bit| block[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// A filter read back from a table (its checksum already verified); `None` unless it
    /// is a whole number of blocks.
    pub fn from_bytes(bits: Vec<u8>, placement: Placement) -> Option<Bloom> {
        (!bits.is_empty() && bits.len().is_multiple_of(BLOCK_BYTES)).then_some(Bloom { bits, placement })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let mut bloom = Bloom::with_capacity(10_000);
        for i in 0..10_000u32 {
            bloom.insert(schema::key_hash(&i.to_le_bytes()));
        }
        for i in 0..10_000u32 {
            assert!(bloom.may_contain(schema::key_hash(&i.to_le_bytes())));
        }
        let false_positives =
            (10_000..110_000u32).filter(|i| bloom.may_contain(schema::key_hash(&i.to_le_bytes()))).count();
        assert!(false_positives < 2_000, "{false_positives} false positives in 100,000");
        println!("blocked bloom: {false_positives} false positives in 100,000 at {BITS_PER_KEY} bits a key");
    }

    /// A table holding one sixteenth of the token space (a piece of a merge's output) keeps
    /// the filter's false positive rate for lookups in its range.
    #[test]
    fn a_narrow_token_range_keeps_few_false_positives() {
        let narrow = |i: u32| schema::key_hash(&i.to_le_bytes()) >> 4;
        let mut bloom = Bloom::with_capacity(10_000);
        (0..10_000).for_each(|i| bloom.insert(narrow(i)));
        assert!((0..10_000).all(|i| bloom.may_contain(narrow(i))));
        let false_positives = (10_000..110_000).filter(|&i| bloom.may_contain(narrow(i))).count();
        assert!(false_positives < 2_000, "{false_positives} false positives in 100,000");
        // What the old placement does with the same keys.
        let mut high = Bloom { bits: vec![0; bloom.bits.len()], placement: Placement::HighBits };
        (0..10_000).for_each(|i| high.insert(narrow(i)));
        let crowded = (10_000..110_000).filter(|&i| high.may_contain(narrow(i))).count();
        assert!(crowded > 50_000, "{crowded} false positives in 100,000 by the high bits");
    }
}
