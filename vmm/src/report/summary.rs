//! The JSON run summary (`run --summary FILE`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::base::config::Policy;
use crate::policy::admission::Invariants;
use crate::policy::resource::ResourcePolicy;
use crate::vmm::stats::RunReport;

/// The on-demand figures of a VM slot (the summary's `on_demand`).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct OnDemandFigures {
    /// VMs booted because a client connected.
    pub(crate) cold_starts: u64,
    /// VMs stopped or put to sleep for being idle.
    pub(crate) idle_shutdowns: u64,
    /// Of those, the ones put to sleep (snapshotted, to be resumed).
    pub(crate) sleeps: u64,
    /// VMs resumed from sleep because a client connected.
    pub(crate) wakes: u64,
    /// For each cold start: µs from the shim seeing the waiting client to the guest's HELLO.
    pub(crate) boot_us: Vec<u64>,
    /// For each wake: µs from the shim seeing the waiting client to the resumed VM built
    /// (its vCPUs start right after).
    pub(crate) wake_us: Vec<u64>,
    /// For each wake: where its time went.
    pub(crate) wake_phases: Vec<WakePhases>,
    /// For each cold start that resumed the service's template instead of booting: where its
    /// time went (`load_us` reads the template).
    pub(crate) template_phases: Vec<WakePhases>,
    /// For each cold start: µs from the shim seeing the waiting client to the VM's first
    /// bytes to a client (`null`: none before the VM ended).
    pub(crate) boot_first_reply_us: Vec<Option<u64>>,
    /// VMs booted again after a failure (`restart = "on-failure"`).
    #[serde(skip)]
    pub(crate) restarts: u64,
}

/// Where one wake's time went, in µs from the shim seeing the waiting client (the summary's
/// `on_demand.wake_phases`; the wake's `wake` and `first_reply` lines in the timeline carry the
/// same figures).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct WakePhases {
    /// Reading and checking the sleep's state (the phases after it add up to `ready_us`).
    pub(crate) load_us: u64,
    /// Creating the KVM VM.
    pub(crate) kvm_us: u64,
    /// Mapping guest memory and loading what it held.
    pub(crate) memory_us: u64,
    /// Creating the vCPUs with their saved state.
    pub(crate) vcpus_us: u64,
    /// Devices, policy and notices restored, the VM assembled.
    pub(crate) devices_us: u64,
    /// The VM ready to run (the wake's `wake_us`).
    pub(crate) ready_us: u64,
    /// The guest's first bytes handed to a client (`null`: none before the VM ended).
    pub(crate) first_reply_us: Option<u64>,
    /// Host page faults the shim took from the VM ready to that first reply: what loading
    /// memory on touch costs after a wake.
    pub(crate) post_wake_faults: Option<u64>,
}

/// A policy as it appears in the summary.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LimitsSummary {
    /// Reserved minimum.
    pub(crate) min: u64,
    /// Sustained maximum.
    pub(crate) max: u64,
    /// Burst ceiling.
    pub(crate) burst: u64,
}

impl From<Policy> for LimitsSummary {
    fn from(p: Policy) -> Self {
        LimitsSummary { min: p.min, max: p.max, burst: p.burst }
    }
}

/// vCPU figures of a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VcpuSummary {
    /// Policy minimum.
    pub(crate) min: u64,
    /// Policy maximum.
    pub(crate) max: u64,
    /// Policy burst ceiling.
    pub(crate) burst: u64,
    /// Most vCPUs online at once.
    pub(crate) peak: u32,
    /// vCPUs online at the end.
    #[serde(rename = "final")]
    pub(crate) final_: u32,
    /// Successful VCPU_UPs.
    pub(crate) ups: u64,
    /// VCPU_DOWNs.
    pub(crate) downs: u64,
    /// KVM vCPUs created (the other ups reused parked ones).
    pub(crate) created: u32,
}

/// Memory figures of a run (bytes).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MemorySummary {
    /// Policy minimum (boot memory).
    pub(crate) min: u64,
    /// Policy maximum.
    pub(crate) max: u64,
    /// Policy burst ceiling.
    pub(crate) burst: u64,
    /// Most memory held at once.
    pub(crate) peak: u64,
    /// Memory held at the end.
    #[serde(rename = "final")]
    pub(crate) final_: u64,
    /// Successful MEM_GRANT calls.
    pub(crate) grants: u64,
    /// Successful MEM_RELEASE calls.
    pub(crate) releases: u64,
}

/// The shim process's resident set size (bytes).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RssSummary {
    /// At the guest's first HELLO.
    pub(crate) boot: u64,
    /// The peak (kernel-tracked high-water mark).
    pub(crate) peak: u64,
    /// At the end of the run.
    pub(crate) end: u64,
}

