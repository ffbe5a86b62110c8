//! Builds the privileged platform the CPL-3 kernel runs on: GDT with one TSS per vCPU, IDT
//! with CPL-0 exception stubs that report to the shim, identity-mapping page tables for boot
//! memory and the hot-plug window, the boot-info block and the command line.

use hypercall_abi::{
    ABI_VERSION, BOOT_INFO_ADDR, BOOT_INFO_MAGIC, BootInfo, CMDLINE_ADDR, FAULT_PORT, NOTICE_ADDR, STEAL_TIME_ADDR,
};

use crate::base::config::Policy;
use crate::base::layout::*;
use crate::base::memory::{GuestMemory, MemoryError};

/// Page-table entry bits.
mod pte {
    pub(crate) const PRESENT: u64 = 1 << 0;
    pub(crate) const WRITABLE: u64 = 1 << 1;
    pub(crate) const USER: u64 = 1 << 2;
    pub(crate) const HUGE: u64 = 1 << 7;
}

/// Vectors for which the CPU pushes an error code.
const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Machine code of the exception stub for `vector`: make every frame look alike (push a zero
/// error code where the CPU did not), push the vector, report through `out FAULT_PORT`, halt.
/// No register is changed before the report, so the shim's register dump is the guest's.
pub(crate) fn exception_stub(vector: u8) -> [u8; STUB_SIZE as usize] {
    let mut code = [0xF4u8; STUB_SIZE as usize]; // hlt padding
    let mut i = 0;
    if !has_error_code(vector) {
        code[i..i + 2].copy_from_slice(&[0x6A, 0x00]); // push 0
        i += 2;
    }
    code[i..i + 2].copy_from_slice(&[0x6A, vector]); // push vector
    i += 2;
    code[i..i + 2].copy_from_slice(&[0xE6, FAULT_PORT]); // out FAULT_PORT, al
    i += 2;
    code[i] = 0xF4; // hlt
    code[i + 1..i + 3].copy_from_slice(&[0xEB, 0xFD]); // jmp back to hlt
    code
}

/// A 64-bit TSS descriptor (16 bytes) for a TSS at `base` with segment limit `limit`.
fn tss_descriptor(base: u64, limit: u64) -> [u64; 2] {
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40) // present, DPL 0, type 9 (available 64-bit TSS)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    [low, base >> 32]
}

/// An IDT interrupt gate (DPL 0) to `handler` in the kernel code segment.
fn interrupt_gate(handler: u64) -> [u64; 2] {
    let low = (handler & 0xFFFF)
        | (u64::from(selector::KERNEL_CODE) << 16)
        | (0x8E << 40) // present, DPL 0, 64-bit interrupt gate
        | (((handler >> 16) & 0xFFFF) << 48);
    [low, handler >> 32]
}

fn write_u64s(mem: &GuestMemory, gpa: u64, values: &[u64]) -> Result<(), MemoryError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    mem.write(gpa, &bytes)
}

/// Writes the GDT, the TSSs, the IDT and the exception stubs.
pub(crate) fn write_descriptor_tables(mem: &GuestMemory) -> Result<(), MemoryError> {
    // Accessed bits preset so the CPU never has to write a descriptor.
    let mut gdt = vec![
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit, DPL 0
        0x00cf_9300_0000_ffff, // 0x10 kernel data, DPL 0
        0x00af_fb00_0000_ffff, // 0x18 user code, 64-bit, DPL 3
        0x00cf_f300_0000_ffff, // 0x20 user data, DPL 3
    ];
    for id in 0..MAX_VCPUS {
        let base = Layout::tss_addr(id);
        gdt.extend(tss_descriptor(base, Layout::tss_limit(id)));
        let mut tss = [0u8; TSS_SIZE as usize];
        tss[4..12].copy_from_slice(&Layout::cpl0_stack_top(id).to_le_bytes()); // RSP0
        tss[102..104].copy_from_slice(&((IO_BITMAP_ADDR - base) as u16).to_le_bytes()); // I/O map base
        mem.write(base, &tss)?;
    }
    let mut bitmap = vec![0u8; IO_BITMAP_SIZE as usize];
    bitmap[IO_BITMAP_SIZE as usize - 1] = 0xFF;
    mem.write(IO_BITMAP_ADDR, &bitmap)?;
    write_u64s(mem, GDT_ADDR, &gdt)?;
    let mut idt = Vec::with_capacity(512);
    for vector in 0..=255u8 {
        if vector < 32 {
            idt.extend(interrupt_gate(STUBS_ADDR + u64::from(vector) * STUB_SIZE));
            mem.write(STUBS_ADDR + u64::from(vector) * STUB_SIZE, &exception_stub(vector))?;
        } else {
            idt.extend([0, 0]); // not present
        }
    }
    write_u64s(mem, IDT_ADDR, &idt)
}

