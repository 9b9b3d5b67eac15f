//! What the operator sets for the cluster runtime (from flags), and the anti-entropy
//! counters every shard keeps.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

use super::gossip::GossipConfig;

/// What the operator chose, from flags.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Nodes the cluster forms with.
    pub cluster_size: usize,
    pub replica_count: usize,
    pub partition_bits: u32,
    /// Other nodes' client addresses.
    pub seeds: Vec<SocketAddr>,
    /// This node's client port (--listen), announced in gossip for `kvctl status`.
    pub client_port: u16,
    pub gossip: GossipConfig,
    pub anti_entropy: AntiEntropyOptions,
    /// Join the running cluster the seeds belong to.
    pub join: bool,
    /// Join in place of this dead member.
    pub replace: Option<String>,
    /// Transfers a change driven by this node copy at most this many bytes a second.
    pub stream_bytes_per_s: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct AntiEntropyOptions {
    /// One pass over the shard's partitions takes this long; zero turns the background
    /// passes off (`kvctl repair` still runs one).
    pub interval: Duration,
    /// A key dead (tombstones and expired values only) for this long is settled: it no longer
    /// takes part in comparisons, and may be purged once every replica agrees.
    pub settle_ms: u64,
}

impl Default for AntiEntropyOptions {
    fn default() -> Self {
        AntiEntropyOptions { interval: Duration::from_secs(60), settle_ms: 3_600_000 }
    }
}

#[derive(Debug, Default)]
pub struct AntiEntropyStats {
    pub passes: Cell<u64>,
    pub partitions_compared: Cell<u64>,
    pub partitions_differing: Cell<u64>,
    pub keys_repaired: Cell<u64>,
    pub tombstones_purged: Cell<u64>,
    pub last_pass_ms: Cell<u64>,
    /// Copied onto this shard by ring-change transfers.
    pub streamed_bytes: Cell<u64>,
    pub streamed_keys: Cell<u64>,
    /// Dropped after a ring change moved their ranges elsewhere.
    pub moved_keys_dropped: Cell<u64>,
}
