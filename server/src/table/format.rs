//! Byte layout of a sorted table (pure: building into memory, parsing from bytes). Entries
//! sort by (token, key), token = `schema::key_hash(key)`, so a token range is one sequential
//! scan. Every block starts at a 4 KiB boundary (one O_DIRECT read per block), is zero-padded
//! to the next one, and ends its content with a CRC32C. Integers are little-endian.
//!
//! ```text
//! data block:  entry_count:u32 entry* crc32c:u32 (over count and entries) zero padding
//! entry:       token:u64 seq:u64 timestamp_us:u64 expires_at_ms:u64 kind:u8 key_size:u16
//!              value_size:u32 key value                       (39-byte header)
//! index block: block_count:u32 (offset:u64 size:u32 last_token:u64)* crc32c:u32 zero padding
//! bloom block: bit_byte_count:u32 bits crc32c:u32 zero padding
//! footer:      the last 4 KiB: magic[8] "KVDTABLE" version:u32 entry_count:u64
//!              index_offset:u64 index_size:u32 bloom_offset:u64 bloom_size:u32 min_seq:u64
//!              max_seq:u64 payload_bytes:u64 sketch[2048] (version 2 and later)
//!              crc32c:u32 (over the 68, or 2,116, bytes before it) zero padding
//! ```
//!
//! The sketch (version 2) is a HyperLogLog of the table's keys (`sketch.rs`): one byte a
//! register. Version 3 places keys in the bloom filter's blocks by the mixed hash
//! (`bloom.rs`). Tables of versions 1 (no sketch) and 2 are still read.
//!
//! The index holds no keys, only the last token of each block: 20 bytes a block, so the
//! indexes of a data set many times larger than memory stay in memory. Keys whose tokens
//! are equal may straddle two blocks; a lookup then reads on (64-bit tokens make it rare).
//! Decoders require the padding to be zero, so no bit of a table goes unchecked.
#![deny(clippy::indexing_slicing)]

use schema::{KEY_SIZE_MAX, STORED_VALUE_SIZE_MAX};

use super::bloom::{Bloom, Placement};
use super::sketch::{Sketch, REGISTER_COUNT};
use crate::le::{u16_at, u32_at, u64_at};
use crate::storage::BLOCK_SIZE;

pub const TABLE_MAGIC: [u8; 8] = *b"KVDTABLE";
pub const TABLE_FORMAT_VERSION: u32 = 3;
pub const ENTRY_HEADER_SIZE: usize = 39;
/// A data block spans at most this many pages, unless one entry needs more (it then gets a
/// block of its own, padded to whole pages).
pub const DATA_BLOCK_PAGES_MAX: usize = 2;
/// A block closes at a page boundary when that wastes at most this share of it (the eighth
/// of a page); otherwise, if it may, it grows by a page (see [`TableBuilder::add_parts`]).
const DATA_BLOCK_WASTE_MAX_DIVISOR: usize = 8;
/// The footer's fields; version 2 adds the sketch after them.
const FOOTER_FIELDS_SIZE: usize = 68;
const FOOTER_CONTENT_SIZE: usize = FOOTER_FIELDS_SIZE + REGISTER_COUNT;
const _: () = assert!(FOOTER_CONTENT_SIZE + 4 <= BLOCK_SIZE);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EntryKind {
    Put = 1,
    Delete = 2,
}

/// One version of a key in a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub token: u64,
    pub key: Vec<u8>,
    pub seq: u64,
    pub timestamp_us: u64,
    pub expires_at_ms: u64,
    pub kind: EntryKind,
    pub value: Vec<u8>,
}

