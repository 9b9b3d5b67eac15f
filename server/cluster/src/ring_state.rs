//! The agreed ring and its changes. Pure: what a ring version holds, how a join, a
//! decommission, a replacement or a removal changes it, which transfers move the data, and the
//! acceptor side of the single-decree Paxos that agrees on each version.
//!
//! A change takes two ring versions. Version v+1 records it as pending: the current owners
//! stay, and `pending.owners` are the owners once it completes; writes go to both sets
//! (pending ownership) while the transfers copy the moving ranges. Version v+2 completes it:
//! the pending owners become the owners. Only one change is pending at a time; a second one is
//! refused with the first one's description. Each version is chosen by Paxos among the nodes
//! that own partitions in the version before it, so two nodes never commit different rings
//! under one version number.

use serde::{Deserialize, Serialize};

use crate::ring::{NodeId, Ring};

/// A Paxos ballot as the ring's JSON holds it: (time µs, actor, counter).
pub type RingBallot = (u64, u32, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// `node` joins, taking a balanced share of partitions from the nodes that hold most.
    Join,
    /// `node` streams its ranges to their new owners, then leaves.
    Leave,
    /// `node` (new, empty) takes the partitions of the dead node `dead`.
    Replace { dead: NodeId },
    /// The dead `node`'s ranges go to the others, copied from the surviving replicas.
    Remove,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub kind: ChangeKind,
    pub node: NodeId,
    /// The partition owners once the change completes.
    pub owners: Vec<NodeId>,
    /// The node that drives the change (runs the transfers and completes it).
    pub driver: String,
}

/// One agreed ring version: what `CLUSTER` holds and every node serves from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingState {
    pub version: u64,
    /// Every node that ever belonged, in order of arrival: ring node `i` is `members[i]`.
    pub members: Vec<String>,
    pub replica_count: usize,
    pub partition_bits: u32,
    pub owners: Vec<NodeId>,
    #[serde(default)]
    pub pending: Option<Pending>,
    /// Members that left (decommissioned, removed, replaced): they own nothing.
    #[serde(default)]
    pub left: Vec<NodeId>,
}

/// Copy partition `partition` onto `target` from `sources` (merged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub partition: usize,
    pub target: NodeId,
    pub sources: Vec<NodeId>,
}

impl RingState {
    /// The first version: `members` (sorted) with partitions dealt round-robin.
    pub fn formed(
        members: Vec<String>,
        replica_count: usize,
        partition_bits: u32,
    ) -> Result<RingState, String> {
        let ids: Vec<NodeId> = (0..members.len() as NodeId).collect();
        let ring = Ring::new(partition_bits, &ids).map_err(|error| format!("ring: {error:?}"))?;
        Ok(RingState {
            version: 1,
            members,
            replica_count,
            partition_bits,
            owners: ring.owners().to_vec(),
            pending: None,
            left: Vec::new(),
        })
    }

    /// The ring of the current owners; an error if an owner names no member (a ring read from
    /// a peer or a file is checked before it is adopted).
    pub fn ring(&self) -> Result<Ring, String> {
        let owners_known =
            |owners: &[NodeId]| owners.iter().all(|&owner| (owner as usize) < self.members.len());
        let pending_owners = self.pending.as_ref().map_or(&[][..], |pending| &pending.owners[..]);
        if !owners_known(&self.owners) || !owners_known(pending_owners) {
            return Err("ring: a partition owner names no member".into());
        }
        Ring::from_owners(self.partition_bits, self.owners.clone())
            .map_err(|error| format!("ring: {error:?}"))
    }

    /// The replicas of `key` now, and the nodes that will also be once the pending change
    /// completes (empty when none is pending).
    pub fn replicas(&self, key: &[u8]) -> (Vec<NodeId>, Vec<NodeId>) {
        let Ok(ring) = self.ring() else { return (Vec::new(), Vec::new()) };
        let now = ring.preference_list(key, self.replica_count).to_vec();
        let pending = match self.pending_ring() {
            Some(next) => next
                .preference_list(key, self.replica_count)
                .into_iter()
                .filter(|n| !now.contains(n))
                .collect(),
            None => Vec::new(),
        };
        (now, pending)
    }

