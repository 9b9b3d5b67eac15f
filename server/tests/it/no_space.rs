//! A full disk met by a flush (through the simulated storage with a capacity): the table
//! write fails with ENOSPC, new writes get NO_SPACE, reads go on, and once space is freed the
//! flush succeeds by itself and writes are accepted again; nothing acknowledged is lost,
//! across a power loss too. (`disk_full.rs` does the same on a real file system, where the
//! log's next segment is what fails first.)

use std::path::Path;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use schema::Status;
use server::command::Reply;
use server::engine::EngineOptions;
use server::storage::sim::SimStorage;
use server::store::Store;
use server::wal::{ShardIdentity, SyncPolicy, SEGMENT_SIZE};

async fn open(storage: &SimStorage) -> Store<SimStorage> {
    let identity = ShardIdentity { shard_index: 0, shard_count: 1 };
    let options = EngineOptions { memory_bytes: 1 << 20, tombstone_grace_ms: 0 };
    let (store, _) =
        Store::open(storage.clone(), Path::new("/data/shard-0"), identity, SyncPolicy::Always, options)
            .await
            .expect("open");
    store
}

fn value(i: u32) -> Vec<u8> {
    let mut value = i.to_le_bytes().to_vec();
    value.resize(2_000, b'x');
    value
}

#[test]
fn a_flush_that_meets_a_full_disk_refuses_writes_keeps_reads_and_recovers() {
    let (acked, refused_after) = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            let storage = SimStorage::new(3);
            // Room for the first log segment and about 1 MiB of tables, not for the next
            // segment (prepared once the first is half full, which this test never reaches).
            storage.set_capacity(Some(SEGMENT_SIZE + (1 << 20)));
            let store = open(&storage).await;
            let mut acked = 0u32;
            let refused_after = loop {
                let key = format!("key-{acked}");
                match store.put(key.as_bytes(), &value(acked), 0).await {
                    Reply::Done => acked += 1,
                    Reply::Error { status: Status::NO_SPACE, .. } => break acked,
                    other => panic!("put {key}: {other:?}"),
                }
                assert!(acked < 100_000, "the disk never filled");
            };
            assert!(store.engine().stats().no_space);
            // Reads go on while writes are refused.
            for i in 0..acked {
                match store.get(format!("key-{i}").as_bytes(), false).await {
                    Reply::Found(version) => assert_eq!(version.value.as_deref(), Some(&value(i)[..])),
                    other => panic!("key-{i} while the disk is full: {other:?}"),
                }
            }
            // Space comes back: the flush retries by itself and writes are accepted again.
            storage.set_capacity(None);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match store.put(b"after", b"space", 0).await {
                    Reply::Done => break,
                    Reply::Error { status: Status::NO_SPACE, .. } if Instant::now() < deadline => {
                        glommio::timer::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("writes did not resume within 10 s: {other:?}"),
                }
            }
            assert!(!store.engine().stats().no_space);
            // Power loss: everything acknowledged is still there.
            storage.crash();
            drop(store);
            let store = open(&storage).await;
            for i in 0..acked {
                match store.get(format!("key-{i}").as_bytes(), false).await {
                    Reply::Found(version) => assert_eq!(version.value.as_deref(), Some(&value(i)[..])),
                    other => panic!("key-{i} after the crash: {other:?}"),
                }
            }
            assert!(matches!(store.get(b"after", false).await, Reply::Found(_)));
            store.close().await.expect("close");
            (acked, refused_after)
        })
        .expect("executor")
        .join()
        .expect("join");
    println!("no space in a flush: {acked} writes of 2 KB acknowledged, NO_SPACE after {refused_after}, all read back while full, after space returned and after a power loss");
}
