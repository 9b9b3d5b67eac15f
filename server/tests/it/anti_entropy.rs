//! Anti-entropy on real 3-node clusters: a replica whose storage is wiped behind the cluster's
//! back is healed with no operator action; `repair` reports exactly what it fixed; tombstones
//! are purged only once every replica holds them, and then no deleted value comes back.

use std::path::Path;
use std::time::{Duration, Instant};

use client::Consistency;

use crate::cluster::{
    cluster_stats, connect_direct, wait_until_all_see, Cluster, CONVERGE_DEADLINE, DETECT_DEADLINE,
};
use crate::harness::{runtime, wait_for};

/// Removes every file of a stopped node's shard but its counter lease and hint log: the
/// node comes back as the same member with empty storage.
fn wipe_storage(data_dir: &Path) -> usize {
    let shard_dir = data_dir.join("shard-0");
    let mut removed = 0;
    for entry in std::fs::read_dir(&shard_dir).expect("shard directory") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
        if name != "LEASE" && name != "HINTS" {
            std::fs::remove_file(&path).expect("remove a storage file");
            removed += 1;
        }
    }
    removed
}

fn key(i: usize) -> Vec<u8> {
    format!("ae-{i:05}").into_bytes()
}

/// Writes `count` keys at ALL through `address` (every replica holds every key, no hints).
fn write_all(rt: &tokio::runtime::Runtime, address: &str, count: usize) {
    let client = rt.block_on(connect_direct(address, Consistency::ALL));
    for i in 0..count {
        rt.block_on(client.put(&key(i), &key(i))).expect("write at ALL");
    }
}

/// Every key `0..count` is held by the node at `address` when it is the only one up.
fn assert_alone_holds(rt: &tokio::runtime::Runtime, address: &str, count: usize) {
    let alone = rt.block_on(connect_direct(address, Consistency::ONE));
    for i in 0..count {
        let got = rt.block_on(alone.get(&key(i))).expect("read at ONE");
        assert_eq!(got.map(|v| v.value), Some(key(i)), "key {i} is missing on the repaired replica");
    }
}

fn anti_entropy_figure(rt: &tokio::runtime::Runtime, address: &str, name: &str) -> Option<u64> {
    rt.block_on(cluster_stats(address))?["anti_entropy"][name].as_u64()
}

#[test]
fn a_wiped_replica_is_healed_without_an_operator() {
    let rt = runtime();
    let count = 2000;
    let mut cluster = Cluster::start_flagged(3, "ae-heal", &["--anti-entropy-interval-ms", "2000"]);
    let addresses = cluster.addresses.clone();
    wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    write_all(&rt, &addresses[0], count);
    cluster.kill9(1);
    let removed = wipe_storage(&cluster.dirs[1].0);
    assert!(removed > 0, "nothing to wipe");
    cluster.restart(1);
    let restarted = Instant::now();
    wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    // Nobody reads (no read repair) and no hints exist: only anti-entropy can bring the keys
    // back. Its figures tell when the replica's partitions agree again.
    let healed = wait_for("anti-entropy to heal the wiped replica", Duration::from_secs(60), || {
        let repaired: u64 =
            addresses.iter().map(|a| anti_entropy_figure(&rt, a, "keys_repaired").unwrap_or(0)).sum();
        (repaired >= count as u64).then(|| (restarted.elapsed(), repaired))
    });
    // Then a whole pass of the wiped node that found every partition in agreement.
    let figures = |rt: &tokio::runtime::Runtime| {
        let passes = anti_entropy_figure(rt, &addresses[1], "passes")?;
        Some((passes, anti_entropy_figure(rt, &addresses[1], "partitions_differing")?))
    };
    let agreed = wait_for("a pass of the healed node to find no difference", Duration::from_secs(60), || {
        let (passes, differing) = figures(&rt)?;
        let later = wait_for("two more passes", Duration::from_secs(30), || {
            figures(&rt).filter(|&(p, _)| p >= passes + 2)
        });
        (later.1 == differing).then(|| restarted.elapsed())
    });
    println!(
        "anti-entropy: a replica wiped of {count} keys ({removed} files) was healed {:.2} s after it restarted \
         ({} key repairs counted; passes of 2 s over 256 partitions); a whole pass agreed by {:.2} s",
        healed.0.as_secs_f64(),
        healed.1,
        agreed.as_secs_f64()
    );
    cluster.kill9(0);
    cluster.kill9(2);
    assert_alone_holds(&rt, &addresses[1], count);
}

