//! The node pool: with `[node_pool]` in the shim's configuration, every task of the node runs
//! in one long-running `hypervisor-shim pool --serve` (its min admitted against the node's
//! pool, its burst arbitrated with the other pods' VMs) instead of a VMM of its own.
//!
//! ```toml
//! # /etc/elastic/containerd-shim.toml, or the runtime's ConfigPath option
//! [node_pool]
//! socket = "/run/elastic/pool.sock"  # the pool's control API (required)
//! start = true                       # start the pool when none answers (default true)
//! vcpus = 8                          # a started pool's capacity (default: the host's CPUs)
//! memory = "16G"                     # (default: half the host's memory)
//! cgroup = "/elastic/node-pool"      # the cgroup a started pool runs in (default: the shim's)
//! ```
//!
//! The configuration file is the one containerd's runtime options name (`ConfigPath` of
//! `runtimeoptions.v1.Options`: `ctr run --runtime-config-path`, or `options.ConfigPath` of
//! the CRI runtime), else [`DEFAULT_CONFIG`] when it exists. A file without `[node_pool]`
//! keeps one VMM per task.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use containerd_shim::protos::protobuf::CodedInputStream;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use control_client::ClientError;
use serde::Deserialize;
use thiserror::Error;

use crate::spec::VmPlan;
use crate::vmm::{HELPER_TIMEOUT, Vmm};

/// The shim's configuration file when the runtime options name none.
pub const DEFAULT_CONFIG: &str = "/etc/elastic/containerd-shim.toml";
/// The type of containerd's runtime options for runtimes other than runc.
const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
/// How long a started pool may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a task's exit may be waited for (a pool VM may run for a year).
const WAIT_FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// A problem with the node pool.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The configuration file cannot be read.
    #[error("cannot read the shim configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file does not parse.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The runtime options cannot be decoded.
    #[error("containerd's runtime options ({type_url}) cannot be decoded: {message}")]
    Options {
        /// Their type.
        type_url: String,
        /// Why.
        message: String,
    },
    /// No pool answers and none may be started.
    #[error("the node pool at {socket} does not answer ({reason}) and `start = false`")]
    Absent {
        /// Its socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// The cgroup a started pool is to run in cannot be prepared.
    #[error("node_pool.cgroup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// The pool could not be started.
    #[error("cannot start the node pool at {socket}: {reason}")]
    Start {
        /// Its socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// The pool refused or failed a request.
    #[error("node pool {socket}, {what}: {reason}")]
    Request {
        /// Its socket.
        socket: PathBuf,
        /// The request.
        what: String,
        /// Why (the pool's answer).
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShimFile {
    node_pool: Option<RawNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    socket: PathBuf,
    start: Option<bool>,
    vcpus: Option<u64>,
    memory: Option<String>,
    cgroup: Option<String>,
}

/// The node pool a task joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePool {
    /// The pool's control API socket.
    pub socket: PathBuf,
    /// Start the pool when none answers.
    pub start: bool,
    /// A started pool's vCPUs (`None`: the host's CPUs).
    pub vcpus: Option<u64>,
    /// A started pool's memory in bytes (`None`: half the host's memory).
    pub memory: Option<u64>,
    /// The cgroup a started pool runs in (a path as `linux.cgroupsPath` takes; `None`: the
    /// shim's own).
    pub cgroup: Option<String>,
}

/// The shim configuration file for a task: the runtime options' `ConfigPath`, else
/// [`DEFAULT_CONFIG`] if it exists.
pub fn config_path(options: Option<&Any>) -> Result<Option<PathBuf>, NodeError> {
    if let Some(any) = options.filter(|a| a.type_url.ends_with(RUNTIME_OPTIONS)) {
        let path = runtime_config_path(&any.value)
            .map_err(|message| NodeError::Options { type_url: any.type_url.clone(), message })?;
        if let Some(p) = path.filter(|p| !p.is_empty()) {
            return Ok(Some(PathBuf::from(p)));
        }
    }
    Ok(Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()))
}

/// `config_path` (field 2) of an encoded `runtimeoptions.v1.Options`.
fn runtime_config_path(bytes: &[u8]) -> Result<Option<String>, String> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut path = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| e.to_string())? {
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (2, 2) => path = Some(input.read_string().map_err(|e| e.to_string())?),
            (_, 2) => {
                input.read_bytes().map_err(|e| e.to_string())?;
            }
            (_, 0) => {
                input.read_uint64().map_err(|e| e.to_string())?;
            }
            _ => return Err(format!("unexpected wire type {wire} for field {field}")),
        }
    }
    Ok(path)
}

