//! The write path at its coordinator (README.md beside this file, "The write path"):
//! forwarding or coordinating (`route`), the local read-modify-write, shipping to the replicas
//! and hinting the rest as `WriteCoordinator` decides.

use std::rc::Rc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use schema::{Op, Status};

use super::{decode_record, encode_bounded, forward, place, route_request, too_few_replicas};
use crate::cluster::coordinator::{Ack, Consistency, WriteCoordinator, WriteVerdict};
use crate::cluster::host::Host;
use crate::cluster::paxos::Acceptor;
use crate::cluster::peer::{PeerError, PeerRequest};
use crate::cluster::record::{encode_versions, value_size, SIBLING_LIMITS};
use crate::cluster::ring::NodeId;
use crate::cluster::versions::{check_growth, VersionVector};
use crate::command::{LocalReply, Reply};
use crate::storage::Storage;

/// Coordinates a write (`value: None` deletes) of a key this shard owns.
#[allow(clippy::too_many_arguments)]
pub async fn coordinate_write<S: Storage, H: Host<S>>(
    shard: &Rc<H>,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    ttl_ms: u64,
    context: Option<VersionVector>,
    consistency: Consistency,
    timeout: Duration,
) -> LocalReply {
    let (cluster, view, replicas, me) = match place(shard, &key) {
        Ok(placed) => placed,
        Err(reply) => return reply,
    };
    match route_request(cluster, &view, &replicas, me, &key) {
        Ok(None) => {}
        Ok(Some(to)) => {
            let context_bytes = context.as_ref().map(VersionVector::encode).unwrap_or_default();
            let op = match &value {
                Some(value) => Op::Put { key: &key, value, ttl_ms },
                None => Op::Delete { key: &key },
            };
            return forward(cluster, &view, to, &key, op, consistency, &context_bytes, timeout).await;
        }
        Err(reply) => return reply,
    }
    let timeout_us = timeout.as_micros() as u64;
    let pending = view.pending_replicas(&key);
    let (mut write, plan) =
        match WriteCoordinator::start(&replicas, &pending, |n| view.is_live(n), consistency, timeout_us) {
            Ok(started) => started,
            Err(too_few) => return too_few_replicas(cluster, replicas.len(), too_few),
        };
    // A counter never used before, then the local read-modify-write with no await between.
    let floor = match cluster.lease.next().await {
        Ok(floor) => floor,
        Err(error) => return Reply::error(Status::INTERNAL, format!("counter lease: {error}")),
    };
    let timestamp_us = shard.store().timestamp_us();
    let expires_at_ms = if ttl_ms == 0 { 0 } else { timestamp_us / 1000 + ttl_ms };
    let size = value.as_ref().map_or(0, Vec::len) + 64;
    let actor = cluster.actor;
    // Replicas get the versions only; the acceptor state is this replica's own.
    let mut shipped = None;
    let mut written_context = Vec::new();
    let updated = shard
        .store()
        .update_raw(&key, size, |current| {
            let mut record = decode_record(current)?;
            let value = value.map(|v| (v, expires_at_ms));
            let before = record.versions.footprint(value_size);
            record.versions.write(actor, floor, context.as_ref(), value, timestamp_us);
            if let Err(full) = check_growth(before, record.versions.footprint(value_size), SIBLING_LIMITS) {
                cluster.stats.siblings_full_count.set(cluster.stats.siblings_full_count.get() + 1);
                return Err(Reply::error(Status::SIBLINGS_FULL, full.to_string()));
            }
            written_context = record.versions.context().encode();
            let stored = encode_bounded(Some(cluster), &record)?;
            shipped = Some(if record.acceptor == Acceptor::default() {
                Rc::<[u8]>::from(stored.0.as_slice())
            } else {
                Rc::from(encode_versions(&record.versions))
            });
            Ok(Some(stored))
        })
        .await;
    let (bytes, seq) = match (updated, shipped) {
        (Ok((Some(_), seq)), Some(bytes)) => (bytes, seq),
        // A coordinator's write always changes the key; answer rather than abort if not.
        (Err(reply), _) => return reply,
        (Ok(_), _) => return Reply::error(Status::INTERNAL, "the write changed nothing"),
    };
    // The acknowledgements, polled in this task rather than in a task each joined by a
    // channel (three spawns and a channel per replicated write).
    let mut acks: FuturesUnordered<LocalBoxFuture<'static, (NodeId, Ack)>> = FuturesUnordered::new();
    {
        let shard = shard.clone();
        acks.push(Box::pin(async move {
            let ack = if shard.store().wait_acked(seq).await.is_ok() { Ack::Durable } else { Ack::Failed };
            (me, ack)
        }));
    }
    for &node in plan.send_to.iter().filter(|&&n| n != me) {
        let Some(address) = view.replica_address(node, &key) else { continue };
        let shard = shard.clone();
        let key = key.clone();
        let bytes = bytes.clone();
        acks.push(Box::pin(async move {
            let op = Op::Replicate { key: &key, versions: &bytes };
            let request = PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout };
            let ack = match shard.cluster() {
                Some(cluster) => match cluster.peers.link(address).call(request).await {
                    Ok(response) if response.status == Status::OK => Ack::Durable,
                    Ok(response) if response.status == Status::OVERLOADED => Ack::Overloaded,
                    Err(PeerError::Overloaded) => Ack::Overloaded,
                    _ => Ack::Failed,
                },
                None => Ack::Failed,
            };
            (node, ack)
        }));
    }
    for &node in &plan.hint_for {
        cluster.add_hint(node, &key, &bytes);
    }
    let deadline = glommio::timer::sleep(timeout);
    futures::pin_mut!(deadline);
    let verdict = loop {
        let next = futures_lite::future::or(async { acks.next().await.map(Some) }, async {
            (&mut deadline).await;
            None
        });
        match next.await {
            Some(Some((node, ack))) => {
                let (hint, _) = write.on_answer(node, ack);
                if hint && node != me {
                    cluster.add_hint(node, &key, &bytes);
                }
            }
            // The deadline passed, or every reply is in and the round is still short.
            Some(None) | None => {
                write.on_deadline();
            }
        }
        if let Some(verdict) = write.verdict() {
            break verdict;
        }
    };
    // The answers still to come are hinted as they fail, in the background.
    if !write.unanswered().is_empty() {
        glommio::spawn_local({
            let shard = shard.clone();
            async move {
                while let Some((node, ack)) = acks.next().await {
                    let (hint, _) = write.on_answer(node, ack);
                    if hint && node != me {
                        if let Some(cluster) = shard.cluster() {
                            cluster.add_hint(node, &key, &bytes);
                        }
                    }
                }
            }
        })
        .detach();
    }
    match verdict {
        WriteVerdict::Acknowledged => Reply::Written(written_context),
        WriteVerdict::Overloaded { replies, required } => Reply::error(
            Status::OVERLOADED,
            format!(
                "{replies} of {required} required replicas acknowledged; replicas or the links to them are \
                 overloaded (retry later; the write may have landed on some)"
            ),
        ),
        WriteVerdict::TimedOut { replies, required } => Reply::error(
            Status::TIMEOUT,
            format!("{replies} of {required} required replicas acknowledged in time; the write may or may not have landed"),
        ),
    }
}
