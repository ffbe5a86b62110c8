//! One VM's life: creation (KVM VM, memory, platform structures, devices, kernel image, the
//! boot vCPU), its start (vCPU threads), and its end (devices stopped, threads joined, the
//! report). Its owner runs it in between (`crate::control`), and a restored VM is assembled
//! from saved parts by `crate::snapshot`.

use std::io::Write;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};

use crate::base::config::{MemoryBacking, VmConfig, kernel_cmdline};
use crate::base::layout::Layout;
use crate::base::memory::{Backing, GuestMemory, Premapped};
use crate::base::timeline::{Timeline, detail};
use crate::devices::{DeviceContext, DeviceManager, DeviceSetup};
use crate::host::endpoint::Bound;
use crate::policy::admission::VmPolicy;
use crate::policy::pool::Pool;
use crate::vmm::console::{Console, DRAIN_TIMEOUT};
use crate::vmm::error::VmError;
use crate::vmm::loader::{KernelImage, LoaderError};
use crate::vmm::notices::NoticeBoard;
use crate::vmm::outcome::Outcome;
use crate::vmm::platform::{self, BootParams};
use crate::vmm::shared::{EventSink, Parts, VmShared, lock};
use crate::vmm::stats::{BootPhases, RunReport};
use crate::vmm::vcpu::{self, Vcpu};
use crate::vmm::vcpus::{VcpuHandle, VcpuSet};

/// What a VM runs on the host: its KVM, when the shim started, its timeline, its pool, where
/// its console goes and whom it tells what happens.
pub(crate) struct Host<'a> {
    pub(crate) kvm: &'a Kvm,
    pub(crate) started: Instant,
    pub(crate) timeline: Arc<Timeline>,
    pub(crate) pool: &'a Arc<Pool>,
    pub(crate) console: Box<dyn Write + Send>,
    pub(crate) events: EventSink,
    /// A KVM VM with vCPUs made ahead of time (an on-demand slot makes it while it waits for
    /// a client); `None`: made now.
    pub(crate) shell: Option<Box<Shell>>,
}

/// A KVM VM, its first vCPUs and its boot memory slot, made before they are needed: creating
/// them costs ~0.3 ms for the VM, ~0.3 ms per vCPU and ~0.2 ms for the slot here, on the path
/// of a wake or a cold start. Its boot memory is untouched but for the blocks the kernel image
/// goes to (one zeroed 2 MiB huge page each); besides, a few KVM pages and a 12 KiB `kvm_run`
/// mapping per vCPU.
#[derive(Debug)]
pub(crate) struct Shell {
    fd: VmFd,
    /// vCPUs 0, 1, ... in their fresh state ([`Vcpu::create`]).
    vcpus: Vec<Vcpu>,
    /// Boot memory registered as slot 0, if made.
    boot: Option<Premapped>,
}

/// A few [`Shell`]s made ahead for the on-demand slots of a run, and the other things a VM
/// starts faster with (standby threads, huge pages): a slot that waits for a client asks for
/// them ([`WarmPool::top_up`]), a thread of the pool makes them (not in the way of the slot
/// seeing its next client; not at a lower priority, which the standby threads it starts would
/// inherit, and an unprivileged thread cannot raise again), and a
/// wake or cold start takes a shell. Small and shared, so that a thousand sleeping slots do not
/// each keep a KVM VM.
#[derive(Debug, Default)]
pub(crate) struct WarmPool {
    inner: Arc<WarmInner>,
}

#[derive(Debug, Default)]
struct WarmInner {
    shells: std::sync::Mutex<Vec<Shell>>,
    wanted: std::sync::Mutex<Wanted>,
    cond: std::sync::Condvar,
}

/// What the pool's thread is asked to make.
#[derive(Debug, Default)]
struct Wanted {
    /// Boot memory size and the kernel image's guest-physical range of the next shells.
    memory: Option<(u64, (u64, u64))>,
    /// The thread runs.
    started: bool,
    /// The pool is gone: the thread ends.
    closed: bool,
}

impl WarmPool {
    /// Most shells kept ready.
    pub(crate) const SIZE: usize = 2;

