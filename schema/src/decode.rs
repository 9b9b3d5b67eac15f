//! Decoding of untrusted bytes: frame splitting, FlatBuffers verification and limit checks.
//! Nothing outside this file reads a wire buffer, so every check lives here once.
#![deny(clippy::indexing_slicing)]

use std::fmt;

use crate::wire;
use crate::{
    Consistency, HelloInfo, ShardFunction, Status, FRAME_HEADER_SIZE, FRAME_SIZE_MAX, KEY_SIZE_MAX,
    PEER_FRAME_SIZE_MAX, SIBLING_COUNT_MAX, VALUE_SIZE_MAX, WRITE_ID_SIZE,
};

/// The longest TTL accepted: 100 years, so that `now + ttl` never overflows.
pub const TTL_MS_MAX: u64 = 100 * 365 * 24 * 3600 * 1000;

/// A frame that cannot be delimited; the connection cannot go on after it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    TooLarge { size: usize, size_max: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { size, size_max } => {
                write!(f, "frame of {size} bytes exceeds the limit of {size_max} bytes")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Splits the first frame off `buf`. `Ok(None)`: more bytes are needed. `Ok(Some(payload))`:
/// the frame occupies `FRAME_HEADER_SIZE + payload.len()` bytes at the front of `buf`.
/// The size is checked before the caller buffers the payload, so a 4 GiB prefix costs nothing.
/// Frames are client frames, at most `FRAME_SIZE_MAX`.
pub fn split_frame(buf: &[u8]) -> Result<Option<&[u8]>, FrameError> {
    split_frame_within(buf, FRAME_SIZE_MAX)
}

/// `split_frame` for a node, which also reads node-to-node frames (`PEER_FRAME_SIZE_MAX`).
pub fn split_peer_frame(buf: &[u8]) -> Result<Option<&[u8]>, FrameError> {
    split_frame_within(buf, PEER_FRAME_SIZE_MAX)
}

fn split_frame_within(buf: &[u8], size_max: usize) -> Result<Option<&[u8]>, FrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_SIZE) else {
        return Ok(None);
    };
    let mut size_bytes = [0u8; FRAME_HEADER_SIZE];
    size_bytes.copy_from_slice(header);
    let size = u32::from_le_bytes(size_bytes) as usize;
    if size > size_max {
        return Err(FrameError::TooLarge { size, size_max });
    }
    Ok(buf.get(FRAME_HEADER_SIZE..FRAME_HEADER_SIZE + size))
}

/// A request that was delimited but cannot be served: the reply carries `status` and, when
/// the buffer verified far enough to read it, the request's `id` (else 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub id: u64,
    pub status: Status,
    pub message: String,
}

impl ParseError {
    fn new(id: u64, status: Status, message: impl Into<String>) -> ParseError {
        ParseError { id, status, message: message.into() }
    }
}

