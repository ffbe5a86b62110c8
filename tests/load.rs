//! `hypervisor-shim load` against real services on 127.0.0.1: Debian's redis-server (kv), a
//! small HTTP/1.1 server in this file (http), and services that answer wrongly or not at all.
//! Every run is bounded (1 to 3 seconds, a few thousand requests).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Run, SHIM, read_json};

/// A temporary directory removed at the end of the test, even a failed one.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("elastic-shim-load-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("UTF-8 temp path").to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port nothing listens on (just now).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("address").port()
}

/// Debian's redis-server on a free loopback port, without persistence; killed when dropped.
struct Redis {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    fn start(name: &str) -> Redis {
        // The free port can be taken between the check and redis' bind: try a few.
        for attempt in 0..3 {
            let dir = TempDir::new(&format!("{name}-redis-{attempt}"));
            let port = free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir.0)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start redis-server ({e}): the kv load tests need Debian's redis-server \
                         (apt-get install redis-server)"
                    )
                });
            let redis = Redis { child, port, _dir: dir };
            if redis.wait_ready() {
                return redis;
            }
        }
        panic!("redis-server did not answer PING on a free port in 3 tries");
    }

    /// Waits up to 10 s for `PING` to answer `+PONG`.
    fn wait_ready(&self) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if self.command("*1\r\n$4\r\nPING\r\n").is_some_and(|r| r == "+PONG") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Sends one RESP command and returns the first line of the answer.
    fn command(&self, resp: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(resp.as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line.trim_end().to_string())
    }

    fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Runs `hypervisor-shim load ARGS`.
fn load(args: &[&str]) -> Run {
    Command::new(SHIM).arg("load").args(args).output().expect("the shim binary runs").into()
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a count"))
}

/// A server that reads RESP commands and answers `+OK` to every one, so `GET`s are wrong.
fn always_ok_server() -> u16 {
    serve(|stream| {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let args: usize = line.trim_start_matches('*').trim().parse().unwrap_or(0);
            for _ in 0..args {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let len: usize = line.trim_start_matches('$').trim().parse().unwrap_or(0);
                let mut data = vec![0; len + 2];
                if reader.read_exact(&mut data).is_err() {
                    return;
                }
            }
            if writer.write_all(b"+OK\r\n").is_err() {
                return;
            }
        }
    })
}

/// Accepts connections on a fresh loopback port and serves each on its own thread.
fn serve(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("address").port();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let handler = Arc::clone(&handler);
            std::thread::spawn(move || handler(stream));
        }
    });
    port
}

/// A keep-alive HTTP/1.1 server answering `status` to every GET, in turn with an empty body, a
/// Content-Length body and a chunked body, closing the connection after every 25th answer, and
/// counting the requests.
fn http_server(status: &'static str, requests: Arc<AtomicU64>) -> u16 {
    serve(move |stream| {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        let mut line = String::new();
        loop {
            // The request head, up to its empty line.
            let mut head_lines = 0;
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
                head_lines += 1;
            }
            if head_lines == 0 {
                continue;
            }
            let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
            let close = n.is_multiple_of(25);
            let connection = if close { "Connection: close\r\n" } else { "" };
            let answer = match n % 3 {
                0 => format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n{connection}\r\n"),
                1 => format!("HTTP/1.1 {status}\r\nContent-Length: 12\r\n{connection}\r\nhello, load\n"),
                _ => format!(
                    "HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n{connection}\r\n5\r\nhello\r\n7\r\n, load\n\r\n0\r\n\r\n"
                ),
            };
            if writer.write_all(answer.as_bytes()).is_err() || close {
                return;
            }
        }
    })
}

#[test]
fn kv_square_wave_against_redis_is_all_correct() {
    let redis = Redis::start("square");
    let dir = TempDir::new("square");
    let out = dir.file("load.json");
    let r = load(&[
        "--target",
        &redis.target(),
        "--protocol",
        "kv",
        "--pattern",
        "square",
        "--rate",
        "2000",
        "--connections",
        "4",
        "--duration",
        "3s",
        "--out",
        &out,
    ]);
    r.expect_code(0);
    let report = read_json(out.as_ref());
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["throughput"].as_f64().is_some_and(|t| t > 0.0), "{report}");
    for p in ["p50_us", "p99_us", "p999_us", "max_us"] {
        assert!(report["latency"][p].as_f64().is_some_and(|v| v > 0.0), "latency {p}: {report}");
    }
    // The square wave: 2000 req/s in seconds 1 and 3, 200 in second 2 (period 2 s).
    let seconds = report["seconds"].as_array().expect("per-second series");
    assert_eq!(seconds.len(), 3, "{report}");
    let done: Vec<u64> = seconds.iter().map(|s| u(&s["completed"])).collect();
    assert!(done[0] > 1800 && done[2] > 1800 && done[1] > 150 && done[1] < 260, "{done:?}");
    assert_eq!(seconds[1]["offered"], 200.0);
    assert_eq!(u(&report["completed"]), done.iter().sum::<u64>());
    // Every key was written to the real server, and nothing else.
    assert_eq!(u(&report["setup"]["keys_written"]), 1000, "{report}");
    assert_eq!(redis.command("*1\r\n$6\r\nDBSIZE\r\n").as_deref(), Some(":1000"));
    assert!(r.stderr.contains("load: latency p50"), "{}", r.stderr);
}

