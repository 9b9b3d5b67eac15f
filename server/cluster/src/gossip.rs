//! Membership by gossip, sans-IO: scuttlebutt-style anti-entropy of per-node states, with a
//! phi-accrual failure detector per peer. Nothing here reads a clock, opens a socket or draws
//! from a random source it was not given: the caller passes the time and delivers messages,
//! and a seeded generator picks gossip partners, so a simulated cluster replays from its seed.
//!
//! Every node owns its state (address, shard count, status, load) and a heartbeat counter it
//! bumps each round; its generation (set at start, larger after each restart) orders states
//! across restarts. Each round a node sends a digest — (node, generation, heartbeat) for every
//! node it knows — to a few random peers, and to a seed while it knows no one else. The
//! receiver answers with the states the sender lacks or has older, and asks for those it
//! lacks; the sender answers that. A state seen with a newer heartbeat is a heartbeat for that
//! node's failure detector, wherever it came from. "Down" is each node's local judgement, not
//! gossiped: a node is down for me when its phi crosses the threshold.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::failure_detector::{FailureDetector, PHI_THRESHOLD_DEFAULT};
use crate::rng::Rng;

/// A node's name in the cluster: the id from its data directory.
pub type NodeName = String;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    Joining,
    Normal,
    Leaving,
    /// Decommissioned, removed or replaced: owns nothing.
    Left,
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// Larger after every restart (the start time in ms, say).
    pub generation: u64,
    /// Bumped by the node every round.
    pub heartbeat: u64,
    /// Where gossip reaches it: its shard 0's own port.
    pub address: String,
    pub status: NodeStatus,
    /// Shard i's own port; the shard count is the length.
    pub shard_ports: Vec<u16>,
    /// The client port (--listen), on the IP of `address`.
    pub client_port: u16,
    pub load_bytes: u64,
    /// The members of the cluster it belongs to, sorted, once formed (ring node i is
    /// `members[i]`); empty while forming.
    pub members: Vec<NodeName>,
    pub replica_count: u8,
    pub partition_bits: u8,
    /// The ring version it has committed (0 while forming).
    pub ring_version: u64,
    /// The ring change it drives, if any.
    pub stream: schema::peer::StreamProgress,
}

impl NodeState {
    fn version(&self) -> (u64, u64) {
        (self.generation, self.heartbeat)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Round opener: the version of every state the sender knows, and where to answer.
    Digest { from: NodeName, address: String, versions: Vec<(NodeName, u64, u64)> },
    /// The states the digest's sender lacks or has older, and the nodes the replier wants.
    Reply { from: NodeName, address: String, states: Vec<(NodeName, NodeState)>, wanted: Vec<NodeName> },
    /// The states asked for.
    States { from: NodeName, states: Vec<(NodeName, NodeState)> },
}

#[derive(Debug, Clone, Copy)]
pub struct GossipConfig {
    pub interval: Duration,
    /// Peers gossiped with per round.
    pub fanout: usize,
    pub phi_threshold: f64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        // Heartbeats reach a peer second-hand, every round or two: with 100 ms rounds a
        // silent node is down for everyone within about 4 s (simulated, 5 nodes, 10 % loss),
        // and a 1 s pause keeps phi under half the threshold of 8.
        GossipConfig { interval: Duration::from_millis(100), fanout: 2, phi_threshold: PHI_THRESHOLD_DEFAULT }
    }
}

/// One node's view of the cluster.
pub struct Gossip {
    me: NodeName,
    config: GossipConfig,
    rng: Rng,
    seeds: Vec<String>,
    states: BTreeMap<NodeName, NodeState>,
    detectors: BTreeMap<NodeName, FailureDetector>,
}

/// Where to send a message: a peer's address.
pub type Outgoing = (String, Message);

