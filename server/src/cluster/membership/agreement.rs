//! Agreeing on ring versions, with I/O: the ring Paxos messages this node sends (as the
//! proposer `ring_change::RingRound` decides) and answers (its `RingAcceptor`, durable in
//! `CLUSTER` before any answer), adopting newer rings, and catching up from peers.

use std::net::SocketAddr;
use std::time::Duration;

use schema::wire::RingPhase;
use schema::{Consistency, Op};

use super::{announce, check_members, Membership, CLUSTER_FILE, RING_TIMEOUT};
use crate::cluster::peer::PeerRequest;
use crate::cluster::ring_change::{self, agree_backoff_ms, RingRound, RoundStep, AGREE_ATTEMPTS};
use crate::cluster::ring_state::{RingAcceptor, RingAnswer, RingBallot, RingState};
use crate::cluster::versions::actor_of;
use crate::cluster::view::parse_address;
use crate::storage::Storage;

fn phase_name(phase: RingPhase) -> &'static str {
    phase.variant_name().unwrap_or("?")
}

impl<S: Storage> Membership<S> {
    /// Makes the ring acceptor as it is now durable (`CLUSTER`).
    async fn persist(&self) -> Result<(), String> {
        self.ring_file
            .save(|| self.ring.borrow().clone())
            .await
            .map_err(|error| format!("saving {CLUSTER_FILE}: {error}"))
    }

    /// Adopts a newer committed ring (a commit, or one read from a peer), durable before it
    /// is announced or published.
    pub(super) async fn adopt(&self, state: RingState) -> Result<bool, String> {
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
    pub(super) async fn catch_up(&self) {
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

    pub(super) fn address_of(&self, name: &str) -> Option<SocketAddr> {
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
    pub(super) async fn agree(
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
}