    /// Asks for shells with `ram_size` bytes of boot memory for `image` (up to
    /// [`WarmPool::SIZE`]), standby threads and huge pages, made by the pool's thread (started
    /// the first time). Returns at once; best effort (what cannot be made is made on the path
    /// of the next VM, as without the pool).
    pub(crate) fn top_up(&self, ram_size: u64, image: &KernelImage) {
        let mut wanted = lock(&self.inner.wanted);
        wanted.memory = Some((ram_size, (image.start, image.end)));
        if !wanted.started {
            wanted.started = true;
            let inner = Arc::clone(&self.inner);
            let started = std::thread::Builder::new().name("warm-pool".into()).spawn(move || inner.serve());
            if started.is_err() {
                wanted.started = false;
            }
        }
        drop(wanted);
        self.inner.cond.notify_one();
    }

    /// A ready shell, if there is one: one with `ram_size` bytes of boot memory if there is
    /// one (another's boot slot is given up when the VM is made).
    pub(crate) fn take(&self, ram_size: u64) -> Option<Box<Shell>> {
        let mut shells = lock(&self.inner.shells);
        let fits = shells.iter().position(|s| s.boot.as_ref().is_some_and(|b| b.size() == ram_size));
        let shell = match fits {
            Some(i) => shells.swap_remove(i),
            None => shells.pop()?,
        };
        Some(Box::new(shell))
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        lock(&self.inner.wanted).closed = true;
        self.inner.cond.notify_one();
    }
}

impl WarmInner {
    /// The pool's thread: makes what is asked for until the pool is dropped.
    fn serve(&self) {
        let Ok(kvm) = Kvm::new() else { return };
        loop {
            let memory = {
                let mut wanted = lock(&self.wanted);
                loop {
                    if wanted.closed {
                        return;
                    }
                    if let Some(m) = wanted.memory.take() {
                        break m;
                    }
                    wanted = self.cond.wait(wanted).unwrap_or_else(|p| p.into_inner());
                }
            };
            while lock(&self.shells).len() < WarmPool::SIZE {
                let Ok(shell) = Shell::new(&kvm, 1, Some(memory)) else { break };
                lock(&self.shells).push(shell);
            }
            crate::host::standby::top_up();
            crate::host::hugepages::top_up();
        }
    }
}

impl Shell {
    /// A KVM VM with vCPUs `0..vcpus` and, with `memory`, that much boot memory for a kernel
    /// image at that guest-physical range.
    fn new(kvm: &Kvm, vcpus: u32, memory: Option<(u64, (u64, u64))>) -> Result<Shell, VmError> {
        let fd = create_kvm_vm(kvm)?;
        let cpuid = supported_cpuid(kvm)?;
        let mut vcpus = (0..vcpus).map(|id| Vcpu::create(&fd, &cpuid, id)).collect::<Result<Vec<_>, _>>()?;
        let boot = memory.map(|(size, image)| Premapped::new(&fd, size, image)).transpose()?;
        if boot.is_some() {
            // After the boot memory: see prepare_first_run.
            vcpus.iter_mut().for_each(Vcpu::prepare_first_run);
        }
        Ok(Shell { fd, vcpus, boot })
    }

    /// The KVM VM, its vCPUs by id, and its boot memory.
    pub(crate) fn into_parts(self) -> (VmFd, Vec<Vcpu>, Option<Premapped>) {
        (self.fd, self.vcpus, self.boot)
    }
}

/// A vCPU to start with the VM: the vCPU, its handle, and whether it starts parked.
pub(crate) type Initial = (Vcpu, Arc<VcpuHandle>, bool);

/// A VM ready to start.
#[derive(Debug)]
pub(crate) struct Vm {
    shared: Arc<VmShared>,
    /// vCPUs to start: the boot vCPU, or every vCPU of a restored VM.
    initial: Vec<Initial>,
}

/// The KVM VM's CPUID and memory-slot limit.
pub(crate) fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VmError> {
    // The host's answer cannot change while this process runs, and asking costs 0.3–0.5 ms
    // here: a process that boots or wakes VMs again and again (on demand) asks once.
    static SUPPORTED: std::sync::OnceLock<CpuId> = std::sync::OnceLock::new();
    if let Some(c) = SUPPORTED.get() {
        return Ok(c.clone());
    }
    let c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Kvm { what: "get supported CPUID", source })?;
    Ok(SUPPORTED.get_or_init(|| c).clone())
}

/// How many KVM memory slots a VM may use.
pub(crate) fn max_slots(kvm: &Kvm) -> u32 {
    u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX).max(2)
}

/// A new KVM VM.
pub(crate) fn create_kvm_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    kvm.create_vm().map_err(|source| VmError::Kvm { what: "create VM", source })
}

