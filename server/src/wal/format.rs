//! Byte layout of the write-ahead log (see server/src/engine/README.md, "File formats"). Pure functions:
//! no I/O, no clocks, so that every layout rule is tested here.
//!
//! A segment is a header block followed by batches. A batch starts at a block boundary, has
//! a header and its records, and is zero-padded to the next block boundary, so that a group
//! commit never rewrites a block holding an acknowledged record. All integers little-endian.
//!
//! ```text
//! segment header (block 0): magic[8] format_version:u32 shard_index:u32 shard_count:u32
//!                           flags:u32 segment_index:u64 first_seq:u64 crc32c:u32 (over the rest)
//! batch header (32 bytes):  magic:u32 record_count:u32 payload_size:u32 reserved:u32
//!                           first_seq:u64 reserved:u32 crc32c:u32 (over the 28 bytes before it)
//! record (40 + key + value): crc32c:u32 (over everything after it) size:u32 seq:u64 kind:u8
//!                           reserved:u8 key_size:u16 value_size:u32 timestamp_us:u64
//!                           expires_at_ms:u64 key value
//! ```
#![deny(clippy::indexing_slicing)]

use schema::{KEY_SIZE_MAX, STORED_VALUE_SIZE_MAX};

use crate::le::{u16_at, u32_at, u64_at};
use crate::storage::{block_align_up, BLOCK_SIZE};

pub const SEGMENT_MAGIC: [u8; 8] = *b"KVDWAL\r\n";
pub const FORMAT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_SIZE: usize = 44;
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"KVBT");
pub const BATCH_HEADER_SIZE: usize = 32;
pub const RECORD_HEADER_SIZE: usize = 40;
pub const RECORD_SIZE_MAX: usize = RECORD_HEADER_SIZE + KEY_SIZE_MAX + STORED_VALUE_SIZE_MAX;
/// A batch is cut once its records reach this many payload bytes (a larger record goes in a
/// batch of its own).
pub const BATCH_PAYLOAD_SIZE_TARGET: usize = 4 << 20;
/// A batch holds at most this many payload bytes: the target, or one record of the largest size.
pub const BATCH_PAYLOAD_SIZE_MAX: usize =
    if RECORD_SIZE_MAX > BATCH_PAYLOAD_SIZE_TARGET { RECORD_SIZE_MAX } else { BATCH_PAYLOAD_SIZE_TARGET };

const _: () = assert!(SEGMENT_HEADER_SIZE <= BLOCK_SIZE);
const _: () = assert!(BATCH_PAYLOAD_SIZE_MAX >= RECORD_SIZE_MAX);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Put = 1,
    Delete = 2,
}

/// One logged mutation, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub seq: u64,
    pub kind: RecordKind,
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub timestamp_us: u64,
    /// Unix milliseconds at which the value expires; 0 for never.
    pub expires_at_ms: u64,
}

impl Record<'_> {
    pub fn encoded_size(&self) -> usize {
        RECORD_HEADER_SIZE + self.key.len() + self.value.len()
    }
}

/// Segment flag: records in this segment were acknowledged before `fdatasync` (sync policy
/// `interval` or `never`), so after a power loss damage anywhere in it is an expected loss,
/// not corruption.
pub const SEGMENT_FLAG_ACK_BEFORE_SYNC: u32 = 1;

/// Identity of a segment, checked on every open so that a file from another shard or
/// another layout is never replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard_index: u32,
    pub shard_count: u32,
    pub flags: u32,
    pub segment_index: u64,
    pub first_seq: u64,
}

