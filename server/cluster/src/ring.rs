//! The ring: which nodes hold a key. Pure and deterministic (no I/O, no clock, no random
//! state), so that every node computes the same placement from the same membership.
//!
//! The hash space of [`schema::key_hash`] is cut into `2^partition_bits` equal partitions
//! (Riak's model; each partition is a virtual node). A key belongs to the partition its hash
//! falls in; its preference list is the owner of that partition followed by the owners of the
//! next partitions clockwise, skipping nodes already listed, until `replica_count` distinct
//! nodes are found.
//!
//! Placement is balanced by construction: a new ring deals partitions round-robin, so owned
//! shares differ by at most one partition. A joining node takes partitions only from the nodes
//! that hold the most, one at a time, so it receives about `1 / (nodes + 1)` of the data and
//! nothing else moves; a leaving node's partitions go to the nodes that hold the fewest.

use smallvec::SmallVec;

/// A node's identity on the ring (the cluster layer maps it to an address).
pub type NodeId = u32;

/// Partitions are `2^bits`; 256 by default: with up to 32 nodes the largest share is at most
/// 9/8 of the smallest.
pub const PARTITION_BITS_DEFAULT: u32 = 8;
pub const PARTITION_BITS_MAX: u32 = 16;
/// Preference lists hold at most this many nodes without allocating.
pub const REPLICA_COUNT_INLINE: usize = 5;

pub type PreferenceList = SmallVec<[NodeId; REPLICA_COUNT_INLINE]>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    partition_bits: u32,
    /// `owners[partition]`.
    owners: Vec<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    NoNodes,
    BadPartitionBits(u32),
    DuplicateNode(NodeId),
    UnknownNode(NodeId),
    LastNode(NodeId),
    TooManyNodes { node_count: usize, partition_count: usize },
}

impl Ring {
    /// A ring over `nodes`, partitions dealt round-robin in the given order.
    pub fn new(partition_bits: u32, nodes: &[NodeId]) -> Result<Ring, RingError> {
        if partition_bits == 0 || partition_bits > PARTITION_BITS_MAX {
            return Err(RingError::BadPartitionBits(partition_bits));
        }
        if nodes.is_empty() {
            return Err(RingError::NoNodes);
        }
        for (index, node) in nodes.iter().enumerate() {
            if nodes[..index].contains(node) {
                return Err(RingError::DuplicateNode(*node));
            }
        }
        let partition_count = 1usize << partition_bits;
        if nodes.len() > partition_count {
            return Err(RingError::TooManyNodes { node_count: nodes.len(), partition_count });
        }
        let owners = (0..partition_count).map(|partition| nodes[partition % nodes.len()]).collect();
        Ok(Ring { partition_bits, owners })
    }

    /// A ring with the given partition owners (as agreed and persisted).
    pub fn from_owners(partition_bits: u32, owners: Vec<NodeId>) -> Result<Ring, RingError> {
        if partition_bits == 0 || partition_bits > PARTITION_BITS_MAX {
            return Err(RingError::BadPartitionBits(partition_bits));
        }
        if owners.len() != 1 << partition_bits {
            return Err(RingError::NoNodes);
        }
        Ok(Ring { partition_bits, owners })
    }

    pub fn owners(&self) -> &[NodeId] {
        &self.owners
    }

    pub fn partition_count(&self) -> usize {
        self.owners.len()
    }

    /// The partition a key hash falls in: its top `partition_bits` bits.
    pub fn partition_of_hash(&self, hash: u64) -> usize {
        (hash >> (64 - self.partition_bits)) as usize
    }

    pub fn partition_of(&self, key: &[u8]) -> usize {
        self.partition_of_hash(schema::key_hash(key))
    }

    pub fn owner(&self, partition: usize) -> NodeId {
        self.owners[partition]
    }

