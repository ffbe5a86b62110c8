//! CPU helpers that are legal at CPL 3 with IOPL = 3: the hypercall `out`, port I/O, `rdtsc`,
//! `cpuid`, the GS base and `pause`.

use core::arch::asm;

use hypercall_abi::{HYPERCALL_PORT, NOP_PORT};

/// Executes one hypercall: `out dx, eax` with the call number in `eax` and the argument
/// block's guest-physical address in `rdi`. Returns `eax` afterwards: the host leaves the
/// status there too (so a call whose block it could not read still gets an answer); when no
/// host answered it still holds `call`.
///
/// # Safety
///
/// `block` must be the address of a live, correctly laid out argument block for `call`; the
/// host writes results into it before the instruction completes.
#[inline(always)]
pub unsafe fn hypercall(call: u32, block: u64) -> u32 {
    let eax: u32;
    // SAFETY: the caller guarantees `block` is a valid argument block. At CPL 3 the `out` is
    // permitted (IOPL = 3 and the TSS I/O bitmap); it touches no stack and preserves flags.
    // The asm is not marked `nomem`, so the compiler treats the block (whose address escapes
    // here) as read and written; `eax` is an output because the host replaces it.
    unsafe {
        asm!("out dx, eax", in("dx") HYPERCALL_PORT, inout("eax") call => eax, in("rdi") block,
             options(nostack, preserves_flags));
    }
    eax
}

/// Stores `value` into the byte at `flag`, then issues hypercall `call` with no argument block
/// (`rdi` = 0), in one asm block that touches no stack: from the moment the store is visible,
/// another vCPU may reuse the calling vCPU's stack (VCPU_DOWN publishes `OFFLINE` this way).
/// Returns `eax` afterwards (the status).
///
/// # Safety
///
/// `flag` must be valid for a one-byte write, and nothing may rely on the calling vCPU's stack
/// once the store is visible.
#[inline(always)]
pub unsafe fn store_then_hypercall(flag: *mut u8, value: u8, call: u32) -> u32 {
    let eax: u32;
    // SAFETY: the caller vouches for `flag`; the `out` carries no argument block and neither
    // instruction uses the stack.
    unsafe {
        asm!(
            "mov byte ptr [{flag}], {value}",
            "out dx, eax",
            flag = in(reg) flag,
            value = in(reg_byte) value,
            in("dx") HYPERCALL_PORT,
            inout("eax") call => eax,
            in("rdi") 0u64,
            options(nostack, preserves_flags),
        );
    }
    eax
}

/// A write to the port the shim ignores: one bare exit, used as the benchmark floor.
#[inline(always)]
pub fn nop_exit() {
    // SAFETY: `out` to NOP_PORT has no effect besides the exit; the I/O bitmap permits it.
    unsafe { asm!("out dx, eax", in("dx") NOP_PORT, in("eax") 0u32, options(nostack, nomem, preserves_flags)) };
}

/// Whether `wrgsbase`/`rdgsbase` may be used (CPUID.(7,0):EBX[0]; the shim always enables
/// CR4.FSGSBASE, the QEMU trampoline only when the CPU has it).
pub fn has_fsgsbase() -> bool {
    let (max, ..) = cpuid(0, 0);
    max >= 7 && cpuid(7, 0).1 & 1 != 0
}

/// Sets the GS base (per-CPU pointer).
///
/// # Safety
///
/// FSGSBASE must be enabled ([`has_fsgsbase`]).
#[inline(always)]
pub unsafe fn write_gs_base(value: u64) {
    // SAFETY: the caller checked FSGSBASE; `wrgsbase` is then legal at CPL 3.
    unsafe { asm!("wrgsbase {}", in(reg) value, options(nostack, nomem, preserves_flags)) };
}

/// Reads the GS base.
///
/// # Safety
///
/// FSGSBASE must be enabled ([`has_fsgsbase`]).
#[inline(always)]
pub unsafe fn read_gs_base() -> u64 {
    let v: u64;
    // SAFETY: the caller checked FSGSBASE; `rdgsbase` is then legal at CPL 3.
    unsafe { asm!("rdgsbase {}", out(reg) v, options(nostack, nomem, preserves_flags)) };
    v
}

/// Writes a 32-bit value to an I/O port.
///
/// # Safety
///
/// The port must belong to a device the caller owns (only used in QEMU mode).
#[inline(always)]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller owns the port; IOPL = 3 permits the instruction.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, nomem, preserves_flags)) };
}

/// Reads the time-stamp counter (permitted at CPL 3: the shim leaves CR4.TSD clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` has no memory effects and is allowed at CPL 3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Runs `cpuid` for `leaf`/`subleaf`, returning `(eax, ebx, ecx, edx)`.
#[inline]
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// A spin-wait hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Stops this vCPU for good when nothing else can be done (after a failed shutdown).
pub fn halt_forever() -> ! {
    loop {
        pause();
    }
}
