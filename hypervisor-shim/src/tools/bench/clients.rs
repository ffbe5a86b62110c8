//! The unmodified clients the service figures are measured with (`redis-benchmark`, `wrk`),
//! run as child processes with a deadline, and the parsing of what they print.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;

/// The body the http service answers `GET /` with, and the anchor nginx serves the same.
pub(crate) const GREETING: &str = "Hello from the elastic unikernel!\n";

/// How long one client run may take before the benchmark gives up on it (a hung server).
const DEADLINE: Duration = Duration::from_secs(90);

/// Runs a client program to its end (killed after [`DEADLINE`]) and returns its standard
/// output; a missing program is an error naming its package, a failed run an error with its
/// diagnostics.
pub(crate) fn client(program: &str, package: &str, args: &[&str]) -> Result<String, BenchError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BenchError::Summary(format!("{program} is not installed: apt-get install {package}"))
            } else {
                BenchError::Summary(format!("cannot run {program}: {e}"))
            }
        })?;
    // Both pipes are drained while the client runs, so a talkative one never blocks.
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("{program} did not finish within {} s", DEADLINE.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("cannot wait for {program}: {e}"));
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let status = status.map_err(|e| BenchError::Summary(format!("{e}\n{stdout}{stderr}")))?;
    if !status.success() {
        return Err(BenchError::RunFailed { code: status.code(), stderr: format!("{program}: {stdout}{stderr}") });
    }
    Ok(stdout)
}

/// Reads `pipe` to its end on a thread of its own: the text, lossily decoded.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    })
}

/// `GET PATH` on `port` with `Connection: close`: the answer's head and body (any status).
fn http_get(port: u16, path: &str) -> Result<(String, String), BenchError> {
    let io = |e: std::io::Error| BenchError::Summary(format!("GET {path} on port {port}: {e}"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes()).map_err(io)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).map_err(io)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.to_string(), body.to_string()))
}

/// Checks that `GET /` on `port` answers 200 with `text/plain` and exactly [`GREETING`] (both
/// sides of the http comparison serve the same thing).
pub(crate) fn check_greeting(port: u16) -> Result<(), BenchError> {
    let (head, body) = http_get(port, "/")?;
    let plain = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("content-type:") && l.contains("text/plain")
    });
    if !head.starts_with("HTTP/1.1 200") || !plain || body != GREETING {
        return Err(BenchError::Summary(format!(
            "GET / on port {port} did not answer the greeting:\n{head}\n\n{body}"
        )));
    }
    Ok(())
}

/// The work units one `GET /work?ms=MS` on the http service on `port` ran (its reply's
/// `units`: the guest sizes the work by a calibration at boot).
pub(crate) fn work_units(port: u16, ms: u32) -> Result<f64, BenchError> {
    let path = format!("/work?ms={ms}");
    let (head, body) = http_get(port, &path)?;
    let v: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    match (head.starts_with("HTTP/1.1 200"), v.as_ref().and_then(|v| v["units"].as_f64())) {
        (true, Some(units)) => Ok(units),
        _ => Err(BenchError::Summary(format!("GET {path} on port {port}: unexpected answer:\n{head}\n\n{body}"))),
    }
}

/// What one `redis-benchmark -t set,get` run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RedisRun {
    /// SET requests per second.
    pub(crate) set_per_s: f64,
    /// GET requests per second.
    pub(crate) get_per_s: f64,
    /// The worse p99 of the two tests, µs.
    pub(crate) p99_us: f64,
}

impl RedisRun {
    /// Both tests' requests per second together: they move the same number of requests, so
    /// the combined rate is the harmonic mean.
    pub(crate) fn combined_per_s(&self) -> f64 {
        2.0 / (1.0 / self.set_per_s + 1.0 / self.get_per_s)
    }
}

/// `redis-benchmark -p PORT -t set,get -n N -P PIPELINE -c CONNECTIONS --csv`: `n` SETs
/// then `n` GETs.
pub(crate) fn redis_benchmark(port: u16, n: u32, pipeline: u32, connections: u32) -> Result<RedisRun, BenchError> {
    let (p, n, pl, c) = (port.to_string(), n.to_string(), pipeline.to_string(), connections.to_string());
    let csv =
        client("redis-benchmark", "redis-tools", &["-p", &p, "-t", "set,get", "-n", &n, "-P", &pl, "-c", &c, "--csv"])?;
    parse_redis_csv(&csv).ok_or_else(|| BenchError::Summary(format!("unexpected redis-benchmark output:\n{csv}")))
}

