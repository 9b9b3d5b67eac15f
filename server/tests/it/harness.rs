//! Real `kvd` processes for tests: a fresh data directory, port 0, one shard, no pinning;
//! the bound ports read back from `ports.json`; the process killed and the directory
//! removed when the handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use server::node::Ports;

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

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
        let ports_file = data_dir.join(server::node::PORTS_FILE);
        let _ = std::fs::remove_file(&ports_file);
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_kvd")]);
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_kvd")),
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
