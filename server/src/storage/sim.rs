//! Simulated storage for tests: an in-memory file system that injects I/O errors and
//! models a power loss.
//!
//! Each file keeps the bytes the process sees and the bytes a power loss would leave. A
//! successful `sync_data` makes the first equal to the second. [`SimStorage::crash`] keeps
//! the durable bytes plus a random prefix of the unsynced operations, in order, with the
//! boundary write torn at a block boundary, and forgets files whose directory entry was not
//! synced. Handles opened before a crash fail afterwards, like the dead process's would.
//!
//! Files are inodes with names, as on Unix: a rename or a removal changes names only, so an
//! open handle keeps reading its file; a directory's names become durable all at once with
//! `sync_dir`, and a crash restores the durable names (a rename not yet synced is undone).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::{Storage, StorageFile, BLOCK_SIZE};
use crate::rng::Rng;

/// Which operations fail, and how often.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub write_error_per_million: u32,
    pub sync_error_per_million: u32,
}

#[derive(Debug, Clone)]
enum PendingOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen { size: u64 },
}

#[derive(Debug, Default, Clone)]
struct SimFile {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<PendingOp>,
    /// Bytes reserved by `allocate`: writes below it need no new space.
    allocated: u64,
}

impl SimFile {
    fn space(&self) -> u64 {
        (self.data.len() as u64).max(self.allocated)
    }
}

fn no_space() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

fn apply(data: &mut Vec<u8>, op: &PendingOp) {
    match op {
        PendingOp::Write { offset, data: bytes } => {
            let end = *offset as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*offset as usize..end].copy_from_slice(bytes);
        }
        PendingOp::SetLen { size } => data.resize(*size as usize, 0),
    }
}

#[derive(Debug)]
struct SimState {
    /// Every file that still has a name (current or durable) or an open handle.
    inodes: BTreeMap<u64, SimFile>,
    next_inode: u64,
    /// The names the process sees.
    names: BTreeMap<PathBuf, u64>,
    /// The names a crash leaves: each directory's names as of its last `sync_dir`.
    durable_names: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    faults: Faults,
    /// Bytes the file system holds at most (data or allocation of files that still have a
    /// name or an open handle); `None` for unlimited.
    capacity: Option<u64>,
    rng: Rng,
    /// Bumped by every crash; handles from an earlier generation are dead.
    generation: u64,
    write_count: u64,
    sync_count: u64,
    injected_error_count: u64,
    /// Whether writes keep what a power loss would leave (off: [`SimStorage::without_crashes`]).
    crashes: bool,
}

/// The simulated file system; clones share it. A clone made before a crash belongs to the
/// dead process: its operations fail, so that a store abandoned at a crash cannot touch the
/// files of the one recovered after it. Only the clone [`SimStorage::crash`] was called
/// on lives on.
#[derive(Debug, Clone)]
pub struct SimStorage {
    state: Rc<RefCell<SimState>>,
    generation: std::cell::Cell<u64>,
}

impl SimStorage {
    pub fn new(seed: u64) -> SimStorage {
        let state = SimState {
            inodes: BTreeMap::new(),
            next_inode: 1,
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            dirs: BTreeSet::new(),
            faults: Faults::default(),
            capacity: None,
            rng: Rng::new(seed),
            generation: 0,
            write_count: 0,
            sync_count: 0,
            injected_error_count: 0,
            crashes: true,
        };
        SimStorage { state: Rc::new(RefCell::new(state)), generation: std::cell::Cell::new(0) }
    }

    /// A file system that cannot crash, for counting what the server's own code costs: a
    /// write lands in the bytes the process sees and nowhere else (no record of unsynced
    /// operations, no durable copy), so a write costs one copy, as a write to the kernel does,
    /// and a sync nothing. [`SimStorage::crash`] panics on it.
    pub fn without_crashes(seed: u64) -> SimStorage {
        let storage = SimStorage::new(seed);
        storage.state.borrow_mut().crashes = false;
        storage
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state.borrow_mut().faults = faults;
    }

