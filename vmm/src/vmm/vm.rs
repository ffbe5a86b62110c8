//! One VM: creation (KVM VM, memory, platform structures, kernel image), the shared state its
//! vCPU threads work on, and the run-to-completion loop.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypercall_abi::{Call, NOTICE_ADDR, NoticePage, notice, wake};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;

use crate::base::config::PolicyConfig;
use crate::base::config::{ConfigError, Policy, kernel_cmdline};
use crate::base::exit;
use crate::base::layout::Layout;
use crate::base::memory::{GuestMemory, MemoryError};
use crate::base::timeline::{Timeline, detail};
use crate::policy::admission::VmPolicy;
use crate::policy::pool::{Pool, PoolError};
use crate::vmm::fault::GuestFault;
use crate::vmm::loader::{KernelImage, LoaderError};
use crate::vmm::platform::{self, BootParams};
use crate::vmm::vcpu::{Vcpu, VcpuError};
use crate::vmm::vcpus::{Entry, VcpuControl, VcpuCounts, VcpuSet};

/// Failures while creating or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("{0}")]
    KvmUnavailable(String),
    /// A KVM ioctl on the VM failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel image was refused or could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// A vCPU could not be created or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pool refused the VM.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A host-side failure with no more specific cause.
    #[error("{0}")]
    Internal(&'static str),
    /// A device could not be set up.
    #[error("device: {0}")]
    Device(String),
    /// A snapshot or migrated state could not be restored.
    #[error("restore: {0}")]
    Restore(String),
}

impl VmError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmError::KvmUnavailable(_) => exit::UNAVAILABLE,
            VmError::Loader(LoaderError::Read { .. }) => exit::NO_INPUT,
            VmError::Loader(LoaderError::TooLarge { .. } | LoaderError::UnknownService { .. })
            | VmError::Config(_)
            | VmError::Pool(_) => exit::USAGE,
            VmError::Loader(_) | VmError::Restore(_) => exit::IMAGE_REFUSED,
            VmError::Kvm { .. } | VmError::Memory(_) | VmError::Vcpu(_) | VmError::Internal(_) | VmError::Device(_) => {
                exit::INTERNAL
            }
        }
    }
}

/// Opens `/dev/kvm`, turning the common failures into one clear line.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| {
        VmError::KvmUnavailable(match e.errno() {
            libc::ENOENT => "/dev/kvm does not exist: this machine does not offer KVM".to_string(),
            libc::EACCES | libc::EPERM => {
                "permission denied opening /dev/kvm: run as root or add your user to the 'kvm' group".to_string()
            }
            _ => format!("cannot open /dev/kvm: {e}"),
        })
    })
}

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The VM's name (timeline, summaries).
    pub name: String,
    /// Service to start.
    pub app: String,
    /// Arguments for the service.
    pub app_args: Vec<String>,
    /// Guest log level (`off`..`trace`).
    pub log_level: String,
    /// Extra `key=value` kernel options (controller thresholds and the like).
    pub guest_opts: Vec<(String, String)>,
    /// vCPU policy.
    pub vcpus: Policy,
    /// Memory policy.
    pub memory: Policy,
    /// Stop the run after this long.
    pub timeout: Option<Duration>,
    /// Burst credit, reclaim grace and enforcement.
    pub policy: PolicyConfig,
    /// Weight in the pool (a heavier VM keeps its burst longer under contention).
    pub weight: u64,
    /// TCP ports published to the guest's request channel (`--publish`).
    pub publish: Vec<crate::devices::vsock::Publish>,
    /// The hybrid-vsock Unix socket (`--vsock-uds`).
    pub vsock_uds: Option<std::path::PathBuf>,
    /// Scale to zero (`--on-demand`): no VM until a client connects to an endpoint; after
    /// `idle_shutdown` the VM stops and the next client boots a new one.
    pub on_demand: bool,
    /// Ask the guest to stop after this long with no client connection open
    /// (`--idle-shutdown`).
    pub idle_shutdown: Option<Duration>,
    /// Restart the VM when it fails (`restart = "on-failure"`, `--restart on-failure`).
    pub restart: Option<RestartPolicy>,
    /// The pool member to run as, when the pool already admitted this VM (an on-demand slot's
    /// reservation); `None`: admit it at creation.
    pub pool_member: Option<usize>,
}

/// Restart on failure: a VM that faults or exits with a code other than 0 and 5 (stopped at
/// the host's request) is booted again, at most `limit` times, after `backoff` (doubling per
/// restart, at most [`RESTART_BACKOFF_MAX`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Most restarts.
    pub limit: u32,
    /// Wait before the first restart.
    pub backoff: Duration,
}

/// Longest wait between restarts.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Outcome {
    /// Whether a restart policy treats this ending as a failure: a guest fault, unbacked
    /// memory, an unserved exit, or a SHUTDOWN code other than 0 and 5. Timeouts, Ctrl-C,
    /// policy kills and the shim's own errors are not restarted.
    pub fn is_failure(&self) -> bool {
        match self {
            Outcome::Shutdown { code } => *code != 0 && *code != 5,
            Outcome::Fault(_) | Outcome::Unbacked { .. } | Outcome::Unserved { .. } => true,
            _ => false,
        }
    }
}

/// How long a guest has to end after the idle shutdown's STOP notice before it is ended.
pub const IDLE_STOP_GRACE: Duration = Duration::from_secs(5);

