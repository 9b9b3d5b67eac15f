//! Connections from one shard to other nodes' shards: one TCP connection per peer address,
//! requests pipelined on it, replies matched by id.
//!
//! A slow or dead peer stalls only the requests sent to it: every call has a deadline, each
//! connection admits at most `INFLIGHT_MAX` requests (beyond that a call fails at once as
//! overloaded), and queued frames are written in batches by the connection's own task. A
//! connection that fails fails every request waiting on it; the next call connects afresh.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use flatbuffers::FlatBufferBuilder;
use futures::channel::oneshot;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use schema::{
    encode_request, parse_response, split_peer_frame, Consistency, Op, RequestView, ResponseView,
    FRAME_HEADER_SIZE,
};

use crate::event::Event;

/// Requests one connection may have outstanding.
pub const INFLIGHT_MAX: usize = 4096;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Encoded bytes a connection may hold unwritten; beyond, calls fail at once as overloaded.
const OUTGOING_SIZE_MAX: usize = 64 << 20;
/// Encoded bytes the writer sends per write call, at most (plus one frame).
const WRITE_BATCH_SIZE: usize = 256 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerError {
    /// Could not connect, or the connection broke.
    Unreachable(String),
    /// No reply before the deadline (the request may have been served).
    Timeout,
    /// Too many requests outstanding to this peer.
    Overloaded,
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::Unreachable(detail) => write!(f, "unreachable: {detail}"),
            PeerError::Timeout => write!(f, "no reply in time"),
            PeerError::Overloaded => write!(f, "too many requests outstanding"),
        }
    }
}

type Waiter = oneshot::Sender<Result<ResponseView, PeerError>>;

struct Connection {
    outgoing: RefCell<Vec<u8>>,
    wake_writer: Event,
    waiting: RefCell<HashMap<u64, Waiter>>,
    next_id: Cell<u64>,
    broken: Cell<bool>,
}

impl Connection {
    fn fail(&self, error: &str) {
        self.broken.set(true);
        self.wake_writer.notify_all();
        for (_, waiter) in self.waiting.borrow_mut().drain() {
            let _ = waiter.send(Err(PeerError::Unreachable(error.to_string())));
        }
    }
}

/// This shard's connection to one peer address.
pub struct PeerLink {
    address: SocketAddr,
    /// This node's address, bound before connecting (unless unspecified).
    local_ip: Option<std::net::IpAddr>,
    connection: RefCell<Option<Rc<Connection>>>,
    /// Held while connecting, so that concurrent callers share one attempt.
    connecting: glommio::sync::Semaphore,
}

/// A request to send to a peer.
#[derive(Debug, Clone, Copy)]
pub struct PeerRequest<'a> {
    pub op: Op<'a>,
    pub consistency: Consistency,
    pub context: &'a [u8],
    pub timeout: Duration,
}

impl PeerLink {
    pub fn new(address: SocketAddr, local_ip: Option<std::net::IpAddr>) -> PeerLink {
        PeerLink {
            address,
            local_ip,
            connection: RefCell::new(None),
            connecting: glommio::sync::Semaphore::new(1),
        }
    }

    async fn connection(&self, timeout: Duration) -> Result<Rc<Connection>, PeerError> {
        if let Some(connection) = self.live_connection() {
            return Ok(connection);
        }
        let _permit =
            self.connecting.acquire_permit(1).await.map_err(|_| PeerError::Unreachable("closed".into()))?;
        if let Some(connection) = self.live_connection() {
            return Ok(connection);
        }
        // Connecting binds to this node's own address first, so that peers (and firewall
        // rules) see connections come from it; a blocking connect with a timeout runs on
        // glommio's blocking pool, never on the shard's thread.
        let (address, local_ip) = (self.address, self.local_ip);
        let connected = glommio::executor()
            .spawn_blocking(move || -> std::io::Result<std::os::fd::RawFd> {
                let socket =
                    socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)?;
                if let Some(ip) = local_ip {
                    socket.bind(&SocketAddr::new(ip, 0).into())?;
                }
                socket.connect_timeout(&address.into(), timeout)?;
                Ok(std::os::fd::IntoRawFd::into_raw_fd(socket))
            })
            .await;
        let stream = match connected {
            // SAFETY: a connected TCP socket whose only owner was the closure above.
            Ok(fd) => unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => return Err(PeerError::Timeout),
            Err(error) => return Err(PeerError::Unreachable(format!("{}: {error}", self.address))),
        };
        let _ = stream.set_nodelay(true);
        // A peer that takes nothing for this long (gone, or cut off) breaks the connection,
        // failing what waits on it; the next call connects afresh.
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let connection = Rc::new(Connection {
            outgoing: RefCell::new(Vec::new()),
            wake_writer: Event::default(),
            waiting: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            broken: Cell::new(false),
        });
        let (reader, writer) = futures_lite::io::split(stream);
        glommio::spawn_local(write_frames(writer, connection.clone())).detach();
        glommio::spawn_local(read_replies(reader, connection.clone())).detach();
        *self.connection.borrow_mut() = Some(connection.clone());
        Ok(connection)
    }

    fn live_connection(&self) -> Option<Rc<Connection>> {
        self.connection.borrow().as_ref().filter(|c| !c.broken.get()).cloned()
    }

    /// Sends one request and waits for its reply, at most `request.timeout` in all.
    pub async fn call(&self, request: PeerRequest<'_>) -> Result<ResponseView, PeerError> {
        let deadline = glommio::timer::sleep(request.timeout);
        futures::pin_mut!(deadline);
        let connection = {
            let connect = async { Some(self.connection(request.timeout).await) };
            match futures_lite::future::or(connect, async {
                (&mut deadline).await;
                None
            })
            .await
            {
                Some(result) => result?,
                None => return Err(PeerError::Timeout),
            }
        };
        // Bounded: requests outstanding, and bytes not yet written (a peer that stopped
        // reading must not make this node buffer without end).
        if connection.waiting.borrow().len() >= INFLIGHT_MAX
            || connection.outgoing.borrow().len() >= OUTGOING_SIZE_MAX
        {
            return Err(PeerError::Overloaded);
        }
        let id = connection.next_id.get();
        connection.next_id.set(id + 1);
        let view = RequestView {
            id,
            timeout_ms: request.timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            consistency: request.consistency,
            context: request.context,
            write_id: None,
            op: request.op,
        };
        BUILDER.with(|builder| {
            encode_request(&mut builder.borrow_mut(), &mut connection.outgoing.borrow_mut(), &view);
        });
        let (sender, receiver) = oneshot::channel();
        connection.waiting.borrow_mut().insert(id, sender);
        connection.wake_writer.notify_all();
        // Past the deadline, or if the caller gives up on this call, the request is forgotten:
        // a late reply is dropped, and it no longer counts against the link's bound.
        let _forget = Forget { connection: &connection, id };
        let reply = async { Some(receiver.await) };
        match futures_lite::future::or(reply, async {
            (&mut deadline).await;
            None
        })
        .await
        {
            Some(Ok(reply)) => reply,
            Some(Err(_)) => Err(PeerError::Unreachable("connection closed".into())),
            None => Err(PeerError::Timeout),
        }
    }
}