    pub fn pending_ring(&self) -> Option<Ring> {
        let pending = self.pending.as_ref()?;
        Ring::from_owners(self.partition_bits, pending.owners.clone()).ok()
    }

    pub fn id_of(&self, name: &str) -> Option<NodeId> {
        self.members.iter().position(|member| member == name).map(|i| i as NodeId)
    }

    /// Nodes that own partitions now: they choose the next version.
    pub fn voters(&self) -> Vec<NodeId> {
        let mut voters: Vec<NodeId> = self.owners.clone();
        voters.sort_unstable();
        voters.dedup();
        voters
    }

    fn no_change_pending(&self) -> Result<(), String> {
        match &self.pending {
            None => Ok(()),
            Some(pending) => Err(format!(
                "another ring change is in progress: {}; retry once it completes",
                self.describe(pending)
            )),
        }
    }

    pub fn describe(&self, pending: &Pending) -> String {
        let name = |id: NodeId| self.members.get(id as usize).cloned().unwrap_or_else(|| format!("#{id}"));
        match pending.kind {
            ChangeKind::Join => format!("{} joining (driven by {})", name(pending.node), pending.driver),
            ChangeKind::Leave => format!("{} leaving (driven by {})", name(pending.node), pending.driver),
            ChangeKind::Replace { dead } => {
                format!("{} replacing {} (driven by {})", name(pending.node), name(dead), pending.driver)
            }
            ChangeKind::Remove => {
                format!("{} being removed (driven by {})", name(pending.node), pending.driver)
            }
        }
    }

    fn with_pending(&self, kind: ChangeKind, node: NodeId, owners: Vec<NodeId>, driver: &str) -> RingState {
        RingState {
            version: self.version + 1,
            pending: Some(Pending { kind, node, owners, driver: driver.to_string() }),
            ..self.clone()
        }
    }

    /// The pending change the caller asks for, if it is the one already pending (a driver
    /// that restarted, or an operator repeating the command): resume it, driven by `driver`.
    fn resumed(&self, kind: ChangeKind, node: NodeId, driver: &str) -> Option<RingState> {
        let pending = self.pending.as_ref()?;
        if pending.kind != kind || pending.node != node {
            return None;
        }
        if pending.driver == driver {
            return Some(self.clone());
        }
        Some(self.with_pending(kind, node, pending.owners.clone(), driver))
    }

    /// `name` joins: appended to the members, pending ownership of a balanced share.
    pub fn plan_join(&self, name: &str) -> Result<RingState, String> {
        if let Some(id) = self.id_of(name) {
            if let Some(resumed) = self.resumed(ChangeKind::Join, id, name) {
                return Ok(resumed);
            }
            if self.left.contains(&id) {
                return Err(format!("{name} left the cluster; start it with a new data directory"));
            }
            return Err(format!("{name} is a member already"));
        }
        self.no_change_pending()?;
        let id = self.members.len() as NodeId;
        let (ring, _) = self.ring()?.join(id).map_err(|error| format!("joining: {error:?}"))?;
        let mut next = self.with_pending(ChangeKind::Join, id, ring.owners().to_vec(), name);
        next.members.push(name.to_string());
        Ok(next)
    }

    fn member_owning(&self, name: &str) -> Result<NodeId, String> {
        let id = self.id_of(name).ok_or_else(|| format!("{name} is not a member"))?;
        if self.left.contains(&id) {
            return Err(format!("{name} has left already"));
        }
        Ok(id)
    }

    fn shrinking(&self, kind: ChangeKind, name: &str, driver: &str) -> Result<RingState, String> {
        let id = self.member_owning(name)?;
        if let Some(resumed) = self.resumed(kind, id, driver) {
            return Ok(resumed);
        }
        self.no_change_pending()?;
        let owning = self.voters().len();
        if owning <= self.replica_count {
            return Err(format!(
                "{owning} nodes own data and every key has {} replicas: add a node first",
                self.replica_count
            ));
        }
        let (ring, _) = self.ring()?.leave(id).map_err(|error| format!("leaving: {error:?}"))?;
        Ok(self.with_pending(kind, id, ring.owners().to_vec(), driver))
    }

