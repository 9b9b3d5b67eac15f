//! The cluster's protocol logic, sans-IO: state machines and pure functions that take
//! messages, time and randomness as inputs and return decisions. kvd's runtime
//! (`server/src/cluster/`) drives them with sockets, timers and storage; the simulators in
//! this crate drive the same code with a seeded network, clock and disk. Nothing here
//! reads a clock, draws unseeded randomness or touches a file (`clippy.toml` denies it).
//!
//! - placement: `ring` (partitions, preference lists), `ring_state` (the agreed ring and a
//!   change in progress), `ring_change` (agreeing on a version, driving a change),
//!   `view` (what this node believes of the cluster);
//! - data: `versions` (version vectors, dots, siblings), `record` (what a replica stores,
//!   its codec and garbage-collection rules), `merkle` (anti-entropy digests);
//! - rounds: `coordinator` (write and read quorums, hints, read repair), `paxos` (CAS and
//!   ring agreement), `serial_op` and `update` (what a CAS, a SERIAL read or a Redis
//!   conditional command decides), `hints` (hinted hand-off queues);
//! - membership: `gossip`, `failure_detector`; `hand_off` (dropping moved ranges);
//! - `rng`: the one seeded random-number generator.
//!
//! The simulators (`simulation`, `serial_simulation`) and the linearizability checker are
//! test code.

#![deny(unsafe_code)]

pub mod coordinator;
pub mod failure_detector;
pub mod gossip;
pub mod hand_off;
pub mod hints;
pub mod linearizability;
pub mod merkle;
pub mod paxos;
pub mod record;
pub mod ring;
pub mod ring_change;
pub mod ring_state;
pub mod rng;
pub mod serial_op;
pub mod update;
pub mod versions;
pub mod view;

#[cfg(test)]
mod serial_simulation;
#[cfg(test)]
mod sim_ring;
#[cfg(test)]
mod simulation;
