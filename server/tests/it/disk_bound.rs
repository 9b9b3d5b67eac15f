//! Disk use within a bound of the live data: a small key set overwritten far past the
//! memtable's budget keeps the data directory flat (the log is released as it goes, not kept
//! until the memtable fills, which overwrites never do), and a restart after `kill -9`
//! replays only that bounded log.

use std::path::Path;
use std::time::{Duration, Instant};

use server::wal::SEGMENT_SIZE;

use crate::harness::{client, runtime, DataDir, Node};

const KEY_COUNT: usize = 64;
const VALUE_SIZE: usize = 16 << 10;
/// Bytes written in all: eight log segments' worth, over a live set of 1 MiB.
const WRITTEN_BYTES: u64 = 8 * SEGMENT_SIZE;
/// The log's allowance (the segment being written, an older one while its flush runs, the
/// prepared next one) plus generous room for tables of a 1 MiB live set and merges.
const DIR_BYTES_MAX: u64 = 3 * SEGMENT_SIZE + 32 * (KEY_COUNT * VALUE_SIZE) as u64;
/// The restart target is 2 s; as elsewhere the deadline is 3x the target.
const RESTART_DEADLINE: Duration = Duration::from_secs(6);

/// Bytes the files under `dir` take on disk (allocated blocks, as `du` counts them).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(metadata) = entry.metadata() else { continue };
        total += if metadata.is_dir() { disk_bytes(&entry.path()) } else { metadata.blocks() * 512 };
    }
    total
}

#[test]
fn overwriting_a_small_key_set_keeps_the_data_directory_flat_and_the_restart_short() {
    let dir = DataDir::new("disk-bound");
    let flags = ["--fsync", "never", "--memory-per-shard", "64"];
    let mut node = Node::start(&dir.0, &flags);
    let rt = runtime();
    let value = vec![b'v'; VALUE_SIZE];
    let rounds = WRITTEN_BYTES as usize / (KEY_COUNT * VALUE_SIZE);
    let mut largest = 0;
    rt.block_on(async {
        let client = client(&node).await;
        for round in 0..rounds {
            let puts: Vec<_> = (0..KEY_COUNT)
                .map(|k| {
                    let (client, value) = (client.clone(), value.clone());
                    tokio::spawn(async move { client.put(format!("key-{k}").as_bytes(), &value).await })
                })
                .collect();
            for put in puts {
                put.await.expect("task").unwrap_or_else(|error| panic!("put in round {round}: {error}"));
            }
            largest = largest.max(disk_bytes(&dir.0));
        }
    });
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "disk bound: {:.0} MiB written over {} keys of {} KiB; data directory at most {:.0} MiB (bound {:.0})",
        mib(WRITTEN_BYTES),
        KEY_COUNT,
        VALUE_SIZE >> 10,
        mib(largest),
        mib(DIR_BYTES_MAX)
    );
    assert!(largest <= DIR_BYTES_MAX, "the data directory reached {largest} bytes (bound {DIR_BYTES_MAX})");

    node.kill9();
    let started = Instant::now();
    let node = Node::start(&dir.0, &flags);
    let restarted = started.elapsed();
    println!("disk bound: restart after kill -9 served after {restarted:?}");
    assert!(restarted < RESTART_DEADLINE, "the restart took {restarted:?}");
    rt.block_on(async {
        let client = client(&node).await;
        for k in 0..KEY_COUNT {
            let found = client.get(format!("key-{k}").as_bytes()).await.expect("get after restart");
            assert_eq!(found.map(|v| v.value.len()), Some(VALUE_SIZE), "key-{k} after restart");
        }
    });
}
