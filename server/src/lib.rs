//! kvd, the kv node: a thread-per-core, shared-nothing key-value server.
//!
//! See ARCHITECTURE.md for the map. In short: `node` starts one glommio executor per shard;
//! each runs `shard`, which owns a `store` (the LSM `engine`: `wal`, memtables and `table`s)
//! and serves `net` (native) and `resp` connections;
//! `mesh` carries requests between shards; every disk access goes through `storage`.

pub mod args;
pub mod child;
pub mod clock;
pub mod cluster;
pub mod command;
pub mod config;
pub mod engine;
pub mod event;
pub mod launch;
pub mod le;
pub mod mesh;
pub mod meta;
pub mod metrics;
pub mod metrics_server;
pub mod net;
pub mod node;
pub mod preflight;
pub mod resp;
pub mod shard;
pub mod storage;
pub mod store;
pub mod table;
pub mod wal;

/// The protocol crate's checker and generator, for the tests and tools built on this one.
pub use ::cluster::{linearizability, rng, update};
