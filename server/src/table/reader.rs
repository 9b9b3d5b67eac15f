//! Reading a sorted table through the storage interface: the footer, index and bloom filter
//! are loaded once and kept in memory; a lookup costs at most one block read, and none when
//! the filter says the key is absent. Every block is verified before use; damage is an error
//! naming the file and offset, never data.

use std::fmt;
use std::path::{Path, PathBuf};

use super::bloom::Bloom;
use super::format::{self, Entry, Footer, IndexEntry, TableCorrupt};
use crate::storage::{StorageFile, BLOCK_SIZE};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    Io { path: PathBuf, message: String },
    Corrupt { path: PathBuf, offset: u64, detail: String },
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Io { path, message } => write!(f, "{}: {message}", path.display()),
            TableError::Corrupt { path, offset, detail } => {
                write!(f, "{}: corrupt at offset {offset}: {detail}", path.display())
            }
        }
    }
}

impl std::error::Error for TableError {}

#[derive(Debug)]
pub struct TableReader {
    path: PathBuf,
    pub footer: Footer,
    index: Vec<IndexEntry>,
    bloom: Bloom,
}

impl TableReader {
    pub async fn open<F: StorageFile>(file: &F, path: &Path) -> Result<TableReader, TableError> {
        let io =
            |error: std::io::Error| TableError::Io { path: path.to_path_buf(), message: error.to_string() };
        let located = |error: TableCorrupt| TableError::Corrupt {
            path: path.to_path_buf(),
            offset: error.offset,
            detail: error.detail,
        };
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
        let bloom = format::decode_bloom(&bloom_block, footer.bloom_offset).map_err(located)?;
        Ok(TableReader { path: path.to_path_buf(), footer, index, bloom })
    }

    /// The entry of `key`, if this table holds one.
    pub async fn get<F: StorageFile>(&self, file: &F, key: &[u8]) -> Result<Option<Entry>, TableError> {
        let token = schema::key_hash(key);
        if !self.bloom.may_contain(token) {
            return Ok(None);
        }
        let block_index =
            self.index.partition_point(|block| (block.last_token, block.last_key.as_slice()) < (token, key));
        let Some(block) = self.index.get(block_index) else { return Ok(None) };
        let bytes = file
            .read_at(block.offset, block.size as usize)
            .await
            .map_err(|error| TableError::Io { path: self.path.clone(), message: error.to_string() })?;
        let entries = format::decode_data_block(&bytes, block.offset).map_err(|error| {
            TableError::Corrupt { path: self.path.clone(), offset: error.offset, detail: error.detail }
        })?;
        Ok(entries.into_iter().find(|entry| entry.token == token && entry.key == key))
    }
}