    /// Limits the space files may take (a small disk); writes and allocations beyond it fail
    /// with ENOSPC. Removed files free their space at once (no handle outlives the test's
    /// interest in it).
    pub fn set_capacity(&self, capacity: Option<u64>) {
        self.state.borrow_mut().capacity = capacity;
    }

    /// Bytes the files that still have a name take.
    pub fn used_space(&self) -> u64 {
        let state = self.state.borrow();
        state.names.values().filter_map(|inode| state.inodes.get(inode)).map(SimFile::space).sum()
    }

    /// Whether `extra` more bytes fit.
    fn has_room(&self, extra: u64) -> bool {
        let capacity = self.state.borrow().capacity;
        capacity.is_none_or(|capacity| self.used_space() + extra <= capacity)
    }

    /// How many errors were injected so far.
    pub fn injected_error_count(&self) -> u64 {
        self.state.borrow().injected_error_count
    }

    pub fn sync_count(&self) -> u64 {
        self.state.borrow().sync_count
    }

    /// A power loss: everything not made durable may vanish, a random prefix of it survives.
    /// Faults are cleared, as a restarted machine has a healthy disk until told otherwise.
    pub fn crash(&self) {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        assert!(state.crashes, "crash on a storage made without_crashes");
        state.generation += 1;
        self.generation.set(state.generation);
        state.faults = Faults::default();
        state.names = state.durable_names.clone();
        let live: BTreeSet<u64> = state.names.values().copied().collect();
        state.inodes.retain(|inode, _| live.contains(inode));
        for file in state.inodes.values_mut() {
            let mut data = std::mem::take(&mut file.durable);
            let kept = state.rng.below(file.pending.len() as u64 + 1) as usize;
            for op in &file.pending[..kept] {
                apply(&mut data, op);
            }
            if let Some(PendingOp::Write { offset, data: bytes }) = file.pending.get(kept) {
                // The write in flight at the crash: a prefix of its blocks reached the disk.
                let block_count = bytes.len() / BLOCK_SIZE;
                let torn = state.rng.below(block_count as u64 + 1) as usize * BLOCK_SIZE;
                apply(&mut data, &PendingOp::Write { offset: *offset, data: bytes[..torn].to_vec() });
            }
            file.pending.clear();
            file.durable = data.clone();
            file.data = data;
        }
    }

    /// The bytes the process currently sees in `path` (for tests that corrupt files).
    pub fn file_data(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state.borrow();
        state.names.get(path).and_then(|inode| state.inodes.get(inode)).map(|file| file.data.clone())
    }

    /// Every file the process sees, with its bytes.
    pub fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        self.file_paths()
            .into_iter()
            .filter_map(|path| Some((path.clone(), self.file_data(&path)?)))
            .collect()
    }

    /// A new file system holding `files`, all durable.
    pub fn from_snapshot(seed: u64, files: &[(PathBuf, Vec<u8>)]) -> SimStorage {
        let storage = SimStorage::new(seed);
        {
            let mut state = storage.state.borrow_mut();
            for (path, data) in files {
                let inode = state.next_inode;
                state.next_inode += 1;
                let file =
                    SimFile { data: data.clone(), durable: data.clone(), pending: Vec::new(), allocated: 0 };
                state.inodes.insert(inode, file);
                state.names.insert(path.clone(), inode);
                state.durable_names.insert(path.clone(), inode);
                if let Some(dir) = path.parent() {
                    state.dirs.insert(dir.to_path_buf());
                }
            }
        }
        storage
    }

    /// The paths of every file the process sees, in order.
    pub fn file_paths(&self) -> Vec<PathBuf> {
        self.state.borrow().names.keys().cloned().collect()
    }

    /// Overwrites bytes of `path` durably, as bit rot or a bad sector would.
    pub fn corrupt(&self, path: &Path, offset: usize, bytes: &[u8]) {
        let mut state = self.state.borrow_mut();
        let inode = *state.names.get(path).expect("corrupt: no such file");
        let file = state.inodes.get_mut(&inode).expect("corrupt: no such file");
        let op = PendingOp::Write { offset: offset as u64, data: bytes.to_vec() };
        apply(&mut file.data, &op);
        apply(&mut file.durable, &op);
    }

    fn handle(&self, path: &Path, inode: u64) -> SimFileHandle {
        SimFileHandle {
            storage: self.clone(),
            path: path.to_path_buf(),
            inode,
            generation: self.generation.get(),
        }
    }

    fn check_alive(&self) -> io::Result<()> {
        if self.generation.get() != self.state.borrow().generation {
            return Err(io::Error::other("simulated crash: storage handle from before the crash"));
        }
        Ok(())
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display()))
}

