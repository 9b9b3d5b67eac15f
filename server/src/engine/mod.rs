//! The storage engine of one shard: a log-structured merge tree on direct I/O.
//!
//! Writes go to the write-ahead log and the memtable in one synchronous step. When the
//! memtable reaches its budget it becomes immutable and a background task writes it to a
//! sorted table, installs the table with a new manifest, and only then releases the log
//! segments it covered. Another background task, with fewer shares than request handling,
//! merges tables (see `compaction`). Reads look in the memtables, then in the tables newest
//! first, through per-shard bloom filters, indexes and a block cache, all in bounded memory.
//!
//! Everything here runs on the shard's thread: no lock guards any of it. The crash-safety
//! argument is written out step by step in server/src/engine/README.md.

pub mod cache;
pub mod compaction;
pub mod manifest;
pub mod memtable;
pub mod rows;
pub mod tables;

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use crate::clock::now_ms;
use crate::event::Event;
use crate::storage::{Storage, StorageFile};
use crate::table::reader::TableError;
use crate::wal::format::{Record, RecordKind};
use crate::wal::{RecoveryReport, ShardIdentity, SyncPolicy, Wal, WalError};
use cache::BlockCache;
use manifest::{Manifest, TokenRange};
pub use memtable::Entry;
use memtable::Memtable;
use rows::RowCache;
use tables::{Table, TableWriter};

/// How often a flush that ran out of space tries again.
const NO_SPACE_RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// How long compaction waits after an error before it tries again.
const COMPACTION_RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// The shard's memory budget: memtables, block cache, filters and indexes.
    pub memory_bytes: usize,
    /// Tombstones and expired values are kept at least this long after they were written
    /// or expired, and dropped only by a compaction that includes the oldest table.
    pub tombstone_grace_ms: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { memory_bytes: 256 << 20, tombstone_grace_ms: 3_600_000 }
    }
}

impl EngineOptions {
    /// The budget of one memtable: an eighth of the memory, since an active and an
    /// immutable one may coexist and the rest goes to the cache, filters and indexes.
    pub fn memtable_size_max(&self) -> usize {
        (self.memory_bytes / 8).max(64 << 10)
    }
}

/// Counters of one shard's engine, since it started.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Keys and values of accepted writes.
    pub user_bytes_written: Cell<u64>,
    pub write_count: Cell<u64>,
    /// Table bytes written by flushes and compactions.
    pub table_bytes_written: Cell<u64>,
    pub flush_count: Cell<u64>,
    pub compaction_count: Cell<u64>,
    pub compaction_bytes_read: Cell<u64>,
    /// Lookups that reached the tables (missed the memtables).
    pub table_lookup_count: Cell<u64>,
    pub block_read_count: Cell<u64>,
    pub block_bytes_read: Cell<u64>,
    pub corruption_count: Cell<u64>,
    /// Wall time during which writers waited for a flush (both memtables full) or for a
    /// merge that fell behind, and since when they have been waiting, if they are.
    pub write_stall_us: Cell<u64>,
    pub write_stall_since: Cell<Option<std::time::Instant>>,
}

/// A snapshot of the engine's state and counters, for `kvctl stats` and benchmarks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineStats {
    pub memtable_bytes: usize,
    pub immutable_memtable_bytes: usize,
    pub table_count: usize,
    pub table_bytes: u64,
    pub table_entry_count: u64,
    pub log_segment_count: usize,
    /// The log's segments on disk, the prepared next one included (allocated whole).
    pub log_disk_bytes: u64,
    pub filter_and_index_bytes: usize,
    pub cache_bytes: usize,
    pub cache_capacity: usize,
    pub cache_hit_ratio: f64,
    pub row_cache_bytes: usize,
    pub row_cache_capacity: usize,
    pub row_cache_rows: usize,
    /// Of the reads answered from the tables, the share the row cache answered.
    pub row_cache_hit_ratio: f64,
    pub compaction_debt_bytes: u64,
    /// Table entries per distinct key (1: no key in two tables); past 2 every table merges.
    pub table_redundancy: f64,
    pub flush_count: u64,
    pub compaction_count: u64,
    pub user_bytes_written: u64,
    pub log_bytes_written: u64,
    pub table_bytes_written: u64,
    /// (log + table bytes written) / user bytes written.
    pub write_amplification: f64,
    /// Disk blocks read per lookup that reached the tables.
    pub read_amplification: f64,
    pub write_count: u64,
    /// Disk blocks read by requests (reads, and writes' reads of the current versions);
    /// compaction's reads are `compaction_bytes_read`.
    pub request_disk_reads: u64,
    pub compaction_bytes_read: u64,
    /// Table bytes on disk per byte of keys and values the tables hold (format overhead:
    /// headers, padding, index, filter). Stale versions count as held, so this is a lower
    /// bound; `bench/engine` measures the whole against the live data.
    pub space_amplification: f64,
    pub corruption_count: u64,
    /// Milliseconds writers spent waiting for a flush to make room in the memtables, or for
    /// a merge that fell behind to free space.
    pub write_stall_ms: u64,
    pub no_space: bool,
}

type TableList<S> = Rc<Vec<Rc<Table<S>>>>;

struct Inner<S: Storage> {
    storage: S,
    dir: PathBuf,
    options: EngineOptions,
    wal: Wal<S>,
    active: RefCell<Memtable>,
    immutable: RefCell<Option<Rc<Memtable>>>,
    /// Newest first.
    tables: RefCell<TableList<S>>,
    /// Bumped whenever the table list changes.
    tables_generation: Cell<u64>,
    manifest: RefCell<Manifest>,
    /// One manifest change at a time (flush and compaction both install tables).
    manifest_lock: glommio::sync::Semaphore,
    /// One compaction at a time (the background one, or one asked for).
    compaction_lock: glommio::sync::Semaphore,
    cache: RefCell<BlockCache>,
    rows: RefCell<RowCache>,
    /// An immutable memtable awaits its flush, or the engine is closing.
    flush_wanted: Event,
    /// A flush or compaction installed tables.
    installed: Event,
    /// A flush failed for want of space: writes are refused until one succeeds.
    no_space: Cell<bool>,
    /// The tables on disk are past `compaction::SPACE_STALL_FACTOR` times their live data.
    tables_past_space_limit: Cell<bool>,
    /// A merge runs: while the tables are past their space limit, writers wait for it.
    merging: Cell<bool>,
    closing: Cell<bool>,
    /// Background tasks still running; `close` waits for them to stop.
    running_tasks: Cell<usize>,
    task_stopped: Event,
    counters: EngineCounters,
}

