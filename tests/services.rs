//! Services that serve requests: the kv (Redis protocol) and http services in real VMs,
//! reached through `--publish` on loopback, driven over plain TCP from Rust and with the real
//! clients (redis-cli, redis-benchmark, curl, wrk).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the published port");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads exactly `n` bytes.
fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}

/// Reads one RESP line (up to CRLF).
fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        s.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading a line ({:?} so far): {e}", String::from_utf8_lossy(&line)));
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line[..line.len() - 2]).into_owned()
}

/// Reads one bulk reply (`$N\r\n...\r\n`).
fn read_bulk(s: &mut TcpStream) -> Option<Vec<u8>> {
    let head = read_line(s);
    let n: i64 = head.strip_prefix('$').and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("not a bulk: {head}"));
    if n < 0 {
        return None;
    }
    let body = read_exact(s, n as usize + 2);
    Some(body[..n as usize].to_vec())
}

/// The value of `key` in an INFO reply.
fn info_field(port: u16, key: &str) -> u64 {
    let mut s = connect(port);
    s.write_all(&resp(&[b"INFO"])).unwrap();
    let body = read_bulk(&mut s).expect("INFO answers");
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in INFO:\n{text}"))
}

fn start_kv(name: &str, extra: &[&str]) -> (Served, u16) {
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    let mut args = vec!["--app", "kv", "--publish", publish.as_str()];
    args.extend_from_slice(extra);
    (Served::start(name, &args, "kv: listening on vsock port 6379"), port)
}

fn start_http(name: &str, extra: &[&str]) -> (Served, u16) {
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let mut args = vec!["--app", "http", "--publish", publish.as_str()];
    args.extend_from_slice(extra);
    (Served::start(name, &args, "http: listening on vsock port 80"), port)
}

/// Stops a service and checks it ended cleanly (the STOP notice, exit 5) without a panic.
fn stop_cleanly(s: Served) -> serde_json::Value {
    let (code, stderr, summary) = s.stop();
    assert_eq!(code, Some(5), "the service stops at the host's request; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    summary
}

#[test]
fn kv_round_trips_pipelining_and_protocol_errors_over_plain_tcp() {
    let (kv, port) = start_kv("kv-tcp", &[]);
    let mut s = connect(port);
    s.write_all(&resp(&[b"SET", b"greeting", b"hello"])).unwrap();
    assert_eq!(read_line(&mut s), "+OK");
    s.write_all(&resp(&[b"GET", b"greeting"])).unwrap();
    assert_eq!(read_bulk(&mut s).as_deref(), Some(&b"hello"[..]));
    // Inline commands, binary-safe keys and values.
    s.write_all(b"PING\r\n").unwrap();
    assert_eq!(read_line(&mut s), "+PONG");
    let key: Vec<u8> = (0u8..=255).collect();
    s.write_all(&resp(&[b"SET", &key, &key])).unwrap();
    assert_eq!(read_line(&mut s), "+OK");
    s.write_all(&resp(&[b"GET", &key])).unwrap();
    assert_eq!(read_bulk(&mut s), Some(key.clone()));
    // 200 pipelined requests in one write.
    let mut batch = Vec::new();
    for i in 0..100 {
        batch.extend(resp(&[b"SET", format!("k{i}").as_bytes(), format!("v{i}").as_bytes()]));
        batch.extend(resp(&[b"INCR", b"counter"]));
    }
    s.write_all(&batch).unwrap();
    for i in 0..100 {
        assert_eq!(read_line(&mut s), "+OK");
        assert_eq!(read_line(&mut s), format!(":{}", i + 1));
    }
    s.write_all(&resp(&[b"MGET", b"k0", b"k99", b"missing"])).unwrap();
    assert_eq!(read_line(&mut s), "*3");
    assert_eq!(read_bulk(&mut s).as_deref(), Some(&b"v0"[..]));
    assert_eq!(read_bulk(&mut s).as_deref(), Some(&b"v99"[..]));
    assert_eq!(read_bulk(&mut s), None);
    s.write_all(&resp(&[b"NOSUCH", b"x"])).unwrap();
    assert!(read_line(&mut s).starts_with("-ERR unknown command 'NOSUCH'"));
    // Malformed protocol: an error, then that connection closes; the service keeps serving.
    s.write_all(b"*x\r\n").unwrap();
    assert!(read_line(&mut s).starts_with("-ERR Protocol error"));
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap_or(0), 0, "closed after a protocol error");
    let mut s2 = connect(port);
    s2.write_all(&resp(&[b"GET", b"k42"])).unwrap();
    assert_eq!(read_bulk(&mut s2).as_deref(), Some(&b"v42"[..]));
    let summary = stop_cleanly(kv);
    assert!(summary["vsock"]["connections"].as_u64().unwrap() >= 2, "{summary}");
}