impl Storage for SimStorage {
    type File = SimFileHandle;

    async fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check_alive()?;
        self.state.borrow_mut().dirs.insert(path.to_path_buf());
        Ok(())
    }

    async fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.check_alive()?;
        let state = self.state.borrow();
        let names = state
            .names
            .keys()
            .filter(|file| file.parent() == Some(path))
            .filter_map(|file| file.file_name()?.to_str().map(str::to_string))
            .collect();
        Ok(names)
    }

    async fn open(&self, path: &Path) -> io::Result<SimFileHandle> {
        self.check_alive()?;
        let inode = *self.state.borrow().names.get(path).ok_or_else(|| not_found(path))?;
        Ok(self.handle(path, inode))
    }

    async fn create(&self, path: &Path) -> io::Result<SimFileHandle> {
        self.check_alive()?;
        let mut state = self.state.borrow_mut();
        if state.names.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}: exists", path.display())));
        }
        let inode = state.next_inode;
        state.next_inode += 1;
        state.inodes.insert(inode, SimFile::default());
        state.names.insert(path.to_path_buf(), inode);
        drop(state);
        Ok(self.handle(path, inode))
    }

    async fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.check_alive()?;
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        state.durable_names.retain(|name, _| name.parent() != Some(path));
        for (name, inode) in &state.names {
            if name.parent() == Some(path) {
                state.durable_names.insert(name.clone(), *inode);
            }
        }
        Ok(())
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check_alive()?;
        let mut state = self.state.borrow_mut();
        let inode = state.names.remove(from).ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_path_buf(), inode);
        Ok(())
    }

    async fn remove(&self, path: &Path) -> io::Result<()> {
        self.check_alive()?;
        let mut state = self.state.borrow_mut();
        state.names.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    async fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check_alive()?;
        let mut state = self.state.borrow_mut();
        let inode = *state.names.get(from).ok_or_else(|| not_found(from))?;
        if state.names.contains_key(to) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, to.display().to_string()));
        }
        state.names.insert(to.to_path_buf(), inode);
        Ok(())
    }
}

/// An open simulated file.
#[derive(Debug)]
pub struct SimFileHandle {
    storage: SimStorage,
    path: PathBuf,
    inode: u64,
    generation: u64,
}

impl SimFileHandle {
    fn with_file<T>(&self, f: impl FnOnce(&mut SimFile, &mut Rng, Faults) -> io::Result<T>) -> io::Result<T> {
        let mut state = self.storage.state.borrow_mut();
        let state = &mut *state;
        if state.generation != self.generation {
            return Err(io::Error::other("simulated crash: handle from before the crash"));
        }
        let file = state.inodes.get_mut(&self.inode).ok_or_else(|| not_found(&self.path))?;
        f(file, &mut state.rng, state.faults)
    }

    fn count_injected(&self) {
        self.storage.state.borrow_mut().injected_error_count += 1;
    }
}

impl StorageFile for SimFileHandle {
    async fn read_at(&self, offset: u64, size: usize) -> io::Result<Vec<u8>> {
        self.with_file(|file, _, _| {
            let start = (offset as usize).min(file.data.len());
            let end = start.saturating_add(size).min(file.data.len());
            Ok(file.data[start..end].to_vec())
        })
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        assert_eq!(offset % BLOCK_SIZE as u64, 0, "unaligned write offset");
        assert_eq!(data.len() % BLOCK_SIZE, 0, "unaligned write size");
        let growth =
            self.with_file(|file, _, _| Ok((offset + data.len() as u64).saturating_sub(file.space())))?;
        if !self.storage.has_room(growth) {
            return Err(no_space());
        }
        let crashes = self.storage.state.borrow().crashes;
        let result = self.with_file(|file, rng, faults| {
            if rng.chance(faults.write_error_per_million) {
                return Err(io::Error::other("injected write error"));
            }
            if !crashes {
                let end = offset as usize + data.len();
                if file.data.len() < end {
                    file.data.resize(end, 0);
                }
                file.data[offset as usize..end].copy_from_slice(data);
                return Ok(());
            }
            let op = PendingOp::Write { offset, data: data.to_vec() };
            apply(&mut file.data, &op);
            file.pending.push(op);
            Ok(())
        });
        self.storage.state.borrow_mut().write_count += 1;
        if result.is_err() {
            self.count_injected();
        }
        result
    }

