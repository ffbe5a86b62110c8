//! `elastic-vmm`: the KVM VMM of the elastic unikernel, as a library. It boots the kernel at
//! CPL 3, serves its hypercalls (`hypercall-abi`, `docs/abi.md`), serves its paravirtual
//! devices, and enforces each VM's min / max / burst policy against a host pool several VMs
//! share. The `hypervisor-shim` binary is its command line.
//!
//! Layers, bottom up (a module uses only its own layer or those below; `tests/layers.rs`
//! checks it, `docs/design.md` says where new code goes):
//!
//! | layer | modules | job |
//! |---|---|---|
//! | base | `base` (config, layout, memory, persist, timeline, exit), `host` (seccomp, affinity, signals, clocks, process figures, endpoints) | facts and helpers with no VM in them |
//! | devices, policy | `devices` (device model, manager, vsock), `policy` (resource, pool, admission) | what a VM has and what it may hold |
//! | vmm | `vmm` (vm, vcpu, vcpus, hypercall, loader, platform, notices, console) | one VM and its threads |
//! | snapshot, report | `snapshot` (format, restore, migrate), `report` (summary, JSON) | a VM's state saved or reported |
//! | control | `control` (run, on-demand, controller, registry, API, governor, resume) | who runs VMs and how the outside reaches them |
//!
//! The public surface is what the command line needs: configure a run ([`VmConfig`],
//! [`RunSpec`]), [`run`] it, and read its results ([`RunResult`], [`Summary`]). Policies, sizes,
//! durations and published ports are written in the grammar of `elastic-config`.

mod base;
mod control;
mod devices;
mod host;
mod policy;
mod report;
mod snapshot;
mod vmm;

pub use base::config::{
    ConfigError, DEFAULT_IDLE_SHUTDOWN, DEFAULT_RESTART_LIMIT, EndpointConfig, GuestConfig, Lifecycle, MemoryBacking,
    OnViolation, PolicyConfig, ResourceConfig, RestartPolicy, VmConfig, Wake, check_output_path, kernel_cmdline,
    parse_guest_opt, parse_log_level,
};
pub use base::exit;
pub use base::timeline::Line;
pub use control::resume::{ResumeError, ResumeOptions, receive_spec, restore_spec};
pub use control::run::{
    ConsoleMode, RunError, RunOptions, RunResult, RunSpec, TimelineOptions, VmEndHook, VmResult, VmSpec, run, serve,
};
pub use host::affinity::allowed as allowed_cpus;
pub use host::clock::now_monotonic_ns;
pub use host::diag::{
    emit as diag_line, flush as flush_diagnostics, lost_lines as stderr_lost_lines, say, start as start_diagnostics,
};
pub use host::endpoint::EndpointError;
pub use host::signals::{install as install_signal_handlers, interrupts};
pub use policy::pool::Capacity;
pub use report::json::write_json;
pub use report::summary::{PoolSummary, Summary};
pub use snapshot::channel::TlsFiles;
pub use vmm::error::{VmError, open_kvm};
pub use vmm::loader::{KernelImage, LoaderError};
pub use vmm::outcome::Outcome;
