//! The guest-physical address map the shim builds for every VM.
//!
//! ```text
//! 0x0000_0000  not present (null guard)
//! 0x0000_1000  GDT: null, kernel code/data (DPL 0), user code/data (DPL 3), one TSS per vCPU
//! 0x0000_2000  IDT: 256 gates, vectors 0-31 -> exception stubs (DPL 0)
//! 0x0000_3000  exception stubs, 16 bytes per vector
//! 0x0000_8000  boot info          (user read-only)
//! 0x0000_9000  kernel command line (user read-only)
//! 0x0000_A000  notice page, written by the shim (user read-only)
//! 0x0000_B000  steal-time page, written by KVM: 64 bytes per vCPU (user read-only)
//! 0x0001_0000  TSSs, 128 bytes per vCPU
//! 0x0001_4000  I/O permission bitmap shared by every TSS (all ports allowed)
//! 0x0002_0000  CPL-0 exception stacks, 1 KiB per vCPU
//! 0x0010_0000  page tables (not mapped: only the MMU reads them)
//! 0x0020_0000  kernel image, then the kernel's heap, up to `ram_size` (2 MiB user pages)
//! window_base  hot-plug window: granted extents appear here (mapped from boot, backed on grant)
//! ```
//!
//! Everything below 2 MiB is the platform's, mapped with 4 KiB pages; CPL 3 may read only
//! the boot-info, command-line, notice and steal-time pages. Boot memory and the whole hot-plug window are
//! identity-mapped with 2 MiB user pages, so a memory grant needs no page-table change.

use hypercall_abi::{BOOT_INFO_ADDR, CMDLINE_ADDR, NOTICE_ADDR};

/// Most vCPUs a VM may have (the ABI's limit; GDT, TSS and CPL-0 stack space is reserved for
/// this many).
pub(crate) const MAX_VCPUS: u32 = hypercall_abi::MAX_VCPUS;

/// GDT.
pub(crate) const GDT_ADDR: u64 = 0x1000;
/// IDT.
pub(crate) const IDT_ADDR: u64 = 0x2000;
/// Exception stubs.
pub(crate) const STUBS_ADDR: u64 = 0x3000;
/// Bytes per exception stub.
pub(crate) const STUB_SIZE: u64 = 16;
/// First TSS.
pub(crate) const TSS_BASE: u64 = 0x1_0000;
/// Distance between TSSs.
pub(crate) const TSS_STRIDE: u64 = 128;
/// Size of a 64-bit TSS without its I/O bitmap.
pub(crate) const TSS_SIZE: u64 = 104;
/// The I/O permission bitmap every TSS points at: 8 KiB of zero bits (every port allowed)
/// and the terminating 0xFF byte. The guest also gets IOPL = 3, but PVM (the KVM flavour on
/// some nested hosts, including this project's CI machine) ignores IOPL at CPL 3 and
/// consults this bitmap instead.
pub(crate) const IO_BITMAP_ADDR: u64 = 0x1_4000;
/// Size of the I/O bitmap including its terminator.
pub(crate) const IO_BITMAP_SIZE: u64 = 8192 + 1;
/// First CPL-0 exception stack.
pub(crate) const CPL0_STACKS: u64 = 0x2_0000;
/// Size of each CPL-0 exception stack.
pub(crate) const CPL0_STACK_SIZE: u64 = 0x400;
/// PML4.
pub(crate) const PML4_ADDR: u64 = 0x10_0000;
/// The one PDPT (covers 512 GiB).
pub(crate) const PDPT_ADDR: u64 = 0x10_1000;
/// Page table for the first 2 MiB (4 KiB pages).
pub(crate) const PT_LOW_ADDR: u64 = 0x10_2000;
/// First page directory (one per GiB of guest-physical space).
pub(crate) const PD_BASE: u64 = 0x10_3000;
/// End of the page-table area.
pub(crate) const PAGE_TABLES_END: u64 = 0x20_0000;
/// Highest guest-physical address a VM may have (the configuration grammar refuses policies
/// beyond it); the page-table area maps exactly that far.
pub(crate) use elastic_config::layout::{MAX_GUEST_PHYS, window_base};
const _: () = assert!(((PAGE_TABLES_END - PD_BASE) / 0x1000) << 30 == MAX_GUEST_PHYS);

