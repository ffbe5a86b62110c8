//! From an OCI bundle (`config.json` plus the rootfs's `elastic.toml`) to what the VM runs:
//! the service and its arguments, the min / max / burst policies, published ports and the
//! network namespace to join.
//!
//! What the spec asks for and a VM cannot honour is refused when it would change what the
//! workload sees (a terminal, host bind mounts, devices, hooks, sysctls); what only describes a
//! Linux process the VM boundary replaces (user, env, capabilities, seccomp, the other
//! namespaces, cgroup paths) is ignored. `docs/kubernetes.md` has the full table.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use elastic_config::{
    Policy, PolicyError, Publish, parse_count, parse_size, validate_memory_policy, validate_vcpu_policy,
};
use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxNamespaceType, LinuxResources, Mount, Spec};
use thiserror::Error;

use crate::config::{ConfigError, RootfsConfig};
use crate::policy::{limit_to_extents, parse_publish_list};

/// Annotation: the vCPU burst ceiling (a count).
pub const ANNOTATION_BURST_VCPUS: &str = "elastic.burst.vcpus";
/// Annotation: the memory burst ceiling (a size such as `1G`).
pub const ANNOTATION_BURST_MEMORY: &str = "elastic.burst.memory";
/// Annotation: published ports, comma-separated `[ADDR:]HOST_PORT:GUEST_PORT`.
pub const ANNOTATION_PUBLISH: &str = "elastic.publish";
/// CRI's annotation naming a pod sandbox (`sandbox`) or an application container.
pub const ANNOTATION_CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// CFS period the kernel (and runc) use when a quota comes without one.
const DEFAULT_CFS_PERIOD_US: u64 = 100_000;

/// Bind mounts CRI adds to every container; the guest has no filesystem, so they carry nothing
/// it could read, and refusing them would refuse every pod.
const CRI_INFRA_MOUNTS: [&str; 5] =
    ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/termination-log", "/dev/shm"];
/// Service-account credentials CRI mounts under this directory.
const CRI_SECRETS_DIR: &str = "/var/run/secrets/kubernetes.io";
/// Mount types that carry no host data (kernel pseudo-filesystems and scratch memory).
const PSEUDO_FS: [&str; 8] = ["proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "shm"];

/// Why a bundle cannot run as an elastic VM.
#[derive(Debug, Error)]
pub enum SpecError {
    /// `config.json` has no `root`.
    #[error("the OCI spec has no root (rootfs) path")]
    NoRoot,
    /// The rootfs has no kernel image.
    #[error("no kernel image at {0} (the rootfs must hold the kernel ELF; see elastic.toml `kernel`)")]
    NoKernel(PathBuf),
    /// `elastic.toml` is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Neither the process args nor `elastic.toml` name a service.
    #[error("no service to run: give one as the process args (args[0] is the service) or in elastic.toml")]
    NoService,
    /// The service name cannot be a kernel service name.
    #[error("service name {0:?} is empty or has spaces or control characters")]
    BadService(String),
    /// `process.terminal` is set.
    #[error("a terminal (ctr run -t, tty: true) is not supported: the guest console is output-only")]
    Terminal,
    /// A bind mount of host data.
    #[error(
        "mount of {source_path} at {destination} ({typ}) is not supported: the VM has no filesystem, so volumes cannot reach it"
    )]
    Mount {
        /// Mount source.
        source_path: String,
        /// Mount destination.
        destination: String,
        /// Mount type.
        typ: String,
    },
    /// `linux.devices` is not empty.
    #[error("host devices ({0}) cannot be passed to the VM")]
    Devices(String),
    /// OCI hooks are present.
    #[error("OCI hooks ({0}) are not supported: there is no container process for them to act on")]
    Hooks(&'static str),
    /// `linux.sysctl` is not empty.
    #[error("sysctls ({0}) cannot be applied to the VM")]
    Sysctl(String),
    /// An `elastic.*` annotation this runtime does not know.
    #[error("unknown annotation {0:?} (known: elastic.burst.vcpus, elastic.burst.memory, elastic.publish)")]
    UnknownAnnotation(String),
    /// An annotation value that does not parse.
    #[error("annotation {key}={value:?}: {problem}")]
    Annotation {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
        /// Why.
        problem: String,
    },
    /// The resulting policy fails the checks `hypervisor-shim` applies (the message names the
    /// resource and the policy).
    #[error("policy from elastic.toml, linux.resources and annotations: {0}")]
    Policy(#[source] PolicyError),
    /// An update asks for what a running VM cannot take.
    #[error("cannot resize: {0}")]
    Resize(String),
}

/// What a task runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// A unikernel VM.
    Vm(Box<VmPlan>),
    /// A Kubernetes pod sandbox: CRI created the pod's network namespace already, and nothing
    /// needs to run for it (the role runc gives to the `pause` process).
    Sandbox,
}

