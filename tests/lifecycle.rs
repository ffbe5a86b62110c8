//! Snapshot/restore and live migration of a running kv service: every key comes back (values
//! checksummed) in a new shim process, extents included; a corrupt or foreign snapshot is
//! refused with one line; a migrated VM keeps its published port and the source ends with
//! `migrated`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Run, SHIM, ShimProcess, ctl_in, free_port, json_of, read_json, read_json_lines, require_kvm, temp_dir,
    wait_for_api, wait_for_path,
};

/// Keys written, and the size of each value (enough for the VM to grow past its 32 MiB min).
const KEYS: usize = 1200;
const VALUE_LEN: usize = 32 * 1024;

fn value(i: usize) -> String {
    let seed = format!("{i:06}-");
    seed.repeat(VALUE_LEN / seed.len())
}

/// FNV-1a over the bytes.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Pipes `commands` (one per line) into `redis-cli -p port`; returns its output.
fn redis(port: u16, commands: &str) -> String {
    let mut child = match Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("redis-cli is not installed ({e}): apt-get install redis-tools (.ci/run installs it)"),
    };
    let mut stdin = child.stdin.take().expect("stdin");
    let input = commands.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().expect("redis-cli runs");
    let _ = writer.join();
    assert!(out.status.success(), "redis-cli failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_keys(port: u16) {
    let cmds: String = (0..KEYS).map(|i| format!("SET key{i} {}\n", value(i))).collect();
    let out = redis(port, &cmds);
    assert_eq!(out.lines().filter(|l| *l == "OK").count(), KEYS, "every SET answered OK");
}

/// Reads every key back; returns (keys found, checksum of the values in key order).
fn read_keys(port: u16) -> (usize, u64) {
    let cmds: String = (0..KEYS).map(|i| format!("GET key{i}\n")).collect();
    let out = redis(port, &cmds);
    let values: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    (values.len(), checksum(values.join("\n").as_bytes()))
}