/// How a run ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The guest called SHUTDOWN.
    Shutdown {
        /// Its exit code.
        code: u32,
    },
    /// The guest raised a CPU exception.
    Fault(Box<GuestFault>),
    /// The guest touched guest-physical memory that nothing backs.
    Unbacked {
        /// The vCPU.
        vcpu: u32,
        /// The address.
        gpa: u64,
        /// Whether it was a write.
        write: bool,
        /// The instruction, with its symbol when known.
        rip: String,
    },
    /// The guest caused an exit the shim does not serve.
    Unserved {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        what: String,
    },
    /// The shim itself failed.
    Internal(String),
    /// `--timeout` expired (with each vCPU's state at that moment).
    Timeout(Duration, String),
    /// The operator interrupted the run twice (Ctrl-C).
    Interrupted,
    /// The VM was ended for ignoring a reclaim (`--on-violation kill`).
    Killed {
        /// The resource it would not give back.
        resource: &'static str,
    },
    /// The VM was ended for not stopping within [`IDLE_STOP_GRACE`] of its idle shutdown.
    IgnoredStop,
    /// On demand: the run ended while no VM was running (no client came, or the last VM had
    /// stopped for being idle).
    NoVm,
    /// The VM moved to another shim process (`ctl migrate`) and runs there.
    Migrated {
        /// Where to.
        to: String,
    },
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Shutdown { code } => u8::try_from(*code).unwrap_or(exit::GUEST_UNSERVED).min(exit::GUEST_MAX),
            Outcome::Fault(_) => exit::GUEST_FAULT,
            Outcome::Unbacked { .. } => exit::GUEST_UNBACKED,
            Outcome::Unserved { .. } => exit::GUEST_UNSERVED,
            Outcome::Internal(_) => exit::INTERNAL,
            Outcome::Timeout(..) => exit::TIMEOUT,
            Outcome::Interrupted => exit::INTERRUPTED,
            Outcome::Killed { .. } | Outcome::IgnoredStop => exit::POLICY_KILL,
            Outcome::NoVm | Outcome::Migrated { .. } => 0,
        }
    }

    /// A short machine-readable reason (the summary's `exit_reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Shutdown { .. } => "shutdown",
            Outcome::Fault(_) => "guest_fault",
            Outcome::Unbacked { .. } => "unbacked_memory",
            Outcome::Unserved { .. } => "unserved_exit",
            Outcome::Internal(_) => "internal_error",
            Outcome::Timeout(..) => "timeout",
            Outcome::Interrupted => "interrupted",
            Outcome::Killed { .. } => "policy_kill",
            Outcome::IgnoredStop => "ignored_stop",
            Outcome::NoVm => "no_vm_running",
            Outcome::Migrated { .. } => "migrated",
        }
    }

    /// The diagnosis printed on stderr (`None` for a normal shutdown).
    pub fn diagnosis(&self) -> Option<String> {
        match self {
            Outcome::Shutdown { .. } => None,
            Outcome::Fault(f) => Some(f.to_string()),
            Outcome::Unbacked { vcpu, gpa, write, rip } => Some(format!(
                "guest on vCPU {vcpu} {} guest-physical address {gpa:#x}, which no memory backs (RIP {rip})",
                if *write { "wrote to" } else { "read from" }
            )),
            Outcome::Unserved { vcpu, what } => Some(format!("guest on vCPU {vcpu}: {what}")),
            Outcome::Internal(what) => Some(format!("shim error: {what}")),
            Outcome::Timeout(d, states) => {
                Some(format!("run stopped after the {:.1} s timeout; vCPUs then:\n{states}", d.as_secs_f64()))
            }
            Outcome::Interrupted => Some("run interrupted (Ctrl-C twice)".into()),
            Outcome::Killed { resource } => Some(format!(
                "VM ended: it kept its {resource} above max past the reclaim grace period (--on-violation kill)"
            )),
            Outcome::IgnoredStop => Some(format!(
                "VM ended: it did not stop within {} s of the idle shutdown's STOP notice",
                IDLE_STOP_GRACE.as_secs()
            )),
            Outcome::NoVm => None,
            Outcome::Migrated { to } => Some(format!("VM migrated to {to}; it runs there now")),
        }
    }
}

/// Counters kept while the VM runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Hypercalls served (all kinds, including refused ones).
    pub hypercalls: AtomicU64,
    /// Hypercalls per call: index 0 collects unknown numbers, index `i + 1` counts
    /// `Call::ALL[i]` (sized from the ABI's call table).
    pub per_call: [AtomicU64; Call::ALL.len() + 1],
    /// Writes to the NOP port.
    pub nop_exits: AtomicU64,
    /// Console bytes written.
    pub console_bytes: AtomicU64,
    /// Requests refused with DENIED (vCPUs and memory).
    pub denied: AtomicU64,
    /// REPORT calls received.
    pub reports: AtomicU64,
    /// REPORT calls above the per-vCPU rate, answered but not recorded.
    pub reports_not_recorded: AtomicU64,
    /// Successful MEM_GRANT calls.
    pub mem_grants: AtomicU64,
    /// Successful MEM_RELEASE calls.
    pub mem_releases: AtomicU64,
    /// Most memory held at once (bytes).
    pub mem_peak: AtomicU64,
    /// The shim's RSS at the guest's first HELLO (bytes).
    pub rss_boot: OnceLock<u64>,
}

