//! Hinted handoff bookkeeping, sans-IO: writes a coordinator keeps for a replica that was down,
//! bounded in count, bytes and age, replayed in order once the replica is back, and dropped
//! only when it acknowledges them. Hints never count toward W; when a bound drops a hint,
//! anti-entropy is what repairs that replica, and the drop is counted so that an operator
//! sees it. (Durability of the hints, in a log like the shard's, comes with the wiring.)

use std::collections::{BTreeMap, VecDeque};

use crate::ring::NodeId;

#[derive(Debug, Clone, Copy)]
pub struct HintLimits {
    pub count_max: usize,
    pub bytes_max: usize,
    pub age_max_us: u64,
    /// Hints sent to a replica at once, before waiting for their acknowledgements.
    pub batch_max: usize,
}

impl Default for HintLimits {
    fn default() -> Self {
        // Three hours, Cassandra's default window; the byte bound is what protects the
        // coordinator's memory and disk.
        HintLimits {
            count_max: 1 << 20,
            bytes_max: 256 << 20,
            age_max_us: 3 * 3600 * 1_000_000,
            batch_max: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint<W> {
    pub id: u64,
    pub created_us: u64,
    pub size: usize,
    pub write: W,
}

#[derive(Debug)]
struct Queue<W> {
    hints: VecDeque<Hint<W>>,
    /// Ids sent and not yet acknowledged.
    in_flight: Vec<u64>,
}

/// The hints a coordinator holds, per target replica.
#[derive(Debug)]
pub struct Hints<W> {
    limits: HintLimits,
    queues: BTreeMap<NodeId, Queue<W>>,
    next_id: u64,
    count: usize,
    bytes: usize,
    pub dropped_count: u64,
}

impl<W: Clone> Hints<W> {
    pub fn new(limits: HintLimits) -> Hints<W> {
        Hints { limits, queues: BTreeMap::new(), next_id: 1, count: 0, bytes: 0, dropped_count: 0 }
    }

    pub fn pending_count(&self) -> usize {
        self.count
    }

    pub fn pending_bytes(&self) -> usize {
        self.bytes
    }

    /// Every hint kept, with its target (what a rewritten hint log holds).
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, &Hint<W>)> {
        self.queues.iter().flat_map(|(&target, queue)| queue.hints.iter().map(move |hint| (target, hint)))
    }

    /// Targets with hints pending.
    pub fn targets(&self) -> Vec<NodeId> {
        self.queues.iter().filter(|(_, queue)| !queue.hints.is_empty()).map(|(&target, _)| target).collect()
    }

    /// Keeps `write` (of `size` bytes) for `target` and returns its id. Over a bound, the
    /// oldest hints go first.
    pub fn add(&mut self, target: NodeId, write: W, size: usize, now_us: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let queue = self
            .queues
            .entry(target)
            .or_insert_with(|| Queue { hints: VecDeque::new(), in_flight: Vec::new() });
        queue.hints.push_back(Hint { id, created_us: now_us, size, write });
        self.count += 1;
        self.bytes += size;
        while self.count > self.limits.count_max || self.bytes > self.limits.bytes_max {
            if !self.drop_oldest() {
                break;
            }
        }
        id
    }

    fn drop_oldest(&mut self) -> bool {
        let oldest = self
            .queues
            .iter()
            .filter_map(|(&target, queue)| queue.hints.front().map(|hint| (hint.created_us, hint.id, target)))
            .min();
        let Some((_, _, target)) = oldest else { return false };
        self.remove_front(target);
        self.dropped_count += 1;
        true
    }

    fn remove_front(&mut self, target: NodeId) {
        if let Some(queue) = self.queues.get_mut(&target) {
            if let Some(hint) = queue.hints.pop_front() {
                queue.in_flight.retain(|&id| id != hint.id);
                self.count -= 1;
                self.bytes -= hint.size;
            }
        }
    }

    /// Drops hints older than the age bound (counted).
    pub fn expire(&mut self, now_us: u64) {
        let targets: Vec<NodeId> = self.queues.keys().copied().collect();
        for target in targets {
            while self.queues[&target]
                .hints
                .front()
                .is_some_and(|hint| now_us.saturating_sub(hint.created_us) > self.limits.age_max_us)
            {
                self.remove_front(target);
                self.dropped_count += 1;
            }
        }
    }

    /// The next hints to replay to `target` (which is up again): the oldest not already in
    /// flight, up to the batch bound, in the order they were written.
    pub fn replay(&mut self, target: NodeId) -> Vec<Hint<W>> {
        let Some(queue) = self.queues.get_mut(&target) else { return Vec::new() };
        let room = self.limits.batch_max.saturating_sub(queue.in_flight.len());
        let batch: Vec<Hint<W>> = queue
            .hints
            .iter()
            .filter(|hint| !queue.in_flight.contains(&hint.id))
            .take(room)
            .cloned()
            .collect();
        queue.in_flight.extend(batch.iter().map(|hint| hint.id));
        batch
    }

    /// `target` made hint `id` durable: it is done.
    pub fn acknowledged(&mut self, target: NodeId, id: u64) {
        let Some(queue) = self.queues.get_mut(&target) else { return };
        let Some(position) = queue.hints.iter().position(|hint| hint.id == id) else { return };
        if let Some(hint) = queue.hints.remove(position) {
            queue.in_flight.retain(|&in_flight| in_flight != id);
            self.count -= 1;
            self.bytes -= hint.size;
        }
    }

    /// A replay to `target` failed or timed out: its in-flight hints are sent again later.
    pub fn replay_failed(&mut self, target: NodeId) {
        if let Some(queue) = self.queues.get_mut(&target) {
            queue.in_flight.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HintLimits {
        HintLimits { count_max: 4, bytes_max: 1_000, age_max_us: 10_000, batch_max: 2 }
    }

    #[test]
    fn hints_replay_in_order_in_batches_and_leave_only_when_acknowledged() {
        let mut hints = Hints::new(limits());
        for (i, write) in ["a", "b", "c"].into_iter().enumerate() {
            hints.add(7, write, 10, i as u64);
        }
        let first: Vec<_> = hints.replay(7).into_iter().map(|h| h.write).collect();
        assert_eq!(first, vec!["a", "b"]);
        assert!(hints.replay(7).is_empty(), "the batch bound holds while two are in flight");
        hints.acknowledged(7, 1);
        let next: Vec<_> = hints.replay(7).into_iter().map(|h| h.write).collect();
        assert_eq!(next, vec!["c"]);
        hints.replay_failed(7);
        let again: Vec<_> = hints.replay(7).into_iter().map(|h| h.write).collect();
        assert_eq!(again, vec!["b", "c"], "unacknowledged hints are sent again");
        hints.acknowledged(7, 2);
        hints.acknowledged(7, 3);
        assert_eq!((hints.pending_count(), hints.pending_bytes(), hints.dropped_count), (0, 0, 0));
    }

    #[test]
    fn bounds_drop_the_oldest_and_count_it() {
        let mut hints = Hints::new(limits());
        for i in 0..6u64 {
            hints.add(i as NodeId % 2, i, 100, i);
        }
        assert_eq!(hints.pending_count(), 4);
        assert_eq!(hints.dropped_count, 2);
        let kept: Vec<u64> = hints.replay(0).into_iter().chain(hints.replay(1)).map(|h| h.write).collect();
        assert_eq!(kept, vec![2, 4, 3, 5]);
        hints.add(0, 99, 900, 6);
        assert!(hints.pending_bytes() <= 1_000);
        hints.expire(50_000);
        assert_eq!(hints.pending_count(), 0);
    }
}