/// Counts a background task as running until dropped.
struct Running<S: Storage>(Rc<Inner<S>>);

impl<S: Storage> Running<S> {
    fn start(inner: &Rc<Inner<S>>) -> Running<S> {
        inner.running_tasks.set(inner.running_tasks.get() + 1);
        Running(inner.clone())
    }
}

impl<S: Storage> Drop for Running<S> {
    fn drop(&mut self) {
        self.0.running_tasks.set(self.0.running_tasks.get() - 1);
        self.0.task_stopped.notify_all();
    }
}

/// One shard's storage engine. Cheap to clone; clones share it.
pub struct Engine<S: Storage> {
    inner: Rc<Inner<S>>,
}

impl<S: Storage> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Engine { inner: self.inner.clone() }
    }
}

fn table_error(error: TableError) -> WalError {
    match error {
        TableError::Io { path, message, .. } => WalError::Io { path, message },
        TableError::Corrupt { path, offset, detail } => WalError::Corrupt { path, offset, detail },
    }
}

impl<S: Storage> Engine<S> {
    /// Opens the shard in `dir`: the manifest and its tables, then the log records the
    /// tables do not hold. Spawns the flush and compaction tasks. `observe` sees the
    /// timestamp of every replayed record (for the shard's clock).
    pub async fn open(
        storage: S,
        dir: &Path,
        identity: ShardIdentity,
        policy: SyncPolicy,
        options: EngineOptions,
        mut observe: impl FnMut(u64),
    ) -> Result<(Engine<S>, RecoveryReport), WalError> {
        let io_error =
            |error: std::io::Error| WalError::Io { path: dir.to_path_buf(), message: error.to_string() };
        storage.create_dir_all(dir).await.map_err(io_error)?;
        manifest::remove_leftover(&storage, dir).await;
        let manifest = manifest::read(&storage, dir).await.map_err(table_error)?.unwrap_or(Manifest {
            shard_index: identity.shard_index,
            shard_count: identity.shard_count,
            flushed_seq: 0,
            next_table_id: 1,
            tables: Vec::new(),
        });
        if (manifest.shard_index, manifest.shard_count) != (identity.shard_index, identity.shard_count) {
            return Err(WalError::Corrupt {
                path: dir.join(manifest::MANIFEST_FILE),
                offset: 12,
                detail: format!(
                    "manifest of shard {} of {}, expected shard {} of {}",
                    manifest.shard_index, manifest.shard_count, identity.shard_index, identity.shard_count
                ),
            });
        }
        let mut tables = Vec::with_capacity(manifest.tables.len());
        for &live in &manifest.tables {
            tables.push(Rc::new(Table::open(&storage, dir, live).await.map_err(table_error)?));
        }
        // Tables the manifest does not name are leftovers of a flush or compaction that a
        // crash interrupted, or inputs of a compaction whose removal was not yet durable.
        for name in storage.list_dir(dir).await.map_err(io_error)? {
            match manifest::parse_table_file_name(&name) {
                Some(id) if !manifest.holds(id) => {
                    storage.remove(&dir.join(&name)).await.map_err(io_error)?;
                }
                _ => {}
            }
        }

        let mut active = Memtable::default();
        let (wal, report) =
            Wal::open(storage.clone(), dir, identity, policy, manifest.flushed_seq, |record| {
                observe(record.timestamp_us);
                let value = (record.kind == RecordKind::Put).then(|| Rc::from(record.value));
                let entry = Entry {
                    value,
                    timestamp_us: record.timestamp_us,
                    expires_at_ms: record.expires_at_ms,
                    seq: record.seq,
                };
                active.insert(record.key, entry);
            })
            .await?;
        wal.release_through(manifest.flushed_seq).await?;

        let past_limit = past_space_limit(&tables);
        let inner = Rc::new(Inner {
            storage,
            dir: dir.to_path_buf(),
            options,
            wal,
            active: RefCell::new(active),
            immutable: RefCell::new(None),
            tables: RefCell::new(Rc::new(tables)),
            tables_generation: Cell::new(0),
            manifest: RefCell::new(manifest),
            manifest_lock: glommio::sync::Semaphore::new(1),
            compaction_lock: glommio::sync::Semaphore::new(1),
            cache: RefCell::new(BlockCache::new(0)),
            rows: RefCell::new(RowCache::default()),
            flush_wanted: Event::default(),
            installed: Event::default(),
            no_space: Cell::new(false),
            tables_past_space_limit: Cell::new(past_limit),
            merging: Cell::new(false),
            closing: Cell::new(false),
            running_tasks: Cell::new(0),
            task_stopped: Event::default(),
            counters: EngineCounters::default(),
        });
        inner.resize_cache();
        let queues = background_queues();
        spawn_into(flusher(Running::start(&inner)), queues.flush);
        spawn_into(compactor(Running::start(&inner)), queues.compaction);
        let engine = Engine { inner };
        engine.inner.maybe_seal_memtable();
        Ok((engine, report))
    }

    pub fn wal(&self) -> &Wal<S> {
        &self.inner.wal
    }

    pub fn options(&self) -> EngineOptions {
        self.inner.options
    }

    /// Entries in the memtables and the tables: at least the live keys, more while
    /// overwritten, deleted and expired entries wait for compaction (RESP's DBSIZE).
    pub fn entry_count_estimate(&self) -> u64 {
        let inner = &self.inner;
        let memory = inner.active.borrow().len() + inner.immutable.borrow().as_ref().map_or(0, |m| m.len());
        let tables: u64 = inner.tables.borrow().iter().map(|table| table.entry_count()).sum();
        memory as u64 + tables
    }

