//! Real 3-node clusters on loopback addresses 127.0.0.2..4 (port 0, one shard, no pinning):
//! kill -9 under a QUORUM write load, N-1 replicas down, a partition made with nftables drop
//! rules, and concurrent writers with causal contexts. Timing checks are deadlines at 3x the
//! targets, and print what they measured.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use client::{Client, Consistency, Error, Options};

use crate::harness::{command, runtime, wait_for, DataDir, Node};

/// Targets of the issue: a killed node is down, and a cluster converges, within 5 s.
pub(crate) const DETECT_DEADLINE: Duration = Duration::from_secs(15);
pub(crate) const CONVERGE_DEADLINE: Duration = Duration::from_secs(15);

pub(crate) struct Cluster {
    pub(crate) dirs: Vec<DataDir>,
    pub(crate) nodes: Vec<Option<Node>>,
    /// Client addresses and first shard ports, kept for restarts on the same ports.
    pub(crate) addresses: Vec<String>,
    shard_ports: Vec<u16>,
    size: usize,
    /// The network namespace of each node, when they run in namespaces.
    namespaces: Vec<Option<String>>,
    /// Flags every node gets, restarts included.
    extra_flags: Vec<String>,
}

fn cluster_flags(size: usize, seed: Option<&str>) -> Vec<String> {
    let mut flags = vec!["--cluster-size".to_string(), size.to_string(), "--replicas".into(), "3".into()];
    if let Some(seed) = seed {
        flags.push("--seeds".into());
        flags.push(seed.to_string());
    }
    flags
}

impl Cluster {
    pub(crate) fn start(size: usize, name: &str) -> Cluster {
        // 127.0.0.2 onwards: the test's own connections come from 127.0.0.1, which no
        // partition rule names.
        let ips: Vec<String> = (0..size).map(|i| format!("127.0.0.{}", i + 2)).collect();
        Cluster::start_at(name, &ips, &vec![None; size])
    }

    /// A cluster whose node i listens on `ips[i]`, inside network namespace `namespaces[i]`.
    pub(crate) fn start_at(name: &str, ips: &[String], namespaces: &[Option<String>]) -> Cluster {
        Cluster::start_with(name, ips, namespaces, &[])
    }

    /// A cluster on 127.0.0.2 onwards whose nodes all get `extra_flags`.
    pub(crate) fn start_flagged(size: usize, name: &str, extra_flags: &[&str]) -> Cluster {
        let ips: Vec<String> = (0..size).map(|i| format!("127.0.0.{}", i + 2)).collect();
        Cluster::start_with(name, &ips, &vec![None; size], extra_flags)
    }

    fn start_with(
        name: &str,
        ips: &[String],
        namespaces: &[Option<String>],
        extra_flags: &[&str],
    ) -> Cluster {
        let extra_flags: Vec<String> = extra_flags.iter().map(|flag| flag.to_string()).collect();
        let size = ips.len();
        let dirs: Vec<DataDir> = (0..size).map(|i| DataDir::new(&format!("{name}-{i}"))).collect();
        let mut nodes = Vec::new();
        let mut addresses = Vec::new();
        let mut shard_ports = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let seed = addresses.first().cloned();
            let mut flags = cluster_flags(size, seed.as_deref());
            flags.extend(["--resp-listen".to_string(), format!("{}:0", ips[i])]);
            flags.extend(extra_flags.iter().cloned());
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let listen = format!("{}:0", ips[i]);
            let node = Node::try_start_in(namespaces[i].as_deref(), &dir.0, &listen, 1, &flags)
                .unwrap_or_else(|status| panic!("kvd exited during start-up: {status}"));
            addresses.push(node.address());
            shard_ports.push(node.ports.shards[0].port());
            nodes.push(Some(node));
        }
        Cluster { dirs, nodes, addresses, shard_ports, size, namespaces: namespaces.to_vec(), extra_flags }
    }

    pub(crate) fn restart(&mut self, index: usize) {
        let seed = self.addresses[(index + 1) % self.size].clone();
        let mut flags = cluster_flags(self.size, Some(&seed));
        // The same ports as before, as a node on fixed ports has: peers that believe it down
        // try its old address now and then, which is how it is heard again when its seed is
        // down too.
        flags.extend(["--shard-port-base".to_string(), self.shard_ports[index].to_string()]);
        flags.extend(self.extra_flags.iter().cloned());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        // A port of the killed process can stay taken for a moment (a socket of this test
        // bound to it while the node was down): try again until a deadline.
        let dir = &self.dirs[index].0;
        let netns = self.namespaces[index].clone();
        let node = wait_for("the node to restart on its ports", Duration::from_secs(10), || {
            let started = Node::try_start_in(netns.as_deref(), dir, &self.addresses[index], 1, &flags).ok();
            if started.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            started
        });
        self.nodes[index] = Some(node);
    }

    pub(crate) fn kill9(&mut self, index: usize) {
        if let Some(mut node) = self.nodes[index].take() {
            node.kill9();
        }
    }
}

