//! Starting a shard on its own thread: its storage and store, its part of the cluster (peer
//! links, counter lease, hints, membership on shard 0), the channel mesh, the client, RESP and
//! metrics listeners, and the background tasks; then serving until the node shuts down.

use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use futures_lite::AsyncReadExt;
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use schema::HelloInfo;

use crate::cluster::lease::{CounterLease, LEASE_BLOCK};
use crate::cluster::membership::{ClusterOptions, Membership};
use crate::cluster::peer::PeerPool;
use crate::cluster::replication::{self, actor_of, ClusterShard};
use crate::cluster::view::ClusterView;
use crate::command::{Command, Reply};
use crate::mesh::{Mesh, Message};
use crate::shard::{ConnectionLimits, Shard, ShardParts};
use crate::storage::dma::DmaStorage;
use crate::storage::Storage;
use crate::store::Store;
use crate::wal::{RecoveryReport, ShardIdentity, SyncPolicy};

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
    let shard = Rc::new(Shard::new(ShardParts {
        index,
        count,
        store,
        mesh: mesh.clone(),
        hello,
        limits,
        connections_max,
        large_buffer_budget: Rc::new(glommio::sync::Semaphore::new(large_buffers_size_max as u64)),
        cluster: cluster_shard,
        data_dir: data_dir.clone(),
    }));
    let mesh_task = match (mesh, receivers) {
        (Some(mesh), Some(receivers)) => {
            let served = shard.clone();
            let execute = move |command| {
                let shard = served.clone();
                async move { shard.apply_here(command).await.map_value(|value| value.to_vec()) }
            };
            let viewer = Rc::downgrade(&shard);
            let on_view = move |view| {
                if let Some(cluster) = viewer.upgrade().as_ref().and_then(|s| s.cluster()) {
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
        accept_tasks.push(glommio::spawn_local(crate::metrics_server::serve(
            listener(metrics_listener),
            shard.clone(),
        )));
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
    let cluster_tasks = match cluster {
        Some(launch) => {
            match start_cluster_tasks(&shard, launch, storage.clone(), &data_dir, peers.clone()).await {
                Ok(tasks) => tasks,
                Err(error) => {
                    let _ = ready.send(Err(format!("shard {index}: {error}")));
                    return;
                }
            }
        }
        None => Vec::new(),
    };
    let _ = ready.send(Ok(report));

    // SAFETY: as above, ownership of the descriptor moves to the glommio stream.
    let mut shutdown = unsafe { glommio::net::UnixStream::from_raw_fd(shutdown.into_raw_fd()) };
    let mut byte = [0u8; 1];
    let _ = shutdown.read(&mut byte).await;

    drop(accept_tasks);
    drop(cluster_tasks);
    if let Err(error) = shard.store().close().await {
        tracing::error!(shard = index, "closing the log: {error}");
    }
    if let Some(mesh) = shard.mesh() {
        mesh.close();
    }
    drop(mesh_task);
}

/// The cluster's background tasks of a shard: hint replay and logging, anti-entropy and the
/// dropping of moved ranges (in a low-share queue), and on shard 0 the membership driver and
/// the load announcements. Dropping the tasks cancels them (at shutdown).
async fn start_cluster_tasks<S: Storage>(
    shard: &Rc<Shard<S>>,
    launch: ClusterLaunch,
    storage: S,
    data_dir: &std::path::Path,
    peers: Rc<PeerPool>,
) -> Result<Vec<glommio::Task<()>>, String> {
    let Some(cluster_shard) = shard.cluster() else { return Ok(Vec::new()) };
    let mut cluster_tasks = vec![
        glommio::spawn_local(replication::replay_hints(shard.clone())),
        glommio::spawn_local(replication::flush_hint_log(shard.clone())),
    ];
    // Few shares: request handling comes first (flush has 250, compaction 50).
    let background = glommio::executor().create_task_queue(
        glommio::Shares::Static(50),
        glommio::Latency::NotImportant,
        "anti-entropy",
    );
    for task in [
        glommio::spawn_local_into(crate::cluster::anti_entropy::run(shard.clone()), background),
        glommio::spawn_local_into(crate::cluster::anti_entropy::drop_moved_ranges(shard.clone()), background),
    ] {
        cluster_tasks.push(task.map_err(|error| format!("starting anti-entropy: {error}"))?);
    }
    if shard.index() == 0 {
        let weak = Rc::downgrade(shard);
        let publish = Box::new(move |view: Arc<ClusterView>| {
            let Some(shard) = weak.upgrade() else { return };
            if let Some(mesh) = shard.mesh() {
                mesh.broadcast_view(view.clone());
            }
            if let Some(cluster) = shard.cluster() {
                cluster.set_view(view);
            }
        });
        let membership = Membership::open(
            storage,
            launch.node_name,
            launch.gossip_address,
            launch.shard_ports,
            launch.options,
            data_dir,
            peers,
            publish,
        )
        .await
        .map_err(|error| format!("cluster membership: {error:#}"))?;
        let membership = Rc::new(membership);
        *cluster_shard.membership.borrow_mut() = Some(membership.clone());
        cluster_tasks.push(glommio::spawn_local(membership.clone().run()));
        cluster_tasks.push(glommio::spawn_local(announce_load(shard.clone(), membership)));
    }
    Ok(cluster_tasks)
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
        if let Some(mesh) = shard.mesh() {
            for target in (0..shard.count()).filter(|&t| t != shard.index()) {
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
