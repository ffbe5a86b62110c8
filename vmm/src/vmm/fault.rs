//! Diagnoses of guest failures: CPU exceptions reported by the CPL-0 stubs, touches of
//! unbacked memory, and exits the shim does not serve.

use std::fmt;

use kvm_bindings::kvm_regs;

/// Name and mnemonic of exception `vector`.
pub(crate) fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range exceeded",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack-segment fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating-point error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating-point error",
        20 => "#VE virtualization exception",
        21 => "#CP control protection",
        _ => "reserved vector",
    }
}

/// Decodes a #PF error code into words.
pub(crate) fn page_fault_cause(error: u64) -> String {
    let mut parts = vec![
        if error & 1 != 0 { "protection violation" } else { "page not present" },
        if error & 2 != 0 { "write" } else { "read" },
        if error & 4 != 0 { "from CPL 3" } else { "from CPL 0" },
    ];
    if error & 8 != 0 {
        parts.push("reserved bit set");
    }
    if error & 16 != 0 {
        parts.push("instruction fetch");
    }
    parts.join(", ")
}

/// A CPU exception the guest raised, as reported by the exception stub.
#[derive(Debug, Clone)]
pub struct GuestFault {
    /// The vCPU.
    pub(crate) vcpu: u32,
    /// Exception vector.
    pub(crate) vector: u64,
    /// Error code (0 where the CPU pushes none).
    pub(crate) error_code: u64,
    /// Faulting instruction.
    pub(crate) rip: u64,
    /// `function+offset` for `rip`, when the kernel's symbols name it.
    pub(crate) symbol: Option<String>,
    /// Code segment at the fault (its low bits are the CPL).
    pub(crate) cs: u64,
    /// Flags at the fault.
    pub(crate) rflags: u64,
    /// Stack pointer at the fault.
    pub(crate) rsp: u64,
    /// CR2 (the faulting address for #PF).
    pub(crate) cr2: u64,
    /// General-purpose registers (rsp/rip as they were at the fault).
    pub(crate) regs: kvm_regs,
}

impl fmt::Display for GuestFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "guest fault on vCPU {}: vector {} ({}), error code {:#x}",
            self.vcpu,
            self.vector,
            vector_name(self.vector),
            self.error_code
        )?;
        if self.vector == 14 {
            writeln!(f, "  faulting address (CR2): {:#x} ({})", self.cr2, page_fault_cause(self.error_code))?;
        }
        writeln!(
            f,
            "  RIP {:#018x}{}  CPL {}  RFLAGS {:#x}",
            self.rip,
            self.symbol.as_deref().map(|s| format!(" <{s}>")).unwrap_or_default(),
            self.cs & 3,
            self.rflags
        )?;
        write_regs(f, &self.regs, Some(self.rsp))?;
        if self.vector != 14 {
            writeln!(f, "  CR2 {:#x}", self.cr2)?;
        }
        Ok(())
    }
}

/// Writes the general-purpose registers in four columns (`rsp` overridden when given).
pub(crate) fn write_regs(f: &mut impl fmt::Write, r: &kvm_regs, rsp: Option<u64>) -> fmt::Result {
    let regs = [
        ("rax", r.rax),
        ("rbx", r.rbx),
        ("rcx", r.rcx),
        ("rdx", r.rdx),
        ("rsi", r.rsi),
        ("rdi", r.rdi),
        ("rbp", r.rbp),
        ("rsp", rsp.unwrap_or(r.rsp)),
        ("r8", r.r8),
        ("r9", r.r9),
        ("r10", r.r10),
        ("r11", r.r11),
        ("r12", r.r12),
        ("r13", r.r13),
        ("r14", r.r14),
        ("r15", r.r15),
    ];
    for row in regs.chunks(4) {
        let line: Vec<String> = row.iter().map(|(n, v)| format!("{n:>3} {v:#018x}")).collect();
        writeln!(f, "  {}", line.join("  "))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_fault_report_names_vector_and_address() {
        let f = GuestFault {
            vcpu: 0,
            vector: 14,
            error_code: 6,
            rip: 0x20_1234,
            symbol: Some("kernel::apps::faults::fault_main+0x14".into()),
            cs: 0x1b,
            rflags: 0x3002,
            rsp: 0x30_0000,
            cr2: 0x4000_0000_0000,
            regs: kvm_regs::default(),
        };
        let text = f.to_string();
        assert!(text.contains("vector 14 (#PF page fault)"), "{text}");
        assert!(text.contains("CR2): 0x400000000000"), "{text}");
        assert!(text.contains("page not present, write, from CPL 3"), "{text}");
        assert!(text.contains("<kernel::apps::faults::fault_main+0x14>"), "{text}");
        assert!(text.contains("CPL 3"), "{text}");
    }
}