impl Entry {
    pub fn sort_key(&self) -> (u64, &[u8]) {
        (self.token, &self.key)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCorrupt {
    pub offset: u64,
    pub detail: String,
}

fn corrupt(offset: u64, detail: impl Into<String>) -> TableCorrupt {
    TableCorrupt { offset, detail: detail.into() }
}

/// Where a data block lies and the largest token in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub offset: u64,
    pub size: u32,
    pub last_token: u64,
}

const INDEX_ENTRY_SIZE: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub version: u32,
    pub entry_count: u64,
    pub index_offset: u64,
    pub index_size: u32,
    pub bloom_offset: u64,
    pub bloom_size: u32,
    pub min_seq: u64,
    pub max_seq: u64,
    /// Bytes of keys and values in the table: its size over this is its space overhead.
    pub payload_bytes: u64,
    /// The table's distinct keys, sketched; `None` in a version 1 table.
    pub sketch: Option<Sketch>,
}

fn pad_to_block(bytes: &mut Vec<u8>) {
    bytes.resize(bytes.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
}

fn seal(bytes: &mut Vec<u8>, start: usize) {
    // An encoder's own buffer: `start` is where this block began in it.
    let crc = crc32c::crc32c(bytes.get(start..).unwrap_or_default());
    bytes.extend_from_slice(&crc.to_le_bytes());
    pad_to_block(bytes);
}

/// Builds a table from entries given in strictly increasing (token, key) order. Sealed bytes
/// accumulate in memory; the writer takes them with [`TableBuilder::take_sealed`] as they
/// grow, so a table of any size is written with a bounded buffer.
#[derive(Debug)]
pub struct TableBuilder {
    /// Sealed, block-aligned bytes not yet taken by the writer, then the open data block
    /// (built in place: entries are copied once, into the bytes that will be written).
    sealed: Vec<u8>,
    /// Bytes taken so far: the file offset of `sealed[0]`.
    taken: u64,
    /// Where the open data block starts in `sealed` (its entry count, then its entries).
    block_start: Option<usize>,
    block_entry_count: u32,
    last: Option<(u64, Vec<u8>)>,
    index: Vec<IndexEntry>,
    /// Every entry's token, for the bloom filter: built at the end, sized for the entries
    /// the table got (a merge's output holds fewer keys than its inputs).
    tokens: Vec<u64>,
    sketch: Sketch,
    entry_count: u64,
    min_seq: u64,
    max_seq: u64,
    payload_bytes: u64,
}

impl Default for TableBuilder {
    fn default() -> Self {
        TableBuilder::new()
    }
}

impl TableBuilder {
    pub fn new() -> TableBuilder {
        TableBuilder {
            sealed: Vec::new(),
            taken: 0,
            block_start: None,
            block_entry_count: 0,
            last: None,
            index: Vec::new(),
            tokens: Vec::new(),
            sketch: Sketch::default(),
            entry_count: 0,
            min_seq: u64::MAX,
            max_seq: 0,
            payload_bytes: 0,
        }
    }

    pub fn add(&mut self, entry: &Entry) {
        self.add_parts(
            entry.token,
            &entry.key,
            entry.seq,
            entry.timestamp_us,
            entry.expires_at_ms,
            entry.kind,
            &entry.value,
        );
    }

    /// As [`TableBuilder::add`], from borrowed parts.
    #[allow(clippy::too_many_arguments)]
    pub fn add_parts(
        &mut self,
        token: u64,
        key: &[u8],
        seq: u64,
        timestamp_us: u64,
        expires_at_ms: u64,
        kind: EntryKind,
        value: &[u8],
    ) {
        assert!(!key.is_empty() && key.len() <= KEY_SIZE_MAX);
        assert!(value.len() <= STORED_VALUE_SIZE_MAX);
        assert!(kind == EntryKind::Put || value.is_empty());
        if let Some((last_token, last_key)) = &self.last {
            assert!(
                (*last_token, last_key.as_slice()) < (token, key),
                "entries must be added in strictly increasing order"
            );
        }
        let entry_size = ENTRY_HEADER_SIZE + key.len() + value.len();
        if self.block_entry_count > 0 && self.closes_before(entry_size) {
            self.close_block();
        }
        if self.block_start.is_none() {
            self.block_start = Some(self.sealed.len());
            self.sealed.extend_from_slice(&0u32.to_le_bytes()); // the entry count, at close
        }
        let out = &mut self.sealed;
        out.reserve(entry_size);
        out.extend_from_slice(&token.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&timestamp_us.to_le_bytes());
        out.extend_from_slice(&expires_at_ms.to_le_bytes());
        out.push(kind as u8);
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
        self.block_entry_count += 1;
        match &mut self.last {
            Some((last_token, last_key)) => {
                *last_token = token;
                last_key.clear();
                last_key.extend_from_slice(key);
            }
            None => self.last = Some((token, key.to_vec())),
        }
        self.tokens.push(token);
        self.sketch.insert(token);
        self.entry_count += 1;
        self.min_seq = self.min_seq.min(seq);
        self.max_seq = self.max_seq.max(seq);
        self.payload_bytes += (key.len() + value.len()) as u64;
        let used = self.block_content_size() + 4;
        if used.div_ceil(BLOCK_SIZE) * BLOCK_SIZE - used <= ENTRY_HEADER_SIZE {
            self.close_block(); // no entry fits in what is left of its last page
        }
    }

    /// Whether the open block closes rather than take an entry of `entry_size` bytes. Blocks
    /// are one page where that wastes little: an entry that would cross a page boundary
    /// starts the next block. Where closing would waste more than an eighth of the block
    /// (three 1 KB entries leave a fifth of a page empty), the block grows by a page instead,
    /// up to [`DATA_BLOCK_PAGES_MAX`]: seven 1 KB entries fill two pages to 90 %. A larger
    /// block costs a lookup a larger read (4 against 8 KiB: about 90K against 80K random
    /// reads a second here), so only entries that waste a page get one.
    fn closes_before(&self, entry_size: usize) -> bool {
        let used = self.block_content_size() + 4; // with its CRC
        let pages = used.div_ceil(BLOCK_SIZE);
        let pages_with_entry = (used + entry_size).div_ceil(BLOCK_SIZE);
        if pages_with_entry == pages {
            return false;
        }
        let waste = pages * BLOCK_SIZE - used;
        waste <= pages * BLOCK_SIZE / DATA_BLOCK_WASTE_MAX_DIVISOR || pages_with_entry > DATA_BLOCK_PAGES_MAX
    }

    pub fn entry_count(&self) -> u64 {
        self.entry_count
    }

    /// Bytes of sealed output not yet taken (whole blocks; not the open one).
    pub fn sealed_size(&self) -> usize {
        self.block_start.unwrap_or(self.sealed.len())
    }

    /// Takes the sealed bytes (whole blocks) for writing at offset [`TableBuilder::taken`]
    /// before the call.
    pub fn take_sealed(&mut self) -> Vec<u8> {
        let sealed_size = self.sealed_size();
        // The next chunk grows into an allocation of the same size, not by doubling from
        // nothing (each doubling copies what the chunk holds so far).
        let mut rest = Vec::with_capacity(self.sealed.capacity());
        rest.extend_from_slice(self.sealed.get(sealed_size..).unwrap_or_default());
        let mut bytes = std::mem::replace(&mut self.sealed, rest);
        bytes.truncate(sealed_size);
        self.taken += sealed_size as u64;
        if let Some(start) = &mut self.block_start {
            *start -= sealed_size;
        }
        bytes
    }

    fn block_content_size(&self) -> usize {
        self.block_start.map_or(0, |start| self.sealed.len() - start - 4)
    }

    /// The file offset the next taken bytes go to.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    fn offset(&self) -> u64 {
        self.taken + self.sealed.len() as u64
    }

    fn close_block(&mut self) {
        let Some(start) = self.block_start.take() else { return };
        let offset = self.taken + start as u64;
        debug_assert_eq!(offset % BLOCK_SIZE as u64, 0);
        if let Some(count) = self.sealed.get_mut(start..start + 4) {
            count.copy_from_slice(&self.block_entry_count.to_le_bytes());
        }
        seal(&mut self.sealed, start);
        let (last_token, _) = self.last.as_ref().expect("a block with entries has a last entry");
        let size = (self.sealed.len() - start) as u32;
        self.index.push(IndexEntry { offset, size, last_token: *last_token });
        self.block_entry_count = 0;
    }

    /// Closes the table: index, bloom filter, footer. Returns the last sealed bytes, to
    /// write at offset [`TableBuilder::taken`] before the call.
    pub fn finish(mut self) -> Vec<u8> {
        self.close_block();
        let index_offset = self.offset();
        let start = self.sealed.len();
        self.sealed.extend_from_slice(&(self.index.len() as u32).to_le_bytes());
        for entry in &self.index {
            self.sealed.extend_from_slice(&entry.offset.to_le_bytes());
            self.sealed.extend_from_slice(&entry.size.to_le_bytes());
            self.sealed.extend_from_slice(&entry.last_token.to_le_bytes());
        }
        seal(&mut self.sealed, start);
        let index_size = self.offset() - index_offset;

        let mut bloom = Bloom::with_capacity(self.tokens.len());
        self.tokens.iter().for_each(|&token| bloom.insert(token));
        let bloom_offset = self.offset();
        let start = self.sealed.len();
        self.sealed.extend_from_slice(&(bloom.as_bytes().len() as u32).to_le_bytes());
        self.sealed.extend_from_slice(bloom.as_bytes());
        seal(&mut self.sealed, start);
        let bloom_size = self.offset() - bloom_offset;

        let start = self.sealed.len();
        self.sealed.extend_from_slice(&TABLE_MAGIC);
        self.sealed.extend_from_slice(&TABLE_FORMAT_VERSION.to_le_bytes());
        self.sealed.extend_from_slice(&self.entry_count.to_le_bytes());
        self.sealed.extend_from_slice(&index_offset.to_le_bytes());
        self.sealed.extend_from_slice(&(index_size as u32).to_le_bytes());
        self.sealed.extend_from_slice(&bloom_offset.to_le_bytes());
        self.sealed.extend_from_slice(&(bloom_size as u32).to_le_bytes());
        let min_seq = if self.min_seq == u64::MAX { 0 } else { self.min_seq };
        self.sealed.extend_from_slice(&min_seq.to_le_bytes());
        self.sealed.extend_from_slice(&self.max_seq.to_le_bytes());
        self.sealed.extend_from_slice(&self.payload_bytes.to_le_bytes());
        self.sealed.extend_from_slice(self.sketch.as_bytes());
        debug_assert_eq!(self.sealed.len() - start, FOOTER_CONTENT_SIZE);
        seal(&mut self.sealed, start);
        self.sealed
    }
}

