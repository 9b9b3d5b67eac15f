//! Shard 0's side of membership: drives the sans-IO gossip state machine with real time and
//! real connections, forms the cluster, keeps the agreed ring (`ring_state.rs`) and drives
//! ring changes, and publishes a fresh [`ClusterView`] to every shard whenever what they see
//! changes.
//!
//! Forming: a node started with `--cluster-size n` gossips with its seeds until it knows `n`
//! nodes, none of which belongs to a cluster yet; then the members are the `n` node names,
//! sorted, and ring version 1 deals the partitions round-robin. Every node computes the same
//! ring from the same names and persists it in `CLUSTER` before serving.
//!
//! After that the ring changes only by agreement: each version is chosen by a single-decree
//! Paxos among the nodes that own partitions in the version before (`RingChange` messages,
//! acceptor state persisted in `CLUSTER`), and spreads by commit messages and by gossip (every
//! node announces its ring version; a node that sees a higher one reads the ring from that
//! peer). A node started with `--join` (or `--replace DEAD`) learns the ring from its seeds and
//! drives its own change: pending ownership, transfers, completion (README.md
//! beside this file, "Elasticity"). `kvctl decommission` and `kvctl remove` make the node they reach drive one.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use schema::peer::{decode_gossip, encode_gossip, StreamProgress};
use schema::{Consistency, Op};

use super::gossip::{Gossip, Message, NodeState, NodeStatus};
use super::gossip_wire::{message_from_wire, message_to_wire};
pub use super::options::ClusterOptions;
use super::peer::{PeerPool, PeerRequest};
use super::ring::NodeId;
use super::ring_file::{self, RingFile};
use super::ring_state::{RingAcceptor, RingState};
use super::rng::Rng;
use super::versions::actor_of;
use super::view::{parse_address, ClusterView, Formed, NodeInfo};
use crate::storage::Storage;

pub use super::ring_file::CLUSTER_FILE;
pub use driver::ChangeReport;

mod agreement;
mod driver;
/// How long one ring message may take.
const RING_TIMEOUT: Duration = Duration::from_secs(5);

fn check_members(state: &RingState) -> Result<(), String> {
    if state.replica_count == 0 || state.replica_count > state.members.len() {
        return Err(format!("replica count {} with {} members", state.replica_count, state.members.len()));
    }
    // Version vectors name nodes by a 32-bit hash of their id: two members must differ.
    let mut actors: Vec<u32> = state.members.iter().map(|name| actor_of(name)).collect();
    actors.sort_unstable();
    if actors.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(
            "two members' ids hash to the same version-vector actor; restart one with a new data directory"
                .into(),
        );
    }
    Ok(())
}

/// Shard 0's membership driver.
pub struct Membership<S: Storage> {
    me: String,
    options: ClusterOptions,
    /// `CLUSTER`, written through the node's storage.
    ring_file: RingFile<S>,
    gossip: RefCell<Gossip>,
    /// The agreed ring and the acceptor state for the next version; `None` until formed (or,
    /// for a joining node, until it has read the ring from a seed).
    ring: RefCell<Option<RingAcceptor>>,
    started: Instant,
    /// Seeds' shard-0 addresses, learned by asking each seed (a client port) with Hello.
    seeds_resolved: Cell<bool>,
    peers: Rc<PeerPool>,
    published: RefCell<Option<Arc<ClusterView>>>,
    publish: Box<dyn Fn(Arc<ClusterView>)>,
    /// A change driven by this node is under way (one at a time).
    driving: Cell<bool>,
    ballot_counter: Cell<u64>,
    /// The backoffs' randomness, seeded from the node's actor and start time.
    rng: RefCell<Rng>,
    /// When a refusal was last logged (a joining node retries quietly in between).
    refusal_logged: Cell<Option<Instant>>,
}

