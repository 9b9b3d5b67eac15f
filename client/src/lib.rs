//! The kv client for async Rust (tokio): handshake, shard-aware routing, a pool of
//! pipelined connections per shard, deadlines and typed errors.
//!
//! ```no_run
//! # async fn demo() -> Result<(), client::Error> {
//! let client = client::Client::connect("127.0.0.1:7400", client::Options::default()).await?;
//! client.put(b"greeting", b"hello").await?;
//! assert_eq!(client.get(b"greeting").await?.map(|v| v.value), Some(b"hello".to_vec()));
//! # Ok(()) }
//! ```
//!
//! The README's section "The Rust client" has a complete example.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod connection;

/// The README's code blocks, compiled (and the Rust one type-checked) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use connection::Connection;
pub use schema::peer::{StreamProgress, TopologyData, TopologyNode};
pub use schema::wire::{MembershipAction, NodeStatus};
use schema::{shard_of, Op, RequestView, ResponseView, SiblingView, PROTOCOL_VERSION};
pub use schema::{Consistency, HelloInfo, Status, KEY_SIZE_MAX, VALUE_SIZE_MAX};
use tokio::sync::Mutex;

/// Everything that can go wrong, one variant per cause a caller may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The key is empty (keys are 1..=256 bytes). Nothing was sent or written.
    KeyEmpty,
    /// The key is longer than `size_max` bytes. Nothing was written.
    KeyTooLarge {
        /// The key's size (0 when the server said so without it).
        size: usize,
        /// The limit, 256.
        size_max: usize,
    },
    /// The value is larger than `size_max` bytes. Nothing was written.
    ValueTooLarge {
        /// The value's size (0 when the server said so without it).
        size: usize,
        /// The limit, 1 MiB.
        size_max: usize,
    },
    /// The server refused the request as malformed.
    BadRequest(String),
    /// The server sheds load; retry later.
    Overloaded(String),
    /// The server cannot serve the request now (shutting down, storage stopped).
    Unavailable(String),
    /// No reply within the deadline; a write may or may not have taken effect.
    Timeout,
    /// The node's disk is full: the write was refused (not applied). Reads still work.
    NoSpace(String),
    /// The operation is not offered here (a cluster operation on a standalone node).
    Unsupported(String),
    /// A write with a causal context was refused, nothing written: it would leave the key
    /// with more siblings (or sibling bytes) than the cluster accepts. Read the key with
    /// [`Client::get_versions`] and write with its context to replace the siblings.
    SiblingsFull(String),
    /// The server failed; a write may or may not have taken effect.
    Internal(String),
    /// A status this client does not know.
    Server {
        /// The status's number (schema/PROTOCOL.md lists them).
        status: u16,
        /// The server's detail.
        message: String,
    },
    /// The connection failed (connecting, reading or writing); a write may or may not have
    /// taken effect.
    Io(String),
    /// The node closed the connection with the request outstanding; a write may or may not
    /// have taken effect.
    ConnectionClosed,
    /// The node answered something this client cannot read (or a frame it could not
    /// attribute to a request).
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::KeyEmpty => write!(f, "key is empty"),
            Error::KeyTooLarge { size, size_max } => {
                write!(f, "key of {size} bytes exceeds the limit of {size_max} bytes")
            }
            Error::ValueTooLarge { size, size_max } => {
                write!(f, "value of {size} bytes exceeds the limit of {size_max} bytes")
            }
            Error::BadRequest(message) => write!(f, "bad request: {message}"),
            Error::Overloaded(message) => write!(f, "server overloaded: {message}"),
            Error::Unavailable(message) => write!(f, "unavailable: {message}"),
            Error::Timeout => write!(f, "timed out"),
            Error::NoSpace(message) => write!(f, "no space: {message}"),
            Error::Unsupported(message) => write!(f, "unsupported: {message}"),
            Error::SiblingsFull(message) => write!(f, "too many siblings: {message}"),
            Error::Internal(message) => write!(f, "server error: {message}"),
            Error::Server { status, message } => write!(f, "server status {status}: {message}"),
            Error::Io(message) => write!(f, "i/o error: {message}"),
            Error::ConnectionClosed => write!(f, "connection closed"),
            Error::Protocol(message) => write!(f, "protocol error: {message}"),
        }
    }
}

