//! Linearizable CAS in a whole simulated cluster, deterministic from a seed: clients run CAS
//! and SERIAL reads through random nodes while the network loses, duplicates, delays and
//! reorders messages, nodes are cut off and crash and restart (their acceptor state and data
//! durable, their proposers lost). Every operation's invocation, answer and times go into a
//! per-key history, which the Wing-Gong-Lowe checker (`linearizability.rs`) must explain; an
//! operation whose proposer died or that timed out after proposing counts as "may or may not
//! have happened".
//!
//! The proposers and acceptors are the real ones (`paxos.rs`); only the network and the
//! clock are simulated. `SIM_SEEDS=n` runs n seeds (default 500); `SIM_SEED=s` replays one.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::hash::{Hash, Hasher};

use super::paxos::{backoff_us, next_ballot, Acceptor, Ballot, Failure, Proposer, Step};
use super::ring::{NodeId, Ring};
use super::versions::Versions;
use crate::linearizability::{self, Event, Operation, Outcome};
use crate::storage::sim::SimRng;

const NODE_COUNT: u32 = 5;
const REPLICAS: usize = 3;
const KEY_COUNT: u32 = 3;
const CLIENT_COUNT: u32 = 6;
const PHASE_TIMEOUT_US: u64 = 20_000;
const OPERATION_TIMEOUT_US: u64 = 300_000;
/// Clients start operations until then; faults stop then too.
const LOAD_US: u64 = 1_000_000;

type Value = u64;

#[derive(Debug, Clone)]
enum Message {
    Request { op: u64, phase_id: u64, phase: Phase, key: u32, ballot: Ballot, proposal: Box<Versions<Value>> },
    Answer { op: u64, phase_id: u64, phase: Phase, record: Box<(Acceptor<Value>, Versions<Value>)> },
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
    Deliver { from: NodeId, to: NodeId, message: Message },
    PhaseTimeout { op: u64, phase_id: u64 },
    Backoff { op: u64 },
    ClientNext { client: u32 },
}

#[derive(Default)]
struct Node {
    up: bool,
    records: BTreeMap<u32, (Acceptor<Value>, Versions<Value>)>,
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
    proposer: Proposer<Value, Outcome<Value>>,
    start_us: u64,
}

struct Simulation {
    rng: SimRng,
    ring: Ring,
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

/// The newest live sibling's value, as the real system resolves it.
fn newest(versions: &Versions<Value>) -> Option<Value> {
    versions.siblings().iter().filter_map(|s| Some(((s.timestamp_us, s.dot), s.value?))).max().map(|(_, v)| v)
}

impl Simulation {
    fn new(seed: u64) -> Simulation {
        let node_ids: Vec<NodeId> = (0..NODE_COUNT).collect();
        let mut rng = SimRng::new(seed);
        let nodes = (0..NODE_COUNT)
            .map(|_| Node { up: true, clock_skew_us: rng.below(5_000), ..Node::default() })
            .collect();
        Simulation {
            rng,
            ring: Ring::new(4, &node_ids).expect("ring"),
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

    fn replicas(&self, key: u32) -> Vec<NodeId> {
        self.ring.preference_list(&key.to_le_bytes(), REPLICAS).to_vec()
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
        let replicas = self.replicas(key);
        let proposer = Proposer::new(&replicas, if self.rng.below(2) == 0 { 0 } else { 2 });
        let reading = operation == Operation::Read;
        self.running.insert(op, Running { client, node, key, operation, proposer, start_us: self.now_us });
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
            Outcome::Unknown => {}
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

    fn drive(&mut self, op: u64, mut step: Step<Value, Outcome<Value>>) {
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
                    let current = newest(&state);
                    let running = self.running.get_mut(&op).expect("running");
                    match running.operation.clone() {
                        Operation::Read => running.proposer.answer(Outcome::Read(current)),
                        Operation::Cas { expected, .. } if expected != current => {
                            running.proposer.answer(Outcome::CasFailed(current))
                        }
                        Operation::Cas { new, .. } => {
                            let me = &mut self.nodes[node as usize];
                            me.counter += 1;
                            let timestamp = self.now_us + me.clock_skew_us;
                            let mut proposal = state.clone();
                            let dot =
                                proposal.write(node, me.counter, Some(state.context()), Some(new), timestamp);
                            let running = self.running.get_mut(&op).expect("running");
                            running.proposer.write(proposal, dot, Outcome::CasApplied)
                        }
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
        proposal: Versions<Value>,
        to: &[NodeId],
    ) {
        for &node in to {
            let message =
                Message::Request { op, phase_id, phase, key, ballot, proposal: Box::new(proposal.clone()) };
            self.send(from, node, message);
        }
        self.at(self.now_us + PHASE_TIMEOUT_US, Timer::PhaseTimeout { op, phase_id });
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, message: Message) {
        if !self.nodes[to as usize].up {
            return;
        }
        match message {
            Message::Request { op, phase_id, phase, key, ballot, proposal } => {
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
    trace_hash: u64,
}

fn run(seed: u64) -> RunOutcome {
    let mut sim = Simulation::new(seed);
    for client in 0..CLIENT_COUNT {
        sim.at(u64::from(client) * 100, Timer::ClientNext { client });
    }
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
    RunOutcome { operations, applied, unknown, trace_hash: sim.trace.finish() }
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
    let (mut operations, mut applied, mut unknown) = (0, 0, 0);
    for &seed in &seeds {
        let first = run(seed);
        assert_eq!(first, run(seed), "seed {seed}: a second run traced differently");
        operations += first.operations;
        applied += first.applied;
        unknown += first.unknown;
    }
    println!(
        "serial simulation: {} seeds, each run twice with equal trace hashes; 5 nodes, N=3, {CLIENT_COUNT} \
         clients on {KEY_COUNT} keys, 5 % loss, 2 % duplication, reordering, clock skew, partitions, crashes: \
         {operations} operations checked ({applied} CAS applied, {unknown} of unknown outcome), 0 violations",
        seeds.len()
    );
    assert!(applied > seeds.len() as u64 * 10, "too few CAS applied to mean anything");
}
