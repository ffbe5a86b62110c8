//! vCPU bring-up, going down, idling and kicking.
//!
//! * **Up**: reserve a free [`PerCpu`] slot, give it a stack (allocated once, kept for
//!   reuse), and VCPU_UP at `secondary_entry` (`crate::arch`) with the slot as argument. The
//!   host starts the new vCPU directly at CPL 3; it records its first TSC, installs its slot in
//!   GS and serves the run queue (`crate::worker`).
//! * **Down**: only an idle vCPU goes down (or a busy one between tasks, for a host reclaim),
//!   so no task is ever lost. It commits (`IDLE -> DOWNING`, which fails if another vCPU just
//!   kicked it), lets the caller re-check the queue, then stores `OFFLINE` and issues
//!   VCPU_DOWN in one asm block that touches no stack: from that store on, its slot and stack
//!   may be reused. Whether a vCPU *should* go is the elastic controller's decision; this
//!   module only knows how.
//! * **Idle**: an idle vCPU publishes `IDLE` and BLOCKs; whoever queues work CASes one idle
//!   slot to `WAKING` and KICKs it. A kick that lands before the BLOCK is kept by the host,
//!   so no wake-up is lost.

use alloc::alloc::{Layout, alloc};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use hypercall_abi::{ResourceLimits, Status, wake};

use crate::arch::{self, cpu};
use crate::percpu::{CPUS, MAX_CPUS, PerCpu, state};
use crate::platform::{self, Platform};
use crate::{hypercall, percpu, steal, time};

/// Longest an idle vCPU spins for new work before it BLOCKs: about what the BLOCK and the wake
/// that ends it cost on a nested host.
pub const IDLE_SPIN_MAX_NS: u64 = 50_000;
/// Shortest spin that is not zero.
pub const IDLE_SPIN_MIN_NS: u64 = 5_000;

/// Stack size of every secondary vCPU.
pub const STACK_SIZE: usize = 128 * 1024;

static ONLINE: AtomicUsize = AtomicUsize::new(1);
static IDLE: AtomicUsize = AtomicUsize::new(0);
static MIN: AtomicUsize = AtomicUsize::new(1);
static BURST: AtomicUsize = AtomicUsize::new(1);
static MAX: AtomicUsize = AtomicUsize::new(1);
/// Idle time of all vCPUs (ns), counted when an idle vCPU finds work: see [`idle_ns`].
static IDLE_NS: AtomicU64 = AtomicU64::new(0);
/// Bumped whenever the count of online vCPUs changes (a window of [`idle_ns`] readings that
/// spans a change compares unlike things).
static ONLINE_CHANGES: AtomicU64 = AtomicU64::new(0);

/// Changes the online count with `f` (`None`: no change); `Err` when `f` refused.
fn online_update(f: impl FnMut(usize) -> Option<usize>) -> Result<usize, usize> {
    let r = ONLINE.fetch_update(Ordering::AcqRel, Ordering::Acquire, f);
    if r.is_ok() {
        ONLINE_CHANGES.fetch_add(1, Ordering::AcqRel);
    }
    r
}

/// Gives back a place [`online_update`] reserved (an up that failed, a down that did not go).
fn online_undo(reserved_up: bool) {
    if reserved_up {
        ONLINE.fetch_sub(1, Ordering::AcqRel);
    } else {
        ONLINE.fetch_add(1, Ordering::AcqRel);
    }
    ONLINE_CHANGES.fetch_add(1, Ordering::AcqRel);
}

/// How many times the count of online vCPUs has changed.
pub(crate) fn online_changes() -> u64 {
    ONLINE_CHANGES.load(Ordering::Acquire)
}

/// Sets up the boot vCPU's slot and the VM's vCPU limits (from HELLO; 1/1/1 without a host).
pub fn init(limits: Option<ResourceLimits>) {
    let l = limits.unwrap_or(ResourceLimits { min: 1, max: 1, burst: 1 });
    let clamp = |v: u64| (v as usize).clamp(1, MAX_CPUS);
    MIN.store(clamp(l.min), Ordering::Relaxed);
    MAX.store(clamp(l.max), Ordering::Relaxed);
    BURST.store(clamp(l.burst), Ordering::Relaxed);
    percpu::init();
    CPUS[0].vcpu_id.store(0, Ordering::Relaxed);
    CPUS[0].state.store(state::BUSY, Ordering::Release);
    ONLINE.store(1, Ordering::Release);
}