impl std::error::Error for Error {}

/// A stored value with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// The value's bytes (empty from [`Client::get_metadata`]).
    pub value: Vec<u8>,
    /// Microseconds since the Unix epoch, from the writer's hybrid logical clock.
    pub timestamp_us: u64,
    /// Time left before the value expires; `None` if it never does.
    pub ttl_left: Option<Duration>,
}

impl From<SiblingView> for Value {
    fn from(sibling: SiblingView) -> Value {
        Value {
            value: sibling.value,
            timestamp_us: sibling.timestamp_us,
            ttl_left: (sibling.ttl_left_ms > 0).then(|| Duration::from_millis(sibling.ttl_left_ms)),
        }
    }
}

/// Every version of a key a cluster holds, and the causal context to write it back with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Versioned {
    /// Concurrent values (siblings); empty if the key is absent or deleted.
    pub siblings: Vec<Value>,
    /// Opaque; pass it to [`Client::put_with_context`] so that the write supersedes exactly
    /// these siblings. It never covers a sibling that is not in `siblings`.
    pub context: Vec<u8>,
    /// Siblings the cluster holds beyond `siblings` (only from [`Client::get_versions_page`];
    /// [`Client::get_versions`] reads them all).
    pub omitted: u32,
}

impl Versioned {
    /// The default resolver: the sibling written last (by timestamp). Applications that
    /// must not lose concurrent writes merge the siblings themselves instead.
    pub fn latest(&self) -> Option<&Value> {
        self.siblings.iter().max_by_key(|sibling| sibling.timestamp_us)
    }
}

/// The outcome of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The expectation held and the new value is stored.
    Swapped,
    /// The expectation did not hold; the current value, if the key exists.
    Failed {
        /// The key's current value (the newest, in a cluster), or `None` if it is absent.
        current: Option<Value>,
    },
}

/// How a [`Client`] talks to the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Deadline of each request, also sent to the server.
    pub timeout: Duration,
    /// Connections per shard.
    pub pool_size: usize,
    /// Route each key to its shard's own port (no cross-core hop on the server).
    pub shard_aware: bool,
    /// Replicas that must answer each read and write in a cluster (`ONE`, `QUORUM`, `ALL`;
    /// `SERIAL` makes every request linearizable through the key's Paxos).
    pub consistency: Consistency,
    /// In a cluster: learn the ring and send each request to a replica of its key, on the
    /// shard that owns it (else everything goes to the node connected to, which forwards).
    pub cluster_aware: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            timeout: Duration::from_secs(5),
            pool_size: 1,
            shard_aware: true,
            consistency: Consistency::QUORUM,
            cluster_aware: true,
        }
    }
}

/// A pool slot: a connection, replaced when it dies.
#[derive(Debug)]
struct Slot {
    address: SocketAddr,
    connection: Mutex<Option<Arc<Connection>>>,
}

impl Slot {
    async fn get(&self, timeout: Duration) -> Result<Arc<Connection>, Error> {
        let mut connection = self.connection.lock().await;
        if let Some(live) = connection.as_ref().filter(|c| !c.is_closed()) {
            return Ok(live.clone());
        }
        let fresh = Arc::new(Connection::connect(self.address, timeout).await?);
        *connection = Some(fresh.clone());
        Ok(fresh)
    }
}

/// A client of one node. Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hello: HelloInfo,
    options: Options,
    /// `routes[shard]`: the pool for that shard (all the same pool if not shard-aware).
    routes: Vec<Vec<Slot>>,
    next: AtomicUsize,
    /// The ring as last learned, when the node is in a cluster and `cluster_aware` is set.
    cluster: std::sync::RwLock<Option<Arc<ClusterRoutes>>>,
}

