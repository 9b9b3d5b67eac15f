//! Linearizable CAS on real clusters (port 0, one shard, no pinning): clients run CAS and
//! SERIAL reads while, in turn, a node is killed with kill -9 and restarted, a node is paused
//! with SIGSTOP for longer than every timeout, a node is cut off with nftables drop rules
//! (nodes on 127.0.0.2..), and a node's network namespace is unplugged from the bridge that
//! joins the nodes' namespaces; the recorded per-key histories go through the Wing-Gong-Lowe
//! checker. And 20 clients incrementing one counter by CAS.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client::{CasOutcome, Client, Consistency, Error, Options};
use server::linearizability::{check, Event, Operation, Outcome};

use crate::cluster::{wait_until_all_see, Cluster, Partition, CONVERGE_DEADLINE, DETECT_DEADLINE};
use crate::harness::runtime;

/// Keys per workload, so that each starts from absent keys.
const KEY_COUNT: usize = 3;

async fn serial_client(address: &str) -> Option<Client> {
    let options =
        Options { consistency: Consistency::SERIAL, timeout: Duration::from_secs(2), ..Options::default() };
    Client::connect(address, options).await.ok()
}

fn parse(value: Option<client::Value>) -> Option<u64> {
    value.map(|v| String::from_utf8_lossy(&v.value).parse().expect("a number"))
}

/// Shared between the workload's clients.
#[derive(Default)]
struct Record {
    histories: BTreeMap<usize, Vec<Event<u64>>>,
    next_value: u64,
}

/// One client: CAS (expecting what it last saw) and SERIAL reads through node `first`
/// (moving on to the next node when one fails), until `stop`.
async fn run_client(
    keys: Vec<Vec<u8>>,
    index: usize,
    addresses: Vec<String>,
    record: Arc<Mutex<Record>>,
    start: Instant,
    stop: Arc<Mutex<Option<Instant>>>,
) {
    let mut seen: BTreeMap<usize, Option<u64>> = BTreeMap::new();
    let mut node = index % addresses.len();
    let mut client = None;
    let mut step = index as u64;
    while stop.lock().expect("stop").is_none_or(|stop| Instant::now() < stop) {
        step = step.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if client.is_none() {
            client = serial_client(&addresses[node]).await;
            if client.is_none() {
                node = (node + 1) % addresses.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let connected = client.as_ref().expect("client");
        let key = (step >> 33) as usize % keys.len();
        let began = start.elapsed().as_nanos() as u64;
        let (operation, outcome) = if (step >> 40).is_multiple_of(3) {
            let outcome = match connected.get(&keys[key]).await {
                Ok(value) => Outcome::Read(parse(value)),
                Err(_) => Outcome::Unknown,
            };
            (Operation::Read, outcome)
        } else {
            let expected = seen.get(&key).copied().flatten();
            let new = {
                let mut record = record.lock().expect("record");
                record.next_value += 1;
                record.next_value
            };
            let expected_bytes = expected.map(|v| v.to_string().into_bytes());
            let result =
                connected.cas(&keys[key], expected_bytes.as_deref(), new.to_string().as_bytes(), None).await;
            let outcome = match result {
                Ok(CasOutcome::Swapped) => Outcome::CasApplied,
                Ok(CasOutcome::Failed { current }) => Outcome::CasFailed(parse(current)),
                // Refused before anything was proposed: no effect, not recorded.
                Err(Error::Unavailable(_)) => {
                    client = None;
                    node = (node + 1) % addresses.len();
                    continue;
                }
                Err(_) => Outcome::Unknown,
            };
            (Operation::Cas { expected, new }, outcome)
        };
        let ended = start.elapsed().as_nanos() as u64;
        match &outcome {
            Outcome::Read(value) | Outcome::CasFailed(value) => {
                seen.insert(key, *value);
            }
            Outcome::CasApplied => {
                if let Operation::Cas { new, .. } = operation {
                    seen.insert(key, Some(new));
                }
            }
            Outcome::Unknown => {
                // The node may be gone: the next operation goes through another.
                client = None;
                node = (node + 1) % addresses.len();
            }
            // These clients only read and CAS.
            Outcome::Written { .. } | Outcome::Incremented(_) => {}
        }
        let end = if outcome == Outcome::Unknown { u64::MAX } else { ended };
        let event = Event { start: began, end, operation, outcome };
        record.lock().expect("record").histories.entry(key).or_default().push(event);
    }
}

/// Runs `clients` clients for the whole of `faults`, which injects faults meanwhile; then
/// checks every key's history.
fn linearizable_under(cluster: &mut Cluster, clients: usize, name: &str, faults: impl FnOnce(&mut Cluster)) {
    let rt = runtime();
    let keys: Vec<Vec<u8>> = (0..KEY_COUNT).map(|k| format!("{name}-{k}").into_bytes()).collect();
    let record = Arc::new(Mutex::new(Record::default()));
    let start = Instant::now();
    let stop = Arc::new(Mutex::new(None::<Instant>));
    // The clients run until told when to stop (after the faults), on the runtime's threads.
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            rt.spawn(run_client(
                keys.clone(),
                i,
                cluster.addresses.clone(),
                record.clone(),
                start,
                stop.clone(),
            ))
        })
        .collect();
    faults(cluster);
    *stop.lock().expect("stop") = Some(Instant::now() + Duration::from_secs(2));
    for handle in handles {
        rt.block_on(handle).expect("client task");
    }
    let record = record.lock().expect("record");
    let (mut operations, mut applied, mut unknown) = (0, 0, 0);
    for (key, history) in &record.histories {
        if let Err(error) = check(history, None) {
            panic!("{name}: key {key}: {error}\n{history:#?}");
        }
        operations += history.len();
        applied += history.iter().filter(|e| e.outcome == Outcome::CasApplied).count();
        unknown += history.iter().filter(|e| e.outcome == Outcome::Unknown).count();
    }
    println!(
        "serial: {name}: {clients} clients on {} keys, {operations} operations checked ({applied} CAS applied, \
         {unknown} of unknown outcome): linearizable, 0 violations",
        KEY_COUNT
    );
    assert!(applied >= 20, "{name}: too few CAS applied ({applied}) to mean anything");
}

