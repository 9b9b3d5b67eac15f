//! The ring as the simulators run it (test only): every node's durable `RingAcceptor`, the
//! production `RingRound` agreeing on each version over the simulator's network, the
//! production `ChangeDriver` deciding the barrier, the transfers' sources and completion, and
//! gossip as a periodic catch-up from a random peer (the runtime's `catch_up`). No node here
//! knows the ring except through messages.
//!
//! The host simulator owns the network, the clock and the data: it carries `outbox` messages
//! (losing, delaying, duplicating them as it likes), calls `deliver` and `timeout`, and runs
//! the transfers `driver_step` asks for against its own stores.

use std::collections::{BTreeMap, BTreeSet};

use crate::ring::NodeId;
use crate::ring_change::{
    agree_backoff_ms, completion_of, next_ballot, ChangeDriver, DriverStep, RingPhase, RingRound, RoundStep,
    AGREE_ATTEMPTS,
};
use crate::ring_state::{Pending, RingAcceptor, RingAnswer, RingState};
use crate::rng::Rng;

/// A ring message between simulated nodes.
#[derive(Debug, Clone)]
pub enum RingMessage {
    Request {
        round: u64,
        phase: RingPhase,
        version: u64,
        ballot: (u64, u32, u64),
        state: Option<Box<RingState>>,
    },
    Answer {
        round: u64,
        phase: RingPhase,
        answer: Box<RingAnswer>,
    },
    /// Gossip: "which ring do you hold?"
    Read,
    Committed(Box<RingState>),
}

impl RingMessage {
    /// A small number naming the message's kind, for the trace hash.
    pub fn kind(&self) -> u8 {
        match self {
            RingMessage::Request { phase, .. } => 10 + *phase as u8,
            RingMessage::Answer { phase, .. } => 20 + *phase as u8,
            RingMessage::Read => 30,
            RingMessage::Committed(_) => 31,
        }
    }
}

/// What a node wants agreed.
#[derive(Debug, Clone)]
pub enum Goal {
    Join(String),
    Leave { node: String, driver: String },
    Complete { change: Pending, pending_version: u64 },
}

impl Goal {
    fn plan(&self, state: &RingState) -> Result<RingState, String> {
        match self {
            Goal::Join(name) => state.plan_join(name),
            Goal::Leave { node, driver } => state.plan_leave(node, driver),
            Goal::Complete { change, pending_version } => completion_of(state, change, *pending_version),
        }
    }
}

/// One node's attempt, in flight, at agreeing on a goal.
#[derive(Debug)]
struct Agreement {
    node: NodeId,
    goal: Goal,
    attempt: usize,
    /// `None` while backing off between attempts.
    round: Option<RingRound>,
    round_id: u64,
    /// The timer that ends the current phase, or the backoff.
    timer_id: u64,
    phase: RingPhase,
    answers: BTreeMap<String, RingAnswer>,
}

/// A timer the host must set: call `timeout(id)` after `delay_us`.
#[derive(Debug, Clone, Copy)]
pub struct RingTimer {
    pub delay_us: u64,
    pub id: u64,
}

/// The ring of a simulated cluster.
#[derive(Debug)]
pub struct SimRing {
    /// Each node's durable acceptor (a crash keeps it).
    pub acceptors: Vec<RingAcceptor>,
    names: Vec<String>,
    agreement: Option<Agreement>,
    driver: Option<(NodeId, ChangeDriver)>,
    next_id: u64,
    rng: Rng,
    ballot_counters: Vec<u64>,
    /// Messages to carry: (from, to, message).
    pub outbox: Vec<(NodeId, NodeId, RingMessage)>,
    pub timers: Vec<RingTimer>,
    /// Changes completed.
    pub changes: u64,
    /// Ring versions that completed a change, as their proposer learned them.
    pub completed: Vec<RingState>,
}

/// What a driver's failure detector says of `node`: up, and on the driver's side of the
/// partition (`partitioned` is one side).
pub fn believed_up<'a>(
    up: &'a [bool],
    partitioned: &'a BTreeSet<NodeId>,
) -> impl Fn(NodeId, NodeId) -> bool + 'a {
    move |driver, node| up[node as usize] && partitioned.contains(&driver) == partitioned.contains(&node)
}

