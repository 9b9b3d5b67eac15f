//! One RESP client: reads what it sent, runs the commands of each batch concurrently (session
//! commands at once, in order), and writes the replies in order, as Redis does.
//!
//! Commands on one key must also take effect in the order sent (a pipelined `SET k v` then
//! `GET k` reads `v`). On a standalone node that holds by itself: a key's commands reach its
//! shard in order and apply there before their first await. In a cluster they take network
//! round trips of different lengths, so a batch runs in waves: a command that names an
//! argument an earlier command of the wave named waits for the wave to finish.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::commands::{dispatch, RespSettings, Session, Step};
use super::parser::{parse, ARG_SIZE_MAX};
use super::reply::{encode, Value};
use crate::shard::Shard;
use crate::storage::Storage;

/// Commands of one batch run together; more wait for the next batch.
const BATCH_COMMANDS_MAX: usize = 256;
const READ_SIZE: usize = 16 << 10;

thread_local! {
    static NEXT_CLIENT_ID: Cell<u64> = const { Cell::new(1) };
}

enum Slot {
    Ready(Value, u8),
    /// With the hashes of the command's arguments (its keys among them).
    Later(super::commands::Pending, u8, Vec<u64>),
}

fn argument_hashes(args: &[Vec<u8>]) -> Vec<u64> {
    args.iter().skip(1).map(|arg| schema::key_hash(arg)).collect()
}

/// Runs a batch's commands, in waves when `ordered` (see the module comment); the replies
/// in the order of the batch.
async fn run_batch(batch: Vec<Slot>, ordered: bool) -> Vec<(Value, u8)> {
    let mut replies: Vec<Option<(Value, u8)>> = Vec::with_capacity(batch.len());
    let mut wave: Vec<(usize, super::commands::Pending, u8)> = Vec::new();
    let mut named: std::collections::HashSet<u64> = std::collections::HashSet::new();
    async fn finish(
        wave: &mut Vec<(usize, super::commands::Pending, u8)>,
        replies: &mut [Option<(Value, u8)>],
    ) {
        let done = futures::future::join_all(
            wave.drain(..).map(|(index, pending, protocol)| async move { (index, pending.await, protocol) }),
        )
        .await;
        for (index, value, protocol) in done {
            replies[index] = Some((value, protocol));
        }
    }
    for (index, slot) in batch.into_iter().enumerate() {
        replies.push(None);
        match slot {
            Slot::Ready(value, protocol) => replies[index] = Some((value, protocol)),
            Slot::Later(pending, protocol, arguments) => {
                if ordered && arguments.iter().any(|hash| named.contains(hash)) {
                    finish(&mut wave, &mut replies).await;
                    named.clear();
                }
                named.extend(arguments);
                wave.push((index, pending, protocol));
            }
        }
    }
    finish(&mut wave, &mut replies).await;
    replies.into_iter().map(|reply| reply.unwrap_or((Value::Null, 2))).collect()
}

/// Serves one client on `stream` (a TCP connection with its options set by the accept loop;
/// the benchmarks pass an in-memory stream) until it closes.
pub async fn serve<S: Storage, T: AsyncRead + AsyncWrite + Unpin>(
    mut stream: T,
    shard: Rc<Shard<S>>,
    settings: Rc<RespSettings>,
) {
    // Client ids are unique per node: the shard index in the low bits.
    let id = NEXT_CLIENT_ID.with(|next| {
        let id = next.get();
        next.set(id + 1);
        id * 256 + shard.index() as u64
    });
    let mut session = Session::new(id, &settings);
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_SIZE);
    let mut out = Vec::new();
    let idle = shard.limits().idle_timeout;
    loop {
        // Parse every whole command buffered (up to the batch bound).
        let mut batch = Vec::new();
        let mut close_after = false;
        let mut consumed = 0;
        while batch.len() < BATCH_COMMANDS_MAX {
            match parse(&buffer[consumed..]) {
                Ok(Some(parsed)) => {
                    consumed += parsed.consumed;
                    if parsed.args.is_empty() {
                        continue; // an empty inline line
                    }
                    let protocol = session.protocol;
                    let arguments = argument_hashes(&parsed.args);
                    match dispatch(&shard, &settings, &mut session, parsed.args) {
                        Step::Reply(value) => batch.push(Slot::Ready(value, session.protocol)),
                        Step::Later(pending) => batch.push(Slot::Later(pending, protocol, arguments)),
                        Step::Close(value) => {
                            batch.push(Slot::Ready(value, protocol));
                            close_after = true;
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    batch.push(Slot::Ready(Value::error(format!("ERR {error}")), session.protocol));
                    close_after = true;
                    break;
                }
            }
        }
        buffer.drain(..consumed);
        if !batch.is_empty() {
            let values = run_batch(batch, shard.cluster().is_some()).await;
            for (value, protocol) in &values {
                encode(value, *protocol, &mut out);
            }
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            if out.capacity() > 4 * READ_SIZE {
                out = Vec::new();
            }
        }
        if close_after {
            let _ = stream.close().await;
            return;
        }
        if consumed > 0 && parse(&buffer).ok().flatten().is_some() {
            continue; // more whole commands already buffered
        }
        // Read more. The parser refuses oversized requests before they are buffered whole,
        // so the buffer stays under one maximal command.
        let start = buffer.len();
        let room = READ_SIZE.max(buffer.capacity() - start).min(ARG_SIZE_MAX * 4);
        buffer.resize(start + room, 0);
        let read = async { Some(stream.read(&mut buffer[start..]).await) };
        let expired = async {
            glommio::timer::sleep(idle).await;
            None
        };
        match futures_lite::future::or(read, expired).await {
            Some(Ok(count)) if count > 0 => buffer.truncate(start + count),
            _ => return, // closed, reset or idle
        }
        if buffer.capacity() > 8 * READ_SIZE && buffer.len() < READ_SIZE {
            buffer.shrink_to(READ_SIZE);
        }
    }
}

/// Accepts RESP clients on `listener` forever.
pub async fn accept_loop<S: Storage>(
    listener: glommio::net::TcpListener,
    shard: Rc<Shard<S>>,
    settings: Rc<RespSettings>,
) {
    loop {
        let Ok(stream) = listener.accept().await else {
            // Typically EMFILE: back off instead of spinning on a full descriptor table.
            glommio::timer::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // RESP clients count against the same cap as native ones.
        if shard.stats().connection_count.get() >= shard.connections_max() {
            shard.stats().refused_connection_count.set(shard.stats().refused_connection_count.get() + 1);
            continue;
        }
        shard.stats().connection_count.set(shard.stats().connection_count.get() + 1);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(shard.limits().write_timeout));
        let shard = shard.clone();
        let settings = settings.clone();
        glommio::spawn_local(async move {
            serve(stream, shard.clone(), settings).await;
            shard.stats().connection_count.set(shard.stats().connection_count.get() - 1);
        })
        .detach();
    }
}