fn pid(cluster: &Cluster, index: usize) -> i32 {
    cluster.nodes[index].as_ref().map(|n| n.child.id() as i32).expect("running node")
}

/// The workload through node `killed` killed with kill -9 and restarted, then through node 1
/// paused with SIGSTOP for 5 s (past every timeout).
fn killed_then_paused(rt: &tokio::runtime::Runtime, cluster: &mut Cluster, killed: usize) {
    let size = cluster.addresses.len();
    linearizable_under(cluster, 10, &format!("{size} nodes, kill -9 and restart"), |cluster| {
        std::thread::sleep(Duration::from_secs(2));
        cluster.kill9(killed);
        std::thread::sleep(Duration::from_secs(3));
        cluster.restart(killed);
        std::thread::sleep(Duration::from_secs(2));
    });
    wait_until_all_see(rt, &cluster.addresses, size, CONVERGE_DEADLINE);
    let name = format!("{size} nodes, SIGSTOP for 5 s (past every timeout)");
    linearizable_under(cluster, 10, &name, |cluster| {
        std::thread::sleep(Duration::from_secs(1));
        let paused = pid(cluster, 1);
        // SAFETY: signals to our own child process.
        unsafe { libc::kill(paused, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_secs(5));
        // SAFETY: as above.
        unsafe { libc::kill(paused, libc::SIGCONT) };
        std::thread::sleep(Duration::from_secs(2));
    });
}

#[test]
fn cas_histories_stay_linearizable_through_kill_pause_and_partition() {
    let rt = runtime();
    let mut cluster = Cluster::start(3, "serial");
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    killed_then_paused(&rt, &mut cluster, 2);
    if !crate::harness::can_cut_network("the partition part") {
        return;
    }
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    linearizable_under(&mut cluster, 10, "3 nodes, one cut off by nftables for 5 s", |cluster| {
        std::thread::sleep(Duration::from_secs(1));
        let ip = |address: &str| address.split(':').next().unwrap_or_default().to_string();
        let others = [ip(&cluster.addresses[1]), ip(&cluster.addresses[2])];
        let others: Vec<&str> = others.iter().map(String::as_str).collect();
        let partition = Partition::isolate(&ip(&cluster.addresses[0]), &others).expect("nft partition");
        std::thread::sleep(Duration::from_secs(5));
        drop(partition);
        std::thread::sleep(Duration::from_secs(2));
    });
}

/// One network namespace per node, each with a veth pair whose host end is on a bridge in the
/// test's namespace (which holds the bridge's address, so clients reach every node). Names
/// carry the test process's pid; everything is removed on drop, and what a killed run left by
/// the next run's harness (`harness::remove_leftovers`).
struct Namespaces {
    prefix: String,
    count: usize,
    subnet: String,
}

fn ip(args: &[&str]) -> bool {
    crate::harness::command("ip").args(args).status().is_ok_and(|s| s.success())
}

impl Namespaces {
    fn create(count: usize) -> Option<Namespaces> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        crate::harness::remove_leftovers();
        let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        // The whole pid in every name, so that a later run can tell whether its owner is
        // still alive (`harness::remove_leftovers`); link names fit in 15 bytes.
        let pid = std::process::id();
        let subnet = format!("10.77.{}", (pid * 10 + next) % 250);
        let namespaces = Namespaces { prefix: format!("kt{pid}x{next}"), count, subnet };
        let (p, subnet) = (&namespaces.prefix, &namespaces.subnet);
        let bridge = format!("{p}br");
        let ok = ip(&["link", "add", &bridge, "type", "bridge"])
            && ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &bridge])
            && ip(&["link", "set", &bridge, "up"])
            && (0..count).all(|i| {
                let (netns, host, inner) = (namespaces.netns(i), format!("{p}h{i}"), format!("{p}v{i}"));
                ip(&["netns", "add", &netns])
                    && ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])
                    && ip(&["link", "set", &inner, "netns", &netns])
                    && ip(&["link", "set", &host, "master", &bridge])
                    && ip(&["link", "set", &host, "up"])
                    && ip(&[
                        "netns",
                        "exec",
                        &netns,
                        "ip",
                        "addr",
                        "add",
                        &format!("{}/24", namespaces.ip(i)),
                        "dev",
                        &inner,
                    ])
                    && ip(&["netns", "exec", &netns, "ip", "link", "set", &inner, "up"])
                    && ip(&["netns", "exec", &netns, "ip", "link", "set", "lo", "up"])
            });
        ok.then_some(namespaces)
    }

    fn netns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    fn ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 2)
    }

    /// Unplugs (or plugs back) node `i`'s cable: nothing reaches it or leaves it.
    fn set_connected(&self, i: usize, connected: bool) {
        let state = if connected { "up" } else { "down" };
        assert!(ip(&["link", "set", &format!("{}h{i}", self.prefix), state]), "ip link set {state}");
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for i in 0..self.count {
            ip(&["netns", "del", &self.netns(i)]);
            ip(&["link", "del", &format!("{}h{i}", self.prefix)]);
        }
        ip(&["link", "del", &format!("{}br", self.prefix)]);
    }
}

