//! Fuzzes the RESP request parser and the peer payload decoders (versions, gossip, topology):
//! none may panic, and every parsed command respects the limits and consumes what it says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use server::resp::parser::{parse, ARG_COUNT_MAX, ARG_SIZE_MAX};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(parsed)) = parse(rest) {
        assert!(parsed.consumed > 0 && parsed.consumed <= rest.len());
        assert!(parsed.args.len() <= ARG_COUNT_MAX);
        assert!(parsed.args.iter().all(|arg| arg.len() <= ARG_SIZE_MAX));
        rest = &rest[parsed.consumed..];
    }
    let _ = schema::peer::decode_key_versions(data);
    let _ = schema::peer::decode_gossip(data);
    let _ = schema::peer::decode_topology(data);
});
