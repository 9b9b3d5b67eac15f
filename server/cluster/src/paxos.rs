//! Per-key Paxos, sans-IO: what makes CAS, the Redis conditional and counter commands and
//! SERIAL reads linearizable in a cluster. Single-decree Paxos among the key's N replicas,
//! run again for every operation (as Cassandra's lightweight transactions do), with the read
//! piggybacked on the prepare.
//!
//! Every replica keeps an [`Acceptor`] per key next to the key's versions, in the same stored
//! record, so that one durable write makes both current. A [`Proposer`] drives one operation:
//! 1. **Prepare** a fresh ballot (hybrid-logical-clock time, then the node's actor and a
//!    never-reused counter) at the live replicas. A replica promises when the ballot is above
//!    every ballot it promised, durably, and answers with its whole record: versions, the
//!    proposal it accepted, the highest ballot it saw committed.
//! 2. With a majority of promises: if the highest accepted proposal among them is above the
//!    highest commit among them, an earlier operation may have been chosen without anyone
//!    learning it; it is proposed again under this ballot and committed first (the
//!    CASSANDRA-12126 class of bug), and the round starts over. Otherwise the merged versions
//!    of the promises are the key's current state, and the caller decides against them.
//! 3. **Propose**: a write becomes the proposal: the state after the write (one sibling whose
//!    context covers everything read). A replica accepts unless it promised a higher ballot,
//!    durably. A majority of acceptances chooses it.
//! 4. **Commit**: every replica merges the chosen proposal into its versions and forgets the
//!    accepted copy (the Paxos state left is two ballots, beside the versions' window of
//!    chosen writes). The caller waits for as many commit acknowledgements as its
//!    consistency level asks.
//!
//! A read-only operation (a SERIAL read) first asks a majority for their records without a
//! ballot ([`Proposer::start_read`]): with nothing in progress among them it answers at once
//! and pre-empts nobody; otherwise it runs the steps above.
//!
//! Rejections and lost messages end a phase; the proposer backs off for a random time that
//! doubles with each attempt, then tries a higher ballot, until the caller's deadline.
//!
//! A write of ours that some replica accepted (or that got no answer) may still be chosen
//! later by another proposer's step 2, or may have been chosen and overwritten since. So the
//! state carries a window of the last writes chosen (ballot first proposed under, and dot):
//! the next round reports the operation applied if its write is in the window, finishes it
//! if a replica still holds it as accepted, and otherwise knows it was not chosen, decides
//! afresh, and (when it writes nothing) first proposes the unchanged state under its own
//! ballot, a fence after which no earlier write of ours can be chosen. If the window no
//! longer reaches back to our write the outcome is unknown, and the client hears so.

use std::collections::BTreeSet;

pub use schema::peer::Ballot;

use crate::coordinator::Unavailable;
use crate::ring::NodeId;
use crate::versions::{Dot, Versions};

/// A replica's acceptor state for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acceptor<V> {
    pub promised: Ballot,
    /// Accepted and not known to be committed.
    pub accepted: Option<(Ballot, Versions<V>)>,
    pub committed: Ballot,
}

impl<V> Default for Acceptor<V> {
    fn default() -> Self {
        Acceptor { promised: Ballot::default(), accepted: None, committed: Ballot::default() }
    }
}

impl<V: Clone + PartialEq> Acceptor<V> {
    /// Takes on another acceptor's state as well as its own (a ring change copies a range to a
    /// new replica): the higher promise and commit, and the higher accepted proposal unless it
    /// is committed already. The result is a state one acceptor could have reached by hearing
    /// the messages both heard, so it keeps every promise either made.
    pub fn absorb(&mut self, other: &Acceptor<V>) {
        self.promised = self.promised.max(other.promised);
        self.committed = self.committed.max(other.committed);
        if let Some((ballot, proposal)) = &other.accepted {
            if self.accepted.as_ref().is_none_or(|(mine, _)| mine < ballot) {
                self.accepted = Some((*ballot, proposal.clone()));
            }
        }
        if self.accepted.as_ref().is_some_and(|(ballot, _)| *ballot <= self.committed) {
            self.accepted = None;
        }
    }

