//! A task's metrics (`Stats`, what `ctr task metrics` prints and kubelet reads) in the shape
//! containerd expects from runc's shim: cgroup v2's `io.containerd.cgroups.v2.Metrics` on a
//! unified host, v1's `io.containerd.cgroups.v1.Metrics` otherwise.
//!
//! The figures are the VM's own, from the VMM's control API (`ctl get vm0`), so they mean the
//! same on every host and whether or not the VMM could join a cgroup:
//!
//! | figure | v1 | v2 |
//! |---|---|---|
//! | CPU time of the VMM process (vCPUs, I/O, everything), µs | `cpu.usage.total` (ns) | `cpu.usage_usec` |
//! | its user and system parts (`/proc/PID/stat`) | `cpu.usage.user`, `.kernel` (ns) | `cpu.user_usec`, `.system_usec` |
//! | memory the guest holds now: boot memory + granted extents | `memory.usage.usage` | `memory.usage` |
//! | the most it held | `memory.usage.max` | `memory.max_usage` |
//! | memory burst (the ceiling it can never pass) | `memory.usage.limit` | `memory.usage_limit` |
//! | memory max (what it may keep) | `memory.hierarchical_memory_limit` | — |
//! | the VMM's resident memory | `memory.rss`, `memory.total_rss` | `memory.anon` |
//! | the VMM's threads | `pids.current` | `pids.current` |

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use serde_json::Value;
use thiserror::Error;

/// Why no metrics could be made.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The control API's answer lacks a figure.
    #[error("the VMM's figures lack {0} (an older hypervisor-shim?)")]
    Missing(&'static str),
    /// The answer is not JSON.
    #[error("the VMM's figures are not JSON: {0}")]
    Json(String),
    /// Encoding the message failed.
    #[error("cannot encode the metrics: {0}")]
    Encode(String),
}

/// The figures a task's metrics are made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// CPU time of the VMM process, µs.
    pub cpu_us: u64,
    /// Its user part, µs.
    pub user_us: u64,
    /// Its system part, µs.
    pub system_us: u64,
    /// Memory the guest holds now, bytes.
    pub memory: u64,
    /// The most it held, bytes.
    pub memory_peak: u64,
    /// Memory max, bytes.
    pub memory_max: u64,
    /// Memory burst, bytes.
    pub memory_burst: u64,
    /// The VMM's resident memory, bytes.
    pub rss: u64,
    /// The VMM's threads.
    pub threads: u64,
}

/// The number at `path` in the VMM's JSON figures, or which one is missing (`name`).
fn figure(v: &Value, path: &[&str], name: &'static str) -> Result<u64, MetricsError> {
    path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_u64).ok_or(MetricsError::Missing(name))
}

impl Figures {
    /// From `ctl get vm0`'s JSON and the VMM's `/proc/PID/stat` and `/proc/PID/status` texts
    /// (either may be empty: a process that just ended).
    pub fn parse(json: &str, stat: &str, status: &str) -> Result<Figures, MetricsError> {
        let v: Value = serde_json::from_str(json).map_err(|e| MetricsError::Json(e.to_string()))?;
        let get = |path: &[&str], name: &'static str| figure(&v, path, name);
        let (user_ticks, system_ticks) = proc_times(stat);
        let tick_us = 1_000_000 / clock_ticks();
        Ok(Figures {
            cpu_us: get(&["host_cpu_us"], "host_cpu_us")?,
            user_us: user_ticks * tick_us,
            system_us: system_ticks * tick_us,
            memory: get(&["memory_bytes", "final"], "memory_bytes.final")?,
            memory_peak: get(&["memory_bytes", "peak"], "memory_bytes.peak")?,
            memory_max: get(&["memory_policy", "max"], "memory_policy.max")?,
            memory_burst: get(&["memory_policy", "burst"], "memory_policy.burst")?,
            rss: get(&["host_rss_bytes", "end"], "host_rss_bytes.end")?,
            threads: status
                .lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(1),
        })
    }

    /// A node pool VM's figures, from `GET /api/v1/vms/NAME`'s JSON alone (the pool's process
    /// serves every pod's VM): CPU is the VM's vCPU threads' time (`vcpu_cpu_us`; no
    /// user/system split), resident memory what the guest holds, and the "threads" its vCPUs
    /// online.
    pub fn of_pool_vm(json: &str) -> Result<Figures, MetricsError> {
        let v: Value = serde_json::from_str(json).map_err(|e| MetricsError::Json(e.to_string()))?;
        let get = |path: &[&str], name: &'static str| figure(&v, path, name);
        let memory = get(&["memory_bytes", "final"], "memory_bytes.final")?;
        Ok(Figures {
            cpu_us: get(&["vcpu_cpu_us"], "vcpu_cpu_us")?,
            user_us: 0,
            system_us: 0,
            memory,
            memory_peak: get(&["memory_bytes", "peak"], "memory_bytes.peak")?,
            memory_max: get(&["memory_policy", "max"], "memory_policy.max")?,
            memory_burst: get(&["memory_policy", "burst"], "memory_policy.burst")?,
            rss: memory,
            threads: get(&["vcpus", "final"], "vcpus.final")?,
        })
    }

