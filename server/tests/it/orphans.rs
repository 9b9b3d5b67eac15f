//! Nothing survives its starter: a test run or a `bench/` script killed with SIGKILL (no
//! `Drop`, no trap) takes its `kvd` nodes, clients and load generators with it, and their
//! ports are free again at once for a new node.
//!
//! Each test starts the real thing as a child (this test binary on a 3-node cluster test,
//! `bench/cluster` on the debug build), finds its nodes among the child's descendants in
//! `/proc`, kills the child once they serve, and then checks. Whatever a failing check leaves
//! running is killed by the test itself.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use server::node::Ports;

use crate::harness::{command, process_alive, runtime, wait_for, DataDir, Node};

/// Set in a killed child run, so that it does not run these tests itself.
const CHILD_RUN_ENV: &str = "KVD_IT_KILLED_CHILD";
/// The target: the nodes of a killed starter are gone within this.
const GONE_DEADLINE: Duration = Duration::from_secs(5);
/// A 3-node test of this binary for the child run to start (it is killed long before it ends).
const CLUSTER_TEST: &str = "cluster::kill9_under_quorum_load_loses_nothing_and_hints_bring_the_replica_back";
/// Processes that a starter's death must end.
const OURS: [&str; 3] = ["kvd", "kvctl", "kvbench"];

/// One process as `/proc/<pid>/stat` describes it.
#[derive(Clone)]
struct Process {
    pid: u32,
    parent: u32,
    name: String,
}

fn processes() -> Vec<Process> {
    let mut processes = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (name) state ppid ...": the name may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].to_string();
        let Some(parent) = stat[close + 1..].split_whitespace().nth(1).and_then(|ppid| ppid.parse().ok())
        else {
            continue;
        };
        processes.push(Process { pid, parent, name });
    }
    processes
}

/// The live descendants of `root` (children, their children...).
fn descendants(root: u32) -> Vec<Process> {
    let all = processes();
    let mut found: Vec<Process> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for process in all.iter().filter(|p| p.parent == parent && process_alive(p.pid)) {
            frontier.push(process.pid);
            found.push(process.clone());
        }
    }
    found
}

/// A node found among a starter's descendants.
struct Found {
    pid: u32,
    data_dir: PathBuf,
    ports: Ports,
}

impl Found {
    fn addresses(&self) -> Vec<SocketAddr> {
        let mut addresses = vec![self.ports.client];
        addresses.extend(&self.ports.shards);
        addresses.extend(self.ports.resp);
        addresses.extend(self.ports.metrics);
        addresses
    }
}

/// The kvd among `root`'s descendants that serve: its `ports.json` names it and its client
/// port takes a connection.
fn serving_nodes(root: u32) -> Vec<Found> {
    let mut nodes = Vec::new();
    for process in descendants(root).into_iter().filter(|p| p.name == "kvd") {
        let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", process.pid)) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|&byte| byte == 0).collect();
        let Some(data_dir) = args.windows(2).find(|pair| pair[0] == b"--data-dir").map(|pair| pair[1]) else {
            continue;
        };
        let data_dir = PathBuf::from(String::from_utf8_lossy(data_dir).into_owned());
        let Ok(text) = std::fs::read_to_string(data_dir.join(server::node::PORTS_FILE)) else { continue };
        let Ok(ports) = serde_json::from_str::<Ports>(&text) else { continue };
        if ports.pid == process.pid
            && TcpStream::connect_timeout(&ports.client, Duration::from_secs(1)).is_ok()
        {
            nodes.push(Found { pid: process.pid, data_dir, ports });
        }
    }
    nodes
}