impl Stats {
    /// Counts one hypercall with number `n`.
    pub fn count_call(&self, n: u32) {
        self.hypercalls.fetch_add(1, Ordering::Relaxed);
        let i = Call::from_number(n).and_then(|c| Call::ALL.iter().position(|x| *x == c)).map_or(0, |p| p + 1);
        if let Some(c) = self.per_call.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct RunState {
    outcome: Option<Outcome>,
    threads: Vec<(u32, JoinHandle<()>)>,
}

/// Host notices posted to the guest and not yet acknowledged.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Notices {
    /// Pending [`notice`] bits.
    pub pending: u64,
    /// Incremented per posted notice.
    pub seq: u64,
    /// Latest vCPU reclaim target.
    pub vcpu_target: u64,
    /// Latest memory reclaim target.
    pub memory_target: u64,
    /// Latest reclaim grace period.
    pub grace_ns: u64,
}

/// State shared by the VM's vCPU threads.
pub struct VmShared {
    /// The VM's name.
    pub name: String,
    /// The VM's KVM handle.
    pub fd: VmFd,
    /// Guest RAM.
    pub mem: GuestMemory,
    /// Address map.
    pub layout: Layout,
    /// The kernel image (for symbolizing RIPs).
    pub image: Arc<KernelImage>,
    /// vCPU policy.
    pub vcpus: Policy,
    /// Memory policy.
    pub memory: Policy,
    /// CPUID given to every vCPU.
    pub cpuid: CpuId,
    /// TSC frequency the guest sees.
    pub tsc_khz: u64,
    /// When the shim process started (boot time is measured from here).
    pub started: Instant,
    /// Time from `started` to the first HELLO.
    pub first_hello: OnceLock<Duration>,
    /// Counters.
    pub stats: Stats,
    /// Set once the run is ending; vCPU threads leave their loops.
    pub stopping: AtomicBool,
    /// The VM's vCPUs.
    pub vcpu_set: VcpuSet,
    /// Where changes are recorded.
    pub timeline: Arc<Timeline>,
    /// The VM's resource policy and its place in the pool.
    pub policy: VmPolicy,
    /// Paravirtual devices.
    pub devices: crate::devices::Devices,
    notices: Mutex<Notices>,
    console: crate::vmm::console::Console,
    state: Mutex<RunState>,
    ended: Condvar,
    /// The service it runs.
    pub app: String,
    /// Paused by the operator (`ctl pause`): vCPU threads wait instead of entering the guest.
    paused: AtomicBool,
    /// vCPU threads waiting in a pause, and a snapshot's state capture.
    pause_waiters: Mutex<PauseState>,
    pause_cond: Condvar,
    /// The configuration it was created from (a snapshot carries it).
    pub config: VmConfig,
    /// Time from `started` to the moment a restored VM was ready to run.
    pub restored_in: OnceLock<Duration>,
}

/// What a VM is built from (boot or restore).
struct Parts {
    fd: VmFd,
    mem: GuestMemory,
    layout: Layout,
    image: Arc<KernelImage>,
    cpuid: CpuId,
    tsc_khz: u64,
    policy: VmPolicy,
    devices: crate::devices::Devices,
    console: Box<dyn Write + Send>,
}

/// The vCPU threads' side of a pause.
#[derive(Debug, Default)]
struct PauseState {
    /// Threads waiting.
    waiting: u32,
    /// A snapshot is collecting vCPU states.
    capturing: bool,
    /// States saved by the waiting threads (vCPU id, state or why not).
    saved: Vec<(u32, Result<crate::vmm::vcpu::VcpuState, String>)>,
}

impl std::fmt::Debug for VmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShared").field("layout", &self.layout).field("vcpus", &self.vcpus).finish_non_exhaustive()
    }
}

impl VmShared {
    fn state(&self) -> MutexGuard<'_, RunState> {
        // A poisoned lock only means a vCPU thread panicked; the state itself is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared state of a VM being built.
    fn new(config: &VmConfig, parts: Parts, started: Instant, timeline: Arc<Timeline>) -> VmShared {
        let Parts { fd, mem, layout, image, cpuid, tsc_khz, policy, devices, console } = parts;
        VmShared {
            name: config.name.clone(),
            fd,
            mem,
            layout,
            image,
            vcpus: config.vcpus,
            memory: config.memory,
            cpuid,
            tsc_khz,
            started,
            first_hello: OnceLock::new(),
            stats: Stats::default(),
            stopping: AtomicBool::new(false),
            app: config.app.clone(),
            paused: AtomicBool::new(false),
            pause_waiters: Mutex::new(PauseState::default()),
            pause_cond: Condvar::new(),
            config: config.clone(),
            restored_in: OnceLock::new(),
            vcpu_set: VcpuSet::default(),
            timeline,
            policy,
            devices,
            notices: Mutex::new(Notices::default()),
            console: crate::vmm::console::Console::new(&config.name, console),
            state: Mutex::new(RunState { outcome: None, threads: Vec::new() }),
            ended: Condvar::new(),
        }
    }

    /// Starts the device threads serving `endpoints` (none: the devices stay idle).
    fn start_devices(
        self: &Arc<Self>,
        config: &VmConfig,
        endpoints: Vec<crate::devices::vsock::Bound>,
    ) -> Result<(), VmError> {
        let Some(vsock) = self.devices.vsock.as_ref().filter(|_| !endpoints.is_empty()) else { return Ok(()) };
        let weak = Arc::downgrade(self);
        let wake: crate::devices::vsock::Wake = Arc::new(move || {
            if let Some(vm) = weak.upgrade() {
                vm.wake_for_device();
            }
        });
        let idle = config.idle_shutdown.map(|after| {
            let weak = Arc::downgrade(self);
            let fire: crate::devices::vsock::Wake = Arc::new(move || {
                if let Some(vm) = weak.upgrade() {
                    vm.record("idle_shutdown", detail([("idle_ms", (after.as_millis() as u64).into())]));
                    vm.post_notice(notice::STOP, |_| {});
                }
            });
            crate::devices::vsock::IdleShutdown { after, fire }
        });
        vsock.start(&config.name, self.mem.clone(), endpoints, wake, idle).map_err(|e| VmError::Device(e.to_string()))
    }

