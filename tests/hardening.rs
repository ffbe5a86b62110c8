//! A hostile guest or a stuck output cannot hang, bloat or subvert the shim: a full stdout
//! pipe does not stop `--timeout`; hypercall blocks below the kernel are refused and boot info
//! stays intact; floods of REPORTs and grant/release pairs leave the shim's RSS where it was;
//! every thread runs under seccomp.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SHIM, require_kvm};

/// A pipe whose buffer is already full and whose reader never reads: the writer end blocks.
fn full_pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
    let (reader, mut writer) = std::io::pipe().expect("pipe");
    let fd = writer.as_raw_fd();
    // SAFETY: fcntl on a descriptor this test owns; only the O_NONBLOCK flag changes.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let chunk = [b'.'; 4096];
    while writer.write(&chunk).is_ok() {}
    // SAFETY: as above; the shim gets a blocking descriptor, as a shell redirection gives it.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    (reader, writer)
}

/// Runs the shim with stdout on a full pipe; returns (exit code, seconds, stderr).
fn run_into_full_pipe(args: &[&str], limit: Duration) -> (Option<i32>, f64, String) {
    let (_reader, writer) = full_pipe();
    let t = Instant::now();
    let mut child = Command::new(SHIM)
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .expect("the shim starts");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the shim with a full stdout pipe did not end within {limit:?} ({args:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (status.code(), t.elapsed().as_secs_f64(), err)
}

#[test]
fn a_full_stdout_pipe_neither_hangs_the_run_nor_defeats_the_timeout() {
    require_kvm();
    // hello writes its banner into a pipe nobody reads, then shuts down: the run ends.
    let (code, secs, err) = run_into_full_pipe(&["run", "--app", "hello", "--timeout", "3"], Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    assert!(secs < 6.0, "took {secs:.1} s");
    // A guest that never ends still stops at --timeout 3.
    let (code, secs, err) =
        run_into_full_pipe(&["run", "--app", "spin", "--timeout", "3", "--", "1000000000000"], Duration::from_secs(15));
    assert_eq!(code, Some(76), "the timeout holds: {err}");
    assert!((2.5..9.0).contains(&secs), "stopped after {secs:.1} s");
}

#[test]
fn hypercalls_naming_the_region_below_the_kernel_get_invalid_and_boot_info_stays_intact() {
    require_kvm();
    let out = Command::new(SHIM)
        .args(["run", "--app", "hostile", "--memory", "64M:128M:128M", "--timeout", "60"])
        .output()
        .expect("the shim runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("hostile: boot info intact after 70 calls below the kernel"), "{stdout}");
    assert!(stdout.contains(", 0 failed"), "{stdout}");
}

/// Runs `flood ARGS` with a timeline file; returns the summary.
fn flood(name: &str, args: &[&str]) -> serde_json::Value {
    require_kvm();
    let dir = common::temp_dir(name);
    let summary = dir.join("summary.json");
    let timeline = dir.join("timeline.jsonl");
    let mut all = vec!["run", "--app", "flood", "--memory", "64M:66M:66M", "--timeout", "600"];
    let (s, t) = (summary.to_str().expect("utf-8"), timeline.to_str().expect("utf-8"));
    all.extend(["--summary", s, "--timeline", t, "--"]);
    all.extend(args);
    let out = Command::new(SHIM).args(&all).output().expect("the shim runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(", 0 not OK"), "every call answered OK: {stdout}");
    common::read_json(&summary)
}

fn rss_growth(s: &serde_json::Value) -> i64 {
    let rss = &s["host_rss_bytes"];
    rss["end"].as_i64().expect("end") - rss["boot"].as_i64().expect("boot")
}

#[test]
fn a_million_reports_leave_the_shim_rss_flat() {
    let s = flood("flood-reports", &["reports", "1000000"]);
    // The guest's own controller reports now and then, too.
    assert!(s["reports"].as_u64() >= Some(1_000_000), "{s}");
    assert!(s["reports_not_recorded"].as_u64() > Some(0), "REPORTs above the rate are not recorded: {s}");
    let grew = rss_growth(&s);
    assert!(grew < 16 << 20, "RSS grew by {} KiB over 10^6 REPORTs", grew >> 10);
}

#[test]
fn a_hundred_thousand_grant_release_pairs_leave_the_shim_rss_flat() {
    let s = flood("flood-grants", &["grants", "100000"]);
    assert_eq!(s["memory_bytes"]["grants"], 100_000, "{s}");
    assert_eq!(s["memory_bytes"]["final"], 64 << 20, "{s}");
    let grew = rss_growth(&s);
    assert!(grew < 16 << 20, "RSS grew by {} KiB over 10^5 grant/release pairs", grew >> 10);
}

/// `Seccomp:` of every thread of process `pid`: (thread name, value).
fn seccomp_of_threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir").flatten() {
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
        out.push((field("Name:").unwrap_or_default(), field("Seccomp:").unwrap_or_default()));
    }
    out
}

#[test]
fn every_thread_of_a_running_shim_is_under_seccomp_and_no_seccomp_turns_it_off() {
    require_kvm();
    let dir = common::temp_dir("seccomp");
    let port = common::free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    let api = dir.join("api.sock");
    let uds = dir.join("v.sock");
    let start = |extra: &[&str]| {
        let mut s = common::Served::start(
            "seccomp-kv",
            &[
                &["--app", "kv", "--vcpus", "1:2:2", "--publish", &publish, "--api-sock", api.to_str().expect("utf-8")]
                    [..],
                &["--vsock-uds", uds.to_str().expect("utf-8")][..],
                extra,
            ]
            .concat(),
            "listening on vsock port",
        );
        // A client makes the I/O thread serve, and the API answers once.
        let ping = Command::new("redis-cli").args(["-p", &port.to_string(), "ping"]).output().expect("redis-cli");
        assert_eq!(String::from_utf8_lossy(&ping.stdout).trim(), "PONG");
        let list = Command::new(SHIM).args(["ctl", "--api-sock", api.to_str().expect("utf-8"), "list"]).output();
        assert!(list.expect("ctl").status.success());
        let threads = seccomp_of_threads(s.pid());
        let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
        for role in ["vcpu0", "-io", "-console", "governor", "api"] {
            assert!(names.iter().any(|n| n.contains(role)), "a {role} thread runs: {names:?}");
        }
        s.wait_for("listening", Duration::from_secs(1));
        (s, threads)
    };
    let (s, threads) = start(&[]);
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "thread {name} runs under a seccomp filter: {threads:?}");
    }
    let (code, stderr, _) = s.stop();
    assert_eq!(code, Some(5), "{stderr}");
    let (s, threads) = start(&["--no-seccomp"]);
    assert!(threads.iter().all(|(_, m)| m == "0"), "--no-seccomp: no filter: {threads:?}");
    drop(s);
}

/// Waits for `child` at most `limit`; kills it and fails the test when it is still running.
fn wait_within(child: &mut std::process::Child, limit: Duration, what: &str) -> (Option<i32>, f64) {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return (s.code(), t.elapsed().as_secs_f64());
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: the shim did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the shim with stderr on a full pipe nobody reads (and stdout to /dev/null); the
/// reader end is returned so the pipe stays open.
fn spawn_with_unread_stderr(args: &[&str]) -> (std::process::Child, std::io::PipeReader) {
    let (reader, writer) = full_pipe();
    let child = Command::new(SHIM)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(writer))
        .spawn()
        .expect("the shim starts");
    (child, reader)
}

#[test]
fn a_guest_flooding_refused_device_setup_cannot_block_the_shim_on_an_unread_stderr() {
    require_kvm();
    let dir = common::temp_dir("setup-flood");
    let summary = dir.join("s.json");
    let s = summary.to_str().expect("utf-8");
    // Every refused step wants a stderr line; stderr is full and never read. --timeout holds.
    let (mut child, _reader) =
        spawn_with_unread_stderr(&["run", "--app", "hostile", "--timeout", "3", "--summary", s, "--", "setup-flood"]);
    let (code, secs) = wait_within(&mut child, Duration::from_secs(40), "--timeout 3 with stderr unread");
    assert_eq!(code, Some(76), "the timeout ends the run");
    assert!(secs < 15.0, "ended {secs:.1} s after the start (--timeout 3)");
    let sum = common::read_json(&summary);
    assert_eq!(sum["exit_reason"], "timeout", "{sum}");
    let d = &sum["diagnostics"];
    let (printed, suppressed, dropped) =
        (d["printed"].as_u64().expect("printed"), d["suppressed"].as_u64().expect("suppressed"), d["dropped"].as_u64());
    assert!(suppressed > 100, "the flood was rate-limited: {d}");
    // A burst of 10, then 1 a second, over ~3 s; none waited for the full pipe.
    assert!(printed + dropped.unwrap_or(0) <= 20, "{d}");
    // Ctrl-C: the hostile guest ignores the STOP notice it posts; the run ends by itself
    // within SIGINT_STOP_GRACE (500 ms) of it, without a second Ctrl-C.
    let (mut child, _reader) =
        spawn_with_unread_stderr(&["run", "--app", "hostile", "--timeout", "120", "--summary", s, "--", "setup-flood"]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().expect("wait").is_none(), "the flood runs until stopped");
    let signal = |child: &std::process::Child, sig: &str| {
        Command::new("kill").args([sig, &child.id().to_string()]).status().expect("kill")
    };
    signal(&child, "-INT");
    let (code, secs) = wait_within(&mut child, Duration::from_secs(20), "one SIGINT with stderr unread");
    assert_eq!(code, Some(130), "one Ctrl-C ends a guest that ignores it");
    // 0.5 s of grace; the rest is slack for a loaded machine.
    assert!(secs < 5.0, "ended {secs:.1} s after the SIGINT");
    assert_eq!(common::read_json(&summary)["exit_reason"], "interrupted");
    // SIGTERM: its sender (containerd, systemd) owns the deadline, so one only asks; the
    // second ends the run at once.
    let (mut child, _reader) =
        spawn_with_unread_stderr(&["run", "--app", "hostile", "--timeout", "120", "--", "setup-flood"]);
    std::thread::sleep(Duration::from_secs(1));
    signal(&child, "-TERM");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().expect("wait").is_none(), "one SIGTERM only asks the guest to stop");
    signal(&child, "-TERM");
    let (code, secs) = wait_within(&mut child, Duration::from_secs(20), "two SIGTERMs with stderr unread");
    assert_eq!(code, Some(130), "the second SIGTERM ends the run");
    assert!(secs < 10.0, "ended {secs:.1} s after the second SIGTERM");
}

