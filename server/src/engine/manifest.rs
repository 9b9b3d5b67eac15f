//! The manifest: which sorted tables are live, and up to which log sequence number they hold
//! every record. It changes by atomic replacement: the new version is written to
//! `MANIFEST.tmp`, synced, renamed over `MANIFEST`, and the directory is synced, so a crash
//! at any point leaves either the old or the new version, both complete.
//!
//! ```text
//! magic[8] "KVDMANIF" version:u32 shard_index:u32 shard_count:u32 flushed_seq:u64
//! next_table_id:u64 table_count:u32 (table_id:u64 first_token:u64 last_token:u64)*
//! crc32c:u32 zero padding
//! ```
//! Tables are listed newest first, each with the tokens it answers for: all of them, but
//! for a merge under way, whose output tables take over their inputs' token space a piece
//! at a time (see `compaction`). Version 1 lists table ids only, each answering for every
//! token; it is still read. Integers are little-endian; the CRC32C covers everything
//! before it; the file is padded with zeros to a whole number of 4 KiB blocks, and the
//! padding is checked too.
#![deny(clippy::indexing_slicing)]

use std::path::Path;

use crate::le::{u32_at, u64_at};
use crate::storage::{Storage, StorageFile, BLOCK_SIZE};
use crate::table::reader::TableError;

pub const MANIFEST_FILE: &str = "MANIFEST";
const MANIFEST_TMP_FILE: &str = "MANIFEST.tmp";
pub const MANIFEST_MAGIC: [u8; 8] = *b"KVDMANIF";
pub const MANIFEST_FORMAT_VERSION: u32 = 2;
const HEADER_SIZE: usize = 40;

/// The tokens a live table answers for, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRange {
    pub first: u64,
    pub last: u64,
}

impl TokenRange {
    pub const ALL: TokenRange = TokenRange { first: 0, last: u64::MAX };

    pub fn contains(&self, token: u64) -> bool {
        (self.first..=self.last).contains(&token)
    }
}

/// A live table: its id and the tokens it answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveTable {
    pub id: u64,
    pub tokens: TokenRange,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    pub shard_index: u32,
    pub shard_count: u32,
    /// Every log record up to here is in the live tables.
    pub flushed_seq: u64,
    pub next_table_id: u64,
    /// Newest first. Of the tables that answer for a token, each holds newer versions
    /// than those after it.
    pub tables: Vec<LiveTable>,
}

impl Manifest {
    pub fn holds(&self, id: u64) -> bool {
        self.tables.iter().any(|table| table.id == id)
    }
}

pub fn table_file_name(table_id: u64) -> String {
    format!("table-{table_id:016}.sst")
}

pub fn parse_table_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("table-")?.strip_suffix(".sst")?.parse().ok()
}

pub fn encode(manifest: &Manifest) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(BLOCK_SIZE);
    bytes.extend_from_slice(&MANIFEST_MAGIC);
    bytes.extend_from_slice(&MANIFEST_FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&manifest.shard_index.to_le_bytes());
    bytes.extend_from_slice(&manifest.shard_count.to_le_bytes());
    bytes.extend_from_slice(&manifest.flushed_seq.to_le_bytes());
    bytes.extend_from_slice(&manifest.next_table_id.to_le_bytes());
    bytes.extend_from_slice(&(manifest.tables.len() as u32).to_le_bytes());
    debug_assert_eq!(bytes.len(), HEADER_SIZE);
    for table in &manifest.tables {
        bytes.extend_from_slice(&table.id.to_le_bytes());
        bytes.extend_from_slice(&table.tokens.first.to_le_bytes());
        bytes.extend_from_slice(&table.tokens.last.to_le_bytes());
    }
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.resize(bytes.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
    bytes
}