/// Writes page tables that identity-map boot memory and the whole hot-plug window with
/// 2 MiB user pages, and the first 2 MiB with 4 KiB pages (platform pages supervisor-only,
/// boot info, command line and notice page user read-only, page 0 absent).
pub(crate) fn write_page_tables(mem: &GuestMemory, layout: &Layout) -> Result<(), MemoryError> {
    let table = pte::PRESENT | pte::WRITABLE | pte::USER;
    write_u64s(mem, PML4_ADDR, &[PDPT_ADDR | table])?;
    let top = layout.window_end().max(layout.ram_size);
    let gibs = top.div_ceil(1 << 30);
    let pdpt: Vec<u64> = (0..gibs).map(|g| (PD_BASE + g * 0x1000) | table).collect();
    write_u64s(mem, PDPT_ADDR, &pdpt)?;

    let mut low = vec![0u64; 512];
    let supervisor = |a: u64| a | pte::PRESENT | pte::WRITABLE;
    let user_ro = |a: u64| a | pte::PRESENT | pte::USER;
    low[(GDT_ADDR >> 12) as usize] = supervisor(GDT_ADDR);
    low[(IDT_ADDR >> 12) as usize] = supervisor(IDT_ADDR);
    low[(STUBS_ADDR >> 12) as usize] = supervisor(STUBS_ADDR);
    low[(BOOT_INFO_ADDR >> 12) as usize] = user_ro(BOOT_INFO_ADDR);
    low[(CMDLINE_ADDR >> 12) as usize] = user_ro(CMDLINE_ADDR);
    low[(NOTICE_ADDR >> 12) as usize] = user_ro(NOTICE_ADDR);
    low[(STEAL_TIME_ADDR >> 12) as usize] = user_ro(STEAL_TIME_ADDR);
    let mut a = TSS_BASE;
    while a < CPL0_STACKS + CPL0_STACK_SIZE * u64::from(MAX_VCPUS) {
        low[(a >> 12) as usize] = supervisor(a);
        a += 0x1000;
    }
    write_u64s(mem, PT_LOW_ADDR, &low)?;

    for g in 0..gibs {
        let pd: Vec<u64> = (0..512u64)
            .map(|i| {
                let addr = (g << 30) + (i << 21);
                let in_ram = addr >= 0x20_0000 && addr < layout.ram_size;
                if addr == 0 {
                    PT_LOW_ADDR | table
                } else if in_ram || layout.in_window(addr, 1 << 21) {
                    addr | pte::PRESENT | pte::WRITABLE | pte::USER | pte::HUGE
                } else {
                    0
                }
            })
            .collect();
        write_u64s(mem, PD_BASE + g * 0x1000, &pd)?;
    }
    Ok(())
}

/// Everything the boot-info block says.
#[derive(Debug, Clone)]
pub(crate) struct BootParams<'a> {
    /// Memory layout.
    pub(crate) layout: Layout,
    /// First free byte above the kernel image and the device pages.
    pub(crate) heap_base: u64,
    /// Device pages: address of the first, and how many.
    pub(crate) devices: (u64, u64),
    /// TSC frequency.
    pub(crate) tsc_khz: u64,
    /// The command line.
    pub(crate) cmdline: &'a str,
    /// vCPU policy.
    pub(crate) vcpus: Policy,
    /// Memory policy.
    pub(crate) memory: Policy,
}

