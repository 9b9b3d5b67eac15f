//! `kvctl`: the command line for data. Exit code 0 on success, 1 when the key is absent or
//! a CAS did not match, 2 on any error.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use client::{CasOutcome, Client, Consistency, Error, Options, Value};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "kvctl", version, about = "Talk to a kv node")]
struct Cli {
    /// Address of the node's client port.
    #[arg(long, global = true, default_value = "127.0.0.1:7400", env = "KV_ADDR")]
    addr: String,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline of the request, e.g. 500ms, 5s.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Replicas that must answer (in a cluster): one, quorum or all.
    #[arg(long, global = true, default_value = "quorum", value_parser = parse_consistency)]
    consistency: Consistency,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct ValueSource {
    /// Read the value from FILE ("-" for standard input) instead of the command line.
    #[arg(long)]
    value_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store VALUE under KEY.
    Put {
        key: String,
        value: Option<String>,
        #[command(flatten)]
        source: ValueSource,
        /// Expire the value after this long, e.g. 30s, 10m, 1h.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Print the value of KEY.
    Get { key: String },
    /// Delete KEY.
    Del { key: String },
    /// Replace the value of KEY with NEW only if it currently is --expect (or absent).
    Cas {
        key: String,
        new: Option<String>,
        #[arg(long, conflicts_with = "expect_absent", required_unless_present = "expect_absent")]
        expect: Option<String>,
        #[arg(long)]
        expect_absent: bool,
        #[command(flatten)]
        source: ValueSource,
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Print the time KEY has left to live.
    Ttl { key: String },
    /// Print every shard's counters and storage-engine figures (amplification, cache hit
    /// ratio, compaction debt) as a JSON array.
    Stats,
    /// Print the cluster's nodes: name, address, up or down, status, load.
    Status,
    /// Print the ring: partitions and the share of the key space each node owns.
    Ring,
    /// Print every sibling of KEY and its causal context (hex), one line each.
    Versions { key: String },
    /// Take a consistent snapshot of the node into DIR (absolute, on the node's data file
    /// system, not existing yet) while it keeps serving. Restore: start kvd on a copy of DIR.
    Snapshot { dir: String },
    /// Compare every partition the node replicates with its other replicas now and repair
    /// what differs (anti-entropy also runs by itself); print what it found and fixed.
    /// Waits at least an hour unless --timeout says longer.
    Repair,
    /// Decommission NODE (a node id, as `status` shows): its ranges stream to their new
    /// owners, then it leaves the ring. Waits at least an hour unless --timeout says longer.
    Decommission { node: String },
    /// Remove the dead NODE: its ranges are copied to their new owners from the surviving
    /// replicas. (To replace it with a new machine instead: start kvd there with --replace.)
    Remove { node: String },
}

/// A JSON report's figures by name (0 when absent).
fn report_figures(report: &str) -> Result<impl Fn(&str) -> u64, client::Error> {
    let report: serde_json::Value =
        serde_json::from_str(report).map_err(|error| client::Error::Protocol(error.to_string()))?;
    Ok(move |name: &str| report.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0))
}

/// "streaming 12/96 ranges, 3.1 MB at 2.0 MB/s, about 40 s left".
fn progress_line(stream: &client::StreamProgress) -> String {
    let seconds = stream.elapsed_ms as f64 / 1000.0;
    let rate = if seconds > 0.0 { stream.bytes as f64 / seconds } else { 0.0 };
    let left = if stream.ranges_done > 0 {
        seconds * f64::from(stream.ranges_total - stream.ranges_done) / f64::from(stream.ranges_done)
    } else {
        f64::NAN
    };
    format!(
        "streaming {}/{} ranges, {:.1} MB at {:.1} MB/s, about {:.0} s left",
        stream.ranges_done,
        stream.ranges_total,
        stream.bytes as f64 / 1e6,
        rate / 1e6,
        left
    )
}

/// A repair pass takes as long as the node's data needs: at least an hour's wait.
fn request_timeout(cli: &Cli) -> Duration {
    match cli.command {
        Command::Repair | Command::Decommission { .. } | Command::Remove { .. } => {
            cli.timeout.max(Duration::from_secs(3600))
        }
        _ => cli.timeout,
    }
}

fn parse_consistency(text: &str) -> Result<Consistency, String> {
    match text.to_ascii_lowercase().as_str() {
        "one" => Ok(Consistency::ONE),
        "quorum" => Ok(Consistency::QUORUM),
        "all" => Ok(Consistency::ALL),
        "serial" => Ok(Consistency::SERIAL),
        _ => Err(format!("expected one, quorum, all or serial, got {text:?}")),
    }
}

fn status_name(status: client::NodeStatus) -> &'static str {
    status.variant_name().map_or("unknown", |name| match name {
        "JOINING" => "joining",
        "NORMAL" => "normal",
        "LEAVING" => "leaving",
        "LEFT" => "left",
        _ => "unknown",
    })
}

/// "250ms", "30s", "5m", "2h", "1d"; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("not a duration: {text:?}"))?;
    let ms_per_unit = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (use ms, s, m, h, d)")),
    };
    number
        .checked_mul(ms_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration too long: {text:?}"))
}

