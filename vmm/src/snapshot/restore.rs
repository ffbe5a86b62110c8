//! A VM built back from its state ([`super::VmState`]): every component restores itself
//! from its own part ([`Persist`]), and the VM is assembled from them.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::VmState;
use crate::base::config::VmConfig;
use crate::base::memory::{GuestMemory, MemoryArgs};
use crate::base::persist::Persist;
use crate::devices::DeviceManager;
use crate::host::endpoint::Bound;
use crate::policy::admission::{PolicyArgs, VmPolicy};
use crate::policy::pool::{PoolError, Take};
use crate::policy::resource::Resource;
use crate::vmm::console::Console;
use crate::vmm::error::VmError;
use crate::vmm::loader::KernelImage;
use crate::vmm::notices::NoticeBoard;
use crate::vmm::shared::Parts;
use crate::vmm::vcpu::{Vcpu, VcpuArgs};
use crate::vmm::vcpus::VcpuSet;
use crate::vmm::vm::{Host, Initial, Vm, create_kvm_vm, device_setup, max_slots, supported_cpuid};

/// Where a restored VM's memory comes from.
#[derive(Debug)]
pub(crate) enum RestoreMemory {
    /// A snapshot's memory file (mapped privately, read lazily).
    File(std::fs::File),
    /// Memory already filled by a migration receiver, with its KVM VM (slots registered).
    Live {
        /// The KVM VM the memory is registered with.
        fd: VmFd,
        /// The memory.
        mem: GuestMemory,
        /// When the VM's state arrived (its restore time counts from there).
        arrived: std::time::Instant,
        /// vCPUs made ahead (0, 1, ... in their fresh state).
        vcpus: Vec<Vcpu>,
    },
}

/// Where a restore's time went (µs, each phase on its own).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RestorePhases {
    /// Creating the KVM VM.
    pub(crate) kvm_us: u64,
    /// Mapping guest memory and loading what it held.
    pub(crate) memory_us: u64,
    /// Creating the vCPUs with their saved state.
    pub(crate) vcpus_us: u64,
    /// Devices, policy and notices restored, the VM assembled.
    pub(crate) devices_us: u64,
}

/// Builds the VM of `state` as `config` says (the state's own configuration, with what the
/// restoring command changed): memory, vCPUs (running ones with their saved state, parked ones
/// parked), devices (open connections reset), notices, policy limits and credit; its holdings
/// are charged to the pool. Its `endpoints` are served again. Returns the VM and where the
/// time went.
pub(crate) fn restore(
    config: &VmConfig,
    state: &VmState,
    memory: RestoreMemory,
    image: Arc<KernelImage>,
    host: Host<'_>,
    endpoints: Vec<Bound>,
) -> Result<(Vm, RestorePhases), VmError> {
    let r = &config.resources;
    let pool = Arc::clone(host.pool);
    // An on-demand slot's member is reserved for the whole run; any other VM is admitted now.
    let (member, admitted) = match config.pool_member {
        Some(m) => (m, false),
        None => (pool.admit(config.name(), r.vcpus, r.memory, r.weight)?, true),
    };
    let vm = rebuild(config, state, memory, image, host, member, endpoints);
    if vm.is_err() && admitted {
        pool.leave(member);
    }
    vm
}

