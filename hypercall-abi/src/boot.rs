//! The boot-info block the shim hands to vCPU 0 (its guest-physical address is in `rdi` at the
//! ELF entry point).

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::ResourceLimits;

/// `BootInfo::magic`: ASCII "ELASTBI1" read as a little-endian `u64`.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"ELASTBI1");

/// Guest-physical address at which the shim places [`BootInfo`] (inside the platform's first
/// 2 MiB; mapped read-only for CPL 3).
pub const BOOT_INFO_ADDR: u64 = 0x0000_8000;

/// Guest-physical address of the command line (NUL-free bytes, `BootInfo::cmdline_len` long;
/// mapped read-only for CPL 3).
pub const CMDLINE_ADDR: u64 = 0x0000_9000;

/// Longest command line the shim passes.
pub const CMDLINE_MAX: u64 = 4096;

/// What the kernel learns at entry: memory layout, time base, command line and policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// The ABI version of the host that wrote the block.
    pub abi_version: u32,
    /// Number of bytes of this structure the host filled (append-only growth).
    pub size: u32,
    /// Guest-physical base of boot memory (always 0 in v1).
    pub ram_base: u64,
    /// Size of boot memory in bytes (the policy's memory `min`).
    pub ram_size: u64,
    /// First byte the kernel may use as free memory (page aligned, above the kernel image).
    pub heap_base: u64,
    /// Bytes of free memory from `heap_base` (up to the end of boot memory).
    pub heap_size: u64,
    /// Guest-physical base of the hot-plug window where granted extents appear (2 MiB aligned).
    /// The boot page tables already map the whole window.
    pub window_base: u64,
    /// Size of the hot-plug window in bytes (`memory.burst - memory.min`; may be 0).
    pub window_size: u64,
    /// TSC frequency in kHz (0 when unknown).
    pub tsc_khz: u64,
    /// Guest-physical address of the command line.
    pub cmdline: u64,
    /// Length of the command line in bytes.
    pub cmdline_len: u64,
    /// The VM's vCPU policy.
    pub vcpus: ResourceLimits,
    /// The VM's memory policy in bytes.
    pub memory: ResourceLimits,
    /// Guest-physical address of the first paravirtual device page
    /// ([`VirtioDeviceRegs`](crate::virtio::VirtioDeviceRegs); 0 when there is none). Devices
    /// follow each other, one page each.
    pub devices: u64,
    /// Number of device pages at `devices`.
    pub device_count: u64,
    /// *reserved* (zero).
    pub reserved: [u64; 14],
}

const _: () = assert!(size_of::<BootInfo>() == 264);
const _: () = assert!(offset_of!(BootInfo, abi_version) == 8);
const _: () = assert!(offset_of!(BootInfo, size) == 12);
const _: () = assert!(offset_of!(BootInfo, ram_base) == 16);
const _: () = assert!(offset_of!(BootInfo, ram_size) == 24);
const _: () = assert!(offset_of!(BootInfo, heap_base) == 32);
const _: () = assert!(offset_of!(BootInfo, heap_size) == 40);
const _: () = assert!(offset_of!(BootInfo, window_base) == 48);
const _: () = assert!(offset_of!(BootInfo, window_size) == 56);
const _: () = assert!(offset_of!(BootInfo, tsc_khz) == 64);
const _: () = assert!(offset_of!(BootInfo, cmdline) == 72);
const _: () = assert!(offset_of!(BootInfo, cmdline_len) == 80);
const _: () = assert!(offset_of!(BootInfo, vcpus) == 88);
const _: () = assert!(offset_of!(BootInfo, memory) == 112);
const _: () = assert!(offset_of!(BootInfo, devices) == 136);
const _: () = assert!(offset_of!(BootInfo, device_count) == 144);
const _: () = assert!(offset_of!(BootInfo, reserved) == 152);
const _: () = assert!(BOOT_INFO_ADDR + size_of::<BootInfo>() as u64 <= CMDLINE_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX <= crate::KERNEL_MIN_LOAD_ADDR);

impl BootInfo {
    /// An all-zero block (every field is plain data).
    pub const fn zeroed() -> Self {
        let zero = ResourceLimits { min: 0, max: 0, burst: 0 };
        BootInfo {
            magic: 0,
            abi_version: 0,
            size: 0,
            ram_base: 0,
            ram_size: 0,
            heap_base: 0,
            heap_size: 0,
            window_base: 0,
            window_size: 0,
            tsc_khz: 0,
            cmdline: 0,
            cmdline_len: 0,
            vcpus: zero,
            memory: zero,
            devices: 0,
            device_count: 0,
            reserved: [0; 14],
        }
    }

    /// `true` when the magic, version and size identify a block this crate can read.
    pub const fn is_valid(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC
            && self.abi_version == crate::ABI_VERSION
            && self.size as usize >= size_of::<BootInfo>()
    }
}
