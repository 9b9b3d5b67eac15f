//! Anti-entropy with real I/O: every shard walks the partitions its node replicates, one at
//! a time with a pause between them, and compares each with the partition's other replicas
//! through Merkle trees (`merkle.rs`); keys that differ are exchanged and merged (version
//! vectors make a merge safe in any order and any number of times). A partition that every
//! replica agrees on has its settled tombstones purged.
//!
//! One comparison of partition P with replica R, from shard i of n of this node:
//! 1. Scan P's token range in this shard's engine (`Engine::scan_tokens`) and build the tree.
//! 2. Ask every shard of R for its tree of P restricted to the keys shard i of n holds (so
//!    that nodes with different shard counts compare the same keys), and XOR them together.
//! 3. Equal trees: done. Otherwise ask R's shards for the keys (with digests) of the leaves
//!    that differ, and for each key whose digest differs: read R's versions, merge them with
//!    ours; store the merge here if it adds to ours, send it to R if it adds to R's.
//!
//! Rate: a pass over the shard's partitions takes `interval`; the task runs in a task queue
//! with few shares, so request handling comes first. `kvctl repair` runs a pass at once.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use schema::peer::{encode_merkle, MerkleData, MERKLE_KEY_COUNT_MAX};
use schema::{Op, Status};

use super::hand_off::{KeyHandOff, SweepSchedule};
use super::host::Host;
use super::merkle::{self, Comparison, Tree};
pub use super::options::{AntiEntropyOptions, AntiEntropyStats};
use super::peer::PeerRequest;
use super::record::{encode_versions, paxos_state_forgettable, Record};
use super::replication::{absorb_record, decode_record, merge_local, remote_versions};
use super::ring::NodeId;
use super::view::{ClusterView, NodeInfo};
use crate::clock::now_ms;
use crate::storage::Storage;

/// How long one anti-entropy request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys repaired at once within a partition.
const REPAIR_CONCURRENCY: usize = 16;
/// The shortest pause between two partitions of a pass.
const PAUSE_MIN: Duration = Duration::from_millis(1);

fn bump(cell: &Cell<u64>, by: u64) {
    cell.set(cell.get() + by);
}

/// What comparing some partitions found and fixed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Partitions held by this node and walked.
    pub partitions: u64,
    /// (partition, other replica) pairs whose trees were compared.
    pub comparisons: u64,
    /// Of those, the pairs whose trees differed.
    pub differing: u64,
    /// Keys stored here or sent to a replica because one side lacked something.
    pub keys_repaired: u64,
    /// Keys whose repair failed (the replica did not answer); the next pass tries again.
    pub keys_failed: u64,
    /// Replicas that were down or did not answer.
    pub unreachable: u64,
    pub tombstones_purged: u64,
}

impl Report {
    pub fn add(&mut self, other: &Report) {
        self.partitions += other.partitions;
        self.comparisons += other.comparisons;
        self.differing += other.differing;
        self.keys_repaired += other.keys_repaired;
        self.keys_failed += other.keys_failed;
        self.unreachable += other.unreachable;
        self.tombstones_purged += other.tombstones_purged;
    }
}

/// One replica's side of a partition: its tree, its keys (with digest and leaf) and the
/// settled keys it holds.
#[derive(Default)]
struct Scanned {
    tree: Tree,
    keys: Vec<(Vec<u8>, u64)>,
    settled: Vec<Vec<u8>>,
}

/// Scans this shard's keys of `partition`, only those shard `index` of `count` would own
/// when `filter` is given.
async fn scan<S: Storage, H: Host<S>>(
    shard: &H,
    partition: usize,
    partition_bits: u32,
    filter: Option<(usize, usize)>,
    settle_ms: u64,
) -> Result<Scanned, String> {
    let (first, last) = merkle::token_range(partition, partition_bits);
    let entries = shard.store().engine().scan_tokens(first, last).await.map_err(|error| error.to_string())?;
    let now = now_ms();
    let mut scanned = Scanned::default();
    for (key, entry) in entries {
        let Some(bytes) = entry.value.as_deref().filter(|_| entry.is_live(now)) else { continue };
        if filter.is_some_and(|(count, index)| schema::shard_of(&key, count) != index) {
            continue;
        }
        // An unreadable record is the engine's to report (it checks every block it reads).
        let Ok(record) = decode_record(Some(bytes)) else { continue };
        if record.versions.siblings().is_empty() {
            continue;
        }
        if merkle::is_settled(&record.versions, now, settle_ms) {
            scanned.settled.push(key);
            continue;
        }
        let digest = merkle::versions_digest(&record.versions);
        scanned.tree.add(&key, digest, partition_bits);
        scanned.keys.push((key, digest));
    }
    Ok(scanned)
}