/// The whole header block of a new segment.
pub fn encode_segment_header(header: &SegmentHeader) -> Vec<u8> {
    let mut block = Vec::with_capacity(BLOCK_SIZE);
    block.extend_from_slice(&SEGMENT_MAGIC);
    block.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    block.extend_from_slice(&header.shard_index.to_le_bytes());
    block.extend_from_slice(&header.shard_count.to_le_bytes());
    block.extend_from_slice(&header.flags.to_le_bytes());
    block.extend_from_slice(&header.segment_index.to_le_bytes());
    block.extend_from_slice(&header.first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&block);
    block.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(block.len(), SEGMENT_HEADER_SIZE);
    block.resize(BLOCK_SIZE, 0);
    block
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentHeaderError {
    BadMagic,
    BadChecksum,
    UnsupportedVersion(u32),
}

pub fn decode_segment_header(block: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
    if block.get(..8) != Some(&SEGMENT_MAGIC[..]) {
        return Err(SegmentHeaderError::BadMagic);
    }
    let body = block.get(..SEGMENT_HEADER_SIZE - 4).ok_or(SegmentHeaderError::BadChecksum)?;
    if u32_at(block, SEGMENT_HEADER_SIZE - 4) != Some(crc32c::crc32c(body)) {
        return Err(SegmentHeaderError::BadChecksum);
    }
    // The rest of the header block is zeros, written with the header.
    let padding = block.get(SEGMENT_HEADER_SIZE..BLOCK_SIZE.min(block.len())).unwrap_or(&[]);
    if padding.iter().any(|&b| b != 0) {
        return Err(SegmentHeaderError::BadChecksum);
    }
    let field = |offset| u32_at(block, offset).ok_or(SegmentHeaderError::BadChecksum);
    let version = field(8)?;
    if version != FORMAT_VERSION {
        return Err(SegmentHeaderError::UnsupportedVersion(version));
    }
    Ok(SegmentHeader {
        shard_index: field(12)?,
        shard_count: field(16)?,
        flags: field(20)?,
        segment_index: u64_at(block, 24).ok_or(SegmentHeaderError::BadChecksum)?,
        first_seq: u64_at(block, 32).ok_or(SegmentHeaderError::BadChecksum)?,
    })
}

/// Appends one record to a batch payload under construction.
pub fn encode_record(payload: &mut Vec<u8>, record: &Record<'_>) {
    assert!(!record.key.is_empty() && record.key.len() <= KEY_SIZE_MAX);
    assert!(record.value.len() <= STORED_VALUE_SIZE_MAX);
    let start = payload.len();
    payload.extend_from_slice(&0u32.to_le_bytes()); // crc, filled in below
    payload.extend_from_slice(&(record.encoded_size() as u32).to_le_bytes());
    payload.extend_from_slice(&record.seq.to_le_bytes());
    payload.push(record.kind as u8);
    payload.push(0);
    payload.extend_from_slice(&(record.key.len() as u16).to_le_bytes());
    payload.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
    payload.extend_from_slice(&record.timestamp_us.to_le_bytes());
    payload.extend_from_slice(&record.expires_at_ms.to_le_bytes());
    payload.extend_from_slice(record.key);
    payload.extend_from_slice(record.value);
    // The encoder's own buffer: the record began at `start`, its CRC slot first.
    let crc = crc32c::crc32c(payload.get(start + 4..).unwrap_or_default());
    if let Some(slot) = payload.get_mut(start..start + 4) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
    debug_assert_eq!(payload.len() - start, record.encoded_size());
}

/// Frames a batch payload: header, payload, zero padding to a whole number of blocks.
pub fn encode_batch(first_seq: u64, record_count: u32, payload: &[u8]) -> Vec<u8> {
    let mut batch = Vec::with_capacity(block_align_up((BATCH_HEADER_SIZE + payload.len()) as u64) as usize);
    batch.resize(BATCH_HEADER_SIZE, 0);
    batch.extend_from_slice(payload);
    seal_batch(&mut batch, first_seq, record_count);
    batch
}

/// Frames a batch built in place: `batch` holds room for the header (any bytes), then the
/// records' payload; fills in the header and pads to a whole number of blocks.
pub fn seal_batch(batch: &mut Vec<u8>, first_seq: u64, record_count: u32) {
    assert!(record_count > 0);
    let payload_size = batch.len().checked_sub(BATCH_HEADER_SIZE).expect("room for the batch header");
    assert!(payload_size <= BATCH_PAYLOAD_SIZE_MAX);
    let mut header = [0u8; BATCH_HEADER_SIZE];
    header[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&record_count.to_le_bytes());
    header[8..12].copy_from_slice(&(payload_size as u32).to_le_bytes());
    // 12..16 reserved, zero
    header[16..24].copy_from_slice(&first_seq.to_le_bytes());
    // 24..28 reserved, zero
    let crc = crc32c::crc32c(&header[..BATCH_HEADER_SIZE - 4]);
    header[BATCH_HEADER_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    if let Some(slot) = batch.get_mut(..BATCH_HEADER_SIZE) {
        slot.copy_from_slice(&header);
    }
    batch.resize(block_align_up(batch.len() as u64) as usize, 0);
}

/// Why the bytes at a batch position are not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// Zeros where a batch header would be: the clean end of the log.
    End,
    /// The header is damaged or cut short.
    BadHeader,
    /// A record is damaged; `offset` is relative to the batch start.
    BadRecord { offset: usize },
}

/// A valid batch: its records and its size on disk (padding included).
#[derive(Debug)]
pub struct Batch<'a> {
    pub first_seq: u64,
    pub records: Vec<Record<'a>>,
    pub size_on_disk: usize,
}

