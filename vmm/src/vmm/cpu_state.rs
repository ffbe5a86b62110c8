//! One vCPU's architectural state, as a snapshot or a migration carries it.

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, kvm_xsave};
use serde::{Deserialize, Serialize};

/// MSRs a snapshot carries (those this KVM reads are saved; the rest are skipped): the TSC,
/// syscall and segment-base MSRs, PAT.
pub(crate) const SAVED_MSRS: [u32; 11] = [
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VcpuState {
    /// The vCPU id.
    pub(crate) id: u32,
    /// General-purpose registers.
    pub(crate) regs: kvm_regs,
    /// Segment and control registers.
    pub(crate) sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub(crate) xsave: kvm_xsave,
    /// The MSRs of [`SAVED_MSRS`] this KVM could read.
    pub(crate) msrs: Vec<kvm_msr_entry>,
}
