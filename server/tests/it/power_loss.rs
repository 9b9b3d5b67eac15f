//! Power loss through the storage interface: writers run against a store on simulated
//! storage, the "machine" crashes at a random point (unsynced data dropped, the write in
//! flight torn), and after recovery every acknowledged write must read back. Injected
//! `fdatasync` failures must never let a write of the failed batch be acknowledged.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use glommio::{LocalExecutorBuilder, Placement};
use server::command::Reply;
use server::rng::Rng;
use server::storage::sim::{Faults, SimStorage};
use server::store::Store;
use server::wal::{ShardIdentity, SyncPolicy};

const WRITER_COUNT: usize = 8;

/// Opens (recovers) the one shard these tests use, with the default engine options.
async fn open_store(
    storage: &SimStorage,
    policy: SyncPolicy,
) -> Result<(Store<SimStorage>, server::wal::RecoveryReport), server::wal::WalError> {
    let identity = ShardIdentity { shard_index: 0, shard_count: 1 };
    Store::open(
        storage.clone(),
        Path::new("/data/shard-0"),
        identity,
        policy,
        server::engine::EngineOptions::default(),
    )
    .await
}
const KEYS_PER_WRITER: usize = 6;

/// What a key may hold after a crash: its last acknowledged state, or the state of the
/// one write that was in flight (not acknowledged, so it may or may not have landed).
#[derive(Debug, Clone, Default)]
struct KeyModel {
    acked: Option<Vec<u8>>,
    in_flight: Option<Option<Vec<u8>>>,
}

async fn read_back(store: &Store<SimStorage>, key: &[u8]) -> Option<Vec<u8>> {
    match store.get(key, false).await {
        Reply::Found(version) => Some(version.value.expect("value").to_vec()),
        Reply::NotFound => None,
        other => panic!("read after recovery failed: {other:?}"),
    }
}

/// One seed: several crash cycles, each with concurrent writers and optional sync faults.
async fn crash_cycles(seed: u64, policy: SyncPolicy, cycle_count: usize) -> (u64, u64) {
    // Only `always` promises that acknowledged writes survive a power loss; the other
    // policies must still recover to a consistent state every time.
    let check_durability = policy == SyncPolicy::Always;
    let storage = SimStorage::new(seed);
    let mut rng = Rng::new(seed ^ 0x5eed);
    let models: Rc<RefCell<HashMap<Vec<u8>, KeyModel>>> = Rc::default();
    let mut acked_total = 0u64;
    for cycle in 0..cycle_count {
        let (store, _report) = open_store(&storage, policy)
            .await
            .unwrap_or_else(|error| panic!("seed {seed} cycle {cycle}: recovery failed: {error}"));
        // Check every key against the model, then take what survived as the new truth.
        let keys: Vec<Vec<u8>> = models.borrow().keys().cloned().collect();
        for key in keys {
            let found = read_back(&store, &key).await;
            let mut models = models.borrow_mut();
            let model = models.get_mut(&key).expect("model");
            let allowed =
                found == model.acked || model.in_flight.as_ref() == Some(&found) || !check_durability;
            assert!(
                allowed,
                "seed {seed} cycle {cycle}: key {:?} reads {found:?}, acknowledged {:?}, in flight {:?}",
                String::from_utf8_lossy(&key),
                model.acked,
                model.in_flight
            );
            *model = KeyModel { acked: found, in_flight: None };
        }
        if rng.below(3) == 0 {
            storage.set_faults(Faults { sync_error_per_million: 20_000, write_error_per_million: 5_000 });
        }
        let store = Rc::new(store);
        let crash_after_ops = 20 + rng.below(400);
        let done_ops = Rc::new(RefCell::new(0u64));
        let mut writers = Vec::new();
        for writer in 0..WRITER_COUNT {
            let store = store.clone();
            let models = models.clone();
            let done_ops = done_ops.clone();
            let mut rng = Rng::new(seed * 1000 + cycle as u64 * 10 + writer as u64);
            writers.push(glommio::spawn_local(async move {
                let mut acked = 0u64;
                for op_index in 0..10_000u64 {
                    let key = format!("w{writer}-k{}", rng.below(KEYS_PER_WRITER as u64)).into_bytes();
                    let new_state = match rng.below(10) {
                        0 => None,
                        _ => Some(format!("c{cycle}-w{writer}-op{op_index}").into_bytes()),
                    };
                    let before = models.borrow().get(&key).cloned().unwrap_or_default();
                    models.borrow_mut().entry(key.clone()).or_default().in_flight = Some(new_state.clone());
                    let reply = match (&new_state, rng.below(3)) {
                        (None, _) => store.delete(&key).await,
                        (Some(value), 0) => store.cas(&key, before.acked.as_deref(), value, 0).await,
                        (Some(value), _) => store.put(&key, value, 0).await,
                    };
                    match reply {
                        Reply::Done | Reply::NotFound => {
                            let mut models = models.borrow_mut();
                            let model = models.get_mut(&key).expect("model");
                            *model = KeyModel { acked: new_state, in_flight: None };
                            acked += 1;
                        }
                        Reply::CasFailed(current) if check_durability => {
                            panic!("single writer per key, CAS failed: {current:?}")
                        }
                        Reply::CasFailed(_) => {}
                        Reply::Error { .. } => return acked, // the log stopped: the machine is going down
                        Reply::Found(_)
                        | Reply::Written(_)
                        | Reply::Siblings { .. }
                        | Reply::Versions(_)
                        | Reply::Updated(_)
                        | Reply::Stats(_) => {
                            unreachable!()
                        }
                    }
                    *done_ops.borrow_mut() += 1;
                    if *done_ops.borrow() >= crash_after_ops {
                        return acked;
                    }
                }
                acked
            }));
        }
        // Crash while writers are still in flight: yield until enough ops completed.
        loop {
            if *done_ops.borrow() >= crash_after_ops || storage.injected_error_count() > 0 {
                break;
            }
            glommio::yield_if_needed().await;
            glommio::timer::sleep(std::time::Duration::from_micros(50)).await;
        }
        storage.crash();
        for writer in writers {
            acked_total += writer.await;
        }
    }
    (acked_total, storage.sync_count())
}

