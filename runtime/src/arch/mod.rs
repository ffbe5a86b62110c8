//! x86_64 specifics: entry points, the QEMU (PVH) trampoline and CPL-3-safe CPU helpers.
//!
//! Everything here except `pvh`'s trampoline runs at CPL 3. The kernel never executes a
//! privileged instruction after boot (see `docs/abi.md`, "Machine state at entry").

pub mod cpu;
#[cfg(target_os = "none")]
pub mod entry;
#[cfg(target_os = "none")]
pub mod pvh;

/// Address of the entry point for secondary vCPUs (VCPU_UP); 0 on a host build, which never
/// starts one.
pub fn secondary_entry_addr() -> u64 {
    #[cfg(target_os = "none")]
    {
        entry::secondary_entry_addr()
    }
    #[cfg(not(target_os = "none"))]
    {
        0
    }
}
