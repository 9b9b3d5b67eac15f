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

use schema::{Op, ResponseView, Status};

use super::coordinator::{route, Consistency, Route};
use super::host::Host;
use super::peer::PeerRequest;
pub use super::record::Page;
use super::record::{self, Record, RecordTooLarge, Value};
use super::ring::NodeId;
pub use super::state::{ClusterShard, HintedWrite, ReplicationStats};
pub use super::versions::actor_of;
use super::versions::Versions;
use super::view::ClusterView;
use crate::command::{LocalReply, Reply, Version};
use crate::storage::Storage;

mod hint_replay;
mod read;
mod replica;
mod write;

pub use hint_replay::{flush_hint_log, replay_hints};
pub use read::coordinate_read;
pub(crate) use read::{client_reply, remote_versions};
pub(crate) use replica::{absorb_record, merge_local};
pub use replica::{read_replica, replicate};
pub use write::coordinate_write;

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

fn cluster_of<S: Storage, H: Host<S>>(shard: &H) -> Result<&ClusterShard<S>, LocalReply> {
    shard.cluster().ok_or_else(|| Reply::error(Status::UNSUPPORTED, "this node is not in a cluster"))
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

/// Where a request for `key` placed by `place` runs: here (`None`), or at the first live
/// replica with a known address (`Some`); `UNAVAILABLE` when no replica is up.
fn route_request<S: Storage>(
    cluster: &ClusterShard<S>,
    view: &ClusterView,
    replicas: &[NodeId],
    me: NodeId,
    key: &[u8],
) -> Result<Option<NodeId>, LocalReply> {
    match route(replicas, me, |n| view.is_live(n) && view.replica_address(n, key).is_some()) {
        Some(Route::Coordinate) => Ok(None),
        Some(Route::Forward(to)) => Ok(Some(to)),
        None => Err(unavailable(cluster, "no replica of the key is up".into())),
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

/// Sends one request to a peer; the status it answered, or `None` if it did not.
async fn cluster_link_call<S: Storage, H: Host<S>>(
    shard: &H,
    address: std::net::SocketAddr,
    request: PeerRequest<'_>,
) -> Option<Status> {
    let cluster = shard.cluster()?;
    cluster.peers.link(address).call(request).await.ok().map(|response| response.status)
}
