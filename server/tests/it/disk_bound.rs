//! Disk use within a bound of the live data: a small key set overwritten far past the
//! memtable's budget keeps the data directory flat (the log is released as it goes, not kept
//! until the memtable fills, which overwrites never do), and a restart after `kill -9`
//! replays only that bounded log.

use std::path::Path;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use server::command::Reply;
use server::engine::EngineOptions;
use server::storage::sim::SimStorage;
use server::store::Store;
use server::wal::{ShardIdentity, SyncPolicy, SEGMENT_SIZE};

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

/// One shard on simulated storage (no crashes, seeded by `seed`), no log syncs, 8 MiB of
/// memory: memtables of 1 MiB.
async fn open_sim_store(seed: u64) -> (SimStorage, Store<SimStorage>) {
    let storage = SimStorage::without_crashes(seed);
    let identity = ShardIdentity { shard_index: 0, shard_count: 1 };
    let options = EngineOptions { memory_bytes: 8 << 20, tombstone_grace_ms: 0 };
    let (store, _) = Store::open(storage.clone(), Path::new("/d"), identity, SyncPolicy::Never, options)
        .await
        .expect("open");
    (storage, store)
}

/// A full merge on a disk with room for a few of its pieces but not for its output beside
/// its inputs: it must complete, freeing its inputs as it passes them (before, it failed
/// for want of space, and a node with a nearly full disk could never reclaim its stale
/// copies).
#[test]
fn a_full_merge_needs_room_for_a_few_pieces_not_for_a_second_copy() {
    let (live, output, before) = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            // 1 MiB memtables: the 8 MB live set fills eight.
            let (storage, store) = open_sim_store(31).await;
            let value = vec![b'v'; 1_000];
            for round in 0..2 {
                for k in 0..8_000 {
                    let reply = store.put(format!("key-{k:05}").as_bytes(), &value, 0).await;
                    assert!(matches!(reply, Reply::Done), "round {round}: {reply:?}");
                }
            }
            store.engine().flush().await.expect("flush");
            let before = store.engine().stats();
            let room = 4 << 20;
            storage.set_capacity(Some(storage.used_space() + room));
            store.engine().compact_all().await.expect("a full merge within four MiB of room");
            let after = store.engine().stats();
            for k in (0..8_000).step_by(97) {
                let reply = store.get(format!("key-{k:05}").as_bytes(), false).await;
                assert!(matches!(reply, Reply::Found(_)), "key-{k:05} after the merge: {reply:?}");
            }
            store.close().await.expect("close");
            assert_eq!(after.table_entry_count, 8_000, "one copy of each key is left");
            assert!(after.table_bytes > room, "the output ({} bytes) exceeds the room", after.table_bytes);
            (8_000 * 1_009u64, after.table_bytes, before.table_bytes)
        })
        .expect("executor")
        .join()
        .expect("join");
    println!(
        "full merge: {before} table bytes merged into {output} ({:.2}x the {live} live bytes) within 4 MiB of room",
        output as f64 / live as f64
    );
}

/// Writers that overwrite faster than a full merge rewrites: without a limit the flushes
/// pile up beside the merge's inputs, and the tables grow with the load's speed rather
/// than with the live data. While a merge runs, writers wait whenever the tables on disk
/// pass `SPACE_STALL_FACTOR` times their live entries (plus what was already in the
/// memtables), so the tables never pass that and a memtable or two.
#[test]
fn writers_wait_for_a_merge_that_falls_behind_rather_than_grow_the_tables() {
    let (largest, live, stall_ms) = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            // 1 MiB memtables against a 4 MB live set.
            let (_storage, store) = open_sim_store(33).await;
            let store = std::rc::Rc::new(store);
            let largest = std::rc::Rc::new(std::cell::Cell::new(0u64));
            let writers: Vec<_> = (0..8)
                .map(|writer| {
                    let (store, largest) = (store.clone(), largest.clone());
                    glommio::spawn_local(async move {
                        let value = vec![b'v'; 1_000];
                        for round in 0..40 {
                            for k in (writer..4_000).step_by(8) {
                                let reply = store.put(format!("key-{k:05}").as_bytes(), &value, 0).await;
                                assert!(matches!(reply, Reply::Done), "round {round}: {reply:?}");
                                if k % 64 == writer {
                                    largest.set(largest.get().max(store.engine().stats().table_bytes));
                                }
                            }
                        }
                    })
                })
                .collect();
            for writer in writers {
                writer.await;
            }
            let stats = store.engine().stats();
            let live = stats.table_bytes as f64 / stats.table_redundancy;
            (largest.get(), live, stats.write_stall_ms)
        })
        .expect("executor")
        .join()
        .expect("join");
    let mib = |bytes: f64| bytes / (1 << 20) as f64;
    let memtable = (1u64 << 20) as f64;
    let bound = server::engine::compaction::SPACE_STALL_FACTOR * live + 3.0 * memtable;
    println!(
        "merge behind: tables at most {:.1} MiB over {:.1} MiB live (bound {:.1} MiB); writers waited {stall_ms} ms",
        mib(largest as f64),
        mib(live),
        mib(bound)
    );
    assert!((largest as f64) <= bound, "the tables reached {largest} bytes (bound {bound:.0})");
}