impl Gossip {
    /// `seeds` are addresses of nodes to contact while this one knows no other.
    pub fn new(
        me: NodeName,
        state: NodeState,
        seeds: Vec<String>,
        config: GossipConfig,
        seed: u64,
    ) -> Gossip {
        let mut states = BTreeMap::new();
        let seeds = seeds.into_iter().filter(|address| *address != state.address).collect();
        states.insert(me.clone(), state);
        Gossip { me, config, rng: Rng::new(seed), seeds, states, detectors: BTreeMap::new() }
    }

    /// Replaces the seed addresses (once they are known).
    pub fn set_seeds(&mut self, seeds: Vec<String>) {
        let me = self.my_address();
        self.seeds = seeds.into_iter().filter(|address| *address != me).collect();
    }

    pub fn state(&self, node: &str) -> Option<&NodeState> {
        self.states.get(node)
    }

    /// Every node known, this one included.
    pub fn members(&self) -> impl Iterator<Item = (&NodeName, &NodeState)> {
        self.states.iter()
    }

    /// Whether `node` is up as far as this node can tell at `now_us` (itself always is).
    pub fn is_up(&self, node: &str, now_us: u64) -> bool {
        node == self.me
            || self.detectors.get(node).is_some_and(|d| !d.is_down(now_us, self.config.phi_threshold))
    }

    /// Changes this node's own state (status, load); it spreads with the next rounds.
    pub fn update_me(&mut self, change: impl FnOnce(&mut NodeState)) {
        if let Some(state) = self.states.get_mut(&self.me) {
            change(state);
        }
    }

    /// One round, due every `config.interval`: bumps the heartbeat and opens gossip with up
    /// to `fanout` random live peers, and with a random seed while no peer is known.
    pub fn tick(&mut self, now_us: u64) -> Vec<Outgoing> {
        if let Some(state) = self.states.get_mut(&self.me) {
            state.heartbeat += 1;
        }
        let mut peers: Vec<String> = self
            .states
            .iter()
            .filter(|(name, _)| **name != self.me && self.is_up(name, now_us))
            .map(|(_, state)| state.address.clone())
            .collect();
        let mut targets = Vec::new();
        while targets.len() < self.config.fanout && !peers.is_empty() {
            let pick = self.rng.below(peers.len() as u64) as usize;
            targets.push(peers.swap_remove(pick));
        }
        // Now and then one node believed down is tried too: a node that restarted (or a
        // partition that healed) is heard again even when nobody it knows is its seed.
        let down: Vec<String> = self
            .states
            .iter()
            .filter(|(name, _)| **name != self.me && !self.is_up(name, now_us))
            .map(|(_, state)| state.address.clone())
            .collect();
        if !down.is_empty() && self.rng.below(5) == 0 {
            targets.push(down[self.rng.below(down.len() as u64) as usize].clone());
        }
        // A node that knows nobody asks a seed; one that does still asks a seed now and then,
        // so that two halves that formed apart find each other.
        let known = self.states.len() > 1;
        if !self.seeds.is_empty() && (!known || self.rng.below(10) == 0) {
            let seed = self.seeds[self.rng.below(self.seeds.len() as u64) as usize].clone();
            if !targets.contains(&seed) {
                targets.push(seed);
            }
        }
        let digest = self.digest();
        targets.into_iter().map(|address| (address, digest.clone())).collect()
    }

    fn digest(&self) -> Message {
        let versions = self
            .states
            .iter()
            .map(|(name, state)| (name.clone(), state.generation, state.heartbeat))
            .collect();
        Message::Digest { from: self.me.clone(), address: self.my_address(), versions }
    }

    fn my_address(&self) -> String {
        self.states.get(&self.me).map(|state| state.address.clone()).unwrap_or_default()
    }

