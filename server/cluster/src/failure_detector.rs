//! Phi-accrual failure detection (Hayashibara et al., as in Cassandra and Akka), sans-IO: the
//! caller reports heartbeat arrival times and asks for suspicion at a given time; nothing
//! here reads a clock.
//!
//! phi = -log10(P(a heartbeat arrives later than now)), with inter-arrival times modelled as
//! exponential with the observed mean (Cassandra's simplification, robust to jitter): a
//! silence of `t` after the last heartbeat gives phi = t / (mean * ln 10). The mean never
//! drops below a floor, so that a peer heard at a fast steady rate is not declared down by
//! one short pause: with a 1 s heartbeat interval and the default threshold of 8, a node
//! silent for about 18 s is down, and a 1 s pause (SIGSTOP) raises phi only to about 0.4.

use std::collections::VecDeque;
use std::time::Duration;

/// Inter-arrival samples kept per peer.
pub const SAMPLE_COUNT_MAX: usize = 100;
/// Suspicion level from which a peer counts as down.
pub const PHI_THRESHOLD_DEFAULT: f64 = 8.0;

#[derive(Debug, Clone)]
pub struct FailureDetector {
    intervals_us: VecDeque<u64>,
    interval_sum_us: u64,
    last_heartbeat_us: Option<u64>,
    /// The mean inter-arrival time is taken as at least this.
    mean_floor_us: u64,
}

impl FailureDetector {
    /// `expected_interval` seeds the history (so a new peer is judged from its first beat)
    /// and floors the mean.
    pub fn new(expected_interval: Duration) -> FailureDetector {
        let expected_us = expected_interval.as_micros().max(1) as u64;
        let mut intervals_us = VecDeque::with_capacity(SAMPLE_COUNT_MAX);
        intervals_us.push_back(expected_us);
        FailureDetector {
            intervals_us,
            interval_sum_us: expected_us,
            last_heartbeat_us: None,
            mean_floor_us: expected_us,
        }
    }

    /// Records a heartbeat received at `now_us` (a monotonic clock, microseconds).
    pub fn heartbeat(&mut self, now_us: u64) {
        if let Some(last) = self.last_heartbeat_us {
            if now_us <= last {
                return; // duplicated or reordered: no information
            }
            let interval = now_us - last;
            if self.intervals_us.len() == SAMPLE_COUNT_MAX {
                let oldest = self.intervals_us.pop_front().unwrap_or(0);
                self.interval_sum_us -= oldest;
            }
            self.intervals_us.push_back(interval);
            self.interval_sum_us += interval;
        }
        self.last_heartbeat_us = Some(now_us);
    }

    fn mean_us(&self) -> f64 {
        let mean = self.interval_sum_us as f64 / self.intervals_us.len().max(1) as f64;
        mean.max(self.mean_floor_us as f64)
    }

    /// Suspicion at `now_us`: 0 right after a heartbeat, growing linearly with silence.
    pub fn phi(&self, now_us: u64) -> f64 {
        let Some(last) = self.last_heartbeat_us else { return 0.0 };
        let silence = now_us.saturating_sub(last) as f64;
        silence / (self.mean_us() * std::f64::consts::LN_10)
    }

    pub fn is_down(&self, now_us: u64, threshold: f64) -> bool {
        self.phi(now_us) >= threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND_US: u64 = 1_000_000;

    fn steady(interval_us: u64, count: u64) -> FailureDetector {
        let mut detector = FailureDetector::new(Duration::from_micros(interval_us));
        for i in 0..count {
            detector.heartbeat(i * interval_us);
        }
        detector
    }

    #[test]
    fn a_short_pause_is_not_a_failure_and_a_long_silence_is() {
        // Heartbeats every 200 ms; the floor is the 200 ms expectation.
        let detector = steady(200_000, 50);
        let last = 49 * 200_000;
        assert!(
            !detector.is_down(last + SECOND_US, PHI_THRESHOLD_DEFAULT),
            "phi {}",
            detector.phi(last + SECOND_US)
        );
        assert!(
            detector.is_down(last + 5 * SECOND_US, PHI_THRESHOLD_DEFAULT),
            "phi {}",
            detector.phi(last + 5 * SECOND_US)
        );
    }

    #[test]
    fn suspicion_grows_with_silence_and_resets_on_a_heartbeat() {
        let mut detector = steady(100_000, 20);
        let last = 19 * 100_000;
        let phis: Vec<f64> = (1..=5).map(|s| detector.phi(last + s * 100_000)).collect();
        assert!(phis.windows(2).all(|w| w[0] < w[1]), "{phis:?}");
        detector.heartbeat(last + 500_000);
        assert_eq!(detector.phi(last + 500_000), 0.0);
    }

    #[test]
    fn duplicated_and_reordered_heartbeats_are_ignored() {
        let mut detector = steady(100_000, 10);
        let before = detector.clone().phi(2_000_000);
        detector.heartbeat(500_000); // from the past
        assert_eq!(detector.phi(2_000_000), before);
    }

    #[test]
    fn an_unheard_peer_is_not_suspected() {
        let detector = FailureDetector::new(Duration::from_secs(1));
        assert_eq!(detector.phi(10 * SECOND_US), 0.0);
    }
}
