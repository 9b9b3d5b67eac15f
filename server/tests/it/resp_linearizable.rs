//! RESP in a cluster under `--resp-consistency serial` (issue 16): eight RESP clients mix GET,
//! SET, SET IFEQ, DEL and INCR on a few keys while a node is killed, and every key's history
//! must be linearizable (checked by `server::linearizability`). Under `quorum` the same
//! workload is not linearizable, and the test shows the checker finds it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use server::linearizability::{check, Event, Operation, Outcome};
use server::rng::Rng;

use crate::cluster::{wait_until_all_see, Cluster, CONVERGE_DEADLINE};
use crate::harness::runtime;

const CLIENT_COUNT: usize = 8;
const KEY_COUNT: usize = 4;
const OPERATION_COUNT_MIN: usize = 20_000;
/// The run stops here even short of the count (a slow machine), and says so.
const RUN_TIME_MAX: Duration = Duration::from_secs(240);

/// A RESP reply, as far as these commands need.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Ok,
    Null,
    Bulk(Vec<u8>),
    Integer(i64),
    Error(String),
}

struct RespClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RespClient {
    fn connect(address: &str) -> Option<RespClient> {
        let stream = TcpStream::connect_timeout(&address.parse().ok()?, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream.set_nodelay(true).ok()?;
        Some(RespClient { reader: BufReader::new(stream.try_clone().ok()?), writer: stream })
    }

    /// Sends one command; `None` if the connection failed (the outcome is then unknown).
    fn call(&mut self, args: &[&[u8]]) -> Option<Reply> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&request).ok()?;
        let mut line = String::new();
        self.reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        let (kind, rest) = line.split_at_checked(1)?;
        Some(match kind {
            "+" => Reply::Ok,
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Integer(rest.parse().ok()?),
            "$" if rest == "-1" => Reply::Null,
            "$" => {
                let size: usize = rest.parse().ok()?;
                let mut bytes = vec![0u8; size + 2];
                std::io::Read::read_exact(&mut self.reader, &mut bytes).ok()?;
                bytes.truncate(size);
                Reply::Bulk(bytes)
            }
            _ => return None,
        })
    }
}

fn integer(bytes: &[u8]) -> i64 {
    std::str::from_utf8(bytes).ok().and_then(|text| text.parse().ok()).expect("every value is an integer")
}