    /// `name` (alive) streams its ranges to their new owners, then leaves.
    pub fn plan_leave(&self, name: &str, driver: &str) -> Result<RingState, String> {
        self.shrinking(ChangeKind::Leave, name, driver)
    }

    /// The dead `name`'s ranges are re-replicated from the survivors.
    pub fn plan_remove(&self, name: &str, driver: &str) -> Result<RingState, String> {
        self.shrinking(ChangeKind::Remove, name, driver)
    }

    /// `new_name` (empty) takes the partitions of the dead `dead_name`.
    pub fn plan_replace(&self, dead_name: &str, new_name: &str) -> Result<RingState, String> {
        let dead = self.member_owning(dead_name)?;
        if let Some(id) = self.id_of(new_name) {
            if let Some(resumed) = self.resumed(ChangeKind::Replace { dead }, id, new_name) {
                return Ok(resumed);
            }
            return Err(format!("{new_name} is a member already"));
        }
        self.no_change_pending()?;
        let id = self.members.len() as NodeId;
        let owners = self.owners.iter().map(|&owner| if owner == dead { id } else { owner }).collect();
        let mut next = self.with_pending(ChangeKind::Replace { dead }, id, owners, new_name);
        next.members.push(new_name.to_string());
        Ok(next)
    }

    /// The version that completes the pending change.
    pub fn completed(&self) -> Result<RingState, String> {
        let pending = self.pending.as_ref().ok_or("no ring change is pending")?;
        let mut next = RingState {
            version: self.version + 1,
            owners: pending.owners.clone(),
            pending: None,
            ..self.clone()
        };
        match pending.kind {
            ChangeKind::Join => {}
            ChangeKind::Leave | ChangeKind::Remove => next.left.push(pending.node),
            ChangeKind::Replace { dead } => next.left.push(dead),
        }
        Ok(next)
    }

    /// What the pending change must copy: for every partition whose replicas change, each
    /// new replica gets the partition from the replica it displaces (a joining or leaving
    /// node: one source, so only the data that must move moves), or from every surviving
    /// replica when the displaced one is dead (replace, remove).
    pub fn transfers(&self) -> Vec<Transfer> {
        let (Some(pending), Ok(ring), Some(next)) = (&self.pending, self.ring(), self.pending_ring()) else {
            return Vec::new();
        };
        let dead = match pending.kind {
            ChangeKind::Replace { dead } => Some(dead),
            ChangeKind::Remove => Some(pending.node),
            ChangeKind::Join | ChangeKind::Leave => None,
        };
        let mut transfers = Vec::new();
        for partition in 0..ring.partition_count() {
            let old = ring.preference_list_of_partition(partition, self.replica_count);
            let new = next.preference_list_of_partition(partition, self.replica_count);
            let added: Vec<NodeId> = new.iter().copied().filter(|n| !old.contains(n)).collect();
            let removed: Vec<NodeId> = old.iter().copied().filter(|n| !new.contains(n)).collect();
            for (index, &target) in added.iter().enumerate() {
                let sources = match (removed.get(index), dead) {
                    (Some(&displaced), None) => vec![displaced],
                    _ => old.iter().copied().filter(|&n| Some(n) != dead && n != target).collect(),
                };
                transfers.push(Transfer { partition, target, sources });
            }
        }
        transfers
    }

    /// Where `transfer` of the pending change copies from, `is_up` telling which members are
    /// reachable: its planned sources while `use_planned` and every one of them is up; else
    /// every other old replica of the partition, all of them, since a subset could miss a
    /// write that a quorum acknowledged (the CAS simulator found it); empty (wait and try
    /// again) while one of those is down too. The driver and both simulators decide here.
    pub fn transfer_sources(
        &self,
        transfer: &Transfer,
        use_planned: bool,
        is_up: impl Fn(NodeId) -> bool,
    ) -> Vec<NodeId> {
        if use_planned && transfer.sources.iter().all(|&source| is_up(source)) {
            return transfer.sources.clone();
        }
        let Ok(ring) = self.ring() else { return Vec::new() };
        let others: Vec<NodeId> = ring
            .preference_list_of_partition(transfer.partition, self.replica_count)
            .iter()
            .copied()
            .filter(|&id| id != transfer.target && !transfer.sources.contains(&id))
            .collect();
        if others.iter().all(|&other| is_up(other)) {
            others
        } else {
            Vec::new()
        }
    }
}

