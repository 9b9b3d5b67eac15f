//! The versions of one key on one replica: a version vector (what this replica has seen)
//! and the concurrent values (siblings), each with the dot (actor, counter) of the write that
//! made it. Pure; the cluster layer persists and ships these.
//!
//! - A write carries the context the client read (a version vector). It supersedes exactly
//!   the siblings whose dots the context covers; the rest stay as concurrent siblings.
//! - The coordinator picks the new dot's counter above both the key's clock and a node-wide
//!   floor that a persisted lease keeps rising across restarts, and applies the write locally
//!   before it awaits anything: so a dot is never reused (Riak's kv679 lost writes that way)
//!   and a replica never holds a clock that covers a dot it has not applied.
//! - Replicas merge: a sibling survives unless the other side's clock covers its dot and the
//!   other side no longer holds it. Merging is commutative, associative and idempotent.
//! - A write without a context ("blind", from RESP or `kvctl put`) is last-writer-wins: it
//!   supersedes what the coordinator has seen, and concurrent blind siblings collapse to the
//!   one with the highest (timestamp, dot), which loses the others (documented as lossy).
//! - The last writes the key's Paxos chose ride along (`chosen`): a window of one sequence,
//!   so a merge keeps the window that reaches further.

use std::collections::BTreeMap;

use schema::peer::{Ballot, CHOSEN_WRITE_COUNT_MAX};

/// A writer's identity in version vectors: the node id.
pub type Actor = u32;

/// Siblings a key may hold; beyond it the oldest (by timestamp) are dropped and counted.
pub const SIBLING_COUNT_MAX: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub actor: Actor,
    pub counter: u64,
}

/// For each actor, the highest counter seen: every dot at or below it is covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionVector(BTreeMap<Actor, u64>);

impl VersionVector {
    pub fn get(&self, actor: Actor) -> u64 {
        self.0.get(&actor).copied().unwrap_or(0)
    }

    pub fn covers(&self, dot: Dot) -> bool {
        self.get(dot.actor) >= dot.counter
    }

    pub fn add(&mut self, dot: Dot) {
        let counter = self.0.entry(dot.actor).or_insert(0);
        *counter = (*counter).max(dot.counter);
    }

    pub fn merge(&mut self, other: &VersionVector) {
        for (&actor, &counter) in &other.0 {
            self.add(Dot { actor, counter });
        }
    }

