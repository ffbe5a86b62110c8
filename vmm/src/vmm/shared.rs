//! The state a VM's threads share ([`VmShared`]): its KVM handle, memory, vCPUs, devices,
//! policy, notices, console and counters, and how its run ends.
//!
//! Fields are private: other layers use the accessors, and the VM's threads are driven
//! through their handles ([`crate::vmm::vcpus`]), never through flags set here. The VM tells
//! its owner (the thread that runs it) what happens through an [`EventSink`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypercall_abi::{Call, wake};
use kvm_bindings::CpuId;
use kvm_ioctls::VmFd;

use crate::base::config::VmConfig;
use crate::base::layout::Layout;
use crate::base::memory::GuestMemory;
use crate::base::timeline::{Timeline, detail};
use crate::devices::{DeviceManager, StopReason};
use crate::host::diag::Limiter;
use crate::host::endpoint::Bound;
use crate::policy::admission::{Record, VmPolicy};
use crate::policy::resource::Resource;
use crate::vmm::console::Console;
use crate::vmm::cpu_state::VcpuState;
use crate::vmm::loader::KernelImage;
use crate::vmm::notices::{Holdings, NoticeBoard, Notices};
use crate::vmm::outcome::Outcome;
use crate::vmm::stats::{BootPhases, FirstReply, MemoryCounts, RunReport, Stats};
use crate::vmm::vcpus::{State, VcpuEvent, VcpuResponse, VcpuSet};

/// Which vCPU ids are online, and the saved state of each that is.
pub(crate) type Saved = (Vec<bool>, Vec<VcpuState>);

/// Something to do once the vCPU threads have started.
pub(crate) type Started = Box<dyn FnOnce() + Send>;

/// What a VM tells its owner.
#[derive(Debug)]
pub(crate) enum VmEvent {
    /// The run's outcome was recorded (the VM is ending).
    Ended,
    /// A device asks the VM to stop.
    DeviceStop(StopReason),
    /// The service accepted its first client, none of whose bytes reached the guest yet: the
    /// moment to take a template (the device waits for it).
    TemplatePoint,
}

/// Where a VM's events go (its owner's channel).
pub(crate) type EventSink = Arc<dyn Fn(VmEvent) + Send + Sync>;

/// Everything a VM is made of (a booted one or a restored one).
pub(crate) struct Parts {
    pub(crate) config: VmConfig,
    pub(crate) fd: VmFd,
    pub(crate) mem: GuestMemory,
    pub(crate) layout: Layout,
    pub(crate) image: Arc<KernelImage>,
    pub(crate) cpuid: CpuId,
    pub(crate) tsc_khz: u64,
    /// KVM keeps steal time for the boot vCPU (offered to the guest at HELLO).
    pub(crate) steal_time: bool,
    pub(crate) policy: VmPolicy,
    pub(crate) devices: DeviceManager,
    pub(crate) vcpus: VcpuSet,
    pub(crate) notices: NoticeBoard,
    pub(crate) console: Console,
    pub(crate) endpoints: Vec<Bound>,
    pub(crate) started: Instant,
    /// How long the VM had run before this process (restored or migrated; zero for a boot).
    pub(crate) uptime_before: Duration,
    pub(crate) timeline: Arc<Timeline>,
    pub(crate) events: EventSink,
    /// The limit on the diagnostics the guest can cause (shared with the devices).
    pub(crate) diag: Arc<Limiter>,
}

