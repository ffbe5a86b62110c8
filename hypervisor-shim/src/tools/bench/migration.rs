//! Migration between two "hosts" over TCP with mutual TLS: two network namespaces joined by a
//! veth pair (made here, removed afterwards; needs root and iproute2), a throwaway CA
//! (`tls-certs`), the source shim in one namespace and the target in the other.
//!
//! Figures: `migrate_tcp_downtime_us` and `migrate_tcp_total_us` of kv at min;
//! `migrate_tcp_1g_downtime_us`, `migrate_tcp_1g_total_us`, `migrate_tcp_1g_rounds` and
//! `migrate_tcp_1g_dirty_pages_per_s` of a VM holding 1 GiB whose guest rewrites
//! [`DIRTY_PAGES_PER_S`] pages a second meanwhile (`mem-wave`, the dirty rate the dirty log
//! saw in the last pre-copy round is reported beside it). The same four runs again with
//! `--postcopy`: `migrate_tcp_postcopy_downtime_us`, `_total_us`, and
//! `migrate_tcp_1g_postcopy_downtime_us`, `_total_us` and `_fault_wait_mean_us` (a page fault's
//! wait for its page, from the source, after the switch).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::lifecycle::{LARGE, LARGE_MB, MIGRATIONS, ctl, large_vm_args, number, path_str, spawn_in, wait_held};
use super::{BenchError, BenchOptions, BenchReport};

/// The guest's write rate while the 1 GiB VM migrates.
pub(super) const DIRTY_PAGES_PER_S: u64 = 100_000;
/// The target's address (namespace b); the source is .1 in namespace a.
const TARGET: &str = "10.99.0.2";

/// The two namespaces, removed when dropped.
struct Hosts {
    a: String,
    b: String,
}

impl Hosts {
    fn new() -> Result<Hosts, String> {
        let tag = std::process::id() % 10_000_000;
        let hosts = Hosts { a: format!("elbench{tag}a"), b: format!("elbench{tag}b") };
        let (va, vb) = (format!("elb{tag}a"), format!("elb{tag}b"));
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
            }
        };
        // `hosts` exists from here: what was made is removed however this ends.
        ip(&["netns", "add", &hosts.a])?;
        ip(&["netns", "add", &hosts.b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (ns, dev, addr) in [(&hosts.a, &va, "10.99.0.1"), (&hosts.b, &vb, TARGET)] {
            ip(&["link", "set", dev, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The TLS flags of one side.
fn tls(dir: &Path, host: &str) -> Vec<String> {
    let f = |name: &str| dir.join(name).display().to_string();
    vec![
        "--tls-cert".into(),
        f(&format!("{host}.pem")),
        "--tls-key".into(),
        f(&format!("{host}.key")),
        "--tls-ca".into(),
        f("ca.pem"),
    ]
}

/// One migration of the VM behind `sock` (in namespace a) to a new receiver in namespace b:
/// the API's answer.
fn migrate_once(
    opts: &BenchOptions,
    hosts: &Hosts,
    pki: &Path,
    sock: &Path,
    dir: &Path,
    i: usize,
    postcopy: bool,
) -> Result<serde_json::Value, BenchError> {
    let port = (7100 + i).to_string();
    let target_sock = dir.join(format!("tcp-target-{i}.sock"));
    let listen = format!("tcp:{TARGET}:{port}");
    let mut args: Vec<String> = vec!["receive".into(), "--listen".into(), listen.clone()];
    args.extend(tls(pki, TARGET));
    args.extend(["--api-sock".into(), path_str(&target_sock).into(), "--timeout".into(), "300".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut target = spawn_in(opts, Some(&hosts.b), &refs)?;
    // The receiver serves its API once it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ctl(opts, &target_sock, &["list"]).is_err() {
        if Instant::now() > deadline {
            return Err(BenchError::Summary("the TCP receiver never listened".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut m: Vec<String> = vec!["migrate".into(), "vm0".into(), "--to".into(), listen];
    m.extend(tls(pki, "10.99.0.1"));
    if postcopy {
        m.push("--postcopy".into());
    }
    let refs: Vec<&str> = m.iter().map(String::as_str).collect();
    let v = ctl(opts, sock, &refs)?;
    target.wait_api(opts, &target_sock)?;
    Ok(v)
}

/// Adds the figures; without network namespaces (not root, no iproute2) says why and adds
/// none.
pub(super) fn add(opts: &BenchOptions, dir: &Path, report: &mut BenchReport) -> Result<(), BenchError> {
    let hosts = match Hosts::new() {
        Ok(h) => h,
        Err(e) => {
            eline!("bench: the TCP migration figures need two network namespaces (root, iproute2): {e}");
            return Ok(());
        }
    };
    let pki = dir.join("pki");
    crate::tools::certs::make(&pki, &[TARGET.into(), "10.99.0.1".into()])
        .map_err(|e| BenchError::Summary(e.to_string()))?;
    let kernel = path_str(&opts.kernel).to_string();
    for postcopy in [false, true] {
        let how = if postcopy { "_postcopy" } else { "" };
        let at = if postcopy { 200 } else { 0 };
        let (mut down, mut total) = (Vec::new(), Vec::new());
        for i in 0..MIGRATIONS {
            let sock = dir.join(format!("tcp-min{how}-{i}.sock"));
            let args = ["run", "--kernel", &kernel, "--app", "kv", "--api-sock", path_str(&sock), "--log", "warn"];
            let mut src = spawn_in(opts, Some(&hosts.a), &[&args[..], &["--timeout", "300"]].concat())?;
            src.wait_api(opts, &sock)?;
            let v = migrate_once(opts, &hosts, &pki, &sock, dir, at + i, postcopy)?;
            down.push(number(&v, "downtime_us")?);
            total.push(number(&v, "total_us")?);
        }
        report.add(&format!("migrate_tcp{how}_downtime_us"), down, 1.0);
        report.add(&format!("migrate_tcp{how}_total_us"), total, 1.0);
        let (mut down, mut total, mut rounds, mut rate, mut wait) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..LARGE {
            let sock = dir.join(format!("tcp-1g{how}-{i}.sock"));
            let args = large_vm_args(&kernel, path_str(&sock), DIRTY_PAGES_PER_S);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut src = spawn_in(opts, Some(&hosts.a), &refs)?;
            src.wait_api(opts, &sock)?;
            wait_held(opts, &sock, LARGE_MB << 20)?;
            let v = migrate_once(opts, &hosts, &pki, &sock, dir, at + 100 + i, postcopy)?;
            down.push(number(&v, "downtime_us")?);
            total.push(number(&v, "total_us")?);
            if postcopy {
                wait.push(number(&v["postcopy"], "fault_wait_mean_us")?);
            } else {
                rounds.push(number(&v, "rounds")?);
                rate.push(number(&v, "dirty_pages_per_s")?);
            }
        }
        report.add(&format!("migrate_tcp_1g{how}_downtime_us"), down, 1.0);
        report.add(&format!("migrate_tcp_1g{how}_total_us"), total, 1.0);
        if postcopy {
            report.add("migrate_tcp_1g_postcopy_fault_wait_mean_us", wait, 1.0);
        } else {
            report.add("migrate_tcp_1g_rounds", rounds, 1.0);
            report.add("migrate_tcp_1g_dirty_pages_per_s", rate, 1.0);
        }
    }
    Ok(())
}
