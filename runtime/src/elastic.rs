//! The elastic vCPU controller.
//!
//! * **Up**: when runnable tasks per online vCPU stay above `vcpu.up_load` for `vcpu.up_ms`,
//!   and the online vCPUs were busy for at least `vcpu.up_busy` of that time, ask for one more
//!   vCPU (one at a time; the host decides, so after a DENIED the controller waits
//!   `vcpu.deny_backoff_ms` before asking again). The busy test tells a VM short of vCPUs
//!   from one whose queue fills in bursts its vCPUs clear before they go idle again (a kv
//!   service wakes to a batch of requests from fifty clients): there another vCPU only adds
//!   kicks and exits, and on a host with few CPUs takes a CPU from the I/O thread or the
//!   clients.
//! * **Down**: a vCPU that has been idle for `vcpu.down_ms` goes down (never below min, never
//!   vCPU 0). So does one idle vCPU when the vCPUs online ran work, together, for less than
//!   `vcpu.down_busy` of what one vCPU fewer offers over a `vcpu.down_ms` window: their work
//!   fits on fewer. Here time a vCPU waited for a host CPU (steal time, see [`crate::steal`])
//!   is not work: two vCPUs that take turns on one host CPU get no more done than one. A shed
//!   holds the next up back (see [`shed_step`]). Explicit requests ([`request_down`]) and host
//!   reclaim targets make idle vCPUs go down at once.
//! * **Report**: REPORT the load figures every `vcpu.report_ms` while there is work (work that
//!   has kept the vCPUs busy for 1 ms: not for a lone request after an idle spell), and at
//!   every change in vCPUs.
//!
//! * **Memory**: the heap grows by a grant when an allocation cannot be served (see
//!   [`crate::heap`]) and, ahead of that, when free heap drops below `mem.low_mb`. When free
//!   heap stays above `mem.high_mb` for `mem.release_ms`, extents that have been wholly free
//!   that long are handed back, as long as free heap stays at or above `mem.low_mb`.
//!
//! All thresholds come from the kernel command line (`--guest-opt KEY=VALUE` on the shim);
//! `vcpu.auto=off` disables automatic ups and idle downs, `mem.auto=off` proactive growth and
//! release (explicit requests still work).

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use hypercall_abi::{ReportArgs, Status};
use spin::Once;

use crate::sync::Mutex;

use crate::cmdline::CommandLine;
use crate::percpu::PerCpu;
use crate::platform::{self, Platform};
use crate::smp::{self, UpError};
use crate::{executor, heap, hypercall, steal, time};

/// Controller settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Ask for a vCPU when runnable tasks exceed this many per online vCPU, in percent.
    pub up_load_pct: u64,
    /// ... for this long (ns).
    pub up_ns: u64,
    /// ... while the online vCPUs were busy (not idle) for at least this share of it, in
    /// percent.
    pub up_busy_pct: u64,
    /// Also ask when the online vCPUs were busy at least this share (percent) of a window of
    /// twice `up_ns` and the queue is long at its end, however briefly (0: never).
    pub up_sat_pct: u64,
    /// An idle vCPU goes down after this long (ns); also the window of the shed test
    /// (`down_busy_pct`).
    pub down_ns: u64,
    /// One vCPU goes down when the online vCPUs' busy time over a `down_ns` window is below
    /// this share of what one vCPU fewer offers, in percent (0: never for this reason).
    pub down_busy_pct: u64,
    /// Wait this long after a DENIED before asking again (ns).
    pub deny_backoff_ns: u64,
    /// Shortest interval between controller decisions (ns).
    pub tick_ns: u64,
    /// Queued work waits this long for the busy vCPUs before an idle one is kicked (ns; 0:
    /// kick as soon as more tasks are queued than vCPUs are busy).
    pub kick_ns: u64,
    /// Interval between REPORTs while busy (ns).
    pub report_ns: u64,
    /// Automatic ups and idle downs.
    pub auto: bool,
    /// Memory: grow when free heap drops below this (bytes).
    pub mem_low: usize,
    /// Memory: release when free heap stays above this (bytes).
    pub mem_high: usize,
    /// Memory: grant size (bytes).
    pub mem_chunk: usize,
    /// Memory: how long free heap must stay above `mem_high`, and an extent must be wholly
    /// free, before it is released (ns).
    pub mem_release_ns: u64,
    /// Memory: proactive growth and release.
    pub mem_auto: bool,
}

impl Tuning {
    /// The defaults.
    pub const DEFAULT: Tuning = Tuning {
        // At 0.5 (any queueing on one vCPU for 2 ms) the demo's spike was met in 3.5–5.6 ms
        // instead of 17–55 ms, but a 1:1:1 VM then asks, and is denied, while its cold start's
        // first requests queue: kept at 1.0 until the guest knows when asking cannot help.
        up_load_pct: 100,
        up_ns: 2_000_000,
        up_busy_pct: 80,
        up_sat_pct: 90,
        down_ns: 20_000_000,
        down_busy_pct: 60,
        deny_backoff_ns: 50_000_000,
        tick_ns: 200_000,
        kick_ns: executor::KICK_AFTER_NS,
        report_ns: 25_000_000,
        auto: true,
        mem_low: 8 << 20,
        mem_high: 32 << 20,
        mem_chunk: 16 << 20,
        mem_release_ns: 50_000_000,
        mem_auto: true,
    };