/// Takes a new vCPU max and burst from the host (a POLICY notice); min never changes on a
/// running VM. A value of 0 (a host that does not publish it) keeps the current one.
pub(crate) fn set_limits(max: u64, burst: u64) {
    let clamp = |v: u64| (v as usize).clamp(1, MAX_CPUS);
    if max > 0 {
        MAX.store(clamp(max), Ordering::Relaxed);
    }
    if burst > 0 {
        BURST.store(clamp(burst), Ordering::Relaxed);
    }
}

/// vCPUs online (as the kernel counts them).
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// Most vCPUs online since the last [`take_peak`].
static PEAK: AtomicUsize = AtomicUsize::new(1);

/// The most vCPUs that were online since the previous call (or boot), and starts a new
/// period from the count online now. For figures sampled less often than vCPUs come and go.
pub fn take_peak() -> usize {
    let now = ONLINE.load(Ordering::Acquire);
    PEAK.swap(now, Ordering::AcqRel).max(now)
}

/// Idle vCPUs.
pub fn idle() -> usize {
    IDLE.load(Ordering::Acquire)
}

/// The VM's vCPU policy `(min, max, burst)` as the host reported it.
pub fn limits() -> (usize, usize, usize) {
    (MIN.load(Ordering::Relaxed), MAX.load(Ordering::Relaxed), BURST.load(Ordering::Relaxed))
}

/// Why a bring-up did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpError {
    /// Every per-CPU slot is in use (the kernel did not ask).
    AtCeiling,
    /// The host refused with this status.
    Refused(Status),
    /// No stack memory for the new vCPU.
    NoMemory,
}

fn stack_for(slot: &'static PerCpu) -> Option<usize> {
    let base = slot.stack_base.load(Ordering::Acquire);
    if base != 0 {
        return Some(base);
    }
    let layout = Layout::from_size_align(STACK_SIZE, 4096).ok()?;
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { alloc(layout) };
    if p.is_null() {
        return None;
    }
    slot.stack_base.store(p as usize, Ordering::Release);
    Some(p as usize)
}

/// Brings one more vCPU online. Returns its host id and its per-CPU slot (the slot is only
/// meaningful until the new vCPU goes down again). The host is the authority on the
/// policy: the kernel asks even at what it believes is the ceiling (the host's answer may
/// differ, e.g. when burst credit or the pool changes), and stops only when it has no slot.
pub fn bring_up() -> Result<(u32, &'static PerCpu), UpError> {
    if platform::current() != Platform::Shim {
        return Err(UpError::Refused(Status::UNSUPPORTED));
    }
    if online_update(|n| (n < MAX_CPUS).then_some(n + 1)).is_err() {
        return Err(UpError::AtCeiling);
    }
    let slot = CPUS.iter().skip(1).find(|s| {
        s.state.compare_exchange(state::OFFLINE, state::STARTING, Ordering::AcqRel, Ordering::Acquire).is_ok()
    });
    let Some(slot) = slot else {
        online_undo(true);
        return Err(UpError::AtCeiling);
    };
    let Some(stack) = stack_for(slot) else {
        slot.state.store(state::OFFLINE, Ordering::Release);
        online_undo(true);
        return Err(UpError::NoMemory);
    };
    slot.started_tsc.store(0, Ordering::Release);
    slot.down_requested.store(false, Ordering::Release);
    let top = (stack + STACK_SIZE) as u64;
    match hypercall::vcpu_up(arch::secondary_entry_addr(), top, slot as *const PerCpu as u64) {
        // Only the new vCPU stores its id (at entry, from `rsi`). Storing it here too would
        // race: by the time this call returns, the new vCPU may already have gone down and
        // its slot been reused by another vCPU, whose id this would overwrite.
        Ok(id) => {
            PEAK.fetch_max(ONLINE.load(Ordering::Acquire), Ordering::AcqRel);
            Ok((id, slot))
        }
        Err(s) => {
            slot.state.store(state::OFFLINE, Ordering::Release);
            online_undo(true);
            Err(UpError::Refused(s))
        }
    }
}

