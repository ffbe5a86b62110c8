//! The core driven by real clients: a host-side harness serves it on 127.0.0.1 with
//! `std::net` (one thread per connection, the way the guest's socket glue will drive it) and
//! unmodified `curl` and `wrk` talk to it.

extern crate std;

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use alloc::{format, vec};
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// What the harness counts, as the guest's glue will.
#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    connections: AtomicU64,
    requests: AtomicU64,
    by_class: [AtomicU64; 5],
}

impl Counters {
    fn figures(&self) -> Figures {
        Figures {
            vcpus_online: 2,
            vcpus_peak: 2,
            vcpus_min: 1,
            vcpus_max: 2,
            vcpus_burst: 2,
            memory_held: 1 << 30,
            heap_used: 4096,
            connections_open: self.open.load(Relaxed),
            connections_total: self.connections.load(Relaxed),
            requests_total: self.requests.load(Relaxed),
            requests_by_class: core::array::from_fn(|i| self.by_class[i].load(Relaxed)),
        }
    }
}

/// Serves the core on an ephemeral 127.0.0.1 port until the test process ends.
fn serve() -> (String, Arc<Counters>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let url = format!("http://{}", listener.local_addr().expect("local address"));
    let counters = Arc::new(Counters::default());
    let shared = counters.clone();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counters = shared.clone();
            counters.connections.fetch_add(1, Relaxed);
            counters.open.fetch_add(1, Relaxed);
            thread::spawn(move || {
                connection(stream, &counters);
                counters.open.fetch_sub(1, Relaxed);
            });
        }
    });
    (url, counters)
}

/// One connection: read, feed, act — until a close or the client leaves.
fn connection(mut stream: TcpStream, counters: &Counters) {
    let _ = stream.set_nodelay(true);
    let figures = || counters.figures();
    let mut conn = Conn::new();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        loop {
            let (used, action) = conn.feed(&buf, &figures);
            buf.drain(..used);
            let reply = match action {
                Action::Reply(reply) => reply,
                Action::Work(order) => {
                    let start = Instant::now();
                    let done = order.perform(&mut || start.elapsed().as_micros() as u64);
                    order.reply(&done)
                }
                Action::NeedMore => break,
                Action::Close => return linger(stream),
            };
            if reply.is_final() {
                counters.requests.fetch_add(1, Relaxed);
                if let Some(class) = status_class(reply.status) {
                    counters.by_class[class].fetch_add(1, Relaxed);
                }
            }
            if stream.write_all(&reply.bytes).is_err() {
                return;
            }
            if reply.close {
                return linger(stream);
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A graceful close: half-close, then drain what the client still sends (briefly), so that
/// unread input does not turn the close into a reset that loses the last reply.
fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline && matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (apt install {program}): {e}"));
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// `curl` on `urls` (one connection reused when it can be), each transfer followed by a
/// `@@ <status> <new connections>` line.
fn curl(extra: &[&str], urls: &[String]) -> String {
    let mut args = vec!["-sS", "--max-time", "2", "-w", "\n@@ %{http_code} %{num_connects}\n"];
    args.extend_from_slice(extra);
    args.extend(urls.iter().map(String::as_str));
    String::from_utf8(run("curl", &args).stdout).expect("curl output is UTF-8")
}

/// Splits curl's output into `(body, status, new connections)` per transfer.
fn transfers(output: &str) -> Vec<(String, u16, u32)> {
    let mut out = Vec::new();
    let mut body = String::new();
    for line in output.split_inclusive('\n') {
        if let Some(tail) = line.strip_prefix("@@ ") {
            let mut it = tail.split_whitespace().map(|f| f.parse::<u32>().expect("a number"));
            let (status, connects) = (it.next().expect("status"), it.next().expect("connects"));
            // curl's `-w` starts with a newline of its own.
            let text = body.strip_suffix('\n').unwrap_or(&body);
            out.push((String::from(text), status as u16, connects));
            body.clear();
        } else {
            body.push_str(line);
        }
    }
    out
}

/// The string value of `"key":"..."` in a flat JSON object.
fn json_str<'a>(json: &'a str, key: &str) -> &'a str {
    let start = json.find(&format!("\"{key}\":\"")).unwrap_or_else(|| panic!("{key} in {json}")) + key.len() + 4;
    &json[start..start + json[start..].find('"').expect("closing quote")]
}

/// The number value of `"key":N` in a flat JSON object.
fn json_u64(json: &str, key: &str) -> u64 {
    let start = json.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("{key} in {json}")) + key.len() + 3;
    let digits: String = json[start..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("a number")
}

#[test]
fn curl_gets_every_route_over_one_connection() {
    let (url, _) = serve();
    let urls = ["/", "/stats", "/work?ms=30", "/nope", "/work?ms=10001"].map(|p| format!("{url}{p}"));
    let got = transfers(&curl(&[], &urls));
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got.iter().map(|t| t.1).collect::<Vec<_>>(), [200, 200, 200, 404, 400]);
    // One connection, reused for every later transfer.
    assert_eq!(got.iter().map(|t| t.2).collect::<Vec<_>>(), [1, 0, 0, 0, 0]);
    assert_eq!(got[0].0, "Hello from the elastic unikernel!\n");
    let stats = &got[1].0;
    assert!(stats.contains("\"connections\":{\"open\":1,\"total\":1}"), "{stats}");
    assert!(stats.contains("\"requests\":{\"total\":1,\"1xx\":0,\"2xx\":1,"), "{stats}");
    let work = &got[2].0;
    let seed = u64::from_str_radix(json_str(work, "seed").trim_start_matches("0x"), 16).expect("hex seed");
    let checksum = u64::from_str_radix(json_str(work, "checksum").trim_start_matches("0x"), 16).expect("hex");
    let units = json_u64(work, "units");
    assert_eq!(json_u64(work, "ms"), 30);
    assert!(json_u64(work, "elapsed_us") >= 30_000, "{work}");
    assert!(units >= 1);
    assert_eq!(work_units(seed, units), checksum, "the checksum proves {units} units: {work}");
    assert_eq!(got[3].0, "Not Found\n");
    assert!(got[4].0.contains("over the maximum of 10000"), "{}", got[4].0);
}

