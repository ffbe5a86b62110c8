//! Our VMM, `hypervisor-shim`, as a child process: finding it, building its `run` (or
//! `restore`) command line, starting it, and requests on its control API.
//!
//! The containerd-shim library reaps every child (it is a subreaper and waits for any pid on
//! SIGCHLD), so no child here is waited for with `std::process::Child::wait`: exits arrive
//! through the library's monitor, subscribed to before the child is spawned.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use containerd_shim::monitor::{ExitEvent, Subject, Subscription, Topic, monitor_subscribe};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use thiserror::Error;

use elastic_config::Policy;

use crate::cgroup::Join;
use crate::spec::VmPlan;

/// The VMM binary's name.
pub const BINARY: &str = "hypervisor-shim";
/// The name `hypervisor-shim run` gives its VM on the control API.
pub const VM_NAME: &str = "vm0";
/// How long a control API request may take.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot (a checkpoint) may take: it writes all the memory the VM holds.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest Unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// A problem starting or controlling the VMM.
#[derive(Debug, Error)]
pub enum VmmError {
    /// No `hypervisor-shim` beside this binary or on PATH.
    #[error("{BINARY} not found beside {beside} or on PATH (install it next to containerd-shim-elastic-v1)")]
    NotFound {
        /// The directory searched first.
        beside: PathBuf,
    },
    /// Spawning a process failed.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The library's exit monitor could not be subscribed to.
    #[error("cannot watch child exits: {0}")]
    Monitor(String),
    /// A control API request failed.
    #[error("control API, {what}: {source}")]
    Api {
        /// The request.
        what: String,
        /// Why.
        source: control_client::ClientError,
    },
    /// The VMM's answer lacks what was asked for.
    #[error("`{command}` answered without {what}")]
    Answer {
        /// The command.
        command: String,
        /// What was missing.
        what: &'static str,
    },
    /// The network namespace to join cannot be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Netns {
        /// The namespace path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A located `hypervisor-shim`. It is the one built with this shim (install the two side by
/// side): nothing is probed at every Create; a VMM too old for a flag the shim passes says so
/// at Start, in the task's stderr, and exits 64.
#[derive(Debug, Clone)]
pub struct Vmm {
    /// The binary.
    pub path: PathBuf,
}

/// A child's exit: its code, or 128 + the signal that ended it (as the library reports).
pub type ExitCode = i32;

impl Vmm {
    /// Finds `hypervisor-shim` beside this executable, then on PATH.
    pub fn locate() -> Result<Self, VmmError> {
        let exe = std::env::current_exe().unwrap_or_default();
        let beside = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        let path = std::iter::once(beside.clone())
            .chain(std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default())
            .map(|dir| dir.join(BINARY))
            .find(|p| is_executable(p))
            .ok_or(VmmError::NotFound { beside })?;
        Ok(Vmm { path })
    }

