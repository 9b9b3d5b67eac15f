//! Fuzzes the decoders of sorted-table blocks read back from disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use server::table::format;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let _ = format::decode_footer(data, 0, size.max(1));
    let _ = format::decode_index(data, 0, size);
    let _ = format::decode_bloom(data, 0);
    for verify in [false, true] {
        if let Ok(Some(entry)) = format::find_in_data_block(data, 0, b"key", verify) {
            assert_eq!(entry.key, b"key");
        }
    }
    if let Ok(entries) = format::decode_data_block(data, 0) {
        for entry in entries {
            assert!(!entry.key.is_empty() && entry.key.len() <= schema::KEY_SIZE_MAX);
        }
    }
});
