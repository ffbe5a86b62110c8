//! VM configuration: resource policies (`MIN:MAX:BURST`), sizes (`64M`, `1G`) and the guest
//! command line, validated before anything touches KVM.

use std::time::Duration;

use hypercall_abi::CMDLINE_MAX;
use thiserror::Error;

pub(crate) use elastic_config::Publish;

/// Why a configuration value was rejected. Each message names the problem in one line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size.
    #[error(transparent)]
    Size(#[from] elastic_config::SizeError),
    /// A count or a policy.
    #[error(transparent)]
    Policy(#[from] elastic_config::PolicyError),
    /// A credit or a duration.
    #[error(transparent)]
    Time(#[from] elastic_config::TimeError),
    /// A service argument that the kernel command line cannot carry.
    #[error(
        "service argument '{0}' contains whitespace or a control character, which the kernel command line cannot carry"
    )]
    BadArgument(String),
    /// The service name is not a plain word.
    #[error("service name '{0}' must be a non-empty word of letters, digits, '-' or '_'")]
    BadAppName(String),
    /// The command line would be too long.
    #[error("the kernel command line would be {0} bytes; the limit is {CMDLINE_MAX}")]
    CommandLineTooLong(usize),
    /// A kernel option is not `KEY=VALUE`.
    #[error("'{0}' is not KEY=VALUE without spaces")]
    BadGuestOpt(String),
    /// `app` given as a kernel option.
    #[error("the service is chosen with --app (or `app` in a pool file), not as a kernel option")]
    GuestOptApp,
    /// An unknown kernel option.
    #[error("unknown kernel option '{key}' (known: {known})")]
    UnknownGuestOpt {
        /// The key given.
        key: String,
        /// The known keys.
        known: String,
    },
    /// A kernel option with an invalid value.
    #[error("kernel option {key}={value}: the value must be {expected}")]
    BadGuestOptValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What it must look like.
        expected: &'static str,
    },
    /// An unknown guest log level.
    #[error("'{0}' is not a log level (off, error, warn, info, debug, trace)")]
    BadLogLevel(String),
    /// An output file that cannot be written.
    #[error("{flag} {path}: {problem}")]
    Output {
        /// The flag that named it.
        flag: String,
        /// The path.
        path: String,
        /// What is wrong.
        problem: String,
    },
}

/// What to do when a VM lets a reclaim's grace expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnViolation {
    /// Throttle the excess vCPUs and refuse grants above max (the VM keeps running).
    Throttle,
    /// End the VM (exit code 75).
    Kill,
}

impl OnViolation {
    /// The name used on the command line, in pool files and in timelines.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            OnViolation::Throttle => "throttle",
            OnViolation::Kill => "kill",
        }
    }
}

/// Per-VM policy settings.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct PolicyConfig {
    /// Credit caps: vCPU-seconds, GiB-seconds.
    pub budget: [f64; 2],
    /// Refill rates per second: vCPU-seconds, GiB-seconds.
    pub refill: [f64; 2],
    /// How long a VM has to come down to max after a reclaim notice.
    pub grace: Duration,
    /// What happens when it does not.
    pub on_violation: OnViolation,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            budget: [10.0, 10.0],
            refill: [1.0, 1.0],
            grace: Duration::from_millis(200),
            on_violation: OnViolation::Throttle,
        }
    }
}

/// The idle time before an on-demand VM stops, when `--idle-shutdown` is not given.
pub const DEFAULT_IDLE_SHUTDOWN: Duration = Duration::from_secs(30);

/// Most restarts of a VM that restarts on failure, when no limit is given.
pub const DEFAULT_RESTART_LIMIT: u32 = 3;

/// Longest wait between restarts.
pub(crate) const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What runs in the guest: the service, its arguments and the kernel's options.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GuestConfig {
    /// Service to start.
    pub app: String,
    /// Arguments for the service.
    pub args: Vec<String>,
    /// Guest log level (`off`..`trace`).
    pub log_level: String,
    /// Extra `key=value` kernel options (controller thresholds and the like).
    pub options: Vec<(String, String)>,
}