/// State shared by the VM's threads.
pub(crate) struct VmShared {
    config: VmConfig,
    fd: VmFd,
    mem: GuestMemory,
    layout: Layout,
    image: Arc<KernelImage>,
    cpuid: CpuId,
    tsc_khz: u64,
    steal_time: bool,
    policy: VmPolicy,
    devices: DeviceManager,
    vcpus: VcpuSet,
    notices: NoticeBoard,
    console: Console,
    /// The VM's host endpoints (the device serves copies); a migration hands them over.
    endpoints: Mutex<Vec<Bound>>,
    started: Instant,
    uptime_before: Duration,
    timeline: Arc<Timeline>,
    events: EventSink,
    stats: Stats,
    diag: Arc<Limiter>,
    /// Time from `started` to the first HELLO.
    first_hello: OnceLock<Duration>,
    /// Time from `started` to the moment a restored VM was ready to run.
    restored_in: OnceLock<Duration>,
    /// The first bytes the VM wrote to a client.
    first_reply: OnceLock<FirstReply>,
    /// Restarts of its slot before this VM (`--restart on-failure`), for `ctl get`.
    restarts_before: OnceLock<u64>,
    /// A booted VM's creation phases (the guest's is added at HELLO).
    boot_phases: OnceLock<BootPhases>,
    /// Time from `started` to the vCPU threads started.
    running_at: OnceLock<Duration>,
    /// See [`VmShared::stopped_by_migration`].
    stopped_by_migration: AtomicBool,
    /// Called once the vCPU threads start ([`VmShared::on_started`]).
    on_started: Mutex<Option<Started>>,
    /// The shim's page faults when this VM was built.
    faults_at_start: u64,
    /// Set once the run is ending; vCPU threads leave their loops.
    stopping: AtomicBool,
    /// Paused by the operator: vCPUs stay out of the guest (new ones start paused).
    paused: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for VmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShared")
            .field("name", &self.config.name())
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Locks `m`, also after a panic in another holder.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked; the data is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmShared {
    /// The shared state of a VM made of `parts`.
    pub(crate) fn new(parts: Parts) -> VmShared {
        let Parts {
            config,
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
            notices,
            console,
            endpoints,
            started,
            uptime_before,
            timeline,
            events,
            diag,
        } = parts;
        VmShared {
            config,
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
            notices,
            console,
            endpoints: Mutex::new(endpoints),
            started,
            uptime_before,
            timeline,
            events,
            stats: Stats::default(),
            diag,
            first_hello: OnceLock::new(),
            restored_in: OnceLock::new(),
            first_reply: OnceLock::new(),
            restarts_before: OnceLock::new(),
            boot_phases: OnceLock::new(),
            running_at: OnceLock::new(),
            stopped_by_migration: AtomicBool::new(false),
            on_started: Mutex::new(None),
            faults_at_start: crate::host::process::page_faults(),
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            outcome: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
        }
    }

    /// The limit on the diagnostics the guest can cause: every stderr line a guest can
    /// provoke goes through it.
    pub(crate) fn diag(&self) -> &Limiter {
        &self.diag
    }

    /// The VM's name.
    pub(crate) fn name(&self) -> &str {
        self.config.name()
    }

    /// The service it runs.
    pub(crate) fn app(&self) -> &str {
        &self.config.guest.app
    }

    /// The configuration it was created from.
    pub(crate) fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Its KVM handle.
    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Its RAM.
    pub(crate) fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// Its address map.
    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }

    /// Its kernel image (symbols for diagnoses).
    pub(crate) fn image(&self) -> &Arc<KernelImage> {
        &self.image
    }

    /// The CPUID every vCPU gets.
    pub(crate) fn cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// The TSC frequency the guest was told.
    pub(crate) fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// Whether KVM keeps steal time for the boot vCPU.
    pub(crate) fn steal_time(&self) -> bool {
        self.steal_time
    }

    /// The VM's steal time since boot (ns): the sum of KVM's records in the steal-time page
    /// (a record KVM is writing at this instant may be read half-old; a figure, not an
    /// account).
    fn steal_ns(&self) -> u64 {
        (0..hypercall_abi::MAX_VCPUS)
            .filter_map(|id| self.mem.read_obj::<hypercall_abi::StealTime>(hypercall_abi::StealTime::addr(id)).ok())
            .fold(0u64, |sum, r| sum.saturating_add(r.steal))
    }

    /// Its resource policy and its place in the pool.
    pub(crate) fn policy(&self) -> &VmPolicy {
        &self.policy
    }

    /// Its devices.
    pub(crate) fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Its vCPUs.
    pub(crate) fn vcpus(&self) -> &VcpuSet {
        &self.vcpus
    }

    /// Its counters.
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// When the shim started (boot time is measured from here).
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// How long the VM has run, across the processes it was restored or migrated through.
    pub(crate) fn uptime(&self) -> Duration {
        self.uptime_before + self.started.elapsed()
    }

    /// Notes where a booted VM's creation took its time.
    pub(crate) fn set_boot_phases(&self, phases: BootPhases) {
        let _ = self.boot_phases.set(phases);
    }