    /// Reads `vcpu.*` options; unknown or malformed values are reported and ignored.
    pub fn from_cmdline(cmd: &CommandLine<'_>, warn: &mut dyn FnMut(&str, &str)) -> Tuning {
        let mut t = Tuning::DEFAULT;
        for &(key, value) in &cmd.options {
            let ms = || hypercall_abi::parse_whole(value).map(|v| v.saturating_mul(1_000_000));
            let mib = || hypercall_abi::parse_whole(value).map(|v| (v as usize).saturating_mul(1 << 20));
            let parsed = match key {
                "vcpu.up_load" => parse_fraction_pct(value).map(|v| t.up_load_pct = v),
                "vcpu.up_ms" => ms().map(|v| t.up_ns = v),
                "vcpu.up_busy" => parse_share_pct(value).map(|v| t.up_busy_pct = v),
                "vcpu.up_sat" => parse_share_pct(value).map(|v| t.up_sat_pct = v),
                "vcpu.down_ms" => ms().map(|v| t.down_ns = v),
                "vcpu.down_busy" => parse_share_pct(value).map(|v| t.down_busy_pct = v),
                "vcpu.deny_backoff_ms" => ms().map(|v| t.deny_backoff_ns = v),
                "vcpu.report_ms" => ms().map(|v| t.report_ns = v.max(1_000_000)),
                "vcpu.tick_us" => hypercall_abi::parse_whole(value).map(|v| t.tick_ns = v.saturating_mul(1000)),
                "vcpu.kick_us" => hypercall_abi::parse_whole(value).map(|v| t.kick_ns = v.saturating_mul(1000)),
                "vcpu.auto" => parse_switch(value).map(|on| t.auto = on),
                "mem.low_mb" => mib().map(|v| t.mem_low = v),
                "mem.high_mb" => mib().map(|v| t.mem_high = v),
                "mem.chunk_mb" => mib().map(|v| t.mem_chunk = v.max(2 << 20)),
                "mem.release_ms" => ms().map(|v| t.mem_release_ns = v),
                "mem.auto" => parse_switch(value).map(|on| t.mem_auto = on),
                _ => Some(()),
            };
            if parsed.is_none() {
                warn(key, value);
            }
        }
        t
    }
}

pub use hypercall_abi::{parse_fraction_pct, parse_share_pct, parse_switch};

/// Shortest gap between change-triggered REPORTs (each costs an exit).
const MIN_REPORT_GAP_NS: u64 = 1_000_000;

/// Least busy time of the vCPUs since the run queue last emptied for a REPORT of load: the
/// first request after an idle spell (a woken VM's, one on an idle connection) is served
/// without the exit of a REPORT on its path.
const REPORT_MIN_BUSY_NS: u64 = 1_000_000;

/// The tuning: set once at boot, then read at every task boundary without a lock.
static TUNING: Once<Tuning> = Once::new();
static AUTO: AtomicBool = AtomicBool::new(true);
static CONTROLLER: Mutex<ControllerState> = Mutex::new(ControllerState::new());
static LAST_TICK_NS: AtomicU64 = AtomicU64::new(0);
static DOWN_REQUESTS: AtomicUsize = AtomicUsize::new(0);
/// A shed the controller decided: [`smp::online_changes`] + 1 at the decision (0: none). It
/// lapses when the online count changes first (another vCPU went down, or one came up), so a
/// stale shed never takes a vCPU the VM has since needed.
static SHED: AtomicU64 = AtomicU64::new(0);
/// Host reclaim target for vCPUs (usize::MAX when none).
static VCPU_TARGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static CHANGED: AtomicBool = AtomicBool::new(true);
/// A figure the running service wants reported.
static USER_FIGURE: AtomicU64 = AtomicU64::new(0);
static UPS: AtomicU64 = AtomicU64::new(0);
static DENIALS: AtomicU64 = AtomicU64::new(0);

/// A measuring window: when it began, a time counter's reading then ([`smp::idle_ns`] or
/// [`unbusy_ns`]), and [`smp::online_changes`] then (a window that spans a change in online
/// vCPUs compares unlike things).
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Start (0: no window).
    since_ns: u64,
    base_ns: u64,
    changes: u64,
}

impl Window {
    const NONE: Window = Window { since_ns: 0, base_ns: 0, changes: 0 };

    /// A window from `now` whose counter reads `base_ns`, with the change count read first: a
    /// change after it makes the window's end look different, never the other way round.
    fn from(now: u64, changes: u64, base_ns: u64) -> Window {
        Window { since_ns: now, base_ns, changes }
    }

    /// An idle-time window from the step's readings.
    fn start(r: &mut Readings) -> Window {
        let (changes, idle) = r.idle();
        Window::from(r.now, changes, idle)
    }

    fn is_open(&self) -> bool {
        self.since_ns != 0
    }