    async fn sync_data(&self) -> io::Result<()> {
        let result = self.with_file(|file, rng, faults| {
            if rng.chance(faults.sync_error_per_million) {
                // As on Linux after a failed fdatasync, nothing tells what reached the disk:
                // the unsynced operations stay unsynced, so a crash may drop them.
                return Err(io::Error::other("injected fdatasync error"));
            }
            for op in file.pending.drain(..) {
                apply(&mut file.durable, &op);
            }
            Ok(())
        });
        self.storage.state.borrow_mut().sync_count += 1;
        if result.is_err() {
            self.count_injected();
        }
        result
    }

    async fn allocate(&self, size: u64) -> io::Result<()> {
        // The zeros are implied: reads past the end return nothing, which the log treats
        // like zeros (its end). Not materialising them keeps crash copies small; the space
        // is reserved all the same.
        let growth = self.with_file(|file, _, _| Ok(size.saturating_sub(file.space())))?;
        if !self.storage.has_room(growth) {
            return Err(no_space());
        }
        self.with_file(|file, _, _| {
            file.allocated = file.allocated.max(size);
            Ok(())
        })
    }

    async fn truncate(&self, size: u64) -> io::Result<()> {
        self.with_file(|file, _, _| {
            let op = PendingOp::SetLen { size };
            apply(&mut file.data, &op);
            file.pending.push(op);
            Ok(())
        })
    }

    async fn size(&self) -> io::Result<u64> {
        self.with_file(|file, _, _| Ok(file.data.len() as u64))
    }

    async fn close(self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(byte: u8) -> Vec<u8> {
        vec![byte; BLOCK_SIZE]
    }

    #[test]
    fn crash_keeps_synced_data_and_drops_unsynced_entries() {
        futures_lite::future::block_on(async {
            let storage = SimStorage::new(1);
            let dir = Path::new("/d");
            let synced = storage.create(&dir.join("a")).await.expect("create");
            synced.write_at(0, &block(1)).await.expect("write");
            synced.sync_data().await.expect("sync");
            storage.sync_dir(dir).await.expect("sync dir");
            let unsynced_entry = storage.create(&dir.join("b")).await.expect("create");
            unsynced_entry.write_at(0, &block(2)).await.expect("write");
            unsynced_entry.sync_data().await.expect("sync");
            storage.crash();
            assert_eq!(storage.file_data(&dir.join("a")), Some(block(1)));
            assert_eq!(storage.file_data(&dir.join("b")), None);
            assert!(synced.read_at(0, 1).await.is_err(), "handles die with the crash");
        });
    }

    #[test]
    fn crash_keeps_a_prefix_of_unsynced_writes() {
        futures_lite::future::block_on(async {
            for seed in 0..50 {
                let storage = SimStorage::new(seed);
                let path = Path::new("/d/f");
                let file = storage.create(path).await.expect("create");
                storage.sync_dir(Path::new("/d")).await.expect("sync dir");
                for i in 0..4u8 {
                    file.write_at(u64::from(i) * BLOCK_SIZE as u64, &block(i + 1)).await.expect("write");
                }
                storage.crash();
                let data = storage.file_data(path).expect("file survives");
                // Whatever survived is a prefix: no block survives after a lost one.
                let blocks: Vec<u8> = data.chunks(BLOCK_SIZE).map(|b| b[0]).collect();
                let expected: Vec<u8> = (1..=blocks.len() as u8).collect();
                assert_eq!(blocks, expected, "seed {seed}");
            }
        });
    }
}
