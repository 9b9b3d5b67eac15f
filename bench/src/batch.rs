//! The closed loop the way redis-benchmark drives a server: each connection sends its whole
//! pipeline in one write, then reads that many replies, and every request of the batch counts
//! its latency from that write. One task per connection, its statistics kept by the task (one
//! lock per batch, not per request). Over RESP no channel or timer per request either, so the
//! load generator costs little per request and its ratios measure servers; over the native
//! protocol the requests go through the `client` crate, as an application's would.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::report::Stats;
use futures::future::join_all;

use crate::target::{resp_command_into, Outcome, Target};
use crate::workload::{OpKind, Workload};
use crate::{record, Shared, PHASE_STOP, PHASE_WARMUP};

/// One reply's kind, as far as the statistics care.
fn outcome(kind: OpKind, first: u8, number: i64) -> Outcome {
    match (first, kind) {
        (b'-', _) => Outcome::Error,
        (b'$', _) if number < 0 => Outcome::Miss,
        (b'$', _) => Outcome::Hit,
        (b':', OpKind::Cas) if number == 0 => Outcome::CasFailed,
        _ => Outcome::Written,
    }
}

/// Received bytes not yet parsed: `buffer[start..end]`.
struct Input {
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    /// The next line (without CRLF), reading more as needed.
    async fn line(&mut self, stream: &mut TcpStream) -> anyhow::Result<(usize, usize)> {
        loop {
            if let Some(at) = self.buffer[self.start..self.end].windows(2).position(|w| w == b"\r\n") {
                let line = (self.start, self.start + at);
                self.start += at + 2;
                return Ok(line);
            }
            self.fill(stream).await?;
        }
    }

    /// Skips `count` bytes, reading as needed.
    async fn skip(&mut self, mut count: usize, stream: &mut TcpStream) -> anyhow::Result<()> {
        loop {
            let available = (self.end - self.start).min(count);
            self.start += available;
            count -= available;
            if count == 0 {
                return Ok(());
            }
            self.fill(stream).await?;
        }
    }

    async fn fill(&mut self, stream: &mut TcpStream) -> anyhow::Result<()> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buffer.len() {
            self.buffer.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.end == self.buffer.len() {
                self.buffer.resize(2 * self.buffer.len(), 0);
            }
        }
        let count = stream.read(&mut self.buffer[self.end..]).await?;
        anyhow::ensure!(count > 0, "the server closed the connection");
        self.end += count;
        Ok(())
    }

    /// Reads one whole reply; returns its type byte and its number (length or integer).
    async fn reply(&mut self, stream: &mut TcpStream) -> anyhow::Result<(u8, i64)> {
        let (from, to) = self.line(stream).await?;
        anyhow::ensure!(to > from, "an empty reply line");
        let first = self.buffer[from];
        let number = || -> i64 {
            std::str::from_utf8(&self.buffer[from + 1..to]).ok().and_then(|t| t.parse().ok()).unwrap_or(0)
        };
        let number = match first {
            b'$' | b':' | b'*' => number(),
            _ => 0,
        };
        match first {
            b'$' if number >= 0 => self.skip(number as usize + 2, stream).await?,
            b'*' => {
                for _ in 0..number.max(0) {
                    Box::pin(self.reply(stream)).await?;
                }
            }
            _ => {}
        }
        Ok((first, number))
    }
}

/// Drives one connection to `address` until the run stops.
pub async fn drive_connection(
    address: String,
    workload: Arc<Workload>,
    pipeline: usize,
    shared: Arc<Shared>,
    stats: Arc<Mutex<Stats>>,
    warmup_latency: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
    mut rng: SmallRng,
) -> anyhow::Result<()> {
    let mut stream =
        TcpStream::connect(&address).await.with_context(|| format!("connecting to {address}"))?;
    stream.set_nodelay(true)?;
    let mut out = Vec::new();
    let mut kinds = Vec::with_capacity(pipeline);
    let mut outcomes = Vec::with_capacity(pipeline);
    let mut input = Input { buffer: vec![0; 256 << 10], start: 0, end: 0 };
    loop {
        let phase = shared.phase.load(Ordering::Relaxed);
        if phase == PHASE_STOP {
            return Ok(());
        }
        out.clear();
        kinds.clear();
        outcomes.clear();
        for _ in 0..pipeline.max(1) {
            let op = workload.next_op(&mut rng);
            resp_command_into(&op, &workload, &mut out);
            kinds.push(op.kind);
        }
        let sent = Instant::now();
        stream.write_all(&out).await?;
        for &kind in &kinds {
            let (first, number) = input.reply(&mut stream).await?;
            outcomes.push(outcome(kind, first, number));
        }
        count_batch(phase, sent, &kinds, &outcomes, &shared, &stats, &warmup_latency);
    }
}

/// The same closed loop over the native protocol through the `client` crate: the
/// connection's whole pipeline is issued at once (the client gathers the queued frames into
/// one write), and the batch is done when every reply is in.
#[allow(clippy::too_many_arguments)]
pub async fn drive_native(
    target: Target,
    workload: Arc<Workload>,
    pipeline: usize,
    timeout: Duration,
    shared: Arc<Shared>,
    stats: Arc<Mutex<Stats>>,
    warmup_latency: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
    mut rng: SmallRng,
) {
    let mut ops = Vec::with_capacity(pipeline);
    let mut kinds = Vec::with_capacity(pipeline);
    loop {
        let phase = shared.phase.load(Ordering::Relaxed);
        if phase == PHASE_STOP {
            return;
        }
        ops.clear();
        for _ in 0..pipeline.max(1) {
            ops.push(workload.next_op(&mut rng));
        }
        kinds.clear();
        kinds.extend(ops.iter().map(|op| op.kind));
        let sent = Instant::now();
        let outcomes = join_all(ops.iter().map(|op| target.execute(op, &workload, timeout))).await;
        count_batch(phase, sent, &kinds, &outcomes, &shared, &stats, &warmup_latency);
    }
}

/// Counts a batch sent at `sent` whose replies are all in: every request's latency is the
/// batch's.
fn count_batch(
    phase: u8,
    sent: Instant,
    kinds: &[OpKind],
    outcomes: &[Outcome],
    shared: &Shared,
    stats: &Mutex<Stats>,
    warmup_latency: &Mutex<hdrhistogram::Histogram<u64>>,
) {
    let latency_us = (sent.elapsed().as_micros() as u64).max(1);
    shared.completed.fetch_add(kinds.len() as u64, Ordering::Relaxed);
    let errors = outcomes.iter().filter(|o| matches!(o, Outcome::Error | Outcome::Timeout)).count();
    shared.errors.fetch_add(errors as u64, Ordering::Relaxed);
    if phase == PHASE_WARMUP {
        if let Ok(mut histogram) = warmup_latency.lock() {
            let _ = histogram.record_n(latency_us, kinds.len() as u64);
        }
        return;
    }
    let expected = shared.expected_interval_us.load(Ordering::Relaxed);
    let Ok(mut stats) = stats.lock() else { return };
    for (&kind, &outcome) in kinds.iter().zip(outcomes) {
        record(&mut stats, kind, outcome, latency_us, expected, true);
    }
}
