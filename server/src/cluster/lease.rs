//! Version-vector counters that are never reused, across restarts and power losses.
//!
//! A node is the actor of the version-vector entries its shards write, and a dot (actor,
//! counter) must name one event forever: a counter handed out twice lets a new write look
//! like one that replicas already have, and it is silently dropped (Riak's "kv679"). The log's
//! sequence numbers cannot serve: under `--fsync never` a power loss may take the newest
//! records, and their numbers would be handed out again.
//!
//! So each shard leases counters in blocks: before handing out any counter above the durable
//! bound, it raises the bound by a block and makes the new bound durable (atomic file
//! replacement). A restart starts above the durable bound, skipping whatever of the last block
//! was unused, so vectors never go back and grow only by the counters actually used.
//!
//! File `LEASE` (4096 bytes): magic `KVDLEASE`, format version u32 (1), bound u64, CRC32C of
//! the 20 bytes before it, zero padding (checked). Integers little-endian.
#![deny(clippy::indexing_slicing)]

use std::cell::Cell;
use std::io;
use std::path::{Path, PathBuf};

use crate::le::{u32_at, u64_at};
use crate::storage::{Storage, StorageFile, BLOCK_SIZE};

pub const LEASE_FILE: &str = "LEASE";
const LEASE_MAGIC: [u8; 8] = *b"KVDLEASE";
const LEASE_FORMAT_VERSION: u32 = 1;
/// Counters reserved per durable write of the bound.
pub const LEASE_BLOCK: u64 = 1 << 20;

/// The LEASE file's bytes for `bound` (public for the fuzz corpus).
pub fn encode(bound: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(BLOCK_SIZE);
    bytes.extend_from_slice(&LEASE_MAGIC);
    bytes.extend_from_slice(&LEASE_FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&bound.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.resize(BLOCK_SIZE, 0);
    bytes
}

/// The bound a LEASE file holds (public for the fuzz target).
pub fn decode(bytes: &[u8]) -> Result<u64, String> {
    if bytes.get(..8) != Some(&LEASE_MAGIC[..]) {
        return Err("bad magic".into());
    }
    let crc = u32_at(bytes, 20).ok_or("cut short")?;
    if Some(crc) != bytes.get(..20).map(crc32c::crc32c) {
        return Err("checksum mismatch".into());
    }
    if bytes.len() != BLOCK_SIZE || bytes.get(24..).is_none_or(|padding| padding.iter().any(|&b| b != 0)) {
        return Err("padding is not zero".into());
    }
    let version = u32_at(bytes, 8).ok_or("cut short")?;
    if version != LEASE_FORMAT_VERSION {
        return Err(format!("format version {version}, expected {LEASE_FORMAT_VERSION}"));
    }
    Ok(u64_at(bytes, 12).ok_or("cut short")?)
}

/// One shard's counters. All on the shard's thread.
pub struct CounterLease<S: Storage> {
    storage: S,
    dir: PathBuf,
    block: u64,
    /// The next counter to hand out.
    next: Cell<u64>,
    /// The highest counter that may be handed out: durable.
    bound: Cell<u64>,
    /// Held while a new bound is made durable, so that concurrent callers wait for one
    /// file replacement instead of racing on the same temporary file.
    raising: glommio::sync::Semaphore,
}

impl<S: Storage> CounterLease<S> {
    /// Opens the lease in `dir` (a fresh one starts at 1). The first counter handed out is
    /// above every counter a previous run could have handed out.
    pub async fn open(storage: S, dir: &Path, block: u64) -> io::Result<CounterLease<S>> {
        assert!(block > 0);
        let path = dir.join(LEASE_FILE);
        let bound = match storage.open(&path).await {
            Ok(file) => {
                let bytes = file.read_at(0, BLOCK_SIZE + 1).await;
                let _ = file.close().await;
                decode(&bytes?).map_err(|detail| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {detail}", path.display()))
                })?
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => 0,
            Err(error) => return Err(error),
        };
        let lease = CounterLease {
            storage,
            dir: dir.to_path_buf(),
            block,
            next: Cell::new(bound + 1),
            bound: Cell::new(bound),
            raising: glommio::sync::Semaphore::new(1),
        };
        Ok(lease)
    }

    /// The durable bound: no counter above it was ever handed out.
    pub fn bound(&self) -> u64 {
        self.bound.get()
    }

    /// A counter never handed out before. Makes a new bound durable first when the block is
    /// used up (one atomic file replacement per `block` counters).
    pub async fn next(&self) -> io::Result<u64> {
        while self.next.get() > self.bound.get() {
            let _raising = self
                .raising
                .acquire_permit(1)
                .await
                .map_err(|_| io::Error::other("the counter lease is closed"))?;
            if self.next.get() <= self.bound.get() {
                break; // another caller raised it meanwhile
            }
            let bound = self.next.get() + self.block - 1;
            crate::storage::replace_file(&self.storage, &self.dir, LEASE_FILE, &encode(bound)).await?;
            self.bound.set(bound.max(self.bound.get()));
        }
        let counter = self.next.get();
        debug_assert!(counter <= self.bound.get());
        self.next.set(counter + 1);
        Ok(counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::storage::sim::{Faults, SimStorage};

    #[test]
    fn encoding_roundtrips_and_every_bit_flip_is_detected() {
        let bytes = encode(77);
        assert_eq!(decode(&bytes), Ok(77));
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 1 << (position % 8);
            assert!(decode(&damaged).is_err(), "flip at {position}");
        }
    }

    /// Counters handed out before a restart or a power loss (with failing writes and syncs
    /// on the way) are never handed out again.
    #[test]
    fn counters_are_never_reused_across_restarts_and_power_losses() {
        futures_lite::future::block_on(async {
            for seed in 0..200 {
                let storage = SimStorage::new(seed);
                let mut rng = Rng::new(seed);
                let dir = Path::new("/data/shard-0");
                let mut highest_handed_out = 0;
                for _cycle in 0..6 {
                    let lease = CounterLease::open(storage.clone(), dir, 1 + rng.below(5))
                        .await
                        .unwrap_or_else(|error| panic!("seed {seed}: open: {error}"));
                    if rng.below(2) == 0 {
                        storage.set_faults(Faults {
                            write_error_per_million: 100_000,
                            sync_error_per_million: 100_000,
                        });
                    }
                    for _ in 0..rng.below(30) {
                        match lease.next().await {
                            Ok(counter) => {
                                assert!(
                                    counter > highest_handed_out,
                                    "seed {seed}: counter {counter} reused"
                                );
                                highest_handed_out = counter;
                            }
                            Err(_) => break, // a failed renewal hands out nothing
                        }
                    }
                    if rng.below(2) == 0 {
                        storage.crash();
                    }
                    storage.set_faults(Faults::default());
                }
            }
        });
    }
}
