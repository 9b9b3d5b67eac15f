//! kvbench: closed- and open-loop load against kv (native protocol) or any RESP server, with
//! HdrHistogram latencies corrected for coordinated omission.
//!
//! Closed loop: `connections x pipeline` slots each send a request as soon as the previous
//! reply arrives; a reply slower than the slot's expected interval (its median latency in the
//! warm-up) is recorded with the samples the stall hid (`record_correct`). Open loop: each
//! slot has a schedule at `rate / slots` requests per second and latency is measured from the
//! scheduled time, so a stalled server is charged for every request it delayed.

pub mod args;
mod batch;
pub mod report;
pub mod sweep;
pub mod target;
pub mod workload;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::SeedableRng;

use args::Args;
use report::{RunResult, Stats};
use target::{Outcome, Target};
use workload::{Op, OpKind, Workload};

const PHASE_WARMUP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
const PHASE_STOP: u8 = 2;

pub(crate) struct Shared {
    phase: AtomicU8,
    completed: AtomicU64,
    errors: AtomicU64,
    /// Closed loop: the expected interval between a slot's requests, for the correction.
    expected_interval_us: AtomicU64,
}

/// Counts one measured request in `stats`. In the closed loop (`closed_loop`) a latency
/// beyond the expected interval (`expected_us`, 0: not known yet) also records the samples
/// the stall hid.
fn record(
    stats: &mut Stats,
    kind: OpKind,
    outcome: Outcome,
    latency_us: u64,
    expected_us: u64,
    closed_loop: bool,
) {
    stats.op_count[kind.index()] += 1;
    let histogram = &mut stats.latency_us[kind.index()];
    let _ = if closed_loop && expected_us > 0 {
        histogram.record_correct(latency_us, expected_us)
    } else {
        histogram.record(latency_us)
    };
    match outcome {
        Outcome::Hit => stats.hit_count += 1,
        Outcome::Miss => stats.miss_count += 1,
        Outcome::CasFailed => stats.cas_failed_count += 1,
        Outcome::Error => stats.error_count += 1,
        Outcome::Timeout => stats.timeout_count += 1,
        Outcome::Written => {}
    }
}

/// Seconds of CPU used by this process.
fn own_cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe_zeroed_rusage();
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn unsafe_zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Seconds of CPU used so far by the processes in `pids` (from /proc/PID/stat).
fn process_cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        total += (utime + stime) / ticks;
    }
    Some(total)
}

async fn connect_all(args: &Args) -> anyhow::Result<Vec<Target>> {
    let mut targets = Vec::with_capacity(args.connections);
    for _ in 0..args.connections.max(1) {
        let addresses: Vec<&str> = args.addr.split(',').collect();
        let address = addresses[targets.len() % addresses.len()];
        targets.push(Target::connect(args.protocol, address, args).await?);
    }
    Ok(targets)
}