/// Checks a sealed block: `content_size` bytes then their CRC32C. `offset` is for errors.
fn verified(block: &[u8], content_size: usize, offset: u64, what: &str) -> Result<(), TableCorrupt> {
    let stored = u32_at(block, content_size).ok_or_else(|| corrupt(offset, format!("{what} cut short")))?;
    let content = block.get(..content_size).ok_or_else(|| corrupt(offset, format!("{what} cut short")))?;
    if stored != crc32c::crc32c(content) {
        return Err(corrupt(offset, format!("{what} checksum mismatch")));
    }
    if block.get(content_size + 4..).is_some_and(|padding| padding.iter().any(|&b| b != 0)) {
        return Err(corrupt(offset, format!("{what} padding is not zero")));
    }
    Ok(())
}

/// Parses the footer from the table's last 4 KiB.
pub fn decode_footer(block: &[u8], offset: u64, table_size: u64) -> Result<Footer, TableCorrupt> {
    let field = |at| u64_at(block, at).ok_or_else(|| corrupt(offset, "footer cut short"));
    let small = |at| u32_at(block, at).ok_or_else(|| corrupt(offset, "footer cut short"));
    // The version says how long the content is; the checksum over that length then covers
    // the version too.
    let version = small(8)?;
    let content_size = match version {
        1 => FOOTER_FIELDS_SIZE,
        2 | TABLE_FORMAT_VERSION => FOOTER_CONTENT_SIZE,
        _ => {
            let detail = format!("table format version {version}, expected 1 to {TABLE_FORMAT_VERSION}");
            return Err(corrupt(offset, detail));
        }
    };
    verified(block, content_size, offset, "footer")?;
    if block.get(..8) != Some(&TABLE_MAGIC[..]) {
        return Err(corrupt(offset, "bad footer magic"));
    }
    let sketch = match version {
        1 => None,
        _ => {
            let registers = block.get(FOOTER_FIELDS_SIZE..FOOTER_CONTENT_SIZE).unwrap_or_default();
            Some(Sketch::from_bytes(registers).ok_or_else(|| corrupt(offset, "footer: bad sketch"))?)
        }
    };
    let footer = Footer {
        version,
        entry_count: field(12)?,
        index_offset: field(20)?,
        index_size: small(28)?,
        bloom_offset: field(32)?,
        bloom_size: small(40)?,
        min_seq: field(44)?,
        max_seq: field(52)?,
        payload_bytes: field(60)?,
        sketch,
    };
    let within = |start: u64, size: u32| {
        start.is_multiple_of(BLOCK_SIZE as u64)
            && size > 0
            && start.checked_add(u64::from(size)).is_some_and(|end| end <= offset)
    };
    if !within(footer.index_offset, footer.index_size) || !within(footer.bloom_offset, footer.bloom_size) {
        return Err(corrupt(offset, "footer points outside the table"));
    }
    debug_assert!(offset < table_size);
    Ok(footer)
}