fn expected_checksum() -> u64 {
    let values: Vec<String> = (0..KEYS).map(value).collect();
    checksum(values.join("\n").as_bytes())
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis(port, "PING\n").trim() != "PONG" {
        assert!(Instant::now() < deadline, "kv on port {port} never answered PING");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kv_keeps_every_key_across_snapshot_and_restore_and_a_corrupt_snapshot_is_refused() {
    require_kvm();
    let dir = temp_dir("lifecycle-snapshot");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    let src = ShimProcess::start(
        &dir,
        &[
            "run",
            "--app",
            "kv",
            "--publish",
            &publish,
            "--api-sock",
            "src.sock",
            "--vcpus",
            "1:2:2",
            "--memory",
            "32M:256M:256M",
            "--summary",
            "src.json",
            "--timeline",
            "src.jsonl",
            "--timeout",
            "120",
        ],
    );
    wait_for_api(&dir, "src.sock");
    wait_for_port(port);
    write_keys(port);
    assert_eq!(read_keys(port), (KEYS, expected_checksum()), "the keys before the snapshot");
    let snap = json_of(&ctl_in(&dir, "src.sock", &["snapshot", "vm0", "--to", "snap"]));
    let held = snap["held_bytes"].as_u64().expect("held_bytes");
    assert!(held > 32 << 20, "the VM grew past its min (extents in the snapshot): {snap}");
    let written = snap["written_bytes"].as_u64().expect("written_bytes");
    assert!(written < held, "zero pages are not written: {snap}");
    // The source runs on after the snapshot; a key written now is not in the snapshot.
    assert_eq!(redis(port, "SET after-snapshot 1\n").trim(), "OK");
    ctl_in(&dir, "src.sock", &["stop", "vm0"]).expect_code(0);
    let (code, err) = src.wait(Duration::from_secs(30));
    assert_eq!(code, Some(5), "the source stopped at the host's request: {err}");
    assert!(read_json_lines(&dir.join("src.jsonl")).iter().any(|e| e["event"] == "snapshot"));

    // A new process, same port: every key, nothing written after the snapshot.
    let dst = ShimProcess::start(&dir, &["restore", "snap", "--api-sock", "dst.sock", "--summary", "dst.json"]);
    wait_for_api(&dir, "dst.sock");
    wait_for_port(port);
    assert_eq!(read_keys(port), (KEYS, expected_checksum()), "every key back, values checksummed");
    assert_eq!(redis(port, "GET after-snapshot\n").trim(), "", "the snapshot predates this key");
    assert_eq!(redis(port, "SET new 1\n").trim(), "OK", "the restored VM serves writes");
    let live = json_of(&ctl_in(&dir, "dst.sock", &["get", "vm0"]));
    assert_eq!(live["memory_bytes"]["final"].as_u64(), Some(held), "the extents came back: {live}");
    ctl_in(&dir, "dst.sock", &["stop", "vm0"]).expect_code(0);
    let (code, err) = dst.wait(Duration::from_secs(30));
    assert_eq!(code, Some(5), "{err}");
    let summary = read_json(&dir.join("dst.json"));
    assert!(summary["restore_us"].as_u64().is_some_and(|us| us > 0), "{summary}");

    // Refusals: one line each, exit 65 (66 when the directory is missing), no VM.
    let snapdir = dir.join("snap");
    let restore = |what: &str| -> Run {
        Command::new(SHIM)
            .args(["restore", what, "--timeout", "10"])
            .current_dir(&*dir)
            .output()
            .expect("restore")
            .into()
    };
    let state = std::fs::read(snapdir.join("state.json")).expect("state.json");
    let mut flipped = state.clone();
    let at = flipped.len() - 10;
    flipped[at] ^= 0x20;
    std::fs::create_dir_all(dir.join("bad1")).expect("dir");
    std::fs::write(dir.join("bad1/state.json"), &flipped).expect("write");
    std::fs::copy(snapdir.join("memory"), dir.join("bad1/memory")).expect("copy");
    let r = restore("bad1");
    r.expect_code(65);
    assert!(r.stderr.contains("checksum") && r.stderr.trim().lines().count() == 1, "{}", r.stderr);
    std::fs::create_dir_all(dir.join("bad2")).expect("dir");
    std::fs::write(dir.join("bad2/state.json"), &state).expect("write");
    std::fs::write(dir.join("bad2/memory"), b"short").expect("write");
    let r = restore("bad2");
    r.expect_code(65);
    assert!(r.stderr.contains("memory file") && r.stderr.trim().lines().count() == 1, "{}", r.stderr);
    std::fs::create_dir_all(dir.join("bad3")).expect("dir");
    std::fs::write(dir.join("bad3/state.json"), b"{\"not\": \"a snapshot\"}\n").expect("write");
    let r = restore("bad3");
    r.expect_code(65);
    assert!(r.stderr.contains("not a snapshot"), "{}", r.stderr);
    let r = restore("no-such-dir");
    r.expect_code(66);
    assert!(r.stderr.contains("no such snapshot directory"), "{}", r.stderr);
}

#[test]
fn kv_keeps_every_key_and_its_port_across_live_migration() {
    require_kvm();
    let dir = temp_dir("lifecycle-migrate");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    let src = ShimProcess::start(
        &dir,
        &[
            "run",
            "--app",
            "kv",
            "--publish",
            &publish,
            "--api-sock",
            "src.sock",
            "--vcpus",
            "1:2:2",
            "--memory",
            "32M:256M:256M",
            "--summary",
            "src.json",
            "--timeline",
            "src.jsonl",
            "--timeout",
            "120",
        ],
    );
    let dst = ShimProcess::start(
        &dir,
        &[
            "receive",
            "--listen",
            "unix:mig.sock",
            "--api-sock",
            "dst.sock",
            "--summary",
            "dst.json",
            "--timeout",
            "120",
        ],
    );
    wait_for_api(&dir, "src.sock");
    wait_for_port(port);
    write_keys(port);
    wait_for_path(&dir.join("mig.sock"), Duration::from_secs(10), "the receiver never listened");
    // A client keeps writing while the VM moves: every write it saw acknowledged must be on the
    // target (the pre-copy rounds and the final copy catch pages dirtied meanwhile).
    let stop_writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop_writing);
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut batch = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) || batch < 3 {
                // One connection per batch, one command at a time: a write counts as acknowledged
                // only when its own "+OK" arrived (redis-cli would reconnect after a reset and
                // shift its replies).
                if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    for j in 0..50 {
                        let (k, v) = (format!("w{batch}-{j}"), format!("v{batch}-{j}"));
                        let cmd = format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n", k.len(), v.len());
                        let mut reply = [0u8; 5];
                        let ok = conn.write_all(cmd.as_bytes()).is_ok()
                            && std::io::Read::read_exact(&mut conn, &mut reply).is_ok()
                            && &reply == b"+OK\r\n";
                        if !ok {
                            break;
                        }
                        acked.push(k);
                    }
                }
                batch += 1;
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let m = json_of(&ctl_in(&dir, "src.sock", &["migrate", "vm0", "--to", "unix:mig.sock", "--verify"]));
    assert_eq!(m["missed_by_log"], 0, "KVM's dirty log and the shim's bitmaps caught every write: {m}");
    eprintln!("migration: {m}");
    stop_writing.store(true, std::sync::atomic::Ordering::Release);
    let acked = writer.join().expect("writer");
    assert!(acked.len() >= 100, "the writer got {} writes acknowledged", acked.len());
    assert!(m["downtime_us"].as_u64().is_some_and(|d| d > 0) && m["rounds"].as_u64() >= Some(2), "{m}");
    let (code, err) = src.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "the source ends once the target runs the VM: {err}");
    assert!(err.contains("migrated"), "{err}");
    let s = read_json(&dir.join("src.json"));
    assert_eq!(s["exit_reason"], "migrated", "{s}");
    // Same port, now served by the target process.
    wait_for_api(&dir, "dst.sock");
    assert_eq!(read_keys(port), (KEYS, expected_checksum()), "every key on the target, values checksummed");
    let gets: String = acked.iter().map(|k| format!("GET {k}\n")).collect();
    let got = redis(port, &gets);
    let want: Vec<String> = acked.iter().map(|k| k.replacen('w', "v", 1)).collect();
    assert_eq!(got.lines().collect::<Vec<_>>(), want, "every acknowledged write survived the move");
    assert_eq!(redis(port, "SET after-migration 1\n").trim(), "OK");
    ctl_in(&dir, "dst.sock", &["stop", "vm0"]).expect_code(0);
    let (code, err) = dst.wait(Duration::from_secs(30));
    assert_eq!(code, Some(5), "{err}");
    // A migration to nobody fails and leaves the VM where it was.
    let port2 = free_port();
    let publish2 = format!("127.0.0.1:{port2}:6379");
    let lone = ShimProcess::start(&dir, &["run", "--app", "kv", "--publish", &publish2, "--api-sock", "lone.sock"]);
    wait_for_api(&dir, "lone.sock");
    wait_for_port(port2);
    let r = ctl_in(&dir, "lone.sock", &["migrate", "vm0", "--to", "unix:nobody.sock"]);
    r.expect_code(70);
    assert!(r.stderr.contains("keeps running"), "{}", r.stderr);
    assert_eq!(redis(port2, "PING\n").trim(), "PONG", "still served here");
    ctl_in(&dir, "lone.sock", &["stop", "vm0"]).expect_code(0);
    let (code, _) = lone.wait(Duration::from_secs(30));
    assert_eq!(code, Some(5));
}