fn read_value(inline: Option<String>, source: &ValueSource) -> anyhow::Result<Vec<u8>> {
    match (inline, &source.value_file) {
        (Some(value), None) => Ok(value.into_bytes()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut value = Vec::new();
            std::io::stdin().take(client::VALUE_SIZE_MAX as u64 + 1).read_to_end(&mut value)?;
            Ok(value)
        }
        (None, Some(path)) => {
            Ok(std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)
        }
        (Some(_), Some(_)) => anyhow::bail!("give the value either inline or with --value-file, not both"),
        (None, None) => anyhow::bail!("missing value (inline or --value-file)"),
    }
}

fn value_json(value: &Value) -> serde_json::Value {
    let ttl_ms = value.ttl_left.map(|ttl| ttl.as_millis() as u64);
    match std::str::from_utf8(&value.value) {
        Ok(text) => json!({"value": text, "timestamp_us": value.timestamp_us, "ttl_ms": ttl_ms}),
        Err(_) => {
            let hex: String = value.value.iter().map(|b| format!("{b:02x}")).collect();
            json!({"value_hex": hex, "timestamp_us": value.timestamp_us, "ttl_ms": ttl_ms})
        }
    }
}

fn print_value(bytes: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    if stdout.is_terminal() {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()
}

enum Outcome {
    Success,
    Absent,
}

fn success(json: bool) -> Outcome {
    if json {
        println!("{}", json!({"status": "ok"}));
    } else {
        println!("OK");
    }
    Outcome::Success
}

fn not_found(json: bool) -> Outcome {
    if json {
        println!("{}", json!({"status": "not_found"}));
    } else {
        eprintln!("(not found)");
    }
    Outcome::Absent
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    // One request needs one connection; stats asks every shard on its own port.
    let shard_aware = matches!(cli.command, Command::Stats);
    let options = Options {
        timeout: request_timeout(&cli),
        shard_aware,
        consistency: cli.consistency,
        ..Options::default()
    };
    let client = Client::connect(cli.addr.as_str(), options).await?;
    let json = cli.json;
    let cli_command_is_remove = matches!(cli.command, Command::Remove { .. });
    match cli.command {
        Command::Put { key, value, source, ttl } => {
            let value = read_value(value, &source)?;
            client.put_with_ttl(key.as_bytes(), &value, ttl).await?;
            Ok(success(json))
        }
        Command::Get { key } => match client.get(key.as_bytes()).await? {
            Some(value) => {
                if json {
                    println!("{}", value_json(&value));
                } else {
                    print_value(&value.value)?;
                }
                Ok(Outcome::Success)
            }
            None => Ok(not_found(json)),
        },
        Command::Del { key } => {
            let existed = client.delete(key.as_bytes()).await?;
            if json {
                println!("{}", json!({"status": if existed { "ok" } else { "not_found" }}));
            } else {
                println!("{}", if existed { "deleted" } else { "(not found)" });
            }
            Ok(if existed { Outcome::Success } else { Outcome::Absent })
        }
        Command::Cas { key, new, expect, expect_absent, source, ttl } => {
            let new_value = read_value(new, &source)?;
            let expected = if expect_absent { None } else { expect.map(String::into_bytes) };
            match client.cas(key.as_bytes(), expected.as_deref(), &new_value, ttl).await? {
                CasOutcome::Swapped => Ok(success(json)),
                CasOutcome::Failed { current } => {
                    if json {
                        let current = current.as_ref().map(value_json);
                        println!("{}", json!({"status": "cas_failed", "current": current}));
                    } else {
                        match current {
                            Some(current) => eprintln!(
                                "CAS failed: current value is {:?}",
                                String::from_utf8_lossy(&current.value)
                            ),
                            None => eprintln!("CAS failed: the key is absent"),
                        }
                    }
                    Ok(Outcome::Absent)
                }
            }
        }
        Command::Ttl { key } => match client.get_metadata(key.as_bytes()).await? {
            Some(value) => {
                let ttl_ms = value.ttl_left.map(|ttl| ttl.as_millis() as u64);
                match (json, ttl_ms) {
                    (true, _) => println!("{}", json!({"status": "ok", "ttl_ms": ttl_ms})),
                    (false, Some(ms)) => println!("{}.{:03}s", ms / 1000, ms % 1000),
                    (false, None) => println!("no ttl"),
                }
                Ok(Outcome::Success)
            }
            None => Ok(not_found(json)),
        },
        Command::Status => {
            let topology = client.topology().await?;
            if json {
                let nodes: Vec<_> = topology
                    .nodes
                    .iter()
                    .map(|n| json!({"name": n.name, "address": client_address(n), "node_address": n.address, "up": n.up,
                        "status": status_name(n.status), "load_bytes": n.load_bytes, "shards": n.shard_ports.len()}))
                    .collect();
                println!(
                    "{}",
                    json!({"formed": topology.formed, "replicas": topology.replica_count, "nodes": nodes})
                );
            } else {
                let state = if topology.formed { "formed" } else { "forming" };
                println!(
                    "cluster {state}: {} nodes, {} replicas per key",
                    topology.nodes.len(),
                    topology.replica_count
                );
                println!(
                    "{:<20} {:<22} {:<5} {:<8} {:>12} {:>6}",
                    "NODE", "ADDRESS", "UP", "STATUS", "LOAD_BYTES", "SHARDS"
                );
                for n in &topology.nodes {
                    let up = if n.up { "up" } else { "DOWN" };
                    println!(
                        "{:<20} {:<22} {:<5} {:<8} {:>12} {:>6}",
                        n.name,
                        client_address(n),
                        up,
                        status_name(n.status),
                        n.load_bytes,
                        n.shard_ports.len()
                    );
                }
                for n in topology.nodes.iter().filter(|n| n.stream.ranges_total > 0) {
                    println!("{}: {}", n.name, progress_line(&n.stream));
                }
            }
            Ok(Outcome::Success)
        }
        Command::Ring => {
            let topology = client.topology().await?;
            if !topology.formed {
                anyhow::bail!("the cluster has not formed yet");
            }
            let partitions = topology.owners.len();
            let mut counts = vec![0usize; topology.nodes.len()];
            for &owner in &topology.owners {
                counts[owner as usize] += 1;
            }
            let max = counts.iter().copied().max().unwrap_or(0) as f64;
            let min = counts.iter().copied().min().unwrap_or(0).max(1) as f64;
            if json {
                let nodes: Vec<_> = topology.nodes.iter().zip(&counts)
                    .map(|(n, &c)| json!({"name": n.name, "partitions": c, "share": c as f64 / partitions as f64}))
                    .collect();
                println!(
                    "{}",
                    json!({"partitions": partitions, "replicas": topology.replica_count,
                    "largest_over_smallest": max / min, "nodes": nodes})
                );
            } else {
                println!("{partitions} partitions, {} replicas per key", topology.replica_count);
                for (node, count) in topology.nodes.iter().zip(&counts) {
                    println!(
                        "{:<20} {:>6} partitions  {:>6.2}%",
                        node.name,
                        count,
                        100.0 * *count as f64 / partitions as f64
                    );
                }
                println!("largest share / smallest share: {:.3}", max / min);
            }
            Ok(Outcome::Success)
        }
        Command::Snapshot { dir } => {
            client.snapshot(&dir).await?;
            Ok(success(json))
        }
        Command::Decommission { node } | Command::Remove { node } => {
            let action = match cli_command_is_remove {
                true => client::MembershipAction::REMOVE,
                false => client::MembershipAction::DECOMMISSION,
            };
            let report = client.change_membership(action, &node).await?;
            if json {
                println!("{report}");
            } else {
                let figure = report_figures(&report)?;
                println!(
                    "done: ring version {}, {} range transfers, {} keys and {} bytes copied in {:.1} s",
                    figure("ring_version"),
                    figure("transfers"),
                    figure("keys"),
                    figure("bytes"),
                    figure("elapsed_ms") as f64 / 1000.0
                );
            }
            Ok(Outcome::Success)
        }
        Command::Repair => {
            let report = client.repair().await?;
            if json {
                println!("{report}");
            } else {
                let figure = report_figures(&report)?;
                println!(
                    "{} partitions, {} replica comparisons: {} differed, {} keys repaired, {} failed, \
                     {} replicas unreachable, {} tombstones purged",
                    figure("partitions"),
                    figure("comparisons"),
                    figure("differing"),
                    figure("keys_repaired"),
                    figure("keys_failed"),
                    figure("unreachable"),
                    figure("tombstones_purged")
                );
            }
            Ok(Outcome::Success)
        }
        Command::Versions { key } => {
            let versioned = client.get_versions(key.as_bytes()).await?;
            let context: String = versioned.context.iter().map(|b| format!("{b:02x}")).collect();
            if json {
                let siblings: Vec<_> = versioned.siblings.iter().map(value_json).collect();
                println!("{}", json!({"siblings": siblings, "context": context}));
            } else {
                for sibling in &versioned.siblings {
                    println!(
                        "{} (written at {} us)",
                        String::from_utf8_lossy(&sibling.value),
                        sibling.timestamp_us
                    );
                }
                println!("context {context}");
            }
            Ok(if versioned.siblings.is_empty() { Outcome::Absent } else { Outcome::Success })
        }
        Command::Stats => {
            let shards: Vec<serde_json::Value> = client
                .stats()
                .await?
                .iter()
                .map(|text| serde_json::from_str(text).unwrap_or_else(|_| json!(text)))
                .collect();
            println!("{}", serde_json::to_string_pretty(&shards)?);
            Ok(Outcome::Success)
        }
    }
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`kvctl status | head -1`) would
    // panic; like other command-line tools, end quietly instead.
    // SAFETY: sets a signal disposition before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kvctl: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Absent) => ExitCode::from(1),
        Err(error) => {
            let kind = error.downcast_ref::<Error>().map(|e| format!("{e:?}")).unwrap_or_default();
            if json {
                println!("{}", json!({"status": "error", "error": error.to_string(), "kind": kind}));
            } else {
                eprintln!("kvctl: {error}");
            }
            ExitCode::from(2)
        }
    }
}

/// The address a client types for `node`: its client port (--listen) on the IP nodes reach it
/// at; its shard 0's address if the node does not announce one.
fn client_address(node: &client::TopologyNode) -> String {
    match (node.address.parse::<std::net::SocketAddr>(), node.client_port) {
        (Ok(address), port) if port != 0 => std::net::SocketAddr::new(address.ip(), port).to_string(),
        _ => node.address.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("s").is_err());
    }
}