pub(crate) async fn connect(address: &str, consistency: Consistency) -> Client {
    let options = Options { consistency, timeout: Duration::from_secs(3), ..Options::default() };
    Client::connect(address, options).await.expect("client connects")
}

/// A client that sends everything to `address` (which coordinates), not to replicas.
pub(crate) async fn connect_direct(address: &str, consistency: Consistency) -> Client {
    let options =
        Options { consistency, timeout: Duration::from_secs(3), cluster_aware: false, ..Options::default() };
    Client::connect(address, options).await.expect("client connects")
}

async fn try_connect(address: &str, consistency: Consistency) -> Option<Client> {
    let options = Options { consistency, timeout: Duration::from_secs(2), ..Options::default() };
    Client::connect(address, options).await.ok()
}

/// Whether `address` reports a formed cluster with exactly `up` nodes up.
async fn sees_up(address: &str, up: usize) -> bool {
    let Some(client) = try_connect(address, Consistency::ONE).await else { return false };
    match client.topology().await {
        Ok(topology) => topology.formed && topology.nodes.iter().filter(|n| n.up).count() == up,
        Err(_) => false,
    }
}

pub(crate) fn wait_until_all_see(
    rt: &tokio::runtime::Runtime,
    addresses: &[String],
    up: usize,
    deadline: Duration,
) -> Duration {
    let start = Instant::now();
    wait_for(&format!("{addresses:?} to see {up} nodes up"), deadline, || {
        let all = rt.block_on(async {
            for address in addresses {
                if !sees_up(address, up).await {
                    return false;
                }
            }
            true
        });
        all.then_some(())
    });
    start.elapsed()
}

/// The cluster figures from a node's first shard.
pub(crate) async fn cluster_stats(address: &str) -> Option<serde_json::Value> {
    let client = try_connect(address, Consistency::ONE).await?;
    let shards = client.stats().await.ok()?;
    let stats: serde_json::Value = serde_json::from_str(shards.first()?).ok()?;
    Some(stats["cluster"].clone())
}

/// `request` tried on every node's client in turn (from `first`) until one succeeds or 10 s
/// pass; `Err` only when none did.
async fn retrying<T, F, Fut>(clients: &[Option<Client>], first: usize, request: F) -> Result<T, Error>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let start = Instant::now();
    let mut last = Error::Timeout;
    let mut attempt = 0;
    while start.elapsed() < Duration::from_secs(10) {
        let index = (first + attempt) % clients.len();
        attempt += 1;
        let Some(client) = &clients[index] else { continue };
        match request(client.clone()).await {
            Ok(value) => return Ok(value),
            Err(error) => last = error,
        }
        if attempt % clients.len() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Err(last)
}

async fn put_retrying(
    clients: &[Option<Client>],
    first: usize,
    key: &[u8],
    value: &[u8],
) -> Result<(), Error> {
    retrying(clients, first, |client| async move { client.put(key, value).await }).await
}

async fn get_retrying(
    clients: &[Option<Client>],
    first: usize,
    key: &[u8],
) -> Result<Option<Vec<u8>>, Error> {
    retrying(clients, first, |client| async move { client.get(key).await.map(|v| v.map(|v| v.value)) }).await
}

