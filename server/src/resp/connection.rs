//! One RESP client: reads what it sent, runs the commands of each batch concurrently (session
//! commands at once, in order), and writes the replies in order, as Redis does.
//!
//! Commands on one key must also take effect in the order sent (a pipelined `SET k v` then
//! `GET k` reads `v`). On a standalone node that holds by itself: a key's commands reach its
//! shard in order and apply there before their first await. In a cluster they take network
//! round trips of different lengths, so a batch runs in waves: a command that names a key an
//! earlier command of the wave named waits for the wave to finish. Only keys count
//! (`commands::key_positions`): values do not order anything, and redis-benchmark's SETs all
//! carry the same value, which ran a 16-deep pipeline one command a wave when every argument
//! counted.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::commands::{dispatch, RespSettings, Session, Step};
use super::parser::{parse, parse_array, Parsed, ARG_SIZE_MAX};
use super::reply::{encode, encode_bulk, Value};
use super::store_ops::{check_key, check_value, error_value};
use crate::command::Reply;
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
    /// With the hashes of the keys the command names.
    Later(super::commands::Pending, u8, Vec<u64>),
}

fn key_hashes(args: &[Vec<u8>]) -> Vec<u64> {
    super::commands::key_positions(args)
        .filter_map(|at| args.get(at))
        .map(|key| schema::key_hash(key))
        .collect()
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

/// Answers a plain `GET key` or `SET key value` of a key this shard holds, on a standalone
/// node, at once and without a task: a GET when memory (memtables, block cache) knows the
/// answer, a SET when the log has room. A SET's `+OK` goes into `out` now, its offset into
/// `acks` and its sequence number into `written_seq`: the batch's replies are sent once the
/// log has acknowledged them. `false`: the general path must run the command (it also
/// answers every error).
fn try_fast<S: Storage>(
    shard: &Shard<S>,
    session: &Session,
    args: &[&[u8]],
    out: &mut Vec<u8>,
    acks: &mut Vec<usize>,
    written_seq: &mut u64,
) -> bool {
    match *args {
        [name, key] if name.eq_ignore_ascii_case(b"GET") => {
            if check_key(key).is_err() || !shard.owns(key) {
                return false;
            }
            match shard.store().try_get(key, false) {
                Some(Reply::Found(version)) => encode_bulk(version.value.as_deref().unwrap_or_default(), out),
                Some(Reply::NotFound) => encode(&Value::Null, session.protocol, out),
                _ => return false,
            }
            true
        }
        [name, key, value] if name.eq_ignore_ascii_case(b"SET") => {
            if check_key(key).is_err() || check_value(value).is_err() || !shard.owns(key) {
                return false;
            }
            match shard.store().try_put(key, value, 0) {
                Some(Ok(seq)) => {
                    *written_seq = seq;
                    acks.push(out.len());
                    out.extend_from_slice(ACK);
                    true
                }
                _ => false,
            }
        }
        _ => false,
    }
}

const ACK: &[u8] = b"+OK\r\n";

/// Replaces the `+OK` replies at `acks` in `out` by `error` (the log failed them).
fn fail_acks(out: &mut Vec<u8>, acks: &[usize], error: &Value, protocol: u8) {
    let mut encoded = Vec::new();
    encode(error, protocol, &mut encoded);
    let mut rebuilt = Vec::with_capacity(out.len() + acks.len() * encoded.len());
    let mut from = 0;
    for &at in acks {
        rebuilt.extend_from_slice(&out[from..at]);
        rebuilt.extend_from_slice(&encoded);
        from = at + ACK.len();
    }
    rebuilt.extend_from_slice(&out[from..]);
    *out = rebuilt;
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
    // Received bytes are `buffer[..end]`; the rest of the buffer is room to read into
    // (initialized once, not per read).
    let mut buffer: Vec<u8> = vec![0; READ_SIZE];
    let mut end = 0;
    let mut out = Vec::new();
    let mut acks = Vec::new();
    let idle = shard.limits().idle_timeout;
    let standalone = shard.cluster().is_none();
    loop {
        // Parse every whole command buffered (up to the batch bound). Plain GETs and SETs are
        // answered at once while no command before them in the batch waits for the general
        // path (which keeps each key's commands in the order sent).
        let mut batch = Vec::new();
        let mut answered = 0;
        let mut written_seq = 0;
        let mut close_after = false;
        let mut consumed = 0;
        while batch.len() + answered < BATCH_COMMANDS_MAX {
            let rest = &buffer[consumed..end];
            let parsed = match rest.first() {
                None => break,
                Some(b'*') => match parse_array(rest) {
                    Ok(Some((args, size))) => {
                        let fast = standalone && batch.is_empty() && session.authenticated;
                        if fast && try_fast(&shard, &session, &args, &mut out, &mut acks, &mut written_seq) {
                            consumed += size;
                            answered += 1;
                            continue;
                        }
                        Ok(Some(Parsed {
                            args: args.iter().map(|arg| arg.to_vec()).collect(),
                            consumed: size,
                        }))
                    }
                    Ok(None) => Ok(None),
                    Err(error) => Err(error),
                },
                Some(_) => parse(rest),
            };
            match parsed {
                Ok(Some(parsed)) => {
                    consumed += parsed.consumed;
                    if parsed.args.is_empty() {
                        continue; // an empty inline line
                    }
                    let protocol = session.protocol;
                    let arguments = if standalone { Vec::new() } else { key_hashes(&parsed.args) };
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
        let full = batch.len() + answered >= BATCH_COMMANDS_MAX;
        buffer.copy_within(consumed..end, 0);
        end -= consumed;
        if written_seq > 0 {
            if let Err(reply) = shard.store().wait_acked(written_seq).await {
                let error = match reply {
                    Reply::Error { status, message } => error_value(status, &message),
                    other => Value::error(format!("ERR unexpected reply {other:?}")),
                };
                fail_acks(&mut out, &acks, &error, session.protocol);
            }
        }
        acks.clear();
        if !batch.is_empty() {
            let values = run_batch(batch, !standalone).await;
            for (value, protocol) in &values {
                encode(value, *protocol, &mut out);
            }
        }
        if !out.is_empty() {
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
        if full {
            continue; // more whole commands may be buffered already
        }
        // Read more. The parser refuses oversized requests before they are buffered whole,
        // so the buffer stays under one maximal command.
        if end == buffer.len() {
            buffer.resize((2 * buffer.len()).min(ARG_SIZE_MAX * 4), 0);
        }
        let read = async { Some(stream.read(&mut buffer[end..]).await) };
        let expired = async {
            glommio::timer::sleep(idle).await;
            None
        };
        match futures_lite::future::or(read, expired).await {
            Some(Ok(count)) if count > 0 => end += count,
            _ => return, // closed, reset or idle
        }
        if buffer.len() > 8 * READ_SIZE && end < READ_SIZE {
            buffer.truncate(READ_SIZE);
            buffer.shrink_to_fit();
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
