//! Metrics: each shard counts its own requests (plain cells on its thread, no atomics on the
//! data path), and `render` writes every shard's figures in the Prometheus text format 0.0.4
//! (`metrics_server.rs` serves them).
//!
//! The exposition is written here rather than with a registry crate: the figures live in
//! per-shard cells gathered as snapshots, which a registry of shared atomic metrics does not
//! model, and the text format is a few lines of escaping and labels.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use schema::Status;
use serde_json::{json, Value};

use crate::command::{Command, LocalReply, Reply};

/// Upper bounds of the latency buckets, in microseconds.
pub const BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    5_000_000,
];

#[derive(Debug, Default)]
struct OpMetrics {
    by_status: Vec<(&'static str, u64)>,
    /// Per bucket (not cumulative); the last counts what is above every bound.
    buckets: [u64; BUCKETS_US.len() + 1],
    sum_us: u64,
    count: u64,
}

/// One shard's request figures.
#[derive(Debug, Default)]
pub struct RequestMetrics {
    ops: RefCell<Vec<(&'static str, OpMetrics)>>,
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
}

pub fn op_name(command: &Command) -> &'static str {
    match command {
        Command::Get { .. } | Command::Read { .. } => "get",
        Command::Put { .. } => "put",
        Command::Delete { .. } => "delete",
        Command::Write { value: Some(_), .. } => "put",
        Command::Write { value: None, .. } => "delete",
        Command::Cas { .. } => "cas",
        Command::Update { .. } => "update",
        Command::Serial { op: ::cluster::serial_op::SerialOp::Read { .. }, .. } => "get",
        Command::Serial { op: ::cluster::serial_op::SerialOp::Cas { .. }, .. } => "cas",
        Command::Serial { op: ::cluster::serial_op::SerialOp::Write { value: Some(_), .. }, .. } => "put",
        Command::Serial { op: ::cluster::serial_op::SerialOp::Write { value: None, .. }, .. } => "delete",
        Command::Serial { .. } => "update",
        Command::Paxos { .. } => "paxos",
        Command::Replicate { .. } => "replicate",
        Command::ReadReplica { .. } => "read_replica",
        Command::EntryCount => "entry_count",
        Command::ShardStats => "shard_stats",
        Command::SnapshotShard { .. } => "snapshot",
        Command::RepairShard => "repair",
        Command::TransferShard { .. } => "transfer",
    }
}

pub fn status_name(reply: &LocalReply) -> &'static str {
    let status = match reply {
        Reply::Done
        | Reply::Written(_)
        | Reply::Found(_)
        | Reply::Versions(_)
        | Reply::Updated(_)
        | Reply::Stats(_) => Status::OK,
        Reply::NotFound => Status::NOT_FOUND,
        Reply::Siblings { versions, omitted: 0, .. } if versions.is_empty() => Status::NOT_FOUND,
        Reply::Siblings { .. } => Status::OK,
        Reply::CasFailed(_) => Status::CAS_FAILED,
        Reply::Error { status, .. } => *status,
    };
    status_label(status)
}

pub fn status_label(status: Status) -> &'static str {
    match status {
        Status::OK => "ok",
        Status::NOT_FOUND => "not_found",
        Status::CAS_FAILED => "cas_failed",
        Status::UNAVAILABLE => "unavailable",
        Status::TIMEOUT => "timeout",
        Status::OVERLOADED => "overloaded",
        Status::NO_SPACE => "no_space",
        Status::UNSUPPORTED => "unsupported",
        Status::INTERNAL => "internal",
        _ => "bad_request",
    }
}

/// The entry named `name` (a literal), added if missing. A short vector searched by address
/// first: the names are string literals, so a lookup is a few comparisons, where a map cost
/// a few hundred instructions per request.
fn named<'a, T: Default>(entries: &'a mut Vec<(&'static str, T)>, name: &'static str) -> &'a mut T {
    let index = match entries.iter().position(|(known, _)| std::ptr::eq(*known, name) || *known == name) {
        Some(index) => index,
        None => {
            entries.push((name, T::default()));
            entries.len() - 1
        }
    };
    &mut entries[index].1
}

impl RequestMetrics {
    pub fn record(&self, op: &'static str, status: &'static str, elapsed: Duration) {
        let mut ops = self.ops.borrow_mut();
        let metrics = named(&mut ops, op);
        *named(&mut metrics.by_status, status) += 1;
        let us = elapsed.as_micros() as u64;
        let bucket = BUCKETS_US.iter().position(|&bound| us <= bound).unwrap_or(BUCKETS_US.len());
        metrics.buckets[bucket] += 1;
        metrics.sum_us += us;
        metrics.count += 1;
    }

