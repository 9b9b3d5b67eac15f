//! What a cluster node stores for a key, and its codec: the key's versions (values with
//! their expiry) and its Paxos acceptor state in one record, encoded with `schema::peer`;
//! the rules for when the engine may forget a record (`engine_expiry`) and when anti-entropy
//! may drop its Paxos state (`paxos_state_forgettable`); what a client sees of a sibling.

use schema::peer::{decode_key_versions, encode_key_versions, AcceptorData, KeyVersionsData, StoredSibling};

use crate::paxos::{Acceptor, Ballot};
use crate::versions::{Dot, Sibling, SiblingLimits, VersionVector, Versions};

/// A stored value and when it expires (Unix ms, 0: never).
pub type Value = (Vec<u8>, u64);

pub fn versions_from_data(data: KeyVersionsData) -> Versions<Value> {
    let clock = VersionVector::from_entries(data.clock);
    let chosen =
        data.chosen.into_iter().map(|(ballot, actor, counter)| (ballot, Dot { actor, counter })).collect();
    let siblings = data
        .siblings
        .into_iter()
        .map(|s| Sibling {
            dot: Dot { actor: s.actor, counter: s.counter },
            value: s.value.map(|bytes| (bytes, s.expires_at_ms)),
            timestamp_us: s.timestamp_us,
            blind: s.blind,
        })
        .collect();
    let newest_blind =
        data.newest_blind.map(|(timestamp_us, actor, counter)| (timestamp_us, Dot { actor, counter }));
    Versions::from_parts(clock, siblings, chosen, newest_blind)
}

/// The versions as shipped between replicas (no acceptor state).
pub fn versions_to_data(versions: &Versions<Value>) -> KeyVersionsData {
    KeyVersionsData {
        clock: versions.context().entries().collect(),
        siblings: versions
            .siblings()
            .iter()
            .map(|s| StoredSibling {
                actor: s.dot.actor,
                counter: s.dot.counter,
                value: s.value.as_ref().map(|(bytes, _)| bytes.clone()),
                timestamp_us: s.timestamp_us,
                expires_at_ms: s.value.as_ref().map_or(0, |(_, expires)| *expires),
                blind: s.blind,
            })
            .collect(),
        chosen: versions.chosen().iter().map(|&(ballot, dot)| (ballot, dot.actor, dot.counter)).collect(),
        acceptor: AcceptorData::default(),
        newest_blind: versions
            .newest_blind()
            .map(|(timestamp_us, dot)| (timestamp_us, dot.actor, dot.counter)),
    }
}

/// What a cluster node stores for a key: its versions and its Paxos acceptor state, in one
/// record, so that one durable write makes both current.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub versions: Versions<Value>,
    pub acceptor: Acceptor<Value>,
}

pub fn record_from_data(mut data: KeyVersionsData) -> Record {
    let acceptor = std::mem::take(&mut data.acceptor);
    Record {
        versions: versions_from_data(data),
        acceptor: Acceptor {
            promised: acceptor.promised,
            accepted: acceptor.accepted.map(|(ballot, proposal)| (ballot, versions_from_data(*proposal))),
            committed: acceptor.committed,
        },
    }
}

pub fn record_to_data(record: &Record) -> KeyVersionsData {
    let acceptor = &record.acceptor;
    KeyVersionsData {
        acceptor: AcceptorData {
            promised: acceptor.promised,
            accepted: acceptor
                .accepted
                .as_ref()
                .map(|(ballot, proposal)| (*ballot, Box::new(versions_to_data(proposal)))),
            committed: acceptor.committed,
        },
        ..versions_to_data(&record.versions)
    }
}

/// Decodes a stored record (none stored: the empty record).
pub fn decode_record(bytes: Option<&[u8]>) -> Result<Record, String> {
    match bytes {
        None => Ok(Record::default()),
        Some(bytes) => decode_key_versions(bytes).map(record_from_data).map_err(|error| error.to_string()),
    }
}

