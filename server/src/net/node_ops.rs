//! Whole-node and whole-partition operations a connection hands to the node rather than to
//! a key's shard: snapshots, repair, transfers, membership and ring messages, anti-entropy.
//! Each is answered whenever it is done, however long that takes.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use schema::{Op, Status};

use super::body::Body;
use crate::shard::Shard;
use crate::storage::Storage;

/// The work for `op` when it is a node operation (`None`: a key's command).
pub(super) fn node_operation<S: Storage>(
    shard: &Rc<Shard<S>>,
    op: Op<'_>,
) -> Option<Pin<Box<dyn Future<Output = Body>>>> {
    match op {
        Op::Snapshot { dir } => {
            let dir = std::path::PathBuf::from(dir);
            let shard = shard.clone();
            Some(Box::pin(async move {
                match shard.snapshot_node(&dir).await {
                    Ok(()) => Body::Status(Status::OK, String::new()),
                    Err(message) => Body::Status(Status::INTERNAL, message),
                }
            }))
        }
        Op::Repair => {
            let shard = shard.clone();
            Some(Box::pin(async move {
                match shard.repair_node().await {
                    Ok(report) => Body::Stats(serde_json::to_string(&report).unwrap_or_default()),
                    Err(message) => Body::Status(Status::UNSUPPORTED, message),
                }
            }))
        }
        Op::Transfer { partition, sources } => {
            let shard = shard.clone();
            let sources: Vec<String> =
                sources.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
            Some(Box::pin(async move {
                match shard.transfer_node(partition as usize, sources).await {
                    Ok((keys, bytes)) => {
                        Body::Stats(serde_json::json!({"keys": keys, "bytes": bytes}).to_string())
                    }
                    Err(message) => Body::Status(Status::UNAVAILABLE, message),
                }
            }))
        }
        Op::RingChange { phase, version, ballot, state } => {
            let membership = shard.cluster().and_then(|c| c.membership.borrow().clone());
            let state = state.to_string();
            Some(Box::pin(async move {
                let Some(membership) = membership else {
                    return Body::Status(
                        Status::BAD_REQUEST,
                        "ring messages go to shard 0's own port".into(),
                    );
                };
                // Answered once any change it made to the acceptor is durable.
                let ballot = (ballot.time_us, ballot.actor, ballot.counter);
                match membership.receive_ring(phase, version, ballot, &state).await {
                    Ok(answer) => Body::Ring(answer),
                    Err(error) => Body::Status(Status::UNAVAILABLE, error),
                }
            }))
        }
        Op::ChangeMembership { action, node } => {
            let membership = shard.cluster().and_then(|c| c.membership.borrow().clone());
            let node = node.to_string();
            Some(Box::pin(async move {
                let Some(membership) = membership else {
                    return Body::Status(
                        Status::UNSUPPORTED,
                        "membership changes go to shard 0's port of a cluster node".into(),
                    );
                };
                match membership.change(action, &node).await {
                    Ok(report) => Body::Stats(serde_json::to_string(&report).unwrap_or_default()),
                    Err(message) => Body::Status(Status::UNAVAILABLE, message),
                }
            }))
        }
        Op::AntiEntropy { partition, partition_bits, shard_count, shard_index, leaves } => {
            let shard = shard.clone();
            Some(Box::pin(async move {
                if shard.cluster().is_none() {
                    return Body::Status(Status::UNSUPPORTED, "this node is not part of a cluster".into());
                }
                let served = crate::cluster::anti_entropy::serve(
                    &shard,
                    partition,
                    partition_bits,
                    shard_count,
                    shard_index,
                    leaves,
                );
                match served.await {
                    Ok(bytes) => Body::Merkle(bytes),
                    Err(message) => Body::Status(Status::INTERNAL, message),
                }
            }))
        }
        _ => None,
    }
}
