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

/// Emits the ABI note into the calling crate's image. Use once, in the kernel.
#[macro_export]
macro_rules! declare_abi_note {
    () => {
        #[used]
        #[unsafe(link_section = ".note.elastic.abi")]
        static ELASTIC_ABI_NOTE: $crate::note::AbiNote = $crate::note::AbiNote::current();
    };
}
