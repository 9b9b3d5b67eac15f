//! Start-up self-checks: what would certainly make the node fail is an error that names the
//! fix; what would hurt later is a warning on stderr. Runs on the main thread before any
//! shard starts.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::bail;

/// Descriptors below which a node cannot serve at all (logs, tables, listeners, a few
/// hundred connections).
pub const NOFILE_MIN: u64 = 1024;
/// Free disk below which a warning is printed.
const FREE_DISK_WARN: u64 = 1 << 30;

fn limit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut value = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    (unsafe { libc::getrlimit(resource, &mut value) } == 0).then_some(value.rlim_cur)
}

/// Checks the host and the data directory (which exists by now). Returns the warnings.
pub fn check(data_dir: &Path, connections_max: usize) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    if std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|v| v.trim() == "2") {
        bail!("io_uring is disabled on this host (kernel.io_uring_disabled = 2); kvd needs it: run `sysctl -w kernel.io_uring_disabled=0` (and set it in /etc/sysctl.d)");
    }
    let nofile = limit(libc::RLIMIT_NOFILE).unwrap_or(u64::MAX);
    if nofile < NOFILE_MIN {
        bail!(
            "the open-file limit is {nofile}, below the {NOFILE_MIN} a node needs; raise it: `ulimit -n 65536` in the shell, \
             or LimitNOFILE=65536 in the systemd unit (tuning/kvd.service)"
        );
    }
    if nofile < connections_max as u64 + NOFILE_MIN {
        warnings.push(format!(
            "the open-file limit ({nofile}) is below --connections-max ({connections_max}) plus the node's own files; \
             connections beyond it will be refused: raise LimitNOFILE"
        ));
    }
    let memlock = limit(libc::RLIMIT_MEMLOCK).unwrap_or(u64::MAX);
    if memlock < 4 << 20 {
        warnings.push(format!(
            "the locked-memory limit is {} KiB; io_uring buffers are registered within it: LimitMEMLOCK=infinity in the \
             systemd unit (tuning/kvd.service) avoids surprises",
            memlock >> 10
        ));
    }
    // O_DIRECT: the log and the tables are written with it.
    let probe = data_dir.join(".odirect-probe");
    let opened =
        OpenOptions::new().create(true).truncate(true).write(true).custom_flags(libc::O_DIRECT).open(&probe);
    let _ = std::fs::remove_file(&probe);
    if let Err(error) = opened {
        bail!(
            "the file system of {} does not support O_DIRECT ({error}); put the data directory on ext4 or XFS \
             (tmpfs needs Linux 6.6 or later)",
            data_dir.display()
        );
    }
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let path = std::ffi::CString::new(data_dir.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: statvfs reads a NUL-terminated path and writes into the struct we own.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } == 0 {
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < FREE_DISK_WARN {
            warnings.push(format!(
                "{} has {} MiB free; writes are refused (NO_SPACE) when it fills",
                data_dir.display(),
                free >> 20
            ));
        }
    }
    Ok(warnings)
}