    /// Hands guest console bytes to the console thread (never blocks; see [`crate::vmm::console`]).
    pub fn console_write(&self, bytes: &[u8]) {
        self.console.write(bytes);
        self.stats.console_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }

    /// Records how the run ended (the first outcome wins) and stops every vCPU.
    pub fn finish(&self, outcome: Outcome) {
        let mut st = self.state();
        if st.outcome.is_none() {
            st.outcome = Some(outcome);
        }
        self.stopping.store(true, Ordering::SeqCst);
        drop(st);
        for ctl in self.vcpu_set.all() {
            ctl.stop();
        }
        self.ended.notify_all();
    }

    /// Whether the operator paused the VM.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Pauses the VM: every vCPU leaves the guest (a running one is kicked out of KVM_RUN) and
    /// waits without using CPU until [`VmShared::resume`]. Returns once every vCPU that was
    /// running guest code is waiting (or after `within`, whichever is first); `false` if the
    /// VM was already paused.
    pub fn pause(&self, within: Duration) -> bool {
        if self.paused.swap(true, Ordering::AcqRel) {
            return false;
        }
        let all = self.vcpu_set.all();
        for ctl in &all {
            ctl.interrupt();
        }
        let deadline = Instant::now() + within;
        let mut waiting = self.pause_waiters.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let running = all.iter().filter(|c| matches!(c.state(), crate::vmm::vcpus::State::Running)).count();
            if waiting.waiting as usize >= running || Instant::now() >= deadline || self.is_stopping() {
                break;
            }
            waiting =
                self.pause_cond.wait_timeout(waiting, Duration::from_millis(1)).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(waiting);
        self.record("pause", serde_json::Map::new());
        true
    }

    /// Resumes a paused VM; `false` if it was not paused.
    pub fn resume(&self) -> bool {
        if !self.paused.swap(false, Ordering::AcqRel) {
            return false;
        }
        let _w = self.pause_waiters.lock().unwrap_or_else(|p| p.into_inner());
        self.pause_cond.notify_all();
        drop(_w);
        self.record("resume", serde_json::Map::new());
        true
    }

