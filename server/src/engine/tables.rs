//! Live sorted tables: writing one (from a flush or a compaction), and reading one back
//! sequentially (for a compaction).

use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::storage::{Storage, StorageFile};
use crate::table::format::{self, EntryKind, EntryRef, EntrySpan, TableBuilder};
use crate::table::reader::{TableError, TableReader};

/// Sealed bytes are written once this many accumulate, so a table of any size needs a
/// bounded buffer.
const WRITE_CHUNK_SIZE: usize = 1 << 20;
/// A sequential scan reads this many bytes of blocks at a time.
const SCAN_CHUNK_SIZE: usize = 1 << 20;

/// One live table: its file, open for the life of the table, and its metadata in memory.
pub struct Table<S: Storage> {
    pub id: u64,
    pub file: S::File,
    pub reader: TableReader,
}

impl<S: Storage> Table<S> {
    pub async fn open(storage: &S, dir: &Path, id: u64) -> Result<Table<S>, TableError> {
        let path = dir.join(super::manifest::table_file_name(id));
        let file = storage.open(&path).await.map_err(|error| TableError::io(&path, &error))?;
        let reader = TableReader::open(&file, &path).await?;
        Ok(Table { id, file, reader })
    }

    pub fn size(&self) -> u64 {
        self.reader.size
    }
}

/// Writes a new table, streaming: entries go in in table order, whole blocks go out.
pub struct TableWriter<S: Storage> {
    file: S::File,
    path: PathBuf,
    builder: TableBuilder,
    pub bytes_written: u64,
}

impl<S: Storage> TableWriter<S> {
    /// Creates the table file (which must not exist); `key_count_max` sizes its filter.
    pub async fn create(
        storage: &S,
        path: PathBuf,
        key_count_max: usize,
    ) -> Result<TableWriter<S>, TableError> {
        let file = storage.create(&path).await.map_err(|error| TableError::io(&path, &error))?;
        Ok(TableWriter { file, path, builder: TableBuilder::new(key_count_max), bytes_written: 0 })
    }

    pub async fn add(
        &mut self,
        token: u64,
        key: &[u8],
        entry: &super::memtable::Entry,
    ) -> Result<(), TableError> {
        let (kind, value) = match &entry.value {
            Some(value) => (EntryKind::Put, &value[..]),
            None => (EntryKind::Delete, &[][..]),
        };
        self.builder.add_parts(token, key, entry.seq, entry.timestamp_us, entry.expires_at_ms, kind, value);
        self.write_sealed(false).await
    }

    pub async fn add_entry(&mut self, entry: &EntryRef<'_>) -> Result<(), TableError> {
        self.builder.add_parts(
            entry.token,
            entry.key,
            entry.seq,
            entry.timestamp_us,
            entry.expires_at_ms,
            entry.kind,
            entry.value,
        );
        self.write_sealed(false).await
    }

    pub fn entry_count(&self) -> u64 {
        self.builder.entry_count()
    }

    async fn write_sealed(&mut self, all: bool) -> Result<(), TableError> {
        if self.builder.sealed_size() < WRITE_CHUNK_SIZE && !all {
            return Ok(());
        }
        let offset = self.builder.taken();
        let bytes = self.builder.take_sealed();
        self.write_at(offset, &bytes).await
    }

    async fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), TableError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file.write_at(offset, bytes).await.map_err(|error| TableError::io(&self.path, &error))?;
        self.bytes_written += bytes.len() as u64;
        Ok(())
    }

    /// Writes the rest, syncs the file, and opens it as a table. The directory entry is not
    /// yet durable: the manifest write that installs the table syncs the directory.
    pub async fn finish(mut self, id: u64) -> Result<(Table<S>, u64), TableError> {
        self.write_sealed(true).await?;
        let offset = self.builder.taken();
        let tail = std::mem::replace(&mut self.builder, TableBuilder::new(0)).finish();
        self.write_at(offset, &tail).await?;
        let io = |error: std::io::Error| TableError::io(&self.path, &error);
        self.file.sync_data().await.map_err(io)?;
        let reader = TableReader::open(&self.file, &self.path).await?;
        Ok((Table { id, file: self.file, reader }, self.bytes_written))
    }

    /// Gives up on the table: closes and removes the file.
    pub async fn abandon(self, storage: &S) {
        let _ = self.file.close().await;
        let _ = storage.remove(&self.path).await;
    }
}

/// Reads a table's entries in order, a chunk of blocks at a time, each block verified.
/// Entries are lent out of the chunk (`peek`), so a compaction copies a value once: into
/// its output.
pub struct TableScan<S: Storage> {
    table: Rc<Table<S>>,
    next_block: usize,
    chunk: Vec<u8>,
    spans: Vec<EntrySpan>,
    /// The position in `spans` of the entry `peek` lends.
    at: usize,
    pub bytes_read: u64,
}

impl<S: Storage> TableScan<S> {
    /// A scan positioned at the table's first entry.
    pub async fn open(table: Rc<Table<S>>) -> Result<TableScan<S>, TableError> {
        let mut scan =
            TableScan { table, next_block: 0, chunk: Vec::new(), spans: Vec::new(), at: 0, bytes_read: 0 };
        scan.fill().await?;
        Ok(scan)
    }

    /// The entry at the scan's position; `None` once the table is exhausted.
    pub fn peek(&self) -> Option<EntryRef<'_>> {
        self.spans.get(self.at).map(|span| span.entry(&self.chunk))
    }

    /// Moves to the next entry.
    pub async fn advance(&mut self) -> Result<(), TableError> {
        self.at += 1;
        if self.at >= self.spans.len() {
            self.fill().await?;
        }
        Ok(())
    }

    /// Reads the next chunk of blocks (on past blocks without entries: none are written, but
    /// a scan must not end early at one).
    async fn fill(&mut self) -> Result<(), TableError> {
        self.spans.clear();
        self.at = 0;
        let blocks = self.table.reader.blocks();
        let path = self.table.reader.path();
        while self.spans.is_empty() {
            let Some(first) = blocks.get(self.next_block) else { return Ok(()) };
            let mut end = self.next_block;
            let mut size = 0usize;
            while let Some(block) = blocks.get(end) {
                if size > 0 && size + block.size as usize > SCAN_CHUNK_SIZE {
                    break;
                }
                size += block.size as usize;
                end += 1;
            }
            self.chunk = self
                .table
                .file
                .read_at(first.offset, size)
                .await
                .map_err(|error| TableError::io(path, &error))?;
            self.bytes_read += self.chunk.len() as u64;
            for block in &blocks[self.next_block..end] {
                let start = (block.offset - first.offset) as usize;
                format::span_data_block(
                    &self.chunk,
                    start,
                    block.size as usize,
                    block.offset,
                    &mut self.spans,
                )
                .map_err(|error| TableError::corrupt(path, error))?;
            }
            self.next_block = end;
        }
        Ok(())
    }
}
