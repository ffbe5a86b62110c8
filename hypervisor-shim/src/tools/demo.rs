//! The default `cargo run --release`: a self-driving demo of an elastic service.
//!
//! It boots the http service with an elastic policy, publishes it on a free loopback port and
//! drives it with the load generator through a ramp and a spike of `GET /work` requests (each
//! a couple of milliseconds of CPU over a working set of its own), then lets it idle. The guest
//! brings vCPUs up and takes memory as requests pile up, and gives both back when they stop;
//! the demo prints one line per second (offered load, served requests per second, p99
//! latency, vCPUs held, memory held, the shim's RSS), then a summary with the controller's
//! reaction times, writes `demo.json` (the report, the VM's summary and its timeline) and draws
//! `demo.svg` (load and resources on one time axis).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use serde::Serialize;
use thiserror::Error;

use crate::tools::loadgen::{self, HttpOptions, LoadConfig, Mode, Pattern, Protocol, SecondStats};
use elastic_vmm::Line;

/// Demo failures.
#[derive(Debug, Error)]
pub enum DemoError {
    /// The shim could not be started or did not come up.
    #[error("cannot start the service VM: {0}")]
    Start(String),
    /// Talking to the service failed.
    #[error("the service stopped answering: {0}")]
    Service(String),
    /// The load generator failed.
    #[error(transparent)]
    Load(#[from] loadgen::LoadError),
    /// An output file could not be written.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The shim binary (this one).
    pub shim: PathBuf,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Where `demo.svg` and `demo.json` go.
    pub out_dir: PathBuf,
    /// Peak request rate.
    pub rate: f64,
    /// vCPU burst ceiling (max is the smaller of 2 and this).
    pub burst: u32,
    /// Print nothing (the benchmark runs the demo for its figures).
    pub quiet: bool,
}

impl DemoOptions {
    /// The vCPU policy `1:MAX:BURST`.
    pub fn vcpus(&self) -> String {
        format!("1:{}:{}", self.burst.min(2), self.burst)
    }
}

/// The demo's default vCPU burst ceiling: the CPUs this process may use, between 2 and 4. More
/// vCPUs than host CPUs would only make them wait for each other (a vCPU holding a lock can be
/// preempted by one spinning on it).
pub fn default_burst() -> u32 {
    (elastic_vmm::allowed_cpus().len() as u32).clamp(2, 4)
}

/// The demo's default peak rate: what the default burst serves with room to spare (each
/// request is 2 ms of one vCPU), and at its peak one vCPU's whole time, so that the VM needs
/// a second one however fast the host path is (at 225/s a vCPU, 0.9 of one vCPU at a burst
/// of 2, the guest's saturation test, 90% busy, was met only by the requests' overhead, and
/// one CI run in four saw no scale-up).
pub fn default_rate(burst: u32) -> f64 {
    250.0 * f64::from(burst)
}

/// The memory policy.
pub const MEMORY: &str = "64M:256M:512M";
const MIB: f64 = (1u64 << 20) as f64;
/// What each request asks for: 2 ms of one vCPU over a 256 KiB working set.
pub const REQUEST: &str = "/work?ms=2&kb=256";
/// Traffic phases.
const RAMP: Duration = Duration::from_secs(7);
const SPIKE: Duration = Duration::from_secs(7);
/// Seconds watched after the traffic.
const COOL_DOWN: u32 = 3;

/// One printed second.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSecond {
    /// Seconds since the VM started.
    pub t_s: f64,
    /// What the demo was doing.
    pub phase: &'static str,
    /// Offered load (requests/s).
    pub offered: f64,
    /// Served (correct) requests/s.
    pub served: f64,
    /// p99 latency of that second (µs).
    pub p99_us: Option<f64>,
    /// Failed requests.
    pub errors: u64,
    /// Most vCPUs online during the second.
    pub vcpus: u64,
    /// Memory held (bytes).
    pub memory_bytes: u64,
    /// The shim's RSS (bytes).
    pub rss_bytes: u64,
}

