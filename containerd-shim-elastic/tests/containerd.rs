//! End to end under a real containerd: each test starts a private Debian containerd (its own
//! root, state, sockets and config in a temporary directory) whose PATH finds
//! `containerd-shim-elastic-v1`, and drives it with the real `ctr`; the shim boots the real
//! kernel under the real `hypervisor-shim` on /dev/kvm.
//!
//! Needs: root, /dev/kvm, Debian's `containerd` and `ctr`, and `hypervisor-shim` built beside
//! the shim (`cargo build --release -p hypervisor-shim`; a workspace `cargo test --release`
//! builds both). Where any of these is missing the tests fail and say why; they never pass
//! without having run. `ELASTIC_KERNEL` overrides the kernel image the rootfs gets.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use containerd_shim::protos::api::UpdateTaskRequest;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::shim_sync::{Client, TaskClient};
use containerd_shim::protos::ttrpc::context::with_timeout;
use nix::sys::signal::Signal;

/// The runtime name containerd maps to `containerd-shim-elastic-v1`.
const RUNTIME: &str = "io.containerd.elastic.v1";
/// The shim binary cargo built for these tests.
const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-elastic-v1");
/// What the hello service prints first.
const BANNER: &str = "Hello from the elastic unikernel!";
/// The port the kv service listens on inside the guest.
const KV_GUEST_PORT: u16 = 6379;
/// Longest any single `ctr` command may take.
const CTR_TIMEOUT: Duration = Duration::from_secs(60);

fn bin_dir() -> PathBuf {
    Path::new(SHIM).parent().expect("the shim binary has a directory").to_path_buf()
}

