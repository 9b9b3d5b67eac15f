//! Owned operations and their outcomes: what crosses between a connection, a shard's store
//! and, over the channel mesh, another shard.

use std::rc::Rc;

use schema::{Op, Status};

use ::cluster::coordinator::Consistency;
use ::cluster::versions::VersionVector;

/// An operation on one key, owned so that it can outlive the frame it came in and cross to
/// another shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Get {
        key: Vec<u8>,
        metadata_only: bool,
    },
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        ttl_ms: u64,
    },
    Delete {
        key: Vec<u8>,
    },
    Cas {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new_value: Vec<u8>,
        ttl_ms: u64,
    },
    /// An atomic read-modify-write of one key (RESP's conditional and counter commands).
    Update {
        key: Vec<u8>,
        update: ::cluster::update::Update,
    },
    /// Cluster: coordinate a write to the key's replicas; `value: None` deletes (a tombstone).
    /// `context: None` is a blind (last-writer-wins) write.
    Write {
        key: Vec<u8>,
        value: Option<Vec<u8>>,
        ttl_ms: u64,
        context: Option<VersionVector>,
        consistency: Consistency,
        timeout_ms: u64,
    },
    /// Cluster: coordinate a read from the key's replicas.
    Read {
        key: Vec<u8>,
        metadata_only: bool,
        /// Live siblings to leave out at the front of the reply (a following page).
        sibling_skip: u32,
        /// A following page: the context the earlier pages' replies gave, which covers the
        /// siblings they showed.
        shown_before: Option<VersionVector>,
        consistency: Consistency,
        timeout_ms: u64,
    },
    /// Cluster: a linearizable operation through the key's Paxos (CAS, an atomic update, a
    /// SERIAL read); `commit` is how many replicas must hold a write before the answer.
    Serial {
        key: Vec<u8>,
        op: ::cluster::serial_op::SerialOp,
        commit: Consistency,
        timeout_ms: u64,
    },
    /// Cluster, node to node: one Paxos message for a key (`proposal`: encoded versions).
    Paxos {
        key: Vec<u8>,
        phase: schema::wire::PaxosPhase,
        ballot: ::cluster::paxos::Ballot,
        proposal: Vec<u8>,
        /// The ring version that placed the proposer (0: not stated).
        ring_version: u64,
    },
    /// Cluster, node to node: merge encoded versions into this replica's.
    Replicate {
        key: Vec<u8>,
        versions: Vec<u8>,
    },
    /// Cluster, node to node: this replica's encoded versions.
    ReadReplica {
        key: Vec<u8>,
    },
    /// The receiving shard's entry count estimate (RESP's DBSIZE sums every shard's). Sent
    /// to a shard by index, never routed by key.
    EntryCount,
    /// The receiving shard's stats object (a metrics scrape gathers every shard's). Sent to
    /// a shard by index.
    ShardStats,
    /// Cluster: an anti-entropy pass of the receiving shard, now; replies with its report as
    /// JSON (`Reply::Stats`). By index.
    RepairShard,
    /// Cluster: copy `partition` from `sources` (node names) onto the receiving shard;
    /// replies `{"keys", "bytes"}` as JSON (`Reply::Stats`). By index.
    TransferShard {
        partition: usize,
        sources: Vec<String>,
    },
    /// Snapshot the receiving shard into `dir` (its own subdirectory is made). By index.
    SnapshotShard {
        dir: std::path::PathBuf,
    },
}

