//! A VM's figures: the counters kept while it runs ([`Stats`]) and what a finished run
//! reports ([`RunReport`]).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hypercall_abi::Call;

use crate::base::config::VmConfig;
use crate::policy::admission::Invariants;
use crate::policy::resource::{Resource, ResourcePolicy};
use crate::vmm::outcome::Outcome;
use crate::vmm::vcpus::VcpuCounts;

/// Counters kept while the VM runs.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Hypercalls served (all kinds, including refused ones).
    pub(crate) hypercalls: AtomicU64,
    /// Hypercalls per call: index 0 collects unknown numbers, index `i + 1` counts
    /// `Call::ALL[i]` (sized from the ABI's call table).
    pub(crate) per_call: [AtomicU64; Call::ALL.len() + 1],
    /// BLOCKs that served a DEVICE_NOTIFY first (`block_flags::NOTIFY`).
    pub(crate) notifies_in_block: AtomicU64,
    /// Writes to the NOP port.
    pub(crate) nop_exits: AtomicU64,
    /// Console bytes written.
    pub(crate) console_bytes: AtomicU64,
    /// Requests refused with DENIED (vCPUs and memory).
    pub(crate) denied: AtomicU64,
    /// REPORT calls received.
    pub(crate) reports: AtomicU64,
    /// REPORT calls above the per-vCPU rate, answered but not recorded.
    pub(crate) reports_not_recorded: AtomicU64,
    /// Successful MEM_GRANT calls.
    pub(crate) mem_grants: AtomicU64,
    /// Successful MEM_RELEASE calls.
    pub(crate) mem_releases: AtomicU64,
    /// Most memory held at once (bytes).
    pub(crate) mem_peak: AtomicU64,
    /// The shim's RSS at the guest's first HELLO (bytes).
    pub(crate) rss_boot: OnceLock<u64>,
}

impl Stats {
    /// Counts one hypercall with number `n`.
    pub(crate) fn count_call(&self, n: u32) {
        self.hypercalls.fetch_add(1, Ordering::Relaxed);
        let i = Call::from_number(n).and_then(|c| Call::ALL.iter().position(|x| *x == c)).map_or(0, |p| p + 1);
        if let Some(c) = self.per_call.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Where a boot's time went, in µs (the summary's `boot_phases`): the phases follow one
/// another, except `vcpu_us`, which runs beside `memory_us` on a helper thread.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct BootPhases {
    /// Shim start to the VM's creation: process start-up, arguments, the kernel image read and
    /// checked, the pool, the endpoints bound (for an on-demand boot, the wait for its client
    /// too: its `on_demand.boot_us` counts from the client instead).
    pub(crate) before_us: u64,
    /// The KVM VM created (0 when it was made ahead, on demand).
    pub(crate) kvm_us: u64,
    /// Boot memory mapped and registered, platform structures and page tables written, the
    /// kernel image loaded.
    pub(crate) memory_us: u64,
    /// CPUID asked and the boot vCPU made (beside `memory_us`; 0 when made ahead).
    pub(crate) vcpu_us: u64,
    /// Devices, boot information, the VM assembled.
    pub(crate) devices_us: u64,
    /// The vCPU threads started to the guest's HELLO: first entry and guest start-up.
    pub(crate) guest_us: u64,
}

/// When a VM first wrote bytes to a client (the first answer after a boot or a wake).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FirstReply {
    /// Shim start to the first byte handed to a client's socket.
    pub(crate) at: Duration,
    /// The shim process's page faults from the VM built to then
    /// ([`page_faults`](crate::host::process::page_faults)): after a wake, what loading memory
    /// on touch cost.
    pub(crate) faults: u64,
}

