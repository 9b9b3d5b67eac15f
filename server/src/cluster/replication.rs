//! A shard's part in replication, with real I/O: it coordinates the writes and reads of the
//! keys it owns (the sans-IO rounds of `coordinator` decide; this sends and waits), serves
//! other coordinators as a replica, keeps hints for replicas that are down and replays them,
//! and repairs replicas that a read found stale.
//!
//! The write path, at the coordinator's owning shard for the key:
//! 1. The preference list (N nodes) comes from the ring; a coordinator that is not a replica
//!    forwards the request to the first live replica, which coordinates instead.
//! 2. Too few live replicas for the consistency level: `UNAVAILABLE`, nothing written.
//! 3. A fresh counter from the shard's lease, then read-modify-write of the key's versions
//!    in the local engine with no await in between (the new dot supersedes what the
//!    client's context covers); the local log append is in flight. A write with a context
//!    that would grow the key past its sibling limits is refused here (`SIBLINGS_FULL`),
//!    with nothing written.
//! 4. The new versions go to the other live replicas as `Replicate` (they merge); down
//!    replicas, and replicas that fail or time out, get a hint.
//! 5. The client hears OK after W durable acknowledgements (the local one included),
//!    `TIMEOUT` otherwise; the rest finish in the background.
//!
//! The read path: R replies (the local one included) are merged; the client gets the live
//! siblings that fit in one reply (the count of those left out, to read with a following
//! page) and a context that covers none left out. The round keeps listening until every replica asked has
//! answered or the deadline passes, and then sends the merged versions to the replicas that
//! lacked something (read repair).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::{mpsc, oneshot};
use futures::StreamExt;
use schema::peer::decode_key_versions;
use schema::{Op, ResponseView, Status};

use super::coordinator::{
    route, Ack, Consistency, Outcome, ReadRound, Route, WriteCoordinator, WriteVerdict,
};
use super::hint_log::{self};
use super::host::Host;
use super::paxos::Acceptor;
use super::peer::{PeerError, PeerRequest};
pub use super::record::Page;
use super::record::{
    self, encode_versions, live_value, value_size, versions_from_data, Record, RecordTooLarge, Value,
    SIBLING_LIMITS,
};
use super::ring::NodeId;
use super::state::monotonic_us;
pub use super::state::{ClusterShard, HintedWrite, ReplicationStats};
pub use super::versions::actor_of;
use super::versions::{check_growth, Dot, Sibling, VersionVector, Versions};
use super::view::ClusterView;
use crate::clock::now_ms;
use crate::command::{LocalReply, Reply, Version};
use crate::storage::Storage;

/// How far ahead of this node's clock a peer's timestamp may move it.
pub const CLOCK_SKEW_MAX_US: u64 = 5_000_000;
/// How often a shard looks for hints to replay.
const HINT_REPLAY_INTERVAL: Duration = Duration::from_millis(200);

/// Encodes `record` for the engine. A record that does not fit in a stored value is refused
/// (`VALUE_TOO_LARGE`, counted and logged), never cut: no sibling is ever dropped to fit.
pub(crate) fn encode_bounded<S: Storage>(
    cluster: Option<&ClusterShard<S>>,
    record: &Record,
) -> Result<(Vec<u8>, u64), LocalReply> {
    record::encode_for_engine(record).map_err(|RecordTooLarge { bytes, siblings }| {
        if let Some(cluster) = cluster {
            cluster.stats.oversized_merge_count.set(cluster.stats.oversized_merge_count.get() + 1);
        }
        let message = format!(
            "the key's versions ({siblings} siblings) and pending proposal need {bytes} bytes; at most {} bytes \
             and {} siblings are stored",
            schema::STORED_VALUE_SIZE_MAX,
            schema::peer::STORED_SIBLING_COUNT_MAX
        );
        tracing::error!("{message}: the update is refused, and the replica that sent it keeps it");
        Reply::error(Status::VALUE_TOO_LARGE, message)
    })
}