/// One `hypervisor-shim run`.
#[derive(Debug, Clone, PartialEq)]
pub struct VmPlan {
    /// Kernel ELF (absolute path inside the rootfs).
    pub kernel: PathBuf,
    /// Service to start.
    pub service: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// vCPU policy (validated).
    pub vcpus: Policy,
    /// Memory policy (validated).
    pub memory: Policy,
    /// Published ports.
    pub publish: Vec<Publish>,
    /// Guest log level.
    pub log: String,
    /// Network namespace to run the VMM in (pod sandboxes, `ctr run --with-ns network:PATH`).
    pub netns: Option<PathBuf>,
    /// The burst annotations (vCPUs, memory) as given at create: an Update keeps applying them.
    pub bursts: (Option<u64>, Option<u64>),
    /// `linux.cgroupsPath`: the cgroup the VMM joins (see [`crate::cgroup`]); `None` when
    /// absent or empty.
    pub cgroups_path: Option<String>,
}

/// The rootfs directory a spec names (relative paths are relative to the bundle).
pub fn rootfs_dir(spec: &Spec, bundle: &Path) -> Result<PathBuf, SpecError> {
    let root = spec.root().as_ref().ok_or(SpecError::NoRoot)?;
    Ok(bundle.join(root.path()))
}

/// Whether CRI marked this container as a pod sandbox.
pub fn is_sandbox(spec: &Spec) -> bool {
    annotations(spec).get(ANNOTATION_CRI_CONTAINER_TYPE).is_some_and(|t| t == "sandbox")
}

fn annotations(spec: &Spec) -> &HashMap<String, String> {
    static EMPTY: std::sync::OnceLock<HashMap<String, String>> = std::sync::OnceLock::new();
    spec.annotations().as_ref().unwrap_or_else(|| EMPTY.get_or_init(HashMap::new))
}

/// Plans the workload for `spec`, whose rootfs is (already mounted) at `rootfs`.
pub fn plan(spec: &Spec, rootfs: &Path) -> Result<Workload, SpecError> {
    if is_sandbox(spec) {
        return Ok(Workload::Sandbox);
    }
    check_supported(spec)?;
    let config = RootfsConfig::load(rootfs)?;
    let kernel = rootfs.join(&config.kernel);
    if !kernel.is_file() {
        return Err(SpecError::NoKernel(kernel));
    }
    let oci_args = spec.process().as_ref().and_then(|p| p.args().clone()).unwrap_or_default();
    let (service, args) = match oci_args.split_first() {
        Some((service, rest)) => (service.clone(), rest.to_vec()),
        None => (config.service.clone().ok_or(SpecError::NoService)?, config.args.clone()),
    };
    if service.is_empty() || service.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SpecError::BadService(service));
    }
    let ann = Annotations::parse(annotations(spec))?;
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let vcpus = vcpu_policy(config.vcpus, resources.and_then(|r| r.cpu().as_ref()), ann.burst_vcpus)
        .map_err(SpecError::Policy)?;
    let memory = memory_policy(config.memory, resources.and_then(|r| r.memory().as_ref()), ann.burst_memory)
        .map_err(SpecError::Policy)?;
    Ok(Workload::Vm(Box::new(VmPlan {
        kernel,
        service,
        args,
        vcpus,
        memory,
        publish: ann.publish.unwrap_or(config.publish),
        log: config.log,
        netns: network_namespace(spec),
        bursts: (ann.burst_vcpus, ann.burst_memory),
        cgroups_path: cgroups_path(spec),
    })))
}