/// One resource's policy figures over the run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PolicyFigures {
    /// Reclaims started.
    pub(crate) reclaims: u64,
    /// Reclaims answered within the grace period.
    pub(crate) answered_in_grace: u64,
    /// Reclaims whose grace expired first.
    pub(crate) violations: u64,
    /// Credit cap (vCPU-seconds or GiB-seconds).
    pub(crate) credit_cap: f64,
    /// Refill rate per second.
    pub(crate) credit_refill: f64,
    /// Lowest balance seen.
    pub(crate) credit_lowest: f64,
    /// Balance at the end.
    pub(crate) credit_final: f64,
}

impl From<&ResourcePolicy> for PolicyFigures {
    fn from(p: &ResourcePolicy) -> Self {
        PolicyFigures {
            reclaims: p.reclaims,
            answered_in_grace: p.answered_in_grace,
            violations: p.violations,
            credit_cap: p.credit.cap,
            credit_refill: p.credit.refill,
            credit_lowest: p.credit.lowest,
            credit_final: p.credit.balance,
        }
    }
}

/// Policy figures of a run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PolicySummary {
    /// vCPUs.
    pub(crate) vcpus: PolicyFigures,
    /// Memory.
    pub(crate) memory: PolicyFigures,
}

/// The diagnostics a VM's guest caused (see `host::diag`).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct DiagSummary {
    /// Lines written to stderr's buffer.
    pub(crate) printed: u64,
    /// Lines suppressed by the rate limit (a burst of 10, then 1 a second).
    pub(crate) suppressed: u64,
    /// Lines dropped because stderr's buffer was full.
    pub(crate) dropped: u64,
    /// Lines of the whole process (any cause) dropped or lost on a failed write, so far.
    pub(crate) stderr_lost_lines: u64,
}

/// The summary of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The VM's name.
    pub(crate) name: String,
    /// The shim's exit code.
    pub(crate) exit_code: u8,
    /// Why the run ended (`shutdown`, `guest_fault`, `timeout`, ...).
    pub(crate) exit_reason: String,
    /// Shim process start (entry of `main`) to the guest's first HELLO, in µs (`null` if the
    /// guest never said HELLO).
    pub(crate) boot_us: Option<u64>,
    /// A restored or migrated VM: shim start to the VM ready to run (µs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) restore_us: Option<u64>,
    /// A booted VM: where the time to HELLO went (the last boot of an on-demand slot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) boot_phases: Option<crate::vmm::stats::BootPhases>,
    /// Guest console bytes dropped because the shim's output was not read fast enough.
    pub(crate) console_dropped_bytes: u64,
    /// The stderr lines the guest caused: printed, suppressed by the per-VM rate limit, dropped
    /// because nobody read stderr.
    pub(crate) diagnostics: DiagSummary,
    /// Shim process start to the end of the run, in µs.
    pub(crate) wall_us: u64,
    /// CLOCK_MONOTONIC (ns) at shim `main` entry, so an external tool can add the process
    /// start-up it measured itself.
    pub(crate) started_monotonic_ns: u64,
    /// Hypercalls served.
    pub(crate) hypercalls: u64,
    /// Hypercalls per call.
    pub(crate) hypercalls_by_call: BTreeMap<String, u64>,
    /// BLOCKs that carried a DEVICE_NOTIFY (a notify without an exit of its own).
    pub(crate) notifies_in_block: u64,
    /// Time the vCPUs were ready to run but waited for a host CPU, since boot (µs; KVM's
    /// steal time, null where KVM keeps none).
    pub(crate) steal_us: Option<u64>,
    /// The service that ran.
    pub(crate) app: String,
    /// The vCPU policy.
    pub(crate) vcpu_policy: LimitsSummary,
    /// The memory policy (bytes).
    pub(crate) memory_policy: LimitsSummary,
    /// vCPU figures.
    pub(crate) vcpus: VcpuSummary,
    /// Requests refused with DENIED (vCPUs and memory).
    pub(crate) denied: u64,
    /// REPORT calls.
    pub(crate) reports: u64,
    /// REPORT calls above 1000 per second per vCPU: answered, not recorded.
    pub(crate) reports_not_recorded: u64,
    /// CPU time the shim process used (user + system), in µs.
    pub(crate) host_cpu_us: u64,
    /// Memory figures.
    pub(crate) memory_bytes: MemorySummary,
    /// The shim process's RSS.
    pub(crate) host_rss_bytes: RssSummary,
    /// Reclaims started (vCPUs and memory).
    pub(crate) reclaims: u64,
    /// Reclaims whose grace expired with the VM still above max (vCPUs and memory).
    pub(crate) violations: u64,
    /// Requests answered AGAIN (pool full, reclaim under way).
    pub(crate) again: u64,
    /// Requests answered EXHAUSTED (pool full).
    pub(crate) exhausted: u64,
    /// Burst credit and reclaims per resource.
    pub(crate) policy: PolicySummary,
    /// Invariant checks from the shim's own accounting.
    pub(crate) invariants: Invariants,
    /// Each device's figures, under its name (`vsock`: the request channel); `null` when no
    /// VM ran.
    #[serde(flatten)]
    pub(crate) devices: BTreeMap<String, serde_json::Value>,
    /// Times the VM was booted again after a failure (`restart = "on-failure"`); the other
    /// figures are the last VM's.
    pub(crate) restarts: u64,
    /// Cold starts and idle shutdowns (an on-demand VM only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) on_demand: Option<OnDemandFigures>,
}

