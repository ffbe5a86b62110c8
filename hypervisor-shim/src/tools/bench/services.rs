//! Service figures (`bench --only services`): the kv and http services under their real,
//! unmodified clients, side by side with native servers on the same host under the same
//! client, on a quiet machine and with one busy process.
//!
//! # How they are measured
//!
//! The section runs [`ROUNDS`] rounds (fewer when `--runs` asks for fewer: a quick check).
//! Each round measures, in this order: every comparison
//! below on a quiet host, each as the VM then its native anchor; the same again while a busy
//! process spins (see below); then the http service with 1 and with 2 vCPUs. VM and native
//! runs thus alternate, so drift on the host (another build, thermal, the nested hypervisor)
//! hits both sides. Every run starts a fresh server (a VM booted with `--vcpus 1:2:2`, or the
//! native process) and stops it afterwards, so nothing one run left behind reaches the next.
//! Each figure below is the median over the rounds (`details` holds every round's sample);
//! each ratio is computed from the two medians.
//!
//! redis-benchmark runs a fixed number of requests, so its N is sized first: one short run
//! (N = 20000 pipelined, 1000 unpipelined) per setting, side and condition gives its GET rate,
//! and N is that rate × 1 s (rounded down to thousands, 2000 to 1000000): each measured run
//! takes about 2 s (N SETs, then N GETs) whatever the request path costs today, and every round
//! of a setting runs the same N. The N used: `kv_p16_n`, `host_redis_p16_n`, `kv_p1_n`,
//! `host_redis_p1_n` (and `_busy`). Both sides run the same command but for `-n`.
//!
//! The comparisons, each with its figures (`VM`, `native`, `VM / native`):
//!
//! * **kv, pipelined**: `redis-benchmark -t set,get -n N -P 16 -c 50 --csv` against the kv
//!   service (guest port 6379) and against Debian's `redis-server` (`--save ''
//!   --appendonly no`). GET requests per second: `kv_p16_get_ops_per_s`,
//!   `host_redis_p16_get_ops_per_s`, `kv_over_host_redis`.
//! * **kv, one request at a time per connection**: `redis-benchmark -t set,get -n N -P 1 -c 50
//!   --csv`: `kv_p1_get_ops_per_s`, `host_redis_p1_get_ops_per_s`, `kv_p1_over_host_redis`.
//! * **http**: `wrk -t2 -c50 -d3s http://127.0.0.1:PORT/` against the http service (guest port
//!   80) and against Debian's nginx as one process (`master_process off`), configured by the
//!   benchmark to answer `GET /` with the same 34-byte `text/plain` body, no access log,
//!   connections kept alive as long as the client keeps them. Both answers are checked once
//!   per run. Requests per second: `http_req_per_s`, `host_nginx_req_per_s`,
//!   `http_over_nginx`.
//!
//! For each comparison, **host CPU time per request**: `utime + stime` of `/proc/PID/stat`
//! (all the process's threads) of the shim process (the VM's whole host side: vCPU threads and
//! the vsock I/O thread) and of the native server, read right before and right after the
//! client's run, divided by the requests the client completed (`2 × N` for redis-benchmark,
//! SETs and GETs; wrk's count). The clients' own CPU time is not counted. The clock tick is
//! 10 ms: a run that costs the server 0.5 CPU-s reads to within 2 %. Figures:
//! `kv_cpu_us_per_req`, `host_redis_cpu_us_per_req`, `kv_cpu_over_native` (pipelined kv);
//! `kv_p1_cpu_us_per_req`, `host_redis_p1_cpu_us_per_req`, `kv_p1_cpu_over_native`;
//! `http_cpu_us_per_req`, `host_nginx_cpu_us_per_req`, `http_cpu_over_native`. Goal for the
//! ratios: ≤ 2.
//!
//! **With one busy process**: the benchmark starts `sh -c 'while :; do :; done'` (a child
//! process spinning on one CPU) before the busy block of a round and kills it after (also on
//! an error). Every figure above then exists again with the suffix `_busy`
//! (`kv_over_host_redis_busy`, `kv_p1_over_host_redis_busy`, `http_over_nginx_busy`, their
//! rates and CPU times). `kv_busy_over_quiet`, `kv_p1_busy_over_quiet` and
//! `http_busy_over_quiet` are the busy ratio over the quiet one: how much of its standing
//! against the native server a service keeps when it shares the CPUs (goal ≥ 0.8). wrk
//! timeouts (no answer within 2 s) do not fail a busy run; they are counted:
//! `http_busy_wrk_timeouts` and `host_nginx_busy_wrk_timeouts` are totals over the rounds.
//! Any other wrk error (connect, read, write, non-2xx), and a timeout on a quiet host, fails
//! the benchmark.
//!
//! **vCPU scaling**: `wrk -t2 -c8 -d3s 'http://127.0.0.1:PORT/work?ms=2'` (2 ms of guest CPU
//! per request) against the http service with `--vcpus 1:1:1` and with `--vcpus 2:2:2`:
//! `http_work_1v_req_per_s`, `http_work_2v_req_per_s`, and `http_2v_over_1v` (goal ≥ 1.6).
//! The guest turns "2 ms" into a number of work units by timing them for 5 ms at its first
//! `/work` request, so how much work a request is depends on how that VM's timing went. One
//! request is sent alone before wrk starts (timed under wrk's load, with 2 vCPUs, it came out
//! at about half the units), and its reply gives the units a request runs in that VM:
//! `http_work_1v_units_per_req`, `http_work_2v_units_per_req`. They should agree; when a
//! sample is far off (a timing disturbed anyway: 44 units against 230 was seen), that run's
//! requests were cheaper or dearer and its req/s says so. `http_work_1v_units_per_s` and
//! `http_work_2v_units_per_s` are req/s × units of each run, the work actually done per
//! second, and `http_2v_over_1v_work` their ratio: the scaling with the work held equal.
//!
//! Figures kept from earlier versions, now from the same runs (so from VMs with `--vcpus
//! 1:2:2` and a sized N, where they had the default `1:1:1` and N = 100000 before; the same
//! goes for `http_req_per_s`, above): `kv_ops_per_s` and `host_redis_ops_per_s` (pipelined,
//! SET and GET together: the harmonic mean of the two rates), `kv_p99_us` (the worse p99 of
//! the kv's pipelined SET and GET), `exits_per_request` (the kv VM's hypercalls over the whole
//! pipelined run, boot included, per request), and `request_rtt_us`: one PING on an idle
//! connection to a kv VM with the default `--vcpus 1:1:1`, after 50 ms of quiet each (the
//! guest has gone idle).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::clients::{self, RedisRun};
use super::host::{BusyProcess, cpu_us};
use super::native::NativeServer;
use super::vm::ServiceRun;
use super::{BenchError, BenchOptions, BenchReport};

