//! Hints survive a coordinator's restart: every hint added and every hint acknowledged is
//! appended to `shard-N/HINTS`, and a restart rebuilds the pending hints from it.
//!
//! Appends are gathered in memory and written with `fdatasync` every `FLUSH_INTERVAL` on
//! glommio's blocking pool (plain files: hints are rare and not on a client's path, since they
//! never count toward W). A crash can therefore lose the last interval's hints; the replicas
//! they were for are then behind until a read repairs them, the same as a hint dropped by its
//! bounds. At start the file is rewritten with only the pending hints (atomic replacement), so
//! it never holds more than one run's history.
//!
//! Record: length u32 (of what follows the CRC), CRC32C u32 (of what follows it), kind u8
//! (1 add, 2 acknowledged), target u32, id u64; an add continues with key length u16, key, and
//! the encoded versions. Little-endian. A record cut short or failing its CRC ends the log (a
//! torn tail).
#![deny(clippy::indexing_slicing)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::ring::NodeId;
use crate::le::{u16_at, u32_at, u64_at};

pub const HINT_LOG_FILE: &str = "HINTS";
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

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
    while let (Some(length), Some(crc)) = (u32_at(bytes, at), u32_at(bytes, at + 4)) {
        let length = length as usize;
        let Some(body) = bytes.get(at + 8..at + 8 + length) else { break };
        if crc32c::crc32c(body) != crc {
            break;
        }
        let (Some(&kind), Some(target), Some(id)) = (body.first(), u32_at(body, 1), u64_at(body, 5)) else {
            break;
        };
        match kind {
            KIND_ADD => {
                let Some(key_length) = u16_at(body, 13) else { break };
                let key_end = 15 + usize::from(key_length);
                let (Some(key), Some(versions)) = (body.get(15..key_end), body.get(key_end..)) else { break };
                pending.push(LoggedHint { id, target, key: key.to_vec(), versions: versions.to_vec() });
            }
            KIND_ACKNOWLEDGED => pending.retain(|hint| !(hint.id == id && hint.target == target)),
            _ => break,
        }
        at += 8 + length;
    }
    pending
}

/// Reads the log in `dir` (if any) and returns the pending hints; the caller rewrites it with
/// [`rewrite`] under the ids it assigns.
pub fn load(dir: &Path) -> io::Result<Vec<LoggedHint>> {
    match fs::read(dir.join(HINT_LOG_FILE)) {
        Ok(bytes) => Ok(replay(&bytes)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error),
    }
}

/// Replaces the log with exactly `hints` (temporary file, fsync, rename, directory fsync).
pub fn rewrite(dir: &Path, hints: &[LoggedHint]) -> io::Result<()> {
    let temporary = dir.join("HINTS.tmp");
    let mut file = File::create(&temporary)?;
    for hint in hints {
        file.write_all(&add_record(hint))?;
    }
    file.sync_all()?;
    fs::rename(&temporary, dir.join(HINT_LOG_FILE))?;
    File::open(dir)?.sync_all()
}

/// Appends `bytes` and makes them durable. Runs on the blocking pool.
pub fn append(path: PathBuf, bytes: Vec<u8>) -> io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(&bytes)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