/// `linux.cgroupsPath`, when present and not empty.
pub fn cgroups_path(spec: &Spec) -> Option<String> {
    let path = spec.linux().as_ref()?.cgroups_path().as_ref()?.display().to_string();
    (!path.is_empty()).then_some(path)
}

/// Refuses what the VM cannot honour without changing what the workload sees.
fn check_supported(spec: &Spec) -> Result<(), SpecError> {
    if spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false) {
        return Err(SpecError::Terminal);
    }
    for m in spec.mounts().iter().flatten() {
        check_mount(m)?;
    }
    if let Some(hooks) = spec.hooks() {
        let present = [
            ("prestart", hooks.prestart().as_ref().is_some_and(|h| !h.is_empty())),
            ("createRuntime", hooks.create_runtime().as_ref().is_some_and(|h| !h.is_empty())),
            ("createContainer", hooks.create_container().as_ref().is_some_and(|h| !h.is_empty())),
            ("startContainer", hooks.start_container().as_ref().is_some_and(|h| !h.is_empty())),
            ("poststart", hooks.poststart().as_ref().is_some_and(|h| !h.is_empty())),
            ("poststop", hooks.poststop().as_ref().is_some_and(|h| !h.is_empty())),
        ];
        if let Some((name, _)) = present.iter().find(|(_, p)| *p) {
            return Err(SpecError::Hooks(name));
        }
    }
    if let Some(linux) = spec.linux() {
        if let Some(devices) = linux.devices().as_ref().filter(|d| !d.is_empty()) {
            let names: Vec<String> = devices.iter().map(|d| d.path().display().to_string()).collect();
            return Err(SpecError::Devices(names.join(", ")));
        }
        if let Some(sysctl) = linux.sysctl().as_ref().filter(|s| !s.is_empty()) {
            let mut keys: Vec<&str> = sysctl.keys().map(String::as_str).collect();
            keys.sort_unstable();
            return Err(SpecError::Sysctl(keys.join(", ")));
        }
    }
    Ok(())
}

fn check_mount(m: &Mount) -> Result<(), SpecError> {
    let typ = m.typ().clone().unwrap_or_default();
    let destination = m.destination().display().to_string();
    let is_bind = typ == "bind" || typ.is_empty() || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind");
    if !is_bind && PSEUDO_FS.contains(&typ.as_str()) {
        return Ok(());
    }
    if is_bind && (CRI_INFRA_MOUNTS.contains(&destination.as_str()) || m.destination().starts_with(CRI_SECRETS_DIR)) {
        return Ok(());
    }
    Err(SpecError::Mount {
        source_path: m.source().as_ref().map(|s| s.display().to_string()).unwrap_or_default(),
        destination,
        typ: if typ.is_empty() { "bind".to_string() } else { typ },
    })
}

/// The network namespace to join: only one given by path (CRI's pod namespace, or
/// `ctr run --with-ns`). A namespace without a path (ctr's default "new namespace") is not
/// created: the VM has no network interface of its own, and its published ports are bound in
/// the shim's namespace.
fn network_namespace(spec: &Spec) -> Option<PathBuf> {
    let namespaces = spec.linux().as_ref()?.namespaces().as_ref()?;
    namespaces.iter().find(|n| n.typ() == LinuxNamespaceType::Network).and_then(|n| n.path().clone())
}

/// The `elastic.*` annotations, parsed.
#[derive(Debug, Default)]
struct Annotations {
    burst_vcpus: Option<u64>,
    burst_memory: Option<u64>,
    publish: Option<Vec<Publish>>,
}

impl Annotations {
    fn parse(all: &HashMap<String, String>) -> Result<Self, SpecError> {
        let mut out = Annotations::default();
        for (key, value) in all.iter().filter(|(k, _)| k.starts_with("elastic.")) {
            let bad = |key: &'static str, problem: String| SpecError::Annotation { key, value: value.clone(), problem };
            match key.as_str() {
                ANNOTATION_BURST_VCPUS => {
                    out.burst_vcpus = Some(parse_count(value).map_err(|e| bad(ANNOTATION_BURST_VCPUS, e.to_string()))?);
                }
                ANNOTATION_BURST_MEMORY => {
                    // As written: a size that is not whole extents is refused by the policy check.
                    out.burst_memory =
                        Some(parse_size(value).map_err(|e| bad(ANNOTATION_BURST_MEMORY, e.to_string()))?);
                }
                ANNOTATION_PUBLISH => {
                    out.publish = Some(parse_publish_list(value).map_err(|e| bad(ANNOTATION_PUBLISH, e.to_string()))?);
                }
                _ => return Err(SpecError::UnknownAnnotation(key.clone())),
            }
        }
        Ok(out)
    }
}

