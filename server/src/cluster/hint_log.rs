//! Hints survive a coordinator's restart: every hint added and every hint acknowledged is
//! appended to `shard-N/HINTS`, and a restart rebuilds the pending hints from it.
//!
//! Appends are gathered in memory and written through `Storage` every `FLUSH_INTERVAL`, each
//! batch in whole blocks of its own (zero-padded) followed by `sync_data`, so a write never
//! touches a block that holds records already durable (hints are rare and not on a client's
//! path, since they never count toward W). A crash can therefore lose the last interval's
//! hints; the replicas they were for are then behind until a read repairs them, the same as a
//! hint dropped by its bounds. At start, and whenever the log has grown past twice what the
//! pending hints take in it (and past `REWRITE_SIZE_MIN`), the file is rewritten with only
//! the pending hints (atomic replacement). Hints in memory are bounded (`HintLimits`: count,
//! bytes, age; the oldest dropped first, anti-entropy repairing their keys), so the file is
//! too: at most about twice theirs, whether or not their replicas ever come back.
//!
//! Record: length u32 (of what follows the CRC), CRC32C u32 (of what follows it), kind u8
//! (1 add, 2 acknowledged), target u32, id u64; an add continues with key length u16, key, and
//! the encoded versions. Little-endian. Zeros where a record would start are a batch's padding
//! (the log goes on at the next block). A record cut short or failing its CRC ends the log (a
//! torn tail).
#![deny(clippy::indexing_slicing)]

use std::io;
use std::path::{Path, PathBuf};

use super::ring::NodeId;
use crate::le::{u16_at, u32_at, u64_at};
use crate::storage::{block_align_up, replace_file, Storage, StorageFile, BLOCK_SIZE};

pub const HINT_LOG_FILE: &str = "HINTS";
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// Below this the log is never rewritten (a rewrite costs a file replacement).
pub const REWRITE_SIZE_MIN: u64 = 1 << 20;
/// An add record's bytes beyond its key and versions: length, CRC, kind, target, id, key
/// length.
pub const ADD_RECORD_OVERHEAD: usize = 8 + 1 + 4 + 8 + 2;

const KIND_ADD: u8 = 1;
const KIND_ACKNOWLEDGED: u8 = 2;

/// A pending hint as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedHint {
    pub id: u64,
    pub target: NodeId,
    pub key: Vec<u8>,
    pub versions: Vec<u8>,
}

fn record(kind: u8, target: NodeId, id: u64, payload: Option<(&[u8], &[u8])>) -> Vec<u8> {
    let mut body = Vec::with_capacity(13 + payload.map_or(0, |(k, v)| 2 + k.len() + v.len()));
    body.push(kind);
    body.extend_from_slice(&target.to_le_bytes());
    body.extend_from_slice(&id.to_le_bytes());
    if let Some((key, versions)) = payload {
        body.extend_from_slice(&(key.len() as u16).to_le_bytes());
        body.extend_from_slice(key);
        body.extend_from_slice(versions);
    }
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn add_record(hint: &LoggedHint) -> Vec<u8> {
    record(KIND_ADD, hint.target, hint.id, Some((&hint.key, &hint.versions)))
}

pub fn acknowledged_record(target: NodeId, id: u64) -> Vec<u8> {
    record(KIND_ACKNOWLEDGED, target, id, None)
}

/// The hints pending at the end of `bytes`, in the order they were added.
pub fn replay(bytes: &[u8]) -> Vec<LoggedHint> {
    let mut pending: Vec<LoggedHint> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match record_at(bytes, at) {
            Some((Record::Add(hint), next)) => {
                pending.push(hint);
                at = next;
            }
            Some((Record::Acknowledged { target, id }, next)) => {
                pending.retain(|hint| !(hint.id == id && hint.target == target));
                at = next;
            }
            None => {
                // Zeros to the end of the block are a batch's padding: the next batch starts
                // at the next block. Anything else is a torn tail.
                let block_end = (at / BLOCK_SIZE + 1) * BLOCK_SIZE;
                let rest = bytes.get(at..block_end.min(bytes.len())).unwrap_or_default();
                if !rest.iter().all(|&b| b == 0) {
                    break;
                }
                at = block_end;
            }
        }
    }
    pending
}

/// One record of the log.
enum Record {
    Add(LoggedHint),
    Acknowledged { target: NodeId, id: u64 },
}

/// The whole, intact record at `at` and where the next one starts.
fn record_at(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let length = u32_at(bytes, at)? as usize;
    let crc = u32_at(bytes, at + 4)?;
    let body = bytes.get(at + 8..at + 8 + length)?;
    if length == 0 || crc32c::crc32c(body) != crc {
        return None;
    }
    let (kind, target, id) = (*body.first()?, u32_at(body, 1)?, u64_at(body, 5)?);
    let record = match kind {
        KIND_ADD => {
            let key_end = 15 + usize::from(u16_at(body, 13)?);
            let (key, versions) = (body.get(15..key_end)?, body.get(key_end..)?);
            Record::Add(LoggedHint { id, target, key: key.to_vec(), versions: versions.to_vec() })
        }
        KIND_ACKNOWLEDGED => Record::Acknowledged { target, id },
        _ => return None,
    };
    Some((record, at + 8 + length))
}