/// One operation, borrowed from a verified frame (or built by a client to encode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    Hello {
        protocol_version: u32,
        client_name: &'a str,
    },
    /// The receiving shard's counters and storage figures.
    Stats,
    Put {
        key: &'a [u8],
        value: &'a [u8],
        ttl_ms: u64,
    },
    Get {
        key: &'a [u8],
        metadata_only: bool,
        /// Siblings to leave out at the front of the reply (a following page).
        sibling_skip: u32,
    },
    Delete {
        key: &'a [u8],
    },
    /// The cluster's membership and ring.
    Topology,
    /// A consistent snapshot of the node into a directory.
    Snapshot {
        dir: &'a str,
    },
    /// Node to node: merge a key's versions (verified nested `KeyVersions` bytes).
    Replicate {
        key: &'a [u8],
        versions: &'a [u8],
    },
    /// Node to node: a replica's versions of a key.
    ReadReplica {
        key: &'a [u8],
    },
    /// Node to node: one gossip message (verified nested `GossipMessage` bytes).
    Gossip {
        message: &'a [u8],
    },
    /// Node to node: one message of a key's Paxos. `proposal`: verified nested
    /// `KeyVersions` bytes (empty for PREPARE).
    Paxos {
        key: &'a [u8],
        phase: crate::wire::PaxosPhase,
        ballot: crate::peer::Ballot,
        proposal: &'a [u8],
        /// The ring version that placed the proposer (0: not stated).
        ring_version: u64,
    },
    /// Node to node: one step of anti-entropy for a partition (`leaves`: a bit per leaf of
    /// its Merkle tree; 0 asks for the tree).
    AntiEntropy {
        partition: u32,
        partition_bits: u8,
        shard_count: u16,
        shard_index: u16,
        leaves: u64,
    },
    /// An anti-entropy round over the node's partitions, now.
    Repair,
    /// Node to node: one message of the ring's Paxos (`state`: JSON, may be empty).
    RingChange {
        phase: crate::wire::RingPhase,
        version: u64,
        ballot: crate::peer::Ballot,
        state: &'a str,
    },
    /// Node to node: copy a partition from `sources` (node names, comma-separated).
    Transfer {
        partition: u32,
        sources: &'a str,
    },
    /// Operator: decommission or remove a node.
    ChangeMembership {
        action: crate::wire::MembershipAction,
        node: &'a str,
    },
    /// `expected: None` means "the key must be absent".
    Cas {
        key: &'a [u8],
        expected: Option<&'a [u8]>,
        new_value: &'a [u8],
        ttl_ms: u64,
    },
}

impl<'a> Op<'a> {
    /// The key the operation addresses; `None` for Hello and Stats.
    pub fn key(&self) -> Option<&'a [u8]> {
        match *self {
            Op::Hello { .. }
            | Op::Stats
            | Op::Topology
            | Op::Gossip { .. }
            | Op::Snapshot { .. }
            | Op::AntiEntropy { .. }
            | Op::Repair
            | Op::RingChange { .. }
            | Op::Transfer { .. }
            | Op::ChangeMembership { .. } => None,
            Op::Put { key, .. }
            | Op::Get { key, .. }
            | Op::Delete { key }
            | Op::Cas { key, .. }
            | Op::Replicate { key, .. }
            | Op::ReadReplica { key }
            | Op::Paxos { key, .. } => Some(key),
        }
    }
}

/// A verified request whose every limit has been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestView<'a> {
    pub id: u64,
    pub timeout_ms: u32,
    pub consistency: Consistency,
    pub context: &'a [u8],
    pub write_id: Option<&'a [u8]>,
    pub op: Op<'a>,
}

pub(crate) fn verifier_options() -> flatbuffers::VerifierOptions {
    flatbuffers::VerifierOptions {
        max_depth: 8,
        max_tables: 4 * SIBLING_COUNT_MAX + 64,
        max_apparent_size: 2 * PEER_FRAME_SIZE_MAX,
        ignore_missing_null_terminator: false,
    }
}

/// Verifies a request payload and checks every limit.
pub fn parse_request(payload: &[u8]) -> Result<RequestView<'_>, ParseError> {
    match crate::fast::parse_request(payload) {
        Some(request) => Ok(request),
        None => parse_request_general(payload),
    }
}

