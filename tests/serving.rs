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
