//! A shard's replication state: its view of the cluster, peer links, counter lease, hints
//! (in memory and the records bound for the hint log), counters and options. The runtime in
//! `replication/`, `serial.rs` and `anti_entropy.rs` works on it.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::hint_log::{self, HintLog, LoggedHint};
use super::hints::{HintLimits, Hints};
use super::lease::CounterLease;
use super::options::{AntiEntropyOptions, AntiEntropyStats};
use super::peer::PeerPool;
use super::ring::NodeId;
use super::view::ClusterView;
use crate::storage::Storage;

#[derive(Debug, Default)]
pub struct ReplicationStats {
    pub read_repair_count: std::cell::Cell<u64>,
    pub hint_count: std::cell::Cell<u64>,
    pub hint_replayed_count: std::cell::Cell<u64>,
    pub forwarded_count: std::cell::Cell<u64>,
    pub unavailable_count: std::cell::Cell<u64>,
    /// Writes refused with `SIBLINGS_FULL`.
    pub siblings_full_count: std::cell::Cell<u64>,
    /// Merges refused because the key's versions would not fit in a stored value (nothing
    /// dropped: the sender keeps them).
    pub oversized_merge_count: std::cell::Cell<u64>,
    pub anti_entropy: AntiEntropyStats,
}

/// A write kept for a replica that missed it: the key and its encoded versions.
pub type HintedWrite = (Vec<u8>, Rc<[u8]>);

/// One shard's replication state.
pub struct ClusterShard<S: Storage> {
    /// This node's actor in version vectors.
    pub actor: u32,
    view: RefCell<Arc<ClusterView>>,
    pub peers: Rc<PeerPool>,
    pub(crate) lease: CounterLease<S>,
    pub(super) hints: RefCell<Hints<HintedWrite>>,
    /// Hint log records not yet appended to the log.
    pub(super) hint_log_pending: RefCell<Vec<u8>>,
    /// The log's writer, until the flush task takes it.
    pub(super) hint_log: RefCell<Option<HintLog<S>>>,
    pub stats: ReplicationStats,
    /// Shard 0 only: the gossip driver.
    pub membership: RefCell<Option<Rc<super::membership::Membership<S>>>>,
    /// One Paxos proposal at a time per key from this shard (see `serial.rs`).
    pub(crate) serial_turns: RefCell<std::collections::HashMap<Vec<u8>, Rc<glommio::sync::Semaphore>>>,
    pub anti_entropy: AntiEntropyOptions,
}

impl<S: Storage> ClusterShard<S> {
    /// Opens the shard's replication state in `shard_dir`, with the hints a previous run left.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        storage: S,
        actor: u32,
        view: Arc<ClusterView>,
        peers: Rc<PeerPool>,
        lease: CounterLease<S>,
        shard_dir: &std::path::Path,
        anti_entropy: AntiEntropyOptions,
    ) -> std::io::Result<ClusterShard<S>> {
        // A hint must never outlive the settle time: a purged tombstone's key would take the
        // hinted older write back (see `anti_entropy`).
        let defaults = HintLimits::default();
        let age_max_us = defaults.age_max_us.min(anti_entropy.settle_ms.saturating_mul(1000));
        let mut hints = Hints::new(HintLimits { age_max_us, ..defaults });
        let mut kept = Vec::new();
        for logged in hint_log::load(&storage, shard_dir).await? {
            let versions: Rc<[u8]> = Rc::from(logged.versions.as_slice());
            let size = logged.key.len() + versions.len();
            let id = hints.add(logged.target, (logged.key.clone(), versions), size, monotonic_us());
            kept.push(LoggedHint { id, ..logged });
        }
        // Under the ids this run uses, and without the history of the last.
        hint_log::rewrite(&storage, shard_dir, &kept).await?;
        Ok(ClusterShard {
            actor,
            view: RefCell::new(view),
            peers,
            lease,
            hints: RefCell::new(hints),
            hint_log_pending: RefCell::new(Vec::new()),
            hint_log: RefCell::new(Some(HintLog::new(storage, shard_dir))),
            stats: ReplicationStats::default(),
            membership: RefCell::new(None),
            serial_turns: RefCell::new(std::collections::HashMap::new()),
            anti_entropy,
        })
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    pub fn set_view(&self, view: Arc<ClusterView>) {
        *self.view.borrow_mut() = view;
    }

    pub fn hints_pending(&self) -> (usize, usize, u64) {
        let hints = self.hints.borrow();
        (hints.pending_count(), hints.pending_bytes(), hints.dropped_count)
    }

    pub fn stats_json(&self) -> serde_json::Value {
        let (hints_pending, hint_bytes, hints_dropped) = self.hints_pending();
        let view = self.view();
        let stats = &self.stats;
        serde_json::json!({
            "formed": view.formed.is_some(),
            "nodes_known": view.nodes.len(),
            "nodes_up": view.nodes.values().filter(|n| n.up).count(),
            "hints_pending": hints_pending,
            "hint_bytes_pending": hint_bytes,
            "hints_dropped": hints_dropped,
            "hints_written": stats.hint_count.get(),
            "hints_replayed": stats.hint_replayed_count.get(),
            "read_repairs": stats.read_repair_count.get(),
            "forwarded": stats.forwarded_count.get(),
            "unavailable": stats.unavailable_count.get(),
            "siblings_full": stats.siblings_full_count.get(),
            "oversized_merges": stats.oversized_merge_count.get(),
            "anti_entropy": {
                "passes": stats.anti_entropy.passes.get(),
                "last_pass_ms": stats.anti_entropy.last_pass_ms.get(),
                "partitions_compared": stats.anti_entropy.partitions_compared.get(),
                "partitions_differing": stats.anti_entropy.partitions_differing.get(),
                "keys_repaired": stats.anti_entropy.keys_repaired.get(),
                "tombstones_purged": stats.anti_entropy.tombstones_purged.get(),
            },
            "streamed_bytes": stats.anti_entropy.streamed_bytes.get(),
            "streamed_keys": stats.anti_entropy.streamed_keys.get(),
            "moved_keys_dropped": stats.anti_entropy.moved_keys_dropped.get(),
        })
    }

    pub(super) fn add_hint(&self, target: NodeId, key: &[u8], versions: &Rc<[u8]>) {
        let size = key.len() + versions.len();
        let id = self.hints.borrow_mut().add(target, (key.to_vec(), versions.clone()), size, monotonic_us());
        let logged = LoggedHint { id, target, key: key.to_vec(), versions: versions.to_vec() };
        self.hint_log_pending.borrow_mut().extend(hint_log::add_record(&logged));
        self.stats.hint_count.set(self.stats.hint_count.get() + 1);
    }

    pub(super) fn hint_acknowledged(&self, target: NodeId, id: u64) {
        self.hints.borrow_mut().acknowledged(target, id);
        self.hint_log_pending.borrow_mut().extend(hint_log::acknowledged_record(target, id));
        self.stats.hint_replayed_count.set(self.stats.hint_replayed_count.get() + 1);
    }
}

pub(super) fn monotonic_us() -> u64 {
    thread_local! {
        static START: Instant = Instant::now();
    }
    START.with(|start| start.elapsed().as_micros() as u64)
}