    /// The metrics message: cgroup v2's when `unified`, else v1's.
    pub fn to_any(&self, unified: bool) -> Result<Any, MetricsError> {
        let (type_url, value) = if unified {
            let m = v2::Metrics {
                pids: Some(v2::PidsStat { current: self.threads, ..Default::default() }).into(),
                cpu: Some(v2::CPUStat {
                    usage_usec: self.cpu_us,
                    user_usec: self.user_us,
                    system_usec: self.system_us,
                    ..Default::default()
                })
                .into(),
                memory: Some(v2::MemoryStat {
                    usage: self.memory,
                    usage_limit: self.memory_burst,
                    max_usage: self.memory_peak,
                    anon: self.rss,
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            };
            ("io.containerd.cgroups.v2.Metrics", m.write_to_bytes())
        } else {
            let m = v1::Metrics {
                pids: Some(v1::PidsStat { current: self.threads, ..Default::default() }).into(),
                cpu: Some(v1::CPUStat {
                    usage: Some(v1::CPUUsage {
                        total: self.cpu_us * 1000,
                        user: self.user_us * 1000,
                        kernel: self.system_us * 1000,
                        ..Default::default()
                    })
                    .into(),
                    ..Default::default()
                })
                .into(),
                memory: Some(v1::MemoryStat {
                    rss: self.rss,
                    total_rss: self.rss,
                    hierarchical_memory_limit: self.memory_max,
                    usage: Some(v1::MemoryEntry {
                        usage: self.memory,
                        max: self.memory_peak,
                        limit: self.memory_burst,
                        ..Default::default()
                    })
                    .into(),
                    ..Default::default()
                })
                .into(),
                ..Default::default()
            };
            ("io.containerd.cgroups.v1.Metrics", m.write_to_bytes())
        };
        let value = value.map_err(|e| MetricsError::Encode(e.to_string()))?;
        Ok(Any { type_url: type_url.to_string(), value, ..Default::default() })
    }
}

/// `utime` and `stime` (clock ticks) from a `/proc/PID/stat` line; zeros if it does not parse.
fn proc_times(stat: &str) -> (u64, u64) {
    // The command name (field 2) is in parentheses and may hold spaces: count after its end.
    let Some((_, rest)) = stat.rsplit_once(')') else { return (0, 0) };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let at = |i: usize| fields.get(i - 3).and_then(|f| f.parse().ok()).unwrap_or(0);
    (at(14), at(15))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"host_cpu_us": 25840, "memory_bytes": {"final": 67108864, "peak": 134217728},
        "memory_policy": {"min": 67108864, "max": 134217728, "burst": 268435456},
        "host_rss_bytes": {"end": 7700480}}"#;

    #[test]
    fn figures_from_the_vmm() {
        let stat = "4242 (hypervisor shim) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 30 0 0 20 0 9 0";
        let f = Figures::parse(JSON, stat, "Name:\thypervisor-shim\nThreads:\t9\n").expect("figures");
        let tick = 1_000_000 / clock_ticks();
        assert_eq!(
            f,
            Figures {
                cpu_us: 25840,
                user_us: 150 * tick,
                system_us: 30 * tick,
                memory: 64 << 20,
                memory_peak: 128 << 20,
                memory_max: 128 << 20,
                memory_burst: 256 << 20,
                rss: 7700480,
                threads: 9,
            }
        );
        let e = Figures::parse(r#"{"host_cpu_us": 1}"#, "", "").expect_err("incomplete");
        assert!(e.to_string().contains("memory_bytes.final"), "{e}");
    }

    #[test]
    fn both_cgroup_shapes() {
        let f = Figures::parse(JSON, "", "").expect("figures");
        let a = f.to_any(false).expect("v1");
        assert_eq!(a.type_url, "io.containerd.cgroups.v1.Metrics");
        let m = v1::Metrics::parse_from_bytes(&a.value).expect("v1 decodes");
        assert_eq!(m.cpu.usage.total, 25_840_000);
        assert_eq!((m.memory.usage.usage, m.memory.usage.limit), (64 << 20, 256 << 20));
        assert_eq!(m.pids.current, 1);
        let a = f.to_any(true).expect("v2");
        assert_eq!(a.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = v2::Metrics::parse_from_bytes(&a.value).expect("v2 decodes");
        assert_eq!((m.cpu.usage_usec, m.memory.usage, m.memory.usage_limit), (25840, 64 << 20, 256 << 20));
    }
}