    /// Handles a message that arrived at `now_us`; returns what to send back.
    pub fn receive(&mut self, now_us: u64, message: Message) -> Vec<Outgoing> {
        match message {
            Message::Digest { from: _, address, versions } => {
                let theirs: BTreeMap<&NodeName, (u64, u64)> = versions
                    .iter()
                    .map(|(name, generation, heartbeat)| (name, (*generation, *heartbeat)))
                    .collect();
                let states = self
                    .states
                    .iter()
                    .filter(|(name, state)| theirs.get(name).is_none_or(|&version| version < state.version()))
                    .map(|(name, state)| (name.clone(), state.clone()))
                    .collect();
                let wanted = versions
                    .iter()
                    .filter(|(name, generation, heartbeat)| {
                        self.states.get(name).is_none_or(|state| state.version() < (*generation, *heartbeat))
                    })
                    .map(|(name, _, _)| name.clone())
                    .collect();
                let reply =
                    Message::Reply { from: self.me.clone(), address: self.my_address(), states, wanted };
                vec![(address, reply)]
            }
            Message::Reply { from: _, address, states, wanted } => {
                self.merge(now_us, states);
                if wanted.is_empty() {
                    return Vec::new();
                }
                let states = wanted
                    .into_iter()
                    .filter_map(|name| self.states.get(&name).map(|state| (name, state.clone())))
                    .collect();
                let answer = Message::States { from: self.me.clone(), states };
                vec![(address, answer)]
            }
            Message::States { states, .. } => {
                self.merge(now_us, states);
                Vec::new()
            }
        }
    }