/// Removes a call's waiting entry when the call ends, however it ends (a no-op once the
/// reply has taken it).
struct Forget<'a> {
    connection: &'a Connection,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.connection.waiting.borrow_mut().remove(&self.id);
    }
}

async fn write_frames(mut writer: futures_lite::io::WriteHalf<TcpStream>, connection: Rc<Connection>) {
    let mut batch = Vec::new();
    loop {
        let listener = connection.wake_writer.listen();
        if connection.broken.get() {
            break;
        }
        if connection.outgoing.borrow().is_empty() {
            listener.await;
            continue;
        }
        std::mem::swap(&mut batch, &mut connection.outgoing.borrow_mut());
        for chunk in batch.chunks(WRITE_BATCH_SIZE) {
            if let Err(error) = writer.write_all(chunk).await {
                connection.fail(&format!("writing: {error}"));
                return;
            }
        }
        batch.clear();
        if batch.capacity() > 4 * WRITE_BATCH_SIZE {
            batch = Vec::new();
        }
    }
    let _ = writer.close().await;
}

async fn read_replies(mut reader: futures_lite::io::ReadHalf<TcpStream>, connection: Rc<Connection>) {
    let mut buffer = vec![0u8; 64 << 10];
    let mut end = 0;
    loop {
        let mut start = 0;
        loop {
            let payload = match split_peer_frame(&buffer[start..end]) {
                Ok(Some(payload)) => payload,
                Ok(None) => break,
                Err(error) => return connection.fail(&error.to_string()),
            };
            let size = FRAME_HEADER_SIZE + payload.len();
            match parse_response(payload) {
                Ok(response) => {
                    if let Some(waiter) = connection.waiting.borrow_mut().remove(&response.id) {
                        let _ = waiter.send(Ok(response));
                    }
                }
                Err(error) => return connection.fail(&error),
            }
            start += size;
        }
        buffer.copy_within(start..end, 0);
        end -= start;
        if end == buffer.len() {
            let needed = match buffer.get(..FRAME_HEADER_SIZE) {
                Some(h) => FRAME_HEADER_SIZE + u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize,
                None => FRAME_HEADER_SIZE,
            };
            buffer.resize(needed.max(2 * buffer.len()), 0);
        }
        match reader.read(&mut buffer[end..]).await {
            Ok(0) => return connection.fail("closed by the peer"),
            Ok(count) => end += count,
            Err(error) => return connection.fail(&format!("reading: {error}")),
        }
        if connection.broken.get() {
            return;
        }
    }
}

thread_local! {
    /// One encoder per thread for the shapes without a hand-written encoder (Paxos, gossip,
    /// ring changes), reused rather than allocated per call.
    static BUILDER: RefCell<FlatBufferBuilder<'static>> = RefCell::new(FlatBufferBuilder::with_capacity(1024));
}

/// A shard's links, one per peer address, made on first use.
pub struct PeerPool {
    local_ip: Option<std::net::IpAddr>,
    links: RefCell<HashMap<SocketAddr, Rc<PeerLink>>>,
}

impl PeerPool {
    /// `local_ip`: the address this node listens on (bound before connecting).
    pub fn new(local_ip: std::net::IpAddr) -> PeerPool {
        let local_ip = (!local_ip.is_unspecified()).then_some(local_ip);
        PeerPool { local_ip, links: RefCell::new(HashMap::new()) }
    }

    pub fn link(&self, address: SocketAddr) -> Rc<PeerLink> {
        let local_ip = self.local_ip;
        self.links
            .borrow_mut()
            .entry(address)
            .or_insert_with(|| Rc::new(PeerLink::new(address, local_ip)))
            .clone()
    }
}
