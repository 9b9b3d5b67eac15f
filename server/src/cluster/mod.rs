//! Cluster logic, written sans-IO: state machines and pure functions that take messages and
//! time and return decisions, so that a simulator can drive a whole cluster in one process.
//! So far: the ring (placement, preference lists), per-key versions (version vectors,
//! dots, siblings) and the phi-accrual failure detector.

pub mod failure_detector;
pub mod ring;
pub mod versions;
