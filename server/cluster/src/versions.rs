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
//!   supersedes what the coordinator has seen and every sibling older than it by (hybrid-clock
//!   timestamp, dot), blind or not, wherever the two meet; so of concurrent blind writes the
//!   newest wins and the others are lost (documented as lossy).
//! - Nothing else removes a sibling: no bound drops one. A coordinator refuses a write with a
//!   context that would take the key past `SiblingLimits` (`check_growth`); a key that goes
//!   past them anyway (concurrent coordinators, hints, anti-entropy) keeps every sibling.
//! - The last writes the key's Paxos chose ride along (`chosen`): a window of one sequence,
//!   so a merge keeps the window that reaches further.

use std::collections::BTreeMap;

use schema::peer::{Ballot, CHOSEN_WRITE_COUNT_MAX};

/// A writer's identity in version vectors: the node id.
pub type Actor = u32;

/// The actor of a node: its id hashed to 32 bits (members are checked for collisions when
/// the cluster forms).
pub fn actor_of(node_name: &str) -> Actor {
    (schema::key_hash(node_name.as_bytes()) >> 32) as u32
}

/// What a coordinator lets a key grow to: a write with a context that would take the key's
/// siblings past either bound is refused (`SIBLINGS_FULL`), so its writer is told. Merges are
/// never bounded by these: they keep every sibling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiblingLimits {
    pub count_max: usize,
    /// Bytes of sibling values (tombstones count none).
    pub value_bytes_max: usize,
}

/// How many siblings a key holds and the bytes of their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    pub sibling_count: usize,
    pub value_bytes: usize,
}

/// A write refused because it would take the key past its sibling limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiblingsFull {
    pub after: Footprint,
    pub limits: SiblingLimits,
}

impl std::fmt::Display for SiblingsFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the write would leave the key with {} siblings of {} value bytes; the limits are {} siblings \
             and {} bytes: read the key and write with its context to resolve them",
            self.after.sibling_count,
            self.after.value_bytes,
            self.limits.count_max,
            self.limits.value_bytes_max
        )
    }
}

/// Whether a write that took a key from `before` to `after` may be acknowledged: refused only
/// if it grows the key (in count or bytes) and leaves it past a limit. A write that shrinks an
/// oversized key (a client resolving the siblings it was given) always goes through.
pub fn check_growth(before: Footprint, after: Footprint, limits: SiblingLimits) -> Result<(), SiblingsFull> {
    let grows = after.sibling_count > before.sibling_count || after.value_bytes > before.value_bytes;
    let past = after.sibling_count > limits.count_max || after.value_bytes > limits.value_bytes_max;
    if grows && past {
        Err(SiblingsFull { after, limits })
    } else {
        Ok(())
    }
}

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
    /// Written without a context: supersedes every sibling older than it (see `resolve`).
    pub blind: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versions<V> {
    clock: VersionVector,
    siblings: Vec<Sibling<V>>,
    /// The last writes chosen by the key's Paxos, oldest first: the ballot each was first
    /// proposed under (rising along the sequence), and its dot.
    chosen: Vec<(Ballot, Dot)>,
    /// The newest blind write these versions have met, (timestamp, dot), kept after a later
    /// write supersedes it: it still supersedes every older sibling it meets, so a value that
    /// a blind write overwrote never comes back through a replica that missed the blind write.
    newest_blind: Option<(u64, Dot)>,
}

impl<V> Default for Versions<V> {
    fn default() -> Self {
        Versions {
            clock: VersionVector::default(),
            siblings: Vec::new(),
            chosen: Vec::new(),
            newest_blind: None,
        }
    }
}

impl<V: Clone> Versions<V> {
    /// Versions as stored or shipped (already resolved by whoever wrote them).
    pub fn from_parts(
        clock: VersionVector,
        siblings: Vec<Sibling<V>>,
        chosen: Vec<(Ballot, Dot)>,
        newest_blind: Option<(u64, Dot)>,
    ) -> Versions<V> {
        Versions { clock, siblings, chosen, newest_blind }
    }

