//! Command-line flags of `kvbench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// kv's FlatBuffers protocol, through the `client` crate.
    Native,
    /// The Redis protocol (RESP2), for Redis and RESP front doors.
    Resp,
    /// etcd's v3 JSON gateway over HTTP/1.1 (`/v3/kv/range`, `put`, `txn` for CAS): the
    /// baseline for linearizable CAS.
    Etcd,
}

#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "kvbench", version, about = "Load generator for kv and Redis-protocol servers")]
pub struct Args {
    #[arg(long, value_enum, default_value = "native")]
    pub protocol: Protocol,
    /// Server address; a comma-separated list spreads the connections over several nodes
    /// of a cluster (each node coordinates what it receives).
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub addr: String,
    /// Native protocol: replicas that must answer in a cluster (one, quorum, all, serial).
    #[arg(long, default_value = "quorum")]
    pub consistency: String,
    /// Connections (native: client instances; each opens one connection per shard when shard-aware).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16)]
    pub pipeline: usize,
    /// Open loop at this many operations per second (0: closed loop, as fast as replies come).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Fraction of operations that are reads.
    #[arg(long, default_value_t = 0.7)]
    pub read_ratio: f64,
    /// Fraction of writes that are compare-and-swap.
    #[arg(long, default_value_t = 0.0)]
    pub cas_ratio: f64,
    /// Fraction of PUTs that carry a TTL (of --ttl).
    #[arg(long, default_value_t = 0.0)]
    pub ttl_ratio: f64,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "as_secs")]
    pub ttl: Duration,
    #[arg(long, default_value_t = 100)]
    pub key_size: usize,
    /// Value size in bytes: N, or MIN-MAX for a uniform distribution.
    #[arg(long, default_value = "1000")]
    pub value_size: String,
    /// Key space; preloaded before the run so that reads hit.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Skip the preload (reads of absent keys count as misses).
    #[arg(long)]
    pub no_preload: bool,
    /// Only preload (every key written once, in order), report its throughput and stop: the
    /// load phase of the storage-engine benchmark.
    #[arg(long, conflicts_with = "no_preload")]
    pub preload_only: bool,
    /// uniform, or zipf:THETA (e.g. zipf:0.99).
    #[arg(long, default_value = "uniform")]
    pub distribution: String,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "as_secs")]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "as_secs")]
    pub warmup: Duration,
    /// Request deadline; later replies count as timeouts.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "as_secs")]
    pub timeout: Duration,
    /// Native protocol: route each key to its shard's own port.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub shard_aware: bool,
    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// PIDs of server processes whose CPU use to report.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Write the results as JSON to FILE.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the latency percentile distribution (HdrHistogram text format) to FILE.
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Open-loop runs at rising rates until p99 exceeds --target-p99-ms; writes the curve to
    /// --json and an SVG plot next to it (or sweep.svg).
    #[arg(long)]
    pub sweep: bool,
    #[arg(long, default_value_t = 1.0)]
    pub target_p99_ms: f64,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Random seed of the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

fn as_secs<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// "250ms", "30s", "5m"; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("not a duration: {text:?}"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}")),
    };
    Ok(Duration::from_secs_f64(seconds))
}
