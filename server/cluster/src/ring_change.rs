//! Agreeing on a ring version and driving a change through it, sans-IO. The runtime
//! (`server/src/cluster/membership/`) and both simulators run these machines; they only
//! carry the messages, keep the time and persist the acceptor (`ring_state::RingAcceptor`).
//!
//! - [`RingRound`]: one attempt at choosing version v+1 by single-decree Paxos among the
//!   voters of version v: PREPARE to every voter, then ACCEPT of the value the promises
//!   allow ([`value_to_propose`]), then COMMIT to every member. A voter's answer that shows a
//!   newer committed ring ends the attempt: adopt that ring and plan again.
//! - [`ChangeDriver`]: one pending change from agreement to completion: the barrier (every
//!   member that is up announces the pending ring), the transfers with their sources
//!   (`RingState::transfer_sources`), the barrier again, then the completing version.

use crate::ring::NodeId;
use crate::ring_state::{value_to_propose, Pending, RingAnswer, RingBallot, RingState, Transfer};
use crate::rng::Rng;

/// Attempts at agreeing on one ring version before giving up.
pub const AGREE_ATTEMPTS: usize = 20;
/// Failed attempts at a transfer from its planned sources before copying from every other
/// old replica instead.
pub const PLANNED_SOURCE_ATTEMPTS: u32 = 3;

/// A ballot above every one this node promised: the time (µs) where it is higher, this
/// node's actor, and its own counter to break ties within one microsecond.
pub fn next_ballot(now_us: u64, promised: RingBallot, actor: u32, counter: u64) -> RingBallot {
    (now_us.max(promised.0 + 1), actor, counter)
}

/// The randomized pause before the `attempt`th try at agreeing: 10 ms doubling to 640 ms,
/// in its upper half.
pub fn agree_backoff_ms(attempt: usize, rng: &mut Rng) -> u64 {
    let cap = 10u64 << attempt.min(6);
    cap / 2 + rng.below(cap / 2 + 1)
}

/// The phase of a ring message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RingPhase {
    Prepare,
    Accept,
    Commit,
}

/// What a round asks its caller to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundStep {
    /// Send ACCEPT of this ring to every voter, and feed the answers to `accepted`.
    Accept(RingState),
    /// A voter committed a newer ring: adopt it (persisted), then plan and start again.
    Adopt(RingState),
    /// Too few promises or acceptances: back off and start again with a new ballot.
    Retry,
    /// `value` is chosen: send COMMIT of it to every member and adopt it. `ours` tells
    /// whether it is the proposal this round started with (else a value another proposer
    /// may have had chosen, finished on its behalf: plan again).
    Chosen { value: RingState, ours: bool },
}

/// One attempt at choosing the version after `current`.
#[derive(Debug, Clone)]
pub struct RingRound {
    version: u64,
    ballot: RingBallot,
    voters: Vec<String>,
    proposal: RingState,
    /// Set once the promises are in: what ACCEPT carries, and whether it is ours.
    accepting: Option<(RingState, bool)>,
}

