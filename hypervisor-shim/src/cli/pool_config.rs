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
//! publish = ["127.0.0.1:8080:80"]  # optional: like --publish (repeatable)
//! vsock_uds = "/tmp/web.sock"      # optional: like --vsock-uds
//! on_demand = true                 # optional: like --on-demand (needs publish or vsock_uds)
//! wake = "resume"                  # optional: resume (default) | boot, like --on-demand=boot
//! idle_shutdown = "5s"             # optional: like --idle-shutdown
//! restart = "on-failure"           # optional: never (default) | on-failure
//! restart_limit = 3                # optional: most restarts (default 3)
//! restart_backoff = "100ms"        # optional: first wait, doubling (default 100ms, at most 5 s)
//! restart_from = "snapshots/web"   # optional: like --restart-from (needs restart = "on-failure")
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use elastic_config::{Policy, parse_credit, parse_duration, parse_memory_policy, parse_size, parse_vcpu_policy};
use elastic_vmm::{
    Capacity, ConfigError, DEFAULT_IDLE_SHUTDOWN, DEFAULT_RESTART_LIMIT, OnViolation, PolicyConfig, VmConfig, VmSpec,
    parse_guest_opt, parse_log_level,
};

/// Why a pool configuration was refused. One line, naming the file, the line and the field.
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
    #[error("{path}:{line}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The line (1-based; 0 when the parser gives no position).
        line: usize,
        /// The parser's message (first line).
        message: String,
    },
    /// A value is invalid.
    #[error("{path}:{line}: {place}: {source}")]
    Value {
        /// The file.
        path: String,
        /// The line of the value.
        line: usize,
        /// Where (e.g. `vm 'web': vcpus`).
        place: String,
        /// What is wrong.
        source: Box<ConfigError>,
    },
    /// Something else is inconsistent.
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The line it concerns.
        line: usize,
        /// What.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    pool: Spanned<PoolSection>,
    #[serde(default)]
    vm: Vec<Spanned<VmSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSection {
    vcpus: Spanned<u64>,
    memory: Spanned<String>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmSection {
    name: Spanned<String>,
    app: Spanned<String>,
    #[serde(default)]
    args: Vec<String>,
    vcpus: Spanned<String>,
    memory: Spanned<String>,
    weight: Option<u64>,
    burst_budget: Option<Spanned<String>>,
    burst_refill: Option<Spanned<String>>,
    reclaim_grace: Option<Spanned<String>>,
    on_violation: Option<OnViolation>,
    #[serde(default)]
    guest_opts: Vec<Spanned<String>>,
    expect_exit: Option<Spanned<u8>>,
    log: Option<Spanned<String>>,
    kernel: Option<PathBuf>,
    #[serde(default)]
    publish: Vec<Spanned<String>>,
    vsock_uds: Option<PathBuf>,
    on_demand: Option<Spanned<bool>>,
    wake: Option<elastic_vmm::Wake>,
    idle_shutdown: Option<Spanned<String>>,
    restart: Option<Spanned<String>>,
    restart_limit: Option<u32>,
    restart_backoff: Option<Spanned<String>>,
    restart_from: Option<Spanned<PathBuf>>,
}

/// Wait before the first restart when `restart_backoff` is not given (doubling after each).
pub const DEFAULT_RESTART_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// A parsed pool configuration.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The pool's capacity.
    pub capacity: Capacity,
    /// The VMs, in admission order.
    pub vms: Vec<VmSpec>,
}