/// vCPUs: `ceil(quota / period)` is max (and burst, unless the annotation raises it);
/// `shares / 1024` (at least 1) is min. Without a quota, max is raised to min if needed. The
/// result must pass the shim's own checks ([`validate_vcpu_policy`]).
pub fn vcpu_policy(defaults: Policy, cpu: Option<&LinuxCpu>, burst: Option<u64>) -> Result<Policy, PolicyError> {
    let mut p = defaults;
    let quota = cpu.and_then(|c| c.quota()).filter(|q| *q > 0);
    let limit = quota.map(|q| {
        let period = cpu.and_then(|c| c.period()).filter(|p| *p > 0).unwrap_or(DEFAULT_CFS_PERIOD_US);
        (q as u64).div_ceil(period)
    });
    if let Some(max) = limit {
        p.max = max;
        p.burst = max;
        p.min = p.min.min(max);
    }
    if let Some(shares) = cpu.and_then(|c| c.shares()).filter(|s| *s > 0) {
        p.min = (shares / 1024).max(1);
        if limit.is_none() {
            p.max = p.max.max(p.min);
            p.burst = p.burst.max(p.max);
        }
    }
    if let Some(b) = burst {
        p.burst = b;
    }
    validate_vcpu_policy(p)
}

/// The policies a task Update asks for (containerd's `UpdateTaskRequest`, Kubernetes' in-place
/// resize): from the VM's policies now, the new `resources` and the burst annotations (the
/// create-time ones, replaced by any the update carries). A CPU quota becomes max, a memory
/// limit becomes memory max, each also burst unless an annotation asks for more; min (shares,
/// boot memory) never changes on a running VM, so a new max below it is refused. A resource the
/// update leaves out (no quota, no limit) keeps its policy. The result passes the shim's own
/// checks; the VMM checks the rest (a memory burst past the VM's hot-plug window).
pub fn resized(
    now: (Policy, Policy),
    resources: &LinuxResources,
    bursts: (Option<u64>, Option<u64>),
) -> Result<(Policy, Policy), SpecError> {
    let (mut vcpus, mut memory) = now;
    if let Some(cpu) = resources.cpu().as_ref()
        && let Some(quota) = cpu.quota().filter(|q| *q > 0)
    {
        let period = cpu.period().filter(|p| *p > 0).unwrap_or(DEFAULT_CFS_PERIOD_US);
        let max = (quota as u64).div_ceil(period);
        if max < vcpus.min {
            return Err(SpecError::Resize(format!(
                "a CPU limit of {max} vCPU(s) is below the VM's min {} (min cannot change on a running VM)",
                vcpus.min
            )));
        }
        vcpus.max = max;
        vcpus.burst = max.max(bursts.0.unwrap_or(0));
    } else if let Some(b) = bursts.0 {
        vcpus.burst = b.max(vcpus.max);
    }
    if let Some(limit) = resources.memory().as_ref().and_then(|m| m.limit()).filter(|l| *l > 0) {
        let max = limit_to_extents(limit as u64);
        if max < memory.min {
            return Err(SpecError::Resize(format!(
                "a memory limit of {} MiB is below the VM's boot memory {} MiB (min cannot change on a running VM)",
                max >> 20,
                memory.min >> 20
            )));
        }
        memory.max = max;
        memory.burst = max.max(bursts.1.unwrap_or(0));
    } else if let Some(b) = bursts.1 {
        memory.burst = b.max(memory.max);
    }
    Ok((
        validate_vcpu_policy(vcpus).map_err(SpecError::Policy)?,
        validate_memory_policy(memory).map_err(SpecError::Policy)?,
    ))
}

