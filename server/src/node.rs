//! The `kvd` process: flags, data directory, listeners, one pinned executor per shard,
//! signals and shutdown. The main thread only sets up and waits; shards do all the work.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use glommio::{LocalExecutorBuilder, Placement};
use schema::{HelloInfo, ShardFunction, PROTOCOL_VERSION, SHARD_HASH_SEED};
use socket2::{Domain, Socket, Type};

pub use crate::args::{Args, Command, ConfigAction};
use crate::cluster::gossip::GossipConfig;
use crate::cluster::membership::ClusterOptions;
use crate::launch::{self, ClusterLaunch, ShardLaunch};
use crate::meta;
use crate::shard::ConnectionLimits;

/// Upper bound on shards per node (and so on executor threads).
pub const SHARD_COUNT_MAX: usize = 256;

/// The addresses a running node bound, written to `DATA_DIR/ports.json` once it serves.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Ports {
    pub client: SocketAddr,
    pub shards: Vec<SocketAddr>,
    /// The RESP address, when `--resp-listen` is given.
    #[serde(default)]
    pub resp: Option<SocketAddr>,
    /// The metrics address, when `--metrics-listen` is given.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    pub pid: u32,
    pub node_id: String,
}

pub const PORTS_FILE: &str = "ports.json";

fn reuse_port_listener(address: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into()).with_context(|| format!("binding {address}"))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Raises the soft open-file limit to the hard one: every connection costs a descriptor.
fn raise_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write and read the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

fn write_ports(data_dir: &Path, ports: &Ports) -> anyhow::Result<()> {
    let temporary = data_dir.join("ports.json.tmp");
    fs::write(&temporary, serde_json::to_vec_pretty(ports)?)?;
    fs::rename(&temporary, data_dir.join(PORTS_FILE))?;
    Ok(())
}

/// The mode a data directory was first started in; the other is refused, since a cluster
/// node stores versions where a standalone node stores plain values.
const MODE_FILE: &str = "MODE";

