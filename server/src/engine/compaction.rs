//! Compaction, size-tiered: tables are kept newest first with disjoint sequence ranges; when
//! [`MERGE_WIDTH`] neighbours fall in the same size tier (tier k holds tables of about
//! `base * MERGE_WIDTH^k` bytes) they are merged into one table in their place. A key is
//! rewritten about once per tier, so write amplification grows with the log of the data size
//! over the memtable size; reads stay at one disk read per GET because bloom filters skip
//! the tables that lack the key. server/src/engine/README.md says why tiered rather than leveled.

use std::rc::Rc;

use super::tables::{Table, TableScan, TableWriter};
use crate::storage::Storage;
use crate::table::format::{EntryKind, EntryRef};
use crate::table::reader::TableError;
use schema::KEY_SIZE_MAX;

/// How many tables of one tier are merged at once.
pub const MERGE_WIDTH: usize = 4;
/// Past this many tables, the cheapest run of neighbours is merged whatever its tiers, so
/// that a lookup never has more than this many filters to probe.
pub const TABLE_COUNT_MAX: usize = 24;

fn tier(size: u64, base: u64) -> u32 {
    let mut tier = 0;
    let mut bound = base.max(1) * 2;
    while size > bound && tier < 30 {
        bound *= MERGE_WIDTH as u64;
        tier += 1;
    }
    tier
}

/// The run of tables to merge next, as a range of positions in `sizes` (newest first).
pub fn pick(sizes: &[u64], base: u64) -> Option<std::ops::Range<usize>> {
    let tiers: Vec<u32> = sizes.iter().map(|&size| tier(size, base)).collect();
    // The lowest tier first, and within it the oldest run: merging the newest run instead
    // would strand an older table of that tier between the merge's output and older, larger
    // tables, where it would never find three neighbours of its size.
    let same_tier = (0..sizes.len().saturating_sub(MERGE_WIDTH - 1))
        .filter(|&start| tiers[start..start + MERGE_WIDTH].iter().all(|&t| t == tiers[start]))
        .max_by_key(|&start| (std::cmp::Reverse(tiers[start]), start));
    if let Some(start) = same_tier {
        return Some(start..start + MERGE_WIDTH);
    }
    if sizes.len() > TABLE_COUNT_MAX {
        let start = (0..=sizes.len() - MERGE_WIDTH)
            .min_by_key(|&start| sizes[start..start + MERGE_WIDTH].iter().sum::<u64>())?;
        return Some(start..start + MERGE_WIDTH);
    }
    None
}

/// Bytes that would be rewritten by the merges due now: the compaction debt.
pub fn debt(sizes: &[u64], base: u64) -> u64 {
    let mut sizes = sizes.to_vec();
    let mut debt = 0;
    while let Some(run) = pick(&sizes, base) {
        let merged: u64 = sizes[run.clone()].iter().sum();
        debt += merged;
        sizes.splice(run, [merged]);
    }
    debt
}

/// When an entry may be dropped rather than rewritten.
#[derive(Debug, Clone, Copy)]
pub struct Purge {
    /// The merge includes the oldest table, so nothing older can resurface.
    pub includes_oldest: bool,
    /// Tombstones written, and values expired, before this (Unix ms) are past the grace
    /// period.
    pub before_ms: u64,
}

impl Purge {
    fn drops(&self, entry: &EntryRef<'_>) -> bool {
        if !self.includes_oldest {
            return false;
        }
        match entry.kind {
            EntryKind::Delete => entry.timestamp_us / 1000 < self.before_ms,
            EntryKind::Put => entry.expires_at_ms != 0 && entry.expires_at_ms < self.before_ms,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct MergeReport {
    pub entries_in: u64,
    pub entries_out: u64,
    pub bytes_read: u64,
    /// The merge stopped early because `cancel` was set; its output must be abandoned.
    pub cancelled: bool,
}

/// Merges `inputs` (newest first) into `output`: the newest version of each key, minus
/// what `purge` allows to drop. Stops early once `cancel` is set.
pub async fn merge<S: Storage>(
    inputs: &[Rc<Table<S>>],
    output: &mut TableWriter<S>,
    purge: Purge,
    cancel: &std::cell::Cell<bool>,
) -> Result<MergeReport, TableError> {
    let mut scans = Vec::with_capacity(inputs.len());
    for table in inputs {
        scans.push(TableScan::open(table.clone()).await?);
    }
    let mut report = MergeReport::default();
    let mut key = Vec::with_capacity(KEY_SIZE_MAX);
    loop {
        // The smallest (token, key) among the heads, and of its versions the newest.
        let mut chosen: Option<EntryRef<'_>> = None;
        for head in scans.iter().filter_map(TableScan::peek) {
            chosen = match chosen {
                Some(best) => {
                    let order = (head.token, head.key).cmp(&(best.token, best.key));
                    Some(if order.is_lt() || (order.is_eq() && head.seq > best.seq) { head } else { best })
                }
                None => Some(head),
            };
        }
        let Some(newest) = chosen else { break };
        if !purge.drops(&newest) {
            output.add_entry(&newest).await?;
            report.entries_out += 1;
        }
        let token = newest.token;
        key.clear();
        key.extend_from_slice(newest.key);
        let seq = newest.seq;
        // The newest version and the older ones of the same key are passed.
        for scan in &mut scans {
            while let Some(head) = scan.peek().filter(|head| head.token == token && head.key == key) {
                debug_assert!(head.seq <= seq);
                scan.advance().await?;
                report.entries_in += 1;
            }
        }
        glommio::yield_if_needed().await;
        if cancel.get() {
            report.cancelled = true;
            break;
        }
    }
    report.bytes_read = scans.iter().map(|scan| scan.bytes_read).sum();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_four_neighbours_of_one_tier_smallest_tier_first() {
        let base = 100;
        assert_eq!(pick(&[100, 100, 100], base), None);
        assert_eq!(pick(&[100, 90, 100, 120, 1600], base), Some(0..4));
        assert_eq!(pick(&[100, 500, 450, 400, 420, 100], base), Some(1..5));
        // Five of the lowest tier: the oldest four merge, the newest waits for company.
        assert_eq!(pick(&[100, 100, 100, 100, 100, 1600], base), Some(1..5));
        assert_eq!(debt(&[100, 100, 100, 100], base), 400);
        assert_eq!(debt(&[100, 100, 100], base), 0);
        let many = vec![100; 30];
        assert!(pick(&many, base).is_some());
    }
}
