//! The control API (`--api-sock`) and its client (`ctl`) against running VMs: list, live
//! figures, Prometheus metrics, a live policy change that makes the VM come down, pause (no
//! CPU) and resume, stop, and the errors a user can make.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Run, SHIM, read_json_lines, require_kvm, temp_dir};

/// A shim run with `--api-sock DIR/api.sock` (killed when dropped).
struct Controlled {
    child: Child,
    dir: common::TempDir,
}

impl Controlled {
    fn start(name: &str, args: &[&str]) -> Controlled {
        require_kvm();
        let dir = temp_dir(name);
        let child = Command::new(SHIM)
            .arg("run")
            .args(["--api-sock", "api.sock", "--timeline", "timeline.jsonl", "--timeout", "120"])
            .args(args)
            .current_dir(&*dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the shim starts");
        let c = Controlled { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.ctl(&["list"]).code != Some(0) {
            assert!(Instant::now() < deadline, "the control API never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    /// `ctl --api-sock api.sock ARGS`, run in the VM's directory (a relative socket path).
    fn ctl(&self, args: &[&str]) -> Run {
        Command::new(SHIM)
            .args(["ctl", "--api-sock", "api.sock"])
            .args(args)
            .current_dir(&*self.dir)
            .output()
            .expect("ctl runs")
            .into()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let r = self.ctl(args);
        r.expect_code(0);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("ctl {args:?} printed no JSON ({e}):\n{}", r.stdout))
    }

    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("stat");
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
    }

    fn events(&self) -> Vec<serde_json::Value> {
        read_json_lines(&self.dir.join("timeline.jsonl"))
    }

    fn finish(&mut self) -> Option<i32> {
        self.ctl(&["stop", "vm0"]).expect_code(0);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s.code();
            }
            assert!(Instant::now() < deadline, "the VM did not stop after ctl stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Controlled {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks Prometheus text format 0.0.4: every sample's family has HELP and TYPE lines before
/// it, names and labels are well formed, values are numbers. Returns the samples.
fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            assert!(name_ok(name), "bad metric name in {line}");
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "bad type: {line}");
            typed.insert(name.to_string());
        } else if line.starts_with("# HELP ") || line.is_empty() {
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => {
                    assert!(l.ends_with('}'), "unclosed labels: {line}");
                    for pair in l.trim_end_matches('}').split(',') {
                        let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
                        assert!(name_ok(k) && v.starts_with('"') && v.ends_with('"'), "bad label: {line}");
                    }
                    (n, l.to_string())
                }
                None => (series, String::new()),
            };
            assert!(typed.contains(name), "sample before its TYPE line: {line}");
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
            samples.push((name.to_string(), labels, v));
        }
    }
    samples
}

#[test]
fn list_get_and_metrics_answer_while_a_kv_vm_serves() {
    let port = common::free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    let mut c = Controlled::start(
        "ctl-kv",
        &["--app", "kv", "--vcpus", "1:2:4", "--memory", "64M:256M:512M", "--publish", &publish],
    );
    let list = c.json(&["list"]);
    assert_eq!(list[0]["name"], "vm0", "{list}");
    assert_eq!(list[0]["app"], "kv", "{list}");
    assert_eq!(list[0]["state"], "running", "{list}");
    let get = c.json(&["get", "vm0"]);
    for key in ["vcpus", "memory_bytes", "hypercalls", "policy", "vsock", "host_rss_bytes", "state"] {
        assert!(get.get(key).is_some(), "get lacks {key}: {get}");
    }
    assert_eq!(get["vcpus"]["max"], 2, "{get}");
    let m = c.ctl(&["metrics"]);
    m.expect_code(0);
    let samples = parse_prometheus(&m.stdout);
    let online = samples.iter().find(|(n, l, _)| n == "elastic_vcpus_online" && l.contains("vm=\"vm0\""));
    assert_eq!(online.map(|s| s.2), Some(1.0), "{}", m.stdout);
    assert!(samples.iter().any(|(n, _, v)| n == "elastic_memory_bytes" && *v >= 64.0 * 1048576.0), "{}", m.stdout);
    assert_eq!(c.finish(), Some(5));
}

