//! Compaction, size-tiered: tables are kept newest first with disjoint sequence ranges; when
//! [`MERGE_WIDTH`] neighbours fall in the same size tier (tier k holds tables of about
//! `base * MERGE_WIDTH^k` bytes) they are merged into one table in their place. A key is
//! rewritten about once per tier, so write amplification grows with the log of the data size
//! over the memtable size; reads stay at one disk read per GET because bloom filters skip
//! the tables that lack the key. server/src/engine/README.md says why tiered rather than leveled.
//!
//! Tiers alone leave space unbounded where keys are overwritten: every tier can hold stale
//! copies of the same keys until it fills. So space comes first: once the tables hold more
//! than `1 + STALE_SHARE_MAX` entries per distinct key, all of them merge into one. Distinct
//! keys come from the tables' sketches (HyperLogLog, in each footer), so the rule sees stale
//! copies, not sizes: a load that only adds keys never triggers it (its write amplification
//! stays the tiers'), while overwrites keep the tables under about `1 + STALE_SHARE_MAX`
//! times the live data, and under `2 + STALE_SHARE_MAX` times while a merge writes its output
//! (about the live data) beside its inputs. (RocksDB's universal compaction bounds space by
//! sizes alone, the newer runs against the oldest, and so also merges everything during
//! loads.)
//!
//! A merge's output does not wait beside its inputs until the end: it is written in pieces
//! (tables of [`piece_size`]), each installed as soon as it is written, answering for the
//! tokens it covers, while the inputs are installed again answering only for the tokens
//! still ahead (manifest.rs). An input answering for nothing more is removed, so a merge
//! frees the previous merge's pieces as it passes them, and its output never doubles the
//! data on disk. The pieces of one output form one *run* (neighbours whose token ranges
//! follow each other, [`runs`]): the tiers are over runs, so pieces are never merged with
//! each other for their size alone.

use std::rc::Rc;

use super::manifest::TokenRange;
use super::tables::{Table, TableScan, TableWriter};
use crate::storage::Storage;
use crate::table::format::{EntryKind, EntryRef};
use crate::table::reader::TableError;
use crate::table::sketch::Sketch;
use schema::KEY_SIZE_MAX;

/// How many tables of one tier are merged at once.
pub const MERGE_WIDTH: usize = 4;
/// Past this many tables, the cheapest run of neighbours is merged whatever its tiers, so
/// that a lookup never has more than this many filters to probe.
pub const TABLE_COUNT_MAX: usize = 24;
/// All tables merge into one once they hold more than this many stale entries per distinct
/// key (module comment).
///
/// One stale entry per live one: against the starting size-tiered rule, with 100,000 keys of
/// 1,000 bytes overwritten by redis-benchmark (`bench/disk 100000`), the largest data
/// directory went from 909-921 to 661-674 MiB and SET from 131-145K to 126-134K/s (about
/// 0.94x). Half a stale entry per live one gave 558-650 MiB at about 0.87x
/// (bench/results/experiments.md).
pub const STALE_SHARE_MAX: f64 = 1.0;

/// While a merge runs, writers wait whenever the tables on disk take more than this many
/// times what their live entries would: under a load that overwrites faster than a merge
/// rewrites, flushes would otherwise pile up beside the merge's inputs. Each piece the merge
/// installs frees inputs and lets writers on. Above the `1 + STALE_SHARE_MAX` that starts a
/// full merge, so only a merge that falls behind holds writers back.
pub const SPACE_STALL_FACTOR: f64 = 2.25;

/// A merge's output is cut into about this many pieces, each at least a quarter of the
/// memtable budget: a piece is what the output adds to the disk before an input can go.
pub const PIECES_PER_MERGE: u64 = 16;

/// The size of a piece of a merge whose inputs hold `input_bytes`, with tiers over `base`
/// (the memtable budget).
pub fn piece_size(input_bytes: u64, base: u64) -> u64 {
    (input_bytes / PIECES_PER_MERGE).max(base / 4).max(1)
}

/// The runs of a table list (newest first, given by their token ranges), as ranges of
/// positions: neighbours whose token ranges follow each other in increasing order, as the
/// pieces of one merge's output lie. A table answering for every token is a run alone.
pub fn runs(tokens: &[TokenRange]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (position, range) in tokens.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if tokens[run.end - 1].last < range.first => run.end = position + 1,
            _ => runs.push(position..position + 1),
        }
    }
    runs
}

