//! Recovery at start-up: every segment replayed in order, records past the tables' flushed
//! sequence number applied, and the log's state (next sequence number, the segments that
//! hold records, a prepared segment never started) handed back to `Wal::open`.
#![deny(clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::path::Path;

use super::format::{self, BatchError, Record};
use super::{parse_segment_name, segment_name, RecoveryReport, ShardIdentity, WalError};
use crate::storage::{Storage, StorageFile, BLOCK_SIZE};

/// What recovery found.
pub(super) struct Recovered {
    pub report: RecoveryReport,
    /// The segments that hold records: (index, first sequence number), oldest first.
    pub segments: VecDeque<(u64, u64)>,
    /// The newest segment, prepared but never started (all zeros, no header).
    pub headerless: Option<u64>,
    /// The highest segment index on disk.
    pub last_index: Option<u64>,
}

/// Replays the log in `dir`, applying every record above `flushed_seq`.
pub(super) async fn recover<S: Storage>(
    storage: &S,
    dir: &Path,
    identity: ShardIdentity,
    flushed_seq: u64,
    apply: &mut impl FnMut(&Record<'_>),
) -> Result<Recovered, WalError> {
    let io_error = |path: &Path, error: std::io::Error| WalError::Io {
        path: path.to_path_buf(),
        message: error.to_string(),
    };
    storage.create_dir_all(dir).await.map_err(|e| io_error(dir, e))?;
    let mut segment_indexes: Vec<u64> = storage
        .list_dir(dir)
        .await
        .map_err(|e| io_error(dir, e))?
        .iter()
        .filter_map(|name| parse_segment_name(name))
        .collect();
    segment_indexes.sort_unstable();

    let mut report = RecoveryReport { next_seq: 1, ..RecoveryReport::default() };
    let segment_total = segment_indexes.len();
    let mut previous_lossy = false;
    let mut headerless = None;
    let mut segments = VecDeque::new();
    let mut apply_unflushed = |record: &Record<'_>| {
        if record.seq > flushed_seq {
            apply(record);
        }
    };
    for (position, &segment_index) in segment_indexes.iter().enumerate() {
        let is_last = position + 1 == segment_total;
        let path = dir.join(segment_name(segment_index));
        let replay = Replay { segment_index, identity, is_last, allow_gap: previous_lossy, flushed_seq };
        match replay_segment(storage, &path, replay, &mut report, &mut apply_unflushed).await? {
            Replayed::Records { lossy, first_seq } => {
                previous_lossy = lossy;
                segments.push_back((segment_index, first_seq));
            }
            Replayed::Headerless => headerless = Some(segment_index),
        }
    }
    report.segment_count = segment_total;
    // Under `never`, a power loss may take records the tables already hold: never
    // number a new record at or below what the tables have.
    report.next_seq = report.next_seq.max(flushed_seq + 1);
    Ok(Recovered { report, segments, headerless, last_index: segment_indexes.last().copied() })
}

/// Where a segment stands in the log being recovered.
struct Replay {
    segment_index: u64,
    identity: ShardIdentity,
    is_last: bool,
    /// The previous segment lost records (acknowledged before sync), so this one may start
    /// past the next expected sequence number.
    allow_gap: bool,
    /// Records up to here are in sorted tables; segments that held only those may be gone.
    flushed_seq: u64,
}

enum Replayed {
    /// `lossy`: records were dropped (damage in a segment acknowledged before sync).
    Records { lossy: bool, first_seq: u64 },
    /// The newest segment was prepared but never started: all zeros, no header.
    Headerless,
}