    /// Its length at `now` (`now` may have been read before another vCPU started it).
    fn len_ns(&self, now: u64) -> u64 {
        now.saturating_sub(self.since_ns)
    }

    fn spans_change(&self) -> bool {
        smp::online_changes() != self.changes
    }
}

/// What one controller step reads of the vCPUs, each at most once ([`smp::idle_ns`] walks
/// every slot and its steal record): the step's time, and the online-change count read just
/// before the idle time (see [`Window::from`]).
struct Readings {
    now: u64,
    idle: Option<(u64, u64)>,
}

impl Readings {
    fn new(now: u64) -> Readings {
        Readings { now, idle: None }
    }

    /// ([`smp::online_changes`], [`smp::idle_ns`]) at the step's time.
    fn idle(&mut self) -> (u64, u64) {
        let now = self.now;
        *self.idle.get_or_insert_with(|| (smp::online_changes(), smp::idle_ns(now)))
    }

    /// The vCPUs changed (an up): read again when next asked.
    fn invalidate(&mut self) {
        self.idle = None;
    }
}

struct ControllerState {
    /// While the queue is long: the window of the up test (idle time).
    pressure: Window,
    /// The window of the saturation test (idle time), always open.
    saturation: Window,
    /// Since when every saturation window was saturated (0: the last one was not).
    saturated_since_ns: u64,
    /// The window of the shed test (idle and stolen time).
    load: Window,
    /// Idle time at the start of `load`.
    load_idle_base_ns: u64,
    /// When the controller last brought a vCPU up, and last decided a shed.
    last_up_ns: u64,
    last_shed_ns: u64,
    /// How long a shed holds the next up back (see [`shed_step`]).
    shed_backoff_ns: u64,
    /// No ask before this: a DENIED's backoff.
    deny_until_ns: u64,
    /// No ask before this either, unless saturation lasts: a shed's hold.
    hold_until_ns: u64,
    last_report_ns: u64,
    /// Since when the run queue has not been empty at a step, and the idle time then
    /// (`None`: it was empty at the last step).
    queued: Option<(u64, u64)>,
    mem_deny_until_ns: u64,
    above_high_since_ns: u64,
    /// Gap before an idle VM looks at its free memory again after a look that released
    /// nothing (doubles up to [`IDLE_MEM_CHECK_MAX_NS`]; back to `mem_release_ns` on a release).
    idle_mem_gap_ns: u64,
    /// Free heap bytes after the last look at free memory.
    free_at_last_look: usize,
}

impl ControllerState {
    const fn new() -> Self {
        ControllerState {
            pressure: Window::NONE,
            saturation: Window::NONE,
            saturated_since_ns: 0,
            load: Window::NONE,
            load_idle_base_ns: 0,
            last_up_ns: 0,
            last_shed_ns: 0,
            shed_backoff_ns: SHED_BACKOFF_MIN_NS,
            deny_until_ns: 0,
            hold_until_ns: 0,
            last_report_ns: 0,
            queued: None,
            mem_deny_until_ns: 0,
            above_high_since_ns: 0,
            idle_mem_gap_ns: 0,
            free_at_last_look: 0,
        }
    }
}

/// Kernel time at which an idle VM looks at its free memory again (0: nothing to look at).
/// vCPU 0 bounds its idle BLOCK by it, so memory freed just before the VM went idle goes back
/// to the host without waiting for the next request.
static MEM_CHECK_AT_NS: AtomicU64 = AtomicU64::new(0);

/// A task boundary skipped the controller step (rate limit) since the last one ran: a vCPU
/// going idle then runs the memory step, so memory freed by the last task (FLUSHALL) is
/// looked at without waiting for a look planned long ago.
static STEP_SKIPPED: AtomicBool = AtomicBool::new(false);

/// After a vCPU is shed, the next up waits at least this long (ns)...
const SHED_BACKOFF_MIN_NS: u64 = 100_000_000;
/// ...doubling, while vCPUs are shed soon after they came, up to this (ns).
const SHED_BACKOFF_MAX_NS: u64 = 5_000_000_000;
/// A vCPU shed this long (ns) after the last up paid for a while: the wait starts over.
const SHED_PAID_NS: u64 = 1_000_000_000;
/// Saturation this long asks for a vCPU even while a shed's hold runs (see
/// [`saturation_step`]).
const SATURATED_OVERRIDES_HOLD_NS: u64 = 200_000_000;

/// Longest gap between two looks at free memory while idle (when free memory stays high but
/// no extent is wholly free, e.g. a few live allocations pin each extent).
const IDLE_MEM_CHECK_MAX_NS: u64 = 10_000_000_000;

/// More free heap than at the last look by this much (bytes) means memory was freed since.
const FREED_SINCE_LOOK: usize = 2 << 20;

/// Host reclaim target for memory in bytes (u64::MAX when none).
static MEMORY_TARGET: AtomicU64 = AtomicU64::new(u64::MAX);

/// Sets (or clears) the memory the host wants the VM to come down to.
pub fn set_memory_target(target: Option<u64>) {
    MEMORY_TARGET.store(target.unwrap_or(u64::MAX), Ordering::Release);
}