impl Vm {
    /// Builds the VM from an already validated `image`: admits it to the pool, creates the
    /// KVM VM and boot memory, writes the platform structures and boot info, loads the kernel,
    /// creates the devices (serving copies of `endpoints`) and prepares vCPU 0.
    pub(crate) fn create(
        config: &VmConfig,
        image: Arc<KernelImage>,
        host: Host<'_>,
        endpoints: Vec<Bound>,
    ) -> Result<Vm, VmError> {
        let g = &config.guest;
        let mut options = vec![("log", g.log_level.clone())];
        options.extend(g.options.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let cmdline = kernel_cmdline(&g.app, &options, &g.args)?;
        let r = &config.resources;
        let layout = Layout::new(r.memory.min, r.memory.burst);
        if image.end + hypercall_abi::EXTENT_ALIGN > layout.ram_size {
            return Err(LoaderError::TooLarge { end: image.end, ram: layout.ram_size }.into());
        }
        let pool = Arc::clone(host.pool);
        let member = match config.pool_member {
            Some(m) => m,
            None => pool.admit(config.name(), r.vcpus, r.memory, r.weight)?,
        };
        let policy = VmPolicy::new(Arc::clone(&pool), member, r.vcpus, r.memory, r.policy);
        let built = Self::build(config, image, host, policy, layout, cmdline, endpoints);
        if built.is_err() {
            pool.leave(member);
        }
        built
    }

    fn build(
        config: &VmConfig,
        image: Arc<KernelImage>,
        host: Host<'_>,
        policy: VmPolicy,
        layout: Layout,
        cmdline: String,
        endpoints: Vec<Bound>,
    ) -> Result<Vm, VmError> {
        let kvm = host.kvm;
        let t0 = Instant::now();
        let mut phases = BootPhases { before_us: host.started.elapsed().as_micros() as u64, ..BootPhases::default() };
        let (fd, warm, premapped) = match host.shell {
            Some(shell) => {
                let (fd, vcpus, boot) = (*shell).into_parts();
                (fd, vcpus.into_iter().next(), boot)
            }
            None => (create_kvm_vm(kvm)?, None, None),
        };
        // Two independent halves of the boot path run side by side: the boot vCPU (CPUID query,
        // vCPU creation, its registers; made ahead in a shell) on a helper thread, guest memory
        // (mapping, KVM slot, platform structures, kernel image) on this one.
        phases.kvm_us = t0.elapsed().as_micros() as u64;
        let t1 = Instant::now();
        let (prepared, mem) = std::thread::scope(|scope| {
            let vcpu = scope.spawn(|| -> Result<(CpuId, Vcpu, u64), VmError> {
                let t = Instant::now();
                let cpuid = supported_cpuid(kvm)?;
                let vcpu = match warm {
                    Some(v) => v,
                    None => Vcpu::create(&fd, &cpuid, 0)?,
                };
                Ok((cpuid, vcpu, t.elapsed().as_micros() as u64))
            });
            let mem = (|| -> Result<(GuestMemory, u64), VmError> {
                let sizes = (layout.ram_size, layout.window_base, layout.window_size, max_slots(kvm));
                let backing = Backing::fresh(config.resources.memory_backing() == MemoryBacking::Memfd);
                let mem = GuestMemory::boot(&fd, sizes, &backing, premapped)?;
                platform::write_descriptor_tables(&mem)?;
                platform::write_page_tables(&mem, &layout)?;
                image.load(&mem)?;
                Ok((mem, t1.elapsed().as_micros() as u64))
            })();
            let prepared = vcpu.join().unwrap_or_else(|_| Err(VmError::Internal("the vCPU preparation thread failed")));
            (prepared, mem)
        });
        let (cpuid, boot_vcpu, vcpu_us) = prepared?;
        let (mem, memory_us) = mem?;
        (phases.vcpu_us, phases.memory_us) = (vcpu_us, memory_us);
        let t2 = Instant::now();
        // Device pages follow the kernel image; the heap starts after them.
        let setup = device_setup(config, &endpoints);
        let devices = DeviceManager::create(image.end.next_multiple_of(4096), &mem, &setup)?;
        let tsc_khz = boot_vcpu.tsc_khz();
        let steal_time = boot_vcpu.steal_time();
        let r = &config.resources;
        platform::write_boot_info(
            &mem,
            &BootParams {
                layout,
                heap_base: devices.end(),
                devices: (devices.base(), devices.count()),
                tsc_khz,
                cmdline: &cmdline,
                vcpus: r.vcpus,
                memory: r.memory,
            },
        )?;
        boot_vcpu.enter(image.entry, 0, hypercall_abi::BOOT_INFO_ADDR, 0)?;
        let vcpus = VcpuSet::default();
        let handle = vcpus.add_boot_vcpu();
        let parts = Parts {
            config: config.clone(),
            fd,
            mem,
            layout,
            image,
            cpuid,
            tsc_khz,
            steal_time,
            policy,
            devices,
            vcpus,
            notices: NoticeBoard::default(),
            console: Console::new(config.name(), host.console),
            endpoints,
            started: host.started,
            uptime_before: Duration::ZERO,
            timeline: host.timeline,
            events: host.events,
            diag: Arc::clone(&setup.diag),
        };
        let vm = Self::assemble(parts, vec![(boot_vcpu, handle, false)])?;
        phases.devices_us = t2.elapsed().as_micros() as u64;
        vm.shared.set_boot_phases(phases);
        Ok(vm)
    }

    /// A VM of `parts` (a booted one, or one restored from saved parts) with the vCPUs it
    /// starts with: its notice page is written and its devices start serving.
    pub(crate) fn assemble(parts: Parts, initial: Vec<Initial>) -> Result<Vm, VmError> {
        let shared = Arc::new(VmShared::new(parts));
        shared.refresh_notice_page();
        shared.devices().start(shared.mem(), &device_context(&shared))?;
        Ok(Vm { shared, initial })
    }

    /// The shared state.
    pub(crate) fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// Starts the vCPU threads; the VM runs.
    pub(crate) fn start(self) -> RunningVm {
        let shared = self.shared;
        shared.record("boot", detail([("app", shared.app().into())]));
        shared.running_now();
        for (v, handle, parked) in self.initial {
            if let Err(e) = vcpu::spawn(&shared, v, handle, parked) {
                shared.finish(Outcome::Internal(e.to_string()));
            }
        }
        RunningVm { shared }
    }
}

/// What the VM's devices are given: the VM's name, copies of its endpoints, the idle time.
pub(crate) fn device_setup(config: &VmConfig, endpoints: &[Bound]) -> DeviceSetup {
    // A copy that cannot be made leaves the device without that endpoint; the VM's original
    // still holds the port.
    DeviceSetup {
        vm_name: config.name().to_string(),
        endpoints: endpoints.iter().filter_map(|e| e.try_clone().ok()).collect(),
        idle_shutdown: config.lifecycle.idle_shutdown,
        pin_io: config.endpoints.pin_io,
        diag: Arc::new(crate::host::diag::Limiter::new()),
        template_gate: config.take_template,
    }
}

/// The devices' way to the VM: wake vCPU 0, ask the owner to stop the VM.
fn device_context(shared: &Arc<VmShared>) -> DeviceContext {
    let weak: Weak<VmShared> = Arc::downgrade(shared);
    let stop = weak.clone();
    let record = weak.clone();
    let replied = weak.clone();
    let template = weak.clone();
    DeviceContext::new(
        Arc::new(move || weak.upgrade().is_some_and(|vm| vm.wake_device_vcpu())),
        Arc::new(move |why| {
            if let Some(vm) = stop.upgrade() {
                vm.device_stop(why);
            }
        }),
        Arc::new(move |event, port| {
            if let Some(vm) = record.upgrade() {
                vm.record(event, crate::base::timeline::detail([("guest_port", port.into())]));
            }
        }),
        Arc::new(move || {
            if let Some(vm) = replied.upgrade() {
                vm.replied();
            }
        }),
        Arc::new(move || {
            if let Some(vm) = template.upgrade() {
                vm.template_point();
            }
        }),
    )
}

/// A running VM.
#[derive(Debug)]
pub(crate) struct RunningVm {
    shared: Arc<VmShared>,
}

impl RunningVm {
    /// The shared state.
    pub(crate) fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// Ends the VM once its outcome is recorded: the devices stop (their clients are
    /// closed), the vCPU threads are joined, the console drains, the pool takes its resources
    /// back. Returns the run's report.
    pub(crate) fn end(self) -> RunReport {
        let shared = self.shared;
        shared.devices().stop();
        shared.join_threads();
        let outcome = shared.outcome().unwrap_or(Outcome::Internal("no outcome recorded".into()));
        shared.record("end", detail([("exit_code", outcome.exit_code().into())]));
        shared.finish_console(DRAIN_TIMEOUT);
        let policy = shared.policy();
        policy.pool().leave(policy.member());
        shared.report(outcome)
    }
}
