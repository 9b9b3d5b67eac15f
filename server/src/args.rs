//! `kvd`'s flags and subcommands (clap), apart from what they start (`node.rs`), so that the
//! config file's reader (`config.rs`) needs nothing else.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::wal::SyncPolicy;

#[derive(Debug, Parser)]
#[command(
    name = "kvd",
    version,
    about = "kv node: a thread-per-core key-value server",
    args_override_self = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// A TOML file of settings: any long flag as a key (`memory_per_shard = 512`); flags on
    /// the command line override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Client address, served by every shard (SO_REUSEPORT). Port 0 picks a free port.
    #[arg(long, global = true, default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// First port of the shards' own ports (shard i listens on base + i); 0 picks free
    /// ports. Default: the client port + 1, or free ports when the client port is 0.
    #[arg(long, global = true)]
    pub shard_port_base: Option<u16>,
    /// Data directory (created if missing).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Number of shards. Default: the count recorded in the data directory, else all cores.
    #[arg(long, global = true)]
    pub shards: Option<usize>,
    /// Do not pin shard threads to cores (for machines shared with other work).
    #[arg(long, global = true)]
    pub no_pin: bool,
    /// Spin briefly before sleeping: lower cross-core latency, but an idle core burns CPU.
    #[arg(long, global = true)]
    pub spin: bool,
    /// When a write is acknowledged: always (after fdatasync), interval:MS, or never.
    #[arg(long, global = true, default_value = "always")]
    pub fsync: SyncPolicy,
    /// Requests one connection may have in flight before the server stops reading it.
    #[arg(long, global = true, default_value_t = 1024)]
    pub inflight_max: usize,
    /// Open client connections per node; more are closed at once.
    #[arg(long, global = true, default_value_t = 16384)]
    pub connections_max: usize,
    /// A connection that sends nothing for this long is closed.
    #[arg(long, global = true, default_value_t = 300_000)]
    pub idle_timeout_ms: u64,
    /// MiB of read buffers for frames larger than 8 KiB that one shard's connections may hold
    /// together; beyond it a connection waits before reading more.
    #[arg(long, global = true, default_value_t = 256)]
    pub read_buffers_max_mib: usize,
    /// A frame must arrive within this long once its first bytes have.
    #[arg(long, global = true, default_value_t = 30_000)]
    pub frame_timeout_ms: u64,
    /// A connection whose client does not take replies for this long is closed.
    #[arg(long, global = true, default_value_t = 30_000)]
    pub write_timeout_ms: u64,
    /// Server-side deadline of a request that names none.
    #[arg(long, global = true, default_value_t = 5_000)]
    pub request_timeout_ms: u64,
    /// MiB of memory each shard's storage engine may use: two memtables of an eighth each,
    /// bloom filters and table indexes, and a block cache with the rest.
    #[arg(long, global = true, default_value_t = 256, value_parser = clap::value_parser!(u64).range(4..))]
    pub memory_per_shard: u64,
    /// Seconds a tombstone or an expired value is kept before compaction may drop it.
    #[arg(long, global = true, default_value_t = 3_600)]
    pub tombstone_grace_s: u64,
    /// Other nodes' client addresses (their --listen), comma-separated: form or join a cluster
    /// with them. Without --seeds and --cluster-size the node is standalone.
    #[arg(long, global = true, value_delimiter = ',')]
    pub seeds: Vec<SocketAddr>,
    /// Nodes the cluster forms with (default: the seeds plus this node).
    #[arg(long, global = true)]
    pub cluster_size: Option<usize>,
    /// Replicas of every key (N), fixed when the cluster forms.
    #[arg(long, global = true, default_value_t = 3)]
    pub replicas: usize,
    /// The ring has 2^bits partitions (virtual nodes), fixed when the cluster forms.
    #[arg(long, global = true, default_value_t = crate::cluster::ring::PARTITION_BITS_DEFAULT)]
    pub partition_bits: u32,
    /// Join the running cluster the seeds belong to: take a balanced share of partitions,
    /// copy them from their current replicas, then serve them (see `kvctl status`).
    #[arg(long, global = true)]
    pub join: bool,
    /// Join in place of this dead member (its node id, as `kvctl status` shows it): take its
    /// partitions and copy them from the surviving replicas.
    #[arg(long, global = true)]
    pub replace: Option<String>,
    /// KiB a second at most that the transfers of a ring change this node drives copy (a
    /// join, replacement, decommission or removal).
    #[arg(long, global = true, default_value_t = 65_536)]
    pub stream_kib_per_s: u64,
    /// Milliseconds one anti-entropy pass over a shard's partitions takes (the comparisons are
    /// spread over it); 0 turns the background passes off (`kvctl repair` still runs one).
    #[arg(long, global = true, default_value_t = 60_000)]
    pub anti_entropy_interval_ms: u64,
    /// Milliseconds between gossip rounds.
    #[arg(long, global = true, default_value_t = 100)]
    pub gossip_interval_ms: u64,
    /// Serve `GET /metrics` (Prometheus text format) and `GET /health` on this address (from
    /// shard 0). Port 0 picks one (written to ports.json).
    #[arg(long, global = true)]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the Redis protocol (RESP2/RESP3) on this address too, on every shard. Port 0
    /// picks one (written to ports.json).
    #[arg(long, global = true)]
    pub resp_listen: Option<SocketAddr>,
    /// RESP clients must AUTH with this password first (as Redis's requirepass).
    #[arg(long, global = true, env = "KVD_REQUIREPASS")]
    pub requirepass: Option<String>,
    /// Consistency of RESP reads and writes in a cluster: one, quorum or all (plain reads and
    /// writes at that level), or serial (every read and write through the key's Paxos:
    /// linearizable). A connection may change its own with CLIENT CONSISTENCY.
    #[arg(long, global = true, default_value = "quorum", value_parser = parse_resp_consistency)]
    pub resp_consistency: crate::resp::store_ops::RespConsistency,
    /// Log format: human or json (one object per line).
    #[arg(long, global = true, default_value = "human", value_parser = ["human", "json"])]
    pub log_format: String,
    /// Log level (error, warn, info, debug, trace, or a filter such as `server=debug`);
    /// `RUST_LOG` overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// Suspicion level (phi) at which a silent node counts as down.
    #[arg(long, global = true, default_value_t = crate::cluster::failure_detector::PHI_THRESHOLD_DEFAULT)]
    pub phi_threshold: f64,
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Checks a config file: every key known, every value valid; names the bad key and why.
    Check { file: PathBuf },
    /// Prints the effective settings (defaults, `--config` file, flags) as TOML.
    Print,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check or print configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Start a local cluster (nodes on 127.0.0.1:7400, :7410, ...) with data in ./kvd-demo,
    /// and say how to use it.
    Demo {
        /// Nodes to start; 1 starts a standalone node.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
}

fn parse_resp_consistency(text: &str) -> Result<crate::resp::store_ops::RespConsistency, String> {
    crate::resp::store_ops::RespConsistency::parse(text)
        .ok_or_else(|| format!("expected one, quorum, all or serial, got {text:?}"))
}
