//! Kernel image loading: parse the ELF, check the ABI note, validate and copy the segments.
//!
//! Everything is checked before a VM exists, so a refused image never costs a KVM call.

use std::path::{Path, PathBuf};

use goblin::elf::Elf;
use goblin::elf::header::{EM_X86_64, ET_DYN, ET_EXEC};
use goblin::elf::program_header::{PT_LOAD, PT_NOTE};
use hypercall_abi::{ABI_NOTE_NAME_STR, ABI_VERSION, KERNEL_MIN_LOAD_ADDR, NT_ELASTIC_ABI};
use thiserror::Error;

use crate::memory::{GuestMemory, MemoryError};

/// Why an image could not be loaded. Every message is one line naming the problem.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The file could not be read.
    #[error("cannot read kernel image {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not an ELF file.
    #[error("kernel image {path} is not an ELF file: {reason}")]
    NotElf {
        /// The path.
        path: PathBuf,
        /// Parser message.
        reason: String,
    },
    /// Wrong machine or class.
    #[error("kernel image {0} is not a 64-bit x86_64 ELF")]
    WrongMachine(PathBuf),
    /// Position-independent or otherwise non-executable ELF.
    #[error("kernel image {0} is position-independent (ET_DYN); link it as a non-PIE executable at a fixed address")]
    NotExecutable(PathBuf),
    /// The ABI note is missing.
    #[error(
        "kernel image {0} has no ELASTIC ABI note (.note.elastic.abi): it was not built for this shim's hypercall ABI"
    )]
    MissingAbiNote(PathBuf),
    /// The ABI note names another version.
    #[error("kernel image {path} speaks hypercall ABI v{found}; this shim speaks v{ABI_VERSION}")]
    WrongAbiVersion {
        /// The path.
        path: PathBuf,
        /// The version in the note.
        found: u32,
    },
    /// A loadable segment is malformed or out of range.
    #[error("kernel image {path}: {problem}")]
    BadSegment {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The image does not fit in boot memory.
    #[error("kernel image ends at {end:#x} but boot memory is only {ram:#x} bytes; raise --memory")]
    TooLarge {
        /// End of the image.
        end: u64,
        /// Boot memory size.
        ram: u64,
    },
    /// Copying into guest memory failed.
    #[error("cannot copy the kernel image into guest memory: {0}")]
    Copy(#[from] MemoryError),
}

/// One `PT_LOAD` segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address.
    pub paddr: u64,
    /// Bytes in memory (`filesz` of them from the file, the rest zero).
    pub memsz: u64,
    /// Offset of the file bytes.
    pub offset: u64,
    /// Bytes from the file.
    pub filesz: u64,
}

/// A function symbol (mangled name), for naming the RIP in a fault diagnosis.
#[derive(Debug, Clone)]
struct Symbol {
    addr: u64,
    size: u64,
    name: String,
}

/// A validated kernel image.
#[derive(Debug)]
pub struct KernelImage {
    /// Where it came from.
    pub path: PathBuf,
    /// Entry point (`_start`).
    pub entry: u64,
    /// Lowest load address.
    pub start: u64,
    /// End of the highest segment.
    pub end: u64,
    /// The declared ABI version.
    pub abi_version: u32,
    segments: Vec<Segment>,
    bytes: Vec<u8>,
    symbols: Vec<Symbol>,
}

impl KernelImage {
    /// Reads and validates the image at `path`.
    pub fn open(path: &Path) -> Result<Self, LoaderError> {
        let bytes = std::fs::read(path).map_err(|source| LoaderError::Read { path: path.to_path_buf(), source })?;
        Self::parse(path, bytes)
    }

