//! QEMU boot path: the PVH entry note, a short CPL-0 trampoline into long mode, and the drop
//! to CPL 3 with IOPL = 3, after which the kernel runs exactly as it does under the shim.
//!
//! QEMU enters `pvh_start32` in 32-bit protected mode with paging off and `ebx` = the
//! `hvm_start_info` block. The trampoline identity-maps the first 4 GiB with 2 MiB pages
//! (user-accessible), loads a GDT (kernel and user 64-bit segments, one TSS) and an IDT whose
//! 32 exception stubs print a one-line diagnosis on COM1 and exit through isa-debug-exit, then
//! `iretq`s to CPL 3. Keep it short and plain: CPL-0 code is emulated on this machine's KVM
//! (no SSE, no `int3`).

use core::arch::global_asm;

use hypercall_abi::{BootInfo, QEMU_DEBUG_EXIT_PORT, QEMU_FAULT_EXIT_VALUE, ResourceLimits};

/// `hvm_start_info::magic`.
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// `hvm_memmap_table_entry::type` for usable RAM.
const HVM_MEMMAP_RAM: u32 = 1;

macro_rules! isr_noerr {
    ($v:literal) => {
        concat!(".balign 16\n pushq $0\n pushq $", stringify!($v), "\n jmp pvh_fault_common\n")
    };
}
macro_rules! isr_err {
    ($v:literal) => {
        concat!(".balign 16\n pushq $", stringify!($v), "\n jmp pvh_fault_common\n")
    };
}

global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz */
    .long 8                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .text.pvh, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                     /* hvm_start_info */

    /* PML4[0] -> PDPT; PDPT[0..4] -> four PDs; 2048 x 2 MiB user pages = first 4 GiB */
    movl $pvh_pdpt, %eax
    orl $0x7, %eax
    movl %eax, pvh_pml4
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $pvh_pd, %eax
    orl $0x7, %eax
    movl %eax, pvh_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x87, %eax
    movl %eax, pvh_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, pvh_pd+4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    /* CR4 = PAE | OSFXSR | OSXMMEXCPT, plus FSGSBASE when CPUID.(7,0):EBX[0] says so */
    movl $7, %eax
    xorl %ecx, %ecx
    cpuid
    movl $0x620, %eax
    testl $1, %ebx
    jz 3f
    orl $0x10000, %eax
3:  movl %cr4, %edx
    orl %eax, %edx
    movl %edx, %cr4

    movl $pvh_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx              /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax               /* PG | WP | PE */
    andl $0x9fffffff, %eax              /* clear CD, NW */
    movl %eax, %cr0
    lgdt pvh_gdt_ptr
    ljmp $0x08, $pvh_start64

    .code64
pvh_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs

    /* TSS: patch its base into the descriptor, set RSP0, load TR */
    leaq pvh_tss(%rip), %rax
    movw %ax, pvh_gdt+0x2a(%rip)
    shrq $16, %rax
    movb %al, pvh_gdt+0x2c(%rip)
    movb %ah, pvh_gdt+0x2f(%rip)
    shrq $16, %rax
    movl %eax, pvh_gdt+0x30(%rip)
    leaq pvh_kstack_top(%rip), %rax
    movq %rax, pvh_tss+4(%rip)
    movw $104, pvh_tss+102(%rip)        /* I/O bitmap right after the TSS: all ports allowed */
    movb $0xff, pvh_tss+104+8192(%rip)  /* bitmap terminator */
    movw $0x28, %ax
    ltr %ax

    /* IDT: 32 present DPL-0 interrupt gates to the 16-byte stubs at pvh_isr_table */
    leaq pvh_idt(%rip), %rdi
    leaq pvh_isr_table(%rip), %rdx
    xorl %ecx, %ecx
