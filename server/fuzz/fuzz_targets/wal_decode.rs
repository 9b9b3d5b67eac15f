//! Fuzzes the decoders of bytes read back from disk: log segment headers and batches.
#![no_main]

use libfuzzer_sys::fuzz_target;
use server::wal::format;

fuzz_target!(|data: &[u8]| {
    // A segment: header block, then batches; anything else: batches from the start.
    let mut offset = if format::decode_segment_header(data).is_ok() { 4096 } else { 0 };
    while let Some(rest) = data.get(offset..) {
        match format::decode_batch(rest) {
            Ok(batch) => {
                assert!(batch.size_on_disk > 0 && batch.size_on_disk % 4096 == 0);
                offset += batch.size_on_disk;
            }
            Err(_) => break,
        }
    }
});
