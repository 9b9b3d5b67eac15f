//! `kvops`: a deterministic, single-threaded drive of the request path for instruction
//! counting under `valgrind --tool=callgrind` (the CI-safe regression gate).
//!
//! Each operation is encoded as a client frame, split, verified and parsed, run against a
//! shard's store (index + write-ahead log with group commit) on simulated storage, and its
//! reply encoded: everything a request costs on a shard except the network and the disk,
//! with no timing in it, so the instruction count is the same on every run.
//!
//! `kvops OPS` runs OPS operations (70 % reads of 1 KiB values under 100-byte keys, 16 in
//! flight) after preloading 10,000 keys.
#![forbid(unsafe_code)]

use std::path::Path;
use std::rc::Rc;

use flatbuffers::FlatBufferBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use schema::{encode_request, parse_request, split_frame, Consistency, Op, RequestView};
use server::command::Command;
use server::net::connection::encode_reply;
use server::rng::Rng;
use server::storage::sim::SimStorage;
use server::store::Store;
use server::wal::{ShardIdentity, SyncPolicy};

const KEY_COUNT: u64 = 10_000;
const IN_FLIGHT: u64 = 16;

fn key(index: u64) -> Vec<u8> {
    format!("{index:0100}").into_bytes()
}

async fn one_request(store: &Store<SimStorage>, id: u64, op: Op<'_>) -> usize {
    let mut builder = FlatBufferBuilder::new();
    let mut frame = Vec::new();
    let request =
        RequestView { id, timeout_ms: 0, consistency: Consistency::ONE, context: &[], write_id: None, op };
    encode_request(&mut builder, &mut frame, &request);
    let payload = split_frame(&frame).ok().flatten().expect("a whole frame");
    let parsed = parse_request(payload).expect("a valid request");
    let command = Command::from_op(&parsed.op).expect("a keyed operation");
    let reply = store.apply(command).await;
    let mut out = Vec::new();
    encode_reply(&mut builder, &mut out, parsed.id, &reply);
    out.len()
}

fn main() {
    let op_count: u64 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(20_000);
    let bytes = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let storage = SimStorage::new(1);
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
            let store = Rc::new(store);
            let value = vec![0x5au8; 1024];
            let mut bytes = 0;
            for index in 0..KEY_COUNT {
                bytes +=
                    one_request(&store, index, Op::Put { key: &key(index), value: &value, ttl_ms: 0 }).await;
            }
            let mut rng = Rng::new(7);
            let mut done = 0;
            while done < op_count {
                let batch: Vec<_> = (0..IN_FLIGHT.min(op_count - done))
                    .map(|i| {
                        let key = key(rng.below(KEY_COUNT));
                        let read = rng.below(10) < 7;
                        let (store, value) = (store.clone(), value.clone());
                        glommio::spawn_local(async move {
                            let op = if read {
                                Op::Get { key: &key, metadata_only: false, sibling_skip: 0 }
                            } else {
                                Op::Put { key: &key, value: &value, ttl_ms: 0 }
                            };
                            one_request(&store, done + i, op).await
                        })
                    })
                    .collect();
                for task in batch {
                    bytes += task.await;
                }
                done += IN_FLIGHT;
            }
            bytes
        })
        .expect("executor")
        .join()
        .expect("join");
    println!("{op_count} operations, {bytes} reply bytes");
}