    /// Phase 1b: promises `ballot` if it is above every ballot promised. Whether the state
    /// changed (and must be made durable before the answer).
    pub fn prepare(&mut self, ballot: Ballot) -> bool {
        if ballot > self.promised {
            self.promised = ballot;
            return true;
        }
        false
    }

    /// Phase 2b: accepts unless a higher ballot was promised. Whether the state changed.
    pub fn accept(&mut self, ballot: Ballot, proposal: &Versions<V>) -> bool {
        if ballot < self.promised || self.accepted.as_ref().is_some_and(|(b, _)| *b == ballot) {
            return false;
        }
        self.promised = ballot;
        self.accepted = Some((ballot, proposal.clone()));
        true
    }

    /// Whether this acceptor accepted `ballot` (or has since learnt it was chosen).
    pub fn has_accepted(&self, ballot: Ballot) -> bool {
        self.accepted.as_ref().is_some_and(|(b, _)| *b == ballot) || self.committed == ballot
    }

    /// Learns that `proposal` was chosen under `ballot`: merges it into the key's `versions`
    /// (a join, so a late or repeated commit changes nothing) and drops the accepted copy
    /// once it is no newer. Whether anything changed.
    pub fn commit(&mut self, ballot: Ballot, proposal: &Versions<V>, versions: &mut Versions<V>) -> bool {
        let before = (versions.clone(), self.committed, self.accepted.is_some());
        versions.merge(proposal);
        self.committed = self.committed.max(ballot);
        if self.accepted.as_ref().is_some_and(|(b, _)| *b <= ballot) {
            self.accepted = None;
        }
        before != (versions.clone(), self.committed, self.accepted.is_some())
    }
}

/// Whether an acceptor holding ring version `acceptor_ring` refuses a Paxos message from a
/// proposer placed by ring version `proposer_ring` (0: not stated, from a node that predates
/// the rule): it does when the proposer's ring is older. A change's barrier waits only for
/// the members that are up, so a node that was down holds the older ring when it restarts;
/// were it to gather promises from the old replicas alone after the transfers copied them,
/// the new replicas would miss the value it chose (the CAS simulator found this once it
/// agreed rings by Paxos). Refused, it learns the ring by gossip and the client retries.
pub fn refuses_stale_proposer(proposer_ring: u64, acceptor_ring: u64) -> bool {
    proposer_ring != 0 && proposer_ring < acceptor_ring
}

/// The next ballot of a proposer: after `floor` (the highest ballot it has seen) and its own
/// clock.
pub fn next_ballot(floor: Ballot, clock_us: u64, actor: u32, counter: u64) -> Ballot {
    Ballot { time_us: clock_us.max(floor.time_us + 1), actor, counter }
}

/// How long to wait before attempt `attempt` (1, 2, ...): uniform in [0, cap), where the
/// cap doubles from 1 ms up to 64 ms; `random` is any uniformly random number.
pub fn backoff_us(attempt: u32, random: u64) -> u64 {
    let cap = 1_000u64 << attempt.saturating_sub(1).min(6);
    100 + random % cap
}

