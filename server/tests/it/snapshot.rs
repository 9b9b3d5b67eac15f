//! `kvctl snapshot` under a concurrent write load, then a restore: a node started on a copy of
//! the snapshot holds every write acknowledged before the snapshot was asked for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{client, command, runtime, DataDir, Node};

/// Waits until the writer has `count` acknowledged writes; fails after a deadline.
async fn acked_at_least(acked: &Mutex<Vec<(u64, Instant)>>, count: usize) {
    let deadline = Duration::from_secs(30);
    let enough = async {
        while acked.lock().expect("acked").len() < count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let waited = tokio::time::timeout(deadline, enough).await;
    let have = acked.lock().expect("acked").len();
    assert!(
        waited.is_ok(),
        "timed out after {deadline:?} waiting for {count} acknowledged writes (have {have})"
    );
}

#[test]
fn a_snapshot_under_load_restores_every_acknowledged_write() {
    let dir = DataDir::new("snapshot");
    let node = Node::start(&dir.0, &[]);
    let snapshot_dir = dir.0.join("snapshot");
    let rt = runtime();
    let acked: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (asked_at, done_at) = rt.block_on(async {
        let writer_client = client(&node).await;
        let writer = {
            let acked = acked.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("snap-{i}");
                    if writer_client.put(key.as_bytes(), key.as_bytes()).await.is_ok() {
                        acked.lock().expect("acked").push((i, Instant::now()));
                    }
                    i += 1;
                }
            })
        };
        acked_at_least(&acked, 300).await;
        let snapshotter = client(&node).await;
        let asked_at = Instant::now();
        snapshotter.snapshot(snapshot_dir.to_str().expect("utf-8")).await.expect("snapshot");
        let done_at = Instant::now();
        let after = acked.lock().expect("acked").len();
        acked_at_least(&acked, after + 100).await;
        stop.store(true, Ordering::Relaxed);
        writer.await.expect("writer");
        (asked_at, done_at)
    });
    let before: Vec<u64> =
        acked.lock().expect("acked").iter().filter(|(_, at)| *at < asked_at).map(|(i, _)| *i).collect();
    let total = acked.lock().expect("acked").len();

    // Restore: a copy of the snapshot is a data directory.
    let restored = DataDir::new("restored");
    let copied = command("cp").arg("-a").arg(&snapshot_dir).arg(restored.0.join("data")).status();
    assert!(copied.is_ok_and(|s| s.success()), "copy the snapshot");
    let restored_node = Node::start(&restored.0.join("data"), &[]);
    let missing = rt.block_on(async {
        let client = client(&restored_node).await;
        let mut missing = Vec::new();
        for i in &before {
            let key = format!("snap-{i}");
            match client.get(key.as_bytes()).await.expect("read the restored node") {
                Some(value) if value.value == key.as_bytes() => {}
                _ => missing.push(*i),
            }
        }
        // The restored node goes on: a new write of a key from the snapshot wins over it.
        client.put(b"snap-0", b"newer").await.expect("write after restore");
        let value = client.get(b"snap-0").await.expect("read after restore").map(|v| v.value);
        assert_eq!(value.as_deref(), Some(&b"newer"[..]));
        missing
    });
    println!(
        "snapshot: taken in {:?} under load; {} of {total} acknowledged writes came before it, {} of those missing after restore",
        done_at - asked_at,
        before.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "writes acknowledged before the snapshot, missing after restore: {missing:?}"
    );
}