/// The host's memory reclaim target, if one is in force.
pub fn memory_target() -> Option<u64> {
    match MEMORY_TARGET.load(Ordering::Acquire) {
        u64::MAX => None,
        t => Some(t),
    }
}

/// The memory step: grow below the low watermark, release above the high one (and down to a
/// host reclaim target).
fn memory_step(st: &mut ControllerState, t: &Tuning, now: u64) {
    if heap::window_size() == 0 {
        return;
    }
    let free = heap::stats().available;
    let target = memory_target();
    if let Some(target) = target {
        // Reclaim: release wholly free extents (however briefly free) down to the target.
        if heap::held() > target {
            let released = heap::release_free_extents(0, &|_, held_after| held_after >= target);
            if released > 0 {
                CHANGED.store(true, Ordering::Release);
            }
        }
    }
    if !t.mem_auto {
        return;
    }
    let may_grow = target.is_none_or(|tg| heap::held() < tg);
    if free < t.mem_low && may_grow && now >= st.mem_deny_until_ns {
        match heap::grow_now(t.mem_chunk) {
            Ok(_) => CHANGED.store(true, Ordering::Release),
            Err(_) => st.mem_deny_until_ns = now + t.deny_backoff_ns,
        }
    }
    if free > t.mem_high {
        if st.above_high_since_ns == 0 {
            st.above_high_since_ns = now;
        }
    } else {
        st.above_high_since_ns = 0;
    }
    let low = t.mem_low;
    let mut check_at = 0;
    if st.above_high_since_ns != 0 && heap::elastic_granted() > 0 {
        let due = st.above_high_since_ns + t.mem_release_ns;
        check_at = due;
        if now >= due {
            let released = heap::release_free_extents(t.mem_release_ns, &|free_after, _| free_after >= low);
            if released > 0 {
                CHANGED.store(true, Ordering::Release);
            }
            // Memory freed since the last look (or released by this one) may leave more
            // extents free soon: look again after `mem_release_ns` (extents this look found
            // free go at the next). A look that finds nothing new waits longer each time.
            if released > 0 || free > st.free_at_last_look + FREED_SINCE_LOOK {
                st.idle_mem_gap_ns = t.mem_release_ns;
            } else {
                st.idle_mem_gap_ns = (st.idle_mem_gap_ns.max(t.mem_release_ns / 2) * 2).min(IDLE_MEM_CHECK_MAX_NS);
            }
            st.free_at_last_look = free.saturating_sub(released);
            check_at = now + st.idle_mem_gap_ns;
        }
    } else {
        st.idle_mem_gap_ns = 0;
    }
    let check_at = if heap::elastic_granted() > 0 { check_at } else { 0 };
    let before = MEM_CHECK_AT_NS.swap(check_at, Ordering::AcqRel);
    if check_at != 0 && (before == 0 || check_at < before) {
        // vCPU 0 may be asleep with no look planned (the memory was freed on another vCPU):
        // it re-plans its sleep.
        smp::kick_boot_vcpu_if_idle();
    }
}

/// Installs the tuning (once, at boot: a later call changes nothing).
pub fn init(t: Tuning) {
    let t = *TUNING.call_once(|| t);
    AUTO.store(t.auto, Ordering::Release);
    executor::set_kick_after(t.kick_ns);
    heap::configure(t.mem_chunk, t.deny_backoff_ns);
}

/// Current tuning ([`Tuning::DEFAULT`] before [`init`]).
pub fn tuning() -> &'static Tuning {
    TUNING.get().unwrap_or(&Tuning::DEFAULT)
}

/// Turns automatic ups and idle downs on or off.
pub fn set_auto(on: bool) {
    AUTO.store(on, Ordering::Release);
}

/// Asks `n` idle vCPUs to go down (never below min).
pub fn request_down(n: usize) {
    DOWN_REQUESTS.fetch_add(n, Ordering::AcqRel);
    smp::kick_one_idle();
}

/// Drops outstanding down requests.
pub fn cancel_down_requests() {
    DOWN_REQUESTS.store(0, Ordering::Release);
}

/// Sets (or clears, with `None`) the number of vCPUs the host wants the VM to come down to.
/// Busy vCPUs above the target drain: they go down at their next task boundary, leaving
/// their remaining tasks in the shared queue.
pub fn set_vcpu_target(target: Option<usize>) {
    VCPU_TARGET.store(target.unwrap_or(usize::MAX), Ordering::Release);
    if target.is_some() {
        smp::kick_one_idle();
    }
}

/// Whether the (busy) vCPU `slot` should drain and go down now: it is not vCPU 0 and the VM
/// has more vCPUs online than the host's reclaim target (never below min).
pub fn should_drain(slot: &'static PerCpu) -> bool {
    if slot.index() == 0 {
        return false;
    }
    let Some(target) = vcpu_target() else { return false };
    let (min, _, _) = smp::limits();
    smp::online() > target.max(min)
}

/// The host's vCPU reclaim target, if one is in force.
pub fn vcpu_target() -> Option<usize> {
    match VCPU_TARGET.load(Ordering::Acquire) {
        usize::MAX => None,
        t => Some(t),
    }
}

