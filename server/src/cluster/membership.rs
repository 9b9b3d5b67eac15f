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

use schema::peer::{decode_gossip, encode_gossip, GossipData, GossipKind, GossipNode, StreamProgress};
use schema::wire::RingPhase;
use schema::{wire, Consistency, Op};

use super::gossip::{Gossip, Message, NodeState, NodeStatus};
pub use super::options::ClusterOptions;
use super::peer::{PeerPool, PeerRequest};
use super::ring::NodeId;
use super::ring_change::{
    self, agree_backoff_ms, ChangeDriver, DriverStep, RingRound, RoundStep, AGREE_ATTEMPTS,
};
use super::ring_file::{self, RingFile};
use super::ring_state::{RingAcceptor, RingAnswer, RingBallot, RingState};
use super::rng::Rng;
use super::versions::actor_of;
use super::view::{parse_address, ClusterView, Formed, NodeInfo};
use crate::storage::Storage;

pub use super::ring_file::CLUSTER_FILE;
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

fn phase_name(phase: RingPhase) -> &'static str {
    phase.variant_name().unwrap_or("?")
}

fn status_to_wire(status: NodeStatus) -> wire::NodeStatus {
    match status {
        NodeStatus::Joining => wire::NodeStatus::JOINING,
        NodeStatus::Normal => wire::NodeStatus::NORMAL,
        NodeStatus::Leaving => wire::NodeStatus::LEAVING,
        NodeStatus::Left => wire::NodeStatus::LEFT,
    }
}

fn status_from_wire(status: wire::NodeStatus) -> NodeStatus {
    match status {
        wire::NodeStatus::NORMAL => NodeStatus::Normal,
        wire::NodeStatus::LEAVING => NodeStatus::Leaving,
        wire::NodeStatus::LEFT => NodeStatus::Left,
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
        client_port: state.client_port,
        load_bytes: state.load_bytes,
        members: state.members.clone(),
        replica_count: state.replica_count,
        partition_bits: state.partition_bits,
        ring_version: state.ring_version,
        stream: state.stream,
    }
}

