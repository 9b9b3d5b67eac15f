//! Linearizable operations in a cluster, with real I/O: CAS, the Redis conditional and
//! counter commands, and SERIAL reads, each one run of the key's Paxos (`paxos.rs` decides;
//! this sends, waits and stores). A shard also serves PREPARE, PROPOSE and COMMIT for the
//! keys it holds a replica of: the acceptor state lives in the key's stored record and is
//! durable before the answer.
//!
//! Any node can propose (the key's owning shard on the node that got the request); the
//! replicas among the key's preference list on this node are served without the network.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::StreamExt;
use schema::peer::decode_key_versions;
use schema::wire::PaxosPhase;
use schema::{Op, Status};

use super::coordinator::Consistency;
use super::host::Host;
use super::paxos::{backoff_us, next_ballot, refuses_stale_proposer, Ballot, Failure, Proposer, Step};
use super::peer::PeerRequest;
use super::record::{encode_versions, record_from_data, versions_from_data, Record, Value};
use super::replication::{
    client_reply, decode_record, encode_bounded, place, too_few_replicas, ClusterShard,
};
use super::ring::NodeId;
use super::rng::Rng;
use super::serial_op::{decide, Decision, SerialAnswer};
use super::versions::Versions;
use crate::clock::now_ms;
use crate::command::{LocalReply, Reply, Version};
use crate::storage::Storage;

pub use super::serial_op::SerialOp;

/// The longest a single phase waits for a replica (the operation's deadline may be shorter).
const PHASE_TIMEOUT: Duration = Duration::from_millis(1000);

/// The client's reply to a decision's answer (a read's page is cut from `state`).
fn reply_of(answer: SerialAnswer, state: &Versions<Value>, now_ms: u64) -> LocalReply {
    match answer {
        SerialAnswer::Read(page) => client_reply(state, page, now_ms),
        SerialAnswer::Done => Reply::Done,
        SerialAnswer::CasFailed(seen) => Reply::CasFailed(seen.map(|seen| Version {
            value: Some(seen.value),
            timestamp_us: seen.timestamp_us,
            ttl_left_ms: seen.ttl_left_ms,
        })),
        SerialAnswer::NotFound => Reply::NotFound,
        SerialAnswer::Updated(answer) => Reply::Updated(answer),
    }
}

/// What a replica answered in one phase: its record after handling the message.
type PhaseAnswer = (u64, PaxosPhase, NodeId, Option<Record>);

