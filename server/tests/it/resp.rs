//! The RESP front door against real third-party clients: redis-py (through
//! `tests/resp/compare.py`, which runs the same script on a real redis-server and compares),
//! redis-cli, redis-benchmark; AUTH with a password; a cluster behind it; hostile input.
//! Needs `redis-server`, `redis-cli`, `redis-benchmark` and Python with `redis` (the path in
//! `KVD_TEST_PYTHON`, set up by `.ci/test`); CI must have them, elsewhere the tests skip.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::harness::{command, wait_for, DataDir, Node};

fn tools() -> Option<PathBuf> {
    let python = std::env::var_os("KVD_TEST_PYTHON").map(PathBuf::from);
    let redis = command("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
    match python {
        Some(python) if redis => Some(python),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run the RESP tests: redis-server and KVD_TEST_PYTHON"
            );
            eprintln!("skipped: the RESP tests need redis-server, redis-cli and KVD_TEST_PYTHON");
            None
        }
    }
}

/// A real redis-server on a free port, for comparison; killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
    _dir: DataDir,
}

impl RedisServer {
    fn start() -> RedisServer {
        let dir = DataDir::new("redis");
        // redis-server cannot bind port 0: take a free port and hand it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = command("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        wait_for("redis-server to answer", Duration::from_secs(10), || {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
            stream.write_all(b"PING\r\n").ok()?;
            let mut reply = [0u8; 7];
            stream.read_exact(&mut reply).ok()?;
            (&reply == b"+PONG\r\n").then_some(())
        });
        RedisServer { child, port, _dir: dir }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn resp_port(node: &Node) -> u16 {
    node.ports.resp.expect("a RESP address in ports.json").port()
}

fn redis_cli(port: u16, script: &str) -> String {
    let mut child = command("redis-cli")
        .args(["-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("script");
    let output = child.wait_with_output().expect("redis-cli output");
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn redis_py_and_redis_cli_see_what_a_real_redis_server_answers() {
    let Some(python) = tools() else { return };
    let dir = DataDir::new("resp");
    let node = Node::start(&dir.0, &["--resp-listen", "127.0.0.1:0"]);
    let redis = RedisServer::start();
    let port = resp_port(&node);

    let compare = command(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/resp/compare.py"))
        .args([port.to_string(), redis.port.to_string()])
        .output()
        .expect("run compare.py");
    let report =
        String::from_utf8_lossy(&compare.stdout).into_owned() + &String::from_utf8_lossy(&compare.stderr);
    println!("{}", report.trim_end());
    assert!(compare.status.success(), "redis-py replies differ from redis-server's:\n{report}");

    let script = "DEL cli-a cli-b cli-n\nSET cli-a hello\nGET cli-a\nINCR cli-n\nINCRBY cli-n 5\nMSET cli-a 1 cli-b 2\n\
                  MGET cli-a cli-b cli-none\nSET cli-a v EX 100 NX\nTTL cli-b\nEXISTS cli-a cli-b\nDEL cli-a cli-b cli-n\n\
                  GET cli-a\nPING\nECHO \"two words\"\nNOSUCH x\nGET\n";
    let ours = redis_cli(port, script);
    let theirs = redis_cli(redis.port, script);
    assert_eq!(ours, theirs, "redis-cli output differs");
    println!("resp: redis-cli printed the same for {} commands", script.lines().count());
}

#[test]
fn redis_benchmark_completes_without_errors() {
    if tools().is_none() {
        return;
    }
    let dir = DataDir::new("resp-bench");
    let node = Node::start(&dir.0, &["--resp-listen", "127.0.0.1:0"]);
    let output = command("redis-benchmark")
        .args([
            "-p",
            &resp_port(&node).to_string(),
            "-t",
            "set,get,incr,mset",
            "-P",
            "16",
            "-n",
            "20000",
            "--csv",
        ])
        .output()
        .expect("redis-benchmark");
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    println!("{}", text.trim_end());
    assert!(output.status.success(), "{text}");
    // One CSV row per test: "SET","29585.80",... (redis-benchmark stops at the first error).
    for test in ["\"SET\"", "\"GET\"", "\"INCR\"", "\"MSET (10 keys)\""] {
        assert!(text.lines().any(|line| line.starts_with(test)), "{test} missing:\n{text}");
    }
    assert!(!text.to_ascii_lowercase().contains("err"), "{text}");
}

/// Sends `bytes` and returns what comes back until the server closes or goes quiet.
fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let _ = stream.write_all(bytes);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

#[test]
fn auth_hostile_input_and_inline_commands() {
    let dir = DataDir::new("resp-hostile");
    let node = Node::start(&dir.0, &["--resp-listen", "127.0.0.1:0", "--requirepass", "s3cret"]);
    let port = resp_port(&node);

    // requirepass as Redis 7 does it.
    let reply = exchange(port, b"GET k\r\nAUTH wrong\r\nAUTH s3cret\r\nSET k v\r\nGET k\r\nQUIT\r\n");
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "-NOAUTH Authentication required.\r\n-WRONGPASS invalid username-password pair or user is disabled.\r\n\
         +OK\r\n+OK\r\n$1\r\nv\r\n+OK\r\n"
    );
    let authed = |bytes: &[u8]| {
        let mut request = b"AUTH default s3cret\r\n".to_vec();
        request.extend_from_slice(bytes);
        exchange(port, &request)
    };
    // A bulk length of 2^40, arrays nested a million deep, a huge multibulk count: an error,
    // then the connection closes.
    for hostile in [
        b"*1\r\n$1099511627776\r\n".to_vec(),
        b"*1\r\n".repeat(1_000_000),
        b"*99999999999\r\n".to_vec(),
        b"*2\r\n$3\r\nGET\r\n$1\r\nkXY".to_vec(),
    ] {
        let reply = authed(&hostile);
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("+OK\r\n-ERR Protocol error"), "{}", &text[..text.len().min(200)]);
    }
    // Half a command, then silence; random bytes.
    let _ = exchange(port, b"AUTH s3cret\r\n*3\r\n$3\r\nSET\r\n$1\r\nk");
    let mut noise = Vec::new();
    let mut state = 0x9e3779b97f4a7c15u64;
    for _ in 0..100_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        noise.push(state as u8);
    }
    let _ = exchange(port, &noise);
    // Still serving, inline commands included.
    let reply = authed(b"PING\r\nset inline \"a b\"\r\nget inline\r\nQUIT\r\n");
    assert_eq!(String::from_utf8_lossy(&reply), "+OK\r\n+PONG\r\n+OK\r\n$3\r\na b\r\n+OK\r\n");
    let rss = node.rss_kib();
    println!("resp: hostile input refused, still serving, RSS {rss} KiB");
    assert!(rss < 512 * 1024, "RSS {rss} KiB after hostile input");
}
