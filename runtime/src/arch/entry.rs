//! The shim's entry points and the boot stack.
//!
//! * `_start`: the shim enters vCPU 0 here directly at CPL 3 in 64-bit mode with IOPL = 3,
//!   `rdi` = the guest-physical address of the boot-info block and `rsi` = the vCPU id (0). It
//!   continues in [`crate::kernel_main`].
//! * `secondary_entry`: every other vCPU starts here (VCPU_UP), with `rdi` = its per-CPU slot,
//!   `rsi` = its vCPU id and `rsp` = the slot's stack. It records its first TSC and continues
//!   in `secondary_main` (`crate::worker`), by symbol.

use core::arch::global_asm;

use hypercall_abi::BootInfo;

use crate::percpu::PerCpu;

/// Size of the boot vCPU's stack.
pub const BOOT_STACK_SIZE: usize = 256 * 1024;

global_asm!(
    r#"
    .section .text.entry, "ax", @progbits
    .global _start
_start:
    leaq boot_stack_top(%rip), %rsp
    xorl %ebp, %ebp
    call kernel_start_shim
    ud2

    .section .bss.boot_stack, "aw", @nobits
    .balign 4096
    .global boot_stack_bottom
boot_stack_bottom:
    .skip {size}
    .global boot_stack_top
boot_stack_top:
"#,
    size = const BOOT_STACK_SIZE,
    options(att_syntax)
);

/// Rust side of `_start`: validates the boot-info block and enters the kernel.
#[unsafe(no_mangle)]
extern "C" fn kernel_start_shim(boot_info: u64, _vcpu: u64) -> ! {
    let ptr = boot_info as *const BootInfo;
    // SAFETY: the shim put a `BootInfo` at this identity-mapped address (readable at CPL 3).
    // It is only read, and it is plain data, so any bit pattern is a valid value.
    let info = unsafe { ptr.read_volatile() };
    if !info.is_valid() {
        // Without a valid block there is no command line and no memory map; all that can be
        // done is to stop with a distinctive code.
        crate::platform::exit(hypercall_abi::exit_code::BAD_COMMAND_LINE);
    }
    crate::kernel_main(info)
}

global_asm!(
    r#"
    .section .text.entry, "ax", @progbits
    .global secondary_entry
secondary_entry:
    /* rdi = &PerCpu, rsi = vCPU id, rsp = the slot's stack. First: timestamp. */
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, {started}(%rdi)
    xorl %ebp, %ebp
    call secondary_main
    ud2
"#,
    started = const core::mem::offset_of!(PerCpu, started_tsc),
    options(att_syntax)
);

unsafe extern "C" {
    fn secondary_entry();
}

/// Address of `secondary_entry`, the entry point VCPU_UP starts secondary vCPUs at.
pub fn secondary_entry_addr() -> u64 {
    secondary_entry as *const () as u64
}
