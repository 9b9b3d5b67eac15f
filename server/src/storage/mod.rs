//! The one narrow interface through which the server touches a disk.
//!
//! Production uses [`dma::DmaStorage`] (glommio `DmaFile`, O_DIRECT through io_uring); tests
//! use [`sim::SimStorage`], which injects errors and, at a simulated crash, drops whatever was
//! not made durable: file data not covered by `sync_data` and directory entries not covered by
//! `sync_dir`. `kill -9` cannot show a missing `fdatasync` (O_DIRECT data outlives the process),
//! so the simulated crash is how the tests prove the durability path.

pub mod dma;
pub mod sim;

use std::io;
use std::path::Path;

/// Every write covers whole blocks of this size at block-aligned offsets, as O_DIRECT demands.
pub const BLOCK_SIZE: usize = 4096;

/// Rounds `size` up to a whole number of blocks.
pub const fn block_align_up(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64
}

/// Replaces `dir/name` with `bytes` (a whole number of blocks) atomically and durably: the
/// bytes go to `dir/name.tmp`, which is synced, renamed over `name`, and the directory is
/// synced. A crash at any point leaves the old file or the new one, never a mix.
pub async fn replace_file<S: Storage>(storage: &S, dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    match storage.remove(&tmp).await {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let file = storage.create(&tmp).await?;
    let written = async {
        file.write_at(0, bytes).await?;
        file.sync_data().await
    }
    .await;
    let _ = file.close().await;
    written?;
    storage.rename(&tmp, &dir.join(name)).await?;
    storage.sync_dir(dir).await
}

/// Whether an I/O error means the file system is full.
pub fn is_no_space(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::ENOSPC) || error.kind() == io::ErrorKind::StorageFull
}

/// A file system holding one shard's files. All methods run on the shard's own thread.
#[allow(async_fn_in_trait)] // Shard-local: futures never cross threads, so no Send bound.
pub trait Storage: Clone + 'static {
    type File: StorageFile;

    /// Creates `path` and its parents; a no-op when it exists.
    async fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names of the files in directory `path`, in no particular order.
    async fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing.
    async fn open(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates a new, empty file; fails when it exists. The directory entry is durable only
    /// after [`Storage::sync_dir`] on its directory.
    async fn create(&self, path: &Path) -> io::Result<Self::File>;
    /// Makes the directory's entries durable.
    async fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing `to` if it exists; durable after [`Storage::sync_dir`].
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file's name; open handles keep working.
    async fn remove(&self, path: &Path) -> io::Result<()>;
    /// Gives the file `from` a second name `to` (same file system); durable after
    /// [`Storage::sync_dir`] on `to`'s directory.
    async fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
}

/// Copies the file `from` to the new file `to`, synced (the caller syncs `to`'s directory).
pub async fn copy_file<S: Storage>(storage: &S, from: &Path, to: &Path) -> io::Result<()> {
    let source = storage.open(from).await?;
    let read = async {
        let size = source.size().await?;
        source.read_at(0, size as usize).await
    }
    .await;
    let _ = source.close().await;
    let mut bytes = read?;
    let size = bytes.len() as u64;
    bytes.resize(block_align_up(size) as usize, 0);
    let target = storage.create(to).await?;
    let written = async {
        target.write_at(0, &bytes).await?;
        target.truncate(size).await?;
        target.sync_data().await
    }
    .await;
    let _ = target.close().await;
    written
}

/// One open file. Writes are whole blocks at block-aligned offsets.
#[allow(async_fn_in_trait)]
pub trait StorageFile: 'static {
    /// Reads up to `size` bytes at `offset`; fewer only at the end of the file.
    async fn read_at(&self, offset: u64, size: usize) -> io::Result<Vec<u8>>;
    /// Writes all of `data` at `offset`. Both are multiples of [`BLOCK_SIZE`].
    async fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    async fn sync_data(&self) -> io::Result<()>;
    /// Reserves `size` bytes of space, so that later writes need no allocation.
    async fn allocate(&self, size: u64) -> io::Result<()>;
    async fn truncate(&self, size: u64) -> io::Result<()>;
    async fn size(&self) -> io::Result<u64>;
    async fn close(self) -> io::Result<()>;
}