/// The VM's share of the host: its min / max / burst policies, their credit and
/// enforcement settings, and its weight in the pool.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ResourceConfig {
    /// vCPU policy.
    pub vcpus: Policy,
    /// Memory policy.
    pub memory: Policy,
    /// Burst credit, reclaim grace and enforcement.
    pub policy: PolicyConfig,
    /// Weight in the pool (a heavier VM keeps its burst longer under contention).
    pub weight: u64,
    /// How the host backs the VM's RAM (`--memory-backing`; see [`ResourceConfig::set_memory_backing`]).
    #[serde(default)]
    memory_backing: MemoryBacking,
}

impl ResourceConfig {
    /// How the host backs the VM's RAM.
    pub fn memory_backing(&self) -> MemoryBacking {
        self.memory_backing
    }

    /// Backs the VM's RAM as `backing` says.
    pub fn set_memory_backing(&mut self, backing: MemoryBacking) {
        self.memory_backing = backing;
    }
}

/// How the host backs a VM's RAM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryBacking {
    /// Private anonymous memory, in transparent huge pages where the host gives them (the
    /// default: the guest maps its RAM 2 MiB at a time, and so can KVM then).
    #[default]
    Anonymous,
    /// One memfd per region, mapped shared: a migration to another shim on the same host hands
    /// the descriptors over instead of copying pages, so its downtime does not grow with the
    /// memory held. Shared memory gets huge pages only where the host enables them for shmem
    /// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`), 4 KiB pages otherwise.
    Memfd,
}

/// How clients on the host reach the guest's services.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct EndpointConfig {
    /// TCP ports published to the guest's request channel (`--publish`).
    pub publish: Vec<Publish>,
    /// The hybrid-vsock Unix socket (`--vsock-uds`).
    pub vsock_uds: Option<std::path::PathBuf>,
    /// Pin vCPU 0 and the device's I/O thread to two different host CPUs (`--pin-io`, for
    /// dedicated hosts). Off by default: on a shared host a pinned thread cannot move off a
    /// CPU that a neighbour keeps busy.
    #[serde(default)]
    pub pin_io: bool,
}

/// When the VM runs: its time limit, scale to zero, restarts.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Lifecycle {
    /// Stop the run after this long.
    pub timeout: Option<Duration>,
    /// Scale to zero (`--on-demand[=WAKE]`): no VM until a client connects to an endpoint;
    /// after `idle_shutdown` the VM goes to sleep and the next client resumes it
    /// ([`Wake::Resume`]), or it stops and the next client boots a new one ([`Wake::Boot`]).
    /// `None`: the VM runs from the start.
    #[serde(default, deserialize_with = "on_demand_of")]
    pub on_demand: Option<Wake>,
    /// Ask the guest to stop after this long with no client connection open
    /// (`--idle-shutdown`).
    pub idle_shutdown: Option<Duration>,
    /// Restart the VM when it fails (`restart = "on-failure"`, `--restart on-failure`).
    pub restart: Option<RestartPolicy>,
}

/// How an on-demand VM wakes for the next client after an idle stop (`--on-demand=MODE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wake {
    /// The idle VM is snapshotted (its state and the memory it holds, zero pages as holes) and
    /// ends; the next client resumes it from there, so what it kept in memory is still there.
    #[default]
    Resume,
    /// The idle VM is asked to stop; the next client boots a new one (state lost).
    Boot,
}

impl Wake {
    /// Its name on the command line and in the timeline.
    pub fn name(self) -> &'static str {
        match self {
            Wake::Resume => "resume",
            Wake::Boot => "boot",
        }
    }
}

/// Reads `on_demand`, also as the flag that states written before [`Wake`] existed hold (then
/// an on-demand VM always booted: `true` is [`Wake::Boot`]).
fn on_demand_of<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Wake>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Saved {
        Flag(bool),
        Mode(Option<Wake>),
    }
    Ok(match <Saved as serde::Deserialize>::deserialize(d)? {
        Saved::Flag(true) => Some(Wake::Boot),
        Saved::Flag(false) => None,
        Saved::Mode(m) => m,
    })
}