/// Runs `op` on `key` through its Paxos, proposing from this shard.
pub async fn coordinate<S: Storage, H: Host<S>>(
    shard: &Rc<H>,
    key: Vec<u8>,
    op: SerialOp,
    commit: Consistency,
    timeout: Duration,
) -> LocalReply {
    let (cluster, view, replicas, me) = match place(shard, &key) {
        Ok(placed) => placed,
        Err(reply) => return reply,
    };
    let deadline = Instant::now() + timeout;
    // Writers of one key take turns on this shard: proposers of one node would only pre-empt
    // each other (clients send a key's requests to one replica, so most contention is here).
    let _turn = match op {
        SerialOp::Read { .. } => None,
        _ => match take_turn(cluster, &key, deadline).await {
            Some(turn) => Some(turn),
            None => {
                return Reply::error(
                    Status::TIMEOUT,
                    "waited past the deadline for the key's earlier writes; nothing was applied",
                )
            }
        },
    };
    let commit_wait = match op {
        SerialOp::Read { .. } => 0,
        _ => match commit {
            Consistency::One => 0,
            consistency => consistency.required(replicas.len()),
        },
    };
    let pending = view.pending_replicas(&key);
    let mut proposer = Proposer::<Value, LocalReply>::new_with_pending(&replicas, &pending, commit_wait);
    let (sender, mut answers) = mpsc::unbounded::<PhaseAnswer>();
    let mut rng = Rng::new(u64::from(cluster.actor) ^ shard.store().timestamp_us());
    let broadcast = |phase_id, phase, ballot, proposal: &Versions<Value>, to: &[NodeId]| {
        send(shard, &view, me, &key, phase_id, phase, ballot, proposal, to, &sender, deadline)
    };
    let mut step = match op {
        SerialOp::Read { .. } => proposer.start_read(|node| view.is_live(node)),
        _ => Step::Retry { attempt: 0 },
    };
    loop {
        step = match step {
            Step::Retry { attempt } => {
                if attempt > 0 {
                    let pause = Duration::from_micros(backoff_us(attempt, rng.next_u64()));
                    if Instant::now() + pause >= deadline {
                        return timed_out(&proposer);
                    }
                    glommio::timer::sleep(pause).await;
                }
                let counter = match cluster.lease.next().await {
                    Ok(counter) => counter,
                    Err(error) => return Reply::error(Status::INTERNAL, format!("counter lease: {error}")),
                };
                let ballot =
                    next_ballot(proposer.floor(), shard.store().timestamp_us(), cluster.actor, counter);
                let view = cluster.view();
                proposer.start(ballot, |node| view.is_live(node))
            }
            Step::Prepare { phase, ballot, to } => {
                broadcast(phase, PaxosPhase::PREPARE, ballot, &Versions::default(), &to);
                Step::Wait
            }
            Step::Read { phase, to } => {
                broadcast(phase, PaxosPhase::READ, Ballot::default(), &Versions::default(), &to);
                Step::Wait
            }
            Step::Propose { phase, ballot, proposal, to } => {
                broadcast(phase, PaxosPhase::PROPOSE, ballot, &proposal, &to);
                Step::Wait
            }
            Step::Commit { phase, ballot, proposal, to } => {
                broadcast(phase, PaxosPhase::COMMIT, ballot, &proposal, &to);
                proposer.commits_sent()
            }
            Step::Decide { state } => {
                let now = now_ms();
                match decide(&op, &state, now) {
                    Decision { write: None, answer } => proposer.answer(reply_of(answer, &state, now)),
                    Decision { write: Some((value, ttl_ms)), answer } => {
                        let answer = reply_of(answer, &state, now);
                        let counter = match cluster.lease.next().await {
                            Ok(counter) => counter,
                            Err(error) => {
                                return Reply::error(Status::INTERNAL, format!("counter lease: {error}"))
                            }
                        };
                        let timestamp_us = shard.store().timestamp_us();
                        let expires_at_ms = if ttl_ms == 0 { 0 } else { timestamp_us / 1000 + ttl_ms };
                        // The state after the write: one sibling, whose context covers all it read.
                        let mut proposal = state.clone();
                        let value = value.map(|v| (v, expires_at_ms));
                        let dot = proposal.write(
                            cluster.actor,
                            counter,
                            Some(state.context()),
                            value,
                            timestamp_us,
                        );
                        // A write's answer carries the key's context after it.
                        let answer = match answer {
                            Reply::Done => Reply::Written(proposal.context().encode()),
                            answer => answer,
                        };
                        proposer.write(proposal, dot, answer)
                    }
                }
            }
            Step::Done(Ok(reply)) => return reply,
            Step::Done(Err(Failure::Unavailable(too_few))) => {
                return too_few_replicas(cluster, replicas.len(), too_few)
            }
            Step::Done(Err(Failure::Indeterminate)) => return timed_out(&proposer),
            Step::Wait => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let next = futures_lite::future::or(async { answers.next().await }, async {
                    glommio::timer::sleep(remaining).await;
                    None
                });
                let Some((phase, kind, from, record)) = next.await else {
                    return timed_out(&proposer);
                };
                match kind {
                    PaxosPhase::PREPARE | PaxosPhase::READ => {
                        proposer.on_promise(phase, from, record.as_ref().map(|r| (&r.acceptor, &r.versions)))
                    }
                    PaxosPhase::PROPOSE => {
                        proposer.on_accept(phase, from, record.as_ref().map(|r| &r.acceptor))
                    }
                    _ => proposer.on_commit(phase, from, record.is_some()),
                }
            }
        };
    }
}

/// This shard's turn to propose for one key; the next waiter's when dropped.
struct Turn<'a, S: Storage> {
    cluster: &'a ClusterShard<S>,
    key: &'a [u8],
    semaphore: Rc<glommio::sync::Semaphore>,
}

impl<S: Storage> Drop for Turn<'_, S> {
    fn drop(&mut self) {
        self.semaphore.signal(1);
        // The map's reference and ours: nobody waits, the entry goes.
        if Rc::strong_count(&self.semaphore) == 2 {
            self.cluster.serial_turns.borrow_mut().remove(self.key);
        }
    }
}

async fn take_turn<'a, S: Storage>(
    cluster: &'a ClusterShard<S>,
    key: &'a [u8],
    deadline: Instant,
) -> Option<Turn<'a, S>> {
    let semaphore = cluster
        .serial_turns
        .borrow_mut()
        .entry(key.to_vec())
        .or_insert_with(|| Rc::new(glommio::sync::Semaphore::new(1)))
        .clone();
    let remaining = deadline.saturating_duration_since(Instant::now());
    let acquired = futures_lite::future::or(async { semaphore.acquire(1).await.is_ok() }, async {
        glommio::timer::sleep(remaining).await;
        false
    });
    if acquired.await {
        return Some(Turn { cluster, key, semaphore });
    }
    // Not acquired: nothing to give back, but the entry goes if nobody else uses it.
    if Rc::strong_count(&semaphore) == 2 {
        cluster.serial_turns.borrow_mut().remove(key);
    }
    None
}

fn timed_out(proposer: &Proposer<Value, LocalReply>) -> LocalReply {
    let detail = if proposer.may_have_written() {
        "it may or may not have applied; a SERIAL read tells which"
    } else {
        "nothing was applied"
    };
    Reply::error(Status::TIMEOUT, format!("no Paxos round completed in time: {detail}"))
}