    /// Called by vCPU `id`'s thread before it enters the guest: waits while the VM is paused,
    /// and saves its state with `save` when a snapshot asks.
    pub fn wait_while_paused(&self, id: u32, save: &mut dyn FnMut() -> Result<crate::vmm::vcpu::VcpuState, String>) {
        if !self.is_paused() {
            return;
        }
        let mut ps = self.pause_waiters.lock().unwrap_or_else(|p| p.into_inner());
        ps.waiting += 1;
        self.pause_cond.notify_all();
        while self.is_paused() && !self.is_stopping() {
            if ps.capturing && !ps.saved.iter().any(|(v, _)| *v == id) {
                drop(ps);
                let state = save();
                ps = self.pause_waiters.lock().unwrap_or_else(|p| p.into_inner());
                ps.saved.push((id, state));
                self.pause_cond.notify_all();
                continue;
            }
            ps = self.pause_cond.wait_timeout(ps, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
        ps.waiting -= 1;
    }

    /// Collects the state of every vCPU that is not parked, from their threads, while the VM
    /// is paused. A vCPU sleeping in BLOCK is woken (its BLOCK returns `KICK`, which a guest
    /// treats as a spurious wake-up) so that its thread reaches the pause. At most `within`.
    pub fn capture_vcpus(&self, within: Duration) -> Result<Vec<crate::vmm::vcpu::VcpuState>, String> {
        if !self.is_paused() {
            return Err("the VM is not paused".into());
        }
        let mut ps = self.pause_waiters.lock().unwrap_or_else(|p| p.into_inner());
        ps.capturing = true;
        ps.saved.clear();
        self.pause_cond.notify_all();
        drop(ps);
        for ctl in self.vcpu_set.all() {
            if ctl.state() == crate::vmm::vcpus::State::Blocked {
                ctl.wake(wake::KICK, false);
            }
        }
        let deadline = Instant::now() + within;
        let mut ps = self.pause_waiters.lock().unwrap_or_else(|p| p.into_inner());
        let result = loop {
            let want: Vec<u32> = self
                .vcpu_set
                .all()
                .iter()
                .filter(|c| c.state() != crate::vmm::vcpus::State::Parked)
                .map(|c| c.id)
                .collect();
            if want.iter().all(|id| ps.saved.iter().any(|(v, _)| v == id)) {
                break Ok(want);
            }
            if self.is_stopping() {
                break Err("the VM is ending".to_string());
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(format!("a vCPU did not stop within {} ms", within.as_millis()));
            }
            ps = self.pause_cond.wait_timeout(ps, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        };
        ps.capturing = false;
        let mut saved = std::mem::take(&mut ps.saved);
        drop(ps);
        let want = result?;
        saved.retain(|(id, _)| want.contains(id));
        saved.sort_by_key(|(id, _)| *id);
        saved.into_iter().map(|(id, st)| st.map_err(|e| format!("vCPU {id}: {e}"))).collect()
    }

    /// Pending notices and targets (a snapshot carries them).
    pub fn notices(&self) -> Notices {
        *self.notices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run's figures so far (the report a run that ended now with `outcome` would give).
    pub fn report(&self, outcome: Outcome) -> RunReport {
        let per_call = Call::ALL
            .iter()
            .zip(self.stats.per_call.iter().skip(1))
            .map(|(c, n)| (c.name(), n.load(Ordering::Relaxed)))
            .collect();
        RunReport {
            outcome,
            boot: self.first_hello.get().copied(),
            restored: self.restored_in.get().copied(),
            wall: self.started.elapsed(),
            hypercalls: self.stats.hypercalls.load(Ordering::Relaxed),
            per_call,
            vcpus: self.vcpu_set.counts(),
            denied: self.stats.denied.load(Ordering::Relaxed),
            reports: self.stats.reports.load(Ordering::Relaxed),
            reports_not_recorded: self.stats.reports_not_recorded.load(Ordering::Relaxed),
            memory: MemoryCounts {
                peak: self.stats.mem_peak.load(Ordering::Relaxed).max(self.layout.ram_size),
                final_bytes: self.memory_held(),
                grants: self.stats.mem_grants.load(Ordering::Relaxed),
                releases: self.stats.mem_releases.load(Ordering::Relaxed),
                rss_boot: self.stats.rss_boot.get().copied().unwrap_or(0),
                rss_peak: crate::base::memory::process_peak_rss_bytes(),
                rss_end: crate::base::memory::process_rss_bytes(),
            },
            policy: [
                self.policy.resource(crate::policy::resource::Resource::Vcpus),
                self.policy.resource(crate::policy::resource::Resource::Memory),
            ],
            again: self.policy.answers.again.load(Ordering::Relaxed),
            exhausted: self.policy.answers.exhausted.load(Ordering::Relaxed),
            invariants: self.policy.invariants(),
            vsock: self.devices.vsock.as_ref().map(|v| v.shared.stats.figures()),
            console_dropped: self.console.dropped(),
        }
    }

    /// One line per vCPU: state and the RIP of its latest exit (for hang diagnoses).
    pub fn vcpu_states(&self) -> String {
        let mut out = String::new();
        for ctl in self.vcpu_set.all() {
            let rip = ctl.last_rip.load(Ordering::Relaxed);
            let sym = self.image.symbolize(rip).map(|s| format!(" <{s}>")).unwrap_or_default();
            out.push_str(&format!("  vCPU {}: {:?}, last exit at RIP {rip:#x}{sym}\n", ctl.id, ctl.state()));
        }
        out
    }

    /// Wakes the guest because a device put packets in its queues. The guest drives its
    /// devices from vCPU 0, so that is the one woken (from BLOCK; a running vCPU 0 keeps the
    /// wake-up for its next BLOCK and meanwhile polls at its task boundaries anyway).
    pub fn wake_for_device(&self) {
        if let Some(v0) = self.vcpu_set.get(0) {
            if v0.state() == crate::vmm::vcpus::State::Blocked
                && let Some(v) = &self.devices.vsock
            {
                v.shared.stats.guest_wakeups.fetch_add(1, Ordering::Relaxed);
            }
            v0.wake(wake::DEVICE, false);
        }
    }

    /// Whether the run is ending.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Memory the VM holds now: boot memory plus granted extents.
    pub fn memory_held(&self) -> u64 {
        self.mem.held()
    }

    /// Records a timeline event with the VM's current holdings.
    pub fn record(&self, event: &str, detail: serde_json::Map<String, serde_json::Value>) {
        self.timeline.record(&self.name, event, self.vcpu_set.online(), self.memory_held(), detail);
    }

    /// Starts `vcpu` on its own thread.
    pub fn spawn_vcpu(self: &Arc<Self>, vcpu: Vcpu, ctl: Arc<VcpuControl>) -> Result<(), VmError> {
        self.spawn_vcpu_from(vcpu, ctl, false)
    }

    /// Starts `vcpu` on its own thread, `parked` (a restored vCPU that was down) or running.
    pub fn spawn_vcpu_from(self: &Arc<Self>, vcpu: Vcpu, ctl: Arc<VcpuControl>, parked: bool) -> Result<(), VmError> {
        let id = vcpu.id();
        let shared = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name(format!("{}-vcpu{id}", self.name))
            .spawn(move || vcpu.run_from(&shared, &ctl, parked))
            .map_err(|e| VmError::Vcpu(VcpuError::Thread(e.to_string())))?;
        self.state().threads.push((id, handle));
        Ok(())
    }

    /// Creates, enters and starts a new KVM vCPU `id` at `entry`.
    pub fn start_new_vcpu(self: &Arc<Self>, id: u32, entry: Entry, ctl: Arc<VcpuControl>) -> Result<(), VmError> {
        let vcpu = Vcpu::create(self, id)?;
        vcpu.enter(entry.rip, entry.rsp, entry.arg, u64::from(id))?;
        self.spawn_vcpu(vcpu, ctl)
    }

    /// Rewrites the notice page from `n` and the current holdings.
    fn write_notice_page(&self, n: &Notices) {
        let page = NoticePage {
            seq: n.seq,
            pending: n.pending,
            vcpu_target: n.vcpu_target,
            memory_target: n.memory_target,
            grace_ns: n.grace_ns,
            online_vcpus: u64::from(self.vcpu_set.online()),
            memory_bytes: self.memory_held(),
            reserved: [0; 9],
        };
        // The page is inside boot memory, which exists for the VM's whole life.
        let _ = self.mem.write_obj(NOTICE_ADDR, &page);
    }

    /// Refreshes the holdings shown in the notice page (after an up, down, grant, release).
    pub fn refresh_notice_page(&self) {
        let n = self.notices.lock().unwrap_or_else(|p| p.into_inner());
        self.write_notice_page(&n);
    }

    /// Posts notice `bits` (with `update` filling in targets) and wakes every online vCPU.
    pub fn post_notice(&self, bits: u64, update: impl FnOnce(&mut Notices)) {
        {
            let mut n = self.notices.lock().unwrap_or_else(|p| p.into_inner());
            n.pending |= bits;
            n.seq += 1;
            update(&mut n);
            self.write_notice_page(&n);
        }
        for ctl in self.vcpu_set.all() {
            ctl.wake(wake::NOTICE, false);
        }
        self.record("notice", detail([("notice", bits.into())]));
    }

    /// Returns the pending notices and clears them (EVENTS).
    pub fn take_notices(&self) -> Notices {
        let mut n = self.notices.lock().unwrap_or_else(|p| p.into_inner());
        let taken = *n;
        n.pending = 0;
        self.write_notice_page(&n);
        taken
    }
}

/// Everything a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Shim start to first HELLO (`None` if the guest never said HELLO).
    pub boot: Option<Duration>,
    /// Shim start to a restored VM ready to run.
    pub restored: Option<Duration>,
    /// Shim start to the end of the run.
    pub wall: Duration,
    /// Hypercalls served.
    pub hypercalls: u64,
    /// Hypercalls per call name.
    pub per_call: Vec<(&'static str, u64)>,
    /// vCPU counts at the end.
    pub vcpus: VcpuCounts,
    /// Requests refused with DENIED.
    pub denied: u64,
    /// REPORT calls.
    pub reports: u64,
    /// REPORT calls above the per-vCPU rate (not recorded).
    pub reports_not_recorded: u64,
    /// Memory figures.
    pub memory: MemoryCounts,
    /// Per-resource policy state at the end (reclaims, violations, credit).
    pub policy: [crate::policy::resource::ResourcePolicy; 2],
    /// AGAIN and EXHAUSTED answers.
    pub again: u64,
    /// EXHAUSTED answers.
    pub exhausted: u64,
    /// The invariant checks made during the run.
    pub invariants: crate::policy::admission::Invariants,
    /// The request channel's figures.
    pub vsock: Option<crate::devices::vsock::VsockFigures>,
    /// Guest console bytes dropped because nobody read the shim's output fast enough.
    pub console_dropped: u64,
}

impl RunReport {
    /// The report of an on-demand slot whose run ended with no VM running and none run before
    /// (`outcome` says why: interrupted or timed out while waiting for a client).
    pub fn without_vm(config: &VmConfig, outcome: Outcome, wall: Duration) -> RunReport {
        use crate::policy::resource::{Resource, ResourcePolicy};
        let p = &config.policy;
        RunReport {
            outcome,
            boot: None,
            restored: None,
            wall,
            hypercalls: 0,
            per_call: Call::ALL.iter().map(|c| (c.name(), 0)).collect(),
            vcpus: VcpuCounts::default(),
            denied: 0,
            reports: 0,
            reports_not_recorded: 0,
            memory: MemoryCounts::default(),
            policy: [
                ResourcePolicy::new(Resource::Vcpus, config.vcpus, p.budget[0], p.refill[0]),
                ResourcePolicy::new(Resource::Memory, config.memory, p.budget[1], p.refill[1]),
            ],
            again: 0,
            exhausted: 0,
            invariants: crate::policy::admission::Invariants::default(),
            vsock: None,
            console_dropped: 0,
        }
    }
}

/// Memory figures of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryCounts {
    /// Most bytes held at once.
    pub peak: u64,
    /// Bytes held at the end.
    pub final_bytes: u64,
    /// Successful MEM_GRANT calls.
    pub grants: u64,
    /// Successful MEM_RELEASE calls.
    pub releases: u64,
    /// The shim's RSS at the first HELLO.
    pub rss_boot: u64,
    /// The shim's peak RSS.
    pub rss_peak: u64,
    /// The shim's RSS at the end of the run.
    pub rss_end: u64,
}

/// A VM ready to run.
#[derive(Debug)]
pub struct Vm {
    shared: Arc<VmShared>,
    timeout: Option<Duration>,
    /// vCPUs to start: the boot vCPU, or every vCPU of a restored VM (`true`: parked).
    initial: Vec<(Vcpu, Arc<VcpuControl>, bool)>,
}

/// Where a restored VM's memory comes from.
#[derive(Debug)]
pub enum RestoreMemory {
    /// A snapshot's memory file (mapped privately, read lazily).
    File(std::fs::File),
    /// Memory already filled by a migration receiver, with its KVM VM (slots registered).
    Live {
        /// The KVM VM the memory is registered with.
        fd: VmFd,
        /// The memory.
        mem: GuestMemory,
    },
}

impl Vm {
    /// Builds the VM from an already validated `image`: creates the KVM VM and boot memory,
    /// writes the platform structures and boot info, loads the kernel and prepares vCPU 0.
    /// Guest console output goes to `console`.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        config: &VmConfig,
        image: Arc<KernelImage>,
        kvm: &Kvm,
        started: Instant,
        timeline: Arc<Timeline>,
        pool: &Arc<Pool>,
        console: Box<dyn Write + Send>,
        endpoints: Vec<crate::devices::vsock::Bound>,
    ) -> Result<Vm, VmError> {
        let mut options = vec![("log", config.log_level.clone())];
        options.extend(config.guest_opts.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let cmdline = kernel_cmdline(&config.app, &options, &config.app_args)?;
        let layout = Layout::new(config.memory.min, config.memory.burst);
        if image.end + hypercall_abi::EXTENT_ALIGN > layout.ram_size {
            return Err(LoaderError::TooLarge { end: image.end, ram: layout.ram_size }.into());
        }
        let member = match config.pool_member {
            Some(m) => m,
            None => pool.admit(&config.name, config.vcpus, config.memory, config.weight)?,
        };
        let policy = VmPolicy::new(Arc::clone(pool), member, config.vcpus, config.memory, config.policy);
        let built = Self::build(config, image, kvm, started, timeline, policy, console, layout, cmdline, endpoints);
        if built.is_err() {
            pool.leave(member);
        }
        built
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        config: &VmConfig,
        image: Arc<KernelImage>,
        kvm: &Kvm,
        started: Instant,
        timeline: Arc<Timeline>,
        policy: VmPolicy,
        console: Box<dyn Write + Send>,
        layout: Layout,
        cmdline: String,
        endpoints: Vec<crate::devices::vsock::Bound>,
    ) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(|source| VmError::Kvm { what: "create VM", source })?;
        // Two independent halves of the boot path run side by side: the boot vCPU (CPUID query,
        // vCPU creation, its registers) on a helper thread, guest memory (mapping, KVM slot,
        // platform structures, kernel image) on this one.
        let (prepared, mem) = std::thread::scope(|scope| {
            let vcpu = scope.spawn(|| -> Result<(CpuId, Vcpu), VmError> {
                let cpuid = kvm
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|source| VmError::Kvm { what: "get supported CPUID", source })?;
                let vcpu = Vcpu::create_on(&fd, &cpuid, 0)?;
                Ok((cpuid, vcpu))
            });
            let mem = (|| -> Result<GuestMemory, VmError> {
                let max_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX).max(2);
                let mem = GuestMemory::with_window(layout.ram_size, layout.window_base, layout.window_size, max_slots)?;
                mem.register_boot_slot(&fd)?;
                platform::write_descriptor_tables(&mem)?;
                platform::write_page_tables(&mem, &layout)?;
                image.load(&mem)?;
                Ok(mem)
            })();
            let prepared = vcpu.join().unwrap_or_else(|_| Err(VmError::Internal("the vCPU preparation thread failed")));
            (prepared, mem)
        });
        let (cpuid, boot_vcpu) = prepared?;
        let mem = mem?;
        // Device pages follow the kernel image; the heap starts after them.
        let devices_base = image.end.next_multiple_of(4096);
        let vsock =
            crate::devices::vsock::Vsock::new(devices_base, &mem).map_err(|e| VmError::Device(e.to_string()))?;
        let devices = crate::devices::Devices { vsock: Some(vsock) };
        let heap_base = devices_base + devices.count() * hypercall_abi::virtio::VIRTIO_DEVICE_PAGE;
        let tsc_khz = boot_vcpu.tsc_khz();
        let parts = Parts { fd, mem, layout, image, cpuid, tsc_khz, policy, devices, console };
        let shared = VmShared::new(config, parts, started, timeline);
        platform::write_boot_info(
            &shared.mem,
            &BootParams {
                layout,
                heap_base,
                devices: (devices_base, shared.devices.count()),
                tsc_khz: shared.tsc_khz,
                cmdline: &cmdline,
                vcpus: config.vcpus,
                memory: config.memory,
            },
        )?;
        boot_vcpu.enter(shared.image.entry, 0, hypercall_abi::BOOT_INFO_ADDR, 0)?;
        let ctl = shared.vcpu_set.add_boot_vcpu();
        shared.refresh_notice_page();
        let shared = Arc::new(shared);
        shared.start_devices(config, endpoints)?;
        Ok(Vm { shared, timeout: config.timeout, initial: vec![(boot_vcpu, ctl, false)] })
    }

