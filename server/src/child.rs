//! Child processes that end with whoever started them, however that one ends (SIGKILL
//! included, which runs no `Drop` and no trap).

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A command whose process gets `signal` when the thread that spawns it ends. The kernel
/// sends the parent-death signal when the spawning *thread* exits (not the process): spawn
/// from a thread that lives as long as the child should.
#[allow(clippy::disallowed_methods, reason = "the one place a Command is made")]
pub fn command_ending_with_parent(program: impl AsRef<OsStr>, signal: libc::c_int) -> Command {
    let mut command = Command::new(program);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody is left to signal us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    command
}
