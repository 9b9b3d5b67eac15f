//! The manifest: which sorted tables are live, and up to which log sequence number they hold
//! every record. It changes by atomic replacement: the new version is written to
//! `MANIFEST.tmp`, synced, renamed over `MANIFEST`, and the directory is synced, so a crash
//! at any point leaves either the old or the new version, both complete.
//!
//! ```text
//! magic[8] "KVDMANIF" version:u32 shard_index:u32 shard_count:u32 flushed_seq:u64
//! next_table_id:u64 table_count:u32 table_id:u64* (newest first) crc32c:u32 zero padding
//! ```
//! Integers are little-endian; the CRC32C covers everything before it; the file is padded
//! with zeros to a whole number of 4 KiB blocks, and the padding is checked too.
#![deny(clippy::indexing_slicing)]

use std::path::Path;

use crate::le::{u32_at, u64_at};
use crate::storage::{Storage, StorageFile, BLOCK_SIZE};
use crate::table::reader::TableError;

pub const MANIFEST_FILE: &str = "MANIFEST";
const MANIFEST_TMP_FILE: &str = "MANIFEST.tmp";
pub const MANIFEST_MAGIC: [u8; 8] = *b"KVDMANIF";
pub const MANIFEST_FORMAT_VERSION: u32 = 1;
const HEADER_SIZE: usize = 40;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    pub shard_index: u32,
    pub shard_count: u32,
    /// Every log record up to here is in the live tables.
    pub flushed_seq: u64,
    pub next_table_id: u64,
    /// Newest first; their sequence ranges do not overlap.
    pub table_ids: Vec<u64>,
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
    bytes.extend_from_slice(&(manifest.table_ids.len() as u32).to_le_bytes());
    debug_assert_eq!(bytes.len(), HEADER_SIZE);
    for id in &manifest.table_ids {
        bytes.extend_from_slice(&id.to_le_bytes());
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
    let table_count = u32_at(bytes, 36).ok_or_else(short)? as usize;
    let content_size = table_count
        .checked_mul(8)
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
    if version != MANIFEST_FORMAT_VERSION {
        return Err((8, format!("format version {version}, expected {MANIFEST_FORMAT_VERSION}")));
    }
    let field = |at| u64_at(bytes, at).ok_or_else(short);
    let table_ids = (0..table_count).map(|i| field(HEADER_SIZE + i * 8)).collect::<Result<Vec<u64>, _>>()?;
    Ok(Manifest {
        shard_index: u32_at(bytes, 12).ok_or_else(short)?,
        shard_count: u32_at(bytes, 16).ok_or_else(short)?,
        flushed_seq: field(20)?,
        next_table_id: field(28)?,
        table_ids,
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
            table_ids: vec![8, 5, 3],
        };
        let bytes = encode(&manifest);
        assert_eq!(bytes.len(), BLOCK_SIZE);
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