/// What a node answers to a ring Paxos message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingAnswer {
    pub ok: bool,
    pub committed: RingState,
    pub accepted: Option<(RingBallot, RingState)>,
}

/// A node's ring: the committed version, and its acceptor state for the next one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingAcceptor {
    pub committed: RingState,
    #[serde(default)]
    pub promised: RingBallot,
    #[serde(default)]
    pub accepted: Option<(RingBallot, RingState)>,
}

impl RingAcceptor {
    pub fn new(committed: RingState) -> RingAcceptor {
        RingAcceptor { committed, promised: (0, 0, 0), accepted: None }
    }

    fn answer(&self, ok: bool) -> RingAnswer {
        RingAnswer { ok, committed: self.committed.clone(), accepted: self.accepted.clone() }
    }

    /// PREPARE for `version`: promises `ballot` if it is the next version and the highest
    /// ballot seen. Whether the state changed (to persist before answering) and the answer.
    pub fn prepare(&mut self, version: u64, ballot: RingBallot) -> (bool, RingAnswer) {
        if version != self.committed.version + 1 || ballot <= self.promised {
            return (false, self.answer(false));
        }
        self.promised = ballot;
        (true, self.answer(true))
    }

    /// ACCEPT of `state` under `ballot`, unless a higher ballot was promised.
    pub fn accept(&mut self, ballot: RingBallot, state: RingState) -> (bool, RingAnswer) {
        if state.version != self.committed.version + 1 || ballot < self.promised {
            return (false, self.answer(false));
        }
        self.promised = ballot;
        self.accepted = Some((ballot, state));
        (true, self.answer(true))
    }

    /// COMMIT (or catching up from a peer): adopts a newer committed version.
    pub fn commit(&mut self, state: RingState) -> bool {
        if state.version <= self.committed.version {
            return false;
        }
        if self.accepted.as_ref().is_some_and(|(_, accepted)| accepted.version <= state.version) {
            self.accepted = None;
        }
        self.committed = state;
        true
    }
}

