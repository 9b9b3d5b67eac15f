//! A HyperLogLog sketch of a table's distinct keys, kept in the table's footer block: the
//! union of all tables' sketches estimates how many distinct keys they hold together, so
//! compaction can tell stale copies (overwrites) from new data without reading a table. A
//! key's 64-bit token (`schema::key_hash`) is the sketch's hash: the top `PRECISION` bits
//! pick a register, the rank of the rest goes into it.

/// log2 of the register count: 2,048 one-byte registers, about 2.3 % standard error, and
/// 2 KiB that fit in the footer's block beside the footer's fields.
pub const PRECISION: u32 = 11;
pub const REGISTER_COUNT: usize = 1 << PRECISION;

#[derive(Clone, PartialEq, Eq)]
pub struct Sketch {
    registers: Box<[u8; REGISTER_COUNT]>,
}

impl std::fmt::Debug for Sketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sketch(~{:.0} keys)", self.estimate())
    }
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch { registers: Box::new([0; REGISTER_COUNT]) }
    }
}

impl Sketch {
    pub fn insert(&mut self, token: u64) {
        let register = (token >> (64 - PRECISION)) as usize;
        // The rank of the remaining bits: the position of their first set bit, counting
        // from 1; a marker bit bounds it when they are all zero.
        let rest = (token << PRECISION) | (1 << (PRECISION - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if let Some(slot) = self.registers.get_mut(register) {
            *slot = (*slot).max(rank);
        }
    }

    /// Adds `other`'s keys to this sketch (the sketch of the union).
    pub fn merge(&mut self, other: &Sketch) {
        for (mine, theirs) in self.registers.iter_mut().zip(other.registers.iter()) {
            *mine = (*mine).max(*theirs);
        }
    }

    /// The estimated number of distinct tokens inserted.
    pub fn estimate(&self) -> f64 {
        let m = REGISTER_COUNT as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let sum: f64 = self.registers.iter().map(|&rank| 2f64.powi(-i32::from(rank))).sum();
        let raw = alpha * m * m / sum;
        let empty = self.registers.iter().filter(|&&rank| rank == 0).count();
        // Few keys: linear counting over the empty registers is the better estimate.
        if raw <= 2.5 * m && empty > 0 {
            m * (m / empty as f64).ln()
        } else {
            raw
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.registers[..]
    }

    /// A sketch read back from a table (its checksum already verified): `None` unless it
    /// is exactly `REGISTER_COUNT` registers, each a possible rank.
    pub fn from_bytes(bytes: &[u8]) -> Option<Sketch> {
        let registers: [u8; REGISTER_COUNT] = bytes.try_into().ok()?;
        let rank_max = (64 - PRECISION + 1) as u8;
        registers.iter().all(|&rank| rank <= rank_max).then(|| Sketch { registers: Box::new(registers) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(key: u64) -> u64 {
        schema::key_hash(format!("key:{key:012}").as_bytes())
    }

    #[test]
    fn estimates_distinct_keys_within_a_few_percent_and_unions_them() {
        for count in [10u64, 1_000, 100_000, 1_000_000] {
            let mut sketch = Sketch::default();
            for key in 0..count {
                sketch.insert(token(key));
                sketch.insert(token(key)); // a duplicate changes nothing
            }
            let error = (sketch.estimate() - count as f64).abs() / count as f64;
            assert!(error < 0.08, "{count} keys estimated as {:.0}", sketch.estimate());
        }
        // Two tables of 60,000 keys sharing 20,000: the union holds 100,000.
        let (mut a, mut b) = (Sketch::default(), Sketch::default());
        (0..60_000).for_each(|key| a.insert(token(key)));
        (40_000..100_000).for_each(|key| b.insert(token(key)));
        a.merge(&b);
        let error = (a.estimate() - 100_000.0).abs() / 100_000.0;
        assert!(error < 0.08, "union estimated as {:.0}", a.estimate());
        assert_eq!(Sketch::from_bytes(a.as_bytes()), Some(a.clone()));
        assert_eq!(Sketch::from_bytes(&a.as_bytes()[1..]), None);
        assert_eq!(Sketch::from_bytes(&[200; REGISTER_COUNT]), None, "a rank no token has");
    }
}