#[test]
fn kv_closed_loop_ramp_against_redis_is_all_correct() {
    let redis = Redis::start("ramp");
    let dir = TempDir::new("ramp");
    let out = dir.file("load.json");
    let r = load(&[
        "--target",
        &redis.target(),
        "--protocol",
        "kv",
        "--pattern",
        "ramp",
        "--concurrency",
        "4",
        "--duration",
        "2s",
        "--keys",
        "100",
        "--set-ratio",
        "0.9",
        "--value-size",
        "300",
        "--out",
        &out,
    ]);
    r.expect_code(0);
    let report = read_json(out.as_ref());
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["config"]["mode"]["loop"], "closed");
    let seconds = report["seconds"].as_array().expect("series");
    let offered: Vec<f64> = seconds.iter().map(|s| s["offered"].as_f64().unwrap()).collect();
    assert!(offered[0] < offered[1], "the ramp rises: {offered:?}");
    assert!(seconds.iter().all(|s| u(&s["completed"]) > 0), "{report}");
    assert!(report["latency"]["p99_us"].as_f64().is_some(), "{report}");
}

#[test]
fn kv_wrong_answers_are_counted_and_fail_the_run() {
    let port = always_ok_server();
    let dir = TempDir::new("wrong");
    let out = dir.file("load.json");
    let r = load(&[
        "--target",
        &format!("127.0.0.1:{port}"),
        "--protocol",
        "kv",
        "--rate",
        "300",
        "--connections",
        "2",
        "--keys",
        "50",
        "--duration",
        "1s",
        "--out",
        &out,
    ]);
    r.expect_code(77);
    let report = read_json(out.as_ref());
    let wrong = u(&report["error_kinds"]["wrong"]);
    assert!(wrong > 0 && u(&report["errors"]) == wrong, "{report}");
    // SETs are answered +OK correctly; the GETs are the wrong ones.
    assert!(u(&report["completed"]) > 0, "{report}");
    let sample = report["error_samples"][0].as_str().expect("an error message");
    assert!(sample.starts_with("GET loadgen:") && sample.contains("answered +OK"), "{sample}");
    assert!(r.stderr.contains("load: error: GET"), "{}", r.stderr);
}

#[test]
fn a_refused_connection_is_a_one_line_error() {
    let port = free_port();
    let r = load(&["--target", &format!("127.0.0.1:{port}"), "--protocol", "kv", "--rate", "10", "--duration", "1s"]);
    r.expect_code(69);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot connect to 127.0.0.1:"), "{}", r.stderr);
}

#[test]
fn bad_flags_are_exit_64_with_one_line() {
    for args in [
        &["--target", "127.0.0.1:1", "--protocol", "kv", "--rate", "0"][..],
        &["--target", "127.0.0.1:1", "--protocol", "kv"],
        &["--target", "127.0.0.1:1", "--protocol", "kv", "--rate", "5", "--pattern", "zigzag"],
        &["--target", "127.0.0.1:1", "--protocol", "kv", "--rate", "5", "--keys", "3"],
    ] {
        let r = load(args);
        r.expect_code(64);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
    }
}

#[test]
fn a_service_that_never_answers_ends_the_run_on_time_with_timeouts() {
    let port = serve(|stream| {
        // Read and never answer, until the generator hangs up.
        let mut sink = [0; 4096];
        let mut s = stream;
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let dir = TempDir::new("silent");
    let out = dir.file("load.json");
    let started = Instant::now();
    let r = load(&[
        "--target",
        &format!("127.0.0.1:{port}"),
        "--protocol",
        "http",
        "--rate",
        "50",
        "--connections",
        "2",
        "--timeout",
        "200ms",
        "--duration",
        "1s",
        "--out",
        &out,
    ]);
    r.expect_code(77);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let report = read_json(out.as_ref());
    assert!(u(&report["error_kinds"]["timeout"]) > 0, "{report}");
    assert_eq!(report["completed"], 0);
    assert!(report["latency"].is_null(), "{report}");
}

#[test]
fn http_spike_against_a_keep_alive_server_is_all_correct() {
    let served = Arc::new(AtomicU64::new(0));
    let port = http_server("200 OK", Arc::clone(&served));
    let dir = TempDir::new("http");
    let out = dir.file("load.json");
    let r = load(&[
        "--target",
        &format!("127.0.0.1:{port}"),
        "--protocol",
        "http",
        "--path",
        "/index.html",
        "--pattern",
        "spike",
        "--rate",
        "1000",
        "--connections",
        "4",
        "--duration",
        "2s",
        "--out",
        &out,
    ]);
    r.expect_code(0);
    let report = read_json(out.as_ref());
    assert_eq!(report["errors"], 0, "{report}");
    // Spike over 2 s: 100 req/s, and 1000 req/s during 0.8..1.2 s: 160 + 400 requests.
    let completed = u(&report["completed"]);
    assert!((540..=580).contains(&completed), "{report}");
    assert_eq!(served.load(Ordering::SeqCst), completed, "every request reached the server once");
    assert!(report["latency"]["p99_us"].as_f64().is_some(), "{report}");
}

#[test]
fn http_error_statuses_are_wrong_answers() {
    let port = http_server("503 Service Unavailable", Arc::new(AtomicU64::new(0)));
    let dir = TempDir::new("http-503");
    let out = dir.file("load.json");
    let r = load(&[
        "--target",
        &format!("127.0.0.1:{port}"),
        "--protocol",
        "http",
        "--rate",
        "100",
        "--duration",
        "1s",
        "--out",
        &out,
    ]);
    r.expect_code(77);
    let report = read_json(out.as_ref());
    assert_eq!(report["completed"], 0, "{report}");
    assert_eq!(u(&report["error_kinds"]["wrong"]), u(&report["requests"]), "{report}");
    assert!(report["error_samples"][0].as_str().unwrap().contains("503"), "{report}");
}
