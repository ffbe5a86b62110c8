//! Elastic serving as a user sees it: the default demo (a bare `hypervisor-shim`, what `cargo
//! run --release` runs) and the load generator against the guest's own services. Every run is
//! bounded: the demo plays a fixed 14 s pattern, the load runs last 3 s.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Run, SHIM, Served, free_port, read_json, require_kvm, temp_dir};

#[test]
fn bare_invocation_runs_the_demo_which_scales_up_and_back_with_no_errors() {
    require_kvm();
    let dir = temp_dir("demo");
    let started = Instant::now();
    let run: Run = Command::new(SHIM).current_dir(&*dir).output().expect("the shim runs").into();
    let took = started.elapsed();
    run.expect_code(0);
    assert!(took < Duration::from_secs(30), "the demo took {took:?} (goal: under 30 s)\n{}", run.stdout);

    // One line per second, with the resources held.
    let seconds: Vec<&str> = run.stdout.lines().filter(|l| l.contains("| vCPUs ")).collect();
    assert!(seconds.len() >= 15, "expected a line per second:\n{}", run.stdout);
    let vcpus = |l: &str| -> u32 {
        l.split("| vCPUs ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("vCPUs")
    };
    let loaded: Vec<u32> =
        seconds.iter().filter(|l| l.contains("ramp") || l.contains("spike")).map(|l| vcpus(l)).collect();
    assert!(loaded.iter().any(|&v| v > 1), "no second of load showed vCPUs above min:\n{}", run.stdout);
    let last = seconds.last().expect("a last line");
    assert!(last.contains("idle") && vcpus(last) == 1, "vCPUs not back at min after the load: {last}");
    assert!(run.stdout.contains(", 0 errors,"), "the summary does not report 0 errors:\n{}", run.stdout);

    // The JSON summary agrees, and the plot draws load and resources.
    let report = read_json(&dir.join("demo.json"));
    let demo = &report["demo"];
    assert_eq!(demo["errors"], 0, "{demo}");
    assert!(demo["requests"].as_u64().unwrap_or(0) > 1000, "{demo}");
    assert!(demo["peak_vcpus"].as_u64().unwrap_or(0) > 1, "{demo}");
    assert_eq!(demo["final_vcpus"], 1, "{demo}");
    assert_eq!(demo["vm_exit_code"], 5, "the VM should end at the demo's STOP (exit 5): {demo}");
    assert!(demo["peak_memory_bytes"].as_u64() > demo["final_memory_bytes"].as_u64(), "{demo}");
    // The timeline behind the plot: a line for every vCPU brought up, each with its time.
    let timeline = report["timeline"].as_array().expect("demo.json has the VM's timeline");
    let ups = timeline.iter().filter(|l| l["event"] == "vcpu_up").count() as u64;
    assert!(ups >= 1 && ups == report["vm"]["vcpus"]["ups"].as_u64().unwrap_or(0), "{ups} vcpu_up lines");
    assert!(timeline.iter().all(|l| l["t_us"].is_u64()), "timeline lines without t_us");
    let svg = std::fs::read_to_string(dir.join("demo.svg")).expect("demo.svg written");
    for caption in ["requests per second", "vCPUs held", "memory held"] {
        assert!(svg.contains(caption), "demo.svg lacks the '{caption}' panel");
    }
    assert!(svg.matches("<polyline").count() >= 4, "demo.svg has too few lines drawn");
}

#[test]
fn demo_flags_are_checked() {
    let run: Run = Command::new(SHIM).args(["demo", "--rate", "0"]).output().expect("runs").into();
    run.expect_code(64);
    assert!(run.stderr.contains("--rate") || run.stderr.contains("'0'"), "{}", run.stderr);
    let run: Run = Command::new(SHIM).args(["demo", "--out-dir", "/nonexistent/dir"]).output().expect("runs").into();
    run.expect_code(64);
    assert!(run.stderr.contains("not a directory"), "{}", run.stderr);
}

#[test]
fn kv_square_wave_against_the_guest_is_all_correct() {
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    let served = Served::start(
        "kv-square",
        &["--app", "kv", "--vcpus", "1:2:2", "--memory", "64M:256M:256M", "--publish", &publish],
        "listening on vsock port",
    );
    let out = served.dir.join("load.json");
    let run: Run = Command::new(SHIM)
        .args(["load", "--target", &format!("127.0.0.1:{port}"), "--protocol", "kv", "--pattern", "square"])
        .args(["--rate", "2000", "--period", "1s", "--duration", "3s", "--out"])
        .arg(&out)
        .output()
        .expect("load runs")
        .into();
    run.expect_code(0);
    let report = read_json(&out);
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["completed"].as_u64().unwrap_or(0) >= 2000, "{report}");
    assert!(report["latency"]["p99_us"].as_f64().is_some_and(|v| v > 0.0), "{report}");
    let seconds = report["seconds"].as_array().expect("per-second figures");
    assert_eq!(seconds.len(), 3, "{report}");
    assert!(seconds.iter().all(|s| s["throughput"].as_f64().is_some_and(|t| t > 0.0)), "{report}");
    let (code, stderr, _) = served.stop();
    assert_eq!(code, Some(5), "the service stops at the host's request; stderr:\n{stderr}");
}