    /// The newest blind write met: (timestamp, dot).
    pub fn newest_blind(&self) -> Option<(u64, Dot)> {
        self.newest_blind
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

    /// The value a linearizable operation sees: the newest sibling (by timestamp, then dot)
    /// among those `live` accepts (tombstones and expired values are not). The real CAS path
    /// and the CAS simulator both decide from it.
    pub fn newest_where(&self, live: impl Fn(&Sibling<V>) -> bool) -> Option<&Sibling<V>> {
        self.siblings.iter().filter(|s| live(s)).max_by_key(|s| (s.timestamp_us, s.dot))
    }

    /// The context for a reply that holds only the siblings `given` accepts: the key's clock
    /// lowered, actor by actor, below every sibling left out, so that a write with it never
    /// supersedes a value its client was not shown (left-out siblings stay as siblings).
    pub fn context_given(&self, given: impl Fn(&Sibling<V>) -> bool) -> VersionVector {
        let mut context = self.clock.clone();
        for sibling in self.siblings.iter().filter(|s| !given(s)) {
            let counter = context.0.entry(sibling.dot.actor).or_insert(0);
            *counter = (*counter).min(sibling.dot.counter - 1);
        }
        context.0.retain(|_, counter| *counter > 0);
        context
    }

    /// The siblings' count and value bytes, `size_of` giving a value's bytes.
    pub fn footprint(&self, size_of: impl Fn(&V) -> usize) -> Footprint {
        Footprint {
            sibling_count: self.siblings.len(),
            value_bytes: self.siblings.iter().filter_map(|s| s.value.as_ref()).map(size_of).sum(),
        }
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
        self.newest_blind = self.newest_blind.max(other.newest_blind);
        self.resolve();
    }

    /// The newest blind write met (a sibling, or remembered) supersedes every sibling older
    /// than it by (timestamp, dot). Both the sibling set and `newest_blind` merge as joins, so
    /// merging stays commutative, associative and idempotent.
    fn resolve(&mut self) {
        let blind_siblings = self.siblings.iter().filter(|s| s.blind).map(|s| (s.timestamp_us, s.dot));
        self.newest_blind = self.newest_blind.max(blind_siblings.max());
        if let Some(newest_blind) = self.newest_blind {
            self.siblings.retain(|s| (s.timestamp_us, s.dot) >= newest_blind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

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
    fn merges_keep_every_sibling_however_many() {
        let mut key: Versions<u32> = Versions::default();
        let empty = VersionVector::default();
        for actor in 0..100u32 {
            let mut other = Versions::default();
            other.write(actor, 0, Some(&empty), Some(actor), u64::from(actor));
            key.merge(&other);
        }
        assert_eq!(key.siblings().len(), 100);
        assert_eq!(key.footprint(|_| 10), Footprint { sibling_count: 100, value_bytes: 1000 });
    }

    #[test]
    fn a_coordinator_refuses_only_writes_that_grow_a_key_past_its_limits() {
        let limits = SiblingLimits { count_max: 3, value_bytes_max: 25 };
        let size = |v: &u32| *v as usize;
        let footprint = |count, bytes| Footprint { sibling_count: count, value_bytes: bytes };
        assert_eq!(check_growth(footprint(2, 20), footprint(3, 25), limits), Ok(()));
        assert!(check_growth(footprint(3, 20), footprint(4, 24), limits).is_err(), "count");
        assert!(check_growth(footprint(2, 20), footprint(3, 26), limits).is_err(), "bytes");
        // A key past its limits (merged from concurrent coordinators) may still be resolved.
        assert_eq!(check_growth(footprint(9, 90), footprint(5, 50), limits), Ok(()));
        let mut key: Versions<u32> = Versions::default();
        let empty = VersionVector::default();
        key.write(1, 0, Some(&empty), Some(10), 1);
        let before = key.footprint(size);
        key.write(1, 0, Some(&empty), Some(20), 2);
        let error = check_growth(before, key.footprint(size), limits).expect_err("30 bytes");
        assert_eq!(error.after, footprint(2, 30));
    }

    #[test]
    fn a_blind_write_supersedes_every_older_sibling_it_meets() {
        // A value written with a context (say, a CAS) at one replica; a blind delete made
        // later at a replica that never saw it: wherever they meet, the delete wins.
        let mut a: Versions<u32> = Versions::default();
        let mut c: Versions<u32> = Versions::default();
        a.write(1, 0, Some(&VersionVector::default()), Some(7), 10);
        c.write(3, 0, None, None, 20);
        let mut merged = a.clone();
        merged.merge(&c);
        assert_eq!(values(&merged), [None]);
        c.merge(&a);
        assert_eq!(values(&c), [None]);
        // A newer write with a context, concurrent with the blind one, stays beside it.
        let mut b: Versions<u32> = Versions::default();
        b.write(2, 0, Some(&VersionVector::default()), Some(9), 30);
        merged.merge(&b);
        assert_eq!(values(&merged), [None, Some(9)]);
    }

    #[test]
    fn a_partial_context_covers_no_sibling_left_out() {
        let mut key: Versions<u32> = Versions::default();
        let empty = VersionVector::default();
        // Two siblings of one actor: its node wrote twice with a stale (empty) context.
        key.write(1, 0, Some(&empty), Some(10), 10);
        key.write(1, 0, Some(&empty), Some(11), 11);
        for (actor, value) in [(2, 20), (3, 30)] {
            let mut other = Versions::default();
            other.write(actor, 0, Some(&empty), Some(value), u64::from(value));
            key.merge(&other);
        }
        assert_eq!(key.siblings().len(), 4);
        let shown = |s: &Sibling<u32>| s.value == Some(11) || s.value == Some(20);
        let context = key.context_given(shown);
        for sibling in key.siblings() {
            assert_eq!(
                context.covers(sibling.dot),
                shown(sibling) && sibling.value != Some(11),
                "{sibling:?}"
            );
        }
        // A write with it keeps every sibling it was not given.
        key.write(4, 0, Some(&context), Some(40), 40);
        assert_eq!(values(&key), [Some(10), Some(11), Some(30), Some(40)]);
        assert_eq!(key.context_given(|_| true), *key.context());
    }

    /// Random replicas, writes with stale contexts, blind writes and gossip in random order.
    /// After a full exchange every replica agrees, merging is order-insensitive, and a write is
    /// gone exactly when a later write's context covered it or a newer blind write exists.
    #[test]
    fn replicas_converge_and_lose_only_superseded_writes() {
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let replica_count = 3;
            let mut replicas: Vec<Versions<u32>> = vec![Versions::default(); replica_count];
            let mut superseded = std::collections::BTreeSet::new();
            let mut written = Vec::new();
            let mut blind = Vec::new();
            for value in 0..40u32 {
                let at = rng.below(replica_count as u64) as usize;
                if rng.below(3) == 0 {
                    let from = rng.below(replica_count as u64) as usize;
                    let other = replicas[from].clone();
                    replicas[at].merge(&other);
                    continue;
                }
                // A client read some replica (possibly stale) and writes through `at`, now
                // and then blind (which supersedes everything older, wherever it meets it).
                let timestamp_us = u64::from(value);
                if rng.below(5) == 0 {
                    let dot = replicas[at].write(at as Actor, 0, None, Some(value), timestamp_us);
                    written.push((dot, value, timestamp_us));
                    blind.push((timestamp_us, dot));
                    continue;
                }
                let read_from = rng.below(replica_count as u64) as usize;
                let context = replicas[read_from].context().clone();
                for sibling in replicas[read_from].siblings() {
                    superseded.insert(sibling.dot);
                }
                let dot = replicas[at].write(at as Actor, 0, Some(&context), Some(value), timestamp_us);
                written.push((dot, value, timestamp_us));
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
            let newest_blind = blind.iter().max().copied();
            for (dot, value, timestamp_us) in written {
                let kept = replicas[0].siblings().iter().any(|s| s.dot == dot);
                let older_than_blind = newest_blind.is_some_and(|newest| (timestamp_us, dot) < newest);
                assert!(
                    kept || superseded.contains(&dot) || older_than_blind,
                    "seed {seed}: write {value} at {dot:?} lost"
                );
                assert!(
                    !(kept && older_than_blind),
                    "seed {seed}: write {value} older than a blind write kept"
                );
            }
        }
    }
}
