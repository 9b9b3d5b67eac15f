//! A coordinator's bookkeeping for one request, sans-IO: which replicas to send to, when the
//! request can be answered (W acknowledgements, R replies), what the client is told when it
//! cannot be, and which replicas a read found stale (read repair). The caller sends the
//! messages, delivers replies and the time; nothing here does I/O.
//!
//! The errors are distinct because they mean different things to a client: `Unavailable`
//! is known before anything is sent (too few live replicas: nothing was written), `TimedOut`
//! and `Failed` come after sending (a write may or may not have landed).

use std::collections::{BTreeMap, BTreeSet};

use crate::ring::{NodeId, PreferenceList};
use crate::versions::Versions;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    One,
    Quorum,
    All,
}

impl Consistency {
    /// Replies needed out of `replica_count`.
    pub fn required(self, replica_count: usize) -> usize {
        match self {
            Consistency::One => 1,
            Consistency::Quorum => replica_count / 2 + 1,
            Consistency::All => replica_count,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Waiting for more replies.
    Pending,
    /// Enough replicas answered: reply OK to the client (the rest finish in the background).
    Done,
    /// The deadline passed with fewer replies than required; a write may have landed.
    TimedOut { replies: usize },
    /// Too many replicas answered with an error for the rest to make up the count.
    Failed { replies: usize },
}

/// Too few live replicas to try: nothing was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    pub live: usize,
    pub required: usize,
}

/// Where a request goes: to the live replicas now, and (for a write) hints for the down ones,
/// to be kept durably and replayed when they return. Hints never count toward W.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub send_to: Vec<NodeId>,
    pub hint_for: Vec<NodeId>,
}

/// Progress shared by reads and writes.
#[derive(Debug, Clone)]
struct Round {
    asked: Vec<NodeId>,
    required: usize,
    answered: BTreeSet<NodeId>,
    errors: BTreeSet<NodeId>,
    deadline_us: u64,
    outcome: Outcome,
}

impl Round {
    fn start(
        replicas: &PreferenceList,
        is_live: impl Fn(NodeId) -> bool,
        consistency: Consistency,
        now_us: u64,
        timeout_us: u64,
    ) -> Result<(Round, Plan), Unavailable> {
        Round::start_required(replicas, is_live, consistency.required(replicas.len()), now_us, timeout_us)
    }

    fn start_required(
        replicas: &PreferenceList,
        is_live: impl Fn(NodeId) -> bool,
        required: usize,
        now_us: u64,
        timeout_us: u64,
    ) -> Result<(Round, Plan), Unavailable> {
        let (send_to, hint_for): (Vec<NodeId>, Vec<NodeId>) =
            replicas.iter().partition(|&&node| is_live(node));
        if send_to.len() < required {
            return Err(Unavailable { live: send_to.len(), required });
        }
        let round = Round {
            asked: send_to.clone(),
            required,
            answered: BTreeSet::new(),
            errors: BTreeSet::new(),
            deadline_us: now_us + timeout_us,
            outcome: Outcome::Pending,
        };
        Ok((round, Plan { send_to, hint_for }))
    }

    /// Once decided, the outcome stays: later replies only feed read repair.
    fn settle(&mut self) -> Outcome {
        if self.outcome == Outcome::Pending {
            let replies = self.answered.len();
            if replies >= self.required {
                self.outcome = Outcome::Done;
            } else if self.asked.len() - self.errors.len() < self.required {
                self.outcome = Outcome::Failed { replies };
            }
        }
        self.outcome
    }

    fn on_reply(&mut self, from: NodeId) -> Outcome {
        if self.asked.contains(&from) && !self.errors.contains(&from) {
            self.answered.insert(from);
        }
        self.settle()
    }

    fn on_error(&mut self, from: NodeId) -> Outcome {
        if self.asked.contains(&from) && !self.answered.contains(&from) {
            self.errors.insert(from);
        }
        self.settle()
    }

    fn on_time(&mut self, now_us: u64) -> Outcome {
        if self.outcome == Outcome::Pending && now_us >= self.deadline_us {
            self.outcome = Outcome::TimedOut { replies: self.answered.len() };
        }
        self.outcome
    }
}

/// One write at its coordinator.
#[derive(Debug, Clone)]
pub struct WriteRound {
    round: Round,
}

impl WriteRound {
    pub fn start(
        replicas: &PreferenceList,
        is_live: impl Fn(NodeId) -> bool,
        consistency: Consistency,
        now_us: u64,
        timeout_us: u64,
    ) -> Result<(WriteRound, Plan), Unavailable> {
        WriteRound::start_with_pending(replicas, &[], is_live, consistency, now_us, timeout_us)
    }

