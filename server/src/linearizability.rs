//! A linearizability checker for one key used as a register with compare-and-swap: the
//! Wing-Gong-Lowe search (linearize an operation that may go next, backtrack when the
//! register's answers disagree, remember the (linearized set, value) pairs already refuted).
//! Tests record what clients did and saw, per key, and ask whether some order of the
//! operations, consistent with real time, explains every answer.
//!
//! An operation whose outcome is unknown (it timed out, or its proposer died) may have taken
//! effect at any time after it began, or never: it never constrains the order of others.

use std::collections::HashSet;
use std::hash::Hash;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation<V> {
    Read,
    /// `expected: None`: the key must be absent.
    Cas {
        expected: Option<V>,
        new: V,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<V> {
    /// A read's value.
    Read(Option<V>),
    CasApplied,
    /// The CAS did not apply; the value it found.
    CasFailed(Option<V>),
    /// May or may not have taken effect.
    Unknown,
}

/// One operation as a client saw it: invoked at `start`, answered at `end` (any monotonic
/// unit; `end` is ignored when the outcome is unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<V> {
    pub start: u64,
    pub end: u64,
    pub operation: Operation<V>,
    pub outcome: Outcome<V>,
}

/// Whether `history` (one key's operations, from a register holding `initial`) is
/// linearizable; the error names the operations no order could explain.
pub fn check<V: Clone + Eq + Hash + std::fmt::Debug>(
    history: &[Event<V>],
    initial: Option<V>,
) -> Result<(), String> {
    // Unknown reads tell nothing; unknown CASes may apply.
    let events: Vec<&Event<V>> = history
        .iter()
        .filter(|e| !(e.operation == Operation::Read && e.outcome == Outcome::Unknown))
        .collect();
    let mut search =
        Search { events: &events, refuted: HashSet::new(), linearized: vec![false; events.len()] };
    if search.explore(&initial) {
        Ok(())
    } else {
        Err(format!(
            "no linearization of {} operations from {initial:?}; {} (linearized set, value) pairs refuted",
            events.len(),
            search.refuted.len()
        ))
    }
}

struct Search<'a, V> {
    events: &'a [&'a Event<V>],
    refuted: HashSet<(Vec<bool>, Option<V>)>,
    linearized: Vec<bool>,
}

impl<V: Clone + Eq + Hash> Search<'_, V> {
    fn known(event: &Event<V>) -> bool {
        event.outcome != Outcome::Unknown
    }

    fn explore(&mut self, value: &Option<V>) -> bool {
        let pending = |i: usize, s: &Self| !s.linearized[i];
        // Done once every operation with a known outcome is placed.
        if !(0..self.events.len()).any(|i| pending(i, self) && Self::known(self.events[i])) {
            return true;
        }
        if self.refuted.contains(&(self.linearized.clone(), value.clone())) {
            return false;
        }
        // An operation may go next only if no pending operation ended before it began.
        let earliest_end = (0..self.events.len())
            .filter(|&i| pending(i, self) && Self::known(self.events[i]))
            .map(|i| self.events[i].end)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..self.events.len() {
            if !pending(i, self) || self.events[i].start > earliest_end {
                continue;
            }
            let Some(next) = apply(self.events[i], value) else { continue };
            self.linearized[i] = true;
            let explained = self.explore(&next);
            self.linearized[i] = false;
            if explained {
                return true;
            }
        }
        self.refuted.insert((self.linearized.clone(), value.clone()));
        false
    }
}

/// The register's value after `event` from `value`, if its outcome agrees. An unknown CAS
/// is placed only where it applies (where it would not, leaving it out is the same).
fn apply<V: Clone + Eq>(event: &Event<V>, value: &Option<V>) -> Option<Option<V>> {
    match (&event.operation, &event.outcome) {
        (Operation::Read, Outcome::Read(seen)) => (seen == value).then(|| value.clone()),
        (Operation::Cas { expected, new }, Outcome::CasApplied | Outcome::Unknown) => {
            (expected == value).then(|| Some(new.clone()))
        }
        (Operation::Cas { expected, .. }, Outcome::CasFailed(seen)) => {
            (expected != value && seen == value).then(|| value.clone())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(start: u64, end: u64, operation: Operation<u32>, outcome: Outcome<u32>) -> Event<u32> {
        Event { start, end, operation, outcome }
    }

    fn cas(expected: Option<u32>, new: u32) -> Operation<u32> {
        Operation::Cas { expected, new }
    }

    #[test]
    fn concurrent_operations_may_take_either_order() {
        let history = vec![
            event(0, 10, cas(None, 1), Outcome::CasApplied),
            event(1, 9, Operation::Read, Outcome::Read(Some(1))),
            event(2, 8, cas(None, 2), Outcome::CasFailed(Some(1))),
        ];
        assert_eq!(check(&history, None), Ok(()));
    }

    #[test]
    fn a_stale_read_after_a_completed_cas_is_caught() {
        let history = vec![
            event(0, 1, cas(None, 1), Outcome::CasApplied),
            event(2, 3, Operation::Read, Outcome::Read(None)),
        ];
        assert!(check(&history, None).is_err());
    }

    #[test]
    fn two_successful_cas_from_the_same_value_are_caught() {
        let history = vec![
            event(0, 5, cas(None, 1), Outcome::CasApplied),
            event(0, 5, cas(None, 2), Outcome::CasApplied),
        ];
        assert!(check(&history, None).is_err(), "a lost update");
    }

    #[test]
    fn an_unknown_cas_may_apply_late_or_never() {
        let late = vec![
            event(0, u64::MAX, cas(None, 1), Outcome::Unknown),
            event(5, 6, Operation::Read, Outcome::Read(None)),
            event(7, 8, Operation::Read, Outcome::Read(Some(1))),
        ];
        assert_eq!(check(&late, None), Ok(()));
        let never = vec![
            event(0, u64::MAX, cas(None, 1), Outcome::Unknown),
            event(5, 6, Operation::Read, Outcome::Read(None)),
        ];
        assert_eq!(check(&never, None), Ok(()));
        // But it cannot apply, be seen, and then be unseen.
        let flicker = vec![
            event(0, u64::MAX, cas(None, 1), Outcome::Unknown),
            event(5, 6, Operation::Read, Outcome::Read(Some(1))),
            event(7, 8, Operation::Read, Outcome::Read(None)),
        ];
        assert!(check(&flicker, None).is_err());
    }
}