/// How often a cluster-aware client asks for the topology again.
const TOPOLOGY_REFRESH: Duration = Duration::from_secs(2);

/// Where a cluster's keys live, and a connection slot per node shard.
#[derive(Debug)]
struct ClusterRoutes {
    topology: schema::peer::TopologyData,
    learned: std::time::Instant,
    slots: std::sync::Mutex<std::collections::HashMap<SocketAddr, Arc<Slot>>>,
}

impl ClusterRoutes {
    /// The addresses of the shards owning `key` on its replicas, up ones first.
    fn replica_addresses(&self, key: &[u8]) -> Vec<SocketAddr> {
        let mut replicas: Vec<&schema::peer::TopologyNode> =
            self.topology.replicas(key).into_iter().filter_map(|i| self.topology.nodes.get(i)).collect();
        replicas.sort_by_key(|node| !node.up); // stable: ring order among the up ones
        replicas
            .into_iter()
            .filter_map(|node| {
                let ip = node.address.parse::<SocketAddr>().ok()?.ip();
                let port = *node.shard_ports.get(shard_of(key, node.shard_ports.len().max(1)))?;
                Some(SocketAddr::new(ip, port))
            })
            .collect()
    }

    fn slot(&self, address: SocketAddr) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        slots
            .entry(address)
            .or_insert_with(|| Arc::new(Slot { address, connection: Mutex::new(None) }))
            .clone()
    }
}

fn check_key(key: &[u8]) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::KeyEmpty);
    }
    if key.len() > KEY_SIZE_MAX {
        return Err(Error::KeyTooLarge { size: key.len(), size_max: KEY_SIZE_MAX });
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), Error> {
    if value.len() > VALUE_SIZE_MAX {
        return Err(Error::ValueTooLarge { size: value.len(), size_max: VALUE_SIZE_MAX });
    }
    Ok(())
}

/// Pages of siblings one read follows at most: every page holds at least one sibling, and a
/// key holds at most this many.
const SIBLING_PAGE_COUNT_MAX: usize = schema::peer::STORED_SIBLING_COUNT_MAX;

/// Maps a non-OK status to its error.
fn status_error(response: ResponseView) -> Error {
    let message = response.message;
    match response.status {
        Status::KEY_EMPTY => Error::KeyEmpty,
        Status::KEY_TOO_LARGE => Error::KeyTooLarge { size: 0, size_max: KEY_SIZE_MAX },
        Status::VALUE_TOO_LARGE => Error::ValueTooLarge { size: 0, size_max: VALUE_SIZE_MAX },
        Status::BAD_REQUEST | Status::FRAME_TOO_LARGE | Status::UNSUPPORTED_VERSION => {
            Error::BadRequest(message)
        }
        Status::OVERLOADED => Error::Overloaded(message),
        Status::UNAVAILABLE => Error::Unavailable(message),
        Status::TIMEOUT => Error::Timeout,
        Status::NO_SPACE => Error::NoSpace(message),
        Status::UNSUPPORTED => Error::Unsupported(message),
        Status::SIBLINGS_FULL => Error::SiblingsFull(message),
        Status::INTERNAL => Error::Internal(message),
        other => Error::Server { status: other.0, message },
    }
}