/// Reads the node pool section of the shim configuration at `path` (`None`: no section).
pub fn load(path: &Path) -> Result<Option<NodePool>, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|source| NodeError::Read { path: path.into(), source })?;
    parse(&text, path)
}

/// Parses a shim configuration's text (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<Option<NodePool>, NodeError> {
    let syntax = |message: String| NodeError::Syntax { path: path.into(), message };
    let file: ShimFile = toml::from_str(text).map_err(|e| syntax(e.message().to_string()))?;
    let Some(raw) = file.node_pool else { return Ok(None) };
    if !raw.socket.is_absolute() {
        return Err(syntax(format!("node_pool.socket = {:?} must be an absolute path", raw.socket)));
    }
    if raw.vcpus == Some(0) {
        return Err(syntax("node_pool.vcpus must be at least 1".into()));
    }
    let memory = raw
        .memory
        .as_deref()
        .map(elastic_config::parse_size)
        .transpose()
        .map_err(|e| syntax(format!("node_pool.memory: {e}")))?;
    if let Some(c) = raw.cgroup.as_deref().filter(|c| !c.starts_with('/')) {
        return Err(syntax(format!("node_pool.cgroup = {c:?} must be an absolute cgroup path")));
    }
    Ok(Some(NodePool {
        socket: raw.socket,
        start: raw.start.unwrap_or(true),
        vcpus: raw.vcpus,
        memory,
        cgroup: raw.cgroup,
    }))
}

impl NodePool {
    fn call(&self, method: &str, path: &str, body: &str, timeout: Duration) -> Result<String, ClientError> {
        control_client::request(&self.socket, method, path, body, timeout)
    }

    fn request(&self, method: &str, path: &str, body: &str, timeout: Duration) -> Result<String, NodeError> {
        self.call(method, path, body, timeout).map_err(|e| NodeError::Request {
            socket: self.socket.clone(),
            what: format!("{method} {path}"),
            reason: e.to_string(),
        })
    }

