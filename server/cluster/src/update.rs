//! Atomic read-modify-write operations on one key (RESP's conditional, counter and expiry
//! commands). An `Update` travels to the key's owning shard like any command; the store reads
//! the current version, `decide`s, and writes with no await in between, so concurrent updates
//! of one key serialize there: one round trip, no retries, and one group commit for many.

use std::rc::Rc;

/// A condition on the current value (SET NX/XX, Redis 8.4's IFEQ/IFNE/IFDEQ/IFDNE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Absent,
    Present,
    Equals(Vec<u8>),
    /// Holds when the key is absent too.
    Differs(Vec<u8>),
    DigestEquals(String),
    /// Holds when the key is absent too.
    DigestDiffers(String),
}

/// XXH3-64 of a value as 16 hex digits (Redis 8.4's DIGEST).
pub fn digest(value: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(value))
}

impl Condition {
    pub fn holds(&self, current: Option<&[u8]>) -> bool {
        match self {
            Condition::Absent => current.is_none(),
            Condition::Present => current.is_some(),
            Condition::Equals(expected) => current == Some(expected.as_slice()),
            Condition::Differs(unwanted) => current != Some(unwanted.as_slice()),
            Condition::DigestEquals(expected) => {
                current.is_some_and(|v| digest(v).eq_ignore_ascii_case(expected))
            }
            Condition::DigestDiffers(unwanted) => {
                current.is_none_or(|v| !digest(v).eq_ignore_ascii_case(unwanted))
            }
        }
    }
}

/// What EXPIRE's NX/XX/GT/LT require of the current TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpireWhen {
    Always,
    NoTtl,
    HasTtl,
    Greater,
    Less,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// SET with options. `ttl_ms: None` with `keep_ttl` keeps the current TTL; `Some(0)`
    /// means no TTL. `answer_previous`: reply with the old value (SET ... GET).
    Set {
        value: Vec<u8>,
        ttl_ms: u64,
        keep_ttl: bool,
        condition: Option<Condition>,
        answer_previous: bool,
    },
    /// INCRBY (and INCR, DECR, DECRBY).
    IncrementBy(i64),
    /// EXPIRE family: `ttl_ms: None` deletes (a time already past).
    Expire {
        ttl_ms: Option<u64>,
        when: ExpireWhen,
    },
    Persist,
    GetDelete,
    /// DELEX with a condition.
    DeleteIf(Condition),
}

/// The reply of an update, before the protocol encodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<V> {
    Ok,
    Null,
    Integer(i64),
    Bulk(V),
    /// A Redis error reply's text, code first.
    Error(String),
}

impl<V> Answer<V> {
    pub fn map_value<W>(self, f: impl Fn(V) -> W) -> Answer<W> {
        match self {
            Answer::Ok => Answer::Ok,
            Answer::Null => Answer::Null,
            Answer::Integer(n) => Answer::Integer(n),
            Answer::Bulk(v) => Answer::Bulk(f(v)),
            Answer::Error(e) => Answer::Error(e),
        }
    }
}

/// What to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Nothing,
    /// Store `value` with `ttl_ms` (0: none).
    Put {
        value: Vec<u8>,
        ttl_ms: u64,
    },
    Delete,
}

/// The key as the store holds it: live value and milliseconds left (0: no TTL).
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    pub value: &'a [u8],
    pub ttl_left_ms: u64,
}

pub const NOT_INTEGER: &str = "ERR value is not an integer or out of range";

