//! Time from the TSC. The frequency comes from boot info (the shim reads it from KVM);
//! `now_ns` counts from [`init`].

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::cpu::rdtsc;

/// Frequency assumed when the platform reports none (QEMU without a TSC leaf).
pub const FALLBACK_TSC_KHZ: u64 = 2_000_000;

static TSC_KHZ: AtomicU64 = AtomicU64::new(FALLBACK_TSC_KHZ);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
static KHZ_KNOWN: AtomicU64 = AtomicU64::new(0);

/// Sets the time base. `tsc_khz == 0` keeps [`FALLBACK_TSC_KHZ`].
pub fn init(tsc_khz: u64) {
    if tsc_khz != 0 {
        TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
        KHZ_KNOWN.store(1, Ordering::Relaxed);
    }
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
}

/// TSC frequency in kHz, and whether it was reported (rather than assumed).
pub fn tsc_khz() -> (u64, bool) {
    (TSC_KHZ.load(Ordering::Relaxed), KHZ_KNOWN.load(Ordering::Relaxed) != 0)
}

/// Converts TSC ticks to nanoseconds.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let khz = TSC_KHZ.load(Ordering::Relaxed).max(1);
    ((u128::from(ticks) * 1_000_000) / u128::from(khz)) as u64
}

/// Converts nanoseconds to TSC ticks.
pub fn ns_to_ticks(ns: u64) -> u64 {
    let khz = TSC_KHZ.load(Ordering::Relaxed);
    ((u128::from(ns) * u128::from(khz)) / 1_000_000) as u64
}

/// Nanoseconds since [`init`].
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc().wrapping_sub(TSC_AT_BOOT.load(Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        init(2_600_000);
        assert_eq!(ticks_to_ns(2_600_000), 1_000_000);
        assert_eq!(ticks_to_ns(2_600), 1_000);
    }
}
