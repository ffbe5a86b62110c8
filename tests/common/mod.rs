//! Helpers shared by the integration tests: run the real shim binary on the real kernel image
//! and capture what it printed.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The shim binary cargo built for these tests.
pub const SHIM: &str = env!("CARGO_BIN_EXE_hypervisor-shim");

/// What one run of the shim produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Guest console (standard output).
    pub stdout: String,
    /// Shim diagnostics (standard error).
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// Asserts the exit code, showing both streams on failure.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "unexpected exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs the shim with `args` and captures its output.
pub fn shim(args: &[&str]) -> Run {
    require_kvm();
    Command::new(SHIM).args(args).output().expect("the shim binary runs").into()
}

/// Fails the test with a clear reason when /dev/kvm cannot be used: these tests boot real
/// VMs, and passing without KVM would prove nothing.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("these integration tests need a usable /dev/kvm ({e}); run them on a machine with KVM");
    }
}

/// A temporary directory for one test, removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh temporary directory for one test; keep the guard alive while the files are used.
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("elastic-shim-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}\n{text}", path.display()))
}

/// The kernel image the shim was built with (`KERNEL_PATH` from the shim's build script).
pub fn kernel_image() -> PathBuf {
    PathBuf::from(env!("KERNEL_PATH"))
}

/// Whether QEMU tests should run: `true` when `qemu-system-x86_64` is installed. When it is
/// not, the test fails with the command that installs it (CI installs it), unless the person
/// running the tests opts out with `ELASTIC_SKIP_QEMU=1`, which is printed as a skip.
pub fn qemu_available() -> bool {
    let installed = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if installed {
        return true;
    }
    if std::env::var_os("ELASTIC_SKIP_QEMU").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED (ELASTIC_SKIP_QEMU=1): qemu-system-x86_64 is not installed");
        return false;
    }
    panic!(
        "qemu-system-x86_64 is not installed: apt-get install qemu-system-x86 (or set ELASTIC_SKIP_QEMU=1 to skip the QEMU tests)"
    );
}

/// A `run` of the shim that wrote its JSON summary and its timeline into a fresh directory.
#[derive(Debug)]
pub struct Traced {
    /// What the shim printed and how it exited.
    pub run: Run,
    /// Where the summary and the timeline were written (removed when this is dropped).
    pub dir: TempDir,
}

impl Traced {
    /// The summary (`--summary`).
    pub fn summary(&self) -> serde_json::Value {
        read_json(&self.dir.join("summary.json"))
    }

    /// The timeline (`--timeline`), one JSON value per line.
    pub fn timeline(&self) -> Vec<serde_json::Value> {
        read_json_lines(&self.dir.join("timeline.jsonl"))
    }
}

/// Runs `hypervisor-shim run` with `args` (run flags, then optionally `--` and the guest's
/// arguments), adding `--summary`, `--timeline` and a 120 s `--timeout` in front of the `--`.
pub fn run_traced(name: &str, args: &[&str]) -> Traced {
    let dir = temp_dir(name);
    let (summary, timeline) = (dir.join("summary.json"), dir.join("timeline.jsonl"));
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    let (flags, guest) = args.split_at(split);
    let mut all = vec!["run"];
    all.extend_from_slice(flags);
    all.extend([
        "--summary",
        summary.to_str().expect("UTF-8 temp path"),
        "--timeline",
        timeline.to_str().expect("UTF-8 temp path"),
        "--timeout",
        "120",
    ]);
    all.extend_from_slice(guest);
    Traced { run: shim(&all), dir }
}

/// Reads a JSON-lines file.
pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
        .collect()
}
