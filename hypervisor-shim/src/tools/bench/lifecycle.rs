//! Lifecycle figures through the control API: pause and resume of a busy VM, snapshot and
//! restore of a VM at min and of one holding 1 GiB, live migration of both.
//!
//! Each figure is the shim's own measurement of the operation (`took_us`, `total_us`,
//! `restore_us`, `downtime_us`), taken from the API's answers, so process spawns and HTTP
//! round trips are left out. A migration's downtime (on one host) ends when the target's
//! first vCPU is about to enter the guest, by the target's clock; `*_answer_us` beside it is
//! the older measure, to the source reading the target's answer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{BenchError, BenchOptions, BenchReport};

/// Samples of the quick figures (pause, resume, snapshot and restore at min).
const QUICK: usize = 10;
/// Samples of the migration at min.
pub(super) const MIGRATIONS: usize = 5;
/// Samples of the 1 GiB figures.
pub(super) const LARGE: usize = 3;
/// What the large VM holds.
pub(super) const LARGE_MB: u64 = 1024;

/// A shim process (killed when dropped) and the file its stderr goes to.
pub(super) struct Proc(Child, PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits for its control API at `sock`; the error carries what the process printed.
    pub(super) fn wait_api(&mut self, opts: &BenchOptions, sock: &Path) -> Result<(), BenchError> {
        wait_api(opts, sock).map_err(|e| {
            let printed = std::fs::read_to_string(&self.1).unwrap_or_default();
            BenchError::Summary(format!("{e}: {}", printed.trim()))
        })
    }
}

/// Starts the shim with `args`, stderr to `dir/NAME.log` (`name`: the API socket's stem).
fn spawn(opts: &BenchOptions, args: &[&str]) -> Result<Proc, BenchError> {
    spawn_in(opts, None, args)
}

/// Starts the shim with `args`, inside network namespace `netns` if given (`ip netns exec`,
/// which execs the shim), stderr to a log file of the work directory.
pub(super) fn spawn_in(opts: &BenchOptions, netns: Option<&str>, args: &[&str]) -> Result<Proc, BenchError> {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = work_dir().join(format!("proc-{n}.log"));
    let err = std::fs::File::create(&log).map_err(|e| BenchError::Write(log.clone(), e))?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&opts.shim);
            c
        }
        None => Command::new(&opts.shim),
    };
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .map(|c| Proc(c, log))
        .map_err(|e| BenchError::Spawn(opts.shim.clone(), e))
}

