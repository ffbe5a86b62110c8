//! Service figures: the kv and http services under their real clients, against the native
//! anchor (Debian's `redis-server` run on the host with the same command).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{BenchError, BenchOptions, BenchReport};

/// A shim serving one published service for the benchmark (killed when dropped).
pub(crate) struct ServiceRun {
    child: Child,
    /// The published host port.
    pub port: u16,
    summary: std::path::PathBuf,
}

/// A free loopback port.
pub(crate) fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Summary(format!("no free port: {e}")))
}

impl ServiceRun {
    /// Starts `run --app APP --publish PORT:GUEST_PORT EXTRA...` and waits for the service's
    /// "listening" line.
    pub(crate) fn start(
        opts: &BenchOptions,
        app: &str,
        guest_port: u32,
        extra: &[&str],
        dir: &std::path::Path,
    ) -> Result<ServiceRun, BenchError> {
        let port = free_port()?;
        let summary = dir.join(format!("{app}-{port}.json"));
        let mut child = Command::new(&opts.shim)
            .args(["run", "--app", app, "--publish", &format!("127.0.0.1:{port}:{guest_port}")])
            .args(extra)
            .arg("--kernel")
            .arg(&opts.kernel)
            .arg("--summary")
            .arg(&summary)
            .args(["--timeout", "600"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Spawn(opts.shim.clone(), e))?;
        crate::tools::child::wait_until_listening(&mut child, Duration::from_secs(30))
            .map_err(|e| BenchError::Summary(format!("{app}: {e}")))?;
        Ok(ServiceRun { child, port, summary })
    }

    /// Stops the VM (a STOP notice) and returns its summary.
    pub(crate) fn stop(mut self) -> Result<serde_json::Value, BenchError> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.summary).map_err(|e| BenchError::Summary(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| BenchError::Summary(e.to_string()))
    }
}

impl Drop for ServiceRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client program; a missing one is an error naming its package.
fn client(program: &str, package: &str, args: &[&str]) -> Result<String, BenchError> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            BenchError::Summary(format!("{program} is not installed: apt-get install {package}"))
        } else {
            BenchError::Summary(format!("cannot run {program}: {e}"))
        }
    })?;
    if !out.status.success() {
        return Err(BenchError::RunFailed {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `redis-benchmark -t set,get -P 16 -c 50 -n N --csv` against `port`: (ops/s over both
/// tests, worst p99 in µs).
fn redis_benchmark(port: u16, n: u32) -> Result<(f64, f64), BenchError> {
    let p = port.to_string();
    let n = n.to_string();
    let csv = client(
        "redis-benchmark",
        "redis-tools",
        &["-p", &p, "-t", "set,get", "-P", "16", "-c", "50", "-n", &n, "--csv"],
    )?;
    let mut rps = Vec::new();
    let mut p99: f64 = 0.0;
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').map(|x| x.trim_matches('"')).collect();
        if f.len() >= 7 {
            rps.push(f[1].parse::<f64>().unwrap_or(0.0));
            p99 = p99.max(f[6].parse::<f64>().unwrap_or(0.0) * 1000.0);
        }
    }
    if rps.len() != 2 {
        return Err(BenchError::Summary(format!("unexpected redis-benchmark output:\n{csv}")));
    }
    // Both tests move the same number of requests: the combined rate is the harmonic mean.
    let total = 2.0 / (1.0 / rps[0] + 1.0 / rps[1]);
    Ok((total, p99))
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
            got += s.read(&mut buf[got..]).map_err(io)?;
        }
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// Starts Debian's redis-server on a free port (killed when dropped).
struct HostRedis(Child, u16);

impl HostRedis {
    fn start() -> Result<HostRedis, BenchError> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Summary(format!("cannot run redis-server ({e}): apt-get install redis-server")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(BenchError::Summary("redis-server did not start".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(HostRedis(child, port))
    }
}

impl Drop for HostRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Adds `kv_ops_per_s`, `host_redis_ops_per_s`, `kv_over_host_redis`, `kv_p99_us`,
/// `exits_per_request`, `request_rtt_us` and `http_req_per_s`.
pub(crate) fn add(opts: &BenchOptions, dir: &std::path::Path, report: &mut BenchReport) -> Result<(), BenchError> {
    const N: u32 = 100_000;
    let rounds = 3;
    let (mut kv, mut kv_p99, mut host, mut exits) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let run = ServiceRun::start(opts, "kv", 6379, &[], dir)?;
        let (ops, p99) = redis_benchmark(run.port, N)?;
        let summary = run.stop()?;
        kv.push(ops);
        kv_p99.push(p99);
        let calls = summary["hypercalls"].as_f64().unwrap_or(f64::NAN);
        exits.push(calls / f64::from(2 * N));
        let redis = HostRedis::start()?;
        host.push(redis_benchmark(redis.1, N)?.0);
    }
    report.add("kv_ops_per_s", kv, 1.0);
    report.add("kv_p99_us", kv_p99, 1.0);
    report.add("host_redis_ops_per_s", host, 1.0);
    report.add("exits_per_request", exits, 1.0);
    if let (Some(k), Some(h)) = (report.get("kv_ops_per_s"), report.get("host_redis_ops_per_s")) {
        report.figures.insert("kv_over_host_redis".into(), k / h);
    }
    let run = ServiceRun::start(opts, "kv", 6379, &[], dir)?;
    report.add("request_rtt_us", ping_rtt_us(run.port, 20)?, 1.0);
    run.stop()?;
    let mut http = Vec::new();
    for _ in 0..rounds {
        let run = ServiceRun::start(opts, "http", 80, &[], dir)?;
        let url = format!("http://127.0.0.1:{}/", run.port);
        let out = client("wrk", "wrk", &["-t2", "-c50", "-d3s", &url])?;
        run.stop()?;
        if out.contains("Socket errors") || out.contains("Non-2xx") {
            return Err(BenchError::Summary(format!("wrk saw errors:\n{out}")));
        }
        let rps = out
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| BenchError::Summary(format!("unexpected wrk output:\n{out}")))?;
        http.push(rps);
    }
    report.add("http_req_per_s", http, 1.0);
    Ok(())
}