#[test]
fn kill9_under_quorum_load_loses_nothing_and_hints_bring_the_replica_back() {
    let rt = runtime();
    let started = Instant::now();
    let mut cluster = Cluster::start(3, "kill");
    let converged = wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    println!(
        "cluster: 3 nodes converged {:?} after the last start ({:?} after the first)",
        converged,
        started.elapsed()
    );

    let addresses = cluster.addresses.clone();
    let mut clients: Vec<Option<Client>> =
        rt.block_on(async { futures_join(addresses.iter().map(|a| connect(a, Consistency::QUORUM))).await });
    let mut acked: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut failed = 0;
    let mut reads = 0;
    let mut write = |clients: &[Option<Client>], i: usize, acked: &mut BTreeMap<Vec<u8>, Vec<u8>>| {
        let key = format!("key-{i:05}").into_bytes();
        let value = format!("value-{i}").into_bytes();
        match rt.block_on(put_retrying(clients, i % 3, &key, &value)) {
            Ok(()) => {
                acked.insert(key, value);
            }
            Err(error) => {
                eprintln!("write {i} failed after retries: {error}");
                failed += 1;
            }
        }
        // And a QUORUM read of an earlier acknowledged write, through another node.
        let earlier = format!("key-{:05}", i / 2).into_bytes();
        if let Some(expected) = acked.get(&earlier) {
            match rt.block_on(get_retrying(clients, i % 3 + 1, &earlier)) {
                Ok(Some(got)) if got == *expected => reads += 1,
                other => {
                    eprintln!("read of {} gave {other:?}", String::from_utf8_lossy(&earlier));
                    failed += 1;
                }
            }
        }
    };
    let hints_pending = |rt: &tokio::runtime::Runtime, nodes: &[String]| -> Option<u64> {
        rt.block_on(async {
            let mut total = 0;
            for address in nodes {
                total += cluster_stats(address).await?["hints_pending"].as_u64()?;
            }
            Some(total)
        })
    };
    // Kill cycles: kill -9 a replica under load, keep writing and reading through the others
    // (a client whose node died retries on the next), see it marked down, restart it, wait
    // for its hints. The last cycle's victim (node 3) stays down for the checks below.
    let cycles = std::env::var("KILL_CYCLES").ok().and_then(|n| n.parse().ok()).unwrap_or(3usize).max(1);
    let mut next = 0;
    let mut detections = Vec::new();
    for cycle in 0..cycles {
        let victim = if cycle + 1 == cycles { 2 } else { cycle % 2 };
        for _ in 0..150 {
            write(&clients, next, &mut acked);
            next += 1;
        }
        let killed_at = Instant::now();
        cluster.kill9(victim);
        for _ in 0..300 {
            write(&clients, next, &mut acked);
            next += 1;
        }
        let watcher = (victim + 1) % 3;
        let detect = wait_for("the killed node marked down", DETECT_DEADLINE, || {
            rt.block_on(sees_up(&addresses[watcher], 2)).then(|| killed_at.elapsed())
        });
        detections.push(detect);
        for _ in 0..50 {
            write(&clients, next, &mut acked);
            next += 1;
        }
        if cycle + 1 == cycles {
            break;
        }
        cluster.restart(victim);
        clients[victim] = Some(rt.block_on(connect(&addresses[victim], Consistency::QUORUM)));
        wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
        wait_for("hints replayed to the restarted node", Duration::from_secs(30), || {
            (hints_pending(&rt, &addresses) == Some(0)).then_some(())
        });
    }
    println!(
        "cluster: {cycles} kill -9 cycles under QUORUM load; killed node marked down after {detections:?}"
    );
    assert_eq!(failed, 0, "QUORUM requests that failed (or read wrong) even after retrying on every node");
    println!("cluster: {reads} QUORUM reads of acknowledged writes during the kill, all current");
    let pending = hints_pending(&rt, &addresses[..2]).unwrap_or(0);
    println!(
        "cluster: {} writes acknowledged, {failed} failed; {pending} hints pending for the dead node",
        acked.len()
    );
    assert!(pending > 0, "writes while a replica is down must leave hints");

    // Hints are durable: once the hint logs hold them, kill -9 both coordinators too, and
    // bring all three back.
    wait_for("hint logs to hold every pending hint", Duration::from_secs(10), || {
        let all_logged = (0..2).all(|i| {
            let logged = std::fs::read(cluster.dirs[i].0.join("shard-0/HINTS")).unwrap_or_default();
            let pending = rt.block_on(cluster_stats(&addresses[i])).and_then(|s| s["hints_pending"].as_u64());
            pending == Some(server::cluster::hint_log::replay(&logged).len() as u64)
        });
        all_logged.then_some(())
    });
    clients.clear();
    cluster.kill9(0);
    cluster.kill9(1);
    cluster.restart(0);
    cluster.restart(1);
    // Then the replica that missed the writes: hints replay, and it alone holds every
    // acknowledged write.
    cluster.restart(2);
    let back = wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    let replay_start = Instant::now();
    wait_for("hints replayed", Duration::from_secs(30), || {
        (hints_pending(&rt, &addresses[..2]) == Some(0)).then_some(())
    });
    println!(
        "cluster: restarted node seen up after {back:?}; hints replayed {:?} later",
        replay_start.elapsed()
    );

    // N-1 replicas down: every acknowledged key reads at ONE from the one left.
    cluster.kill9(0);
    cluster.kill9(1);
    let survivor = rt.block_on(connect_direct(&addresses[2], Consistency::ONE));
    let mut lost = 0;
    for (key, value) in &acked {
        let got = rt.block_on(survivor.get(key)).expect("read at ONE with two replicas down");
        if got.as_ref().map(|v| &v.value) != Some(value) {
            lost += 1;
        }
    }
    println!(
        "cluster: with 2 of 3 replicas down, {} of {} acknowledged keys read at ONE",
        acked.len() - lost,
        acked.len()
    );
    assert_eq!(lost, 0, "acknowledged writes missing from the restarted replica");
}