/// Replica side of `AntiEntropy`: the encoded `MerkleReply`.
pub async fn serve<S: Storage, H: Host<S>>(
    shard: &H,
    partition: u32,
    partition_bits: u8,
    shard_count: u16,
    shard_index: u16,
    leaves: u64,
) -> Result<Vec<u8>, String> {
    let settle_ms = shard.cluster().map_or(0, |cluster| cluster.anti_entropy.settle_ms);
    let filter = Some((usize::from(shard_count), usize::from(shard_index)));
    let bits = u32::from(partition_bits);
    let scanned = scan(shard, partition as usize, bits, filter, settle_ms).await?;
    let reply = if leaves == 0 {
        MerkleData { leaves: scanned.tree.leaves.to_vec(), keys: Vec::new() }
    } else {
        let mut keys: Vec<(Vec<u8>, u64)> = scanned
            .keys
            .into_iter()
            .filter(|(key, _)| leaves & (1 << merkle::leaf_of(schema::key_hash(key), bits)) != 0)
            .collect();
        // The rest waits for the next pass.
        keys.truncate(MERKLE_KEY_COUNT_MAX);
        MerkleData { leaves: Vec::new(), keys }
    };
    Ok(encode_merkle(&reply))
}

/// Asks every shard of `node` for its part of the partition's tree (`leaves == 0`) or keys,
/// as seen from this shard; `None` if any shard does not answer.
async fn ask<S: Storage, H: Host<S>>(
    shard: &H,
    info: &NodeInfo,
    partition: usize,
    partition_bits: u32,
    leaves: u64,
) -> Option<(Tree, Vec<(Vec<u8>, u64)>)> {
    let cluster = shard.cluster()?;
    let mut tree = Tree::default();
    let mut keys = Vec::new();
    for &port in &info.shard_ports {
        let address = SocketAddr::new(info.address.ip(), port);
        let op = Op::AntiEntropy {
            partition: partition as u32,
            partition_bits: partition_bits as u8,
            shard_count: shard.count() as u16,
            shard_index: shard.index() as u16,
            leaves,
        };
        let request =
            PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout: REQUEST_TIMEOUT };
        let response = cluster.peers.link(address).call(request).await.ok()?;
        if response.status != Status::OK {
            return None;
        }
        let merkle = response.merkle?;
        if leaves == 0 && merkle.leaves.len() != merkle::LEAF_COUNT {
            return None;
        }
        tree.combine(&merkle.leaves);
        keys.extend(merkle.keys);
    }
    Some((tree, keys))
}

/// Brings `key` to the same versions here and on `node`: `Some(true)` if either side
/// changed, `None` if the replica did not answer.
async fn repair_key<S: Storage, H: Host<S>>(
    shard: &H,
    view: &ClusterView,
    node: NodeId,
    key: &[u8],
) -> Option<bool> {
    let cluster = shard.cluster()?;
    let address = view.replica_address(node, key);
    let theirs = remote_versions(shard, address, key, REQUEST_TIMEOUT).await?;
    let mine = match shard.store().read_raw(key).await {
        Ok(bytes) => decode_record(bytes.as_deref()).ok()?.versions,
        Err(_) => return None,
    };
    let mut merged = mine.clone();
    merged.merge(&theirs);
    let merged_digest = merkle::versions_digest(&merged);
    let mut changed = false;
    if merged_digest != merkle::versions_digest(&mine) {
        merge_local(shard, key, &theirs).await.ok()?;
        changed = true;
    }
    if merged_digest != merkle::versions_digest(&theirs) {
        let bytes = encode_versions(&merged);
        let op = Op::Replicate { key, versions: &bytes };
        let request =
            PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout: REQUEST_TIMEOUT };
        let response = cluster.peers.link(address?).call(request).await.ok()?;
        if response.status != Status::OK {
            return None;
        }
        changed = true;
    }
    Some(changed)
}