/// Why an operation ended without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Too few replicas up for a majority; nothing of this operation was proposed.
    Unavailable(Unavailable),
    /// A write of this operation may or may not have been chosen (it is older than the
    /// window of chosen writes the key remembers, or the deadline passed).
    Indeterminate,
}

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<V, A> {
    /// Send PREPARE(`ballot`) to each of `to`; answer with `on_promise`.
    Prepare { phase: u64, ballot: Ballot, to: Vec<NodeId> },
    /// Send READ to each of `to` (the record, unchanged); answer with `on_promise`.
    Read { phase: u64, to: Vec<NodeId> },
    /// The key's current state: decide, then call `write` or `answer`.
    Decide { state: Versions<V> },
    /// Send PROPOSE(`ballot`, `proposal`) to each of `to`; answer with `on_accept`.
    Propose { phase: u64, ballot: Ballot, proposal: Versions<V>, to: Vec<NodeId> },
    /// Send COMMIT(`ballot`, `proposal`) to each of `to`; answer with `on_commit` (and call
    /// `commits_sent` once sent, for the case that waits for none).
    Commit { phase: u64, ballot: Ballot, proposal: Versions<V>, to: Vec<NodeId> },
    /// Wait for answers (or the phase's timeout: `on_phase_timeout`).
    Wait,
    /// Start over with `start` and a ballot above `floor()`; after `backoff_us(attempt)` if
    /// `attempt` > 0.
    Retry { attempt: u32 },
    /// The operation's outcome.
    Done(Result<A, Failure>),
}

/// What a proposal is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose<A> {
    /// This operation's write; its answer once chosen.
    Own(A),
    /// Finishing an earlier operation's accepted proposal.
    Complete,
    /// The unchanged state, so that no earlier write of ours can be chosen any more; then
    /// the answer.
    Fence(A),
}

/// A write of ours that some replica may hold.
#[derive(Debug, Clone)]
struct Own<V, A> {
    /// The ballot it was first proposed under: its entry among the chosen writes.
    ballot: Ballot,
    dot: Dot,
    proposal: Versions<V>,
    answer: A,
}

#[derive(Debug, Clone)]
enum Stage<V, A> {
    Idle,
    Preparing {
        /// A read without a ballot: nothing is promised; in progress found, a real prepare.
        reading: bool,
        promised: BTreeSet<NodeId>,
        refused: BTreeSet<NodeId>,
        state: Versions<V>,
        highest_accepted: Option<(Ballot, Versions<V>)>,
        highest_committed: Ballot,
    },
    Deciding {
        state: Versions<V>,
    },
    Proposing {
        purpose: Purpose<A>,
        proposal: Versions<V>,
        accepted: BTreeSet<NodeId>,
        refused: BTreeSet<NodeId>,
        /// Failed or unanswered: they may have accepted.
        unknown: BTreeSet<NodeId>,
    },
    Committing {
        purpose: Purpose<A>,
        acknowledged: BTreeSet<NodeId>,
        answered: BTreeSet<NodeId>,
    },
    Finished,
}

/// One operation at its proposer (any node: it need not be a replica).
#[derive(Debug, Clone)]
pub struct Proposer<V, A> {
    replicas: Vec<NodeId>,
    /// Replicas asked in the current phase.
    asked: Vec<NodeId>,
    quorum: usize,
    /// Commit acknowledgements to wait for (0: answer once chosen).
    commit_wait: usize,
    phase: u64,
    ballot: Ballot,
    /// The highest ballot seen: the next one goes above it.
    floor: Ballot,
    attempt: u32,
    stage: Stage<V, A>,
    /// Our writes that some replica may hold: any of them may still be chosen.
    own: Vec<Own<V, A>>,
}

impl<V: Clone + PartialEq, A: Clone> Proposer<V, A> {
    pub fn new(replicas: &[NodeId], commit_wait: usize) -> Proposer<V, A> {
        Proposer::new_with_pending(replicas, &[], commit_wait)
    }

    /// A proposer while a ring change is pending: `pending` (the key's replicas once it
    /// completes that are not replicas now) take part too, and every quorum needs as many
    /// more answers. A quorum of N/2 + 1 + P among the N + P nodes holds a majority of the
    /// old replicas and a majority of the new ones, so it meets every quorum before and after
    /// the change.
    pub fn new_with_pending(replicas: &[NodeId], pending: &[NodeId], commit_wait: usize) -> Proposer<V, A> {
        let mut participants = replicas.to_vec();
        participants.extend(pending.iter().copied().filter(|node| !replicas.contains(node)));
        let extra = participants.len() - replicas.len();
        Proposer {
            replicas: participants.clone(),
            asked: Vec::new(),
            quorum: replicas.len() / 2 + 1 + extra,
            commit_wait: if commit_wait == 0 { 0 } else { (commit_wait + extra).min(participants.len()) },
            phase: 0,
            ballot: Ballot::default(),
            floor: Ballot::default(),
            attempt: 0,
            stage: Stage::Idle,
            own: Vec::new(),
        }
    }

