//! Shard 0's side of membership: drives the sans-IO gossip state machine with real time and
//! real connections, forms the cluster, persists what it formed, and publishes a fresh
//! [`ClusterView`] to every shard whenever what they see changes.
//!
//! Forming (until nodes can join a running cluster): a node started with `--cluster-size n`
//! gossips with its seeds until it knows `n` nodes, none of which belongs to a cluster yet;
//! then the members are the `n` node names, sorted, and ring node `i` is `members[i]`. Every
//! node computes the same ring from the same names, and each one persists it in `CLUSTER` in
//! its data directory before serving; a node that hears of a formed cluster that lists it
//! adopts that one. A node that reaches a formed cluster that does not list it is refused.

use std::cell::{Cell, RefCell};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use schema::peer::{decode_gossip, encode_gossip, GossipData, GossipKind, GossipNode};
use schema::{wire, Consistency, Op};

use super::gossip::{Gossip, GossipConfig, Message, NodeState, NodeStatus};
use super::peer::{PeerPool, PeerRequest};
use super::ring::{NodeId, Ring};
use super::view::{parse_address, ClusterView, Formed, NodeInfo};

pub const CLUSTER_FILE: &str = "CLUSTER";

/// What the operator chose, from flags.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Nodes the cluster forms with.
    pub cluster_size: usize,
    pub replica_count: usize,
    pub partition_bits: u32,
    /// Other nodes' client addresses.
    pub seeds: Vec<SocketAddr>,
    pub gossip: GossipConfig,
    pub anti_entropy: super::anti_entropy::AntiEntropyOptions,
}

/// The persisted membership of a formed cluster.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ClusterFile {
    members: Vec<String>,
    replica_count: usize,
    partition_bits: u32,
}

fn load_formed(dir: &Path) -> anyhow::Result<Option<Formed>> {
    let path = dir.join(CLUSTER_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    let file: ClusterFile =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(formed(file.members, file.replica_count, file.partition_bits)?))
}

fn formed(members: Vec<String>, replica_count: usize, partition_bits: u32) -> anyhow::Result<Formed> {
    let ids: Vec<NodeId> = (0..members.len() as NodeId).collect();
    let ring = Ring::new(partition_bits, &ids).map_err(|error| anyhow::anyhow!("ring: {error:?}"))?;
    if replica_count == 0 || replica_count > members.len() {
        anyhow::bail!("replica count {replica_count} with {} members", members.len());
    }
    // Version vectors name nodes by a 32-bit hash of their id: two members must differ.
    let mut actors: Vec<u32> = members.iter().map(|name| super::replication::actor_of(name)).collect();
    actors.sort_unstable();
    if actors.windows(2).any(|pair| pair[0] == pair[1]) {
        anyhow::bail!(
            "two members' ids hash to the same version-vector actor; restart one with a new data directory"
        );
    }
    Ok(Formed { members, replica_count, partition_bits, ring })
}

