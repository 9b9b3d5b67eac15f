//! `kvops`: a deterministic, single-threaded drive of a shard's request path for instruction
//! counting under `valgrind --tool=callgrind` (the CI-safe regression gate).
//!
//! `kvops OPS PATH` sends OPS requests through the server's real connection code, native or
//! RESP, to a shard (its store, write-ahead log with group commit, memtable) on simulated
//! storage, 16 pipelined at a time, and discards the replies: everything a request costs the
//! server except the socket and the disk, with no timing in it, so the count is the same on
//! every run. PATH is one of `native-get`, `native-put`, `resp-get`, `resp-set`: 100-byte keys
//! drawn from 10,000 preloaded ones, 1 KiB values.
//!
//! The client's side stays out of the difference that the gate takes between two run lengths:
//! requests come from a fixed pool of 1,024 encoded once at start-up and sent over and over.
#![forbid(unsafe_code)]

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use flatbuffers::FlatBufferBuilder;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::{LocalExecutorBuilder, Placement};
use schema::{encode_request, Consistency, Op, RequestView};
use server::resp::commands::RespSettings;
use server::resp::store_ops::{Access, RespConsistency};
use server::rng::Rng;
use server::shard::{ConnectionLimits, Shard, ShardParts};
use server::storage::sim::SimStorage;
use server::store::Store;
use server::wal::{ShardIdentity, SyncPolicy};

const KEY_COUNT: u64 = 10_000;
const PIPELINE: usize = 16;
const POOL_SIZE: usize = 1024;
const VALUE_SIZE: usize = 1024;

/// The request path `kvops` drives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    NativeGet,
    NativePut,
    RespGet,
    RespSet,
}

impl Workload {
    fn parse(text: &str) -> Option<Workload> {
        Some(match text {
            "native-get" => Workload::NativeGet,
            "native-put" => Workload::NativePut,
            "resp-get" => Workload::RespGet,
            "resp-set" => Workload::RespSet,
            _ => return None,
        })
    }

    fn reads(self) -> bool {
        matches!(self, Workload::NativeGet | Workload::RespGet)
    }
}

fn key(index: u64) -> Vec<u8> {
    format!("{index:0100}").into_bytes()
}

/// The pool of encoded requests, back to back, and where each ends.
fn request_pool(path: Workload) -> (Vec<u8>, Vec<usize>) {
    let mut rng = Rng::new(7);
    let value = vec![0x5au8; VALUE_SIZE];
    let mut builder = FlatBufferBuilder::new();
    let (mut bytes, mut ends) = (Vec::new(), Vec::new());
    for id in 0..POOL_SIZE as u64 {
        let key = key(rng.below(KEY_COUNT));
        match path {
            Workload::NativeGet | Workload::NativePut => {
                let op = if path.reads() {
                    Op::Get { key: &key, metadata_only: false, sibling_skip: 0 }
                } else {
                    Op::Put { key: &key, value: &value, ttl_ms: 0 }
                };
                let request = RequestView {
                    id,
                    timeout_ms: 0,
                    consistency: Consistency::ONE,
                    context: &[],
                    write_id: None,
                    op,
                };
                encode_request(&mut builder, &mut bytes, &request);
            }
            Workload::RespGet | Workload::RespSet => {
                let args: Vec<&[u8]> =
                    if path.reads() { vec![b"GET", &key] } else { vec![b"SET", &key, &value] };
                bytes.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
                for arg in args {
                    bytes.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                    bytes.extend_from_slice(arg);
                    bytes.extend_from_slice(b"\r\n");
                }
            }
        }
        ends.push(bytes.len());
    }
    (bytes, ends)
}

/// A client on the far side of an in-memory connection: it sends the pool's requests
/// `PIPELINE` at a time, cycling through the pool, until `remaining` are sent, then closes;
/// it counts and discards what the server writes.
struct ScriptedClient {
    pool: Rc<(Vec<u8>, Vec<usize>)>,
    /// The pool index of the first request of the current group, and the bytes of the group
    /// sent so far.
    next: usize,
    sent: usize,
    remaining: usize,
    reply_bytes: Rc<std::cell::Cell<usize>>,
}

impl ScriptedClient {
    fn group(&self) -> (usize, usize, usize) {
        let count = PIPELINE.min(self.remaining).min(POOL_SIZE - self.next);
        let ends = &self.pool.1;
        let start = if self.next == 0 { 0 } else { ends[self.next - 1] };
        (start, ends[self.next + count - 1], count)
    }
}

impl AsyncRead for ScriptedClient {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.remaining == 0 {
            return Poll::Ready(Ok(0));
        }
        let (start, end, count) = self.group();
        let from = start + self.sent;
        let size = (end - from).min(buf.len());
        buf[..size].copy_from_slice(&self.pool.0[from..from + size]);
        self.sent += size;
        if start + self.sent == end {
            self.sent = 0;
            self.next = (self.next + count) % POOL_SIZE;
            self.remaining -= count;
        }
        Poll::Ready(Ok(size))
    }
}

impl AsyncWrite for ScriptedClient {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.reply_bytes.set(self.reply_bytes.get() + buf.len());
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

async fn open_shard() -> Rc<Shard<SimStorage>> {
    let storage = SimStorage::without_crashes(1);
    let identity = ShardIdentity { shard_index: 0, shard_count: 1 };
    let (store, _) = Store::open(
        storage,
        Path::new("/ops/shard-0"),
        identity,
        SyncPolicy::Always,
        server::engine::EngineOptions::default(),
    )
    .await
    .expect("open store");
    let value = vec![0x5au8; VALUE_SIZE];
    for index in 0..KEY_COUNT {
        store.put(&key(index), &value, 0).await;
    }
    let limits = ConnectionLimits {
        inflight_max: PIPELINE,
        idle_timeout: Duration::from_secs(600),
        frame_timeout: Duration::from_secs(600),
        write_timeout: Duration::from_secs(600),
        request_timeout_default: Duration::from_secs(600),
        request_timeout_max: Duration::from_secs(600),
    };
    Rc::new(Shard::new(ShardParts::alone(store, limits)))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let op_count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(20_000);
    let path_name = args.next().unwrap_or_else(|| "resp-get".into());
    let Some(path) = Workload::parse(&path_name) else {
        eprintln!("usage: kvops OPS native-get|native-put|resp-get|resp-set");
        std::process::exit(2);
    };
    let bytes = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let shard = open_shard().await;
            let reply_bytes = Rc::new(std::cell::Cell::new(0));
            let client = ScriptedClient {
                pool: Rc::new(request_pool(path)),
                next: 0,
                sent: 0,
                remaining: op_count,
                reply_bytes: reply_bytes.clone(),
            };
            match path {
                Workload::NativeGet | Workload::NativePut => {
                    server::net::connection::serve(client, shard).await
                }
                Workload::RespGet | Workload::RespSet => {
                    let settings = Rc::new(RespSettings {
                        password: None,
                        access: Access {
                            consistency: RespConsistency::Level(
                                server::cluster::coordinator::Consistency::One,
                            ),
                            timeout: Duration::from_secs(600),
                        },
                        started: Instant::now(),
                        port: 0,
                    });
                    server::resp::connection::serve(client, shard, settings).await
                }
            }
            reply_bytes.get()
        })
        .expect("executor")
        .join()
        .expect("join");
    println!("{op_count} {path_name} requests, {bytes} reply bytes");
}
