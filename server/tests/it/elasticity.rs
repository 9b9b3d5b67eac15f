//! Elasticity on real processes (one shard each, no pinning, 127.0.0.2 onwards): a 3-node
//! cluster under a QUORUM read/write load grows to 4 and 5 nodes, loses one by
//! decommission and one by replacement of a killed node; a join survives kill -9 of the joining
//! node and of a source node. Throughout: no request fails after client retries, no
//! acknowledged write is lost, and after each change every key has exactly N = 3 replicas.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client::{Client, Consistency, MembershipAction, Options};
use schema::{Op, Status};

use crate::cluster::{cluster_stats, wait_until_all_see, Cluster, CONVERGE_DEADLINE, DETECT_DEADLINE};
use crate::harness::{runtime, wait_for, DataDir, Node};
use crate::hostile::{frame, read_response};

const PRELOAD: usize = 3000;
const VALUE_SIZE: usize = 200;
const REPLICAS: usize = 3;

fn preload_key(i: usize) -> Vec<u8> {
    format!("pre-{i:05}").into_bytes()
}

fn value_for(key: &[u8]) -> Vec<u8> {
    let mut value = key.to_vec();
    value.resize(VALUE_SIZE, b'.');
    value
}

async fn client_of(address: &str, timeout: Duration) -> Client {
    let options = Options { consistency: Consistency::QUORUM, timeout, ..Options::default() };
    Client::connect(address, options).await.expect("client connects")
}

/// A QUORUM read/write load through one node: writes new keys, reads back earlier ones, and
/// retries each request for up to 10 s before counting it failed.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>,
    thread: Option<std::thread::JoinHandle<(u64, u64, u64)>>,
}

impl Load {
    fn start(address: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let (stopping, written) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let rt = runtime();
            rt.block_on(async move {
                let client = client_of(&address, Duration::from_secs(2)).await;
                let (mut writes, mut reads, mut failed) = (0u64, 0u64, 0u64);
                let mut i = 0usize;
                while !stopping.load(Ordering::Relaxed) {
                    let key = format!("load-{i:06}").into_bytes();
                    let value = value_for(&key);
                    match retry(|| client.put(&key, &value)).await {
                        Ok(()) => {
                            writes += 1;
                            written.lock().expect("lock").insert(key, value);
                        }
                        Err(error) => {
                            eprintln!("load: write {i} failed after retries: {error}");
                            failed += 1;
                        }
                    }
                    let earlier = format!("load-{:06}", i / 2).into_bytes();
                    let expected = written.lock().expect("lock").get(&earlier).cloned();
                    if let Some(expected) = expected {
                        match retry(|| client.get(&earlier)).await {
                            Ok(Some(got)) if got.value == expected => reads += 1,
                            other => {
                                eprintln!(
                                    "load: read of {} gave {other:?}",
                                    String::from_utf8_lossy(&earlier)
                                );
                                failed += 1;
                            }
                        }
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (writes, reads, failed)
            })
        });
        Load { stop, acked, thread: Some(thread) }
    }

    fn key_count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Stops the load: (writes, reads, failed requests).
    fn finish(&mut self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().expect("load thread")
    }
}

