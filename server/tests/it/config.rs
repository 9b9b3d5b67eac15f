//! `kvd --config FILE` on a real process, and `kvd config check` naming a bad key.

use crate::harness::{command, DataDir, Node};

#[test]
fn a_node_starts_from_a_config_file_and_check_names_bad_keys() {
    let dir = DataDir::new("config");
    let file = dir.0.join("kvd.toml");
    std::fs::write(
        &file,
        "metrics_listen = \"127.0.0.1:0\"\nresp-listen = \"127.0.0.1:0\"\nmemory_per_shard = 16\n",
    )
    .expect("write config");
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let node = Node::start(&data, &["--config", file.to_str().expect("utf-8 path")]);
    assert!(node.ports.metrics.is_some() && node.ports.resp.is_some(), "{:?}", node.ports.resp);

    let bad = dir.0.join("bad.toml");
    std::fs::write(&bad, "memory_per_shard = 16\nshard_count = 4\n").expect("write config");
    let output =
        command(env!("CARGO_BIN_EXE_kvd")).args(["config", "check"]).arg(&bad).output().expect("kvd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("unknown key `shard_count`"), "{stderr}");
    let output =
        command(env!("CARGO_BIN_EXE_kvd")).args(["config", "check"]).arg(&file).output().expect("kvd");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn startup_checks_name_the_fix() {
    let dir = DataDir::new("preflight");
    let kvd = env!("CARGO_BIN_EXE_kvd");
    // bash's ulimit lowers the soft and hard limits, so kvd cannot raise them back.
    let script = format!("ulimit -n 100; exec {kvd} --data-dir {} --listen 127.0.0.1:0", dir.0.display());
    let output = command("bash").args(["-c", &script]).output().expect("bash");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("open-file limit is 100") && stderr.contains("LimitNOFILE"), "{stderr}");

    let output = command(kvd)
        .args(["--data-dir", "/proc/kvd-no-such-dir", "--listen", "127.0.0.1:0"])
        .output()
        .expect("kvd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("create it and make it writable"), "{stderr}");
}

#[test]
fn the_example_cluster_configs_check() {
    for node in 1..=3 {
        let file = format!("{}/../tuning/examples/node-{node}.toml", env!("CARGO_MANIFEST_DIR"));
        let output =
            command(env!("CARGO_BIN_EXE_kvd")).args(["config", "check", &file]).output().expect("kvd");
        assert!(output.status.success(), "{file}: {}", String::from_utf8_lossy(&output.stderr));
    }
}
