//! Production storage: glommio `DmaFile`s, O_DIRECT reads and writes through io_uring.

use std::io;
use std::path::{Path, PathBuf};

use glommio::io::{Directory, DmaFile, OpenOptions};

use super::{Storage, StorageFile, BLOCK_SIZE};

/// Files on a real disk through glommio. Must be created on the thread that uses it.
#[derive(Clone, Debug)]
pub struct DmaStorage {
    _private: (),
}

impl DmaStorage {
    /// `probe_file` must be an existing file holding at least one block. glommio decides
    /// once per thread and device whether the device supports polled I/O, by reading the first
    /// file opened; a fresh empty file makes it answer "yes" wrongly, after which every read
    /// on that device fails with EOPNOTSUPP. Opening a file with data first decides it right.
    pub async fn new(probe_file: &Path) -> io::Result<DmaStorage> {
        let probe = DmaFile::open(probe_file).await.map_err(io::Error::from)?;
        let _ = probe.read_at(0, BLOCK_SIZE).await.map_err(io::Error::from)?;
        probe.close().await.map_err(io::Error::from)?;
        Ok(DmaStorage { _private: () })
    }
}

pub struct DmaStorageFile {
    file: DmaFile,
    path: PathBuf,
}

impl Storage for DmaStorage {
    type File = DmaStorageFile;

    async fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        // glommio has no asynchronous mkdir: the blocking pool runs it, off the executor.
        let path = path.to_path_buf();
        glommio::executor().spawn_blocking(move || std::fs::create_dir_all(path)).await
    }

    async fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        // As above: no asynchronous readdir.
        let path = path.to_path_buf();
        glommio::executor()
            .spawn_blocking(move || {
                let mut names = Vec::new();
                for entry in std::fs::read_dir(path)? {
                    if let Some(name) = entry?.file_name().to_str() {
                        names.push(name.to_string());
                    }
                }
                Ok(names)
            })
            .await
    }

    async fn open(&self, path: &Path) -> io::Result<DmaStorageFile> {
        let file = OpenOptions::new().read(true).write(true).dma_open(path).await.map_err(io::Error::from)?;
        Ok(DmaStorageFile { file, path: path.to_path_buf() })
    }

    async fn create(&self, path: &Path) -> io::Result<DmaStorageFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(path)
            .await
            .map_err(io::Error::from)?;
        Ok(DmaStorageFile { file, path: path.to_path_buf() })
    }

    async fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let dir = Directory::open(path).await.map_err(io::Error::from)?;
        dir.sync().await.map_err(io::Error::from)?;
        dir.close().await.map_err(io::Error::from)
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        glommio::io::rename(from, to).await.map_err(io::Error::from)
    }

    async fn remove(&self, path: &Path) -> io::Result<()> {
        glommio::io::remove(path).await.map_err(io::Error::from)
    }

    async fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        // glommio has no asynchronous link: the blocking pool runs it, off the executor.
        let (from, to) = (from.to_path_buf(), to.to_path_buf());
        glommio::executor().spawn_blocking(move || std::fs::hard_link(from, to)).await
    }
}

impl StorageFile for DmaStorageFile {
    async fn read_at(&self, offset: u64, size: usize) -> io::Result<Vec<u8>> {
        let read = self.file.read_at(offset, size).await.map_err(io::Error::from)?;
        Ok(read.to_vec())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(offset % BLOCK_SIZE as u64, 0);
        debug_assert_eq!(data.len() % BLOCK_SIZE, 0);
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            let mut buffer = self.file.alloc_dma_buffer(rest.len());
            buffer.as_bytes_mut().copy_from_slice(rest);
            let written = self.file.write_at(buffer, offset + done as u64).await.map_err(io::Error::from)?;
            if written == 0 || written % BLOCK_SIZE != 0 {
                // A write that makes no progress, or stops mid-block, leaves a hole the
                // caller cannot explain: a failed write (which stops the shard's writes).
                let message = format!(
                    "{}: short write of {written} of {} bytes at offset {}",
                    self.path.display(),
                    rest.len(),
                    offset + done as u64
                );
                return Err(io::Error::new(io::ErrorKind::WriteZero, message));
            }
            // A short write is how a filling file system answers first; writing the rest
            // gets the reason (ENOSPC), or succeeds.
            done += written;
        }
        Ok(())
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.file.fdatasync().await.map_err(io::Error::from)
    }

    async fn allocate(&self, size: u64) -> io::Result<()> {
        self.file.pre_allocate(size, false).await.map_err(io::Error::from)
    }

    async fn truncate(&self, size: u64) -> io::Result<()> {
        self.file.truncate(size).await.map_err(io::Error::from)
    }

    async fn size(&self) -> io::Result<u64> {
        self.file.file_size().await.map_err(io::Error::from)
    }

    async fn close(self) -> io::Result<()> {
        self.file.close().await.map_err(io::Error::from)
    }
}
