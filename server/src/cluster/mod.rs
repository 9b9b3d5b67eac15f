//! Cluster logic, written sans-IO: state machines and pure functions that take messages and
//! time and return decisions, so that a simulator can drive a whole cluster in one process.
//! So far: the ring (placement, preference lists), per-key versions (version vectors,
//! dots, siblings), the phi-accrual failure detector, gossip membership, a coordinator's
//! per-request bookkeeping (quorums, hints, read repair), hinted-handoff queues, and the lease that keeps
//! version-vector counters from ever being reused.

pub mod anti_entropy;
pub mod coordinator;
pub mod failure_detector;
pub mod gossip;
pub mod hint_log;
pub mod hints;
pub mod lease;
pub mod membership;
pub mod merkle;
pub mod paxos;
pub mod peer;
pub mod replication;
pub mod ring;
pub mod ring_state;
pub mod serial;
#[cfg(test)]
mod serial_simulation;
#[cfg(test)]
mod simulation;
pub mod versions;
pub mod view;