/// Rounds of every comparison (medians over them).
const ROUNDS: usize = 3;
/// The vCPU policy of the compared VMs.
const VCPUS: &str = "1:2:2";
/// Seconds of GETs a sized redis-benchmark run aims at (its SETs take about as long again).
const REDIS_TARGET_S: f64 = 1.0;
/// The fewest SETs (and GETs) of a sized redis-benchmark run.
const REDIS_MIN_N: u32 = 2_000;
/// The most SETs (and GETs) of a sized redis-benchmark run.
const REDIS_MAX_N: u32 = 1_000_000;
/// Seconds per wrk run.
const WRK_SECS: u32 = 3;

/// The client of a comparison.
#[derive(Debug, Clone, Copy)]
enum Client {
    /// `redis-benchmark -t set,get -n N -P PIPELINE -c 50`; `probe_n` sizes N.
    Redis {
        /// `-P`.
        pipeline: u32,
        /// N of the sizing run.
        probe_n: u32,
    },
    /// `wrk -t2 -c50 -dWRK_SECS /`.
    Wrk,
}

/// The native side of a comparison.
#[derive(Debug, Clone, Copy)]
enum Native {
    /// Debian's redis-server.
    Redis,
    /// Debian's nginx, one process.
    Nginx,
}

/// Which side of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    /// The service in a VM.
    Vm,
    /// The native server.
    Native,
}