async fn retry<T, F, Fut>(request: F) -> Result<T, client::Error>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, client::Error>>,
{
    let start = Instant::now();
    loop {
        match request().await {
            Ok(value) => return Ok(value),
            Err(error) if start.elapsed() > Duration::from_secs(10) => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Whether the node whose shard 0 listens on `shard0` stores a live copy of `key`.
struct ReplicaProbe(TcpStream);

impl ReplicaProbe {
    fn connect(shard0: SocketAddr) -> Option<ReplicaProbe> {
        let stream = TcpStream::connect_timeout(&shard0, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        Some(ReplicaProbe(stream))
    }

    fn holds(&mut self, key: &[u8]) -> bool {
        self.0.write_all(&frame(1, Op::ReadReplica { key })).expect("send ReadReplica");
        let response = read_response(&mut self.0).expect("a ReadReplica reply");
        assert_eq!(response.status, Status::OK, "{}", response.message);
        !response.versions.is_empty()
    }
}

/// A member as the ring shows it: name, shard-0 address, status.
type Member = (String, SocketAddr, String);

/// The members that own data (not left), by name, with their shard-0 addresses, as `address`
/// sees the ring; and its ring version.
fn ring_members(rt: &tokio::runtime::Runtime, address: &str) -> Option<(u64, Vec<Member>)> {
    rt.block_on(async {
        let client =
            Client::connect(address, Options { timeout: Duration::from_secs(2), ..Options::default() })
                .await
                .ok()?;
        let topology = client.topology().await.ok()?;
        let nodes = topology
            .nodes
            .iter()
            .map(|n| {
                let status = n.status.variant_name().unwrap_or("?").to_ascii_lowercase();
                Some((n.name.clone(), n.address.parse().ok()?, status))
            })
            .collect::<Option<Vec<_>>>()?;
        Some((topology.ring_version, nodes))
    })
}

/// Waits until `address` sees a settled ring (no change pending) of at least `version` with
/// exactly `expected` nodes normal; returns the ring version.
fn wait_for_ring(
    rt: &tokio::runtime::Runtime,
    address: &str,
    expected: usize,
    version: u64,
    deadline: Duration,
) -> u64 {
    wait_for(&format!("a settled ring of {expected} nodes, version {version} or later"), deadline, || {
        let (now, nodes) = ring_members(rt, address)?;
        let normal = nodes.iter().filter(|n| n.2 == "normal").count();
        let changing = nodes.iter().any(|n| n.2 == "joining" || n.2 == "leaving");
        (normal == expected && !changing && now >= version).then_some(now)
    })
}

fn ring_version(rt: &tokio::runtime::Runtime, address: &str) -> u64 {
    ring_members(rt, address).expect("ring").0
}

/// Waits until every sampled key is stored on exactly N of the ring's normal nodes.
fn wait_for_n_replicas(rt: &tokio::runtime::Runtime, address: &str, keys: &[Vec<u8>]) -> Duration {
    let start = Instant::now();
    let mut last = String::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("every key on exactly N replicas", Duration::from_secs(120), || {
            let (_, nodes) = ring_members(rt, address)?;
            let mut probes: Vec<ReplicaProbe> = nodes
                .iter()
                .filter(|n| n.2 == "normal")
                .map(|n| ReplicaProbe::connect(n.1))
                .collect::<Option<Vec<_>>>()?;
            for key in keys {
                let copies = probes.iter_mut().map(|probe| probe.holds(key)).filter(|&held| held).count();
                if copies != REPLICAS {
                    last = format!("{} has {copies} replicas", String::from_utf8_lossy(key));
                    return None;
                }
            }
            Some(())
        })
    }));
    if outcome.is_err() {
        panic!("not every key has {REPLICAS} replicas: {last}");
    }
    start.elapsed()
}

/// Every preloaded key and every key the load has written so far.
fn all_keys(load: &Load) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = (0..PRELOAD).map(preload_key).collect();
    keys.extend(load.acked.lock().expect("lock").keys().cloned());
    keys
}

fn node_flags(seed: &str, extra: &[&str]) -> Vec<String> {
    let mut flags =
        vec!["--seeds".to_string(), seed.to_string(), "--anti-entropy-interval-ms".into(), "0".into()];
    flags.extend(extra.iter().map(|flag| flag.to_string()));
    flags
}

fn start_node(dir: &DataDir, ip: &str, flags: &[String]) -> Node {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Node::try_start_in(None, &dir.0, &format!("{ip}:0"), 1, &flags)
        .unwrap_or_else(|status| panic!("kvd exited during start-up: {status}"))
}

/// Restarts a node on its client address and shard port (peers keep trying its old one).
fn restart_node(dir: &DataDir, address: &str, shard_port: u16, flags: &[String]) -> Node {
    let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let port = shard_port.to_string();
    flags.extend(["--shard-port-base", &port]);
    wait_for("the node to restart on its port", Duration::from_secs(10), || {
        let started = Node::try_start_in(None, &dir.0, address, 1, &flags).ok();
        if started.is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
        started
    })
}

fn name_of(rt: &tokio::runtime::Runtime, via: &str, node: &Node) -> String {
    let (_, nodes) = ring_members(rt, via).expect("ring");
    let port = node.ports.shards[0].port();
    nodes.into_iter().find(|n| n.1.port() == port).map(|n| n.0).expect("the node is a member")
}

fn streamed(rt: &tokio::runtime::Runtime, address: &str) -> (u64, u64) {
    let stats = rt.block_on(cluster_stats(address)).expect("stats");
    (stats["streamed_keys"].as_u64().unwrap_or(0), stats["streamed_bytes"].as_u64().unwrap_or(0))
}

fn preload(rt: &tokio::runtime::Runtime, address: &str) {
    let client = rt.block_on(client_of(address, Duration::from_secs(5)));
    for i in 0..PRELOAD {
        let key = preload_key(i);
        rt.block_on(client.put(&key, &value_for(&key))).expect("preload at QUORUM");
    }
}