/// Decodes a stored record; an unreadable one is an internal error.
pub fn decode_record(bytes: Option<&[u8]>) -> Result<Record, LocalReply> {
    record::decode_record(bytes)
        .map_err(|error| Reply::error(Status::INTERNAL, format!("stored versions unreadable: {error}")))
}

fn decode_stored(bytes: Option<&[u8]>) -> Result<Versions<Value>, LocalReply> {
    decode_record(bytes).map(|record| record.versions)
}

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

fn cluster_of<S: Storage, H: Host<S>>(shard: &H) -> Result<&ClusterShard<S>, LocalReply> {
    shard.cluster().ok_or_else(|| Reply::error(Status::UNSUPPORTED, "this node is not in a cluster"))
}

/// Replica side: merges `bytes` (verified versions) into what this replica holds of `key`.
pub async fn replicate<S: Storage, H: Host<S>>(shard: &H, key: &[u8], bytes: &[u8]) -> LocalReply {
    let incoming = match decode_key_versions(bytes) {
        Ok(data) => versions_from_data(data),
        Err(error) => return Reply::error(Status::BAD_REQUEST, error),
    };
    for sibling in incoming.siblings() {
        shard.store().observe_peer_timestamp(sibling.timestamp_us, CLOCK_SKEW_MAX_US);
    }
    match merge_local(shard, key, &incoming).await {
        Ok(()) => Reply::Done,
        Err(reply) => reply,
    }
}

pub(crate) async fn merge_local<S: Storage, H: Host<S>>(
    shard: &H,
    key: &[u8],
    incoming: &Versions<Value>,
) -> Result<(), LocalReply> {
    let size: usize =
        incoming.siblings().iter().map(|s| s.value.as_ref().map_or(0, |v| v.0.len()) + 48).sum();
    let (_, seq) = shard
        .store()
        .update_raw(key, size, |current| {
            let mut mine = decode_record(current)?;
            let before = mine.versions.clone();
            mine.versions.merge(incoming);
            if mine.versions == before {
                return Ok(None);
            }
            encode_bounded(shard.cluster(), &mine).map(Some)
        })
        .await?;
    shard.store().wait_acked(seq).await
}

/// Takes on another replica's whole record of `key`: its versions merged, its Paxos acceptor
/// state absorbed (a ring change's transfer: the new replica stands in for the one it
/// displaces). Whether anything changed here.
pub(crate) async fn absorb_record<S: Storage, H: Host<S>>(
    shard: &H,
    key: &[u8],
    theirs: &Record,
) -> Result<bool, LocalReply> {
    let size: usize =
        theirs.versions.siblings().iter().map(|s| s.value.as_ref().map_or(0, |v| v.0.len()) + 48).sum();
    let (changed, seq) = shard
        .store()
        .update_raw(key, size, |current| {
            let mut mine = decode_record(current)?;
            let before = mine.clone();
            mine.versions.merge(&theirs.versions);
            mine.acceptor.absorb(&theirs.acceptor);
            if mine == before {
                return Ok(None);
            }
            encode_bounded(shard.cluster(), &mine).map(Some)
        })
        .await?;
    shard.store().wait_acked(seq).await?;
    Ok(changed.is_some())
}

/// Replica side: the versions this replica holds of `key`, encoded (empty: none).
pub async fn read_replica<S: Storage, H: Host<S>>(shard: &H, key: &[u8]) -> LocalReply {
    match shard.store().read_raw(key).await {
        Ok(Some(bytes)) => Reply::Versions(bytes.to_vec()),
        Ok(None) => Reply::Versions(Vec::new()),
        Err(reply) => reply,
    }
}

fn wire_consistency(consistency: Consistency) -> schema::Consistency {
    match consistency {
        Consistency::One => schema::Consistency::ONE,
        Consistency::Quorum => schema::Consistency::QUORUM,
        Consistency::All => schema::Consistency::ALL,
    }
}

/// `UNAVAILABLE` before anything was sent: fewer replicas up than the consistency needs.
pub(crate) fn too_few_replicas<S: Storage>(
    cluster: &ClusterShard<S>,
    replica_count: usize,
    too_few: super::coordinator::Unavailable,
) -> LocalReply {
    let message = format!("{} of {replica_count} replicas are up; {} needed", too_few.live, too_few.required);
    unavailable(cluster, message)
}