/// One comparison: a service in a VM and its native anchor under the same client, and the
/// keys of its figures (the busy ones add `_busy`).
#[derive(Debug, Clone, Copy)]
struct Pair {
    /// What it is, for the progress line.
    what: &'static str,
    /// The guest service.
    app: &'static str,
    /// Its guest port.
    guest_port: u32,
    /// The native server.
    native: Native,
    /// The client both are driven with.
    client: Client,
    /// The VM's rate (requests or GETs per second).
    vm_rate: &'static str,
    /// The native server's rate.
    native_rate: &'static str,
    /// VM rate over native rate.
    ratio: &'static str,
    /// The shim's CPU µs per request.
    vm_cpu: &'static str,
    /// The native server's CPU µs per request.
    native_cpu: &'static str,
    /// VM CPU over native CPU.
    cpu_ratio: &'static str,
    /// The busy ratio over the quiet one.
    busy_over_quiet: &'static str,
    /// The N of the VM's and of the native server's redis-benchmark runs.
    n_keys: Option<(&'static str, &'static str)>,
    /// The wrk timeouts of the VM's and of the native server's busy runs.
    busy_timeouts: Option<(&'static str, &'static str)>,
}

/// The comparisons, in the order each round runs them.
const PAIRS: [Pair; 3] = [
    Pair {
        what: "kv -P 16 against redis-server",
        app: "kv",
        guest_port: 6379,
        native: Native::Redis,
        client: Client::Redis { pipeline: 16, probe_n: 20_000 },
        vm_rate: "kv_p16_get_ops_per_s",
        native_rate: "host_redis_p16_get_ops_per_s",
        ratio: "kv_over_host_redis",
        vm_cpu: "kv_cpu_us_per_req",
        native_cpu: "host_redis_cpu_us_per_req",
        cpu_ratio: "kv_cpu_over_native",
        busy_over_quiet: "kv_busy_over_quiet",
        n_keys: Some(("kv_p16_n", "host_redis_p16_n")),
        busy_timeouts: None,
    },
    Pair {
        what: "kv -P 1 against redis-server",
        app: "kv",
        guest_port: 6379,
        native: Native::Redis,
        client: Client::Redis { pipeline: 1, probe_n: 1_000 },
        vm_rate: "kv_p1_get_ops_per_s",
        native_rate: "host_redis_p1_get_ops_per_s",
        ratio: "kv_p1_over_host_redis",
        vm_cpu: "kv_p1_cpu_us_per_req",
        native_cpu: "host_redis_p1_cpu_us_per_req",
        cpu_ratio: "kv_p1_cpu_over_native",
        busy_over_quiet: "kv_p1_busy_over_quiet",
        n_keys: Some(("kv_p1_n", "host_redis_p1_n")),
        busy_timeouts: None,
    },
    Pair {
        what: "http against nginx",
        app: "http",
        guest_port: 80,
        native: Native::Nginx,
        client: Client::Wrk,
        vm_rate: "http_req_per_s",
        native_rate: "host_nginx_req_per_s",
        ratio: "http_over_nginx",
        vm_cpu: "http_cpu_us_per_req",
        native_cpu: "host_nginx_cpu_us_per_req",
        cpu_ratio: "http_cpu_over_native",
        busy_over_quiet: "http_busy_over_quiet",
        n_keys: None,
        busy_timeouts: Some(("http_busy_wrk_timeouts", "host_nginx_busy_wrk_timeouts")),
    },
];

/// A started server of either side (stopped when dropped).
enum Server {
    /// A shim serving the service.
    Vm(ServiceRun),
    /// The native process.
    Native(NativeServer),
}

impl Server {
    /// Starts `pair`'s server of `side` (a VM with `--vcpus VCPUS`); an http one must answer
    /// the greeting.
    fn start(opts: &BenchOptions, dir: &Path, pair: &Pair, side: Side) -> Result<Server, BenchError> {
        let server = match (side, pair.native) {
            (Side::Vm, _) => Server::Vm(ServiceRun::start(opts, pair.app, pair.guest_port, &["--vcpus", VCPUS], dir)?),
            (Side::Native, Native::Redis) => Server::Native(NativeServer::redis()?),
            (Side::Native, Native::Nginx) => Server::Native(NativeServer::nginx(dir)?),
        };
        if matches!(pair.client, Client::Wrk) {
            clients::check_greeting(server.port())?;
        }
        Ok(server)
    }