/// The demo's result (`demo.json`).
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// vCPU policy.
    pub vcpus_policy: String,
    /// Memory policy.
    pub memory_policy: &'static str,
    /// Peak request rate offered.
    pub peak_rate: f64,
    /// Per-second figures.
    pub seconds: Vec<DemoSecond>,
    /// Requests answered correctly.
    pub requests: u64,
    /// Requests that failed (wrong answer, timeout, I/O).
    pub errors: u64,
    /// p99 latency over the whole traffic phase (µs).
    pub p99_us: Option<f64>,
    /// Most vCPUs online.
    pub peak_vcpus: u64,
    /// vCPUs online at the end.
    pub final_vcpus: u64,
    /// Most memory held.
    pub peak_memory_bytes: u64,
    /// Memory held at the end.
    pub final_memory_bytes: u64,
    /// Offered load (requests/s) on the ramp when the first extra vCPU came online.
    pub ramp_rate_at_first_extra_vcpu: Option<f64>,
    /// The spike's step → the next vCPU brought up (ms).
    pub spike_reaction_ms: Option<f64>,
    /// The spike's step down → vCPUs back at min (ms).
    pub back_to_min_ms: Option<f64>,
    /// vCPU-seconds held during the traffic phase.
    pub vcpu_seconds_held: f64,
    /// vCPU-seconds the load needed: those it kept busy (held minus idle, from the guest's
    /// REPORTs), and never less than min per second.
    pub vcpu_seconds_needed: f64,
    /// `vcpu_seconds_held / vcpu_seconds_needed`.
    pub held_over_needed: Option<f64>,
    /// The VM's exit code.
    pub vm_exit_code: Option<i32>,
}

/// The VM under demonstration (killed when dropped).
struct DemoVm {
    child: Child,
    port: u16,
    info: TcpStream,
    dir: PathBuf,
}