    /// Validates an image already in memory.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, LoaderError> {
        let p = || path.to_path_buf();
        let elf = Elf::parse(&bytes).map_err(|e| LoaderError::NotElf { path: p(), reason: e.to_string() })?;
        if !elf.is_64 || elf.header.e_machine != EM_X86_64 {
            return Err(LoaderError::WrongMachine(p()));
        }
        match elf.header.e_type {
            ET_EXEC => {}
            ET_DYN => return Err(LoaderError::NotExecutable(p())),
            _ => return Err(LoaderError::BadSegment { path: p(), problem: "not an executable ELF".into() }),
        }
        let abi_version = find_abi_version(&elf, &bytes).ok_or_else(|| LoaderError::MissingAbiNote(p()))?;
        if abi_version != ABI_VERSION {
            return Err(LoaderError::WrongAbiVersion { path: p(), found: abi_version });
        }
        let bad = |problem: String| LoaderError::BadSegment { path: p(), problem };
        let mut segments = Vec::new();
        for ph in elf.program_headers.iter().filter(|ph| ph.p_type == PT_LOAD && ph.p_memsz > 0) {
            let end = ph.p_paddr.checked_add(ph.p_memsz);
            let file_end = ph.p_offset.checked_add(ph.p_filesz);
            if ph.p_filesz > ph.p_memsz || end.is_none() || file_end.is_none_or(|e| e > bytes.len() as u64) {
                return Err(bad(format!("segment at {:#x} has inconsistent sizes or offsets", ph.p_paddr)));
            }
            if ph.p_paddr < KERNEL_MIN_LOAD_ADDR {
                return Err(bad(format!(
                    "segment at {:#x} lies below {KERNEL_MIN_LOAD_ADDR:#x}, which belongs to the platform",
                    ph.p_paddr
                )));
            }
            segments.push(Segment { paddr: ph.p_paddr, memsz: ph.p_memsz, offset: ph.p_offset, filesz: ph.p_filesz });
        }
        segments.sort_by_key(|s| s.paddr);
        for w in segments.windows(2) {
            if w[0].paddr + w[0].memsz > w[1].paddr {
                return Err(bad(format!("segments at {:#x} and {:#x} overlap", w[0].paddr, w[1].paddr)));
            }
        }
        let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
            return Err(bad("no loadable segment".into()));
        };
        let (start, end) = (first.paddr, last.paddr + last.memsz);
        let entry = elf.header.e_entry;
        if !segments.iter().any(|s| s.paddr <= entry && entry < s.paddr + s.memsz) {
            return Err(bad(format!("entry point {entry:#x} is outside every segment")));
        }
        let mut symbols: Vec<Symbol> = elf
            .syms
            .iter()
            .filter(|s| s.is_function() && s.st_value != 0)
            .filter_map(|s| {
                let name = elf.strtab.get_at(s.st_name)?;
                Some(Symbol {
                    addr: s.st_value,
                    size: s.st_size,
                    name: format!("{:#}", rustc_demangle::demangle(name)),
                })
            })
            .collect();
        symbols.sort_by_key(|s| s.addr);
        Ok(KernelImage { path: path.to_path_buf(), entry, start, end, abi_version, segments, bytes, symbols })
    }

    /// Whether the image carries the Xen PVH entry note (name "Xen", type 18) that QEMU's
    /// `-kernel` loader needs.
    pub fn has_pvh_note(&self) -> bool {
        const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
        Elf::parse(&self.bytes)
            .ok()
            .and_then(|elf| elf.iter_note_headers(&self.bytes))
            .is_some_and(|notes| notes.flatten().any(|n| n.n_type == XEN_ELFNOTE_PHYS32_ENTRY && n.name == "Xen"))
    }

    /// The loadable segments, sorted by address.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Copies the segments into guest memory (the zero-filled tails are already zero in a
    /// fresh mapping).
    pub fn load(&self, mem: &GuestMemory) -> Result<(), LoaderError> {
        if self.end > mem.ram_size() {
            return Err(LoaderError::TooLarge { end: self.end, ram: mem.ram_size() });
        }
        for s in &self.segments {
            let from = s.offset as usize;
            mem.write(s.paddr, &self.bytes[from..from + s.filesz as usize])?;
        }
        Ok(())
    }

    /// `function+0xoffset` for an address inside the image, if a symbol covers it.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        let i = self.symbols.partition_point(|s| s.addr <= addr).checked_sub(1)?;
        let s = &self.symbols[i];
        let off = addr - s.addr;
        // Demangled only here: demangling every symbol up front would slow boot down.
        (off < s.size.max(1)).then(|| format!("{:#}+{off:#x}", rustc_demangle::demangle(&s.name)))
    }
}

/// The version in the image's ELASTIC ABI note, if it has one.
fn find_abi_version(elf: &Elf<'_>, bytes: &[u8]) -> Option<u32> {
    if !elf.program_headers.iter().any(|ph| ph.p_type == PT_NOTE) {
        return None;
    }
    let notes = elf.iter_note_headers(bytes)?;
    for note in notes.flatten() {
        if note.n_type == NT_ELASTIC_ABI && note.name == ABI_NOTE_NAME_STR && note.desc.len() >= 4 {
            return Some(u32::from_le_bytes([note.desc[0], note.desc[1], note.desc[2], note.desc[3]]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_an_elf() {
        let e = KernelImage::parse(Path::new("x"), b"definitely not an ELF file".to_vec()).unwrap_err();
        assert!(matches!(e, LoaderError::NotElf { .. }), "{e}");
    }

    #[test]
    fn the_host_binary_is_refused() {
        // The test binary itself is a PIE (or at least has no ABI note): refused either way.
        let exe = std::env::current_exe().unwrap();
        let e = KernelImage::open(&exe).unwrap_err();
        assert!(matches!(e, LoaderError::NotExecutable(_) | LoaderError::MissingAbiNote(_)), "{e}");
    }
}