/// How long a key's Paxos state outlives its last ballot once every sibling has expired:
/// far longer than any round can last, so the engine never forgets a promise a round in
/// flight relies on.
const PAXOS_STATE_KEEP_MS: u64 = 10 * 60 * 1000;

/// When the engine may forget the whole record: once every sibling has expired (never while
/// a tombstone or an unexpiring value is among them, nor while a proposal is accepted and
/// uncommitted), and the Paxos state is old.
pub fn engine_expiry(record: &Record) -> u64 {
    let mut latest = 0;
    for sibling in record.versions.siblings() {
        match &sibling.value {
            Some((_, expires)) if *expires > 0 => latest = latest.max(*expires),
            _ => return 0,
        }
    }
    let acceptor = &record.acceptor;
    if acceptor.accepted.is_some() {
        return 0;
    }
    let last_ballot = acceptor.promised.max(acceptor.committed);
    if last_ballot != Ballot::default() {
        latest = latest.max(last_ballot.time_us / 1000 + PAXOS_STATE_KEEP_MS);
    }
    latest
}

/// Whether the engine may forget the key's Paxos state: nothing accepted and uncommitted, and
/// the last ballot old enough that no round in flight can rely on it.
pub fn paxos_state_forgettable(record: &Record, now_ms: u64) -> bool {
    let acceptor = &record.acceptor;
    let last_ballot = acceptor.promised.max(acceptor.committed);
    acceptor.accepted.is_none()
        && (last_ballot == Ballot::default() || last_ballot.time_us / 1000 + PAXOS_STATE_KEEP_MS <= now_ms)
}

/// Encodes versions to ship (no acceptor state).
pub fn encode_versions(versions: &Versions<Value>) -> Vec<u8> {
    encode_key_versions(&versions_to_data(versions))
}

/// Why a record cannot be stored: it needs more than a stored value holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordTooLarge {
    pub bytes: usize,
    pub siblings: usize,
}

/// Encodes `record` for the engine, with the time the engine may forget it
/// (`engine_expiry`). A record that does not fit in a stored value is refused, never cut:
/// no sibling is ever dropped to fit.
pub fn encode_for_engine(record: &Record) -> Result<(Vec<u8>, u64), RecordTooLarge> {
    let bytes = encode_key_versions(&record_to_data(record));
    let siblings = record.versions.siblings().len();
    let accepted = record.acceptor.accepted.as_ref().map_or(0, |(_, proposal)| proposal.siblings().len());
    if bytes.len() <= schema::STORED_VALUE_SIZE_MAX
        && siblings.max(accepted) <= schema::peer::STORED_SIBLING_COUNT_MAX
    {
        return Ok((bytes, engine_expiry(record)));
    }
    Err(RecordTooLarge { bytes: bytes.len(), siblings })
}

/// The limits a coordinator holds a key's siblings to (`schema`'s, the same on every node).
pub const SIBLING_LIMITS: SiblingLimits =
    SiblingLimits { count_max: schema::SIBLING_COUNT_MAX, value_bytes_max: schema::SIBLING_VALUE_BYTES_MAX };

/// A stored value's bytes, for the sibling limits.
pub fn value_size(value: &Value) -> usize {
    value.0.len()
}

/// A sibling's value and milliseconds left (0: no TTL), unless it is a tombstone or expired.
pub fn live_value(sibling: &Sibling<Value>, now_ms: u64) -> Option<(&[u8], u64)> {
    let (bytes, expires) = sibling.value.as_ref()?;
    match *expires {
        0 => Some((bytes, 0)),
        expires if expires <= now_ms => None,
        expires => Some((bytes, (expires - now_ms).max(1))),
    }
}

/// Which part of a key's siblings a read's reply holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// Timestamps and TTLs only: no value bytes.
    pub metadata_only: bool,
    /// Live siblings (in dot order) to leave out at the front.
    pub sibling_skip: u32,
    /// For a following page: the context the earlier pages gave (it covers what they showed).
    pub shown_before: Option<VersionVector>,
}
