//! `hypervisor-shim bench`: measures the platform's figures and writes them as JSON.
//!
//! Every figure is the median of several runs on this machine, measured in one invocation
//! together with the floor it should be compared against. Timings on a nested-virtualized
//! host are noisy; the samples are kept in the output so the spread is visible.
//!
//! The sections (`--only SECTION`, repeatable; all of them by default), in the order they run:
//!
//! * `boot`: boot time, from the guest's view and from spawning the shim, against the floor of
//!   a process spawn.
//! * `vcpus`: hypercall and exit round trips, vCPU up and down, kick to wake.
//! * `memory`: memory grants, first touch and release, against the bare memslot floor.
//! * `services`: the kv and http services under `redis-benchmark` and `wrk`, side by side with
//!   Debian's `redis-server` and nginx on this host, quiet and with one busy process, host CPU
//!   time per request, and the http service's 2-vCPU scaling (`services` module).
//! * `serving`: cold starts on demand, and the demo's controller figures, quiet and with one
//!   busy process (`serving` module).
//! * `lifecycle`: pause, resume, snapshot, restore and migration (`lifecycle` module).
//! * `migration`: migration over TCP with mutual TLS between two network namespaces, at min
//!   and with 1 GiB under a guest writing 100k pages a second (`migration` module; needs root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

mod clients;
mod density;
mod host;
mod lifecycle;
mod migration;
mod native;
mod services;
mod serving;
mod vm;

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

/// Everything `bench` measured: headline medians by key (the figure names the README and
/// the issues use), with every figure's samples under `details`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    /// Headline figures (medians).
    #[serde(flatten)]
    pub figures: std::collections::BTreeMap<String, f64>,
    /// Samples and spread per figure.
    pub details: std::collections::BTreeMap<String, Figure>,
    /// Boots measured for the boot figures.
    pub runs: usize,
}

impl BenchReport {
    /// Adds a figure (its median becomes the headline value, scaled by `scale`).
    pub fn add(&mut self, key: &str, samples: Vec<f64>, scale: f64) {
        let scaled: Vec<f64> = samples.iter().map(|v| v * scale).collect();
        let f = Figure::from_samples(scaled);
        self.figures.insert(key.to_string(), f.median);
        self.details.insert(key.to_string(), f);
    }

    /// The headline value of `key`.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.figures.get(key).copied()
    }
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
    /// Sections to measure (empty: all of [`SECTIONS`]).
    pub only: Vec<String>,
}

/// The benchmark's sections, in the order they run.
pub const SECTIONS: &[&str] = &["boot", "vcpus", "memory", "services", "serving", "lifecycle", "migration"];