/// The proposer's choice after a majority of promises: the highest-ballot proposal any of them
/// accepted for this version (it may have been chosen: it must be proposed again), else ours.
pub fn value_to_propose(answers: &[RingAnswer], version: u64, ours: RingState) -> (RingState, bool) {
    let accepted = answers
        .iter()
        .filter_map(|answer| answer.accepted.as_ref())
        .filter(|(_, state)| state.version == version)
        .max_by_key(|(ballot, _)| *ballot);
    match accepted {
        Some((_, state)) if *state != ours => (state.clone(), false),
        _ => (ours, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> RingState {
        RingState::formed(vec!["a".into(), "b".into(), "c".into()], 3, 8).expect("ring")
    }

    #[test]
    fn a_join_moves_a_balanced_share_from_displaced_replicas_only() {
        let ring = three();
        let joining = ring.plan_join("d").expect("join");
        assert_eq!(joining.version, 2);
        assert_eq!(joining.owners, ring.owners, "owners change only when the join completes");
        let transfers = joining.transfers();
        // d becomes a replica of about 3/4 of the partitions, each copied from one node.
        let partitions = ring.ring().expect("ring").partition_count();
        assert!(transfers.iter().all(|t| t.target == 3 && t.sources.len() == 1), "{transfers:?}");
        let share = transfers.len() as f64 / partitions as f64;
        assert!((share - 0.75).abs() < 0.02, "{share}");
        let done = joining.completed().expect("complete");
        assert_eq!(done.version, 3);
        assert!(done.pending.is_none());
        let counts = done.ring().expect("ring").partition_counts();
        assert!(counts.iter().all(|&(_, c)| c == 64), "{counts:?}");
    }

    #[test]
    fn one_change_at_a_time_and_a_repeated_one_resumes() {
        let joining = three().plan_join("d").expect("join");
        let refused = joining.plan_join("e").expect_err("second join");
        assert!(refused.contains("d joining"), "{refused}");
        assert!(joining.plan_leave("a", "a").is_err());
        assert_eq!(joining.plan_join("d").expect("resume"), joining);
        let taken_over = joining.completed().expect("done").plan_leave("b", "b").expect("leave");
        let resumed = taken_over.plan_leave("b", "c").expect("another driver");
        assert_eq!(resumed.pending.as_ref().map(|p| p.driver.as_str()), Some("c"));
        assert_eq!(resumed.version, taken_over.version + 1);
    }

    #[test]
    fn leaving_below_the_replica_count_is_refused_and_leaves_stream_from_the_leaver() {
        let ring = three();
        assert!(ring.plan_leave("a", "a").expect_err("too few").contains("add a node first"));
        let four = ring.plan_join("d").expect("join").completed().expect("done");
        let leaving = four.plan_leave("b", "b").expect("leave");
        let transfers = leaving.transfers();
        assert!(!transfers.is_empty());
        assert!(transfers.iter().all(|t| t.sources == vec![1] && t.target != 1), "{transfers:?}");
        let done = leaving.completed().expect("done");
        assert!(!done.owners.contains(&1));
        assert_eq!(done.left, vec![1]);
    }

    #[test]
    fn a_replacement_takes_the_dead_nodes_partitions_from_all_survivors() {
        let ring = three().plan_join("d").expect("join").completed().expect("done");
        let replacing = ring.plan_replace("b", "e").expect("replace");
        let next = replacing.pending_ring().expect("pending");
        for partition in 0..next.partition_count() {
            assert_eq!(next.owner(partition) == 4, ring.owners[partition] == 1);
        }
        for transfer in replacing.transfers() {
            assert_eq!(transfer.target, 4);
            assert!(!transfer.sources.contains(&1) && !transfer.sources.is_empty(), "{transfer:?}");
        }
        assert_eq!(replacing.completed().expect("done").left, vec![1]);
        // Removing the dead node instead: its partitions go to the others, copied from every
        // surviving replica of each range.
        let removing = ring.plan_remove("b", "a").expect("remove");
        for transfer in removing.transfers() {
            assert!(transfer.target != 1 && !transfer.sources.contains(&1), "{transfer:?}");
            assert!(transfer.sources.len() >= 2, "{transfer:?}");
        }
        assert!(!removing.completed().expect("done").owners.contains(&1));
    }

    #[test]
    fn a_ring_whose_owners_name_no_member_is_refused() {
        let mut ring = three();
        assert_eq!(ring.replicas(b"k").0.len(), 3);
        ring.owners[7] = 9;
        assert!(ring.ring().is_err());
        assert_eq!(ring.replicas(b"k"), (Vec::new(), Vec::new()));
    }

    #[test]
    fn paxos_chooses_one_of_two_concurrent_changes() {
        let ring = three();
        let mut acceptors: Vec<RingAcceptor> = (0..3).map(|_| RingAcceptor::new(ring.clone())).collect();
        let join_d = ring.plan_join("d").expect("d");
        let join_e = ring.plan_join("e").expect("e");
        // Proposer d prepares at 0 and 1, accepts at 0 only; e then prepares at 1 and 2 with a
        // higher ballot and must propose d's change, not its own.
        for acceptor in &mut acceptors[..2] {
            assert!(acceptor.prepare(2, (1, 1, 0)).1.ok);
        }
        assert!(acceptors[0].accept((1, 1, 0), join_d.clone()).1.ok);
        let answers: Vec<RingAnswer> = acceptors[..2].iter_mut().map(|a| a.prepare(2, (2, 2, 0)).1).collect();
        assert!(answers.iter().all(|a| a.ok));
        let (value, ours) = value_to_propose(&answers, 2, join_e);
        assert!(!ours);
        assert_eq!(value, join_d);
        // The lower ballot can no longer be accepted where the higher was promised.
        assert!(!acceptors[1].accept((1, 1, 0), join_d.clone()).1.ok);
        assert!(acceptors[0].commit(join_d.clone()));
        assert!(!acceptors[0].commit(join_d));
        assert!(!acceptors[0].prepare(2, (3, 3, 0)).1.ok, "a committed version takes no more promises");
    }
}