/// `size` nodes, each in its own network namespace; node 0 unplugged for 5 s meanwhile.
fn unplugged_in_namespaces(size: usize) {
    if !crate::harness::can_cut_network("the network namespace test") {
        return;
    }
    let namespaces = Namespaces::create(size).expect("network namespaces, veth pairs and a bridge");
    let ips: Vec<String> = (0..size).map(|i| namespaces.ip(i)).collect();
    let netns: Vec<Option<String>> = (0..size).map(|i| Some(namespaces.netns(i))).collect();
    let rt = runtime();
    let mut cluster = Cluster::start_at(&format!("netns{size}"), &ips, &netns);
    wait_until_all_see(&rt, &cluster.addresses, size, CONVERGE_DEADLINE);
    let name = format!("{size} nodes in namespaces, one unplugged for 5 s");
    linearizable_under(&mut cluster, 10, &name, |cluster| {
        std::thread::sleep(Duration::from_secs(1));
        namespaces.set_connected(0, false);
        let cut = std::time::Instant::now();
        // The cut is real: the others mark the unplugged node down.
        let watcher = runtime();
        wait_until_all_see(&watcher, &cluster.addresses[1..], size - 1, DETECT_DEADLINE);
        println!("serial: the unplugged node was down for the others {:?} after the cut", cut.elapsed());
        std::thread::sleep(Duration::from_secs(5).saturating_sub(cut.elapsed()));
        namespaces.set_connected(0, true);
        wait_until_all_see(&watcher, &cluster.addresses, size, CONVERGE_DEADLINE);
        std::thread::sleep(Duration::from_secs(1));
    });
    drop(cluster);
}

#[test]
fn cas_stays_linearizable_when_a_node_is_cut_off_in_its_network_namespace() {
    unplugged_in_namespaces(3);
}

