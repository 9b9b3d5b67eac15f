//! RESP pipelines through the connection code itself, over an in-memory stream to a shard on
//! simulated storage: plain GETs and SETs answered at once (without a task) and commands
//! that take the general path keep the order they were sent in, and a SET whose log write
//! fails is never answered `+OK`.

use std::cell::RefCell;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::{LocalExecutorBuilder, Placement};
use server::cluster::coordinator::Consistency;
use server::resp::commands::RespSettings;
use server::resp::store_ops::{Access, RespConsistency};
use server::shard::{ConnectionLimits, Shard, ShardParts};
use server::storage::sim::{Faults, SimStorage};
use server::store::Store;
use server::wal::{ShardIdentity, SyncPolicy};

/// A client that sends `requests` in one piece, then closes its side, and keeps what the
/// server answers.
struct OneShot {
    requests: Vec<u8>,
    sent: usize,
    replies: Rc<RefCell<Vec<u8>>>,
}

impl AsyncRead for OneShot {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let size = (self.requests.len() - self.sent).min(buf.len());
        let from = self.sent;
        buf[..size].copy_from_slice(&self.requests[from..from + size]);
        self.sent += size;
        Poll::Ready(Ok(size))
    }
}

impl AsyncWrite for OneShot {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.replies.borrow_mut().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn command(args: &[&str]) -> Vec<u8> {
    let mut bytes = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        bytes.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    bytes
}

/// Sends `commands` as one pipeline (one read) on a fresh connection to a new shard, whose
/// log's syncs all fail once it is open when `failing_syncs`, and returns the replies.
fn pipeline(failing_syncs: bool, commands: &[&[&str]]) -> String {
    let requests: Vec<u8> = commands.iter().flat_map(|args| command(args)).collect();
    LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let storage = SimStorage::new(1);
            let identity = ShardIdentity { shard_index: 0, shard_count: 1 };
            let options = server::engine::EngineOptions::default();
            let (store, _) = Store::open(
                storage.clone(),
                Path::new("/data/shard-0"),
                identity,
                SyncPolicy::Always,
                options,
            )
            .await
            .expect("open store");
            if failing_syncs {
                storage.set_faults(Faults { write_error_per_million: 0, sync_error_per_million: 1_000_000 });
            }
            let second = Duration::from_secs(5);
            let limits = ConnectionLimits {
                inflight_max: 64,
                idle_timeout: second,
                frame_timeout: second,
                write_timeout: second,
                request_timeout_default: second,
                request_timeout_max: second,
            };
            let shard = Rc::new(Shard::new(ShardParts::alone(store, limits)));
            let settings = Rc::new(RespSettings {
                password: None,
                access: Access { consistency: RespConsistency::Level(Consistency::One), timeout: second },
                started: Instant::now(),
                port: 0,
            });
            let replies = Rc::new(RefCell::new(Vec::new()));
            let client = OneShot { requests, sent: 0, replies: replies.clone() };
            server::resp::connection::serve(client, shard, settings).await;
            let replies = replies.borrow().clone();
            String::from_utf8(replies).expect("text replies")
        })
        .expect("executor")
        .join()
        .expect("join")
}

#[test]
fn a_pipeline_takes_effect_in_the_order_sent() {
    // GET and SET take the fast path; DEL, INCR, PING and SET with options do not. Each
    // command must see what the ones before it in the same read did.
    let replies = pipeline(
        false,
        &[
            &["SET", "k", "a"],
            &["GET", "k"],
            &["SET", "k", "b"],
            &["GET", "k"],
            &["DEL", "k"],
            &["GET", "k"],
            &["SET", "k", "c"],
            &["GET", "k"],
            &["PING"],
            &["SET", "n", "41"],
            &["INCR", "n"],
            &["GET", "n"],
            &["SET", "k", "d", "XX"],
            &["set", "k", "e"],
            &["get", "k"],
            &["GET", "missing"],
        ],
    );
    let expected = [
        "+OK", "$1", "a", "+OK", "$1", "b", ":1", "$-1", "+OK", "$1", "c", "+PONG", "+OK", ":42", "$2", "42",
        "+OK", "+OK", "$1", "e", "$-1",
    ];
    assert_eq!(replies, expected.iter().map(|line| format!("{line}\r\n")).collect::<String>());
}

#[test]
fn a_set_whose_log_sync_fails_is_never_answered_ok() {
    let replies = pipeline(true, &[&["SET", "a", "1"], &["SET", "b", "2"], &["GET", "a"], &["GET", "b"]]);
    let lines: Vec<&str> = replies.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 4, "one reply per command: {replies:?}");
    for line in lines {
        assert!(line.starts_with('-'), "every reply is an error once the log failed: {replies:?}");
    }
}
