//! Cluster logic, written sans-IO: state machines and pure functions that take messages and
//! time and return decisions, so that a simulator can drive a whole cluster in one process.
//! So far: the ring (placement and preference lists).

pub mod ring;