    /// A write while a ring change is pending: `pending` are the nodes that will be replicas
    /// once it completes and are not now. It also goes to them, and needs as many more
    /// acknowledgements (from any of the nodes): of W + P acknowledgements at most P are on
    /// replicas the change removes, so the replicas after the change hold at least W.
    pub fn start_with_pending(
        replicas: &PreferenceList,
        pending: &[NodeId],
        is_live: impl Fn(NodeId) -> bool,
        consistency: Consistency,
        now_us: u64,
        timeout_us: u64,
    ) -> Result<(WriteRound, Plan), Unavailable> {
        let required = consistency.required(replicas.len()) + pending.len();
        let mut nodes = replicas.clone();
        nodes.extend(pending.iter().copied().filter(|node| !replicas.contains(node)));
        let (round, plan) = Round::start_required(&nodes, is_live, required, now_us, timeout_us)?;
        Ok((WriteRound { round }, plan))
    }

    /// A replica made the write durable.
    pub fn on_ack(&mut self, from: NodeId) -> Outcome {
        self.round.on_reply(from)
    }

    pub fn on_error(&mut self, from: NodeId) -> Outcome {
        self.round.on_error(from)
    }

    pub fn on_time(&mut self, now_us: u64) -> Outcome {
        self.round.on_time(now_us)
    }
}

/// Where a write goes from the node a client reached: coordinated here when this node is a
/// replica of the key, else forwarded to the first live replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Coordinate,
    Forward(NodeId),
}

/// The route for a key with `replicas`, from node `me`; `None`: no replica is up.
pub fn route(replicas: &[NodeId], me: NodeId, is_live: impl Fn(NodeId) -> bool) -> Option<Route> {
    if replicas.contains(&me) {
        return Some(Route::Coordinate);
    }
    replicas.iter().copied().find(|&node| is_live(node)).map(Route::Forward)
}

/// What a replica said to a write the coordinator shipped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// The write is durable there.
    Durable,
    /// It failed or did not answer in time.
    Failed,
    /// The replica, or the link to it, refused for load.
    Overloaded,
}

/// How a write ended, for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteVerdict {
    /// W replicas hold it durably.
    Acknowledged,
    /// Too few acknowledged and some refused for load: retry later (it may have landed).
    Overloaded { replies: usize, required: usize },
    /// Too few acknowledged in time: it may or may not have landed.
    TimedOut { replies: usize, required: usize },
}

/// One write at its coordinator, after the local apply: ships it to the live replicas,
/// hints the down ones and every replica whose acknowledgement fails (the caller keeps the
/// hint durably and replays it), and counts only durable acknowledgements toward W.
#[derive(Debug, Clone)]
pub struct WriteCoordinator {
    round: WriteRound,
    required: usize,
    overloaded: bool,
    outcome: Outcome,
}

impl WriteCoordinator {
    /// Starts a write of a key with `replicas` (and `pending` replicas while a ring change
    /// is pending): the plan says whom to ship to and whom to hint at once.
    pub fn start(
        replicas: &PreferenceList,
        pending: &[NodeId],
        is_live: impl Fn(NodeId) -> bool,
        consistency: Consistency,
        timeout_us: u64,
    ) -> Result<(WriteCoordinator, Plan), Unavailable> {
        let (round, plan) =
            WriteRound::start_with_pending(replicas, pending, is_live, consistency, 0, timeout_us)?;
        let required = consistency.required(replicas.len());
        Ok((WriteCoordinator { round, required, overloaded: false, outcome: Outcome::Pending }, plan))
    }

    /// A replica's answer. Whether the caller must hint it (anything but durable), and the
    /// outcome so far. A hint never counts toward W: it is a promise to deliver, not a copy.
    pub fn on_answer(&mut self, from: NodeId, ack: Ack) -> (bool, Outcome) {
        let hint = ack != Ack::Durable;
        self.outcome = match ack {
            Ack::Durable => self.round.on_ack(from),
            Ack::Failed | Ack::Overloaded => {
                self.overloaded |= ack == Ack::Overloaded;
                self.round.on_error(from)
            }
        };
        (hint, self.outcome)
    }

    /// The replicas shipped to that have not answered yet.
    pub fn unanswered(&self) -> Vec<NodeId> {
        let round = &self.round.round;
        round
            .asked
            .iter()
            .copied()
            .filter(|n| !round.answered.contains(n) && !round.errors.contains(n))
            .collect()
    }

