//! Linearizable CAS in a whole simulated cluster, deterministic from a seed: clients run CAS
//! and SERIAL reads through random nodes while the network loses, duplicates, delays and
//! reorders messages, nodes are cut off and crash and restart (their acceptor state and data
//! durable, their proposers lost). Every operation's invocation, answer and times go into a
//! per-key history, which the Wing-Gong-Lowe checker (`linearizability.rs`) must explain; an
//! operation whose proposer died or that timed out after proposing counts as "may or may not
//! have happened".
//!
//! The ring changes meanwhile: node 4 starts outside it and joins, then node 1 is
//! decommissioned (`ring_state.rs` plans both). Each node serves from its own view of the
//! ring, which reaches it after a delay; a proposer includes the key's pending replicas as its
//! view shows them (`Proposer::new_with_pending`); once every node that is up holds the
//! pending ring (the barrier), transfers copy the moving partitions' versions and acceptor
//! state from the displaced replica, or, when it cannot be reached, from every other old
//! replica; after a change completes, nodes hand the keys they no longer
//! replicate to the current replicas. (Found here: a transfer from one reachable replica in
//! place of the unreachable displaced one copied a stale state, and the key went back in time;
//! and without the barrier, a proposer still placed by the old ring chose a value on the old
//! replicas after the copy was taken.)
//!
//! The proposers and acceptors are the real ones (`paxos.rs`); only the network and the
//! clock are simulated. `SIM_SEEDS=n` runs n seeds (default 500); `SIM_SEED=s` replays one.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::hash::{Hash, Hasher};

use crate::hand_off::KeyHandOff;
use crate::linearizability::{self, Event, Operation, Outcome};
use crate::paxos::{
    backoff_us, next_ballot, refuses_stale_proposer, Acceptor, Ballot, Failure, Proposer, Step,
};
use crate::record::Value as Stored;
use crate::ring::NodeId;
use crate::ring_change::DriverStep;
use crate::ring_state::RingState;
use crate::rng::Rng;
use crate::serial_op::{decide, newest_live, Decision, SerialAnswer, SerialOp};
use crate::sim_ring::{believed_up, RingMessage, SimRing};
use crate::versions::Versions;

const NODE_COUNT: u32 = 5;
const REPLICAS: usize = 3;
const KEY_COUNT: u32 = 3;
const CLIENT_COUNT: u32 = 6;
const PHASE_TIMEOUT_US: u64 = 20_000;
const OPERATION_TIMEOUT_US: u64 = 300_000;
/// Clients start operations until then; faults stop then too.
const LOAD_US: u64 = 1_000_000;

/// A client's value (the histories hold these); stored as its 8 bytes, never expiring.
type Value = u64;
/// A key's acceptor state and versions, as a node stores them.
type Record = (Acceptor<Stored>, Versions<Stored>);

fn stored_bytes(value: Value) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

fn value_of(bytes: &[u8]) -> Value {
    let mut le = [0; 8];
    le.copy_from_slice(bytes);
    u64::from_le_bytes(le)
}

