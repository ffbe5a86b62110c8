//! Per-CPU state: one statically allocated slot per possible vCPU, found through the GS base.
//!
//! A slot's `state` is the kernel's view of that vCPU. Other vCPUs read it to find an idle
//! vCPU to kick, and the slot's own vCPU publishes `OFFLINE` as the very last thing it does
//! before going down (see [`crate::smp`]).

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::arch::cpu;

/// Most vCPUs the kernel can run at once.
pub const MAX_CPUS: usize = hypercall_abi::MAX_VCPUS as usize;

/// Values of [`PerCpu::state`].
pub mod state {
    /// Not running (never started, or went down).
    pub const OFFLINE: u8 = 0;
    /// Reserved by a VCPU_UP in flight.
    pub const STARTING: u8 = 1;
    /// Running tasks or looking for one.
    pub const BUSY: u8 = 2;
    /// Found no work; blocked or about to block.
    pub const IDLE: u8 = 3;
    /// Idle and already kicked by another vCPU.
    pub const WAKING: u8 = 4;
    /// Committed to going down.
    pub const DOWNING: u8 = 5;
}

/// One vCPU's slot.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct PerCpu {
    /// The slot's kernel state ([`state`]).
    pub state: AtomicU8,
    /// Set by another vCPU to ask this one to go down at its next idle moment.
    pub down_requested: AtomicBool,
    /// The host's id for this vCPU (valid while online).
    pub vcpu_id: AtomicU32,
    /// TSC at this vCPU's first instruction (written by the entry stub; benchmarks).
    pub started_tsc: AtomicU64,
    /// TSC right before its last VCPU_DOWN (benchmarks).
    pub down_tsc: AtomicU64,
    /// TSC when its last BLOCK returned (benchmarks).
    pub woke_tsc: AtomicU64,
    /// Kernel time (ns) when it last became idle.
    pub idle_since_ns: AtomicU64,
    /// Its steal time (ns, `crate::steal`) when it last became idle.
    pub steal_at_idle_ns: AtomicU64,
    /// Base of this slot's stack (0 until first allocated; kept for reuse).
    pub stack_base: AtomicUsize,
    /// Whether this vCPU is inside a task's poll (work it queues then needs another vCPU).
    pub in_task: AtomicBool,
    /// Set right before BLOCK: a vCPU that wakes this one must then KICK it (an idle vCPU
    /// that is still spinning notices new work by itself).
    pub blocked: AtomicBool,
    /// Kernel time (ns) when this vCPU started waiting for a lock, and of its last look
    /// (`crate::sync`).
    pub relax_start_ns: AtomicU64,
    /// See `relax_start_ns`.
    pub relax_last_ns: AtomicU64,
    /// How long this vCPU spins for work before it BLOCKs (adapts, see `crate::smp`).
    pub spin_window_ns: AtomicU64,
}

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            state: AtomicU8::new(state::OFFLINE),
            down_requested: AtomicBool::new(false),
            vcpu_id: AtomicU32::new(0),
            started_tsc: AtomicU64::new(0),
            down_tsc: AtomicU64::new(0),
            woke_tsc: AtomicU64::new(0),
            idle_since_ns: AtomicU64::new(0),
            steal_at_idle_ns: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            stack_base: AtomicUsize::new(0),
            in_task: AtomicBool::new(false),
            relax_start_ns: AtomicU64::new(0),
            relax_last_ns: AtomicU64::new(0),
            spin_window_ns: AtomicU64::new(0),
        }
    }

    /// This slot's index in [`CPUS`].
    pub fn index(&'static self) -> usize {
        (self as *const PerCpu as usize - CPUS.as_ptr() as usize) / core::mem::size_of::<PerCpu>()
    }

    /// The current state.
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

/// Every slot. Slot 0 is the boot vCPU.
pub static CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];

static USE_GS: AtomicBool = AtomicBool::new(false);

/// Decides once whether the GS base can hold the per-CPU pointer.
pub fn init() {
    USE_GS.store(cpu::has_fsgsbase(), Ordering::Relaxed);
    set_current(&CPUS[0]);
}

/// Makes `slot` the calling vCPU's slot.
pub fn set_current(slot: &'static PerCpu) {
    if USE_GS.load(Ordering::Relaxed) {
        // SAFETY: FSGSBASE is enabled (checked in `init`); GS is used for nothing else.
        unsafe { cpu::write_gs_base(slot as *const PerCpu as u64) };
    }
}

/// The calling vCPU's slot (slot 0 when the GS base is unavailable, which only happens
/// single-vCPU under QEMU).
pub fn current() -> &'static PerCpu {
    if USE_GS.load(Ordering::Relaxed) {
        // SAFETY: FSGSBASE is enabled; the GS base is 0 or a pointer into `CPUS` set by
        // `set_current`.
        let p = unsafe { cpu::read_gs_base() } as *const PerCpu;
        if !p.is_null() {
            // SAFETY: every value written to the GS base is `&CPUS[i]`, a 'static slot.
            return unsafe { &*p };
        }
    }
    &CPUS[0]
}
