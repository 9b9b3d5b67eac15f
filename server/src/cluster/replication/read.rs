//! The read path at its coordinator: R replies merged (`ReadRound`), the page a client sees
//! (`client_reply`), and read repair of the replicas that answered stale.

use std::rc::Rc;
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use schema::peer::decode_key_versions;
use schema::{Op, Status};

use super::{cluster_link_call, decode_stored, forward, merge_local, place, route_request, too_few_replicas};
use crate::clock::now_ms;
use crate::cluster::coordinator::{Consistency, Outcome, ReadRound};
use crate::cluster::host::Host;
use crate::cluster::peer::PeerRequest;
use crate::cluster::record::Page;
use crate::cluster::record::{encode_versions, live_value, versions_from_data, Value};
use crate::cluster::ring::NodeId;
use crate::cluster::versions::{Dot, Sibling, VersionVector, Versions};
use crate::command::{LocalReply, Reply, Version};
use crate::storage::Storage;

/// The live siblings a client sees, in dot order: from `page.sibling_skip` on, as many as fit
/// in one reply (`SIBLING_COUNT_MAX`, and `SIBLING_VALUE_BYTES_MAX` of values, but always
/// one), with the count left out after them. The context covers the siblings this reply and
/// the earlier pages showed (`page.shown_before`), and no other live sibling: a sibling that
/// arrived between pages is never covered unseen.
pub(crate) fn client_reply(versions: &Versions<Value>, page: Page, now: u64) -> LocalReply {
    let mut live: Vec<(&Sibling<Value>, &[u8], u64)> = versions
        .siblings()
        .iter()
        .filter_map(|s| live_value(s, now).map(|(bytes, ttl_left_ms)| (s, bytes, ttl_left_ms)))
        .collect();
    live.sort_by_key(|(sibling, _, _)| sibling.dot);
    let skip = (page.sibling_skip as usize).min(live.len());
    let mut shown = Vec::new();
    let mut value_bytes = 0;
    for &(sibling, bytes, ttl_left_ms) in live.iter().skip(skip) {
        let size = if page.metadata_only { 0 } else { bytes.len() };
        let full =
            shown.len() == schema::SIBLING_COUNT_MAX || value_bytes + size > schema::SIBLING_VALUE_BYTES_MAX;
        if full && !shown.is_empty() {
            break;
        }
        value_bytes += size;
        let version = Version {
            value: (!page.metadata_only).then(|| Rc::from(bytes)),
            timestamp_us: sibling.timestamp_us,
            ttl_left_ms,
        };
        shown.push((sibling.dot, version));
    }
    let omitted = live.len() - skip - shown.len();
    let context = if shown.len() == live.len() {
        versions.context().encode()
    } else {
        // Tombstones and expired values hold no value to show: covering them is what the
        // client saw ("absent").
        let shown_before = |dot: Dot| page.shown_before.as_ref().is_some_and(|context| context.covers(dot));
        let left_out = |sibling: &Sibling<Value>| {
            live.iter().any(|(s, _, _)| s.dot == sibling.dot)
                && !shown.iter().any(|(dot, _)| *dot == sibling.dot)
                && !shown_before(sibling.dot)
        };
        versions.context_given(|sibling| !left_out(sibling)).encode()
    };
    Reply::Siblings {
        versions: shown.into_iter().map(|(_, version)| version).collect(),
        context,
        omitted: u32::try_from(omitted).unwrap_or(u32::MAX),
    }
}

