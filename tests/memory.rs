//! Elastic memory integration tests: real guests grow and shrink their memory under the shim;
//! the assertions read the guest's checksums, the summary, the timeline and the shim's RSS.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn mem_wave_grows_shrinks_and_the_host_really_gets_memory_back() {
    let t = run_traced("mem-wave", &["--app", "mem-wave", "--memory", "64M:512M:1G"]);
    let r = &t.run;
    r.expect_code(0);
    assert!(r.stdout.contains("0 checksum errors"), "{}", r.stdout);
    assert!(r.stdout.contains("mem-wave: PASSED"), "{}", r.stdout);
    let s = t.summary();
    let m = &s["memory_bytes"];
    assert_eq!(m["min"], 64 * MIB);
    assert!(m["peak"].as_u64().unwrap() >= 256 * MIB, "{s}");
    assert_eq!(m["final"], m["min"], "{s}");
    assert!(m["grants"].as_u64().unwrap() >= 1 && m["releases"].as_u64().unwrap() >= 1, "{s}");
    let rss = &s["host_rss_bytes"];
    let (boot, peak, end) =
        (rss["boot"].as_u64().unwrap(), rss["peak"].as_u64().unwrap(), rss["end"].as_u64().unwrap());
    assert!(peak - boot >= 200 * MIB, "RSS grew only {} MiB: {s}", (peak - boot) / MIB);
    assert!(end.saturating_sub(boot) <= 64 * MIB, "RSS stayed {} MiB above boot: {s}", (end - boot) / MIB);
    // The timeline records every grant and release with the bytes held after it.
    let lines = t.timeline();
    let grants = lines.iter().filter(|l| l["event"] == "memory_grant").count() as u64;
    let releases = lines.iter().filter(|l| l["event"] == "memory_release").count() as u64;
    assert_eq!(grants, m["grants"].as_u64().unwrap());
    assert_eq!(releases, m["releases"].as_u64().unwrap());
    let max_held = lines.iter().filter_map(|l| l["memory_bytes"].as_u64()).max().unwrap();
    assert_eq!(max_held, m["peak"].as_u64().unwrap());
    assert!(lines.iter().all(|l| l["memory_bytes"].as_u64().unwrap() <= 1 << 30), "never above burst");
}

#[test]
fn mem_churn_from_several_vcpus_keeps_every_byte() {
    let t = run_traced("mem-churn", &["--app", "mem-churn", "--memory", "64M:256M:512M", "--vcpus", "1:4:4"]);
    let r = &t.run;
    r.expect_code(0);
    assert!(r.stdout.contains("checksum errors: 0;"), "{}", r.stdout);
    let s = t.summary();
    assert!(s["memory_bytes"]["grants"].as_u64().unwrap() >= 100, "{s}");
    assert_eq!(s["memory_bytes"]["final"], s["memory_bytes"]["min"]);
    assert!(s["vcpus"]["peak"].as_u64().unwrap() >= 2, "the churn ran on several vCPUs: {s}");
}

#[test]
fn a_grant_beyond_burst_is_denied_and_counted() {
    // `hostile` asks for 1 TiB (partial grant up to burst), then for more (DENIED).
    let t = run_traced("mem-denied", &["--app", "hostile", "--memory", "64M:96M:128M"]);
    let r = &t.run;
    r.expect_code(0);
    assert!(r.stdout.contains("checks passed, 0 failed"), "{}", r.stdout);
    let s = t.summary();
    assert!(s["denied"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["memory_bytes"]["peak"], 128 * MIB, "a partial grant filled up to burst, never beyond");
    assert_eq!(s["memory_bytes"]["final"], 64 * MIB);
}

#[test]
fn a_guest_that_truly_runs_out_reports_it_and_exits_cleanly() {
    let t = run_traced("oom", &["--app", "mem-wave", "--memory", "64M:128M:128M", "--", "1", "512"]);
    let r = &t.run;
    r.expect_code(3);
    let report = r.stdout.lines().find(|l| l.contains("out of memory")).unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(report.contains("an allocation of 1048576 bytes could not be served"), "{report}");
    assert!(report.contains("the VM holds 128 MiB (64 MiB boot + 64 MiB granted)"), "{report}");
    assert!(report.contains("DENIED"), "{report}");
    // The shim itself reports nothing wrong: this is the guest's own verdict.
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let s = t.summary();
    assert_eq!(s["exit_reason"], "shutdown");
    assert!(s["denied"].as_u64().unwrap() >= 1, "{s}");
}

#[test]
fn touching_ungranted_or_released_memory_is_diagnosed() {
    for (what, addr) in [("window", "0x40000000"), ("released", "0x40000000")] {
        let r = shim(&["run", "--app", "fault", "--memory", "64M:128M:128M", "--timeout", "60", "--", what]);
        r.expect_code(72);
        assert!(
            r.stderr.contains(&format!("guest-physical address {addr}, which no memory backs")),
            "{what}: {}",
            r.stderr
        );
    }
}
