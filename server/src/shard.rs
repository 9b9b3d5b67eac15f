//! One shard: its store, its part of the cluster, its end of the channel mesh, all on one
//! glommio executor, and how a command reaches the code that runs it (`launch.rs` starts it).
//! Nothing here is shared with another thread.

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use schema::{shard_of, HelloInfo, Status};

use crate::cluster::host::Host;
use crate::cluster::replication::{self, ClusterShard};
use crate::command::{Command, LocalReply, Reply};
use crate::mesh::Mesh;
use crate::storage::Storage;
use crate::store::Store;

/// Per-connection limits, set by flags.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub inflight_max: usize,
    pub idle_timeout: Duration,
    /// Time a frame may take to arrive once its first bytes have.
    pub frame_timeout: Duration,
    pub write_timeout: Duration,
    pub request_timeout_default: Duration,
    pub request_timeout_max: Duration,
}

#[derive(Debug, Default)]
pub struct ShardStats {
    pub request_count: Cell<u64>,
    pub timeout_count: Cell<u64>,
    pub connection_count: Cell<usize>,
    pub refused_connection_count: Cell<u64>,
    /// Requests by operation and status, latency, bytes in and out.
    pub requests: crate::metrics::RequestMetrics,
}

/// What a shard is made of, as `launch.rs` puts it together.
pub struct ShardParts<S: Storage> {
    pub index: usize,
    pub count: usize,
    pub store: Store<S>,
    pub mesh: Option<Rc<Mesh>>,
    pub hello: HelloInfo,
    pub limits: ConnectionLimits,
    pub connections_max: usize,
    /// Shared by the shard's connections for frames larger than their minimum read buffer.
    pub large_buffer_budget: Rc<glommio::sync::Semaphore>,
    /// Present when the node is part of a cluster.
    pub cluster: Option<ClusterShard<S>>,
    /// The node's data directory.
    pub data_dir: PathBuf,
}

impl<S: Storage> ShardParts<S> {
    /// The lone shard of a standalone node, with no port and no data directory of its own:
    /// what benchmarks and tests serve from when they drive a connection over an in-memory
    /// stream.
    pub fn alone(store: Store<S>, limits: ConnectionLimits) -> ShardParts<S> {
        ShardParts {
            index: 0,
            count: 1,
            store,
            mesh: None,
            hello: HelloInfo {
                protocol_version: schema::PROTOCOL_VERSION,
                node_id: "alone".into(),
                shard_count: 1,
                shard_function: schema::ShardFunction::XXH3_64_MULSHIFT,
                shard_hash_seed: schema::SHARD_HASH_SEED,
                client_port: 0,
                shard_ports: Vec::new(),
            },
            limits,
            connections_max: 1,
            large_buffer_budget: Rc::new(glommio::sync::Semaphore::new(64 << 20)),
            cluster: None,
            data_dir: PathBuf::new(),
        }
    }
}

/// One shard. Its parts are reached through narrow accessors; only its own methods route
/// commands.
pub struct Shard<S: Storage> {
    index: usize,
    count: usize,
    store: Store<S>,
    mesh: Option<Rc<Mesh>>,
    hello: HelloInfo,
    limits: ConnectionLimits,
    connections_max: usize,
    large_buffer_budget: Rc<glommio::sync::Semaphore>,
    stats: ShardStats,
    cluster: Option<ClusterShard<S>>,
    data_dir: PathBuf,
}