/// Sends one phase's message to each of `to`; the answers arrive on `sender`.
#[allow(clippy::too_many_arguments)]
fn send<S: Storage, H: Host<S>>(
    shard: &Rc<H>,
    view: &super::view::ClusterView,
    me: NodeId,
    key: &[u8],
    phase_id: u64,
    phase: PaxosPhase,
    ballot: Ballot,
    proposal: &Versions<Value>,
    to: &[NodeId],
    sender: &mpsc::UnboundedSender<PhaseAnswer>,
    deadline: Instant,
) {
    let bytes: Rc<[u8]> = match phase {
        PaxosPhase::PROPOSE | PaxosPhase::COMMIT => Rc::from(encode_versions(proposal)),
        _ => Rc::from(&[][..]),
    };
    // The ring that placed this proposer: replicas holding a newer one refuse it.
    let ring_version = view.formed.as_ref().map_or(0, |formed| formed.version);
    let timeout = deadline.saturating_duration_since(Instant::now()).min(PHASE_TIMEOUT);
    for &node in to {
        let shard = shard.clone();
        let sender = sender.clone();
        let key = key.to_vec();
        let bytes = bytes.clone();
        let address = view.replica_address(node, &key);
        glommio::spawn_local(async move {
            let record = if node == me {
                match accept(&shard, &key, phase, ballot, &bytes, ring_version).await {
                    Reply::Versions(stored) => decode_answer(&stored),
                    _ => None,
                }
            } else {
                remote(&shard, address, &key, (phase, ballot, ring_version), &bytes, timeout).await
            };
            let _ = sender.unbounded_send((phase_id, phase, node, record));
        })
        .detach();
    }
}

async fn remote<S: Storage, H: Host<S>>(
    shard: &H,
    address: Option<std::net::SocketAddr>,
    key: &[u8],
    (phase, ballot, ring_version): (PaxosPhase, Ballot, u64),
    proposal: &[u8],
    timeout: Duration,
) -> Option<Record> {
    let cluster = shard.cluster()?;
    let op = Op::Paxos { key, phase, ballot, proposal, ring_version };
    let request = PeerRequest { op, consistency: schema::Consistency::ONE, context: &[], timeout };
    let response = cluster.peers.link(address?).call(request).await.ok()?;
    if response.status != Status::OK {
        return None;
    }
    decode_answer(&response.versions)
}

/// A replica's record as it answered (empty: it holds nothing of the key).
fn decode_answer(bytes: &[u8]) -> Option<Record> {
    if bytes.is_empty() {
        return Some(Record::default());
    }
    decode_key_versions(bytes).ok().map(record_from_data)
}

/// Acceptor side: handles one Paxos message for `key` and answers with the stored record
/// after it, once durable. A proposer placed by an older ring than this node's is refused
/// (`paxos::refuses_stale_proposer`).
pub async fn accept<S: Storage, H: Host<S>>(
    shard: &H,
    key: &[u8],
    phase: PaxosPhase,
    ballot: Ballot,
    proposal: &[u8],
    ring_version: u64,
) -> LocalReply {
    let mine = shard.cluster().and_then(|cluster| cluster.view().formed.as_ref().map(|f| f.version));
    let mine = mine.unwrap_or(0);
    if refuses_stale_proposer(ring_version, mine) {
        return Reply::error(
            Status::UNAVAILABLE,
            format!(
                "the proposer was placed by ring version {ring_version}; this replica holds version {mine}"
            ),
        );
    }
    let proposal = match phase {
        PaxosPhase::PROPOSE | PaxosPhase::COMMIT => match decode_key_versions(proposal) {
            Ok(data) => versions_from_data(data),
            Err(error) => return Reply::error(Status::BAD_REQUEST, error),
        },
        PaxosPhase::READ => {
            return match shard.store().read_raw(key).await {
                Ok(bytes) => Reply::Versions(bytes.map(|b| b.to_vec()).unwrap_or_default()),
                Err(reply) => reply,
            }
        }
        _ => Versions::default(),
    };
    shard.store().observe_peer_timestamp(ballot.time_us, super::replication::CLOCK_SKEW_MAX_US);
    let size =
        proposal.siblings().iter().map(|s| s.value.as_ref().map_or(0, |v| v.0.len()) + 48).sum::<usize>()
            + 256;
    let mut answer = None;
    let updated = shard
        .store()
        .update_raw(key, size, |current| {
            let mut record = decode_record(current)?;
            let changed = match phase {
                PaxosPhase::PREPARE => record.acceptor.prepare(ballot),
                PaxosPhase::PROPOSE => record.acceptor.accept(ballot, &proposal),
                PaxosPhase::COMMIT => record.acceptor.commit(ballot, &proposal, &mut record.versions),
                _ => return Err(Reply::error(Status::BAD_REQUEST, "unknown Paxos phase")),
            };
            if !changed {
                answer = Some(current.map(<[u8]>::to_vec).unwrap_or_default());
                return Ok(None);
            }
            encode_bounded(shard.cluster(), &record).map(Some)
        })
        .await;
    match updated {
        Ok((stored, seq)) => match shard.store().wait_acked(seq).await {
            Ok(()) => Reply::Versions(stored.or(answer).unwrap_or_default()),
            Err(reply) => reply,
        },
        Err(reply) => reply,
    }
}
