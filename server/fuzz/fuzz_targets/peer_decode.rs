//! Fuzzes the decoders of node-to-node payloads: a key's versions (and a stored record),
//! gossip, the topology and anti-entropy's Merkle replies. Whatever they accept must encode
//! back to bytes that decode to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::peer;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = peer::decode_key_versions(data) {
        assert_eq!(peer::decode_key_versions(&peer::encode_key_versions(&decoded)), Ok(decoded));
    }
    if let Ok(decoded) = peer::decode_gossip(data) {
        assert_eq!(peer::decode_gossip(&peer::encode_gossip(&decoded)), Ok(decoded));
    }
    if let Ok(decoded) = peer::decode_topology(data) {
        assert_eq!(peer::decode_topology(&peer::encode_topology(&decoded)), Ok(decoded));
    }
    if let Ok(decoded) = peer::decode_merkle(data) {
        assert_eq!(peer::decode_merkle(&peer::encode_merkle(&decoded)), Ok(decoded));
    }
});
