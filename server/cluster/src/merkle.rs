//! The Merkle tree of one partition, as anti-entropy compares it between replicas. Pure: built
//! from (key, versions) pairs, no I/O.
//!
//! A partition's tree has [`LEAF_COUNT`] leaves; a key falls in the leaf named by the six
//! bits of its token after the partition's own bits, and a leaf's hash is the XOR of its
//! keys' hashes, where a key's hash mixes the key with the digest of its versions (clock and
//! siblings; not the Paxos acceptor state, which is each replica's own). XOR makes a leaf
//! independent of scan order and lets the trees of a node's shards combine into the node's.
//! The root is not sent: the 64 leaves (512 bytes) are, and equal leaves are equal roots.
//! Within a differing leaf the replicas compare key digests.
//!
//! What takes part: every key with a live sibling, and every dead one (tombstones and
//! expired values only) until it has been dead for the settle time. A settled key counts as
//! absent, so that replicas which purged it and replicas which still hold it agree; it may be
//! purged only after a round found every replica of its partition in agreement (see
//! server/src/cluster/README.md, "Anti-entropy").

use schema::peer::MERKLE_LEAF_COUNT;

use crate::record::Value;
use crate::versions::Versions;

pub const LEAF_COUNT: usize = MERKLE_LEAF_COUNT;
const LEAF_BITS: u32 = LEAF_COUNT.trailing_zeros();

/// The tokens of `partition` (of `2^partition_bits`): `first..=last`.
pub fn token_range(partition: usize, partition_bits: u32) -> (u64, u64) {
    let shift = 64 - partition_bits;
    let first = (partition as u64) << shift;
    (first, first | (u64::MAX >> partition_bits))
}

/// The leaf of a token in its partition's tree.
pub fn leaf_of(token: u64, partition_bits: u32) -> usize {
    ((token << partition_bits) >> (64 - LEAF_BITS)) as usize
}

/// A digest of what replicas must agree on: the clock and the siblings, in a canonical order.
pub fn versions_digest(versions: &Versions<Value>) -> u64 {
    let mut clock: Vec<(u32, u64)> = versions.context().entries().collect();
    clock.sort_unstable();
    let mut siblings: Vec<_> = versions.siblings().iter().collect();
    siblings.sort_unstable_by_key(|s| (s.dot.actor, s.dot.counter));
    let mut bytes = Vec::with_capacity(16 * clock.len() + 64 * siblings.len());
    for (actor, counter) in clock {
        bytes.extend_from_slice(&actor.to_le_bytes());
        bytes.extend_from_slice(&counter.to_le_bytes());
    }
    for sibling in siblings {
        bytes.extend_from_slice(&sibling.dot.actor.to_le_bytes());
        bytes.extend_from_slice(&sibling.dot.counter.to_le_bytes());
        bytes.extend_from_slice(&sibling.timestamp_us.to_le_bytes());
        bytes.push(u8::from(sibling.blind));
        match &sibling.value {
            Some((value, expires_at_ms)) => {
                bytes.push(1);
                bytes.extend_from_slice(&expires_at_ms.to_le_bytes());
                bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
                bytes.extend_from_slice(value);
            }
            None => bytes.push(0),
        }
    }
    schema::key_hash(&bytes)
}

/// Whether a key's versions are settled: nothing live, and the last death (a tombstone's
/// write, a value's expiry) at least `settle_ms` before `now_ms`. Never for empty versions.
pub fn is_settled(versions: &Versions<Value>, now_ms: u64, settle_ms: u64) -> bool {
    is_settled_by(versions, now_ms, settle_ms, |(_, expires)| *expires)
}

