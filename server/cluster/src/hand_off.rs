//! Handing off the keys of ranges a node no longer replicates, sans-IO: when a sweep is due,
//! and when a key may be dropped. The runtime (`anti_entropy::drop_moved_ranges`) and the
//! cluster simulator run it.
//!
//! A key is dropped only once every current replica acknowledged the versions this node
//! sent, and the key is unchanged since (a write a coordinator with a stale ring sent here
//! meanwhile is handed off next time, not lost); never while this node still replicates it.

use std::collections::BTreeSet;

use crate::ring::NodeId;
use crate::versions::Versions;

/// One key being handed off: what was sent, and which replicas acknowledged exactly that.
#[derive(Debug, Clone)]
pub struct KeyHandOff<V> {
    sent: Versions<V>,
    acknowledged: BTreeSet<NodeId>,
}

impl<V: Clone + PartialEq> KeyHandOff<V> {
    /// Starts handing off `sent` (send it to every current replica).
    pub fn new(sent: Versions<V>) -> KeyHandOff<V> {
        KeyHandOff { sent, acknowledged: BTreeSet::new() }
    }

    pub fn sent(&self) -> &Versions<V> {
        &self.sent
    }

    /// `from` acknowledged `versions` (an answer to an older hand-off counts for nothing).
    pub fn acknowledged(&mut self, from: NodeId, versions: &Versions<V>) {
        if *versions == self.sent {
            self.acknowledged.insert(from);
        }
    }

    /// Whether `me` may drop the key now: it replicates it no more, every one of `replicas`
    /// acknowledged what was sent, and `current` (what it holds now) is still that.
    pub fn may_drop(&self, me: NodeId, replicas: &[NodeId], current: &Versions<V>) -> bool {
        !replicas.contains(&me)
            && !replicas.is_empty()
            && replicas.iter().all(|replica| self.acknowledged.contains(replica))
            && *current == self.sent
    }
}

/// When a node sweeps the ranges it no longer replicates: once the ring it holds has no
/// pending change and has been in force for `delay_ms` (coordinators that have not heard yet
/// may still read from it), then every `interval_ms`, sooner (after `retry_ms`) when a sweep
/// kept keys because a replica did not answer.
#[derive(Debug, Clone)]
pub struct SweepSchedule {
    delay_ms: u64,
    interval_ms: u64,
    retry_ms: u64,
    /// The ring version seen and since when.
    stable_since: Option<(u64, u64)>,
    /// The version swept and when the next sweep is due.
    next: Option<(u64, u64)>,
}

impl SweepSchedule {
    pub fn new(delay_ms: u64, interval_ms: u64, retry_ms: u64) -> SweepSchedule {
        SweepSchedule { delay_ms, interval_ms, retry_ms, stable_since: None, next: None }
    }

    /// Whether a sweep is due at `now_ms` for ring `version` (`pending`: a change is pending).
    pub fn due(&mut self, now_ms: u64, version: u64, pending: bool) -> bool {
        if pending {
            return false;
        }
        match self.stable_since {
            Some((seen, since)) if seen == version => {
                if now_ms < since + self.delay_ms {
                    return false;
                }
            }
            _ => {
                self.stable_since = Some((version, now_ms));
                return false;
            }
        }
        !self.next.is_some_and(|(swept, at)| swept == version && now_ms < at)
    }

    /// A sweep of ring `version` ended at `now_ms`, keeping `kept` keys for later.
    pub fn swept(&mut self, now_ms: u64, version: u64, kept: u64) {
        let wait = if kept == 0 { self.interval_ms } else { self.retry_ms };
        self.next = Some((version, now_ms + wait));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versions::VersionVector;

    fn holding(value: u32) -> Versions<u32> {
        let mut versions = Versions::default();
        versions.write(1, u64::from(value), Some(&VersionVector::default()), Some(value), 10);
        versions
    }

    #[test]
    fn a_key_is_dropped_only_once_every_replica_has_it_unchanged() {
        let mut hand_off = KeyHandOff::new(holding(1));
        let replicas = [1, 2, 3];
        hand_off.acknowledged(1, &holding(1));
        hand_off.acknowledged(2, &holding(1));
        assert!(!hand_off.may_drop(0, &replicas, &holding(1)), "replica 3 has not answered");
        hand_off.acknowledged(3, &holding(2));
        assert!(!hand_off.may_drop(0, &replicas, &holding(1)), "3 acknowledged something else");
        hand_off.acknowledged(3, &holding(1));
        assert!(hand_off.may_drop(0, &replicas, &holding(1)));
        assert!(!hand_off.may_drop(0, &replicas, &holding(2)), "a write arrived since");
        assert!(!hand_off.may_drop(2, &replicas, &holding(1)), "a replica keeps its keys");
    }

    #[test]
    fn sweeps_wait_for_a_settled_ring_and_come_back_sooner_after_keeping_keys() {
        let mut schedule = SweepSchedule::new(5_000, 60_000, 10_000);
        assert!(!schedule.due(0, 3, true), "a change is pending");
        assert!(!schedule.due(1_000, 3, false), "version 3 first seen");
        assert!(!schedule.due(5_999, 3, false));
        assert!(schedule.due(6_000, 3, false));
        schedule.swept(6_000, 3, 2);
        assert!(!schedule.due(15_999, 3, false));
        assert!(schedule.due(16_000, 3, false), "kept keys: retried after 10 s");
        schedule.swept(16_000, 3, 0);
        assert!(!schedule.due(75_999, 3, false));
        assert!(schedule.due(76_000, 3, false));
        assert!(!schedule.due(76_000, 4, false), "a new version waits its delay again");
    }
}
