//! Fuzzes everything that reads client bytes: frame splitting, request verification and
//! limit checks, and (for clients) response decoding. None may panic on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(payload)) = schema::split_frame(rest) {
        if let Ok(request) = schema::parse_request(payload) {
            // A request that passed every check respects the limits.
            if let Some(key) = request.op.key() {
                assert!(!key.is_empty() && key.len() <= schema::KEY_SIZE_MAX);
            }
        }
        let _ = schema::parse_response(payload);
        rest = &rest[4 + payload.len()..];
    }
    let _ = schema::parse_request(data);
    let _ = schema::parse_response(data);
});