/// Wakes vCPU 0 (the service finished on another vCPU and vCPU 0 must shut down). A kick
/// that arrives while vCPU 0 is not blocked is kept for its next BLOCK, so it is never lost.
pub fn kick_boot_vcpu() {
    if platform::current() == Platform::Shim && percpu::current().index() != 0 {
        let _ = hypercall::kick(CPUS[0].vcpu_id.load(Ordering::Acquire));
    }
}

/// Wakes vCPU 0 if it is idle (it must re-plan its sleep, e.g. for an earlier timer).
pub fn kick_boot_vcpu_if_idle() {
    if platform::current() != Platform::Shim || percpu::current().index() == 0 {
        return;
    }
    let boot = &CPUS[0];
    if boot.state.compare_exchange(state::IDLE, state::WAKING, Ordering::SeqCst, Ordering::SeqCst).is_ok()
        && boot.blocked.load(Ordering::SeqCst)
    {
        let _ = hypercall::kick(boot.vcpu_id.load(Ordering::Acquire));
    }
}

/// Marks `slot` busy (it found work).
pub fn set_busy(slot: &'static PerCpu) {
    // Only the vCPU itself leaves IDLE/WAKING for BUSY (others only make IDLE WAKING): its
    // idle spell is counted before the state says busy, so `idle_ns` never loses it.
    if matches!(slot.state.load(Ordering::Acquire), state::IDLE | state::WAKING) {
        let now = time::now_ns();
        let stolen = steal::of(slot.vcpu_id.load(Ordering::Relaxed));
        IDLE_NS.fetch_add(spell_ns(slot, now, stolen), Ordering::Relaxed);
        slot.idle_since_ns.store(now, Ordering::Release);
        slot.steal_at_idle_ns.store(stolen, Ordering::Release);
    }
    let prev = slot.state.swap(state::BUSY, Ordering::AcqRel);
    if prev == state::IDLE || prev == state::WAKING {
        IDLE.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `slot`'s idle time from its idle-since until `now` that was not stolen: the time its
/// thread waited for a host CPU meanwhile (kicked, or preempted while spinning) is steal
/// time, and the controller counts steal apart (see `crate::elastic`).
fn idle_spell_ns(slot: &PerCpu, now: u64) -> u64 {
    spell_ns(slot, now, steal::of(slot.vcpu_id.load(Ordering::Relaxed)))
}

/// [`idle_spell_ns`] with the vCPU's steal time `steal_now` already read.
fn spell_ns(slot: &PerCpu, now: u64, steal_now: u64) -> u64 {
    let spell = now.saturating_sub(slot.idle_since_ns.load(Ordering::Acquire));
    spell.saturating_sub(steal_now.saturating_sub(slot.steal_at_idle_ns.load(Ordering::Acquire)))
}

/// Idle time of all vCPUs until `now` (ns; spinning before a BLOCK counts as idle, time
/// stolen meanwhile does not): what [`set_busy`] has counted, plus the vCPUs idle at this
/// moment. The controller compares two readings to see how busy the online vCPUs were in
/// between. A vCPU that goes down takes its last spell with it; the controller starts a new
/// window whenever the online count changes, so no window spans that.
pub(crate) fn idle_ns(now: u64) -> u64 {
    let counted = IDLE_NS.load(Ordering::Relaxed);
    let ongoing: u64 = CPUS
        .iter()
        .filter(|s| matches!(s.state.load(Ordering::Acquire), state::IDLE | state::WAKING))
        .map(|s| idle_spell_ns(s, now))
        .sum();
    counted.saturating_add(ongoing)
}

/// Marks `slot` idle (it found no work). A kicked vCPU (`WAKING`) that found nothing either
/// becomes plainly idle again, keeping its idle-since time.
pub fn set_idle(slot: &'static PerCpu) {
    // Only the vCPU itself leaves BUSY: the spell's start is written before the state says
    // idle, so `idle_ns` never reads a stale one.
    if slot.state.load(Ordering::Acquire) == state::BUSY {
        slot.idle_since_ns.store(time::now_ns(), Ordering::Release);
        slot.steal_at_idle_ns.store(steal::of(slot.vcpu_id.load(Ordering::Relaxed)), Ordering::Release);
    }
    // SeqCst: pairs with the timer's "publish deadline, then look for idle vCPU 0".
    if slot.state.compare_exchange(state::BUSY, state::IDLE, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        IDLE.fetch_add(1, Ordering::AcqRel);
    } else {
        let _ = slot.state.compare_exchange(state::WAKING, state::IDLE, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Wakes one idle vCPU (if any) because work was queued.
pub fn kick_one_idle() {
    kick_idle(0);
}

/// Wakes one idle vCPU other than vCPU 0 (which never goes down), so it sees a request to go
/// down.
pub(crate) fn kick_one_idle_secondary() {
    kick_idle(1);
}

/// Wakes the first idle vCPU from slot `from` on, other than the caller.
fn kick_idle(from: usize) {
    if IDLE.load(Ordering::Acquire) == 0 || platform::current() != Platform::Shim {
        return;
    }
    let me = percpu::current() as *const PerCpu;
    for slot in CPUS.iter().skip(from) {
        if core::ptr::eq(slot, me) {
            continue;
        }
        if slot.state.compare_exchange(state::IDLE, state::WAKING, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            // A vCPU still spinning before its BLOCK sees WAKING by itself (see `idle_block`).
            if slot.blocked.load(Ordering::SeqCst) {
                let _ = hypercall::kick(slot.vcpu_id.load(Ordering::Acquire));
            }
            return;
        }
    }
}

/// Blocks an idle vCPU until a kick, a host notice, `has_work()` (work for this vCPU that
/// arrived without a kick: queued tasks, packets for the pump), or `timeout_ns`. Without a
/// host it spins instead (QEMU: one vCPU, nothing else to wake it).
///
/// `notify`: a DEVICE_NOTIFY the vCPU owes the host (a deferred one, see `net`). It is served
/// by the BLOCK itself, and the spin is skipped: what the vCPU waits for cannot come back
/// before the host has been told.
pub fn idle_block(slot: &'static PerCpu, timeout_ns: u64, notify: Option<u64>, has_work: &dyn Fn() -> bool) {
    if platform::current() != Platform::Shim {
        cpu::pause();
        return;
    }
    crate::console::flush_if_pending();
    if let Some(value) = notify {
        slot.blocked.store(true, Ordering::SeqCst);
        let woken = has_work() || slot.state.load(Ordering::SeqCst) != state::IDLE;
        if woken || hypercall::block_notifying(timeout_ns, value).is_err() {
            let _ = hypercall::device_notify_value(value);
        }
        slot.blocked.store(false, Ordering::SeqCst);
        slot.woke_tsc.store(cpu::rdtsc(), Ordering::Release);
        return;
    }
    // Spin a little first: work that shows up within a few tens of microseconds is then taken
    // without the two exits a BLOCK and the KICK that ends it cost. The window adapts the way
    // KVM's halt polling does: a BLOCK that work ended soon (within IDLE_SPIN_MAX_NS) is one a
    // longer spin would have saved, and the window doubles; a long one halves it, down to no
    // spinning at all, so an idle or sparsely used VM spends no CPU on it. Only a vCPU that
    // was busy within the window spins: an idle VM's wake-ups (timers) block at once.
    let woken = |slot: &PerCpu| has_work() || slot.state.load(Ordering::SeqCst) != state::IDLE;
    let window = slot.spin_window_ns.load(Ordering::Relaxed);
    let now = time::now_ns();
    let busy_until = slot.idle_since_ns.load(Ordering::Acquire).saturating_add(window);
    let until = busy_until.min(now.saturating_add(timeout_ns));
    while time::now_ns() < until {
        if woken(slot) {
            return;
        }
        cpu::pause();
    }
    slot.blocked.store(true, Ordering::SeqCst);
    if !woken(slot) {
        let start = time::now_ns();
        let why = hypercall::block(timeout_ns).unwrap_or(wake::TIMEOUT);
        if why & wake::TIMEOUT == 0 {
            let slept = time::now_ns().saturating_sub(start);
            let next = if slept <= IDLE_SPIN_MAX_NS {
                (window * 2).clamp(IDLE_SPIN_MIN_NS, IDLE_SPIN_MAX_NS)
            } else if window / 2 < IDLE_SPIN_MIN_NS {
                0
            } else {
                window / 2
            };
            slot.spin_window_ns.store(next, Ordering::Relaxed);
        }
    }
    slot.blocked.store(false, Ordering::SeqCst);
    slot.woke_tsc.store(cpu::rdtsc(), Ordering::Release);
}

/// A vCPU committed to going down: its slot is `DOWNING` and it no longer counts as online or
/// idle. What is left is [`GoingDown::finish`]; the caller may first do what must happen
/// before the vCPU is gone (it runs on the vCPU's own stack, which stays usable until then).
#[must_use = "a vCPU committed to going down must finish going down"]
#[derive(Debug)]
pub struct GoingDown {
    slot: &'static PerCpu,
}

impl GoingDown {
    /// Stores `OFFLINE` into the slot and issues VCPU_DOWN, in one step that touches no stack:
    /// from that store on, the slot and its stack may be reused. Never returns (the host
    /// refuses only vCPU 0, which never commits).
    pub fn finish(self) -> ! {
        let slot = self.slot;
        // SAFETY: `state` is the calling vCPU's own slot byte (only a vCPU commits itself);
        // after the store nothing uses this stack.
        let status = unsafe { hypercall::vcpu_down(slot.state.as_ptr(), state::OFFLINE) };
        // Only vCPU 0 may be refused, and it never gets here.
        panic!("VCPU_DOWN returned ({}) on vCPU {}", status.name(), slot.vcpu_id.load(Ordering::Relaxed));
    }
}

/// Commits the calling busy vCPU to going down for a host reclaim down to `target` vCPUs
/// (between tasks: whatever is queued stays in the shared queue for the vCPUs that remain).
/// `None` if it may not go: it is vCPU 0, there is no host, or the VM is already at `target`
/// or at min (another vCPU got there first).
pub fn begin_drain(slot: &'static PerCpu, target: usize) -> Option<GoingDown> {
    if slot.index() == 0 || platform::current() != Platform::Shim {
        return None;
    }
    let floor = target.max(MIN.load(Ordering::Relaxed));
    if online_update(|n| (n > floor).then_some(n - 1)).is_err() {
        return None;
    }
    let prev = slot.state.swap(state::DOWNING, Ordering::AcqRel);
    if prev == state::IDLE || prev == state::WAKING {
        IDLE.fetch_sub(1, Ordering::AcqRel);
    }
    slot.down_requested.store(false, Ordering::Release);
    slot.down_tsc.store(cpu::rdtsc(), Ordering::Release);
    Some(GoingDown { slot })
}

/// Commits the calling (idle) vCPU to going down if it may still go: never below `min`, never
/// vCPU 0, never when another vCPU just kicked it, and only if `may_go()` (asked once the
/// vCPU holds its place: `DOWNING`, and one fewer online) agrees. `None` if it stays up.
pub fn begin_idle_down(slot: &'static PerCpu, may_go: &dyn Fn() -> bool) -> Option<GoingDown> {
    if slot.index() == 0 || platform::current() != Platform::Shim {
        return None;
    }
    if slot.state.compare_exchange(state::IDLE, state::DOWNING, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return None; // kicked meanwhile: stay up
    }
    let min = MIN.load(Ordering::Relaxed);
    let reserved = online_update(|n| (n > min).then_some(n - 1));
    if reserved.is_err() || !may_go() {
        if reserved.is_ok() {
            online_undo(false);
        }
        slot.state.store(state::IDLE, Ordering::Release);
        return None;
    }
    IDLE.fetch_sub(1, Ordering::AcqRel);
    slot.down_requested.store(false, Ordering::Release);
    slot.down_tsc.store(cpu::rdtsc(), Ordering::Release);
    Some(GoingDown { slot })
}