    /// Whether any sorted table is live (if none, the memtables hold everything).
    pub fn has_tables(&self) -> bool {
        !self.inner.tables.borrow().is_empty()
    }

    /// The newest version of `key` held in memory, if any.
    pub fn lookup_memtables(&self, key: &[u8]) -> Option<Entry> {
        if let Some(entry) = self.inner.active.borrow().get(key) {
            return Some(entry.clone());
        }
        self.inner.immutable.borrow().as_ref().and_then(|memtable| memtable.get(key).cloned())
    }

    /// The newest version of `key` when memory (memtables and block cache) holds all it
    /// takes to know it; `None`: use [`Engine::read`].
    pub fn try_read(&self, key: &[u8]) -> Option<Result<Option<Entry>, TableError>> {
        if let Some(entry) = self.lookup_memtables(key) {
            return Some(Ok(Some(entry)));
        }
        self.inner.read_cached_tables(key)
    }

    /// The newest version of `key`: in memory, or in the tables.
    pub async fn read(&self, key: &[u8]) -> Result<Option<Entry>, TableError> {
        if let Some(entry) = self.lookup_memtables(key) {
            return Ok(Some(entry));
        }
        let tables = self.inner.tables.borrow().clone();
        self.inner.read_tables(&tables, key).await
    }

    /// The newest version of every key whose token falls in `first..=last`, tombstones and
    /// expired values included, in table order (token, key). Reads the range's blocks of every
    /// table sequentially, past the block cache (a scan would only evict the hot blocks).
    /// Anti-entropy builds its Merkle trees from this; the whole range is held in memory, so
    /// callers ask for ranges a fraction of the shard's size (one partition).
    pub async fn scan_tokens(&self, first: u64, last: u64) -> Result<Vec<(Vec<u8>, Entry)>, TableError> {
        use std::collections::btree_map::{BTreeMap, Entry as Slot};
        let mut newest: BTreeMap<(u64, Vec<u8>), Entry> = BTreeMap::new();
        let mut keep = |token: u64, key: &[u8], entry: Entry| match newest.entry((token, key.to_vec())) {
            Slot::Vacant(slot) => {
                slot.insert(entry);
            }
            Slot::Occupied(mut slot) if slot.get().seq < entry.seq => {
                slot.insert(entry);
            }
            Slot::Occupied(_) => {}
        };
        for (token, key, entry) in self.inner.active.borrow().in_token_range(first, last) {
            keep(token, key, entry.clone());
        }
        if let Some(immutable) = self.inner.immutable.borrow().as_ref() {
            for (token, key, entry) in immutable.in_token_range(first, last) {
                keep(token, key, entry.clone());
            }
        }
        let tables = self.inner.tables.borrow().clone();
        for table in tables.iter() {
            // Of the range, the part this table answers for.
            let (first, last) = (first.max(table.tokens.first), last.min(table.tokens.last));
            if first > last {
                continue;
            }
            let blocks = table.reader.blocks();
            for block in &blocks[table.reader.first_block_for(first)..] {
                let bytes = table
                    .file
                    .read_at(block.offset, block.size as usize)
                    .await
                    .map_err(|error| TableError::io(table.reader.path(), &error));
                let entries = bytes.and_then(|bytes| {
                    crate::table::format::parse_data_block(&bytes, block.offset)
                        .map(|entries| {
                            entries
                                .iter()
                                .filter(|e| first <= e.token && e.token <= last)
                                .map(|e| (e.token, e.key.to_vec(), Entry::from_table(e)))
                                .collect::<Vec<_>>()
                        })
                        .map_err(|error| TableError::corrupt(table.reader.path(), error))
                });
                if let Err(error) = &entries {
                    self.inner.count_corruption(error);
                }
                for (token, key, entry) in entries? {
                    keep(token, &key, entry);
                }
                if block.last_token > last {
                    break;
                }
            }
        }
        Ok(newest.into_iter().map(|((_, key), entry)| (key, entry)).collect())
    }

    /// As [`Engine::read`], but still current when it returns: no write to `key` can have
    /// slipped in between, so the caller may decide and write without awaiting (CAS).
    pub async fn read_current(&self, key: &[u8]) -> Result<Option<Entry>, TableError> {
        loop {
            if let Some(entry) = self.lookup_memtables(key) {
                return Ok(Some(entry));
            }
            let generation = self.inner.tables_generation.get();
            let tables = self.inner.tables.borrow().clone();
            let found = self.inner.read_tables(&tables, key).await?;
            // A write during the read is in a memtable now, or was flushed into a table
            // this read did not look at (the table list changed): then read again.
            if let Some(entry) = self.lookup_memtables(key) {
                return Ok(Some(entry));
            }
            if generation == self.inner.tables_generation.get() {
                return Ok(found);
            }
        }
    }

    /// Waits until a write of `size` bytes can be accepted: room in the log's pending
    /// buffer and in the memtables, and the tables within their space limit or no merge
    /// running. The caller must call [`Engine::write`] without awaiting anything in between.
    pub async fn reserve(&self, size: usize) -> Result<(), WalError> {
        loop {
            let listener = self.inner.installed.listen();
            self.inner.check_failed()?;
            if self.inner.no_space.get() {
                return Err(WalError::NoSpace);
            }
            let memtables_full = self.inner.active.borrow().size() >= self.inner.options.memtable_size_max()
                && self.inner.immutable.borrow().is_some();
            let merge_behind = self.inner.tables_past_space_limit.get() && self.inner.merging.get();
            let counters = &self.inner.counters;
            if !memtables_full && !merge_behind {
                if let Some(since) = counters.write_stall_since.take() {
                    counters
                        .write_stall_us
                        .set(counters.write_stall_us.get() + since.elapsed().as_micros() as u64);
                }
                break;
            }
            // The flush is behind: writers wait for it rather than grow memory unbounded; or
            // a merge is: they wait for its next piece rather than grow the disk unbounded.
            if counters.write_stall_since.get().is_none() {
                counters.write_stall_since.set(Some(std::time::Instant::now()));
            }
            listener.await;
        }
        self.inner.wal.reserve(size).await
    }

