//! Wall-clock time and the shard's hybrid logical clock.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Timestamps that never go backwards and never repeat within a shard, even when the wall
/// clock steps back: each is `max(wall clock, previous + 1)` in microseconds.
#[derive(Debug, Default)]
pub struct Hlc {
    last_us: Cell<u64>,
}

impl Hlc {
    pub fn now(&self) -> u64 {
        let next = now_us().max(self.last_us.get() + 1);
        self.last_us.set(next);
        next
    }

    /// Moves the clock past a timestamp seen in the log or from a peer.
    pub fn observe(&self, timestamp_us: u64) {
        if timestamp_us > self.last_us.get() {
            self.last_us.set(timestamp_us);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hlc_is_strictly_increasing_past_observed_times() {
        let hlc = Hlc::default();
        let future = now_us() + 10_000_000;
        hlc.observe(future);
        let a = hlc.now();
        let b = hlc.now();
        assert!(a > future && b > a);
    }
}