#[derive(Debug, Clone)]
enum Message {
    Request {
        op: u64,
        phase_id: u64,
        phase: Phase,
        key: u32,
        ballot: Ballot,
        proposal: Box<Versions<Stored>>,
        /// The ring version that placed the proposer.
        ring_version: u64,
    },
    Answer {
        op: u64,
        phase_id: u64,
        phase: Phase,
        record: Box<(Acceptor<Stored>, Versions<Stored>)>,
    },
    Ring(RingMessage),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Phase {
    Read,
    Prepare,
    Propose,
    Commit,
}

#[derive(Debug)]
enum Timer {
    Deliver {
        from: NodeId,
        to: NodeId,
        message: Message,
    },
    PhaseTimeout {
        op: u64,
        phase_id: u64,
    },
    Backoff {
        op: u64,
    },
    ClientNext {
        client: u32,
    },
    /// A ring phase's answers are due, or an agreement's backoff ends.
    Ring {
        id: u64,
    },
    /// Every node that is up asks a random peer which ring it holds.
    Gossip,
    /// The pending change's transfers and completion make progress.
    ChangeStep,
    /// Nodes hand off the keys they no longer replicate.
    HandOff,
}

#[derive(Default)]
struct Node {
    up: bool,
    records: BTreeMap<u32, Record>,
    /// The persisted lease.
    counter: u64,
    /// This node's clock runs this far ahead of true time (skew).
    clock_skew_us: u64,
}

struct Running {
    client: u32,
    node: NodeId,
    key: u32,
    operation: Operation<Value>,
    proposer: Proposer<Stored, Outcome<Value>>,
    start_us: u64,
    /// The ring version its node placed it by.
    ring_version: u64,
}

struct Simulation {
    rng: Rng,
    /// Every node's ring acceptor, and the change being agreed or driven.
    ring: SimRing,
    nodes: Vec<Node>,
    now_us: u64,
    timers: BinaryHeap<Reverse<(u64, u64)>>,
    timer_bodies: BTreeMap<u64, Timer>,
    sequence: u64,
    running: BTreeMap<u64, Running>,
    next_op: u64,
    next_value: Value,
    /// What each client last saw of each key: its next CAS expects it.
    seen: BTreeMap<(u32, u32), Option<Value>>,
    histories: BTreeMap<u32, Vec<Event<Value>>>,
    partitioned: BTreeSet<NodeId>,
    loss_per_million: u32,
    duplicate_per_million: u32,
    trace: std::hash::DefaultHasher,
}

impl Simulation {
    fn new(seed: u64) -> Simulation {
        let mut rng = Rng::new(seed);
        // Node 4 starts outside the ring: it joins during the run.
        let members: Vec<String> = (0..NODE_COUNT - 1).map(|i| format!("n{i}")).collect();
        let formed = RingState::formed(members, REPLICAS, 4).expect("ring");
        let nodes = (0..NODE_COUNT)
            .map(|_| Node { up: true, clock_skew_us: rng.below(5_000), ..Node::default() })
            .collect();
        let names = (0..NODE_COUNT).map(|i| format!("n{i}")).collect();
        Simulation {
            ring: SimRing::new(names, &formed, seed ^ 0x5eed),
            rng,
            nodes,
            now_us: 0,
            timers: BinaryHeap::new(),
            timer_bodies: BTreeMap::new(),
            sequence: 0,
            running: BTreeMap::new(),
            next_op: 1,
            next_value: 1,
            seen: BTreeMap::new(),
            histories: BTreeMap::new(),
            partitioned: BTreeSet::new(),
            loss_per_million: 50_000,
            duplicate_per_million: 20_000,
            trace: std::hash::DefaultHasher::new(),
        }
    }

    fn at(&mut self, time_us: u64, timer: Timer) {
        self.sequence += 1;
        self.timers.push(Reverse((time_us, self.sequence)));
        self.timer_bodies.insert(self.sequence, timer);
    }

    fn connected(&self, a: NodeId, b: NodeId) -> bool {
        self.partitioned.contains(&a) == self.partitioned.contains(&b)
    }

    fn send(&mut self, from: NodeId, to: NodeId, message: Message) {
        if from == to {
            let arrival = self.now_us + 10;
            self.at(arrival, Timer::Deliver { from, to, message });
            return;
        }
        if !self.connected(from, to) || self.rng.chance(self.loss_per_million) {
            return;
        }
        let copies = if self.rng.chance(self.duplicate_per_million) { 2 } else { 1 };
        for _ in 0..copies {
            let arrival = self.now_us + 100 + self.rng.below(3_000);
            self.at(arrival, Timer::Deliver { from, to, message: message.clone() });
        }
    }