/// Reads and validates `path`; `default_kernel` is used for VMs that name none.
pub fn load(path: &Path, default_kernel: &Path) -> Result<PoolConfig, PoolConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| PoolConfigError::Read { path: path.display().to_string(), source })?;
    parse(&text, &path.display().to_string(), default_kernel)
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Parses configuration `text` (from `origin`).
pub fn parse(text: &str, origin: &str, default_kernel: &Path) -> Result<PoolConfig, PoolConfigError> {
    let file: File = toml::from_str(text).map_err(|e| PoolConfigError::Syntax {
        path: origin.to_string(),
        line: e.span().map_or(0, |s| line_of(text, s.start)),
        message: e.message().lines().next().unwrap_or("invalid TOML").to_string(),
    })?;
    let line = |span: std::ops::Range<usize>| line_of(text, span.start);
    let value = |span: std::ops::Range<usize>, place: String, source: ConfigError| PoolConfigError::Value {
        path: origin.to_string(),
        line: line(span),
        place,
        source: Box::new(source),
    };
    let invalid = |span: std::ops::Range<usize>, message: String| PoolConfigError::Invalid {
        path: origin.to_string(),
        line: line(span),
        message,
    };
    let pool = file.pool.get_ref();
    let memory =
        parse_size(pool.memory.get_ref()).map_err(|e| value(pool.memory.span(), "pool: memory".into(), e.into()))?;
    let timeout = match &pool.timeout {
        Some(t) => Some(parse_duration(t.get_ref()).map_err(|e| value(t.span(), "pool: timeout".into(), e.into()))?),
        None => None,
    };
    if *pool.vcpus.get_ref() == 0 {
        return Err(invalid(pool.vcpus.span(), "pool: vcpus must be at least 1".into()));
    }
    if file.vm.is_empty() {
        return Err(invalid(file.pool.span(), "no [[vm]] entries: a pool needs at least one VM".into()));
    }
    let mut vms = Vec::new();
    for table in &file.vm {
        let v = table.get_ref();
        let name = v.name.get_ref();
        let at = |field: &str| format!("vm '{name}': {field}");
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(invalid(
                v.name.span(),
                format!("vm name '{name}' must be a word of letters, digits, '-' or '_'"),
            ));
        }
        if vms.iter().any(|s: &VmSpec| s.config.name() == name) {
            return Err(invalid(v.name.span(), format!("two VMs are named '{name}'")));
        }
        let vcpus: Policy =
            parse_vcpu_policy(v.vcpus.get_ref()).map_err(|e| value(v.vcpus.span(), at("vcpus"), e.into()))?;
        let mem: Policy =
            parse_memory_policy(v.memory.get_ref()).map_err(|e| value(v.memory.span(), at("memory"), e.into()))?;
        let mut policy = PolicyConfig::default();
        if let Some(b) = &v.burst_budget {
            policy.budget = parse_credit(b.get_ref()).map_err(|e| value(b.span(), at("burst_budget"), e.into()))?;
        }
        if let Some(r) = &v.burst_refill {
            policy.refill = parse_credit(r.get_ref()).map_err(|e| value(r.span(), at("burst_refill"), e.into()))?;
        }
        if let Some(g) = &v.reclaim_grace {
            policy.grace = parse_duration(g.get_ref()).map_err(|e| value(g.span(), at("reclaim_grace"), e.into()))?;
        }
        if let Some(o) = v.on_violation {
            policy.on_violation = o;
        }
        let mut guest_opts = Vec::new();
        for o in &v.guest_opts {
            guest_opts.push(parse_guest_opt(o.get_ref()).map_err(|e| value(o.span(), at("guest_opts"), e))?);
        }
        let log_level = match &v.log {
            Some(l) => parse_log_level(l.get_ref()).map_err(|e| value(l.span(), at("log"), e))?,
            None => "info".into(),
        };
        if let Some(code) = &v.expect_exit {
            let c = *code.get_ref();
            if c > elastic_vmm::exit::GUEST_MAX && c < elastic_vmm::exit::USAGE {
                return Err(invalid(code.span(), format!("vm '{name}': expect_exit {c} is not an exit code")));
            }
        }
        let mut publish = Vec::new();
        for p in &v.publish {
            let parsed = elastic_config::parse_publish(p.get_ref())
                .map_err(|e| invalid(p.span(), format!("vm '{name}': publish: {e}")))?;
            publish.push(parsed);
        }
        let on_demand = v.on_demand.as_ref().is_some_and(|o| *o.get_ref());
        let idle_shutdown = match &v.idle_shutdown {
            Some(d) => {
                let t = parse_duration(d.get_ref()).map_err(|e| value(d.span(), at("idle_shutdown"), e.into()))?;
                if t.is_zero() {
                    return Err(invalid(d.span(), format!("vm '{name}': idle_shutdown must be longer than 0")));
                }
                Some(t)
            }
            None => on_demand.then_some(DEFAULT_IDLE_SHUTDOWN),
        };
        if (on_demand || idle_shutdown.is_some()) && publish.is_empty() && v.vsock_uds.is_none() {
            return Err(invalid(
                table.span(),
                format!("vm '{name}': on_demand and idle_shutdown need a client endpoint: add publish or vsock_uds"),
            ));
        }
        if let Some(from) = &v.restart_from
            && v.restart.as_ref().is_none_or(|r| r.get_ref() != "on-failure")
        {
            return Err(invalid(from.span(), format!("vm '{name}': restart_from needs restart = \"on-failure\"")));
        }
        let restart = match v.restart.as_ref().map(|r| (r.get_ref().as_str(), r.span())) {
            None | Some(("never", _)) => None,
            Some(("on-failure", _)) => {
                let backoff = match &v.restart_backoff {
                    Some(b) => {
                        parse_duration(b.get_ref()).map_err(|e| value(b.span(), at("restart_backoff"), e.into()))?
                    }
                    None => DEFAULT_RESTART_BACKOFF,
                };
                Some(elastic_vmm::RestartPolicy {
                    limit: v.restart_limit.unwrap_or(DEFAULT_RESTART_LIMIT),
                    backoff,
                    from: v.restart_from.as_ref().map(|d| d.get_ref().clone()),
                })
            }
            Some((other, span)) => {
                return Err(invalid(
                    span,
                    format!("vm '{name}': restart '{other}' is not \"never\" or \"on-failure\""),
                ));
            }
        };
        // The service name's syntax is checked here; whether the image has it is checked
        // when the image is opened.
        elastic_vmm::kernel_cmdline(v.app.get_ref(), &[], &[]).map_err(|e| value(v.app.span(), at("app"), e))?;
        let mut config = VmConfig::new(name.clone(), v.app.get_ref().clone());
        config.guest.args = v.args.clone();
        config.guest.log_level = log_level;
        config.guest.options = guest_opts;
        config.resources.vcpus = vcpus;
        config.resources.memory = mem;
        config.resources.policy = policy;
        config.resources.weight = v.weight.unwrap_or(1).max(1);
        config.endpoints.publish = publish;
        config.endpoints.vsock_uds = v.vsock_uds.clone();
        config.lifecycle.timeout = timeout;
        config.lifecycle.on_demand = on_demand.then(|| v.wake.unwrap_or_default());
        config.lifecycle.idle_shutdown = idle_shutdown;
        config.lifecycle.restart = restart;
        let kernel = v.kernel.clone().unwrap_or_else(|| default_kernel.to_path_buf());
        vms.push(VmSpec::new(config, kernel, v.expect_exit.as_ref().map_or(0, |c| *c.get_ref())));
    }
    Ok(PoolConfig { capacity: Capacity { vcpus: *pool.vcpus.get_ref(), memory }, vms })
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
    fn on_demand_wakes_by_resume_unless_told_boot() {
        let file = |wake: &str| {
            format!(
                "[pool]\nvcpus = 2\nmemory = \"256M\"\n[[vm]]\nname = \"s\"\napp = \"kv\"\nvcpus = \"1\"\n\
                 memory = \"64M\"\npublish = [\"127.0.0.1:1:6379\"]\non_demand = true\n{wake}"
            )
        };
        let wake_of =
            |text: &str| parse(text, "pool.toml", Path::new("/k")).map(|c| c.vms[0].config.lifecycle.on_demand);
        assert_eq!(wake_of(&file("")).unwrap(), Some(elastic_vmm::Wake::Resume));
        assert_eq!(wake_of(&file("wake = \"boot\"")).unwrap(), Some(elastic_vmm::Wake::Boot));
        let bad = wake_of(&file("wake = \"later\"")).unwrap_err().to_string();
        assert!(bad.contains("later"), "{bad}");
    }

    #[test]
    fn a_good_file_parses() {
        let c = parse(GOOD, "pool.toml", Path::new("/k")).unwrap();
        assert_eq!(c.capacity, Capacity { vcpus: 6, memory: 1 << 30 });
        let web = &c.vms[0];
        assert_eq!(web.config.lifecycle.timeout, Some(std::time::Duration::from_secs(30)));
        let r = &web.config.resources;
        assert_eq!(r.weight, 2);
        assert_eq!(r.policy.budget, [1.0, 0.5]);
        assert_eq!(r.policy.grace, std::time::Duration::from_millis(150));
        assert_eq!(r.policy.on_violation, OnViolation::Kill);
        assert_eq!(web.config.guest.options, [("vcpu.down_ms".to_string(), "10".to_string())]);
        assert_eq!(c.vms[1].expect_exit, 3);
        assert_eq!(c.vms[1].kernel, Path::new("/k"));
    }

    #[test]
    fn errors_name_the_problem_in_one_line() {
        let cases = [
            (GOOD.replace("vcpus = \"1:2:4\"", "vcpus = \"4:2:1\""), "pool.toml:11: vm 'web': vcpus"),
            (
                GOOD.replace("vcpu.down_ms=10", "vcpu.down_mss=10"),
                "pool.toml:17: vm 'web': guest_opts: unknown kernel option",
            ),
            (GOOD.replace("vcpu.down_ms=10", "vcpu.down_ms=soon"), "pool.toml:17: vm 'web': guest_opts"),
            (GOOD.replace("expect_exit = 3", "expect_exit = 3\nlog = \"loud\""), "pool.toml:25: vm 'batch': log"),
            (GOOD.replace("memory = \"1G\"", "memory = \"lots\""), "pool: memory"),
            (GOOD.replace("weight = 2", "weight = 2\ncolour = \"red\""), "pool.toml:14: unknown field `colour`"),
            (GOOD.replace("name = \"batch\"", "name = \"web\""), "two VMs are named 'web'"),
            (GOOD.replace("burst_budget = \"1:0.5\"", "burst_budget = \"many\""), "vm 'web': burst_budget"),
            ("[pool]\nvcpus = 2\nmemory = \"1G\"\n".to_string(), "no [[vm]] entries"),
            (
                GOOD.replace("weight = 2", "weight = 2\nrestart_from = \"snap\""),
                "vm 'web': restart_from needs restart = \"on-failure\"",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(&text, "pool.toml", Path::new("/k")).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