impl<S: Storage> Membership<S> {
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        storage: S,
        me: String,
        my_address: SocketAddr,
        shard_ports: Vec<u16>,
        options: ClusterOptions,
        data_dir: &Path,
        peers: Rc<PeerPool>,
        publish: Box<dyn Fn(Arc<ClusterView>)>,
    ) -> anyhow::Result<Membership<S>> {
        let ring = ring_file::load(&storage, data_dir).await?;
        if let Some(ring) = &ring {
            let joining = options.join || options.replace.is_some();
            if ring.committed.id_of(&me).is_none() && !joining {
                anyhow::bail!("{CLUSTER_FILE} in {} does not list this node ({me})", data_dir.display());
            }
        }
        // Generations order a node's states across restarts: the start time does.
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let mut state = NodeState {
            generation,
            heartbeat: 0,
            address: my_address.to_string(),
            status: NodeStatus::Normal,
            shard_ports,
            client_port: options.client_port,
            load_bytes: 0,
            members: Vec::new(),
            replica_count: options.replica_count as u8,
            partition_bits: options.partition_bits as u8,
            ring_version: 0,
            stream: StreamProgress::default(),
        };
        if let Some(ring) = &ring {
            announce(&mut state, &ring.committed);
        }
        let gossip = Gossip::new(me.clone(), state, Vec::new(), options.gossip, generation ^ 0x9e37_79b9);
        let rng = Rng::new(generation ^ u64::from(actor_of(&me)));
        Ok(Membership {
            me,
            options,
            ring_file: RingFile::new(storage, data_dir),
            gossip: RefCell::new(gossip),
            ring: RefCell::new(ring),
            started: Instant::now(),
            seeds_resolved: Cell::new(false),
            peers,
            published: RefCell::new(None),
            publish,
            driving: Cell::new(false),
            ballot_counter: Cell::new(0),
            rng: RefCell::new(rng),
            refusal_logged: Cell::new(None),
        })
    }

    fn now_us(&self) -> u64 {
        // Starts at one interval so that "never heard" and "heard at start" differ.
        self.started.elapsed().as_micros() as u64 + 1
    }

    fn committed(&self) -> Option<RingState> {
        self.ring.borrow().as_ref().map(|ring| ring.committed.clone())
    }

    /// The gossip loop: one round per interval, forever.
    pub async fn run(self: Rc<Self>) {
        self.refresh();
        loop {
            if !self.seeds_resolved.get() {
                self.resolve_seeds().await;
            }
            let outgoing = self.gossip.borrow_mut().tick(self.now_us());
            self.send(outgoing);
            self.catch_up().await;
            if self.ring.borrow().is_none() {
                if let Err(refusal) = self.try_form().await {
                    tracing::error!("{refusal}");
                    std::process::exit(2);
                }
            }
            self.refresh();
            self.maybe_drive();
            glommio::timer::sleep(self.options.gossip.interval).await;
        }
    }

    async fn resolve_seeds(&self) {
        let timeout = Duration::from_millis(500);
        let mut resolved = Vec::new();
        for seed in &self.options.seeds {
            let link = self.peers.link(*seed);
            let hello = Op::Hello { protocol_version: schema::PROTOCOL_VERSION, client_name: "kvd-gossip" };
            let request = PeerRequest { op: hello, consistency: Consistency::ONE, context: &[], timeout };
            if let Ok(reply) = link.call(request).await {
                if let Some(port) = reply.hello.and_then(|h| h.shard_ports.first().map(|p| p.1)) {
                    resolved.push(SocketAddr::new(seed.ip(), port).to_string());
                }
            }
        }
        if resolved.len() == self.options.seeds.len() || self.gossip.borrow().members().count() > 1 {
            self.seeds_resolved.set(true);
        }
        if !resolved.is_empty() {
            self.gossip.borrow_mut().set_seeds(resolved);
        }
    }

    fn send(&self, outgoing: Vec<(String, Message)>) {
        for (address, message) in outgoing {
            let Some(address) = parse_address(&address) else { continue };
            let bytes = encode_gossip(&message_to_wire(&message));
            let link = self.peers.link(address);
            let timeout = self.options.gossip.interval * 5;
            glommio::spawn_local(async move {
                let op = Op::Gossip { message: &bytes };
                let _ =
                    link.call(PeerRequest { op, consistency: Consistency::ONE, context: &[], timeout }).await;
            })
            .detach();
        }
    }

    /// A gossip message from a peer (already verified as FlatBuffers).
    pub fn receive(&self, bytes: &[u8]) -> Result<(), String> {
        let message = message_from_wire(decode_gossip(bytes)?);
        let outgoing = self.gossip.borrow_mut().receive(self.now_us(), message);
        self.send(outgoing);
        self.refresh();
        Ok(())
    }

    pub fn set_load(&self, load_bytes: u64) {
        self.gossip.borrow_mut().update_me(|state| state.load_bytes = load_bytes);
    }

    /// Publishes the view if it changed.
    fn refresh(&self) {
        let view = Arc::new(self.view());
        let changed = self.published.borrow().as_deref() != Some(&*view);
        if changed {
            *self.published.borrow_mut() = Some(view.clone());
            (self.publish)(view);
        }
    }

    fn joining(&self) -> bool {
        self.options.join || self.options.replace.is_some()
    }

    /// The nodes to form the cluster with, as gossip knows them (`None`: a formed cluster's
    /// ring is read from a peer instead), or a refusal to join a cluster without this node.
    fn formable(&self) -> Result<Option<Vec<String>>, String> {
        let gossip = self.gossip.borrow();
        for (name, state) in gossip.members() {
            let formed = state.ring_version > 0 || !state.members.is_empty();
            if formed && !state.members.contains(&self.me) && !self.joining() {
                return Err(format!(
                    "refusing to join: node {name} at {} belongs to a formed cluster ({}) that does not list \
                     this node ({}); start it with --join to add it (or --replace DEAD_NODE)",
                    state.address,
                    state.members.join(", "),
                    self.me
                ));
            }
        }
        // A formed cluster's ring is read from a peer (`catch_up`), not formed here.
        if self.joining() || gossip.members().any(|(_, state)| state.ring_version > 0) {
            return Ok(None);
        }
        Ok(Some(gossip.members().map(|(name, _)| name.clone()).collect()))
    }

    /// Forms the cluster once every node it was started with is known (the ring persisted
    /// before it is published), or refuses to join a cluster that does not list this node.
    async fn try_form(&self) -> Result<(), String> {
        let Some(known) = self.formable()? else { return Ok(()) };
        if known.len() > self.options.cluster_size {
            return Err(format!(
                "{} nodes found while forming a cluster of --cluster-size {}: {}",
                known.len(),
                self.options.cluster_size,
                known.join(", ")
            ));
        }
        if known.len() < self.options.cluster_size {
            return Ok(());
        }
        let state = RingState::formed(known, self.options.replica_count, self.options.partition_bits)?;
        check_members(&state)?;
        let acceptor = RingAcceptor::new(state);
        self.ring_file
            .save(|| Some(acceptor.clone()))
            .await
            .map_err(|error| format!("saving {CLUSTER_FILE}: {error}"))?;
        tracing::info!(
            "cluster formed: {} nodes, {} replicas, {} partitions",
            acceptor.committed.members.len(),
            acceptor.committed.replica_count,
            acceptor.committed.owners.len()
        );
        self.gossip.borrow_mut().update_me(|state| announce(state, &acceptor.committed));
        *self.ring.borrow_mut() = Some(acceptor);
        Ok(())
    }

    fn view(&self) -> ClusterView {
        let gossip = self.gossip.borrow();
        let now_us = self.now_us();
        let formed = self.committed().and_then(|state| Formed::from_state(&state).ok());
        let nodes = gossip
            .members()
            .filter_map(|(name, state)| {
                let address = parse_address(&state.address)?;
                let id = formed.as_ref().and_then(|f| f.members.iter().position(|m| m == name));
                let status = match (&formed, id) {
                    (Some(formed), Some(id)) => formed.status_of(id as NodeId),
                    _ => NodeStatus::Joining,
                };
                let info = NodeInfo {
                    address,
                    shard_ports: state.shard_ports.clone(),
                    client_port: state.client_port,
                    up: gossip.is_up(name, now_us),
                    status,
                    // Load changes constantly; shards do not need it, so it does not make
                    // a new view. `kvctl status` asks shard 0, which reads it live.
                    load_bytes: 0,
                    stream: StreamProgress::default(),
                };
                Some((name.clone(), info))
            })
            .collect();
        let forming_note = match &formed {
            Some(formed) if formed.members.contains(&self.me) => String::new(),
            Some(_) => "this node is joining the cluster".to_string(),
            None => format!(
                "the cluster is forming: {} of {} nodes known",
                gossip.members().count(),
                self.options.cluster_size
            ),
        };
        ClusterView { me: self.me.clone(), formed, nodes, forming_note }
    }

    /// The view with live load and streaming figures, for `kvctl status`.
    pub fn view_with_load(&self) -> ClusterView {
        let mut view = self.view();
        let gossip = self.gossip.borrow();
        for (name, info) in view.nodes.iter_mut() {
            if let Some(state) = gossip.state(name) {
                info.load_bytes = state.load_bytes;
                info.stream = state.stream;
            }
        }
        view
    }
}

/// What a node announces of its ring in gossip.
fn announce(state: &mut NodeState, ring: &RingState) {
    state.members = ring.members.clone();
    state.replica_count = ring.replica_count as u8;
    state.partition_bits = ring.partition_bits as u8;
    state.ring_version = ring.version;
}