    /// The replicas of `key` and its pending replicas, as `node` sees the ring.
    fn replicas_seen_by(&self, node: NodeId, key: u32) -> (Vec<NodeId>, Vec<NodeId>) {
        self.ring.committed(node).replicas(&key.to_le_bytes())
    }

    /// Carries what the ring's machines sent and sets the timers they asked for.
    fn flush_ring(&mut self) {
        for (from, to, message) in std::mem::take(&mut self.ring.outbox) {
            if self.nodes[from as usize].up {
                self.send(from, to, Message::Ring(message));
            }
        }
        for timer in std::mem::take(&mut self.ring.timers) {
            self.at(self.now_us + timer.delay_us, Timer::Ring { id: timer.id });
        }
    }

    /// Starts a change when it is due (node 4 joins, then node 1 is decommissioned, driven by
    /// node 0), and runs the driver's steps: the barrier, the transfers (a partition's records
    /// merged into the target at once, when every source is reachable from it), completion.
    fn change_step(&mut self) {
        let up: Vec<bool> = self.nodes.iter().map(|node| node.up).collect();
        self.ring.start_scripted_change(self.now_us >= 200_000, self.now_us >= 500_000, &up, self.now_us);
        let partitioned = self.partitioned.clone();
        let believed_up = believed_up(&up, &partitioned);
        let changes = self.ring.changes;
        for _ in 0..8 {
            let Some((_, step)) = self.ring.driver_step(&believed_up, self.now_us) else { break };
            match step {
                DriverStep::Transfer { index, transfer, sources } => {
                    let target = transfer.target;
                    if !self.nodes[target as usize].up || self.rng.below(3) == 0 {
                        break;
                    }
                    if !sources.iter().all(|&s| self.nodes[s as usize].up && self.connected(target, s)) {
                        self.ring.transfer_failed(index);
                        break;
                    }
                    let ring = self.ring.driving().expect("driving").ring().expect("ring");
                    for source in sources {
                        let copied: Vec<(u32, Record)> = self.nodes[source as usize]
                            .records
                            .iter()
                            .filter(|(&key, _)| ring.partition_of(&key.to_le_bytes()) == transfer.partition)
                            .map(|(&key, record)| (key, record.clone()))
                            .collect();
                        for (key, (acceptor, versions)) in copied {
                            let (mine, stored) = self.nodes[target as usize].records.entry(key).or_default();
                            mine.absorb(&acceptor);
                            stored.merge(&versions);
                        }
                    }
                    self.ring.transferred(index);
                }
                DriverStep::NoSource { index } => {
                    self.ring.transfer_failed(index);
                    break;
                }
                DriverStep::Barrier(_) | DriverStep::Complete => break,
            }
        }
        self.flush_ring();
        if self.ring.changes > changes {
            self.at(self.now_us + 60_000, Timer::HandOff);
        }
        if self.now_us < LOAD_US + OPERATION_TIMEOUT_US {
            self.at(self.now_us + 10_000, Timer::ChangeStep);
        }
    }

    /// Gossip: every node that is up asks a random peer for its ring.
    fn gossip(&mut self) {
        for node in 0..NODE_COUNT {
            if self.nodes[node as usize].up {
                let peer = self.rng.below(u64::from(NODE_COUNT)) as NodeId;
                self.ring.gossip(node, peer);
            }
        }
        self.flush_ring();
        if self.now_us < LOAD_US + 2 * OPERATION_TIMEOUT_US {
            self.at(self.now_us + 50_000, Timer::Gossip);
        }
    }