/// [`parse_request`] through the FlatBuffers verifier alone, for every shape (public for
/// the fuzz target that holds the fast path to it).
#[doc(hidden)]
pub fn parse_request_general(payload: &[u8]) -> Result<RequestView<'_>, ParseError> {
    let request = flatbuffers::root_with_opts::<wire::Request>(&verifier_options(), payload)
        .map_err(|error| ParseError::new(0, Status::BAD_REQUEST, format!("invalid frame: {error}")))?;
    let id = request.id();
    let bad = |message: String| ParseError::new(id, Status::BAD_REQUEST, message);

    let consistency = request.consistency();
    if consistency.variant_name().is_none() {
        return Err(bad(format!("unknown consistency level {}", consistency.0)));
    }
    let write_id = request.write_id().map(|v| v.bytes());
    if let Some(write_id) = write_id {
        if write_id.len() != WRITE_ID_SIZE {
            return Err(bad(format!("write id must be {WRITE_ID_SIZE} bytes, got {}", write_id.len())));
        }
    }
    let op = match request.op_type() {
        wire::Operation::Hello => {
            let hello = request.op_as_hello().ok_or_else(|| bad("Hello without a body".into()))?;
            Op::Hello {
                protocol_version: hello.protocol_version(),
                client_name: hello.client_name().unwrap_or(""),
            }
        }
        wire::Operation::Stats => Op::Stats,
        wire::Operation::Put => {
            let put = request.op_as_put().ok_or_else(|| bad("Put without a body".into()))?;
            let ttl_ms = check_ttl(id, put.ttl_ms())?;
            Op::Put { key: check_key(id, put.key())?, value: check_value(id, put.value())?, ttl_ms }
        }
        wire::Operation::Get => {
            let get = request.op_as_get().ok_or_else(|| bad("Get without a body".into()))?;
            Op::Get {
                key: check_key(id, get.key())?,
                metadata_only: get.metadata_only(),
                sibling_skip: get.sibling_skip(),
            }
        }
        wire::Operation::Delete => {
            let delete = request.op_as_delete().ok_or_else(|| bad("Delete without a body".into()))?;
            Op::Delete { key: check_key(id, delete.key())? }
        }
        wire::Operation::Cas => {
            let cas = request.op_as_cas().ok_or_else(|| bad("Cas without a body".into()))?;
            let expected = if cas.expect_absent() {
                if cas.expected().is_some() {
                    return Err(bad("Cas sets both expect_absent and expected".into()));
                }
                None
            } else {
                Some(check_value(id, cas.expected())?)
            };
            Op::Cas {
                key: check_key(id, cas.key())?,
                expected,
                new_value: check_value(id, cas.new_value())?,
                ttl_ms: check_ttl(id, cas.ttl_ms())?,
            }
        }
        wire::Operation::Topology => Op::Topology,
        wire::Operation::Snapshot => {
            let snapshot = request.op_as_snapshot().ok_or_else(|| bad("Snapshot without a body".into()))?;
            Op::Snapshot { dir: snapshot.dir().unwrap_or("") }
        }
        wire::Operation::Replicate => {
            let replicate =
                request.op_as_replicate().ok_or_else(|| bad("Replicate without a body".into()))?;
            let versions = replicate.versions().map(|v| v.bytes()).unwrap_or(&[]);
            crate::peer::decode_key_versions(versions).map_err(bad)?;
            Op::Replicate { key: check_key(id, replicate.key())?, versions }
        }
        wire::Operation::ReadReplica => {
            let read =
                request.op_as_read_replica().ok_or_else(|| bad("ReadReplica without a body".into()))?;
            Op::ReadReplica { key: check_key(id, read.key())? }
        }
        wire::Operation::Paxos => {
            let paxos = request.op_as_paxos().ok_or_else(|| bad("Paxos without a body".into()))?;
            let phase = paxos.phase();
            if phase.variant_name().is_none() {
                return Err(bad(format!("unknown Paxos phase {}", phase.0)));
            }
            let ballot = paxos.ballot().map(crate::peer::Ballot::from_wire).unwrap_or_default();
            let proposal = paxos.proposal().map(|v| v.bytes()).unwrap_or(&[]);
            if matches!(phase, wire::PaxosPhase::PROPOSE | wire::PaxosPhase::COMMIT) {
                let decoded = crate::peer::decode_key_versions(proposal).map_err(bad)?;
                if decoded.acceptor != crate::peer::AcceptorData::default() {
                    return Err(bad("a Paxos proposal carries no acceptor state".into()));
                }
            }
            Op::Paxos {
                key: check_key(id, paxos.key())?,
                phase,
                ballot,
                proposal,
                ring_version: paxos.ring_version(),
            }
        }
        wire::Operation::AntiEntropy => {
            let ae = request.op_as_anti_entropy().ok_or_else(|| bad("AntiEntropy without a body".into()))?;
            let partition_bits = ae.partition_bits();
            if partition_bits == 0
                || partition_bits > crate::peer::PARTITION_BITS_MAX
                || u64::from(ae.partition()) >= 1 << partition_bits
                || ae.shard_count() == 0
                || ae.shard_index() >= ae.shard_count()
            {
                return Err(bad("AntiEntropy names no partition or shard".into()));
            }
            Op::AntiEntropy {
                partition: ae.partition(),
                partition_bits,
                shard_count: ae.shard_count(),
                shard_index: ae.shard_index(),
                leaves: ae.leaves(),
            }
        }
        wire::Operation::Repair => Op::Repair,
        wire::Operation::RingChange => {
            let ring = request.op_as_ring_change().ok_or_else(|| bad("RingChange without a body".into()))?;
            if ring.phase().variant_name().is_none() {
                return Err(bad(format!("unknown ring phase {}", ring.phase().0)));
            }
            Op::RingChange {
                phase: ring.phase(),
                version: ring.version(),
                ballot: ring.ballot().map(crate::peer::Ballot::from_wire).unwrap_or_default(),
                state: ring.state().unwrap_or(""),
            }
        }
        wire::Operation::Transfer => {
            let transfer = request.op_as_transfer().ok_or_else(|| bad("Transfer without a body".into()))?;
            let sources = transfer.sources().unwrap_or("");
            if sources.is_empty() {
                return Err(bad("Transfer names no source".into()));
            }
            Op::Transfer { partition: transfer.partition(), sources }
        }
        wire::Operation::ChangeMembership => {
            let change = request
                .op_as_change_membership()
                .ok_or_else(|| bad("ChangeMembership without a body".into()))?;
            if change.action().variant_name().is_none() {
                return Err(bad(format!("unknown membership action {}", change.action().0)));
            }
            Op::ChangeMembership { action: change.action(), node: change.node().unwrap_or("") }
        }
        wire::Operation::Gossip => {
            let gossip = request.op_as_gossip().ok_or_else(|| bad("Gossip without a body".into()))?;
            Op::Gossip { message: gossip.message().map(|v| v.bytes()).unwrap_or(&[]) }
        }
        other => return Err(bad(format!("unknown operation {}", other.0))),
    };
    Ok(RequestView {
        id,
        timeout_ms: request.timeout_ms(),
        consistency,
        context: request.context().map(|v| v.bytes()).unwrap_or(&[]),
        write_id,
        op,
    })
}