    /// The deadline passed (or every answer is in): the outcome stays as decided, else the
    /// write timed out.
    pub fn on_deadline(&mut self) -> Outcome {
        self.outcome = self.round.on_time(u64::MAX);
        self.outcome
    }

    /// What the client is told once the outcome is decided (`None` while pending).
    pub fn verdict(&self) -> Option<WriteVerdict> {
        let required = self.required;
        match self.outcome {
            Outcome::Pending => None,
            Outcome::Done => Some(WriteVerdict::Acknowledged),
            Outcome::TimedOut { replies } | Outcome::Failed { replies } if self.overloaded => {
                Some(WriteVerdict::Overloaded { replies, required })
            }
            Outcome::TimedOut { replies } | Outcome::Failed { replies } => {
                Some(WriteVerdict::TimedOut { replies, required })
            }
        }
    }
}

/// One read at its coordinator: merges the replies and finds the replicas to repair.
#[derive(Debug, Clone)]
pub struct ReadRound<V> {
    round: Round,
    replies: BTreeMap<NodeId, Versions<V>>,
    merged: Versions<V>,
}

impl<V: Clone + PartialEq> ReadRound<V> {
    pub fn start(
        replicas: &PreferenceList,
        is_live: impl Fn(NodeId) -> bool,
        consistency: Consistency,
        now_us: u64,
        timeout_us: u64,
    ) -> Result<(ReadRound<V>, Plan), Unavailable> {
        let (round, plan) = Round::start(replicas, is_live, consistency, now_us, timeout_us)?;
        Ok((ReadRound { round, replies: BTreeMap::new(), merged: Versions::default() }, plan))
    }

    pub fn on_reply(&mut self, from: NodeId, versions: Versions<V>) -> Outcome {
        self.merged.merge(&versions);
        self.replies.insert(from, versions);
        self.round.on_reply(from)
    }

    pub fn on_error(&mut self, from: NodeId) -> Outcome {
        self.round.on_error(from)
    }

    pub fn on_time(&mut self, now_us: u64) -> Outcome {
        self.round.on_time(now_us)
    }

    /// Everything the replies so far hold, merged: what the client gets (all siblings and
    /// the context).
    pub fn merged(&self) -> &Versions<V> {
        &self.merged
    }

    /// Read repair: each replica whose reply lacked something the merge has, with what to
    /// send it: the merged versions (replicas merge them, so nothing newer they hold since is
    /// lost, and afterwards they hold at least what the client was given). Call again after
    /// late replies.
    pub fn repairs(&self) -> Vec<(NodeId, Versions<V>)> {
        self.stale_replicas().into_iter().map(|node| (node, self.merged.clone())).collect()
    }