/// A shim started with `--on-demand`, once it says it waits for clients (killed when dropped).
struct OnDemand {
    child: std::process::Child,
    port: u16,
    dir: common::TempDir,
}

impl OnDemand {
    /// The http service, `--on-demand` (waking by resume).
    fn start(name: &str, extra: &[&str]) -> OnDemand {
        OnDemand::start_as(name, "http", 80, "--on-demand", extra)
    }

    /// `app` (listening on `guest_port`) with `on_demand` (`--on-demand` or `--on-demand=MODE`).
    fn start_as(name: &str, app: &str, guest_port: u16, on_demand: &str, extra: &[&str]) -> OnDemand {
        use std::io::BufRead;
        require_kvm();
        let dir = temp_dir(name);
        let port = free_port();
        let mut child = Command::new(SHIM)
            .args(["run", "--app", app, "--publish", &format!("127.0.0.1:{port}:{guest_port}"), on_demand])
            .args(extra)
            .arg("--timeline")
            .arg(dir.join("timeline.jsonl"))
            .arg("--summary")
            .arg(dir.join("summary.json"))
            .args(["--timeout", "120"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the shim starts");
        let err = child.stderr.take().expect("stderr");
        let mut lines = std::io::BufReader::new(err).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(first.contains("on demand, no VM running"), "unexpected first line: {first}");
        assert!(first.contains(&format!("127.0.0.1:{port}")), "{first}");
        std::thread::spawn(move || for _ in lines {});
        OnDemand { child, port, dir }
    }

    /// Whether a vCPU thread of the VM exists now.
    fn vm_running(&self) -> bool {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("the shim runs");
        tasks
            .filter_map(Result::ok)
            .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end().starts_with("vm0-vcpu")))
    }