#[test]
fn power_loss_loses_no_acknowledged_write() {
    let seeds: u64 = std::env::var("POWER_LOSS_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let totals = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let mut acked = 0;
            for seed in 0..seeds {
                acked += crash_cycles(seed, SyncPolicy::Always, 6).await.0;
            }
            acked
        })
        .expect("executor")
        .join()
        .expect("join");
    assert!(totals > seeds * 50, "too few acknowledged writes to mean anything: {totals}");
    eprintln!("power loss: {seeds} seeds x 6 crashes, {totals} acknowledged writes, none lost");
}

#[test]
fn power_loss_under_interval_and_never_always_recovers() {
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            for seed in 0..10 {
                crash_cycles(seed, SyncPolicy::Never, 4).await;
                crash_cycles(seed, SyncPolicy::Interval(std::time::Duration::from_millis(1)), 4).await;
            }
        })
        .expect("executor")
        .join()
        .expect("join");
}

#[test]
fn damage_under_never_drops_the_rest_of_the_segment_and_says_where() {
    let (first, second, reads) = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            let storage = SimStorage::new(13);
            let dir = Path::new("/data/shard-0");
            let (store, _) = open_store(&storage, SyncPolicy::Never).await.expect("open");
            for key in [b"k1", b"k2", b"k3"] {
                assert_eq!(store.put(key, b"value", 0).await, Reply::Done);
            }
            store.close().await.expect("close");
            // A device that reordered writes across a power loss: the middle batch is gone.
            storage.corrupt(&dir.join("wal-0000000000000001.log"), 2 * 4096 + 60, b"lost");
            let (store, first) = open_store(&storage, SyncPolicy::Never).await.expect("open");
            assert_eq!(store.put(b"k4", b"value", 0).await, Reply::Done);
            store.close().await.expect("close");
            // The first start truncated the segment at the damage, so the next start finds a
            // clean log.
            let (store, second) = open_store(&storage, SyncPolicy::Never).await.expect("reopen");
            let mut reads = Vec::new();
            for key in [b"k1", b"k2", b"k3", b"k4"] {
                reads.push(read_back(&store, key).await.is_some());
            }
            (first, second, reads)
        })
        .expect("executor")
        .join()
        .expect("join");
    let segment = Path::new("/data/shard-0/wal-0000000000000001.log").to_path_buf();
    assert_eq!(first.lossy, vec![(segment, 2 * 4096 + 32)]);
    assert_eq!(second.lossy, vec![]);
    assert_eq!(reads, vec![true, false, false, true]);
}

#[test]
fn failed_fdatasync_acknowledges_nothing_of_its_batch() {
    let outcome = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            let storage = SimStorage::new(7);
            let (store, _) = open_store(&storage, SyncPolicy::Always).await.expect("open");
            assert_eq!(store.put(b"before", b"1", 0).await, Reply::Done);
            storage.set_faults(Faults { sync_error_per_million: 1_000_000, write_error_per_million: 0 });
            let store = Rc::new(store);
            let tasks: Vec<_> = (0..16)
                .map(|i| {
                    let store = store.clone();
                    glommio::spawn_local(async move { store.put(format!("k{i}").as_bytes(), b"v", 0).await })
                })
                .collect();
            let mut replies = Vec::new();
            for task in tasks {
                replies.push(task.await);
            }
            // The log has stopped: later writes are refused, earlier data still reads.
            let later = store.put(b"after", b"2", 0).await;
            let before = store.get(b"before", false).await;
            let to_owned = |reply: Reply<std::rc::Rc<[u8]>>| reply.map_value(|value| value.to_vec());
            (replies.into_iter().map(to_owned).collect::<Vec<_>>(), to_owned(later), to_owned(before))
        })
        .expect("executor")
        .join()
        .expect("join");
    let (replies, later, before) = outcome;
    for reply in &replies {
        assert!(
            matches!(reply, Reply::Error { status, .. } if *status == schema::Status::INTERNAL),
            "{reply:?}"
        );
    }
    assert!(matches!(later, Reply::Error { .. }), "{later:?}");
    assert!(matches!(before, Reply::Found(_)), "{before:?}");
}