    /// Makes sure the pool answers: starts it (`vmm`'s `pool --serve`) when none does and
    /// `start` allows. Two shims starting at once start one pool (a lock beside the socket).
    pub fn ensure(&self, vmm: &Vmm) -> Result<(), NodeError> {
        let reason = match self.call("GET", "/api/v1/pool", "", HELPER_TIMEOUT) {
            Ok(_) => return Ok(()),
            // Nobody listens (no socket, or a dead pool's): start one.
            Err(e @ ClientError::Connect { nobody: true, .. }) => e.to_string(),
            // A pool that is there but slow or refusing is not replaced by a second one.
            Err(e) => {
                return Err(NodeError::Request {
                    socket: self.socket.clone(),
                    what: "GET /api/v1/pool".into(),
                    reason: e.to_string(),
                });
            }
        };
        if !self.start {
            return Err(NodeError::Absent { socket: self.socket.clone(), reason });
        }
        let failed = |reason: String| NodeError::Start { socket: self.socket.clone(), reason };
        if let Some(dir) = self.socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        }
        let lock_path = with_suffix(&self.socket, ".lock");
        let lock = File::create(&lock_path).map_err(|e| failed(format!("{}: {e}", lock_path.display())))?;
        // Held until this function returns; waited for at most as long as a start may take.
        let deadline = Instant::now() + START_TIMEOUT;
        let mut lock = lock;
        let _lock = loop {
            match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(held) => break held,
                Err((back, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    lock = back;
                    // Another shim is starting the pool: wait for it without spinning.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((_, e)) => return Err(failed(format!("cannot lock {}: {e}", lock_path.display()))),
            }
        };
        // Another shim may have started it while this one waited for the lock; only a socket
        // nobody serves is replaced.
        match self.call("GET", "/api/v1/pool", "", HELPER_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(ClientError::Connect { nobody: true, .. }) => {}
            Err(e) => {
                return Err(NodeError::Request {
                    socket: self.socket.clone(),
                    what: "GET /api/v1/pool".into(),
                    reason: e.to_string(),
                });
            }
        }
        // A socket nobody answers on is what a killed pool left.
        let _ = std::fs::remove_file(&self.socket);
        let log_path = with_suffix(&self.socket, ".log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| failed(format!("{}: {e}", log_path.display())))?;
        let log2 = log.try_clone().map_err(|e| failed(e.to_string()))?;
        let mut cmd = Command::new(&vmm.path);
        cmd.args(self.pool_args()).current_dir("/").stdin(Stdio::null()).stdout(log).stderr(log2);
        if let Some(path) = &self.cgroup {
            // Created if missing, as a task's cgroup is; kept when the pool ends (other pools
            // start there).
            let join = crate::cgroup::Join::prepare(path)?;
            // SAFETY: the closure runs in the forked child before exec and only calls write(2)
            // on descriptors opened before the fork (async-signal-safe; no allocation, no
            // locks); they are close-on-exec.
            unsafe {
                cmd.pre_exec(move || join.enter());
            }
        }
        // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
        // which is async-signal-safe: the pool leaves this shim's session and process group, so
        // it outlives the shim and no signal meant for the shim reaches it.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
        }
        cmd.spawn().map_err(|e| failed(format!("{}: {e}", vmm.path.display())))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.request("GET", "/api/v1/pool", "", HELPER_TIMEOUT) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(failed(format!("it did not answer within {} s ({e}); see {}", 10, log_path.display())));
                }
                // Waiting for another process to bind its socket: sleep, do not spin.
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// The command line of a pool this shim starts (everything after the binary).
    pub fn pool_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> =
            vec!["pool".into(), "--serve".into(), "--api-sock".into(), self.socket.clone().into()];
        if let Some(v) = self.vcpus {
            args.extend(["--vcpus".into(), v.to_string().into()]);
        }
        if let Some(m) = self.memory {
            args.extend(["--memory".into(), elastic_config::format_size(m).into()]);
        }
        args.push("--quiet".into());
        args
    }

    /// Admits VM `name` running `plan` (restored from the snapshot in `restore` if given), its
    /// console on `console` (a FIFO or file path; empty: none). Returns the pool's pid.
    pub fn admit(&self, name: &str, plan: &VmPlan, console: &str, restore: Option<&Path>) -> Result<u32, NodeError> {
        let mut body = admission(name, plan, console);
        if let Some(dir) = restore {
            body["restore"] = serde_json::json!(dir);
        }
        let body = body.to_string();
        let answer = self.request("POST", "/api/v1/vms", &body, HELPER_TIMEOUT)?;
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
        Ok(v["pid"].as_u64().unwrap_or(0) as u32)
    }

    /// Blocks until VM `name` ends; its exit code. `Err` when the pool went away first (the
    /// pool's VMs are threads of its process: none outlives it).
    pub fn wait(&self, name: &str) -> Result<u8, NodeError> {
        let path = format!("/api/v1/vms/{name}/wait");
        let answer = self.request("GET", &path, "", WAIT_FOREVER)?;
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
        v["exit_code"].as_u64().map(|c| c as u8).ok_or_else(|| NodeError::Request {
            socket: self.socket.clone(),
            what: format!("GET {path}"),
            reason: format!("no exit code in {answer:?}"),
        })
    }

    /// Ends VM `name` at once (if it runs) and forgets its exit. `true` once the pool knows
    /// the name no more (or the pool is gone, and its VMs with it).
    pub fn remove(&self, name: &str) -> bool {
        let (kill, path) = (format!("/api/v1/vms/{name}/kill"), format!("/api/v1/vms/{name}"));
        let deadline = Instant::now() + HELPER_TIMEOUT;
        loop {
            // Killed again at every turn: a VM still being admitted (its name claimed, not yet
            // running) is killed once it runs.
            let _ = self.call("PUT", &kill, "", HELPER_TIMEOUT);
            match self.call("DELETE", &path, "", HELPER_TIMEOUT) {
                // The pool is gone (and its VMs with it), or knows the name no more.
                Ok(_)
                | Err(ClientError::Refused { status: 404, .. })
                | Err(ClientError::Connect { nobody: true, .. }) => {
                    return true;
                }
                // Its exit is recorded by its thread a moment after the kill.
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return false,
            }
        }
    }
}