/// The pool's figures in a pool run's summary.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PoolFigures {
    /// vCPU slots.
    pub(crate) vcpus: u64,
    /// Bytes.
    pub(crate) memory_bytes: u64,
    /// Most vCPU slots in use at once.
    pub(crate) peak_vcpus: u64,
    /// Most bytes in use at once.
    pub(crate) peak_memory_bytes: u64,
}

/// A VM's summary inside a pool run's summary.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PoolVm {
    /// The exit code it was expected to end with.
    pub(crate) expected_exit_code: u8,
    /// Whether it did.
    pub(crate) as_expected: bool,
    /// Its summary.
    #[serde(flatten)]
    pub(crate) summary: Summary,
}

/// The summary of a pool run.
#[derive(Debug, Clone, Serialize)]
pub struct PoolSummary {
    /// The run's exit code (0 when every VM ended as expected).
    pub(crate) exit_code: u8,
    /// Wall time of the run, µs.
    pub(crate) wall_us: u64,
    /// The pool.
    pub(crate) pool: PoolFigures,
    /// One summary per VM.
    pub(crate) vms: Vec<PoolVm>,
    /// Reclaims over all VMs.
    pub(crate) reclaims: u64,
    /// Violations over all VMs.
    pub(crate) violations: u64,
}

impl PoolSummary {
    /// The run's exit code: 0 when every VM ended as expected.
    pub fn exit_code(&self) -> u8 {
        self.exit_code
    }
}

impl Summary {
    /// Builds a summary from a finished run.
    pub(crate) fn new(
        report: &RunReport,
        name: &str,
        app: &str,
        vcpus: Policy,
        memory: Policy,
        started_monotonic_ns: u64,
    ) -> Self {
        let [pv, pm] = &report.policy;
        Summary {
            name: name.to_string(),
            exit_code: report.outcome.exit_code(),
            exit_reason: report.outcome.reason().to_string(),
            boot_us: report.boot.map(|d| d.as_micros() as u64),
            restore_us: report.restored.map(|d| d.as_micros() as u64),
            boot_phases: report.boot_phases,
            console_dropped_bytes: report.console_dropped,
            diagnostics: DiagSummary {
                printed: report.diagnostics.printed,
                suppressed: report.diagnostics.suppressed,
                dropped: report.diagnostics.dropped,
                stderr_lost_lines: crate::host::diag::lost_lines(),
            },
            wall_us: report.wall.as_micros() as u64,
            started_monotonic_ns,
            hypercalls: report.hypercalls,
            hypercalls_by_call: report.per_call.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            notifies_in_block: report.notifies_in_block,
            steal_us: report.steal_us,
            app: app.to_string(),
            vcpu_policy: vcpus.into(),
            memory_policy: memory.into(),
            vcpus: VcpuSummary {
                min: vcpus.min,
                max: vcpus.max,
                burst: vcpus.burst,
                peak: report.vcpus.peak,
                final_: report.vcpus.online,
                ups: report.vcpus.ups,
                downs: report.vcpus.downs,
                created: report.vcpus.created,
            },
            denied: report.denied,
            reports: report.reports,
            reports_not_recorded: report.reports_not_recorded,
            host_cpu_us: crate::host::process::process_cpu_us(),
            memory_bytes: MemorySummary {
                min: memory.min,
                max: memory.max,
                burst: memory.burst,
                peak: report.memory.peak,
                final_: report.memory.final_bytes,
                grants: report.memory.grants,
                releases: report.memory.releases,
            },
            host_rss_bytes: RssSummary {
                boot: report.memory.rss_boot,
                // The kernel's high-water mark, never below a figure read on the way.
                peak: report.memory.rss_peak.max(report.memory.rss_boot).max(report.memory.rss_end),
                end: report.memory.rss_end,
            },
            reclaims: pv.reclaims + pm.reclaims,
            violations: pv.violations + pm.violations,
            devices: report.devices.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            restarts: 0,
            on_demand: None,
            again: report.again,
            exhausted: report.exhausted,
            policy: PolicySummary { vcpus: pv.into(), memory: pm.into() },
            invariants: report.invariants.clone(),
        }
    }
}
