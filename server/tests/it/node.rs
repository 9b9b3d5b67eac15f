//! A real node end to end: every operation, TTL, restarts, shards, the data directory's
//! guards, clean shutdown and kvctl's contract.

use std::time::Duration;

use client::{CasOutcome, Error, Options};

use crate::harness::{client, command, runtime, DataDir, Node};

#[test]
fn every_operation_through_the_client() {
    let dir = DataDir::new("ops");
    let node = Node::start(&dir.0, &[]);
    runtime().block_on(async {
        let client = client(&node).await;
        assert_eq!(client.hello().shard_count, 1);
        assert_eq!(client.get(b"missing").await, Ok(None));
        client.put(b"k", b"v1").await.expect("put");
        assert_eq!(client.get(b"k").await.expect("get").map(|v| v.value), Some(b"v1".to_vec()));
        client.put(b"empty", b"").await.expect("empty values are values");
        assert_eq!(client.get(b"empty").await.expect("get").map(|v| v.value), Some(Vec::new()));
        let large = vec![0xab; client::VALUE_SIZE_MAX];
        client.put(b"large", &large).await.expect("1 MiB value");
        assert_eq!(client.get(b"large").await.expect("get").map(|v| v.value), Some(large));

        assert_eq!(client.cas(b"k", Some(b"v1"), b"v2", None).await, Ok(CasOutcome::Swapped));
        match client.cas(b"k", Some(b"v1"), b"v3", None).await.expect("cas") {
            CasOutcome::Failed { current: Some(current) } => assert_eq!(current.value, b"v2"),
            other => panic!("expected a failed CAS with the current value, got {other:?}"),
        }
        assert_eq!(client.cas(b"k", None, b"v3", None).await.map(|o| o == CasOutcome::Swapped), Ok(false));
        assert_eq!(client.cas(b"fresh", None, b"x", None).await, Ok(CasOutcome::Swapped));
        assert_eq!(
            client.cas(b"absent", Some(b"x"), b"y", None).await,
            Ok(CasOutcome::Failed { current: None })
        );

        assert_eq!(client.delete(b"k").await, Ok(true));
        assert_eq!(client.delete(b"k").await, Ok(false));
        assert_eq!(client.get(b"k").await, Ok(None));

        assert_eq!(
            client.put(&[b'k'; 257], b"v").await,
            Err(Error::KeyTooLarge { size: 257, size_max: 256 })
        );
        assert_eq!(client.put(b"", b"v").await, Err(Error::KeyEmpty));
        let too_large = vec![0u8; client::VALUE_SIZE_MAX + 1];
        assert!(matches!(client.put(b"k", &too_large).await, Err(Error::ValueTooLarge { .. })));
    });
}