/// Restart on failure: a VM that faults or exits with a code other than 0 and 5 (stopped at
/// the host's request) is booted again, at most `limit` times, after `backoff` (doubling per
/// restart, at most [`RESTART_BACKOFF_MAX`]); with `from`, restored from the snapshot in that
/// directory instead (the last one written there: `ctl snapshot VM DIR`), when it can be.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestartPolicy {
    /// Most restarts.
    pub limit: u32,
    /// Wait before the first restart.
    pub backoff: Duration,
    /// The snapshot directory a restart restores from.
    #[serde(default)]
    pub from: Option<std::path::PathBuf>,
}

/// One VM: what runs in it, its resources, its endpoints and its lifecycle.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// The VM's name (timeline, summaries, the control API).
    name: String,
    /// What runs in the guest.
    pub guest: GuestConfig,
    /// Its resources.
    pub resources: ResourceConfig,
    /// How clients reach it.
    pub endpoints: EndpointConfig,
    /// When it runs.
    pub lifecycle: Lifecycle,
    /// The pool member to run as, when the pool already admitted this VM (an on-demand slot's
    /// reservation); `None`: admit it at creation.
    #[serde(skip)]
    pub(crate) pool_member: Option<usize>,
    /// This boot is to leave a template when its service first accepts a client (an on-demand
    /// slot with no template yet: see `snapshot::template`).
    #[serde(skip)]
    pub(crate) take_template: bool,
}

impl VmConfig {
    /// A VM named `name` running `app` with the defaults: `1:1:1` vCPUs, `64M:64M:64M` of
    /// memory, no endpoints, no time limit.
    pub fn new(name: impl Into<String>, app: impl Into<String>) -> VmConfig {
        VmConfig {
            name: name.into(),
            guest: GuestConfig { app: app.into(), args: Vec::new(), log_level: "info".into(), options: Vec::new() },
            resources: ResourceConfig {
                vcpus: Policy::fixed(1),
                memory: Policy::fixed(64 << 20),
                policy: PolicyConfig::default(),
                weight: 1,
                memory_backing: MemoryBacking::Anonymous,
            },
            endpoints: EndpointConfig::default(),
            lifecycle: Lifecycle::default(),
            pool_member: None,
            take_template: false,
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same VM under another name (a snapshot restored as a node pool's VM).
    pub(crate) fn renamed(mut self, name: &str) -> VmConfig {
        self.name = name.to_string();
        self
    }
}

pub(crate) use elastic_config::{Policy, format_size, parse_memory_policy, parse_vcpu_policy};

/// Parses a `--guest-opt` `KEY=VALUE`: the key must be a kernel option
/// ([`hypercall_abi::KERNEL_OPTIONS`]) and the value valid for it.
pub fn parse_guest_opt(text: &str) -> Result<(String, String), ConfigError> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(ConfigError::BadGuestOpt(text.to_string()));
    };
    if key.is_empty() || value.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::BadGuestOpt(text.to_string()));
    }
    if key == "app" {
        return Err(ConfigError::GuestOptApp);
    }
    let Some(option) = hypercall_abi::find_option(key) else {
        let known: Vec<&str> = hypercall_abi::KERNEL_OPTIONS.iter().map(|o| o.key).collect();
        return Err(ConfigError::UnknownGuestOpt { key: key.to_string(), known: known.join(", ") });
    };
    if !option.kind.accepts(value) {
        return Err(ConfigError::BadGuestOptValue {
            key: key.to_string(),
            value: value.to_string(),
            expected: option.kind.describe(),
        });
    }
    Ok((key.to_string(), value.to_string()))
}

/// Parses a guest log level.
pub fn parse_log_level(text: &str) -> Result<String, ConfigError> {
    if hypercall_abi::LOG_LEVELS.contains(&text) {
        Ok(text.to_string())
    } else {
        Err(ConfigError::BadLogLevel(text.to_string()))
    }
}

