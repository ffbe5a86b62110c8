//! Serving figures: scale to zero (a wake from sleep and a cold boot on demand against the same
//! request with the VM running) and the demo's controller figures under request load, on a
//! quiet host and with one busy process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::host::BusyProcess;
use super::vm::ServiceRun;
use super::{BenchError, BenchOptions, BenchReport};

/// Samples per on-demand figure.
const SAMPLES: usize = 20;
/// Wakes from sleep measured (p50 and p99).
const WAKES: usize = 50;
/// The on-demand VM's idle shutdown in the benchmark.
const IDLE: Duration = Duration::from_millis(100);
/// How long the benchmark waits after a cold sample for the VM to have stopped (the idle
/// time plus the guest's stop, with room).
const SETTLE: Duration = Duration::from_millis(400);

/// The service an on-demand figure is measured on, and its one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    /// http, `GET /` (closing the connection): `HTTP/1.1 200`.
    Http,
    /// kv, `PING`: `+PONG`.
    Kv,
}

impl Probe {
    fn app(self) -> &'static str {
        match self {
            Probe::Http => "http",
            Probe::Kv => "kv",
        }
    }

    fn guest_port(self) -> u32 {
        match self {
            Probe::Http => 80,
            Probe::Kv => 6379,
        }
    }
}

/// Connect, send the probe's request and wait for the first byte of the answer: µs. Then reads
/// the rest of the answer and checks it.
pub(super) fn first_byte_us(port: u16, probe: Probe) -> Result<f64, BenchError> {
    let io = |e: std::io::Error| BenchError::Summary(format!("on-demand request: {e}"));
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    let (request, answer): (&[u8], &[u8]) = match probe {
        Probe::Http => (b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n", b"HTTP/1.1 200"),
        Probe::Kv => (b"PING\r\n", b"+PONG\r\n"),
    };
    s.write_all(request).map_err(io)?;
    let mut got = vec![0u8; answer.len()];
    s.read_exact(&mut got[..1]).map_err(io)?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    s.read_exact(&mut got[1..]).map_err(io)?;
    if got != answer {
        return Err(BenchError::Summary(format!(
            "the on-demand {} service answered {:?}",
            probe.app(),
            String::from_utf8_lossy(&got)
        )));
    }
    if probe == Probe::Http {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).map_err(io)?;
    }
    Ok(us)
}

/// Adds the on-demand figures of an `http` VM with `--idle-shutdown 100ms`, each sample after
/// the VM went for being idle:
/// * `--on-demand=boot`: `cold_start_us` and `warm_rtt_us` (medians of [`SAMPLES`]; the run's
///   summary must count one cold start per cold sample), `cold_start_boot_us`; each warm
///   sample while a held connection keeps the VM running.
/// * `--on-demand` (resume): `wake_us` and `wake_us_p99` over [`WAKES`] wakes (connect → first
///   byte; the summary must count one wake per sample), `wake_rebuild_us` (client seen → VM
///   rebuilt, from the summary), `sleeping_rss_kib` (the shim's RSS while its VM sleeps); the
///   same for kv with `PING`: `kv_wake_us` and `kv_wake_us_p99`. From the shim's summary: each
///   wake's phases (`wake_phase_load_us`, `_kvm_us`, `_memory_us`, `_vcpus_us`,
///   `_devices_us`), `wake_first_reply_us` (client seen → first answer byte, inside the shim)
///   and `post_wake_faults` (the shim's page faults from the VM ready to that answer), with
///   `kv_` for kv; `wake_from_boot_us` is `cold_start_us` (the path a wake took before).
pub(crate) fn add_on_demand(
    opts: &BenchOptions,
    dir: &std::path::Path,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    add_cold_starts(opts, dir, report)?;
    add_wakes(opts, dir, report, Probe::Http)?;
    add_wakes(opts, dir, report, Probe::Kv)
}

/// Starts an on-demand shim for `probe`'s service (`on_demand`: the flag with its mode) and
/// waits until it waits for clients.
fn start_on_demand(
    opts: &BenchOptions,
    dir: &std::path::Path,
    probe: Probe,
    on_demand: &str,
) -> Result<ServiceRun, BenchError> {
    let idle = format!("{}ms", IDLE.as_millis());
    let extra = [on_demand, "--idle-shutdown", idle.as_str(), "--log", "warn"];
    ServiceRun::start_on_demand(opts, probe.app(), probe.guest_port(), &extra, dir)
}