/// `is_settled` for any value type, `expires_at_ms` telling when a value expires (0: never).
pub fn is_settled_by<V: Clone + PartialEq>(
    versions: &Versions<V>,
    now_ms: u64,
    settle_ms: u64,
    expires_at_ms: impl Fn(&V) -> u64,
) -> bool {
    let mut last_death = 0;
    for sibling in versions.siblings() {
        let died = match &sibling.value {
            None => sibling.timestamp_us / 1000,
            Some(value) => match expires_at_ms(value) {
                expires if expires != 0 && expires <= now_ms => expires,
                _ => return false,
            },
        };
        last_death = last_death.max(died);
    }
    !versions.siblings().is_empty() && last_death.saturating_add(settle_ms) <= now_ms
}

/// What one comparison of a partition with another of its replicas found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// The replica is down or did not answer.
    Unreachable,
    /// Some keys differed (and were repaired, or will be).
    Differing,
    /// Equal trees.
    Equal,
}

/// Whether a replica may purge its settled keys of a partition after comparing it with
/// every other replica of the partition: only when each of them answered and agreed. A
/// replica not heard from may still hold an older value that the tombstone supersedes; once
/// the tombstone is gone, that value would come back.
pub fn may_purge(others: &[Comparison]) -> bool {
    others.iter().all(|comparison| *comparison == Comparison::Equal)
}

fn key_hash_with(key: &[u8], digest: u64) -> u64 {
    // Distinct keys with equal digests must not cancel out: mix the key in.
    let mixed = schema::key_hash(key) ^ digest.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    mixed.wrapping_mul(0xff51_afd7_ed55_8ccd) ^ (mixed >> 33)
}

/// A partition's tree on one replica (or one shard of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub leaves: [u64; LEAF_COUNT],
}

impl Default for Tree {
    fn default() -> Self {
        Tree { leaves: [0; LEAF_COUNT] }
    }
}

impl Tree {
    pub fn add(&mut self, key: &[u8], digest: u64, partition_bits: u32) {
        self.leaves[leaf_of(schema::key_hash(key), partition_bits)] ^= key_hash_with(key, digest);
    }

    /// Folds in another shard's tree of the same partition.
    pub fn combine(&mut self, leaves: &[u64]) {
        for (mine, theirs) in self.leaves.iter_mut().zip(leaves) {
            *mine ^= theirs;
        }
    }

    /// A bit per leaf that differs from `other`'s.
    pub fn differing(&self, other: &Tree) -> u64 {
        let mut mask = 0;
        for (leaf, (mine, theirs)) in self.leaves.iter().zip(&other.leaves).enumerate() {
            if mine != theirs {
                mask |= 1 << leaf;
            }
        }
        mask
    }
}