    /// The highest ballot seen so far: the next ballot must be above it.
    pub fn floor(&self) -> Ballot {
        self.floor
    }

    /// Whether a write of this operation may have been accepted: a failure now means "may
    /// or may not have applied".
    pub fn may_have_written(&self) -> bool {
        !self.own.is_empty()
    }

    /// Starts a round with `ballot` (above `floor()`), at the replicas `is_live` says are up.
    pub fn start(&mut self, ballot: Ballot, is_live: impl Fn(NodeId) -> bool) -> Step<V, A> {
        debug_assert!(ballot > self.floor);
        self.ballot = ballot;
        self.floor = ballot;
        self.phase += 1;
        self.asked = self.replicas.iter().copied().filter(|&n| is_live(n)).collect();
        if self.asked.len() < self.quorum {
            if self.own.is_empty() {
                self.stage = Stage::Finished;
                let unavailable = Unavailable { live: self.asked.len(), required: self.quorum };
                return Step::Done(Err(Failure::Unavailable(unavailable)));
            }
            // A write of ours may be pending somewhere: keep trying until the deadline.
            return self.retry();
        }
        self.stage = Stage::Preparing {
            reading: false,
            promised: BTreeSet::new(),
            refused: BTreeSet::new(),
            state: Versions::default(),
            highest_accepted: None,
            highest_committed: Ballot::default(),
        };
        Step::Prepare { phase: self.phase, ballot, to: self.asked.clone() }
    }

    /// Starts a read-only operation (a SERIAL read) with a quorum read of the replicas'
    /// records, without a ballot: if none holds an accepted proposal newer than the newest
    /// commit, every chosen write is in the merged state and any write chosen later is
    /// chosen after this read, so no promise is needed (and none pre-empts a writer). If one
    /// is in progress, the read goes on as a full round (`Retry`) and finishes it first.
    pub fn start_read(&mut self, is_live: impl Fn(NodeId) -> bool) -> Step<V, A> {
        self.phase += 1;
        self.asked = self.replicas.iter().copied().filter(|&n| is_live(n)).collect();
        if self.asked.len() < self.quorum {
            self.stage = Stage::Finished;
            let unavailable = Unavailable { live: self.asked.len(), required: self.quorum };
            return Step::Done(Err(Failure::Unavailable(unavailable)));
        }
        self.stage = Stage::Preparing {
            reading: true,
            promised: BTreeSet::new(),
            refused: BTreeSet::new(),
            state: Versions::default(),
            highest_accepted: None,
            highest_committed: Ballot::default(),
        };
        Step::Read { phase: self.phase, to: self.asked.clone() }
    }

    fn retry(&mut self) -> Step<V, A> {
        self.attempt += 1;
        self.stage = Stage::Idle;
        Step::Retry { attempt: self.attempt }
    }

    fn current(&self, phase: u64, from: NodeId) -> bool {
        phase == self.phase && self.asked.contains(&from)
    }