    pub fn to_json(&self) -> Value {
        let ops: serde_json::Map<String, Value> = self
            .ops
            .borrow()
            .iter()
            .map(|(op, m)| {
                let value = json!({
                    "by_status": m.by_status.iter().copied().collect::<BTreeMap<_, _>>(),
                    "buckets": m.buckets.to_vec(),
                    "sum_us": m.sum_us,
                    "count": m.count,
                });
                (op.to_string(), value)
            })
            .collect();
        json!({ "ops": ops, "bytes_in": self.bytes_in.get(), "bytes_out": self.bytes_out.get() })
    }
}

fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Every numeric field of a shard's stats (booleans as 0/1), flattened to `a_b_c` names.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, f64)>) {
    match value {
        Value::Number(n) => out.push((prefix.to_string(), n.as_f64().unwrap_or(0.0))),
        Value::Bool(b) => out.push((prefix.to_string(), f64::from(u8::from(*b)))),
        Value::Object(map) => {
            for (key, inner) in map {
                if prefix.is_empty() && matches!(key.as_str(), "shard" | "requests") {
                    continue; // a label, and the request figures rendered on their own
                }
                let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}_{key}") };
                flatten(&name, inner, out);
            }
        }
        _ => {}
    }
}

/// The Prometheus text exposition of every shard's stats object.
pub fn render(node: &str, shards: &[Value]) -> String {
    let mut out = String::new();
    let node = label(node);
    let _ = writeln!(out, "# HELP kvd_requests_total Requests served, by operation and status.");
    let _ = writeln!(out, "# TYPE kvd_requests_total counter");
    for shard in shards {
        let index = shard["shard"].as_u64().unwrap_or(0);
        for (op, m) in shard["requests"]["ops"].as_object().into_iter().flatten() {
            for (status, count) in m["by_status"].as_object().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "kvd_requests_total{{node=\"{node}\",shard=\"{index}\",op=\"{}\",status=\"{}\"}} {}",
                    label(op),
                    label(status),
                    count.as_u64().unwrap_or(0)
                );
            }
        }
    }
    let _ = writeln!(out, "# HELP kvd_request_duration_seconds Time from receipt to reply, by operation.");
    let _ = writeln!(out, "# TYPE kvd_request_duration_seconds histogram");
    for shard in shards {
        let index = shard["shard"].as_u64().unwrap_or(0);
        for (op, m) in shard["requests"]["ops"].as_object().into_iter().flatten() {
            let labels = format!("node=\"{node}\",shard=\"{index}\",op=\"{}\"", label(op));
            let buckets: Vec<u64> =
                m["buckets"].as_array().into_iter().flatten().map(|b| b.as_u64().unwrap_or(0)).collect();
            let mut cumulative = 0;
            for (i, bound) in BUCKETS_US.iter().enumerate() {
                cumulative += buckets.get(i).copied().unwrap_or(0);
                let le = *bound as f64 / 1e6;
                let _ =
                    writeln!(out, "kvd_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let count = m["count"].as_u64().unwrap_or(0);
            let _ = writeln!(out, "kvd_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}");
            let sum = m["sum_us"].as_u64().unwrap_or(0) as f64 / 1e6;
            let _ = writeln!(out, "kvd_request_duration_seconds_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "kvd_request_duration_seconds_count{{{labels}}} {count}");
        }
    }
    // Everything else a shard reports (engine, log, connections, cluster), as gauges.
    let mut series: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for shard in shards {
        let index = shard["shard"].as_u64().unwrap_or(0);
        let mut fields = Vec::new();
        flatten("", shard, &mut fields);
        if let Some(requests) = shard.get("requests") {
            for key in ["bytes_in", "bytes_out"] {
                fields.push((key.to_string(), requests[key].as_f64().unwrap_or(0.0)));
            }
        }
        for (name, value) in fields {
            series.entry(name).or_default().push((index, value));
        }
    }
    for (name, values) in series {
        let metric: String = format!("kvd_{name}")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
            .collect();
        let _ = writeln!(out, "# TYPE {metric} gauge");
        for (index, value) in values {
            let _ = writeln!(out, "{metric}{{node=\"{node}\",shard=\"{index}\"}} {value}");
        }
    }
    out
}