/// Sets the service-defined figure sent with each REPORT.
pub fn set_user_figure(v: u64) {
    USER_FIGURE.store(v, Ordering::Relaxed);
}

/// Records that a vCPU went down (for the next REPORT).
pub fn note_down() {
    CHANGED.store(true, Ordering::Release);
}

/// vCPUs brought up by the controller and DENIED answers it got.
pub fn counters() -> (u64, u64) {
    (UPS.load(Ordering::Relaxed), DENIALS.load(Ordering::Relaxed))
}

/// Explicitly brings one vCPU up (for services). Returns its host id and per-CPU slot.
pub fn up() -> Result<(u32, &'static PerCpu), UpError> {
    let r = smp::bring_up();
    match r {
        Ok(_) => {
            UPS.fetch_add(1, Ordering::Relaxed);
            CHANGED.store(true, Ordering::Release);
        }
        Err(UpError::Refused(Status::DENIED)) => {
            DENIALS.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {}
    }
    r
}

/// Sends a REPORT now.
pub fn report() {
    if platform::current() != Platform::Shim {
        return;
    }
    let h = heap::stats();
    let _ = hypercall::report(ReportArgs {
        runnable: executor::runnable() as u64,
        online_vcpus: smp::online() as u64,
        idle_vcpus: smp::idle() as u64,
        heap_used: h.claimed.saturating_sub(h.available) as u64,
        heap_free: h.available as u64,
        user: USER_FIGURE.load(Ordering::Relaxed),
        ..ReportArgs::default()
    });
}

/// Controller step, run at task boundaries (rate-limited to one vCPU every `tick`).
pub fn on_boundary(_slot: &'static PerCpu) {
    if platform::current() != Platform::Shim {
        return;
    }
    let now = time::now_ns();
    let t = tuning();
    if now.saturating_sub(LAST_TICK_NS.load(Ordering::Relaxed)) < t.tick_ns {
        // Every vCPU passes here at every boundary: write the shared flag only when it changes.
        if !STEP_SKIPPED.load(Ordering::Relaxed) {
            STEP_SKIPPED.store(true, Ordering::Relaxed);
        }
        return;
    }
    let Some(mut st) = CONTROLLER.try_lock() else {
        STEP_SKIPPED.store(true, Ordering::Relaxed);
        return;
    };
    STEP_SKIPPED.store(false, Ordering::Relaxed);
    LAST_TICK_NS.store(now, Ordering::Relaxed);
    let runnable = executor::runnable() as u64;
    let online = smp::online() as u64;
    // The policy from HELLO is not checked here: the host is the authority (burst credit and
    // the pool change what it grants), so a pressured guest asks and backs off on DENIED.
    // Only an explicit reclaim target from the host holds the controller back.
    let reclaiming = vcpu_target().is_some_and(|t| online as usize >= t);
    let may_ask = AUTO.load(Ordering::Acquire) && !reclaiming;
    let pressured = runnable > 0 && runnable * 100 > t.up_load_pct * online;
    let mut r = Readings::new(now);
    if may_ask && pressured {
        let w = st.pressure;
        if !w.is_open() {
            st.pressure = Window::start(&mut r);
        } else if w.len_ns(now) >= t.up_ns && now >= st.deny_until_ns.max(st.hold_until_ns) {
            let idle = r.idle().1.saturating_sub(w.base_ns);
            if w.spans_change() || !busy_enough(w.len_ns(now), online, idle, t.up_busy_pct) {
                // Bursts the vCPUs online cleared between idle spells (or the window spans a
                // change of vCPUs, which its figures do not tell apart): watch a new window.
                st.pressure = Window::start(&mut r);
            } else {
                try_up(&mut st, t, &mut r);
            }
        }
    } else {
        st.pressure = Window::NONE;
    }
    let sat = saturation_step(&mut st, t, &mut r, online, pressured);
    let asks = match sat {
        Saturation::No => false,
        Saturation::Now => now >= st.deny_until_ns.max(st.hold_until_ns),
        Saturation::Lasting => now >= st.deny_until_ns,
    };
    if may_ask && asks {
        try_up(&mut st, t, &mut r);
    }
    shed_step(&mut st, t, &mut r, online);
    memory_step(&mut st, t, now);
    let since = now - st.last_report_ns;
    let changed = since >= MIN_REPORT_GAP_NS && CHANGED.swap(false, Ordering::AcqRel);
    st.queued = match (runnable, st.queued) {
        (0, _) => None,
        (_, None) => Some((now, r.idle().1)),
        (_, q) => q,
    };
    let lasting = st.queued.is_some_and(|(at, idle_then)| {
        let idle = r.idle().1.saturating_sub(idle_then);
        (now - at).saturating_mul(online).saturating_sub(idle) >= REPORT_MIN_BUSY_NS
    });
    if changed || (lasting && since >= t.report_ns) {
        st.last_report_ns = now;
        drop(st);
        report();
    }
}

/// Asks for one more vCPU; a DENIED holds the next ask back `deny_backoff_ns`.
fn try_up(st: &mut ControllerState, t: &Tuning, r: &mut Readings) {
    match up() {
        Ok(_) => {
            SHED.store(0, Ordering::Release);
            st.last_up_ns = r.now;
            r.invalidate();
            st.pressure = Window::start(r);
        }
        Err(_) => st.deny_until_ns = r.now + t.deny_backoff_ns,
    }
}

/// The saturation test, every two `up_ns`: the vCPUs online were busy at least `up_sat_pct`
/// of the window and the queue is long (`up_load`) at its end. It sees a load step that keeps
/// every vCPU busy without a queue that stays long (requests that arrive about as fast as one
/// vCPU serves them: the queue test, which needs it long all through `up_ns`, meets such a
/// step late). One task that keeps one vCPU busy is not a long queue: one more vCPU would
/// not help it.
///
/// Saturation that lasts [`SATURATED_OVERRIDES_HOLD_NS`] (window after window, at this count
/// of vCPUs) asks even while a shed's hold runs: the shed saw two vCPUs that did not pay over
/// 20 ms, this is one that has not kept up for much longer.
fn saturation_step(st: &mut ControllerState, t: &Tuning, r: &mut Readings, online: u64, pressured: bool) -> Saturation {
    let now = r.now;
    let w = st.saturation;
    if !w.is_open() || w.spans_change() {
        st.saturation = Window::start(r);
        st.saturated_since_ns = 0;
        return Saturation::No;
    }
    let len = w.len_ns(now);
    if len < t.up_ns.saturating_mul(2) {
        return Saturation::No;
    }
    let idle = r.idle().1.saturating_sub(w.base_ns);
    st.saturation = Window::start(r);
    let busy = t.up_sat_pct > 0 && busy_enough(len, online, idle, t.up_sat_pct);
    saturation_verdict(&mut st.saturated_since_ns, w.since_ns, now, busy, pressured)
}

/// The verdict on a saturation window that started at `window_start` and ends `now`, whose
/// vCPUs were `busy` enough and whose queue is `pressured` at its end. `since_ns` keeps when
/// the unbroken run of busy windows began (0: none).
fn saturation_verdict(since_ns: &mut u64, window_start: u64, now: u64, busy: bool, pressured: bool) -> Saturation {
    if !busy {
        *since_ns = 0;
        return Saturation::No;
    }
    if *since_ns == 0 {
        *since_ns = window_start.max(1);
    }
    if !pressured {
        Saturation::No
    } else if now.saturating_sub(*since_ns) >= SATURATED_OVERRIDES_HOLD_NS {
        Saturation::Lasting
    } else {
        Saturation::Now
    }
}

/// What [`saturation_step`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Saturation {
    No,
    /// Saturated over the last window, with a task queued.
    Now,
    /// ... and over every window for [`SATURATED_OVERRIDES_HOLD_NS`].
    Lasting,
}