    /// The `run` command line for `plan` (everything after the binary).
    pub fn run_args(&self, plan: &VmPlan, api_sock: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["run".into(), "--kernel".into(), plan.kernel.clone().into()];
        for (flag, value) in [
            ("--app", plan.service.clone()),
            ("--vcpus", plan.vcpus.to_string()),
            ("--memory", elastic_config::format_memory_policy(&plan.memory)),
            ("--log", plan.log.clone()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        endpoint_args(plan, api_sock, &mut args);
        if !plan.args.is_empty() {
            args.push("--".into());
            args.extend(plan.args.iter().map(OsString::from));
        }
        args
    }

    /// The `restore` command line for a task created from the checkpoint in `dir` (everything
    /// after the binary): the snapshot carries the service, its arguments, policies and all its
    /// memory (the guest's code included); the rootfs's kernel (for fault diagnoses), the
    /// published ports and the control socket come from this task.
    pub fn restore_args(&self, plan: &VmPlan, dir: &Path, api_sock: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["restore".into(), dir.into(), "--kernel".into(), plan.kernel.clone().into()];
        endpoint_args(plan, api_sock, &mut args);
        args
    }

    /// Starts `hypervisor-shim` with `args` in `cwd`, its stdout and stderr on the given files,
    /// inside the network namespace `netns` and the cgroup `cgroup` if given (it enters both
    /// before it execs). Returns the pid and the subscription its exit will arrive on (see
    /// [`wait_exit`]).
    pub fn spawn(
        &self,
        args: &[OsString],
        cwd: &Path,
        (stdout, stderr): (File, File),
        netns: Option<&Path>,
        cgroup: Option<&Join>,
    ) -> Result<(u32, Subscription), VmmError> {
        let mut cmd = Command::new(&self.path);
        cmd.args(args).current_dir(cwd).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        if let Some(join) = cgroup {
            let join = join.try_clone().map_err(|source| VmmError::Spawn { path: self.path.clone(), source })?;
            // SAFETY: the closure runs in the forked child before exec and only calls write(2)
            // on descriptors opened before the fork (async-signal-safe; no allocation, no
            // locks). They are close-on-exec, so the VMM does not inherit them.
            unsafe {
                cmd.pre_exec(move || join.enter());
            }
        }
        if let Some(path) = netns {
            let ns: OwnedFd =
                File::open(path).map_err(|source| VmmError::Netns { path: path.to_path_buf(), source })?.into();
            // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
            // which is async-signal-safe; it allocates nothing and takes no locks. The
            // descriptor is close-on-exec, so the VMM does not inherit it.
            unsafe {
                cmd.pre_exec(move || nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from));
            }
        }
        let subscription = monitor_subscribe(Topic::Pid).map_err(|e| VmmError::Monitor(e.to_string()))?;
        let child = cmd.spawn().map_err(|source| VmmError::Spawn { path: self.path.clone(), source })?;
        Ok((child.id(), subscription))
    }
}

/// `--publish` for each of the plan's ports and `--api-sock` (`run` and `restore` take them
/// alike).
fn endpoint_args(plan: &VmPlan, api_sock: &Path, args: &mut Vec<OsString>) {
    for p in &plan.publish {
        args.push("--publish".into());
        args.push(p.canonical().into());
    }
    args.push("--api-sock".into());
    args.push(api_sock.into());
}

/// One request on the VM's control API (see [`control_client::request`]): `sock` as passed to
/// `--api-sock`, relative to `bundle` when it is not absolute (a path too long for a socket
/// address is reached through the bundle's directory descriptor). Waits at most `timeout`.
pub fn api(
    bundle: &Path,
    sock: &Path,
    (method, path, body): (&str, &str, &str),
    timeout: Duration,
) -> Result<String, VmmError> {
    let what = format!("{method} {path}");
    let failed = |source| VmmError::Api { what: what.clone(), source };
    if sock.is_absolute() {
        return control_client::request(sock, method, path, body, timeout).map_err(failed);
    }
    let dir = File::open(bundle).map_err(|e| VmmError::Api {
        what: what.clone(),
        source: control_client::ClientError::Connect {
            path: bundle.display().to_string(),
            reason: e.to_string(),
            nobody: e.kind() == std::io::ErrorKind::NotFound,
        },
    })?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(sock);
    control_client::request(&short, method, path, body, timeout).map_err(failed)
}

/// VM `name`'s vCPU and memory policies in force now (`GET /api/v1/vms/NAME`): what a
/// restored VM brought from its snapshot, with any change made since.
pub fn policies(bundle: &Path, sock: &Path, name: &str) -> Result<(Policy, Policy), VmmError> {
    let path = format!("/api/v1/vms/{name}");
    let json = api(bundle, sock, ("GET", &path, ""), HELPER_TIMEOUT)?;
    let missing = |what| VmmError::Answer { command: format!("GET {path}"), what };
    let v: serde_json::Value = serde_json::from_str(&json).map_err(|_| missing("JSON"))?;
    let policy = |key: &str, what| {
        let p = &v[key];
        match (p["min"].as_u64(), p["max"].as_u64(), p["burst"].as_u64()) {
            (Some(min), Some(max), Some(burst)) => Ok(Policy { min, max, burst }),
            _ => Err(missing(what)),
        }
    };
    Ok((policy("vcpu_policy", "vcpu_policy")?, policy("memory_policy", "memory_policy")?))
}

/// The `--api-sock` argument for a VM whose bundle (and working directory) is `bundle`: the
/// absolute path if it fits a Unix socket address, else the name relative to the bundle
/// (Kubernetes bundle paths with 64-character ids do not fit).
pub fn api_sock_arg(bundle: &Path) -> PathBuf {
    let abs = bundle.join(API_SOCK);
    if abs.as_os_str().len() <= SUN_PATH_MAX { abs } else { PathBuf::from(API_SOCK) }
}

/// The control socket's name inside the bundle.
pub const API_SOCK: &str = "api.sock";

/// Blocks until the child `pid` exits; returns its code.
pub fn wait_exit(pid: u32, subscription: &Subscription) -> ExitCode {
    loop {
        match subscription.rx.recv() {
            Ok(ExitEvent { subject: Subject::Pid(p), exit_code }) if p as u32 == pid => return exit_code,
            Ok(_) => {}
            // The monitor never drops a live subscription's sender; if it did, nothing more
            // can arrive: report the child as killed.
            Err(_) => return 128 + Signal::SIGKILL as i32,
        }
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: Signal) -> Result<(), nix::Error> {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), signal)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use elastic_config::parse_publish;

