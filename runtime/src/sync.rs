//! The lock every vCPU-shared structure uses: a spin lock whose waiter, after a short spin,
//! gives its CPU back to the host.
//!
//! A vCPU is a host thread, and on a shared host the scheduler may preempt it in the middle
//! of a critical section. A plain spin lock then has every other vCPU that wants the lock spin
//! for the rest of the host's time slice (milliseconds), on a CPU the preempted holder may
//! need. Here a waiter spins for at most [`SPIN_LIMIT_NS`] (critical sections take well under
//! a microsecond), then BLOCKs for [`BACK_OFF_NS`]: its host thread sleeps, the CPU goes idle,
//! and the host scheduler runs (or pulls over) the holder. The waiter then tries again.
//!
//! The waiting time is kept per vCPU in its slot ([`crate::percpu`]): a wait is one run of
//! `relax` calls less than [`NEW_WAIT_NS`] apart. Outside the guest (the runtime's host unit
//! tests) the lock is a plain spin lock.

use core::sync::atomic::{AtomicU64, Ordering};

/// A mutual-exclusion lock for data several vCPUs share (see the module doc).
pub(crate) type Mutex<T> = spin::mutex::Mutex<T, HostRelax>;

/// Longest a waiter spins before it backs off to the host.
pub(crate) const SPIN_LIMIT_NS: u64 = 20_000;
/// How long a backing-off waiter sleeps (a BLOCK with this timeout).
pub(crate) const BACK_OFF_NS: u64 = 50_000;
/// Relax calls further apart than this start a new wait.
const NEW_WAIT_NS: u64 = 2_000;

/// Times a waiter backed off (all vCPUs).
static BACK_OFFS: AtomicU64 = AtomicU64::new(0);

/// How many times a lock waiter gave its CPU back to the host so far.
pub(crate) fn back_offs() -> u64 {
    BACK_OFFS.load(Ordering::Relaxed)
}

/// The relax strategy of [`Mutex`]: spin, then back off to the host.
#[derive(Debug)]
pub(crate) struct HostRelax;

impl spin::RelaxStrategy for HostRelax {
    #[inline]
    fn relax() {
        #[cfg(target_os = "none")]
        back_off_if_long();
        core::hint::spin_loop();
    }
}

#[cfg(target_os = "none")]
fn back_off_if_long() {
    use crate::{hypercall, percpu, time};
    let slot = percpu::current();
    let now = time::now_ns();
    let last = slot.relax_last_ns.swap(now, Ordering::Relaxed);
    if now.saturating_sub(last) > NEW_WAIT_NS {
        slot.relax_start_ns.store(now, Ordering::Relaxed);
        return;
    }
    if now.saturating_sub(slot.relax_start_ns.load(Ordering::Relaxed)) < SPIN_LIMIT_NS {
        return;
    }
    // The holder is most likely not running: let the host run it. Under QEMU (one vCPU, so
    // never here) or a refused BLOCK this is only a longer spin.
    BACK_OFFS.fetch_add(1, Ordering::Relaxed);
    let _ = hypercall::block(BACK_OFF_NS);
    let after = time::now_ns();
    slot.relax_start_ns.store(after, Ordering::Relaxed);
    slot.relax_last_ns.store(after, Ordering::Relaxed);
}