/// Parses the index block; checks that blocks are in order and inside the data area.
pub fn decode_index(block: &[u8], offset: u64, data_end: u64) -> Result<Vec<IndexEntry>, TableCorrupt> {
    let bad = |detail: &str| corrupt(offset, format!("index: {detail}"));
    let count = u32_at(block, 0).ok_or_else(|| bad("cut short"))? as usize;
    let content_size = count
        .checked_mul(INDEX_ENTRY_SIZE)
        .and_then(|size| size.checked_add(4))
        .ok_or_else(|| bad("cut short"))?;
    verified(block, content_size, offset, "index")?;
    let mut entries = Vec::with_capacity(count);
    let mut expected_offset = 0;
    let mut previous_token = 0;
    for at in (4..content_size).step_by(INDEX_ENTRY_SIZE) {
        let entry = IndexEntry {
            offset: u64_at(block, at).ok_or_else(|| bad("cut short"))?,
            size: u32_at(block, at + 8).ok_or_else(|| bad("cut short"))?,
            last_token: u64_at(block, at + 12).ok_or_else(|| bad("cut short"))?,
        };
        if entry.offset != expected_offset
            || entry.size == 0
            || !(entry.size as usize).is_multiple_of(BLOCK_SIZE)
            || entry.last_token < previous_token
        {
            return Err(bad("blocks out of order"));
        }
        expected_offset += u64::from(entry.size);
        previous_token = entry.last_token;
        entries.push(entry);
    }
    if expected_offset > data_end {
        return Err(bad("blocks beyond the data area"));
    }
    Ok(entries)
}