    /// Notes that a migration that ended unclear left the VM stopped (paused, its devices
    /// holding, its memory frozen): `ctl resume` lets all of it go on.
    pub(crate) fn stopped_by_migration(&self) {
        self.stopped_by_migration.store(true, Ordering::SeqCst);
    }

    /// Notes that the vCPU threads start now.
    pub(crate) fn running_now(&self) {
        let _ = self.running_at.set(self.started.elapsed());
    }

    /// Has `f` called by the first vCPU thread about to enter the guest (a migrated VM tells
    /// its source when it runs).
    pub(crate) fn on_started(&self, f: Started) {
        *lock(&self.on_started) = Some(f);
    }

    /// Calls what [`VmShared::on_started`] left, once.
    pub(crate) fn started_now(&self) {
        let f = lock(&self.on_started).take();
        if let Some(f) = f {
            f();
        }
    }

    /// Notes the first HELLO (boot time); `true` the first time.
    pub(crate) fn hello_seen(&self) -> bool {
        self.first_hello.set(self.started.elapsed()).is_ok()
    }

    /// Notes the VM's first bytes to a client (the first call counts): a `first_reply` line
    /// in the timeline, with the page faults the shim took since the VM was built.
    pub(crate) fn replied(&self) {
        if self.first_reply.get().is_none() {
            let faults = crate::host::process::page_faults().saturating_sub(self.faults_at_start);
            if self.first_reply.set(FirstReply { at: self.started.elapsed(), faults }).is_ok() {
                self.record("first_reply", detail([("faults", faults.into())]));
            }
        }
    }

    /// The device stopped at its template point: tells the owner.
    pub(crate) fn template_point(&self) {
        (self.events)(VmEvent::TemplatePoint);
    }

    /// Notes how many times its slot restarted before this VM (set once).
    pub(crate) fn set_restarts_before(&self, n: u64) {
        let _ = self.restarts_before.set(n);
    }

    /// Restarts of its slot before this VM.
    pub(crate) fn restarts_before(&self) -> u64 {
        self.restarts_before.get().copied().unwrap_or(0)
    }

    /// Notes that a restored VM is ready to run: its restore took since `arrived` (a migrated
    /// VM's state arrived then), or since the run started.
    pub(crate) fn restored_since(&self, arrived: Option<std::time::Instant>) {
        let _ = self.restored_in.set(arrived.unwrap_or(self.started).elapsed());
    }

    /// Hands guest console bytes to the console thread (never blocks; see [`Console`]).
    pub(crate) fn console_write(&self, bytes: &[u8]) {
        self.console.write(bytes);
        self.stats.console_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }

    /// Records how the run ended (the first outcome wins), tells every vCPU to finish and the
    /// owner that the VM is ending.
    pub(crate) fn finish(&self, outcome: Outcome) {
        {
            let mut o = lock(&self.outcome);
            if o.is_none() {
                *o = Some(outcome);
            }
            self.stopping.store(true, Ordering::SeqCst);
        }
        // A VM that ends before a vCPU entered the guest never runs: what waited for that
        // goes now (a migration's source then stops waiting for its `G`).
        drop(lock(&self.on_started).take());
        self.vcpus.tell_all(|| VcpuEvent::Finish);
        (self.events)(VmEvent::Ended);
    }

    /// How the run ended, once it has.
    pub(crate) fn outcome(&self) -> Option<Outcome> {
        lock(&self.outcome).clone()
    }

    /// Whether the run is ending.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Whether the operator paused the VM.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Pauses the VM: every vCPU leaves the guest (a running one is kicked out of KVM_RUN) and
    /// waits without using CPU until [`VmShared::resume`]. Returns once every vCPU answered
    /// (or after `within`, whichever is first); `false` if the VM was already paused.
    pub(crate) fn pause(&self, within: Duration) -> bool {
        let paused = self.pause_quietly(within);
        if paused {
            self.record("pause", serde_json::Map::new());
        }
        paused
    }

    /// [`VmShared::pause`] without a timeline line (a migration's throttle pauses the VM
    /// many times a second).
    pub(crate) fn pause_quietly(&self, within: Duration) -> bool {
        if self.paused.swap(true, Ordering::SeqCst) {
            return false;
        }
        // A vCPU asleep in BLOCK or parked serves the pause before it could enter the guest
        // again (its event waits in its queue): only those in or around KVM_RUN must answer.
        self.vcpus.ask_all(VcpuEvent::Pause, |s| matches!(s, State::Running | State::Starting(_)), within);
        true
    }