/// Decides `update` against the current value: what to write and what to answer.
pub fn decide(update: &Update, current: Option<Current<'_>>) -> (Write, Answer<Rc<[u8]>>) {
    let value = current.map(|c| c.value);
    let previous = || value.map_or(Answer::Null, |v| Answer::Bulk(Rc::from(v)));
    match update {
        Update::Set { value: new, ttl_ms, keep_ttl, condition, answer_previous } => {
            let holds = condition.as_ref().is_none_or(|c| c.holds(value));
            let answer = match (answer_previous, holds) {
                (true, _) => previous(),
                (false, true) => Answer::Ok,
                (false, false) => Answer::Null,
            };
            if !holds {
                return (Write::Nothing, answer);
            }
            let ttl_ms = if *keep_ttl { current.map_or(0, |c| c.ttl_left_ms) } else { *ttl_ms };
            (Write::Put { value: new.clone(), ttl_ms }, answer)
        }
        Update::IncrementBy(delta) => {
            let number = match value {
                None => 0,
                Some(bytes) => match std::str::from_utf8(bytes)
                    .ok()
                    .filter(|t| !t.is_empty() && !t.starts_with('+') && t.trim() == *t)
                    .and_then(|t| t.parse::<i64>().ok())
                {
                    Some(number) => number,
                    None => return (Write::Nothing, Answer::Error(NOT_INTEGER.into())),
                },
            };
            match number.checked_add(*delta) {
                Some(next) => (
                    Write::Put {
                        value: next.to_string().into_bytes(),
                        ttl_ms: current.map_or(0, |c| c.ttl_left_ms),
                    },
                    Answer::Integer(next),
                ),
                None => (Write::Nothing, Answer::Error("ERR increment or decrement would overflow".into())),
            }
        }
        Update::Expire { ttl_ms, when } => {
            let Some(current) = current else { return (Write::Nothing, Answer::Integer(0)) };
            let has_ttl = current.ttl_left_ms > 0;
            let new_ttl = ttl_ms.unwrap_or(0);
            let allowed = match when {
                ExpireWhen::Always => true,
                ExpireWhen::NoTtl => !has_ttl,
                ExpireWhen::HasTtl => has_ttl,
                // No TTL counts as infinite.
                ExpireWhen::Greater => has_ttl && new_ttl > current.ttl_left_ms,
                ExpireWhen::Less => !has_ttl || new_ttl < current.ttl_left_ms,
            };
            match (allowed, ttl_ms) {
                (false, _) => (Write::Nothing, Answer::Integer(0)),
                (true, None) => (Write::Delete, Answer::Integer(1)),
                (true, Some(ttl)) => {
                    (Write::Put { value: current.value.to_vec(), ttl_ms: *ttl }, Answer::Integer(1))
                }
            }
        }
        Update::Persist => match current {
            Some(c) if c.ttl_left_ms > 0 => {
                (Write::Put { value: c.value.to_vec(), ttl_ms: 0 }, Answer::Integer(1))
            }
            _ => (Write::Nothing, Answer::Integer(0)),
        },
        Update::GetDelete => match value {
            Some(_) => (Write::Delete, previous()),
            None => (Write::Nothing, Answer::Null),
        },
        Update::DeleteIf(condition) => match value {
            Some(_) if condition.holds(value) => (Write::Delete, Answer::Integer(1)),
            _ => (Write::Nothing, Answer::Integer(0)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current(value: &[u8], ttl_left_ms: u64) -> Option<Current<'_>> {
        Some(Current { value, ttl_left_ms })
    }

    #[test]
    fn counters_and_conditions() {
        let (write, answer) = decide(&Update::IncrementBy(5), current(b"10", 7000));
        assert_eq!(write, Write::Put { value: b"15".to_vec(), ttl_ms: 7000 });
        assert_eq!(answer, Answer::Integer(15));
        assert_eq!(decide(&Update::IncrementBy(1), current(b" 1", 0)).1, Answer::Error(NOT_INTEGER.into()));
        assert!(matches!(
            decide(&Update::IncrementBy(1), current(b"9223372036854775807", 0)).1,
            Answer::Error(_)
        ));
        let set_nx = Update::Set {
            value: b"v".to_vec(),
            ttl_ms: 0,
            keep_ttl: false,
            condition: Some(Condition::Absent),
            answer_previous: false,
        };
        assert_eq!(decide(&set_nx, current(b"x", 0)), (Write::Nothing, Answer::Null));
        assert_eq!(decide(&set_nx, None).1, Answer::Ok);
        assert!(Condition::Differs(b"a".to_vec()).holds(None));
        assert!(!Condition::DigestEquals(digest(b"a")).holds(Some(b"b")));
        let expire_gt = Update::Expire { ttl_ms: Some(10), when: ExpireWhen::Greater };
        assert_eq!(decide(&expire_gt, current(b"v", 0)).1, Answer::Integer(0));
    }
}
