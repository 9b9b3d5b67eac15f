//! Reading a sorted table through the storage interface: the footer, index and bloom filter
//! are loaded once and kept in memory; a lookup costs at most one block read (rarely two,
//! when equal tokens straddle blocks), and none when the filter says the key is absent.
//! Every block is verified before use; damage is an error naming the file and offset,
//! never data.
#![deny(clippy::indexing_slicing)]

use std::fmt;
use std::path::{Path, PathBuf};

use super::bloom::Bloom;
use super::format::{self, Entry, EntryRef, Footer, IndexEntry, TableCorrupt};
use crate::storage::{StorageFile, BLOCK_SIZE};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    Io { path: PathBuf, message: String, no_space: bool },
    Corrupt { path: PathBuf, offset: u64, detail: String },
}

impl TableError {
    pub fn io(path: &Path, error: &std::io::Error) -> TableError {
        TableError::Io {
            path: path.to_path_buf(),
            message: error.to_string(),
            no_space: crate::storage::is_no_space(error),
        }
    }

    pub fn corrupt(path: &Path, error: TableCorrupt) -> TableError {
        TableError::Corrupt { path: path.to_path_buf(), offset: error.offset, detail: error.detail }
    }
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Io { path, message, .. } => write!(f, "{}: {message}", path.display()),
            TableError::Corrupt { path, offset, detail } => {
                write!(f, "{}: corrupt at offset {offset}: {detail}", path.display())
            }
        }
    }
}

impl std::error::Error for TableError {}

/// A table's metadata, held in memory while the table is live.
#[derive(Debug)]
pub struct TableReader {
    path: PathBuf,
    pub footer: Footer,
    pub size: u64,
    index: Vec<IndexEntry>,
    bloom: Bloom,
}

impl TableReader {
    pub async fn open<F: StorageFile>(file: &F, path: &Path) -> Result<TableReader, TableError> {
        let io = |error: std::io::Error| TableError::io(path, &error);
        let located = |error: TableCorrupt| TableError::corrupt(path, error);
        let size = file.size().await.map_err(io)?;
        if size < BLOCK_SIZE as u64 || !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(located(TableCorrupt { offset: 0, detail: format!("table size {size}") }));
        }
        let footer_offset = size - BLOCK_SIZE as u64;
        let footer_block = file.read_at(footer_offset, BLOCK_SIZE).await.map_err(io)?;
        let footer = format::decode_footer(&footer_block, footer_offset, size).map_err(located)?;
        let index_block = file.read_at(footer.index_offset, footer.index_size as usize).await.map_err(io)?;
        let index =
            format::decode_index(&index_block, footer.index_offset, footer.index_offset).map_err(located)?;
        let bloom_block = file.read_at(footer.bloom_offset, footer.bloom_size as usize).await.map_err(io)?;
        let bloom =
            format::decode_bloom(&bloom_block, footer.bloom_offset, footer.version).map_err(located)?;
        Ok(TableReader { path: path.to_path_buf(), footer, size, index, bloom })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn blocks(&self) -> &[IndexEntry] {
        &self.index
    }

    /// Bytes of memory the index and filter hold.
    pub fn memory_size(&self) -> usize {
        self.index.capacity() * std::mem::size_of::<IndexEntry>() + self.bloom.as_bytes().len()
    }

    pub fn may_contain(&self, token: u64) -> bool {
        self.bloom.may_contain(token)
    }

    /// The position of the first block that may hold `token`.
    pub fn first_block_for(&self, token: u64) -> usize {
        self.index.partition_point(|block| block.last_token < token)
    }

    /// Looks `key` up in a block's bytes (read from `block.offset`), verifying the whole
    /// block when `verify` (it comes from the disk, not from the block cache).
    pub fn find_in_block<'b>(
        &self,
        block: &IndexEntry,
        bytes: &'b [u8],
        key: &[u8],
        verify: bool,
    ) -> Result<Option<EntryRef<'b>>, TableError> {
        format::find_in_data_block(bytes, block.offset, key, verify)
            .map_err(|error| TableError::corrupt(&self.path, error))
    }

    /// The entry of `key`, if this table holds one, reading blocks straight from `file`
    /// (the engine reads through its block cache instead).
    pub async fn get<F: StorageFile>(&self, file: &F, key: &[u8]) -> Result<Option<Entry>, TableError> {
        let token = schema::key_hash(key);
        if !self.may_contain(token) {
            return Ok(None);
        }
        for block in self.index.get(self.first_block_for(token)..).unwrap_or_default() {
            let bytes = file
                .read_at(block.offset, block.size as usize)
                .await
                .map_err(|error| TableError::io(&self.path, &error))?;
            if let Some(entry) = self.find_in_block(block, &bytes, key, true)? {
                return Ok(Some(entry.to_entry()));
            }
            if block.last_token > token {
                break;
            }
        }
        Ok(None)
    }
}