#[test]
fn lowering_max_makes_the_vm_come_down_with_a_reclaim() {
    let mut c = Controlled::start(
        "ctl-policy",
        &[
            "--app",
            "load",
            "--vcpus",
            "1:4:4",
            "--reclaim-grace",
            "2s",
            "--memory",
            "64M:256M:256M",
            "--",
            "square",
            "100",
            "3000",
            "4",
            "16",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.json(&["list"])[0]["vcpus"].as_u64().unwrap_or(0) < 3 {
        assert!(Instant::now() < deadline, "the load never brought 3 vCPUs up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = c.json(&["policy", "vm0", "--vcpus", "1:2:2"]);
    assert_eq!(after["vcpus"]["max"], 2, "{after}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.json(&["list"])[0]["vcpus"].as_u64().unwrap_or(9) > 2 {
        assert!(Instant::now() < deadline, "the VM did not come down to the new max");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The governor sees the VM at the target at its next tick (every few ms); stopping the VM
    // before that tick would leave the reclaim unanswered in the record.
    while c.json(&["get", "vm0"])["policy"]["vcpus"]["answered_in_grace"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the governor never recorded the reclaim as answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Changing min is refused, with one line.
    let r = c.ctl(&["policy", "vm0", "--vcpus", "2:2:2"]);
    r.expect_code(64);
    assert!(r.stderr.contains("min cannot change"), "{}", r.stderr);
    // So is a memory burst past the hot-plug window the VM booted with (256M here).
    let r = c.ctl(&["policy", "vm0", "--memory", "64M:256M:512M"]);
    r.expect_code(64);
    assert!(r.stderr.contains("hot-plug window"), "{}", r.stderr);
    assert_eq!(c.finish(), Some(5));
    let events = c.events();
    let reclaim = events.iter().find(|e| e["event"] == "reclaim" && e["reason"] == "operator");
    assert!(reclaim.is_some_and(|r| r["target"] == 2), "no operator reclaim to 2 in the timeline");
    assert!(events.iter().any(|e| e["event"] == "reclaim_answered" && e["in_grace"] == true), "not answered in grace");
    assert!(events.iter().any(|e| e["event"] == "policy"), "no policy line");
    // The guest was told (a POLICY notice; the page holds the new limits).
    let policy = hypercall_abi::notice::POLICY;
    assert!(events.iter().any(|e| e["event"] == "notice" && e["notice"] == policy), "no POLICY notice posted");
}

#[test]
fn a_paused_vm_uses_no_cpu_and_resumes() {
    let c = Controlled::start("ctl-pause", &["--app", "spin", "--", "100000000000000"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.json(&["pause", "vm0"])["state"], "paused");
    std::thread::sleep(Duration::from_millis(100));
    let before = c.cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let paused = c.cpu_ticks() - before;
    let again = c.ctl(&["pause", "vm0"]);
    again.expect_code(64);
    assert!(again.stderr.contains("already paused"), "{}", again.stderr);
    assert_eq!(c.json(&["resume", "vm0"])["state"], "running");
    // Clock ticks are 10 ms: paused, (almost) none, however busy the machine is.
    assert!(paused <= 5, "the paused VM used {paused} ticks in 1 s");
    // Resumed, it spins again: 50 ticks (half a CPU second) come within 1 s on a quiet
    // machine; beside other tests' builds and VMs it gets less of the CPUs, so the test waits
    // (up to 20 s) for them rather than asking for them in one second.
    let before = c.cpu_ticks();
    let resumed_at = std::time::Instant::now();
    while c.cpu_ticks() - before < 50 {
        assert!(resumed_at.elapsed() < Duration::from_secs(20), "the resumed VM does not run");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.json(&["list"])[0]["state"], "running");
}

#[test]
fn control_errors_are_one_line() {
    let dir = temp_dir("ctl-errors");
    let sock = dir.join("none.sock");
    let r: Run = Command::new(SHIM).args(["ctl", "--api-sock"]).arg(&sock).arg("list").output().expect("runs").into();
    r.expect_code(69);
    assert!(r.stderr.contains("cannot reach the control API"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    // An existing path is refused before any VM.
    std::fs::write(&sock, b"").expect("file");
    let r = common::shim(&["run", "--app", "hello", "--api-sock", sock.to_str().expect("UTF-8")]);
    r.expect_code(64);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    assert!(!r.stdout.contains("Hello"), "a VM booted: {}", r.stdout);
    let c = Controlled::start("ctl-errors-vm", &["--app", "idle", "--", "60000"]);
    for (args, needle) in [
        (&["get", "nope"][..], "no running VM named 'nope'"),
        (&["policy", "vm0", "--memory", "64M:1M:2M"], "memory"),
        (&["resume", "vm0"], "not paused"),
    ] {
        let r = c.ctl(args);
        r.expect_code(64);
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    }
    let _ = c.ctl(&["stop", "vm0"]);
    assert!(Path::new(&*c.dir).join("api.sock").exists());
}

#[test]
fn a_pool_vm_that_faults_is_restarted_and_counted() {
    require_kvm();
    let dir = temp_dir("restart");
    let config = dir.join("pool.toml");
    std::fs::write(
        &config,
        r#"
[pool]
vcpus = 2
memory = "256M"
timeout = "60s"

[[vm]]
name = "crashy"
app = "fault"
vcpus = "1:1:1"
memory = "64M:64M:64M"
restart = "on-failure"
restart_limit = 2
restart_backoff = "50ms"
expect_exit = 71

[[vm]]
name = "steady"
app = "hello"
vcpus = "1:1:1"
memory = "64M:64M:64M"
"#,
    )
    .expect("config");
    let summary = dir.join("pool.json");
    let timeline = dir.join("pool.jsonl");
    let run = common::shim(&[
        "pool",
        config.to_str().expect("UTF-8"),
        "--summary",
        summary.to_str().expect("UTF-8"),
        "--timeline",
        timeline.to_str().expect("UTF-8"),
    ]);
    run.expect_code(0);
    assert!(run.stderr.contains("crashy: ended with exit code 71; restart 1 of 2"), "{}", run.stderr);
    let s = common::read_json(&summary);
    let crashy = s["vms"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "crashy")).expect("crashy");
    assert_eq!(crashy["restarts"], 2, "{crashy}");
    assert_eq!(crashy["exit_code"], 71, "{crashy}");
    let steady = s["vms"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "steady")).expect("steady");
    assert_eq!(steady["restarts"], 0, "{steady}");
    let lines = read_json_lines(&timeline);
    let restarts: Vec<u64> =
        lines.iter().filter(|l| l["event"] == "restart").filter_map(|l| l["restarts"].as_u64()).collect();
    assert_eq!(restarts, [1, 2]);
    assert_eq!(lines.iter().filter(|l| l["vm"] == "crashy" && l["event"] == "boot").count(), 3);
    // A bad restart value is a one-line configuration error.
    std::fs::write(&config, "[pool]\nvcpus = 1\nmemory = \"64M\"\n[[vm]]\nname = \"a\"\napp = \"hello\"\nvcpus = \"1:1:1\"\nmemory = \"64M:64M:64M\"\nrestart = \"always\"\n").expect("config");
    let run = common::shim(&["pool", config.to_str().expect("UTF-8")]);
    run.expect_code(64);
    assert!(run.stderr.contains("restart 'always' is not"), "{}", run.stderr);
}

#[test]
fn a_sleeping_on_demand_vm_stays_visible_and_ctl_stop_ends_it() {
    let port = common::free_port();
    let publish = format!("127.0.0.1:{port}:80");
    let mut c = Controlled::start(
        "ctl-sleeping",
        &["--app", "http", "--publish", &publish, "--on-demand", "--idle-shutdown", "2s", "--vcpus", "1:2:2"],
    );
    // No VM runs yet: the VM is listed as sleeping, with its policy and nothing held.
    let list = c.json(&["list"]);
    assert_eq!((list[0]["name"].as_str(), list[0]["state"].as_str()), (Some("vm0"), Some("sleeping")), "{list}");
    let get = c.json(&["get", "vm0"]);
    assert_eq!(get["state"], "sleeping", "{get}");
    assert_eq!((get["vcpus"]["max"].as_u64(), get["memory_bytes"]["final"].as_u64()), (Some(2), Some(0)), "{get}");
    let m = c.ctl(&["metrics"]);
    m.expect_code(0);
    let samples = parse_prometheus(&m.stdout);
    let value = |name: &str| samples.iter().find(|(n, l, _)| n == name && l.contains("vm=\"vm0\"")).map(|s| s.2);
    assert_eq!(value("elastic_vm_up"), Some(0.0), "{}", m.stdout);
    assert_eq!(value("elastic_memory_min_bytes"), Some(64.0 * 1048576.0), "{}", m.stdout);
    let pause = c.ctl(&["pause", "vm0"]);
    assert_ne!(pause.code, Some(0), "pausing a sleeping VM is refused");
    assert!(pause.stderr.contains("sleeping"), "{}", pause.stderr);
    // A client boots it: running, then sleeping again after the idle shutdown.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    std::io::Write::write_all(&mut s, b"GET / HTTP/1.0\r\n\r\n").expect("request");
    let mut reply = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut reply);
    assert!(reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"), "{reply}");
    assert_eq!(c.json(&["list"])[0]["state"], "running");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.json(&["list"])[0]["state"] != "sleeping" {
        assert!(Instant::now() < deadline, "the VM never went back to sleep");
        std::thread::sleep(Duration::from_millis(100));
    }
    let get = c.json(&["get", "vm0"]);
    assert_eq!(get["on_demand"]["cold_starts"], 1, "{get}");
    // It went to sleep with its state: the next client resumes it.
    assert_eq!(
        (get["on_demand"]["sleeps"].as_u64(), get["on_demand"]["next"].as_str()),
        (Some(1), Some("resume")),
        "{get}"
    );
    // `ctl stop` ends the sleeping slot as Ctrl-C does (0: no VM was running).
    assert_eq!(c.finish(), Some(0));
}

#[test]
fn an_on_demand_run_that_reaches_its_timeout_exits_76() {
    let publish = format!("127.0.0.1:{}:80", common::free_port());
    let r = common::shim(&["run", "--app", "http", "--publish", &publish, "--on-demand", "--timeout", "1"]);
    r.expect_code(76);
}
