//! Owned operations and their outcomes: what crosses between a connection, a shard's store
//! and, over the channel mesh, another shard.

use std::rc::Rc;

use schema::{Op, Status};

/// An operation on one key, owned so that it can outlive the frame it came in and cross to
/// another shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Get { key: Vec<u8>, metadata_only: bool },
    Put { key: Vec<u8>, value: Vec<u8>, ttl_ms: u64 },
    Delete { key: Vec<u8> },
    Cas { key: Vec<u8>, expected: Option<Vec<u8>>, new_value: Vec<u8>, ttl_ms: u64 },
}

impl Command {
    /// `None` for operations that address no key (Hello).
    pub fn from_op(op: &Op<'_>) -> Option<Command> {
        Some(match *op {
            Op::Hello { .. } | Op::Stats => return None,
            Op::Get { key, metadata_only } => Command::Get { key: key.to_vec(), metadata_only },
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
            | Command::Cas { key, .. } => key,
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
    Found(Version<V>),
    NotFound,
    /// The CAS did not match; the current version, if any.
    CasFailed(Option<Version<V>>),
    Error {
        status: Status,
        message: String,
    },
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
            Reply::Found(version) => Reply::Found(map_version(version)),
            Reply::NotFound => Reply::NotFound,
            Reply::CasFailed(version) => Reply::CasFailed(version.map(map_version)),
            Reply::Error { status, message } => Reply::Error { status, message },
        }
    }
}