/// Coordinates a read of a key this shard owns.
pub async fn coordinate_read<S: Storage, H: Host<S>>(
    shard: &Rc<H>,
    key: Vec<u8>,
    page: Page,
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
            let op =
                Op::Get { key: &key, metadata_only: page.metadata_only, sibling_skip: page.sibling_skip };
            let shown_before = page.shown_before.as_ref().map(VersionVector::encode).unwrap_or_default();
            return forward(cluster, &view, to, &key, op, consistency, &shown_before, timeout).await;
        }
        Err(reply) => return reply,
    }
    let timeout_us = timeout.as_micros() as u64;
    let (round, plan) =
        match ReadRound::<Value>::start(&replicas, |n| view.is_live(n), consistency, 0, timeout_us) {
            Ok(started) => started,
            Err(too_few) => return too_few_replicas(cluster, replicas.len(), too_few),
        };
    let (sender, replies) = mpsc::unbounded::<(NodeId, Option<Versions<Value>>)>();
    for &node in &plan.send_to {
        let shard = shard.clone();
        let sender = sender.clone();
        let key = key.clone();
        let address = view.replica_address(node, &key);
        glommio::spawn_local(async move {
            let versions = if node == me {
                match shard.store().read_raw(&key).await {
                    Ok(bytes) => decode_stored(bytes.as_deref()).ok(),
                    Err(_) => None,
                }
            } else {
                remote_versions(&shard, address, &key, timeout).await
            };
            let _ = sender.unbounded_send((node, versions));
        })
        .detach();
    }
    drop(sender);
    let (answer, answered) = oneshot::channel();
    let asked = plan.send_to.len();
    glommio::spawn_local(finish_read(shard.clone(), key, me, round, replies, answer, asked, timeout, page))
        .detach();
    answered.await.unwrap_or_else(|_| Reply::error(Status::INTERNAL, "read round ended without an answer"))
}

pub(crate) async fn remote_versions<S: Storage, H: Host<S>>(
    shard: &H,
    address: Option<std::net::SocketAddr>,
    key: &[u8],
    timeout: Duration,
) -> Option<Versions<Value>> {
    let cluster = shard.cluster()?;
    let op = Op::ReadReplica { key };
    let request = PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout };
    let response = cluster.peers.link(address?).call(request).await.ok()?;
    if response.status != Status::OK {
        return None;
    }
    if response.versions.is_empty() {
        return Some(Versions::default());
    }
    decode_key_versions(&response.versions).ok().map(versions_from_data)
}

/// Collects a read's replies: answers the client once the round settles, then keeps
/// listening for the rest and repairs the replicas that were stale.
#[allow(clippy::too_many_arguments)]
async fn finish_read<S: Storage, H: Host<S>>(
    shard: Rc<H>,
    key: Vec<u8>,
    me: NodeId,
    mut round: ReadRound<Value>,
    mut replies: mpsc::UnboundedReceiver<(NodeId, Option<Versions<Value>>)>,
    answer: oneshot::Sender<LocalReply>,
    asked: usize,
    timeout: Duration,
    page: Page,
) {
    let mut answer = Some(answer);
    let mut heard = 0;
    let deadline = glommio::timer::sleep(timeout);
    futures::pin_mut!(deadline);
    while heard < asked {
        let next = futures_lite::future::or(async { replies.next().await.map(Some) }, async {
            (&mut deadline).await;
            None
        });
        let outcome = match next.await {
            Some(Some((node, Some(versions)))) => round.on_reply(node, versions),
            Some(Some((node, None))) => round.on_error(node),
            Some(None) | None => round.on_time(u64::MAX),
        };
        heard += 1;
        if outcome != Outcome::Pending {
            if let Some(answer) = answer.take() {
                let reply = match outcome {
                    Outcome::Done => client_reply(round.merged(), page.clone(), now_ms()),
                    Outcome::TimedOut { replies } | Outcome::Failed { replies } => Reply::error(
                        Status::TIMEOUT,
                        format!("{replies} replicas answered in time; not enough"),
                    ),
                    Outcome::Pending => unreachable!(),
                };
                let _ = answer.send(reply);
            }
            if matches!(outcome, Outcome::TimedOut { .. }) {
                break;
            }
        }
    }
    // Read repair: every replica that answered without something the merge holds gets it.
    let repairs = round.repairs();
    if repairs.is_empty() {
        return;
    }
    let Some(cluster) = shard.cluster() else { return };
    let view = cluster.view();
    for (node, versions) in repairs {
        cluster.stats.read_repair_count.set(cluster.stats.read_repair_count.get() + 1);
        if node == me {
            let _ = merge_local(&shard, &key, &versions).await;
            continue;
        }
        let bytes: Rc<[u8]> = Rc::from(encode_versions(&versions));
        let Some(address) = view.replica_address(node, &key) else { continue };
        let op = Op::Replicate { key: &key, versions: &bytes };
        let request = PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout };
        if cluster_link_call(&shard, address, request).await != Some(Status::OK) {
            cluster.add_hint(node, &key, &bytes);
        }
    }
}