impl Client {
    /// Connects to a node, learns its shards from the handshake and, if shard-aware,
    /// opens a pool to each shard's own port.
    pub async fn connect(address: impl ToSocketAddrs, options: Options) -> Result<Client, Error> {
        let address = address
            .to_socket_addrs()
            .map_err(|error| Error::Io(format!("resolving address: {error}")))?
            .next()
            .ok_or_else(|| Error::Io("address resolves to nothing".into()))?;
        let first = Connection::connect(address, options.timeout).await?;
        let hello_request = RequestView {
            id: 0,
            timeout_ms: options.timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            consistency: options.consistency,
            context: &[],
            write_id: None,
            op: Op::Hello { protocol_version: PROTOCOL_VERSION, client_name: "kv-rust-client" },
        };
        let response = first.call(&hello_request, options.timeout).await?;
        if response.status != Status::OK {
            return Err(status_error(response));
        }
        let hello = response.hello.ok_or_else(|| Error::Protocol("Hello reply without node info".into()))?;
        if hello.shard_count == 0 || hello.shard_ports.len() != usize::from(hello.shard_count) {
            return Err(Error::Protocol(format!("node reports {} shards", hello.shard_count)));
        }
        let pool_size = options.pool_size.max(1);
        let slots = |address: SocketAddr| -> Vec<Slot> {
            (0..pool_size).map(|_| Slot { address, connection: Mutex::new(None) }).collect()
        };
        let routes: Vec<Vec<Slot>> = if options.shard_aware {
            hello.shard_ports.iter().map(|&(_, port)| slots(SocketAddr::new(address.ip(), port))).collect()
        } else {
            vec![slots(address)]
        };
        // Keep the handshake connection in the first slot of the shared pool.
        if !options.shard_aware {
            *routes[0][0].connection.lock().await = Some(Arc::new(first));
        }
        let client = Client {
            inner: Arc::new(Inner {
                hello,
                options,
                routes,
                next: AtomicUsize::new(0),
                cluster: std::sync::RwLock::new(None),
            }),
        };
        if client.inner.options.cluster_aware {
            client.refresh_topology(None).await;
        }
        Ok(client)
    }

    /// Learns the ring again: from the node connected to, else from any node the previous
    /// view knew. Keeps the connections it had; keeps the old view if nobody answers.
    async fn refresh_topology(&self, previous: Option<&ClusterRoutes>) {
        let mut learned = match self.call_route(0, Op::Topology).await {
            Ok(response) if response.status == Status::OK => response.topology,
            _ => None,
        };
        if let (None, Some(previous)) = (&learned, previous) {
            let timeout = self.inner.options.timeout;
            let request = self.request(Op::Topology, &[]);
            for node in &previous.topology.nodes {
                let Ok(address) = node.address.parse::<SocketAddr>() else { continue };
                let Ok(connection) = previous.slot(address).get(timeout).await else { continue };
                if let Ok(response) = connection.call(&request, timeout).await {
                    if response.status == Status::OK && response.topology.is_some() {
                        learned = response.topology;
                        break;
                    }
                }
            }
        }
        let topology = match (learned.filter(|t| t.formed), previous) {
            (Some(topology), _) => topology,
            (None, Some(previous)) => previous.topology.clone(), // try again later
            (None, None) => return,
        };
        let slots = previous
            .map(|p| p.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
            .unwrap_or_default();
        let routes = ClusterRoutes {
            topology,
            learned: std::time::Instant::now(),
            slots: std::sync::Mutex::new(slots),
        };
        *self.inner.cluster.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Arc::new(routes));
    }

