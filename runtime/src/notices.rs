//! Host notices: the shim writes the notice page and bumps its sequence number; the kernel
//! compares the number at every task boundary (a plain memory read, no exit) and fetches and
//! acknowledges the notices with EVENTS only when it changed.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::sync::Mutex;
use hypercall_abi::{NOTICE_ADDR, NoticePage, notice};

use crate::platform::{self, Platform};
use crate::{elastic, hypercall};

static LAST_SEQ: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);
/// Whether reclaim notices are honoured (`elastic.cooperate=off` makes a guest that ignores
/// them, to show the host's enforcement).
static COOPERATE: AtomicBool = AtomicBool::new(true);

/// Sets whether the kernel honours reclaim notices.
pub fn set_cooperate(on: bool) {
    COOPERATE.store(on, Ordering::Release);
}
static POLLING: Mutex<()> = Mutex::new(());

/// The host's view of the VM as published in the notice page.
pub fn page() -> Option<NoticePage> {
    if platform::current() != Platform::Shim {
        return None;
    }
    // SAFETY: the shim maps the notice page read-only for CPL 3 at NOTICE_ADDR; it is plain
    // data and any value is valid. Volatile: the host changes it behind the compiler's back.
    Some(unsafe { (NOTICE_ADDR as *const NoticePage).read_volatile() })
}

/// The host's count of this VM's online vCPUs.
pub fn host_online_vcpus() -> u64 {
    page().map_or(1, |p| p.online_vcpus)
}

/// Whether the host asked the VM to stop.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Acquire)
}

/// Checks the notice page and handles new notices.
pub fn poll() {
    let Some(p) = page() else { return };
    if p.seq == LAST_SEQ.load(Ordering::Acquire) {
        return;
    }
    let Some(_guard) = POLLING.try_lock() else { return };
    LAST_SEQ.store(p.seq, Ordering::Release);
    let Some(ev) = hypercall::events() else { return };
    if ev.pending & notice::STOP != 0 {
        log::info!("host asked the VM to stop");
        STOP.store(true, Ordering::Release);
        // vCPU 0 shuts the VM down; it may have re-blocked before this vCPU got here.
        crate::smp::kick_boot_vcpu();
    }
    let cooperate = COOPERATE.load(Ordering::Acquire);
    if ev.pending & notice::RECLAIM_MEMORY != 0 {
        if cooperate {
            log::info!(
                "host reclaims memory: coming down to {} MiB within {} ms",
                ev.memory_target >> 20,
                ev.grace_ns / 1_000_000
            );
            elastic::set_memory_target(Some(ev.memory_target));
        } else {
            log::warn!(
                "host reclaims memory (down to {} MiB): ignored (elastic.cooperate=off)",
                ev.memory_target >> 20
            );
        }
    }
    if ev.pending & notice::RECLAIM_VCPUS != 0 {
        if cooperate {
            log::info!("host reclaims vCPUs: coming down to {} within {} ms", ev.vcpu_target, ev.grace_ns / 1_000_000);
            elastic::set_vcpu_target(Some(ev.vcpu_target as usize));
        } else {
            log::warn!("host reclaims vCPUs (down to {}): ignored (elastic.cooperate=off)", ev.vcpu_target);
        }
    }
    if ev.pending & notice::RECLAIM_MEMORY_OVER != 0 {
        log::info!("memory reclaim over");
        elastic::set_memory_target(None);
    }
    if ev.pending & notice::RECLAIM_VCPUS_OVER != 0 {
        log::info!("vCPU reclaim over");
        elastic::set_vcpu_target(None);
    }
    if ev.pending & notice::POLICY != 0 {
        // EVENTS rewrote the page before it returned: its limits are the new ones.
        let now = page().unwrap_or(p);
        crate::smp::set_limits(now.vcpu_max, now.vcpu_burst);
        log::info!(
            "host changed the policy: vCPUs max {} burst {}, memory max {} MiB burst {} MiB",
            now.vcpu_max,
            now.vcpu_burst,
            now.memory_max >> 20,
            now.memory_burst >> 20
        );
    }
}
