//! The Redis protocol front door (`--resp-listen`): RESP2 and RESP3 requests on every shard,
//! served through the same paths as the native protocol (the shard mesh, and in a cluster the
//! coordinator). `parser` splits requests, `reply` encodes answers, `commands` gives them
//! Redis's semantics, `store_ops` maps them onto the store, `connection` runs a client.

pub mod commands;
pub mod connection;
pub mod parser;
pub mod reply;
pub mod store_ops;