/// Every `down_ns`: when the vCPUs online ran work (idle and stolen time excluded) for less
/// than `down_busy_pct` of what one vCPU fewer offers, one idle vCPU is asked to go down.
///
/// The up test reads idle time only: a vCPU that waits for a host CPU still has work queued,
/// and on a host shared with CPU-bound neighbours one more vCPU is one more share of the
/// host's CPUs. Whether it paid is what this test sees afterwards.
fn shed_step(st: &mut ControllerState, t: &Tuning, r: &mut Readings, online: u64) {
    let now = r.now;
    let w = st.load;
    let changes = smp::online_changes();
    if !w.is_open() || changes != w.changes {
        // First look, or the vCPUs changed: a new window.
        let idle_now = r.idle().1;
        st.load_idle_base_ns = idle_now;
        st.load = Window::from(now, changes, unbusy_ns(idle_now));
        return;
    }
    let window = w.len_ns(now);
    if window < t.down_ns {
        return;
    }
    let idle_now = r.idle().1;
    let idle = idle_now.saturating_sub(st.load_idle_base_ns);
    let unbusy_now = unbusy_ns(idle_now);
    let unbusy = unbusy_now.saturating_sub(w.base_ns);
    st.load_idle_base_ns = idle_now;
    st.load = Window::from(now, changes, unbusy_now);
    let (min, _, _) = smp::limits();
    let auto = AUTO.load(Ordering::Acquire);
    if !auto || t.down_busy_pct == 0 || online <= min as u64 || shed_pending() {
        return;
    }
    // vCPUs that had work nearly all the window (the saturation test would ask for one more)
    // stay, however much of it the host stole: fewer would only queue the work longer, and
    // shedding here would loop with the up test.
    let saturated = t.up_sat_pct > 0 && busy_enough(window, online, idle, t.up_sat_pct);
    if !saturated && fits_on_fewer(window, online, unbusy, t.down_busy_pct) {
        SHED.store(changes + 1, Ordering::Release);
        smp::kick_one_idle_secondary();
        // One vCPU saturated can be two that get no more done (they wait for the host's CPUs,
        // or for the I/O thread and the clients): the next up waits, twice as long each time
        // a vCPU is shed within a second of coming (a flap), so the VM does not take and drop
        // a vCPU ten times a second. Any other shed (a vCPU that paid for a while, or a VM
        // coming down step by step from a burst) starts the wait over.
        let flap = st.last_up_ns > st.last_shed_ns && now.saturating_sub(st.last_up_ns) < SHED_PAID_NS;
        st.shed_backoff_ns = if flap { (st.shed_backoff_ns * 2).min(SHED_BACKOFF_MAX_NS) } else { SHED_BACKOFF_MIN_NS };
        st.last_shed_ns = now;
        st.hold_until_ns = now + st.shed_backoff_ns;
    }
}