    /// A replica's answer to PREPARE: its acceptor state and versions after handling it
    /// (`None`: it failed or did not answer).
    pub fn on_promise(
        &mut self,
        phase: u64,
        from: NodeId,
        reply: Option<(&Acceptor<V>, &Versions<V>)>,
    ) -> Step<V, A> {
        if !self.current(phase, from) {
            return Step::Wait;
        }
        let ballot = self.ballot;
        let quorum = self.quorum;
        let asked = self.asked.len();
        let Stage::Preparing { reading, promised, refused, state, highest_accepted, highest_committed } =
            &mut self.stage
        else {
            return Step::Wait;
        };
        if promised.contains(&from) || refused.contains(&from) {
            return Step::Wait;
        }
        let reading = *reading;
        match reply {
            Some((acceptor, versions)) if reading || acceptor.promised == ballot => {
                promised.insert(from);
                state.merge(versions);
                if let Some((accepted_ballot, proposal)) = &acceptor.accepted {
                    if highest_accepted.as_ref().is_none_or(|(b, _)| accepted_ballot > b) {
                        *highest_accepted = Some((*accepted_ballot, proposal.clone()));
                    }
                }
                *highest_committed = (*highest_committed).max(acceptor.committed);
            }
            Some((acceptor, _)) => {
                self.floor = self.floor.max(acceptor.promised);
                refused.insert(from);
            }
            None => {
                refused.insert(from);
            }
        }
        if promised.len() >= quorum {
            let in_progress = highest_accepted.take().filter(|(b, _)| *b > *highest_committed);
            let state = std::mem::take(state);
            return match in_progress {
                Some(_) if reading => {
                    self.stage = Stage::Idle;
                    Step::Retry { attempt: 0 }
                }
                Some((_, proposal)) => {
                    // Ours, still pending: finish it under this ballot. Else someone else's.
                    let purpose = match self.own.iter().find(|own| own.proposal == proposal) {
                        Some(own) => Purpose::Own(own.answer.clone()),
                        None => Purpose::Complete,
                    };
                    self.propose(purpose, proposal)
                }
                None => self.prepared(state),
            };
        }
        if asked - refused.len() < quorum {
            return self.retry();
        }
        Step::Wait
    }

    /// A majority promised and nothing is left to finish: `state` holds every chosen write.
    fn prepared(&mut self, state: Versions<V>) -> Step<V, A> {
        if !self.own.is_empty() {
            let chosen = state.chosen();
            if let Some(own) = self.own.iter().find(|own| chosen.contains(&(own.ballot, own.dot))) {
                self.stage = Stage::Finished;
                return Step::Done(Ok(own.answer.clone()));
            }
            // Our writes are not among the chosen ones, if the window reaches back far
            // enough: chosen writes appear in the order of their ballots.
            let complete = chosen.len() < schema::peer::CHOSEN_WRITE_COUNT_MAX
                || self.own.iter().all(|own| chosen.first().is_some_and(|(oldest, _)| *oldest < own.ballot));
            if !complete {
                self.stage = Stage::Finished;
                return Step::Done(Err(Failure::Indeterminate));
            }
        }
        self.stage = Stage::Deciding { state: state.clone() };
        Step::Decide { state }
    }

    /// The decision: write `proposal` (the state after this operation's write, whose new
    /// sibling is `dot`); `answer` is the outcome once it is chosen.
    pub fn write(&mut self, mut proposal: Versions<V>, dot: Dot, answer: A) -> Step<V, A> {
        if !matches!(self.stage, Stage::Deciding { .. }) {
            return Step::Wait;
        }
        proposal.record_chosen(self.ballot, dot);
        self.own.push(Own { ballot: self.ballot, dot, proposal: proposal.clone(), answer: answer.clone() });
        self.propose(Purpose::Own(answer), proposal)
    }

    /// The decision: nothing to write; `answer` is the outcome, once no earlier write of
    /// ours can be chosen any more (a fence: the unchanged state, proposed).
    pub fn answer(&mut self, answer: A) -> Step<V, A> {
        let Stage::Deciding { state } = std::mem::replace(&mut self.stage, Stage::Idle) else {
            return Step::Wait;
        };
        if self.own.is_empty() {
            self.stage = Stage::Finished;
            return Step::Done(Ok(answer));
        }
        self.propose(Purpose::Fence(answer), state)
    }