/// Parses the bloom block of a table of format `version`.
pub fn decode_bloom(block: &[u8], offset: u64, version: u32) -> Result<Bloom, TableCorrupt> {
    let size = u32_at(block, 0).ok_or_else(|| corrupt(offset, "bloom cut short"))? as usize;
    verified(block, 4usize.saturating_add(size), offset, "bloom")?;
    let bits = block.get(4..4 + size).ok_or_else(|| corrupt(offset, "bloom cut short"))?;
    let placement = if version < 3 { Placement::HighBits } else { Placement::Mixed };
    Bloom::from_bytes(bits.to_vec(), placement).ok_or_else(|| corrupt(offset, "empty bloom"))
}

/// One entry of a data block, borrowed from the block's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub token: u64,
    pub seq: u64,
    pub timestamp_us: u64,
    pub expires_at_ms: u64,
    pub kind: EntryKind,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

impl EntryRef<'_> {
    pub fn to_entry(&self) -> Entry {
        Entry {
            token: self.token,
            seq: self.seq,
            timestamp_us: self.timestamp_us,
            expires_at_ms: self.expires_at_ms,
            kind: self.kind,
            key: self.key.to_vec(),
            value: self.value.to_vec(),
        }
    }
}

/// Walks a data block's entries in order, handing each to `visit` until it returns `true`;
/// returns where the walk stopped (the end of the block's content when it saw every entry).
/// Checks every entry's bounds, not the block's checksum.
fn walk_data_block<'b>(
    block: &'b [u8],
    offset: u64,
    mut visit: impl FnMut(EntryRef<'b>) -> bool,
) -> Result<usize, TableCorrupt> {
    let bad = |detail: &str| corrupt(offset, format!("data block: {detail}"));
    let count = u32_at(block, 0).ok_or_else(|| bad("cut short"))? as usize;
    let mut at = 4;
    for _ in 0..count {
        let header = block.get(at..at + ENTRY_HEADER_SIZE).ok_or_else(|| bad("cut short"))?;
        let kind = match header.get(32) {
            Some(1) => EntryKind::Put,
            Some(2) => EntryKind::Delete,
            _ => return Err(bad("unknown entry kind")),
        };
        let key_size = usize::from(u16_at(header, 33).ok_or_else(|| bad("cut short"))?);
        let value_size = u32_at(header, 35).ok_or_else(|| bad("cut short"))? as usize;
        if key_size == 0 || key_size > KEY_SIZE_MAX || value_size > STORED_VALUE_SIZE_MAX {
            return Err(bad("entry size out of range"));
        }
        let body = at + ENTRY_HEADER_SIZE;
        let key = block.get(body..body + key_size).ok_or_else(|| bad("cut short"))?;
        let value =
            block.get(body + key_size..body + key_size + value_size).ok_or_else(|| bad("cut short"))?;
        at = body + key_size + value_size;
        let entry = EntryRef {
            token: u64_at(header, 0).ok_or_else(|| bad("cut short"))?,
            seq: u64_at(header, 8).ok_or_else(|| bad("cut short"))?,
            timestamp_us: u64_at(header, 16).ok_or_else(|| bad("cut short"))?,
            expires_at_ms: u64_at(header, 24).ok_or_else(|| bad("cut short"))?,
            kind,
            key,
            value,
        };
        if visit(entry) {
            break;
        }
    }
    Ok(at)
}

