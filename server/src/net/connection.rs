//! One client connection: frames in, requests dispatched concurrently, replies out in the
//! order they complete (each carries its request id).
//!
//! Memory per connection is bounded: at most `inflight_max` requests are admitted at once
//! (the reader stops reading until a reply is written), replies keep values by reference
//! until encoded, and the writer encodes at most `OUTPUT_FLUSH_SIZE` bytes (plus one reply)
//! before it writes. A client that never reads therefore stalls only itself; after the
//! write timeout its connection is closed.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use flatbuffers::FlatBufferBuilder;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::sync::{Semaphore, StaticPermit};
use schema::{
    parse_request, split_peer_frame, Op, RequestView, Status, FRAME_HEADER_SIZE, PEER_FRAME_SIZE_MAX,
    PROTOCOL_VERSION,
};

use crate::command::{Command, LocalReply, Reply};
use crate::event::Event;

pub use super::body::encode_reply;
use super::body::{encode, Body};
use super::commands::cluster_command;
use super::node_ops;
use crate::shard::Shard;
use crate::storage::Storage;

/// Encoded reply bytes the writer gathers before it writes them.
pub const OUTPUT_FLUSH_SIZE: usize = 256 << 10;
/// A reply larger than this makes the writer drop its encoder's buffer afterwards.
const LARGE_FRAME_SIZE: usize = 64 << 10;
/// Read buffer of an idle; it grows to hold one frame and shrinks back.
const READ_BUFFER_SIZE_MIN: usize = 8 << 10;

struct Outgoing {
    id: u64,
    body: Body,
    _permit: Option<StaticPermit>,
    /// A write answered before the log acknowledged it: the writer waits for this sequence
    /// number before it sends the reply, then records the request's metrics.
    after_log: Option<LogWait>,
}

struct LogWait {
    seq: u64,
    op: &'static str,
    started: Instant,
    timeout: Duration,
}

impl Outgoing {
    fn new(id: u64, body: Body, permit: Option<StaticPermit>) -> Outgoing {
        Outgoing { id, body, _permit: permit, after_log: None }
    }
}

#[derive(Default)]
struct Outbox {
    queue: RefCell<VecDeque<Outgoing>>,
    changed: Event,
    /// Requests admitted whose reply is not yet queued.
    running_count: Cell<usize>,
    reader_done: Cell<bool>,
}

impl Outbox {
    fn push(&self, outgoing: Outgoing) {
        self.queue.borrow_mut().push_back(outgoing);
        self.changed.notify_all();
    }
}

/// Serves one client on `stream` (a TCP connection with its options set by the accept loop;
/// the benchmarks pass an in-memory stream) until it closes.
pub async fn serve<S: Storage, T: AsyncRead + AsyncWrite + Unpin + 'static>(stream: T, shard: Rc<Shard<S>>) {
    let limits = shard.limits();
    let (reader, writer) = futures_lite::io::split(stream);
    let outbox = Rc::new(Outbox::default());
    let inflight = Rc::new(Semaphore::new(limits.inflight_max as u64));
    let writer_task =
        glommio::spawn_local(write_replies(writer, outbox.clone(), inflight.clone(), shard.clone()));
    read_requests(reader, &outbox, &inflight, &shard).await;
    outbox.reader_done.set(true);
    outbox.changed.notify_all();
    writer_task.await;
}