impl RingRound {
    /// Starts choosing `proposal` as version `current.version + 1` under `ballot`; send
    /// PREPARE to `voters()`.
    pub fn start(current: &RingState, proposal: RingState, ballot: RingBallot) -> RingRound {
        let voters =
            current.voters().iter().filter_map(|&id| current.members.get(id as usize).cloned()).collect();
        RingRound { version: current.version + 1, ballot, voters, proposal, accepting: None }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn ballot(&self) -> RingBallot {
        self.ballot
    }

    /// The nodes whose acceptors choose this version (the owners of the version before).
    pub fn voters(&self) -> &[String] {
        &self.voters
    }

    fn majority(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Every voter's answer to PREPARE (`None`: no answer in time), in any order.
    pub fn prepared(&mut self, answers: &[Option<RingAnswer>]) -> RoundStep {
        let newer = answers
            .iter()
            .flatten()
            .map(|answer| &answer.committed)
            .filter(|committed| committed.version >= self.version)
            .max_by_key(|committed| committed.version);
        if let Some(newer) = newer {
            return RoundStep::Adopt(newer.clone());
        }
        let promises: Vec<RingAnswer> = answers.iter().flatten().filter(|a| a.ok).cloned().collect();
        if promises.len() < self.majority() {
            return RoundStep::Retry;
        }
        let (value, ours) = value_to_propose(&promises, self.version, self.proposal.clone());
        self.accepting = Some((value.clone(), ours));
        RoundStep::Accept(value)
    }

    /// Every voter's answer to ACCEPT (`None`: no answer in time).
    pub fn accepted(&self, answers: &[Option<RingAnswer>]) -> RoundStep {
        let Some((value, ours)) = &self.accepting else { return RoundStep::Retry };
        if answers.iter().flatten().filter(|a| a.ok).count() < self.majority() {
            return RoundStep::Retry;
        }
        RoundStep::Chosen { value: value.clone(), ours: *ours }
    }
}

/// The members of `pending` other than `me` that are up and do not yet announce its version
/// (or a later one): the barrier waits until there are none, so that no replica a transfer
/// copies from still answers a Paxos proposer placed by the older ring (the CAS simulator
/// found a value chosen on the old replicas after the copy was taken without it).
pub fn barrier_behind(
    pending: &RingState,
    me: &str,
    is_up: impl Fn(&str) -> bool,
    announced_version: impl Fn(&str) -> Option<u64>,
) -> Vec<String> {
    pending
        .members
        .iter()
        .filter(|name| *name != me && is_up(name))
        .filter(|name| announced_version(name).is_none_or(|version| version < pending.version))
        .cloned()
        .collect()
}

/// The version that completes `change` when the committed ring is `state` (a plan for a
/// `RingRound`): the completion while the change is still the pending one; `state` itself if
/// a later version already completed it; else the change is abandoned.
pub fn completion_of(state: &RingState, change: &Pending, pending_version: u64) -> Result<RingState, String> {
    match &state.pending {
        Some(now) if now == change => state.completed(),
        _ if state.version > pending_version && state.pending.is_none() => Ok(state.clone()),
        _ => Err("the change is no longer pending".into()),
    }
}

/// What the driver of a pending change does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverStep {
    /// Wait: these members that are up do not hold the pending ring yet.
    Barrier(Vec<String>),
    /// Run transfer `index` from `sources` (and report with `transferred` or `failed`).
    Transfer { index: usize, transfer: Transfer, sources: Vec<NodeId> },
    /// Transfer `index` has no reachable source yet: wait and ask again.
    NoSource { index: usize },
    /// Every transfer is done and every member holds the pending ring: agree on this
    /// completing version (with `completion_of` as the plan).
    Complete,
}

/// One pending change, driven by the node its `Pending::driver` names.
#[derive(Debug, Clone)]
pub struct ChangeDriver {
    pending: RingState,
    transfers: Vec<Transfer>,
    done: Vec<bool>,
    failures: Vec<u32>,
}

impl ChangeDriver {
    /// The driver of the change `pending` (a ring version with a pending change) records.
    pub fn new(pending: RingState) -> Result<ChangeDriver, String> {
        if pending.pending.is_none() {
            return Err("the change is not pending".into());
        }
        let transfers = pending.transfers();
        let count = transfers.len();
        Ok(ChangeDriver { pending, transfers, done: vec![false; count], failures: vec![0; count] })
    }

    pub fn pending(&self) -> &RingState {
        &self.pending
    }

    pub fn change(&self) -> &Pending {
        // `new` refuses a state without one.
        self.pending.pending.as_ref().unwrap_or_else(|| unreachable!("a driver holds a pending change"))
    }

    pub fn transfers(&self) -> &[Transfer] {
        &self.transfers
    }

    pub fn transfers_done(&self) -> usize {
        self.done.iter().filter(|done| **done).count()
    }

    /// The next step, given which members are up and which ring version each announces. The
    /// barrier holds before the first transfer and again before completion; transfers run
    /// in order.
    pub fn next(
        &self,
        me: &str,
        is_up: impl Fn(&str) -> bool,
        announced_version: impl Fn(&str) -> Option<u64>,
    ) -> DriverStep {
        let behind = barrier_behind(&self.pending, me, &is_up, announced_version);
        if !behind.is_empty() {
            return DriverStep::Barrier(behind);
        }
        let Some(index) = self.done.iter().position(|done| !done) else { return DriverStep::Complete };
        let transfer = self.transfers[index].clone();
        let failures = self.failures[index];
        let name = |id: NodeId| self.pending.members.get(id as usize).map_or("", String::as_str);
        let sources = self
            .pending
            .transfer_sources(&transfer, failures < PLANNED_SOURCE_ATTEMPTS, |id| is_up(name(id)));
        if sources.is_empty() {
            return DriverStep::NoSource { index };
        }
        DriverStep::Transfer { index, transfer, sources }
    }

    /// Transfer `index` copied everything from its sources.
    pub fn transferred(&mut self, index: usize) {
        if let Some(done) = self.done.get_mut(index) {
            *done = true;
        }
    }

    /// Transfer `index` failed (a source or the target did not answer): after
    /// `PLANNED_SOURCE_ATTEMPTS` failures it copies from every other old replica instead.
    pub fn failed(&mut self, index: usize) {
        if let Some(failures) = self.failures.get_mut(index) {
            *failures += 1;
        }
    }