/// Parses and verifies a data block, borrowing its entries (no copy of keys or values).
pub fn parse_data_block(block: &[u8], offset: u64) -> Result<Vec<EntryRef<'_>>, TableCorrupt> {
    let mut entries = Vec::with_capacity(u32_at(block, 0).unwrap_or(0).min(1024) as usize);
    let end = walk_data_block(block, offset, |entry| {
        entries.push(entry);
        false
    })?;
    verified(block, end, offset, "data block")?;
    Ok(entries)
}

/// Where an entry of a verified data block lies in a buffer holding the block: its header
/// fields, and the ranges of its key and value. A sequential scan keeps these for a whole
/// chunk of blocks and lends each entry out of the chunk, so nothing is copied per entry.
#[derive(Debug, Clone, Copy)]
pub struct EntrySpan {
    token: u64,
    seq: u64,
    timestamp_us: u64,
    expires_at_ms: u64,
    kind: EntryKind,
    key_start: u32,
    key_size: u16,
    value_size: u32,
}

impl EntrySpan {
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The entry, borrowed from `buffer` (the one whose spans these are).
    pub fn entry<'a>(&self, buffer: &'a [u8]) -> EntryRef<'a> {
        let key_start = self.key_start as usize;
        let value_start = key_start + usize::from(self.key_size);
        EntryRef {
            token: self.token,
            seq: self.seq,
            timestamp_us: self.timestamp_us,
            expires_at_ms: self.expires_at_ms,
            kind: self.kind,
            key: buffer.get(key_start..value_start).unwrap_or_default(),
            value: buffer.get(value_start..value_start + self.value_size as usize).unwrap_or_default(),
        }
    }
}