4:  movq %rdx, %rax
    movw %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8E00, 4(%rdi)
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    movl $0, 12(%rdi)
    addq $16, %rdi
    addq $16, %rdx
    incl %ecx
    cmpl $32, %ecx
    jb 4b
    lidt pvh_idt_ptr(%rip)

    /* Drop to CPL 3, IOPL 3, on the boot stack; rdi = hvm_start_info */
    movl %esi, %edi
    pushq $0x23
    leaq boot_stack_top(%rip), %rax
    pushq %rax
    pushq $0x3002
    pushq $0x1b
    leaq pvh_cpl3(%rip), %rax
    pushq %rax
    iretq

pvh_cpl3:
    call pvh_main
    ud2

    /* CPL-0 exception path: frame is [vector][error][rip][cs][rflags][rsp][ss] */
pvh_fault_common:
    leaq pvh_msg_vector(%rip), %rsi
    call pvh_puts
    movq 0(%rsp), %rax
    call pvh_puthex
    leaq pvh_msg_error(%rip), %rsi
    call pvh_puts
    movq 8(%rsp), %rax
    call pvh_puthex
    leaq pvh_msg_rip(%rip), %rsi
    call pvh_puts
    movq 16(%rsp), %rax
    call pvh_puthex
    leaq pvh_msg_rflags(%rip), %rsi
    call pvh_puts
    movq 32(%rsp), %rax
    call pvh_puthex
    leaq pvh_msg_cr2(%rip), %rsi
    call pvh_puts
    movq %cr2, %rax
    call pvh_puthex
    leaq pvh_msg_end(%rip), %rsi
    call pvh_puts
    movl ${fault}, %eax
    movw ${exit_port}, %dx
    outl %eax, %dx
5:  hlt
    jmp 5b

pvh_puts:                               /* rsi = NUL-terminated string -> COM1 */
    movw $0x3f8, %dx
6:  movb (%rsi), %al
    testb %al, %al
    jz 7f
    outb %al, %dx
    incq %rsi
    jmp 6b
7:  ret

pvh_puthex:                             /* rax -> 16 hex digits on COM1 */
    movq %rax, %r8
    movl $16, %ecx
    movw $0x3f8, %dx
8:  rolq $4, %r8
    movl %r8d, %eax
    andl $0xf, %eax
    cmpl $10, %eax
    jb 9f
    addl $39, %eax
9:  addl $48, %eax
    outb %al, %dx
    decl %ecx
    jnz 8b
    ret

    .balign 16
    .global pvh_isr_table
pvh_isr_table:
"#,
    isr_noerr!(0), isr_noerr!(1), isr_noerr!(2), isr_noerr!(3),
    isr_noerr!(4), isr_noerr!(5), isr_noerr!(6), isr_noerr!(7),
    isr_err!(8), isr_noerr!(9), isr_err!(10), isr_err!(11),
    isr_err!(12), isr_err!(13), isr_err!(14), isr_noerr!(15),
    isr_noerr!(16), isr_err!(17), isr_noerr!(18), isr_noerr!(19),
    isr_noerr!(20), isr_err!(21), isr_noerr!(22), isr_noerr!(23),
    isr_noerr!(24), isr_noerr!(25), isr_noerr!(26), isr_noerr!(27),
    isr_noerr!(28), isr_err!(29), isr_err!(30), isr_noerr!(31),
    r#"
    .section .rodata.pvh, "a", @progbits
pvh_msg_vector: .asciz "\r\n[kernel] CPU exception (QEMU mode): vector 0x"
pvh_msg_error:  .asciz " error 0x"
pvh_msg_rip:    .asciz " rip 0x"
pvh_msg_cr2:    .asciz " cr2 0x"
pvh_msg_rflags: .asciz " rflags 0x"
pvh_msg_end:    .asciz "\r\n"

    .section .data.pvh, "aw", @progbits
    .balign 16
pvh_gdt:
    .quad 0                             /* 0x00 null */
    .quad 0x00af9a000000ffff            /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff            /* 0x10 kernel data */
    .quad 0x00affa000000ffff            /* 0x18 user code, 64-bit, DPL 3 */
    .quad 0x00cff2000000ffff            /* 0x20 user data, DPL 3 */
    .quad 0x000089000000206b            /* 0x28 TSS + I/O bitmap, limit 104 + 8192 + 1 - 1 (base patched at run time) */
    .quad 0