fn state_from_wire(node: GossipNode) -> (String, NodeState) {
    let state = NodeState {
        generation: node.generation,
        heartbeat: node.heartbeat,
        address: node.address,
        status: status_from_wire(node.status),
        shard_ports: node.shard_ports,
        client_port: node.client_port,
        load_bytes: node.load_bytes,
        members: node.members,
        replica_count: node.replica_count,
        partition_bits: node.partition_bits,
        ring_version: node.ring_version,
        stream: node.stream,
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

/// What drives a ring change this node started.
#[derive(Debug, Clone)]
enum Plan {
    Join,
    Replace(String),
    Leave(String),
    Remove(String),
}

impl Plan {
    fn apply(&self, state: &RingState, me: &str) -> Result<RingState, String> {
        match self {
            Plan::Join => state.plan_join(me),
            Plan::Replace(dead) => state.plan_replace(dead, me),
            Plan::Leave(node) => state.plan_leave(node, me),
            Plan::Remove(node) => state.plan_remove(node, me),
        }
    }
}

/// What a completed change moved.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ChangeReport {
    pub ring_version: u64,
    pub transfers: u64,
    pub keys: u64,
    pub bytes: u64,
    pub elapsed_ms: u64,
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

    /// Makes the ring acceptor as it is now durable (`CLUSTER`).
    async fn persist(&self) -> Result<(), String> {
        self.ring_file
            .save(|| self.ring.borrow().clone())
            .await
            .map_err(|error| format!("saving {CLUSTER_FILE}: {error}"))
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

    /// Adopts a newer committed ring (a commit, or one read from a peer), durable before it
    /// is announced or published.
    async fn adopt(&self, state: RingState) -> Result<bool, String> {
        check_members(&state)?;
        state.ring()?;
        {
            let mut ring = self.ring.borrow_mut();
            match ring.as_mut() {
                Some(acceptor) => {
                    if !acceptor.commit(state.clone()) {
                        return Ok(false);
                    }
                }
                None => *ring = Some(RingAcceptor::new(state.clone())),
            }
        }
        self.persist().await?;
        tracing::info!(
            "ring version {} adopted{}",
            state.version,
            match &state.pending {
                Some(pending) => format!(": {}", state.describe(pending)),
                None => String::new(),
            }
        );
        self.gossip.borrow_mut().update_me(|me| announce(me, &state));
        self.refresh();
        Ok(true)
    }

    /// Reads the ring from a peer that announces a newer version than ours.
    async fn catch_up(&self) {
        let mine = self.committed().map_or(0, |state| state.version);
        // From a peer that is up: a dead member's last state announces the version too.
        let newest = {
            let gossip = self.gossip.borrow();
            let now_us = self.now_us();
            gossip
                .members()
                .filter(|(name, state)| {
                    *name != &self.me && state.ring_version > mine && gossip.is_up(name, now_us)
                })
                .max_by_key(|(_, state)| state.ring_version)
                .and_then(|(_, state)| parse_address(&state.address))
        };
        let Some(address) = newest else { return };
        if let Some(answer) = self.call_ring(address, RingPhase::READ, 0, (0, 0, 0), "").await {
            let belongs = answer.committed.id_of(&self.me).is_some();
            if self.ring.borrow().is_none() && !belongs && !self.joining() {
                return;
            }
            if let Err(error) = self.adopt(answer.committed).await {
                tracing::warn!("adopting the ring from {address}: {error}");
            }
        }
    }

    async fn call_ring(
        &self,
        address: SocketAddr,
        phase: RingPhase,
        version: u64,
        ballot: RingBallot,
        state: &str,
    ) -> Option<RingAnswer> {
        let ballot = schema::peer::Ballot { time_us: ballot.0, actor: ballot.1, counter: ballot.2 };
        let op = Op::RingChange { phase, version, ballot, state };
        let request = PeerRequest { op, consistency: Consistency::ONE, context: &[], timeout: RING_TIMEOUT };
        let response = self.peers.link(address).call(request).await.ok()?;
        if response.status != schema::Status::OK {
            return None;
        }
        serde_json::from_str(&response.ring?).ok()
    }

    /// A ring message from a peer: the answer (JSON), once any change is durable.
    pub async fn receive_ring(
        &self,
        phase: RingPhase,
        version: u64,
        ballot: RingBallot,
        state: &str,
    ) -> Result<String, String> {
        let proposed = if state.is_empty() {
            None
        } else {
            Some(serde_json::from_str::<RingState>(state).map_err(|error| format!("ring state: {error}"))?)
        };
        if phase == RingPhase::COMMIT {
            let state = proposed.clone().ok_or("COMMIT without a ring")?;
            self.adopt(state).await?;
        }
        let (changed, answer) = {
            let mut ring = self.ring.borrow_mut();
            let acceptor = ring.as_mut().ok_or("this node has no ring yet")?;
            match phase {
                RingPhase::PREPARE => acceptor.prepare(version, ballot),
                RingPhase::ACCEPT => acceptor.accept(ballot, proposed.ok_or("ACCEPT without a ring")?),
                _ => (
                    false,
                    RingAnswer {
                        ok: true,
                        committed: acceptor.committed.clone(),
                        accepted: acceptor.accepted.clone(),
                    },
                ),
            }
        };
        // A promise or an acceptance is durable before it is answered.
        if changed {
            self.persist().await?;
        }
        tracing::debug!("ring {} v{version}: {}", phase_name(phase), answer.ok);
        serde_json::to_string(&answer).map_err(|error| error.to_string())
    }

    fn next_ballot(&self) -> RingBallot {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let promised = self.ring.borrow().as_ref().map_or((0, 0, 0), |ring| ring.promised);
        self.ballot_counter.set(self.ballot_counter.get() + 1);
        ring_change::next_ballot(now_us, promised, actor_of(&self.me), self.ballot_counter.get())
    }

    fn address_of(&self, name: &str) -> Option<SocketAddr> {
        let gossip = self.gossip.borrow();
        parse_address(&gossip.state(name)?.address)
    }

    /// Sends one ring message to each of `nodes` (this node answers itself), concurrently.
    async fn ring_round(
        &self,
        nodes: &[String],
        phase: RingPhase,
        version: u64,
        ballot: RingBallot,
        state: &str,
    ) -> Vec<Option<RingAnswer>> {
        let calls = nodes.iter().map(|name| async move {
            if *name == self.me {
                return self
                    .receive_ring(phase, version, ballot, state)
                    .await
                    .ok()
                    .and_then(|a| serde_json::from_str(&a).ok());
            }
            let address = self.address_of(name)?;
            self.call_ring(address, phase, version, ballot, state).await
        });
        futures::future::join_all(calls).await
    }

    /// Agrees on the next ring version with `plan`'s change: the rounds of `RingRound` among
    /// the nodes that own partitions now. Refusals from `plan` (another change pending) come
    /// back as they are.
    async fn agree(
        &self,
        plan: &dyn Fn(&RingState) -> Result<RingState, String>,
    ) -> Result<RingState, String> {
        for attempt in 0..AGREE_ATTEMPTS {
            if attempt > 0 {
                let backoff = agree_backoff_ms(attempt, &mut self.rng.borrow_mut());
                glommio::timer::sleep(Duration::from_millis(backoff)).await;
            }
            let current = self.committed().ok_or("the ring is not known yet")?;
            let proposal = plan(&current)?;
            if proposal == current {
                return Ok(current);
            }
            let mut round = RingRound::start(&current, proposal, self.next_ballot());
            let voters = round.voters().to_vec();
            let (version, ballot) = (round.version(), round.ballot());
            let answers = self.ring_round(&voters, RingPhase::PREPARE, version, ballot, "").await;
            let value = match round.prepared(&answers) {
                RoundStep::Accept(value) => value,
                RoundStep::Adopt(newer) => {
                    self.adopt(newer).await?;
                    continue;
                }
                RoundStep::Retry | RoundStep::Chosen { .. } => continue,
            };
            let json = serde_json::to_string(&value).map_err(|error| error.to_string())?;
            let answers = self.ring_round(&voters, RingPhase::ACCEPT, version, ballot, &json).await;
            let RoundStep::Chosen { value, ours } = round.accepted(&answers) else { continue };
            // Every member hears it (gossip brings it to those that miss this).
            let everyone: Vec<String> = value.members.clone();
            self.ring_round(&everyone, RingPhase::COMMIT, version, ballot, &json).await;
            self.adopt(value.clone()).await?;
            if ours {
                return Ok(value);
            }
        }
        Err(format!("no agreement on a ring change after {AGREE_ATTEMPTS} attempts: too few nodes answered"))
    }

    /// Starts driving the change this node owes: its own join or replacement, or a change it
    /// drove before a restart.
    fn maybe_drive(self: &Rc<Self>) {
        if self.driving.get() {
            return;
        }
        let Some(state) = self.committed() else { return };
        let plan = match &state.pending {
            Some(pending) if pending.driver == self.me => match pending.kind {
                super::ring_state::ChangeKind::Join => Plan::Join,
                super::ring_state::ChangeKind::Replace { dead } => {
                    Plan::Replace(state.members.get(dead as usize).cloned().unwrap_or_default())
                }
                super::ring_state::ChangeKind::Leave => {
                    Plan::Leave(state.members.get(pending.node as usize).cloned().unwrap_or_default())
                }
                super::ring_state::ChangeKind::Remove => {
                    Plan::Remove(state.members.get(pending.node as usize).cloned().unwrap_or_default())
                }
            },
            _ if state.id_of(&self.me).is_none() => match &self.options.replace {
                Some(dead) => Plan::Replace(dead.clone()),
                None if self.options.join => Plan::Join,
                None => return,
            },
            _ => return,
        };
        self.driving.set(true);
        let membership = self.clone();
        glommio::spawn_local(async move {
            loop {
                match membership.drive(&plan).await {
                    Ok(report) => {
                        tracing::info!("ring change complete: {report:?}");
                        break;
                    }
                    Err(error) => {
                        let quiet = membership
                            .refusal_logged
                            .get()
                            .is_some_and(|at| at.elapsed() < Duration::from_secs(10));
                        if !quiet {
                            tracing::warn!("ring change ({plan:?}) not done yet: {error}; retrying");
                            membership.refusal_logged.set(Some(Instant::now()));
                        }
                        glommio::timer::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            membership.driving.set(false);
        })
        .detach();
    }

    /// An operator's decommission or removal, driven by this node; answered once complete.
    pub async fn change(
        self: &Rc<Self>,
        action: wire::MembershipAction,
        node: &str,
    ) -> Result<ChangeReport, String> {
        if self.driving.replace(true) {
            return Err("this node is driving another ring change already".into());
        }
        let plan = match action {
            wire::MembershipAction::REMOVE => {
                let up = {
                    let gossip = self.gossip.borrow();
                    gossip.is_up(node, self.now_us()) && gossip.state(node).is_some()
                };
                if up {
                    self.driving.set(false);
                    return Err(format!("{node} is up: decommission it instead (remove is for dead nodes)"));
                }
                Plan::Remove(node.to_string())
            }
            _ => Plan::Leave(node.to_string()),
        };
        let result = self.drive(&plan).await;
        self.driving.set(false);
        result
    }

    /// One change from start to end: agree on it as pending, then run `ChangeDriver`'s steps
    /// (barrier, transfers, barrier) and agree on its completion. Every step may be repeated
    /// after a crash (transfers merge, so copying twice is safe).
    async fn drive(&self, plan: &Plan) -> Result<ChangeReport, String> {
        let started = Instant::now();
        let me = self.me.clone();
        let pending = self.agree(&|state: &RingState| plan.apply(state, &me)).await?;
        let mut driver = ChangeDriver::new(pending)?;
        let mut report =
            ChangeReport { transfers: driver.transfers().len() as u64, ..ChangeReport::default() };
        let mut progress =
            StreamProgress { ranges_total: driver.transfers().len() as u32, ..StreamProgress::default() };
        self.gossip.borrow_mut().update_me(|state| state.stream = progress);
        let mut barrier_logged = Instant::now();
        let mut failures_logged = 0;
        loop {
            if !self.committed().is_some_and(|committed| driver.still_pending(&committed)) {
                return Err("the change is no longer pending".into());
            }
            let step = {
                let gossip = self.gossip.borrow();
                let now_us = self.now_us();
                driver.next(
                    &self.me,
                    |name| gossip.is_up(name, now_us),
                    |name| gossip.state(name).map(|state| state.ring_version),
                )
            };
            let name = |id: NodeId| driver.pending().members.get(id as usize).cloned().unwrap_or_default();
            match step {
                DriverStep::Complete => break,
                DriverStep::Barrier(behind) => {
                    if barrier_logged.elapsed() > Duration::from_secs(10) {
                        let version = driver.pending().version;
                        tracing::warn!("waiting for {} to hold ring version {version}", behind.join(", "));
                        barrier_logged = Instant::now();
                    }
                    glommio::timer::sleep(self.options.gossip.interval).await;
                }
                DriverStep::NoSource { index } => {
                    driver.failed(index);
                    glommio::timer::sleep(Duration::from_millis(200)).await;
                }
                DriverStep::Transfer { index, transfer, sources } => {
                    let target = name(transfer.target);
                    let sources: Vec<String> = sources.into_iter().map(name).collect();
                    match self.transfer(&target, transfer.partition, &sources).await {
                        Ok((keys, bytes)) => {
                            driver.transferred(index);
                            report.keys += keys;
                            report.bytes += bytes;
                            failures_logged = 0;
                        }
                        Err(error) => {
                            driver.failed(index);
                            failures_logged += 1;
                            if failures_logged % 10 == 1 {
                                tracing::warn!(
                                    "transfer of partition {} to {target}: {error}",
                                    transfer.partition
                                );
                            }
                            glommio::timer::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    }
                    // The throttle: no faster than the rate, on average since the start.
                    let due = Duration::from_secs_f64(
                        report.bytes as f64 / self.options.stream_bytes_per_s.max(1) as f64,
                    );
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        glommio::timer::sleep(wait).await;
                    }
                    progress.ranges_done = driver.transfers_done() as u32;
                    progress.bytes = report.bytes;
                    progress.elapsed_ms = started.elapsed().as_millis() as u64;
                    self.gossip.borrow_mut().update_me(|state| state.stream = progress);
                }
            }
        }
        let (change, pending_version) = (driver.change().clone(), driver.pending().version);
        let completed = self
            .agree(&|state: &RingState| ring_change::completion_of(state, &change, pending_version))
            .await?;
        report.ring_version = completed.version;
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        self.gossip.borrow_mut().update_me(|state| state.stream = StreamProgress::default());
        Ok(report)
    }

    /// Asks `target` to copy `partition` from `sources`: (keys, bytes) copied.
    async fn transfer(
        &self,
        target: &str,
        partition: usize,
        sources: &[String],
    ) -> Result<(u64, u64), String> {
        if sources.is_empty() {
            return Err("no live source".into());
        }
        let address = self.address_of(target).ok_or_else(|| format!("{target}'s address is unknown"))?;
        let joined = sources.join(",");
        let op = Op::Transfer { partition: partition as u32, sources: &joined };
        let timeout = Duration::from_secs(600);
        let request = PeerRequest { op, consistency: Consistency::ONE, context: &[], timeout };
        let response = self.peers.link(address).call(request).await.map_err(|error| error.to_string())?;
        if response.status != schema::Status::OK {
            return Err(format!("{target}: {:?} {}", response.status, response.message));
        }
        let figures: serde_json::Value = serde_json::from_str(response.stats_json.as_deref().unwrap_or("{}"))
            .map_err(|e| e.to_string())?;
        Ok((figures["keys"].as_u64().unwrap_or(0), figures["bytes"].as_u64().unwrap_or(0)))
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