/// The keys whose digests differ between two replicas' listings of the same leaves (present
/// on one side only, or with different digests), in `mine`'s order then `theirs`'.
pub fn differing_keys(mine: &[(Vec<u8>, u64)], theirs: &[(Vec<u8>, u64)]) -> Vec<Vec<u8>> {
    let theirs_map: std::collections::HashMap<&[u8], u64> =
        theirs.iter().map(|(key, digest)| (&key[..], *digest)).collect();
    let mine_map: std::collections::HashMap<&[u8], u64> =
        mine.iter().map(|(key, digest)| (&key[..], *digest)).collect();
    let mut keys: Vec<Vec<u8>> = mine
        .iter()
        .filter(|(key, digest)| theirs_map.get(&key[..]) != Some(digest))
        .map(|(key, _)| key.clone())
        .collect();
    keys.extend(
        theirs.iter().filter(|(key, _)| !mine_map.contains_key(&key[..])).map(|(key, _)| key.clone()),
    );
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versions::{Dot, Sibling, VersionVector};

    fn versions(siblings: Vec<Sibling<Value>>) -> Versions<Value> {
        let clock = VersionVector::from_entries(siblings.iter().map(|s| (s.dot.actor, s.dot.counter)));
        Versions::from_parts(clock, siblings, Vec::new(), None)
    }

    fn sibling(actor: u32, counter: u64, value: Option<&[u8]>, timestamp_us: u64) -> Sibling<Value> {
        Sibling {
            dot: Dot { actor, counter },
            value: value.map(|v| (v.to_vec(), 0)),
            timestamp_us,
            blind: false,
        }
    }

    #[test]
    fn partitions_tile_the_token_space_and_leaves_tile_a_partition() {
        let bits = 8;
        assert_eq!(token_range(0, bits), (0, (1 << 56) - 1));
        assert_eq!(token_range(255, bits).1, u64::MAX);
        let (first, last) = token_range(0x95, bits);
        assert_eq!(leaf_of(first, bits), 0);
        assert_eq!(leaf_of(last, bits), LEAF_COUNT - 1);
        for key in 0..1000 {
            let token = schema::key_hash(format!("k{key}").as_bytes());
            let partition = (token >> (64 - bits)) as usize;
            let (first, last) = token_range(partition, bits);
            assert!(first <= token && token <= last);
        }
    }

    #[test]
    fn digests_ignore_order_and_see_every_difference() {
        let a = sibling(1, 1, Some(b"x"), 10);
        let b = sibling(2, 1, Some(b"y"), 11);
        let one = versions(vec![a.clone(), b.clone()]);
        let other = versions(vec![b.clone(), a.clone()]);
        assert_eq!(versions_digest(&one), versions_digest(&other));
        let changed = versions(vec![a.clone(), sibling(2, 1, Some(b"z"), 11)]);
        assert_ne!(versions_digest(&one), versions_digest(&changed));
        let tombstone = versions(vec![a.clone(), sibling(2, 1, None, 11)]);
        assert_ne!(versions_digest(&one), versions_digest(&tombstone));
        assert_ne!(versions_digest(&versions(vec![a])), versions_digest(&one));
    }

    #[test]
    fn trees_combine_across_shards_and_name_the_differing_leaves() {
        let bits = 8;
        let keys: Vec<Vec<u8>> = (0..500).map(|i| format!("key-{i}").into_bytes()).collect();
        let mut whole = Tree::default();
        let mut halves = [Tree::default(), Tree::default()];
        for (i, key) in keys.iter().enumerate() {
            whole.add(key, 7, bits);
            halves[i % 2].add(key, 7, bits);
        }
        let mut combined = halves[0].clone();
        combined.combine(&halves[1].leaves);
        assert_eq!(combined, whole);
        let mut damaged = Tree::default();
        for key in &keys[1..] {
            damaged.add(key, 7, bits);
        }
        let mask = whole.differing(&damaged);
        assert_eq!(mask, 1 << leaf_of(schema::key_hash(&keys[0]), bits));
    }

    #[test]
    fn differing_keys_are_one_sided_or_changed() {
        let mine = vec![(b"a".to_vec(), 1), (b"b".to_vec(), 2), (b"c".to_vec(), 3)];
        let theirs = vec![(b"b".to_vec(), 2), (b"c".to_vec(), 4), (b"d".to_vec(), 5)];
        assert_eq!(differing_keys(&mine, &theirs), vec![b"a".to_vec(), b"c".to_vec(), b"d".to_vec()]);
    }

    #[test]
    fn only_old_deaths_settle() {
        let now = 1_000_000;
        let grace = 1_000;
        let dead_long_ago = versions(vec![sibling(1, 1, None, (now - 5_000) * 1000)]);
        assert!(is_settled(&dead_long_ago, now, grace));
        let dead_recently = versions(vec![sibling(1, 1, None, (now - 500) * 1000)]);
        assert!(!is_settled(&dead_recently, now, grace));
        let live_beside = versions(vec![sibling(1, 1, None, 0), sibling(2, 1, Some(b"v"), 0)]);
        assert!(!is_settled(&live_beside, now, grace));
        let mut expired = sibling(1, 1, Some(b"v"), 0);
        expired.value = Some((b"v".to_vec(), now - 2_000));
        assert!(is_settled(&versions(vec![expired.clone()]), now, grace));
        expired.value = Some((b"v".to_vec(), now + 2_000));
        assert!(!is_settled(&versions(vec![expired]), now, grace));
        assert!(!is_settled(&Versions::default(), now, grace));
    }
}