    /// The process whose CPU time is measured.
    fn pid(&self) -> u32 {
        match self {
            Server::Vm(r) => r.pid(),
            Server::Native(s) => s.pid(),
        }
    }

    /// Its loopback port.
    fn port(&self) -> u16 {
        match self {
            Server::Vm(r) => r.port,
            Server::Native(s) => s.port,
        }
    }

    /// Stops it: a VM's summary, `Null` for a native server.
    fn stop(self) -> Result<serde_json::Value, BenchError> {
        match self {
            Server::Vm(r) => r.stop(),
            Server::Native(s) => {
                drop(s);
                Ok(serde_json::Value::Null)
            }
        }
    }
}

/// What one client run against one server measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// The comparison's rate: GETs per second (redis-benchmark) or requests per second (wrk).
    per_s: f64,
    /// The server process's CPU µs per completed request.
    cpu_us_per_req: f64,
    /// wrk timeouts (0 for redis-benchmark).
    timeouts: u64,
    /// redis-benchmark's whole report.
    redis: Option<RedisRun>,
}

/// Runs `client` (redis-benchmark with `n`) against `server`, reading the server's CPU time
/// right before and right after. `busy`: wrk timeouts are counted instead of failing.
fn measure(server: &Server, client: Client, n: u32, busy: bool) -> Result<Measured, BenchError> {
    let (pid, port) = (server.pid(), server.port());
    let before = cpu_us(pid)?;
    let (per_s, requests, timeouts, redis) = match client {
        Client::Redis { pipeline, .. } => {
            let r = clients::redis_benchmark(port, n, pipeline, 50)?;
            (r.get_per_s, 2.0 * f64::from(n), 0, Some(r))
        }
        Client::Wrk => {
            let url = format!("http://127.0.0.1:{port}/");
            let w = clients::wrk(&url, 2, 50, WRK_SECS, busy)?;
            (w.per_s, w.requests as f64, w.timeouts, None)
        }
    };
    let after = cpu_us(pid)?;
    Ok(Measured { per_s, cpu_us_per_req: (after - before) / requests, timeouts, redis })
}

/// The redis-benchmark N of a run at `get_per_s`: [`REDIS_TARGET_S`] of GETs, in thousands,
/// within [`REDIS_MIN_N`]..=[`REDIS_MAX_N`].
fn sized_n(get_per_s: f64) -> u32 {
    let n = (get_per_s * REDIS_TARGET_S / 1000.0).floor() * 1000.0;
    if n.is_nan() { REDIS_MIN_N } else { (n as u32).clamp(REDIS_MIN_N, REDIS_MAX_N) }
}

/// The N of each redis-benchmark run: by (pair index, busy, side).
type Sizes = BTreeMap<(usize, bool, Side), u32>;

/// Sizes the redis-benchmark runs: one short run (the pair's `probe_n`) of every kv setting,
/// side and condition, so that each measured run takes about 2 s whatever the request path
/// costs today, and every round runs the same N.
fn size_runs(opts: &BenchOptions, dir: &Path, note: &dyn Fn(&str)) -> Result<Sizes, BenchError> {
    let mut sizes = Sizes::new();
    for busy in [false, true] {
        let mut guard = if busy { Some(BusyProcess::start()?) } else { None };
        for (i, pair) in PAIRS.iter().enumerate() {
            let Client::Redis { probe_n, .. } = pair.client else { continue };
            for side in [Side::Vm, Side::Native] {
                note(&format!("sizing {} ({side:?}{})", pair.what, if busy { ", busy" } else { "" }));
                let server = Server::start(opts, dir, pair, side)?;
                let m = measure(&server, pair.client, probe_n, busy)?;
                server.stop()?;
                sizes.insert((i, busy, side), sized_n(m.per_s));
            }
        }
        if let Some(g) = guard.as_mut() {
            g.check()?;
        }
    }
    Ok(sizes)
}

