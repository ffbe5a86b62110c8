//! Density of sleeping services: one pool of [`SERVICES`] on-demand kv services, each with its
//! own published port, and wakes of some of them while the others sleep.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::serving::{Probe, first_byte_us, rss_kib};
use super::{BenchError, BenchOptions, BenchReport};

/// Services in the pool.
pub(crate) const SERVICES: usize = 1000;
/// Services woken (spread over the pool), each once to take its first state and once measured.
const WOKEN: usize = 50;
/// Their idle shutdown.
const IDLE: Duration = Duration::from_millis(100);
/// Wait after a request for the VM to have gone to sleep again.
const SETTLE: Duration = Duration::from_millis(400);

/// The pool's shim (killed when dropped).
struct PoolRun(Child);

impl Drop for PoolRun {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Adds `sleeping_rss_per_service_kib` (the shim's RSS with every service asleep, over
/// [`SERVICES`]; [`WOKEN`] of them have run once and sleep with their state, the others wait
/// for their first client), `wake_us_among_1000` and `wake_us_among_1000_p99` (connect → first
/// byte of `PING`'s answer, one service woken at a time while the others sleep) and
/// `density_start_ms` (the pool's start until every service waits for clients).
pub(crate) fn add(opts: &BenchOptions, dir: &std::path::Path, report: &mut BenchReport) -> Result<(), BenchError> {
    // Distinct ports: every listener stays bound until all are chosen.
    let held: Vec<std::net::TcpListener> = (0..SERVICES)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| BenchError::Summary(format!("no free port: {e}")))?;
    let ports: Vec<u16> = held.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect();
    drop(held);
    let mut config = format!("[pool]\nvcpus = {SERVICES}\nmemory = \"{}M\"\ntimeout = \"900s\"\n", SERVICES * 64);
    for (i, port) in ports.iter().enumerate() {
        config.push_str(&format!(
            "[[vm]]\nname = \"s{i}\"\napp = \"kv\"\nvcpus = \"1:1:1\"\nmemory = \"64M:64M:64M\"\nlog = \"warn\"\n\
             kernel = \"{}\"\npublish = [\"127.0.0.1:{port}:6379\"]\non_demand = true\nidle_shutdown = \"{}ms\"\n",
            opts.kernel.display(),
            IDLE.as_millis()
        ));
    }
    let file = dir.join("density.toml");
    let summary = dir.join("density.json");
    std::fs::write(&file, config).map_err(|e| BenchError::Summary(format!("{}: {e}", file.display())))?;
    let t = Instant::now();
    let mut child = Command::new(&opts.shim)
        .arg("pool")
        .arg(&file)
        .arg("--summary")
        .arg(&summary)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BenchError::Spawn(opts.shim.clone(), e))?;
    let err = child.stderr.take().ok_or_else(|| BenchError::Summary("no stderr".into()))?;
    let mut run = PoolRun(child);
    let mut lines = std::io::BufReader::new(err).lines();
    let mut waiting = 0;
    let mut last = String::new();
    while waiting < SERVICES {
        match lines.next() {
            Some(Ok(l)) if l.contains("on demand, no VM running") => waiting += 1,
            Some(Ok(l)) => last = l,
            _ => {
                return Err(BenchError::Summary(format!(
                    "the pool of {SERVICES} services stopped with {waiting} waiting: {last}"
                )));
            }
        }
    }
    report.add("density_start_ms", vec![t.elapsed().as_secs_f64() * 1e3], 1.0);
    std::thread::spawn(move || for _ in lines {});
    let pid = run.0.id();
    let woken: Vec<u16> = (0..WOKEN).map(|i| ports[i * SERVICES / WOKEN]).collect();
    // Each woken service runs once (a boot for the first, the template for the others) and
    // goes to sleep with its state.
    for &port in &woken {
        first_byte_us(port, Probe::Kv)?;
    }
    std::thread::sleep(IDLE + SETTLE);
    let rss = rss_kib(pid).ok_or_else(|| BenchError::Summary("the pool's RSS".into()))?;
    report.add("sleeping_rss_per_service_kib", vec![rss / SERVICES as f64], 1.0);
    let mut wakes = Vec::new();
    for &port in &woken {
        wakes.push(first_byte_us(port, Probe::Kv)?);
        std::thread::sleep(IDLE + SETTLE);
    }
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
    let _ = run.0.wait();
    let text = std::fs::read_to_string(&summary).map_err(|e| BenchError::Summary(e.to_string()))?;
    let s: serde_json::Value = serde_json::from_str(&text).map_err(|e| BenchError::Summary(e.to_string()))?;
    let counted: u64 =
        s["vms"].as_array().map_or(0, |v| v.iter().filter_map(|v| v["on_demand"]["wakes"].as_u64()).sum());
    if counted != WOKEN as u64 {
        return Err(BenchError::Summary(format!(
            "expected {WOKEN} wakes among {SERVICES} services, the pool counted {counted}"
        )));
    }
    let mut sorted = wakes.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[(sorted.len() * 99).div_ceil(100).saturating_sub(1)];
    report.add("wake_us_among_1000", wakes, 1.0);
    report.add("wake_us_among_1000_p99", vec![p99], 1.0);
    Ok(())
}
