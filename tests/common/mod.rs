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
    PathBuf::from(elastic_images::KERNEL)
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

/// A free TCP port on 127.0.0.1 (bound and released; another process could take it first,
/// which makes the shim fail with a clear message rather than a wrong result).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A shim running a service in the background (killed when dropped).
#[derive(Debug)]
pub struct Served {
    /// The shim process.
    pub child: std::process::Child,
    /// Guest console lines as they arrive.
    lines: std::sync::mpsc::Receiver<String>,
    /// Everything printed so far.
    pub stdout: Vec<String>,
    /// Where the summary and timeline go.
    pub dir: TempDir,
    stderr_thread: Option<std::thread::JoinHandle<String>>,
}

impl Served {
    /// Starts `hypervisor-shim run ARGS --summary --timeline --timeout 300` and waits until
    /// the guest prints a line containing `ready` (e.g. "listening on vsock port").
    pub fn start(name: &str, args: &[&str], ready: &str) -> Served {
        require_kvm();
        let dir = temp_dir(name);
        let mut all: Vec<String> = vec!["run".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        for (flag, file) in [("--summary", "summary.json"), ("--timeline", "timeline.jsonl")] {
            all.push(flag.into());
            all.push(dir.join(file).to_str().expect("UTF-8 temp path").into());
        }
        all.extend(["--timeout".into(), "300".into()]);
        let mut child = Command::new(SHIM)
            .args(&all)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the shim starts");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr_thread = Some(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        }));
        let mut s = Served { child, lines, stdout: Vec::new(), dir, stderr_thread };
        s.wait_for(ready, std::time::Duration::from_secs(30));
        s
    }

    /// Waits until a console line contains `needle`; panics (with the output) after `within`.
    pub fn wait_for(&mut self, needle: &str, within: std::time::Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(l) = self.stdout.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.stdout.push(l),
                Err(_) => panic!("no line with '{needle}' within {within:?}; output:\n{}", self.stdout.join("\n")),
            }
        }
    }

    /// The shim's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The shim's resident set size now (bytes).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Asks the guest to stop (SIGINT: a STOP notice) and waits for the shim; returns its exit
    /// code, its stderr and the summary.
    pub fn stop(mut self) -> (Option<i32>, String, serde_json::Value) {
        self.stop_here()
    }

    /// [`Served::stop`], and the timeline (complete once the shim has ended).
    #[allow(dead_code)] // not every test file uses it
    pub fn stop_with_timeline(mut self) -> (Option<i32>, String, serde_json::Value, Vec<serde_json::Value>) {
        let (code, stderr, summary) = self.stop_here();
        (code, stderr, summary, read_json_lines(&self.dir.join("timeline.jsonl")))
    }

    fn stop_here(&mut self) -> (Option<i32>, String, serde_json::Value) {
        let _ = Command::new("kill").args(["-INT", &self.pid().to_string()]).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "the shim did not stop after SIGINT");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(std::time::Duration::from_millis(200)) {
            self.stdout.push(l);
        }
        let stderr = self.stderr_thread.take().and_then(|t| t.join().ok()).unwrap_or_default();
        let summary = read_json(&self.dir.join("summary.json"));
        (status.code(), stderr, summary)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an installed client program (redis-cli, curl, wrk...) and returns its output;
/// fails the test with the command that installs it when it is missing (CI installs them).
pub fn client(program: &str, package: &str, args: &[&str]) -> Run {
    match Command::new(program).args(args).output() {
        Ok(o) => o.into(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} is not installed: apt-get install {package} (.ci/run installs it)")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// A RESP request (an array of bulk strings) for `args`.
#[allow(dead_code)] // not every test file uses it
pub fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).bytes());
        out.extend_from_slice(a);
        out.extend(b"\r\n");
    }
    out
}

/// A shim process started in `dir` (killed when dropped): for runs that several processes
/// share a directory with (control sockets, snapshots, migration).
#[allow(dead_code)] // not every test file uses it
pub struct ShimProcess {
    child: std::process::Child,
}

#[allow(dead_code)] // not every test file uses every method
impl ShimProcess {
    /// Starts `hypervisor-shim ARGS` in `dir`, stdout discarded, stderr kept for [`Self::wait`].
    pub fn start(dir: &Path, args: &[&str]) -> ShimProcess {
        let child = Command::new(SHIM)
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the shim starts");
        ShimProcess { child }
    }

    /// Starts `hypervisor-shim ARGS` in `dir` inside the network namespace `netns` (`ip netns
    /// exec`, which execs the shim: the process id is the shim's).
    pub fn start_in_netns(dir: &Path, netns: &str, args: &[&str]) -> ShimProcess {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, SHIM])
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("ip netns exec starts");
        ShimProcess { child }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end; returns its exit code and stderr.
    pub fn wait(mut self, within: std::time::Duration) -> (Option<i32>, String) {
        let deadline = std::time::Instant::now() + within;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(std::time::Instant::now() < deadline, "the shim did not end within {within:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status.code(), err)
    }
}

impl Drop for ShimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hypervisor-shim ctl --api-sock SOCK ARGS`, run in `dir`.
#[allow(dead_code)] // not every test file uses it
pub fn ctl_in(dir: &Path, sock: &str, args: &[&str]) -> Run {
    Command::new(SHIM).args(["ctl", "--api-sock", sock]).args(args).current_dir(dir).output().expect("ctl").into()
}

/// Waits (up to 30 s) until the control API at `dir/sock` answers.
#[allow(dead_code)] // not every test file uses it
pub fn wait_for_api(dir: &Path, sock: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while ctl_in(dir, sock, &["list"]).code != Some(0) {
        assert!(std::time::Instant::now() < deadline, "the control API at {sock} never answered");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The JSON a successful command printed.
#[allow(dead_code)] // not every test file uses it
pub fn json_of(r: &Run) -> serde_json::Value {
    r.expect_code(0);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("no JSON ({e}):\n{}", r.stdout))
}

/// Waits (up to `within`) until `path` exists (a receiver's listening socket); `what` is the
/// failure message.
#[allow(dead_code)] // not every test file uses it
pub fn wait_for_path(path: &Path, within: std::time::Duration, what: &str) {
    let deadline = std::time::Instant::now() + within;
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