/// How long a node waits for the answers to one phase.
const RING_PHASE_TIMEOUT_US: u64 = 20_000;

impl SimRing {
    /// Node `i` is named `names[i]`; every node starts holding `formed` (a joining node has
    /// read it from a seed).
    pub fn new(names: Vec<String>, formed: &RingState, seed: u64) -> SimRing {
        let count = names.len();
        SimRing {
            acceptors: vec![RingAcceptor::new(formed.clone()); count],
            names,
            agreement: None,
            driver: None,
            next_id: 1,
            rng: Rng::new(seed),
            ballot_counters: vec![0; count],
            outbox: Vec::new(),
            timers: Vec::new(),
            changes: 0,
            completed: Vec::new(),
        }
    }

    pub fn committed(&self, node: NodeId) -> &RingState {
        &self.acceptors[node as usize].committed
    }

    /// The newest ring any node holds.
    pub fn newest(&self) -> &RingState {
        self.acceptors.iter().map(|a| &a.committed).max_by_key(|c| c.version).expect("nodes")
    }

    /// Whether a change is being agreed or driven.
    pub fn busy(&self) -> bool {
        self.agreement.is_some() || self.driver.is_some() || self.newest().pending.is_some()
    }

    fn id_of(&self, name: &str) -> NodeId {
        self.names.iter().position(|n| n == name).expect("a simulated node") as NodeId
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The changes both simulators script: node 4 ("n4") joins once `join_due`, then node 1
    /// is decommissioned, driven by node 0, once `leave_due`. A change starts only while none
    /// is under way and its driver is up.
    pub fn start_scripted_change(&mut self, join_due: bool, leave_due: bool, up: &[bool], now_us: u64) {
        if self.busy() {
            return;
        }
        let newest = self.newest();
        if join_due && newest.id_of("n4").is_none() && up[4] {
            self.start(4, Goal::Join("n4".into()), now_us);
        } else if leave_due && newest.left.is_empty() && up[0] {
            self.start(0, Goal::Leave { node: "n1".into(), driver: "n0".into() }, now_us);
        }
    }

    /// `node` starts agreeing on `goal`.
    pub fn start(&mut self, node: NodeId, goal: Goal, now_us: u64) {
        let round_id = self.fresh_id();
        self.agreement = Some(Agreement {
            node,
            goal,
            attempt: 0,
            round: None,
            round_id,
            timer_id: 0,
            phase: RingPhase::Prepare,
            answers: BTreeMap::new(),
        });
        self.attempt(now_us);
    }

    /// Starts the agreement's next attempt from what its node holds now.
    fn attempt(&mut self, now_us: u64) {
        let Some(agreement) = &mut self.agreement else { return };
        let node = agreement.node;
        let current = self.acceptors[node as usize].committed.clone();
        if agreement.attempt >= AGREE_ATTEMPTS {
            self.agreement = None;
            return;
        }
        let proposal = match agreement.goal.plan(&current) {
            Ok(proposal) => proposal,
            // Another change is pending, or this one is no longer: the driver's resumption
            // (or the next due change) takes over.
            Err(_) => {
                self.agreement = None;
                return;
            }
        };
        if proposal == current {
            self.agreement = None;
            self.agreed(node, current);
            return;
        }
        self.ballot_counters[node as usize] += 1;
        let promised = self.acceptors[node as usize].promised;
        let ballot = next_ballot(now_us, promised, node, self.ballot_counters[node as usize]);
        let round = RingRound::start(&current, proposal, ballot);
        let round_id = self.fresh_id();
        let agreement = self.agreement.as_mut().expect("agreement");
        agreement.round_id = round_id;
        agreement.timer_id = round_id;
        agreement.phase = RingPhase::Prepare;
        agreement.answers.clear();
        let voters: Vec<NodeId> = round.voters().iter().map(|v| self.id_of(v)).collect();
        let version = round.version();
        let agreement = self.agreement.as_mut().expect("agreement");
        agreement.round = Some(round);
        for to in voters {
            let message = RingMessage::Request {
                round: round_id,
                phase: RingPhase::Prepare,
                version,
                ballot,
                state: None,
            };
            self.outbox.push((node, to, message));
        }
        self.timers.push(RingTimer { delay_us: RING_PHASE_TIMEOUT_US, id: round_id });
    }

    /// `node` learned that its goal is agreed in `state`.
    fn agreed(&mut self, node: NodeId, state: RingState) {
        if state.pending.is_some() {
            if let Ok(driver) = ChangeDriver::new(state) {
                self.driver = Some((node, driver));
            }
        } else {
            self.changes += 1;
            self.completed.push(state);
            self.driver = None;
        }
    }

    /// Node `node` crashed: whatever it was agreeing or driving is lost (its acceptor is not).
    pub fn crash(&mut self, node: NodeId) {
        if self.agreement.as_ref().is_some_and(|a| a.node == node) {
            self.agreement = None;
        }
        if self.driver.as_ref().is_some_and(|(n, _)| *n == node) {
            self.driver = None;
        }
    }

    /// A node adopts a newer committed ring (COMMIT, or gossip).
    fn adopt(&mut self, node: NodeId, state: &RingState) {
        self.acceptors[node as usize].commit(state.clone());
    }

    pub fn deliver(&mut self, from: NodeId, to: NodeId, message: RingMessage, now_us: u64) {
        match message {
            RingMessage::Read => {
                let committed = Box::new(self.committed(to).clone());
                self.outbox.push((to, from, RingMessage::Committed(committed)));
            }
            RingMessage::Committed(state) => self.adopt(to, &state),
            RingMessage::Request { round, phase, version, ballot, state } => {
                let acceptor = &mut self.acceptors[to as usize];
                let answer = match phase {
                    RingPhase::Prepare => acceptor.prepare(version, ballot).1,
                    RingPhase::Accept => acceptor.accept(ballot, *state.expect("ACCEPT carries a ring")).1,
                    RingPhase::Commit => {
                        acceptor.commit(*state.expect("COMMIT carries a ring"));
                        return;
                    }
                };
                self.outbox.push((to, from, RingMessage::Answer { round, phase, answer: Box::new(answer) }));
            }
            RingMessage::Answer { round, phase, answer } => {
                let Some(agreement) = &mut self.agreement else { return };
                if agreement.node != to || agreement.round_id != round || agreement.phase != phase {
                    return;
                }
                agreement.answers.insert(self.names[from as usize].clone(), *answer);
                let voters = agreement.round.as_ref().map_or(0, |r| r.voters().len());
                if agreement.answers.len() == voters {
                    self.phase_ended(now_us);
                }
            }
        }
    }

    /// A timer set through `timers` fired.
    pub fn timeout(&mut self, id: u64, now_us: u64) {
        match &self.agreement {
            Some(agreement) if agreement.timer_id == id && agreement.round.is_some() => {
                self.phase_ended(now_us)
            }
            Some(agreement) if agreement.timer_id == id => self.attempt(now_us),
            _ => {}
        }
    }

    /// Every voter answered, or the phase's time is up: the round decides.
    fn phase_ended(&mut self, now_us: u64) {
        let Some(mut agreement) = self.agreement.take() else { return };
        let Some(round) = agreement.round.as_mut() else { return };
        let answers: Vec<Option<RingAnswer>> =
            round.voters().iter().map(|voter| agreement.answers.get(voter).cloned()).collect();
        let node = agreement.node;
        let step = match agreement.phase {
            RingPhase::Prepare => round.prepared(&answers),
            _ => round.accepted(&answers),
        };
        let (version, ballot) = (round.version(), round.ballot());
        match step {
            RoundStep::Accept(value) => {
                let voters: Vec<NodeId> = round.voters().iter().map(|v| self.id_of(v)).collect();
                let round_id = self.fresh_id();
                agreement.round_id = round_id;
                agreement.timer_id = round_id;
                agreement.phase = RingPhase::Accept;
                agreement.answers.clear();
                for to in voters {
                    let state = Some(Box::new(value.clone()));
                    let message = RingMessage::Request {
                        round: round_id,
                        phase: RingPhase::Accept,
                        version,
                        ballot,
                        state,
                    };
                    self.outbox.push((node, to, message));
                }
                self.timers.push(RingTimer { delay_us: RING_PHASE_TIMEOUT_US, id: round_id });
                self.agreement = Some(agreement);
            }
            RoundStep::Adopt(newer) => {
                self.adopt(node, &newer);
                agreement.round = None;
                self.agreement = Some(agreement);
                self.attempt(now_us);
            }
            RoundStep::Retry => {
                agreement.attempt += 1;
                agreement.round = None;
                let pause_ms = agree_backoff_ms(agreement.attempt, &mut self.rng);
                agreement.timer_id = self.fresh_id();
                self.timers.push(RingTimer { delay_us: pause_ms * 1000, id: agreement.timer_id });
                self.agreement = Some(agreement);
            }
            RoundStep::Chosen { value, ours } => {
                for member in 0..value.members.len() {
                    let to = self.id_of(&value.members[member]);
                    let state = Some(Box::new(value.clone()));
                    let message =
                        RingMessage::Request { round: 0, phase: RingPhase::Commit, version, ballot, state };
                    self.outbox.push((node, to, message));
                }
                self.adopt(node, &value);
                if ours {
                    self.agreed(node, value);
                } else {
                    agreement.round = None;
                    self.agreement = Some(agreement);
                    self.attempt(now_us);
                }
            }
        }
    }

    /// Gossip: `node` asks `peer` which ring it holds.
    pub fn gossip(&mut self, node: NodeId, peer: NodeId) {
        if node != peer {
            self.outbox.push((node, peer, RingMessage::Read));
        }
    }

    /// The driver's next step, if a change is being driven; `is_up(driver, node)` is what the
    /// driver believes of `node` (and, while no driver runs, whether a node is up at all).
    /// A node whose committed ring names it as the pending change's driver takes the
    /// change up again after a crash, as the runtime does.
    pub fn driver_step(
        &mut self,
        is_up: impl Fn(NodeId, NodeId) -> bool,
        now_us: u64,
    ) -> Option<(NodeId, DriverStep)> {
        if self.driver.is_none() && self.agreement.is_none() {
            let resumed = (0..self.acceptors.len() as NodeId).find_map(|node| {
                let committed = &self.acceptors[node as usize].committed;
                let pending = committed.pending.as_ref()?;
                (is_up(node, node) && pending.driver == self.names[node as usize])
                    .then(|| (node, committed.clone()))
            });
            if let Some((node, state)) = resumed {
                self.driver = ChangeDriver::new(state).ok().map(|driver| (node, driver));
            }
        }
        let (node, driver) = self.driver.as_ref()?;
        let node = *node;
        if !driver.still_pending(&self.acceptors[node as usize].committed) {
            self.driver = None;
            return None;
        }
        let me = self.names[node as usize].clone();
        let step = driver.next(
            &me,
            |name| is_up(node, self.id_of(name)),
            |name| Some(self.acceptors[self.id_of(name) as usize].committed.version),
        );
        if step == DriverStep::Complete && self.agreement.is_none() {
            let goal =
                Goal::Complete { change: driver.change().clone(), pending_version: driver.pending().version };
            self.start(node, goal, now_us);
        }
        Some((node, step))
    }

    /// The node agreeing on a ring version now, if any (its timers are its own).
    pub fn proposer(&self) -> Option<NodeId> {
        self.agreement.as_ref().map(|agreement| agreement.node)
    }

    /// The ring the current driver works from (the pending version).
    pub fn driving(&self) -> Option<&RingState> {
        self.driver.as_ref().map(|(_, driver)| driver.pending())
    }

    pub fn transferred(&mut self, index: usize) {
        if let Some((_, driver)) = &mut self.driver {
            driver.transferred(index);
        }
    }

    pub fn transfer_failed(&mut self, index: usize) {
        if let Some((_, driver)) = &mut self.driver {
            driver.failed(index);
        }
    }
}