/// Samples per figure key, in measurement order.
type Samples = BTreeMap<String, Vec<f64>>;

fn push(samples: &mut Samples, key: &str, v: f64) {
    samples.entry(key.to_string()).or_default().push(v);
}

/// Measures pair `i` once in a VM then once natively; `busy` holds the busy process, if any.
fn measure_pair(
    opts: &BenchOptions,
    dir: &Path,
    i: usize,
    sizes: &Sizes,
    mut busy: Option<&mut BusyProcess>,
    samples: &mut Samples,
) -> Result<(), BenchError> {
    let pair = &PAIRS[i];
    let is_busy = busy.is_some();
    let key = |k: &str| if is_busy { format!("{k}_busy") } else { k.to_string() };
    let mut measured = Vec::new();
    for side in [Side::Vm, Side::Native] {
        let n = sizes.get(&(i, is_busy, side)).copied().unwrap_or(REDIS_MIN_N);
        let server = Server::start(opts, dir, pair, side)?;
        let m = measure(&server, pair.client, n, is_busy)?;
        let summary = server.stop()?;
        if let Some(b) = busy.as_deref_mut() {
            b.check()?;
        }
        measured.push((m, n, summary));
    }
    let [(vm, vm_n, summary), (native, native_n, _)] = measured.as_slice() else {
        return Err(BenchError::Summary("a comparison measured other than two sides".into()));
    };
    push(samples, &key(pair.vm_rate), vm.per_s);
    push(samples, &key(pair.native_rate), native.per_s);
    push(samples, &key(pair.vm_cpu), vm.cpu_us_per_req);
    push(samples, &key(pair.native_cpu), native.cpu_us_per_req);
    if let Some((vm_key, native_key)) = pair.n_keys {
        push(samples, &key(vm_key), f64::from(*vm_n));
        push(samples, &key(native_key), f64::from(*native_n));
    }
    if let (true, Some((vm_key, native_key))) = (is_busy, pair.busy_timeouts) {
        push(samples, vm_key, vm.timeouts as f64);
        push(samples, native_key, native.timeouts as f64);
    }
    // The earlier figures, from the quiet pipelined kv runs.
    if let (false, Client::Redis { pipeline: 16, .. }, Some(k), Some(h)) =
        (is_busy, pair.client, vm.redis, native.redis)
    {
        push(samples, "kv_ops_per_s", k.combined_per_s());
        push(samples, "kv_p99_us", k.p99_us);
        push(samples, "host_redis_ops_per_s", h.combined_per_s());
        let calls = summary["hypercalls"].as_f64().unwrap_or(f64::NAN);
        push(samples, "exits_per_request", calls / (2.0 * f64::from(*vm_n)));
    }
    Ok(())
}

/// One `wrk -t2 -c8 /work?ms=2` run against the http service with `--vcpus VCPUS`: req/s,
/// and the work units a request runs in that VM. One request goes first, alone: the guest
/// times its work units at its first `/work` request, and timed under wrk's load (with two
/// vCPUs timing at once on two host CPUs) it would size "2 ms" at about half the work.
fn work_rate(opts: &BenchOptions, dir: &Path, vcpus: &str) -> Result<(f64, f64), BenchError> {
    let run = ServiceRun::start(opts, "http", 80, &["--vcpus", vcpus], dir)?;
    let units = clients::work_units(run.port, 2)?;
    let url = format!("http://127.0.0.1:{}/work?ms=2", run.port);
    let w = clients::wrk(&url, 2, 8, WRK_SECS, false)?;
    run.stop()?;
    Ok((w.per_s, units))
}

/// `a / b` of two headline figures, inserted as `key` when both exist.
fn ratio(report: &mut BenchReport, key: &str, a: &str, b: &str) {
    if let (Some(a), Some(b)) = (report.get(a), report.get(b)) {
        report.figures.insert(key.into(), a / b);
    }
}