#[test]
fn interval_and_never_policies_survive_a_process_crash_after_acknowledging() {
    // Under interval and never, an acknowledged write has reached the device (O_DIRECT write
    // completed): a process crash cannot take it. The simulated crash drops unsynced data, so
    // it models a power loss instead; here we only check recovery of a clean shutdown.
    for policy in [SyncPolicy::Never, SyncPolicy::Interval(std::time::Duration::from_millis(5))] {
        let found = LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || async move {
                let storage = SimStorage::new(3);
                let (store, _) = open_store(&storage, policy).await.expect("open");
                for i in 0..100 {
                    assert_eq!(store.put(format!("k{i}").as_bytes(), b"v", 0).await, Reply::Done);
                }
                store.close().await.expect("close syncs");
                drop(store);
                storage.crash();
                let (store, report) = open_store(&storage, policy).await.expect("reopen");
                assert_eq!(report.record_count, 100);
                read_back(&store, b"k99").await
            })
            .expect("executor")
            .join()
            .expect("join");
        assert_eq!(found, Some(b"v".to_vec()), "{policy:?}");
    }
}

/// Three sequential puts make three batches at blocks 1, 2 and 3 of the first segment.
async fn three_batches(storage: &SimStorage) -> std::path::PathBuf {
    let dir = Path::new("/data/shard-0");
    let (store, _) = open_store(storage, SyncPolicy::Always).await.expect("open");
    for key in [b"k1", b"k2", b"k3"] {
        assert_eq!(store.put(key, b"value", 0).await, Reply::Done);
    }
    store.close().await.expect("close");
    dir.join("wal-0000000000000001.log")
}

#[test]
fn torn_tail_is_truncated_and_reported_with_file_and_offset() {
    let (report, reads) = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            let storage = SimStorage::new(11);
            let segment = three_batches(&storage).await;
            storage.corrupt(&segment, 3 * 4096 + 60, b"torn");
            let (store, report) = open_store(&storage, SyncPolicy::Always).await.expect("open");
            let mut reads = Vec::new();
            for key in [b"k1", b"k2", b"k3"] {
                reads.push(read_back(&store, key).await);
            }
            (report, reads)
        })
        .expect("executor")
        .join()
        .expect("join");
    let (path, offset) = report.truncated.expect("the torn tail is reported");
    assert_eq!(path, Path::new("/data/shard-0/wal-0000000000000001.log"));
    assert_eq!(offset, 3 * 4096);
    assert_eq!(reads, vec![Some(b"value".to_vec()), Some(b"value".to_vec()), None]);
}

#[test]
fn damage_followed_by_a_valid_record_stops_startup_with_file_and_offset() {
    let error = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            let storage = SimStorage::new(12);
            let segment = three_batches(&storage).await;
            storage.corrupt(&segment, 4096 + 60, b"rot");
            match open_store(&storage, SyncPolicy::Always).await {
                Ok(_) => panic!("corruption went unnoticed"),
                Err(error) => error.to_string(),
            }
        })
        .expect("executor")
        .join()
        .expect("join");
    assert!(error.contains("/data/shard-0/wal-0000000000000001.log"), "{error}");
    // The damaged record starts right after the 32-byte batch header.
    assert!(error.contains("corrupt at offset 4128"), "{error}");
    assert!(error.contains("followed by a valid batch at offset 8192"), "{error}");
}

#[test]
fn a_prepared_segment_without_header_is_reused_not_left_behind() {
    let names = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            use server::storage::Storage;
            let storage = SimStorage::new(14);
            three_batches(&storage).await; // segment 1 holds the data
            let dir = Path::new("/data/shard-0");
            // A crash after the background preparation of segment 2, before its header.
            storage.create(&dir.join("wal-0000000000000002.log")).await.expect("create");
            storage.sync_dir(dir).await.expect("sync dir");
            for _ in 0..2 {
                let (store, report) = open_store(&storage, SyncPolicy::Always).await.expect("open");
                assert_eq!(report.record_count, 3);
                assert_eq!(read_back(&store, b"k3").await, Some(b"value".to_vec()));
                store.close().await.expect("close");
            }
            let mut names = storage.list_dir(dir).await.expect("list");
            names.sort();
            names
        })
        .expect("executor")
        .join()
        .expect("join");
    // The first open started segment 2 instead of leaving it headerless behind segment 3;
    // the second open found it started (and empty) and added segment 3.
    assert_eq!(names, ["wal-0000000000000001.log", "wal-0000000000000002.log", "wal-0000000000000003.log"]);
}
