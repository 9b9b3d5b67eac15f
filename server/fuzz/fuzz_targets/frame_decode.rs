//! Fuzzes everything that reads client bytes: frame splitting, request verification and
//! limit checks, and (for clients) response decoding. None may panic on any input, and the
//! hand-written readers of the hot shapes (`schema/src/fast.rs`) must return exactly what
//! the FlatBuffers verifier's path returns whenever they accept a buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn check(payload: &[u8]) {
    let request = schema::parse_request(payload);
    if let Ok(request) = &request {
        // A request that passed every check respects the limits.
        if let Some(key) = request.op.key() {
            assert!(!key.is_empty() && key.len() <= schema::KEY_SIZE_MAX);
        }
    }
    if request.is_ok() {
        assert_eq!(request, schema::parse_request_general(payload));
    }
    let response = schema::parse_response(payload);
    if response.is_ok() {
        assert_eq!(response, schema::parse_response_general(payload));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(payload)) = schema::split_frame(rest) {
        check(payload);
        rest = &rest[4 + payload.len()..];
    }
    check(data);
});