/// Verifies the data block at `block_start` of `buffer` (its file offset `offset`) and
/// appends where each of its entries lies in `buffer` to `spans`.
pub fn span_data_block(
    buffer: &[u8],
    block_start: usize,
    block_size: usize,
    offset: u64,
    spans: &mut Vec<EntrySpan>,
) -> Result<(), TableCorrupt> {
    let block = buffer
        .get(block_start..block_start + block_size)
        .ok_or_else(|| corrupt(offset, "data block: cut short"))?;
    let base = buffer.as_ptr() as usize;
    let end = walk_data_block(block, offset, |entry| {
        spans.push(EntrySpan {
            token: entry.token,
            seq: entry.seq,
            timestamp_us: entry.timestamp_us,
            expires_at_ms: entry.expires_at_ms,
            kind: entry.kind,
            // The key lies inside `buffer` (walk_data_block borrows it from `block`).
            key_start: (entry.key.as_ptr() as usize - base) as u32,
            key_size: entry.key.len() as u16,
            value_size: entry.value.len() as u32,
        });
        false
    })?;
    verified(block, end, offset, "data block")
}

/// The entry of `key` in a data block, borrowed. A block fresh from the disk is verified
/// whole (`verify`); one the block cache holds was verified when it was read, so a hit stops
/// at the key.
pub fn find_in_data_block<'b>(
    block: &'b [u8],
    offset: u64,
    key: &[u8],
    verify: bool,
) -> Result<Option<EntryRef<'b>>, TableCorrupt> {
    let mut found = None;
    let end = walk_data_block(block, offset, |entry| {
        if found.is_none() && entry.key == key {
            found = Some(entry);
            return !verify;
        }
        false
    })?;
    if verify {
        verified(block, end, offset, "data block")?;
    }
    Ok(found)
}