/// The burst annotations of an update (`elastic.burst.vcpus`, `elastic.burst.memory`), each
/// replacing the create-time one it names; other `elastic.*` keys are refused as at create.
pub fn update_bursts(
    annotations: &HashMap<String, String>,
    now: (Option<u64>, Option<u64>),
) -> Result<(Option<u64>, Option<u64>), SpecError> {
    let ann = Annotations::parse(annotations)?;
    Ok((ann.burst_vcpus.or(now.0), ann.burst_memory.or(now.1)))
}

/// Memory: the limit (rounded down to 2 MiB: the one conversion, since Kubernetes computes
/// it in bytes) is max (and burst, unless the annotation raises it); min (boot memory) comes
/// from `elastic.toml`, lowered to the limit if above it. The result must pass the shim's own
/// checks ([`validate_memory_policy`]).
pub fn memory_policy(
    defaults: Policy,
    memory: Option<&LinuxMemory>,
    burst: Option<u64>,
) -> Result<Policy, PolicyError> {
    let mut p = defaults;
    if let Some(limit) = memory.and_then(|m| m.limit()).filter(|l| *l > 0) {
        let limit = limit_to_extents(limit as u64);
        p.max = limit;
        p.burst = limit;
        p.min = p.min.min(limit);
    }
    if let Some(b) = burst {
        p.burst = b;
    }
    validate_memory_policy(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder};

    const MIB: u64 = 1 << 20;

    fn resources(json: serde_json::Value) -> LinuxResources {
        serde_json::from_value(json).expect("LinuxResources")
    }

    #[test]
    fn an_update_moves_max_and_burst_and_keeps_min() {
        let p = |min, max, burst| Policy { min, max, burst };
        let now = (p(1, 2, 2), p(64 * MIB, 128 * MIB, 128 * MIB));
        // Kubernetes' resize: limits 4 CPUs, 256Mi; shares (requests) are not min on a live VM.
        let r = resources(serde_json::json!({"cpu": {"shares": 4096, "quota": 400000, "period": 100000},
                                             "memory": {"limit": 268435456}}));
        assert_eq!(resized(now, &r, (None, None)).expect("up"), (p(1, 4, 4), p(64 * MIB, 256 * MIB, 256 * MIB)));
        // The burst annotations stay above max; a quota without period uses 100 ms.
        let r = resources(serde_json::json!({"cpu": {"quota": 150000}}));
        assert_eq!(
            resized(now, &r, (Some(8), Some(512 * MIB))).expect("burst"),
            (p(1, 2, 8), p(64 * MIB, 128 * MIB, 512 * MIB))
        );
        // Nothing asked: nothing changes (but a new burst annotation applies).
        assert_eq!(resized(now, &LinuxResources::default(), (None, None)).expect("same"), now);
        // Below min: refused, naming it.
        let r = resources(serde_json::json!({"memory": {"limit": 33554432}}));
        let e = resized(now, &r, (None, None)).expect_err("below boot memory");
        assert!(e.to_string().contains("below the VM's boot memory 64 MiB"), "{e}");
        let now2 = (p(2, 2, 2), now.1);
        let r = resources(serde_json::json!({"cpu": {"quota": 100000, "period": 100000}}));
        assert!(resized(now2, &r, (None, None)).expect_err("below min").to_string().contains("min 2"));
        // Past the VMM's limits: its own message.
        let r = resources(serde_json::json!({"cpu": {"quota": 6500000, "period": 100000}}));
        assert!(resized(now, &r, (None, None)).is_err(), "65 vCPUs accepted");
        // Update annotations replace the create-time burst; unknown elastic.* keys are refused.
        let ann = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(update_bursts(&ann(ANNOTATION_BURST_VCPUS, "6"), (Some(4), None)).expect("ann"), (Some(6), None));
        assert!(update_bursts(&ann("elastic.bust.vcpus", "6"), (None, None)).is_err());
    }

    fn cpu(shares: Option<u64>, quota: Option<i64>, period: Option<u64>) -> LinuxCpu {
        let mut b = LinuxCpuBuilder::default();
        if let Some(s) = shares {
            b = b.shares(s);
        }
        if let Some(q) = quota {
            b = b.quota(q);
        }
        if let Some(p) = period {
            b = b.period(p);
        }
        b.build().expect("cpu")
    }

    #[test]
    fn cpu_quota_is_max_and_shares_are_min() {
        let d = elastic_config::DEFAULT_VCPU_POLICY;
        // Kubernetes: requests 2, limits 3.5 -> shares 2048, quota 350000/100000.
        let p = vcpu_policy(d, Some(&cpu(Some(2048), Some(350_000), Some(100_000))), None).expect("valid");
        assert_eq!(p, Policy { min: 2, max: 4, burst: 4 });
        // BestEffort pods get 2 shares: min is still one vCPU.
        let p = vcpu_policy(d, Some(&cpu(Some(2), None, None)), None).expect("valid");
        assert_eq!(p, Policy { min: 1, max: 1, burst: 1 });
        // Shares without a quota raise max to min.
        let p = vcpu_policy(d, Some(&cpu(Some(3072), Some(-1), None)), None).expect("valid");
        assert_eq!(p, Policy { min: 3, max: 3, burst: 3 });
        // A quota without a period uses the kernel's default period.
        let p = vcpu_policy(d, Some(&cpu(None, Some(150_000), None)), Some(8)).expect("valid");
        assert_eq!(p, Policy { min: 1, max: 2, burst: 8 });
        // elastic.toml's burst survives when nothing limits max.
        let toml = Policy { min: 1, max: 2, burst: 4 };
        assert_eq!(vcpu_policy(toml, None, None).expect("valid"), toml);
        // A request above the limit is refused.
        assert!(vcpu_policy(d, Some(&cpu(Some(4096), Some(100_000), None)), None).is_err());
        // A burst below max is refused.
        assert!(vcpu_policy(d, Some(&cpu(None, Some(400_000), None)), Some(2)).is_err());
        // 65 vCPUs pass no check the shim would refuse.
        let e = vcpu_policy(d, Some(&cpu(None, Some(6_500_000), None)), None).expect_err("65 vCPUs");
        assert_eq!(e.to_string(), "vCPU policy 1:65:65: min must be at least 1 and burst at most 64");
        assert!(vcpu_policy(d, None, Some(65)).is_err(), "a burst of 65");
        assert_eq!(
            vcpu_policy(d, Some(&cpu(None, Some(6_400_000), None)), None).expect("64"),
            Policy { min: 1, max: 64, burst: 64 }
        );
    }

    #[test]
    fn memory_limit_is_max() {
        let toml = Policy { min: 64 * MIB, max: 128 * MIB, burst: 512 * MIB };
        let limit = |l: i64| LinuxMemoryBuilder::default().limit(l).build().expect("memory");
        let p = memory_policy(toml, Some(&limit(256 * MIB as i64)), None).expect("valid");
        assert_eq!(p, Policy { min: 64 * MIB, max: 256 * MIB, burst: 256 * MIB });
        let p = memory_policy(toml, Some(&limit(32 * MIB as i64 + 12345)), Some(GIB)).expect("valid");
        assert_eq!(p, Policy { min: 32 * MIB, max: 32 * MIB, burst: GIB });
        assert_eq!(memory_policy(toml, None, None).expect("valid"), toml);
        assert!(memory_policy(toml, Some(&limit(4 * MIB as i64)), None).is_err());
        // A burst a user wrote is not rounded: whole extents, or refused as the shim would.
        let e = memory_policy(toml, None, Some(GIB + 4096)).expect_err("misaligned burst");
        assert_eq!(e.to_string(), "memory policy 64M:128M:1048580K: 1048580K is not a multiple of 2M");
        assert!(memory_policy(toml, None, Some(254 * GIB)).is_err(), "beyond guest-physical space");
    }

    const GIB: u64 = 1 << 30;

    /// A spec like the one `ctr run --rootfs` writes, with `extra` merged into the top level.
    fn spec(extra: serde_json::Value) -> Spec {
        let mut base = serde_json::json!({
            "ociVersion": "1.0.2-dev",
            "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "env": ["PATH=/bin"], "terminal": false},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]}
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]}
        });
        let (serde_json::Value::Object(b), serde_json::Value::Object(e)) = (&mut base, extra) else {
            panic!("objects")
        };
        b.extend(e);
        serde_json::from_value(base).expect("a valid spec")
    }

    /// A rootfs with a kernel file and `elastic.toml`.
    fn rootfs(name: &str, toml: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ctd-elastic-spec-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("kernel"), b"\x7fELF").expect("kernel");
        std::fs::write(dir.join("elastic.toml"), toml).expect("toml");
        dir
    }

    fn vm(w: Workload) -> VmPlan {
        match w {
            Workload::Vm(p) => *p,
            Workload::Sandbox => panic!("a sandbox"),
        }
    }

    #[test]
    fn process_args_override_the_service() {
        let dir = rootfs("args", "service = \"hello\"\nargs = [\"x\"]\n");
        let p = vm(plan(&spec(serde_json::json!({})), &dir).expect("plan"));
        assert_eq!((p.service.as_str(), p.args.clone()), ("hello", vec!["x".to_string()]));
        assert_eq!(p.kernel, dir.join("kernel"));
        assert_eq!(p.netns, None, "a namespace without a path is not joined");
        let s =
            spec(serde_json::json!({"process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "args": ["spin", "1000"]}}));
        let p = vm(plan(&s, &dir).expect("plan"));
        assert_eq!((p.service.as_str(), p.args.clone()), ("spin", vec!["1000".to_string()]));
        let s = spec(serde_json::json!({"process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "args": ["two words"]}}));
        assert!(matches!(plan(&s, &dir), Err(SpecError::BadService(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused() {
        let dir = rootfs("refuse", "service = \"hello\"\n");
        let refused = |extra: serde_json::Value, needle: &str| {
            let e = plan(&spec(extra.clone()), &dir).expect_err(&format!("{extra} accepted"));
            assert!(e.to_string().contains(needle), "{extra}: {e}");
        };
        refused(
            serde_json::json!({"process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "terminal": true}}),
            "terminal",
        );
        refused(
            serde_json::json!({"mounts": [{"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind"]}]}),
            "mount of /srv at /data",
        );
        refused(serde_json::json!({"hooks": {"prestart": [{"path": "/bin/true"}]}}), "OCI hooks (prestart)");
        refused(
            serde_json::json!({"linux": {"devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]}}),
            "/dev/fuse",
        );
        refused(serde_json::json!({"linux": {"sysctl": {"net.core.somaxconn": "1024"}}}), "net.core.somaxconn");
        refused(serde_json::json!({"annotations": {"elastic.publish": "6379"}}), "elastic.publish");
        refused(serde_json::json!({"annotations": {"elastic.vcpus": "1:2:4"}}), "unknown annotation");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cri_mounts_and_namespaces_are_accepted() {
        let dir = rootfs("cri", "service = \"hello\"\npublish = [\"1:2\"]\n");
        let bind = |dst: &str| serde_json::json!({"destination": dst, "type": "bind", "source": "/var/lib/x", "options": ["rbind", "ro"]});
        let s = spec(serde_json::json!({
            "mounts": [
                bind("/etc/hosts"), bind("/etc/resolv.conf"), bind("/etc/hostname"), bind("/dev/termination-log"),
                bind("/dev/shm"), bind("/var/run/secrets/kubernetes.io/serviceaccount"),
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}
            ],
            "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}]},
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "elastic.publish": "127.0.0.1:16379:6379,8080:80"
            }
        }));
        let p = vm(plan(&s, &dir).expect("plan"));
        assert_eq!(p.netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        let published: Vec<String> = p.publish.iter().map(Publish::canonical).collect();
        assert_eq!(published, ["127.0.0.1:16379:6379", "127.0.0.1:8080:80"], "the annotation replaces elastic.toml");
        let sandbox = spec(serde_json::json!({"annotations": {"io.kubernetes.cri.container-type": "sandbox"}}));
        assert_eq!(plan(&sandbox, Path::new("/nonexistent")).expect("sandbox"), Workload::Sandbox);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_rootfs_without_kernel_is_refused() {
        let dir = rootfs("nokernel", "service = \"hello\"\nkernel = \"boot/vmlinux\"\n");
        let e = plan(&spec(serde_json::json!({})), &dir).expect_err("no kernel");
        assert!(e.to_string().contains("boot/vmlinux"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
