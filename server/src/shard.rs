//! One shard: its store, its listeners, its end of the channel mesh, all on one glommio
//! executor. Nothing here is shared with another thread.

use std::cell::Cell;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::rc::Rc;

use futures_lite::AsyncReadExt;
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use schema::{shard_of, HelloInfo, Status};

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::lease::{CounterLease, LEASE_BLOCK};
use crate::cluster::membership::{ClusterOptions, Membership};
use crate::cluster::peer::PeerPool;
use crate::cluster::replication::{self, actor_of, ClusterShard};
use crate::cluster::view::ClusterView;
use crate::command::{Command, LocalReply, Reply};
use crate::mesh::{Mesh, Message};
use crate::net::connection::ConnectionLimits;
use crate::storage::dma::DmaStorage;
use crate::storage::Storage;
use crate::store::Store;
use crate::wal::{RecoveryReport, ShardIdentity, SyncPolicy};

#[derive(Debug, Default)]
pub struct ShardStats {
    pub request_count: Cell<u64>,
    pub timeout_count: Cell<u64>,
    pub connection_count: Cell<usize>,
    pub refused_connection_count: Cell<u64>,
    /// Requests by operation and status, latency, bytes in and out.
    pub requests: crate::metrics::RequestMetrics,
}

pub struct Shard<S: Storage> {
    pub index: usize,
    pub count: usize,
    pub store: Store<S>,
    pub mesh: Option<Rc<Mesh>>,
    pub hello: HelloInfo,
    pub limits: ConnectionLimits,
    pub connections_max: usize,
    /// Shared by the shard's connections for frames larger than their minimum read buffer.
    pub large_buffer_budget: Rc<glommio::sync::Semaphore>,
    pub stats: ShardStats,
    /// Present when the node is part of a cluster.
    pub cluster: Option<ClusterShard<S>>,
    /// The node's data directory.
    pub data_dir: PathBuf,
}

