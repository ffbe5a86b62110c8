//! Steal time: how long this VM's vCPUs were ready to run but waited for a host CPU.
//!
//! KVM keeps one record per vCPU in the steal-time page (see [`hypercall_abi::steal`]) when
//! the host offered `features::STEAL_TIME`; reading it costs no exit. The vCPU controller
//! counts stolen time as time the vCPUs did not run work: vCPUs that wait for the host's
//! CPUs are not short of vCPUs, and one more would wait too.

use core::sync::atomic::{AtomicBool, Ordering, fence};

use hypercall_abi::{HelloArgs, MAX_VCPUS, StealTime, features};

use crate::platform::{self, Platform};

static OFFERED: AtomicBool = AtomicBool::new(false);

/// Records whether the host keeps steal time for this VM.
pub(crate) fn init(hello: Option<&HelloArgs>) {
    let offered = hello.is_some_and(|h| h.features & features::STEAL_TIME != 0);
    OFFERED.store(offered && platform::current() == Platform::Shim, Ordering::Release);
}

/// Nanoseconds all vCPUs have waited for a host CPU since boot (0 when the host keeps no
/// steal time).
pub(crate) fn total_ns() -> u64 {
    if !OFFERED.load(Ordering::Acquire) {
        return 0;
    }
    (0..MAX_VCPUS).map(read).fold(0u64, u64::saturating_add)
}

/// vCPU `id`'s steal time (ns; 0 when the host keeps none).
pub(crate) fn of(id: u32) -> u64 {
    if !OFFERED.load(Ordering::Acquire) || id >= MAX_VCPUS {
        return 0;
    }
    read(id)
}

/// vCPU `id`'s steal time from its record: KVM makes `version` odd while it writes, so a read
/// between two equal, even versions is whole (a few tries, then the last value read).
fn read(id: u32) -> u64 {
    let record = StealTime::addr(id) as *const StealTime;
    let mut steal = 0;
    for _ in 0..4 {
        // SAFETY: the shim maps the steal-time page read-only for CPL 3 at STEAL_TIME_ADDR
        // (offered only then); each record is plain data and any value is valid. Volatile:
        // KVM writes it behind the compiler's back.
        let (before, value, after) = unsafe {
            let before = core::ptr::addr_of!((*record).version).read_volatile();
            fence(Ordering::Acquire);
            let value = core::ptr::addr_of!((*record).steal).read_volatile();
            fence(Ordering::Acquire);
            (before, value, core::ptr::addr_of!((*record).version).read_volatile())
        };
        steal = value;
        if before == after && before % 2 == 0 {
            break;
        }
    }
    steal
}
