//! What a cluster node runs for a request: the `Command` its operation maps to (consistency,
//! context, deadline and SERIAL routing applied), or the reply when there is nothing to run.

use std::time::Duration;

use schema::peer::encode_topology;
use schema::{Op, RequestView, Status, PROTOCOL_VERSION};

use super::body::Body;
use crate::cluster::coordinator::Consistency;
use crate::cluster::replication::ClusterShard;
use crate::cluster::serial::SerialOp;
use crate::cluster::versions::VersionVector;
use crate::command::Command;
use crate::shard::Shard;
use crate::storage::Storage;

/// A cluster node's command for a request, or the reply when there is nothing to run.
pub(super) fn cluster_command<S: Storage>(
    shard: &Shard<S>,
    cluster: &ClusterShard<S>,
    request: &RequestView<'_>,
    timeout: Duration,
) -> Result<Command, Body> {
    let serial = request.consistency == schema::Consistency::SERIAL;
    let consistency = match request.consistency {
        schema::Consistency::ONE => Consistency::One,
        schema::Consistency::ALL => Consistency::All,
        // SERIAL writes wait for a quorum of commits, as QUORUM does.
        _ => Consistency::Quorum,
    };

    let context = match request.context {
        [] => None,
        bytes => Some(
            VersionVector::decode(bytes)
                .ok_or_else(|| Body::Status(Status::BAD_REQUEST, "malformed causal context".into()))?,
        ),
    };
    // The coordinator gives up a little before the connection's own timer, so that the
    // client hears the coordinator's account (how many replicas answered) rather than a bare
    // timeout.
    let timeout_ms = (timeout.as_millis() as u64 * 9 / 10).max(1);
    Ok(match request.op {
        Op::Hello { protocol_version: 0, .. } => {
            return Err(Body::Status(
                Status::UNSUPPORTED_VERSION,
                format!("protocol version 0; this node speaks {PROTOCOL_VERSION}"),
            ))
        }
        Op::Hello { .. } => return Err(Body::Hello),
        Op::Stats => return Err(Body::Stats(shard.stats_json())),
        Op::Snapshot { .. }
        | Op::RingChange { .. }
        | Op::Repair
        | Op::AntiEntropy { .. }
        | Op::Transfer { .. }
        | Op::ChangeMembership { .. } => {
            return Err(Body::Status(Status::INTERNAL, "node operations are handled before".into()))
        }
        Op::Topology => {
            let view = match cluster.membership.borrow().as_ref() {
                Some(membership) => membership.view_with_load(),
                None => (*cluster.view()).clone(),
            };
            return Err(Body::Topology(encode_topology(&view.topology())));
        }
        Op::Gossip { message } => {
            let body = match cluster.membership.borrow().as_ref() {
                Some(membership) => match membership.receive(message) {
                    Ok(()) => Body::Status(Status::OK, String::new()),
                    Err(error) => Body::Status(Status::BAD_REQUEST, error),
                },
                None => Body::Status(Status::BAD_REQUEST, "gossip goes to shard 0's own port".into()),
            };
            return Err(body);
        }
        Op::Put { key, value, ttl_ms } if serial => Command::Serial {
            key: key.to_vec(),
            op: SerialOp::Write { value: Some(value.to_vec()), ttl_ms },
            commit: consistency,
            timeout_ms,
        },
        Op::Delete { key } if serial => Command::Serial {
            key: key.to_vec(),
            op: SerialOp::Write { value: None, ttl_ms: 0 },
            commit: consistency,
            timeout_ms,
        },
        Op::Put { key, value, ttl_ms } => Command::Write {
            key: key.to_vec(),
            value: Some(value.to_vec()),
            ttl_ms,
            context,
            consistency,
            timeout_ms,
        },
        Op::Delete { key } => {
            Command::Write { key: key.to_vec(), value: None, ttl_ms: 0, context, consistency, timeout_ms }
        }
        Op::Get { key, metadata_only, sibling_skip } if serial => Command::Serial {
            key: key.to_vec(),
            op: SerialOp::Read { metadata_only, sibling_skip, shown_before: context },
            commit: consistency,
            timeout_ms,
        },
        Op::Get { key, metadata_only, sibling_skip } => Command::Read {
            key: key.to_vec(),
            metadata_only,
            sibling_skip,
            shown_before: context,
            consistency,
            timeout_ms,
        },
        Op::Cas { key, expected, new_value, ttl_ms } => Command::Serial {
            key: key.to_vec(),
            op: SerialOp::Cas {
                expected: expected.map(<[u8]>::to_vec),
                new_value: new_value.to_vec(),
                ttl_ms,
                context: context.clone(),
            },
            commit: consistency,
            timeout_ms,
        },
        Op::Paxos { key, phase, ballot, proposal, ring_version } => {
            Command::Paxos { key: key.to_vec(), phase, ballot, proposal: proposal.to_vec(), ring_version }
        }
        Op::Replicate { key, versions } => {
            Command::Replicate { key: key.to_vec(), versions: versions.to_vec() }
        }
        Op::ReadReplica { key } => Command::ReadReplica { key: key.to_vec() },
    })
}