impl<S: Storage> Shard<S> {
    pub fn new(parts: ShardParts<S>) -> Shard<S> {
        let ShardParts {
            index,
            count,
            store,
            mesh,
            hello,
            limits,
            connections_max,
            large_buffer_budget,
            cluster,
            data_dir,
        } = parts;
        Shard {
            index,
            count,
            store,
            mesh,
            hello,
            limits,
            connections_max,
            large_buffer_budget,
            stats: ShardStats::default(),
            cluster,
            data_dir,
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn store(&self) -> &Store<S> {
        &self.store
    }

    /// The channel mesh to the node's other shards (none with one shard).
    pub fn mesh(&self) -> Option<&Rc<Mesh>> {
        self.mesh.as_ref()
    }

    pub fn hello(&self) -> &HelloInfo {
        &self.hello
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    pub fn connections_max(&self) -> usize {
        self.connections_max
    }

    pub fn large_buffer_budget(&self) -> &Rc<glommio::sync::Semaphore> {
        &self.large_buffer_budget
    }

    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// This shard's replication state, on a cluster node.
    pub fn cluster(&self) -> Option<&ClusterShard<S>> {
        self.cluster.as_ref()
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }
}

impl<S: Storage> Host<S> for Shard<S> {
    fn store(&self) -> &Store<S> {
        Shard::store(self)
    }

    fn cluster(&self) -> Option<&ClusterShard<S>> {
        Shard::cluster(self)
    }

    fn index(&self) -> usize {
        Shard::index(self)
    }

    fn count(&self) -> usize {
        Shard::count(self)
    }
}

impl<S: Storage> Shard<S> {
    pub fn owns(&self, key: &[u8]) -> bool {
        // A lone shard owns every key: no need to hash it.
        self.count == 1 || shard_of(key, self.count) == self.index
    }

    /// This shard's counters and storage-engine figures, as one JSON object.
    pub fn stats_json(&self) -> String {
        self.stats_value().to_string()
    }

    pub fn stats_value(&self) -> serde_json::Value {
        let stats = &self.stats;
        serde_json::json!({
            "requests": stats.requests.to_json(),
            "mesh_hop_count": self.mesh.as_ref().map_or(0, |mesh| mesh.hop_count()),
            "cluster": self.cluster.as_ref().map(ClusterShard::stats_json),
            "shard": self.index,
            "shard_count": self.count,
            "request_count": stats.request_count.get(),
            "timeout_count": stats.timeout_count.get(),
            "connection_count": stats.connection_count.get(),
            "refused_connection_count": stats.refused_connection_count.get(),
            "log_sync_count": self.store.wal().sync_count(),
            "log_batch_count": self.store.wal().batch_count(),
            "log_write_wait_us": self.store.wal().write_wait_us(),
            "engine": self.store.engine().stats(),
        })
    }

    /// Runs `command` on the shard that owns its key: here, or one hop away.
    pub async fn execute(self: &Rc<Self>, command: Command) -> LocalReply {
        let target = shard_of(command.key(), self.count);
        if target == self.index {
            return self.apply_here(command).await;
        }
        match &self.mesh {
            Some(mesh) => mesh.forward(target, command).await.map_value(Rc::from),
            None => Reply::error(Status::INTERNAL, format!("no mesh to reach shard {target}")),
        }
    }
}

impl<S: Storage> Shard<S> {
    /// Entries held by every shard of the node (an estimate: see
    /// [`crate::engine::Engine::entry_count_estimate`]).
    pub async fn entry_count_total(&self) -> u64 {
        let mut total = self.store.engine().entry_count_estimate();
        if let Some(mesh) = &self.mesh {
            for target in (0..self.count).filter(|&t| t != self.index) {
                if let Reply::Updated(crate::update::Answer::Integer(count)) =
                    mesh.forward(target, Command::EntryCount).await
                {
                    total += count.max(0) as u64;
                }
            }
        }
        total
    }

    /// An anti-entropy pass on every shard of the node, now (`kvctl repair`): what it found
    /// and fixed, summed.
    pub async fn repair_node(self: &Rc<Self>) -> Result<crate::cluster::anti_entropy::Report, String> {
        if self.cluster.is_none() {
            return Err("this node is not part of a cluster".into());
        }
        let mut total = crate::cluster::anti_entropy::repair_now(self).await;
        for target in (0..self.count).filter(|&t| t != self.index) {
            let Some(mesh) = &self.mesh else { break };
            match mesh.forward(target, Command::RepairShard).await {
                Reply::Stats(json) => {
                    let report = serde_json::from_str(&json).map_err(|error| error.to_string())?;
                    total.add(&report);
                }
                Reply::Error { message, .. } => return Err(message),
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        Ok(total)
    }

    /// Copies `partition` from `sources` onto every shard of the node (a ring change's
    /// transfer): (keys, bytes) copied, summed.
    pub async fn transfer_node(
        self: &Rc<Self>,
        partition: usize,
        sources: Vec<String>,
    ) -> Result<(u64, u64), String> {
        let mut total = crate::cluster::anti_entropy::pull_partition(self, partition, &sources).await?;
        for target in (0..self.count).filter(|&t| t != self.index) {
            let Some(mesh) = &self.mesh else { break };
            let command = Command::TransferShard { partition, sources: sources.clone() };
            match mesh.forward(target, command).await {
                Reply::Stats(json) => {
                    let figures: serde_json::Value =
                        serde_json::from_str(&json).map_err(|e| e.to_string())?;
                    total.0 += figures["keys"].as_u64().unwrap_or(0);
                    total.1 += figures["bytes"].as_u64().unwrap_or(0);
                }
                Reply::Error { message, .. } => return Err(message),
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        Ok(total)
    }

    /// A consistent snapshot of the whole node into `dir` (see `Engine::snapshot`): every
    /// shard's tables and manifest in `dir/shard-N`, and the node's identity files.
    pub async fn snapshot_node(&self, dir: &std::path::Path) -> Result<(), String> {
        if !dir.is_absolute() {
            return Err(format!("snapshot directory {} must be an absolute path", dir.display()));
        }
        let storage = self.store.storage();
        if storage.list_dir(dir).await.is_ok() {
            return Err(format!("snapshot directory {} exists already", dir.display()));
        }
        let data_dir = self.data_dir.clone();
        storage.create_dir_all(dir).await.map_err(|error| format!("creating {}: {error}", dir.display()))?;
        for target in 0..self.count {
            let shard_dir = dir.join(format!("shard-{target}"));
            let reply = if target == self.index {
                self.store.apply(Command::SnapshotShard { dir: shard_dir }).await
            } else {
                match &self.mesh {
                    Some(mesh) => mesh
                        .forward(target, Command::SnapshotShard { dir: shard_dir })
                        .await
                        .map_value(Rc::from),
                    None => Reply::error(Status::INTERNAL, "no mesh"),
                }
            };
            match reply {
                Reply::Done => {}
                Reply::Error { message, .. }
                    if message.contains("Invalid cross-device link") || message.contains("os error 18") =>
                {
                    return Err(format!(
                        "{}: the snapshot directory must be on the data directory's file system (hard links)",
                        dir.display()
                    ));
                }
                Reply::Error { message, .. } => return Err(message),
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        for name in [crate::meta::NODE_FILE, "MODE", crate::cluster::membership::CLUSTER_FILE] {
            match crate::storage::copy_file(storage, &data_dir.join(name), &dir.join(name)).await {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("copying {name}: {error}"))
                }
                _ => {}
            }
        }
        storage.sync_dir(dir).await.map_err(|error| error.to_string())?;
        if let Some(parent) = dir.parent() {
            storage.sync_dir(parent).await.map_err(|error| error.to_string())?;
        }
        Ok(())
    }

    /// Runs `command`, whose key this shard owns: on the store, or as the key's
    /// coordinator or replica in the cluster.
    pub async fn apply_here(self: &Rc<Self>, command: Command) -> LocalReply {
        match command {
            Command::Write { key, value, ttl_ms, context, consistency, timeout_ms } => {
                let timeout = Duration::from_millis(timeout_ms);
                replication::coordinate_write(self, key, value, ttl_ms, context, consistency, timeout).await
            }
            Command::Read { key, metadata_only, sibling_skip, shown_before, consistency, timeout_ms } => {
                let timeout = Duration::from_millis(timeout_ms);
                let page = replication::Page { metadata_only, sibling_skip, shown_before };
                replication::coordinate_read(self, key, page, consistency, timeout).await
            }
            Command::Serial { key, op, commit, timeout_ms } => {
                let timeout = Duration::from_millis(timeout_ms);
                crate::cluster::serial::coordinate(self, key, op, commit, timeout).await
            }
            Command::Paxos { key, phase, ballot, proposal, ring_version } => {
                crate::cluster::serial::accept(self, &key, phase, ballot, &proposal, ring_version).await
            }
            Command::Replicate { key, versions } => replication::replicate(self, &key, &versions).await,
            Command::ReadReplica { key } => replication::read_replica(self, &key).await,
            Command::ShardStats => Reply::Stats(self.stats_json()),
            Command::TransferShard { partition, sources } => {
                match crate::cluster::anti_entropy::pull_partition(self, partition, &sources).await {
                    Ok((keys, bytes)) => {
                        Reply::Stats(serde_json::json!({"keys": keys, "bytes": bytes}).to_string())
                    }
                    Err(message) => Reply::error(Status::UNAVAILABLE, message),
                }
            }
            Command::RepairShard => {
                let report = crate::cluster::anti_entropy::repair_now(self).await;
                Reply::Stats(serde_json::to_string(&report).unwrap_or_default())
            }
            // A cluster's keys change only through a coordinator (`Serial` for these).
            Command::Update { .. } | Command::Cas { .. } if self.cluster.is_some() => {
                Reply::error(Status::INTERNAL, "a standalone update reached a cluster node")
            }
            command => self.store.apply(command).await,
        }
    }
}