/// `hypervisor-shim`, which the shim finds beside itself.
fn vmm_binary() -> PathBuf {
    let path = bin_dir().join("hypervisor-shim");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --release -p hypervisor-shim` (the containerd shim runs it)",
        path.display()
    );
    path
}

/// The kernel image built from this workspace (`elastic-images`), or `ELASTIC_KERNEL`.
fn kernel_image() -> PathBuf {
    match std::env::var_os("ELASTIC_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => PathBuf::from(elastic_images::KERNEL),
    }
}

/// Fails with the reason when this machine cannot run the tests at all.
fn require_environment() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("these tests boot real VMs and need a usable /dev/kvm ({e})");
    }
    assert!(nix::unistd::geteuid().is_root(), "containerd needs root: run these tests as root");
    for tool in ["containerd", "ctr"] {
        let found = Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
        assert!(
            found.is_ok_and(|s| s.success()),
            "`{tool}` is not installed (apt-get install containerd): the containerd tests cannot run"
        );
    }
    vmm_binary();
}

/// What a command printed and how it ended.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn expect_code(&self, code: i32, what: &str) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "{what}: unexpected exit\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `cmd` to completion, killing it (and failing) after `timeout`.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Ran {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let readers = [child.stdout.take().map(reader), child.stderr.take().map(reader)];
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let [stdout, stderr] = readers.map(|r| r.map(|h| h.join().expect("reader")).unwrap_or_default());
    Ran { code: status.code(), stdout, stderr }
}

fn reader(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A private containerd, torn down (tasks, containers, mounts, daemon, directory) on drop.
struct Containerd {
    dir: PathBuf,
    daemon: Child,
    /// The containerd namespace its `ctr` commands use: one per test, so the cgroups the
    /// shim makes (`/NAMESPACE/ID`) are this test's alone and go with its tasks.
    namespace: String,
}

impl Containerd {
    fn start(name: &str) -> Self {
        Self::start_with(name, None)
    }

    /// Starts containerd; `shim_dir` replaces the directory PATH finds the shim in (the
    /// build directory, where `hypervisor-shim` also is).
    fn start_with(name: &str, shim_dir: Option<&Path>) -> Self {
        require_environment();
        // Short: the shim's ttrpc socket name and the VM's control socket live below it.
        let dir = std::env::temp_dir().join(format!("ecs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("fifo")).expect("temp dir");
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).expect("config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("log");
        let system_path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .filter(|d| shim_dir.is_none() || !d.join("hypervisor-shim").exists())
            .collect::<Vec<_>>();
        let first = shim_dir.map_or_else(bin_dir, Path::to_path_buf);
        let path = std::env::join_paths(std::iter::once(first).chain(system_path)).expect("PATH");
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start containerd: {e}"));
        let mut c = Containerd { dir, daemon, namespace: format!("elastic-test-{name}") };
        c.wait_ready();
        c
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.daemon.try_wait().expect("wait") {
                panic!("containerd cannot run here: it exited ({status}) while starting\n{}", self.log());
            }
            if self.sock().exists() && self.ctr(&["version"]).code == Some(0) {
                return;
            }
            assert!(Instant::now() < deadline, "containerd did not serve within 20 s\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("c.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Ran {
        run_with_timeout(
            Command::new("ctr").arg("--address").arg(self.sock()).args(["--namespace", &self.namespace]).args(args),
            CTR_TIMEOUT,
        )
    }

    /// `ctr run` with this runtime and FIFOs inside the temporary directory.
    fn run(&self, opts: &[&str], rootfs_or_image: &[&str], id: &str, args: &[&str]) -> Ran {
        let fifo = self.dir.join("fifo");
        let fifo = fifo.to_str().expect("utf-8 path");
        let mut all = vec!["run", "--runtime", RUNTIME, "--fifo-dir", fifo];
        all.extend_from_slice(opts);
        all.extend_from_slice(rootfs_or_image);
        all.push(id);
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// A rootfs directory with the kernel and an `elastic.toml`.
    fn rootfs(&self, name: &str, elastic_toml: &str) -> PathBuf {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).expect("rootfs");
        std::fs::copy(kernel_image(), dir.join("kernel")).expect("copy kernel");
        std::fs::write(dir.join("elastic.toml"), elastic_toml).expect("elastic.toml");
        dir
    }

    /// The task's pid and status from `ctr task ls`.
    fn task(&self, id: &str) -> Option<(u32, String)> {
        let ls = self.ctr(&["task", "ls"]);
        ls.stdout.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| (f[1].parse().unwrap_or(0), f[2].to_string()))
        })
    }

    /// Waits until the task reports `status`.
    fn wait_status(&self, id: &str, status: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.task(id) {
                Some((pid, s)) if s == status => return pid,
                other => assert!(Instant::now() < deadline, "task {id} never became {status} (last: {other:?})"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Deletes a stopped task and its container; returns what `ctr task delete` printed.
    fn remove(&self, id: &str) -> Ran {
        let deleted = self.ctr(&["task", "delete", id]);
        self.ctr(&["container", "delete", id]).expect_code(0, "container delete");
        deleted
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Whatever a failed test left: kill and delete its tasks, delete its containers.
        let ls = self.ctr(&["task", "ls", "-q"]);
        for id in ls.stdout.split_whitespace() {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            let _ = self.ctr(&["task", "delete", "-f", id]);
        }
        let ls = self.ctr(&["container", "ls", "-q"]);
        for id in ls.stdout.split_whitespace() {
            let _ = self.ctr(&["container", "delete", id]);
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.daemon.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.daemon.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.daemon.kill();
                let _ = self.daemon.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A shim or VMM that outlived all that (a failed test) names this directory on its
        // command line: end it.
        kill_processes_naming(&self.dir);
        // The namespace's cgroup the shims made their tasks' in (`/NAMESPACE/ID`): a shim that
        // died removes its task's cgroup but not this parent, which it cannot know it made.
        if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
            for line in mountinfo.lines().filter(|l| l.contains(" - cgroup")) {
                if let Some(mount) = line.split(' ').nth(4) {
                    let _ = std::fs::remove_dir(Path::new(mount).join(&self.namespace));
                }
            }
        }
        // Snapshot mounts live below root/; never delete through a live mount.
        let _ = Command::new("umount").arg("-R").arg(self.dir.join("root")).stderr(Stdio::null()).status();
        if !mounted_below(&self.dir) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SIGKILLs every process (other than this one) whose command line mentions `dir`.
fn kill_processes_naming(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if pid != me && String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn mounted_below(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = dir.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(1).is_some_and(|m| m.starts_with(prefix.as_ref())))
}

/// Total CPU time (user + system, in clock ticks) of `pid` so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn hello_prints_the_banner_and_exits_zero() {
    let c = Containerd::start("hello");
    let rootfs = c.rootfs("rootfs", "service = \"hello\"\n");
    let ran = c.run(&["--rm", "--rootfs"], &[rootfs.to_str().expect("path")], "hello", &[]);
    ran.expect_code(0, "ctr run hello");
    assert!(ran.stdout.contains(BANNER), "no banner in ctr's output:\n{}", ran.stdout);
    assert!(ran.stdout.contains("policy min 1 / max 1 / burst 1"), "{}", ran.stdout);
    assert!(c.task("hello").is_none(), "--rm left the task behind");

    // A file:// log URI: the shim appends the console to the file.
    let log = c.dir.join("console.log");
    let uri = format!("file://{}", log.display());
    c.run(&["--rm", "--log-uri", &uri, "--rootfs"], &[rootfs.to_str().expect("path")], "hello-log", &[])
        .expect_code(0, "ctr run --log-uri");
    let text = std::fs::read_to_string(&log).expect("the log file exists");
    assert!(text.contains(BANNER), "no banner in {}:\n{text}", log.display());
}

#[test]
fn resources_and_annotations_become_the_policy() {
    let c = Containerd::start("resources");
    let rootfs = c.rootfs("rootfs", "service = \"hello\"\nmemory = \"64M:128M:128M\"\n");
    // --cpus 2 is a CFS quota of 2 periods (max 2), --cpu-shares 2048 is min 2.
    let ran = c.run(
        &[
            "--rm",
            "--cpus",
            "2",
            "--cpu-shares",
            "2048",
            "--memory-limit",
            "268435456",
            "--annotation",
            "elastic.burst.vcpus=4",
            "--annotation",
            "elastic.burst.memory=1G",
            "--rootfs",
        ],
        &[rootfs.to_str().expect("path")],
        "res",
        &[],
    );
    ran.expect_code(0, "ctr run with resources");
    assert!(ran.stdout.contains("2 online (policy min 2 / max 2 / burst 4)"), "{}", ran.stdout);
    assert!(ran.stdout.contains("(policy min 64 / max 256 / burst 1024 MiB)"), "{}", ran.stdout);
}

#[test]
fn a_faulting_service_exit_status_reaches_ctr() {
    let c = Containerd::start("fault");
    let rootfs = c.rootfs("rootfs", "service = \"hello\"\n");
    // The process args override elastic.toml: args[0] is the service.
    let ran = c.run(&["--rm", "--rootfs"], &[rootfs.to_str().expect("path")], "fault", &["fault"]);
    ran.expect_code(71, "ctr run fault");
    assert!(ran.stderr.contains("vector 14"), "the VMM's diagnosis did not reach ctr's stderr:\n{}", ran.stderr);
}

#[test]
fn kill_stops_a_running_service() {
    let c = Containerd::start("kill");
    let rootfs = c.rootfs("rootfs", "service = \"idle\"\nargs = [\"600000\"]\n");
    let root = rootfs.to_str().expect("path");
    let mut events = Command::new("ctr")
        .arg("--address")
        .arg(c.sock())
        .arg("events")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    let events_out = events.stdout.take().map(reader).expect("events pipe");

    // SIGTERM (ctr's default) asks the guest to stop: it ends with its own code 5.
    c.run(&["-d", "--rootfs"], &[root], "idle", &[]).expect_code(0, "ctr run -d idle");
    let pid = c.wait_status("idle", "RUNNING");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the task pid is a live process");
    assert!(exe.ends_with("hypervisor-shim"), "task pid {pid} is {}", exe.display());
    c.ctr(&["task", "kill", "idle"]).expect_code(0, "ctr task kill");
    c.wait_status("idle", "STOPPED");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the VMM {pid} outlived its task");
    let deleted = c.remove("idle");
    assert!(deleted.stderr.contains("exit code 5"), "{deleted:?}");

    // SIGKILL ends the VMM: 128 + 9.
    c.run(&["-d", "--rootfs"], &[root], "idle2", &[]).expect_code(0, "ctr run -d idle2");
    c.wait_status("idle2", "RUNNING");
    c.ctr(&["task", "kill", "-s", "SIGKILL", "idle2"]).expect_code(0, "ctr task kill -s SIGKILL");
    c.wait_status("idle2", "STOPPED");
    let deleted = c.remove("idle2");
    assert!(deleted.stderr.contains("exit code 137"), "{deleted:?}");

    // A signal with no meaning for a VM is refused, and the task keeps running.
    c.run(&["-d", "--rootfs"], &[root], "idle3", &[]).expect_code(0, "ctr run -d idle3");
    c.wait_status("idle3", "RUNNING");
    let hup = c.ctr(&["task", "kill", "-s", "SIGHUP", "idle3"]);
    assert_ne!(hup.code, Some(0), "SIGHUP was accepted");
    assert!(hup.stderr.contains("signal 1 is not supported"), "{hup:?}");
    c.wait_status("idle3", "RUNNING");
    c.ctr(&["task", "kill", "-s", "SIGKILL", "idle3"]).expect_code(0, "kill idle3");
    c.wait_status("idle3", "STOPPED");
    c.remove("idle3");

    // The shim published the exits to containerd's event stream.
    let _ = events.kill();
    let _ = events.wait();
    let events = events_out.join().expect("events");
    for (id, status) in [("idle", 5), ("idle2", 137)] {
        let exit = events
            .lines()
            .find(|l| l.contains("/tasks/exit") && l.contains(&format!("\"container_id\":\"{id}\"")))
            .unwrap_or_else(|| panic!("no /tasks/exit event for {id}:\n{events}"));
        assert!(exit.contains(&format!("\"exit_status\":{status}")), "{exit}");
    }
    assert!(events.contains("/tasks/start") && events.contains("/tasks/delete"), "{events}");
}

/// If the shim process dies, containerd runs `containerd-shim-elastic-v1 delete`, which must
/// end the VM the dead shim left behind.
#[test]
fn a_vm_left_by_a_dead_shim_is_ended() {
    let c = Containerd::start("deadshim");
    let rootfs = c.rootfs("rootfs", "service = \"idle\"\nargs = [\"600000\"]\n");
    c.run(&["-d", "--rootfs"], &[rootfs.to_str().expect("path")], "orphan", &[]).expect_code(0, "ctr run -d");
    let vmm = c.wait_status("orphan", "RUNNING");
    let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).expect("/proc/PID/cgroup");
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).expect("status");
    let shim: i32 = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("the VMM's parent");
    let cmdline = std::fs::read(format!("/proc/{shim}/cmdline")).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("containerd-shim-elastic-v1"),
        "the VMM's parent {shim} is not our shim"
    );
    let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
    let socket = cmdline
        .split('\0')
        .skip_while(|a| *a != "-socket")
        .nth(1)
        .map(|a| PathBuf::from(a.trim_start_matches("unix://")))
        .expect("the shim's -socket");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), Signal::SIGKILL).expect("kill the shim");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{vmm}")).exists() {
        assert!(Instant::now() < deadline, "the VMM {vmm} outlived its dead shim by 20 s\n{}", c.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.task("orphan").is_some() {
        assert!(Instant::now() < deadline, "containerd still lists the task of a dead shim");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.ctr(&["container", "delete", "orphan"]).expect_code(0, "container delete");
    assert!(!socket.exists(), "the dead shim's socket {} was left behind", socket.display());
    assert_no_cgroup_left(&cgroups);
}

/// Fails if the leaf cgroup of any line of a `/proc/PID/cgroup` text still exists.
fn assert_no_cgroup_left(proc_cgroup: &str) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        // The hierarchy's mount point: cgroup2 for "", else the v1 mount with those options.
        let mount = mountinfo.lines().find_map(|m| {
            let (before, after) = m.split_once(" - ")?;
            let mut a = after.split(' ');
            let (fstype, options) = (a.next()?, a.nth(1)?);
            let hit = if controllers.is_empty() {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && controllers.split(',').all(|c| options.split(',').any(|o| o == c))
            };
            hit.then(|| before.split(' ').nth(4).map(PathBuf::from)).flatten()
        });
        if let Some(mount) = mount {
            let dir = mount.join(path.trim_start_matches('/'));
            assert!(!dir.exists(), "the cgroup {} is left behind", dir.display());
        }
    }
}

#[test]
fn unsupported_specs_are_refused_at_create() {
    let c = Containerd::start("refuse");
    let rootfs = c.rootfs("rootfs", "service = \"hello\"\n");
    let root = rootfs.to_str().expect("path");
    let cases: [(&[&str], &str); 3] = [
        (&["--mount", "type=bind,src=/tmp,dst=/data,options=rbind:ro"], "mount of /tmp at /data"),
        (&["--annotation", "elastic.burst.cpus=2"], "unknown annotation \"elastic.burst.cpus\""),
        (&["--cpus", "1", "--cpu-shares", "4096"], "vCPU policy 4:1:1 must satisfy min <= max <= burst"),
    ];
    for (i, (opts, message)) in cases.iter().enumerate() {
        let mut all = vec!["--rm"];
        all.extend_from_slice(opts);
        all.push("--rootfs");
        let ran = c.run(&all, &[root], &format!("refused{i}"), &[]);
        assert_ne!(ran.code, Some(0), "{opts:?} was accepted");
        assert!(ran.stderr.contains(message), "{opts:?}: expected {message:?} in\n{}", ran.stderr);
    }
    // A policy hypervisor-shim would refuse (65 vCPUs) is refused at Create, in its words.
    let wide = c.rootfs("wide", "service = \"hello\"\nvcpus = \"1:65:65\"\n");
    let ran = c.run(&["--rm", "--rootfs"], &[wide.to_str().expect("path")], "wide", &[]);
    assert_ne!(ran.code, Some(0), "65 vCPUs were accepted");
    let message = "elastic.toml: vcpus: vCPU policy 1:65:65: min must be at least 1 and burst at most 64";
    assert!(ran.stderr.contains(message), "expected {message:?} in\n{}", ran.stderr);
    // A rootfs without elastic.toml and kernel.
    let empty = c.dir.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    let ran = c.run(&["--rm", "--rootfs"], &[empty.to_str().expect("path")], "empty", &[]);
    assert!(ran.stderr.contains("elastic.toml"), "{}", ran.stderr);
    assert_eq!(c.ctr(&["container", "ls", "-q"]).stdout.trim(), "", "refused containers were left behind");
}

/// Without `hypervisor-shim` beside the shim or on PATH, create fails and says so.
#[test]
fn a_missing_vmm_is_a_create_error() {
    let lonely = std::env::temp_dir().join(format!("ecs-{}-lonely-bin", std::process::id()));
    let _ = std::fs::remove_dir_all(&lonely);
    std::fs::create_dir_all(&lonely).expect("dir");
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _lonely_guard = Remove(lonely.clone());
    let shim = lonely.join("containerd-shim-elastic-v1");
    if std::fs::hard_link(SHIM, &shim).is_err() {
        std::fs::copy(SHIM, &shim).expect("copy the shim");
    }
    let c = Containerd::start_with("novmm", Some(&lonely));
    let rootfs = c.rootfs("rootfs", "service = \"hello\"\n");
    let ran = c.run(&["--rm", "--rootfs"], &[rootfs.to_str().expect("path")], "novmm", &[]);
    assert_ne!(ran.code, Some(0), "ran without a VMM");
    assert!(ran.stderr.contains("hypervisor-shim not found beside"), "{}", ran.stderr);
    assert_eq!(c.ctr(&["container", "ls", "-q"]).stdout.trim(), "", "the refused container was left behind");
}

/// An OCI image (one layer holding the kernel and elastic.toml), imported and run through
/// containerd's snapshotter: the path Kubernetes takes.
#[test]
fn an_image_rootfs_is_mounted_and_run() {
    let c = Containerd::start("image");
    let layer_dir = c.rootfs("layer", "service = \"hello\"\n");
    let tar = oci_image_tar(&c.dir, &layer_dir, "localhost/elastic-hello:test");
    c.ctr(&["image", "import", tar.to_str().expect("path")]).expect_code(0, "ctr image import");
    let ran = c.run(&["--rm"], &["localhost/elastic-hello:test"], "image", &[]);
    ran.expect_code(0, "ctr run IMAGE");
    assert!(ran.stdout.contains(BANNER), "{}", ran.stdout);
    let ran = c.run(&["--rm"], &["localhost/elastic-hello:test"], "image-fault", &["fault"]);
    ran.expect_code(71, "ctr run IMAGE fault");
    let state = c.dir.join("state");
    assert!(!mounted_below(&state), "a task rootfs is still mounted under {}", state.display());
}

/// Writes an OCI image layout tarball (`ctr image import` format) holding `layer_dir`'s files.
fn oci_image_tar(dir: &Path, layer_dir: &Path, name: &str) -> PathBuf {
    let image = dir.join("image");
    let blobs = image.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let layer = dir.join("layer.tar");
    run_with_timeout(
        Command::new("tar").arg("-C").arg(layer_dir).arg("-cf").arg(&layer).args(["kernel", "elastic.toml"]),
        Duration::from_secs(30),
    )
    .expect_code(0, "tar layer");
    let add = |bytes: &[u8]| -> (String, usize) {
        let tmp = dir.join("blob.tmp");
        std::fs::write(&tmp, bytes).expect("blob");
        let sum = run_with_timeout(Command::new("sha256sum").arg(&tmp), Duration::from_secs(30));
        let digest = sum.stdout.split_whitespace().next().expect("digest").to_string();
        std::fs::rename(&tmp, blobs.join(&digest)).expect("blob");
        (digest, bytes.len())
    };
    let (layer_digest, layer_size) = add(&std::fs::read(&layer).expect("layer"));
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#
    );
    let (config_digest, config_size) = add(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_digest}","size":{layer_size}}}]}}"#
    );
    let (manifest_digest, manifest_size) = add(manifest.as_bytes());
    std::fs::write(image.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{manifest_size},"annotations":{{"io.containerd.image.name":"{name}"}}}}]}}"#
    );
    std::fs::write(image.join("index.json"), index).expect("index");
    let tar = dir.join("image.tar");
    run_with_timeout(
        Command::new("tar").arg("-C").arg(&image).arg("-cf").arg(&tar).args(["oci-layout", "index.json", "blobs"]),
        Duration::from_secs(30),
    )
    .expect_code(0, "tar image");
    tar
}

/// A network namespace given by path (what CRI does for every pod container) is the one the
/// VMM runs in; CRI's sandbox container runs no VM at all.
/// A network namespace bind-mounted on a file (as a CRI pod's), unmounted when dropped.
struct PodNetns(PathBuf);

impl PodNetns {
    /// A new namespace at `C/netns`, its loopback up.
    fn new(c: &Containerd) -> PodNetns {
        let netns = c.dir.join("netns");
        std::fs::write(&netns, "").expect("netns file");
        let ran = run_with_timeout(
            Command::new("unshare").arg(format!("--net={}", netns.display())).args(["ip", "link", "set", "lo", "up"]),
            Duration::from_secs(30),
        );
        ran.expect_code(0, "unshare --net=FILE ip link set lo up");
        PodNetns(netns)
    }

    /// Runs `cmd ARGS` inside the namespace.
    fn run(&self, cmd: &str, args: &[&str]) -> Ran {
        run_with_timeout(
            Command::new("nsenter").arg(format!("--net={}", self.0.display())).arg(cmd).args(args),
            Duration::from_secs(30),
        )
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn pod_network_namespace_is_joined_and_sandboxes_run_no_vm() {
    let c = Containerd::start("netns");
    let pod = PodNetns::new(&c);
    let netns = pod.0.clone();
    let inode = std::fs::metadata(&netns).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).expect("netns inode");

    // The pod sandbox: no rootfs content needed, nothing runs, kill ends it like `pause`.
    let empty = c.dir.join("sandbox-rootfs");
    std::fs::create_dir_all(&empty).expect("dir");
    let with_ns = format!("network:{}", netns.display());
    c.run(
        &["-d", "--with-ns", &with_ns, "--annotation", "io.kubernetes.cri.container-type=sandbox", "--rootfs"],
        &[empty.to_str().expect("path")],
        "sandbox",
        &[],
    )
    .expect_code(0, "ctr run sandbox");
    c.wait_status("sandbox", "RUNNING");

    let rootfs = c.rootfs("rootfs", "service = \"idle\"\nargs = [\"600000\"]\n");
    c.run(&["-d", "--with-ns", &with_ns, "--rootfs"], &[rootfs.to_str().expect("path")], "app", &[])
        .expect_code(0, "ctr run app");
    let pid = c.wait_status("app", "RUNNING");
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns link");
    assert_eq!(ns.to_string_lossy(), format!("net:[{inode}]"), "the VMM is not in the pod's network namespace");

    for id in ["app", "sandbox"] {
        c.ctr(&["task", "kill", "-s", "SIGKILL", id]).expect_code(0, "kill");
        c.wait_status(id, "STOPPED");
        c.remove(id);
    }
}

#[test]
fn pause_and_resume_go_through_the_control_api() {
    let c = Containerd::start("pause");
    let rootfs = c.rootfs("rootfs", "service = \"spin\"\nargs = [\"10000000000000\"]\n");
    c.run(&["-d", "--rootfs"], &[rootfs.to_str().expect("path")], "spin", &[]).expect_code(0, "ctr run -d spin");
    let pid = c.wait_status("spin", "RUNNING");
    let window = Duration::from_millis(1000);

    c.ctr(&["task", "pause", "spin"]).expect_code(0, "ctr task pause");
    c.wait_status("spin", "PAUSED");
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    let paused = cpu_ticks(pid) - before;

    c.ctr(&["task", "resume", "spin"]).expect_code(0, "ctr task resume");
    c.wait_status("spin", "RUNNING");
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    let resumed = cpu_ticks(pid) - before;
    // Clock ticks are 10 ms: a paused guest burns (almost) none, a spinning one most of a core.
    assert!(paused <= 5, "the paused VM used {paused} ticks in {window:?}");
    assert!(resumed >= 20, "the resumed VM used only {resumed} ticks in {window:?}");

    c.ctr(&["task", "kill", "-s", "SIGKILL", "spin"]).expect_code(0, "kill");
    c.wait_status("spin", "STOPPED");
    c.remove("spin");
}

#[test]
fn kv_answers_redis_cli_on_its_published_port() {
    let c = Containerd::start("kv");
    let rootfs = c.rootfs("rootfs", "service = \"kv\"\n");
    let (port, _) = start_kv(&c, &["--rootfs"], &[rootfs.to_str().expect("path")], "kv");
    let cli = |args: &[&str]| redis_cli(&port, args);
    assert_eq!(cli(&["SET", "elastic", "containerd"]).stdout.trim(), "OK");
    assert_eq!(cli(&["GET", "elastic"]).stdout.trim(), "containerd");
    c.ctr(&["task", "kill", "-s", "SIGKILL", "kv"]).expect_code(0, "kill");
    c.wait_status("kv", "STOPPED");
    c.remove("kv");
}

/// The task's bundle directory in this containerd's state.
fn bundle(c: &Containerd, id: &str) -> PathBuf {
    c.dir.join("state/io.containerd.runtime.v2.task").join(&c.namespace).join(id)
}

/// A client on the shim's own task service (the ttrpc socket containerd talks to): the bench
/// times Update there, without a client process per request.
fn shim_client(c: &Containerd, id: &str) -> TaskClient {
    let address = std::fs::read_to_string(bundle(c, id).join("address")).expect("the shim's address file");
    TaskClient::new(Client::connect(address.trim()).expect("connect to the shim"))
}

/// Sends the shim the Update containerd would forward for `id` with OCI `resources` (JSON)
/// (Kubernetes' in-place resize); the tests go through containerd
/// ([`update_through_containerd`]).
fn update(c: &Containerd, id: &str, resources: serde_json::Value) -> Result<(), String> {
    let req = update_request(id, &resources);
    shim_client(c, id).update(with_timeout(30_000_000_000), &req).map(|_| ()).map_err(|e| e.to_string())
}

/// The Update of task `id` to OCI `resources` (JSON).
fn update_request(id: &str, resources: &serde_json::Value) -> UpdateTaskRequest {
    UpdateTaskRequest {
        id: id.to_string(),
        resources: Some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: resources.to_string().into_bytes(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// Sends Update for `id` through containerd's own gRPC API (`containerd.services.tasks.v1.
/// Tasks/Update`, the call CRI's UpdateContainerResources makes; containerd forwards it to the
/// shim), with `curl` as the HTTP/2 client: `ctr` 1.6 has no update verb. The service's
/// request has the fields and numbers of the shim API's `UpdateTaskRequest` (id 1, resources
/// 2, annotations 3), so that message encodes it. `Err`: the gRPC status message.
fn update_through_containerd(c: &Containerd, id: &str, resources: serde_json::Value) -> Result<(), String> {
    use containerd_shim::protos::protobuf::Message;
    let message = update_request(id, &resources).write_to_bytes().expect("encode");
    // A gRPC message: not compressed, its length (big-endian), the bytes.
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let body = c.dir.join(format!("update-{id}.grpc"));
    let headers = c.dir.join(format!("update-{id}.headers"));
    std::fs::write(&body, framed).expect("request body");
    let ran = run_with_timeout(
        Command::new("curl")
            .args(["-sS", "--http2-prior-knowledge", "--unix-socket"])
            .arg(c.sock())
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .args(["-H", &format!("containerd-namespace: {}", c.namespace)])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg("-D")
            .arg(&headers)
            .args(["-o", "/dev/null", "http://localhost/containerd.services.tasks.v1.Tasks/Update"]),
        Duration::from_secs(60),
    );
    ran.expect_code(0, "curl (gRPC Tasks/Update)");
    // The status comes in the trailers (or the headers of an immediate error).
    let text = std::fs::read_to_string(&headers).expect("headers");
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    match field("grpc-status").as_deref() {
        Some("0") => Ok(()),
        Some(code) => {
            Err(format!("gRPC status {code}: {}", percent_decoded(&field("grpc-message").unwrap_or_default())))
        }
        None => panic!("no grpc-status in containerd's answer:\n{text}"),
    }
}

/// A gRPC `grpc-message` value, percent-decoded.
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `ctr task metrics --format json ID`: (CPU time in µs, memory in use in bytes), from
/// whichever cgroup shape the shim answered with.
fn metrics(c: &Containerd, id: &str) -> (u64, u64) {
    let m = c.ctr(&["task", "metrics", "--format", "json", id]);
    m.expect_code(0, "ctr task metrics");
    let v: serde_json::Value = serde_json::from_str(&m.stdout).unwrap_or_else(|e| panic!("{e}: {}", m.stdout));
    let v1 = (v["cpu"]["usage"]["total"].as_u64().map(|ns| ns / 1000), v["memory"]["usage"]["usage"].as_u64());
    let v2 = (v["cpu"]["usage_usec"].as_u64(), v["memory"]["usage"].as_u64());
    match (v1, v2) {
        ((Some(cpu), Some(mem)), _) | (_, (Some(cpu), Some(mem))) => (cpu, mem),
        _ => panic!("no CPU or memory figures in the metrics: {}", m.stdout),
    }
}

#[test]
fn kv_is_resized_in_place_reports_metrics_and_runs_in_its_cgroup() {
    let c = Containerd::start("resize");
    let rootfs = c.rootfs("rootfs", "service = \"kv\"\nmemory = \"64M:128M:128M\"\n");
    // 1:2 vCPUs, memory max 128M; the burst annotation lays out room to grow to 512M.
    let opts = ["--cpus", "2", "--cpu-shares", "1024", "--memory-limit", "134217728"];
    let mut all: Vec<&str> = opts.to_vec();
    all.extend(["--annotation", "elastic.burst.memory=512M", "--rootfs"]);
    let (port, pid) = start_kv(&c, &all, &[rootfs.to_str().expect("path")], "kv");
    // One connection kept open: the resize is timed without a client process per look.
    let mut kv = Kv::connect(&port).expect("connect to kv");
    let mut guest_policy = || kv.guest_policy();
    assert_eq!(guest_policy().as_deref(), Some("1:2:2"), "the guest's policy before the update");

    // The VMM runs in the cgroup the spec names, in every hierarchy.
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle(&c, "kv").join("config.json")).expect("config.json"))
            .expect("spec");
    let cgroups_path = spec["linux"]["cgroupsPath"].as_str().expect("ctr gives a cgroupsPath").to_string();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/PID/cgroup");
    for line in cgroups.lines() {
        assert!(line.ends_with(&format!(":{cgroups_path}")), "the VMM is not in {cgroups_path}:\n{cgroups}");
    }

    // Metrics, before and after load: CPU time grows, and so does memory once 60 MB are stored.
    let (cpu0, mem0) = metrics(&c, "kv");
    assert!(mem0 >= 64 << 20, "memory in use {mem0} is below boot memory");

    // Update (as Kubernetes' in-place resize sends it, through containerd's gRPC API): 4 vCPUs,
    // memory max 256M.
    let sent = Instant::now();
    let resources = serde_json::json!({"cpu": {"quota": 400000, "period": 100000}, "memory": {"limit": 268435456}});
    update_through_containerd(&c, "kv", resources).expect("the update is accepted");
    while guest_policy().as_deref() != Some("1:4:4") {
        assert!(sent.elapsed() < Duration::from_secs(10), "the guest never saw 1:4:4 (it says {:?})", guest_policy());
        // Looks every 0.2 ms: a resize is timed to that, and the two CPUs are left to the VM.
        std::thread::sleep(Duration::from_micros(200));
    }
    eprintln!("pod_resize_us (Update sent -> the guest reports its new max): {}", sent.elapsed().as_micros());
    let ctl = run_with_timeout(
        Command::new(vmm_binary()).args(["ctl", "--api-sock", "api.sock", "get", "vm0"]).current_dir(bundle(&c, "kv")),
        Duration::from_secs(10),
    );
    ctl.expect_code(0, "ctl get");
    let live: serde_json::Value = serde_json::from_str(&ctl.stdout).expect("ctl get JSON");
    assert_eq!(live["vcpu_policy"]["max"], 4, "{}", ctl.stdout);
    assert_eq!(live["memory_policy"]["max"], 256u64 << 20, "{}", ctl.stdout);
    assert_eq!(live["memory_policy"]["burst"], 512u64 << 20, "the annotation's burst stays: {}", ctl.stdout);
    // A limit below boot memory cannot be honoured on a running VM: refused (containerd passes
    // the shim's reason on), policy unchanged.
    let e =
        update_through_containerd(&c, "kv", serde_json::json!({"memory": {"limit": 33554432}})).expect_err("below min");
    assert!(e.contains("below the VM's boot memory"), "{e}");
    let ctl = run_with_timeout(
        Command::new(vmm_binary()).args(["ctl", "--api-sock", "api.sock", "get", "vm0"]).current_dir(bundle(&c, "kv")),
        Duration::from_secs(10),
    );
    let live: serde_json::Value = serde_json::from_str(&ctl.stdout).expect("ctl get JSON");
    assert_eq!(live["memory_policy"]["max"], 256u64 << 20, "a refused update changed the policy: {}", ctl.stdout);

    let bench = run_with_timeout(
        Command::new("redis-benchmark")
            .args(["-p", &port, "-t", "set", "-n", "30", "-d", "2000000", "-r", "100000", "-c", "1", "-q"]),
        Duration::from_secs(60),
    );
    bench.expect_code(0, "redis-benchmark");
    let (cpu1, mem1) = metrics(&c, "kv");
    assert!(cpu1 > cpu0, "CPU time did not grow under load: {cpu0} -> {cpu1} us");
    assert!(mem1 > mem0, "memory in use did not grow with 60 MB stored: {mem0} -> {mem1}");

    // Exec is refused with the reason; ps lists the VMM.
    let exec = c.ctr(&["task", "exec", "--exec-id", "sh", "kv", "/bin/sh"]);
    assert_ne!(exec.code, Some(0), "exec succeeded: {exec:?}");
    assert!(exec.stderr.contains("exec is not supported"), "{}", exec.stderr);
    let ps = c.ctr(&["task", "ps", "kv"]);
    assert!(ps.stdout.lines().any(|l| l.split_whitespace().next() == Some(&pid.to_string())), "{}", ps.stdout);

    c.ctr(&["task", "kill", "-s", "SIGKILL", "kv"]).expect_code(0, "kill");
    c.wait_status("kv", "STOPPED");
    c.remove("kv");
    // The cgroup this shim made is gone with the task.
    assert_no_cgroup_left(&cgroups);
}