pvh_gdt_end:
    .balign 8
pvh_gdt_ptr:
    .word pvh_gdt_end - pvh_gdt - 1
    .quad pvh_gdt
    .balign 8
pvh_idt_ptr:
    .word 32 * 16 - 1
    .quad pvh_idt

    .section .bss.pvh, "aw", @nobits
    .balign 4096
pvh_pml4: .skip 4096
pvh_pdpt: .skip 4096
pvh_pd:   .skip 4 * 4096
pvh_idt:  .skip 32 * 16
    .balign 16
pvh_tss:  .skip 104 + 8192 + 1
    .balign 16
pvh_kstack: .skip 4096
pvh_kstack_top:
"#,
    fault = const QEMU_FAULT_EXIT_VALUE,
    exit_port = const QEMU_DEBUG_EXIT_PORT,
    options(att_syntax)
);

/// The `hvm_start_info` block (Xen PVH boot ABI, version 1 layout).
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// One `hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

unsafe extern "C" {
    static __kernel_end: u8;
}

/// Rust side of the PVH path, at CPL 3: turns `hvm_start_info` into a [`BootInfo`] and
/// enters the kernel.
#[unsafe(no_mangle)]
extern "C" fn pvh_main(start_info: u64) -> ! {
    // SAFETY: QEMU placed an `hvm_start_info` at this identity-mapped address; it is plain
    // data read once.
    let si = unsafe { (start_info as *const HvmStartInfo).read_volatile() };
    if si.magic != HVM_START_MAGIC {
        crate::platform::exit(hypercall_abi::exit_code::BAD_COMMAND_LINE);
    }
    let kernel_end = core::ptr::addr_of!(__kernel_end) as u64;
    let heap_base = kernel_end.next_multiple_of(4096);
    // The RAM entry that holds the kernel bounds boot memory.
    let mut ram_end = 0;
    if si.version >= 1 {
        for i in 0..u64::from(si.memmap_entries.min(128)) {
            let at = si.memmap_paddr + i * core::mem::size_of::<HvmMemmapEntry>() as u64;
            // SAFETY: QEMU's memory map table, `memmap_entries` long, identity mapped.
            let e = unsafe { (at as *const HvmMemmapEntry).read_volatile() };
            if e.kind == HVM_MEMMAP_RAM && e.addr <= heap_base && heap_base < e.addr + e.size {
                ram_end = e.addr + e.size;
            }
        }
    }
    let mut cmdline_len = 0u64;
    while si.cmdline_paddr != 0 && cmdline_len < hypercall_abi::CMDLINE_MAX {
        // SAFETY: a NUL-terminated string QEMU wrote in identity-mapped RAM; the scan stops at
        // the NUL or after CMDLINE_MAX bytes.
        let byte = unsafe { ((si.cmdline_paddr + cmdline_len) as *const u8).read_volatile() };
        if byte == 0 {
            break;
        }
        cmdline_len += 1;
    }
    let mut info = BootInfo::zeroed();
    info.magic = hypercall_abi::BOOT_INFO_MAGIC;
    info.abi_version = hypercall_abi::ABI_VERSION;
    info.size = core::mem::size_of::<BootInfo>() as u32;
    info.ram_size = ram_end;
    info.heap_base = heap_base;
    info.heap_size = ram_end.saturating_sub(heap_base);
    // The kernel reads the TSC frequency from CPUID itself when no shim answers HELLO.
    info.tsc_khz = 0;
    info.cmdline = si.cmdline_paddr;
    info.cmdline_len = cmdline_len;
    info.vcpus = ResourceLimits { min: 1, max: 1, burst: 1 };
    info.memory = ResourceLimits { min: ram_end, max: ram_end, burst: ram_end };
    crate::kernel_main(info)
}