fn check_key<'a>(id: u64, key: Option<flatbuffers::Vector<'a, u8>>) -> Result<&'a [u8], ParseError> {
    let key = key.map(|k| k.bytes()).unwrap_or(&[]);
    if key.is_empty() {
        return Err(ParseError::new(id, Status::KEY_EMPTY, "key is empty"));
    }
    if key.len() > KEY_SIZE_MAX {
        let message = format!("key of {} bytes exceeds the limit of {KEY_SIZE_MAX} bytes", key.len());
        return Err(ParseError::new(id, Status::KEY_TOO_LARGE, message));
    }
    Ok(key)
}

fn check_value<'a>(id: u64, value: Option<flatbuffers::Vector<'a, u8>>) -> Result<&'a [u8], ParseError> {
    let value = value.map(|v| v.bytes()).unwrap_or(&[]);
    if value.len() > VALUE_SIZE_MAX {
        let message = format!("value of {} bytes exceeds the limit of {VALUE_SIZE_MAX} bytes", value.len());
        return Err(ParseError::new(id, Status::VALUE_TOO_LARGE, message));
    }
    Ok(value)
}

fn check_ttl(id: u64, ttl_ms: u64) -> Result<u64, ParseError> {
    if ttl_ms > TTL_MS_MAX {
        let message = format!("ttl of {ttl_ms} ms exceeds the limit of {TTL_MS_MAX} ms");
        return Err(ParseError::new(id, Status::BAD_REQUEST, message));
    }
    Ok(ttl_ms)
}