    /// Logs and applies one mutation; `value: None` deletes. Returns its sequence number;
    /// durability comes with [`Wal::wait_acked`].
    pub fn write(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        timestamp_us: u64,
        expires_at_ms: u64,
    ) -> Result<u64, WalError> {
        let record = Record {
            seq: 0,
            kind: if value.is_some() { RecordKind::Put } else { RecordKind::Delete },
            key,
            value: value.unwrap_or(&[]),
            timestamp_us,
            expires_at_ms,
        };
        let seq = self.inner.wal.append(&record)?;
        let entry = Entry { value: value.map(Rc::from), timestamp_us, expires_at_ms, seq };
        self.inner.active.borrow_mut().insert(key, entry);
        self.inner.rows.borrow_mut().remove(key);
        let counters = &self.inner.counters;
        counters.write_count.set(counters.write_count.get() + 1);
        counters
            .user_bytes_written
            .set(counters.user_bytes_written.get() + (key.len() + record.value.len()) as u64);
        self.inner.maybe_seal_memtable();
        Ok(seq)
    }

    /// A consistent copy of this shard in `dest` (same file system) while it keeps serving:
    /// flushes every acknowledged write into tables, then, holding the manifest so that no
    /// flush or compaction changes the table set meanwhile, hard-links the (immutable) tables
    /// the manifest names and writes that manifest and the counter lease beside them. A node
    /// started on the copy has every write acknowledged before the call. Returns the log
    /// position the copy holds everything up to.
    pub async fn snapshot(&self, dest: &Path) -> Result<u64, WalError> {
        // Everything acknowledged so far, not "everything": under load the memtable never
        // empties.
        self.flush_through(self.inner.wal.acked_seq()).await?;
        let io_error =
            |error: std::io::Error| WalError::Io { path: dest.to_path_buf(), message: error.to_string() };
        let _permit = self.inner.manifest_lock.acquire_permit(1).await;
        let manifest = self.inner.manifest.borrow().clone();
        let storage = &self.inner.storage;
        storage.create_dir_all(dest).await.map_err(io_error)?;
        for table in &manifest.tables {
            let name = manifest::table_file_name(table.id);
            storage.hard_link(&self.inner.dir.join(&name), &dest.join(&name)).await.map_err(io_error)?;
        }
        let lease_name = crate::cluster::lease::LEASE_FILE;
        match crate::storage::copy_file(storage, &self.inner.dir.join(lease_name), &dest.join(lease_name))
            .await
        {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io_error(error)),
            _ => {}
        }
        crate::storage::replace_file(storage, dest, manifest::MANIFEST_FILE, &manifest::encode(&manifest))
            .await
            .map_err(io_error)?;
        Ok(manifest.flushed_seq)
    }

    /// The file system the engine's files live on.
    pub fn storage(&self) -> &S {
        &self.inner.storage
    }

    /// Flushes everything in the memtables to tables, and waits until it is installed.
    pub async fn flush(&self) -> Result<(), WalError> {
        loop {
            let listener = self.inner.installed.listen();
            self.inner.check_failed()?;
            if self.inner.immutable.borrow().is_none() {
                if self.inner.active.borrow().is_empty() {
                    return Ok(());
                }
                self.inner.seal_memtable();
            }
            listener.await;
        }
    }

    /// Waits until every write up to `seq` is in the tables (the manifest says so), sealing
    /// the active memtable when no flush is under way.
    pub async fn flush_through(&self, seq: u64) -> Result<(), WalError> {
        loop {
            let listener = self.inner.installed.listen();
            self.inner.check_failed()?;
            if self.inner.manifest.borrow().flushed_seq >= seq {
                return Ok(());
            }
            if self.inner.immutable.borrow().is_none() && !self.inner.active.borrow().is_empty() {
                self.inner.seal_memtable();
            }
            listener.await;
        }
    }

    /// Merges every table into one now (a full compaction), dropping what the grace period
    /// allows.
    pub async fn compact_all(&self) -> Result<(), WalError> {
        let _permit = self.inner.compaction_lock.acquire_permit(1).await;
        let count = self.inner.tables.borrow().len();
        if count == 0 {
            return Ok(());
        }
        self.inner.compact(0..count).await.map_err(table_error)
    }

    /// Reads and verifies every block of every live table; the first damage found is the
    /// error. Returns the number of entries checked.
    pub async fn scrub(&self) -> Result<u64, TableError> {
        let tables = self.inner.tables.borrow().clone();
        let mut entry_count = 0;
        for table in tables.iter() {
            let count_corruption = |error: &TableError| self.inner.count_corruption(error);
            let mut scan = tables::TableScan::open(table.clone()).await.inspect_err(count_corruption)?;
            while scan.peek().is_some() {
                entry_count += 1;
                scan.advance().await.inspect_err(count_corruption)?;
            }
        }
        Ok(entry_count)
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.inner.counters
    }

    pub fn stats(&self) -> EngineStats {
        let inner = &self.inner;
        let tables = inner.tables.borrow().clone();
        // On disk: a merge's inputs take all their bytes until they go.
        let table_bytes: u64 = tables.iter().map(|table| table.reader.size).sum();
        let counters = &inner.counters;
        let cache = inner.cache.borrow();
        let rows = inner.rows.borrow();
        let lookups = cache.hit_count + cache.miss_count;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let log_bytes = inner.wal.bytes_written();
        let table_entry_count: u64 = tables.iter().map(|table| table.entry_count()).sum();
        let payload_bytes: u64 = tables.iter().map(|table| table.reader.footer.payload_bytes).sum();
        let redundancy = table_redundancy(&tables);
        EngineStats {
            memtable_bytes: inner.active.borrow().size(),
            immutable_memtable_bytes: inner.immutable.borrow().as_ref().map_or(0, |m| m.size()),
            table_count: tables.len(),
            table_bytes,
            table_entry_count,
            log_segment_count: inner.wal.segment_count(),
            log_disk_bytes: inner.wal.disk_bytes(),
            filter_and_index_bytes: inner.table_memory(),
            cache_bytes: cache.size(),
            cache_capacity: cache.capacity(),
            cache_hit_ratio: ratio(cache.hit_count as f64, lookups as f64),
            row_cache_bytes: rows.size(),
            row_cache_capacity: rows.capacity(),
            row_cache_rows: rows.len(),
            row_cache_hit_ratio: ratio(rows.hit_count as f64, (rows.hit_count + rows.miss_count) as f64),
            compaction_debt_bytes: compaction::debt(
                &run_sizes(&tables),
                inner.options.memtable_size_max() as u64,
                redundancy,
            ),
            table_redundancy: redundancy,
            flush_count: counters.flush_count.get(),
            compaction_count: counters.compaction_count.get(),
            user_bytes_written: counters.user_bytes_written.get(),
            log_bytes_written: log_bytes,
            table_bytes_written: counters.table_bytes_written.get(),
            write_amplification: ratio(
                (log_bytes + counters.table_bytes_written.get()) as f64,
                counters.user_bytes_written.get() as f64,
            ),
            read_amplification: ratio(
                counters.block_read_count.get() as f64,
                counters.table_lookup_count.get() as f64,
            ),
            write_count: counters.write_count.get(),
            request_disk_reads: counters.block_read_count.get(),
            compaction_bytes_read: counters.compaction_bytes_read.get(),
            space_amplification: ratio(table_bytes as f64, payload_bytes as f64),
            corruption_count: counters.corruption_count.get(),
            write_stall_ms: (counters.write_stall_us.get()
                + counters.write_stall_since.get().map_or(0, |since| since.elapsed().as_micros() as u64))
                / 1000,
            no_space: inner.no_space.get() || inner.wal.no_space(),
        }
    }

    /// Stops the background tasks (a flush under way completes, a compaction under way is
    /// abandoned) and closes the log (everything pending written and synced). The memtables
    /// are not flushed: the log holds them.
    pub async fn close(&self) -> Result<(), WalError> {
        self.inner.closing.set(true);
        self.inner.flush_wanted.notify_all();
        self.inner.installed.notify_all();
        // The log first: a flush under way waits for its records' acknowledgement, which a
        // log stuck waiting for space to rotate would never give; closing the log ends that
        // wait (acknowledged, or refused), so the tasks below always stop.
        let closed = self.inner.wal.close().await;
        loop {
            let listener = self.inner.task_stopped.listen();
            if self.inner.running_tasks.get() == 0 {
                break;
            }
            listener.await;
        }
        closed
    }
}