#[test]
fn a_closed_stdout_and_stderr_never_change_the_exit_code() {
    require_kvm();
    let dir = common::temp_dir("closed-pipe");
    let summary = dir.join("s.json");
    let s = summary.to_str().expect("utf-8");
    // `2>&1 | head -1` after head has gone: both streams on a pipe with no reader.
    let closed = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let err = writer.try_clone().expect("dup");
        let mut child = Command::new(SHIM)
            .args(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("the shim starts");
        wait_within(&mut child, Duration::from_secs(60), &format!("{args:?}")).0
    };
    assert_eq!(closed(&["run", "--app", "fault"]), Some(71), "a guest fault, not an abort");
    assert_eq!(closed(&["run", "--app", "idle", "--timeout", "2", "--summary", s, "--", "10000"]), Some(76));
    let sum = common::read_json(&summary);
    assert!(sum["console_dropped_bytes"].as_u64() > Some(0), "the console output lost is counted: {sum}");
    assert_eq!(closed(&["--restart-limit", "-1"]), Some(64), "a usage error stays one");
    // The tools too: the load generator reporting on stderr that nobody reads (69: nothing
    // listens on the target; it was 134, an abort on the failed write).
    let target = format!("127.0.0.1:{}", common::free_port());
    let load = ["load", "--target", &target, "--protocol", "kv", "--rate", "10", "--duration", "1s"];
    assert_eq!(closed(&load), Some(69), "the load generator's own code, not an abort");
}

#[test]
fn the_rss_peak_is_the_shim_s_own_and_never_below_boot() {
    require_kvm();
    let dir = common::temp_dir("rss-peak");
    let summary = dir.join("s.json");
    // This process holds 256 MiB while it starts the shim: a peak that survived exec (the
    // parent's) would show it.
    let ballast = vec![7u8; 256 << 20];
    let out = Command::new(SHIM)
        .args(["run", "--app", "hello", "--summary", summary.to_str().expect("utf-8")])
        .output()
        .expect("the shim runs");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ballast.iter().step_by(4096).map(|&b| u64::from(b)).sum::<u64>(), 7 * (256 << 20) / 4096);
    drop(ballast);
    let sum = common::read_json(&summary);
    let rss = &sum["host_rss_bytes"];
    let (boot, peak, end) =
        (rss["boot"].as_u64().expect("boot"), rss["peak"].as_u64().expect("peak"), rss["end"].as_u64().expect("end"));
    assert!(boot > 0 && peak >= boot && peak >= end, "{rss}");
    assert!(peak < 128 << 20, "the peak is the shim's own (a few MiB), not its parent's: {rss}");
}
