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
    /// FPU/SSE/AVX state (a hex string: see [`hex_xsave`]).
    #[serde(with = "hex_xsave")]
    pub(crate) xsave: kvm_xsave,
    /// The MSRs of [`SAVED_MSRS`] this KVM could read.
    pub(crate) msrs: Vec<kvm_msr_entry>,
}

/// `kvm_xsave` as one hex string. kvm-bindings writes its 4 KiB as a list of 4096 numbers,
/// which took ~0.1–0.15 ms to decode here, most of a migration state's decoding, which
/// happens while the VM is stopped; a hex string decodes in a few µs. Reads either form (a
/// snapshot written before reads back).
mod hex_xsave {
    use kvm_bindings::kvm_xsave;
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::{Deserialize, Serializer};
    use zerocopy::{FromBytes, IntoBytes};

    /// Writes `x` as the hex string of its bytes.
    pub(super) fn serialize<S: Serializer>(x: &kvm_xsave, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(x.as_bytes()))
    }

    /// Reads a hex string (or the list of bytes kvm-bindings writes).
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<kvm_xsave, D::Error> {
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = kvm_xsave;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the xsave area as a hex string (or a list of bytes)")
            }

            fn visit_str<E: Error>(self, text: &str) -> Result<kvm_xsave, E> {
                let bytes = hex::decode(text).map_err(E::custom)?;
                if bytes.len() != std::mem::size_of::<kvm_xsave>() {
                    return Err(E::custom(format!("an xsave area of {} bytes", bytes.len())));
                }
                kvm_xsave::read_from_bytes(&bytes).map_err(|_| E::custom("a misshapen xsave area"))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<kvm_xsave, A::Error> {
                kvm_xsave::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
            }
        }
        d.deserialize_any(Either)
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_xsave;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct Carrier {
        #[serde(with = "super::hex_xsave")]
        x: kvm_xsave,
    }

    #[test]
    fn xsave_travels_as_hex_and_the_older_list_of_bytes_still_reads() {
        let mut x = kvm_xsave::default();
        x.region[0] = 0x1234_5678;
        x.region[1023] = 7;
        let region = x.region;
        let text = serde_json::to_string(&Carrier { x }).unwrap();
        assert!(text.starts_with("{\"x\":\"78563412"), "{}", &text[..20]);
        let back: Carrier = serde_json::from_str(&text).unwrap();
        assert_eq!(back.x.region[..], region[..]);
        let old = serde_json::to_string(&back.x).unwrap();
        assert!(old.starts_with("[120,86,52,18,"), "{}", &old[..20]);
        let back: Carrier = serde_json::from_str(&format!("{{\"x\":{old}}}")).unwrap();
        assert_eq!(back.x.region[..], region[..]);
        for bad in ["\"00ff\"", "\"zz\"", "42"] {
            assert!(serde_json::from_str::<Carrier>(&format!("{{\"x\":{bad}}}")).is_err(), "{bad}");
        }
    }
}