    /// Replicas whose reply lacked something the merge has: each gets the merged versions
    /// (read repair, in the background). Call again after late replies.
    pub fn stale_replicas(&self) -> Vec<NodeId> {
        let merged = &self.merged;
        self.replies
            .iter()
            .filter(|(_, theirs)| {
                let mut repaired = (*theirs).clone();
                repaired.merge(merged);
                repaired != **theirs
            })
            .map(|(&node, _)| node)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::versions::VersionVector;
    use smallvec::smallvec;

    const TIMEOUT_US: u64 = 1_000_000;

    fn replicas() -> PreferenceList {
        smallvec![1, 2, 3]
    }

    #[test]
    fn quorum_write_needs_two_of_three_and_hints_the_down_replica() {
        let (mut write, plan) =
            WriteRound::start(&replicas(), |node| node != 3, Consistency::Quorum, 0, TIMEOUT_US)
                .expect("start");
        assert_eq!(plan, Plan { send_to: vec![1, 2], hint_for: vec![3] });
        assert_eq!(write.on_ack(1), Outcome::Pending);
        assert_eq!(write.on_ack(1), Outcome::Pending, "a duplicated ack counts once");
        assert_eq!(write.on_ack(3), Outcome::Pending, "a hinted replica never counts toward W");
        assert_eq!(write.on_ack(2), Outcome::Done);
        assert_eq!(write.on_time(2 * TIMEOUT_US), Outcome::Done, "decided outcomes stay");
    }

    #[test]
    fn too_few_live_replicas_is_unavailable_before_sending() {
        let result = WriteRound::start(&replicas(), |node| node == 1, Consistency::Quorum, 0, TIMEOUT_US);
        assert_eq!(result.err(), Some(Unavailable { live: 1, required: 2 }));
        assert!(WriteRound::start(&replicas(), |node| node == 1, Consistency::One, 0, TIMEOUT_US).is_ok());
        let all = WriteRound::start(&replicas(), |node| node != 2, Consistency::All, 0, TIMEOUT_US);
        assert_eq!(all.err(), Some(Unavailable { live: 2, required: 3 }));
    }

    #[test]
    fn errors_and_deadlines_end_a_round_with_what_was_seen() {
        let (mut write, _) =
            WriteRound::start(&replicas(), |_| true, Consistency::Quorum, 0, TIMEOUT_US).expect("start");
        assert_eq!(write.on_ack(1), Outcome::Pending);
        assert_eq!(write.on_time(TIMEOUT_US - 1), Outcome::Pending);
        assert_eq!(write.on_time(TIMEOUT_US), Outcome::TimedOut { replies: 1 });

        let (mut write, _) =
            WriteRound::start(&replicas(), |_| true, Consistency::Quorum, 0, TIMEOUT_US).expect("start");
        assert_eq!(write.on_error(1), Outcome::Pending);
        assert_eq!(write.on_error(2), Outcome::Failed { replies: 0 });
    }

    #[test]
    fn a_write_routes_hints_failed_answers_and_tells_overload_from_timeout() {
        assert_eq!(route(&replicas(), 2, |_| true), Some(Route::Coordinate));
        assert_eq!(route(&replicas(), 7, |node| node != 1), Some(Route::Forward(2)));
        assert_eq!(route(&replicas(), 7, |_| false), None);

        let (mut write, plan) =
            WriteCoordinator::start(&replicas(), &[], |node| node != 3, Consistency::Quorum, TIMEOUT_US)
                .expect("start");
        assert_eq!(plan.hint_for, vec![3]);
        assert_eq!(write.on_answer(1, Ack::Durable), (false, Outcome::Pending));
        assert_eq!(
            write.on_answer(2, Ack::Failed),
            (true, Outcome::Failed { replies: 1 }),
            "hinted, not counted"
        );
        assert_eq!(write.verdict(), Some(WriteVerdict::TimedOut { replies: 1, required: 2 }));

        let (mut write, _) =
            WriteCoordinator::start(&replicas(), &[], |_| true, Consistency::Quorum, TIMEOUT_US)
                .expect("start");
        assert_eq!(write.on_answer(1, Ack::Overloaded), (true, Outcome::Pending));
        assert_eq!(write.verdict(), None);
        assert_eq!(write.on_deadline(), Outcome::TimedOut { replies: 0 });
        assert_eq!(write.verdict(), Some(WriteVerdict::Overloaded { replies: 0, required: 2 }));

        let (mut write, _) =
            WriteCoordinator::start(&replicas(), &[], |_| true, Consistency::Quorum, TIMEOUT_US)
                .expect("start");
        write.on_answer(1, Ack::Durable);
        assert_eq!(write.on_answer(3, Ack::Durable), (false, Outcome::Done));
        assert_eq!(write.on_answer(2, Ack::Failed), (true, Outcome::Done), "decided outcomes stay");
        assert_eq!(write.verdict(), Some(WriteVerdict::Acknowledged));
    }

    #[test]
    fn a_read_merges_replies_and_repairs_the_stale_replica() {
        let mut newer = Versions::default();
        newer.write(1, 0, Some(&VersionVector::default()), Some(20u32), 2);
        let mut concurrent = Versions::default();
        concurrent.write(2, 0, Some(&VersionVector::default()), Some(30u32), 3);
        let (mut read, plan) =
            ReadRound::start(&replicas(), |_| true, Consistency::Quorum, 0, TIMEOUT_US).expect("start");
        assert_eq!(plan.send_to, vec![1, 2, 3]);
        assert_eq!(read.on_reply(1, newer.clone()), Outcome::Pending);
        assert_eq!(read.on_reply(2, concurrent.clone()), Outcome::Done);
        let mut values: Vec<_> = read.merged().siblings().iter().map(|s| s.value).collect();
        values.sort();
        assert_eq!(values, vec![Some(20), Some(30)], "concurrent writes come back as siblings");
        assert_eq!(read.stale_replicas(), vec![1, 2], "each lacks the other's write");
        // A late reply that already has everything needs no repair.
        let mut complete = newer.clone();
        complete.merge(&concurrent);
        assert_eq!(read.on_reply(3, complete), Outcome::Done);
        assert_eq!(read.stale_replicas(), vec![1, 2]);
    }
}