/// Replays one segment.
async fn replay_segment<S: Storage>(
    storage: &S,
    path: &Path,
    replay: Replay,
    report: &mut RecoveryReport,
    apply: &mut impl FnMut(&Record<'_>),
) -> Result<Replayed, WalError> {
    let Replay { segment_index, identity, is_last, allow_gap, flushed_seq } = replay;
    let io_error =
        |error: std::io::Error| WalError::Io { path: path.to_path_buf(), message: error.to_string() };
    let corrupt =
        |offset: u64, detail: String| WalError::Corrupt { path: path.to_path_buf(), offset, detail };
    let file = storage.open(path).await.map_err(io_error)?;
    let size = file.size().await.map_err(io_error)?;
    let data = file.read_at(0, size as usize).await.map_err(io_error)?;
    if (data.len() as u64) < size {
        return Err(corrupt(data.len() as u64, "short read".into()));
    }
    let header = format::decode_segment_header(&data)
        .map_err(|error| corrupt(0, format!("bad segment header: {error:?}")));
    let header = match header {
        Ok(header) => header,
        // The newest segment may have been prepared (zero-filled) but never started, or cut
        // short by a crash before its header was synced: nothing in it was acknowledged.
        Err(_) if is_last && data.iter().all(|&b| b == 0) => {
            file.close().await.map_err(io_error)?;
            return Ok(Replayed::Headerless);
        }
        Err(error) => return Err(error),
    };
    let expected = (identity.shard_index, identity.shard_count, segment_index);
    let found = (header.shard_index, header.shard_count, header.segment_index);
    if expected != found {
        return Err(corrupt(
            0,
            format!("segment belongs to (shard, shard count, segment) {found:?}, expected {expected:?}"),
        ));
    }
    let gap_allowed =
        (allow_gap || header.first_seq <= flushed_seq + 1) && header.first_seq > report.next_seq;
    if header.first_seq != report.next_seq && report.record_count > 0 && !gap_allowed {
        return Err(corrupt(
            0,
            format!("segment starts at seq {}, expected {}", header.first_seq, report.next_seq),
        ));
    }
    report.next_seq = header.first_seq;

    let mut offset = BLOCK_SIZE;
    let tail_error = loop {
        match format::decode_batch(data.get(offset..).unwrap_or(&[])) {
            Ok(batch) => {
                if batch.first_seq != report.next_seq {
                    let detail =
                        format!("batch starts at seq {}, expected {}", batch.first_seq, report.next_seq);
                    return Err(corrupt(offset as u64, detail));
                }
                for record in &batch.records {
                    apply(record);
                }
                report.record_count += batch.records.len() as u64;
                report.next_seq += batch.records.len() as u64;
                offset += batch.size_on_disk;
            }
            Err(error) => break error,
        }
    };

    let bad_offset = match tail_error {
        BatchError::BadRecord { offset: relative } => offset + relative,
        _ => offset,
    };
    let damaged = tail_error != BatchError::End;
    // Is there a valid batch after the damage (or after the clean-looking end)?
    let mut later_valid = None;
    let mut probe = offset + BLOCK_SIZE;
    while later_valid.is_none() {
        let Some(rest) = data.get(probe..).filter(|rest| !rest.is_empty()) else { break };
        if format::decode_batch(rest).is_ok_and(|batch| batch.first_seq >= report.next_seq) {
            later_valid = Some(probe);
        }
        probe += BLOCK_SIZE;
    }
    let lossy = if header.flags & format::SEGMENT_FLAG_ACK_BEFORE_SYNC == 0 {
        // Written under `always`: only the newest segment may end in a torn batch, and a
        // damaged batch with valid ones after it is corruption, never a crash artefact.
        if let Some(valid) = later_valid {
            let detail = format!("damaged batch followed by a valid batch at offset {valid}");
            return Err(corrupt(bad_offset as u64, detail));
        }
        if damaged && !is_last {
            let detail = "damaged batch at the end of a segment that is not the newest".to_string();
            return Err(corrupt(offset as u64, detail));
        }
        false
    } else if damaged && !is_last || later_valid.is_some() {
        // Written under `interval` or `never`: a power loss may lose or reorder unsynced
        // writes, which those policies allow. Keep the valid prefix, drop the rest, say so.
        tracing::warn!(
            "{}: damaged at offset {bad_offset} in a segment whose writes were acknowledged \
             before fdatasync; records from there to the end of the segment are dropped",
            path.display()
        );
        report.lossy.push((path.to_path_buf(), bad_offset as u64));
        true
    } else {
        false
    };
    let torn = damaged || later_valid.is_some();
    if is_last && size > offset as u64 {
        // Cut off the torn tail (or the unused preallocation) so that the next start sees
        // a clean end; new records go to a new segment.
        file.truncate(offset as u64).await.map_err(io_error)?;
        file.sync_data().await.map_err(io_error)?;
        if torn {
            tracing::info!("{}: torn tail truncated at offset {offset}", path.display());
            report.truncated = Some((path.to_path_buf(), offset as u64));
        }
    }
    file.close().await.map_err(io_error)?;
    Ok(Replayed::Records { lossy, first_seq: header.first_seq })
}
