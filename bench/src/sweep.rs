//! `--sweep`: the throughput-latency curve. A short closed-loop run finds the peak; open-loop
//! runs then climb from 10 % of it in steps of 10 % until p99 exceeds the target (or errors
//! appear). The curve goes to `--json` and to an SVG plot.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::args::Args;
use crate::run_once;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub rate_target: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub errors: u64,
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let mut probe = args.clone();
    probe.duration = args.duration.min(Duration::from_secs(5));
    let peak = run_once(&probe, 0, false).await?.result.ops_per_sec;
    eprintln!("closed-loop peak {peak:.0} ops/s; sweeping open-loop rates");
    let target_us = (args.target_p99_ms * 1000.0) as u64;
    let mut points = Vec::new();
    for step in 1..=20u64 {
        let rate = (peak * step as f64 / 10.0) as u64;
        let measured = run_once(args, rate.max(1), true).await?.result;
        let point = Point {
            rate_target: rate,
            ops_per_sec: measured.ops_per_sec,
            p50_us: measured.all.p50_us,
            p99_us: measured.all.p99_us,
            p999_us: measured.all.p999_us,
            errors: measured.errors + measured.timeouts,
        };
        println!(
            "rate {:>9} -> {:>9.0} ops/s  p50 {:>8.3} ms  p99 {:>8.3} ms  p99.9 {:>8.3} ms  errors {}",
            point.rate_target,
            point.ops_per_sec,
            point.p50_us as f64 / 1000.0,
            point.p99_us as f64 / 1000.0,
            point.p999_us as f64 / 1000.0,
            point.errors
        );
        let broken = point.p99_us > target_us || point.errors > 0;
        points.push(point);
        if broken {
            break;
        }
    }
    let json_path = args.json.clone().unwrap_or_else(|| PathBuf::from("sweep.json"));
    let svg_path = json_path.with_extension("svg");
    std::fs::write(
        &json_path,
        serde_json::to_vec_pretty(
            &serde_json::json!({"args": args, "peak_closed_loop": peak, "points": points}),
        )?,
    )?;
    std::fs::write(&svg_path, svg(&points, args.target_p99_ms))?;
    println!("curve written to {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// A line plot of p99 (and p50) latency against achieved throughput.
pub fn svg(points: &[Point], target_p99_ms: f64) -> String {
    let (width, height, margin) = (720.0, 440.0, 60.0);
    let x_max = points.iter().map(|p| p.ops_per_sec).fold(1.0, f64::max) * 1.05;
    let y_max = points.iter().map(|p| p.p99_us as f64 / 1000.0).fold(target_p99_ms, f64::max) * 1.1;
    let x = |v: f64| margin + v / x_max * (width - 2.0 * margin);
    let y = |v: f64| height - margin - v / y_max * (height - 2.0 * margin);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<line x1="{m}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{m}" y1="{b}" x2="{m}" y2="{m}" stroke="black"/>"#,
        m = margin,
        b = height - margin,
        r = width - margin
    );
    for tick in 0..=4 {
        let xv = x_max * tick as f64 / 4.0;
        let yv = y_max * tick as f64 / 4.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.0}" y="{:.0}" text-anchor="middle">{:.0}</text>"#,
            x(xv),
            height - margin + 18.0,
            xv
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.0}" y="{:.0}" text-anchor="end">{:.2}</text>"#,
            margin - 6.0,
            y(yv) + 4.0,
            yv
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.0}" y="{:.0}" text-anchor="middle">throughput (ops/s)</text>"#,
        width / 2.0,
        height - 15.0
    );
    let _ = writeln!(
        out,
        r#"<text x="15" y="{:.0}" transform="rotate(-90 15 {:.0})" text-anchor="middle">latency (ms)</text>"#,
        height / 2.0,
        height / 2.0
    );
    let _ = writeln!(
        out,
        r##"<line x1="{m}" y1="{t:.1}" x2="{r}" y2="{t:.1}" stroke="#c00" stroke-dasharray="4 4"/><text x="{r}" y="{:.1}" fill="#c00" text-anchor="end">p99 target</text>"##,
        y(target_p99_ms) - 4.0,
        m = margin,
        r = width - margin,
        t = y(target_p99_ms)
    );
    for (name, color, pick) in [("p99", "#1f77b4", 0), ("p50", "#2ca02c", 1)] {
        let line: Vec<String> = points
            .iter()
            .map(|p| {
                let ms = if pick == 0 { p.p99_us } else { p.p50_us } as f64 / 1000.0;
                format!("{:.1},{:.1}", x(p.ops_per_sec), y(ms))
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            line.join(" ")
        );
        if let Some(last) = line.last() {
            let (lx, ly) = last.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(out, r#"<text x="{lx}" y="{ly}" dx="6" fill="{color}">{name}</text>"#);
        }
    }
    out.push_str("</svg>\n");
    out
}