/// The body of `POST /api/v1/vms` for `plan`.
fn admission(name: &str, plan: &VmPlan, console: &str) -> serde_json::Value {
    let mut v = serde_json::json!({
        "name": name,
        "app": plan.service,
        "kernel": plan.kernel,
        "args": plan.args,
        "vcpus": plan.vcpus.to_string(),
        "memory": elastic_config::format_memory_policy(&plan.memory),
        "publish": plan.publish.iter().map(|p| p.canonical()).collect::<Vec<_>>(),
        "log": plan.log,
        "console": if console.is_empty() { "/dev/null" } else { console.trim_start_matches("file://") },
    });
    if let Some(ns) = &plan.netns {
        v["netns"] = serde_json::json!(ns);
    }
    v
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::CodedOutputStream;
    use elastic_config::{Policy, parse_publish};

    /// `runtimeoptions.v1.Options { type_url, config_path }` as containerd encodes it.
    fn runtime_options(config_path: &str) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(1, "io.containerd.elastic.v1.Config").expect("field 1");
            out.write_string(2, config_path).expect("field 2");
            out.flush().expect("flush");
        }
        Any { type_url: "runtimeoptions.v1.Options".into(), value, ..Default::default() }
    }

    #[test]
    fn the_config_path_comes_from_the_runtime_options() {
        let any = runtime_options("/etc/x/shim.toml");
        assert_eq!(config_path(Some(&any)).expect("decoded"), Some(PathBuf::from("/etc/x/shim.toml")));
        let broken =
            Any { type_url: "runtimeoptions.v1.Options".into(), value: vec![0x12, 0x40], ..Default::default() };
        assert!(config_path(Some(&broken)).is_err(), "a truncated message is an error");
        // Other options (runc's) name no file of ours.
        let runc = Any { type_url: "containerd.runc.v1.Options".into(), value: vec![], ..Default::default() };
        let fallback = Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists());
        assert_eq!(config_path(Some(&runc)).expect("ignored"), fallback);
    }

    #[test]
    fn the_node_pool_section_is_checked() {
        let p = Path::new("shim.toml");
        assert_eq!(parse("", p).expect("empty"), None, "no section: a VMM per task");
        let n = parse("[node_pool]\nsocket = \"/run/p.sock\"\nvcpus = 4\nmemory = \"2G\"\n", p).expect("valid");
        assert_eq!(
            n,
            Some(NodePool {
                socket: "/run/p.sock".into(),
                start: true,
                vcpus: Some(4),
                memory: Some(2 << 30),
                cgroup: None
            })
        );
        assert_eq!(
            n.expect("pool").pool_args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" "),
            "pool --serve --api-sock /run/p.sock --vcpus 4 --memory 2G --quiet"
        );
        for (text, what) in [
            ("[node_pool]\nsocket = \"p.sock\"\n", "absolute"),
            ("[node_pool]\nsocket = \"/p\"\nvcpus = 0\n", "at least 1"),
            ("[node_pool]\nsocket = \"/p\"\nmemory = \"lots\"\n", "node_pool.memory"),
            ("[node_pool]\nsocket = \"/p\"\nstrat = true\n", "unknown field"),
            ("[node_pool]\nsocket = \"/p\"\ncgroup = \"pool\"\n", "absolute cgroup path"),
            ("[node_pool]\n", "socket"),
        ] {
            let e = parse(text, p).expect_err(text).to_string();
            assert!(e.contains(what), "{text}: {e}");
        }
    }

    #[test]
    fn an_admission_carries_the_plan() {
        let plan = VmPlan {
            kernel: "/r/kernel".into(),
            service: "kv".into(),
            args: vec!["--a".into()],
            vcpus: Policy { min: 1, max: 2, burst: 4 },
            memory: Policy { min: 64 << 20, max: 256 << 20, burst: 1 << 30 },
            publish: vec![parse_publish("6379:6379").expect("publish")],
            log: "info".into(),
            netns: Some("/var/run/netns/pod".into()),
            bursts: (Some(4), None),
            cgroups_path: None,
        };
        let v = admission("ns.kv", &plan, "file:///var/log/kv.log");
        assert_eq!(v["name"], "ns.kv");
        assert_eq!(v["vcpus"], "1:2:4");
        assert_eq!(v["memory"], "64M:256M:1G");
        assert_eq!(v["publish"][0], "127.0.0.1:6379:6379");
        assert_eq!(v["console"], "/var/log/kv.log");
        assert_eq!(v["netns"], "/var/run/netns/pod");
        assert_eq!(admission("x", &plan, "")["console"], "/dev/null");
    }
}