    /// True when `self` has seen everything `other` has.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(&actor, &counter)| self.get(actor) >= counter)
    }

    /// Entries in actor order.
    pub fn entries(&self) -> impl Iterator<Item = (Actor, u64)> + '_ {
        self.0.iter().map(|(&actor, &counter)| (actor, counter))
    }

    pub fn from_entries(entries: impl IntoIterator<Item = (Actor, u64)>) -> VersionVector {
        VersionVector(entries.into_iter().filter(|&(_, counter)| counter > 0).collect())
    }

    /// Wire form (the protocol's opaque context): (actor u32, counter u64) pairs, LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 12);
        for (&actor, &counter) in &self.0 {
            out.extend_from_slice(&actor.to_le_bytes());
            out.extend_from_slice(&counter.to_le_bytes());
        }
        out
    }

    /// Parses a context from a client; `None` if malformed (length, order or zero counter).
    pub fn decode(bytes: &[u8]) -> Option<VersionVector> {
        if !bytes.len().is_multiple_of(12) {
            return None;
        }
        let mut entries = BTreeMap::new();
        let mut previous = None;
        for chunk in bytes.chunks_exact(12) {
            let actor = u32::from_le_bytes(chunk[..4].try_into().ok()?);
            let counter = u64::from_le_bytes(chunk[4..].try_into().ok()?);
            if counter == 0 || previous.is_some_and(|p| p >= actor) {
                return None;
            }
            previous = Some(actor);
            entries.insert(actor, counter);
        }
        Some(VersionVector(entries))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling<V> {
    pub dot: Dot,
    /// `None`: a deletion (tombstone).
    pub value: Option<V>,
    pub timestamp_us: u64,
    /// Written without a context: resolved last-writer-wins against other blind siblings.
    pub blind: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versions<V> {
    clock: VersionVector,
    siblings: Vec<Sibling<V>>,
    dropped_sibling_count: u64,
    /// The last writes chosen by the key's Paxos, oldest first: the ballot each was first
    /// proposed under (rising along the sequence), and its dot.
    chosen: Vec<(Ballot, Dot)>,
}

impl<V> Default for Versions<V> {
    fn default() -> Self {
        Versions {
            clock: VersionVector::default(),
            siblings: Vec::new(),
            dropped_sibling_count: 0,
            chosen: Vec::new(),
        }
    }
}

impl<V: Clone> Versions<V> {
    /// Versions as stored or shipped (already resolved by whoever wrote them).
    pub fn from_parts(
        clock: VersionVector,
        siblings: Vec<Sibling<V>>,
        chosen: Vec<(Ballot, Dot)>,
    ) -> Versions<V> {
        Versions { clock, siblings, dropped_sibling_count: 0, chosen }
    }

    /// The last writes chosen by the key's Paxos, oldest first.
    pub fn chosen(&self) -> &[(Ballot, Dot)] {
        &self.chosen
    }

    /// Notes that the write `dot`, proposed under `ballot`, is part of this (proposed) state.
    pub fn record_chosen(&mut self, ballot: Ballot, dot: Dot) {
        self.chosen.push((ballot, dot));
        let excess = self.chosen.len().saturating_sub(CHOSEN_WRITE_COUNT_MAX);
        self.chosen.drain(..excess);
    }

    /// The context a reader gets: everything this replica has seen of the key.
    pub fn context(&self) -> &VersionVector {
        &self.clock
    }

    pub fn siblings(&self) -> &[Sibling<V>] {
        &self.siblings
    }

    /// Siblings dropped by the `SIBLING_COUNT_MAX` bound so far.
    pub fn dropped_sibling_count(&self) -> u64 {
        self.dropped_sibling_count
    }

    /// A coordinator's write. `context: None` is a blind write. `counter_floor` is the
    /// node-wide counter from the persisted lease. Returns the new dot.
    pub fn write(
        &mut self,
        actor: Actor,
        counter_floor: u64,
        context: Option<&VersionVector>,
        value: Option<V>,
        timestamp_us: u64,
    ) -> Dot {
        let dot = Dot { actor, counter: self.clock.get(actor).max(counter_floor) + 1 };
        let blind = context.is_none();
        let context = context.unwrap_or(&self.clock).clone();
        self.siblings.retain(|sibling| !context.covers(sibling.dot));
        self.siblings.push(Sibling { dot, value, timestamp_us, blind });
        self.clock.merge(&context);
        self.clock.add(dot);
        self.resolve();
        dot
    }

    /// Merges another replica's versions of the same key into these.
    pub fn merge(&mut self, other: &Versions<V>) {
        let mut siblings: Vec<Sibling<V>> = self
            .siblings
            .iter()
            .filter(|mine| !other.clock.covers(mine.dot) || other.siblings.iter().any(|s| s.dot == mine.dot))
            .cloned()
            .collect();
        for theirs in &other.siblings {
            let known = siblings.iter().any(|s| s.dot == theirs.dot);
            if !known && !self.clock.covers(theirs.dot) {
                siblings.push(theirs.clone());
            }
        }
        siblings.sort_by_key(|s| s.dot);
        self.siblings = siblings;
        self.clock.merge(&other.clock);
        if other.chosen.last().map(|c| c.0) > self.chosen.last().map(|c| c.0) {
            self.chosen = other.chosen.clone();
        }
        self.resolve();
    }

    /// Drops the oldest sibling (by timestamp, then dot), counted as a bound's drop; false if
    /// one or none is left. Deterministic, so replicas that shed the same set agree.
    pub fn shed_oldest(&mut self) -> bool {
        if self.siblings.len() <= 1 {
            return false;
        }
        let oldest =
            (0..self.siblings.len()).min_by_key(|&i| (self.siblings[i].timestamp_us, self.siblings[i].dot));
        if let Some(index) = oldest {
            self.siblings.remove(index);
            self.dropped_sibling_count += 1;
        }
        true
    }

    /// Blind siblings are last-writer-wins among themselves; the sibling count is bounded.
    fn resolve(&mut self) {
        if let Some(winner) = self.siblings.iter().filter(|s| s.blind).map(|s| (s.timestamp_us, s.dot)).max()
        {
            self.siblings.retain(|s| !s.blind || (s.timestamp_us, s.dot) == winner);
        }
        if self.siblings.len() > SIBLING_COUNT_MAX {
            self.siblings.sort_by_key(|s| (s.timestamp_us, s.dot));
            let excess = self.siblings.len() - SIBLING_COUNT_MAX;
            self.siblings.drain(..excess);
            self.dropped_sibling_count += excess as u64;
            self.siblings.sort_by_key(|s| s.dot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sim::SimRng;

    fn values(versions: &Versions<u32>) -> Vec<Option<u32>> {
        let mut values: Vec<_> = versions.siblings().iter().map(|s| s.value).collect();
        values.sort();
        values
    }

    #[test]
    fn a_write_with_context_supersedes_what_it_read() {
        let mut key = Versions::default();
        key.write(1, 0, Some(&VersionVector::default()), Some(10), 1);
        let read = key.context().clone();
        key.write(2, 0, Some(&read), Some(20), 2);
        assert_eq!(values(&key), [Some(20)]);
    }

    #[test]
    fn concurrent_writes_become_siblings_and_a_later_write_resolves_them() {
        let mut a = Versions::default();
        let mut b = Versions::default();
        let empty = VersionVector::default();
        a.write(1, 0, Some(&empty), Some(10), 1);
        b.write(2, 0, Some(&empty), Some(20), 2);
        a.merge(&b);
        assert_eq!(values(&a), [Some(10), Some(20)]);
        let context = a.context().clone();
        a.write(1, 0, Some(&context), Some(30), 3);
        assert_eq!(values(&a), [Some(30)]);
        b.merge(&a);
        assert_eq!(values(&b), [Some(30)]);
    }

    #[test]
    fn blind_writes_are_last_writer_wins() {
        let mut a = Versions::default();
        let mut b = Versions::default();
        a.write(1, 0, None, Some(10), 5);
        b.write(2, 0, None, Some(20), 7);
        a.merge(&b);
        assert_eq!(values(&a), [Some(20)]);
    }

    #[test]
    fn counters_rise_above_the_lease_floor() {
        let mut key: Versions<u32> = Versions::default();
        let dot = key.write(1, 500, None, Some(1), 1);
        assert_eq!(dot, Dot { actor: 1, counter: 501 });
        let dot = key.write(1, 0, None, Some(2), 2);
        assert_eq!(dot, Dot { actor: 1, counter: 502 });
    }

    #[test]
    fn context_roundtrips_and_rejects_garbage() {
        let mut vv = VersionVector::default();
        vv.add(Dot { actor: 3, counter: 9 });
        vv.add(Dot { actor: 1, counter: 4 });
        assert_eq!(VersionVector::decode(&vv.encode()), Some(vv.clone()));
        assert_eq!(VersionVector::decode(&[1, 2, 3]), None);
        let mut unordered = vv.encode()[12..].to_vec();
        unordered.extend_from_slice(&vv.encode()[..12]);
        assert_eq!(VersionVector::decode(&unordered), None);
    }

    #[test]
    fn sibling_count_is_bounded_and_counted() {
        let mut key: Versions<u32> = Versions::default();
        let empty = VersionVector::default();
        for actor in 0..(SIBLING_COUNT_MAX as u32 + 4) {
            let mut other = Versions::default();
            other.write(actor, 0, Some(&empty), Some(actor), u64::from(actor));
            key.merge(&other);
        }
        assert_eq!(key.siblings().len(), SIBLING_COUNT_MAX);
        assert_eq!(key.dropped_sibling_count(), 4);
    }

    /// Random replicas, writes with stale contexts and gossip in random order. After a full
    /// exchange every replica agrees, merging is order-insensitive, and no write is lost
    /// unless a later write's context covered it.
    #[test]
    fn replicas_converge_and_lose_only_superseded_writes() {
        for seed in 0..300 {
            let mut rng = SimRng::new(seed);
            let replica_count = 3;
            let mut replicas: Vec<Versions<u32>> = vec![Versions::default(); replica_count];
            let mut superseded = std::collections::BTreeSet::new();
            let mut written = Vec::new();
            for value in 0..40u32 {
                let at = rng.below(replica_count as u64) as usize;
                if rng.below(3) == 0 {
                    let from = rng.below(replica_count as u64) as usize;
                    let other = replicas[from].clone();
                    replicas[at].merge(&other);
                    continue;
                }
                // A client read some replica (possibly stale) and writes through `at`.
                let read_from = rng.below(replica_count as u64) as usize;
                let context = replicas[read_from].context().clone();
                for sibling in replicas[read_from].siblings() {
                    superseded.insert(sibling.dot);
                }
                let dot = replicas[at].write(at as Actor, 0, Some(&context), Some(value), u64::from(value));
                written.push((dot, value));
            }
            // Full exchange, in both directions, twice.
            for _ in 0..2 {
                for i in 0..replica_count {
                    for j in 0..replica_count {
                        let other = replicas[j].clone();
                        replicas[i].merge(&other);
                    }
                }
            }
            for replica in &replicas[1..] {
                assert_eq!(replica.siblings(), replicas[0].siblings(), "seed {seed}");
                assert_eq!(replica.context(), replicas[0].context(), "seed {seed}");
            }
            for (dot, value) in written {
                let kept = replicas[0].siblings().iter().any(|s| s.dot == dot);
                assert!(kept || superseded.contains(&dot), "seed {seed}: write {value} at {dot:?} lost");
            }
        }
    }
}