/// Parses a data block and returns its entries, owned.
pub fn decode_data_block(block: &[u8], offset: u64) -> Result<Vec<Entry>, TableCorrupt> {
    Ok(parse_data_block(block, offset)?.iter().map(EntryRef::to_entry).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn entries(count: u32) -> Vec<Entry> {
        let mut entries: Vec<Entry> = (0..count)
            .map(|i| {
                let key = format!("key-{i}").into_bytes();
                let delete = i % 7 == 3;
                Entry {
                    token: schema::key_hash(&key),
                    seq: u64::from(i) + 1,
                    timestamp_us: 1_000 + u64::from(i),
                    expires_at_ms: if i % 5 == 0 { 99 } else { 0 },
                    kind: if delete { EntryKind::Delete } else { EntryKind::Put },
                    value: if delete { Vec::new() } else { vec![i as u8; (i as usize * 37) % 3000] },
                    key,
                }
            })
            .collect();
        entries.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        entries
    }

    /// The block sizes a table of `count` entries with `value_size`-byte values gets.
    fn block_sizes(count: usize, value_size: usize) -> Vec<(u32, u32)> {
        let mut builder = TableBuilder::new();
        let mut keys: Vec<Vec<u8>> = (0..count).map(|i| format!("key:{i:012}").into_bytes()).collect();
        keys.sort_by_key(|key| schema::key_hash(key));
        let value = vec![b'x'; value_size];
        let mut bytes = Vec::new();
        for key in &keys {
            builder.add_parts(schema::key_hash(key), key, 1, 1, 0, EntryKind::Put, &value);
            bytes.extend(builder.take_sealed());
        }
        let index = builder.index.clone();
        bytes.extend(builder.finish());
        index
            .iter()
            .map(|block| {
                let data = &bytes[block.offset as usize..][..block.size as usize];
                (block.size, decode_data_block(data, block.offset).expect("block").len() as u32)
            })
            .collect()
    }

    #[test]
    fn blocks_grow_by_a_page_only_where_one_page_would_waste_much() {
        // 1,000-byte values (1,055-byte entries): one page would hold three (77 % full), two
        // pages hold seven (90 %).
        let large = block_sizes(700, 1000);
        assert!(large.iter().all(|&(size, count)| size == 2 * BLOCK_SIZE as u32 && count == 7), "{large:?}");
        // 100-byte values: one page holds 26 (97 %).
        let small = block_sizes(520, 100);
        assert!(small.iter().all(|&(size, count)| size == BLOCK_SIZE as u32 && count == 26), "{small:?}");
        // 2,500-byte values: one a page (61 %), three in two pages (92 %).
        let half = block_sizes(30, 2500);
        assert!(half.iter().all(|&(size, count)| size == 2 * BLOCK_SIZE as u32 && count == 3), "{half:?}");
        // 5,000-byte values: a block each, of two pages.
        let lone = block_sizes(10, 5000);
        assert!(lone.iter().all(|&(size, count)| size == 2 * BLOCK_SIZE as u32 && count == 1), "{lone:?}");
    }

    #[test]
    fn blocks_are_aligned_and_roundtrip() {
        let entries = entries(500);
        let mut builder = TableBuilder::new();
        let mut bytes = Vec::new();
        for entry in &entries {
            builder.add(entry);
            if builder.sealed_size() > 3 * BLOCK_SIZE {
                assert_eq!(builder.taken(), bytes.len() as u64);
                bytes.extend(builder.take_sealed());
            }
        }
        bytes.extend(builder.finish());
        assert_eq!(bytes.len() % BLOCK_SIZE, 0);
        let footer_offset = (bytes.len() - BLOCK_SIZE) as u64;
        let footer = decode_footer(&bytes[footer_offset as usize..], footer_offset, bytes.len() as u64)
            .expect("footer");
        assert_eq!(footer.entry_count, 500);
        let index_block = &bytes[footer.index_offset as usize..][..footer.index_size as usize];
        let index = decode_index(index_block, footer.index_offset, footer.index_offset).expect("index");
        let mut decoded = Vec::new();
        for block in &index {
            let bytes = &bytes[block.offset as usize..][..block.size as usize];
            decoded.extend(decode_data_block(bytes, block.offset).expect("block"));
        }
        assert_eq!(decoded, entries);
        let bloom_block = &bytes[footer.bloom_offset as usize..][..footer.bloom_size as usize];
        let bloom = decode_bloom(bloom_block, footer.bloom_offset, footer.version).expect("bloom");
        assert!(entries.iter().all(|e| bloom.may_contain(e.token)));
        let distinct = footer.sketch.as_ref().expect("a version 3 footer has a sketch").estimate();
        assert!((distinct - 500.0).abs() < 25.0, "{distinct}");

        // The same table as version 1 wrote it (no sketch) still reads, without a sketch.
        let mut old = bytes[footer_offset as usize..].to_vec();
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&old[..FOOTER_FIELDS_SIZE]);
        old[FOOTER_FIELDS_SIZE..FOOTER_FIELDS_SIZE + 4].copy_from_slice(&crc.to_le_bytes());
        old[FOOTER_FIELDS_SIZE + 4..].fill(0);
        let footer_v1 = decode_footer(&old, footer_offset, bytes.len() as u64).expect("version 1 footer");
        assert_eq!(footer_v1, Footer { version: 1, sketch: None, ..footer.clone() });
        // A version 1 footer with sketch bytes left after its checksum is refused (padding).
        let mut padded = old.clone();
        padded[FOOTER_CONTENT_SIZE] = 1;
        assert!(decode_footer(&padded, footer_offset, bytes.len() as u64).is_err());
        old[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert!(decode_footer(&old, footer_offset, bytes.len() as u64).is_err(), "an unknown version");
    }
}
