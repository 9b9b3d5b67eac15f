//! Fuzzes the decoders of the small durable files a node reads back at start: a shard's
//! manifest, NODE, LEASE, CLUSTER (the ring file) and the hint log. Whatever they accept must encode back to bytes
//! that decode to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use server::cluster::{hint_log, lease, ring_file};
use server::engine::manifest;
use server::meta;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = manifest::decode(data) {
        assert_eq!(manifest::decode(&manifest::encode(&decoded)).ok(), Some(decoded));
    }
    if let Ok(decoded) = meta::decode(data) {
        assert_eq!(meta::decode(&meta::encode(&decoded)).ok(), Some(decoded));
    }
    if let Ok(bound) = lease::decode(data) {
        assert_eq!(lease::decode(&lease::encode(bound)), Ok(bound));
    }
    if let Ok(acceptor) = ring_file::decode(data) {
        assert_eq!(ring_file::decode(&ring_file::encode(&acceptor)), Ok(acceptor));
    }
    for hint in hint_log::replay(data) {
        assert_eq!(hint_log::replay(&hint_log::add_record(&hint)), vec![hint]);
    }
});
