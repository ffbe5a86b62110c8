//! The pool configuration file (`hypervisor-shim pool CONFIG.toml`).
//!
//! ```toml
//! [pool]
//! vcpus = 6            # vCPU slots shared by the VMs
//! memory = "1G"        # bytes shared by the VMs
//! timeout = "120s"     # optional: end the run after this long
//!
//! [[vm]]
//! name = "web"
//! app = "cpu-burst"
//! args = ["6"]
//! vcpus = "1:2:4"           # MIN:MAX:BURST
//! memory = "64M:128M:256M"
//! weight = 2                # optional (default 1)
//! burst_budget = "1:0.5"    # optional: vCPU-seconds[:GiB-seconds] (default 10)
//! burst_refill = "0.5"      # optional: per second (default 1)
//! reclaim_grace = "200ms"   # optional (default 200ms)
//! on_violation = "throttle" # optional: throttle | kill
//! guest_opts = ["vcpu.down_ms=10"]
//! expect_exit = 0           # optional: the exit code the VM should end with
//! log = "info"              # optional guest log level
//! kernel = "path/to/kernel" # optional (default: the image built with the shim)
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::config::{
    ConfigError, Policy, parse_credit, parse_duration, parse_memory_policy, parse_size, parse_vcpu_policy,
};
use crate::governor::{OnViolation, PolicyConfig};
use crate::pool::Capacity;
use crate::run::VmSpec;
use crate::vm::VmConfig;

/// Why a pool configuration was refused. One line, naming the file and the field.
#[derive(Debug, Error)]
pub enum PoolConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or missing fields.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message (first line).
        message: String,
    },
    /// A value is invalid.
    #[error("{path}: {place}: {source}")]
    Value {
        /// The file.
        path: String,
        /// Where (e.g. `vm 'web': vcpus`).
        place: String,
        /// What is wrong.
        source: ConfigError,
    },
    /// Something else is inconsistent.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    pool: PoolSection,
    #[serde(default)]
    vm: Vec<VmSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSection {
    vcpus: u64,
    memory: String,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmSection {
    name: String,
    app: String,
    #[serde(default)]
    args: Vec<String>,
    vcpus: String,
    memory: String,
    weight: Option<u64>,
    burst_budget: Option<String>,
    burst_refill: Option<String>,
    reclaim_grace: Option<String>,
    on_violation: Option<OnViolation>,
    #[serde(default)]
    guest_opts: Vec<String>,
    expect_exit: Option<u8>,
    log: Option<String>,
    kernel: Option<PathBuf>,
}

/// A parsed pool configuration.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The pool's capacity.
    pub capacity: Capacity,
    /// The VMs, in admission order.
    pub vms: Vec<VmSpec>,
    /// Optional run timeout.
    pub timeout: Option<std::time::Duration>,
}

/// Reads and validates `path`; `default_kernel` is used for VMs that name none.
pub fn load(path: &Path, default_kernel: &Path) -> Result<PoolConfig, PoolConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| PoolConfigError::Read { path: path.display().to_string(), source })?;
    parse(&text, &path.display().to_string(), default_kernel)
}