impl<S: Storage> Inner<S> {
    fn check_failed(&self) -> Result<(), WalError> {
        if let Some(error) = self.wal.failure() {
            return Err(error);
        }
        if self.closing.get() {
            return Err(WalError::ShuttingDown);
        }
        Ok(())
    }

    /// Turns the active memtable into the immutable one, if that one is free, once it is
    /// full or once the log has moved past a segment whose records it holds. Without the
    /// second rule a working set that fits the memtable (a counter, a small hot set: every
    /// write an overwrite) never fills it, never flushes, and the log grows until the disk is
    /// full, all of it replayed at restart. With it a segment is released at most one flush
    /// after the log moves on, so the log holds about two segments (the one being written and
    /// the next, prepared when it is half full; three while a flush runs) whatever the
    /// workload, and recovery replays at most that.
    fn maybe_seal_memtable(&self) {
        if self.immutable.borrow().is_some() {
            return;
        }
        let active = self.active.borrow();
        let full = active.size() >= self.options.memtable_size_max();
        let log_moved_on = self.wal.segment_count() > 1 && !active.is_empty();
        drop(active);
        if full || log_moved_on {
            self.seal_memtable();
        }
    }

    fn seal_memtable(&self) {
        debug_assert!(self.immutable.borrow().is_none());
        // The next memtable will likely hold as many keys: sized for them at once, it does
        // not rehash its way up while writers wait.
        let mut active = self.active.borrow_mut();
        let capacity = active.len();
        let sealed = std::mem::replace(&mut *active, Memtable::with_capacity(capacity));
        drop(active);
        *self.immutable.borrow_mut() = Some(Rc::new(sealed));
        self.flush_wanted.notify_all();
    }

    fn table_memory(&self) -> usize {
        self.tables.borrow().iter().map(|table| table.reader.memory_size()).sum()
    }

    /// The cache gets what the memtables, filters and indexes leave of the budget, less an
    /// eighth kept for memory the engine does not count entry by entry: the log's pending
    /// buffer, a compaction's buffers and growing output index, I/O buffers.
    fn resize_cache(&self) {
        let unaccounted = self.options.memory_bytes / 8;
        let reserved = 2 * self.options.memtable_size_max() + self.table_memory() + unaccounted;
        let caches = self.options.memory_bytes.saturating_sub(reserved);
        // Rows are denser than blocks for point reads (see rows.rs): most of it goes to them.
        let rows = caches / 4 * 3;
        self.rows.borrow_mut().set_capacity(rows);
        self.cache.borrow_mut().set_capacity(caches - rows);
    }

    /// Keeps a version just read from the tables in the row cache, unless a newer one came
    /// while the read awaited the disk: it is in a memtable, or was flushed into a table
    /// installed since the read began (`generation`).
    fn remember_row(&self, key: &[u8], entry: &Entry, generation: u64) {
        let in_memtables = self.active.borrow().get(key).is_some()
            || self.immutable.borrow().as_ref().is_some_and(|memtable| memtable.get(key).is_some());
        let mut rows = self.rows.borrow_mut();
        rows.miss_count += 1;
        if !in_memtables && generation == self.tables_generation.get() {
            rows.insert_row(key, entry.clone());
        }
    }

    fn count_corruption(&self, error: &TableError) {
        if let TableError::Corrupt { .. } = error {
            self.counters.corruption_count.set(self.counters.corruption_count.get() + 1);
            tracing::error!("{error}");
        }
    }