/// Everything a finished run reports.
#[derive(Debug, Clone)]
pub(crate) struct RunReport {
    /// How it ended.
    pub(crate) outcome: Outcome,
    /// Shim start to first HELLO (`None` if the guest never said HELLO).
    pub(crate) boot: Option<Duration>,
    /// Shim start to a restored VM ready to run.
    pub(crate) restored: Option<Duration>,
    /// The VM's first bytes to a client.
    pub(crate) first_reply: Option<FirstReply>,
    /// Where a booted VM's time to HELLO went.
    pub(crate) boot_phases: Option<BootPhases>,
    /// Shim start to the end of the run.
    pub(crate) wall: Duration,
    /// Hypercalls served.
    pub(crate) hypercalls: u64,
    /// Hypercalls per call name.
    pub(crate) per_call: Vec<(&'static str, u64)>,
    /// BLOCKs that carried a DEVICE_NOTIFY.
    pub(crate) notifies_in_block: u64,
    /// Time the vCPUs waited for a host CPU since boot, from KVM's steal-time records (µs;
    /// `None` where KVM keeps none).
    pub(crate) steal_us: Option<u64>,
    /// vCPU counts at the end.
    pub(crate) vcpus: VcpuCounts,
    /// Requests refused with DENIED.
    pub(crate) denied: u64,
    /// REPORT calls.
    pub(crate) reports: u64,
    /// REPORT calls above the per-vCPU rate (not recorded).
    pub(crate) reports_not_recorded: u64,
    /// Memory figures.
    pub(crate) memory: MemoryCounts,
    /// Per-resource policy state at the end (reclaims, violations, credit).
    pub(crate) policy: [ResourcePolicy; 2],
    /// AGAIN and EXHAUSTED answers.
    pub(crate) again: u64,
    /// EXHAUSTED answers.
    pub(crate) exhausted: u64,
    /// The invariant checks made during the run.
    pub(crate) invariants: Invariants,
    /// Each device's figures, by device name.
    pub(crate) devices: Vec<(&'static str, serde_json::Value)>,
    /// Guest console bytes dropped because nobody read the shim's output fast enough.
    pub(crate) console_dropped: u64,
    /// The diagnostics the guest caused: printed, suppressed by the rate limit, dropped.
    pub(crate) diagnostics: crate::host::diag::DiagFigures,
}

impl RunReport {
    /// The report of an on-demand slot whose run ended with no VM running and none run before
    /// (`outcome` says why: interrupted or timed out while waiting for a client).
    pub(crate) fn without_vm(config: &VmConfig, outcome: Outcome, wall: Duration) -> RunReport {
        let r = &config.resources;
        let p = &r.policy;
        RunReport {
            outcome,
            boot: None,
            restored: None,
            first_reply: None,
            boot_phases: None,
            wall,
            hypercalls: 0,
            per_call: Call::ALL.iter().map(|c| (c.name(), 0)).collect(),
            notifies_in_block: 0,
            steal_us: None,
            vcpus: VcpuCounts::default(),
            denied: 0,
            reports: 0,
            reports_not_recorded: 0,
            memory: MemoryCounts::default(),
            policy: [
                ResourcePolicy::new(Resource::Vcpus, r.vcpus, p.budget[0], p.refill[0]),
                ResourcePolicy::new(Resource::Memory, r.memory, p.budget[1], p.refill[1]),
            ],
            again: 0,
            exhausted: 0,
            invariants: Invariants::default(),
            devices: crate::devices::names().map(|n| (n, serde_json::Value::Null)).collect(),
            console_dropped: 0,
            diagnostics: crate::host::diag::DiagFigures::default(),
        }
    }
}

/// Memory figures of a run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MemoryCounts {
    /// Most bytes held at once.
    pub(crate) peak: u64,
    /// Bytes held at the end.
    pub(crate) final_bytes: u64,
    /// Successful MEM_GRANT calls.
    pub(crate) grants: u64,
    /// Successful MEM_RELEASE calls.
    pub(crate) releases: u64,
    /// The shim's RSS at the first HELLO.
    pub(crate) rss_boot: u64,
    /// The shim's peak RSS.
    pub(crate) rss_peak: u64,
    /// The shim's RSS at the end of the run.
    pub(crate) rss_end: u64,
}