fn rebuild(
    config: &VmConfig,
    state: &VmState,
    memory: RestoreMemory,
    image: Arc<KernelImage>,
    host: Host<'_>,
    member: usize,
    endpoints: Vec<Bound>,
) -> Result<(Vm, RestorePhases), VmError> {
    let bad = |what: String| VmError::Restore(what);
    let layout = state.layout;
    let mut phases = RestorePhases::default();
    let mut clock = std::time::Instant::now();
    let mut lap = || {
        let now = std::time::Instant::now();
        let us = now.duration_since(clock).as_micros() as u64;
        clock = now;
        us
    };
    let mut host = host;
    let mut warm: Vec<Vcpu> = Vec::new();
    let mut premapped = None;
    let mut arrived = None;
    let (fd, mem) = match memory {
        RestoreMemory::Live { fd, mem, arrived: at, vcpus } => {
            arrived = Some(at);
            warm = vcpus;
            (fd, mem)
        }
        RestoreMemory::File(file) => {
            let fd = match host.shell.take() {
                Some(shell) => {
                    let (fd, vcpus, boot) = (*shell).into_parts();
                    warm = vcpus;
                    premapped = boot;
                    fd
                }
                None => create_kvm_vm(host.kvm)?,
            };
            phases.kvm_us = lap();
            let boot = state.memory.regions.first().ok_or_else(|| bad("the snapshot lists no memory".into()))?;
            if boot.gpa != 0 || boot.len != layout.ram_size {
                return Err(bad("the snapshot's boot memory does not match its layout".into()));
            }
            let args = MemoryArgs {
                vm: &fd,
                window: (layout.window_base, layout.window_size),
                max_slots: max_slots(host.kvm),
                file: &file,
                premapped,
            };
            let mem = GuestMemory::restore(args, &state.memory)?;
            phases.memory_us = lap();
            (fd, mem)
        }
    };
    let cpuid = supported_cpuid(host.kvm)?;
    let (vcpus, handles) = VcpuSet::restored(&state.online);
    let mut initial: Vec<Initial> = Vec::new();
    for ((id, &online), handle) in state.online.iter().enumerate().zip(handles) {
        let id = id as u32;
        // A vCPU of the shell the VM was made in, if it has this one.
        let fresh = warm.iter().position(|v| v.id() == id).map(|i| warm.swap_remove(i));
        let vcpu = if online {
            let saved = state
                .vcpus
                .iter()
                .find(|v| v.id == id)
                .ok_or_else(|| bad(format!("vCPU {id} is online but has no saved state")))?;
            match fresh {
                Some(v) => v.with_state(saved)?,
                None => Vcpu::restore(VcpuArgs { vm: &fd, cpuid: &cpuid }, saved)?,
            }
        } else {
            match fresh {
                Some(v) => v,
                None => Vcpu::create(&fd, &cpuid, id)?,
            }
        };
        initial.push((vcpu, handle, !online));
    }
    phases.vcpus_us = lap();
    let setup = device_setup(config, &endpoints);
    let diag = Arc::clone(&setup.diag);
    let devices = DeviceManager::restore(&mem, &setup, &state.devices)?;
    // Charge what the VM holds above its min (admission reserved the min).
    let pool = host.pool;
    let r = &config.resources;
    let held = [vcpus.online() as u64, mem.held()];
    for res in Resource::ALL {
        let above = held[res as usize].saturating_sub([r.vcpus.min, r.memory.min][res as usize]);
        if above > 0 {
            let granularity = if res == Resource::Memory { hypercall_abi::EXTENT_ALIGN } else { 1 };
            match pool.take(member, res, above, granularity).0 {
                Take::Granted(n) if n == above => {}
                _ => {
                    return Err(
                        PoolError::HeldDoesNotFit { name: config.name().to_string(), resource: res.name() }.into()
                    );
                }
            }
        }
    }
    let never = |e: std::convert::Infallible| -> VmError { match e {} };
    let policy = VmPolicy::restore(PolicyArgs { pool: Arc::clone(pool), member, config: r.policy }, &state.policy)
        .map_err(never)?;
    let notices = NoticeBoard::restore((), &state.notices).map_err(never)?;
    let parts = Parts {
        config: config.clone(),
        fd,
        mem,
        layout,
        image,
        cpuid,
        tsc_khz: state.tsc_khz,
        // The guest negotiated its features at boot, on the source host; a record KVM does
        // not keep here simply stops growing.
        steal_time: initial.first().is_some_and(|(v, _, _)| v.steal_time()),
        policy,
        devices,
        vcpus,
        notices,
        console: Console::new(config.name(), host.console),
        endpoints,
        // A migrated VM's run started before its state arrived; its uptime goes on from the
        // source's (`uptime_before`) as of then.
        started: arrived.unwrap_or(host.started),
        uptime_before: std::time::Duration::from_micros(state.uptime_us),
        timeline: host.timeline,
        events: host.events,
        diag,
    };
    let vm = Vm::assemble(parts, initial)?;
    vm.shared().restored_since(arrived);
    phases.devices_us = lap();
    Ok((vm, phases))
}