#[test]
fn kv_serves_redis_cli_and_redis_benchmark() {
    let (kv, port) = start_kv("kv-redis", &[]);
    let p = port.to_string();
    let r = client("redis-cli", "redis-tools", &["-p", &p, "set", "a", "b"]);
    assert_eq!(r.stdout.trim(), "OK", "{r:?}");
    let r = client("redis-cli", "redis-tools", &["-p", &p, "get", "a"]);
    assert_eq!(r.stdout.trim(), "b", "{r:?}");
    let r = client("redis-benchmark", "redis-tools", &["-p", &p, "-t", "set,get", "-n", "20000", "-P", "16", "-q"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(text.contains("SET:") && text.contains("GET:"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "redis-benchmark reported errors:\n{text}");
    // One request at a time per connection: replies go out as the vCPU goes idle, their
    // notify riding on its BLOCK (one exit for both) rather than an exit of its own. (How
    // many do depends on timing: a busy host preempts the vCPU past the deferral bound.)
    let r = client("redis-benchmark", "redis-tools", &["-p", &p, "-t", "get", "-n", "20000", "-P", "1", "-q"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let summary = stop_cleanly(kv);
    let in_block = summary["notifies_in_block"].as_u64().expect("notifies_in_block");
    let own = summary["hypercalls_by_call"]["device_notify"].as_u64().expect("device_notify");
    assert!(in_block > 0, "no BLOCK carried a notify ({own} took an exit of their own): {summary}");
}

#[test]
fn kv_under_pipelined_load_does_not_take_and_drop_its_second_vcpu_again_and_again() {
    // Fifty pipelining clients keep one vCPU saturated, but a second gets no more done: on a
    // small host it takes turns with the first for a CPU the I/O thread and the client need
    // too. The kernel then sheds it, and each shed soon after an up holds the next up back
    // longer, so the VM does not flap (before that hold: 10-15 ups and downs a second).
    let (kv, port) = start_kv("kv-flap", &["--vcpus", "1:2:2"]);
    let p = port.to_string();
    let started = std::time::Instant::now();
    let r = client("redis-benchmark", "redis-tools", &["-p", &p, "-t", "set,get", "-n", "500000", "-P", "16", "-q"]);
    let load_us = started.elapsed().as_micros() as u64;
    assert_eq!(r.code, Some(0), "{r:?}");
    let (code, stderr, summary, timeline) = kv.stop_with_timeline();
    assert_eq!(code, Some(5), "{stderr}");
    let ups = summary["vcpus"]["ups"].as_u64().expect("vcpus.ups");
    assert!(ups <= 12, "the VM took a second vCPU {ups} times in one redis-benchmark run: {summary}");
    // (The stop may come before a second vCPU's last down.)
    let (downs, last) = (summary["vcpus"]["downs"].as_u64(), summary["vcpus"]["final"].as_u64());
    assert_eq!(Some(ups), downs.zip(last).map(|(d, f)| d + f - 1), "{summary}");
    // On a host of two CPUs (this project's CI machines), where the second vCPU cannot pay,
    // it is not kept: before the shed test the VM held it for the whole run.
    let mut two_us = 0;
    let mut held: Option<(u64, u64)> = None; // (since t_us, vCPUs)
    for line in &timeline {
        let (Some(t), Some(v)) = (line["t_us"].as_u64(), line["vcpus"].as_u64()) else { continue };
        if let Some((since, 2)) = held {
            two_us += t.saturating_sub(since);
        }
        held = Some((t, v));
    }
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    if cpus <= 2 {
        assert!(
            two_us * 2 < load_us,
            "two vCPUs held for {two_us} µs of a {load_us} µs run on {cpus} CPUs ({ups} ups): {summary}"
        );
    }
}

#[test]
fn kv_data_grows_memory_held_and_rss_and_flushall_gives_it_back() {
    let api_dir = temp_dir("kv-memory-api");
    let api = api_dir.join("api.sock");
    let api = api.to_str().expect("UTF-8 temp path");
    let (kv, port) = start_kv("kv-memory", &["--memory", "64M:1G:1G", "--api-sock", api]);
    let min = 64 * MIB;
    let held_before = info_field(port, "memory_held");
    let rss_before = kv.rss();
    // ~300 MiB of values, each 1 MiB with its own pattern.
    let value = |i: u32| -> Vec<u8> {
        let mut x = 0x9E37_79B9u32.wrapping_mul(i + 1);
        (0..MIB as usize)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    let mut s = connect(port);
    for i in 0..300u32 {
        s.write_all(&resp(&[b"SET", format!("value:{i}").as_bytes(), &value(i)])).unwrap();
        assert_eq!(read_line(&mut s), "+OK", "SET value:{i}");
    }
    let held_full = info_field(port, "memory_held");
    let rss_full = kv.rss();
    assert!(held_full >= held_before + 200 * MIB, "memory held {held_before} -> {held_full}");
    assert!(rss_full >= rss_before + 200 * MIB, "shim RSS {rss_before} -> {rss_full}");
    // Every value reads back equal.
    for i in 0..300u32 {
        s.write_all(&resp(&[b"GET", format!("value:{i}").as_bytes()])).unwrap();
        let got = read_bulk(&mut s).unwrap_or_else(|| panic!("value:{i} is missing"));
        assert!(got == value(i), "value:{i} differs after memory grew");
    }
    s.write_all(&resp(&[b"FLUSHALL"])).unwrap();
    assert_eq!(read_line(&mut s), "+OK");
    let flushed = Instant::now();
    // With no further request (the figures come from the host's API, not from the guest),
    // the idle VM gives the extents back once they have been free a while: its memory held
    // comes to within 16 MiB of min and the shim's RSS follows.
    let held_now = || -> u64 {
        let r = shim(&["ctl", "--api-sock", api, "get", "vm0"]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
        v["memory_bytes"]["final"].as_u64().unwrap_or(u64::MAX)
    };
    let deadline = flushed + Duration::from_secs(5);
    let (mut held, mut rss) = (held_full, rss_full);
    while Instant::now() < deadline {
        held = held_now();
        rss = kv.rss();
        if held <= min + 16 * MIB && rss + 200 * MIB <= rss_full {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = flushed.elapsed();
    eprintln!("after FLUSHALL, idle: held {} MiB, shim RSS {} MiB, after {took:?}", held / MIB, rss / MIB);
    assert!(held <= min + 16 * MIB, "memory held after FLUSHALL, idle: {} MiB", held / MIB);
    assert!(rss + 200 * MIB <= rss_full, "shim RSS after FLUSHALL {} MiB (full {} MiB)", rss / MIB, rss_full / MIB);
    let summary = stop_cleanly(kv);
    assert!(summary["memory_bytes"]["releases"].as_u64().unwrap() >= 1, "{summary}");
}

#[test]
fn http_serves_curl_and_wrk() {
    let (http, port) = start_http("http-clients", &[]);
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let r = client("curl", "curl", &["-s", "-i", &url("/")]);
    assert!(r.stdout.starts_with("HTTP/1.1 200"), "{r:?}");
    assert!(r.stdout.contains("Hello from the elastic unikernel"), "{r:?}");
    let r = client("curl", "curl", &["-s", &url("/work?ms=20")]);
    let work: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    // The service calibrates its work unit on the first request; on a host busy with other
    // processes that calibration runs slow, so only "it worked for a while" is asserted.
    assert!(work["elapsed_us"].as_u64().unwrap() >= 2_000 && work["units"].as_u64() > Some(0), "{work}");
    let r = client("curl", "curl", &["-s", &url("/stats")]);
    let stats: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    assert_eq!(stats["vcpus"]["online"], 1, "{stats}");
    let r = client("curl", "curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &url("/nope")]);
    assert_eq!(r.stdout, "404");
    // wrk's own 2 s timeout turns a host busy with other processes into "socket errors"; a
    // request that takes 10 s is still counted as one.
    let r = client("wrk", "wrk", &["-t2", "-c50", "-d5s", "--timeout", "10s", &url("/")]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(!r.stdout.contains("Socket errors"), "wrk saw socket errors:\n{}", r.stdout);
    assert!(!r.stdout.contains("Non-2xx"), "wrk saw non-2xx answers:\n{}", r.stdout);
    let requests: u64 = r
        .stdout
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(requests > 1000, "{}", r.stdout);
    stop_cleanly(http);
}

/// Throws junk, half-closed and abandoned connections at `port`; `check` then proves a fresh
/// client is served.
fn abuse(port: u16) {
    // Random bytes.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let junk: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut s = connect(port);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&junk);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    // Half-closed: a partial request, then no more writing.
    let s = connect(port);
    let _ = (&s).write_all(b"GET / HT");
    let _ = s.shutdown(Shutdown::Write);
    drop(s);
    // A client that vanishes mid-request.
    let s = connect(port);
    let _ = (&s).write_all(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nabc");
    drop(s);
}

#[test]
fn random_bytes_half_closes_and_vanishing_clients_leave_both_services_serving() {
    let (kv, kv_port) = start_kv("abuse-kv", &[]);
    let (http, http_port) = start_http("abuse-http", &[]);
    for _ in 0..3 {
        abuse(kv_port);
        abuse(http_port);
    }
    let mut s = connect(kv_port);
    s.write_all(&resp(&[b"PING"])).unwrap();
    assert_eq!(read_line(&mut s), "+PONG");
    let r = client("curl", "curl", &["-s", &format!("http://127.0.0.1:{http_port}/")]);
    assert!(r.stdout.contains("Hello"), "{r:?}");
    stop_cleanly(kv);
    stop_cleanly(http);
}

#[test]
fn a_thousand_concurrent_connections_are_served() {
    let (kv, port) = start_kv("kv-1000", &["--vcpus", "1:2:4"]);
    let mut conns: Vec<TcpStream> = (0..1000).map(|_| connect(port)).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(&resp(&[b"SET", format!("c{i}").as_bytes(), format!("{i}").as_bytes()])).unwrap();
    }
    for s in conns.iter_mut() {
        assert_eq!(read_line(s), "+OK");
    }
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(&resp(&[b"GET", format!("c{i}").as_bytes()])).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        assert_eq!(read_bulk(s), Some(format!("{i}").into_bytes()));
    }
    assert_eq!(info_field(port, "connected_clients"), 1001);
    drop(conns);
    let summary = stop_cleanly(kv);
    assert!(summary["vsock"]["connections"].as_u64().unwrap() >= 1001, "{summary}");
}

#[test]
fn a_published_port_in_use_is_a_one_line_error_before_any_vm() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let r = shim(&["run", "--app", "kv", "--publish", &format!("{port}:6379"), "--timeout", "30"]);
    r.expect_code(64);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("Address already in use"), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "no VM ran: {}", r.stdout);
    for (bad, needle) in [("6379", "HOST_PORT:GUEST_PORT"), ("0:1", "ports are"), ("1.2.3:1:2", "HOST_PORT")] {
        let r = shim(&["run", "--app", "kv", "--publish", bad]);
        r.expect_code(64);
        assert!(r.stderr.contains(needle), "{bad}: {}", r.stderr);
    }
}

#[test]
fn the_hybrid_vsock_socket_speaks_connect_and_ok() {
    use std::os::unix::net::UnixStream;
    let dir = temp_dir("uds");
    let path = dir.join("v.sock");
    let mut kv = Served::start(
        "kv-uds",
        &["--app", "kv", "--vsock-uds", path.to_str().unwrap()],
        "kv: listening on vsock port 6379",
    );
    let mut s = UnixStream::connect(&path).expect("the hybrid socket accepts");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"CONNECT 6379\n").unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        s.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(line.starts_with("OK ") && line.trim_end()[3..].parse::<u32>().is_ok(), "{line:?}");
    s.write_all(b"PING\r\n").unwrap();
    let mut pong = [0u8; 7];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    drop(s);
    kv.wait_for("listening", Duration::from_secs(1));
    stop_cleanly(kv);
    assert!(!path.exists(), "the socket file is removed at the end");
}

#[test]
fn under_qemu_the_request_channel_says_it_is_unavailable() {
    if !qemu_available() {
        return;
    }
    let r = shim(&["qemu", "--app", "kv", "--timeout", "120"]);
    r.expect_code(1);
    assert!(r.stdout.contains("the request channel (virtio-vsock) is unavailable here"), "{}", r.stdout);
}

#[test]
fn the_readme_example_service_builds_and_serves() {
    let image = elastic_images::EXAMPLE_SERVICE;
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:7000");
    let shout = Served::start(
        "my-service",
        &["--kernel", image, "--app", "shout", "--publish", &publish],
        "shout: listening on vsock port 7000",
    );
    let mut s = connect(port);
    s.write_all(b"hello\n").unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"1 HELLO\n");
    s.write_all(b"two\nlines\n").unwrap();
    let n = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"3 TWO\nLINES\n");
    drop(s);
    // The image declares only its own service.
    let r = shim(&["run", "--kernel", image, "--app", "kv"]);
    r.expect_code(64);
    assert!(r.stderr.contains("it offers: shout"), "{}", r.stderr);
    stop_cleanly(shout);
}

/// Small values fill boot memory first and then spill into granted memory: every block must go
/// back to the heap it came from (a regression test: blocks from the elastic heap's metadata
/// arena were once returned to the boot heap and corrupted it).
#[test]
fn kv_small_values_spill_from_boot_memory_into_granted_memory() {
    let (kv, port) = start_kv("kv-spill", &["--memory", "64M:256M:512M"]);
    let mut s = connect(port);
    let value = |i: u32| format!("{i:08}").repeat(512).into_bytes(); // 4 KiB
    for chunk in (0..24_000u32).collect::<Vec<_>>().chunks(200) {
        let mut batch = Vec::new();
        for &i in chunk {
            batch.extend(resp(&[b"SET", format!("small:{i}").as_bytes(), &value(i)]));
        }
        s.write_all(&batch).unwrap();
        for _ in chunk {
            assert_eq!(read_line(&mut s), "+OK");
        }
    }
    assert!(info_field(port, "memory_held") > 64 * MIB, "the data spilled into granted memory");
    for i in (0..24_000u32).step_by(997) {
        s.write_all(&resp(&[b"GET", format!("small:{i}").as_bytes()])).unwrap();
        assert_eq!(read_bulk(&mut s), Some(value(i)), "small:{i}");
    }
    stop_cleanly(kv);
}

#[test]
fn a_published_port_no_guest_service_listens_on_is_refused_at_once() {
    // kv listens on 6379; the second published port leads to guest port 6380, where nobody
    // listens.
    let unused = free_port();
    let publish = format!("127.0.0.1:{unused}:6380");
    let (kv, port) = start_kv("kv-unused-port", &["--publish", &publish]);
    let mut s = connect(port);
    s.write_all(b"PING\r\n").unwrap();
    assert_eq!(read_line(&mut s), "+PONG", "the service itself is up");
    // The client of the unused port is reset (or sees the close) at once instead of hanging
    // through the retries a booting guest gets (10 s).
    let asked = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", unused)).expect("the shim accepts, then refuses");
    c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let _ = c.write_all(b"PING\r\n");
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the client of an unused guest port got {other:?} after {:?}", asked.elapsed()),
    }
    let took = asked.elapsed();
    eprintln!("refused after {took:?}");
    assert!(took < Duration::from_secs(5), "refused only after {took:?}");
    let (code, stderr, summary, timeline) = kv.stop_with_timeline();
    assert_eq!(code, Some(5), "{stderr}");
    assert_eq!(summary["vsock"]["refused_unused_port"], 1, "{summary}");
    assert!(
        timeline.iter().any(|e| e["event"] == "vsock_refused" && e["guest_port"] == 6380),
        "no vsock_refused line for guest port 6380 in the timeline"
    );
}