    /// Resumes a paused VM; `false` if it was not paused.
    pub(crate) fn resume(&self) -> bool {
        let resumed = self.resume_quietly();
        if resumed {
            self.record("resume", serde_json::Map::new());
        }
        resumed
    }

    /// [`VmShared::resume`] without a timeline line.
    pub(crate) fn resume_quietly(&self) -> bool {
        if !self.paused.swap(false, Ordering::SeqCst) {
            return false;
        }
        if self.stopped_by_migration.swap(false, Ordering::SeqCst) {
            // A migration that ended unclear left the devices holding and the memory frozen.
            self.mem.freeze(false);
            self.devices().release();
        }
        self.vcpus.tell_all(|| VcpuEvent::Resume);
        true
    }

    /// The state of every vCPU that is not parked, from their threads, while the VM is
    /// paused; and which vCPU ids are online. At most `within`. `meanwhile` runs on this
    /// thread (always) while the vCPU threads save: a quiesce holds the devices then, one
    /// hand-off instead of two in a row.
    pub(crate) fn save_vcpus_while<R>(
        &self,
        within: Duration,
        meanwhile: impl FnOnce() -> R,
    ) -> (Result<Saved, String>, R) {
        if !self.is_paused() {
            return (Err("the VM is not paused".into()), meanwhile());
        }
        let online = self.vcpus.online_map();
        let (answers, done) = self.vcpus.ask_all_while(VcpuEvent::SaveState, |_| true, within, meanwhile);
        (self.saved_states(online, answers, within), done)
    }

    /// The states in `answers`, checked against the `online` vCPUs.
    fn saved_states(
        &self,
        online: Vec<bool>,
        answers: Vec<(u32, VcpuResponse)>,
        within: Duration,
    ) -> Result<Saved, String> {
        let want = online.iter().filter(|&&o| o).count();
        if self.is_stopping() {
            return Err("the VM is ending".into());
        }
        let mut states = Vec::new();
        for (id, answer) in answers {
            match answer {
                VcpuResponse::Saved(s) => states.push(*s),
                VcpuResponse::Parked | VcpuResponse::Paused => {}
                VcpuResponse::Failed(why) => return Err(format!("vCPU {id}: {why}")),
            }
        }
        if states.len() != want || states.iter().any(|s| !online.get(s.id as usize).copied().unwrap_or(false)) {
            return Err(format!("a vCPU did not stop within {} ms", within.as_millis()));
        }
        Ok((online, states))
    }

    /// Registers a vCPU thread (joined when the run ends). `false` when the VM is ending
    /// (the thread is joined now).
    pub(crate) fn add_thread(&self, handle: JoinHandle<()>) {
        lock(&self.threads).push(handle);
    }

    /// Joins every vCPU thread; new ones cannot start once the VM is ending.
    pub(crate) fn join_threads(&self) {
        loop {
            let next = lock(&self.threads).pop();
            match next {
                Some(h) => {
                    let _ = h.join();
                }
                None => break,
            }
        }
    }

    /// Waits until the console's output is written (at most `within`).
    pub(crate) fn finish_console(&self, within: Duration) {
        self.console.finish(within);
    }