/// The work `online` vCPUs did during `window_ns` when they did not run work for
/// `unbusy_ns` in all, and what `vcpus` vCPUs offer in that window (ns, wide enough for any
/// product).
fn work_and_offer(window_ns: u64, online: u64, unbusy_ns: u64, vcpus: u64) -> (u128, u128) {
    let work = (u128::from(window_ns) * u128::from(online)).saturating_sub(u128::from(unbusy_ns));
    (work, u128::from(window_ns) * u128::from(vcpus))
}

/// Whether the work of `online` vCPUs, not running work for `unbusy_ns` in all during
/// `window_ns` (see [`unbusy_ns`]), was less than `busy_pct` percent of what `online - 1`
/// vCPUs offer.
fn fits_on_fewer(window_ns: u64, online: u64, unbusy_ns: u64, busy_pct: u64) -> bool {
    let (work, fewer) = work_and_offer(window_ns, online, unbusy_ns, online.saturating_sub(1));
    work * 100 < fewer * u128::from(busy_pct)
}

/// Time the vCPUs did not spend running work until now (ns): their idle time `idle_ns` plus
/// what the host stole (waiting for a host CPU is not being busy; see [`crate::steal`]).
fn unbusy_ns(idle_ns: u64) -> u64 {
    idle_ns.saturating_add(steal::total_ns())
}

/// Whether `online` vCPUs, idle for `idle_ns` in all during a window of `window_ns`, were
/// busy for at least `busy_pct` percent of it.
fn busy_enough(window_ns: u64, online: u64, idle_ns: u64, busy_pct: u64) -> bool {
    let online = online.max(1);
    let (work, capacity) = work_and_offer(window_ns, online, idle_ns, online);
    work * 100 >= capacity * u128::from(busy_pct)
}

/// Consumes one explicit down request; `false` when none is outstanding.
pub fn take_down_request() -> bool {
    DOWN_REQUESTS.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
}

/// Whether a shed is decided and still current.
fn shed_pending() -> bool {
    let shed = SHED.load(Ordering::Acquire);
    shed != 0 && shed == smp::online_changes() + 1
}

/// Takes the decided shed (the vCPU that takes it goes down); `false` when another took it.
pub fn take_shed() -> bool {
    SHED.swap(0, Ordering::AcqRel) != 0
}

/// What justifies an idle vCPU's going down, and is consumed as it goes (so no more vCPUs go
/// than were asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownToken {
    /// Nothing to consume: idle long enough, a host reclaim, or a request to this vCPU.
    None,
    /// One explicit down request ([`take_down_request`]).
    Request,
    /// The controller's shed ([`take_shed`]).
    Shed,
}

/// What an idle vCPU should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleAction {
    /// Go down now, consuming `token` at the moment of going.
    GoDown {
        /// What must be consumed.
        token: DownToken,
    },
    /// BLOCK for at most this many ns.
    Block(u64),
}