impl<S: Storage> Shard<S> {
    pub fn owns(&self, key: &[u8]) -> bool {
        shard_of(key, self.count) == self.index
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

/// What a shard needs to take part in a cluster.
pub struct ClusterLaunch {
    pub node_name: String,
    pub options: ClusterOptions,
    /// Shard 0's own address: where gossip reaches this node.
    pub gossip_address: std::net::SocketAddr,
    pub shard_ports: Vec<u16>,
}

fn hello_ip(cluster: &Option<ClusterLaunch>) -> std::net::IpAddr {
    cluster.as_ref().map_or(std::net::IpAddr::from([0, 0, 0, 0]), |launch| launch.gossip_address.ip())
}

/// What a shard needs to serve RESP.
#[derive(Debug, Clone)]
pub struct RespLaunch {
    pub password: Option<String>,
    pub consistency: crate::resp::store_ops::RespConsistency,
    pub port: u16,
}

/// Everything a shard thread needs, prepared by the main thread.
pub struct ShardLaunch {
    pub index: usize,
    pub count: usize,
    pub data_dir: PathBuf,
    pub policy: SyncPolicy,
    pub engine: crate::engine::EngineOptions,
    pub limits: ConnectionLimits,
    pub connections_max: usize,
    /// Bytes of read buffers beyond their minimum that the shard's connections may hold.
    pub large_buffers_size_max: usize,
    pub hello: HelloInfo,
    /// Bound and listening; the shared client port (SO_REUSEPORT) and the shard's own.
    pub client_listener: std::net::TcpListener,
    pub shard_listener: std::net::TcpListener,
    /// Shard 0 only: the `--metrics-listen` listener.
    pub metrics: Option<std::net::TcpListener>,
    /// The RESP listener (`--resp-listen`), bound and listening, with its settings.
    pub resp: Option<(std::net::TcpListener, RespLaunch)>,
    pub mesh: Option<MeshBuilder<Message, Full>>,
    pub cluster: Option<ClusterLaunch>,
    pub ready: std::sync::mpsc::Sender<Result<RecoveryReport, String>>,
    /// Readable (or closed) when the node must shut down.
    pub shutdown: std::os::unix::net::UnixStream,
}

fn listener(std_listener: std::net::TcpListener) -> glommio::net::TcpListener {
    // SAFETY: the descriptor is a bound, listening TCP socket whose ownership `into_raw_fd`
    // just gave up, so the glommio listener becomes its only owner.
    unsafe { glommio::net::TcpListener::from_raw_fd(std_listener.into_raw_fd()) }
}

/// Runs one shard until shutdown. Start-up errors go to `launch.ready`.
pub async fn run(launch: ShardLaunch) {
    let ShardLaunch {
        index,
        count,
        data_dir,
        policy,
        engine,
        limits,
        connections_max,
        large_buffers_size_max,
        hello,
        client_listener,
        shard_listener,
        metrics,
        resp,
        mesh,
        cluster,
        ready,
        shutdown,
    } = launch;
    let storage = match DmaStorage::new(&data_dir.join(crate::meta::NODE_FILE)).await {
        Ok(storage) => storage,
        Err(error) => {
            let _ = ready.send(Err(format!("shard {index}: opening the data directory: {error}")));
            return;
        }
    };
    let identity = ShardIdentity { shard_index: index as u32, shard_count: count as u32 };
    let shard_dir = data_dir.join(format!("shard-{index}"));
    let (store, report) = match Store::open(storage.clone(), &shard_dir, identity, policy, engine).await {
        Ok(opened) => opened,
        Err(error) => {
            let _ = ready.send(Err(format!("shard {index}: recovery failed: {error}")));
            return;
        }
    };
    let (mesh, receivers) = match mesh {
        Some(builder) => match Mesh::join(builder, index, count).await {
            Ok((mesh, receivers)) => (Some(mesh), Some(receivers)),
            Err(error) => {
                let _ = ready.send(Err(format!("shard {index}: {error:#}")));
                return;
            }
        },
        None => (None, None),
    };
    let peers = Rc::new(PeerPool::new(hello_ip(&cluster)));
    let cluster_shard = match &cluster {
        Some(launch) => match CounterLease::open(storage.clone(), &shard_dir, LEASE_BLOCK).await {
            Ok(lease) => {
                let view =
                    Arc::new(ClusterView::forming(launch.node_name.clone(), "the cluster is forming".into()));
                let anti_entropy = launch.options.anti_entropy;
                let actor = actor_of(&launch.node_name);
                let opened = ClusterShard::open(
                    storage.clone(),
                    actor,
                    view,
                    peers.clone(),
                    lease,
                    &shard_dir,
                    anti_entropy,
                );
                match opened.await {
                    Ok(cluster) => Some(cluster),
                    Err(error) => {
                        let _ = ready.send(Err(format!("shard {index}: opening the hint log: {error}")));
                        return;
                    }
                }
            }
            Err(error) => {
                let _ = ready.send(Err(format!("shard {index}: opening the counter lease: {error}")));
                return;
            }
        },
        None => None,
    };
    let shard = Rc::new(Shard {
        index,
        count,
        store,
        mesh: mesh.clone(),
        hello,
        limits,
        connections_max,
        large_buffer_budget: Rc::new(glommio::sync::Semaphore::new(large_buffers_size_max as u64)),
        stats: ShardStats::default(),
        cluster: cluster_shard,
        data_dir: data_dir.clone(),
    });
    let mesh_task = match (mesh, receivers) {
        (Some(mesh), Some(receivers)) => {
            let served = shard.clone();
            let execute = move |command| {
                let shard = served.clone();
                async move { shard.apply_here(command).await.map_value(|value| value.to_vec()) }
            };
            let viewer = Rc::downgrade(&shard);
            let on_view = move |view| {
                if let Some(cluster) = viewer.upgrade().as_ref().and_then(|s| s.cluster.as_ref()) {
                    cluster.set_view(view);
                }
            };
            Some(glommio::spawn_local(mesh.serve(receivers, execute, on_view)))
        }
        _ => None,
    };
    let mut accept_tasks = vec![
        glommio::spawn_local(crate::net::accept_loop(listener(client_listener), shard.clone())),
        glommio::spawn_local(crate::net::accept_loop(listener(shard_listener), shard.clone())),
    ];
    if let Some(metrics_listener) = metrics {
        accept_tasks
            .push(glommio::spawn_local(crate::metrics::serve(listener(metrics_listener), shard.clone())));
    }
    if let Some((resp_listener, launch)) = resp {
        let settings = Rc::new(crate::resp::commands::RespSettings {
            password: launch.password,
            access: crate::resp::store_ops::Access {
                consistency: launch.consistency,
                timeout: limits.request_timeout_default,
            },
            started: std::time::Instant::now(),
            port: launch.port,
        });
        accept_tasks.push(glommio::spawn_local(crate::resp::connection::accept_loop(
            listener(resp_listener),
            shard.clone(),
            settings,
        )));
    }
    let mut cluster_tasks = Vec::new();
    if let (Some(launch), Some(cluster_shard)) = (cluster, &shard.cluster) {
        cluster_tasks.push(glommio::spawn_local(replication::replay_hints(shard.clone())));
        cluster_tasks.push(glommio::spawn_local(replication::flush_hint_log(shard.clone())));
        // Few shares: request handling comes first (flush has 250, compaction 50).
        let background = glommio::executor().create_task_queue(
            glommio::Shares::Static(50),
            glommio::Latency::NotImportant,
            "anti-entropy",
        );
        let tasks = [
            glommio::spawn_local_into(crate::cluster::anti_entropy::run(shard.clone()), background),
            glommio::spawn_local_into(
                crate::cluster::anti_entropy::drop_moved_ranges(shard.clone()),
                background,
            ),
        ];
        for task in tasks {
            match task {
                Ok(task) => cluster_tasks.push(task),
                Err(error) => {
                    let _ = ready.send(Err(format!("shard {index}: starting anti-entropy: {error}")));
                    return;
                }
            }
        }
        if index == 0 {
            let weak = Rc::downgrade(&shard);
            let publish = Box::new(move |view: Arc<ClusterView>| {
                let Some(shard) = weak.upgrade() else { return };
                if let Some(mesh) = &shard.mesh {
                    mesh.broadcast_view(view.clone());
                }
                if let Some(cluster) = &shard.cluster {
                    cluster.set_view(view);
                }
            });
            let membership = Membership::open(
                storage.clone(),
                launch.node_name,
                launch.gossip_address,
                launch.shard_ports,
                launch.options,
                &data_dir,
                peers.clone(),
                publish,
            )
            .await;
            match membership {
                Ok(membership) => {
                    let membership = Rc::new(membership);
                    *cluster_shard.membership.borrow_mut() = Some(membership.clone());
                    cluster_tasks.push(glommio::spawn_local(membership.clone().run()));
                    cluster_tasks.push(glommio::spawn_local(announce_load(shard.clone(), membership)));
                }
                Err(error) => {
                    let _ = ready.send(Err(format!("cluster membership: {error:#}")));
                    return;
                }
            }
        }
    }
    let _ = ready.send(Ok(report));

    // SAFETY: as above, ownership of the descriptor moves to the glommio stream.
    let mut shutdown = unsafe { glommio::net::UnixStream::from_raw_fd(shutdown.into_raw_fd()) };
    let mut byte = [0u8; 1];
    let _ = shutdown.read(&mut byte).await;

    drop(accept_tasks);
    drop(cluster_tasks);
    if let Err(error) = shard.store.close().await {
        tracing::error!(shard = index, "closing the log: {error}");
    }
    if let Some(mesh) = &shard.mesh {
        mesh.close();
    }
    drop(mesh_task);
}

/// How often shard 0 sums the node's stored bytes for gossip (`kvctl status` LOAD_BYTES).
const LOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The bytes a shard's engine holds: memtables (not yet flushed) and tables.
fn engine_load_bytes(engine: &serde_json::Value) -> u64 {
    ["memtable_bytes", "immutable_memtable_bytes", "table_bytes"]
        .iter()
        .filter_map(|field| engine[field].as_u64())
        .sum()
}

/// Shard 0: every `LOAD_INTERVAL`, the node's load (every shard's engine bytes, gathered over
/// the mesh) goes into this node's gossip state, forever.
async fn announce_load<S: Storage>(shard: Rc<Shard<S>>, membership: Rc<Membership<S>>) {
    loop {
        let mut load_bytes = engine_load_bytes(&shard.stats_value()["engine"]);
        if let Some(mesh) = &shard.mesh {
            for target in (0..shard.count).filter(|&t| t != shard.index) {
                if let Reply::Stats(text) = mesh.forward(target, Command::ShardStats).await {
                    if let Ok(stats) = serde_json::from_str::<serde_json::Value>(&text) {
                        load_bytes += engine_load_bytes(&stats["engine"]);
                    }
                }
            }
        }
        membership.set_load(load_bytes);
        glommio::timer::sleep(LOAD_INTERVAL).await;
    }
}