/// `ctr container checkpoint --task` saves a running kv VM into a checkpoint image (containerd
/// pauses the task, the shim snapshots the VM), and `ctr container restore --live` brings it
/// back in a new container and VMM: the keys written before the checkpoint are there.
#[test]
fn a_kv_checkpoint_restores_with_its_keys() {
    let c = Containerd::start("ckpt");
    checkpoint_and_restore(&c, &[], None);
}

/// The same in the node pool: the pool writes the VM's snapshot, and the restored task is a
/// pool VM restored from it.
#[test]
fn a_node_pool_kv_checkpoint_restores_with_its_keys() {
    let c = Containerd::start("nodeckpt");
    let sock = c.dir.join("pool.sock");
    let config = c.dir.join("shim.toml");
    std::fs::write(&config, format!("[node_pool]\nsocket = \"{}\"\nvcpus = 2\nmemory = \"512M\"\n", sock.display()))
        .expect("shim.toml");
    checkpoint_and_restore(&c, &["--runtime-config-path", config.to_str().expect("path")], Some(&sock));
    assert_eq!(pool_get(&sock, "/api/v1/pool")["vms"], 0, "the VMs left the pool");
}

/// Runs a kv task (with `ctr run` options `opts`) from an imported OCI image, checkpoints it
/// into an image, kills it, restores a new task from the image and checks its keys, resizes
/// it, and kills it. With `pool`, both VMs must be that node pool's.
fn checkpoint_and_restore(c: &Containerd, opts: &[&str], pool: Option<&Path>) {
    let in_pool = |id: &str| {
        if let Some(sock) = pool {
            let name = format!("{}:{id}", c.namespace);
            let listed = pool_get(sock, "/api/v1/vms");
            assert!(listed.as_array().expect("list").iter().any(|v| v["name"] == name.as_str()), "{name}: {listed}");
        }
    };
    let layer_dir = c.rootfs("layer", "service = \"kv\"\n");
    let tar = oci_image_tar(&c.dir, &layer_dir, "localhost/elastic-kv:test");
    c.ctr(&["image", "import", tar.to_str().expect("path")]).expect_code(0, "ctr image import");
    let (port, _) = start_kv(c, opts, &["localhost/elastic-kv:test"], "kv");
    in_pool("kv");
    let cli = |args: &[&str]| redis_cli(&port, args);
    // A key, and 2 MB of data that must come back byte for byte.
    assert_eq!(cli(&["SET", "before", "checkpoint"]).stdout.trim(), "OK");
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    assert_eq!(resp(&port, &[b"SET", b"big", &big]), b"+OK\r\n");

    c.ctr(&["container", "checkpoint", "--task", "kv", "localhost/kv-checkpoint:1"]).expect_code(0, "ctr c checkpoint");
    // The task runs on after the checkpoint.
    c.wait_status("kv", "RUNNING");
    assert_eq!(cli(&["GET", "before"]).stdout.trim(), "checkpoint");
    c.ctr(&["task", "kill", "-s", "SIGKILL", "kv"]).expect_code(0, "kill");
    c.wait_status("kv", "STOPPED");
    c.remove("kv");

    c.ctr(&["container", "restore", "--live", "kv2", "localhost/kv-checkpoint:1"]).expect_code(0, "ctr c restore");
    c.wait_status("kv2", "RUNNING");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli(&["PING"]).stdout.trim() != "PONG" {
        assert!(Instant::now() < deadline, "the restored kv never answered PING");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cli(&["GET", "before"]).stdout.trim(), "checkpoint", "the key set before the checkpoint");
    in_pool("kv2");
    let mut expected = format!("${}\r\n", big.len()).into_bytes();
    expected.extend_from_slice(&big);
    expected.extend_from_slice(b"\r\n");
    assert!(resp(&port, &[b"GET", b"big"]) == expected, "the 2 MB value came back different");
    // The restored VM resizes from the policy it brought back (1:1:1 from elastic.toml's default).
    update_through_containerd(c, "kv2", serde_json::json!({"cpu": {"quota": 200000, "period": 100000}}))
        .expect("update after restore");
    let mut kv = Kv::connect(&port).expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    while kv.guest_policy().as_deref() != Some("1:2:2") {
        assert!(Instant::now() < deadline, "the restored guest never saw 1:2:2: {:?}", kv.guest_policy());
        std::thread::sleep(Duration::from_millis(1));
    }
    // A second checkpoint (of the restored VM), once the first image is gone: containerd 1.6
    // stores the container's spec again, and fails when its first image still holds that blob
    // (docs/kubernetes.md, "Checkpoints").
    c.ctr(&["image", "rm", "--sync", "localhost/kv-checkpoint:1"]).expect_code(0, "ctr image rm --sync");
    assert_eq!(cli(&["SET", "after", "restore"]).stdout.trim(), "OK");
    c.ctr(&["container", "checkpoint", "--task", "kv2", "localhost/kv-checkpoint:2"])
        .expect_code(0, "the second checkpoint");
    c.ctr(&["task", "kill", "-s", "SIGKILL", "kv2"]).expect_code(0, "kill");
    c.wait_status("kv2", "STOPPED");
    c.remove("kv2");
    c.ctr(&["container", "restore", "--live", "kv3", "localhost/kv-checkpoint:2"]).expect_code(0, "restore kv3");
    c.wait_status("kv3", "RUNNING");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli(&["PING"]).stdout.trim() != "PONG" {
        assert!(Instant::now() < deadline, "the twice-restored kv never answered PING");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cli(&["GET", "after"]).stdout.trim(), "restore", "the key set after the first restore");
    assert_eq!(cli(&["GET", "before"]).stdout.trim(), "checkpoint", "the key set before the first checkpoint");
    c.ctr(&["task", "kill", "-s", "SIGKILL", "kv3"]).expect_code(0, "kill");
    c.wait_status("kv3", "STOPPED");
    c.remove("kv3");
}

