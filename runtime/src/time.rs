//! Time from the TSC. The frequency comes from boot info (the shim reads it from KVM);
//! `now_ns` counts from [`init`].

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

pub use crate::arch::cpu::rdtsc;

/// Frequency assumed when the platform reports none (QEMU without a TSC leaf).
pub const FALLBACK_TSC_KHZ: u64 = 2_000_000;

/// Where the TSC frequency came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TscSource {
    /// Not reported: [`FALLBACK_TSC_KHZ`] is assumed.
    Assumed = 0,
    /// The shim's HELLO answer (KVM's own figure for the vCPU).
    Shim = 1,
    /// The hypervisor timing leaf CPUID 0x40000010 (QEMU with `invtsc` and `vmware-cpuid-freq`).
    HypervisorLeaf = 2,
    /// CPUID leaf 0x15 (TSC/crystal ratio and crystal frequency).
    Cpuid15 = 3,
    /// CPUID leaf 0x16 (processor base frequency; approximate).
    Cpuid16 = 4,
}

impl TscSource {
    /// Words for the banner.
    pub fn describe(self) -> &'static str {
        match self {
            TscSource::Assumed => "assumed: not reported",
            TscSource::Shim => "from the shim, as KVM runs the vCPU",
            TscSource::HypervisorLeaf => "from CPUID leaf 0x40000010",
            TscSource::Cpuid15 => "from CPUID leaf 0x15",
            TscSource::Cpuid16 => "from CPUID leaf 0x16, base frequency",
        }
    }

    fn from_u8(v: u8) -> TscSource {
        match v {
            1 => TscSource::Shim,
            2 => TscSource::HypervisorLeaf,
            3 => TscSource::Cpuid15,
            4 => TscSource::Cpuid16,
            _ => TscSource::Assumed,
        }
    }
}

static TSC_KHZ: AtomicU64 = AtomicU64::new(FALLBACK_TSC_KHZ);
static TSC_AT_BOOT: AtomicU64 = AtomicU64::new(0);
static SOURCE: AtomicU8 = AtomicU8::new(TscSource::Assumed as u8);

/// Sets the time base. `tsc_khz == 0` keeps [`FALLBACK_TSC_KHZ`] (source `Assumed`).
pub(crate) fn init(tsc_khz: u64, source: TscSource) {
    if tsc_khz != 0 {
        TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
        SOURCE.store(source as u8, Ordering::Relaxed);
    }
    TSC_AT_BOOT.store(rdtsc(), Ordering::Relaxed);
}

/// Reads the TSC frequency from CPUID: the hypervisor timing leaf 0x40000010 first (exact in a
/// VM), then leaf 0x15, then leaf 0x16. `(0, Assumed)` when none reports it.
pub(crate) fn tsc_khz_from_cpuid() -> (u64, TscSource) {
    use crate::arch::cpu::cpuid;
    let (hv_max, ..) = cpuid(0x4000_0000, 0);
    if (0x4000_0010..0x4001_0000).contains(&hv_max) {
        let (khz, ..) = cpuid(0x4000_0010, 0);
        if khz != 0 {
            return (u64::from(khz), TscSource::HypervisorLeaf);
        }
    }
    let (max, ..) = cpuid(0, 0);
    if max >= 0x15 {
        let (den, num, crystal_hz, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal_hz != 0 {
            return (u64::from(crystal_hz) * u64::from(num) / u64::from(den) / 1000, TscSource::Cpuid15);
        }
    }
    if max >= 0x16 {
        let (base_mhz, ..) = cpuid(0x16, 0);
        if base_mhz != 0 {
            return (u64::from(base_mhz) * 1000, TscSource::Cpuid16);
        }
    }
    (0, TscSource::Assumed)
}

/// The highest hypervisor CPUID leaf the platform lists (CPUID 0x40000000's EAX; 0 without
/// one): the banner says it when no TSC frequency was reported, so that a missing timing leaf
/// 0x40000010 is told apart from one the kernel failed to read.
pub fn hypervisor_max_leaf() -> u32 {
    let (max, ..) = crate::arch::cpu::cpuid(0x4000_0000, 0);
    if (0x4000_0000..0x4001_0000).contains(&max) { max } else { 0 }
}

/// TSC frequency in kHz, and where it came from.
pub fn tsc_khz() -> (u64, TscSource) {
    (TSC_KHZ.load(Ordering::Relaxed), TscSource::from_u8(SOURCE.load(Ordering::Relaxed)))
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
        init(2_600_000, TscSource::Shim);
        assert_eq!(ticks_to_ns(2_600_000), 1_000_000);
        assert_eq!(ticks_to_ns(2_600), 1_000);
    }
}