/// Writes every key once with the standard value, `connections x pipeline` at a time.
pub async fn preload(
    targets: &[Target],
    workload: &Arc<Workload>,
    pipeline: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for target in targets {
        for _ in 0..pipeline.max(1) {
            let (target, workload, next, failures) =
                (target.clone(), workload.clone(), next.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= workload.key_count {
                        return;
                    }
                    let size = workload.standard_value().len();
                    let op = Op { kind: OpKind::Put, key: workload.key(index), value_size: size, ttl: None };
                    if target.execute(&op, &workload, timeout).await != Outcome::Written {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await?;
    }
    let failures = failures.load(Ordering::Relaxed);
    anyhow::ensure!(failures == 0, "{failures} preload writes failed");
    Ok(())
}

/// One run at `rate` operations per second (0: closed loop).
/// A run's summary and its merged latency histogram (all operations).
pub struct Measured {
    pub result: RunResult,
    pub latency_us: hdrhistogram::Histogram<u64>,
}

pub async fn run_once(args: &Args, rate: u64, preloaded: bool) -> anyhow::Result<Measured> {
    let workload = Arc::new(Workload::from_args(args)?);
    let targets = connect_all(args).await?;
    if !args.no_preload && !preloaded {
        let start = Instant::now();
        preload(&targets, &workload, args.pipeline, args.timeout)
            .await
            .context("preloading the key space")?;
        if !args.quiet {
            eprintln!("preloaded {} keys in {:.1} s", workload.key_count, start.elapsed().as_secs_f64());
        }
    }
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(PHASE_WARMUP),
        completed: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        expected_interval_us: AtomicU64::new(0),
    });
    // RESP and the native protocol in a closed loop: one batch driver per connection (see
    // batch.rs).
    let batched = matches!(args.protocol, args::Protocol::Resp | args::Protocol::Native) && rate == 0;
    let slot_count = if batched { targets.len() } else { targets.len() * args.pipeline.max(1) };
    let slot_stats: Vec<Arc<Mutex<Stats>>> = (0..slot_count).map(|_| Arc::default()).collect();
    let warmup_latency = Arc::new(Mutex::new(report::new_histogram()));
    let start = Instant::now() + Duration::from_millis(10);
    let mut slots = Vec::with_capacity(slot_count);
    for (index, stats) in slot_stats.iter().enumerate() {
        if batched && args.protocol == args::Protocol::Native {
            let rng = SmallRng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
            slots.push(tokio::spawn(batch::drive_native(
                targets[index].clone(),
                workload.clone(),
                args.pipeline,
                args.timeout,
                shared.clone(),
                stats.clone(),
                warmup_latency.clone(),
                rng,
            )));
            continue;
        }
        if batched {
            let addresses: Vec<&str> = args.addr.split(',').collect();
            let address = addresses[index % addresses.len()].to_string();
            let rng = SmallRng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
            let drive = batch::drive_connection(
                address,
                workload.clone(),
                args.pipeline,
                shared.clone(),
                stats.clone(),
                warmup_latency.clone(),
                rng,
            );
            slots.push(tokio::spawn(async move {
                if let Err(error) = drive.await {
                    eprintln!("connection failed: {error:#}");
                }
            }));
            continue;
        }
        let target = targets[index % targets.len()].clone();
        let (workload, shared, stats, warmup_latency) =
            (workload.clone(), shared.clone(), stats.clone(), warmup_latency.clone());
        let timeout = args.timeout;
        let mut rng = SmallRng::seed_from_u64(args.seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
        // Open loop: this slot's share of the rate, its schedule offset by its index.
        let interval = (rate > 0).then(|| Duration::from_secs_f64(slot_count as f64 / rate as f64));
        let mut intended =
            start + interval.map_or(Duration::ZERO, |i| i.mul_f64(index as f64 / slot_count as f64));
        slots.push(tokio::spawn(async move {
            loop {
                let phase = shared.phase.load(Ordering::Relaxed);
                if phase == PHASE_STOP {
                    return;
                }
                let op = workload.next_op(&mut rng);
                let sent = match interval {
                    Some(interval) => {
                        // Behind schedule (the previous reply came after this request was due):
                        // the server delayed it, so latency counts from the scheduled time.
                        // On schedule: any lateness is the timer's (tokio wakes with 1 ms
                        // granularity), not the server's, so latency counts from the send.
                        let behind = Instant::now() >= intended;
                        tokio::time::sleep_until(intended.into()).await;
                        let scheduled = intended;
                        intended += interval;
                        if behind {
                            scheduled
                        } else {
                            Instant::now()
                        }
                    }
                    None => Instant::now(),
                };
                let outcome = target.execute(&op, &workload, timeout).await;
                let latency_us = (sent.elapsed().as_micros() as u64).max(1);
                shared.completed.fetch_add(1, Ordering::Relaxed);
                if matches!(outcome, Outcome::Error | Outcome::Timeout) {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
                match phase {
                    PHASE_WARMUP => {
                        if let Ok(mut histogram) = warmup_latency.lock() {
                            let _ = histogram.record(latency_us);
                        }
                    }
                    _ => {
                        let Ok(mut stats) = stats.lock() else { return };
                        let expected = shared.expected_interval_us.load(Ordering::Relaxed);
                        record(&mut stats, op.kind, outcome, latency_us, expected, interval.is_none());
                    }
                }
            }
        }));
    }

    tokio::time::sleep_until((start + args.warmup).into()).await;
    let median_us = warmup_latency.lock().map(|h| h.value_at_quantile(0.5)).unwrap_or(0);
    shared.expected_interval_us.store(median_us, Ordering::Relaxed);
    let measure_start = Instant::now();
    let client_cpu_start = own_cpu_seconds();
    let server_cpu_start = process_cpu_seconds(&args.server_pid);
    let completed_start = shared.completed.load(Ordering::Relaxed);
    shared.phase.store(PHASE_MEASURE, Ordering::Relaxed);

    let mut last = (measure_start, completed_start);
    while measure_start.elapsed() < args.duration {
        let remaining = args.duration.saturating_sub(measure_start.elapsed());
        tokio::time::sleep(remaining.min(Duration::from_secs(1))).await;
        if !args.quiet {
            let now = Instant::now();
            let completed = shared.completed.load(Ordering::Relaxed);
            let rate_now = (completed - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
            last = (now, completed);
            let mut merged = Stats::default();
            for stats in &slot_stats {
                if let Ok(stats) = stats.lock() {
                    merged.merge(&stats);
                }
            }
            let p99_ms = merged.all_latency_us().value_at_quantile(0.99) as f64 / 1000.0;
            eprintln!(
                "[{:>5.1}s] {:>10.0} ops/s  errors {}  p99 so far {:.3} ms",
                measure_start.elapsed().as_secs_f64(),
                rate_now,
                shared.errors.load(Ordering::Relaxed),
                p99_ms
            );
        }
    }
    shared.phase.store(PHASE_STOP, Ordering::Relaxed);
    let seconds = measure_start.elapsed().as_secs_f64();
    let client_cpu = (own_cpu_seconds() - client_cpu_start) / seconds;
    let server_cpu = match (server_cpu_start, process_cpu_seconds(&args.server_pid)) {
        (Some(start), Some(end)) => Some((end - start) / seconds),
        _ => None,
    };
    for slot in slots {
        let _ = tokio::time::timeout(args.timeout + Duration::from_secs(1), slot).await;
    }
    let mut merged = Stats::default();
    for stats in &slot_stats {
        if let Ok(stats) = stats.lock() {
            merged.merge(&stats);
        }
    }
    let result = RunResult::new(&merged, seconds, rate, client_cpu, server_cpu);
    Ok(Measured { result, latency_us: merged.all_latency_us() })
}

#[derive(serde::Serialize)]
struct Output<'a> {
    args: &'a Args,
    result: &'a RunResult,
}

/// Writes every key once and reports how fast.
async fn preload_only(args: &Args) -> anyhow::Result<()> {
    let workload = Arc::new(Workload::from_args(args)?);
    let targets = connect_all(args).await?;
    let start = Instant::now();
    preload(&targets, &workload, args.pipeline, args.timeout).await.context("preloading the key space")?;
    let seconds = start.elapsed().as_secs_f64();
    let bytes = workload.key_count as f64 * (args.key_size + workload.standard_value().len()) as f64;
    println!(
        "preloaded {} keys of {} B with {} B values in {seconds:.1} s: {:.0} ops/s, {:.1} MB/s of keys and values",
        workload.key_count,
        args.key_size,
        workload.standard_value().len(),
        workload.key_count as f64 / seconds,
        bytes / seconds / 1e6
    );
    if let Some(path) = &args.json {
        let output = serde_json::json!({
            "keys": workload.key_count,
            "key_size": args.key_size,
            "value_size": workload.standard_value().len(),
            "seconds": seconds,
            "ops_per_sec": workload.key_count as f64 / seconds,
            "bytes_per_sec": bytes / seconds,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&output)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.sweep {
        return sweep::run(&args).await;
    }
    if args.preload_only {
        return preload_only(&args).await;
    }
    let Measured { result, latency_us } = run_once(&args, args.rate, false).await?;
    let mode = if args.rate > 0 { format!("open loop at {} ops/s", args.rate) } else { "closed loop".into() };
    println!(
        "{} {} x{} pipeline {}, {:.0}% reads, {} keys ({}), {} B values, {:.1} s: {:.0} ops/s",
        args.addr,
        mode,
        args.connections,
        args.pipeline,
        args.read_ratio * 100.0,
        args.keys,
        args.distribution,
        args.value_size,
        result.seconds,
        result.ops_per_sec
    );
    print!("{}", result.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&Output { args: &args, result: &result })?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.hgrm {
        report::write_hgrm(path, &latency_us)?;
    }
    Ok(())
}