/// Purges the settled keys of a partition every replica agreed on; re-checks each one in the
/// same step as its removal, so a write that arrived since the scan keeps it.
async fn purge<S: Storage, H: Host<S>>(shard: &H, keys: &[Vec<u8>], settle_ms: u64) -> u64 {
    let mut purged = 0;
    for key in keys {
        let removed = shard
            .store()
            .remove_raw_if(key, |bytes| {
                let record: Record = match decode_record(Some(bytes)) {
                    Ok(record) => record,
                    Err(_) => return false,
                };
                let now = now_ms();
                merkle::is_settled(&record.versions, now, settle_ms) && paxos_state_forgettable(&record, now)
            })
            .await;
        if removed == Ok(true) {
            purged += 1;
        }
    }
    purged
}

/// Compares one partition with its other replicas and repairs what differs.
pub async fn compare_partition<S: Storage, H: Host<S>>(
    shard: &H,
    view: &ClusterView,
    partition: usize,
) -> Report {
    let mut report = Report::default();
    let (Some(cluster), Some(formed), Some(me)) = (shard.cluster(), view.formed.as_ref(), view.my_id())
    else {
        return report;
    };
    let replicas = formed.ring.preference_list_of_partition(partition, formed.replica_count);
    if !replicas.contains(&me) {
        return report;
    }
    report.partitions = 1;
    let settle_ms = cluster.anti_entropy.settle_ms;
    let Ok(mine) = scan(shard, partition, formed.partition_bits, None, settle_ms).await else {
        return report;
    };
    let mut comparisons = Vec::new();
    for &node in replicas.iter().filter(|&&node| node != me) {
        let Some((_, info)) = view.member(node).filter(|_| view.is_live(node)) else {
            report.unreachable += 1;
            comparisons.push(Comparison::Unreachable);
            continue;
        };
        let Some((theirs, _)) = ask(shard, info, partition, formed.partition_bits, 0).await else {
            report.unreachable += 1;
            comparisons.push(Comparison::Unreachable);
            continue;
        };
        report.comparisons += 1;
        let leaves = mine.tree.differing(&theirs);
        if leaves == 0 {
            comparisons.push(Comparison::Equal);
            continue;
        }
        comparisons.push(Comparison::Differing);
        report.differing += 1;
        let Some((_, their_keys)) = ask(shard, info, partition, formed.partition_bits, leaves).await else {
            report.unreachable += 1;
            continue;
        };
        let in_leaves =
            |key: &[u8]| leaves & (1 << merkle::leaf_of(schema::key_hash(key), formed.partition_bits)) != 0;
        let my_keys: Vec<(Vec<u8>, u64)> =
            mine.keys.iter().filter(|(key, _)| in_leaves(key)).cloned().collect();
        let keys = merkle::differing_keys(&my_keys, &their_keys);
        let outcomes: Vec<Option<bool>> = futures::stream::iter(keys.iter())
            .map(|key| repair_key(shard, view, node, key))
            .buffer_unordered(REPAIR_CONCURRENCY)
            .collect()
            .await;
        report.keys_repaired += outcomes.iter().filter(|&&o| o == Some(true)).count() as u64;
        report.keys_failed += outcomes.iter().filter(|o| o.is_none()).count() as u64;
    }
    if merkle::may_purge(&comparisons) && !mine.settled.is_empty() {
        report.tombstones_purged = purge(shard, &mine.settled, settle_ms).await;
    }
    let stats = &cluster.stats.anti_entropy;
    bump(&stats.partitions_compared, report.comparisons);
    bump(&stats.partitions_differing, report.differing);
    bump(&stats.keys_repaired, report.keys_repaired);
    bump(&stats.tombstones_purged, report.tombstones_purged);
    report
}