    fn plan() -> VmPlan {
        VmPlan {
            kernel: "/r/kernel".into(),
            service: "kv".into(),
            args: vec!["a".into(), "--b".into()],
            vcpus: Policy { min: 1, max: 2, burst: 4 },
            memory: Policy { min: 64 << 20, max: 256 << 20, burst: 1 << 30 },
            publish: vec![parse_publish("6379:6379").expect("publish"), parse_publish("[::1]:80:8080").expect("v6")],
            log: "info".into(),
            netns: None,
            bursts: (Some(4), None),
            cgroups_path: None,
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn run_command_line() {
        let vmm = Vmm { path: "/x/hypervisor-shim".into() };
        let args = vmm.run_args(&plan(), Path::new("/b/api.sock"));
        assert_eq!(
            strings(&args).join(" "),
            "run --kernel /r/kernel --app kv --vcpus 1:2:4 --memory 64M:256M:1G --log info \
             --publish 127.0.0.1:6379:6379 --publish [::1]:80:8080 --api-sock /b/api.sock -- a --b"
        );
        let mut p = plan();
        p.publish.clear();
        p.args.clear();
        assert_eq!(
            strings(&vmm.run_args(&p, Path::new("api.sock"))).join(" "),
            "run --kernel /r/kernel --app kv --vcpus 1:2:4 --memory 64M:256M:1G --log info --api-sock api.sock"
        );
        assert_eq!(
            strings(&vmm.restore_args(&plan(), Path::new("/b/checkpoint"), Path::new("/b/api.sock"))).join(" "),
            "restore /b/checkpoint --kernel /r/kernel --publish 127.0.0.1:6379:6379 --publish [::1]:80:8080 \
             --api-sock /b/api.sock"
        );
    }

    #[test]
    fn long_bundles_use_a_relative_socket() {
        assert_eq!(api_sock_arg(Path::new("/run/b")), PathBuf::from("/run/b/api.sock"));
        let long = format!("/run/containerd/io.containerd.runtime.v2.task/k8s.io/{}", "f".repeat(64));
        assert_eq!(api_sock_arg(Path::new(&long)), PathBuf::from("api.sock"));
    }
}
