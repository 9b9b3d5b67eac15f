//! Fuzzes the decoders of sorted-table blocks read back from disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use server::table::format;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let _ = format::decode_footer(data, 0, size.max(1));
    let _ = format::decode_index(data, 0, size);
    let _ = format::decode_bloom(data, 0, format::TABLE_FORMAT_VERSION);
    for verify in [false, true] {
        if let Ok(Some(entry)) = format::find_in_data_block(data, 0, b"key", verify) {
            assert_eq!(entry.key, b"key");
        }
    }
    let decoded = format::decode_data_block(data, 0);
    if let Ok(entries) = &decoded {
        for entry in entries {
            assert!(!entry.key.is_empty() && entry.key.len() <= schema::KEY_SIZE_MAX);
        }
    }
    // A compaction's scan (spans lent out of its read buffer) accepts exactly the blocks the
    // decoder accepts, and lends the same entries.
    let mut spans = Vec::new();
    let spanned = format::span_data_block(data, 0, data.len(), 0, &mut spans);
    assert_eq!(spanned.is_ok(), decoded.is_ok());
    if let Ok(entries) = decoded {
        assert_eq!(spans.len(), entries.len());
        for (span, entry) in spans.iter().zip(&entries) {
            assert_eq!(span.entry(data).to_entry(), *entry);
        }
    }
});