/// Decodes the batch at the front of `bytes`, checking every checksum and that the records'
/// sequence numbers follow each other from the header's `first_seq`.
pub fn decode_batch(bytes: &[u8]) -> Result<Batch<'_>, BatchError> {
    let header = bytes.get(..BATCH_HEADER_SIZE).ok_or(BatchError::End)?;
    if header.iter().all(|&b| b == 0) {
        return Err(BatchError::End);
    }
    let magic = u32_at(header, 0).ok_or(BatchError::BadHeader)?;
    let crc = u32_at(header, 28).ok_or(BatchError::BadHeader)?;
    if magic != BATCH_MAGIC || Some(crc) != header.get(..28).map(crc32c::crc32c) {
        return Err(BatchError::BadHeader);
    }
    let record_count = u32_at(header, 4).ok_or(BatchError::BadHeader)? as usize;
    let payload_size = u32_at(header, 8).ok_or(BatchError::BadHeader)? as usize;
    let first_seq = u64_at(header, 16).ok_or(BatchError::BadHeader)?;
    if payload_size > BATCH_PAYLOAD_SIZE_MAX || record_count == 0 || record_count > payload_size {
        return Err(BatchError::BadHeader);
    }
    let payload =
        bytes.get(BATCH_HEADER_SIZE..BATCH_HEADER_SIZE + payload_size).ok_or(BatchError::BadHeader)?;
    let mut records = Vec::with_capacity(record_count);
    let mut offset = 0;
    for index in 0..record_count {
        let bad = BatchError::BadRecord { offset: BATCH_HEADER_SIZE + offset };
        let record = payload.get(offset..).and_then(decode_record).ok_or(bad.clone())?;
        if record.seq != first_seq + index as u64 {
            return Err(bad);
        }
        offset += record.encoded_size();
        records.push(record);
    }
    if offset != payload_size {
        return Err(BatchError::BadRecord { offset: BATCH_HEADER_SIZE + offset });
    }
    let size_on_disk = block_align_up((BATCH_HEADER_SIZE + payload_size) as u64) as usize;
    // The padding is written with the batch, as zeros: anything else is damage.
    let padding = bytes.get(BATCH_HEADER_SIZE + payload_size..size_on_disk).unwrap_or(&[]);
    if let Some(at) = padding.iter().position(|&b| b != 0) {
        return Err(BatchError::BadRecord { offset: BATCH_HEADER_SIZE + payload_size + at });
    }
    Ok(Batch { first_seq, records, size_on_disk })
}

