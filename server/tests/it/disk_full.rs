//! Disk full on a small real file system: writes are refused with NO_SPACE, reads keep
//! working, and writes are accepted again by themselves once space is freed; nothing
//! acknowledged is lost, before or after a restart.
//!
//! Needs a small file system mounted at `$KVD_SMALL_FS` (`.ci/test` mounts a 200 MiB
//! tmpfs when it runs as root). Without it the test is skipped, except under `CI=true`,
//! where it fails.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::{client, runtime, wait_for, Node};

const VALUE_SIZE: usize = 16 << 10;
const BALLAST_SIZE: usize = 40 << 20;

fn small_fs() -> Option<PathBuf> {
    match std::env::var_os("KVD_SMALL_FS") {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var_os("CI").is_some() => {
            panic!("KVD_SMALL_FS is not set: CI must run this test through .ci/test, which mounts one")
        }
        None => {
            eprintln!("disk_full: skipped (no KVD_SMALL_FS; .ci/test mounts one when run as root)");
            None
        }
    }
}

struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_dir_all(path);
            let _ = std::fs::remove_file(path);
        }
    }
}

fn value_of(key: &str) -> Vec<u8> {
    let mut value = key.as_bytes().to_vec();
    value.resize(VALUE_SIZE, b'.');
    value
}

#[test]
fn disk_full_refuses_writes_keeps_reads_and_recovers_by_itself() {
    let Some(fs) = small_fs() else { return };
    let run = format!("kvd-disk-full-{}", std::process::id());
    let data_dir = fs.join(&run);
    let ballast = fs.join(format!("{run}.ballast"));
    let _cleanup = Cleanup(vec![data_dir.clone(), ballast.clone()]);
    std::fs::write(&ballast, vec![1u8; BALLAST_SIZE]).expect("write ballast");
    let flags = ["--memory-per-shard", "16", "--fsync", "always"];
    let mut node = Node::start(&data_dir, &flags);
    let runtime = runtime();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let refusals = runtime.block_on(async {
        let client = client(&node).await;
        let writers: Vec<_> = (0..16)
            .map(|writer| {
                let client = client.clone();
                let acked = acked.clone();
                tokio::spawn(async move {
                    for n in 0..100_000 {
                        let key = format!("w{writer}-{n}");
                        match client.put(key.as_bytes(), &value_of(&key)).await {
                            Ok(_) => acked.lock().expect("lock").push(key),
                            Err(client::Error::NoSpace(_)) => return 1,
                            Err(error) => panic!("put {key}: {error}"),
                        }
                    }
                    0
                })
            })
            .collect();
        let mut refusals = 0;
        for writer in writers {
            refusals += writer.await.expect("writer");
        }
        refusals
    });
    let acked = acked.lock().expect("lock").clone();
    assert_eq!(refusals, 16, "every writer must meet NO_SPACE before 1.6 million writes");

    let verify = |node: &Node, when: &str| {
        runtime.block_on(async {
            let client = client(node).await;
            for key in &acked {
                let found =
                    client.get(key.as_bytes()).await.unwrap_or_else(|e| panic!("{when}: get {key}: {e}"));
                assert_eq!(found.map(|v| v.value), Some(value_of(key)), "{when}: {key}");
            }
        })
    };
    verify(&node, "while the disk is full");

    std::fs::remove_file(&ballast).expect("remove ballast");
    let accepted_after = runtime.block_on(async {
        let client = client(&node).await;
        let started = std::time::Instant::now();
        loop {
            match client.put(b"after-space-freed", &value_of("after-space-freed")).await {
                Ok(_) => return started.elapsed(),
                Err(client::Error::NoSpace(_)) if started.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("writes did not resume within 30 s of freeing space: {error}"),
            }
        }
    });
    verify(&node, "after space was freed");

    node.terminate();
    let node = Node::start(&data_dir, &flags);
    verify(&node, "after a restart");
    let used = wait_for("df", Duration::from_secs(5), || {
        let output = crate::harness::command("df").arg("--output=used,size").arg(&fs).output().ok()?;
        Some(String::from_utf8_lossy(&output.stdout).lines().nth(1)?.trim().to_string())
    });
    eprintln!(
        "disk full: {} writes of {} KiB acknowledged before NO_SPACE, all read back while full, after \
         freeing {} MiB (writes resumed after {accepted_after:?}) and after a restart; df used/size KiB: {used}",
        acked.len(),
        VALUE_SIZE >> 10,
        BALLAST_SIZE >> 20
    );
}
