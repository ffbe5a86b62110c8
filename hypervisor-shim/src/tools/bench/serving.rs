//! Serving figures: scale to zero (a cold start on demand against the same request with the
//! VM running) and the demo's controller figures under request load, on a quiet host and with
//! one busy process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::host::{BusyProcess, free_port};
use super::{BenchError, BenchOptions, BenchReport};

/// Samples per on-demand figure.
const SAMPLES: usize = 20;
/// The on-demand VM's idle shutdown in the benchmark.
const IDLE: Duration = Duration::from_millis(100);
/// How long the benchmark waits after a cold sample for the VM to have stopped (the idle
/// time plus the guest's stop, with room).
const SETTLE: Duration = Duration::from_millis(400);

/// Connect, send `GET /` and wait for the first byte of the answer: µs. Then reads the rest.
fn first_byte_us(port: u16) -> Result<f64, BenchError> {
    let io = |e: std::io::Error| BenchError::Summary(format!("on-demand request: {e}"));
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").map_err(io)?;
    let mut first = [0u8; 1];
    s.read_exact(&mut first).map_err(io)?;
    let us = t.elapsed().as_secs_f64() * 1e6;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).map_err(io)?;
    if first[0] != b'H' || !rest.starts_with(b"TTP/1.1 200") {
        return Err(BenchError::Summary("the on-demand service answered something other than 200".into()));
    }
    Ok(us)
}

/// Adds `cold_start_us` and `warm_rtt_us` (medians of [`SAMPLES`]): an `http` VM with
/// `--on-demand --idle-shutdown 100ms`; each cold sample comes after the VM stopped for being
/// idle (the run's summary must count one cold start per cold sample), each warm one while a
/// held connection keeps the VM running.
pub(crate) fn add_on_demand(
    opts: &BenchOptions,
    dir: &std::path::Path,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let port = free_port()?;
    let summary = dir.join("on-demand.json");
    let mut child = Command::new(&opts.shim)
        .args(["run", "--app", "http", "--publish", &format!("127.0.0.1:{port}:80"), "--on-demand"])
        .args(["--idle-shutdown", &format!("{}ms", IDLE.as_millis()), "--timeout", "600", "--log", "warn"])
        .arg("--kernel")
        .arg(&opts.kernel)
        .arg("--summary")
        .arg(&summary)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::Spawn(opts.shim.clone(), e))?;
    let guard = KillOnDrop(&mut child);
    let err = guard.0.stderr.take().ok_or_else(|| BenchError::Summary("no stderr".into()))?;
    let mut lines = BufReader::new(err).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("on demand, no VM running") => break,
            Some(Ok(_)) => {}
            _ => return Err(BenchError::Summary("the on-demand shim did not start waiting for clients".into())),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let mut cold = Vec::new();
    for _ in 0..SAMPLES {
        cold.push(first_byte_us(port)?);
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
        warm.push(first_byte_us(port)?);
    }
    drop(holder);
    let _ = Command::new("kill").args(["-INT", &guard.0.id().to_string()]).status();
    let _ = guard.0.wait();
    drop(guard);
    let text = std::fs::read_to_string(&summary).map_err(|e| BenchError::Summary(e.to_string()))?;
    let s: serde_json::Value = serde_json::from_str(&text).map_err(|e| BenchError::Summary(e.to_string()))?;
    let starts = s["on_demand"]["cold_starts"].as_u64().unwrap_or(0);
    if starts != SAMPLES as u64 + 1 {
        return Err(BenchError::Summary(format!(
            "expected {} cold starts (one per cold sample, one for the warm ones), the shim counted {starts}",
            SAMPLES + 1
        )));
    }
    report.add("cold_start_us", cold, 1.0);
    report.add("warm_rtt_us", warm, 1.0);
    if let Some(boot) = s["on_demand"]["boot_us"].as_array() {
        report.add("cold_start_boot_us", boot.iter().filter_map(|v| v.as_f64()).collect(), 1.0);
    }
    Ok(())
}

/// Kills the child when dropped (an early error return).
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
