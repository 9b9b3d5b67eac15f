//! A linearizability checker for one key used as a register with reads, blind writes and
//! deletes, compare-and-swap and increments: the Wing-Gong-Lowe search (linearize an operation that may go next, backtrack when the
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
    /// An unconditional write; `None` deletes.
    Write(Option<V>),
    /// Replaces the value by its increment (`Register::incremented`; absent counts as 0).
    Increment,
}

/// A register's values: what an increment makes of one.
pub trait Register: Clone + Eq + Hash + std::fmt::Debug {
    /// The value after an increment of `value`; `None` if it cannot be incremented (the
    /// operation then fails and changes nothing).
    fn incremented(value: &Option<Self>) -> Option<Self>;
}

macro_rules! integer_register {
    ($($t:ty),*) => {$(
        impl Register for $t {
            fn incremented(value: &Option<$t>) -> Option<$t> {
                value.unwrap_or(0).checked_add(1)
            }
        }
    )*};
}
integer_register!(u32, u64, i64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<V> {
    /// A read's value.
    Read(Option<V>),
    CasApplied,
    /// The CAS did not apply; the value it found.
    CasFailed(Option<V>),
    /// May or may not have taken effect.
    Unknown,
    /// A write was acknowledged; for a delete, whether the key existed (`None`: not told).
    Written {
        existed: Option<bool>,
    },
    /// An increment's result.
    Incremented(V),
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
pub fn check<V: Register>(history: &[Event<V>], initial: Option<V>) -> Result<(), String> {
    // Unknown reads tell nothing; unknown CASes may apply.
    let events: Vec<&Event<V>> = history
        .iter()
        .filter(|e| !(e.operation == Operation::Read && e.outcome == Outcome::Unknown))
        .collect();
    let mut search = Search { events: &events, refuted: HashSet::new(), linearized: Bits::new(events.len()) };
    if search.explore(initial.clone()) {
        Ok(())
    } else {
        Err(format!(
            "no linearization of {} operations from {initial:?}; {} (linearized set, value) pairs refuted",
            events.len(),
            search.refuted.len()
        ))
    }
}

/// A set of event indices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(count: usize) -> Bits {
        Bits(vec![0; count.div_ceil(64)])
    }

    fn contains(&self, index: usize) -> bool {
        self.0[index / 64] & (1 << (index % 64)) != 0
    }

    fn set(&mut self, index: usize, on: bool) {
        if on {
            self.0[index / 64] |= 1 << (index % 64);
        } else {
            self.0[index / 64] &= !(1 << (index % 64));
        }
    }
}

struct Search<'a, V> {
    events: &'a [&'a Event<V>],
    refuted: HashSet<(Bits, Option<V>)>,
    linearized: Bits,
}

/// One step of the depth-first search: the register's value here, the event that led here,
/// and the next event to try from here.
struct Frame<V> {
    value: Option<V>,
    placed: Option<usize>,
    next: usize,
}

impl<V: Register> Search<'_, V> {
    fn known(event: &Event<V>) -> bool {
        event.outcome != Outcome::Unknown
    }

    /// Depth-first over the orders consistent with real time, with an explicit stack (a
    /// history of thousands of operations would overflow a thread's stack by recursion).
    fn explore(&mut self, initial: Option<V>) -> bool {
        let count = self.events.len();
        let mut stack = vec![Frame { value: initial, placed: None, next: 0 }];
        while let Some(frame) = stack.last_mut() {
            let linearized = &self.linearized;
            let pending = |i: usize| !linearized.contains(i);
            if frame.next == 0 {
                // Done once every operation with a known outcome is placed.
                if !(0..count).any(|i| pending(i) && Self::known(self.events[i])) {
                    return true;
                }
                if self.refuted.contains(&(self.linearized.clone(), frame.value.clone())) {
                    frame.next = count; // known dead end: backtrack below
                }
            }
            // An operation may go next only if no pending operation ended before it began.
            let earliest_end = (0..count)
                .filter(|&i| pending(i) && Self::known(self.events[i]))
                .map(|i| self.events[i].end)
                .min()
                .unwrap_or(u64::MAX);
            let mut step = None;
            while frame.next < count {
                let i = frame.next;
                frame.next += 1;
                if !pending(i) || self.events[i].start > earliest_end {
                    continue;
                }
                if let Some(next) = apply(self.events[i], &frame.value) {
                    step = Some((i, next));
                    break;
                }
            }
            match step {
                Some((i, value)) => {
                    self.linearized.set(i, true);
                    stack.push(Frame { value, placed: Some(i), next: 0 });
                }
                None => {
                    let frame = stack.pop().expect("a frame");
                    self.refuted.insert((self.linearized.clone(), frame.value));
                    if let Some(i) = frame.placed {
                        self.linearized.set(i, false);
                    }
                }
            }
        }
        false
    }
}

/// The register's value after `event` from `value`, if its outcome agrees. An unknown CAS
/// is placed only where it applies (where it would not, leaving it out is the same).
fn apply<V: Register>(event: &Event<V>, value: &Option<V>) -> Option<Option<V>> {
    match (&event.operation, &event.outcome) {
        (Operation::Write(new), Outcome::Written { existed }) => {
            existed.is_none_or(|existed| existed == value.is_some()).then(|| new.clone())
        }
        (Operation::Write(new), Outcome::Unknown) => Some(new.clone()),
        (Operation::Increment, Outcome::Incremented(new)) => {
            (V::incremented(value).as_ref() == Some(new)).then(|| Some(new.clone()))
        }
        (Operation::Increment, Outcome::Unknown) => V::incremented(value).map(Some),
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
    fn writes_deletes_and_increments_are_ordered_like_reads() {
        let ok = vec![
            event(0, 1, Operation::Write(Some(5)), Outcome::Written { existed: None }),
            event(2, 3, Operation::Increment, Outcome::Incremented(6)),
            event(2, 5, Operation::Read, Outcome::Read(Some(6))),
            event(6, 7, Operation::Write(None), Outcome::Written { existed: Some(true) }),
            event(8, 9, Operation::Increment, Outcome::Incremented(1)),
        ];
        assert_eq!(check(&ok, None), Ok(()));
        let lost_increment = vec![
            event(0, 1, Operation::Increment, Outcome::Incremented(1)),
            event(0, 1, Operation::Increment, Outcome::Incremented(1)),
        ];
        assert!(check(&lost_increment, None).is_err());
        let undone_delete = vec![
            event(0, 1, Operation::Write(Some(5)), Outcome::Written { existed: None }),
            event(2, 3, Operation::Write(None), Outcome::Written { existed: Some(true) }),
            event(4, 5, Operation::Read, Outcome::Read(Some(5))),
        ];
        assert!(check(&undone_delete, None).is_err());
        let deleted_nothing = vec![
            event(0, 1, Operation::Write(Some(5)), Outcome::Written { existed: None }),
            event(2, 3, Operation::Write(None), Outcome::Written { existed: Some(false) }),
        ];
        assert!(check(&deleted_nothing, None).is_err());
    }

    #[test]
    fn a_long_history_is_checked_without_recursion() {
        // 8,000 increments one after another: as deep as a search goes (recursion overflowed
        // a test thread's stack at about 5,000).
        let history: Vec<Event<u32>> = (0..8_000u32)
            .map(|i| {
                event(
                    2 * u64::from(i),
                    2 * u64::from(i) + 1,
                    Operation::Increment,
                    Outcome::Incremented(i + 1),
                )
            })
            .collect();
        assert_eq!(check(&history, None), Ok(()));
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