    /// Whether the change is still the pending one of `committed` (else stop driving it).
    pub fn still_pending(&self, committed: &RingState) -> bool {
        committed.pending.as_ref() == self.pending.pending.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring_state::RingAcceptor;

    fn three() -> RingState {
        RingState::formed(vec!["a".into(), "b".into(), "c".into()], 3, 4).expect("ring")
    }

    /// Runs one round against `acceptors` (all answering) and returns its end.
    fn round_against(acceptors: &mut [RingAcceptor], round: &mut RingRound) -> RoundStep {
        let answers: Vec<Option<RingAnswer>> =
            acceptors.iter_mut().map(|a| Some(a.prepare(round.version(), round.ballot()).1)).collect();
        match round.prepared(&answers) {
            RoundStep::Accept(value) => {
                let answers: Vec<Option<RingAnswer>> =
                    acceptors.iter_mut().map(|a| Some(a.accept(round.ballot(), value.clone()).1)).collect();
                round.accepted(&answers)
            }
            other => other,
        }
    }

    #[test]
    fn a_round_with_every_voter_chooses_its_proposal() {
        let current = three();
        let mut acceptors = vec![RingAcceptor::new(current.clone()); 3];
        let proposal = current.plan_join("d").expect("join");
        let mut round = RingRound::start(&current, proposal.clone(), (1, 1, 1));
        assert_eq!(round.voters(), ["a", "b", "c"]);
        assert_eq!(
            round_against(&mut acceptors, &mut round),
            RoundStep::Chosen { value: proposal, ours: true }
        );
    }

    #[test]
    fn a_minority_of_promises_retries_and_a_newer_ring_is_adopted() {
        let current = three();
        let acceptor = RingAcceptor::new(current.clone());
        let proposal = current.plan_join("d").expect("join");
        let mut round = RingRound::start(&current, proposal.clone(), (1, 1, 1));
        let promise = Some(acceptor.clone().prepare(2, (1, 1, 1)).1);
        assert_eq!(round.prepared(&[promise.clone(), None, None]), RoundStep::Retry);
        let mut newer = acceptor;
        newer.commit(proposal.clone());
        let mut round = RingRound::start(&current, proposal.clone(), (2, 1, 1));
        let answers = [promise, Some(newer.prepare(2, (2, 1, 1)).1), None];
        assert_eq!(round.prepared(&answers), RoundStep::Adopt(proposal));
    }

    #[test]
    fn a_value_another_proposer_had_accepted_is_finished_not_replaced() {
        let current = three();
        let mut acceptors = vec![RingAcceptor::new(current.clone()); 3];
        let theirs = current.plan_join("d").expect("join");
        // Another proposer got its value accepted by one acceptor, then died.
        acceptors[0].prepare(2, (1, 2, 1));
        acceptors[0].accept((1, 2, 1), theirs.clone());
        let ours = current.plan_join("e").expect("join");
        let mut round = RingRound::start(&current, ours, (5, 1, 1));
        assert_eq!(
            round_against(&mut acceptors, &mut round),
            RoundStep::Chosen { value: theirs, ours: false }
        );
    }

    #[test]
    fn a_higher_promise_makes_the_lower_ballot_retry() {
        let current = three();
        let mut acceptors = vec![RingAcceptor::new(current.clone()); 3];
        for acceptor in &mut acceptors {
            acceptor.prepare(2, (9, 9, 9));
        }
        let mut round = RingRound::start(&current, current.plan_join("d").expect("join"), (5, 1, 1));
        assert_eq!(round_against(&mut acceptors, &mut round), RoundStep::Retry);
        assert_eq!(next_ballot(5, (9, 9, 9), 1, 2), (10, 1, 2));
    }

    #[test]
    fn the_driver_waits_at_the_barrier_and_falls_back_to_every_old_replica() {
        let pending = three().plan_join("d").expect("join");
        let mut driver = ChangeDriver::new(pending.clone()).expect("driver");
        let version = pending.version;
        // c still announces the committed ring: the barrier holds.
        let announced = |name: &str| Some(if name == "c" { version - 1 } else { version });
        assert_eq!(driver.next("d", |_| true, announced), DriverStep::Barrier(vec!["c".into()]));
        // A member that is down does not hold the barrier.
        let step = driver.next("d", |name| name != "c", announced);
        let DriverStep::Transfer { index, transfer, sources } = step else { panic!("{step:?}") };
        assert_eq!(sources, transfer.sources);
        // The planned source fails three times: every other old replica, once all are up.
        for _ in 0..PLANNED_SOURCE_ATTEMPTS {
            driver.failed(index);
        }
        let everyone = |_: &str| Some(version);
        let DriverStep::Transfer { sources, .. } = driver.next("d", |_| true, everyone) else { panic!() };
        assert!(sources.iter().all(|s| !transfer.sources.contains(s)) && sources.len() == 2, "{sources:?}");
        for index in 0..driver.transfers().len() {
            driver.transferred(index);
        }
        assert_eq!(driver.next("d", |_| true, everyone), DriverStep::Complete);
        let change = driver.change().clone();
        let completed = completion_of(&pending, &change, version).expect("completes");
        assert_eq!(completed.version, version + 1);
        assert_eq!(completion_of(&completed, &change, version), Ok(completed.clone()));
        assert!(completion_of(&three(), &change, version).is_err());
    }

    #[test]
    fn the_backoff_grows_and_stays_in_its_upper_half() {
        let mut rng = Rng::new(1);
        for attempt in 1..10 {
            let cap = 10u64 << attempt.min(6);
            let pause = agree_backoff_ms(attempt, &mut rng);
            assert!((cap / 2..=cap).contains(&pause), "{attempt}: {pause}");
        }
    }
}