/// Polls `ctl get vm0` until `pred` holds for its JSON.
fn wait_until(dir: &Path, sock: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = ctl_in(dir, sock, &["get", "vm0"]);
        if r.code == Some(0)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&r.stdout)
            && pred(&v)
        {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn work_in_flight_finishes_correctly_after_restore() {
    require_kvm();
    let dir = temp_dir("lifecycle-in-flight");
    // A checksummed working set of 192 MiB in granted extents, held for 3 s, then verified and
    // freed: the snapshot is taken during the hold, the source killed, the restore verifies.
    let src = ShimProcess::start(
        &dir,
        &[
            "run",
            "--app",
            "mem-wave",
            "--memory",
            "64M:512M:512M",
            "--api-sock",
            "mw.sock",
            "--timeout",
            "120",
            "--",
            "1",
            "192",
            "32",
            "3000",
        ],
    );
    wait_for_api(&dir, "mw.sock");
    wait_until(&dir, "mw.sock", "held 192 MiB", |v| v["memory_bytes"]["final"].as_u64() >= Some((64 + 192) << 20));
    json_of(&ctl_in(&dir, "mw.sock", &["snapshot", "vm0", "--to", "mw-snap"]));
    drop(src);
    let out = Command::new(SHIM)
        .args(["restore", "mw-snap", "--timeout", "60"])
        .current_dir(&*dir)
        .output()
        .expect("restore runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "mem-wave passes after restore:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("VERIFY data_errors=0") && stdout.contains("mem-wave: PASSED"), "{stdout}");

    // Several vCPUs at work, some parked: cpu-burst ramps 1-2-4 and back, checking its results.
    let src = ShimProcess::start(
        &dir,
        &[
            "run",
            "--app",
            "cpu-burst",
            "--vcpus",
            "1:4:4",
            // Keep the vCPUs taken until the snapshot (no shed in between on a small host).
            "--guest-opt",
            "vcpu.down_busy=0",
            "--api-sock",
            "cb.sock",
            "--timeout",
            "120",
            "--",
            "2",
        ],
    );
    wait_for_api(&dir, "cb.sock");
    wait_until(&dir, "cb.sock", "two vCPUs online", |v| v["vcpus"]["final"].as_u64() >= Some(2));
    json_of(&ctl_in(&dir, "cb.sock", &["snapshot", "vm0", "--to", "cb-snap"]));
    drop(src);
    let state = std::fs::read_to_string(dir.join("cb-snap/state.json")).expect("state");
    let body: serde_json::Value = serde_json::from_str(state.split_once('\n').expect("header").1).expect("json");
    let online = body["online"].as_array().expect("online").iter().filter(|o| o.as_bool() == Some(true)).count();
    assert!(online >= 2, "the snapshot has several vCPUs online: {}", body["online"]);
    let out = Command::new(SHIM)
        .args(["restore", "cb-snap", "--timeout", "120"])
        .current_dir(&*dir)
        .output()
        .expect("restore runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "cpu-burst passes after restore:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PASSED"), "{stdout}");
}

/// Starts `receive --listen unix:rx.sock` plus `extra` in `dir` and waits until it listens.
fn start_receiver(dir: &Path, extra: &[&str]) -> ShimProcess {
    let r = ShimProcess::start(dir, &[&["receive", "--listen", "unix:rx.sock"][..], extra].concat());
    wait_for_path(&dir.join("rx.sock"), Duration::from_secs(20), "the receiver never listened");
    r
}

#[test]
fn a_waiting_receiver_honours_its_timeout_and_signals_serves_its_api_and_leaves_no_socket() {
    require_kvm();
    let dir = temp_dir("lifecycle-receive-wait");
    // --timeout while nobody comes: exit 76, the socket file gone.
    let r = start_receiver(&dir, &["--timeout", "2"]);
    let (code, err) = r.wait(Duration::from_secs(20));
    assert_eq!(code, Some(76), "{err}");
    assert!(err.contains("no migration arrived"), "{err}");
    assert!(!dir.join("rx.sock").exists(), "the socket file is removed after the timeout");
    // The API answers while it waits (no VM yet); Ctrl-C ends the wait: exit 130, no files left.
    for round in 0..2 {
        let r = start_receiver(&dir, &["--api-sock", "rx-api.sock"]);
        wait_for_api(&dir, "rx-api.sock");
        assert_eq!(json_of(&ctl_in(&dir, "rx-api.sock", &["list"])), serde_json::json!([]), "round {round}");
        let _ = Command::new("kill").args(["-INT", &r.pid().to_string()]).status();
        let (code, err) = r.wait(Duration::from_secs(10));
        assert_eq!(code, Some(130), "round {round}: {err}");
        assert!(err.contains("interrupted while waiting"), "{err}");
        // The next receiver on the same path starts (the first round's file did not stay).
        assert!(!dir.join("rx.sock").exists() && !dir.join("rx-api.sock").exists(), "round {round}");
    }
    // A source that connects and then says nothing holds it neither past --timeout nor Ctrl-C.
    let r = start_receiver(&dir, &["--timeout", "3"]);
    let silent = std::os::unix::net::UnixStream::connect(dir.join("rx.sock")).expect("connect");
    let (code, err) = r.wait(Duration::from_secs(20));
    assert_eq!(code, Some(76), "{err}");
    drop(silent);
    let r = start_receiver(&dir, &[]);
    let silent = std::os::unix::net::UnixStream::connect(dir.join("rx.sock")).expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.join("rx.sock").exists() {
        assert!(Instant::now() < deadline, "the receiver never accepted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill").args(["-INT", &r.pid().to_string()]).status();
    let (code, err) = r.wait(Duration::from_secs(10));
    assert_eq!(code, Some(130), "{err}");
    drop(silent);
}

#[test]
fn snapshot_restore_and_flags_refuse_what_is_wrong_with_one_line_and_the_documented_code() {
    require_kvm();
    let dir = temp_dir("lifecycle-refusals");
    let src = ShimProcess::start(
        &dir,
        &["run", "--app", "idle", "--api-sock", "api.sock", "--timeout", "120", "--", "60000"],
    );
    wait_for_api(&dir, "api.sock");
    // A snapshot whose parent directory is missing is refused; nothing is created.
    let missing = dir.join("no-such-parent");
    let to = missing.join("snap");
    let r = ctl_in(&dir, "api.sock", &["snapshot", "vm0", "--to", to.to_str().expect("utf-8")]);
    r.expect_code(64);
    assert!(r.stderr.contains("parent directory does not exist"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(!missing.exists(), "the missing parent was not created");
    ctl_in(&dir, "api.sock", &["stop", "vm0"]).expect_code(0);
    let _ = src.wait(Duration::from_secs(30));
    // A missing snapshot directory is missing input (66), not an output failure (74).
    let r: Run =
        Command::new(SHIM).args(["restore", "no-such-snapshot"]).current_dir(&*dir).output().expect("run").into();
    r.expect_code(66);
    assert!(r.stderr.contains("no-such-snapshot: no such snapshot directory"), "{}", r.stderr);
    // Required arguments are named; a bad value is called invalid.
    let usage = |args: &[&str], needle: &str| {
        let r: Run = Command::new(SHIM).args(args).output().expect("run").into();
        r.expect_code(64);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    };
    for (args, name) in [
        (&["ctl", "list"][..], "--api-sock <PATH>"),
        (&["receive"][..], "--listen <unix:PATH|tcp:ADDR:PORT>"),
        (&["restore"][..], "<DIR>"),
        (&["pool"][..], "<CONFIG.toml>"),
        (&["load"][..], "--target <IP:PORT>"),
    ] {
        usage(args, &format!("the following required arguments were not provided: {name}"));
    }
    usage(&["run", "--restart-limit", "-1"], "invalid value '-1' for '--restart-limit <N>'");
    // TCP migration is always mutual TLS, with all three files.
    usage(&["receive", "--listen", "tcp:127.0.0.1:7000"], "a TCP migration is always mutual TLS");
    usage(&["receive", "--listen", "tcp:127.0.0.1", "--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a"], "HOST:PORT");
    usage(&["receive", "--listen", "tcp:127.0.0.1:7000", "--tls-cert", "c"], "--tls-key <FILE>");
    usage(
        &["receive", "--listen", "tcp:127.0.0.1:7000", "--tls-cert", "/no/c", "--tls-key", "k", "--tls-ca", "a"],
        "--tls-cert /no/c: ",
    );
    usage(&["ctl", "--api-sock", "x", "migrate", "vm0", "--to", "tcp:10.0.0.2:7000"], "always mutual TLS");
    // The help says what a bare command does.
    let help = Command::new(SHIM).arg("--help").output().expect("help");
    let help = String::from_utf8_lossy(&help.stdout).replace('\n', " ");
    assert!(help.contains("With no arguments at all, `hypervisor-shim` runs the self-driving demo"), "{help}");
}

/// A restored on-demand VM stays on demand: it serves at once with every key, goes to sleep
/// when idle, and the next client wakes it with the keys still there.
#[test]
fn a_restored_on_demand_vm_sleeps_when_idle_and_wakes_with_its_keys() {
    require_kvm();
    let dir = temp_dir("lifecycle-on-demand-restore");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    let args = ["run", "--app", "kv", "--publish", &publish, "--on-demand", "--idle-shutdown", "2s"];
    let src = ShimProcess::start(&dir, &[&args[..], &["--api-sock", "src.sock", "--timeout", "120"]].concat());
    wait_for_api(&dir, "src.sock");
    write_keys(port);
    json_of(&ctl_in(&dir, "src.sock", &["snapshot", "vm0", "--to", "snap"]));
    ctl_in(&dir, "src.sock", &["stop", "vm0"]).expect_code(0);
    let (code, err) = src.wait(Duration::from_secs(30));
    assert_eq!(code, Some(5), "the source stopped at the host's request: {err}");

    let dst = ShimProcess::start(
        &dir,
        &["restore", "snap", "--api-sock", "dst.sock", "--summary", "dst.json", "--timeline", "dst.jsonl"],
    );
    wait_for_api(&dir, "dst.sock");
    wait_for_port(port);
    assert_eq!(read_keys(port), (KEYS, expected_checksum()), "every key after the restore");
    // Idle for 2 s: it goes to sleep (the API shows it sleeping), and the next client wakes it.
    let deadline = Instant::now() + Duration::from_secs(15);
    // (Between the VM's end and the slot's stand-in, `get` finds no VM: asked again.)
    let sleeping = |r: Run| r.code == Some(0) && json_of(&r)["state"] == "sleeping";
    while !sleeping(ctl_in(&dir, "dst.sock", &["get", "vm0"])) {
        assert!(Instant::now() < deadline, "the restored VM never went to sleep");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(read_keys(port), (KEYS, expected_checksum()), "every key after the wake");
    ctl_in(&dir, "dst.sock", &["stop", "vm0"]).expect_code(0);
    let (code, err) = dst.wait(Duration::from_secs(30));
    assert_eq!(code, Some(5), "{err}");
    let events: Vec<String> = read_json_lines(&dir.join("dst.jsonl"))
        .iter()
        .filter_map(|l| l["event"].as_str().map(str::to_string))
        .filter(|e| ["sleep", "wake", "cold_start"].contains(&e.as_str()))
        .collect();
    assert_eq!(events, ["sleep", "wake"], "the restored VM slept and woke once");
    let summary = read_json(&dir.join("dst.json"));
    assert_eq!(summary["on_demand"]["wakes"], 1, "{summary}");
}

/// `--restart on-failure --restart-from DIR`: a kv VM killed by its policy (asked to come down
/// to a lower max, it kept its keys) restarts from the snapshot the operator took, with every
/// key it held then and none written after; the flag without `--restart on-failure` is
/// refused with one line.
#[test]
fn a_failed_vm_restarts_from_its_last_snapshot_with_the_keys_it_held_then() {
    require_kvm();
    let dir = temp_dir("lifecycle-restart-from");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    let refused = common::shim(&["run", "--app", "kv", "--publish", &publish, "--restart-from", "snap"]);
    refused.expect_code(64);
    assert!(refused.stderr.contains("--restart-from needs --restart on-failure"), "{}", refused.stderr);
    let vm = ShimProcess::start(
        &dir,
        &[
            "run",
            "--app",
            "kv",
            "--publish",
            &publish,
            "--memory",
            "32M:256M:256M",
            "--on-violation",
            "kill",
            "--reclaim-grace",
            "200ms",
            "--restart",
            "on-failure",
            "--restart-from",
            "snap",
            "--api-sock",
            "api.sock",
            "--timeline",
            "tl.jsonl",
            "--summary",
            "sum.json",
            "--timeout",
            "120",
        ],
    );
    wait_for_api(&dir, "api.sock");
    wait_for_port(port);
    write_keys(port);
    json_of(&ctl_in(&dir, "api.sock", &["snapshot", "vm0", "--to", "snap"]));
    assert_eq!(redis(port, "SET after the-snapshot\n").trim(), "OK");
    // Max down to min: the VM cannot give back memory its keys live in, and is killed (75).
    ctl_in(&dir, "api.sock", &["policy", "vm0", "--memory", "32M:32M:32M"]).expect_code(0);
    // The restarted VM runs under its configured policy again (max 256 MiB).
    wait_until(&dir, "api.sock", "restarted", |v| v["memory_policy"]["max"] == 256u64 << 20 && v["state"] == "running");
    wait_for_port(port);
    assert_eq!(json_of(&ctl_in(&dir, "api.sock", &["get", "vm0"]))["restarts"], 1);
    assert_eq!(read_keys(port), (KEYS, expected_checksum()), "every key of the snapshot after the restart");
    assert_eq!(redis(port, "GET after\n").trim(), "", "a key written after the snapshot came back");
    ctl_in(&dir, "api.sock", &["stop", "vm0"]).expect_code(0);
    let (code, err) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("ended with exit code 75; restart 1 of"), "{err}");
    let events: Vec<String> = read_json_lines(&dir.join("tl.jsonl"))
        .iter()
        .filter_map(|l| l["event"].as_str().map(str::to_string))
        .filter(|e| ["violation", "restart", "restore"].contains(&e.as_str()))
        .collect();
    assert_eq!(events, ["violation", "restart", "restore"]);
    assert_eq!(read_json(&dir.join("sum.json"))["restarts"], 1);
}