    /// The distinct nodes of the ring, in order of first appearance.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut nodes = Vec::new();
        for &owner in &self.owners {
            if !nodes.contains(&owner) {
                nodes.push(owner);
            }
        }
        nodes
    }

    /// The first `replica_count` distinct nodes clockwise from the key's partition (fewer if
    /// the ring has fewer nodes).
    pub fn preference_list(&self, key: &[u8], replica_count: usize) -> PreferenceList {
        self.preference_list_of_partition(self.partition_of(key), replica_count)
    }

    pub fn preference_list_of_partition(&self, partition: usize, replica_count: usize) -> PreferenceList {
        let mut list = PreferenceList::new();
        for step in 0..self.owners.len() {
            if list.len() == replica_count {
                break;
            }
            let owner = self.owners[(partition + step) % self.owners.len()];
            if !list.contains(&owner) {
                list.push(owner);
            }
        }
        list
    }

    /// Partitions owned by each node, in order of first appearance.
    pub fn partition_counts(&self) -> Vec<(NodeId, usize)> {
        self.nodes()
            .into_iter()
            .map(|node| (node, self.owners.iter().filter(|&&owner| owner == node).count()))
            .collect()
    }

    /// Largest owned share divided by the smallest.
    pub fn imbalance(&self) -> f64 {
        let counts = self.partition_counts();
        let max = counts.iter().map(|c| c.1).max().unwrap_or(0);
        let min = counts.iter().map(|c| c.1).min().unwrap_or(0);
        max as f64 / min.max(1) as f64
    }

    /// The ring after `node` joins: it takes one partition at a time from a node that holds
    /// the most, until the largest share exceeds its own by at most one. Its partitions are
    /// spread evenly round the ring (the i-th is the first suitable one at or after
    /// `i * partitions / taken`), none next to another of its own where that can be avoided:
    /// a node's partitions side by side would make it a replica of fewer ranges than its
    /// share, and its neighbours of more. Returns the moved partitions.
    pub fn join(&self, node: NodeId) -> Result<(Ring, Vec<usize>), RingError> {
        let mut counts = self.partition_counts();
        if counts.iter().any(|&(existing, _)| existing == node) {
            return Err(RingError::DuplicateNode(node));
        }
        if counts.len() + 1 > self.owners.len() {
            return Err(RingError::TooManyNodes {
                node_count: counts.len() + 1,
                partition_count: self.owners.len(),
            });
        }
        let mut owners = self.owners.clone();
        let mut moved = Vec::new();
        let size = owners.len();
        let target = size / (counts.len() + 1);
        for i in 0..target {
            let most = counts.iter().map(|c| c.1).max().unwrap_or(0);
            let ideal = i * size / target.max(1);
            let suitable = |p: usize, spaced: bool| {
                let owner = owners[p];
                owner != node
                    && counts.iter().any(|&(n, c)| n == owner && c == most)
                    && (!spaced || (owners[(p + 1) % size] != node && owners[(p + size - 1) % size] != node))
            };
            let partition = (0..size)
                .map(|step| (ideal + step) % size)
                .find(|&p| suitable(p, true))
                .or_else(|| (0..size).map(|step| (ideal + step) % size).find(|&p| suitable(p, false)))
                .expect("a donor holds at least one partition");
            let donor = owners[partition];
            owners[partition] = node;
            if let Some(count) = counts.iter_mut().find(|c| c.0 == donor) {
                count.1 -= 1;
            }
            moved.push(partition);
        }
        moved.sort_unstable();
        Ok((Ring { partition_bits: self.partition_bits, owners }, moved))
    }

    /// The ring after `node` leaves: each of its partitions goes to a remaining node that
    /// holds the fewest, preferring one that owns neither neighbour (ties: the lowest id).
    /// Returns the moved partitions.
    pub fn leave(&self, node: NodeId) -> Result<(Ring, Vec<usize>), RingError> {
        let mut counts: Vec<(NodeId, usize)> = self.partition_counts();
        if !counts.iter().any(|&(existing, _)| existing == node) {
            return Err(RingError::UnknownNode(node));
        }
        counts.retain(|&(existing, _)| existing != node);
        if counts.is_empty() {
            return Err(RingError::LastNode(node));
        }
        let mut owners = self.owners.clone();
        let mut moved = Vec::new();
        let size = owners.len();
        for partition in 0..size {
            if owners[partition] != node {
                continue;
            }
            counts.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
            let fewest = counts[0].1;
            let neighbours = [owners[(partition + 1) % size], owners[(partition + size - 1) % size]];
            let chosen =
                counts.iter().position(|&(n, c)| c == fewest && !neighbours.contains(&n)).unwrap_or(0);
            owners[partition] = counts[chosen].0;
            counts[chosen].1 += 1;
            moved.push(partition);
        }
        Ok((Ring { partition_bits: self.partition_bits, owners }, moved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_compute_the_same_preference_lists() {
        let ring = Ring::new(6, &[0, 1, 2, 3, 4]).expect("ring");
        let topology = schema::peer::TopologyData {
            formed: true,
            replica_count: 3,
            partition_bits: 6,
            owners: (0..ring.partition_count()).map(|p| ring.owner(p) as u16).collect(),
            nodes: Vec::new(),
            ring_version: 1,
        };
        for i in 0..1000 {
            let key = format!("key-{i}");
            let ours: Vec<usize> =
                ring.preference_list(key.as_bytes(), 3).iter().map(|&n| n as usize).collect();
            assert_eq!(ours, topology.replicas(key.as_bytes()), "{key}");
        }
    }

    fn keys(count: usize) -> impl Iterator<Item = Vec<u8>> {
        (0..count).map(|i| format!("key-{i}").into_bytes())
    }

    #[test]
    fn five_nodes_are_balanced_within_the_target() {
        let ring = Ring::new(PARTITION_BITS_DEFAULT, &[1, 2, 3, 4, 5]).expect("ring");
        assert!(ring.imbalance() <= 1.15, "{}", ring.imbalance());
        // Keys follow the partitions: each node holds close to a fifth of 100,000 keys.
        let mut held = std::collections::BTreeMap::new();
        for key in keys(100_000) {
            *held.entry(ring.owner(ring.partition_of(&key))).or_insert(0usize) += 1;
        }
        let max = *held.values().max().expect("nodes");
        let min = *held.values().min().expect("nodes");
        assert!(max as f64 / (min as f64) < 1.15, "{held:?}");
    }

    #[test]
    fn preference_lists_hold_distinct_nodes() {
        for node_count in 1..=7u32 {
            let nodes: Vec<NodeId> = (1..=node_count).collect();
            let ring = Ring::new(PARTITION_BITS_DEFAULT, &nodes).expect("ring");
            for partition in 0..ring.partition_count() {
                let list = ring.preference_list_of_partition(partition, 3);
                assert_eq!(list.len(), 3.min(node_count as usize));
                assert_eq!(list[0], ring.owner(partition));
                for (index, node) in list.iter().enumerate() {
                    assert!(!list[..index].contains(node), "{list:?}");
                }
            }
        }
    }

    #[test]
    fn joining_moves_about_one_share_and_only_to_the_new_node() {
        let mut ring = Ring::new(PARTITION_BITS_DEFAULT, &[1, 2, 3]).expect("ring");
        for new_node in 4..=12 {
            let node_count = ring.nodes().len() + 1;
            let (next, moved) = ring.join(new_node).expect("join");
            let expected = ring.partition_count() / node_count;
            assert_eq!(moved.len(), expected, "moved {} of {}", moved.len(), ring.partition_count());
            for partition in 0..ring.partition_count() {
                let changed = ring.owner(partition) != next.owner(partition);
                assert_eq!(changed, moved.contains(&partition));
                if changed {
                    assert_eq!(next.owner(partition), new_node);
                }
            }
            assert!(next.imbalance() <= 1.15, "{node_count} nodes: {}", next.imbalance());
            let counts = next.partition_counts();
            let spread =
                counts.iter().map(|c| c.1).max().unwrap_or(0) - counts.iter().map(|c| c.1).min().unwrap_or(0);
            assert!(spread <= 1, "{counts:?}");
            ring = next;
        }
    }

    /// The share of partitions each node is a replica of (N = 3).
    fn replica_shares(ring: &Ring) -> Vec<f64> {
        ring.nodes()
            .into_iter()
            .map(|node| {
                let held = (0..ring.partition_count())
                    .filter(|&p| ring.preference_list_of_partition(p, 3).contains(&node))
                    .count();
                held as f64 / ring.partition_count() as f64
            })
            .collect()
    }

    #[test]
    fn joins_and_leaves_keep_every_nodes_replica_share_near_n_over_nodes() {
        let mut ring = Ring::new(PARTITION_BITS_DEFAULT, &[1, 2, 3]).expect("ring");
        for new_node in 4..=8 {
            ring = ring.join(new_node).expect("join").0;
            let ideal = 3.0 / ring.nodes().len() as f64;
            for share in replica_shares(&ring) {
                assert!(
                    (share - ideal).abs() < 0.06,
                    "{} nodes: share {share}, ideal {ideal}",
                    ring.nodes().len()
                );
            }
        }
        for leaving in [2, 5] {
            ring = ring.leave(leaving).expect("leave").0;
            let ideal = 3.0 / ring.nodes().len() as f64;
            for share in replica_shares(&ring) {
                assert!(
                    (share - ideal).abs() < 0.08,
                    "{} nodes: share {share}, ideal {ideal}",
                    ring.nodes().len()
                );
            }
        }
    }

    #[test]
    fn leaving_hands_partitions_to_the_least_loaded() {
        let ring = Ring::new(PARTITION_BITS_DEFAULT, &[1, 2, 3, 4, 5]).expect("ring");
        let (next, moved) = ring.leave(3).expect("leave");
        assert_eq!(moved.len(), ring.partition_counts()[2].1);
        assert!(!next.nodes().contains(&3));
        let counts = next.partition_counts();
        let spread =
            counts.iter().map(|c| c.1).max().unwrap_or(0) - counts.iter().map(|c| c.1).min().unwrap_or(0);
        assert!(spread <= 1, "{counts:?}");
        assert_eq!(ring.leave(9).map(|_| ()), Err(RingError::UnknownNode(9)));
        let single = Ring::new(4, &[1]).expect("ring");
        assert_eq!(single.leave(1).map(|_| ()), Err(RingError::LastNode(1)));
    }

    #[test]
    fn placement_is_pinned() {
        // Every node must compute the same placement: a change here moves data in every
        // existing cluster.
        let ring = Ring::new(PARTITION_BITS_DEFAULT, &[10, 20, 30]).expect("ring");
        assert_eq!(ring.partition_of(b"hello"), 0x95);
        assert_eq!(ring.preference_list(b"hello", 3).as_slice(), &[30, 10, 20]);
    }

    #[test]
    fn bad_rings_are_refused() {
        assert_eq!(Ring::new(0, &[1]), Err(RingError::BadPartitionBits(0)));
        assert_eq!(Ring::new(8, &[]), Err(RingError::NoNodes));
        assert_eq!(Ring::new(8, &[1, 1]), Err(RingError::DuplicateNode(1)));
        assert!(matches!(Ring::new(1, &[1, 2, 3]), Err(RingError::TooManyNodes { .. })));
    }
}
