//! Real `kvd` processes for tests: a fresh data directory, port 0, one shard, no pinning;
//! the bound ports read back from `ports.json`; the process killed and the directory
//! removed when the handle drops.
//!
//! `Drop` never runs when the test process itself is killed (SIGKILL from a timeout, a run
//! cut short), so nothing is left to it alone: every process a test starts comes from
//! [`command`] and dies with the thread that started it, and the first use of the harness
//! in a process removes what dead test processes left behind ([`remove_leftovers`]).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use server::node::Ports;

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A command for a child process that is killed (SIGKILL) when the thread that spawns it
/// ends, however it ends. libtest runs each test on a thread of its own: spawn from the
/// test's thread, never from a helper thread that ends before the child should.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    server::child::command_ending_with_parent(program, libc::SIGKILL)
}

/// Whether process `pid` is alive: one of its threads is not dead. A killed process whose
/// first thread is a zombie may still have threads exiting, and holds its files (sockets,
/// ports) until the last one is gone.
pub fn process_alive(pid: u32) -> bool {
    let live = |stat: String| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    tasks.filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok()).any(live)
}

/// Removes, once per process, what test processes that are no longer alive left behind:
/// their nftables tables (`kvtest_<pid>`), network namespaces and links (`kt<pid>x...`) and
/// data directories (`kvd-it-<pid>-...`). Those of live runs (another test binary running
/// beside this one) are left alone. Tables, namespaces and links need root; without it
/// there are none to remove.
pub fn remove_leftovers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dead = |pid: Option<u32>| pid.is_some_and(|pid| !process_alive(pid));
        let leading_pid = |name: &str| -> Option<u32> {
            let digits: String = name.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        for dir in [PathBuf::from(env!("CARGO_TARGET_TMPDIR")), std::env::temp_dir()] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if dead(name.strip_prefix("kvd-it-").and_then(leading_pid)) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let output = |program: &str, args: &[&str]| -> String {
            command(program)
                .args(args)
                .stderr(Stdio::null())
                .output()
                .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
                .unwrap_or_default()
        };
        for line in output("nft", &["list", "tables"]).lines() {
            // "table inet kvtest_1234"
            let Some(table) = line.split_whitespace().nth(2) else { continue };
            if dead(table.strip_prefix("kvtest_").and_then(leading_pid)) {
                let _ = command("nft").args(["delete", "table", "inet", table]).status();
            }
        }
        for line in output("ip", &["netns", "list"]).lines() {
            let Some(netns) = line.split_whitespace().next() else { continue };
            if dead(netns.strip_prefix("kt").and_then(leading_pid)) {
                let _ = command("ip").args(["netns", "del", netns]).status();
            }
        }
        for line in output("ip", &["-o", "link", "show"]).lines() {
            // "7: kt123x0h1@if6: <BROADCAST,..."
            let Some(link) = line.split(": ").nth(1).map(|name| name.split('@').next().unwrap_or(name))
            else {
                continue;
            };
            if dead(link.strip_prefix("kt").and_then(leading_pid)) {
                let _ = command("ip").args(["link", "del", link]).status();
            }
        }
    });
}

/// Polls `condition` until it holds or `deadline` passes (then panics with `what`).
pub fn wait_for<T>(what: &str, deadline: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A data directory that removes itself.
pub struct DataDir(pub PathBuf);

impl DataDir {
    pub fn new(name: &str) -> DataDir {
        remove_leftovers();
        let index = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let path = base.join(format!("kvd-it-{}-{index}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create data dir");
        DataDir(path)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Node {
    pub child: Child,
    pub ports: Ports,
}

impl Node {
    /// Starts `kvd` on `data_dir` with `--shards 1 --no-pin` plus `extra` flags and waits
    /// until it serves.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Node {
        Node::start_with_shards(data_dir, 1, extra)
    }

    pub fn start_with_shards(data_dir: &Path, shard_count: usize, extra: &[&str]) -> Node {
        Node::start_listening(data_dir, "127.0.0.1:0", shard_count, extra)
    }

    /// Starts on a given client address (a restart that keeps its port).
    pub fn start_listening(data_dir: &Path, listen: &str, shard_count: usize, extra: &[&str]) -> Node {
        Node::try_start_listening(data_dir, listen, shard_count, extra)
            .unwrap_or_else(|status| panic!("kvd exited during start-up: {status}"))
    }

    /// As [`Node::start_listening`], but a start-up failure (such as a port still taken) is
    /// returned, not a panic.
    pub fn try_start_listening(
        data_dir: &Path,
        listen: &str,
        shard_count: usize,
        extra: &[&str],
    ) -> Result<Node, std::process::ExitStatus> {
        Node::try_start_in(None, data_dir, listen, shard_count, extra)
    }

    /// As [`Node::try_start_listening`], inside network namespace `netns` if given (`ip netns
    /// exec` replaces itself with kvd, so the child's PID is kvd's).
    pub fn try_start_in(
        netns: Option<&str>,
        data_dir: &Path,
        listen: &str,
        shard_count: usize,
        extra: &[&str],
    ) -> Result<Node, std::process::ExitStatus> {
        remove_leftovers();
        let ports_file = data_dir.join(server::node::PORTS_FILE);
        let _ = std::fs::remove_file(&ports_file);
        // `ip netns exec` execs kvd in place, which keeps the parent-death signal.
        let mut command = match netns {
            Some(netns) => {
                let mut command = command("ip");
                command.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_kvd")]);
                command
            }
            None => command(env!("CARGO_BIN_EXE_kvd")),
        };
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen, "--shards", &shard_count.to_string(), "--no-pin"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kvd");
        let ports = wait_for("kvd to write ports.json", Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            let text = std::fs::read_to_string(&ports_file).ok()?;
            serde_json::from_str::<Ports>(&text).ok().map(Ok)
        })?;
        assert_eq!(ports.pid, child.id());
        Ok(Node { child, ports })
    }

    pub fn address(&self) -> String {
        self.ports.client.to_string()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the PID of our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        wait_for("kvd to exit after SIGTERM", Duration::from_secs(30), || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// Resident memory of the server process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A tokio runtime for client code in a synchronous test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

pub async fn client(node: &Node) -> client::Client {
    client::Client::connect(node.address(), client::Options::default()).await.expect("client connects")
}

/// Whether this process can cut links between nodes: root, with nftables (`nft`) and
/// iproute2 (`ip`) for drop rules and network namespaces. Without them the test that asks
/// (`what`) is skipped and says so, except in CI, which must run it: there this panics.
pub fn can_cut_network(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    let runs =
        |program: &str, flag: &str| command(program).arg(flag).output().is_ok_and(|o| o.status.success());
    let able = is_root && runs("nft", "--version") && runs("ip", "-V");
    if !able {
        assert!(std::env::var_os("CI").is_none(), "CI must run {what}: it needs root, nft and ip");
        eprintln!("skipped {what}: it needs root, nft and ip");
    }
    able
}
