//! `kill -9` while the storage engine flushes and compacts: a 4 MiB memory budget makes the
//! memtable flush every few hundred writes and compactions follow, so kills land in the
//! middle of them (the test counts the kills that left an unfinished table behind). Writers
//! overwrite and delete keys; after every restart each key reads as its last acknowledged
//! state, or as the one write that was in flight at the kill, and nothing deleted returns.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use server::engine::manifest;
use server::rng::Rng;

use crate::harness::{client, runtime, DataDir, Node};

const WRITER_COUNT: u64 = 16;
const KEYS_PER_WRITER: u64 = 150;

/// A key's last acknowledged value (`None`: deleted or never written) and the write in
/// flight when the node died.
#[derive(Debug, Clone, Default)]
struct KeyState {
    acked: Option<Vec<u8>>,
    in_flight: Option<Option<Vec<u8>>>,
}

type States = Arc<Mutex<BTreeMap<String, KeyState>>>;

/// Table files on disk that the manifest does not name: a flush or compaction was cut.
fn unfinished_tables(shard_dir: &Path) -> usize {
    let live = std::fs::read(shard_dir.join(manifest::MANIFEST_FILE))
        .ok()
        .and_then(|bytes| manifest::decode(&bytes).ok())
        .map(|manifest| manifest.tables.iter().map(|table| table.id).collect::<Vec<u64>>())
        .unwrap_or_default();
    std::fs::read_dir(shard_dir)
        .map(|entries| {
            entries
                .filter_map(|entry| manifest::parse_table_file_name(entry.ok()?.file_name().to_str()?))
                .filter(|id| !live.contains(id))
                .count()
        })
        .unwrap_or(0)
}

async fn verify(client: &client::Client, states: &States, seed: u64, cycle: usize) {
    let keys: Vec<String> = states.lock().expect("lock").keys().cloned().collect();
    for chunk in keys.chunks(256) {
        let reads: Vec<_> = chunk
            .iter()
            .map(|key| {
                let client = client.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let found = client.get(key.as_bytes()).await.expect("read after restart");
                    (key, found.map(|v| v.value))
                })
            })
            .collect();
        for read in reads {
            let (key, found) = read.await.expect("task");
            let mut states = states.lock().expect("lock");
            let state = states.get_mut(&key).expect("state");
            let allowed = found == state.acked || state.in_flight.as_ref() == Some(&found);
            assert!(
                allowed,
                "seed {seed} cycle {cycle}: {key} reads {:?}, acknowledged {:?}, in flight {:?}",
                found.as_ref().map(Vec::len),
                state.acked.as_ref().map(Vec::len),
                state.in_flight.as_ref().map(|v| v.as_ref().map(Vec::len))
            );
            *state = KeyState { acked: found, in_flight: None };
        }
    }
}

#[test]
fn kill9_during_flush_and_compaction_loses_nothing_and_resurrects_nothing() {
    let cycle_count: usize =
        std::env::var("KILL9_ENGINE_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let mut rng = Rng::new(seed);
    let dir = DataDir::new("kill9-engine");
    let runtime = runtime();
    let states: States = Arc::default();
    let flags = ["--fsync", "always", "--memory-per-shard", "4", "--tombstone-grace-s", "0"];
    let (mut acked_total, mut cut_short) = (0u64, 0usize);
    for cycle in 0..cycle_count {
        let mut node = Node::start(&dir.0, &flags);
        let kill_after = Duration::from_millis(50 + rng.below(400));
        acked_total += runtime.block_on(async {
            let client = client(&node).await;
            verify(&client, &states, seed, cycle).await;
            let writers: Vec<_> = (0..WRITER_COUNT)
                .map(|writer| {
                    let client = client.clone();
                    let states = states.clone();
                    let mut rng = Rng::new(seed ^ (cycle as u64 * 1000 + writer));
                    tokio::spawn(async move {
                        let mut acked = 0u64;
                        for n in 0.. {
                            let key = format!("w{writer}-k{}", rng.below(KEYS_PER_WRITER));
                            let delete = rng.below(5) == 0;
                            let value = (!delete).then(|| {
                                let mut value = format!("{key}/{cycle}/{n}/").into_bytes();
                                value.resize(500 + rng.below(3000) as usize, b'v');
                                value
                            });
                            states.lock().expect("lock").entry(key.clone()).or_default().in_flight =
                                Some(value.clone());
                            let result = match &value {
                                Some(value) => client.put(key.as_bytes(), value).await.map(|_| ()),
                                None => client.delete(key.as_bytes()).await.map(|_| ()),
                            };
                            if result.is_err() {
                                return acked; // the node is gone; the write stays in flight
                            }
                            let mut states = states.lock().expect("lock");
                            let state = states.get_mut(&key).expect("state");
                            *state = KeyState { acked: value, in_flight: None };
                            acked += 1;
                        }
                        acked
                    })
                })
                .collect();
            tokio::time::sleep(kill_after).await;
            node.kill9();
            let mut acked = 0;
            for writer in writers {
                acked += writer.await.expect("writer");
            }
            acked
        });
        if unfinished_tables(&dir.0.join("shard-0")) > 0 {
            cut_short += 1;
        }
    }
    let node = Node::start(&dir.0, &flags);
    runtime.block_on(async {
        let client = client(&node).await;
        verify(&client, &states, seed, cycle_count).await;
    });
    let table_count = std::fs::read_dir(dir.0.join("shard-0"))
        .map(|entries| {
            entries
                .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".sst")))
                .count()
        })
        .unwrap_or(0);
    eprintln!(
        "kill -9 with flushes and compactions: {cycle_count} cycles, {acked_total} acknowledged writes and \
         deletes, {cut_short} kills left an unfinished table, {table_count} tables at the end (seed {seed})"
    );
    assert!(acked_total > 100 * cycle_count as u64, "seed {seed}: too few writes to mean anything");
    assert!(table_count > 0, "seed {seed}: nothing was ever flushed");
    assert!(cut_short > 0, "seed {seed}: no kill landed during a flush or compaction");
}
