//! The CLUSTER file: this node's ring acceptor (the committed ring, the highest promise, the
//! accepted proposal) as JSON, padded with spaces to whole blocks and replaced atomically
//! through `Storage` (`replace_file`: temporary file, sync, rename, directory sync), so a
//! simulated power loss or I/O error reaches it as it reaches the log. Trailing spaces keep
//! it plain JSON, readable by every earlier version; the first version's file (members,
//! replica count and partition bits only) is read too.

use std::io;
use std::path::{Path, PathBuf};

use super::ring_state::{RingAcceptor, RingState};
use crate::storage::{block_align_up, replace_file, Storage, StorageFile};

pub const CLUSTER_FILE: &str = "CLUSTER";
/// A ring file larger than this is refused (a ring of 2^16 partitions and a few hundred
/// members is far below it).
const RING_FILE_SIZE_MAX: u64 = 64 << 20;

/// The membership file of the first version (before rings changed).
#[derive(Debug, Clone, serde::Deserialize)]
struct FormedFile {
    members: Vec<String>,
    replica_count: usize,
    partition_bits: u32,
}

/// The file's bytes for `acceptor`: JSON, then spaces up to a whole number of blocks.
pub fn encode(acceptor: &RingAcceptor) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(acceptor).unwrap_or_else(|_| unreachable!("a ring encodes"));
    bytes.push(b'\n');
    bytes.resize(block_align_up(bytes.len() as u64) as usize, b' ');
    bytes
}

/// The acceptor a ring file holds (trailing spaces and zeros ignored).
pub fn decode(bytes: &[u8]) -> Result<RingAcceptor, String> {
    let end = bytes.iter().rposition(|&b| !matches!(b, b' ' | b'\n' | 0)).map_or(0, |last| last + 1);
    let json = bytes.get(..end).unwrap_or_default();
    let acceptor = match serde_json::from_slice::<RingAcceptor>(json) {
        Ok(acceptor) => acceptor,
        Err(_) => {
            let file: FormedFile = serde_json::from_slice(json).map_err(|error| error.to_string())?;
            RingAcceptor::new(RingState::formed(file.members, file.replica_count, file.partition_bits)?)
        }
    };
    acceptor.committed.ring()?;
    Ok(acceptor)
}

/// Reads `dir/CLUSTER`: `None` when there is none (the cluster is not formed yet).
pub async fn load<S: Storage>(storage: &S, dir: &Path) -> io::Result<Option<RingAcceptor>> {
    let path = dir.join(CLUSTER_FILE);
    let file = match storage.open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let read = async {
        let size = file.size().await?;
        if size > RING_FILE_SIZE_MAX {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{size} bytes")));
        }
        file.read_at(0, size as usize).await
    }
    .await;
    let _ = file.close().await;
    let acceptor = decode(&read?).map_err(|detail| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {detail}", path.display()))
    })?;
    Ok(Some(acceptor))
}

/// Writes of the ring file, one at a time.
pub struct RingFile<S: Storage> {
    storage: S,
    dir: PathBuf,
    /// Held while the file is replaced, so that two saves never race on the temporary file.
    saving: glommio::sync::Semaphore,
}

impl<S: Storage> RingFile<S> {
    pub fn new(storage: S, dir: &Path) -> RingFile<S> {
        RingFile { storage, dir: dir.to_path_buf(), saving: glommio::sync::Semaphore::new(1) }
    }

    /// Makes the acceptor `current()` returns durable. It is read once this save's turn
    /// comes, so a save never writes a state older than the one its caller made.
    pub async fn save(&self, current: impl Fn() -> Option<RingAcceptor>) -> io::Result<()> {
        let _turn =
            self.saving.acquire_permit(1).await.map_err(|_| io::Error::other("the ring file is closed"))?;
        let Some(acceptor) = current() else { return Ok(()) };
        replace_file(&self.storage, &self.dir, CLUSTER_FILE, &encode(&acceptor)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::storage::sim::{Faults, SimStorage};

    /// A ring acceptor that has promised `promise`: each save in the test makes a new one.
    fn acceptor_with(promise: u64) -> RingAcceptor {
        let state = RingState::formed(vec!["a".into(), "b".into(), "c".into()], 3, 4).expect("ring");
        let mut acceptor = RingAcceptor::new(state);
        acceptor.prepare(2, (promise, 1, 1));
        acceptor
    }

    /// A promise is answered only once its save returned: after any power loss, with writes
    /// and syncs failing on the way, the file holds the last promise whose save returned, or
    /// one whose save was cut short by the failure or the power loss, never an older one and
    /// never a mix.
    #[test]
    fn a_saved_ring_survives_power_losses_and_io_errors() {
        futures_lite::future::block_on(async {
            for seed in 0..200 {
                let storage = SimStorage::new(seed);
                let mut rng = Rng::new(seed);
                let dir = Path::new("/data");
                let mut durable = None;
                let mut promise = 0;
                for _cycle in 0..6 {
                    let loaded = load(&storage, dir)
                        .await
                        .unwrap_or_else(|error| panic!("seed {seed}: the ring file is unreadable: {error}"));
                    let loaded_promise = loaded.map(|acceptor| acceptor.promised.0);
                    assert!(
                        loaded_promise >= durable,
                        "seed {seed}: promise {durable:?} was saved, the file holds {loaded_promise:?}"
                    );
                    durable = loaded_promise;
                    let file = RingFile::new(storage.clone(), dir);
                    if rng.below(2) == 0 {
                        storage.set_faults(Faults {
                            write_error_per_million: 150_000,
                            sync_error_per_million: 150_000,
                        });
                    }
                    for _ in 0..rng.below(8) {
                        promise += 1;
                        let next = acceptor_with(promise);
                        if file.save(|| Some(next.clone())).await.is_ok() {
                            durable = Some(promise);
                        }
                    }
                    if rng.below(3) != 0 {
                        storage.crash();
                    }
                    storage.set_faults(Faults::default());
                }
            }
        });
    }

    #[test]
    fn the_file_is_whole_blocks_of_json_and_reads_back_with_the_first_format() {
        let state = RingState::formed(vec!["a".into(), "b".into(), "c".into()], 3, 4).expect("ring");
        let mut acceptor = RingAcceptor::new(state.clone());
        acceptor.prepare(2, (7, 1, 1));
        let bytes = encode(&acceptor);
        assert_eq!(bytes.len() % crate::storage::BLOCK_SIZE, 0);
        assert_eq!(decode(&bytes), Ok(acceptor.clone()));
        assert!(serde_json::from_slice::<RingAcceptor>(&bytes).is_ok(), "plain JSON");
        let first = br#"{"members": ["a", "b", "c"], "replica_count": 3, "partition_bits": 4}"#;
        assert_eq!(decode(first), Ok(RingAcceptor::new(state)));
        let json_end = bytes.iter().rposition(|&b| b != b' ').expect("json");
        assert!(decode(&bytes[..json_end / 2]).is_err(), "a cut file is refused");
    }
}
