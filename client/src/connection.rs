//! One pipelined connection: many requests in flight, replies matched by request id in
//! whatever order they arrive.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flatbuffers::FlatBufferBuilder;
use schema::{encode_request, parse_response, split_frame, RequestView, ResponseView, FRAME_HEADER_SIZE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::Error;

thread_local! {
    /// One encoder per thread, reused: a builder allocation per request showed in profiles.
    static BUILDER: std::cell::RefCell<FlatBufferBuilder<'static>> =
        std::cell::RefCell::new(FlatBufferBuilder::with_capacity(1024));
}

/// Frames queued for the writer task of one connection.
const SEND_QUEUE_CAPACITY: usize = 4096;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<ResponseView, Error>>>>>;

/// One pipelined connection to one node's port: many requests in flight, each matched to its
/// reply by id.
#[derive(Debug)]
pub struct Connection {
    address: SocketAddr,
    frames: mpsc::Sender<Vec<u8>>,
    waiters: Waiters,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
}

fn lock(
    waiters: &Waiters,
) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Result<ResponseView, Error>>>> {
    // A panic while holding this lock cannot leave the map inconsistent (single inserts and
    // removes), so a poisoned lock is still usable.
    waiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Connection {
    /// Connects to `address` within `timeout`.
    pub async fn connect(address: SocketAddr, timeout: Duration) -> Result<Connection, Error> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(|error| Error::Io(format!("connecting to {address}: {error}")))?;
        stream.set_nodelay(true).map_err(|error| Error::Io(error.to_string()))?;
        let (reader, writer) = stream.into_split();
        let (frames, queue) = mpsc::channel(SEND_QUEUE_CAPACITY);
        let waiters: Waiters = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(write_frames(writer, queue, closed.clone()));
        tokio::spawn(read_frames(reader, waiters.clone(), closed.clone()));
        Ok(Connection { address, frames, waiters, next_id: AtomicU64::new(1), closed })
    }

    /// The node's address this connection reaches.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Whether the connection has failed or been closed (it is then replaced).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Sends `request` (its id is replaced by a fresh one) and waits for the reply.
    pub async fn call(&self, request: &RequestView<'_>, timeout: Duration) -> Result<ResponseView, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        BUILDER.with(|builder| {
            encode_request(&mut builder.borrow_mut(), &mut frame, &RequestView { id, ..*request });
        });
        if self.is_closed() {
            return Err(Error::ConnectionClosed);
        }
        let (sender, receiver) = oneshot::channel();
        lock(&self.waiters).insert(id, sender);
        let exchange = async {
            self.frames.send(frame).await.map_err(|_| Error::ConnectionClosed)?;
            receiver.await.map_err(|_| Error::ConnectionClosed)?
        };
        let result = tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(Error::Timeout));
        if result.is_err() {
            lock(&self.waiters).remove(&id);
        }
        result
    }
}

async fn write_frames(
    mut writer: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Vec<u8>>,
    closed: Arc<AtomicBool>,
) {
    let mut batch = Vec::new();
    while let Some(frame) = queue.recv().await {
        batch.extend_from_slice(&frame);
        // Gather what else is queued, so a pipeline costs one write, not one per request.
        while batch.len() < (256 << 10) {
            match queue.try_recv() {
                Ok(frame) => batch.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        if writer.write_all(&batch).await.is_err() {
            break;
        }
        batch.clear();
    }
    closed.store(true, Ordering::Relaxed);
}

async fn read_frames(mut reader: OwnedReadHalf, waiters: Waiters, closed: Arc<AtomicBool>) {
    let mut buffer: Vec<u8> = Vec::with_capacity(64 << 10);
    let error = loop {
        // Serve every whole frame, then read more.
        let mut consumed = 0;
        loop {
            match split_frame(&buffer[consumed..]) {
                Ok(Some(payload)) => {
                    let size = FRAME_HEADER_SIZE + payload.len();
                    let response = match parse_response(payload) {
                        Ok(response) => response,
                        Err(error) => return fail_all(&closed, &waiters, Error::Protocol(error)),
                    };
                    // Id 0 is never a request's (ids start at 1): the node could not read a
                    // frame, so it cannot tell which request failed. Fail them all.
                    if response.id == 0 {
                        let error = Error::Protocol(format!(
                            "the node could not read a request ({:?}: {})",
                            response.status, response.message
                        ));
                        return fail_all(&closed, &waiters, error);
                    }
                    if let Some(waiter) = lock(&waiters).remove(&response.id) {
                        let _ = waiter.send(Ok(response));
                    }
                    consumed += size;
                }
                Ok(None) => break,
                Err(error) => return fail_all(&closed, &waiters, Error::Protocol(error.to_string())),
            }
        }
        buffer.drain(..consumed);
        if buffer.capacity() - buffer.len() < 16 << 10 {
            buffer.reserve(64 << 10);
        }
        // Into the spare capacity, not zeroed first (zeroing 64 KiB per read showed in
        // profiles).
        match reader.read_buf(&mut buffer).await {
            Ok(0) => break Error::ConnectionClosed,
            Ok(_) => {}
            Err(error) => break Error::Io(error.to_string()),
        }
    };
    fail_all(&closed, &waiters, error);
}

/// Marks the connection dead and fails every request still waiting on it.
fn fail_all(closed: &AtomicBool, waiters: &Waiters, error: Error) {
    closed.store(true, Ordering::Relaxed);
    for (_, waiter) in lock(waiters).drain() {
        let _ = waiter.send(Err(error.clone()));
    }
}