    /// Nodes hand the versions of keys they no longer replicate to the current replicas and
    /// forget them (acceptor state included).
    fn hand_off(&mut self) {
        for node in 0..NODE_COUNT {
            if !self.nodes[node as usize].up {
                continue;
            }
            let keys: Vec<u32> = self.nodes[node as usize].records.keys().copied().collect();
            for key in keys {
                let (replicas, pending) = self.replicas_seen_by(node, key);
                if replicas.contains(&node) || pending.contains(&node) {
                    continue;
                }
                if !replicas.iter().all(|&r| self.nodes[r as usize].up && self.connected(node, r)) {
                    continue;
                }
                // Delivered at once: every replica acknowledges what was sent.
                let versions = self.nodes[node as usize].records[&key].1.clone();
                let mut handing = KeyHandOff::new(versions.clone());
                for &replica in &replicas {
                    self.nodes[replica as usize].records.entry(key).or_default().1.merge(&versions);
                    handing.acknowledged(replica, &versions);
                }
                if handing.may_drop(node, &replicas, &versions) {
                    self.nodes[node as usize].records.remove(&key);
                }
            }
        }
    }

    fn client_next(&mut self, client: u32) {
        if self.now_us >= LOAD_US {
            return;
        }
        let node = self.rng.below(u64::from(NODE_COUNT)) as NodeId;
        if !self.nodes[node as usize].up {
            let retry = self.now_us + 1_000;
            self.at(retry, Timer::ClientNext { client });
            return;
        }
        let key = self.rng.below(u64::from(KEY_COUNT)) as u32;
        let operation = if self.rng.below(5) < 2 {
            Operation::Read
        } else {
            let expected =
                if self.rng.below(4) == 0 { None } else { self.seen.get(&(client, key)).copied().flatten() };
            self.next_value += 1;
            Operation::Cas { expected, new: self.next_value }
        };
        let op = self.next_op;
        self.next_op += 1;
        let (replicas, pending) = self.replicas_seen_by(node, key);
        let commit_wait = if self.rng.below(2) == 0 { 0 } else { 2 };
        let proposer = Proposer::new_with_pending(&replicas, &pending, commit_wait);
        let reading = operation == Operation::Read;
        let ring_version = self.ring.committed(node).version;
        let start_us = self.now_us;
        self.running.insert(op, Running { client, node, key, operation, proposer, start_us, ring_version });
        let first = if reading {
            let live: Vec<bool> =
                (0..NODE_COUNT).map(|n| self.nodes[n as usize].up && self.connected(node, n)).collect();
            self.running.get_mut(&op).expect("running").proposer.start_read(|n| live[n as usize])
        } else {
            Step::Retry { attempt: 0 }
        };
        self.drive(op, first);
    }

    /// Ends `op`: records it (unless it surely had no effect) and lets its client go on.
    fn finish(&mut self, op: u64, outcome: Option<Outcome<Value>>) {
        let Some(running) = self.running.remove(&op) else { return };
        let outcome = match outcome {
            Some(outcome) => outcome,
            None if running.proposer.may_have_written() => Outcome::Unknown,
            None => {
                let next = self.now_us + 1_000;
                self.at(next, Timer::ClientNext { client: running.client });
                return;
            }
        };
        match &outcome {
            Outcome::Read(seen) | Outcome::CasFailed(seen) => {
                self.seen.insert((running.client, running.key), *seen);
            }
            Outcome::CasApplied => {
                if let Operation::Cas { new, .. } = running.operation {
                    self.seen.insert((running.client, running.key), Some(new));
                }
            }
            // The simulated clients only read and CAS.
            Outcome::Unknown | Outcome::Written { .. } | Outcome::Incremented(_) => {}
        }
        let end = if outcome == Outcome::Unknown { u64::MAX } else { self.now_us };
        self.histories.entry(running.key).or_default().push(Event {
            start: running.start_us,
            end,
            operation: running.operation,
            outcome,
        });
        let next = self.now_us + 1 + self.rng.below(2_000);
        self.at(next, Timer::ClientNext { client: running.client });
    }