impl Drop for DemoVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DemoVm {
    fn start(opts: &DemoOptions) -> Result<DemoVm, DemoError> {
        let port = crate::tools::bench::free_loopback_port().map_err(DemoError::Start)?;
        let dir = std::env::temp_dir().join(format!("hypervisor-shim-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| DemoError::Start(e.to_string()))?;
        let mut child = Command::new(&opts.shim)
            .args(["run", "--app", "http", "--vcpus", &opts.vcpus(), "--memory", MEMORY, "--log", "warn"])
            .args(["--publish", &format!("127.0.0.1:{port}:80"), "--timeout", "300"])
            .arg("--kernel")
            .arg(&opts.kernel)
            .arg("--timeline")
            .arg(dir.join("timeline.jsonl"))
            .arg("--summary")
            .arg(dir.join("summary.json"))
            .stdout(Stdio::piped())
            .stderr(if opts.quiet { Stdio::null() } else { Stdio::inherit() })
            .spawn()
            .map_err(|e| DemoError::Start(e.to_string()))?;
        crate::tools::child::wait_until_listening(&mut child, Duration::from_secs(30))
            .map_err(|e| DemoError::Start(format!("http: {e}")))?;
        let info = connect(port)?;
        Ok(DemoVm { child, port, info, dir })
    }

    /// (most vCPUs online since the previous call, memory held) from the service's `/stats`.
    fn figures(&mut self) -> Result<(u64, u64), DemoError> {
        let io = |e: std::io::Error| DemoError::Service(e.to_string());
        self.info.write_all(b"GET /stats HTTP/1.1\r\nHost: demo\r\n\r\n").map_err(io)?;
        let body = read_http_body(&mut self.info)?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| DemoError::Service(e.to_string()))?;
        Ok((v["vcpus"]["peak_since_last_stats"].as_u64().unwrap_or(0), v["memory"]["held_bytes"].as_u64().unwrap_or(0)))
    }

    fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(str::to_string))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Asks the guest to stop; returns its exit code, timeline and summary.
    fn stop(mut self) -> (Option<i32>, Vec<Line>, serde_json::Value) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let status = self.child.wait().ok().and_then(|s| s.code());
        let lines = std::fs::read_to_string(self.dir.join("timeline.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Line>(l).ok())
            .collect();
        let summary = std::fs::read_to_string(self.dir.join("summary.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let _ = std::fs::remove_dir_all(&self.dir);
        (status, lines, summary)
    }
}

fn connect(port: u16) -> Result<TcpStream, DemoError> {
    let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| DemoError::Service(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| DemoError::Service(e.to_string()))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; returns the body.
fn read_http_body(s: &mut TcpStream) -> Result<String, DemoError> {
    let io = |e: std::io::Error| DemoError::Service(e.to_string());
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).map_err(io)?;
        head.push(b[0]);
        if head.len() > 16 * 1024 {
            return Err(DemoError::Service("response head too long".into()));
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| DemoError::Service("no content-length".into()))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(io)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn fmt_latency(us: Option<f64>) -> String {
    match us {
        None => "     -".into(),
        Some(v) if v >= 1000.0 => format!("{:5.1}ms", v / 1000.0),
        Some(v) => format!("{v:5.0}µs"),
    }
}

/// Prints one line and keeps the figures.
struct Printer {
    started: Instant,
    seconds: Vec<DemoSecond>,
    quiet: bool,
}

impl Printer {
    #[allow(clippy::too_many_arguments)]
    fn line(&mut self, vm: &mut DemoVm, phase: &'static str, offered: f64, served: f64, p99: Option<f64>, errors: u64) {
        let (vcpus, memory) = vm.figures().unwrap_or((0, 0));
        let rss = vm.rss();
        let t_s = self.started.elapsed().as_secs_f64();
        if !self.quiet {
            oline!(
                "{t_s:5.1}s  {phase:<9} offered {offered:>6.0}/s  served {served:>6.0}/s  p99 {}  errors {errors:<3}| vCPUs {vcpus}  memory {:>4.0} MiB  RSS {:>4.0} MiB",
                fmt_latency(p99),
                memory as f64 / MIB,
                rss as f64 / MIB
            );
            let _ = std::io::stdout().flush();
        }
        self.seconds.push(DemoSecond {
            t_s,
            phase,
            offered,
            served,
            p99_us: p99,
            errors,
            vcpus,
            memory_bytes: memory,
            rss_bytes: rss,
        });
    }
}

/// Runs the demo; returns its report (also written to `demo.json`, with `demo.svg`).
pub fn run(opts: &DemoOptions) -> Result<DemoReport, DemoError> {
    let say = |text: String| {
        if !opts.quiet {
            oline!("{text}");
        }
    };
    say("Elastic unikernel demo: an HTTP service in a VM that scales itself.".into());
    say(format!(
        "  policy: vCPUs {} (min:max:burst), memory {MEMORY}; the guest asks for more under load and gives it back",
        opts.vcpus()
    ));
    let mut vm = DemoVm::start(opts)?;
    say(format!("  published on 127.0.0.1:{} (try: curl 127.0.0.1:{}/stats)", vm.port, vm.port));
    let mut printer = Printer { started: Instant::now(), seconds: Vec::new(), quiet: opts.quiet };
    printer.line(&mut vm, "booted", 0.0, 0.0, None, 0);

    // 1. Traffic: a ramp, then a spike.
    say(format!("  load: GET {REQUEST} (2 ms of CPU over 256 KiB each), a ramp to {:.0}/s then a spike\n", opts.rate));
    let config = LoadConfig {
        target: std::net::SocketAddr::from(([127, 0, 0, 1], vm.port)),
        protocol: Protocol::Http(HttpOptions { path: REQUEST.into() }),
        mode: Mode::Open { connections: 32 },
        pattern: Pattern::ramp(opts.rate, RAMP).then(Pattern::spike(opts.rate, SPIKE)),
        timeout: Duration::from_secs(2),
    };
    let report = {
        let printer = &mut printer;
        let vm = &mut vm;
        let ramp_s = RAMP.as_secs() as u32;
        loadgen::run(&config, &mut |sec: &SecondStats| {
            let phase = if sec.second < ramp_s { "ramp" } else { "spike" };
            printer.line(vm, phase, sec.offered, sec.throughput, sec.p99_us, sec.errors);
        })?
    };
    // 2. Idle: vCPUs and memory go back to min.
    for _ in 0..COOL_DOWN {
        std::thread::sleep(Duration::from_secs(1));
        printer.line(&mut vm, "idle", 0.0, 0.0, None, 0);
    }
    let (exit_code, timeline, summary) = vm.stop();
    let report = analyse(printer.seconds, &report, exit_code, &timeline, &summary, opts);
    if !opts.quiet {
        print_summary(&report);
    }
    write_outputs(opts, &report, &timeline, &summary)?;
    Ok(report)
}

/// ms on the VM's timeline (µs since the shim started) of a CLOCK_MONOTONIC instant.
fn to_vm_us(monotonic_ns: u64, vm_started_ns: u64) -> f64 {
    (monotonic_ns as f64 - vm_started_ns as f64) / 1000.0
}

fn analyse(
    seconds: Vec<DemoSecond>,
    load: &loadgen::LoadReport,
    exit_code: Option<i32>,
    timeline: &[Line],
    summary: &serde_json::Value,
    opts: &DemoOptions,
) -> DemoReport {
    let vm_started = summary["started_monotonic_ns"].as_u64().unwrap_or(0);
    let load_start_us = to_vm_us(load.started_monotonic_ns, vm_started);
    let load_end_us = load_start_us + (RAMP + SPIKE).as_secs_f64() * 1e6;
    let spike_step_us = load_start_us + (RAMP.as_secs_f64() + 0.4 * SPIKE.as_secs_f64()) * 1e6;
    let spike_end_us = load_start_us + (RAMP.as_secs_f64() + 0.6 * SPIKE.as_secs_f64()) * 1e6;
    let min = 1u32;
    let ups: Vec<&Line> = timeline.iter().filter(|l| l.event() == "vcpu_up").collect();
    let first_up_after = |t: f64| ups.iter().find(|l| l.t_us() as f64 >= t).map(|l| (l.t_us() as f64 - t) / 1000.0);
    let ramp_rate_at_first_extra_vcpu = first_up_after(load_start_us)
        .filter(|&ms| ms <= RAMP.as_secs_f64() * 1000.0)
        .map(|ms| (opts.rate * ms / (RAMP.as_secs_f64() * 1000.0)).round());
    let spike_reaction_ms = first_up_after(spike_step_us);
    // The spike's step down → vCPUs back at min (the first time after it that they are).
    let back_to_min_ms = timeline
        .iter()
        .find(|l| l.vcpus() == min && l.t_us() as f64 >= spike_end_us)
        .map(|l| ((l.t_us() as f64 - spike_end_us) / 1000.0).max(0.0));
    // Held vs needed over the traffic phase, from the guest's REPORTs (online, idle).
    let (mut held, mut needed) = (0.0, 0.0);
    let reports: Vec<&Line> = timeline
        .iter()
        .filter(|l| l.event() == "report" && (l.t_us() as f64) >= load_start_us && (l.t_us() as f64) <= load_end_us)
        .collect();
    for w in reports.windows(2) {
        let dt = (w[1].t_us() - w[0].t_us()) as f64 / 1e6;
        let online = w[0].get("guest_online").and_then(|v| v.as_f64()).unwrap_or(w[0].vcpus() as f64);
        let idle = w[0].get("guest_idle").and_then(|v| v.as_f64()).unwrap_or(0.0);
        held += online * dt;
        // What the load kept busy, but never less than the policy's min (held whatever the load).
        needed += (online - idle).max(f64::from(min)) * dt;
    }
    let peak_vcpus = timeline.iter().map(|l| u64::from(l.vcpus())).max().unwrap_or(1);
    let peak_memory = timeline.iter().map(|l| l.memory_bytes()).max().unwrap_or(0);
    let last = seconds.last().cloned();
    DemoReport {
        vcpus_policy: opts.vcpus(),
        memory_policy: MEMORY,
        peak_rate: opts.rate,
        requests: load.completed,
        errors: load.errors,
        p99_us: load.latency.as_ref().map(|l| l.p99_us),
        peak_vcpus,
        final_vcpus: last.as_ref().map_or(0, |s| s.vcpus),
        peak_memory_bytes: peak_memory,
        final_memory_bytes: last.as_ref().map_or(0, |s| s.memory_bytes),
        ramp_rate_at_first_extra_vcpu,
        spike_reaction_ms,
        back_to_min_ms,
        vcpu_seconds_held: held,
        vcpu_seconds_needed: needed,
        held_over_needed: (needed > 0.0).then_some(held / needed),
        vm_exit_code: exit_code,
        seconds,
    }
}

fn print_summary(r: &DemoReport) {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    oline!("\nSummary");
    oline!("  requests: {} answered, {} errors, p99 {}", r.requests, r.errors, fmt_latency(r.p99_us).trim());
    oline!("  vCPUs:    min 1, peak {}, final {}", r.peak_vcpus, r.final_vcpus);
    oline!(
        "  memory:   min 64 MiB, peak {:.0} MiB, final {:.0} MiB",
        r.peak_memory_bytes as f64 / MIB,
        r.final_memory_bytes as f64 / MIB
    );
    oline!(
        "  controller: first extra vCPU at {} on the ramp, {} after the spike's step up; back at min {} after its step down",
        r.ramp_rate_at_first_extra_vcpu.map_or("-".to_string(), |v| format!("{v:.0}/s")),
        ms(r.spike_reaction_ms),
        ms(r.back_to_min_ms)
    );
    oline!(
        "  vCPU-seconds held {:.2} for {:.2} needed (busy, at least min): {}",
        r.vcpu_seconds_held,
        r.vcpu_seconds_needed,
        r.held_over_needed.map_or("-".into(), |x| format!("{x:.2}×"))
    );
}

fn write_outputs(
    opts: &DemoOptions,
    report: &DemoReport,
    timeline: &[Line],
    summary: &serde_json::Value,
) -> Result<(), DemoError> {
    let json_path = opts.out_dir.join("demo.json");
    let doc = serde_json::json!({ "demo": report, "vm": summary, "timeline": timeline });
    elastic_vmm::write_json(&doc, &json_path)
        .map_err(|e| DemoError::Write { path: json_path.display().to_string(), reason: e.to_string() })?;
    let svg_path = opts.out_dir.join("demo.svg");
    draw(&svg_path, report, timeline, opts.burst)
        .map_err(|reason| DemoError::Write { path: svg_path.display().to_string(), reason })?;
    if !opts.quiet {
        oline!("  wrote {} and {}", svg_path.display(), json_path.display());
    }
    Ok(())
}

/// Three panels on one time axis (seconds since the VM started): load, vCPUs, memory.
fn draw(path: &Path, report: &DemoReport, timeline: &[Line], burst: u32) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let end = report.seconds.last().map_or(1.0, |s| s.t_s).max(1.0) + 0.5;
    let root = SVGBackend::new(path, (1000, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled("Elastic http service: load and resources", ("sans-serif", 22)).map_err(|e| err(&e))?;
    let panels = root.split_evenly((3, 1));
    // Load.
    let peak = report.seconds.iter().map(|s| s.offered.max(s.served)).fold(1.0, f64::max) * 1.1;
    let mut c = ChartBuilder::on(&panels[0])
        .margin(8)
        .x_label_area_size(22)
        .y_label_area_size(60)
        .caption("requests per second (offered, served)", ("sans-serif", 15))
        .build_cartesian_2d(0.0..end, 0.0..peak)
        .map_err(|e| err(&e))?;
    c.configure_mesh().disable_x_mesh().draw().map_err(|e| err(&e))?;
    let offered: Vec<(f64, f64)> = report.seconds.iter().map(|s| (s.t_s, s.offered)).collect();
    let served: Vec<(f64, f64)> = report.seconds.iter().map(|s| (s.t_s, s.served)).collect();
    c.draw_series(LineSeries::new(offered, BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("offered")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLUE));
    c.draw_series(LineSeries::new(served, GREEN.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label("served")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], GREEN));
    c.configure_series_labels().border_style(BLACK).draw().map_err(|e| err(&e))?;
    // The VM's own timeline, in seconds: the demo's clock started just after the VM's
    // first line, close enough for a plot.
    let offset = timeline.first().map_or(0.0, |l| l.t_us() as f64 / 1e6);
    let step = |f: &dyn Fn(&Line) -> f64| -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        let mut last: Option<f64> = None;
        for l in timeline {
            let t = l.t_us() as f64 / 1e6 - offset;
            let v = f(l);
            if let Some(prev) = last {
                out.push((t, prev));
            }
            out.push((t, v));
            last = Some(v);
        }
        if let Some(v) = last {
            out.push((end, v));
        }
        out
    };
    let mut c = ChartBuilder::on(&panels[1])
        .margin(8)
        .x_label_area_size(22)
        .y_label_area_size(60)
        .caption(format!("vCPUs held (min 1, max {}, burst {burst})", burst.min(2)), ("sans-serif", 15))
        .build_cartesian_2d(0.0..end, 0.0..f64::from(burst) + 0.5)
        .map_err(|e| err(&e))?;
    c.configure_mesh().disable_x_mesh().draw().map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(step(&|l| f64::from(l.vcpus())), RED.stroke_width(2))).map_err(|e| err(&e))?;
    let mut c = ChartBuilder::on(&panels[2])
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .caption("memory held, MiB (min 64, max 256, burst 512)", ("sans-serif", 15))
        .build_cartesian_2d(0.0..end, 0.0..(report.peak_memory_bytes as f64 / MIB * 1.15).max(80.0))
        .map_err(|e| err(&e))?;
    c.configure_mesh().disable_x_mesh().x_desc("seconds").draw().map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(step(&|l| l.memory_bytes() as f64 / MIB), MAGENTA.stroke_width(2)))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