#[test]
fn repair_reports_what_it_fixed_and_then_finds_nothing() {
    let rt = runtime();
    let count = 300;
    let mut cluster = Cluster::start_flagged(3, "ae-repair", &["--anti-entropy-interval-ms", "0"]);
    let addresses = cluster.addresses.clone();
    wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    write_all(&rt, &addresses[0], count);
    cluster.kill9(2);
    wipe_storage(&cluster.dirs[2].0);
    cluster.restart(2);
    wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    let client = rt.block_on(connect_direct(&addresses[2], Consistency::ONE));
    let started = Instant::now();
    let report: serde_json::Value =
        serde_json::from_str(&rt.block_on(client.repair()).expect("repair")).expect("JSON report");
    let took = started.elapsed();
    println!("repair on the wiped replica took {:.2} s: {report}", took.as_secs_f64());
    assert_eq!(report["partitions"], 256, "{report}");
    assert_eq!(report["comparisons"], 512, "{report}");
    assert_eq!(report["unreachable"], 0, "{report}");
    assert_eq!(report["keys_failed"], 0, "{report}");
    // Each key is fetched once, from whichever replica the partition compared first.
    assert_eq!(report["keys_repaired"], count, "{report}");
    let again: serde_json::Value =
        serde_json::from_str(&rt.block_on(client.repair()).expect("repair")).expect("JSON report");
    assert_eq!(again["differing"], 0, "{again}");
    assert_eq!(again["keys_repaired"], 0, "{again}");
    cluster.kill9(0);
    cluster.kill9(1);
    assert_alone_holds(&rt, &addresses[2], count);
}

#[test]
fn tombstones_are_purged_only_once_every_replica_holds_them() {
    let rt = runtime();
    let count = 100;
    let flags = ["--anti-entropy-interval-ms", "500", "--tombstone-grace-s", "2"];
    let mut cluster = Cluster::start_flagged(3, "ae-purge", &flags);
    let addresses = cluster.addresses.clone();
    wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    write_all(&rt, &addresses[0], count);
    // Node 3 misses the deletes (its hints expire with the 2 s grace).
    cluster.kill9(2);
    wait_until_all_see(&rt, &addresses[..2], 2, DETECT_DEADLINE);
    let quorum = rt.block_on(connect_direct(&addresses[0], Consistency::QUORUM));
    for i in 0..count {
        rt.block_on(quorum.delete(&key(i))).expect("delete at QUORUM");
    }
    let deleted = Instant::now();
    // Past the grace, two more passes of both live nodes: they must not purge, since node 3
    // cannot confirm it holds the tombstones.
    let passes = |rt: &tokio::runtime::Runtime| -> Vec<u64> {
        addresses[..2].iter().map(|a| anti_entropy_figure(rt, a, "passes").unwrap_or(0)).collect()
    };
    wait_for("the grace to pass", Duration::from_secs(10), || {
        (deleted.elapsed() > Duration::from_secs(3)).then_some(())
    });
    let before = passes(&rt);
    wait_for("two more passes on both live nodes", Duration::from_secs(30), || {
        passes(&rt).iter().zip(&before).all(|(now, then)| *now >= then + 2).then_some(())
    });
    for address in &addresses[..2] {
        assert_eq!(anti_entropy_figure(&rt, address, "tombstones_purged"), Some(0), "{address} purged early");
    }
    cluster.restart(2);
    let restarted = Instant::now();
    wait_until_all_see(&rt, &addresses, 3, CONVERGE_DEADLINE);
    let purged = wait_for("every replica to purge the tombstones", Duration::from_secs(60), || {
        let purged: Vec<u64> =
            addresses.iter().map(|a| anti_entropy_figure(&rt, a, "tombstones_purged").unwrap_or(0)).collect();
        purged.iter().all(|&p| p >= count as u64).then_some(purged)
    });
    println!(
        "anti-entropy: {count} tombstones that a replica missed reached it and were purged on all three \
         {:.2} s after it came back (purged per node: {purged:?})",
        restarted.elapsed().as_secs_f64()
    );
    // Nothing comes back: not through node 3's stale values, not at ALL.
    let all = rt.block_on(connect_direct(&addresses[2], Consistency::ALL));
    for i in 0..count {
        let got = rt.block_on(all.get(&key(i))).expect("read at ALL");
        assert_eq!(got.map(|v| v.value), None, "deleted key {i} came back");
    }
}