impl BenchOptions {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_loopback_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// CLOCK_MONOTONIC now, in ns (comparable across processes on this machine).
pub fn now_monotonic_ns() -> u64 {
    monotonic_ns()
}

/// The boot phases of a run's summary (`boot_phases`), in [`BOOT_PHASES`] order.
const BOOT_PHASES: [&str; 6] = ["before_us", "kvm_us", "memory_us", "vcpu_us", "devices_us", "guest_us"];

fn boot_once(opts: &BenchOptions, summary: &Path) -> Result<(f64, f64, Vec<f64>), BenchError> {
    let spawned = monotonic_ns();
    let summary_arg = summary.to_string_lossy();
    run_shim(opts, &["run", "--app", "hello", "--timeout", "30", "--summary", &summary_arg])?;
    let text = std::fs::read_to_string(summary).map_err(|e| BenchError::Summary(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| BenchError::Summary(e.to_string()))?;
    let boot = v["boot_us"].as_f64().ok_or_else(|| BenchError::Summary("no boot_us".into()))?;
    let main_at = v["started_monotonic_ns"].as_u64().ok_or_else(|| BenchError::Summary("no start time".into()))?;
    let from_spawn = main_at.saturating_sub(spawned) as f64 / 1000.0 + boot;
    let phases = BOOT_PHASES.iter().map(|k| v["boot_phases"][*k].as_f64().unwrap_or(0.0)).collect();
    Ok((boot, from_spawn, phases))
}

/// Time from spawning the shim with `args` to reaping it, in µs (output discarded; a failed
/// run is an error). `with_kernel` adds `--kernel`.
fn process_us(opts: &BenchOptions, args: &[&str], with_kernel: bool) -> Result<f64, BenchError> {
    let mut cmd = Command::new(&opts.shim);
    cmd.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    if with_kernel {
        cmd.arg("--kernel").arg(&opts.kernel);
    }
    let t = Instant::now();
    let status = cmd.status().map_err(|e| BenchError::Spawn(opts.shim.clone(), e))?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    if !status.success() {
        return Err(BenchError::RunFailed { code: status.code(), stderr: format!("{args:?} failed") });
    }
    Ok(us)
}

/// Runs the shim with `args` and returns its standard output (failing on a non-zero exit).
fn run_shim(opts: &BenchOptions, args: &[&str]) -> Result<String, BenchError> {
    let out = Command::new(&opts.shim)
        .args(args)
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
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs guest service `app` and merges the sample arrays of its `BENCH {json}` line into
/// `into`.
fn guest_samples(
    opts: &BenchOptions,
    args: &[&str],
    into: &mut std::collections::BTreeMap<String, Vec<f64>>,
) -> Result<(), BenchError> {
    let stdout = run_shim(opts, args)?;
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .ok_or_else(|| BenchError::Summary(format!("the guest printed no BENCH line:\n{stdout}")))?;
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| BenchError::Summary(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| BenchError::Summary("BENCH is not an object".into()))?;
    for (k, arr) in obj {
        let samples = arr.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
        into.entry(k.clone()).or_default().extend::<Vec<f64>>(samples);
    }
    Ok(())
}

/// Runs the benchmarks.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let mut report = BenchReport { runs: opts.runs, ..Default::default() };
    let dir = std::env::temp_dir().join(format!("hypervisor-shim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Write(dir.clone(), e))?;
    let summary = dir.join("boot.json");
    let vcpu_boots = opts.runs.div_ceil(4).max(3);
    let mem_boots = opts.runs.div_ceil(10).max(2);
    let bar = progress_bar((opts.runs + vcpu_boots + mem_boots + 3) as u64);
    let (mut boots, mut from_spawn, mut floor, mut whole) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut phases: Vec<Vec<f64>> = Vec::new();
    for _ in 0..if opts.wants("boot") { opts.runs } else { 0 } {
        progress(&bar, "boot");
        let (b, s, p) = boot_once(opts, &summary)?;
        boots.push(b);
        phases.push(p);
        from_spawn.push(s);
        // The floor: spawn -> reap of a run that only prints its version.
        floor.push(process_us(opts, &["--version"], false)?);
        // A whole hello run, spawn -> reap, as a user or a script sees it.
        whole.push(process_us(opts, &["run", "--app", "hello", "--timeout", "30"], true)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if opts.wants("boot") {
        report.add("boot_us", boots, 1.0);
        for (i, key) in BOOT_PHASES.iter().enumerate() {
            report.add(&format!("boot_phase_{key}"), phases.iter().map(|p| p[i]).collect(), 1.0);
        }
        report.add("boot_from_spawn_us", from_spawn, 1.0);
        report.add("spawn_floor_us", floor, 1.0);
        report.add("hello_process_us", whole, 1.0);
    }
    if let (Some(h), Some(f)) = (report.get("hello_process_us"), report.get("spawn_floor_us")) {
        report.figures.insert("hello_process_over_floor".into(), h / f);
    }

    // vCPU figures, measured inside the guest (several boots: each gives burst-1 fresh ups).
    let vcpu_args = ["run", "--app", "vcpu-bench", "--vcpus", "1:8:8", "--timeout", "60", "--", "50"];
    let vcpu_keys = [
        ("hypercall_rtt_ns", "hypercall_rtt_ns", 1.0),
        ("bare_pio_exit_rtt_ns", "bare_pio_exit_rtt_ns", 1.0),
        ("vcpu_up_fresh_ns", "vcpu_up_fresh_us", 1e-3),
        ("vcpu_up_reused_ns", "vcpu_up_reused_us", 1e-3),
        ("vcpu_down_ns", "vcpu_down_us", 1e-3),
        ("kick_wake_ns", "kick_wake_us", 1e-3),
    ];
    if opts.wants("vcpus") {
        add_guest_figures(opts, &bar, "vCPU figures", vcpu_boots, &vcpu_args, &vcpu_keys, &mut report)?;
    }
    if let (Some(h), Some(f)) = (report.get("hypercall_rtt_ns"), report.get("bare_pio_exit_rtt_ns")) {
        report.figures.insert("hypercall_over_exit".into(), h / f);
    }

    // Memory figures, measured inside the guest, and the host floor in this same run.
    let mem_args = ["run", "--app", "mem-bench", "--memory", "64M:2G:2G", "--timeout", "120", "--", "5"];
    let mem_keys = [
        ("mem_grant_2m_ns", "mem_grant_2m_us", 1e-3),
        ("mem_grant_64m_ns", "mem_grant_64m_us", 1e-3),
        ("mem_grant_1g_ns", "mem_grant_1g_us", 1e-3),
        ("mem_touch_1g_ns", "mem_touch_1g_us", 1e-3),
        ("mem_release_1g_ns", "mem_release_1g_us", 1e-3),
    ];
    if opts.wants("memory") {
        add_guest_figures(opts, &bar, "memory figures", mem_boots, &mem_args, &mem_keys, &mut report)?;
        progress(&bar, "memslot floor");
        report.add("memslot_floor_1g_us", memslot_floor(20)?, 1.0);
    }
    let dir = std::env::temp_dir().join(format!("hypervisor-shim-bench-svc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Write(dir.clone(), e))?;
    let result = (|| {
        if opts.wants("services") {
            progress(&bar, "services (kv, redis-server, http, nginx)");
            let note = |what: &str| {
                if let Some(b) = &bar {
                    b.set_message(format!("services: {what}"));
                }
            };
            services::add(opts, &dir, &mut report, &note)?;
        }
        if opts.wants("serving") {
            progress(&bar, "on demand (cold starts)");
            serving::add_on_demand(opts, &dir, &mut report)?;
            progress(&bar, "a thousand sleeping services");
            density::add(opts, &dir, &mut report)?;
            progress(&bar, "the demo (controller under request load)");
            serving::add_demo(opts, &dir, &mut report)?;
            progress(&bar, "the demo with one busy process");
            serving::add_demo_busy(opts, &dir, &mut report)?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    type Section = fn(&BenchOptions, &Path, &mut BenchReport) -> Result<(), BenchError>;
    let in_work_dir: [(&str, &str, Section); 2] = [
        ("lifecycle", "lifecycle (pause, snapshot, restore, migrate)", lifecycle::add),
        ("migration", "migration over TCP + TLS between network namespaces", migration::add),
    ];
    for (section, what, add) in in_work_dir {
        if opts.wants(section) {
            progress(&bar, what);
            let dir = lifecycle::work_dir();
            std::fs::create_dir_all(&dir).map_err(|e| BenchError::Write(dir.clone(), e))?;
            let result = add(opts, &dir, &mut report);
            let _ = std::fs::remove_dir_all(&dir);
            result?;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(report)
}

/// Boots the shim with `args` `boots` times, pools the samples the guests printed and adds
/// each `(guest key, report key, scale)` of `keys` to `report` as a median.
fn add_guest_figures(
    opts: &BenchOptions,
    bar: &Option<indicatif::ProgressBar>,
    what: &str,
    boots: usize,
    args: &[&str],
    keys: &[(&str, &str, f64)],
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let mut samples = std::collections::BTreeMap::new();
    for _ in 0..boots {
        progress(bar, what);
        guest_samples(opts, args, &mut samples)?;
    }
    for (guest_key, report_key, scale) in keys {
        report.add(report_key, samples.remove(*guest_key).unwrap_or_default(), *scale);
    }
    Ok(())
}

/// The host floor for a 1 GiB grant: a bare anonymous mmap plus KVM_SET_USER_MEMORY_REGION
/// on a VM of our own, `rounds` times (µs each).
fn memslot_floor(rounds: usize) -> Result<Vec<f64>, BenchError> {
    const GIB: usize = 1 << 30;
    let kvm = elastic_vmm::open_kvm().map_err(|e| BenchError::Summary(e.to_string()))?;
    let vm = kvm.create_vm().map_err(|e| BenchError::Summary(format!("KVM_CREATE_VM: {e}")))?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GIB,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(BenchError::Summary("mmap of 1 GiB failed".into()));
        }
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: 1 << 30,
            memory_size: GIB as u64,
            userspace_addr: p as u64,
        };
        // SAFETY: `p` maps GIB bytes and stays mapped until the slot is deleted below.
        let set = unsafe { vm.set_user_memory_region(region) };
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        let delete = kvm_bindings::kvm_userspace_memory_region { memory_size: 0, ..region };
        // SAFETY: deleting the slot; then the mapping is ours to unmap.
        unsafe {
            let _ = vm.set_user_memory_region(delete);
            libc::munmap(p, GIB);
        }
        set.map_err(|e| BenchError::Summary(format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
    }
    Ok(samples)
}

/// A progress bar on a terminal (nothing otherwise).
fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] bench {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    })
}

fn progress(bar: &Option<indicatif::ProgressBar>, what: &str) {
    if let Some(b) = bar {
        b.set_message(what.to_string());
        b.inc(1);
    }
}

/// Writes the report as pretty JSON.
pub fn write(report: &BenchReport, path: &Path) -> Result<(), BenchError> {
    elastic_vmm::write_json(report, path).map_err(|e| BenchError::Write(path.into(), e))
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