/// Parses configuration `text` (from `origin`).
pub fn parse(text: &str, origin: &str, default_kernel: &Path) -> Result<PoolConfig, PoolConfigError> {
    let file: File = toml::from_str(text).map_err(|e| PoolConfigError::Syntax {
        path: origin.to_string(),
        message: e.message().lines().next().unwrap_or("invalid TOML").to_string(),
    })?;
    let value = |place: String, source: ConfigError| PoolConfigError::Value { path: origin.to_string(), place, source };
    let invalid = |message: String| PoolConfigError::Invalid { path: origin.to_string(), message };
    let memory = parse_size(&file.pool.memory).map_err(|e| value("pool: memory".into(), e))?;
    let timeout =
        file.pool.timeout.as_deref().map(parse_duration).transpose().map_err(|e| value("pool: timeout".into(), e))?;
    if file.pool.vcpus == 0 {
        return Err(invalid("pool: vcpus must be at least 1".into()));
    }
    if file.vm.is_empty() {
        return Err(invalid("no [[vm]] entries: a pool needs at least one VM".into()));
    }
    let mut vms = Vec::new();
    for v in &file.vm {
        let at = |field: &str| format!("vm '{}': {field}", v.name);
        if v.name.is_empty() || !v.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(invalid(format!("vm name '{}' must be a word of letters, digits, '-' or '_'", v.name)));
        }
        if vms.iter().any(|s: &VmSpec| s.config.name == v.name) {
            return Err(invalid(format!("two VMs are named '{}'", v.name)));
        }
        let vcpus: Policy = parse_vcpu_policy(&v.vcpus).map_err(|e| value(at("vcpus"), e))?;
        let mem: Policy = parse_memory_policy(&v.memory).map_err(|e| value(at("memory"), e))?;
        let mut policy = PolicyConfig::default();
        if let Some(b) = &v.burst_budget {
            policy.budget = parse_credit(b).map_err(|e| value(at("burst_budget"), e))?;
        }
        if let Some(r) = &v.burst_refill {
            policy.refill = parse_credit(r).map_err(|e| value(at("burst_refill"), e))?;
        }
        if let Some(g) = &v.reclaim_grace {
            policy.grace = parse_duration(g).map_err(|e| value(at("reclaim_grace"), e))?;
        }
        if let Some(o) = v.on_violation {
            policy.on_violation = o;
        }
        let mut guest_opts = Vec::new();
        for o in &v.guest_opts {
            match o.split_once('=') {
                Some((k, val)) if !k.is_empty() && !val.is_empty() && !o.contains(char::is_whitespace) => {
                    guest_opts.push((k.to_string(), val.to_string()))
                }
                _ => return Err(invalid(format!("vm '{}': guest_opts: '{o}' is not KEY=VALUE", v.name))),
            }
        }
        if let Some(code) = v.expect_exit
            && code > crate::exit::GUEST_MAX
            && code < crate::exit::USAGE
        {
            return Err(invalid(format!("vm '{}': expect_exit {code} is not an exit code", v.name)));
        }
        vms.push(VmSpec {
            config: VmConfig {
                name: v.name.clone(),
                app: v.app.clone(),
                app_args: v.args.clone(),
                log_level: v.log.clone().unwrap_or_else(|| "info".into()),
                guest_opts,
                vcpus,
                memory: mem,
                timeout,
                policy,
                weight: v.weight.unwrap_or(1).max(1),
            },
            kernel: v.kernel.clone().unwrap_or_else(|| default_kernel.to_path_buf()),
            expect_exit: v.expect_exit.unwrap_or(0),
        });
    }
    Ok(PoolConfig { capacity: Capacity { vcpus: file.pool.vcpus, memory }, vms, timeout })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[pool]
vcpus = 6
memory = "1G"
timeout = "30s"

[[vm]]
name = "web"
app = "cpu-burst"
args = ["2"]
vcpus = "1:2:4"
memory = "64M:128M:256M"
weight = 2
burst_budget = "1:0.5"
reclaim_grace = "150ms"
on_violation = "kill"
guest_opts = ["vcpu.down_ms=10"]

[[vm]]
name = "batch"
app = "mem-wave"
vcpus = "1"
memory = "64M"
expect_exit = 3
"#;

    #[test]
    fn a_good_file_parses() {
        let c = parse(GOOD, "pool.toml", Path::new("/k")).unwrap();
        assert_eq!(c.capacity, Capacity { vcpus: 6, memory: 1 << 30 });
        assert_eq!(c.timeout, Some(std::time::Duration::from_secs(30)));
        let web = &c.vms[0];
        assert_eq!(web.config.weight, 2);
        assert_eq!(web.config.policy.budget, [1.0, 0.5]);
        assert_eq!(web.config.policy.grace, std::time::Duration::from_millis(150));
        assert_eq!(web.config.policy.on_violation, OnViolation::Kill);
        assert_eq!(web.config.guest_opts, [("vcpu.down_ms".to_string(), "10".to_string())]);
        assert_eq!(c.vms[1].expect_exit, 3);
        assert_eq!(c.vms[1].kernel, Path::new("/k"));
    }

    #[test]
    fn errors_name_the_problem_in_one_line() {
        let cases = [
            (GOOD.replace("vcpus = \"1:2:4\"", "vcpus = \"4:2:1\""), "vm 'web': vcpus"),
            (GOOD.replace("memory = \"1G\"", "memory = \"lots\""), "pool: memory"),
            (GOOD.replace("weight = 2", "weight = 2\ncolour = \"red\""), "unknown field `colour`"),
            (GOOD.replace("name = \"batch\"", "name = \"web\""), "two VMs are named 'web'"),
            (GOOD.replace("burst_budget = \"1:0.5\"", "burst_budget = \"many\""), "vm 'web': burst_budget"),
            ("[pool]\nvcpus = 2\nmemory = \"1G\"\n".to_string(), "no [[vm]] entries"),
        ];
        for (text, needle) in cases {
            let e = parse(&text, "pool.toml", Path::new("/k")).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
