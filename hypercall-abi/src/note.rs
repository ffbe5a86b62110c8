//! The ELF note by which a kernel image declares the ABI version it speaks.
//!
//! Standard ELF note layout (`Elf64_Nhdr` followed by name and descriptor, each padded to
//! 4 bytes) in a section named [`ABI_NOTE_SECTION`] that the kernel's linker script places in
//! a `PT_NOTE` segment. The shim reads it before creating a VM and refuses images without it,
//! or with another version.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The note's name, NUL-terminated and padded: `"ELASTIC\0"`.
pub const ABI_NOTE_NAME: [u8; 8] = *b"ELASTIC\0";

/// The note's name as the ELF parser reports it (without the NUL).
pub const ABI_NOTE_NAME_STR: &str = "ELASTIC";

/// The note's type: ASCII "ABI1" read as a little-endian `u32`.
pub const NT_ELASTIC_ABI: u32 = u32::from_le_bytes(*b"ABI1");

/// Section the note lives in.
pub const ABI_NOTE_SECTION: &str = ".note.elastic.abi";

/// The note's descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct AbiNoteDesc {
    /// The ABI version the image speaks.
    pub abi_version: u32,
    /// *reserved* (zero).
    pub reserved: u32,
}

/// The whole note as laid out in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4))]
pub struct AbiNote {
    /// Length of the name including its NUL: 8.
    pub namesz: u32,
    /// Length of the descriptor: 8.
    pub descsz: u32,
    /// [`NT_ELASTIC_ABI`].
    pub n_type: u32,
    /// [`ABI_NOTE_NAME`].
    pub name: [u8; 8],
    /// The descriptor.
    pub desc: AbiNoteDesc,
}

const _: () = assert!(size_of::<AbiNote>() == 28);
const _: () = assert!(offset_of!(AbiNote, name) == 12);
const _: () = assert!(offset_of!(AbiNote, desc) == 20);
const _: () = assert!(size_of::<AbiNoteDesc>() == 8);

impl AbiNote {
    /// The note for this crate's [`crate::ABI_VERSION`].
    pub const fn current() -> Self {
        AbiNote {
            namesz: 8,
            descsz: size_of::<AbiNoteDesc>() as u32,
            n_type: NT_ELASTIC_ABI,
            name: ABI_NOTE_NAME,
            desc: AbiNoteDesc { abi_version: crate::ABI_VERSION, reserved: 0 },
        }
    }
}

/// The note type of the service list: ASCII "SVC1" read as a little-endian `u32`.
pub const NT_ELASTIC_SERVICES: u32 = u32::from_le_bytes(*b"SVC1");

/// Size of the service list's descriptor: service names, each followed by a NUL, then zero
/// padding.
pub const SERVICE_LIST_SIZE: usize = 1024;

/// A note listing the services an image offers (names for `--app`), so the shim can refuse an
/// unknown service, and list the known ones, before it creates a VM. Same section as the ABI
/// note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4))]
pub struct ServiceListNote {
    /// Length of the name including its NUL: 8.
    pub namesz: u32,
    /// Length of the descriptor: [`SERVICE_LIST_SIZE`].
    pub descsz: u32,
    /// [`NT_ELASTIC_SERVICES`].
    pub n_type: u32,
    /// [`ABI_NOTE_NAME`].
    pub name: [u8; 8],
    /// NUL-terminated names, then zeros.
    pub desc: [u8; SERVICE_LIST_SIZE],
}

const _: () = assert!(size_of::<ServiceListNote>() == 20 + SERVICE_LIST_SIZE);
const _: () = assert!(SERVICE_LIST_SIZE.is_multiple_of(4));

impl ServiceListNote {
    /// The note for `names`. Fails to compile (in a const) when the names do not fit, are
    /// empty or contain a NUL.
    pub const fn new(names: &[&str]) -> Self {
        let mut desc = [0u8; SERVICE_LIST_SIZE];
        let mut at = 0;
        let mut i = 0;
        while i < names.len() {
            let n = names[i].as_bytes();
            assert!(!n.is_empty(), "a service name is empty");
            assert!(at + n.len() < SERVICE_LIST_SIZE, "the service names do not fit the service list note");
            let mut j = 0;
            while j < n.len() {
                assert!(n[j] != 0, "a service name contains a NUL");
                desc[at] = n[j];
                at += 1;
                j += 1;
            }
            at += 1; // the NUL
            i += 1;
        }
        ServiceListNote {
            namesz: 8,
            descsz: SERVICE_LIST_SIZE as u32,
            n_type: NT_ELASTIC_SERVICES,
            name: ABI_NOTE_NAME,
            desc,
        }
    }

    /// The names in a service list descriptor (`desc`), in order. Stops at the first empty
    /// name; bytes that are not UTF-8 end the list.
    pub fn names(desc: &[u8]) -> impl Iterator<Item = &str> {
        desc.split(|&b| b == 0).take_while(|n| !n.is_empty()).map_while(|n| core::str::from_utf8(n).ok())
    }
}

/// Emits the service-list note for `names` (an expression of type `&[&str]` usable in a const)
/// into the calling crate's image.
#[macro_export]
macro_rules! declare_service_list {
    ($names:expr) => {
        #[used]
        #[unsafe(link_section = ".note.elastic.abi")]
        static ELASTIC_SERVICE_LIST: $crate::note::ServiceListNote = $crate::note::ServiceListNote::new($names);
    };
}

/// Emits the ABI note into the calling crate's image. Use once, in the kernel.
#[macro_export]
macro_rules! declare_abi_note {
    () => {
        #[used]
        #[unsafe(link_section = ".note.elastic.abi")]
        static ELASTIC_ABI_NOTE: $crate::note::AbiNote = $crate::note::AbiNote::current();
    };
}
