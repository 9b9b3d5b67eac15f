//! The kv wire protocol: limits, framing, the shard function, and the one safe way to
//! encode and decode FlatBuffers frames. Server and client both speak only through here.
//!
//! Decoding verifies every buffer with the FlatBuffers verifier and checks every limit
//! before anything else looks at the bytes; see `schema/PROTOCOL.md`. The hot shapes (Get,
//! Put and Delete requests, plain responses) are read and written by hand in `fast.rs`,
//! held to the same acceptance and the same results by tests and a fuzz target.

#![deny(unsafe_code)]

#[allow(clippy::all, clippy::unwrap_used, clippy::undocumented_unsafe_blocks, unused_imports, deprecated, missing_docs)]
#[allow(unsafe_code)] // generated accessors read verified buffers
#[rustfmt::skip]
mod generated {
    include!("generated/kv_generated.rs");
}

mod decode;
mod encode;
mod fast;
pub mod peer;

pub use decode::{
    parse_request, parse_request_general, parse_response, parse_response_general, split_frame,
    split_peer_frame, FrameError, Op, ParseError, RequestView, ResponseView, SiblingView, TTL_MS_MAX,
};
pub use encode::{
    encode_request, encode_request_general, encode_response, encode_response_general, HelloInfo, ResponseOut,
    SiblingOut,
};
pub use generated::kv::wire;
pub use wire::{Consistency, ShardFunction, Status};

/// Version of the protocol this build speaks. A Hello with a higher version is answered with this
/// one (the client then speaks it, or hangs up); version 0 is refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// Keys are 1..=256 bytes.
pub const KEY_SIZE_MAX: usize = 256;
/// Values are 0..=1 MiB.
pub const VALUE_SIZE_MAX: usize = 1 << 20;
/// A coordinator refuses (`SIBLINGS_FULL`) a write with a causal context that would leave the
/// key with more than this many bytes of sibling values: room for two maximal values. A key
/// within it always fits in one reply.
pub const SIBLING_VALUE_BYTES_MAX: usize = 2 * VALUE_SIZE_MAX;
/// The largest value a node's storage engine holds. A cluster node stores all of a key's
/// versions (siblings, version vector, a pending Paxos proposal) as one value. Merges never
/// drop a sibling, so a key may outgrow the coordinator's limits (concurrent coordinators
/// each within them); this leaves room for eight times the byte limit. A merge beyond it is
/// refused (the replicas that hold the versions keep them), never truncated.
pub const STORED_VALUE_SIZE_MAX: usize = 8 * SIBLING_VALUE_BYTES_MAX + 64 * 1024;
/// Bytes of the little-endian length prefix in front of every frame.
pub const FRAME_HEADER_SIZE: usize = 4;
/// The largest frame payload a client sends or receives: a CAS carries two values plus a key,
/// a reply at most `SIBLING_VALUE_BYTES_MAX` of sibling values (the rest are left for a
/// following page), and FlatBuffers adds a little framing of its own.
pub const FRAME_SIZE_MAX: usize = 2 * VALUE_SIZE_MAX + 64 * 1024;
/// The largest frame payload a node accepts and sends: node-to-node messages carry a key's
/// whole stored versions. A client frame above `FRAME_SIZE_MAX` gets no more than an error.
pub const PEER_FRAME_SIZE_MAX: usize = STORED_VALUE_SIZE_MAX + 64 * 1024;
/// Seed of the shard hash; part of the protocol, never changed for a data directory.
pub const SHARD_HASH_SEED: u64 = 0;
/// Length of an optional write id.
pub const WRITE_ID_SIZE: usize = 16;
/// A reply never holds more siblings than this, and a coordinator refuses (`SIBLINGS_FULL`) a
/// write with a causal context that would leave the key with more.
pub const SIBLING_COUNT_MAX: usize = 64;

const _: () = assert!(FRAME_SIZE_MAX <= u32::MAX as usize);
const _: () = assert!(FRAME_SIZE_MAX > 2 * VALUE_SIZE_MAX + KEY_SIZE_MAX);
// A replica's versions travel in one frame (Replicate, the reply to ReadReplica).
const _: () = assert!(PEER_FRAME_SIZE_MAX >= STORED_VALUE_SIZE_MAX + KEY_SIZE_MAX + 4096);
const _: () = assert!(PEER_FRAME_SIZE_MAX <= u32::MAX as usize);
// A reply's page of siblings, with their metadata and the context, fits in a client frame.
const _: () = assert!(FRAME_SIZE_MAX >= SIBLING_VALUE_BYTES_MAX + SIBLING_COUNT_MAX * 64 + 16 * 1024);

/// The stable 64-bit hash of a key: xxh3-64 with [`SHARD_HASH_SEED`]. Ring tokens and shard
/// placement both derive from it, so it must never change for an existing data directory.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key, SHARD_HASH_SEED)
}

/// The shard that owns `key` on a node with `shard_count` shards
/// ([`ShardFunction::XXH3_64_MULSHIFT`]): the hash scaled onto `0..shard_count`, so that
/// each shard owns one contiguous range of hash values.
pub fn shard_of(key: &[u8], shard_count: usize) -> usize {
    assert!(shard_count > 0);
    ((u128::from(key_hash(key)) * shard_count as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_function_is_pinned() {
        // These figures are part of the protocol: a change here breaks every shard-aware
        // client and every data directory.
        assert_eq!(key_hash(b""), 0x2d06800538d394c2);
        assert_eq!(key_hash(b"hello"), 0x9555e8555c62dcfd);
        assert_eq!(shard_of(b"hello", 1), 0);
        assert_eq!(shard_of(b"hello", 4), 2);
    }

    #[test]
    fn shard_function_is_balanced() {
        let shard_count = 4;
        let mut counts = [0usize; 4];
        for i in 0..40_000u32 {
            counts[shard_of(format!("key-{i}").as_bytes(), shard_count)] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{counts:?}");
        }
    }
}