fn tier(size: u64, base: u64) -> u32 {
    let mut tier = 0;
    let mut bound = base.max(1) * 2;
    while size > bound && tier < 30 {
        bound *= MERGE_WIDTH as u64;
        tier += 1;
    }
    tier
}

/// Entries per distinct key over tables given as (entry count, sketch): 1 when no key is in
/// two of them. A table without a sketch (format version 1) makes it unknown, taken as 1.
pub fn redundancy<'a>(tables: impl IntoIterator<Item = (u64, Option<&'a Sketch>)>) -> f64 {
    let mut union = Sketch::default();
    let mut entry_count = 0;
    for (entries, sketch) in tables {
        let Some(sketch) = sketch else { return 1.0 };
        union.merge(sketch);
        entry_count += entries;
    }
    let distinct = union.estimate();
    if distinct >= 1.0 {
        (entry_count as f64 / distinct).max(1.0)
    } else {
        1.0
    }
}

/// The run of tables to merge next, as a range of positions in `sizes` (newest first), given
/// the tables' [`redundancy`].
pub fn pick(sizes: &[u64], base: u64, redundancy: f64) -> Option<std::ops::Range<usize>> {
    if sizes.len() > 1 && redundancy > 1.0 + STALE_SHARE_MAX {
        return Some(0..sizes.len());
    }
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
pub fn debt(sizes: &[u64], base: u64, redundancy: f64) -> u64 {
    let mut sizes = sizes.to_vec();
    let mut debt = 0;
    let mut redundancy = redundancy;
    while let Some(run) = pick(&sizes, base, redundancy) {
        let merged: u64 = sizes[run.clone()].iter().sum();
        debt += merged;
        sizes.splice(run, [merged]);
        redundancy = 1.0; // what a merge of everything leaves
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
    /// Set once the merge is done.
    pub bytes_read: u64,
}

/// Where [`Merge::fill`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The output reached its size; every entry up to this token is in it (or purged), and
    /// none after.
    Piece { last_token: u64 },
    /// The inputs are exhausted.
    Done,
    /// `cancel` was set; the output must be abandoned.
    Cancelled,
}

/// A merge of tables (newest first) into the newest version of each key, minus what
/// `purge` allows to drop, written a piece at a time.
pub struct Merge<S: Storage> {
    scans: Vec<TableScan<S>>,
    purge: Purge,
    /// The token of the last key passed.
    last_token: Option<u64>,
    pub report: MergeReport,
}

impl<S: Storage> Merge<S> {
    pub async fn open(inputs: &[Rc<Table<S>>], purge: Purge) -> Result<Merge<S>, TableError> {
        let mut scans = Vec::with_capacity(inputs.len());
        for table in inputs {
            scans.push(TableScan::open(table.clone()).await?);
        }
        Ok(Merge { scans, purge, last_token: None, report: MergeReport::default() })
    }

    /// Writes the next keys into `output` until it holds `size` bytes and the next key has
    /// another token (a piece ends between tokens), or the inputs end. Stops early once
    /// `cancel` is set.
    pub async fn fill(
        &mut self,
        output: &mut TableWriter<S>,
        size: u64,
        cancel: &std::cell::Cell<bool>,
    ) -> Result<Filled, TableError> {
        let mut key = Vec::with_capacity(KEY_SIZE_MAX);
        loop {
            // The smallest (token, key) among the heads, and of its versions the newest.
            let mut chosen: Option<EntryRef<'_>> = None;
            for head in self.scans.iter().filter_map(TableScan::peek) {
                chosen = match chosen {
                    Some(best) => {
                        let order = (head.token, head.key).cmp(&(best.token, best.key));
                        Some(if order.is_lt() || (order.is_eq() && head.seq > best.seq) {
                            head
                        } else {
                            best
                        })
                    }
                    None => Some(head),
                };
            }
            let Some(newest) = chosen else {
                self.report.bytes_read = self.scans.iter().map(|scan| scan.bytes_read).sum();
                return Ok(Filled::Done);
            };
            if let Some(last_token) = self.last_token {
                if output.size() >= size && newest.token != last_token {
                    return Ok(Filled::Piece { last_token });
                }
            }
            if !self.purge.drops(&newest) {
                output.add_entry(&newest).await?;
                self.report.entries_out += 1;
            }
            let token = newest.token;
            key.clear();
            key.extend_from_slice(newest.key);
            let seq = newest.seq;
            self.last_token = Some(token);
            // The newest version and the older ones of the same key are passed.
            for scan in &mut self.scans {
                while let Some(head) = scan.peek().filter(|head| head.token == token && head.key == key) {
                    debug_assert!(head.seq <= seq);
                    scan.advance().await?;
                    self.report.entries_in += 1;
                }
            }
            glommio::yield_if_needed().await;
            if cancel.get() {
                return Ok(Filled::Cancelled);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_one_output_form_one_run() {
        let range = |first, last| TokenRange { first, last };
        let all = TokenRange::ALL;
        let tokens = [all, range(0, 9), range(10, 99), range(100, u64::MAX), all, range(5, u64::MAX), all];
        assert_eq!(runs(&tokens), vec![0..1, 1..4, 4..5, 5..6, 6..7]);
        // A merge cut short by a crash: its pieces, then its inputs answering for the rest
        // (the first of them joins the pieces' run; any grouping is correct, as lookups go
        // by token).
        let tokens = [range(0, 9), range(10, 19), range(20, u64::MAX), range(20, u64::MAX)];
        assert_eq!(runs(&tokens), vec![0..3, 3..4]);
        assert_eq!(runs(&[]), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(piece_size(1 << 30, 32 << 20), 64 << 20);
        assert_eq!(piece_size(1 << 20, 32 << 20), 8 << 20);
    }

    #[test]
    fn picks_four_neighbours_of_one_tier_smallest_tier_first() {
        let base = 100;
        assert_eq!(pick(&[100, 100, 100], base, 1.0), None);
        assert_eq!(pick(&[100, 90, 100, 120, 1600], base, 1.0), Some(0..4));
        assert_eq!(pick(&[100, 500, 450, 400, 420, 100], base, 1.0), Some(1..5));
        // Five of the lowest tier: the oldest four merge, the newest waits for company.
        assert_eq!(pick(&[100, 100, 100, 100, 100, 1600], base, 1.0), Some(1..5));
        assert_eq!(debt(&[100, 100, 100, 100], base, 1.0), 400);
        assert_eq!(debt(&[100, 100, 100], base, 1.0), 0);
        let many = vec![100; 30];
        assert!(pick(&many, base, 1.0).is_some());
    }

    fn sketch_of(keys: std::ops::Range<u64>) -> Sketch {
        let mut sketch = Sketch::default();
        keys.for_each(|key| sketch.insert(schema::key_hash(&key.to_le_bytes())));
        sketch
    }

    #[test]
    fn stale_copies_past_one_per_key_merge_everything_and_new_keys_never_do() {
        let base = 100;
        // 10,000 keys, then flushes that overwrite 3,000 of them each.
        let all = sketch_of(0..10_000);
        let flushes: Vec<Sketch> = (0..4).map(|i| sketch_of(i * 2_000..i * 2_000 + 3_000)).collect();
        let after = |count: usize| {
            let newer = flushes.iter().take(count).map(|sketch| (3_000, Some(sketch)));
            redundancy(newer.chain([(10_000, Some(&all))]))
        };
        let (three, four) = (after(3), after(4));
        assert!((1.75..1.99).contains(&three), "{three}");
        assert!((2.05..2.4).contains(&four), "{four}");
        assert_eq!(pick(&[300, 300, 300, 1000], base, three), None);
        assert_eq!(pick(&[300, 300, 300, 300, 1000], base, four), Some(0..5));
        assert_eq!(debt(&[300, 300, 300, 300, 1000], base, four), 2200);
        // New keys only: no stale copies, whatever the sizes.
        let (new, old) = (sketch_of(10_000..20_000), sketch_of(0..10_000));
        let added = redundancy([(10_000, Some(&new)), (10_000, Some(&old))]);
        assert!(added < 1.1, "{added}");
        assert_eq!(pick(&[1000, 1000], base, added), None);
        // A table without a sketch (format version 1) leaves it unknown.
        assert_eq!(redundancy([(3_000, Some(&flushes[0])), (10_000, None)]), 1.0);
        assert_eq!(pick(&[1000], base, 3.0), None, "one table is never merged with itself");
    }
}
