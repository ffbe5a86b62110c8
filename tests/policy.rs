//! Burst credit, reclaims, enforcement, pools and plots: real VMs under the real shim.

mod common;

use common::*;

#[test]
fn an_exhausted_burst_credit_triggers_a_reclaim_the_guest_answers_and_the_plot_shows_it() {
    let plot_dir = temp_dir("credit-plot");
    let p = plot_dir.join("p.svg");
    // The kernel keeps the vCPUs it took (no shedding when, on a small or busy host, four of
    // them get no more done than three): this test is about the host's credit, which only
    // runs out while the VM holds more than max.
    let t = run_traced(
        "credit",
        &[
            "--app",
            "cpu-burst",
            "--vcpus",
            "1:2:4",
            "--burst-budget",
            "1",
            "--guest-opt",
            "vcpu.down_busy=0",
            "--plot",
            p.to_str().unwrap(),
        ],
    );
    let r = &t.run;
    r.expect_code(0);
    assert!(r.stdout.contains("result check PASSED"), "{}", r.stdout);
    let s = t.summary();
    assert!(s["reclaims"].as_u64().unwrap() >= 1, "no reclaim: {s}");
    assert_eq!(s["violations"], 0, "the kernel cooperates: {s}");
    let v = &s["policy"]["vcpus"];
    assert!(v["reclaims"].as_u64().unwrap() >= 1 && v["answered_in_grace"] == v["reclaims"], "{s}");
    assert!(v["credit_lowest"].as_f64().unwrap() <= 0.0, "the credit ran out: {s}");
    assert!(s["invariants"]["checks"].as_u64().unwrap() > 10, "{s}");
    assert_eq!(s["invariants"]["above_burst"], 0);
    assert_eq!(s["invariants"]["credit_overdrawn"], 0);
    // The reclaim is in the timeline, with its target, and the VM came down to max.
    let tl = t.timeline();
    let reclaim = tl.iter().find(|l| l["event"] == "reclaim").expect("a reclaim line");
    assert_eq!(reclaim["target"], 2);
    assert_eq!(reclaim["reason"], "credit");
    assert!(
        tl.iter().any(|l| l["event"] == "reclaim_answered" && l["in_grace"] == true && l["vcpus"].as_u64() <= Some(2))
    );
    // The plot has the burst line and the reclaim mark.
    let svg = std::fs::read_to_string(&p).unwrap();
    assert!(svg.starts_with("<svg"), "an SVG");
    assert!(svg.contains("burst 4"), "burst line labelled");
    assert!(svg.contains("max 2") && svg.contains("min 1"));
    assert!(svg.contains("reclaim ("), "reclaim mark labelled");
}

#[test]
fn a_guest_that_ignores_reclaims_is_throttled_and_counted() {
    let t = run_traced(
        "ignore",
        &[
            "--app",
            "load",
            "--vcpus",
            "1:2:4",
            "--burst-budget",
            "0.1",
            "--guest-opt",
            "elastic.cooperate=off",
            "--guest-opt",
            "vcpu.down_busy=0",
            "--",
            "square",
            "2",
            "400",
            "8",
            "0",
        ],
    );
    let r = &t.run;
    // Enforcement slows the VM down but never corrupts it: it finishes and its data checks out.
    r.expect_code(0);
    assert!(r.stdout.contains("VERIFY data_errors=0"), "{}", r.stdout);
    let s = t.summary();
    assert!(s["policy"]["vcpus"]["violations"].as_u64().unwrap() >= 1, "{s}");
    let tl = t.timeline();
    assert!(tl.iter().any(|l| l["event"] == "violation" && l["resource"] == "vcpus" && l["enforcement"] == "throttle"));
    // Above max during the reclaim, further vCPU grants were refused.
    assert!(s["denied"].as_u64().unwrap() >= 1, "{s}");
}

#[test]
fn on_violation_kill_ends_the_vm_with_its_own_code() {
    let t = run_traced(
        "kill",
        &[
            "--app",
            "load",
            "--vcpus",
            "1:2:4",
            "--burst-budget",
            "0.1",
            "--on-violation",
            "kill",
            "--guest-opt",
            "elastic.cooperate=off",
            "--guest-opt",
            "vcpu.down_busy=0",
            "--",
            "square",
            "3",
            "400",
            "8",
            "0",
        ],
    );
    let r = &t.run;
    r.expect_code(75);
    assert!(r.stderr.contains("past the reclaim grace period (--on-violation kill)"), "{}", r.stderr);
    let s = t.summary();
    assert_eq!(s["exit_reason"], "policy_kill");
    assert!(s["violations"].as_u64().unwrap() >= 1);
}

#[test]
fn a_pool_run_arbitrates_and_never_exceeds_capacity() {
    let dir = temp_dir("pool");
    let (s, p) = (dir.join("s.json"), dir.join("p.svg"));
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pool.toml");
    let r = shim(&["pool", config.to_str().unwrap(), "--summary", s.to_str().unwrap(), "--plot", p.to_str().unwrap()]);
    r.expect_code(0);
    assert!(r.stdout.contains("[web] ") && r.stdout.contains("[cache] "), "consoles are prefixed: {}", r.stdout);
    let s = read_json(&s);
    let pool = &s["pool"];
    assert_eq!(pool["vcpus"], 6);
    assert!(pool["peak_vcpus"].as_u64().unwrap() <= 6, "{s}");
    assert!(pool["peak_memory_bytes"].as_u64().unwrap() <= pool["memory_bytes"].as_u64().unwrap(), "{s}");
    let vms = s["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3);
    for vm in vms {
        assert_eq!(vm["as_expected"], true, "{vm}");
        assert!(vm["violations"].is_u64() && vm["reclaims"].is_u64(), "every summary has them: {vm}");
        assert_eq!(vm["invariants"]["above_capacity"], 0);
        assert_eq!(vm["invariants"]["above_burst"], 0);
    }
    let names: Vec<_> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["web", "batch", "cache"]);
    let svg = std::fs::read_to_string(&p).unwrap();
    assert!(svg.contains("web: vCPUs held") && svg.contains("cache: memory held"));
}

#[test]
fn admission_refuses_a_vm_whose_min_does_not_fit() {
    let dir = temp_dir("admission");
    let config = dir.join("pool.toml");
    std::fs::write(
        &config,
        r#"
[pool]
vcpus = 2
memory = "256M"

[[vm]]
name = "first"
app = "hello"
vcpus = "1:2:2"
memory = "128M"

[[vm]]
name = "second"
app = "hello"
vcpus = "1"
memory = "192M"
"#,
    )
    .unwrap();
    let r = shim(&["pool", config.to_str().unwrap()]);
    r.expect_code(64);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("VM 'second' needs at least 192M of memory but the pool has only 128M of memory left"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "no VM ran: {}", r.stdout);
}

#[test]
fn a_bad_pool_file_gets_a_one_line_error() {
    let dir = temp_dir("badpool");
    let config = dir.join("pool.toml");
    std::fs::write(&config, "[pool]\nvcpus = 2\nmemory = \"1G\"\n\n[[vm]]\nname = \"x\"\napp = \"hello\"\nvcpus = \"2:1\"\nmemory = \"64M\"\n").unwrap();
    let r = shim(&["pool", config.to_str().unwrap()]);
    r.expect_code(64);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("vm 'x': vcpus"), "{}", r.stderr);
}
