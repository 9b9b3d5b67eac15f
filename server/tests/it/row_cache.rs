//! The row cache never serves a version older than the newest one written. A read that went
//! to the disk (real storage, where a read does await) while the key was written, or written
//! and flushed, must not leave what it read in the cache: once the newer version has left
//! the memtable, the cache would shadow it.

use std::path::{Path, PathBuf};
use std::pin::pin;
use std::task::Poll;

use glommio::{LocalExecutorBuilder, Placement};
use server::command::Reply;
use server::engine::EngineOptions;
use server::storage::dma::DmaStorage;
use server::store::Store;
use server::wal::{ShardIdentity, SyncPolicy};

fn value_of(reply: Reply<std::rc::Rc<[u8]>>) -> Vec<u8> {
    match reply {
        Reply::Found(version) => version.value.expect("a value").to_vec(),
        other => panic!("expected a value, got {other:?}"),
    }
}

/// Writes `old` and flushes it to a table, reopens the store (the read must find the caches
/// empty, whatever a write leaves in them), starts a read of it that must go to
/// the disk, writes `new` (and flushes it when `flush_meanwhile`) before the read resumes,
/// then checks that reads after a flush see `new`.
async fn race(dir: &Path, flush_meanwhile: bool) {
    let probe = dir.join("probe");
    std::fs::write(&probe, vec![1u8; 4096]).expect("probe file");
    let identity = ShardIdentity { shard_index: 0, shard_count: 1 };
    let options = EngineOptions { memory_bytes: 64 << 20, tombstone_grace_ms: 0 };
    let open = || async {
        let storage = DmaStorage::new(&probe).await.expect("storage");
        let (store, _) = Store::open(storage, &dir.join("shard-0"), identity, SyncPolicy::Never, options)
            .await
            .expect("open");
        store
    };
    let key = b"raced".as_slice();
    let store = open().await;
    assert!(matches!(store.put(key, b"old", 0).await, Reply::Done));
    store.engine().flush().await.expect("flush");
    store.close().await.expect("close");
    let store = open().await;

    let mut read = pin!(store.get(key, false));
    let first = futures::poll!(read.as_mut());
    assert!(matches!(first, Poll::Pending), "the read waits for the disk (no block is cached)");
    assert!(matches!(store.put(key, b"new", 0).await, Reply::Done));
    if flush_meanwhile {
        store.engine().flush().await.expect("flush");
    }
    // What the raced read returns is either version (they were concurrent).
    let raced = value_of(read.await);
    assert!(raced == b"old" || raced == b"new");

    store.engine().flush().await.expect("flush");
    for _ in 0..3 {
        assert_eq!(value_of(store.get(key, false).await), b"new", "a stale row shadows the newest version");
    }
    store.close().await.expect("close");
}

fn run(name: &str, flush_meanwhile: bool) {
    let dir: PathBuf = std::env::temp_dir().join(format!("kvd-it-{}-row-cache-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test directory");
    let inner = dir.clone();
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move { race(&inner, flush_meanwhile).await })
        .expect("executor")
        .join()
        .expect("join");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_read_that_raced_a_write_does_not_cache_the_older_version() {
    run("write", false);
}

#[test]
fn a_read_that_raced_a_write_and_its_flush_does_not_cache_the_older_version() {
    run("flush", true);
}
