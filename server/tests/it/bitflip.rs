//! Single-bit flips at seeded positions in every kind of file a shard keeps (sorted tables,
//! the manifest, log segments): each flip must be detected (recovery refuses or reports it,
//! a read fails, or a scrub finds it) and none may be served: no read returns a value that
//! was not written last, and nothing deleted comes back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use glommio::{LocalExecutorBuilder, Placement};
use server::command::Reply;
use server::engine::EngineOptions;
use server::rng::Rng;
use server::storage::sim::SimStorage;
use server::store::Store;
use server::wal::{ShardIdentity, SyncPolicy};

const DIR: &str = "/data/shard-0";

fn options() -> EngineOptions {
    // Small memtables, so the data lands in several tables; tombstones are kept.
    EngineOptions { memory_bytes: 1 << 20, tombstone_grace_ms: u64::MAX / 2 }
}

async fn open(storage: &SimStorage) -> Result<(Store<SimStorage>, server::wal::RecoveryReport), String> {
    let identity = ShardIdentity { shard_index: 0, shard_count: 1 };
    Store::open(storage.clone(), Path::new(DIR), identity, SyncPolicy::Always, options())
        .await
        .map_err(|error| error.to_string())
}

/// Writes, overwrites and deletes through flushes and compactions, and leaves the newest
/// writes in the log only. Returns the files and what every key must read as.
async fn build(seed: u64) -> (Vec<(PathBuf, Vec<u8>)>, BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
    let storage = SimStorage::new(seed);
    let (store, _) = open(&storage).await.expect("open");
    let mut rng = Rng::new(seed);
    let mut model = BTreeMap::new();
    for round in 0..4u8 {
        for _ in 0..150 {
            let key = format!("key-{}", rng.below(400)).into_bytes();
            if rng.below(5) == 0 {
                store.delete(&key).await;
                model.insert(key, None);
            } else {
                let value = vec![
                    round.wrapping_mul(37).wrapping_add(rng.below(200) as u8);
                    100 + rng.below(1500) as usize
                ];
                assert_eq!(store.put(&key, &value, 0).await, Reply::Done);
                model.insert(key, Some(value));
            }
        }
        if round < 3 {
            store.engine().flush().await.expect("flush");
        }
        if round == 1 {
            store.engine().compact_all().await.expect("compact");
        }
    }
    store.close().await.expect("close");
    (storage.snapshot(), model)
}

#[derive(Debug, Default)]
struct Tally {
    refused_at_start: u64,
    reported_at_start: u64,
    failed_read: u64,
    found_by_scrub: u64,
}

#[test]
fn bit_flips_in_tables_manifest_and_log_are_detected_and_never_served() {
    let tally = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            let (files, model) = build(7).await;
            let kinds: [(&str, Vec<usize>); 3] = [
                (
                    "table",
                    files
                        .iter()
                        .enumerate()
                        .filter(|(_, (p, _))| p.to_string_lossy().ends_with(".sst"))
                        .map(|(i, _)| i)
                        .collect(),
                ),
                (
                    "manifest",
                    files
                        .iter()
                        .enumerate()
                        .filter(|(_, (p, _))| p.ends_with("MANIFEST"))
                        .map(|(i, _)| i)
                        .collect(),
                ),
                (
                    "log",
                    files
                        .iter()
                        .enumerate()
                        .filter(|(_, (p, _))| p.to_string_lossy().ends_with(".log"))
                        .map(|(i, _)| i)
                        .collect(),
                ),
            ];
            for (kind, indexes) in &kinds {
                assert!(!indexes.is_empty(), "no {kind} file to damage");
            }
            // The undamaged files serve every key right.
            {
                let storage = SimStorage::from_snapshot(1, &files);
                let (store, _) = open(&storage).await.expect("open undamaged");
                for (key, value) in &model {
                    let found = match store.get(key, false).await {
                        Reply::Found(version) => version.value.map(|v| v.to_vec()),
                        other => {
                            assert_eq!(other, Reply::NotFound);
                            None
                        }
                    };
                    assert_eq!(&found, value);
                }
                store.close().await.expect("close");
            }

            let mut rng = Rng::new(2024);
            let mut tally = Tally::default();
            for flip in 0..2_000 {
                let (kind, indexes) = &kinds[flip % kinds.len()];
                let file_index = indexes[rng.below(indexes.len() as u64) as usize];
                let (path, bytes) = &files[file_index];
                let position = rng.below(bytes.len() as u64) as usize;
                let bit = 1u8 << rng.below(8);
                let mut damaged = files.clone();
                damaged[file_index].1[position] ^= bit;
                let what = format!("flip {flip}: bit {bit:#x} at {position} of {kind} {}", path.display());

                let storage = SimStorage::from_snapshot(flip as u64, &damaged);
                let (store, report) = match open(&storage).await {
                    Err(_) => {
                        tally.refused_at_start += 1;
                        continue;
                    }
                    Ok(opened) => opened,
                };
                let reported = report.truncated.is_some() || !report.lossy.is_empty();
                let mut failed_read = false;
                for (key, value) in &model {
                    let found = match store.get(key, false).await {
                        Reply::Found(version) => Some(version.value.map(|v| v.to_vec())),
                        Reply::NotFound => Some(None),
                        _ => None,
                    };
                    match found {
                        None => failed_read = true,
                        Some(None) if value.is_some() => {
                            // A lost write is tolerable only when recovery said what it cut.
                            assert!(reported, "{what}: {} silently lost", String::from_utf8_lossy(key));
                        }
                        Some(found) => assert!(
                            found.is_none() || &found == value,
                            "{what}: {} served a wrong value",
                            String::from_utf8_lossy(key)
                        ),
                    }
                }
                let scrubbed = store.engine().scrub().await;
                let _ = store.close().await;
                if reported {
                    tally.reported_at_start += 1;
                } else if failed_read {
                    tally.failed_read += 1;
                } else if scrubbed.is_err() {
                    tally.found_by_scrub += 1;
                } else {
                    panic!("{what}: not detected");
                }
            }
            tally
        })
        .expect("executor")
        .join()
        .expect("join");
    println!("bit flips: 2000 in tables, manifest and log, all detected, none served: {tally:?}");
}