/// The SET and GET lines of `redis-benchmark --csv` (`"test","rps",...,"p99_latency_ms",...`).
fn parse_redis_csv(csv: &str) -> Option<RedisRun> {
    let (mut set, mut get, mut p99) = (None, None, 0.0f64);
    for line in csv.lines() {
        let f: Vec<&str> = line.split(',').map(|x| x.trim().trim_matches('"')).collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(rps), Ok(p99_ms)) = (f[1].parse::<f64>(), f[6].parse::<f64>()) else { continue };
        if rps.is_nan() || rps <= 0.0 {
            return None;
        }
        match f[0] {
            "SET" => set = Some(rps),
            "GET" => get = Some(rps),
            _ => continue,
        }
        p99 = p99.max(p99_ms * 1000.0);
    }
    Some(RedisRun { set_per_s: set?, get_per_s: get?, p99_us: p99 })
}

/// What one `wrk` run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct WrkRun {
    /// `Requests/sec`.
    pub(crate) per_s: f64,
    /// Requests completed (`N requests in ...`).
    pub(crate) requests: u64,
    /// Requests that timed out (`Socket errors: ..., timeout N`; wrk's timeout is 2 s).
    pub(crate) timeouts: u64,
}

/// `wrk -tTHREADS -cCONNECTIONS -dSECSs URL`. Connect, read and write errors and non-2xx
/// answers fail the run; timeouts fail it too unless `allow_timeouts` (they are counted).
pub(crate) fn wrk(
    url: &str,
    threads: u32,
    connections: u32,
    secs: u32,
    allow_timeouts: bool,
) -> Result<WrkRun, BenchError> {
    let (t, c, d) = (format!("-t{threads}"), format!("-c{connections}"), format!("-d{secs}s"));
    let out = client("wrk", "wrk", &[&t, &c, &d, url])?;
    let run = parse_wrk(&out).map_err(|e| BenchError::Summary(format!("wrk {url}: {e}:\n{out}")))?;
    if run.timeouts > 0 && !allow_timeouts {
        return Err(BenchError::Summary(format!("wrk {url}: {} requests timed out:\n{out}", run.timeouts)));
    }
    Ok(run)
}

/// wrk's report: requests per second and completed, and the errors it lists (any other than
/// timeouts is an error).
fn parse_wrk(out: &str) -> Result<WrkRun, String> {
    if out.contains("Non-2xx") {
        return Err("non-2xx answers".into());
    }
    let mut timeouts = 0;
    if let Some(errors) = out.lines().find_map(|l| l.trim().strip_prefix("Socket errors:")) {
        for part in errors.split(',') {
            let mut kv = part.split_whitespace();
            let (Some(kind), Some(n)) = (kv.next(), kv.next().and_then(|n| n.parse::<u64>().ok())) else {
                return Err("unreadable socket errors".into());
            };
            match kind {
                "timeout" => timeouts = n,
                _ if n > 0 => return Err(format!("socket errors ({kind} {n})")),
                _ => {}
            }
        }
    }
    let per_s = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or("no Requests/sec")?;
    let requests = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse::<u64>().ok())
        .ok_or("no request count")?;
    if requests == 0 {
        return Err("no request completed".into());
    }
    Ok(WrkRun { per_s, requests, timeouts })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 3s test @ http://127.0.0.1:8080/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   830.12us  200.00us   5.00ms   90.00%
    Req/Sec    30.00k     1.00k   32.00k    70.00%
  180123 requests in 3.00s, 20.00MB read
Requests/sec:  60041.00
Transfer/sec:      6.67MB
";

    #[test]
    fn wrk_report() {
        assert_eq!(parse_wrk(WRK), Ok(WrkRun { per_s: 60041.0, requests: 180123, timeouts: 0 }));
        let timeouts =
            WRK.replace("Requests/sec", "  Socket errors: connect 0, read 0, write 0, timeout 7\nRequests/sec");
        assert_eq!(parse_wrk(&timeouts).map(|r| r.timeouts), Ok(7));
        let reads = WRK.replace("Requests/sec", "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec");
        assert!(parse_wrk(&reads).is_err());
        let non2xx = WRK.replace("Requests/sec", "  Non-2xx or 3xx responses: 5\nRequests/sec");
        assert!(parse_wrk(&non2xx).is_err());
        assert!(parse_wrk("garbage").is_err());
    }

    #[test]
    fn redis_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"
\"SET\",\"500000.00\",\"1.424\",\"0.248\",\"1.383\",\"2.343\",\"2.687\",\"2.751\"
\"GET\",\"526315.81\",\"1.253\",\"0.256\",\"1.103\",\"2.295\",\"3.487\",\"3.599\"
";
        let r = parse_redis_csv(csv).expect("parsed");
        assert_eq!((r.set_per_s, r.get_per_s), (500000.0, 526315.81));
        assert!((r.p99_us - 3487.0).abs() < 1e-6);
        assert!((r.combined_per_s() - 2.0 / (1.0 / 500000.0 + 1.0 / 526315.81)).abs() < 1e-6);
        assert_eq!(parse_redis_csv("\"test\",\"rps\"\n"), None);
        assert_eq!(parse_redis_csv(&csv.replace("526315.81", "0.00")), None);
    }
}