fn save_formed(dir: &Path, formed: &Formed) -> anyhow::Result<()> {
    let file = ClusterFile {
        members: formed.members.clone(),
        replica_count: formed.replica_count,
        partition_bits: formed.partition_bits,
    };
    let temporary = dir.join("CLUSTER.tmp");
    let mut out = fs::File::create(&temporary)?;
    std::io::Write::write_all(&mut out, &serde_json::to_vec_pretty(&file)?)?;
    out.sync_all()?;
    fs::rename(&temporary, dir.join(CLUSTER_FILE))?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn status_to_wire(status: NodeStatus) -> wire::NodeStatus {
    match status {
        NodeStatus::Joining => wire::NodeStatus::JOINING,
        NodeStatus::Normal => wire::NodeStatus::NORMAL,
        NodeStatus::Leaving => wire::NodeStatus::LEAVING,
    }
}

fn status_from_wire(status: wire::NodeStatus) -> NodeStatus {
    match status {
        wire::NodeStatus::NORMAL => NodeStatus::Normal,
        wire::NodeStatus::LEAVING => NodeStatus::Leaving,
        _ => NodeStatus::Joining,
    }
}

fn state_to_wire(node: &str, state: &NodeState) -> GossipNode {
    GossipNode {
        node: node.to_string(),
        generation: state.generation,
        heartbeat: state.heartbeat,
        address: state.address.clone(),
        status: status_to_wire(state.status),
        shard_ports: state.shard_ports.clone(),
        load_bytes: state.load_bytes,
        members: state.members.clone(),
        replica_count: state.replica_count,
        partition_bits: state.partition_bits,
    }
}

fn state_from_wire(node: GossipNode) -> (String, NodeState) {
    let state = NodeState {
        generation: node.generation,
        heartbeat: node.heartbeat,
        address: node.address,
        status: status_from_wire(node.status),
        shard_ports: node.shard_ports,
        load_bytes: node.load_bytes,
        members: node.members,
        replica_count: node.replica_count,
        partition_bits: node.partition_bits,
    };
    (node.node, state)
}

pub fn message_to_wire(message: &Message) -> GossipData {
    match message {
        Message::Digest { from, address, versions } => GossipData {
            kind: GossipKind::Digest,
            from: from.clone(),
            address: address.clone(),
            versions: versions.clone(),
            states: Vec::new(),
            wanted: Vec::new(),
        },
        Message::Reply { from, address, states, wanted } => GossipData {
            kind: GossipKind::Reply,
            from: from.clone(),
            address: address.clone(),
            versions: Vec::new(),
            states: states.iter().map(|(name, state)| state_to_wire(name, state)).collect(),
            wanted: wanted.clone(),
        },
        Message::States { from, states } => GossipData {
            kind: GossipKind::States,
            from: from.clone(),
            address: String::new(),
            versions: Vec::new(),
            states: states.iter().map(|(name, state)| state_to_wire(name, state)).collect(),
            wanted: Vec::new(),
        },
    }
}

pub fn message_from_wire(data: GossipData) -> Message {
    let states = || data.states.clone().into_iter().map(state_from_wire).collect();
    match data.kind {
        GossipKind::Digest => {
            Message::Digest { from: data.from, address: data.address, versions: data.versions }
        }
        GossipKind::Reply => {
            Message::Reply { states: states(), from: data.from, address: data.address, wanted: data.wanted }
        }
        GossipKind::States => Message::States { states: states(), from: data.from },
    }
}

/// Shard 0's membership driver.
pub struct Membership {
    me: String,
    options: ClusterOptions,
    data_dir: PathBuf,
    gossip: RefCell<Gossip>,
    formed: RefCell<Option<Formed>>,
    started: Instant,
    /// Seeds' shard-0 addresses, learned by asking each seed (a client port) with Hello.
    seeds_resolved: Cell<bool>,
    peers: Rc<PeerPool>,
    published: RefCell<Option<Arc<ClusterView>>>,
    publish: Box<dyn Fn(Arc<ClusterView>)>,
}

impl Membership {
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        me: String,
        my_address: SocketAddr,
        shard_ports: Vec<u16>,
        options: ClusterOptions,
        data_dir: &Path,
        peers: Rc<PeerPool>,
        publish: Box<dyn Fn(Arc<ClusterView>)>,
    ) -> anyhow::Result<Membership> {
        let formed = load_formed(data_dir)?;
        if let Some(formed) = &formed {
            if !formed.members.contains(&me) {
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
            load_bytes: 0,
            members: Vec::new(),
            replica_count: options.replica_count as u8,
            partition_bits: options.partition_bits as u8,
        };
        if let Some(formed) = &formed {
            state.members = formed.members.clone();
            state.replica_count = formed.replica_count as u8;
            state.partition_bits = formed.partition_bits as u8;
        }
        let gossip = Gossip::new(me.clone(), state, Vec::new(), options.gossip, generation ^ 0x9e37_79b9);
        Ok(Membership {
            me,
            options,
            data_dir: data_dir.to_path_buf(),
            gossip: RefCell::new(gossip),
            formed: RefCell::new(formed),
            started: Instant::now(),
            seeds_resolved: Cell::new(false),
            peers,
            published: RefCell::new(None),
            publish,
        })
    }

    fn now_us(&self) -> u64 {
        // Starts at one interval so that "never heard" and "heard at start" differ.
        self.started.elapsed().as_micros() as u64 + 1
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
            self.refresh();
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

    /// Forms or adopts the cluster when it can, and publishes the view if it changed.
    fn refresh(&self) {
        if self.formed.borrow().is_none() {
            if let Err(refusal) = self.try_form() {
                tracing::error!("{refusal}");
                std::process::exit(2);
            }
        }
        let view = Arc::new(self.view());
        let changed = self.published.borrow().as_deref() != Some(&*view);
        if changed {
            *self.published.borrow_mut() = Some(view.clone());
            (self.publish)(view);
        }
    }

    fn try_form(&self) -> Result<(), String> {
        let gossip = self.gossip.borrow();
        let mut adopt = None;
        for (name, state) in gossip.members() {
            if state.members.is_empty() {
                continue;
            }
            if !state.members.contains(&self.me) {
                return Err(format!(
                    "refusing to join: node {name} at {} belongs to a formed cluster ({}) that does not list \
                     this node ({}); adding nodes to a running cluster is not supported yet",
                    state.address,
                    state.members.join(", "),
                    self.me
                ));
            }
            adopt =
                Some((state.members.clone(), state.replica_count as usize, u32::from(state.partition_bits)));
        }
        let known: Vec<String> = gossip.members().map(|(name, _)| name.clone()).collect();
        drop(gossip);
        let chosen = match adopt {
            Some(adopted) => adopted,
            None if known.len() > self.options.cluster_size => {
                return Err(format!(
                    "{} nodes found while forming a cluster of --cluster-size {}: {}",
                    known.len(),
                    self.options.cluster_size,
                    known.join(", ")
                ))
            }
            None if known.len() == self.options.cluster_size => {
                (known, self.options.replica_count, self.options.partition_bits)
            }
            None => return Ok(()),
        };
        let (members, replica_count, partition_bits) = chosen;
        let formed = formed(members, replica_count, partition_bits).map_err(|error| error.to_string())?;
        save_formed(&self.data_dir, &formed).map_err(|error| format!("saving {CLUSTER_FILE}: {error:#}"))?;
        tracing::info!(
            "cluster formed: {} nodes, {} replicas, {} partitions",
            formed.members.len(),
            formed.replica_count,
            formed.ring.partition_count()
        );
        self.gossip.borrow_mut().update_me(|state| {
            state.members = formed.members.clone();
            state.replica_count = formed.replica_count as u8;
            state.partition_bits = formed.partition_bits as u8;
        });
        *self.formed.borrow_mut() = Some(formed);
        Ok(())
    }

    fn view(&self) -> ClusterView {
        let gossip = self.gossip.borrow();
        let now_us = self.now_us();
        let nodes = gossip
            .members()
            .filter_map(|(name, state)| {
                let address = parse_address(&state.address)?;
                let info = NodeInfo {
                    address,
                    shard_ports: state.shard_ports.clone(),
                    up: gossip.is_up(name, now_us),
                    status: state.status,
                    // Load changes constantly; shards do not need it, so it does not make
                    // a new view. `kvctl status` asks shard 0, which reads it live.
                    load_bytes: 0,
                };
                Some((name.clone(), info))
            })
            .collect();
        let formed = self.formed.borrow().clone();
        let forming_note = match &formed {
            Some(_) => String::new(),
            None => format!(
                "the cluster is forming: {} of {} nodes known",
                gossip.members().count(),
                self.options.cluster_size
            ),
        };
        ClusterView { me: self.me.clone(), formed, nodes, forming_note }
    }

    /// The view with live load figures, for `kvctl status`.
    pub fn view_with_load(&self) -> ClusterView {
        let mut view = self.view();
        let gossip = self.gossip.borrow();
        for (name, info) in view.nodes.iter_mut() {
            info.load_bytes = gossip.state(name).map_or(0, |state| state.load_bytes);
        }
        view
    }
}