/// Sends one RESP command on a new connection to 127.0.0.1:`port` and returns the reply (a
/// simple string, or a bulk string with its header).
fn resp(port: &str, args: &[&[u8]]) -> Vec<u8> {
    Kv::connect(port).expect("connect to kv").cmd(args)
}

/// One client connection to a kv service.
struct Kv(std::net::TcpStream);

impl Kv {
    fn connect(port: &str) -> std::io::Result<Kv> {
        let s = std::net::TcpStream::connect(format!("127.0.0.1:{port}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Kv(s))
    }

    /// Sends one RESP command and returns the reply (a simple string or error, or a bulk
    /// string with its header).
    fn cmd(&mut self, args: &[&[u8]]) -> Vec<u8> {
        use std::io::Write;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.0.write_all(&req).expect("send");
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            self.0.read_exact(&mut byte).expect("reply");
            reply.push(byte[0]);
        }
        if reply.first() == Some(&b'$') {
            let len: i64 = std::str::from_utf8(&reply[1..reply.len() - 2]).expect("utf-8").parse().expect("length");
            if len >= 0 {
                let mut body = vec![0u8; len as usize + 2];
                self.0.read_exact(&mut body).expect("bulk body");
                reply.extend_from_slice(&body);
            }
        }
        reply
    }

    /// The guest's vCPU policy as kv's INFO reports it (`vcpus_policy:MIN:MAX:BURST`).
    fn guest_policy(&mut self) -> Option<String> {
        let info = self.cmd(&[b"INFO", b"elastic"]);
        String::from_utf8_lossy(&info).lines().find_map(|l| l.strip_prefix("vcpus_policy:")).map(str::to_string)
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr").port()
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The bench mode of these tests (run by hand, not by `cargo test`):
/// `cargo test --release -p containerd-shim-elastic --test containerd -- --ignored --nocapture
/// bench_pod_start_and_resize` writes `pod_start_us` (`ctr run -d` of a kv task → its first
/// PONG on the published port, the `ctr` process included; median of 10) and `pod_resize_us`
/// (containerd's Update sent to the shim → the guest's INFO shows the new max; median of 10)
/// as JSON to `$ELASTIC_BENCH_OUT` (default `target/bench-containerd.json`).
#[test]
#[ignore = "a benchmark: run with --ignored"]
fn bench_pod_start_and_resize() {
    let c = Containerd::start("bench");
    let rootfs = c.rootfs("rootfs", "service = \"kv\"\n");
    let rootfs = rootfs.to_str().expect("path");
    let (start, resize) = starts_and_resizes(&c, rootfs, &[], "kv");
    // The same through the node pool: the first start also starts the pool.
    let config = c.dir.join("shim.toml");
    let sock = c.dir.join("pool.sock");
    std::fs::write(&config, format!("[node_pool]\nsocket = \"{}\"\nvcpus = 2\nmemory = \"1G\"\n", sock.display()))
        .expect("shim.toml");
    let pool_opts = ["--runtime-config-path", config.to_str().expect("path")];
    let (pool_start, pool_resize) = starts_and_resizes(&c, rootfs, &pool_opts, "pool");
    let out = serde_json::json!({
        "pod_start_us": median(&mut start.clone()),
        "pod_start_samples_us": start,
        "pod_resize_us": median(&mut resize.clone()),
        "pod_resize_samples_us": resize,
        "pod_start_node_pool_us": median(&mut pool_start[1..].to_vec()),
        "pod_start_node_pool_first_us": pool_start[0],
        "pod_start_node_pool_samples_us": pool_start,
        "pod_resize_node_pool_us": median(&mut pool_resize.clone()),
        "pod_resize_node_pool_samples_us": pool_resize,
        "what": "pod_start_us: ctr run -d (kv, --cpus 2, a published port) -> first PONG, ctr included; \
                 pod_resize_us: Update (4 then 2 vCPUs) sent to the shim -> kv INFO shows the new policy; \
                 *_node_pool_*: the same with [node_pool] (the median leaves out the first start, which \
                 also starts the pool: pod_start_node_pool_first_us)",
    });
    let path = std::env::var_os("ELASTIC_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-containerd.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&out).expect("json")).expect("write the bench JSON");
    println!("{out}");
}

/// Ten `ctr run -d` of a kv task (with `opts`), each timed to its first PONG, then resized
/// twice by Update, each timed to the guest seeing it; the tasks are named `PREFIX0`... Returns
/// the start and resize times in µs.
fn starts_and_resizes(c: &Containerd, rootfs: &str, opts: &[&str], prefix: &str) -> (Vec<u64>, Vec<u64>) {
    let (mut start, mut resize) = (Vec::new(), Vec::new());
    for i in 0..10 {
        let port = free_port().to_string();
        let publish = format!("elastic.publish=127.0.0.1:{port}:{KV_GUEST_PORT}");
        let id = format!("{prefix}{i}");
        let mut all = vec!["-d", "--cpus", "2", "--annotation", &publish];
        all.extend_from_slice(opts);
        all.push("--rootfs");
        let t = Instant::now();
        c.run(&all, &[rootfs], &id, &[]).expect_code(0, "ctr run -d");
        let mut kv = loop {
            // The port is bound by the VMM as it starts; PONG comes once the guest serves.
            if let Ok(mut kv) = Kv::connect(&port)
                && kv.cmd(&[b"PING"]) == b"+PONG\r\n"
            {
                break kv;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "kv {id} never answered");
            std::thread::sleep(Duration::from_micros(200));
        };
        start.push(t.elapsed().as_micros() as u64);
        for (quota, want) in [(400000, "1:4:4"), (200000, "1:2:2")] {
            let sent = Instant::now();
            update(c, &id, serde_json::json!({"cpu": {"quota": quota, "period": 100000}})).expect("update");
            while kv.guest_policy().as_deref() != Some(want) {
                assert!(sent.elapsed() < Duration::from_secs(10), "the guest never saw {want}");
                std::thread::sleep(Duration::from_micros(200));
            }
            resize.push(sent.elapsed().as_micros() as u64);
        }
        c.ctr(&["task", "kill", "-s", "SIGKILL", &id]).expect_code(0, "kill");
        c.wait_status(&id, "STOPPED");
        c.remove(&id);
    }
    (start, resize)
}

/// `ctr run -d OPTS --annotation elastic.publish=127.0.0.1:PORT:6379 ROOTFS_OR_IMAGE ID` of a
/// kv task, then waits until it is RUNNING and answers PING on PORT (a free port). Returns the
/// port and the VMM's pid.
fn start_kv(c: &Containerd, opts: &[&str], rootfs_or_image: &[&str], id: &str) -> (String, u32) {
    let port = free_port().to_string();
    let publish = format!("elastic.publish=127.0.0.1:{port}:{KV_GUEST_PORT}");
    let mut all = vec!["-d", "--annotation", &publish];
    all.extend_from_slice(opts);
    c.run(&all, rootfs_or_image, id, &[]).expect_code(0, "ctr run -d kv");
    let pid = c.wait_status(id, "RUNNING");
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis_cli(&port, &["PING"]).stdout.trim() != "PONG" {
        assert!(Instant::now() < deadline, "kv {id} never answered PING on 127.0.0.1:{port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    (port, pid)
}

/// `redis-cli -h 127.0.0.1 -p PORT ARGS...`.
fn redis_cli(port: &str, args: &[&str]) -> Ran {
    let mut all = vec!["-h", "127.0.0.1", "-p", port];
    all.extend_from_slice(args);
    run_with_timeout(Command::new("redis-cli").args(&all), Duration::from_secs(10))
}

/// GET `path` on the node pool's control API at `sock`, as JSON.
fn pool_get(sock: &Path, path: &str) -> serde_json::Value {
    let body = control_client::request(sock, "GET", path, "", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET {path} on the node pool: {e}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// With `[node_pool]` in the shim's configuration (here through `ctr run
/// --runtime-config-path`), two kv tasks run as VMs of one pool (started by the first task's
/// shim): their memory is arbitrated between them under load (together they want more than
/// the pool has), never more than the pool, each keeping its min; their metrics are their own
/// VM's; an Update resizes one; a task ends alone; and a crash of the pool is the remaining
/// task's exit, with nothing left serving.
#[test]
fn two_tasks_share_the_node_pool() {
    let c = Containerd::start("node");
    let rootfs = c.rootfs("rootfs", "service = \"kv\"\nmemory = \"64M:256M:256M\"\n");
    let root = rootfs.to_str().expect("path");
    let sock = c.dir.join("pool.sock");
    let config = c.dir.join("shim.toml");
    // 3 vCPUs for two VMs of 1:2:2, and 384M for two of 64M:256M: together they may want
    // 4 vCPUs and 512M. The pool runs in a cgroup of its own, below this test's namespace.
    let pool_cgroup = format!("/{}/node-pool", c.namespace);
    let toml = format!(
        "[node_pool]\nsocket = \"{}\"\nvcpus = 3\nmemory = \"384M\"\ncgroup = \"{pool_cgroup}\"\n",
        sock.display()
    );
    std::fs::write(&config, toml).expect("shim.toml");
    let opts = ["--runtime-config-path", config.to_str().expect("path"), "--cpus", "2", "--rootfs"];
    let (port_a, pid_a) = start_kv(&c, &opts, &[root], "a");
    let (port_b, pid_b) = start_kv(&c, &opts, &[root], "b");
    assert_eq!(pid_a, pid_b, "the two tasks are not in one process");
    let exe = std::fs::read_link(format!("/proc/{pid_a}/exe")).expect("the pool runs");
    assert!(exe.ends_with("hypervisor-shim"), "task pid {pid_a} is {}", exe.display());
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid_a}/cmdline")).expect("cmdline")).replace('\0', " ");
    assert!(cmdline.contains("pool --serve"), "{cmdline}");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid_a}/cgroup")).expect("/proc/PID/cgroup");
    for line in cgroups.lines() {
        assert!(line.ends_with(&format!(":{pool_cgroup}")), "the pool is not in {pool_cgroup}:\n{cgroups}");
    }
    let (name_a, name_b) = (format!("{}:a", c.namespace), format!("{}:b", c.namespace));
    let listed = pool_get(&sock, "/api/v1/vms");
    for name in [&name_a, &name_b] {
        assert!(listed.as_array().expect("list").iter().any(|v| v["name"] == name.as_str()), "{name}: {listed}");
    }
    // A key in each, kept apart.
    assert_eq!(redis_cli(&port_a, &["SET", "k", "a"]).stdout.trim(), "OK");
    assert_eq!(redis_cli(&port_b, &["SET", "k", "b"]).stdout.trim(), "OK");

    // Both driven at once; the pool's figures looked at all along.
    let (cpu_a0, _) = metrics(&c, "a");
    let drive = |port: &str| {
        Command::new("redis-benchmark")
            .args(["-p", port, "-t", "set", "-n", "300", "-d", "1000000", "-r", "1000000", "-c", "2", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-benchmark")
    };
    let mut load = [drive(&port_a), drive(&port_b)];
    let mut most_held = [0u64; 2];
    while load.iter_mut().any(|l| l.try_wait().expect("wait").is_none()) {
        let pool = pool_get(&sock, "/api/v1/pool");
        assert!(pool["used_vcpus"].as_u64() <= Some(3), "the pool lent more vCPUs than it has: {pool}");
        assert!(pool["used_memory_bytes"].as_u64() <= Some(384 << 20), "the pool lent more memory than it has: {pool}");
        for (i, name) in [&name_a, &name_b].into_iter().enumerate() {
            let vm = pool_get(&sock, &format!("/api/v1/vms/{name}"));
            let (online, held) = (vm["vcpus"]["final"].as_u64(), vm["memory_bytes"]["final"].as_u64());
            assert!(online >= Some(1) && held >= Some(64 << 20), "{name} fell below its min: {vm}");
            most_held[i] = most_held[i].max(held.unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each wants more than the pool leaves it: kv answers the SETs past what it was granted
    // with an OOM error (the pool's refusal reaching the client), so redis-benchmark's own exit
    // status says nothing here; what each VM holds, and what the pool lent, does.
    for l in &mut load {
        l.wait().expect("wait");
    }
    let pool = pool_get(&sock, "/api/v1/pool");
    eprintln!("node pool after the load: {pool}; most memory held: a {}, b {}", most_held[0], most_held[1]);
    assert!(pool["peak_vcpus"].as_u64() <= Some(3), "{pool}");
    assert!(pool["peak_memory_bytes"].as_u64() <= Some(384 << 20), "{pool}");
    // Both grew, and together they reached past what one VM may hold: the pool arbitrated.
    assert!(most_held.iter().all(|&h| h > 64 << 20), "a VM never grew: {most_held:?}");
    assert!(pool["peak_memory_bytes"].as_u64() > Some(256 << 20), "the pool was never contended: {pool}");
    let (cpu_a1, mem_a1) = metrics(&c, "a");
    assert!(cpu_a1 > cpu_a0, "VM a's CPU time did not grow under load: {cpu_a0} -> {cpu_a1} us");
    let vm_a = pool_get(&sock, &format!("/api/v1/vms/{name_a}"));
    assert_eq!(Some(mem_a1), vm_a["memory_bytes"]["final"].as_u64(), "VM a's memory, not the pool's");
    assert_eq!(redis_cli(&port_a, &["GET", "k"]).stdout.trim(), "a");
    assert_eq!(redis_cli(&port_b, &["GET", "k"]).stdout.trim(), "b");

    // Update resizes this task's VM, and only it.
    update_through_containerd(&c, "a", serde_json::json!({"cpu": {"quota": 100000, "period": 100000}}))
        .expect("update a");
    let vm_a = pool_get(&sock, &format!("/api/v1/vms/{name_a}"));
    assert_eq!(vm_a["vcpu_policy"]["max"], 1, "{vm_a}");
    let vm_b = pool_get(&sock, &format!("/api/v1/vms/{name_b}"));
    assert_eq!(vm_b["vcpu_policy"]["max"], 2, "{vm_b}");

    // Pause, then SIGTERM one task: its VM stops (code 5), the other runs on.
    c.ctr(&["task", "pause", "a"]).expect_code(0, "pause");
    c.wait_status("a", "PAUSED");
    c.ctr(&["task", "resume", "a"]).expect_code(0, "resume");
    c.wait_status("a", "RUNNING");
    c.ctr(&["task", "kill", "a"]).expect_code(0, "kill a");
    c.wait_status("a", "STOPPED");
    assert!(c.remove("a").stderr.contains("exit code 5"), "task a's exit");
    assert_eq!(redis_cli(&port_b, &["PING"]).stdout.trim(), "PONG", "b stopped with a");
    assert_eq!(pool_get(&sock, "/api/v1/pool")["vms"], 1);

    // The pool dies: its task ends (137), and nothing serves any more.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_b as i32), Signal::SIGKILL).expect("kill the pool");
    c.wait_status("b", "STOPPED");
    assert!(c.remove("b").stderr.contains("exit code 137"), "task b's exit");
    // Dead (a zombie until whoever inherited it reaps it).
    let status = std::fs::read_to_string(format!("/proc/{pid_b}/status")).unwrap_or_default();
    assert!(status.is_empty() || status.contains("State:\tZ"), "the pool outlived SIGKILL:\n{status}");
    assert!(std::net::TcpStream::connect(format!("127.0.0.1:{port_b}")).is_err(), "port {port_b} still serves");
    // The pool's cgroup is kept for the next pool; this test's goes with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !containerd_shim_elastic::cgroup::remove_path(&pool_cgroup) {
        assert!(Instant::now() < deadline, "the dead pool's cgroup {pool_cgroup} cannot be removed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A node pool task of a pod publishes its port inside the pod's network namespace (the pool
/// binds it there), not on the host's.
#[test]
fn a_node_pool_task_publishes_in_its_pod_network_namespace() {
    let c = Containerd::start("nodens");
    let pod = PodNetns::new(&c);
    let rootfs = c.rootfs("rootfs", "service = \"kv\"\n");
    let sock = c.dir.join("pool.sock");
    let config = c.dir.join("shim.toml");
    std::fs::write(&config, format!("[node_pool]\nsocket = \"{}\"\nvcpus = 2\nmemory = \"256M\"\n", sock.display()))
        .expect("shim.toml");
    let port = free_port().to_string();
    let publish = format!("elastic.publish=127.0.0.1:{port}:{KV_GUEST_PORT}");
    let with_ns = format!("network:{}", pod.0.display());
    let opts = ["-d", "--runtime-config-path", config.to_str().expect("path"), "--with-ns", &with_ns];
    let mut all = opts.to_vec();
    all.extend(["--annotation", &publish, "--rootfs"]);
    c.run(&all, &[rootfs.to_str().expect("path")], "kv", &[]).expect_code(0, "ctr run kv");
    c.wait_status("kv", "RUNNING");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pod.run("redis-cli", &["-p", &port, "PING"]).stdout.trim() != "PONG" {
        assert!(Instant::now() < deadline, "kv never answered inside the pod's namespace on port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(),
        "port {port} is published on the host's namespace too"
    );
    // The pool's own control socket stays where it was started, on the host.
    assert_eq!(pool_get(&sock, "/api/v1/pool")["vms"], 1);
    c.ctr(&["task", "kill", "-s", "SIGKILL", "kv"]).expect_code(0, "kill");
    c.wait_status("kv", "STOPPED");
    assert!(c.remove("kv").stderr.contains("exit code 137"));
    assert_eq!(pool_get(&sock, "/api/v1/pool")["vms"], 0, "the killed VM left the pool");

    // A task whose shim dies: containerd's `shim delete` ends its VM in the pool.
    c.run(&all, &[rootfs.to_str().expect("path")], "orphan", &[]).expect_code(0, "ctr run orphan");
    c.wait_status("orphan", "RUNNING");
    assert_eq!(pool_get(&sock, "/api/v1/pool")["vms"], 1);
    let shim = shim_pid(&c, "orphan");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim as i32), Signal::SIGKILL).expect("kill the shim");
    let deadline = Instant::now() + Duration::from_secs(20);
    while pool_get(&sock, "/api/v1/pool")["vms"] != 0 || c.task("orphan").is_some() {
        assert!(Instant::now() < deadline, "the dead shim's VM is still in the pool\n{}", c.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    c.ctr(&["container", "delete", "orphan"]).expect_code(0, "container delete");
}

/// The pid of the shim serving task `id` of `c` (its command line names the namespace and id).
fn shim_pid(c: &Containerd, id: &str) -> u32 {
    let (ns, id) = (format!("-namespace\0{}\0", c.namespace), format!("-id\0{id}\0"));
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
                .into_owned();
            cmdline.contains("containerd-shim-elastic-v1") && cmdline.contains(&ns) && cmdline.contains(&id)
        })
        .unwrap_or_else(|| panic!("no shim process for task {id}"))
}
