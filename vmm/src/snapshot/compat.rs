//! What a running VM needs of the host it moves to, compared before any memory moves: the CPU
//! features KVM offers its guests (a guest that found AVX2 at boot keeps using it) and the TSC
//! rate (the guest converts TSC ticks to time with the rate it was told at boot).
//!
//! The guest's TSC value itself travels with the vCPU state (`IA32_TSC`), so its clock goes on
//! from where it stopped and never runs backwards; the downtime is not counted in it.

use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::vmm::vm::supported_cpuid;

/// The TSC rates of two hosts may differ by this much (KVM's own `tsc_tolerance_ppm`).
pub(crate) const TSC_TOLERANCE_PPM: u64 = 250;

/// Feature registers compared: (leaf, subleaf, register index 0..4 = eax, ebx, ecx, edx,
/// bits ignored).
const FEATURES: &[(u32, u32, usize, u32)] = &[
    // Leaf 1: ECX (OSXSAVE, bit 27, follows the guest's CR4) and EDX.
    (0x1, 0, 2, 1 << 27),
    (0x1, 0, 3, 0),
    // Leaf 7: structured extended features.
    (0x7, 0, 1, 0),
    (0x7, 0, 2, 0),
    (0x7, 0, 3, 0),
    // Leaf 0xD: XSAVE state components and XSAVE features.
    (0xd, 0, 0, 0),
    (0xd, 1, 0, 0),
    // Leaf 0x80000001: extended features.
    (0x8000_0001, 0, 2, 0),
    (0x8000_0001, 0, 3, 0),
];

const REGS: [&str; 4] = ["eax", "ebx", "ecx", "edx"];

/// The vendor string of leaf 0.
fn vendor(cpuid: &CpuId) -> String {
    let Some(e) = cpuid.as_slice().iter().find(|e| e.function == 0) else { return String::new() };
    let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The words of [`FEATURES`] in `cpuid`.
fn features(cpuid: &CpuId) -> Vec<u32> {
    let entries = cpuid.as_slice();
    FEATURES
        .iter()
        .map(|&(leaf, sub, reg, _)| {
            entries
                .iter()
                .find(|e| e.function == leaf && e.index == sub)
                .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][reg])
        })
        .collect()
}

/// The CPU features KVM offers guests on a host, and its TSC rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HostProfile {
    /// The CPU vendor (leaf 0: "GenuineIntel", "AuthenticAMD"...).
    pub(crate) vendor: String,
    /// One word per entry of [`FEATURES`].
    pub(crate) features: Vec<u32>,
    /// The TSC rate a new vCPU runs at (kHz).
    pub(crate) tsc_khz: u64,
}

impl HostProfile {
    /// The profile of a VM given `cpuid` that runs at `tsc_khz` (the source's side).
    pub(crate) fn of_vm(cpuid: &CpuId, tsc_khz: u64) -> HostProfile {
        HostProfile { vendor: vendor(cpuid), features: features(cpuid), tsc_khz }
    }

    /// This host's profile: what a VM would get here (asked of KVM once per process).
    pub(crate) fn here(kvm: &Kvm) -> Result<HostProfile, String> {
        static TSC_KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let tsc_khz = match TSC_KHZ.get() {
            Some(&t) => t,
            None => {
                // The rate is a vCPU's: ask a throwaway VM's first vCPU.
                let vm = kvm.create_vm().map_err(|e| format!("create a VM to read the TSC rate: {e}"))?;
                let vcpu = vm.create_vcpu(0).map_err(|e| format!("create a vCPU to read the TSC rate: {e}"))?;
                let t = vcpu.get_tsc_khz().map(u64::from).map_err(|e| format!("read the TSC rate: {e}"))?;
                *TSC_KHZ.get_or_init(|| t)
            }
        };
        let cpuid = supported_cpuid(kvm).map_err(|e| e.to_string())?;
        Ok(HostProfile { vendor: vendor(&cpuid), features: features(&cpuid), tsc_khz })
    }

    /// Why a VM started on `source` cannot run here (`None`: it can).
    pub(crate) fn refuses(&self, source: &HostProfile) -> Option<String> {
        if source.features.len() != FEATURES.len() {
            return Some("the source described its CPU features differently".into());
        }
        if source.vendor != self.vendor {
            return Some(format!(
                "the VM runs on {} CPUs and this host has {} (its model-specific state cannot move); the source \
                 keeps it",
                source.vendor, self.vendor
            ));
        }
        let missing: Vec<String> = FEATURES
            .iter()
            .zip(source.features.iter().zip(&self.features))
            .filter_map(|(&(leaf, sub, reg, ignored), (&there, &here))| {
                let lack = there & !here & !ignored;
                (lack != 0).then(|| format!("leaf {leaf:#x}.{sub} {} bits {lack:#x}", REGS[reg]))
            })
            .collect();
        if !missing.is_empty() {
            return Some(format!(
                "this host's KVM lacks CPU features the VM was started with ({}); the source keeps it",
                missing.join(", ")
            ));
        }
        let (a, b) = (self.tsc_khz, source.tsc_khz);
        if a == 0 || b == 0 {
            return Some("KVM does not say the TSC rate here or on the source; the source keeps the VM".into());
        }
        if a.abs_diff(b).saturating_mul(1_000_000) > TSC_TOLERANCE_PPM.saturating_mul(b.max(1)) {
            return Some(format!(
                "the TSC runs at {a} kHz here and {b} kHz on the source (more than {TSC_TOLERANCE_PPM} ppm apart: the \
                 guest's clock would drift); the source keeps the VM"
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(tsc_khz: u64) -> HostProfile {
        HostProfile { vendor: "AuthenticAMD".into(), features: vec![0xffff_ffff; FEATURES.len()], tsc_khz }
    }

    #[test]
    fn a_host_with_fewer_features_or_another_tsc_rate_is_refused() {
        let here = profile(2_000_000);
        assert_eq!(here.refuses(&profile(2_000_000)), None);
        // Within 250 ppm.
        assert_eq!(here.refuses(&profile(2_000_400)), None);
        let e = here.refuses(&profile(2_001_000)).expect("1000 ppm apart");
        assert!(e.contains("2000000 kHz here and 2001000 kHz"), "{e}");
        let mut poorer = profile(2_000_000);
        poorer.features[2] &= !(1 << 5); // leaf 7 ebx bit 5 (AVX2)
        assert_eq!(
            poorer.refuses(&here).expect("AVX2 missing").split(" (").nth(1).map(|s| &s[..24]),
            Some("leaf 0x7.0 ebx bits 0x20")
        );
        // A source with fewer features fits here.
        assert_eq!(here.refuses(&poorer), None);
        // OSXSAVE is not a host feature.
        let mut no_osxsave = profile(2_000_000);
        no_osxsave.features[0] &= !(1 << 27);
        assert_eq!(no_osxsave.refuses(&here), None);
        assert!(here.refuses(&HostProfile { features: vec![], ..profile(2_000_000) }).is_some());
        let intel = HostProfile { vendor: "GenuineIntel".into(), ..profile(2_000_000) };
        assert!(
            here.refuses(&intel).expect("another vendor").contains("GenuineIntel CPUs and this host has AuthenticAMD")
        );
        assert!(here.refuses(&profile(0)).is_some());
    }
}