    /// The VM's endpoints (the listening sockets a migration hands over).
    pub(crate) fn endpoints(&self) -> MutexGuard<'_, Vec<Bound>> {
        lock(&self.endpoints)
    }

    /// Wakes the guest because a device put packets in its queues. The guest drives its
    /// devices from vCPU 0, so that is the one woken (from BLOCK; a running vCPU 0 keeps the
    /// wake-up for its next BLOCK and meanwhile polls at its task boundaries anyway). Returns
    /// whether it was asleep.
    pub(crate) fn wake_device_vcpu(&self) -> bool {
        self.vcpus.get(0).is_some_and(|v0| v0.wake(wake::DEVICE, false))
    }

    /// Tells the owner that a device asks the VM to stop.
    pub(crate) fn device_stop(&self, why: StopReason) {
        (self.events)(VmEvent::DeviceStop(why));
    }

    /// Memory the VM holds now: boot memory plus granted extents.
    pub(crate) fn memory_held(&self) -> u64 {
        self.mem.held()
    }

    fn holdings(&self) -> Holdings {
        let [v, m] = self.policy.limits();
        Holdings {
            vcpus: self.vcpus.online(),
            memory: self.memory_held(),
            vcpu_limits: (v.max, v.burst),
            memory_limits: (m.max, m.burst),
        }
    }

    /// Records a timeline event with the VM's current holdings.
    pub(crate) fn record(&self, event: &str, detail: serde_json::Map<String, serde_json::Value>) {
        self.timeline.record(self.name(), event, self.vcpus.online(), self.memory_held(), detail);
    }

    /// Records the lines a policy decision asked for.
    pub(crate) fn record_all(&self, records: Vec<Record>) {
        for (event, detail) in records {
            self.record(event, detail);
        }
    }

    /// Refreshes the holdings shown in the notice page (after an up, down, grant, release).
    pub(crate) fn refresh_notice_page(&self) {
        self.notices.refresh(&self.mem, self.holdings());
    }

    /// Posts notice `bits` (with `update` filling in targets) and wakes every online vCPU.
    pub(crate) fn post_notice(&self, bits: u64, update: impl FnOnce(&mut Notices)) {
        self.notices.post(&self.mem, self.holdings(), bits, update);
        for h in self.vcpus.all() {
            h.wake(wake::NOTICE, false);
        }
        self.record("notice", crate::base::timeline::detail([("notice", bits.into())]));
    }

    /// Returns the pending notices and clears them (EVENTS).
    pub(crate) fn take_notices(&self) -> Notices {
        self.notices.take(&self.mem, self.holdings())
    }

    /// The notice board (a snapshot saves it).
    pub(crate) fn notices(&self) -> &NoticeBoard {
        &self.notices
    }

    /// One line per vCPU: state and the RIP of its latest exit (for hang diagnoses).
    pub(crate) fn vcpu_states(&self) -> String {
        let mut out = String::new();
        for h in self.vcpus.all() {
            let rip = h.last_rip();
            let sym = self.image.symbolize(rip).map(|s| format!(" <{s}>")).unwrap_or_default();
            out.push_str(&format!("  vCPU {}: {:?}, last exit at RIP {rip:#x}{sym}\n", h.id(), h.state()));
        }
        out
    }

    /// The run's figures so far (the report a run that ended now with `outcome` would give).
    pub(crate) fn report(&self, outcome: Outcome) -> RunReport {
        let s = &self.stats;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let per_call = Call::ALL.iter().zip(s.per_call.iter().skip(1)).map(|(c, n)| (c.name(), l(n))).collect();
        let answers = self.policy.answers();
        RunReport {
            outcome,
            boot: self.first_hello.get().copied(),
            restored: self.restored_in.get().copied(),
            first_reply: self.first_reply.get().copied(),
            boot_phases: self.boot_phases.get().map(|p| BootPhases {
                guest_us: match (self.first_hello.get(), self.running_at.get()) {
                    (Some(h), Some(r)) => h.saturating_sub(*r).as_micros() as u64,
                    _ => 0,
                },
                ..*p
            }),
            wall: self.started.elapsed(),
            hypercalls: l(&s.hypercalls),
            per_call,
            notifies_in_block: l(&s.notifies_in_block),
            steal_us: self.steal_time.then(|| self.steal_ns() / 1000),
            vcpus: self.vcpus.counts(),
            denied: l(&s.denied),
            reports: l(&s.reports),
            reports_not_recorded: l(&s.reports_not_recorded),
            memory: MemoryCounts {
                peak: l(&s.mem_peak).max(self.layout.ram_size),
                final_bytes: self.memory_held(),
                grants: l(&s.mem_grants),
                releases: l(&s.mem_releases),
                rss_boot: s.rss_boot.get().copied().unwrap_or(0),
                rss_peak: crate::host::process::process_peak_rss_bytes(),
                rss_end: crate::host::process::process_rss_bytes(),
            },
            policy: [self.policy.resource(Resource::Vcpus), self.policy.resource(Resource::Memory)],
            again: answers.again.load(Ordering::Relaxed),
            exhausted: answers.exhausted.load(Ordering::Relaxed),
            invariants: self.policy.invariants(),
            devices: self.devices.figures(),
            console_dropped: self.console.dropped(),
            diagnostics: self.diag.figures(),
        }
    }
}