#[test]
fn ttl_expires_at_once_and_survives_restart() {
    let dir = DataDir::new("ttl");
    let mut node = Node::start(&dir.0, &[]);
    runtime().block_on(async {
        let client = client(&node).await;
        client.put_with_ttl(b"short", b"v", Some(Duration::from_millis(300))).await.expect("put");
        client.put_with_ttl(b"long", b"v", Some(Duration::from_secs(600))).await.expect("put");
        let left = client.get_metadata(b"long").await.expect("get").and_then(|v| v.ttl_left).expect("ttl");
        assert!(left > Duration::from_secs(590) && left <= Duration::from_secs(600), "{left:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while client.get(b"short").await.expect("get").is_some() {
            assert!(std::time::Instant::now() < deadline, "the TTL never took effect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    node.kill9();
    let node = Node::start(&dir.0, &[]);
    runtime().block_on(async {
        let client = client(&node).await;
        assert_eq!(client.get(b"short").await, Ok(None));
        let left =
            client.get_metadata(b"long").await.expect("get").and_then(|v| v.ttl_left).expect("ttl kept");
        assert!(left > Duration::from_secs(500) && left < Duration::from_secs(600), "{left:?}");
    });
}

#[test]
fn requests_cross_between_shards_and_shard_aware_clients_skip_the_hop() {
    let dir = DataDir::new("shards");
    let node = Node::start_with_shards(&dir.0, 2, &["--fsync", "never"]);
    assert_eq!(node.ports.shards.len(), 2);
    runtime().block_on(async {
        let via_shared_port =
            client::Client::connect(node.address(), Options { shard_aware: false, ..Options::default() })
                .await
                .expect("connect");
        let shard_aware = client(&node).await;
        assert_eq!(shard_aware.hello().shard_count, 2);
        for i in 0..200 {
            let key = format!("key-{i}");
            via_shared_port.put(key.as_bytes(), key.as_bytes()).await.expect("put");
        }
        for i in 0..200 {
            let key = format!("key-{i}");
            let value = shard_aware.get(key.as_bytes()).await.expect("get").map(|v| v.value);
            assert_eq!(value, Some(key.into_bytes()));
        }
        // CAS is atomic across connections that land on different shards.
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let client = if i % 2 == 0 { via_shared_port.clone() } else { shard_aware.clone() };
                tokio::spawn(async move { client.cas(b"lock", None, format!("{i}").as_bytes(), None).await })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            if task.await.expect("task") == Ok(CasOutcome::Swapped) {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);
    });
}

#[test]
fn data_directory_refuses_a_second_node_and_another_shard_count() {
    let dir = DataDir::new("guards");
    let node = Node::start(&dir.0, &[]);
    let second = command(env!("CARGO_BIN_EXE_kvd"))
        .arg("--data-dir")
        .arg(&dir.0)
        .args(["--listen", "127.0.0.1:0", "--shards", "1", "--no-pin"])
        .output()
        .expect("run kvd");
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by another kvd"));
    drop(node);
    let reshard = command(env!("CARGO_BIN_EXE_kvd"))
        .arg("--data-dir")
        .arg(&dir.0)
        .args(["--listen", "127.0.0.1:0", "--shards", "2", "--no-pin"])
        .output()
        .expect("run kvd");
    assert!(!reshard.status.success());
    let stderr = String::from_utf8_lossy(&reshard.stderr);
    assert!(
        stderr.contains("written by a node with 1 shards; refusing to start with --shards 2"),
        "{stderr}"
    );
}

#[test]
fn sigterm_syncs_and_exits_cleanly() {
    let dir = DataDir::new("sigterm");
    let mut node = Node::start(&dir.0, &["--fsync", "never"]);
    runtime().block_on(async {
        let client = client(&node).await;
        for i in 0..100 {
            client.put(format!("k{i}").as_bytes(), b"v").await.expect("put");
        }
    });
    let status = node.terminate();
    assert!(status.success(), "{status}");
    assert!(!dir.0.join("ports.json").exists(), "ports.json is removed on shutdown");
    let node = Node::start(&dir.0, &[]);
    runtime().block_on(async {
        let client = client(&node).await;
        assert!(client.get(b"k99").await.expect("get").is_some());
    });
}

pub(crate) fn kvctl(address: &str, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_kvd")).with_file_name("kvctl");
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (.ci/test does)",
        path.display()
    );
    let mut child = command(path)
        .args(["--addr", address])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kvctl");
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("kvctl output");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

#[test]
fn kvctl_commands_and_exit_codes() {
    let dir = DataDir::new("kvctl");
    let node = Node::start(&dir.0, &[]);
    let address = node.address();
    let run = |args: &[&str]| kvctl(&address, args, None);
    assert_eq!(run(&["put", "greeting", "hello"]).0, 0);
    assert_eq!(run(&["get", "greeting"]), (0, "hello".into(), String::new()));
    assert_eq!(run(&["get", "nothing"]).0, 1);
    assert_eq!(run(&["cas", "greeting", "--expect", "nope", "x"]).0, 1);
    assert_eq!(run(&["cas", "greeting", "--expect", "hello", "hi"]).0, 0);
    assert_eq!(run(&["cas", "new", "--expect-absent", "x"]).0, 0);
    assert_eq!(run(&["put", "session", "s", "--ttl", "1h"]).0, 0);
    let (code, ttl, _) = run(&["ttl", "session"]);
    assert_eq!(code, 0);
    assert!(ttl.starts_with("3599.") || ttl.starts_with("3600."), "{ttl}");
    assert_eq!(run(&["ttl", "greeting"]), (0, "no ttl\n".into(), String::new()));
    let (code, json, _) = run(&["--json", "get", "greeting"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(json["value"], "hi");
    assert_eq!(run(&["del", "greeting"]).0, 0);
    assert_eq!(run(&["del", "greeting"]).0, 1);
    let long_key = "k".repeat(257);
    let (code, _, stderr) = run(&["put", &long_key, "v"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("exceeds the limit of 256 bytes"), "{stderr}");
    // A 1 MiB value through standard input, and one byte more refused.
    let large = vec![b'x'; client::VALUE_SIZE_MAX];
    assert_eq!(kvctl(&address, &["put", "large", "--value-file", "-"], Some(&large)).0, 0);
    let (code, out, _) = run(&["get", "large"]);
    assert_eq!((code, out.len()), (0, client::VALUE_SIZE_MAX));
    let too_large = vec![b'x'; client::VALUE_SIZE_MAX + 1];
    let (code, _, stderr) = kvctl(&address, &["put", "large", "--value-file", "-"], Some(&too_large));
    assert_eq!(code, 2);
    assert!(stderr.contains("value of 1048577 bytes exceeds"), "{stderr}");
    drop(node);
    let (code, _, stderr) = run(&["get", "x"]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn a_client_reconnects_after_a_node_restart() {
    let dir = DataDir::new("restart-read");
    let mut node = Node::start(&dir.0, &[]);
    let address = node.address();
    let runtime = runtime();
    let client = runtime.block_on(async {
        let options = Options { shard_aware: false, ..Options::default() };
        let client = client::Client::connect(address.as_str(), options).await.expect("connect");
        client.put(b"k", b"v").await.expect("put");
        client
    });
    node.kill9();
    let node = Node::start_listening(&dir.0, &address, 1, &["--shard-port-base", "0"]);
    assert_eq!(node.address(), address);
    runtime.block_on(async {
        // The pooled connection died with the old process; the pool replaces it (and a read
        // caught on a connection that dies under it is retried once).
        let value = client.get(b"k").await.expect("get after restart").map(|v| v.value);
        assert_eq!(value, Some(b"v".to_vec()));
    });
}

/// Data far beyond a 4 MiB memory budget lands in sorted tables; every key reads back from
/// them, and each shard's figures (flushes, amplification, cache) come back over `Stats`.
#[test]
fn data_beyond_memory_lands_in_tables_and_stats_report_it() {
    let dir = DataDir::new("tables");
    let node = Node::start_with_shards(&dir.0, 2, &["--memory-per-shard", "4", "--fsync", "never"]);
    let runtime = runtime();
    runtime.block_on(async {
        let client = client(&node).await;
        let value = |i: u32| format!("{i:08}").repeat(128).into_bytes();
        for chunk in (0..12_000u32).collect::<Vec<_>>().chunks(500) {
            let writes: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    let client = client.clone();
                    tokio::spawn(async move { client.put(format!("k{i}").as_bytes(), &value(i)).await })
                })
                .collect();
            for write in writes {
                write.await.expect("task").expect("put");
            }
        }
        for i in (0..12_000u32).step_by(7) {
            let found = client.get(format!("k{i}").as_bytes()).await.expect("get");
            assert_eq!(found.map(|v| v.value), Some(value(i)), "k{i}");
        }
        let shards: Vec<serde_json::Value> = client
            .stats()
            .await
            .expect("stats")
            .iter()
            .map(|text| serde_json::from_str(text).expect("stats JSON"))
            .collect();
        assert_eq!(shards.len(), 2);
        for shard in &shards {
            let engine = &shard["engine"];
            let number = |name: &str| engine[name].as_f64().unwrap_or_else(|| panic!("{name} in {engine}"));
            assert!(number("flush_count") >= 1.0, "{engine}");
            assert!(number("table_count") >= 1.0, "{engine}");
            assert!(number("write_amplification") >= 1.0, "{engine}");
            assert!(number("read_amplification") > 0.0, "{engine}");
            assert!((0.0..=1.0).contains(&number("cache_hit_ratio")), "{engine}");
            assert!(number("cache_capacity") <= 4.0 * 1024.0 * 1024.0, "{engine}");
        }
        // kvctl (built beside kvd by `cargo build --workspace --bins`) shows the same figures.
        let kvctl = std::path::Path::new(env!("CARGO_BIN_EXE_kvd")).with_file_name("kvctl");
        let output = command(kvctl).args(["--addr", &node.address(), "stats"]).output().expect("kvctl stats");
        assert!(output.status.success());
        let printed: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("kvctl stats prints JSON");
        assert_eq!(printed.as_array().map(Vec::len), Some(2));
    });
}

/// Regression: `kvctl ... | head -1` made kvctl abort ("failed printing to stdout: Broken
/// pipe"); it now ends by SIGPIPE, quietly, as command-line tools do.
#[test]
fn kvctl_printing_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = DataDir::new("kvctl-pipe");
    let node = Node::start(&dir.0, &[]);
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_kvd")).with_file_name("kvctl");
    for i in 0..3 {
        let (code, _, stderr) = kvctl(&node.address(), &["put", &format!("k{i}"), "v"], None);
        assert_eq!(code, 0, "{stderr}");
    }
    // The reader is gone before kvctl writes: its stdout is a pipe with no reader.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = command(path)
        .args(["--addr", &node.address(), "stats"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run kvctl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