/// Runs the workload against `cluster`'s RESP ports, killing node 2 a third of the way in.
/// Returns every key's history and how many operations ran.
fn run_workload(cluster: &mut Cluster, name: &str) -> (Vec<Vec<Event<i64>>>, usize) {
    let addresses: Vec<String> = (0..3)
        .map(|i| {
            let node = cluster.nodes[i].as_ref().expect("node");
            let ip = cluster.addresses[i].split(':').next().expect("ip").to_string();
            format!("{ip}:{}", node.ports.resp.expect("resp port").port())
        })
        .collect();
    let histories: Arc<Mutex<Vec<Vec<Event<i64>>>>> = Arc::new(Mutex::new(vec![Vec::new(); KEY_COUNT]));
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let micros = move || started.elapsed().as_micros() as u64;
    let mut clients = Vec::new();
    for client in 0..CLIENT_COUNT {
        let (addresses, histories, done) = (addresses.clone(), histories.clone(), done.clone());
        clients.push(std::thread::spawn(move || {
            let mut rng = Rng::new(client as u64 + 1);
            let mut node = client % 3;
            let mut connection = RespClient::connect(&addresses[node]);
            let mut last_seen: Vec<Option<i64>> = vec![None; KEY_COUNT];
            while done.load(Ordering::Relaxed) < OPERATION_COUNT_MIN && started.elapsed() < RUN_TIME_MAX {
                let Some(resp) = connection.as_mut() else {
                    node = (node + 1) % 3;
                    connection = RespClient::connect(&addresses[node]);
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let key_index = rng.below(KEY_COUNT as u64) as usize;
                let key = format!("lin-{key_index}").into_bytes();
                let value = rng.below(1000) as i64;
                let value_text = value.to_string().into_bytes();
                let start = micros();
                let (operation, reply) = match rng.below(20) {
                    0..=6 => (Operation::Read, resp.call(&[b"GET", &key])),
                    7..=11 => (Operation::Write(Some(value)), resp.call(&[b"SET", &key, &value_text])),
                    12..=14 => {
                        let expected = last_seen[key_index].unwrap_or(0);
                        let expected_text = expected.to_string().into_bytes();
                        let args: [&[u8]; 6] = [b"SET", &key, &value_text, b"IFEQ", &expected_text, b"GET"];
                        (Operation::Cas { expected: Some(expected), new: value }, resp.call(&args))
                    }
                    15..=16 => (Operation::Write(None), resp.call(&[b"DEL", &key])),
                    _ => (Operation::Increment, resp.call(&[b"INCR", &key])),
                };
                let end = micros();
                let outcome = match (&operation, reply) {
                    (_, None) => {
                        connection = None; // broken: reconnect, maybe elsewhere
                        Outcome::Unknown
                    }
                    (_, Some(Reply::Error(_))) => Outcome::Unknown,
                    (Operation::Read, Some(Reply::Null)) => Outcome::Read(None),
                    (Operation::Read, Some(Reply::Bulk(bytes))) => Outcome::Read(Some(integer(&bytes))),
                    (Operation::Write(Some(_)), Some(Reply::Ok)) => Outcome::Written { existed: None },
                    (Operation::Write(None), Some(Reply::Integer(count))) => {
                        Outcome::Written { existed: Some(count == 1) }
                    }
                    (Operation::Increment, Some(Reply::Integer(now))) => Outcome::Incremented(now),
                    // SET ... IFEQ old GET answers the value it found: it applied if that was
                    // the one expected.
                    (Operation::Cas { expected, .. }, Some(Reply::Null)) => {
                        assert!(expected.is_some());
                        Outcome::CasFailed(None)
                    }
                    (Operation::Cas { expected, .. }, Some(Reply::Bulk(bytes))) => {
                        let found = integer(&bytes);
                        if Some(found) == *expected {
                            Outcome::CasApplied
                        } else {
                            Outcome::CasFailed(Some(found))
                        }
                    }
                    (operation, reply) => panic!("{operation:?} answered {reply:?}"),
                };
                match (&operation, &outcome) {
                    (_, Outcome::Read(seen) | Outcome::CasFailed(seen)) => last_seen[key_index] = *seen,
                    (Operation::Cas { new, .. }, Outcome::CasApplied) => last_seen[key_index] = Some(*new),
                    (_, Outcome::Incremented(now)) => last_seen[key_index] = Some(*now),
                    _ => {}
                }
                let end = if outcome == Outcome::Unknown { u64::MAX } else { end };
                let event = Event { start, end, operation, outcome };
                histories.lock().expect("histories")[key_index].push(event);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // A third of the way in, node 2 dies.
    while done.load(Ordering::Relaxed) < OPERATION_COUNT_MIN / 3 && started.elapsed() < RUN_TIME_MAX {
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed_at = done.load(Ordering::Relaxed);
    cluster.kill9(2);
    for client in clients {
        client.join().expect("client thread");
    }
    let histories = Arc::try_unwrap(histories).expect("threads done").into_inner().expect("histories");
    let count = done.load(Ordering::Relaxed);
    println!(
        "resp {name}: {count} operations from {CLIENT_COUNT} RESP clients on {KEY_COUNT} keys in {:.1} s, \
         node 2 killed -9 after {killed_at}",
        started.elapsed().as_secs_f64()
    );
    (histories, count)
}

fn cluster(mode: &str) -> Cluster {
    let rt = runtime();
    let cluster = Cluster::start_flagged(3, &format!("resp-{mode}"), &["--resp-consistency", mode]);
    wait_until_all_see(&rt, &cluster.addresses, 3, CONVERGE_DEADLINE);
    cluster
}

#[test]
fn resp_is_linearizable_under_serial_through_a_kill() {
    let mut cluster = cluster("serial");
    let (histories, count) = run_workload(&mut cluster, "serial");
    assert!(count >= OPERATION_COUNT_MIN, "only {count} operations in {RUN_TIME_MAX:?}");
    for (key, history) in histories.iter().enumerate() {
        let unknown = history.iter().filter(|e| e.outcome == Outcome::Unknown).count();
        check(history, None).unwrap_or_else(|error| panic!("key {key} under serial: {error}"));
        println!(
            "resp serial: key {key}: {} operations ({unknown} of unknown outcome) linearizable",
            history.len()
        );
    }
}

#[test]
fn resp_under_quorum_is_not_linearizable_and_the_check_says_so() {
    let mut cluster = cluster("quorum");
    let (histories, _) = run_workload(&mut cluster, "quorum");
    let violations: Vec<usize> =
        (0..KEY_COUNT).filter(|&key| check(&histories[key], None).is_err()).collect();
    println!("resp quorum: keys whose history no order explains: {violations:?} of {KEY_COUNT}");
    assert!(!violations.is_empty(), "the checker found no violation under quorum");
}