    /// Rebuilds a VM from a snapshot or a migration: memory, vCPUs (running ones with their
    /// saved state, parked ones parked), the device (its open connections reset), notices,
    /// policy limits and credit; its holdings are charged to `pool`. Published `endpoints`
    /// are served again.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        config: &VmConfig,
        image: Arc<KernelImage>,
        kvm: &Kvm,
        started: Instant,
        timeline: Arc<Timeline>,
        pool: &Arc<Pool>,
        console: Box<dyn Write + Send>,
        endpoints: Vec<crate::devices::vsock::Bound>,
        state: crate::snapshot::VmState,
        memory: RestoreMemory,
    ) -> Result<Vm, VmError> {
        let member = pool.admit(&config.name, config.vcpus, config.memory, config.weight)?;
        let vm = Self::rebuild(config, image, kvm, started, timeline, pool, member, console, endpoints, state, memory);
        if vm.is_err() {
            pool.leave(member);
        }
        vm
    }

    #[allow(clippy::too_many_arguments)]
    fn rebuild(
        config: &VmConfig,
        image: Arc<KernelImage>,
        kvm: &Kvm,
        started: Instant,
        timeline: Arc<Timeline>,
        pool: &Arc<Pool>,
        member: usize,
        console: Box<dyn Write + Send>,
        endpoints: Vec<crate::devices::vsock::Bound>,
        state: crate::snapshot::VmState,
        memory: RestoreMemory,
    ) -> Result<Vm, VmError> {
        use crate::policy::resource::Resource;
        let bad = |what: String| VmError::Restore(what);
        let layout = state.layout;
        let (fd, mem) = match memory {
            RestoreMemory::Live { fd, mem } => (fd, mem),
            RestoreMemory::File(file) => {
                let fd = kvm.create_vm().map_err(|source| VmError::Kvm { what: "create VM", source })?;
                let max_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX).max(2);
                let boot = state.regions.first().ok_or_else(|| bad("the snapshot lists no memory".into()))?;
                if boot.gpa != 0 || boot.len != layout.ram_size {
                    return Err(bad("the snapshot's boot memory does not match its layout".into()));
                }
                let backing = crate::base::memory::Backing::File { file: &file, offset: boot.offset };
                let mem = GuestMemory::with_backing(
                    layout.ram_size,
                    layout.window_base,
                    layout.window_size,
                    max_slots,
                    &backing,
                )?;
                mem.register_boot_slot(&fd)?;
                for r in &state.regions[1..] {
                    let e = hypercall_abi::Extent { base: r.gpa, len: r.len };
                    mem.restore_extent(&fd, e, &crate::base::memory::Backing::File { file: &file, offset: r.offset })?;
                }
                (fd, mem)
            }
        };
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm { what: "get supported CPUID", source })?;
        let mut vcpus = Vec::new();
        for (id, &online) in state.online.iter().enumerate() {
            let vcpu = Vcpu::create_on(&fd, &cpuid, id as u32)?;
            if online {
                let saved = state
                    .vcpus
                    .iter()
                    .find(|v| v.id == id as u32)
                    .ok_or_else(|| bad(format!("vCPU {id} is online but has no saved state")))?;
                vcpu.load_state(saved)?;
            }
            vcpus.push((vcpu, !online));
        }
        let devices = match &state.device {
            Some(d) => crate::devices::Devices {
                vsock: Some(
                    crate::devices::vsock::Vsock::restore(state.device_page, &mem, d)
                        .map_err(|e| VmError::Device(e.to_string()))?,
                ),
            },
            None => crate::devices::Devices::default(),
        };
        // Charge what the VM holds above its min (admission reserved the min).
        let online = state.online.iter().filter(|&&o| o).count() as u64;
        let held = [online, mem.held()];
        for r in Resource::ALL {
            let above = held[r as usize].saturating_sub([config.vcpus.min, config.memory.min][r as usize]);
            if above > 0 {
                let granularity = if r == Resource::Memory { hypercall_abi::EXTENT_ALIGN } else { 1 };
                match pool.take(member, r, above, granularity).0 {
                    crate::policy::pool::Take::Granted(n) if n == above => {}
                    _ => return Err(bad(format!("the pool has no room for the {} the VM holds", r.name()))),
                }
            }
        }
        let policy = VmPolicy::new(Arc::clone(pool), member, config.vcpus, config.memory, config.policy);
        policy.set_credits(state.credits);
        let parts = Parts { fd, mem, layout, image, cpuid, tsc_khz: state.tsc_khz, policy, devices, console };
        let mut shared = VmShared::new(config, parts, started, timeline);
        *shared.notices.get_mut().unwrap_or_else(|p| p.into_inner()) = state.notices;
        let ctls = shared.vcpu_set.restore(&state.online);
        shared.refresh_notice_page();
        let shared = Arc::new(shared);
        shared.start_devices(config, endpoints)?;
        let _ = shared.restored_in.set(started.elapsed());
        let initial = vcpus.into_iter().zip(ctls).map(|((v, parked), c)| (v, c, parked)).collect();
        Ok(Vm { shared, timeout: config.timeout, initial })
    }

    /// The shared state (for tests and tools).
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// Runs the VM until it shuts down, fails or times out.
    pub fn run(mut self) -> RunReport {
        let shared = Arc::clone(&self.shared);
        shared.record("boot", detail([("app", "".into())]));
        for (v, ctl, parked) in std::mem::take(&mut self.initial) {
            if let Err(e) = shared.spawn_vcpu_from(v, ctl, parked) {
                shared.finish(Outcome::Internal(e.to_string()));
            }
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut interrupts_seen = crate::host::signals::interrupts();
        let mut idle_stop_at: Option<Instant> = None;
        loop {
            let st = shared.state();
            if st.outcome.is_some() {
                break;
            }
            // Wake up at least every 50 ms to notice Ctrl-C.
            let mut wait = Duration::from_millis(50);
            if let Some(d) = deadline {
                wait = wait.min(d.saturating_duration_since(Instant::now()));
            }
            drop(shared.ended.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()));
            if deadline.is_some_and(|d| Instant::now() >= d) {
                shared.finish(Outcome::Timeout(self.timeout.unwrap_or_default(), shared.vcpu_states()));
            }
            if shared.devices.vsock.as_ref().is_some_and(|v| v.shared.stats.idle_shutdown.load(Ordering::Acquire)) {
                let at = *idle_stop_at.get_or_insert_with(Instant::now);
                if at.elapsed() >= IDLE_STOP_GRACE {
                    shared.finish(Outcome::IgnoredStop);
                }
            }
            let interrupts = crate::host::signals::interrupts();
            if interrupts != interrupts_seen {
                interrupts_seen = interrupts;
                if interrupts >= 2 {
                    shared.finish(Outcome::Interrupted);
                } else {
                    eprintln!("hypervisor-shim: asking the guest to stop (Ctrl-C again to end the run now)");
                    shared.post_notice(notice::STOP, |_| {});
                }
            }
        }
        // The device threads end first (their clients are closed).
        shared.devices.stop();
        // Join every vCPU thread; new ones cannot start once `stopping` is set.
        loop {
            let next = shared.state().threads.pop();
            match next {
                Some((_, h)) => {
                    let _ = h.join();
                }
                None => break,
            }
        }
        let outcome = shared.state().outcome.clone().unwrap_or(Outcome::Internal("no outcome recorded".into()));
        shared.record("end", detail([("exit_code", outcome.exit_code().into())]));
        shared.console.finish(crate::vmm::console::DRAIN_TIMEOUT);
        shared.policy.pool.leave(shared.policy.member);
        shared.report(outcome)
    }
}
