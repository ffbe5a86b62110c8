//! The part of the shim's guest-physical address map that decides which memory policies fit.
//!
//! Boot memory starts at 0; the hot-plug window, where granted extents appear, starts at
//! [`window_base`] and is `burst - min` long. Both must end at or below [`MAX_GUEST_PHYS`], the
//! end of what the shim's page tables map. The guest is told the window's place in its boot
//! info (`BootInfo::window_base`, `window_size`): it never computes it, which is why these are
//! host facts kept here rather than ABI constants.

/// One GiB.
const GIB: u64 = 1 << 30;

/// End of the guest-physical space the shim maps: 253 GiB. Its page-table area (below the
/// kernel at 2 MiB) holds one PML4, one PDPT, the page table of the first 2 MiB and 253 page
/// directories, one per GiB. `hypervisor-shim`'s layout asserts that its page tables cover
/// exactly this much.
pub const MAX_GUEST_PHYS: u64 = 253 * GIB;

/// Where the hot-plug window starts for a VM whose boot memory is `ram_size`: the next GiB
/// boundary at or above it (at least 1 GiB).
pub const fn window_base(ram_size: u64) -> u64 {
    let b = ram_size.div_ceil(GIB) * GIB;
    if b < GIB { GIB } else { b }
}

/// Whether a VM with boot memory `min` and memory ceiling `burst` (`min <= burst`) fits below
/// [`MAX_GUEST_PHYS`]: its hot-plug window ends there at the latest. Never overflows.
pub const fn fits(min: u64, burst: u64) -> bool {
    if burst > MAX_GUEST_PHYS || min > burst {
        return false;
    }
    match window_base(min).checked_add(burst - min) {
        Some(end) => end <= MAX_GUEST_PHYS,
        None => false,
    }
}

const _: () = assert!(MAX_GUEST_PHYS >= 128 * GIB);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_on_a_gib_boundary() {
        assert_eq!(window_base(0), GIB);
        assert_eq!(window_base(64 << 20), GIB);
        assert_eq!(window_base(GIB), GIB);
        assert_eq!(window_base(GIB + (2 << 20)), 2 * GIB);
        assert_eq!(window_base(u64::MAX - GIB), (u64::MAX / GIB) * GIB);
    }

    #[test]
    fn fitting() {
        assert!(fits(64 << 20, GIB));
        assert!(fits(64 << 20, MAX_GUEST_PHYS - GIB + (64 << 20)));
        assert!(!fits(64 << 20, MAX_GUEST_PHYS - GIB + (66 << 20)));
        assert!(fits(MAX_GUEST_PHYS, MAX_GUEST_PHYS));
        assert!(!fits(u64::MAX - 10, u64::MAX - 10));
        assert!(!fits(2 * GIB, GIB), "min above burst");
    }
}
