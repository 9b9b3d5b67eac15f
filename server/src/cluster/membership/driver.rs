//! Driving a ring change, with I/O: agreeing on it as pending, the barrier, the transfers
//! (the target node pulls each partition), completion, progress in gossip, as
//! `ring_change::ChangeDriver` decides each step.

use std::rc::Rc;
use std::time::{Duration, Instant};

use schema::peer::StreamProgress;
use schema::{wire, Consistency, Op};

use super::Membership;
use crate::cluster::peer::PeerRequest;
use crate::cluster::ring::NodeId;
use crate::cluster::ring_change::{self, ChangeDriver, DriverStep};
use crate::cluster::ring_state::{ChangeKind, RingState};
use crate::storage::Storage;

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

impl<S: Storage> Membership<S> {
    /// Starts driving the change this node owes: its own join or replacement, or a change it
    /// drove before a restart.
    pub(super) fn maybe_drive(self: &Rc<Self>) {
        if self.driving.get() {
            return;
        }
        let Some(state) = self.committed() else { return };
        let plan = match &state.pending {
            Some(pending) if pending.driver == self.me => match pending.kind {
                ChangeKind::Join => Plan::Join,
                ChangeKind::Replace { dead } => {
                    Plan::Replace(state.members.get(dead as usize).cloned().unwrap_or_default())
                }
                ChangeKind::Leave => {
                    Plan::Leave(state.members.get(pending.node as usize).cloned().unwrap_or_default())
                }
                ChangeKind::Remove => {
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
}