/// Stops the load and checks: no failed request, every acknowledged write readable.
fn finish_and_check(rt: &tokio::runtime::Runtime, load: &mut Load, address: &str) {
    let (writes, reads, failed) = load.finish();
    let client = rt.block_on(client_of(address, Duration::from_secs(5)));
    let acked = load.acked.lock().expect("lock").clone();
    let mut lost = 0;
    for (key, value) in acked.iter().chain(
        (0..PRELOAD).map(|i| (preload_key(i), value_for(&preload_key(i)))).collect::<BTreeMap<_, _>>().iter(),
    ) {
        let got = rt.block_on(retry(|| client.get(key))).expect("final read");
        if got.map(|v| v.value).as_ref() != Some(value) {
            lost += 1;
        }
    }
    println!(
        "load: {writes} QUORUM writes and {reads} reads acknowledged, {failed} failed after retries; \
         {lost} of {} acknowledged writes (and {PRELOAD} preloaded) lost",
        acked.len()
    );
    assert_eq!(failed, 0, "requests failed after retries");
    assert_eq!(lost, 0, "acknowledged writes lost");
}

#[test]
fn the_cluster_grows_shrinks_and_replaces_a_node_under_load() {
    let rt = runtime();
    let mut cluster = Cluster::start_flagged(3, "grow", &["--anti-entropy-interval-ms", "0"]);
    let first = cluster.addresses[0].clone();
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    preload(&rt, &first);
    let mut load = Load::start(first.clone());
    let mut joined: Vec<(DataDir, Node)> = Vec::new();

    // Join a 4th node, then a 5th.
    for (size, ip) in [(4usize, "127.0.0.5"), (5, "127.0.0.6")] {
        let keys_before = PRELOAD + load.key_count();
        let dir = DataDir::new(&format!("grow-join-{size}"));
        let before = ring_version(&rt, &first);
        let started = Instant::now();
        let node = start_node(&dir, ip, &node_flags(&first, &["--join"]));
        let version = wait_for_ring(&rt, &first, size, before + 2, Duration::from_secs(120));
        let took = started.elapsed();
        let keys_after = PRELOAD + load.key_count();
        let (keys, bytes) = streamed(&rt, &node.address());
        let ideal = (REPLICAS * (keys_before + keys_after) / 2) as f64 / size as f64;
        println!(
            "join of node {size}: ring version {version} after {:.2} s; {keys} keys ({bytes} bytes) copied, \
             ideal {ideal:.0} keys (N x {keys_before}..{keys_after} keys / {size} nodes): ratio {:.3}",
            took.as_secs_f64(),
            keys as f64 / ideal
        );
        assert!(keys as f64 <= 1.1 * ideal, "join of node {size} copied {keys} keys, ideal {ideal:.0}");
        let settled = wait_for_n_replicas(&rt, &first, &all_keys(&load));
        println!(
            "join of node {size}: every key on exactly {REPLICAS} replicas {:.2} s later",
            settled.as_secs_f64()
        );
        joined.push((dir, node));
    }

    // Decommission the third original node.
    let leaving = cluster.nodes[2].as_ref().expect("running");
    let leaving_name = name_of(&rt, &first, leaving);
    let operator = rt.block_on(client_of(&first, Duration::from_secs(600)));
    let before = ring_version(&rt, &first);
    let started = Instant::now();
    let report = rt
        .block_on(operator.change_membership(MembershipAction::DECOMMISSION, &leaving_name))
        .expect("decommission");
    println!("decommission of {leaving_name}: {report} in {:.2} s", started.elapsed().as_secs_f64());
    wait_for_ring(&rt, &first, 4, before + 2, Duration::from_secs(30));
    wait_for_n_replicas(&rt, &first, &all_keys(&load));
    cluster.kill9(2);

    // Kill the second original node and replace it with an empty one.
    let dead_name = name_of(&rt, &first, cluster.nodes[1].as_ref().expect("running"));
    cluster.kill9(1);
    // Up: the first node and the two that joined (the decommissioned one was stopped).
    wait_until_all_see(&rt, std::slice::from_ref(&first), 3, DETECT_DEADLINE);
    let dir = DataDir::new("grow-replace");
    let before = ring_version(&rt, &first);
    let started = Instant::now();
    let node = start_node(&dir, "127.0.0.7", &node_flags(&first, &["--replace", &dead_name]));
    wait_for_ring(&rt, &first, 4, before + 2, Duration::from_secs(120));
    let (keys, bytes) = streamed(&rt, &node.address());
    println!(
        "replacement of killed {dead_name}: done in {:.2} s, {keys} keys ({bytes} bytes) copied from the survivors",
        started.elapsed().as_secs_f64()
    );
    joined.push((dir, node));
    wait_for_n_replicas(&rt, &first, &all_keys(&load));
    finish_and_check(&rt, &mut load, &first);
}