    fn cluster_routes(&self) -> Option<Arc<ClusterRoutes>> {
        self.inner.cluster.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A request with this client's deadline and consistency.
    fn request<'a>(&self, op: Op<'a>, context: &'a [u8]) -> RequestView<'a> {
        let timeout = self.inner.options.timeout;
        RequestView {
            id: 0,
            timeout_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            consistency: self.inner.options.consistency,
            context,
            write_id: None,
            op,
        }
    }

    /// A keyed request in a cluster: to the owning shard of the first up replica; a read
    /// moves on to the next replica when a connection fails, a write only when it could not
    /// connect (it may have been applied otherwise).
    async fn call_replicas(
        &self,
        routes: &ClusterRoutes,
        key: &[u8],
        op: Op<'_>,
        context: &[u8],
    ) -> Result<ResponseView, Error> {
        let timeout = self.inner.options.timeout;
        let request = self.request(op, context);
        let is_read = matches!(op, Op::Get { .. });
        let mut last = Error::Unavailable("no replica of the key is known".into());
        for address in routes.replica_addresses(key) {
            let connection = match routes.slot(address).get(timeout).await {
                Ok(connection) => connection,
                Err(error) => {
                    last = error;
                    continue;
                }
            };
            match connection.call(&request, timeout).await {
                // A read is safe to repeat on the next replica, even after a timeout.
                Err(error @ (Error::ConnectionClosed | Error::Io(_) | Error::Timeout)) if is_read => {
                    last = error
                }
                result => return result,
            }
        }
        Err(last)
    }

    /// What the node said in the handshake.
    pub fn hello(&self) -> &HelloInfo {
        &self.inner.hello
    }

    async fn call(&self, op: Op<'_>) -> Result<ResponseView, Error> {
        self.call_with_context(op, &[]).await
    }

    async fn call_with_context(&self, op: Op<'_>, context: &[u8]) -> Result<ResponseView, Error> {
        if let (Some(key), Some(cluster)) = (op.key(), self.cluster_routes()) {
            if cluster.learned.elapsed() > TOPOLOGY_REFRESH {
                self.refresh_topology(Some(&cluster)).await;
            }
            let result = self.call_replicas(&cluster, key, op, context).await;
            if matches!(result, Err(Error::ConnectionClosed | Error::Io(_) | Error::Unavailable(_))) {
                self.refresh_topology(Some(&cluster)).await;
            }
            return result;
        }
        let routes = &self.inner.routes;
        let route = match op.key() {
            Some(key) if routes.len() > 1 => shard_of(key, routes.len()),
            _ => 0,
        };
        self.call_route_with_context(route, op, context).await
    }

    async fn call_route(&self, route: usize, op: Op<'_>) -> Result<ResponseView, Error> {
        self.call_route_with_context(route, op, &[]).await
    }

    async fn call_route_with_context(
        &self,
        route: usize,
        op: Op<'_>,
        context: &[u8],
    ) -> Result<ResponseView, Error> {
        let route = &self.inner.routes[route];
        let slot = &route[self.inner.next.fetch_add(1, Ordering::Relaxed) % route.len()];
        let timeout = self.inner.options.timeout;
        let connection = slot.get(timeout).await?;
        let request = self.request(op, context);
        let result = connection.call(&request, timeout).await;
        // A read is safe to repeat: when the connection died under it (a node restart, a
        // reset), try once more on a fresh connection. Writes are not retried: without
        // write ids the server could apply one twice.
        let retryable = matches!(result, Err(Error::ConnectionClosed | Error::Io(_)));
        if retryable && matches!(op, Op::Get { .. }) {
            let connection = slot.get(timeout).await?;
            return connection.call(&request, timeout).await;
        }
        result
    }

    /// Every shard's counters and storage-engine figures, one JSON object per shard (only
    /// the shard that answers the shared port when the client is not shard-aware).
    pub async fn stats(&self) -> Result<Vec<String>, Error> {
        let mut shards = Vec::with_capacity(self.inner.routes.len());
        for route in 0..self.inner.routes.len() {
            let response = self.call_route(route, Op::Stats).await?;
            match (response.status, response.stats_json) {
                (Status::OK, Some(json)) => shards.push(json),
                (Status::OK, None) => return Err(Error::Protocol("Stats reply without figures".into())),
                (_, _) => return Err(Error::Protocol(format!("Stats answered {:?}", response.status))),
            }
        }
        Ok(shards)
    }

    /// Takes a consistent snapshot of the node into `dir` (absolute, on the node's data
    /// file system, not existing yet) while it keeps serving.
    pub async fn snapshot(&self, dir: &str) -> Result<(), Error> {
        let response = self.call_route(0, Op::Snapshot { dir }).await?;
        match response.status {
            Status::OK => Ok(()),
            _ => Err(status_error(response)),
        }
    }

    /// Runs an anti-entropy pass on every shard of the node now, over every partition it
    /// replicates, and returns its report (JSON: partitions, comparisons, differing,
    /// keys_repaired, keys_failed, unreachable, tombstones_purged). Takes as long as the pass:
    /// give the client a timeout to match.
    pub async fn repair(&self) -> Result<String, Error> {
        let response = self.call_route(0, Op::Repair).await?;
        match (response.status, response.stats_json) {
            (Status::OK, Some(json)) => Ok(json),
            (Status::OK, None) => Err(Error::Protocol("Repair reply without a report".into())),
            _ => Err(Error::Protocol(format!("Repair answered {:?}: {}", response.status, response.message))),
        }
    }

    /// Decommissions a live node (its ranges stream to their new owners, then it leaves the
    /// ring) or removes a dead one (its ranges are copied from the survivors), driven by the
    /// node this client talks to; answers once the change is complete with what moved (JSON:
    /// ring_version, transfers, keys, bytes, elapsed_ms). Give the client a timeout to match.
    pub async fn change_membership(&self, action: MembershipAction, node: &str) -> Result<String, Error> {
        let response = self.call_route(0, Op::ChangeMembership { action, node }).await?;
        match (response.status, &response.stats_json) {
            (Status::OK, Some(json)) => Ok(json.clone()),
            (Status::OK, None) => Err(Error::Protocol("membership change answered without a report".into())),
            _ => Err(status_error(response)),
        }
    }

    /// The cluster's membership and ring as the node sees it.
    pub async fn topology(&self) -> Result<schema::peer::TopologyData, Error> {
        let response = self.call_route(0, Op::Topology).await?;
        match response.status {
            Status::OK => {
                response.topology.ok_or_else(|| Error::Protocol("Topology reply without a topology".into()))
            }
            _ => Err(status_error(response)),
        }
    }

    /// Every sibling of `key` and the causal context (a cluster may hold concurrent values).
    /// A reply holds the siblings that fit in one frame; this reads the rest page by page,
    /// each following page asked with the context so far, so that the last context covers
    /// exactly the siblings returned (never one that arrived between pages).
    pub async fn get_versions(&self, key: &[u8]) -> Result<Versioned, Error> {
        self.get_pages(key, false, usize::MAX).await
    }

    /// One page of `key`'s siblings at most: those that fit in one reply, from the first.
    /// The context covers only those returned; `Versioned::omitted` counts the rest.
    pub async fn get_versions_page(&self, key: &[u8]) -> Result<Versioned, Error> {
        self.get_pages(key, false, 1).await
    }

    async fn get_pages(
        &self,
        key: &[u8],
        metadata_only: bool,
        page_count_max: usize,
    ) -> Result<Versioned, Error> {
        check_key(key)?;
        let mut versioned = Versioned::default();
        let mut context = Vec::new();
        for _ in 0..page_count_max.min(SIBLING_PAGE_COUNT_MAX) {
            let sibling_skip = u32::try_from(versioned.siblings.len()).unwrap_or(u32::MAX);
            let op = Op::Get { key, metadata_only, sibling_skip };
            let response = self.call_with_context(op, &context).await?;
            if !matches!(response.status, Status::OK | Status::NOT_FOUND) {
                return Err(status_error(response));
            }
            let page_size = response.siblings.len();
            context = response.context;
            versioned.siblings.extend(response.siblings.into_iter().map(Value::from));
            versioned.omitted = response.siblings_omitted;
            if response.siblings_omitted == 0 || page_size == 0 {
                break;
            }
        }
        versioned.context = context;
        Ok(versioned)
    }

    /// Stores `value` superseding what `context` (from [`Client::get_versions`]) covers;
    /// concurrent writes not covered stay as siblings. Returns the key's context after the
    /// write (empty on a standalone node), with which a following write supersedes this one.
    pub async fn put_with_context(
        &self,
        key: &[u8],
        value: &[u8],
        ttl: Option<Duration>,
        context: &[u8],
    ) -> Result<Vec<u8>, Error> {
        check_key(key)?;
        check_value(value)?;
        let ttl_ms = ttl.map_or(0, |ttl| ttl.as_millis().max(1) as u64);
        let response = self.call_with_context(Op::Put { key, value, ttl_ms }, context).await?;
        match response.status {
            Status::OK => Ok(response.context),
            _ => Err(status_error(response)),
        }
    }

    /// Stores `value` with no TTL: a blind (last-writer-wins) write in a cluster.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), Error> {
        self.put_with_ttl(key, value, None).await
    }