/// Kills on drop whatever of these processes is still alive, so that a failed check leaves
/// nothing running either.
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if process_alive(pid) {
                // SAFETY: kill(2) with a pid this test recorded as one of its descendants.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Waits until `starter` runs `node_count` serving nodes, kills it with SIGKILL, and checks
/// that within [`GONE_DEADLINE`] every kvd, kvctl and kvbench it had started is gone and
/// each node's ports can be bound again. Returns the nodes it had.
fn kill_once_serving(mut starter: Child, node_count: usize, what: &str) -> Vec<Found> {
    let root = starter.id();
    let mut reaper = Reaper(Vec::new());
    let nodes =
        wait_for(&format!("{what} to run {node_count} serving nodes"), Duration::from_secs(120), || {
            if let Ok(Some(status)) = starter.try_wait() {
                panic!("{what} ended ({status}) before its {node_count} nodes served");
            }
            let nodes = serving_nodes(root);
            reaper.0.extend(nodes.iter().map(|node| node.pid));
            (nodes.len() >= node_count).then_some(nodes)
        });
    let started: Vec<Process> =
        descendants(root).into_iter().filter(|p| OURS.contains(&p.name.as_str())).collect();
    reaper.0.extend(started.iter().map(|p| p.pid));
    let _ = starter.kill(); // SIGKILL: no Drop, no trap runs in it
    let _ = starter.wait();
    let killed = Instant::now();
    let names: Vec<String> = started.iter().map(|p| format!("{} {}", p.name, p.pid)).collect();
    let addresses: Vec<SocketAddr> = nodes.iter().flat_map(Found::addresses).collect();
    let what_ends = format!("{} to end with {what} and ports {addresses:?} to be free", names.join(", "));
    wait_for(&what_ends, GONE_DEADLINE, || {
        let gone = started.iter().all(|p| !process_alive(p.pid));
        (gone && addresses.iter().all(|&address| bindable_by_a_node(address))).then_some(())
    });
    println!(
        "orphans: {what} killed; {} gone and their ports free {:?} later",
        names.join(", "),
        killed.elapsed()
    );
    nodes
}

/// Whether a listening socket can be bound to `address` as kvd binds its own (address and
/// port reuse: the connections of the killed node may linger in TIME_WAIT).
fn bindable_by_a_node(address: SocketAddr) -> bool {
    let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) else {
        return false;
    };
    socket.set_reuse_address(true).is_ok()
        && socket.set_reuse_port(true).is_ok()
        && socket.bind(&address.into()).is_ok()
        && socket.listen(1).is_ok()
}

/// A new node takes the client, shard and RESP ports of a node of the killed run, and serves.
fn new_node_serves_on_ports_of(old: &Found) {
    let dir = DataDir::new("orphans-successor");
    let resp = old.ports.resp.map(|address| address.to_string());
    let mut flags = vec!["--shard-port-base".to_string(), old.ports.shards[0].port().to_string()];
    if let Some(resp) = &resp {
        flags.extend(["--resp-listen".to_string(), resp.clone()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::try_start_listening(&dir.0, &old.ports.client.to_string(), 1, &flags)
        .unwrap_or_else(|status| panic!("a new kvd on {} exited: {status}", old.ports.client));
    assert_eq!(node.ports.client, old.ports.client);
    assert_eq!(node.ports.shards[0], old.ports.shards[0]);
    runtime().block_on(async {
        let client = crate::harness::client(&node).await;
        client.put(b"after-the-kill", b"served").await.expect("put on the new node");
        let value = client.get(b"after-the-kill").await.expect("get on the new node");
        assert_eq!(value.map(|v| v.value), Some(b"served".to_vec()));
    });
    println!("orphans: a new node serves on {} (shard port {})", old.ports.client, old.ports.shards[0]);
}

fn remove_data_dirs(nodes: &[Found]) {
    for node in nodes {
        let _ = std::fs::remove_dir_all(&node.data_dir);
    }
}

#[test]
fn a_test_run_killed_with_sigkill_leaves_no_node_behind_and_frees_its_ports() {
    if std::env::var_os(CHILD_RUN_ENV).is_some() {
        return; // this is the run being killed: do not start another
    }
    let run = command(std::env::current_exe().expect("test binary"))
        .args([CLUSTER_TEST, "--exact", "--test-threads=1"])
        .env(CHILD_RUN_ENV, "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the test binary");
    let nodes = kill_once_serving(run, 3, "the test run");
    new_node_serves_on_ports_of(&nodes[0]);
    remove_data_dirs(&nodes);
}

#[test]
fn bench_cluster_killed_with_sigkill_leaves_no_node_behind_and_frees_its_ports() {
    if std::env::var_os(CHILD_RUN_ENV).is_some() {
        return;
    }
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root");
    let binaries = Path::new(env!("CARGO_BIN_EXE_kvd")).parent().expect("binaries folder");
    let results = DataDir::new("orphans-bench-results");
    let script = command("bash")
        .arg(repository.join("bench/cluster"))
        .envs([("PAIRS", "1"), ("DURATION", "60"), ("CONFIGS", "cluster")])
        .env("BENCH_BIN", binaries)
        .env("RESULTS_DIR", &results.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start bench/cluster");
    let nodes = kill_once_serving(script, 3, "bench/cluster");
    new_node_serves_on_ports_of(&nodes[0]);
    remove_data_dirs(&nodes);
    // The killed script's scratch folder (bench/lib.sh), now empty.
    if let Some(scratch) = nodes[0].data_dir.parent() {
        let _ = std::fs::remove_dir(scratch);
    }
}