async fn futures_join<F: std::future::Future<Output = Client>>(
    futures: impl Iterator<Item = F>,
) -> Vec<Option<Client>> {
    let mut out = Vec::new();
    for future in futures {
        out.push(Some(future.await));
    }
    out
}

#[test]
fn concurrent_writers_with_contexts_make_siblings_and_lose_none() {
    let rt = runtime();
    let cluster = Cluster::start(3, "siblings");
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    rt.block_on(async {
        let a = connect(&cluster.addresses[0], Consistency::QUORUM).await;
        let b = connect(&cluster.addresses[1], Consistency::QUORUM).await;
        let all = connect(&cluster.addresses[2], Consistency::ALL).await;
        for i in 0..20 {
            let key = format!("shared-{i}").into_bytes();
            a.put(&key, b"base").await.expect("base write");
            let seen_a = a.get_versions(&key).await.expect("read a");
            let seen_b = b.get_versions(&key).await.expect("read b");
            assert_eq!(seen_a.siblings.len(), 1);
            // Both writers saw "base" and write concurrently through two coordinators.
            let (ra, rb) = tokio::join!(
                a.put_with_context(&key, b"from-a", None, &seen_a.context),
                b.put_with_context(&key, b"from-b", None, &seen_b.context)
            );
            ra.expect("write a");
            rb.expect("write b");
            let merged = all.get_versions(&key).await.expect("read all");
            let mut values: Vec<&[u8]> = merged.siblings.iter().map(|s| s.value.as_slice()).collect();
            values.sort();
            assert_eq!(values, [&b"from-a"[..], b"from-b"], "key {i}: both concurrent writes kept as siblings");
            // A write with the merged context resolves them.
            a.put_with_context(&key, b"resolved", None, &merged.context).await.expect("resolve");
            let resolved = all.get_versions(&key).await.expect("read resolved");
            let values: Vec<&[u8]> = resolved.siblings.iter().map(|s| s.value.as_slice()).collect();
            assert_eq!(values, [&b"resolved"[..]]);
        }
        println!("cluster: 20 keys written concurrently through two coordinators: 2 siblings each, resolved by a write with the merged context");
        // Any N-1 replicas stopped (SIGSTOP): every key still reads at ONE from the third.
        for survivor in 0..3 {
            let stopped: Vec<i32> = (0..3)
                .filter(|&i| i != survivor)
                .filter_map(|i| cluster.nodes[i].as_ref().map(|n| n.child.id() as i32))
                .collect();
            for &pid in &stopped {
                // SAFETY: a signal to our own child process.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
            }
            let one = connect_direct(&cluster.addresses[survivor], Consistency::ONE).await;
            for i in 0..20 {
                let got = one.get(format!("shared-{i}").as_bytes()).await;
                assert_eq!(got.map(|v| v.map(|v| v.value)), Ok(Some(b"resolved".to_vec())), "node {survivor} alone, key {i}");
            }
            for &pid in &stopped {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
        }
        println!("cluster: with any 2 of 3 nodes stopped, all 20 keys read at ONE from the third");
        // Values of the largest size replicate, and concurrent ones are accepted while the key's
        // siblings stay within 2 MiB of values; a third is refused (nothing written), counted.
        let big = |fill: u8| vec![fill; client::VALUE_SIZE_MAX];
        a.put(b"big", &big(1)).await.expect("1 MiB write");
        let seen = a.get_versions(b"big").await.expect("read 1 MiB");
        assert_eq!(seen.siblings.len(), 1);
        for fill in [2u8, 3] {
            a.put_with_context(b"big", &big(fill), None, &seen.context).await.expect("concurrent 1 MiB write");
        }
        let refused = a.put_with_context(b"big", &big(4), None, &seen.context).await;
        assert!(matches!(refused, Err(Error::SiblingsFull(_))), "{refused:?}");
        let kept = all.get_versions(b"big").await.expect("read siblings");
        let mut fills: Vec<u8> = kept.siblings.iter().map(|s| s.value[0]).collect();
        fills.sort();
        assert_eq!(fills, [2, 3], "both acknowledged 1 MiB siblings are kept");
        let mut full = 0;
        for address in &cluster.addresses {
            full += cluster_stats(address).await.and_then(|s| s["siblings_full"].as_u64()).unwrap_or(0);
        }
        assert_eq!(full, 1, "the refused write is counted");
        // CAS goes through the key's Paxos: one applies, the same again fails with the value.
        let outcome = a.cas(b"cas-key", None, b"1", None).await.expect("cas");
        assert_eq!(outcome, client::CasOutcome::Swapped);
        let outcome = all.cas(b"cas-key", None, b"2", None).await.expect("cas");
        assert!(matches!(&outcome, client::CasOutcome::Failed { current: Some(v) } if v.value == b"1"), "{outcome:?}");
        // The RESP front door goes through the coordinator: written through one node, read
        // through another; read-modify-write commands go through the key's Paxos.
        let resp = |index: usize, request: &str| {
            let port = cluster.nodes[index].as_ref().and_then(|n| n.ports.resp).expect("resp port").port();
            let ip = format!("127.0.0.{}", index + 2);
            let mut stream = std::net::TcpStream::connect((ip.as_str(), port)).expect("resp connect");
            std::io::Write::write_all(&mut stream, request.as_bytes()).expect("resp write");
            stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            let mut reply = String::new();
            let _ = std::io::Read::read_to_string(&mut stream, &mut reply);
            reply
        };
        assert_eq!(resp(0, "SET resp-key hello\r\nQUIT\r\n"), "+OK\r\n+OK\r\n");
        assert_eq!(resp(2, "GET resp-key\r\nQUIT\r\n"), "$5\r\nhello\r\n+OK\r\n");
        assert_eq!(resp(1, "INCR resp-counter\r\nQUIT\r\n"), ":1\r\n+OK\r\n");
        assert_eq!(resp(2, "INCR resp-counter\r\nSET resp-counter x NX\r\nQUIT\r\n"), ":2\r\n$-1\r\n+OK\r\n");
        // A pipeline's commands on one key take effect in the order sent, as in Redis.
        assert_eq!(
            resp(0, "SET resp-nx v NX\r\nSET resp-nx w NX\r\nGET resp-nx\r\nINCR resp-c\r\nINCR resp-c\r\nGET resp-c\r\nDEL resp-nx\r\nGET resp-nx\r\nQUIT\r\n"),
            "+OK\r\n$-1\r\n$1\r\nv\r\n:1\r\n:2\r\n$1\r\n2\r\n:1\r\n$-1\r\n+OK\r\n"
        );
        println!("cluster: RESP SET through one node, GET through another; INCR and SET NX through Paxos");
        // A node that reaches a formed cluster which does not list it is refused.
        let stranger_dir = DataDir::new("stranger");
        let mut stranger = command(env!("CARGO_BIN_EXE_kvd"))
            .arg("--data-dir")
            .arg(&stranger_dir.0)
            .args(["--listen", "127.0.0.5:0", "--shards", "1", "--no-pin", "--cluster-size", "3"])
            .args(["--seeds", &cluster.addresses[0]])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn a fourth kvd");
        let status = wait_for("the fourth node to be refused", Duration::from_secs(15), || {
            stranger.try_wait().ok().flatten()
        });
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut stranger.stderr.take().expect("stderr"), &mut stderr).expect("stderr");
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("refusing to join"), "{stderr}");
        println!("cluster: a fourth node reaching the formed cluster was refused: {}", stderr.lines().last().unwrap_or(""));
        // A blind delete, then the key reads as absent everywhere.
        assert!(a.delete(b"shared-0").await.expect("delete"));
        assert_eq!(all.get(b"shared-0").await.expect("read after delete"), None);
    });
}