    /// Stores `value`; with a TTL it reads as absent once the TTL has passed.
    pub async fn put_with_ttl(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<(), Error> {
        check_key(key)?;
        check_value(value)?;
        let ttl_ms = ttl.map_or(0, |ttl| ttl.as_millis().max(1) as u64);
        let response = self.call(Op::Put { key, value, ttl_ms }).await?;
        match response.status {
            Status::OK => Ok(()),
            _ => Err(status_error(response)),
        }
    }

    /// The value of `key`, or `None` if absent or expired; in a cluster, the newest of its
    /// siblings by timestamp ([`Client::get_versions`] returns them all).
    pub async fn get(&self, key: &[u8]) -> Result<Option<Value>, Error> {
        self.get_inner(key, false).await
    }

    /// Like `get`, but the reply carries no value bytes: timestamp and TTL only.
    pub async fn get_metadata(&self, key: &[u8]) -> Result<Option<Value>, Error> {
        self.get_inner(key, true).await
    }

    async fn get_inner(&self, key: &[u8], metadata_only: bool) -> Result<Option<Value>, Error> {
        // A cluster may answer with concurrent siblings: the default resolver picks, from
        // every page.
        let versioned = self.get_pages(key, metadata_only, usize::MAX).await?;
        Ok(versioned.siblings.into_iter().max_by_key(|sibling| sibling.timestamp_us))
    }

    /// Deletes `key`; `Ok(false)` if it did not exist.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, Error> {
        check_key(key)?;
        let response = self.call(Op::Delete { key }).await?;
        match response.status {
            Status::OK => Ok(true),
            Status::NOT_FOUND => Ok(false),
            _ => Err(status_error(response)),
        }
    }