/// `ctl --api-sock SOCK ARGS`: its JSON answer.
pub(super) fn ctl(opts: &BenchOptions, sock: &Path, args: &[&str]) -> Result<Value, BenchError> {
    let out = Command::new(&opts.shim)
        .arg("ctl")
        .arg("--api-sock")
        .arg(sock)
        .args(args)
        .output()
        .map_err(|e| BenchError::Spawn(opts.shim.clone(), e))?;
    if !out.status.success() {
        return Err(BenchError::RunFailed {
            code: out.status.code(),
            stderr: format!("ctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| BenchError::Summary(format!("ctl {}: {e}", args.join(" "))))
}

fn wait_api(opts: &BenchOptions, sock: &Path) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    // Answering is not enough: the VM must be listed (the API starts before the VM exists).
    while !ctl(opts, sock, &["list"]).is_ok_and(|v| v.as_array().is_some_and(|a| !a.is_empty())) {
        if Instant::now() > deadline {
            return Err(BenchError::Summary(format!("no control API at {}", sock.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub(super) fn number(v: &Value, key: &str) -> Result<f64, BenchError> {
    v[key].as_f64().ok_or_else(|| BenchError::Summary(format!("no {key} in {v}")))
}

/// Waits until the VM holds at least `bytes`.
pub(super) fn wait_held(opts: &BenchOptions, sock: &Path, bytes: u64) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = ctl(opts, sock, &["get", "vm0"])?;
        if v["memory_bytes"]["final"].as_u64().unwrap_or(0) >= bytes {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Summary(format!("the VM never held {} MiB", bytes >> 20)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// The large VM: a working set of [`LARGE_MB`] MiB, checksummed, held for ten minutes
/// (rewriting `dirty` pages a second meanwhile).
pub(super) fn large_vm_args(kernel: &str, sock: &str, dirty: u64) -> Vec<String> {
    let hold = "600000".to_string();
    [
        "run",
        "--kernel",
        kernel,
        "--app",
        "mem-wave",
        "--memory",
        "64M:1280M:1280M",
        "--api-sock",
        sock,
        "--log",
        "warn",
        "--timeout",
        "900",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["1".into(), LARGE_MB.to_string(), "64".into(), hold, dirty.to_string()])
    .collect()
}

/// Snapshots the VM behind `sock` into `snap` `n` times (total_us each), then restores it `n`
/// times in new processes (restore_us each).
fn snapshot_and_restore(
    opts: &BenchOptions,
    sock: &Path,
    snap: &Path,
    n: usize,
    dir: &Path,
) -> Result<(Vec<f64>, Vec<f64>), BenchError> {
    let mut saves = Vec::new();
    for _ in 0..n {
        let v = ctl(opts, sock, &["snapshot", "vm0", "--to", path_str(snap)])?;
        saves.push(number(&v, "total_us")?);
    }
    let mut restores = Vec::new();
    for i in 0..n {
        let name = snap.file_name().and_then(|n| n.to_str()).unwrap_or("snap");
        let rsock = dir.join(format!("restore-{name}-{i}.sock"));
        let mut p = spawn(opts, &["restore", path_str(snap), "--api-sock", path_str(&rsock), "--timeout", "120"])?;
        p.wait_api(opts, &rsock)?;
        let v = ctl(opts, &rsock, &["get", "vm0"])?;
        restores.push(number(&v, "restore_us")?);
    }
    Ok((saves, restores))
}

/// Migrates the VM behind `sock` to a new receiver: (downtime_us, answer_us, total_us).
fn migrate_once(opts: &BenchOptions, sock: &Path, dir: &Path, i: usize) -> Result<(f64, f64, f64), BenchError> {
    let listen = dir.join(format!("mig-{i}.sock"));
    let target_sock = dir.join(format!("target-{i}.sock"));
    let mut target = spawn(
        opts,
        &["receive", "--listen", &format!("unix:{}", path_str(&listen)), "--api-sock", path_str(&target_sock)],
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listen.exists() {
        if Instant::now() > deadline {
            return Err(BenchError::Summary("the receiver never listened".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let v = ctl(opts, sock, &["migrate", "vm0", "--to", &format!("unix:{}", path_str(&listen))]).map_err(|e| {
        let printed = std::fs::read_to_string(&target.1).unwrap_or_default();
        BenchError::Summary(format!("{e}; the receiver said: {}", printed.trim()))
    })?;
    target.wait_api(opts, &target_sock)?;
    if v["started_us"].is_null() {
        eline!("bench: migration {i}: the target did not say when its vCPUs started; its downtime ends at the answer");
    }
    Ok((number(&v, "downtime_us")?, number(&v, "answer_us")?, number(&v, "total_us")?))
}

/// Adds the lifecycle figures.
pub(crate) fn add(opts: &BenchOptions, dir: &Path, report: &mut BenchReport) -> Result<(), BenchError> {
    let kernel = path_str(&opts.kernel).to_string();
    let common = ["--kernel", kernel.as_str(), "--log", "warn", "--timeout", "300"];
    // Pause and resume of a vCPU that runs guest code.
    let sock = dir.join("busy.sock");
    {
        let mut args = vec!["run", "--app", "spin", "--api-sock", path_str(&sock)];
        args.extend(common);
        args.extend(["--", "100000000000"]);
        let mut busy = spawn(opts, &args)?;
        busy.wait_api(opts, &sock)?;
        let (mut pause, mut resume) = (Vec::new(), Vec::new());
        for _ in 0..QUICK {
            std::thread::sleep(Duration::from_millis(20));
            pause.push(number(&ctl(opts, &sock, &["pause", "vm0"])?, "took_us")?);
            resume.push(number(&ctl(opts, &sock, &["resume", "vm0"])?, "took_us")?);
        }
        report.add("pause_us", pause, 1.0);
        report.add("resume_us", resume, 1.0);
    }
    // Snapshot and restore at min (kv at 64 MiB).
    let sock = dir.join("min.sock");
    {
        let mut args = vec!["run", "--app", "kv", "--api-sock", path_str(&sock)];
        args.extend(common);
        let mut kv = spawn(opts, &args)?;
        kv.wait_api(opts, &sock)?;
        let (s, r) = snapshot_and_restore(opts, &sock, &dir.join("snap-min"), QUICK, dir)?;
        report.add("snapshot_min_us", s, 1.0);
        report.add("restore_min_us", r, 1.0);
    }
    // Migration at min: a new source each time (the source ends once migrated).
    let (mut down, mut answer, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..MIGRATIONS {
        let sock = dir.join(format!("src-min-{i}.sock"));
        let mut args = vec!["run", "--app", "kv", "--api-sock", path_str(&sock)];
        args.extend(common);
        let mut src = spawn(opts, &args)?;
        src.wait_api(opts, &sock)?;
        let (d, a, t) = migrate_once(opts, &sock, dir, i)?;
        down.push(d);
        answer.push(a);
        total.push(t);
    }
    report.add("migrate_downtime_us", down, 1.0);
    report.add("migrate_answer_us", answer, 1.0);
    report.add("migrate_total_us", total, 1.0);
    // 1 GiB held: snapshot, restore (mapped lazily), migration.
    let sock = dir.join("large.sock");
    {
        let mut large = spawn_owned(opts, &large_vm_args(&kernel, path_str(&sock), 0))?;
        large.wait_api(opts, &sock)?;
        wait_held(opts, &sock, LARGE_MB << 20)?;
        let (s, r) = snapshot_and_restore(opts, &sock, &dir.join("snap-1g"), LARGE, dir)?;
        report.add("snapshot_1g_us", s, 1.0);
        report.add("restore_1g_us", r, 1.0);
        let _ = std::fs::remove_dir_all(dir.join("snap-1g"));
    }
    // Then the same VM backed by memfds: a live upgrade to a new shim hands the memory over
    // by descriptor, nothing copied.
    for (name, backing, first) in [("migrate_1g", "anonymous", 100), ("upgrade_1g", "memfd", 200)] {
        let (mut down, mut answer, mut total) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..LARGE {
            let sock = dir.join(format!("src-{name}-{i}.sock"));
            let mut args = large_vm_args(&kernel, path_str(&sock), 0);
            let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
            args.splice(at..at, ["--memory-backing".to_string(), backing.to_string()]);
            let mut src = spawn_owned(opts, &args)?;
            src.wait_api(opts, &sock)?;
            wait_held(opts, &sock, LARGE_MB << 20)?;
            let (d, a, t) = migrate_once(opts, &sock, dir, first + i)?;
            down.push(d);
            answer.push(a);
            total.push(t);
        }
        report.add(&format!("{name}_downtime_us"), down, 1.0);
        report.add(&format!("{name}_answer_us"), answer, 1.0);
        report.add(&format!("{name}_total_us"), total, 1.0);
    }
    Ok(())
}

fn spawn_owned(opts: &BenchOptions, args: &[String]) -> Result<Proc, BenchError> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn(opts, &refs)
}

/// The directory the lifecycle figures work in.
pub(crate) fn work_dir() -> PathBuf {
    std::env::temp_dir().join(format!("hypervisor-shim-bench-life-{}", std::process::id()))
}