/// nftables rules that drop traffic between one loopback address and the others, in a table
/// named per run; removed on drop.
pub(crate) struct Partition {
    table: String,
}

impl Partition {
    pub(crate) fn isolate(address: &str, others: &[&str]) -> Option<Partition> {
        let pairs: Vec<(&str, &str)> = others.iter().map(|&other| (address, other)).collect();
        Partition::cut(&pairs)
    }

    /// Drops all traffic between the two addresses of each pair, both ways.
    pub(crate) fn cut(pairs: &[(&str, &str)]) -> Option<Partition> {
        crate::harness::remove_leftovers(); // the tables of killed runs
        let table = format!("kvtest_{}", std::process::id());
        let rules: String = pairs
            .iter()
            .map(|(a, b)| format!("  ip saddr {a} ip daddr {b} drop\n  ip saddr {b} ip daddr {a} drop\n"))
            .collect();
        let script = format!(
            "table inet {table} {{\n chain output {{\n  type filter hook output priority 0; policy accept;\n{rules} }}\n}}\n"
        );
        let mut child = command("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().ok()?;
        std::io::Write::write_all(child.stdin.as_mut()?, script.as_bytes()).ok()?;
        drop(child.stdin.take());
        child.wait().ok()?.success().then_some(Partition { table })
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = command("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

#[test]
fn a_partitioned_node_refuses_quorum_the_majority_serves_and_healing_loses_nothing() {
    if !crate::harness::can_cut_network("the partition test") {
        return;
    }
    let rt = runtime();
    let cluster = Cluster::start(3, "partition");
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    let addresses = cluster.addresses.clone();
    let majority = rt.block_on(connect(&addresses[0], Consistency::QUORUM));
    let mut acked = BTreeMap::new();
    for i in 0..100 {
        let (key, value) = (format!("before-{i}").into_bytes(), format!("v{i}").into_bytes());
        rt.block_on(majority.put(&key, &value)).expect("write before the partition");
        acked.insert(key, value);
    }
    let ip = |address: &str| address.split(':').next().unwrap_or_default().to_string();
    let isolated_ip = ip(&addresses[2]);
    let other_ips = [ip(&addresses[0]), ip(&addresses[1])];
    let others: Vec<&str> = other_ips.iter().map(String::as_str).collect();
    let partition = Partition::isolate(&isolated_ip, &others).expect("nft partition");
    let cut = Instant::now();
    wait_until_all_see(&rt, &addresses[..2], 2, DETECT_DEADLINE);
    wait_until_all_see(&rt, &addresses[2..], 1, DETECT_DEADLINE);
    println!("cluster: partition seen from both sides {:?} after the cut", cut.elapsed());

    // The majority keeps serving QUORUM; the isolated node answers UNAVAILABLE.
    let majority_side =
        vec![Some(majority.clone()), Some(rt.block_on(connect(&addresses[1], Consistency::QUORUM)))];
    for i in 0..100 {
        let (key, value) = (format!("during-{i}").into_bytes(), format!("w{i}").into_bytes());
        rt.block_on(put_retrying(&majority_side, i, &key, &value))
            .expect("majority write during the partition");
        acked.insert(key, value);
    }
    let isolated = rt.block_on(connect_direct(&addresses[2], Consistency::QUORUM));
    let refused = rt.block_on(isolated.put(b"isolated-write", b"x"));
    assert!(matches!(refused, Err(Error::Unavailable(_))), "isolated QUORUM write: {refused:?}");
    let refused = rt.block_on(isolated.get(b"before-1"));
    assert!(matches!(refused, Err(Error::Unavailable(_))), "isolated QUORUM read: {refused:?}");

    drop(partition);
    let healed = Instant::now();
    wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    wait_for("hints replayed after healing", Duration::from_secs(30), || {
        rt.block_on(async {
            let mut total = 0;
            for address in &addresses {
                total += cluster_stats(address).await?["hints_pending"].as_u64()?;
            }
            (total == 0).then_some(())
        })
    });
    println!("cluster: healed and hints replayed {:?} after the heal", healed.elapsed());
    let all = rt.block_on(connect(&addresses[2], Consistency::ALL));
    for (key, value) in &acked {
        let got = rt.block_on(all.get(key)).expect("read at ALL after healing");
        assert_eq!(got.map(|v| v.value).as_ref(), Some(value), "{}", String::from_utf8_lossy(key));
    }
    println!("cluster: {} acknowledged writes all read at ALL after healing", acked.len());
}

#[test]
fn five_nodes_converge_ride_out_a_pause_and_detect_a_kill() {
    let rt = runtime();
    let started = Instant::now();
    let mut cluster = Cluster::start(5, "five");
    let addresses = cluster.addresses.clone();
    wait_until_all_see(&rt, &addresses, 5, CONVERGE_DEADLINE);
    println!("cluster: 5 nodes converged {:?} after the first start", started.elapsed());

    let topology =
        rt.block_on(async { connect(&addresses[0], Consistency::ONE).await.topology().await }).expect("ring");
    let mut owned = vec![0usize; topology.nodes.len()];
    for &owner in &topology.owners {
        owned[owner as usize] += 1;
    }
    let balance = *owned.iter().max().unwrap_or(&0) as f64 / *owned.iter().min().unwrap_or(&1).max(&1) as f64;
    println!(
        "cluster: ring of {} partitions over 5 nodes {owned:?}: largest/smallest share {balance:.3}",
        topology.owners.len()
    );
    assert!(balance <= 1.15);

    // A node that holds no replica of a key hands the request to one that does.
    rt.block_on(async {
        let via_first = connect_direct(&addresses[0], Consistency::QUORUM).await;
        let via_second = connect_direct(&addresses[1], Consistency::QUORUM).await;
        for i in 0..50 {
            let key = format!("spread-{i}").into_bytes();
            via_first.put(&key, &key).await.expect("write through any node");
            let got = via_second.get(&key).await.expect("read through any node");
            assert_eq!(got.map(|v| v.value), Some(key));
        }
        let forwarded = cluster_stats(&addresses[0]).await.and_then(|s| s["forwarded"].as_u64()).unwrap_or(0);
        println!("cluster: 50 writes and reads through nodes that are not replicas of every key ({forwarded} forwarded by the first)");
        assert!(forwarded > 0);
    });

    // SIGSTOP for 1 s: nobody marks the paused node down, during the pause or after it.
    let paused = cluster.nodes[4].as_ref().map(|n| n.child.id() as i32).expect("node 5");
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(paused, libc::SIGSTOP) };
    let pause_start = Instant::now();
    let mut checks = 0;
    while pause_start.elapsed() < Duration::from_secs(2) {
        if pause_start.elapsed() >= Duration::from_secs(1) && checks > 0 {
            // SAFETY: as above.
            unsafe { libc::kill(paused, libc::SIGCONT) };
        }
        for address in &addresses[..4] {
            assert!(
                rt.block_on(sees_up(address, 5)),
                "{address} marked the paused node down after {:?}",
                pause_start.elapsed()
            );
        }
        checks += 1;
    }
    // SAFETY: as above.
    unsafe { libc::kill(paused, libc::SIGCONT) };
    println!("cluster: a node paused for 1 s stayed up in every view ({checks} rounds of checks over 2 s)");

    let killed_at = Instant::now();
    cluster.kill9(4);
    let detected = wait_until_all_see(&rt, &addresses[..4], 4, DETECT_DEADLINE);
    println!(
        "cluster: a killed node was down in all 4 other views {detected:?} after kill -9 ({:?})",
        killed_at.elapsed()
    );
}

#[test]
fn a_read_repairs_a_replica_that_missed_writes_and_lost_its_hints() {
    let rt = runtime();
    // Without anti-entropy, which would repair the replica before the reads do.
    let mut cluster = Cluster::start_flagged(3, "repair", &["--anti-entropy-interval-ms", "0"]);
    let addresses = cluster.addresses.clone();
    wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    // Node 3 misses 50 writes; their hints sit on node 1 (the coordinator), which then dies.
    cluster.kill9(2);
    wait_until_all_see(&rt, &addresses[..2], 2, DETECT_DEADLINE);
    let via_first = rt.block_on(connect_direct(&addresses[0], Consistency::QUORUM));
    for i in 0..50 {
        let key = format!("repair-{i}").into_bytes();
        rt.block_on(via_first.put(&key, &key)).expect("write with a replica down");
    }
    cluster.kill9(0);
    cluster.restart(2);
    wait_until_all_see(&rt, &addresses[1..], 2, CONVERGE_DEADLINE);
    // QUORUM reads through node 3 find it stale (node 2 has the writes) and repair it.
    let via_third = rt.block_on(connect_direct(&addresses[2], Consistency::QUORUM));
    for i in 0..50 {
        let key = format!("repair-{i}").into_bytes();
        let got = rt.block_on(via_third.get(&key)).expect("QUORUM read");
        assert_eq!(got.map(|v| v.value), Some(key));
    }
    let repairs = wait_for("read repairs counted", Duration::from_secs(10), || {
        let repairs = rt.block_on(cluster_stats(&addresses[2]))?["read_repairs"].as_u64()?;
        (repairs >= 50).then_some(repairs)
    });
    // Then node 3 alone holds them all.
    cluster.kill9(1);
    let alone = rt.block_on(connect_direct(&addresses[2], Consistency::ONE));
    for i in 0..50 {
        let key = format!("repair-{i}").into_bytes();
        let got = rt.block_on(alone.get(&key)).expect("read at ONE");
        assert_eq!(got.map(|v| v.value), Some(key), "key {i} was not repaired");
    }
    println!("cluster: {repairs} read repairs brought a replica that missed 50 writes (hints lost with their coordinator) up to date");
}

/// Issue 16: the same `--seeds` list on every node, its own address included (the usual
/// convention), forms a cluster of three with `--replicas 3`; `kvctl status` shows each
/// node's client address and, once data is written, a load above zero.
#[test]
fn the_same_seed_list_on_every_node_self_included_forms_the_cluster() {
    let rt = runtime();
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let dirs: Vec<DataDir> = (0..3).map(|i| DataDir::new(&format!("same-seeds-{i}"))).collect();
    // Every node listens on one port, on its own IP: a port free on the first, tried again
    // with another if some node cannot bind it.
    let nodes = wait_for("three nodes on one free port", Duration::from_secs(30), || {
        let port = std::net::TcpListener::bind((ips[0], 0)).ok()?.local_addr().ok()?.port();
        let seeds = ips.map(|ip| format!("{ip}:{port}")).join(",");
        let mut nodes = Vec::new();
        for (ip, dir) in ips.iter().zip(&dirs) {
            let flags = ["--seeds", seeds.as_str(), "--replicas", "3"];
            nodes.push(Node::try_start_in(None, &dir.0, &format!("{ip}:{port}"), 1, &flags).ok()?);
        }
        Some((nodes, port))
    });
    let (nodes, port) = nodes;
    let addresses: Vec<String> = nodes.iter().map(Node::address).collect();
    assert_eq!(addresses, ips.map(|ip| format!("{ip}:{port}")));
    wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    rt.block_on(async {
        let client = connect(&addresses[0], Consistency::QUORUM).await;
        let topology = client.topology().await.expect("topology");
        assert_eq!((topology.nodes.len(), topology.replica_count), (3, 3));
        for i in 0..200 {
            client.put(format!("k{i}").as_bytes(), &[7u8; 100]).await.expect("put");
        }
    });
    // The data sits in memtables: the load counts it (announced within a gossip round or two).
    let status = wait_for("kvctl status to show every node's load", Duration::from_secs(15), || {
        let (code, stdout, stderr) = crate::node::kvctl(&addresses[1], &["--json", "status"], None);
        assert_eq!(code, 0, "{stderr}");
        let status: serde_json::Value = serde_json::from_str(&stdout).ok()?;
        let nodes = status["nodes"].as_array()?.clone();
        nodes.iter().all(|n| n["load_bytes"].as_u64() > Some(20_000)).then_some(nodes)
    });
    let mut shown: Vec<String> =
        status.iter().filter_map(|n| n["address"].as_str().map(str::to_string)).collect();
    shown.sort();
    assert_eq!(shown, addresses, "kvctl status shows the client addresses users type");
    println!(
        "cluster: three nodes given the same seed list (self included) formed with --replicas 3; kvctl status \
         shows {shown:?}, load_bytes {:?}",
        status.iter().map(|n| n["load_bytes"].as_u64().unwrap_or(0)).collect::<Vec<_>>()
    );
}