    /// The shim's resident set (bytes).
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Waits until the VM has gone (asleep or stopped after its idle time).
    fn wait_until_no_vm(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.vm_running() {
            assert!(Instant::now() < deadline, "the VM did not go after its idle time");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn redis(&self, args: &[&str]) -> String {
        let port = self.port.to_string();
        let mut all = vec!["-p", &port];
        all.extend_from_slice(args);
        let run = common::client("redis-cli", "redis-tools", &all);
        run.expect_code(0);
        run.stdout.trim().to_string()
    }

    fn curl(&self, path: &str) -> Run {
        common::client("curl", "curl", &["-sS", "-m", "10", &format!("http://127.0.0.1:{}{path}", self.port)])
    }

    /// SIGINT, wait; returns (exit code, timeline events, summary).
    fn stop(self) -> (Option<i32>, Vec<String>, serde_json::Value) {
        let (code, lines, summary) = self.stop_with_timeline();
        let events = lines
            .into_iter()
            .filter_map(|l| l["event"].as_str().map(str::to_string))
            .filter(|e| e != "report" && e != "notice" && e != "credit")
            .collect();
        (code, events, summary)
    }

    /// SIGINT, wait; returns (exit code, timeline lines, summary).
    fn stop_with_timeline(mut self) -> (Option<i32>, Vec<serde_json::Value>, serde_json::Value) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let status = self.child.wait().expect("wait");
        let lines = common::read_json_lines(&self.dir.join("timeline.jsonl"));
        (status.code(), lines, read_json(&self.dir.join("summary.json")))
    }
}

impl Drop for OnDemand {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn on_demand_sleeps_with_its_state_and_the_next_client_resumes_it() {
    let od = OnDemand::start_as("on-demand-kv", "kv", 6379, "--on-demand", &["--idle-shutdown", "500ms"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!od.vm_running(), "a VM runs before any client came");
    let rss_before = od.rss();
    assert_eq!(od.redis(&["ping"]), "PONG");
    // 800 KB of data the VM keeps in memory (eight values, each under the 128 KiB an argument
    // may have), with checksums to compare after the wake.
    let values: Vec<String> =
        (0..8u64).map(|k| (0..100_000u64).map(|i| char::from(b'a' + ((i * 7 + k) % 26) as u8)).collect()).collect();
    let sum = |s: &str| s.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    for (k, v) in values.iter().enumerate() {
        assert_eq!(od.redis(&["set", &format!("big{k}"), v]), "OK");
    }
    assert_eq!(od.redis(&["set", "k", "before the sleep"]), "OK");
    od.wait_until_no_vm();
    // Asleep: the shim holds no guest memory (its RSS is that of the shim before any VM, give
    // or take allocator slack; the VM held 64 MiB or more).
    let rss_asleep = od.rss();
    assert!(rss_asleep < rss_before + (8 << 20), "RSS asleep {rss_asleep} B, before any VM {rss_before} B");
    assert_eq!(od.redis(&["get", "k"]), "before the sleep", "the key set before the sleep is gone");
    for (k, v) in values.iter().enumerate() {
        assert_eq!(sum(&od.redis(&["get", &format!("big{k}")])), sum(v), "big{k} changed across the sleep");
    }
    assert_eq!(od.redis(&["incr", "n"]), "1");
    od.wait_until_no_vm();
    assert_eq!(od.redis(&["incr", "n"]), "2", "a second sleep and wake lost the counter");
    // The first boot took the service's template (before the first client's bytes reached
    // the guest); each wake says its path and phases.
    let (code, timeline, summary) = od.stop_with_timeline();
    let path_of = |event: &str| -> Vec<String> {
        timeline.iter().filter(|l| l["event"] == event).map(|l| l["path"].as_str().unwrap_or("?").to_string()).collect()
    };
    assert_eq!(path_of("cold_start"), ["boot"]);
    assert_eq!(path_of("wake"), ["resume", "resume"]);
    assert_eq!(timeline.iter().filter(|l| l["event"] == "template").count(), 1, "{timeline:?}");
    assert_eq!(code, Some(5), "{timeline:?}");
    let wake_lines: Vec<&str> = timeline
        .iter()
        .filter_map(|l| l["event"].as_str())
        .filter(|e| ["cold_start", "sleep", "wake"].contains(e))
        .collect();
    assert_eq!(wake_lines, ["cold_start", "sleep", "wake", "sleep", "wake"], "{timeline:?}");
    let od_figures = &summary["on_demand"];
    assert_eq!(od_figures["cold_starts"], 1, "{summary}");
    assert_eq!(od_figures["sleeps"], 2, "{summary}");
    assert_eq!(od_figures["wakes"], 2, "{summary}");
    assert_eq!(od_figures["wake_us"].as_array().map(Vec::len), Some(2), "{summary}");
    let phases = od_figures["wake_phases"].as_array().expect("wake phases");
    assert_eq!(phases.len(), 2, "{summary}");
    for p in phases {
        let ready = p["ready_us"].as_u64().expect("ready_us");
        let parts: u64 = ["kvm_us", "memory_us", "vcpus_us", "devices_us"].iter().filter_map(|k| p[*k].as_u64()).sum();
        assert!(parts > 0 && parts <= ready, "{p}");
        assert!(p["first_reply_us"].as_u64().is_some_and(|f| f >= ready), "{p}");
        assert!(p["post_wake_faults"].as_u64().is_some(), "{p}");
    }
}

/// One on-demand kv slot of a pool file, published on `port`, idle after `idle`.
fn kv_slot(name: &str, port: u16, idle: &str) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\napp = \"kv\"\nvcpus = \"1:1:1\"\nmemory = \"64M:64M:64M\"\nlog = \"warn\"\n\
         publish = [\"127.0.0.1:{port}:6379\"]\non_demand = true\nidle_shutdown = \"{idle}\"\n"
    )
}

/// Writes `config` to `dir/pool.toml` and starts a pool on it, with its timeline and summary in
/// `dir` (stderr as `stderr` says).
fn start_pool(dir: &std::path::Path, config: &str, stderr: std::process::Stdio) -> std::process::Child {
    std::fs::write(dir.join("pool.toml"), config).expect("the pool file");
    Command::new(SHIM)
        .arg("pool")
        .arg(dir.join("pool.toml"))
        .arg("--timeline")
        .arg(dir.join("timeline.jsonl"))
        .arg("--summary")
        .arg(dir.join("summary.json"))
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("the shim starts")
}

/// A pool of two on-demand slots of one service: the first boots and takes the service's
/// template at its first client; the second starts from that template (no boot), with none of
/// the first's data.
#[test]
fn the_second_instance_of_a_service_starts_from_the_template_the_first_took() {
    require_kvm();
    let dir = temp_dir("template-pool");
    let (a, b) = (free_port(), free_port());
    let config = format!(
        "[pool]\nvcpus = 2\nmemory = \"256M\"\ntimeout = \"60s\"\n{}{}",
        kv_slot("a", a, "30s"),
        kv_slot("b", b, "30s")
    );
    let mut child = start_pool(&dir, &config, std::process::Stdio::null());
    let redis = |port: u16, args: &[&str]| {
        let port = port.to_string();
        let mut all = vec!["-p", &port];
        all.extend_from_slice(args);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let run = common::client("redis-cli", "redis-tools", &all);
            if run.code == Some(0) && !run.stdout.contains("Connection refused") {
                return run.stdout.trim().to_string();
            }
            assert!(Instant::now() < deadline, "{all:?}: {}", run.stdout);
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(redis(a, &["set", "secret", "of a"]), "OK");
    assert_eq!(redis(a, &["get", "secret"]), "of a");
    assert_eq!(redis(b, &["get", "secret"]), "", "the template carried a's data into b");
    assert_eq!(redis(b, &["ping"]), "PONG");
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let _ = child.wait();
    let timeline = common::read_json_lines(&dir.join("timeline.jsonl"));
    let starts: Vec<(String, String)> = timeline
        .iter()
        .filter(|l| l["event"] == "cold_start")
        .map(|l| (l["vm"].as_str().unwrap_or("").to_string(), l["path"].as_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(starts, [("a".to_string(), "boot".to_string()), ("b".to_string(), "template".to_string())]);
    assert!(timeline.iter().any(|l| l["event"] == "template" && l["vm"] == "a"), "{timeline:?}");
    let summary = read_json(&dir.join("summary.json"));
    let b_figures = summary["vms"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "b")).expect("b");
    let phases = &b_figures["on_demand"]["template_phases"];
    assert_eq!(phases.as_array().map(Vec::len), Some(1), "{summary}");
    assert!(phases[0]["first_reply_us"].as_u64().is_some(), "{summary}");
    assert_eq!(b_figures["on_demand"]["boot_us"].as_array().map(Vec::len), Some(0), "b booted: {summary}");
}

#[test]
fn on_demand_boot_boots_at_the_first_client_stops_when_idle_and_boots_again() {
    let od = OnDemand::start_as("on-demand", "http", 80, "--on-demand=boot", &["--idle-shutdown", "1s"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!od.vm_running(), "a VM runs before any client came");
    let first = od.curl("/");
    first.expect_code(0);
    assert!(first.stdout.contains("Hello"), "{}", first.stdout);
    assert!(od.vm_running(), "no VM after the first request");
    // 1 s idle: the VM stops (and the shim keeps listening).
    let deadline = Instant::now() + Duration::from_secs(5);
    while od.vm_running() {
        assert!(Instant::now() < deadline, "the VM did not stop after 1 s idle");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = od.curl("/stats");
    second.expect_code(0);
    assert!(second.stdout.contains("\"vcpus\""), "{}", second.stdout);
    let (code, events, summary) = od.stop();
    // Ctrl-C with the second VM running: it stops at the host's request.
    assert_eq!(code, Some(5), "{events:?}");
    assert_eq!(
        events,
        ["cold_start", "boot", "first_reply", "idle_shutdown", "end", "cold_start", "boot", "first_reply", "end"],
        "timeline (reports, notices and credit lines left out)"
    );
    assert_eq!(summary["on_demand"]["cold_starts"], 2, "{summary}");
    assert_eq!(summary["on_demand"]["idle_shutdowns"], 1, "{summary}");
    assert_eq!(summary["on_demand"]["boot_us"].as_array().map(Vec::len), Some(2), "{summary}");
}

#[test]
fn clients_that_arrive_during_a_cold_start_are_all_served() {
    let od = OnDemand::start("on-demand-burst", &["--idle-shutdown", "30s"]);
    let port = od.port;
    let clients: Vec<_> = (0..24)
        .map(|i| {
            std::thread::spawn(move || {
                common::client("curl", "curl", &["-sS", "-m", "10", &format!("http://127.0.0.1:{port}/?client={i}")])
            })
        })
        .collect();
    for c in clients {
        let run = c.join().expect("client thread");
        run.expect_code(0);
        assert!(run.stdout.contains("Hello"), "{}", run.stdout);
    }
    let (code, events, summary) = od.stop();
    assert_eq!(code, Some(5));
    assert_eq!(summary["on_demand"]["cold_starts"], 1, "one VM served them all: {events:?}");
    assert_eq!(summary["vsock"]["connections"], 24, "{summary}");
    assert_eq!(summary["vsock"]["refused"], 0, "{summary}");
}

#[test]
fn on_demand_with_no_client_ends_cleanly_and_needs_an_endpoint() {
    let od = OnDemand::start("on-demand-none", &[]);
    std::thread::sleep(Duration::from_millis(200));
    let (code, events, summary) = od.stop();
    assert_eq!(code, Some(0), "interrupted with no VM running");
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(summary["exit_reason"], "no_vm_running", "{summary}");
    assert_eq!(summary["on_demand"]["cold_starts"], 0, "{summary}");
    let run = common::shim(&["run", "--app", "http", "--on-demand"]);
    run.expect_code(64);
    assert!(run.stderr.contains("--on-demand needs a client endpoint"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
}

#[test]
fn the_services_pool_example_serves_two_services_at_once_and_one_on_demand() {
    use std::io::{BufRead, Read, Write};
    require_kvm();
    let dir = temp_dir("services-pool");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/services.toml");
    let mut child = Command::new(SHIM)
        .args(["pool", example, "--summary"])
        .arg(dir.join("pool.json"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the shim starts");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let out = child.stdout.take().expect("stdout");
    let mut child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut listening = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while listening.len() < 2 {
        let l =
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("kv and web start listening");
        if l.contains("listening on vsock port") {
            listening.push(l);
        }
    }
    // kv and web under load at once.
    let load = |args: &[&str], out: &str| {
        let mut all: Vec<String> = vec!["load".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend(["--duration".into(), "3s".into(), "--out".into(), dir.join(out).to_str().expect("UTF-8").into()]);
        Command::new(SHIM).args(&all).spawn().expect("load starts")
    };
    let mut kv = load(&["--target", "127.0.0.1:16379", "--protocol", "kv", "--concurrency", "16"], "kv.json");
    let mut web = load(
        &["--target", "127.0.0.1:18080", "--protocol", "http", "--path", "/work?ms=2", "--concurrency", "8"],
        "web.json",
    );
    assert!(kv.wait().expect("kv load").success());
    assert!(web.wait().expect("web load").success());
    for f in ["kv.json", "web.json"] {
        let r = read_json(&dir.join(f));
        assert_eq!(r["errors"], 0, "{f}: {r}");
        assert!(r["completed"].as_u64().unwrap_or(0) > 100, "{f}: {r}");
    }
    // echo boots on its first connection.
    let mut s = std::net::TcpStream::connect("127.0.0.1:17007").expect("echo endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(b"on demand\n").expect("write");
    let mut got = [0u8; 10];
    s.read_exact(&mut got).expect("echoed");
    assert_eq!(&got, b"on demand\n");
    drop(s);
    let _ = Command::new("kill").args(["-INT", &child.0.id().to_string()]).status();
    let status = child.0.wait().expect("wait");
    let pool = read_json(&dir.join("pool.json"));
    assert_eq!(status.code(), Some(0), "{pool}");
    assert_eq!(pool["exit_code"], 0, "{pool}");
    let vms = pool["vms"].as_array().expect("vms");
    let echo = vms.iter().find(|v| v["name"] == "echo").expect("echo VM");
    assert_eq!(echo["on_demand"]["cold_starts"], 1, "{echo}");
    // The pool held at most its 4 vCPUs although kv and web could burst to 6.
    assert!(pool["pool"]["peak_vcpus"].as_u64().is_some_and(|p| p <= 4), "{}", pool["pool"]);
}

/// Forty on-demand kv services in one pool, all asleep: the shim's RSS per service stays far
/// below a VM's memory (512 KiB each, shim included), and any of them wakes with its state
/// while the others sleep (the bench does the same with 1,000).
#[test]
fn forty_sleeping_services_cost_little_and_each_wakes_with_its_state() {
    require_kvm();
    const N: usize = 40;
    let dir = temp_dir("density");
    // Distinct ports: every listener stays bound until all are chosen.
    let held: Vec<std::net::TcpListener> =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
    let ports: Vec<u16> = held.iter().map(|l| l.local_addr().expect("port").port()).collect();
    drop(held);
    let mut config = format!("[pool]\nvcpus = {N}\nmemory = \"{}M\"\ntimeout = \"90s\"\n", N * 64);
    for (i, port) in ports.iter().enumerate() {
        config.push_str(&kv_slot(&format!("s{i}"), *port, "200ms"));
    }
    let mut child = start_pool(&dir, &config, std::process::Stdio::piped());
    {
        use std::io::BufRead;
        let err = child.stderr.take().expect("stderr");
        let mut lines = std::io::BufReader::new(err).lines();
        let mut waiting = 0;
        while waiting < N {
            let line = lines.next().and_then(Result::ok).expect("the pool stopped before every service waited");
            waiting += usize::from(line.contains("on demand, no VM running"));
        }
        std::thread::spawn(move || for _ in lines {});
    }
    let redis = |port: u16, args: &[&str]| {
        let port = port.to_string();
        let mut all = vec!["-p", &port];
        all.extend_from_slice(args);
        let run = common::client("redis-cli", "redis-tools", &all);
        run.expect_code(0);
        run.stdout.trim().to_string()
    };
    let woken: Vec<u16> = (0..5).map(|i| ports[i * N / 5 + 3]).collect();
    for (i, &port) in woken.iter().enumerate() {
        assert_eq!(redis(port, &["set", "mine", &format!("service {i}")]), "OK");
    }
    std::thread::sleep(Duration::from_millis(1200));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    assert!(rss_kib / (N as u64) < 512, "{rss_kib} KiB for {N} sleeping services");
    for (i, &port) in woken.iter().enumerate() {
        assert_eq!(redis(port, &["get", "mine"]), format!("service {i}"), "service {i} lost its state");
    }
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let _ = child.wait();
    let summary = read_json(&dir.join("summary.json"));
    let vms = summary["vms"].as_array().expect("vms");
    let wakes: u64 = vms.iter().filter_map(|v| v["on_demand"]["wakes"].as_u64()).sum();
    let starts: u64 = vms.iter().filter_map(|v| v["on_demand"]["cold_starts"].as_u64()).sum();
    assert_eq!((starts, wakes), (5, 5), "{summary}");
}

/// A shim killed with SIGKILL cannot remove its sleep and template directories; the next
/// on-demand run removes those of shims that no longer run (and says so), and no others.
#[test]
fn a_killed_shim_s_sleep_and_template_directories_are_removed_by_the_next_run() {
    use std::io::BufRead;
    require_kvm();
    let dir = temp_dir("leftovers");
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).expect("tmp");
    let port = free_port();
    let start = || {
        let mut child = Command::new(SHIM)
            .env("TMPDIR", &tmp)
            .args(["run", "--app", "kv", "--publish", &format!("127.0.0.1:{port}:6379"), "--on-demand"])
            .args(["--idle-shutdown", "200ms", "--timeout", "60"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the shim starts");
        let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut before = Vec::new();
        loop {
            let line = lines.next().and_then(Result::ok).expect("the shim ended before it waited");
            if line.contains("on demand, no VM running") {
                break;
            }
            before.push(line);
        }
        std::thread::spawn(move || for _ in lines {});
        (child, before)
    };
    let ours = |pid: u32| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&tmp)
            .expect("tmp")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                n.starts_with(&format!("elastic-sleep-{pid}-")) || n.starts_with(&format!("elastic-templates-{pid}-"))
            })
            .collect();
        names.sort();
        names
    };
    let (mut first, _) = start();
    let ping = common::client("redis-cli", "redis-tools", &["-p", &port.to_string(), "ping"]);
    ping.expect_code(0);
    assert_eq!(ping.stdout.trim(), "PONG");
    // Asleep: its sleep directory holds a state.
    let slept = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        ours(first.id()).iter().any(|n| n.starts_with("elastic-sleep-") && tmp.join(n).join("state.json").exists())
    });
    assert!(slept, "no sleep in {}: {:?}", tmp.display(), ours(first.id()));
    let old = first.id();
    first.kill().expect("SIGKILL");
    let _ = first.wait();
    assert_eq!(ours(old).len(), 2, "{:?}", ours(old));
    // Someone else's directory with a similar name stays.
    std::fs::create_dir_all(tmp.join("elastic-sleep-notes")).expect("mkdir");
    let (mut second, said) = start();
    assert!(
        said.iter().any(|l| l.contains("removed 2 sleep or template directories")),
        "the second run did not say what it removed: {said:?}"
    );
    assert!(ours(old).is_empty(), "{:?}", ours(old));
    assert!(tmp.join("elastic-sleep-notes").exists());
    let _ = second.kill();
    let _ = second.wait();
}