/// `bytes` zero-padded to whole blocks.
fn padded(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.resize(block_align_up(bytes.len() as u64) as usize, 0);
    bytes
}

/// Reads the log in `dir` (if any) and returns the pending hints; the caller rewrites it with
/// [`rewrite`] under the ids it assigns.
pub async fn load<S: Storage>(storage: &S, dir: &Path) -> io::Result<Vec<LoggedHint>> {
    let file = match storage.open(&dir.join(HINT_LOG_FILE)).await {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let read = async {
        let size = file.size().await?;
        file.read_at(0, size as usize).await
    }
    .await;
    let _ = file.close().await;
    Ok(replay(&read?))
}

/// Replaces the log with exactly `hints` (`replace_file`: temporary file, sync, rename,
/// directory sync).
pub async fn rewrite<S: Storage>(storage: &S, dir: &Path, hints: &[LoggedHint]) -> io::Result<()> {
    let bytes: Vec<u8> = hints.iter().flat_map(add_record).collect();
    replace_file(storage, dir, HINT_LOG_FILE, &padded(bytes)).await
}

/// The log's writer: appends batches of records, each durable when `append` returns.
pub struct HintLog<S: Storage> {
    storage: S,
    dir: PathBuf,
    /// The open log and the offset of the next batch; `None` until the first append.
    file: Option<(S::File, u64)>,
}

impl<S: Storage> HintLog<S> {
    pub fn new(storage: S, dir: &Path) -> HintLog<S> {
        HintLog { storage, dir: dir.to_path_buf(), file: None }
    }

    /// Appends `records` (encoded records) in blocks of their own and makes them durable. A
    /// failed append is retried from the same offset by the next one (the caller keeps the
    /// records), so a torn batch never sits before a good one.
    pub async fn append(&mut self, records: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            let path = self.dir.join(HINT_LOG_FILE);
            let file = match self.storage.open(&path).await {
                Ok(file) => file,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    let file = self.storage.create(&path).await?;
                    self.storage.sync_dir(&self.dir).await?;
                    file
                }
                Err(error) => return Err(error),
            };
            let end = block_align_up(file.size().await?);
            self.file = Some((file, end));
        }
        let Some((file, end)) = &mut self.file else { unreachable!("opened above") };
        let bytes = padded(records.to_vec());
        file.write_at(*end, &bytes).await?;
        file.sync_data().await?;
        *end += bytes.len() as u64;
        Ok(())
    }

    /// Bytes the log takes, as far as this writer knows (0 until its first append).
    pub fn size(&self) -> u64 {
        self.file.as_ref().map_or(0, |(_, end)| *end)
    }

    /// Whether the log should be rewritten with the hints pending now, which would take
    /// about `pending_bytes` (keys and versions) in `pending_count` records.
    pub fn wants_rewrite(&self, pending_count: usize, pending_bytes: usize) -> bool {
        let rewritten = (pending_bytes + pending_count * ADD_RECORD_OVERHEAD) as u64;
        self.size() > REWRITE_SIZE_MIN.max(2 * block_align_up(rewritten))
    }

    /// Replaces the log with exactly `hints` (the next append opens the new file).
    pub async fn replace(&mut self, hints: &[LoggedHint]) -> io::Result<()> {
        if let Some((file, _)) = self.file.take() {
            let _ = file.close().await;
        }
        rewrite(&self.storage, &self.dir, hints).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::storage::sim::{Faults, SimStorage};

    fn hint(id: u64, target: NodeId) -> LoggedHint {
        LoggedHint { id, target, key: format!("k{id}").into_bytes(), versions: vec![id as u8; 3] }
    }

    #[test]
    fn replay_keeps_what_was_not_acknowledged_and_stops_at_a_torn_tail() {
        let mut log = Vec::new();
        for id in 1..=4 {
            log.extend(add_record(&hint(id, (id % 2) as NodeId)));
        }
        log.extend(acknowledged_record(1, 1));
        log.extend(acknowledged_record(0, 3)); // wrong target: 3 went to node 1
        assert_eq!(replay(&log), vec![hint(2, 0), hint(3, 1), hint(4, 0)]);
        // Every cut of the last record, and every flipped byte in it, ends the log there.
        let whole = log.len();
        log.extend(add_record(&hint(5, 1)));
        for cut in whole..log.len() {
            assert_eq!(replay(&log[..cut]).len(), 3, "cut at {cut}");
        }
        for position in whole..log.len() {
            let mut damaged = log.clone();
            damaged[position] ^= 0x10;
            assert_eq!(replay(&damaged).len(), 3, "flip at {position}");
        }
        assert_eq!(replay(&log).len(), 4);
    }

    /// A replica that never comes back: hints for it are added and the oldest dropped by the
    /// in-memory bound, so the pending set stays small while the history grows. The log is
    /// rewritten whenever it passes twice what the pending hints take, and never grows past
    /// that (plus one batch) however long this goes on.
    #[test]
    fn the_log_stays_within_twice_the_pending_hints_however_many_pass_through() {
        futures_lite::future::block_on(async {
            let storage = SimStorage::new(1);
            let dir = Path::new("/data/shard-0");
            let mut log = HintLog::new(storage.clone(), dir);
            let mut pending: std::collections::VecDeque<LoggedHint> = Default::default();
            let mut rewrite_count = 0;
            let mut largest = 0;
            for id in 1..=20_000u64 {
                let new = LoggedHint { versions: vec![7; 1_000], ..hint(id, 2) };
                log.append(&add_record(&new)).await.expect("append");
                pending.push_back(new);
                if pending.len() > 64 {
                    pending.pop_front(); // the in-memory bound drops the oldest
                }
                largest = largest.max(log.size());
                let bytes = pending.iter().map(|hint| hint.key.len() + hint.versions.len()).sum();
                if log.wants_rewrite(pending.len(), bytes) {
                    let kept: Vec<LoggedHint> = pending.iter().cloned().collect();
                    log.replace(&kept).await.expect("rewrite");
                    rewrite_count += 1;
                    assert_eq!(
                        load(&storage, dir).await.expect("load"),
                        kept,
                        "a rewrite keeps exactly the pending hints"
                    );
                }
            }
            // 20,000 appends of a block each: 80 MiB of history without the rewrites.
            assert!(rewrite_count > 50, "{rewrite_count} rewrites");
            let pending_size = 64 * (1_000 + 4 + ADD_RECORD_OVERHEAD) as u64;
            assert!(
                largest <= REWRITE_SIZE_MIN.max(2 * pending_size) + BLOCK_SIZE as u64,
                "the log reached {largest} bytes"
            );
            // Hints dropped from memory since the last rewrite are still in the file (no
            // record says they were dropped); every pending one is.
            let loaded: Vec<u64> =
                load(&storage, dir).await.expect("load").iter().map(|hint| hint.id).collect();
            assert!(pending.iter().all(|hint| loaded.contains(&hint.id)), "a pending hint is missing");
        });
    }

    /// Through power losses, with writes and syncs failing on the way: a hint whose append
    /// returned is there after the restart unless its acknowledgement was appended too, and
    /// nothing appears that was never added. A restart rewrites the log, as a shard does.
    #[test]
    fn durable_hints_survive_power_losses_and_io_errors() {
        futures_lite::future::block_on(async {
            for seed in 0..200 {
                let storage = SimStorage::new(seed);
                let mut rng = Rng::new(seed);
                let dir = Path::new("/data/shard-0");
                let mut next_id = 0;
                // Hints known durable and never acknowledged (even by an append that failed).
                let mut must_remain: Vec<LoggedHint> = Vec::new();
                let mut ever_added: Vec<LoggedHint> = Vec::new();
                for _cycle in 0..5 {
                    let loaded = load(&storage, dir)
                        .await
                        .unwrap_or_else(|error| panic!("seed {seed}: the hint log is unreadable: {error}"));
                    for hint in &must_remain {
                        assert!(loaded.contains(hint), "seed {seed}: durable hint {} lost", hint.id);
                    }
                    assert!(
                        loaded.iter().all(|hint| ever_added.contains(hint)),
                        "seed {seed}: a hint never added"
                    );
                    let survivors = loaded.clone();
                    if rewrite(&storage, dir, &survivors).await.is_err() {
                        continue;
                    }
                    let mut log = HintLog::new(storage.clone(), dir);
                    if rng.below(2) == 0 {
                        storage.set_faults(Faults {
                            write_error_per_million: 150_000,
                            sync_error_per_million: 150_000,
                        });
                    }
                    let mut pending = survivors;
                    for _ in 0..rng.below(12) {
                        let mut batch = Vec::new();
                        let mut added = Vec::new();
                        let mut acknowledged = Vec::new();
                        for _ in 0..1 + rng.below(3) {
                            if !pending.is_empty() && rng.below(3) == 0 {
                                let gone = pending.remove(rng.below(pending.len() as u64) as usize);
                                batch.extend(acknowledged_record(gone.target, gone.id));
                                acknowledged.push(gone);
                            } else {
                                next_id += 1;
                                let size = rng.below(3_000) as usize;
                                let new = LoggedHint {
                                    versions: vec![7; size],
                                    ..hint(next_id, (next_id % 3) as NodeId)
                                };
                                batch.extend(add_record(&new));
                                ever_added.push(new.clone());
                                pending.push(new.clone());
                                added.push(new);
                            }
                        }
                        must_remain.retain(|hint| !acknowledged.contains(hint));
                        if log.append(&batch).await.is_ok() {
                            must_remain.extend(added.into_iter().filter(|hint| !acknowledged.contains(hint)));
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
}