fn decode_record(bytes: &[u8]) -> Option<Record<'_>> {
    let crc = u32_at(bytes, 0)?;
    let size = u32_at(bytes, 4)? as usize;
    if !(RECORD_HEADER_SIZE..=RECORD_SIZE_MAX).contains(&size) {
        return None;
    }
    let body = bytes.get(4..size)?;
    if crc != crc32c::crc32c(body) {
        return None;
    }
    let kind = match *bytes.get(16)? {
        1 => RecordKind::Put,
        2 => RecordKind::Delete,
        _ => return None,
    };
    let key_size = usize::from(u16_at(bytes, 18)?);
    let value_size = u32_at(bytes, 20)? as usize;
    if RECORD_HEADER_SIZE + key_size + value_size != size || key_size == 0 || key_size > KEY_SIZE_MAX {
        return None;
    }
    Some(Record {
        seq: u64_at(bytes, 8)?,
        kind,
        key: bytes.get(RECORD_HEADER_SIZE..RECORD_HEADER_SIZE + key_size)?,
        value: bytes.get(RECORD_HEADER_SIZE + key_size..size)?,
        timestamp_us: u64_at(bytes, 24)?,
        expires_at_ms: u64_at(bytes, 32)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(seq: u64, key: &'static [u8], value: &'static [u8]) -> Record<'static> {
        Record { seq, kind: RecordKind::Put, key, value, timestamp_us: 10 + seq, expires_at_ms: 0 }
    }

    fn batch_of(records: &[Record<'_>]) -> Vec<u8> {
        let mut payload = Vec::new();
        for record in records {
            encode_record(&mut payload, record);
        }
        encode_batch(records[0].seq, records.len() as u32, &payload)
    }

    #[test]
    fn batch_roundtrip_is_block_aligned() {
        let records =
            [put(5, b"a", b"1"), put(6, b"b", b""), Record { kind: RecordKind::Delete, ..put(7, b"c", b"") }];
        let bytes = batch_of(&records);
        assert_eq!(bytes.len(), BLOCK_SIZE);
        let batch = decode_batch(&bytes).expect("valid batch");
        assert_eq!(batch.records, records);
        assert_eq!(batch.size_on_disk, BLOCK_SIZE);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = batch_of(&[put(1, b"key", b"value"), put(2, b"k2", b"v2")]);
        let used = BATCH_HEADER_SIZE + 2 * RECORD_HEADER_SIZE + 3 + 5 + 2 + 2;
        for index in 0..used {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0x40;
            assert!(decode_batch(&damaged).is_err(), "flip at {index} went unnoticed");
        }
    }

    #[test]
    fn zeros_are_the_end_and_truncation_is_bad() {
        assert_eq!(decode_batch(&[0; BLOCK_SIZE]).map(|_| ()), Err(BatchError::End));
        assert_eq!(decode_batch(&[]).map(|_| ()), Err(BatchError::End));
        let bytes = batch_of(&[put(1, b"key", &[7; 100])]);
        assert!(decode_batch(&bytes[..BATCH_HEADER_SIZE + 50]).is_err());
    }

    #[test]
    fn out_of_order_sequence_numbers_are_bad() {
        let mut payload = Vec::new();
        encode_record(&mut payload, &put(1, b"a", b""));
        encode_record(&mut payload, &put(3, b"b", b""));
        let bytes = encode_batch(1, 2, &payload);
        assert!(matches!(decode_batch(&bytes), Err(BatchError::BadRecord { .. })));
    }

    #[test]
    fn segment_header_roundtrip_and_checks() {
        let header =
            SegmentHeader { shard_index: 1, shard_count: 2, flags: 1, segment_index: 3, first_seq: 4 };
        let block = encode_segment_header(&header);
        assert_eq!(decode_segment_header(&block), Ok(header));
        let mut damaged = block.clone();
        damaged[30] ^= 1;
        assert_eq!(decode_segment_header(&damaged), Err(SegmentHeaderError::BadChecksum));
        assert_eq!(decode_segment_header(&[0; 64]), Err(SegmentHeaderError::BadMagic));
    }
}