    fn merge(&mut self, now_us: u64, states: Vec<(NodeName, NodeState)>) {
        for (name, state) in states {
            if name == self.me {
                continue; // nobody knows this node better than itself
            }
            let newer = self.states.get(&name).is_none_or(|known| known.version() < state.version());
            if !newer {
                continue;
            }
            let interval = self.config.interval;
            self.detectors
                .entry(name.clone())
                .or_insert_with(|| FailureDetector::new(interval))
                .heartbeat(now_us);
            self.states.insert(name, state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::hash::{Hash, Hasher};

    const NODE_COUNT: usize = 5;
    const STEP_US: u64 = 10_000;

    fn address(i: usize) -> String {
        format!("127.0.0.{}:7400", i + 1)
    }

    /// A simulated network: messages take 1-20 ms, some are lost; a node can be stopped
    /// (killed: silent, messages to it lost) or paused (silent, messages to it held until it
    /// resumes, as SIGSTOP does).
    struct Cluster {
        nodes: Vec<Gossip>,
        rng: Rng,
        in_flight: Vec<(u64, usize, Message)>,
        killed: BTreeSet<usize>,
        paused_until_us: BTreeMap<usize, u64>,
        loss_per_million: u32,
        trace: std::hash::DefaultHasher,
    }

    impl Cluster {
        fn new(seed: u64, loss_per_million: u32) -> Cluster {
            let nodes = (0..NODE_COUNT)
                .map(|i| {
                    let state = NodeState {
                        generation: 1,
                        heartbeat: 0,
                        address: address(i),
                        status: NodeStatus::Normal,
                        shard_ports: vec![1],
                        client_port: 0,
                        load_bytes: 0,
                        members: Vec::new(),
                        replica_count: 3,
                        partition_bits: 8,
                        ring_version: 0,
                        stream: Default::default(),
                    };
                    Gossip::new(
                        format!("node-{i}"),
                        state,
                        vec![address(0)],
                        GossipConfig::default(),
                        seed ^ i as u64,
                    )
                })
                .collect();
            Cluster {
                nodes,
                rng: Rng::new(seed),
                in_flight: Vec::new(),
                killed: BTreeSet::new(),
                paused_until_us: BTreeMap::new(),
                loss_per_million,
                trace: Default::default(),
            }
        }

        fn send(&mut self, now_us: u64, outgoing: Vec<Outgoing>) {
            for (to, message) in outgoing {
                let Some(to) = (0..NODE_COUNT).find(|&i| address(i) == to) else { continue };
                if self.rng.chance(self.loss_per_million) || self.killed.contains(&to) {
                    continue;
                }
                let arrival = now_us + 1_000 + self.rng.below(19_000);
                format!("{to}{message:?}").hash(&mut self.trace);
                self.in_flight.push((arrival, to, message));
            }
        }

        fn awake(&self, node: usize, now_us: u64) -> bool {
            !self.killed.contains(&node)
                && self.paused_until_us.get(&node).is_none_or(|&until| now_us >= until)
        }

        /// Runs until `until_us`, one 10 ms step at a time.
        fn run(&mut self, from_us: u64, until_us: u64) {
            let rounds = GossipConfig::default().interval.as_micros() as u64 / STEP_US;
            let mut now_us = from_us;
            while now_us < until_us {
                now_us += STEP_US;
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
                    .into_iter()
                    .partition(|(arrival, to, _)| *arrival <= now_us && self.awake(*to, now_us));
                self.in_flight = later;
                for (_, to, message) in due {
                    if self.killed.contains(&to) {
                        continue;
                    }
                    let replies = self.nodes[to].receive(now_us, message);
                    self.send(now_us, replies);
                }
                for node in 0..NODE_COUNT {
                    // Rounds are staggered: node i ticks at its own offset.
                    if self.awake(node, now_us) && (now_us / STEP_US + node as u64).is_multiple_of(rounds) {
                        let outgoing = self.nodes[node].tick(now_us);
                        self.send(now_us, outgoing);
                    }
                }
            }
        }

        fn everyone_knows_everyone(&self) -> bool {
            self.nodes.iter().all(|node| node.members().count() == NODE_COUNT)
        }
    }

    /// Five nodes that know only the first one's address converge within 5 s; a killed node
    /// is down for every other within 5 s, a node paused for 1 s is down for none; 10 % of
    /// messages lost throughout. The same seed gives the same message trace.
    #[test]
    fn five_nodes_converge_detect_a_kill_and_tolerate_a_pause() {
        let mut traces = Vec::new();
        let (mut slowest_convergence, mut slowest_detection) = (0, 0);
        let seeds: Vec<u64> = (0..50).chain([0]).collect();
        for &seed in &seeds {
            let mut cluster = Cluster::new(seed, 100_000);
            let mut converged_at = None;
            for step in 1..=50 {
                cluster.run((step - 1) * 100_000, step * 100_000);
                if cluster.everyone_knows_everyone() {
                    converged_at = Some(step * 100_000);
                    break;
                }
            }
            let converged_at = converged_at.unwrap_or_else(|| panic!("seed {seed}: no convergence in 5 s"));
            // Pause node 4 for 1 s, then kill node 3.
            let pause_at = converged_at + 2_000_000;
            cluster.run(converged_at, pause_at);
            cluster.paused_until_us.insert(4, pause_at + 1_000_000);
            cluster.run(pause_at, pause_at + 3_000_000);
            let kill_at = pause_at + 3_000_000;
            cluster.killed.insert(3);
            let mut detected_at = None;
            for step in 1..=50 {
                let now = kill_at + step * 100_000;
                cluster.run(now - 100_000, now);
                for observer in [0, 1, 2, 4] {
                    assert!(
                        cluster.nodes[observer].is_up("node-4", now),
                        "seed {seed}: paused node 4 marked down"
                    );
                }
                if [0, 1, 2, 4].iter().all(|&observer| !cluster.nodes[observer].is_up("node-3", now)) {
                    detected_at = Some(now);
                    break;
                }
            }
            let detected_at =
                detected_at.unwrap_or_else(|| panic!("seed {seed}: node 3 not down within 5 s"));
            slowest_convergence = slowest_convergence.max(converged_at / 1000);
            slowest_detection = slowest_detection.max((detected_at - kill_at) / 1000);
            traces.push(cluster.trace.finish());
        }
        println!(
            "gossip: 50 seeds, 5 nodes, 10 % loss: converged within {slowest_convergence} ms, a kill detected by \
             all within {slowest_detection} ms, a 1 s pause never marked down"
        );
        assert_eq!(traces[0], traces[50], "the same seed must replay the same messages");
        assert_ne!(traces[0], traces[1]);
    }
}