impl Command {
    /// The operation of a standalone node; `None` for operations that address no key or that
    /// only a cluster serves.
    pub fn from_op(op: &Op<'_>) -> Option<Command> {
        Some(match *op {
            Op::Hello { .. }
            | Op::Stats
            | Op::Topology
            | Op::Gossip { .. }
            | Op::Replicate { .. }
            | Op::ReadReplica { .. }
            | Op::Paxos { .. }
            | Op::AntiEntropy { .. }
            | Op::Repair
            | Op::RingChange { .. }
            | Op::Transfer { .. }
            | Op::ChangeMembership { .. }
            | Op::Snapshot { .. } => return None,
            Op::Get { key, metadata_only, .. } => Command::Get { key: key.to_vec(), metadata_only },
            Op::Put { key, value, ttl_ms } => {
                Command::Put { key: key.to_vec(), value: value.to_vec(), ttl_ms }
            }
            Op::Delete { key } => Command::Delete { key: key.to_vec() },
            Op::Cas { key, expected, new_value, ttl_ms } => Command::Cas {
                key: key.to_vec(),
                expected: expected.map(<[u8]>::to_vec),
                new_value: new_value.to_vec(),
                ttl_ms,
            },
        })
    }

    pub fn key(&self) -> &[u8] {
        match self {
            Command::Get { key, .. }
            | Command::Put { key, .. }
            | Command::Delete { key }
            | Command::Cas { key, .. }
            | Command::Update { key, .. }
            | Command::Write { key, .. }
            | Command::Read { key, .. }
            | Command::Serial { key, .. }
            | Command::Paxos { key, .. }
            | Command::Replicate { key, .. }
            | Command::ReadReplica { key } => key,
            Command::EntryCount
            | Command::ShardStats
            | Command::RepairShard
            | Command::TransferShard { .. }
            | Command::SnapshotShard { .. } => &[],
        }
    }
}

/// One stored version as a reply carries it. `V` is `Rc<[u8]>` inside a shard (no copy of
/// the stored value) and `Vec<u8>` across the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version<V> {
    /// `None` when the request asked for metadata only.
    pub value: Option<V>,
    pub timestamp_us: u64,
    pub ttl_left_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<V> {
    /// A PUT, DELETE or successful CAS is durable under the sync policy.
    Done,
    /// Cluster: as `Done`, with the key's causal context after the write (the context a
    /// following write may carry to supersede it).
    Written(Vec<u8>),
    Found(Version<V>),
    NotFound,
    /// The CAS did not match; the current version, if any.
    CasFailed(Option<Version<V>>),
    Error {
        status: Status,
        message: String,
    },
    /// Cluster read: the live siblings that fit in one reply (none: NOT_FOUND), how many
    /// more there are (`omitted`, after these), and a causal context that covers no sibling
    /// left out.
    Siblings {
        versions: Vec<Version<V>>,
        context: Vec<u8>,
        omitted: u32,
    },
    /// Node to node: a replica's encoded versions (empty: it holds none).
    Versions(Vec<u8>),
    /// The outcome of an `Update`.
    Updated(::cluster::update::Answer<V>),
    /// A shard's stats object, as JSON text.
    Stats(String),
}

pub type LocalReply = Reply<Rc<[u8]>>;
pub type RemoteReply = Reply<Vec<u8>>;

impl<V> Reply<V> {
    pub fn error(status: Status, message: impl Into<String>) -> Reply<V> {
        Reply::Error { status, message: message.into() }
    }

    pub fn map_value<W>(self, f: impl Fn(V) -> W) -> Reply<W> {
        let map_version = |v: Version<V>| Version {
            value: v.value.map(&f),
            timestamp_us: v.timestamp_us,
            ttl_left_ms: v.ttl_left_ms,
        };
        match self {
            Reply::Done => Reply::Done,
            Reply::Written(context) => Reply::Written(context),
            Reply::Found(version) => Reply::Found(map_version(version)),
            Reply::NotFound => Reply::NotFound,
            Reply::CasFailed(version) => Reply::CasFailed(version.map(map_version)),
            Reply::Error { status, message } => Reply::Error { status, message },
            Reply::Siblings { versions, context, omitted } => Reply::Siblings {
                versions: versions.into_iter().map(map_version).collect(),
                context,
                omitted,
            },
            Reply::Versions(bytes) => Reply::Versions(bytes),
            Reply::Updated(answer) => Reply::Updated(answer.map_value(&f)),
            Reply::Stats(text) => Reply::Stats(text),
        }
    }
}