async fn read_requests<S: Storage, T: AsyncRead + Unpin>(
    mut reader: futures_lite::io::ReadHalf<T>,
    outbox: &Rc<Outbox>,
    inflight: &Rc<Semaphore>,
    shard: &Rc<Shard<S>>,
) {
    let mut buffer = vec![0u8; READ_BUFFER_SIZE_MIN];
    // The share of the shard's large-buffer budget this connection's buffer holds; held, not
    // read: dropping it returns the share.
    let mut _large_buffer_permit: Option<StaticPermit> = None;
    // When the frame at the front of the buffer started arriving, if it is incomplete.
    let mut partial_since: Option<Instant> = None;
    let mut start = 0;
    let mut end = 0;
    loop {
        // Serve every whole frame in the buffer.
        loop {
            let payload = match split_peer_frame(&buffer[start..end]) {
                Ok(Some(payload)) => payload,
                Ok(None) => break,
                Err(error) => {
                    // The stream cannot be delimited any more: answer once and hang up.
                    let body = Body::Status(Status::FRAME_TOO_LARGE, error.to_string());
                    outbox.push(Outgoing::new(0, body, None));
                    return;
                }
            };
            let frame_size = FRAME_HEADER_SIZE + payload.len();
            let Ok(permit) = inflight.clone().acquire_static_permit(1).await else {
                return; // The writer gave up on this connection.
            };
            dispatch(payload, permit, outbox, shard);
            start += frame_size;
            partial_since = None;
        }
        // Make room for the rest of the current frame.
        if start == end {
            start = 0;
            end = 0;
            if buffer.len() > READ_BUFFER_SIZE_MIN {
                buffer = vec![0u8; READ_BUFFER_SIZE_MIN];
                _large_buffer_permit = None;
            }
        } else {
            partial_since.get_or_insert_with(Instant::now);
            if start > 0 {
                buffer.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
        }
        if end == buffer.len() {
            let needed = match buffer.get(..FRAME_HEADER_SIZE) {
                Some(header) => {
                    let size = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
                    FRAME_HEADER_SIZE + size.min(PEER_FRAME_SIZE_MAX)
                }
                None => FRAME_HEADER_SIZE,
            };
            let size = needed.max(2 * buffer.len()).min(FRAME_HEADER_SIZE + PEER_FRAME_SIZE_MAX);
            // Large buffers come out of a per-shard budget, so that many connections each
            // sending the start of a 2 MiB frame cannot exhaust memory: beyond the budget a
            // connection waits (reading nothing) until others finish their frames.
            _large_buffer_permit = None;
            let extra = (size - READ_BUFFER_SIZE_MIN) as u64;
            match shard.large_buffer_budget().clone().acquire_static_permit(extra).await {
                Ok(permit) => _large_buffer_permit = Some(permit),
                Err(_) => return,
            }
            buffer.resize(size, 0);
        }
        // A frame that has started must finish within the frame timeout, so a client that
        // trickles a large frame cannot hold its buffer for long.
        let deadline = match partial_since {
            Some(since) => shard.limits().frame_timeout.saturating_sub(since.elapsed()),
            None => shard.limits().idle_timeout,
        };
        let read = async { Some(reader.read(&mut buffer[end..]).await) };
        let expired = async {
            glommio::timer::sleep(deadline).await;
            None
        };
        match futures_lite::future::or(read, expired).await {
            Some(Ok(0)) | Some(Err(_)) | None => return, // closed, reset, idle or frame timeout
            Some(Ok(count)) => {
                end += count;
                let requests = &shard.stats().requests;
                requests.bytes_in.set(requests.bytes_in.get() + count as u64);
            }
        }
    }
}

fn dispatch<S: Storage>(payload: &[u8], permit: StaticPermit, outbox: &Rc<Outbox>, shard: &Rc<Shard<S>>) {
    shard.stats().request_count.set(shard.stats().request_count.get() + 1);
    let request = match parse_request(payload) {
        Ok(request) => request,
        Err(error) => {
            let body = Body::Status(error.status, error.message);
            return outbox.push(Outgoing::new(error.id, body, Some(permit)));
        }
    };
    let RequestView { id, timeout_ms, op, .. } = request;
    let timeout = match timeout_ms {
        0 => shard.limits().request_timeout_default,
        ms => Duration::from_millis(u64::from(ms)).min(shard.limits().request_timeout_max),
    };
    // Whole-node and whole-partition operations: answered by this shard, however long.
    let node_work = node_ops::node_operation(shard, op);
    if let Some(work) = node_work {
        let outbox = outbox.clone();
        outbox.running_count.set(outbox.running_count.get() + 1);
        glommio::spawn_local(async move {
            let body = work.await;
            outbox.running_count.set(outbox.running_count.get() - 1);
            outbox.push(Outgoing::new(id, body, Some(permit)));
        })
        .detach();
        return;
    }
    if shard.cluster().is_none() {
        let started = Instant::now();
        if let Some((reply, seq)) = try_fast(shard, &op) {
            let op = if seq > 0 { "put" } else { "get" };
            let mut outgoing = Outgoing::new(id, Body::Reply(reply), Some(permit));
            if seq > 0 {
                outgoing.after_log = Some(LogWait { seq, op, started, timeout });
            } else if let Body::Reply(reply) = &outgoing.body {
                shard.stats().requests.record(op, crate::metrics::status_name(reply), started.elapsed());
            }
            return outbox.push(outgoing);
        }
    }
    let command = match shard.cluster() {
        Some(cluster) => cluster_command(shard, cluster, &request, timeout),
        None => Command::from_op(&op).ok_or_else(|| match op {
            Op::Hello { protocol_version: 0, .. } => Body::Status(
                Status::UNSUPPORTED_VERSION,
                format!("protocol version 0; this node speaks {PROTOCOL_VERSION}"),
            ),
            Op::Hello { .. } => Body::Hello,
            Op::Stats => Body::Stats(shard.stats_json()),
            _ => Body::Status(Status::UNSUPPORTED, "this node is not part of a cluster".into()),
        }),
    };
    let command = match command {
        Ok(command) => command,
        Err(body) => return outbox.push(Outgoing::new(id, body, Some(permit))),
    };
    let started = Instant::now();
    let op = crate::metrics::op_name(&command);
    outbox.running_count.set(outbox.running_count.get() + 1);
    let outbox = outbox.clone();
    let shard = shard.clone();
    glommio::spawn_local(async move {
        let work = async { Some(shard.execute(command).await) };
        let expired = async {
            glommio::timer::sleep(timeout).await;
            None
        };
        let reply = futures_lite::future::or(work, expired).await.unwrap_or_else(|| {
            shard.stats().timeout_count.set(shard.stats().timeout_count.get() + 1);
            Reply::error(Status::TIMEOUT, format!("no reply within {} ms", timeout.as_millis()))
        });
        shard.stats().requests.record(op, crate::metrics::status_name(&reply), started.elapsed());
        outbox.running_count.set(outbox.running_count.get() - 1);
        outbox.push(Outgoing::new(id, Body::Reply(reply), Some(permit)));
    })
    .detach();
}

/// On a standalone node, a GET of this shard's keys that memory answers, or a PUT that the
/// log has room for, runs here from the request's own bytes, without a task, a timer or a
/// copy into a command. Returns the reply and, for a PUT, the sequence number its reply must
/// wait for. `None`: the general path runs it.
fn try_fast<S: Storage>(shard: &Shard<S>, op: &Op<'_>) -> Option<(LocalReply, u64)> {
    match *op {
        Op::Get { key, metadata_only, .. } if shard.owns(key) => {
            shard.store().try_get(key, metadata_only).map(|reply| (reply, 0))
        }
        Op::Put { key, value, ttl_ms } if shard.owns(key) => {
            match shard.store().try_put(key, value, ttl_ms)? {
                Ok(seq) => Some((Reply::Done, seq)),
                Err(reply) => Some((reply, 0)),
            }
        }
        _ => None,
    }
}

/// Waits until the log holds a fast-path write, within its request's deadline: `None` once
/// it does, else the error or timeout to answer. (One timer per wait, not per request: the
/// log acknowledges whole batches, so the writes queued behind this one are held by then.)
async fn wait_for_log<S: Storage>(shard: &Shard<S>, wait: &LogWait) -> Option<LocalReply> {
    let store = shard.store();
    if wait.seq <= store.wal().acked_seq() {
        return None;
    }
    let acked = async { Some(store.wait_acked(wait.seq).await) };
    let expired = async {
        glommio::timer::sleep(wait.timeout.saturating_sub(wait.started.elapsed())).await;
        None
    };
    match futures_lite::future::or(acked, expired).await {
        Some(Ok(())) => None,
        Some(Err(reply)) => Some(reply),
        None => {
            shard.stats().timeout_count.set(shard.stats().timeout_count.get() + 1);
            Some(Reply::error(Status::TIMEOUT, format!("no reply within {} ms", wait.timeout.as_millis())))
        }
    }
}

async fn write_replies<S: Storage, T: AsyncWrite + Unpin>(
    mut writer: futures_lite::io::WriteHalf<T>,
    outbox: Rc<Outbox>,
    inflight: Rc<Semaphore>,
    shard: Rc<Shard<S>>,
) {
    let mut builder = FlatBufferBuilder::with_capacity(4096);
    let mut out = Vec::with_capacity(OUTPUT_FLUSH_SIZE);
    loop {
        let listener = outbox.changed.listen();
        while out.len() < OUTPUT_FLUSH_SIZE {
            let Some(mut outgoing) = outbox.queue.borrow_mut().pop_front() else { break };
            let unlogged =
                outgoing.after_log.as_ref().is_some_and(|wait| wait.seq > shard.store().wal().acked_seq());
            if unlogged && !out.is_empty() {
                // Send what is ready before waiting for the log.
                outbox.queue.borrow_mut().push_front(outgoing);
                break;
            }
            if let Some(wait) = outgoing.after_log.take() {
                if let Some(reply) = wait_for_log(&shard, &wait).await {
                    outgoing.body = Body::Reply(reply);
                }
                if let Body::Reply(reply) = &outgoing.body {
                    let status = crate::metrics::status_name(reply);
                    shard.stats().requests.record(wait.op, status, wait.started.elapsed());
                }
            }
            let size_before = out.len();
            encode(&mut builder, &mut out, outgoing.id, &outgoing.body, shard.hello());
            if out.len() - size_before > LARGE_FRAME_SIZE {
                // The builder keeps its largest allocation; do not let an idle connection
                // hold a megabyte because it once read a large value.
                builder = FlatBufferBuilder::with_capacity(4096);
            }
            // Dropping `outgoing` releases its in-flight permit; its bytes now count in `out`.
        }
        if out.is_empty() {
            let finished = outbox.reader_done.get() && outbox.running_count.get() == 0;
            if finished {
                break;
            }
            listener.await;
            continue;
        }
        let requests = &shard.stats().requests;
        requests.bytes_out.set(requests.bytes_out.get() + out.len() as u64);
        if writer.write_all(&out).await.is_err() {
            // The client stopped reading (write timeout) or went away: stop admitting its
            // requests; the reader sees the closed semaphore and ends the connection.
            inflight.close();
            break;
        }
        out.clear();
        if out.capacity() > 4 * OUTPUT_FLUSH_SIZE {
            out = Vec::with_capacity(OUTPUT_FLUSH_SIZE);
        }
    }
    let _ = writer.flush().await;
    let _ = writer.close().await;
}
