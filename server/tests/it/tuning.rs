//! `tuning/check` and `tuning/apply` on a fixture tree (`--root`): the report names every
//! problem, a dry run changes nothing, apply fixes what check found and is idempotent, and
//! revert puts everything back.

use std::path::Path;

use crate::harness::{command, DataDir};

const FILES: &[(&str, &str)] = &[
    ("proc/sys/kernel/osrelease", "6.1.0-test\n"),
    ("proc/sys/kernel/io_uring_disabled", "2\n"),
    (
        "proc/self/limits",
        "Limit                     Soft Limit           Hard Limit           Units\n\
         Max open files            1024                 1024                 files\n\
         Max locked memory         65536                65536                bytes\n",
    ),
    ("sys/devices/system/cpu/online", "0-1\n"),
    ("sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", "powersave\n"),
    ("sys/devices/system/cpu/cpu1/cpufreq/scaling_governor", "powersave\n"),
    ("sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never\n"),
    ("proc/irq/10/smp_affinity_list", "0-1\n"),
    ("proc/irq/11/smp_affinity_list", "0\n"),
    ("proc/mounts", "/dev/sda1 / ext4 rw 0 0\n/dev/nvme0n1p2 /var/lib/kvd xfs rw 0 0\n"),
    ("sys/block/nvme0n1/queue/scheduler", "mq-deadline kyber [bfq] none\n"),
    ("run/chrony/chronyd.pid", "1\n"),
];

fn script(name: &str, root: &Path, extra: &[&str]) -> (i32, String) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tuning/");
    let output = command("bash")
        .arg(format!("{path}{name}"))
        .arg("--root")
        .arg(root)
        .args(["--data-dir", "/var/lib/kvd", "--cores", "1"])
        .args(extra)
        .output()
        .expect("run the script");
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

fn snapshot(root: &Path) -> Vec<(String, String)> {
    FILES
        .iter()
        .map(|(path, _)| (path.to_string(), std::fs::read_to_string(root.join(path)).unwrap_or_default()))
        .collect()
}

#[test]
fn check_reports_apply_fixes_and_revert_restores_a_fixture_host() {
    let dir = DataDir::new("tuning");
    let root = &dir.0;
    for (path, text) in FILES {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("fixture dirs");
        std::fs::write(&file, text).expect("fixture file");
    }

    let (problems, report) = script("check", root, &[]);
    println!("{report}");
    for expected in [
        "WARN  io_uring is restricted",
        "WARN  open-file limit 1024",
        "WARN  locked-memory limit 65536 bytes",
        "WARN  CPU governor powersave",
        "WARN  transparent huge pages always",
        "WARN  1 IRQs may run on the shard cores (1)",
        "ok    clock synchronised",
        "ok    /var/lib/kvd on xfs (/dev/nvme0n1p2 at /var/lib/kvd)",
        "WARN  I/O scheduler of nvme0n1: bfq",
    ] {
        assert!(report.contains(expected), "check lacks {expected:?}:\n{report}");
    }
    assert_eq!(problems, 7, "{report}");

    let before = snapshot(root);
    let (status, dry) = script("apply", root, &["--dry-run"]);
    assert_eq!(status, 0, "{dry}");
    assert!(dry.contains("would    echo performance > ") && dry.contains("would    echo 0 > "), "{dry}");
    assert_eq!(snapshot(root), before, "a dry run changed the tree");

    let (status, applied) = script("apply", root, &[]);
    assert_eq!(status, 0, "{applied}");
    let (problems, report) = script("check", root, &[]);
    // What apply cannot change from a file: the limits of a running process.
    assert_eq!(problems, 2, "after apply:\n{report}");
    assert!(report.contains("ok    no IRQ on the shard cores (1)"), "{report}");
    let (_, again) = script("apply", root, &[]);
    assert!(!again.contains("  set "), "apply is not idempotent:\n{again}");
    let (_, dump) = script("apply", root, &["--dump"]);
    assert!(dump.contains("scaling_governor = performance"), "{dump}");

    let (status, reverted) = script("apply", root, &["--revert"]);
    assert_eq!(status, 0, "{reverted}");
    let (problems, _) = script("check", root, &[]);
    assert_eq!(problems, 7, "revert restored every problem");
    assert!(!root.join("etc/security/limits.d/90-kvd.conf").exists());
    println!("tuning: check found 7 problems, apply left the 2 it cannot fix, revert restored all 7");
}
