//! `hypervisor-shim bench`: measures the platform's figures and writes them as JSON.
//!
//! Every figure is the median of several runs on this machine, measured in one invocation
//! together with the floor it should be compared against. Timings on a nested-virtualized
//! host are noisy; the samples are kept in the output so the spread is visible.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

/// Benchmark failures.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A child run of the shim could not be started.
    #[error("cannot run {0}: {1}")]
    Spawn(PathBuf, std::io::Error),
    /// A child run failed.
    #[error("benchmark run failed (exit code {code:?}): {stderr}")]
    RunFailed {
        /// Its exit code.
        code: Option<i32>,
        /// Its diagnostics.
        stderr: String,
    },
    /// A child run's summary could not be read.
    #[error("cannot read the summary of a benchmark run: {0}")]
    Summary(String),
    /// The output could not be written.
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// A figure: median plus the samples it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Median of `samples`.
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Every sample, in measurement order.
    pub samples: Vec<f64>,
}

impl Figure {
    /// Builds a figure from samples (at least one).
    pub fn from_samples(samples: Vec<f64>) -> Figure {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Figure {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            samples,
        }
    }
}

/// Everything `bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Median boot time: shim `main` entry to the guest's first HELLO, in µs.
    pub boot_us: f64,
    /// Median boot time counted from the moment the benchmark spawned the shim process
    /// (includes exec and dynamic linking), in µs.
    pub boot_from_spawn_us: f64,
    /// Floor for the previous figure: spawning `hypervisor-shim --version` and waiting for it
    /// to exit, in µs.
    pub process_spawn_floor_us: f64,
    /// Details per figure.
    pub details: std::collections::BTreeMap<String, Figure>,
    /// Boots measured for each boot figure.
    pub runs: usize,
}

/// Options for [`run`].
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The shim binary to measure (normally this one).
    pub shim: PathBuf,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Boots per boot figure.
    pub runs: usize,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC now, in ns (comparable across processes on this machine).
pub fn now_monotonic_ns() -> u64 {
    monotonic_ns()
}

fn boot_once(opts: &BenchOptions, summary: &Path) -> Result<(f64, f64), BenchError> {
    let spawned = monotonic_ns();
    let out = Command::new(&opts.shim)
        .args(["run", "--app", "hello", "--timeout", "30", "--summary"])
        .arg(summary)
        .arg("--kernel")
        .arg(&opts.kernel)
        .output()
        .map_err(|e| BenchError::Spawn(opts.shim.clone(), e))?;
    if !out.status.success() {
        return Err(BenchError::RunFailed {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let text = std::fs::read_to_string(summary).map_err(|e| BenchError::Summary(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| BenchError::Summary(e.to_string()))?;
    let boot = v["boot_us"].as_f64().ok_or_else(|| BenchError::Summary("no boot_us".into()))?;
    let main_at = v["started_monotonic_ns"].as_u64().ok_or_else(|| BenchError::Summary("no start time".into()))?;
    let from_spawn = main_at.saturating_sub(spawned) as f64 / 1000.0 + boot;
    Ok((boot, from_spawn))
}

/// Runs the benchmarks.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let dir = std::env::temp_dir().join(format!("hypervisor-shim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Write(dir.clone(), e))?;
    let summary = dir.join("boot.json");
    let (mut boots, mut from_spawn, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.runs {
        let (b, s) = boot_once(opts, &summary)?;
        boots.push(b);
        from_spawn.push(s);
        let t = Instant::now();
        Command::new(&opts.shim).arg("--version").output().map_err(|e| BenchError::Spawn(opts.shim.clone(), e))?;
        floor.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut details = std::collections::BTreeMap::new();
    let boot = Figure::from_samples(boots);
    let spawn = Figure::from_samples(from_spawn);
    let floor = Figure::from_samples(floor);
    let report = BenchReport {
        boot_us: boot.median,
        boot_from_spawn_us: spawn.median,
        process_spawn_floor_us: floor.median,
        details: std::collections::BTreeMap::new(),
        runs: opts.runs,
    };
    details.insert("boot_us".into(), boot);
    details.insert("boot_from_spawn_us".into(), spawn);
    details.insert("process_spawn_floor_us".into(), floor);
    Ok(BenchReport { details, ..report })
}

/// Writes the report as pretty JSON.
pub fn write(report: &BenchReport, path: &Path) -> Result<(), BenchError> {
    let json = serde_json::to_string_pretty(report).map_err(|e| BenchError::Write(path.into(), e.into()))?;
    std::fs::write(path, json + "\n").map_err(|e| BenchError::Write(path.into(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(Figure::from_samples(vec![3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Figure::from_samples(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
        let f = Figure::from_samples(vec![5.0]);
        assert_eq!((f.min, f.max, f.median), (5.0, 5.0, 5.0));
    }
}