#[test]
fn a_join_survives_kill9_of_the_joining_node_and_of_a_source() {
    let rt = runtime();
    let mut cluster = Cluster::start_flagged(3, "crashjoin", &["--anti-entropy-interval-ms", "0"]);
    let first = cluster.addresses[0].clone();
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    preload(&rt, &first);
    let mut load = Load::start(first.clone());
    // Throttled, so that the joins are still streaming when the kills come.
    let flags = node_flags(&first, &["--join", "--stream-kib-per-s", "48"]);
    let progress = |rt: &tokio::runtime::Runtime, name_port: u16| -> Option<u32> {
        rt.block_on(async {
            let client = Client::connect(&first, Options::default()).await.ok()?;
            let topology = client.topology().await.ok()?;
            let node = topology.nodes.iter().find(|n| n.address.ends_with(&format!(":{name_port}")))?;
            Some(node.stream.ranges_done).filter(|_| node.stream.ranges_total > 0)
        })
    };

    // 1. kill -9 the joining node mid-stream; restarted, it resumes.
    let dir = DataDir::new("crashjoin-4");
    let before = ring_version(&rt, &first);
    let mut node = start_node(&dir, "127.0.0.5", &flags);
    let port = node.ports.shards[0].port();
    let done = wait_for("the join to be streaming", Duration::from_secs(60), || {
        progress(&rt, port).filter(|&d| d >= 20)
    });
    let address = node.address();
    node.kill9();
    println!("kill -9 of the joining node after {done} ranges");
    let node = restart_node(&dir, &address, port, &flags);
    let version = wait_for_ring(&rt, &first, 4, before + 2, Duration::from_secs(180));
    println!("the restarted joining node resumed; ring version {version}");
    wait_for_n_replicas(&rt, &first, &all_keys(&load));
    let _fourth = (dir, node);

    // 2. kill -9 a source node mid-stream; the join takes the other replicas.
    let dir = DataDir::new("crashjoin-5");
    let before = ring_version(&rt, &first);
    let node = start_node(&dir, "127.0.0.6", &flags);
    let port = node.ports.shards[0].port();
    let done = wait_for("the join to be streaming", Duration::from_secs(60), || {
        progress(&rt, port).filter(|&d| d >= 20)
    });
    cluster.kill9(2);
    println!("kill -9 of a source node after {done} ranges of the second join");
    let version = wait_for_ring(&rt, &first, 5, before + 2, Duration::from_secs(180));
    println!("the join completed without the source; ring version {version}");
    cluster.restart(2);
    wait_for_n_replicas(&rt, &first, &all_keys(&load));
    let _fifth = (dir, node);
    finish_and_check(&rt, &mut load, &first);
}

#[test]
fn two_joins_at_once_complete_in_turn_and_a_third_change_is_refused() {
    let rt = runtime();
    let cluster = Cluster::start_flagged(3, "twojoins", &["--anti-entropy-interval-ms", "0"]);
    let first = cluster.addresses[0].clone();
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    preload(&rt, &first);
    let before = ring_version(&rt, &first);
    let flags = node_flags(&first, &["--join", "--stream-kib-per-s", "256"]);
    let started = Instant::now();
    let dirs = [DataDir::new("twojoins-4"), DataDir::new("twojoins-5")];
    let _nodes: Vec<Node> =
        dirs.iter().zip(["127.0.0.5", "127.0.0.6"]).map(|(dir, ip)| start_node(dir, ip, &flags)).collect();
    wait_for("a join to be pending", Duration::from_secs(60), || {
        let (_, nodes) = ring_members(&rt, &first)?;
        nodes.iter().any(|n| n.2 == "joining").then_some(())
    });
    let operator = rt.block_on(client_of(&first, Duration::from_secs(60)));
    let third = name_of(&rt, &first, cluster.nodes[2].as_ref().expect("running"));
    let refusal = rt
        .block_on(operator.change_membership(MembershipAction::DECOMMISSION, &third))
        .expect_err("a decommission while a join is pending");
    println!("a decommission during the joins: {refusal}");
    assert!(refusal.to_string().contains("another ring change is in progress"), "{refusal}");
    let version = wait_for_ring(&rt, &first, 5, before + 4, Duration::from_secs(180));
    println!(
        "two joins started at once: both complete, one after the other, in {:.2} s (ring version {version})",
        started.elapsed().as_secs_f64()
    );
    let keys: Vec<Vec<u8>> = (0..PRELOAD).step_by(3).map(preload_key).collect();
    wait_for_n_replicas(&rt, &first, &keys);
}