/// Decides for an idle vCPU: go down (explicit request, host reclaim, or idle long enough)
/// or block until the next timer / down check.
pub fn idle_action(slot: &'static PerCpu) -> IdleAction {
    let now = time::now_ns();
    let t = tuning();
    let (min, _, _) = smp::limits();
    let online = smp::online();
    let is_boot = slot.index() == 0;
    if !is_boot && online > min {
        let over_target = vcpu_target().is_some_and(|target| online > target.max(min));
        let idle_for = now.saturating_sub(slot.idle_since_ns.load(Ordering::Acquire));
        let timed_out = AUTO.load(Ordering::Acquire) && idle_for >= t.down_ns;
        if over_target || timed_out || slot.down_requested.load(Ordering::Acquire) {
            return IdleAction::GoDown { token: DownToken::None };
        }
        if DOWN_REQUESTS.load(Ordering::Acquire) > 0 {
            return IdleAction::GoDown { token: DownToken::Request };
        }
        if AUTO.load(Ordering::Acquire) && shed_pending() {
            return IdleAction::GoDown { token: DownToken::Shed };
        }
    }
    // Only vCPU 0 (which never goes down) sleeps until the next timer; secondaries fire timers
    // when they pass a task boundary anyway, and waking them all at every deadline would
    // keep resetting their idle time.
    let mut timeout = u64::MAX;
    if is_boot && let Some(d) = crate::timer::next_deadline() {
        timeout = d.saturating_sub(now);
    }
    // vCPU 0 also wakes when free memory is due for a look (the step runs at the boundary).
    // The last boundary before going idle may have skipped the step (it is rate-limited): a
    // vCPU going idle then takes the memory step now, as does vCPU 0 when no look is planned,
    // so memory the last task freed is looked at without waiting for a look planned long
    // ago (the step re-plans vCPU 0's sleep).
    let owed = STEP_SKIPPED.load(Ordering::Relaxed) || (is_boot && MEM_CHECK_AT_NS.load(Ordering::Acquire) == 0);
    if owed
        && heap::elastic_granted() > 0
        && let Some(mut st) = CONTROLLER.try_lock()
    {
        STEP_SKIPPED.store(false, Ordering::Relaxed);
        memory_step(&mut st, t, now);
    }
    let mem_check = MEM_CHECK_AT_NS.load(Ordering::Acquire);
    if is_boot && mem_check != 0 {
        timeout = timeout.min(mem_check.saturating_sub(now).max(t.tick_ns));
    }
    if !is_boot && online > min && AUTO.load(Ordering::Acquire) {
        let idle_for = now.saturating_sub(slot.idle_since_ns.load(Ordering::Acquire));
        timeout = timeout.min(t.down_ns.saturating_sub(idle_for).max(100_000));
    }
    IdleAction::Block(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_parse_to_percent() {
        assert_eq!(parse_fraction_pct("1"), Some(100));
        assert_eq!(parse_fraction_pct("1.5"), Some(150));
        assert_eq!(parse_fraction_pct("0.25"), Some(25));
        assert_eq!(parse_fraction_pct(".5"), Some(50));
        assert_eq!(parse_fraction_pct("x"), None);
    }

    #[test]
    fn the_busy_tests_tell_saturated_vcpus_from_bursts() {
        let ms = 1_000_000;
        // One vCPU, 2 ms window: busy 1.8 ms is 90% (asks at 80%), busy 1 ms is not.
        assert!(busy_enough(2 * ms, 1, ms / 5, 80));
        assert!(!busy_enough(2 * ms, 1, ms, 80));
        // Two vCPUs idle 1 ms in all over 2 ms: 75% busy.
        assert!(busy_enough(2 * ms, 2, ms, 75));
        assert!(!busy_enough(2 * ms, 2, ms, 76));
        // More idle than the window holds (figures read in flight) is simply idle.
        assert!(!busy_enough(2 * ms, 1, 3 * ms, 1));
        // Two vCPUs over 20 ms, 30 ms idle in all: 10 ms of work, under 60% of one vCPU.
        assert!(fits_on_fewer(20 * ms, 2, 30 * ms, 60));
        // 15 ms of work (25 ms idle) is 75% of one vCPU: both stay.
        assert!(!fits_on_fewer(20 * ms, 2, 25 * ms, 60));
        // One vCPU never fits on none; 0 disables.
        assert!(!fits_on_fewer(20 * ms, 1, 20 * ms, 60));
        assert!(!fits_on_fewer(20 * ms, 2, 40 * ms, 0));
    }

    #[test]
    fn saturation_needs_busy_windows_and_a_long_queue_and_lasts_only_unbroken() {
        const MS: u64 = 1_000_000;
        let mut since = 0;
        // Busy, but one task (no long queue): no ask, though the run of busy windows starts.
        assert_eq!(saturation_verdict(&mut since, 10 * MS, 14 * MS, true, false), Saturation::No);
        assert_eq!(since, 10 * MS);
        // Busy with a long queue: ask, subject to a shed's hold.
        assert_eq!(saturation_verdict(&mut since, 14 * MS, 18 * MS, true, true), Saturation::Now);
        // Busy window after window for 200 ms: ask through the hold.
        assert_eq!(saturation_verdict(&mut since, 206 * MS, 210 * MS, true, true), Saturation::Lasting);
        // One window that was not busy breaks the run: the 200 ms start over.
        assert_eq!(saturation_verdict(&mut since, 210 * MS, 214 * MS, false, true), Saturation::No);
        assert_eq!(since, 0);
        assert_eq!(saturation_verdict(&mut since, 214 * MS, 218 * MS, true, true), Saturation::Now);
        assert_eq!(saturation_verdict(&mut since, 410 * MS, 414 * MS, true, true), Saturation::Lasting);
    }

    #[test]
    fn tuning_reads_the_command_line() {
        let cmd = CommandLine::parse(
            "app=x vcpu.up_load=2.5 vcpu.down_ms=7 vcpu.auto=off vcpu.up_ms=zz vcpu.up_busy=0.9 vcpu.down_busy=1.5 vcpu.up_sat=0 -- 1",
        )
        .unwrap();
        let mut bad = alloc::vec::Vec::new();
        let t = Tuning::from_cmdline(&cmd, &mut |k, v| bad.push(alloc::format!("{k}={v}")));
        assert_eq!(t.up_load_pct, 250);
        assert_eq!(t.down_ns, 7_000_000);
        assert!(!t.auto);
        assert_eq!(t.up_ns, Tuning::DEFAULT.up_ns);
        assert_eq!(t.up_busy_pct, 90);
        assert_eq!(t.up_sat_pct, 0);
        assert_eq!(t.down_busy_pct, Tuning::DEFAULT.down_busy_pct);
        assert_eq!(bad, ["vcpu.up_ms=zz", "vcpu.down_busy=1.5"]);
    }
}