    fn propose(&mut self, purpose: Purpose<A>, proposal: Versions<V>) -> Step<V, A> {
        self.phase += 1;
        self.stage = Stage::Proposing {
            purpose,
            proposal: proposal.clone(),
            accepted: BTreeSet::new(),
            refused: BTreeSet::new(),
            unknown: BTreeSet::new(),
        };
        Step::Propose { phase: self.phase, ballot: self.ballot, proposal, to: self.asked.clone() }
    }

    /// A replica's answer to PROPOSE: its acceptor state after handling it (`None`: it
    /// failed or did not answer).
    pub fn on_accept(&mut self, phase: u64, from: NodeId, reply: Option<&Acceptor<V>>) -> Step<V, A> {
        if !self.current(phase, from) {
            return Step::Wait;
        }
        let ballot = self.ballot;
        let Stage::Proposing { accepted, refused, unknown, .. } = &mut self.stage else {
            return Step::Wait;
        };
        if accepted.contains(&from) || refused.contains(&from) || unknown.contains(&from) {
            return Step::Wait;
        }
        match reply {
            Some(acceptor) if acceptor.has_accepted(ballot) => {
                accepted.insert(from);
            }
            Some(acceptor) => {
                self.floor = self.floor.max(acceptor.promised);
                refused.insert(from);
            }
            None => {
                unknown.insert(from);
            }
        }
        let (accepted_count, lost_count) = (accepted.len(), refused.len() + unknown.len());
        let all_refused = refused.len() == self.asked.len();
        if accepted_count >= self.quorum {
            let Stage::Proposing { purpose, proposal, .. } = std::mem::replace(&mut self.stage, Stage::Idle)
            else {
                unreachable!()
            };
            self.phase += 1;
            self.stage =
                Stage::Committing { purpose, acknowledged: BTreeSet::new(), answered: BTreeSet::new() };
            return Step::Commit { phase: self.phase, ballot, proposal, to: self.asked.clone() };
        }
        if self.asked.len() - lost_count < self.quorum {
            if all_refused {
                // No replica holds this proposal: if it was our latest write, it is dead.
                if let Stage::Proposing { purpose: Purpose::Own(_), proposal, .. } = &self.stage {
                    let proposal = proposal.clone();
                    self.own.retain(|own| own.proposal != proposal);
                }
            }
            return self.retry();
        }
        Step::Wait
    }

    /// Call once the commits are sent: finishes when no acknowledgement is awaited.
    pub fn commits_sent(&mut self) -> Step<V, A> {
        self.settle_commit()
    }

    /// A replica's answer to COMMIT (`false`: it failed or did not answer).
    pub fn on_commit(&mut self, phase: u64, from: NodeId, durable: bool) -> Step<V, A> {
        if !self.current(phase, from) {
            return Step::Wait;
        }
        if let Stage::Committing { acknowledged, answered, .. } = &mut self.stage {
            answered.insert(from);
            if durable {
                acknowledged.insert(from);
            }
        }
        self.settle_commit()
    }

    fn settle_commit(&mut self) -> Step<V, A> {
        let Stage::Committing { acknowledged, answered, .. } = &self.stage else {
            return Step::Wait;
        };
        // The proposal is chosen whatever the commits do; waiting only makes it visible to
        // non-serial reads.
        if acknowledged.len() < self.commit_wait && answered.len() < self.asked.len() {
            return Step::Wait;
        }
        self.finish_commit()
    }

    fn finish_commit(&mut self) -> Step<V, A> {
        let Stage::Committing { purpose, .. } = std::mem::replace(&mut self.stage, Stage::Idle) else {
            return Step::Wait;
        };
        match purpose {
            Purpose::Own(answer) | Purpose::Fence(answer) => {
                self.stage = Stage::Finished;
                Step::Done(Ok(answer))
            }
            // Someone else's operation is finished; ours starts over at once.
            Purpose::Complete => Step::Retry { attempt: 0 },
        }
    }