#[test]
fn five_nodes_cas_stays_linearizable_when_one_is_cut_off_in_its_network_namespace() {
    unplugged_in_namespaces(5);
}

#[test]
fn five_nodes_cas_stays_linearizable_through_a_kill_and_a_pause() {
    let rt = runtime();
    let mut cluster = Cluster::start(5, "serial5");
    wait_until_all_see(&rt, &cluster.addresses, 5, CONVERGE_DEADLINE);
    killed_then_paused(&rt, &mut cluster, 3);
}

#[test]
fn a_cas_with_a_causal_context_applies_only_if_nothing_was_written_since() {
    let rt = runtime();
    let cluster = Cluster::start(3, "context");
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    rt.block_on(async {
        let client = serial_client(&cluster.addresses[0]).await.expect("client");
        let other = serial_client(&cluster.addresses[1]).await.expect("client");
        client.put(b"ctx", b"a").await.expect("serial put");
        let read = client.get_versions(b"ctx").await.expect("serial read");
        // The same value written again in between: the value matches, the context does not.
        other.put(b"ctx", b"a").await.expect("serial put");
        let outcome = client.cas_with_context(b"ctx", Some(b"a"), b"b", None, &read.context).await;
        assert!(
            matches!(&outcome, Ok(CasOutcome::Failed { current: Some(v) }) if v.value == b"a"),
            "{outcome:?}"
        );
        let read = client.get_versions(b"ctx").await.expect("serial read");
        let outcome = client.cas_with_context(b"ctx", Some(b"a"), b"b", None, &read.context).await;
        assert_eq!(outcome.expect("cas"), CasOutcome::Swapped);
        let value = client.get(b"ctx").await.expect("serial read").expect("present");
        assert_eq!(value.value, b"b");
        // A context that names writes the key never saw is refused the same way.
        let outcome = client.cas_with_context(b"ctx", Some(b"b"), b"c", None, &read.context).await;
        assert!(matches!(outcome, Ok(CasOutcome::Failed { .. })), "{outcome:?}");
    });
    println!("serial: a CAS with a causal context failed after an intervening write of the same value, and applied with a fresh one");
}

#[test]
fn twenty_clients_incrementing_one_counter_by_cas_count_exactly() {
    let rt = runtime();
    let cluster = Cluster::start(3, "counter");
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    let stop = Instant::now() + Duration::from_secs(10);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let address = cluster.addresses[i % 3].clone();
            rt.spawn(async move {
                let client = serial_client(&address).await.expect("client");
                let (mut swapped, mut failed, mut unknown) = (0u64, 0u64, 0u64);
                // What the last answer said the counter holds (a failed CAS answers it).
                let mut current = None;
                while Instant::now() < stop {
                    let value = match current.take() {
                        Some(value) => value,
                        None => match client.get(b"counter").await {
                            Ok(value) => parse(value).unwrap_or(0),
                            Err(_) => continue,
                        },
                    };
                    let expected = (value > 0).then(|| value.to_string().into_bytes());
                    let next = (value + 1).to_string();
                    match client.cas(b"counter", expected.as_deref(), next.as_bytes(), None).await {
                        Ok(CasOutcome::Swapped) => {
                            swapped += 1;
                            current = Some(value + 1);
                        }
                        Ok(CasOutcome::Failed { current: now }) => {
                            failed += 1;
                            current = Some(parse(now).unwrap_or(0));
                        }
                        Err(_) => unknown += 1,
                    }
                }
                (swapped, failed, unknown)
            })
        })
        .collect();
    let (mut swapped, mut failed, mut unknown) = (0, 0, 0);
    for task in tasks {
        let (s, f, u) = rt.block_on(task).expect("client task");
        swapped += s;
        failed += f;
        unknown += u;
    }
    let reader = rt.block_on(serial_client(&cluster.addresses[0])).expect("client");
    let last = parse(rt.block_on(reader.get(b"counter")).expect("final SERIAL read")).unwrap_or(0);
    println!(
        "serial: 20 clients x 10 s incrementing one counter by CAS on 3 nodes: {swapped} applied, {failed} \
         failed (lost the race), {unknown} of unknown outcome; final value {last}"
    );
    assert!(swapped > 0);
    // Every applied CAS counted once, none lost: an unknown one may or may not have applied.
    assert!(
        swapped <= last && last <= swapped + unknown,
        "final {last} vs {swapped} applied and {unknown} unknown"
    );
    if unknown == 0 {
        assert_eq!(last, swapped);
    }
}