/// Decodes a manifest; the error is the offset of the damage and what is wrong.
pub fn decode(bytes: &[u8]) -> Result<Manifest, (u64, String)> {
    let short = || (bytes.len() as u64, "cut short".to_string());
    if bytes.get(..8) != Some(&MANIFEST_MAGIC[..]) {
        return Err((0, "bad magic".into()));
    }
    let version = u32_at(bytes, 8).ok_or_else(short)?;
    let table_size = if version == 1 { 8 } else { 24 };
    let table_count = u32_at(bytes, 36).ok_or_else(short)? as usize;
    let content_size = table_count
        .checked_mul(table_size)
        .and_then(|size| size.checked_add(HEADER_SIZE))
        .filter(|&size| size + 4 <= bytes.len())
        .ok_or_else(short)?;
    let stored_crc = u32_at(bytes, content_size).ok_or_else(short)?;
    if Some(stored_crc) != bytes.get(..content_size).map(crc32c::crc32c) {
        return Err((content_size as u64, "checksum mismatch".into()));
    }
    let padding = bytes.get(content_size + 4..).unwrap_or_default();
    if let Some(at) = padding.iter().position(|&b| b != 0) {
        return Err(((content_size + 4 + at) as u64, "padding is not zero".into()));
    }
    if version != 1 && version != MANIFEST_FORMAT_VERSION {
        return Err((8, format!("format version {version}, expected {MANIFEST_FORMAT_VERSION}")));
    }
    let field = |at| u64_at(bytes, at).ok_or_else(short);
    let table = |i: usize| {
        let at = HEADER_SIZE + i * table_size;
        let tokens = if version == 1 {
            TokenRange::ALL
        } else {
            TokenRange { first: field(at + 8)?, last: field(at + 16)? }
        };
        if tokens.first > tokens.last {
            return Err((at as u64 + 8, "empty token range".to_string()));
        }
        Ok(LiveTable { id: field(at)?, tokens })
    };
    let tables = (0..table_count).map(table).collect::<Result<Vec<LiveTable>, _>>()?;
    Ok(Manifest {
        shard_index: u32_at(bytes, 12).ok_or_else(short)?,
        shard_count: u32_at(bytes, 16).ok_or_else(short)?,
        flushed_seq: field(20)?,
        next_table_id: field(28)?,
        tables,
    })
}

/// Reads the manifest in `dir`; `None` when the shard has never flushed.
pub async fn read<S: Storage>(storage: &S, dir: &Path) -> Result<Option<Manifest>, TableError> {
    let path = dir.join(MANIFEST_FILE);
    let file = match storage.open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(TableError::io(&path, &error)),
    };
    let size = file.size().await.map_err(|error| TableError::io(&path, &error))?;
    let bytes = file.read_at(0, size as usize).await.map_err(|error| TableError::io(&path, &error))?;
    let _ = file.close().await;
    let manifest = decode(&bytes).map_err(|(offset, detail)| TableError::Corrupt {
        path: path.clone(),
        offset,
        detail,
    })?;
    Ok(Some(manifest))
}

/// Replaces the manifest in `dir` atomically and durably.
pub async fn write<S: Storage>(storage: &S, dir: &Path, manifest: &Manifest) -> Result<(), TableError> {
    crate::storage::replace_file(storage, dir, MANIFEST_FILE, &encode(manifest))
        .await
        .map_err(|error| TableError::io(&dir.join(MANIFEST_FILE), &error))
}

/// Removes a manifest write that a crash interrupted.
pub async fn remove_leftover<S: Storage>(storage: &S, dir: &Path) {
    let _ = storage.remove(&dir.join(MANIFEST_TMP_FILE)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips_and_every_bit_flip_is_detected() {
        let manifest = Manifest {
            shard_index: 1,
            shard_count: 2,
            flushed_seq: 77,
            next_table_id: 9,
            tables: vec![
                LiveTable { id: 8, tokens: TokenRange::ALL },
                LiveTable { id: 6, tokens: TokenRange { first: 0, last: 1 << 40 } },
                LiveTable { id: 7, tokens: TokenRange { first: (1 << 40) + 1, last: u64::MAX } },
                LiveTable { id: 3, tokens: TokenRange { first: 1 << 40, last: u64::MAX } },
            ],
        };
        let bytes = encode(&manifest);
        assert_eq!(bytes.len(), BLOCK_SIZE);
        assert_eq!(bytes[8], 2, "format version");
        assert_eq!(decode(&bytes), Ok(manifest));
        for position in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[position] ^= 1 << bit;
                assert!(decode(&damaged).is_err(), "flip of bit {bit} at {position} went unseen");
            }
        }
    }
}

#[cfg(test)]
mod version_one {
    use super::*;

    #[test]
    fn a_version_one_manifest_reads_as_tables_answering_for_every_token() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MANIFEST_MAGIC);
        for field in [1u32, 0, 1] {
            bytes.extend_from_slice(&field.to_le_bytes());
        }
        for field in [40u64, 9] {
            bytes.extend_from_slice(&field.to_le_bytes());
        }
        bytes.extend_from_slice(&2u32.to_le_bytes());
        for id in [8u64, 5] {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.resize(BLOCK_SIZE, 0);
        let manifest = decode(&bytes).expect("version 1");
        assert_eq!(manifest.flushed_seq, 40);
        let all = |id| LiveTable { id, tokens: TokenRange::ALL };
        assert_eq!(manifest.tables, vec![all(8), all(5)]);
    }
}