fn unavailable<S: Storage>(cluster: &ClusterShard<S>, message: String) -> LocalReply {
    cluster.stats.unavailable_count.set(cluster.stats.unavailable_count.get() + 1);
    Reply::error(Status::UNAVAILABLE, message)
}

/// A reply from a peer coordinator, as this node's reply.
fn reply_from_peer(response: ResponseView, is_read: bool, metadata_only: bool) -> LocalReply {
    match response.status {
        Status::OK | Status::NOT_FOUND if is_read => Reply::Siblings {
            omitted: response.siblings_omitted,
            versions: response
                .siblings
                .into_iter()
                .map(|s| Version {
                    value: (!metadata_only).then(|| Rc::from(s.value)),
                    timestamp_us: s.timestamp_us,
                    ttl_left_ms: s.ttl_left_ms,
                })
                .collect(),
            context: response.context,
        },
        Status::OK if response.context.is_empty() => Reply::Done,
        Status::OK => Reply::Written(response.context),
        status => Reply::Error { status, message: response.message },
    }
}

/// A request for a key this node holds no replica of: the first live replica coordinates.
#[allow(clippy::too_many_arguments)]
async fn forward<S: Storage>(
    cluster: &ClusterShard<S>,
    view: &ClusterView,
    to: NodeId,
    key: &[u8],
    op: Op<'_>,
    consistency: Consistency,
    context: &[u8],
    timeout: Duration,
) -> LocalReply {
    let Some(address) = view.replica_address(to, key) else {
        return unavailable(cluster, format!("replica {to}'s address is unknown"));
    };
    cluster.stats.forwarded_count.set(cluster.stats.forwarded_count.get() + 1);
    let is_read = matches!(op, Op::Get { .. });
    let metadata_only = matches!(op, Op::Get { metadata_only: true, .. });
    let request = PeerRequest { op, consistency: wire_consistency(consistency), context, timeout };
    match cluster.peers.link(address).call(request).await {
        Ok(response) => reply_from_peer(response, is_read, metadata_only),
        Err(error) => Reply::error(Status::TIMEOUT, format!("forwarding to replica {address}: {error}")),
    }
}