    /// [`Inner::read_tables`] when every block it needs is in the block cache: no task, no
    /// await. `None`: a block must come from the disk.
    fn read_cached_tables(&self, key: &[u8]) -> Option<Result<Option<Entry>, TableError>> {
        if let Some(entry) = self.rows.borrow_mut().get(key) {
            return Some(Ok(Some(entry)));
        }
        let token = schema::key_hash(key);
        let tables = self.tables.borrow();
        let mut cache = self.cache.borrow_mut();
        for table in tables.iter() {
            if !table.may_contain(token) {
                continue;
            }
            let blocks = table.reader.blocks();
            for block in &blocks[table.reader.first_block_for(token)..] {
                let bytes = cache.get(&(table.id, block.offset))?;
                match table.reader.find_in_block(block, &bytes, key, false) {
                    Ok(Some(entry)) => {
                        let lookups = &self.counters.table_lookup_count;
                        lookups.set(lookups.get() + 1);
                        let entry = Entry::from_table(&entry);
                        drop(cache);
                        let mut rows = self.rows.borrow_mut();
                        rows.miss_count += 1;
                        rows.insert_row(key, entry.clone());
                        return Some(Ok(Some(entry)));
                    }
                    Ok(None) => {}
                    Err(error) => {
                        self.count_corruption(&error);
                        return Some(Err(error));
                    }
                }
                if block.last_token > token {
                    break;
                }
            }
        }
        self.counters.table_lookup_count.set(self.counters.table_lookup_count.get() + 1);
        Some(Ok(None))
    }

    async fn read_tables(&self, tables: &[Rc<Table<S>>], key: &[u8]) -> Result<Option<Entry>, TableError> {
        if let Some(entry) = self.rows.borrow_mut().get(key) {
            return Ok(Some(entry));
        }
        self.counters.table_lookup_count.set(self.counters.table_lookup_count.get() + 1);
        let generation = self.tables_generation.get();
        let token = schema::key_hash(key);
        for table in tables {
            if !table.may_contain(token) {
                continue;
            }
            let blocks = table.reader.blocks();
            for block in &blocks[table.reader.first_block_for(token)..] {
                let found = self.find_in_block(table, block, key).await;
                if let Err(error) = &found {
                    self.count_corruption(error);
                }
                if let Some(entry) = found? {
                    self.remember_row(key, &entry, generation);
                    return Ok(Some(entry));
                }
                if block.last_token > token {
                    break;
                }
            }
        }
        Ok(None)
    }

    async fn find_in_block(
        &self,
        table: &Table<S>,
        block: &crate::table::format::IndexEntry,
        key: &[u8],
    ) -> Result<Option<Entry>, TableError> {
        let id = (table.id, block.offset);
        let cached = {
            let mut cache = self.cache.borrow_mut();
            let cached = cache.get(&id);
            cache.miss_count += u64::from(cached.is_none());
            cached
        };
        if let Some(bytes) = cached {
            // Verified when it was read from the disk.
            return Ok(table
                .reader
                .find_in_block(block, &bytes, key, false)?
                .as_ref()
                .map(Entry::from_table));
        }
        let bytes = table
            .file
            .read_at(block.offset, block.size as usize)
            .await
            .map_err(|error| TableError::io(table.reader.path(), &error))?;
        self.counters.block_read_count.set(self.counters.block_read_count.get() + 1);
        self.counters.block_bytes_read.set(self.counters.block_bytes_read.get() + bytes.len() as u64);
        let found = table.reader.find_in_block(block, &bytes, key, true)?.as_ref().map(Entry::from_table);
        // Only verified blocks are cached.
        self.cache.borrow_mut().insert_block(id, Rc::from(bytes));
        Ok(found)
    }

    fn next_table_path(&self) -> (u64, PathBuf) {
        let mut manifest = self.manifest.borrow_mut();
        let id = manifest.next_table_id;
        manifest.next_table_id += 1;
        (id, self.dir.join(manifest::table_file_name(id)))
    }

