//! What a linearizable operation does to the key's state its Paxos round found, sans-IO:
//! `decide` takes the operation, the merged state and the time, and returns what to write
//! and what to answer. The runtime (`server/src/cluster/serial.rs`) and the CAS simulator
//! run it.

use std::rc::Rc;

use crate::record::{live_value, Page, Value};
use crate::update::{self, Update};
use crate::versions::{VersionVector, Versions};

/// A linearizable operation on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOp {
    /// `expected: None`: the key must be absent. With a `context` (from a read), the key's
    /// version vector must also still be that: nothing was written since the read.
    Cas { expected: Option<Vec<u8>>, new_value: Vec<u8>, ttl_ms: u64, context: Option<VersionVector> },
    /// A Redis conditional or counter command.
    Update(Update),
    /// A PUT (`value: None`: a DELETE) at SERIAL: unconditional, but in the key's one order
    /// with its CAS operations.
    Write { value: Option<Vec<u8>>, ttl_ms: u64 },
    /// A SERIAL read: sees every operation of this kind that completed before it.
    Read { metadata_only: bool, sibling_skip: u32, shown_before: Option<VersionVector> },
}

/// The key's value as a linearizable operation sees it: the newest live sibling (by
/// timestamp, then dot), as a plain read's client would resolve it: its bytes, milliseconds
/// left (0: no TTL) and timestamp.
pub fn newest_live(versions: &Versions<Value>, now_ms: u64) -> Option<(&[u8], u64, u64)> {
    let newest = versions.newest_where(|s| live_value(s, now_ms).is_some())?;
    let (bytes, ttl_left_ms) = live_value(newest, now_ms)?;
    Some((bytes, ttl_left_ms, newest.timestamp_us))
}

/// The value a failed CAS saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub value: Rc<[u8]>,
    pub ttl_left_ms: u64,
    pub timestamp_us: u64,
}

/// What the client is told once the decision is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialAnswer {
    /// A SERIAL read: this page of the state's live siblings.
    Read(Page),
    Done,
    CasFailed(Option<Seen>),
    /// A DELETE of an absent key.
    NotFound,
    Updated(update::Answer<Rc<[u8]>>),
}

/// What an operation does to the state it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// `Some((value, ttl_ms))` writes (`value: None` deletes); `None` writes nothing.
    pub write: Option<(Option<Vec<u8>>, u64)>,
    pub answer: SerialAnswer,
}

/// Decides `op` against `state`. Pure: the time comes in as `now_ms` (TTLs).
pub fn decide(op: &SerialOp, state: &Versions<Value>, now_ms: u64) -> Decision {
    let current = newest_live(state, now_ms);
    let (write, answer) = match op {
        SerialOp::Read { metadata_only, sibling_skip, shown_before } => {
            let page = Page {
                metadata_only: *metadata_only,
                sibling_skip: *sibling_skip,
                shown_before: shown_before.clone(),
            };
            (None, SerialAnswer::Read(page))
        }
        SerialOp::Cas { expected, new_value, ttl_ms, context } => {
            let value = current.map(|(value, _, _)| value);
            let unchanged = context.as_ref().is_none_or(|context| context == state.context());
            if value == expected.as_deref() && unchanged {
                (Some((Some(new_value.clone()), *ttl_ms)), SerialAnswer::Done)
            } else {
                let seen = current.map(|(value, ttl_left_ms, timestamp_us)| Seen {
                    value: Rc::from(value),
                    ttl_left_ms,
                    timestamp_us,
                });
                (None, SerialAnswer::CasFailed(seen))
            }
        }
        SerialOp::Write { value: Some(value), ttl_ms } => {
            (Some((Some(value.clone()), *ttl_ms)), SerialAnswer::Done)
        }
        SerialOp::Write { value: None, .. } if current.is_none() => (None, SerialAnswer::NotFound),
        SerialOp::Write { value: None, .. } => (Some((None, 0)), SerialAnswer::Done),
        SerialOp::Update(update) => {
            let current = current.map(|(value, ttl_left_ms, _)| update::Current { value, ttl_left_ms });
            let (write, answer) = update::decide(update, current);
            let answer = SerialAnswer::Updated(answer);
            match write {
                update::Write::Nothing => (None, answer),
                update::Write::Put { value, ttl_ms } => (Some((Some(value), ttl_ms)), answer),
                update::Write::Delete => (Some((None, 0)), answer),
            }
        }
    };
    Decision { write, answer }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(value: &[u8], expires_at_ms: u64) -> Versions<Value> {
        let mut versions = Versions::default();
        versions.write(1, 1, Some(&VersionVector::default()), Some((value.to_vec(), expires_at_ms)), 5_000);
        versions
    }

    #[test]
    fn a_cas_writes_only_when_it_sees_what_it_expects() {
        let state = holding(b"a", 0);
        let cas = |expected: Option<&[u8]>| SerialOp::Cas {
            expected: expected.map(<[u8]>::to_vec),
            new_value: b"b".to_vec(),
            ttl_ms: 0,
            context: None,
        };
        assert_eq!(decide(&cas(Some(b"a")), &state, 10).write, Some((Some(b"b".to_vec()), 0)));
        let failed = decide(&cas(None), &state, 10);
        assert_eq!(failed.write, None);
        let SerialAnswer::CasFailed(Some(seen)) = failed.answer else { panic!("{failed:?}") };
        assert_eq!((&*seen.value, seen.timestamp_us), (&b"a"[..], 5_000));
        // An expired value is absent: expecting nothing succeeds once its time has passed.
        let expiring = holding(b"a", 100);
        assert_eq!(decide(&cas(None), &expiring, 99).write, None);
        assert!(decide(&cas(None), &expiring, 100).write.is_some());
    }

    #[test]
    fn a_cas_with_a_stale_context_fails_and_a_delete_of_nothing_is_not_found() {
        let state = holding(b"a", 0);
        let stale = SerialOp::Cas {
            expected: Some(b"a".to_vec()),
            new_value: b"b".to_vec(),
            ttl_ms: 0,
            context: Some(VersionVector::default()),
        };
        assert!(matches!(decide(&stale, &state, 0).answer, SerialAnswer::CasFailed(Some(_))));
        let delete = SerialOp::Write { value: None, ttl_ms: 0 };
        assert_eq!(
            decide(&delete, &Versions::default(), 0),
            Decision { write: None, answer: SerialAnswer::NotFound }
        );
        assert_eq!(decide(&delete, &state, 0).write, Some((None, 0)));
    }
}
