//! A bloom filter over key hashes, for sorted tables: answers "certainly absent" without a
//! disk read. Bits are derived from the 64-bit key hash by double hashing, so building and
//! probing never rehash the key.

/// Bits per key: about 1 % false positives with [`PROBE_COUNT`] probes.
pub const BITS_PER_KEY: usize = 10;
pub const PROBE_COUNT: u32 = 7;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bloom {
    bits: Vec<u8>,
}

fn probes(hash: u64, bit_count: u64) -> impl Iterator<Item = u64> {
    let h1 = hash;
    let h2 = hash.rotate_left(32) | 1; // odd, so the probes cycle through every bit
    // Multiply-shift maps a 64-bit value onto 0..bit_count without a division.
    (0..u64::from(PROBE_COUNT))
        .map(move |i| ((u128::from(h1.wrapping_add(i.wrapping_mul(h2))) * u128::from(bit_count)) >> 64) as u64)
}

impl Bloom {
    /// A filter sized for `key_count` keys.
    pub fn with_capacity(key_count: usize) -> Bloom {
        let byte_count = (key_count.max(1) * BITS_PER_KEY).div_ceil(8).max(8);
        Bloom { bits: vec![0; byte_count] }
    }

    pub fn insert(&mut self, hash: u64) {
        let bit_count = self.bits.len() as u64 * 8;
        for bit in probes(hash, bit_count) {
            self.bits[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }

    /// False means the key was never inserted.
    pub fn may_contain(&self, hash: u64) -> bool {
        let bit_count = self.bits.len() as u64 * 8;
        probes(hash, bit_count).all(|bit| self.bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// A filter read back from a table (its checksum already verified).
    pub fn from_bytes(bits: Vec<u8>) -> Option<Bloom> {
        (!bits.is_empty()).then_some(Bloom { bits })
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
    }
}