    /// Writes `memtable` to new tables and installs them: one run of pieces of a quarter of
    /// the memtable budget each, so that a merge frees each as it passes it. On error the
    /// new tables are removed and nothing changed.
    async fn flush_memtable(&self, memtable: &Memtable) -> Result<(), TableError> {
        let entries = memtable.sorted();
        let mut pieces = Vec::new();
        let written = self.write_pieces(&entries, &mut pieces).await;
        let installed = match written {
            Ok(()) => {
                self.install(|manifest, tables| {
                    manifest.flushed_seq = memtable.max_seq();
                    tables.splice(0..0, pieces.iter().cloned());
                })
                .await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = installed {
            for table in &pieces {
                let _ = self.storage.remove(table.reader.path()).await;
            }
            return Err(error);
        }
        let counters = &self.counters;
        counters.flush_count.set(counters.flush_count.get() + 1);
        Ok(())
    }

    /// Writes sorted memtable entries into tables of about a quarter of the memtable budget
    /// each, cut between tokens, together answering for every token.
    async fn write_pieces(
        &self,
        entries: &[(u64, &[u8], &memtable::Entry)],
        pieces: &mut Vec<Rc<Table<S>>>,
    ) -> Result<(), TableError> {
        let piece_size = compaction::piece_size(0, self.options.memtable_size_max() as u64);
        let mut rest = entries;
        let mut first = 0;
        while !rest.is_empty() {
            let (id, path) = self.next_table_path();
            let mut writer = TableWriter::create(&self.storage, path).await?;
            let mut count = 0;
            let written = async {
                for (token, key, entry) in rest {
                    if count > 0 && writer.size() >= piece_size && *token != rest[count - 1].0 {
                        break;
                    }
                    writer.add(*token, key, entry).await?;
                    count += 1;
                }
                Ok::<_, TableError>(())
            }
            .await;
            if let Err(error) = written {
                writer.abandon(&self.storage).await;
                return Err(error);
            }
            let last = if count == rest.len() { u64::MAX } else { rest[count - 1].0 };
            rest = &rest[count..];
            let (table, bytes_written) = writer.finish(id, TokenRange { first, last }).await?;
            let counters = &self.counters;
            counters.table_bytes_written.set(counters.table_bytes_written.get() + bytes_written);
            pieces.push(Rc::new(table));
            first = last.saturating_add(1);
        }
        Ok(())
    }

    /// Changes the table set: `change` edits a copy of the manifest and of the table list
    /// (the manifest's list of tables follows it), the manifest is replaced durably, then
    /// the new list is installed.
    async fn install(
        &self,
        change: impl FnOnce(&mut Manifest, &mut Vec<Rc<Table<S>>>),
    ) -> Result<(), TableError> {
        let _permit = self.manifest_lock.acquire_permit(1).await;
        let mut manifest = self.manifest.borrow().clone();
        let mut tables: Vec<Rc<Table<S>>> = self.tables.borrow().iter().cloned().collect();
        change(&mut manifest, &mut tables);
        manifest.tables = tables.iter().map(|table| table.live()).collect();
        manifest::write(&self.storage, &self.dir, &manifest).await?;
        let next_table_id = self.manifest.borrow().next_table_id.max(manifest.next_table_id);
        manifest.next_table_id = next_table_id;
        *self.manifest.borrow_mut() = manifest;
        self.tables_past_space_limit.set(past_space_limit(&tables));
        *self.tables.borrow_mut() = Rc::new(tables);
        self.tables_generation.set(self.tables_generation.get() + 1);
        self.resize_cache();
        self.installed.notify_all();
        Ok(())
    }

    /// Merges the tables at `run` (positions, newest first) into one run in their place,
    /// installed a piece at a time (module `compaction`).
    async fn compact(&self, run: std::ops::Range<usize>) -> Result<(), TableError> {
        self.merging.set(true);
        let compacted = self.merge_in_pieces(run).await;
        self.merging.set(false);
        self.installed.notify_all(); // writers held back for the merge go on
        compacted
    }

    /// [`Inner::compact`]'s merge.
    async fn merge_in_pieces(&self, run: std::ops::Range<usize>) -> Result<(), TableError> {
        let inputs: Vec<Rc<Table<S>>> = self.tables.borrow()[run.clone()].to_vec();
        let includes_oldest = run.end == self.tables.borrow().len();
        let purge = compaction::Purge {
            includes_oldest,
            before_ms: now_ms().saturating_sub(self.options.tombstone_grace_ms),
        };
        let input_ids: Vec<u64> = inputs.iter().map(|table| table.id).collect();
        let first_token = inputs.iter().map(|table| table.tokens.first).min().unwrap_or(0);
        let last_token = inputs.iter().map(|table| table.tokens.last).max().unwrap_or(u64::MAX);
        let input_bytes = inputs.iter().map(|table| table.size()).sum();
        let piece_size = compaction::piece_size(input_bytes, self.options.memtable_size_max() as u64);
        let mut merge = compaction::Merge::open(&inputs, purge).await?;
        let mut piece_first = first_token;
        loop {
            let (id, path) = self.next_table_path();
            let mut writer = TableWriter::create(&self.storage, path).await?;
            let piece_last = match merge.fill(&mut writer, piece_size, &self.closing).await {
                Ok(compaction::Filled::Piece { last_token }) => last_token,
                Ok(compaction::Filled::Done) => last_token,
                Ok(compaction::Filled::Cancelled) => {
                    // The pieces installed so far stay: the inputs answer for the rest.
                    writer.abandon(&self.storage).await;
                    return Ok(());
                }
                Err(error) => {
                    writer.abandon(&self.storage).await;
                    return Err(error);
                }
            };
            let output = if writer.entry_count() > 0 {
                let tokens = TokenRange { first: piece_first, last: piece_last };
                let (table, bytes_written) = writer.finish(id, tokens).await?;
                let counters = &self.counters;
                counters.table_bytes_written.set(counters.table_bytes_written.get() + bytes_written);
                Some(Rc::new(table))
            } else {
                writer.abandon(&self.storage).await;
                None
            };
            let mut passed = Vec::new();
            let installed = self
                .install(|_, tables| {
                    // Flushes may have added newer tables meanwhile, and earlier pieces lie
                    // before the inputs still installed; one compaction at a time, so those
                    // inputs are still in place, in order.
                    let at = tables
                        .iter()
                        .position(|table| input_ids.contains(&table.id))
                        .expect("a merge's last input stays installed until its last piece");
                    if let Some(table) = &output {
                        tables.insert(at, table.clone());
                    }
                    // The inputs answer for the tokens past the piece, if any are left.
                    for slot in tables.iter_mut().skip(at).filter(|table| input_ids.contains(&table.id)) {
                        let first = slot.tokens.first.max(piece_last.saturating_add(1));
                        if piece_last == u64::MAX || first > slot.tokens.last {
                            passed.push(slot.clone());
                        } else {
                            *slot = Rc::new(slot.answering_for(TokenRange { first, last: slot.tokens.last }));
                        }
                    }
                    tables.retain(|table| !passed.iter().any(|gone| gone.id == table.id));
                })
                .await;
            if let Err(error) = installed {
                if let Some(table) = &output {
                    let _ = self.storage.remove(table.reader.path()).await;
                }
                return Err(error);
            }
            // Inputs out of the manifest: remove them. Open handles (a read in flight) keep
            // working; a crash before the removal is durable leaves orphans that the next
            // start removes.
            for table in &passed {
                let _ = self.storage.remove(table.reader.path()).await;
                self.cache.borrow_mut().remove_table(table.id);
            }
            if piece_last >= last_token {
                break;
            }
            piece_first = piece_last + 1;
        }
        let counters = &self.counters;
        counters.compaction_count.set(counters.compaction_count.get() + 1);
        counters.compaction_bytes_read.set(counters.compaction_bytes_read.get() + merge.report.bytes_read);
        Ok(())
    }

    /// Stops the write path for good after an error that may have lost data (a failed
    /// table write or sync): the kernel may have dropped the pages, a retry could lie.
    fn fail(&self, error: &TableError) {
        self.wal.fail_stop(&format!("flush: {error}"));
        self.installed.notify_all();
    }
}

#[derive(Clone, Copy)]
struct BackgroundQueues {
    flush: glommio::TaskQueueHandle,
    compaction: glommio::TaskQueueHandle,
}

thread_local! {
    static BACKGROUND_QUEUES: std::cell::OnceCell<BackgroundQueues> = const { std::cell::OnceCell::new() };
}

/// The executor's task queues for background work, made once per thread. Request handling
/// runs in the default queue with 1000 shares: under load, flushes get a fifth of the CPU
/// and compaction a twentieth, so foreground latency holds.
fn background_queues() -> BackgroundQueues {
    BACKGROUND_QUEUES.with(|queues| {
        *queues.get_or_init(|| {
            let executor = glommio::executor();
            let queue = |name, shares| {
                executor.create_task_queue(
                    glommio::Shares::Static(shares),
                    glommio::Latency::NotImportant,
                    name,
                )
            };
            BackgroundQueues { flush: queue("flush", 250), compaction: queue("compaction", 50) }
        })
    })
}

fn spawn_into(task: impl std::future::Future<Output = ()> + 'static, queue: glommio::TaskQueueHandle) {
    match glommio::spawn_local_into(task, queue) {
        Ok(task) => task.detach(),
        Err(error) => panic!("spawning a background task: {error}"),
    };
}

/// Entries per distinct key across `tables` (`compaction::redundancy`). A table answering for
/// part of its tokens counts its share of the entries, but its sketch is the whole table's:
/// the estimate only errs high, towards an early merge, and only after a merge was cut short.
fn table_redundancy<S: Storage>(tables: &[Rc<Table<S>>]) -> f64 {
    compaction::redundancy(
        tables.iter().map(|table| (table.entry_count(), table.reader.footer.sketch.as_ref())),
    )
}

/// Whether `tables` take more of the disk than `compaction::SPACE_STALL_FACTOR` times what
/// their live entries would. A merge's inputs take all their bytes until they go.
fn past_space_limit<S: Storage>(tables: &[Rc<Table<S>>]) -> bool {
    let on_disk: u64 = tables.iter().map(|table| table.reader.size).sum();
    let answering: u64 = tables.iter().map(|table| table.size()).sum();
    let live = answering as f64 / table_redundancy(tables);
    on_disk as f64 > compaction::SPACE_STALL_FACTOR * live
}

/// The runs of `tables` (`compaction::runs`) as ranges of positions.
fn table_runs<S: Storage>(tables: &[Rc<Table<S>>]) -> Vec<std::ops::Range<usize>> {
    compaction::runs(&tables.iter().map(|table| table.tokens).collect::<Vec<_>>())
}

/// The bytes each run of `tables` would have a merge read.
fn run_sizes<S: Storage>(tables: &[Rc<Table<S>>]) -> Vec<u64> {
    table_runs(tables).into_iter().map(|run| tables[run].iter().map(|table| table.size()).sum()).collect()
}

fn is_no_space(error: &TableError) -> bool {
    matches!(error, TableError::Io { no_space: true, .. })
}

async fn flusher<S: Storage>(running: Running<S>) {
    let inner = &running.0;
    loop {
        let listener = inner.flush_wanted.listen();
        if inner.closing.get() {
            return;
        }
        let Some(memtable) = inner.immutable.borrow().clone() else {
            listener.await;
            continue;
        };
        // Nothing whose log write failed may reach a table.
        if inner.wal.wait_acked(memtable.max_seq()).await.is_err() {
            return;
        }
        match inner.flush_memtable(&memtable).await {
            Ok(()) => {
                if inner.no_space.replace(false) {
                    tracing::info!("{}: space available again; accepting writes", inner.dir.display());
                }
                *inner.immutable.borrow_mut() = None;
                inner.installed.notify_all();
                let flushed_seq = inner.manifest.borrow().flushed_seq;
                if let Err(error) = inner.wal.release_through(flushed_seq).await {
                    tracing::error!("releasing log segments: {error}");
                }
                inner.maybe_seal_memtable();
            }
            Err(error) if is_no_space(&error) => {
                if !inner.no_space.replace(true) {
                    tracing::warn!("{error}; refusing writes until there is space");
                    inner.installed.notify_all();
                }
                glommio::timer::sleep(NO_SPACE_RETRY_INTERVAL).await;
            }
            Err(error) => {
                tracing::error!("flush failed: {error}; refusing writes until restart");
                inner.count_corruption(&error);
                inner.fail(&error);
                return;
            }
        }
    }
}

async fn compactor<S: Storage>(running: Running<S>) {
    let inner = &running.0;
    loop {
        let listener = inner.installed.listen();
        if inner.closing.get() {
            return;
        }
        let permit = inner.compaction_lock.acquire_permit(1).await;
        let tables = inner.tables.borrow().clone();
        let runs = table_runs(&tables);
        let redundancy = table_redundancy(&tables);
        let base = inner.options.memtable_size_max() as u64;
        let Some(picked) = compaction::pick(&run_sizes(&tables), base, redundancy) else {
            drop(permit);
            listener.await;
            continue;
        };
        let positions = runs[picked.start].start..runs[picked.end - 1].end;
        let compacted = inner.compact(positions).await;
        drop(permit);
        match compacted {
            Ok(()) => {}
            Err(error) if is_no_space(&error) => {
                glommio::timer::sleep(COMPACTION_RETRY_INTERVAL).await;
            }
            Err(error @ TableError::Corrupt { .. }) => {
                // Damage in an input: merging it would spread or drop it. Reads of the
                // damaged block keep failing loudly; compaction waits for an operator.
                inner.count_corruption(&error);
                tracing::warn!("compaction stopped: {error}");
                return;
            }
            Err(error) => {
                tracing::error!("compaction failed: {error}; refusing writes until restart");
                inner.fail(&error);
                return;
            }
        }
    }
}
