//! Live sorted tables: writing one (from a flush or a compaction), and reading one back
//! sequentially (for a compaction).

use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::manifest::{LiveTable, TokenRange};
use crate::storage::{Storage, StorageFile};
use crate::table::format::{self, EntryKind, EntryRef, EntrySpan, IndexEntry, TableBuilder};
use crate::table::reader::{TableError, TableReader};

/// Sealed bytes are written once this many accumulate, so a table of any size needs a
/// bounded buffer.
const WRITE_CHUNK_SIZE: usize = 1 << 20;
/// A sequential scan reads this many bytes of blocks at a time.
const SCAN_CHUNK_SIZE: usize = 1 << 20;

/// One live table: its file, open for the life of the table, its metadata in memory, and
/// the tokens it answers for. A merge under way hands its inputs' tokens to its output a
/// piece at a time: each step installs the inputs again, as new `Table`s sharing the file
/// and the metadata, with fewer tokens; a lookup that began before sees the old ones.
pub struct Table<S: Storage> {
    pub id: u64,
    pub file: Rc<S::File>,
    pub reader: Rc<TableReader>,
    pub tokens: TokenRange,
}

impl<S: Storage> Table<S> {
    pub async fn open(storage: &S, dir: &Path, live: LiveTable) -> Result<Table<S>, TableError> {
        let path = dir.join(super::manifest::table_file_name(live.id));
        let file = storage.open(&path).await.map_err(|error| TableError::io(&path, &error))?;
        let reader = TableReader::open(&file, &path).await?;
        Ok(Table { id: live.id, file: Rc::new(file), reader: Rc::new(reader), tokens: live.tokens })
    }

    /// The same table answering for `tokens` only.
    pub fn answering_for(&self, tokens: TokenRange) -> Table<S> {
        Table { id: self.id, file: self.file.clone(), reader: self.reader.clone(), tokens }
    }

    pub fn live(&self) -> LiveTable {
        LiveTable { id: self.id, tokens: self.tokens }
    }

    /// Whether a lookup of `token` may find it here.
    pub fn may_contain(&self, token: u64) -> bool {
        self.tokens.contains(token) && self.reader.may_contain(token)
    }

    /// Positions in the table's index of the data blocks that may hold entries of the
    /// tokens this table answers for.
    pub fn block_range(&self) -> std::ops::Range<usize> {
        let blocks = self.reader.blocks();
        if self.tokens == TokenRange::ALL {
            return 0..blocks.len();
        }
        let first = self.reader.first_block_for(self.tokens.first);
        // Equal tokens may straddle blocks: the first block past the range may still hold
        // the range's last token.
        let end = (blocks.partition_point(|block| block.last_token < self.tokens.last) + 1).min(blocks.len());
        first..end.max(first)
    }

    pub fn blocks(&self) -> &[IndexEntry] {
        self.reader.blocks().get(self.block_range()).unwrap_or_default()
    }

    /// The table's bytes on disk, or for a table answering for part of its tokens, the
    /// share of its data blocks that part takes (what a merge of it would read).
    pub fn size(&self) -> u64 {
        if self.tokens == TokenRange::ALL {
            return self.reader.size;
        }
        self.blocks().iter().map(|block| u64::from(block.size)).sum()
    }

    /// The table's entries, or for a part of its tokens, an estimate by its share of the
    /// data blocks.
    pub fn entry_count(&self) -> u64 {
        let entries = self.reader.footer.entry_count;
        if self.tokens == TokenRange::ALL {
            return entries;
        }
        let all: u64 = self.reader.blocks().iter().map(|block| u64::from(block.size)).sum();
        (entries as f64 * self.size() as f64 / all.max(1) as f64).round() as u64
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
    /// Creates the table file (which must not exist).
    pub async fn create(storage: &S, path: PathBuf) -> Result<TableWriter<S>, TableError> {
        let file = storage.create(&path).await.map_err(|error| TableError::io(&path, &error))?;
        Ok(TableWriter { file, path, builder: TableBuilder::new(), bytes_written: 0 })
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

    /// Bytes of the table so far (written, and sealed to write).
    pub fn size(&self) -> u64 {
        self.builder.taken() + self.builder.sealed_size() as u64
    }

    /// Writes the rest, syncs the file, and opens it as a table answering for `tokens`. The
    /// directory entry is not yet durable: the manifest write that installs the table syncs
    /// the directory.
    pub async fn finish(mut self, id: u64, tokens: TokenRange) -> Result<(Table<S>, u64), TableError> {
        self.write_sealed(true).await?;
        let offset = self.builder.taken();
        let tail = std::mem::take(&mut self.builder).finish();
        self.write_at(offset, &tail).await?;
        let io = |error: std::io::Error| TableError::io(&self.path, &error);
        self.file.sync_data().await.map_err(io)?;
        let reader = TableReader::open(&self.file, &self.path).await?;
        let table = Table { id, file: Rc::new(self.file), reader: Rc::new(reader), tokens };
        Ok((table, self.bytes_written))
    }

    /// Gives up on the table: closes and removes the file.
    pub async fn abandon(self, storage: &S) {
        let _ = self.file.close().await;
        let _ = storage.remove(&self.path).await;
    }
}

/// Reads a table's entries in order, a chunk of blocks at a time, each block verified; of a
/// table that answers for part of its tokens, only that part. Entries are lent out of the
/// chunk (`peek`), so a compaction copies a value once: into its output.
pub struct TableScan<S: Storage> {
    table: Rc<Table<S>>,
    /// Positions in the table's index: the next block to read, and the end.
    next_block: usize,
    end_block: usize,
    chunk: Vec<u8>,
    spans: Vec<EntrySpan>,
    /// The position in `spans` of the entry `peek` lends.
    at: usize,
    pub bytes_read: u64,
}

impl<S: Storage> TableScan<S> {
    /// A scan positioned at the table's first entry.
    pub async fn open(table: Rc<Table<S>>) -> Result<TableScan<S>, TableError> {
        let std::ops::Range { start: next_block, end: end_block } = table.block_range();
        let mut scan = TableScan {
            table,
            next_block,
            end_block,
            chunk: Vec::new(),
            spans: Vec::new(),
            at: 0,
            bytes_read: 0,
        };
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
        let blocks = self.table.reader.blocks().get(..self.end_block).unwrap_or_default();
        let path = self.table.reader.path();
        let tokens = self.table.tokens;
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
            self.spans.retain(|span| tokens.contains(span.token()));
            self.next_block = end;
        }
        Ok(())
    }
}