    /// The current phase's answers did not all come in time.
    pub fn on_phase_timeout(&mut self, phase: u64) -> Step<V, A> {
        if phase != self.phase {
            return Step::Wait;
        }
        match self.stage {
            Stage::Preparing { .. } | Stage::Proposing { .. } => self.retry(),
            Stage::Committing { .. } => self.finish_commit(),
            _ => Step::Wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versions::VersionVector;

    type Value = u32;

    fn ballot(time_us: u64, actor: u32) -> Ballot {
        Ballot { time_us, actor, counter: 1 }
    }

    fn written(value: Value, actor: u32, counter: u64) -> (Versions<Value>, Dot) {
        let mut versions = Versions::default();
        let dot = versions.write(actor, counter, Some(&VersionVector::default()), Some(value), counter);
        (versions, dot)
    }

    #[test]
    fn an_acceptor_promises_and_accepts_only_upward_and_commits_idempotently() {
        let mut acceptor = Acceptor::<Value>::default();
        assert!(acceptor.prepare(ballot(5, 1)));
        assert!(!acceptor.prepare(ballot(5, 1)), "a repeated promise changes nothing");
        assert!(!acceptor.prepare(ballot(4, 9)));
        let (proposal, _) = written(7, 1, 1);
        assert!(!acceptor.accept(ballot(4, 9), &proposal), "below the promise");
        assert!(acceptor.accept(ballot(5, 1), &proposal));
        assert!(acceptor.has_accepted(ballot(5, 1)));
        let mut versions = Versions::default();
        assert!(acceptor.commit(ballot(5, 1), &proposal, &mut versions));
        assert_eq!(acceptor.accepted, None, "the accepted copy is dropped once committed");
        assert!(!acceptor.commit(ballot(5, 1), &proposal, &mut versions), "a repeated commit");
        assert_eq!(versions.siblings()[0].value, Some(7));
    }

    fn promise(
        proposer: &mut Proposer<Value, &'static str>,
        phase: u64,
        from: NodeId,
        acceptor: &mut Acceptor<Value>,
        versions: &Versions<Value>,
    ) -> Step<Value, &'static str> {
        acceptor.prepare(proposer.ballot);
        proposer.on_promise(phase, from, Some((acceptor, versions)))
    }

    #[test]
    fn a_proposal_accepted_by_a_minority_is_completed_before_anything_else() {
        // A proposer got its write accepted by replica 1 only, then vanished.
        let mut acceptors: Vec<Acceptor<Value>> = vec![Acceptor::default(); 3];
        let (lost, _) = written(1, 9, 1);
        acceptors[1].prepare(ballot(1, 9));
        acceptors[1].accept(ballot(1, 9), &lost);
        let empty = Versions::default();

        let mut proposer = Proposer::<Value, &'static str>::new(&[0, 1, 2], 2);
        let Step::Prepare { phase, .. } = proposer.start(ballot(2, 1), |_| true) else { panic!() };
        assert_eq!(promise(&mut proposer, phase, 0, &mut acceptors[0], &empty), Step::Wait);
        let step = promise(&mut proposer, phase, 1, &mut acceptors[1], &empty);
        let Step::Propose { proposal, .. } = step else { panic!("expected the lost write again: {step:?}") };
        assert_eq!(proposal, lost);
    }

    #[test]
    fn a_refusal_raises_the_floor_and_retries() {
        let mut proposer = Proposer::<Value, &'static str>::new(&[0, 1, 2], 2);
        let Step::Prepare { phase, .. } = proposer.start(ballot(2, 1), |_| true) else { panic!() };
        let mut higher = Acceptor::default();
        higher.prepare(ballot(9, 3));
        assert_eq!(proposer.on_promise(phase, 0, Some((&higher, &Versions::default()))), Step::Wait);
        assert_eq!(proposer.on_promise(phase, 1, None), Step::Retry { attempt: 1 });
        assert_eq!(proposer.floor(), ballot(9, 3));
        assert!(next_ballot(proposer.floor(), 3, 1, 2) > ballot(9, 3));
    }

    #[test]
    fn a_retry_after_a_possibly_accepted_write_finds_it_finishes_it_or_fences_it() {
        let empty = Versions::default();
        let prepared = |acceptors: &mut Vec<Acceptor<Value>>| {
            let mut proposer = Proposer::<Value, &'static str>::new(&[0, 1, 2], 2);
            let Step::Prepare { phase, .. } = proposer.start(ballot(2, 1), |_| true) else { panic!() };
            promise(&mut proposer, phase, 0, &mut acceptors[0], &empty);
            let Step::Decide { .. } = promise(&mut proposer, phase, 1, &mut acceptors[1], &empty) else {
                panic!()
            };
            let (mine, dot) = written(5, 1, 1);
            let Step::Propose { phase, ballot, proposal, .. } = proposer.write(mine, dot, "applied") else {
                panic!()
            };
            acceptors[0].accept(ballot, &proposal);
            assert_eq!(proposer.on_accept(phase, 0, Some(&acceptors[0])), Step::Wait);
            // The other answers are lost: the write may have been chosen.
            assert_eq!(proposer.on_phase_timeout(phase), Step::Retry { attempt: 1 });
            assert!(proposer.may_have_written());
            (proposer, proposal)
        };
        let restart = |proposer: &mut Proposer<Value, &'static str>| {
            let Step::Prepare { phase, .. } =
                proposer.start(next_ballot(proposer.floor(), 0, 1, 2), |_| true)
            else {
                panic!()
            };
            phase
        };
        // Replica 0 still holds it: the next round finishes it and reports it applied.
        let mut acceptors: Vec<Acceptor<Value>> = vec![Acceptor::default(); 3];
        let (mut proposer, _) = prepared(&mut acceptors);
        let phase = restart(&mut proposer);
        promise(&mut proposer, phase, 0, &mut acceptors[0], &empty);
        let Step::Propose { phase, ballot, proposal, .. } =
            promise(&mut proposer, phase, 1, &mut acceptors[1], &empty)
        else {
            panic!()
        };
        for (node, acceptor) in acceptors.iter_mut().enumerate().take(2) {
            acceptor.accept(ballot, &proposal);
            let step = proposer.on_accept(phase, node as NodeId, Some(acceptor));
            if node == 1 {
                let Step::Commit { phase, .. } = step else { panic!("{step:?}") };
                proposer.on_commit(phase, 0, true);
                assert_eq!(proposer.on_commit(phase, 1, true), Step::Done(Ok("applied")));
            }
        }
        // Chosen and overwritten since: the window of chosen writes tells.
        let mut acceptors: Vec<Acceptor<Value>> = vec![Acceptor::default(); 3];
        let (mut proposer, mine) = prepared(&mut acceptors);
        let phase = restart(&mut proposer);
        let mut later = mine.clone();
        let dot = later.write(2, 9, Some(mine.context()), Some(6), 9);
        later.record_chosen(Ballot { time_us: 3, actor: 2, counter: 1 }, dot);
        promise(&mut proposer, phase, 1, &mut acceptors[1], &later);
        assert_eq!(promise(&mut proposer, phase, 2, &mut acceptors[2], &later), Step::Done(Ok("applied")));
        // No trace of it among the chosen: decided afresh, and a failed condition is fenced.
        let mut acceptors: Vec<Acceptor<Value>> = vec![Acceptor::default(); 3];
        let (mut proposer, _) = prepared(&mut acceptors);
        let phase = restart(&mut proposer);
        let (other, _) = written(6, 2, 1);
        promise(&mut proposer, phase, 1, &mut acceptors[1], &other);
        let Step::Decide { .. } = promise(&mut proposer, phase, 2, &mut acceptors[2], &other) else {
            panic!()
        };
        let step = proposer.answer("not applied");
        assert!(matches!(step, Step::Propose { .. }), "a fence before the answer: {step:?}");
    }
}