/// The partitions this node replicates.
fn my_partitions(view: &ClusterView) -> Vec<usize> {
    let (Some(formed), Some(me)) = (view.formed.as_ref(), view.my_id()) else { return Vec::new() };
    (0..formed.ring.partition_count())
        .filter(|&p| formed.ring.preference_list_of_partition(p, formed.replica_count).contains(&me))
        .collect()
}

/// One pass over every partition this node replicates, at once (`kvctl repair`).
pub async fn repair_now<S: Storage, H: Host<S>>(shard: &H) -> Report {
    let mut report = Report::default();
    let Some(cluster) = shard.cluster() else { return report };
    let view = cluster.view();
    for partition in my_partitions(&view) {
        report.add(&compare_partition(shard, &view, partition).await);
    }
    report
}

/// The background passes, forever (run in a task queue with few shares).
pub async fn run<S: Storage, H: Host<S>>(shard: Rc<H>) {
    let Some(cluster) = shard.cluster() else { return };
    let interval = cluster.anti_entropy.interval;
    if interval.is_zero() {
        return;
    }
    loop {
        let partitions = my_partitions(&cluster.view());
        if partitions.is_empty() {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let started = Instant::now();
        let pause = (interval / partitions.len() as u32).max(PAUSE_MIN);
        for partition in partitions {
            let began = Instant::now();
            // The view of the moment: a node that went down meanwhile is not waited for.
            compare_partition(&shard, &cluster.view(), partition).await;
            glommio::timer::sleep(pause.saturating_sub(began.elapsed()).max(PAUSE_MIN)).await;
        }
        let stats = &cluster.stats.anti_entropy;
        bump(&stats.passes, 1);
        stats.last_pass_ms.set(started.elapsed().as_millis() as u64);
    }
}

/// Copies `partition` onto this shard from `sources` (node names): every key they hold that
/// this shard would own, merged into ours (a ring change's transfer; safe to repeat). Returns
/// (keys that changed here, bytes received).
pub async fn pull_partition<S: Storage, H: Host<S>>(
    shard: &H,
    partition: usize,
    sources: &[String],
) -> Result<(u64, u64), String> {
    let cluster = shard.cluster().ok_or("not a cluster node")?;
    let view = cluster.view();
    let formed = view.formed.as_ref().ok_or("the cluster is not formed")?;
    let bits = formed.partition_bits;
    if partition >= formed.ring.partition_count() {
        return Err(format!("no partition {partition} in a ring of {}", formed.ring.partition_count()));
    }
    let (mut keys_copied, mut bytes) = (0u64, 0u64);
    for source in sources {
        let info = view.nodes.get(source).ok_or_else(|| format!("{source} is unknown"))?;
        let (_, keys) = ask(shard, info, partition, bits, u64::MAX)
            .await
            .ok_or_else(|| format!("{source} did not list its keys"))?;
        bytes += keys.iter().map(|(key, _)| key.len() as u64 + 8).sum::<u64>();
        let outcomes: Vec<Result<(bool, u64), String>> = futures::stream::iter(keys.iter())
            .map(|(key, _)| pull_key(shard, info, key))
            .buffer_unordered(REPAIR_CONCURRENCY)
            .collect()
            .await;
        for outcome in outcomes {
            let (changed, received) = outcome?;
            keys_copied += u64::from(changed);
            bytes += received;
        }
    }
    bump(&cluster.stats.anti_entropy.streamed_bytes, bytes);
    bump(&cluster.stats.anti_entropy.streamed_keys, keys_copied);
    Ok((keys_copied, bytes))
}

/// Reads one key's versions from a source and merges them here: (changed, bytes received).
async fn pull_key<S: Storage, H: Host<S>>(
    shard: &H,
    source: &NodeInfo,
    key: &[u8],
) -> Result<(bool, u64), String> {
    let cluster = shard.cluster().ok_or("not a cluster node")?;
    let address = source.shard_address(key).ok_or("no address for the source's shard")?;
    let op = Op::ReadReplica { key };
    let request =
        PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout: REQUEST_TIMEOUT };
    let response = cluster.peers.link(address).call(request).await.map_err(|error| error.to_string())?;
    if response.status != Status::OK {
        return Err(format!("{address}: {:?} {}", response.status, response.message));
    }
    let received = response.versions.len() as u64;
    if response.versions.is_empty() {
        return Ok((false, received));
    }
    // The whole record: versions and the Paxos acceptor state (the new replica stands in for
    // the one it displaces in the key's Paxos too).
    let theirs = decode_record(Some(&response.versions)).map_err(|_| "an unreadable record".to_string())?;
    let changed =
        absorb_record(shard, key, &theirs).await.map_err(|_| "storing the copy failed".to_string())?;
    Ok((changed, received))
}

