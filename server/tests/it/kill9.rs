//! `kill -9` at random moments while a client pipelines PUTs with `--fsync always`: after
//! every restart, every acknowledged write reads back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use server::rng::Rng;

use crate::harness::{client, runtime, DataDir, Node};

const WRITER_COUNT: usize = 32;

async fn verify(client: &client::Client, expected: &BTreeMap<String, String>, seed: u64) {
    let pairs: Vec<(String, String)> = expected.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for chunk in pairs.chunks(256) {
        let reads: Vec<_> = chunk
            .iter()
            .map(|(key, value)| {
                let client = client.clone();
                let (key, value) = (key.clone(), value.clone());
                tokio::spawn(async move {
                    let found = client.get(key.as_bytes()).await.expect("read after restart");
                    (key, value, found.map(|v| v.value))
                })
            })
            .collect();
        for read in reads {
            let (key, value, found) = read.await.expect("task");
            assert_eq!(found, Some(value.into_bytes()), "seed {seed}: acknowledged write of {key} lost");
        }
    }
}

#[test]
fn kill9_loses_no_acknowledged_write() {
    let cycle_count: usize = std::env::var("KILL9_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let mut rng = Rng::new(seed);
    let dir = DataDir::new("kill9");
    let runtime = runtime();
    let mut all_acked = BTreeMap::new();
    let mut previous_cycle = BTreeMap::new();
    for cycle in 0..cycle_count {
        let mut node = Node::start(&dir.0, &["--fsync", "always"]);
        let kill_after = Duration::from_millis(20 + rng.below(280));
        let acked = runtime.block_on(async {
            let client = client(&node).await;
            verify(&client, &previous_cycle, seed).await;
            let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
            let writers: Vec<_> = (0..WRITER_COUNT)
                .map(|writer| {
                    let client = client.clone();
                    let acked = acked.clone();
                    tokio::spawn(async move {
                        for index in 0.. {
                            let key = format!("c{cycle}-w{writer}-{index}");
                            let value = format!("value-of-{key}");
                            if client.put(key.as_bytes(), value.as_bytes()).await.is_err() {
                                return; // the node is gone
                            }
                            acked.lock().expect("lock").push((key, value));
                        }
                    })
                })
                .collect();
            tokio::time::sleep(kill_after).await;
            node.kill9();
            for writer in writers {
                writer.await.expect("writer");
            }
            let acked = acked.lock().expect("lock").clone();
            acked
        });
        previous_cycle = acked.into_iter().collect();
        all_acked.extend(previous_cycle.clone());
    }
    let node = Node::start(&dir.0, &[]);
    runtime.block_on(async {
        let client = client(&node).await;
        verify(&client, &all_acked, seed).await;
    });
    assert!(all_acked.len() > cycle_count, "seed {seed}: too few writes were acknowledged to mean anything");
    eprintln!(
        "kill -9: {cycle_count} cycles, {} acknowledged writes, none lost (seed {seed})",
        all_acked.len()
    );
}