/// Writes the boot-info block and the command line.
pub(crate) fn write_boot_info(mem: &GuestMemory, p: &BootParams<'_>) -> Result<(), MemoryError> {
    mem.write(CMDLINE_ADDR, p.cmdline.as_bytes())?;
    let mut info = BootInfo::zeroed();
    info.magic = BOOT_INFO_MAGIC;
    info.abi_version = ABI_VERSION;
    info.size = std::mem::size_of::<BootInfo>() as u32;
    info.ram_size = p.layout.ram_size;
    info.heap_base = p.heap_base;
    info.heap_size = p.layout.ram_size.saturating_sub(p.heap_base);
    info.window_base = p.layout.window_base;
    info.window_size = p.layout.window_size;
    info.tsc_khz = p.tsc_khz;
    info.cmdline = CMDLINE_ADDR;
    info.cmdline_len = p.cmdline.len() as u64;
    info.vcpus = p.vcpus.limits();
    info.memory = p.memory.limits();
    (info.devices, info.device_count) = if p.devices.1 > 0 { p.devices } else { (0, 0) };
    mem.write_obj(BOOT_INFO_ADDR, &info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_report_without_touching_registers() {
        let s = exception_stub(3);
        assert_eq!(&s[..8], &[0x6A, 0x00, 0x6A, 3, 0xE6, FAULT_PORT, 0xF4, 0xEB]);
        let s = exception_stub(14); // #PF pushes its own error code
        assert_eq!(&s[..6], &[0x6A, 14, 0xE6, FAULT_PORT, 0xF4, 0xEB]);
    }

    #[test]
    fn descriptors_encode_base_and_type() {
        let [lo, hi] = tss_descriptor(0x1234_5678_9abc, 0x2_0103);
        assert_eq!(lo & 0xFFFF, 0x0103);
        assert_eq!((lo >> 48) & 0xF, 0x2);
        assert_eq!((lo >> 16) & 0xFF_FFFF, 0x78_9abc);
        assert_eq!((lo >> 40) & 0xFF, 0x89);
        assert_eq!(lo >> 56, 0x56);
        assert_eq!(hi, 0x1234);
        let [lo, hi] = interrupt_gate(0x3010);
        assert_eq!(lo & 0xFFFF, 0x3010);
        assert_eq!((lo >> 16) & 0xFFFF, u64::from(selector::KERNEL_CODE));
        assert_eq!((lo >> 40) & 0xFF, 0x8E);
        assert_eq!(hi, 0);
    }

    #[test]
    fn page_tables_map_ram_and_window_only() {
        let layout = Layout::new(64 << 20, (64 << 20) + (64 << 20));
        let mem = GuestMemory::new(4 << 20).unwrap();
        write_page_tables(&mem, &layout).unwrap();
        let pd0 = |i: u64| mem.read_obj::<u64>(PD_BASE + i * 8).unwrap();
        assert_eq!(pd0(0) & !0xFFF, PT_LOW_ADDR);
        assert_eq!(pd0(1), 0x20_0000 | 0x87);
        assert_eq!(pd0(31), (31 << 21) | 0x87);
        assert_eq!(pd0(32), 0, "beyond boot memory is unmapped");
        let pd1 = |i: u64| mem.read_obj::<u64>(PD_BASE + 0x1000 + i * 8).unwrap();
        assert_eq!(pd1(0), (1 << 30) | 0x87, "window start is mapped");
        assert_eq!(pd1(31), ((1 << 30) + (31 << 21)) | 0x87);
        assert_eq!(pd1(32), 0, "beyond the window is unmapped");
        let pt = |a: u64| mem.read_obj::<u64>(PT_LOW_ADDR + (a >> 12) * 8).unwrap();
        assert_eq!(pt(0), 0, "null page absent");
        assert_eq!(pt(BOOT_INFO_ADDR) & 0x7, 0x5, "boot info is user read-only");
        assert_eq!(pt(GDT_ADDR) & 0x7, 0x3, "GDT is supervisor-only");
    }
}