/// One version of a value, copied out of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiblingView {
    pub value: Vec<u8>,
    pub timestamp_us: u64,
    pub ttl_left_ms: u64,
}

/// A verified response, copied out of its frame (the client keeps it past the buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseView {
    pub id: u64,
    pub status: Status,
    pub message: String,
    pub siblings: Vec<SiblingView>,
    pub context: Vec<u8>,
    pub hello: Option<HelloInfo>,
    pub stats_json: Option<String>,
    /// Nested `KeyVersions` bytes (reply to ReadReplica); empty when absent.
    pub versions: Vec<u8>,
    pub topology: Option<crate::peer::TopologyData>,
    /// The reply to AntiEntropy.
    pub merkle: Option<crate::peer::MerkleData>,
    /// The reply to RingChange (JSON).
    pub ring: Option<String>,
    /// Siblings of the key left out of this reply (read them with `Get.sibling_skip`).
    pub siblings_omitted: u32,
}

/// Verifies a response payload (clients distrust servers too).
pub fn parse_response(payload: &[u8]) -> Result<ResponseView, String> {
    match crate::fast::parse_response(payload) {
        Some(response) => Ok(response),
        None => parse_response_general(payload),
    }
}

/// [`parse_response`] through the FlatBuffers verifier alone, for every shape.
#[doc(hidden)]
pub fn parse_response_general(payload: &[u8]) -> Result<ResponseView, String> {
    let response = flatbuffers::root_with_opts::<wire::Response>(&verifier_options(), payload)
        .map_err(|error| format!("invalid response frame: {error}"))?;
    let siblings = response.siblings();
    if siblings.map_or(0, |s| s.len()) > SIBLING_COUNT_MAX {
        return Err(format!("response holds more than {SIBLING_COUNT_MAX} siblings"));
    }
    let siblings = siblings
        .iter()
        .flatten()
        .map(|sibling| SiblingView {
            value: sibling.value().map(|v| v.bytes().to_vec()).unwrap_or_default(),
            timestamp_us: sibling.timestamp_us(),
            ttl_left_ms: sibling.ttl_left_ms(),
        })
        .collect();
    let hello = response.hello().map(|hello| HelloInfo {
        protocol_version: hello.protocol_version(),
        node_id: hello.node_id().unwrap_or("").to_string(),
        shard_count: hello.shard_count(),
        shard_function: hello.shard_function(),
        shard_hash_seed: hello.shard_hash_seed(),
        client_port: hello.client_port(),
        shard_ports: hello.shard_ports().iter().flatten().map(|port| (port.shard(), port.port())).collect(),
    });
    if let Some(hello) = &hello {
        if hello.shard_function != ShardFunction::XXH3_64_MULSHIFT {
            return Err(format!("unknown shard function {}", hello.shard_function.0));
        }
    }
    Ok(ResponseView {
        id: response.id(),
        status: response.status(),
        message: response.message().unwrap_or("").to_string(),
        siblings,
        context: response.context().map(|v| v.bytes().to_vec()).unwrap_or_default(),
        hello,
        stats_json: response.stats_json().map(str::to_string),
        versions: response.versions().map(|v| v.bytes().to_vec()).unwrap_or_default(),
        topology: response.topology().map(|t| crate::peer::decode_topology(t.bytes())).transpose()?,
        merkle: response.merkle().map(|m| crate::peer::decode_merkle(m.bytes())).transpose()?,
        ring: response.ring().map(str::to_string),
        siblings_omitted: response.siblings_omitted(),
    })
}