    /// Atomically replaces the value of `key` with `new_value` if it currently equals
    /// `expected` (`None`: if the key is absent).
    pub async fn cas(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new_value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<CasOutcome, Error> {
        self.cas_with_context(key, expected, new_value, ttl, &[]).await
    }

    /// As [`Client::cas`], and in a cluster only if nothing was written to `key` since the
    /// read that returned `context` ([`Client::get_versions`]): the key's version vector must
    /// still be `context`. An empty context checks the value alone.
    pub async fn cas_with_context(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new_value: &[u8],
        ttl: Option<Duration>,
        context: &[u8],
    ) -> Result<CasOutcome, Error> {
        self.cas_versioned(key, expected, new_value, ttl, context).await.map(|(outcome, _)| outcome)
    }

    /// As [`Client::cas_with_context`], and also the key's context after a swap in a cluster
    /// (empty otherwise): a following write with it supersedes the swapped-in value.
    pub async fn cas_versioned(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new_value: &[u8],
        ttl: Option<Duration>,
        context: &[u8],
    ) -> Result<(CasOutcome, Vec<u8>), Error> {
        check_key(key)?;
        check_value(new_value)?;
        if let Some(expected) = expected {
            check_value(expected)?;
        }
        let ttl_ms = ttl.map_or(0, |ttl| ttl.as_millis().max(1) as u64);
        let response = self.call_with_context(Op::Cas { key, expected, new_value, ttl_ms }, context).await?;
        match response.status {
            Status::OK => Ok((CasOutcome::Swapped, response.context)),
            Status::CAS_FAILED => {
                let current = response.siblings.into_iter().next().map(Value::from);
                Ok((CasOutcome::Failed { current }, Vec::new()))
            }
            _ => Err(status_error(response)),
        }
    }
}