    fn drive(&mut self, op: u64, mut step: Step<Stored, Outcome<Value>>) {
        loop {
            let Some(running) = self.running.get_mut(&op) else { return };
            if self.now_us >= running.start_us + OPERATION_TIMEOUT_US {
                self.finish(op, None);
                return;
            }
            let (node, key) = (running.node, running.key);
            step = match step {
                Step::Wait => return,
                Step::Done(Ok(outcome)) => {
                    self.finish(op, Some(outcome));
                    return;
                }
                Step::Done(Err(Failure::Indeterminate)) => {
                    self.finish(op, Some(Outcome::Unknown));
                    return;
                }
                Step::Done(Err(_)) => {
                    self.finish(op, None);
                    return;
                }
                Step::Retry { attempt } if attempt > 0 => {
                    let pause = backoff_us(attempt, self.rng.below(u64::MAX));
                    self.at(self.now_us + pause, Timer::Backoff { op });
                    return;
                }
                Step::Retry { .. } => {
                    let me = &mut self.nodes[node as usize];
                    me.counter += 1;
                    let clock = self.now_us + me.clock_skew_us;
                    let ballot = next_ballot(running.proposer.floor(), clock, node, me.counter);
                    let live: Vec<bool> = (0..NODE_COUNT)
                        .map(|n| self.nodes[n as usize].up && self.connected(node, n))
                        .collect();
                    let running = self.running.get_mut(&op).expect("running");
                    running.proposer.start(ballot, |n| live[n as usize])
                }
                Step::Read { phase, to } => {
                    self.broadcast(
                        op,
                        node,
                        key,
                        phase,
                        Phase::Read,
                        Ballot::default(),
                        Versions::default(),
                        &to,
                    );
                    Step::Wait
                }
                Step::Prepare { phase, ballot, to } => {
                    self.broadcast(op, node, key, phase, Phase::Prepare, ballot, Versions::default(), &to);
                    Step::Wait
                }
                Step::Propose { phase, ballot, proposal, to } => {
                    self.broadcast(op, node, key, phase, Phase::Propose, ballot, proposal, &to);
                    Step::Wait
                }
                Step::Commit { phase, ballot, proposal, to } => {
                    self.broadcast(op, node, key, phase, Phase::Commit, ballot, proposal, &to);
                    self.running.get_mut(&op).expect("running").proposer.commits_sent()
                }
                Step::Decide { state } => {
                    // The runtime's decision (`serial_op::decide`), on the node's clock.
                    let now_ms = (self.now_us + self.nodes[node as usize].clock_skew_us) / 1000;
                    let running = self.running.get_mut(&op).expect("running");
                    let serial_op = match running.operation.clone() {
                        Operation::Read => {
                            SerialOp::Read { metadata_only: false, sibling_skip: 0, shown_before: None }
                        }
                        Operation::Cas { expected, new } => SerialOp::Cas {
                            expected: expected.map(stored_bytes),
                            new_value: stored_bytes(new),
                            ttl_ms: 0,
                            context: None,
                        },
                        Operation::Write(_) | Operation::Increment => {
                            unreachable!("the simulated clients only read and CAS")
                        }
                    };
                    match decide(&serial_op, &state, now_ms) {
                        Decision { write: None, answer: SerialAnswer::Read(_) } => {
                            let current = newest_live(&state, now_ms).map(|(bytes, _, _)| value_of(bytes));
                            running.proposer.answer(Outcome::Read(current))
                        }
                        Decision { write: None, answer: SerialAnswer::CasFailed(seen) } => {
                            let current = seen.map(|seen| value_of(&seen.value));
                            running.proposer.answer(Outcome::CasFailed(current))
                        }
                        Decision { write: Some((value, ttl_ms)), answer: SerialAnswer::Done } => {
                            let me = &mut self.nodes[node as usize];
                            me.counter += 1;
                            let timestamp = self.now_us + me.clock_skew_us;
                            let mut proposal = state.clone();
                            let expires_at_ms = if ttl_ms == 0 { 0 } else { timestamp / 1000 + ttl_ms };
                            let value = value.map(|bytes| (bytes, expires_at_ms));
                            let dot =
                                proposal.write(node, me.counter, Some(state.context()), value, timestamp);
                            let running = self.running.get_mut(&op).expect("running");
                            running.proposer.write(proposal, dot, Outcome::CasApplied)
                        }
                        other => unreachable!("a read or a CAS decided {other:?}"),
                    }
                }
            };
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn broadcast(
        &mut self,
        op: u64,
        from: NodeId,
        key: u32,
        phase_id: u64,
        phase: Phase,
        ballot: Ballot,
        proposal: Versions<Stored>,
        to: &[NodeId],
    ) {
        let ring_version = self.running.get(&op).map_or(0, |running| running.ring_version);
        for &node in to {
            let message = Message::Request {
                op,
                phase_id,
                phase,
                key,
                ballot,
                proposal: Box::new(proposal.clone()),
                ring_version,
            };
            self.send(from, node, message);
        }
        self.at(self.now_us + PHASE_TIMEOUT_US, Timer::PhaseTimeout { op, phase_id });
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, message: Message) {
        if !self.nodes[to as usize].up {
            return;
        }
        match message {
            Message::Ring(message) => {
                (self.now_us, from, to, message.kind()).hash(&mut self.trace);
                self.ring.deliver(from, to, message, self.now_us);
                self.flush_ring();
            }
            Message::Request { op, phase_id, phase, key, ballot, proposal, ring_version } => {
                if refuses_stale_proposer(ring_version, self.ring.committed(to).version) {
                    (self.now_us, from, to, 2u8, phase).hash(&mut self.trace);
                    return;
                }
                (self.now_us, from, to, 0u8, phase).hash(&mut self.trace);
                let (acceptor, versions) = self.nodes[to as usize].records.entry(key).or_default();
                match phase {
                    Phase::Read => false,
                    Phase::Prepare => acceptor.prepare(ballot),
                    Phase::Propose => acceptor.accept(ballot, &proposal),
                    Phase::Commit => acceptor.commit(ballot, &proposal, versions),
                };
                let record = Box::new((acceptor.clone(), versions.clone()));
                self.send(to, from, Message::Answer { op, phase_id, phase, record });
            }
            Message::Answer { op, phase_id, phase, record } => {
                (self.now_us, from, to, 1u8, phase).hash(&mut self.trace);
                let Some(running) = self.running.get_mut(&op) else { return };
                if running.node != to {
                    return;
                }
                let (acceptor, versions) = &*record;
                let step = match phase {
                    Phase::Read | Phase::Prepare => {
                        running.proposer.on_promise(phase_id, from, Some((acceptor, versions)))
                    }
                    Phase::Propose => running.proposer.on_accept(phase_id, from, Some(acceptor)),
                    Phase::Commit => running.proposer.on_commit(phase_id, from, true),
                };
                self.drive(op, step);
            }
        }
    }

    fn crash(&mut self, node: NodeId) {
        self.nodes[node as usize].up = false;
        self.ring.crash(node);
        let lost: Vec<u64> = self.running.iter().filter(|(_, r)| r.node == node).map(|(&op, _)| op).collect();
        for op in lost {
            self.finish(op, None);
        }
    }

    fn run_until(&mut self, until_us: u64) {
        while let Some(Reverse((at, sequence))) = self.timers.peek().copied() {
            if at > until_us {
                break;
            }
            self.timers.pop();
            self.now_us = at;
            let Some(timer) = self.timer_bodies.remove(&sequence) else { continue };
            match timer {
                Timer::Deliver { from, to, message } => self.deliver(from, to, message),
                Timer::PhaseTimeout { op, phase_id } => {
                    if let Some(running) = self.running.get_mut(&op) {
                        let step = running.proposer.on_phase_timeout(phase_id);
                        self.drive(op, step);
                    }
                }
                Timer::Backoff { op } => self.drive(op, Step::Retry { attempt: 0 }),
                Timer::ClientNext { client } => self.client_next(client),
                Timer::Ring { id } => {
                    self.ring.timeout(id, self.now_us);
                    self.flush_ring();
                }
                Timer::Gossip => self.gossip(),
                Timer::ChangeStep => self.change_step(),
                Timer::HandOff => self.hand_off(),
            }
        }
        self.now_us = until_us;
    }
}

/// What one run ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunOutcome {
    operations: u64,
    applied: u64,
    unknown: u64,
    changes: u64,
    trace_hash: u64,
}

fn run(seed: u64) -> RunOutcome {
    let mut sim = Simulation::new(seed);
    for client in 0..CLIENT_COUNT {
        sim.at(u64::from(client) * 100, Timer::ClientNext { client });
    }
    sim.at(10_000, Timer::ChangeStep);
    sim.at(5_000, Timer::Gossip);
    let mut partition_until = 0;
    while sim.now_us < LOAD_US {
        let step_end = sim.now_us + 5_000;
        if sim.rng.below(30) == 0 {
            let node = sim.rng.below(u64::from(NODE_COUNT)) as NodeId;
            if sim.nodes[node as usize].up {
                sim.crash(node);
            } else {
                sim.nodes[node as usize].up = true;
            }
        }
        if sim.partitioned.is_empty() && sim.rng.below(40) == 0 {
            for _ in 0..1 + sim.rng.below(2) {
                sim.partitioned.insert(sim.rng.below(u64::from(NODE_COUNT)) as NodeId);
            }
            partition_until = sim.now_us + 20_000 + sim.rng.below(100_000);
        } else if sim.now_us >= partition_until {
            sim.partitioned.clear();
        }
        sim.run_until(step_end);
    }
    // Faults stop; the operations in flight finish or time out.
    for node in &mut sim.nodes {
        node.up = true;
    }
    sim.partitioned.clear();
    sim.loss_per_million = 0;
    sim.duplicate_per_million = 0;
    sim.run_until(LOAD_US + 2 * OPERATION_TIMEOUT_US);
    assert!(sim.running.is_empty(), "seed {seed}: operations still running after their deadline");

    let (mut operations, mut applied, mut unknown) = (0, 0, 0);
    for (key, history) in &sim.histories {
        if let Err(error) = linearizability::check(history, None) {
            panic!("seed {seed}: key {key}: {error}; replay with SIM_SEED={seed}\n{history:#?}");
        }
        operations += history.len() as u64;
        applied += history.iter().filter(|e| e.outcome == Outcome::CasApplied).count() as u64;
        unknown += history.iter().filter(|e| e.outcome == Outcome::Unknown).count() as u64;
    }
    RunOutcome { operations, applied, unknown, changes: sim.ring.changes, trace_hash: sim.trace.finish() }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|value| value.parse().ok())
}

#[test]
fn cas_and_serial_reads_are_linearizable_under_loss_partitions_and_crashes() {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("SIM_SEEDS").unwrap_or(500)).collect(),
    };
    let (mut operations, mut applied, mut unknown, mut changes) = (0, 0, 0, 0);
    for &seed in &seeds {
        let first = run(seed);
        assert_eq!(first, run(seed), "seed {seed}: a second run traced differently");
        operations += first.operations;
        applied += first.applied;
        unknown += first.unknown;
        changes += first.changes;
    }
    println!(
        "serial simulation: {} seeds, each run twice with equal trace hashes; 5 nodes, N=3, {CLIENT_COUNT} \
         clients on {KEY_COUNT} keys, 5 % loss, 2 % duplication, reordering, clock skew, partitions, crashes, \
         a join and a decommission ({changes} ring changes completed): {operations} operations checked ({applied} CAS applied, {unknown} of unknown outcome), 0 violations",
        seeds.len()
    );
    assert!(applied > seeds.len() as u64 * 10, "too few CAS applied to mean anything");
}
