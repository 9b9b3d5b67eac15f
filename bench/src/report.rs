//! Results: latency histograms per operation, the final table, JSON and HdrHistogram text.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

use crate::workload::OP_KINDS;

/// Latencies are recorded in microseconds, up to a minute.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

/// Counters and latencies of one slot (or of a whole run, once merged).
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latencies per operation kind, with coordinated-omission corrections (closed loop)
    /// included, so their counts can exceed `op_count`.
    pub latency_us: [Histogram<u64>; 3],
    /// Operations actually completed, per kind.
    pub op_count: [u64; 3],
    pub hit_count: u64,
    pub miss_count: u64,
    pub cas_failed_count: u64,
    pub error_count: u64,
    pub timeout_count: u64,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            latency_us: [new_histogram(), new_histogram(), new_histogram()],
            op_count: [0; 3],
            hit_count: 0,
            miss_count: 0,
            cas_failed_count: 0,
            error_count: 0,
            timeout_count: 0,
        }
    }
}

impl Stats {
    pub fn merge(&mut self, other: &Stats) {
        for (mine, theirs) in self.latency_us.iter_mut().zip(&other.latency_us) {
            let _ = mine.add(theirs);
        }
        for (mine, theirs) in self.op_count.iter_mut().zip(other.op_count) {
            *mine += theirs;
        }
        self.hit_count += other.hit_count;
        self.miss_count += other.miss_count;
        self.cas_failed_count += other.cas_failed_count;
        self.error_count += other.error_count;
        self.timeout_count += other.timeout_count;
    }

    pub fn all_latency_us(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for histogram in &self.latency_us {
            let _ = all.add(histogram);
        }
        all
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OpSummary {
    pub op: &'static str,
    pub count: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

fn summarize(op: &'static str, count: u64, histogram: &Histogram<u64>, seconds: f64) -> OpSummary {
    OpSummary {
        op,
        count,
        ops_per_sec: count as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.5),
        p90_us: histogram.value_at_quantile(0.9),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
        mean_us: histogram.mean(),
    }
}

/// What one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    pub rate_target: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub ops: Vec<OpSummary>,
    pub all: OpSummary,
    pub hit_ratio: Option<f64>,
    pub errors: u64,
    pub timeouts: u64,
    pub cas_failed: u64,
    /// Cores used by the load generator (CPU seconds per wall second).
    pub client_cpu_cores: f64,
    /// Cores used by the server processes named with --server-pid.
    pub server_cpu_cores: Option<f64>,
    pub latency_corrected_for_coordinated_omission: bool,
}

impl RunResult {
    pub fn new(
        stats: &Stats,
        seconds: f64,
        rate_target: u64,
        client_cpu: f64,
        server_cpu: Option<f64>,
    ) -> RunResult {
        let all = summarize("all", stats.op_count.iter().sum(), &stats.all_latency_us(), seconds);
        let ops = OP_KINDS
            .iter()
            .filter(|kind| stats.op_count[kind.index()] > 0)
            .map(|kind| {
                let index = kind.index();
                summarize(kind.name(), stats.op_count[index], &stats.latency_us[index], seconds)
            })
            .collect();
        let reads = stats.hit_count + stats.miss_count;
        RunResult {
            rate_target,
            seconds,
            ops_per_sec: all.ops_per_sec,
            ops,
            all,
            hit_ratio: (reads > 0).then(|| stats.hit_count as f64 / reads as f64),
            errors: stats.error_count,
            timeouts: stats.timeout_count,
            cas_failed: stats.cas_failed_count,
            client_cpu_cores: client_cpu,
            server_cpu_cores: server_cpu,
            latency_corrected_for_coordinated_omission: true,
        }
    }

    pub fn table(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<5} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "op", "count", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        for row in self.ops.iter().chain(std::iter::once(&self.all)) {
            let _ = writeln!(
                out,
                "{:<5} {:>10} {:>12.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                row.op,
                row.count,
                row.ops_per_sec,
                ms(row.p50_us),
                ms(row.p90_us),
                ms(row.p99_us),
                ms(row.p999_us),
                ms(row.max_us)
            );
        }
        let hit = self.hit_ratio.map_or("n/a".to_string(), |ratio| format!("{:.4}", ratio));
        let server = self.server_cpu_cores.map_or("n/a".to_string(), |cores| format!("{cores:.2}"));
        let _ = writeln!(
            out,
            "hit ratio {hit}, errors {}, timeouts {}, cas failed {}, cpu cores: load generator {:.2}, server {server}",
            self.errors, self.timeouts, self.cas_failed, self.client_cpu_cores
        );
        out
    }
}

/// Writes the percentile distribution of `histogram` in HdrHistogram's text format
/// (values in milliseconds), as plotted by HdrHistogram's plotFiles.html.
pub fn write_hgrm(path: &Path, histogram: &Histogram<u64>) -> std::io::Result<()> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for value in histogram.iter_quantiles(5) {
        let percentile = value.percentile() / 100.0;
        let inverse =
            if percentile < 1.0 { format!("{:14.2}", 1.0 / (1.0 - percentile)) } else { String::new() };
        let _ = writeln!(
            out,
            "{:12.3} {:14.12} {:10} {}",
            value.value_iterated_to() as f64 / 1000.0,
            percentile,
            value.count_since_last_iteration(),
            inverse
        );
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]",
        histogram.mean() / 1000.0,
        histogram.stdev() / 1000.0,
        histogram.max() as f64 / 1000.0,
        histogram.len()
    );
    std::fs::write(path, out)
}