/// A process's resident set (KiB).
pub(super) fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The wake figures of `probe`'s service (see [`add_on_demand`]; kv's keys start `kv_`).
fn add_wakes(
    opts: &BenchOptions,
    dir: &std::path::Path,
    report: &mut BenchReport,
    probe: Probe,
) -> Result<(), BenchError> {
    let shim = start_on_demand(opts, dir, probe, "--on-demand")?;
    // The first client boots the VM; every later one wakes it.
    first_byte_us(shim.port, probe)?;
    std::thread::sleep(IDLE + SETTLE);
    let mut wakes = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..WAKES {
        rss.extend(rss_kib(shim.pid()));
        wakes.push(first_byte_us(shim.port, probe)?);
        std::thread::sleep(IDLE + SETTLE);
    }
    let s = shim.stop()?;
    let counted = s["on_demand"]["wakes"].as_u64().unwrap_or(0);
    if counted != WAKES as u64 {
        return Err(BenchError::Summary(format!(
            "expected {WAKES} wakes (one per sample), the shim counted {counted} (cold starts: {})",
            s["on_demand"]["cold_starts"]
        )));
    }
    let mut sorted = wakes.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[(sorted.len() * 99).div_ceil(100).saturating_sub(1)];
    // The shim's own account of each wake: its phases, and the page faults between the VM
    // ready and its first answer.
    let phase = |key: &str| -> Vec<f64> {
        s["on_demand"]["wake_phases"]
            .as_array()
            .map_or(Vec::new(), |a| a.iter().filter_map(|p| p[key].as_f64()).collect())
    };
    let prefix = if probe == Probe::Kv { "kv_" } else { "" };
    report.add(&format!("{prefix}post_wake_faults"), phase("post_wake_faults"), 1.0);
    report.add(&format!("{prefix}wake_first_reply_us"), phase("first_reply_us"), 1.0);
    if probe == Probe::Http {
        for key in ["load_us", "kvm_us", "memory_us", "vcpus_us", "devices_us"] {
            report.add(&format!("wake_phase_{key}"), phase(key), 1.0);
        }
    }
    if probe == Probe::Kv {
        report.add("kv_wake_us", wakes, 1.0);
        report.add("kv_wake_us_p99", vec![p99], 1.0);
        return Ok(());
    }
    report.add("wake_us", wakes, 1.0);
    report.add("wake_us_p99", vec![p99], 1.0);
    if let Some(w) = s["on_demand"]["wake_us"].as_array() {
        report.add("wake_rebuild_us", w.iter().filter_map(|v| v.as_f64()).collect(), 1.0);
    }
    report.add("sleeping_rss_kib", rss, 1.0);
    Ok(())
}

/// The cold-start figures (see [`add_on_demand`]).
fn add_cold_starts(opts: &BenchOptions, dir: &std::path::Path, report: &mut BenchReport) -> Result<(), BenchError> {
    let shim = start_on_demand(opts, dir, Probe::Http, "--on-demand=boot")?;
    let port = shim.port;
    let mut cold = Vec::new();
    for _ in 0..SAMPLES {
        cold.push(first_byte_us(port, Probe::Http)?);
        std::thread::sleep(IDLE + SETTLE);
    }
    // Warm: a held connection keeps the VM up (it boots once more for it).
    let mut holder = TcpStream::connect(("127.0.0.1", port)).map_err(|e| BenchError::Summary(e.to_string()))?;
    let _ = holder.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n");
    let _ = holder.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = holder.read(&mut [0u8; 512]);
    let mut warm = Vec::new();
    for _ in 0..SAMPLES {
        std::thread::sleep(Duration::from_millis(20));
        warm.push(first_byte_us(port, Probe::Http)?);
    }
    drop(holder);
    let s = shim.stop()?;
    let starts = s["on_demand"]["cold_starts"].as_u64().unwrap_or(0);
    if starts != SAMPLES as u64 + 1 {
        return Err(BenchError::Summary(format!(
            "expected {} cold starts (one per cold sample, one for the warm ones), the shim counted {starts}",
            SAMPLES + 1
        )));
    }
    // The same path as a wake from boot (issue 20's `wake_from_boot_us`).
    report.add("wake_from_boot_us", cold.clone(), 1.0);
    report.add("cold_start_us", cold, 1.0);
    report.add("warm_rtt_us", warm, 1.0);
    if let Some(boot) = s["on_demand"]["boot_us"].as_array() {
        report.add("cold_start_boot_us", boot.iter().filter_map(|v| v.as_f64()).collect(), 1.0);
    }
    Ok(())
}

/// Runs the demo once (quietly) and adds its controller figures: `demo_spike_reaction_ms`,
/// `demo_back_to_min_ms`, `demo_held_over_needed`, `demo_p99_us`, `demo_errors`,
/// `demo_peak_vcpus`.
pub(crate) fn add_demo(opts: &BenchOptions, dir: &std::path::Path, report: &mut BenchReport) -> Result<(), BenchError> {
    demo_figures(opts, dir, "demo", report)
}

/// Runs the demo once more while one busy process spins on the host (`sh -c 'while :; do :;
/// done'`, started before the demo and killed after it, an error included) and adds the same
/// figures under `demo_busy_`: `demo_busy_p99_us` (p99 latency over the whole traffic phase),
/// `demo_busy_errors` (requests that failed: wrong answer, 2 s timeout, I/O),
/// `demo_busy_spike_reaction_ms`, `demo_busy_back_to_min_ms`, `demo_busy_held_over_needed`,
/// `demo_busy_peak_vcpus`.
pub(crate) fn add_demo_busy(
    opts: &BenchOptions,
    dir: &std::path::Path,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let mut busy = BusyProcess::start()?;
    demo_figures(opts, dir, "demo_busy", report)?;
    busy.check()
}

/// Runs the demo (quietly) and adds its figures as `PREFIX_...`.
fn demo_figures(
    opts: &BenchOptions,
    dir: &std::path::Path,
    prefix: &str,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let burst = crate::tools::demo::default_burst();
    let demo = crate::tools::demo::DemoOptions {
        shim: opts.shim.clone(),
        kernel: opts.kernel.clone(),
        out_dir: dir.to_path_buf(),
        rate: crate::tools::demo::default_rate(burst),
        burst,
        quiet: true,
    };
    let r = crate::tools::demo::run(&demo).map_err(|e| BenchError::Summary(format!("{prefix}: {e}")))?;
    let mut put = |key: &str, v: Option<f64>| {
        if let Some(v) = v {
            report.figures.insert(format!("{prefix}_{key}"), v);
        }
    };
    put("spike_reaction_ms", r.spike_reaction_ms);
    put("back_to_min_ms", r.back_to_min_ms);
    put("held_over_needed", r.held_over_needed);
    put("p99_us", r.p99_us);
    put("errors", Some(r.errors as f64));
    put("peak_vcpus", Some(r.peak_vcpus as f64));
    Ok(())
}
