//! The kernel heap: a `talc` allocator over the free part of boot memory.

#[cfg(target_os = "none")]
use talc::{TalcLock, source::Manual};

#[cfg(target_os = "none")]
#[global_allocator]
static ALLOCATOR: TalcLock<spin::Mutex<()>, Manual> = TalcLock::new(Manual);

/// Heap figures for banners and reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeapStats {
    /// Bytes handed to the allocator.
    pub claimed: usize,
    /// Bytes free for allocation.
    pub available: usize,
}

/// Hands `[base, base + size)` to the allocator. Returns `false` if the region is too small.
#[cfg(target_os = "none")]
pub fn init(base: u64, size: u64) -> bool {
    // SAFETY: boot info reports this range as free RAM above the kernel image, identity
    // mapped and used by nothing else; from here on only the allocator manages it.
    unsafe { ALLOCATOR.lock().claim(base as *mut u8, size as usize).is_some() }
}

/// Current heap figures.
#[cfg(target_os = "none")]
pub fn stats() -> HeapStats {
    let talc = ALLOCATOR.lock();
    let c = talc.counters();
    HeapStats { claimed: c.claimed_bytes, available: c.available_bytes }
}

/// Host build: the host's allocator is in charge.
#[cfg(not(target_os = "none"))]
pub fn init(_base: u64, _size: u64) -> bool {
    true
}

/// Host build: no figures.
#[cfg(not(target_os = "none"))]
pub fn stats() -> HeapStats {
    HeapStats::default()
}