/// How long a completed ring change stays in force before the nodes that lost ranges drop
/// them: coordinators that have not heard of it yet may still read from them meanwhile.
const DROP_DELAY: Duration = Duration::from_secs(5);
/// How often a node looks again for keys of ranges it does not replicate (a coordinator with
/// a stale ring may have written some since the last sweep).
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Hands `key`'s versions (stored as `bytes`) to its current replicas: whether every one of
/// them acknowledged.
async fn hand_off<S: Storage, H: Host<S>>(shard: &H, view: &ClusterView, key: &[u8], bytes: &[u8]) -> bool {
    let (Some(cluster), Some(me)) = (shard.cluster(), view.my_id()) else { return false };
    let Ok(record) = decode_record(Some(bytes)) else { return false };
    let versions = encode_versions(&record.versions);
    let Some(replicas) = view.preference_list(key) else { return false };
    let mut handing = KeyHandOff::new(record.versions.clone());
    for &node in &replicas {
        let Some(address) = view.replica_address(node, key) else { return false };
        let op = Op::Replicate { key, versions: &versions };
        let request =
            PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout: REQUEST_TIMEOUT };
        match cluster.peers.link(address).call(request).await {
            Ok(response) if response.status == Status::OK => handing.acknowledged(node, &record.versions),
            _ => return false,
        }
    }
    // The store removes it only if it is still these bytes (`remove_raw_if`).
    handing.may_drop(me, &replicas, &record.versions)
}

/// Drops the keys of ranges this node no longer replicates, forever: after a ring change has
/// completed (and been in force for `DROP_DELAY`), at start, and every `SWEEP_INTERVAL`. Each
/// key is first handed to its current replicas (a write that a coordinator with a stale ring
/// sent here is not lost) and removed only once they all acknowledged it, unchanged since.
pub async fn drop_moved_ranges<S: Storage, H: Host<S>>(shard: Rc<H>) {
    let Some(cluster) = shard.cluster() else { return };
    let started = Instant::now();
    let mut schedule = SweepSchedule::new(
        DROP_DELAY.as_millis() as u64,
        SWEEP_INTERVAL.as_millis() as u64,
        DROP_DELAY.as_millis() as u64,
    );
    loop {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        let view = cluster.view();
        let (Some(formed), Some(me)) = (view.formed.as_ref(), view.my_id()) else { continue };
        if !schedule.due(started.elapsed().as_millis() as u64, formed.version, formed.pending.is_some()) {
            continue;
        }
        let (mut dropped, mut kept) = (0u64, 0u64);
        for partition in 0..formed.ring.partition_count() {
            if formed.ring.preference_list_of_partition(partition, formed.replica_count).contains(&me) {
                continue;
            }
            let (first, last) = merkle::token_range(partition, formed.partition_bits);
            let Ok(entries) = shard.store().engine().scan_tokens(first, last).await else { continue };
            let now = now_ms();
            for (key, entry) in entries.iter().filter(|(_, entry)| entry.is_live(now)) {
                let Some(bytes) = entry.value.as_deref() else { continue };
                if !hand_off(&shard, &view, key, bytes).await {
                    kept += 1;
                    continue;
                }
                if shard.store().remove_raw_if(key, |current| current == bytes).await == Ok(true) {
                    dropped += 1;
                }
            }
        }
        if dropped + kept > 0 {
            tracing::info!(
                shard = shard.index(),
                "ranges this node no longer replicates: {dropped} keys handed off and dropped, {kept} kept for now"
            );
        }
        bump(&cluster.stats.anti_entropy.moved_keys_dropped, dropped);
        // Keys kept (a replica did not answer) are tried again after the delay.
        schedule.swept(started.elapsed().as_millis() as u64, formed.version, kept);
    }
}