#[test]
fn curl_head_405_and_http10() {
    let (url, counters) = serve();
    let head =
        String::from_utf8(run("curl", &["-sS", "--max-time", "2", "-I", &format!("{url}/")]).stdout).expect("UTF-8");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Server: elastic-unikernel\r\n") && head.contains("Content-Length: 34\r\n"), "{head}");
    let not_allowed =
        String::from_utf8(run("curl", &["-sS", "--max-time", "2", "-i", "-X", "DELETE", &url]).stdout).expect("UTF-8");
    assert!(not_allowed.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{not_allowed}");
    assert!(not_allowed.contains("Allow: GET, HEAD\r\n"), "{not_allowed}");
    // HTTP/1.0: a new connection per request unless keep-alive is asked for.
    let urls = [format!("{url}/"), format!("{url}/stats")];
    let plain = transfers(&curl(&["--http1.0"], &urls));
    assert_eq!(plain.iter().map(|t| (t.1, t.2)).collect::<Vec<_>>(), [(200, 1), (200, 1)]);
    let kept = transfers(&curl(&["--http1.0", "-H", "Connection: keep-alive"], &urls));
    assert_eq!(kept.iter().map(|t| (t.1, t.2)).collect::<Vec<_>>(), [(200, 1), (200, 0)]);
    assert_eq!(counters.connections.load(Relaxed), 5);
}

#[test]
fn curl_bodies_are_skipped_and_oversized_ones_refused() {
    let (url, counters) = serve();
    let dir = std::env::temp_dir();
    let small = dir.join(format!("httpcore-small-{}", std::process::id()));
    let large = dir.join(format!("httpcore-large-{}", std::process::id()));
    std::fs::write(&small, vec![b'q'; 20_000]).expect("write body file");
    std::fs::write(&large, vec![b'q'; MAX_BODY as usize + 1]).expect("write body file");
    let small_arg = format!("@{}", small.display());
    let large_arg = format!("@{}", large.display());
    let urls = [format!("{url}/"), format!("{url}/stats")];
    // By Content-Length, then chunked: both requests on one connection get their answers.
    let by_length = transfers(&curl(&["-X", "GET", "--data-binary", &small_arg], &urls));
    assert_eq!(by_length.iter().map(|t| (t.1, t.2)).collect::<Vec<_>>(), [(200, 1), (200, 0)]);
    let chunked =
        transfers(&curl(&["-X", "GET", "-H", "Transfer-Encoding: chunked", "--data-binary", &small_arg], &urls));
    assert_eq!(chunked.iter().map(|t| (t.1, t.2)).collect::<Vec<_>>(), [(200, 1), (200, 0)]);
    // Over the cap: 413, and the connection closes (the next transfer needs a new one).
    let refused = transfers(&curl(&["-X", "GET", "--data-binary", &large_arg], &urls));
    assert_eq!(refused.iter().map(|t| (t.1, t.2)).collect::<Vec<_>>(), [(413, 1), (413, 1)]);
    assert!(refused[0].0.contains("request body too large"), "{}", refused[0].0);
    let _ = std::fs::remove_file(small);
    let _ = std::fs::remove_file(large);
    assert_eq!(counters.requests.load(Relaxed), 6);
    assert_eq!(counters.by_class[3].load(Relaxed), 2);
}

#[test]
fn wrk_runs_without_errors() {
    let (url, counters) = serve();
    let out = run("wrk", &["-t1", "-c10", "-d1s", "--timeout", "2s", &format!("{url}/")]);
    let report = String::from_utf8(out.stdout).expect("wrk output is UTF-8");
    assert!(!report.contains("Socket errors"), "{report}");
    assert!(!report.contains("Non-2xx"), "{report}");
    let done: u64 = report
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .map(|(n, _)| n.parse().expect("a request count"))
        .unwrap_or_else(|| panic!("no request count in {report}"));
    assert!(done >= 1000, "{report}");
    // The server answered at least what wrk counted, all 2xx, over wrk's 10 connections.
    assert!(counters.requests.load(Relaxed) >= done);
    assert_eq!(counters.by_class[1].load(Relaxed), counters.requests.load(Relaxed));
    // wrk's 10, plus the one it opens first to check the address.
    assert!((10..=11).contains(&counters.connections.load(Relaxed)), "{report}");
    std::println!(
        "wrk: {}",
        report.lines().filter(|l| l.contains("Requests/sec") || l.contains("Latency")).collect::<Vec<_>>().join(" | ")
    );
}