/// GDT selectors.
pub(crate) mod selector {
    /// Kernel (CPL 0) 64-bit code: used only by the exception stubs.
    pub(crate) const KERNEL_CODE: u16 = 0x08;
    /// User (CPL 3) 64-bit code, RPL 3.
    pub(crate) const USER_CODE: u16 = 0x18 | 3;
    /// User (CPL 3) data, RPL 3.
    pub(crate) const USER_DATA: u16 = 0x20 | 3;
    /// First TSS descriptor (16 bytes each).
    pub(crate) const TSS_FIRST: u16 = 0x28;

    /// The TSS selector of vCPU `id`.
    pub(crate) const fn tss(id: u32) -> u16 {
        TSS_FIRST + (id as u16) * 16
    }
}

/// Number of GDT bytes in use.
pub(crate) const GDT_SIZE: u64 = selector::TSS_FIRST as u64 + 16 * MAX_VCPUS as u64;

const _: () = assert!(GDT_ADDR + GDT_SIZE <= IDT_ADDR);
const _: () = assert!(STUBS_ADDR + 32 * STUB_SIZE <= BOOT_INFO_ADDR);
const _: () = assert!(TSS_BASE + TSS_STRIDE * MAX_VCPUS as u64 <= IO_BITMAP_ADDR);
const _: () = assert!(IO_BITMAP_ADDR + IO_BITMAP_SIZE <= CPL0_STACKS);
const _: () = assert!(IO_BITMAP_ADDR - TSS_BASE < 0x1_0000, "the bitmap offset is a 16-bit TSS field");
const _: () = assert!(CPL0_STACKS + CPL0_STACK_SIZE * MAX_VCPUS as u64 <= PML4_ADDR);
const _: () = assert!(CMDLINE_ADDR + hypercall_abi::CMDLINE_MAX <= NOTICE_ADDR);
const _: () = assert!(NOTICE_ADDR + 0x1000 <= TSS_BASE);
const _: () = assert!(hypercall_abi::STEAL_TIME_ADDR + 0x1000 <= TSS_BASE);
const _: () = assert!(MAX_GUEST_PHYS >= 128 << 30);

/// One VM's memory layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Layout {
    /// Boot memory size (`memory.min`), a multiple of 2 MiB.
    pub(crate) ram_size: u64,
    /// Start of the hot-plug window (1 GiB aligned).
    pub(crate) window_base: u64,
    /// Size of the hot-plug window (`memory.burst - memory.min`).
    pub(crate) window_size: u64,
}

impl Layout {
    /// The layout for boot memory `min` and ceiling `burst`.
    pub(crate) const fn new(min: u64, burst: u64) -> Self {
        Layout { ram_size: min, window_base: window_base(min), window_size: burst - min }
    }

    /// End of the hot-plug window.
    pub(crate) const fn window_end(&self) -> u64 {
        self.window_base + self.window_size
    }

    /// `true` when `[addr, addr + len)` lies inside the hot-plug window.
    pub(crate) fn in_window(&self, addr: u64, len: u64) -> bool {
        addr >= self.window_base && addr.checked_add(len).is_some_and(|end| end <= self.window_end())
    }

    /// Top of vCPU `id`'s CPL-0 exception stack.
    pub(crate) const fn cpl0_stack_top(id: u32) -> u64 {
        CPL0_STACKS + (id as u64 + 1) * CPL0_STACK_SIZE
    }

    /// Address of vCPU `id`'s TSS.
    pub(crate) const fn tss_addr(id: u32) -> u64 {
        TSS_BASE + id as u64 * TSS_STRIDE
    }

    /// Limit of vCPU `id`'s TSS segment: it extends over the shared I/O bitmap.
    pub(crate) const fn tss_limit(id: u32) -> u64 {
        IO_BITMAP_ADDR + IO_BITMAP_SIZE - 1 - Self::tss_addr(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_on_a_gib_boundary() {
        assert_eq!(window_base(64 << 20), 1 << 30);
        assert_eq!(window_base(1 << 30), 1 << 30);
        assert_eq!(window_base((1 << 30) + (2 << 20)), 2 << 30);
        let l = Layout::new(64 << 20, 1 << 30);
        assert_eq!(l.window_size, (1 << 30) - (64 << 20));
        assert!(l.in_window(1 << 30, 2 << 20));
        assert!(!l.in_window((1 << 30) - 4096, 8192));
        assert!(!l.in_window(u64::MAX - 10, 100));
    }

    #[test]
    fn selectors() {
        assert_eq!(selector::tss(0), 0x28);
        assert_eq!(selector::tss(1), 0x38);
    }
}