/// Checks, before any work starts, that `path` (given with `flag`) can be written: it is not a
/// directory, its directory exists, and a file can be created there. A file this check
/// creates is removed again.
pub fn check_output_path(flag: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    let bad =
        |problem: String| ConfigError::Output { flag: flag.to_string(), path: path.display().to_string(), problem };
    if path.is_dir() {
        return Err(bad("is a directory".into()));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !parent.is_dir() {
        return Err(bad(format!("directory {} does not exist", parent.display())));
    }
    let existed = path.exists();
    match std::fs::OpenOptions::new().append(true).create(true).open(path) {
        Ok(_) => {
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        }
        Err(e) => Err(bad(format!("cannot be written: {e}"))),
    }
}

/// Builds the kernel command line `app=NAME [key=value...] -- ARGS...`.
pub fn kernel_cmdline(app: &str, options: &[(&str, String)], args: &[String]) -> Result<String, ConfigError> {
    if app.is_empty() || !app.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ConfigError::BadAppName(app.to_string()));
    }
    let mut line = format!("app={app}");
    for (k, v) in options {
        line.push_str(&format!(" {k}={v}"));
    }
    line.push_str(" --");
    for a in args {
        if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::BadArgument(a.clone()));
        }
        line.push(' ');
        line.push_str(a);
    }
    if line.len() as u64 > CMDLINE_MAX {
        return Err(ConfigError::CommandLineTooLong(line.len()));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_demand_reads_its_mode_and_the_older_flag() {
        let read = |v: &str| {
            serde_json::from_str::<Lifecycle>(&format!(
                r#"{{"timeout":null,"on_demand":{v},"idle_shutdown":null,"restart":null}}"#
            ))
        };
        assert_eq!(read("null").unwrap().on_demand, None);
        assert_eq!(read("false").unwrap().on_demand, None);
        assert_eq!(read("true").unwrap().on_demand, Some(Wake::Boot));
        assert_eq!(read(r#""resume""#).unwrap().on_demand, Some(Wake::Resume));
        assert_eq!(read(r#""boot""#).unwrap().on_demand, Some(Wake::Boot));
        assert!(read(r#""later""#).is_err());
        let back = serde_json::to_string(&Lifecycle { on_demand: Some(Wake::Resume), ..Lifecycle::default() }).unwrap();
        assert!(back.contains(r#""on_demand":"resume""#), "{back}");
    }

    #[test]
    fn guest_options_and_log_levels() {
        assert_eq!(parse_guest_opt("vcpu.down_ms=10"), Ok(("vcpu.down_ms".into(), "10".into())));
        assert!(matches!(parse_guest_opt("vcpu.down_mss=10"), Err(ConfigError::UnknownGuestOpt { .. })));
        assert!(matches!(parse_guest_opt("vcpu.down_ms=soon"), Err(ConfigError::BadGuestOptValue { .. })));
        assert!(matches!(parse_guest_opt("vcpu.up_load=1.234"), Err(ConfigError::BadGuestOptValue { .. })));
        assert!(matches!(parse_guest_opt("novalue"), Err(ConfigError::BadGuestOpt(_))));
        assert!(matches!(parse_guest_opt("app=hello"), Err(ConfigError::GuestOptApp)));
        assert_eq!(parse_log_level("debug"), Ok("debug".into()));
        assert!(parse_log_level("loud").is_err());
    }

    #[test]
    fn output_paths_are_checked_without_leaving_files() {
        let dir = std::env::temp_dir().join(format!("shim-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = dir.join("s.json");
        assert_eq!(check_output_path("--summary", &ok), Ok(()));
        assert!(!ok.exists(), "the check leaves no file behind");
        assert!(check_output_path("--summary", &dir).is_err(), "a directory");
        assert!(check_output_path("--summary", &dir.join("no/such/dir/s.json")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn command_lines() {
        assert_eq!(kernel_cmdline("spin", &[], &["10".into()]).unwrap(), "app=spin -- 10");
        assert_eq!(kernel_cmdline("hello", &[("log", "debug".into())], &[]).unwrap(), "app=hello log=debug --");
        assert!(matches!(kernel_cmdline("a b", &[], &[]), Err(ConfigError::BadAppName(_))));
        assert!(matches!(kernel_cmdline("x", &[], &["a b".into()]), Err(ConfigError::BadArgument(_))));
        let long = vec!["x".repeat(100); 50];
        assert!(matches!(kernel_cmdline("x", &[], &long), Err(ConfigError::CommandLineTooLong(_))));
    }
}
