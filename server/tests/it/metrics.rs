//! `/metrics` and `/health` on a running node: every request type moves its series.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::harness::{client, runtime, DataDir, Node};

fn http_get(address: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(address).expect("connect to metrics");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// `series -> value` for every sample line (labels included in the name).
fn scrape(address: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http_get(address, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn series(samples: &BTreeMap<String, f64>, prefix: &str, needles: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(name, _)| name.starts_with(prefix) && needles.iter().all(|n| name.contains(n)))
        .map(|(_, value)| *value)
        .sum()
}

#[test]
fn every_request_moves_its_series_and_health_answers() {
    let dir = DataDir::new("metrics");
    let node = Node::start(&dir.0, &["--metrics-listen", "127.0.0.1:0"]);
    let address = node.ports.metrics.expect("metrics address in ports.json");
    let (status, body) = http_get(address, "/health");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok\n"));
    assert!(http_get(address, "/nothing").0.contains("404"));

    let before = scrape(address);
    let rt = runtime();
    rt.block_on(async {
        let client = client(&node).await;
        client.put(b"m", b"1").await.expect("put");
        assert!(client.get(b"m").await.expect("get").is_some());
        assert!(client.get(b"absent").await.expect("get").is_none());
        assert!(client.delete(b"m").await.expect("delete"));
        client.cas(b"m", None, b"2", None).await.expect("cas");
    });
    let after = scrape(address);
    let moved = |needles: &[&str]| {
        series(&after, "kvd_requests_total", needles) - series(&before, "kvd_requests_total", needles)
    };
    assert_eq!(moved(&["op=\"put\"", "status=\"ok\""]), 1.0);
    assert_eq!(moved(&["op=\"get\"", "status=\"ok\""]), 1.0);
    assert_eq!(moved(&["op=\"get\"", "status=\"not_found\""]), 1.0);
    assert_eq!(moved(&["op=\"delete\"", "status=\"ok\""]), 1.0);
    assert_eq!(moved(&["op=\"cas\"", "status=\"ok\""]), 1.0);
    let latency = |samples: &BTreeMap<String, f64>| {
        series(samples, "kvd_request_duration_seconds_count", &["op=\"get\""])
    };
    assert_eq!(latency(&after) - latency(&before), 2.0);
    for gauge in ["kvd_bytes_in", "kvd_bytes_out", "kvd_log_sync_count", "kvd_engine_memtable_bytes"] {
        assert!(series(&after, gauge, &[]) > series(&before, gauge, &[]), "{gauge} did not move");
    }
    println!("metrics: {} series scraped; each request type moved its counter by one", after.len());
}

#[test]
fn health_says_why_a_forming_cluster_node_does_not_serve() {
    let dir = DataDir::new("metrics-forming");
    let node =
        Node::start(&dir.0, &["--metrics-listen", "127.0.0.1:0", "--cluster-size", "2", "--replicas", "2"]);
    let (status, body) = http_get(node.ports.metrics.expect("metrics address"), "/health");
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("forming"), "{body}");
}