fn check_mode(data_dir: &Path, clustered: bool) -> anyhow::Result<()> {
    let mode = if clustered { "cluster" } else { "standalone" };
    let path = data_dir.join(MODE_FILE);
    match fs::read_to_string(&path) {
        Ok(recorded) if recorded.trim() == mode => Ok(()),
        Ok(recorded) => bail!(
            "{} holds a {} node's data; refusing to start it as a {mode} node{}",
            data_dir.display(),
            recorded.trim(),
            if clustered { "" } else { " (start it with --seeds or --cluster-size)" }
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let temporary = data_dir.join("MODE.tmp");
            fs::write(&temporary, format!("{mode}\n"))?;
            fs::File::open(&temporary)?.sync_all()?;
            fs::rename(&temporary, &path)?;
            fs::File::open(data_dir)?.sync_all()?;
            Ok(())
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// The demo's RESP ports start 21 below the first client port (7379 for 7400), clear of
/// every node's client and shard ports.
fn demo_resp_port(first_client_port: u16) -> u16 {
    first_client_port.saturating_sub(21).max(1)
}

/// `kvd demo --nodes n` with n > 1: one child `kvd` per node, all on this machine.
fn run_demo_cluster(args: &Args, nodes: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the kvd executable")?;
    let base = args.data_dir.clone().unwrap_or_else(|| PathBuf::from("kvd-demo"));
    let ip = args.listen.ip();
    let first_port = args.listen.port();
    let address = |i: usize| SocketAddr::new(ip, first_port + 10 * i as u16);
    let resp_address = |i: usize| SocketAddr::new(ip, demo_resp_port(first_port) + i as u16);
    let signals = termination_signals();
    // SAFETY: blocks the signals in this thread (children get a fresh mask from exec).
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    let mut children = Vec::new();
    for i in 0..nodes {
        // A demo killed outright (SIGKILL) takes its nodes with it: each gets SIGTERM and
        // shuts down as on Ctrl-C.
        let mut command = crate::child::command_ending_with_parent(&exe, libc::SIGTERM);
        command
            .arg("--listen")
            .arg(address(i).to_string())
            .arg("--data-dir")
            .arg(base.join(format!("node-{}", i + 1)))
            .arg("--cluster-size")
            .arg(nodes.to_string())
            .arg("--replicas")
            .arg(args.replicas.min(nodes).to_string())
            .arg("--fsync")
            .arg(args.fsync.to_string());
        if i > 0 {
            command.arg("--seeds").arg(address(0).to_string());
        }
        command.arg("--resp-listen").arg(resp_address(i).to_string());
        if let Some(shards) = args.shards {
            command.arg("--shards").arg(shards.to_string());
        }
        if args.no_pin || nodes > 1 {
            command.arg("--no-pin");
        }
        children.push(command.spawn().with_context(|| format!("starting node {}", i + 1))?);
    }
    let addresses: Vec<String> = (0..nodes).map(|i| address(i).to_string()).collect();
    println!(
        "\nkvd demo: a {nodes}-node cluster is starting on {} (data in {}).\nTry, from another terminal:\n  \
         cargo run -q -p client --bin kvctl -- status\n  \
         cargo run -q -p client --bin kvctl -- put greeting 'hello world'\n  \
         cargo run -q -p client --bin kvctl -- get greeting --consistency all\n  \
         cargo run -q -p client --bin kvctl -- --addr {} get greeting\n  \
         cargo run -q -p client --bin kvctl -- ring\n  \
         redis-cli -p {} set greeting hi\n\
         Stop with Ctrl-C.",
        addresses.join(", "),
        base.display(),
        addresses.last().map_or("", String::as_str),
        resp_address(0).port(),
    );
    loop {
        let mut signal = 0;
        // SAFETY: sigwait reads the set and writes the signal number into memory we own.
        let result = unsafe { libc::sigwait(&signals, &mut signal) };
        if result == 0 && (signal == libc::SIGTERM || signal == libc::SIGINT) {
            break;
        }
    }
    for child in &children {
        // SAFETY: kill sends a signal to a child we started and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
    for mut child in children {
        let _ = child.wait();
    }
    Ok(())
}

/// Logs go to stderr through `tracing`: human-readable or JSON lines, at `--log-level` unless
/// `RUST_LOG` says otherwise. Nothing logs per request at the default level.
fn init_logging(args: &Args) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) => tracing_subscriber::EnvFilter::try_new(filter),
        Err(_) => tracing_subscriber::EnvFilter::try_new(&args.log_level),
    }
    .map_err(|error| anyhow::anyhow!("--log-level or RUST_LOG: {error}"))?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    let installed = if args.log_format == "json" { builder.json().try_init() } else { builder.try_init() };
    // Already installed (a test calling `run` twice in one process): keep the first.
    let _ = installed;
    Ok(())
}

/// `kvd config check FILE` and `kvd config print`.
fn config_command(args: &Args, action: &ConfigAction) -> anyhow::Result<()> {
    match action {
        ConfigAction::Check { file } => {
            let settings = crate::config::file_args(file)?;
            let mut all = vec!["kvd".to_string()];
            all.extend(settings);
            <Args as Parser>::try_parse_from(all)
                .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
            println!("{}: ok", file.display());
        }
        ConfigAction::Print => print!("{}", crate::config::print(args)),
    }
    Ok(())
}

/// Every listener of the node, bound before any shard starts so that the ports are known.
struct Listeners {
    /// One `SO_REUSEPORT` client listener per shard, on one address.
    client: Vec<TcpListener>,
    client_address: SocketAddr,
    /// Each shard's own port (node-to-node traffic and shard-aware clients).
    shards: Vec<TcpListener>,
    shard_addresses: Vec<SocketAddr>,
    /// RESP: one `SO_REUSEPORT` listener per shard, when `--resp-listen` is given.
    resp: Vec<Option<TcpListener>>,
    resp_address: Option<SocketAddr>,
    metrics: Option<TcpListener>,
    metrics_address: Option<SocketAddr>,
}

fn bind_listeners(args: &Args, shard_count: usize) -> anyhow::Result<Listeners> {
    let first = reuse_port_listener(args.listen)?;
    let client_address = first.local_addr()?;
    let mut client_listeners = vec![first];
    for _ in 1..shard_count {
        client_listeners.push(reuse_port_listener(client_address)?);
    }
    let shard_port_base = match (args.shard_port_base, client_address.port(), args.listen.port()) {
        (Some(0), _, _) => None,
        (Some(base), _, _) => Some(base),
        (None, _, 0) => None,
        (None, port, _) => Some(port + 1),
    };
    let mut shard_listeners = Vec::with_capacity(shard_count);
    for index in 0..shard_count {
        let port = match shard_port_base {
            Some(base) => base.checked_add(index as u16).context("shard port beyond 65535")?,
            None => 0,
        };
        let listener = TcpListener::bind(SocketAddr::new(client_address.ip(), port))
            .with_context(|| format!("binding shard {index} to port {port}"))?;
        shard_listeners.push(listener);
    }
    let shard_addresses: Vec<SocketAddr> =
        shard_listeners.iter().map(TcpListener::local_addr).collect::<Result<_, _>>()?;
    // RESP: one SO_REUSEPORT listener per shard on the same address, as for the client port.
    let mut resp_listeners: Vec<Option<TcpListener>> = (0..shard_count).map(|_| None).collect();
    let mut resp_address = None;
    if let Some(address) = args.resp_listen {
        let first = reuse_port_listener(address)?;
        let bound = first.local_addr()?;
        resp_listeners[0] = Some(first);
        for slot in resp_listeners.iter_mut().skip(1) {
            *slot = Some(reuse_port_listener(bound)?);
        }
        resp_address = Some(bound);
    }
    let metrics_listener = match args.metrics_listen {
        Some(address) => {
            Some(TcpListener::bind(address).with_context(|| format!("binding metrics to {address}"))?)
        }
        None => None,
    };
    let metrics_address = metrics_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    Ok(Listeners {
        client: client_listeners,
        client_address,
        shards: shard_listeners,
        shard_addresses,
        resp: resp_listeners,
        resp_address,
        metrics: metrics_listener,
        metrics_address,
    })
}

/// The cluster settings from the flags (`None` for a standalone node), checked.
fn cluster_options(
    args: &Args,
    clustered: bool,
    client_address: SocketAddr,
) -> anyhow::Result<Option<ClusterOptions>> {
    // The same seed list on every node, this one's own address included, is the usual
    // convention: a seed that is this node is no other node.
    let seeds: Vec<SocketAddr> =
        args.seeds.iter().copied().filter(|&seed| !is_own_address(seed, client_address)).collect();
    let options = clustered.then(|| ClusterOptions {
        cluster_size: args.cluster_size.unwrap_or(seeds.len() + 1),
        replica_count: args.replicas,
        partition_bits: args.partition_bits,
        seeds: seeds.clone(),
        client_port: client_address.port(),
        gossip: GossipConfig {
            interval: Duration::from_millis(args.gossip_interval_ms.max(1)),
            phi_threshold: args.phi_threshold,
            ..GossipConfig::default()
        },
        anti_entropy: crate::cluster::anti_entropy::AntiEntropyOptions {
            interval: Duration::from_millis(args.anti_entropy_interval_ms),
            settle_ms: args.tombstone_grace_s.saturating_mul(1000),
        },
        join: args.join,
        replace: args.replace.clone(),
        stream_bytes_per_s: args.stream_kib_per_s.saturating_mul(1024),
    });
    // A joining node takes the running cluster's replica count and partitions.
    if let Some(options) = options.as_ref().filter(|o| !o.join && o.replace.is_none()) {
        if options.replica_count == 0 || options.replica_count > options.cluster_size {
            bail!(
                "--replicas must be 1..=cluster size ({}), got {}",
                options.cluster_size,
                options.replica_count
            );
        }
        if options.partition_bits == 0 || options.partition_bits > crate::cluster::ring::PARTITION_BITS_MAX {
            bail!("--partition-bits must be 1..={}", crate::cluster::ring::PARTITION_BITS_MAX);
        }
        if 1usize << options.partition_bits < options.cluster_size {
            bail!("--partition-bits {} gives fewer partitions than nodes", options.partition_bits);
        }
    }
    Ok(options)
}

/// Waits for SIGTERM or SIGINT (blocked in every thread). A shard cannot die silently
/// meanwhile: panics abort the process (see the workspace profiles), and the log stays
/// durable through that.
fn wait_for_termination(signals: &libc::sigset_t) {
    loop {
        let mut signal = 0;
        // SAFETY: sigwait reads the set and writes the signal number into memory we own.
        let result = unsafe { libc::sigwait(signals, &mut signal) };
        if result == 0 && (signal == libc::SIGTERM || signal == libc::SIGINT) {
            return;
        }
    }
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    init_logging(&args)?;
    if let Some(Command::Config { action }) = &args.command {
        return config_command(&args, action);
    }
    let demo = matches!(args.command, Some(Command::Demo { .. }));
    if let Some(Command::Demo { nodes }) = args.command {
        if nodes == 0 || nodes > 9 {
            bail!("kvd demo --nodes must be 1..=9");
        }
        if nodes > 1 {
            return run_demo_cluster(&args, nodes);
        }
        if args.resp_listen.is_none() {
            args.resp_listen = Some(SocketAddr::new(args.listen.ip(), demo_resp_port(args.listen.port())));
        }
    }
    let data_dir = match (&args.data_dir, demo) {
        (Some(dir), _) => dir.clone(),
        (None, true) => PathBuf::from("kvd-demo"),
        (None, false) => bail!("--data-dir is required (or run `kvd demo`)"),
    };
    if let Some(shards) = args.shards {
        if shards == 0 || shards > SHARD_COUNT_MAX {
            bail!("--shards must be 1..={SHARD_COUNT_MAX}, got {shards}");
        }
    }
    if args.inflight_max == 0 {
        bail!("--inflight-max must be at least 1");
    }
    fs::create_dir_all(&data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}: create it and make it writable by this user, or pass \
             --data-dir a writable path",
            data_dir.display()
        )
    })?;
    // glommio opens directories relative to no descriptor, so paths must be absolute.
    let data_dir =
        fs::canonicalize(&data_dir).with_context(|| format!("resolving {}", data_dir.display()))?;
    let _lock = meta::lock_data_dir(&data_dir)?;
    let _ = fs::remove_file(data_dir.join(PORTS_FILE));
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let shards_default = std::thread::available_parallelism().map_or(1, |n| n.get()).min(SHARD_COUNT_MAX);
    raise_file_limit();
    for warning in crate::preflight::check(&data_dir, args.connections_max)? {
        tracing::warn!("{warning}");
    }
    let node = meta::load_or_create(&data_dir, args.shards, shards_default)?;
    let clustered = !args.seeds.is_empty()
        || args.cluster_size.is_some()
        || data_dir.join(crate::cluster::membership::CLUSTER_FILE).exists();
    check_mode(&data_dir, clustered)?;
    let shard_count = node.shard_count;
    args.shards = Some(shard_count);

    // Bind everything before any shard starts, so that the ports are known up front.
    let Listeners {
        client: client_listeners,
        client_address,
        shards: shard_listeners,
        shard_addresses,
        resp: resp_listeners,
        resp_address,
        metrics: mut metrics_listener,
        metrics_address,
    } = bind_listeners(&args, shard_count)?;
    let resp_settings = resp_address.map(|address| crate::launch::RespLaunch {
        password: args.requirepass.clone(),
        consistency: args.resp_consistency,
        port: address.port(),
    });
    let hello = HelloInfo {
        protocol_version: PROTOCOL_VERSION,
        node_id: node.node_id.clone(),
        shard_count: shard_count as u16,
        shard_function: ShardFunction::XXH3_64_MULSHIFT,
        shard_hash_seed: SHARD_HASH_SEED,
        client_port: client_address.port(),
        shard_ports: shard_addresses.iter().enumerate().map(|(i, a)| (i as u16, a.port())).collect(),
    };
    let limits = ConnectionLimits {
        inflight_max: args.inflight_max,
        idle_timeout: Duration::from_millis(args.idle_timeout_ms.max(1)),
        frame_timeout: Duration::from_millis(args.frame_timeout_ms.max(1)),
        write_timeout: Duration::from_millis(args.write_timeout_ms.max(1)),
        request_timeout_default: Duration::from_millis(args.request_timeout_ms.max(1)),
        request_timeout_max: Duration::from_secs(600),
    };

    // Block the termination signals in every thread; the main thread takes them with
    // sigtimedwait, so no handler runs on a shard thread.
    let signals = termination_signals();
    // SAFETY: changes this thread's mask, inherited by the shard threads spawned below.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };

    let cluster_options = cluster_options(&args, clustered, client_address)?;
    let gossip_address = shard_addresses[0];
    let mesh = (shard_count > 1).then(|| crate::mesh::builder(shard_count));
    let (ready_sender, ready) = std::sync::mpsc::channel();
    let mut shutdown_senders = Vec::with_capacity(shard_count);
    let mut handles = Vec::with_capacity(shard_count);
    let shard_listeners_iter = client_listeners.into_iter().zip(shard_listeners).zip(resp_listeners);
    for (index, ((client_listener, shard_listener), resp_listener)) in shard_listeners_iter.enumerate() {
        let (shutdown_sender, shutdown) = UnixStream::pair()?;
        shutdown_senders.push(shutdown_sender);
        let launch = ShardLaunch {
            index,
            count: shard_count,
            data_dir: data_dir.clone(),
            policy: args.fsync,
            engine: crate::engine::EngineOptions {
                memory_bytes: (args.memory_per_shard << 20) as usize,
                tombstone_grace_ms: args.tombstone_grace_s.saturating_mul(1000),
            },
            limits,
            connections_max: args.connections_max.div_ceil(shard_count),
            // Never less than one node-to-node frame, which would otherwise wait for good.
            large_buffers_size_max: args.read_buffers_max_mib.max((schema::PEER_FRAME_SIZE_MAX >> 20) + 2)
                << 20,
            hello: hello.clone(),
            client_listener,
            shard_listener,
            resp: resp_listener.zip(resp_settings.clone()),
            metrics: if index == 0 { metrics_listener.take() } else { None },
            mesh: mesh.clone(),
            cluster: cluster_options.clone().map(|options| ClusterLaunch {
                node_name: node.node_id.clone(),
                options,
                gossip_address,
                shard_ports: hello.shard_ports.iter().map(|p| p.1).collect(),
            }),
            ready: ready_sender.clone(),
            shutdown,
        };
        let placement = match (args.no_pin, cores.get(index % cores.len().max(1))) {
            (false, Some(core)) => Placement::Fixed(core.id),
            _ => Placement::Unbound,
        };
        let mut builder = LocalExecutorBuilder::new(placement).name(&format!("kvd-shard-{index}"));
        if args.spin {
            builder = builder.spin_before_park(Duration::from_micros(500));
        }
        let handle = builder
            .spawn(move || launch::run(launch))
            .map_err(|error| anyhow::anyhow!("starting the executor of shard {index}: {error}"))?;
        handles.push(handle);
    }
    drop(ready_sender);

    let mut record_count = 0;
    for _ in 0..shard_count {
        match ready.recv() {
            Ok(Ok(report)) => record_count += report.record_count,
            Ok(Err(error)) => bail!("{error}"),
            Err(_) => bail!("a shard stopped during start-up"),
        }
    }
    let ports = Ports {
        client: client_address,
        shards: shard_addresses,
        resp: resp_address,
        metrics: metrics_address,
        pid: std::process::id(),
        node_id: node.node_id.clone(),
    };
    write_ports(&data_dir, &ports)?;
    tracing::info!(
        "node {} serving on {client_address} ({shard_count} shards, shard ports {:?}, fsync {:?}, \
         {record_count} log records replayed, data in {})",
        node.node_id,
        hello.shard_ports.iter().map(|p| p.1).collect::<Vec<_>>(),
        args.fsync,
        data_dir.display()
    );
    if demo {
        println!(
            "\nkvd demo: a node is serving on {client_address}.\nTry, from another terminal:\n  \
             cargo run -q -p client --bin kvctl -- put greeting 'hello world'\n  \
             cargo run -q -p client --bin kvctl -- get greeting\n  \
             cargo run -q -p client --bin kvctl -- put session abc --ttl 30s\n  \
             cargo run -q -p client --bin kvctl -- ttl session\n  \
             cargo run -q -p client --bin kvctl -- cas greeting --expect 'hello world' 'hi'\n  \
             redis-cli -p {} get greeting\n\
             Data lives in {}. Stop with Ctrl-C.",
            ports.resp.map_or(0, |a| a.port()),
            data_dir.display()
        );
    }

    wait_for_termination(&signals);
    tracing::info!("shutting down");
    drop(shutdown_senders);
    for handle in handles {
        if handle.join().is_err() {
            bail!("a shard failed while shutting down");
        }
    }
    let _ = fs::remove_file(data_dir.join(PORTS_FILE));
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Whether `seed` names this node, which listens on `listen`: the same address, or the same
/// port on an IP of this host when it listens on every address.
fn is_own_address(seed: SocketAddr, listen: SocketAddr) -> bool {
    if seed == listen {
        return true;
    }
    // An IP of this host is one a socket can bind to (every 127/8 address is).
    seed.port() == listen.port()
        && listen.ip().is_unspecified()
        && std::net::UdpSocket::bind(SocketAddr::new(seed.ip(), 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_that_is_this_node_is_recognized() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("address");
        assert!(is_own_address(addr("127.0.0.2:7400"), addr("127.0.0.2:7400")));
        assert!(!is_own_address(addr("127.0.0.3:7400"), addr("127.0.0.2:7400")));
        assert!(is_own_address(addr("127.0.0.3:7400"), addr("0.0.0.0:7400")));
        assert!(!is_own_address(addr("127.0.0.3:7401"), addr("0.0.0.0:7400")));
        // 192.0.2.0/24 is reserved for documentation: never this host's.
        assert!(!is_own_address(addr("192.0.2.1:7400"), addr("0.0.0.0:7400")));
    }
}
