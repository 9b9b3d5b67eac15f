//! The cluster's runtime: the I/O that drives the sans-IO protocol machines of the `cluster`
//! crate (`server/cluster/`, re-exported here under their module names): peer connections,
//! the write and read paths, membership and ring changes, anti-entropy, CAS, the durable
//! hint log and counter lease.

pub mod anti_entropy;
pub mod gossip_wire;
pub mod hint_log;
pub mod host;
pub mod lease;
pub mod membership;
pub mod options;
pub mod peer;
pub mod replication;
pub mod ring_file;
pub mod serial;
pub mod state;

pub use ::cluster::{
    coordinator, failure_detector, gossip, hand_off, hints, merkle, paxos, record, ring, ring_change,
    ring_state, rng, serial_op, versions, view,
};