/// Adds the section's figures (see the module documentation); `note` names the step running.
pub(crate) fn add(
    opts: &BenchOptions,
    dir: &Path,
    report: &mut BenchReport,
    note: &dyn Fn(&str),
) -> Result<(), BenchError> {
    note("kv request round trip");
    let run = ServiceRun::start(opts, "kv", 6379, &[], dir)?;
    report.add("request_rtt_us", ping_rtt_us(run.port, 20)?, 1.0);
    run.stop()?;

    let sizes = size_runs(opts, dir, note)?;
    let mut samples = Samples::new();
    let rounds = ROUNDS.min(opts.runs.max(1));
    for round in 1..=rounds {
        for (i, pair) in PAIRS.iter().enumerate() {
            note(&format!("round {round}/{rounds}: {}, quiet", pair.what));
            measure_pair(opts, dir, i, &sizes, None, &mut samples)?;
        }
        let mut busy = BusyProcess::start()?;
        for (i, pair) in PAIRS.iter().enumerate() {
            note(&format!("round {round}/{rounds}: {}, one busy process", pair.what));
            measure_pair(opts, dir, i, &sizes, Some(&mut busy), &mut samples)?;
        }
        drop(busy);
        note(&format!("round {round}/{rounds}: http /work with 1 and 2 vCPUs"));
        for (vcpus, v) in [("1:1:1", "1v"), ("2:2:2", "2v")] {
            let (rate, units) = work_rate(opts, dir, vcpus)?;
            push(&mut samples, &format!("http_work_{v}_req_per_s"), rate);
            push(&mut samples, &format!("http_work_{v}_units_per_req"), units);
            push(&mut samples, &format!("http_work_{v}_units_per_s"), rate * units);
        }
    }

    for (key, values) in samples {
        let total: f64 = values.iter().sum();
        let is_count = key.ends_with("_wrk_timeouts");
        report.add(&key, values, 1.0);
        if is_count {
            // A count of failures: the total over the rounds is the headline.
            report.figures.insert(key, total);
        }
    }
    for pair in &PAIRS {
        for sfx in ["", "_busy"] {
            let k = |s: &str| format!("{s}{sfx}");
            ratio(report, &k(pair.ratio), &k(pair.vm_rate), &k(pair.native_rate));
            ratio(report, &k(pair.cpu_ratio), &k(pair.vm_cpu), &k(pair.native_cpu));
        }
        ratio(report, pair.busy_over_quiet, &format!("{}_busy", pair.ratio), pair.ratio);
    }
    ratio(report, "http_2v_over_1v", "http_work_2v_req_per_s", "http_work_1v_req_per_s");
    ratio(report, "http_2v_over_1v_work", "http_work_2v_units_per_s", "http_work_1v_units_per_s");
    Ok(())
}

/// One PING round trip on an idle connection, in µs (the guest has gone idle in between).
fn ping_rtt_us(port: u16, samples: usize) -> Result<Vec<f64>, BenchError> {
    let io = |e: std::io::Error| BenchError::Summary(format!("ping: {e}"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(io)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16];
    for _ in 0..samples {
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        s.write_all(b"PING\r\n").map_err(io)?;
        let mut got = 0;
        while got < 7 {
            let n = s.read(&mut buf[got..]).map_err(io)?;
            if n == 0 {
                return Err(BenchError::Summary("ping: the kv service closed the connection".into()));
            }
            got += n;
        }
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_runs_are_sized_to_about_a_second_of_gets() {
        assert_eq!(sized_n(35_829.4), 35_000);
        assert_eq!(sized_n(900.0), REDIS_MIN_N);
        assert_eq!(sized_n(5_000_000.0), REDIS_MAX_N);
        assert_eq!(sized_n(f64::NAN), REDIS_MIN_N);
    }

    #[test]
    fn every_figure_key_is_distinct() {
        let mut keys = std::collections::BTreeSet::new();
        for p in &PAIRS {
            let mut all =
                vec![p.vm_rate, p.native_rate, p.ratio, p.vm_cpu, p.native_cpu, p.cpu_ratio, p.busy_over_quiet];
            all.extend(p.n_keys.map(|(a, b)| [a, b]).into_iter().flatten());
            all.extend(p.busy_timeouts.map(|(a, b)| [a, b]).into_iter().flatten());
            for k in all {
                assert!(keys.insert(k), "{k} twice");
            }
        }
    }
}