/// The shard's replication state, the view, the key's replicas and this node.
pub(crate) type Placement<'a, S> =
    (&'a ClusterShard<S>, Arc<ClusterView>, super::ring::PreferenceList, NodeId);

/// Where `key` lives as this shard sees the cluster; `UNAVAILABLE` while the cluster forms.
pub(crate) fn place<'a, S: Storage, H: Host<S>>(
    shard: &'a H,
    key: &[u8],
) -> Result<Placement<'a, S>, LocalReply> {
    let cluster = cluster_of(shard)?;
    let view = cluster.view();
    match (view.preference_list(key), view.my_id()) {
        (Some(replicas), Some(me)) => Ok((cluster, view, replicas, me)),
        _ => Err(unavailable(cluster, view.forming_note.clone())),
    }
}

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
    match route(&replicas, me, |n| view.is_live(n) && view.replica_address(n, &key).is_some()) {
        Some(Route::Coordinate) => {}
        Some(Route::Forward(to)) => {
            let context_bytes = context.as_ref().map(VersionVector::encode).unwrap_or_default();
            let op = match &value {
                Some(value) => Op::Put { key: &key, value, ttl_ms },
                None => Op::Delete { key: &key },
            };
            return forward(cluster, &view, to, &key, op, consistency, &context_bytes, timeout).await;
        }
        None => return unavailable(cluster, "no replica of the key is up".into()),
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
    let (sender, mut acks) = mpsc::unbounded::<(NodeId, Ack)>();
    {
        let shard = shard.clone();
        let sender = sender.clone();
        glommio::spawn_local(async move {
            let ack = if shard.store().wait_acked(seq).await.is_ok() { Ack::Durable } else { Ack::Failed };
            let _ = sender.unbounded_send((me, ack));
        })
        .detach();
    }
    for &node in plan.send_to.iter().filter(|&&n| n != me) {
        let Some(address) = view.replica_address(node, &key) else { continue };
        let shard = shard.clone();
        let sender = sender.clone();
        let key = key.clone();
        let bytes = bytes.clone();
        glommio::spawn_local(async move {
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
            let _ = sender.unbounded_send((node, ack));
        })
        .detach();
    }
    drop(sender);
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

/// Sends one request to a peer; the status it answered, or `None` if it did not.
async fn cluster_link_call<S: Storage, H: Host<S>>(
    shard: &H,
    address: std::net::SocketAddr,
    request: PeerRequest<'_>,
) -> Option<Status> {
    let cluster = shard.cluster()?;
    cluster.peers.link(address).call(request).await.ok().map(|response| response.status)
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
    match route(&replicas, me, |n| view.is_live(n) && view.replica_address(n, &key).is_some()) {
        Some(Route::Coordinate) => {}
        Some(Route::Forward(to)) => {
            let op =
                Op::Get { key: &key, metadata_only: page.metadata_only, sibling_skip: page.sibling_skip };
            let shown_before = page.shown_before.as_ref().map(VersionVector::encode).unwrap_or_default();
            return forward(cluster, &view, to, &key, op, consistency, &shown_before, timeout).await;
        }
        None => return unavailable(cluster, "no replica of the key is up".into()),
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

/// Appends the hint log's new records every `FLUSH_INTERVAL`, forever (records whose append
/// failed are tried again with the next); once nothing is pending and the log has grown,
/// starts it afresh.
pub async fn flush_hint_log<S: Storage, H: Host<S>>(shard: Rc<H>) {
    let Some(cluster) = shard.cluster() else { return };
    let Some(mut log) = cluster.hint_log.borrow_mut().take() else { return };
    let mut appended = 0usize;
    loop {
        glommio::timer::sleep(hint_log::FLUSH_INTERVAL).await;
        let bytes = std::mem::take(&mut *cluster.hint_log_pending.borrow_mut());
        if !bytes.is_empty() {
            match log.append(&bytes).await {
                Ok(()) => appended += bytes.len(),
                Err(error) => {
                    tracing::error!(shard = shard.index(), "appending to the hint log: {error}");
                    let mut pending = cluster.hint_log_pending.borrow_mut();
                    let newer = std::mem::replace(&mut *pending, bytes);
                    pending.extend(newer);
                }
            }
        }
        if appended > (1 << 20) && cluster.hints.borrow().pending_count() == 0 {
            match log.clear().await {
                Ok(()) => appended = 0,
                Err(error) => tracing::error!(shard = shard.index(), "starting the hint log afresh: {error}"),
            }
        }
    }
}

/// Replays hints to replicas that are up again, forever; drops those past their age.
pub async fn replay_hints<S: Storage, H: Host<S>>(shard: Rc<H>) {
    loop {
        glommio::timer::sleep(HINT_REPLAY_INTERVAL).await;
        let Some(cluster) = shard.cluster() else { return };
        cluster.hints.borrow_mut().expire(monotonic_us());
        let view = cluster.view();
        let targets = cluster.hints.borrow().targets();
        for target in targets.into_iter().filter(|&t| view.is_live(t)) {
            let batch = cluster.hints.borrow_mut().replay(target);
            for hint in batch {
                let (key, bytes) = &hint.write;
                let Some(address) = view.replica_address(target, key) else {
                    // No address known yet: send the batch again later rather than leave it
                    // marked in flight for good.
                    cluster.hints.borrow_mut().replay_failed(target);
                    break;
                };
                let op = Op::Replicate { key, versions: bytes };
                let timeout = Duration::from_secs(2);
                let request =
                    PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout };
                if cluster_link_call(&shard, address, request).await == Some(Status::OK) {
                    cluster.hint_acknowledged(target, hint.id);
                } else {
                    cluster.hints.borrow_mut().replay_failed(target);
                    break;
                }
            }
        }
    }
}
