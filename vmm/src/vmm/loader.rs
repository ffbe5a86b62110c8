//! Kernel image loading: check the ELF, read its notes, copy its segments into guest memory,
//! and name code addresses for fault diagnoses.
//!
//! The image is untrusted input, so every step is bounded:
//!
//! - **Opening** never blocks and never reads more than it needs. The path is opened with
//!   `O_NONBLOCK | O_NOCTTY | O_CLOEXEC` (a FIFO opens at once instead of waiting for a
//!   writer, a terminal never becomes the controlling one) and `fstat`ed; anything but a
//!   non-empty regular file of at most [`MAX_IMAGE_FILE_SIZE`] bytes is refused before a byte
//!   is read. (The path is `stat`ed before it is opened too, so a device is normally refused
//!   without being opened at all.)
//! - **Checking** reads, with `pread`, only the ELF header (64 bytes), the program headers (at
//!   most [`MAX_PROGRAM_HEADERS`]) and the `PT_NOTE` segments (at most [`MAX_NOTE_BYTES`] in
//!   all). Every size and offset is checked against the file size with overflow-free
//!   arithmetic before it is used, and notes are parsed by hand inside their segment: every
//!   note advances the cursor by at least its 12-byte header, so no count or size the image
//!   declares can drive a long loop or a large allocation.
//! - **Loading** copies each segment's file bytes into guest memory in chunks of at most
//!   [`LOAD_CHUNK`] bytes, straight from the file. The whole file is never in memory: a 1 GiB
//!   tail (debug info, or a hostile sparse file) costs nothing.
//! - **Symbols** (`.symtab` and its string table, bounded by [`MAX_SYMBOL_TABLE_BYTES`]) are
//!   read on the first [`KernelImage::symbolize`] only, which only a fault diagnosis calls; a
//!   normal boot never touches them.
//!
//! Why `pread` and not `mmap`: a mapping of a file that another process truncates turns the
//! next access past the new end into `SIGBUS`, which would kill the whole shim (every VM of a
//! pool) in the middle of a copy. `pread` reports the same situation as a short read, which
//! becomes a [`LoaderError::Truncated`]. The copies involved are small (the headers and notes
//! are a few KiB; segment bytes go through one bounce buffer), and no `unsafe` is needed.
//!
//! The file stays open for the image's lifetime and its segments are read at load time. The
//! layout the shim relies on (addresses, sizes, entry point) is a copy taken and checked when
//! the image is opened, so rewriting the file afterwards cannot make the shim write outside
//! the checked ranges: at worst the guest runs other bytes, and guest bytes are untrusted
//! anyway. A file truncated in between is a clean error.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hypercall_abi::note::AbiNoteDesc;
use hypercall_abi::{ABI_NOTE_NAME, ABI_VERSION, KERNEL_MIN_LOAD_ADDR, NT_ELASTIC_ABI};
use thiserror::Error;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::base::memory::{GuestMemory, MemoryError};

/// Largest image file accepted (4 GiB). Only the headers, notes and segments are ever read, so
/// the cap is not about memory: it rejects files that cannot be a kernel while leaving room
/// for a debug build's symbols.
pub(crate) const MAX_IMAGE_FILE_SIZE: u64 = 4 << 30;

/// Most program headers accepted (the kernel has four).
pub(crate) const MAX_PROGRAM_HEADERS: u16 = 64;

/// Most bytes of `PT_NOTE` segments read, all segments together (the kernel has about 1 KiB).
pub(crate) const MAX_NOTE_BYTES: u64 = 64 << 10;

/// Highest guest-physical address a segment may end at, `.bss` included (1 GiB). The image
/// must also fit in the VM's boot memory, which [`KernelImage::load`] checks.
pub(crate) const MAX_IMAGE_END: u64 = 1 << 30;

/// Bytes copied from the file into guest memory at a time, through one reused buffer that
/// stays in cache (the 230 KB of kernel segments load in about 17 µs; 1 MiB chunks are no
/// faster).
pub(crate) const LOAD_CHUNK: usize = 64 << 10;

/// Largest symbol table, and largest string table, read for diagnoses (each).
pub(crate) const MAX_SYMBOL_TABLE_BYTES: u64 = 16 << 20;

/// Most section headers read when looking for the symbol table.
const MAX_SECTION_HEADERS: u16 = 4096;

/// The Xen PVH note's name, NUL included.
const XEN_NOTE_NAME: &[u8] = b"Xen\0";
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point QEMU's `-kernel` loader needs.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EV_CURRENT: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const SHT_SYMTAB: u32 = 2;
const SHT_STRTAB: u32 = 3;
const STT_FUNC: u8 = 2;
const SHN_UNDEF: u16 = 0;

/// `Elf64_Ehdr`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct FileHeader {
    ident: [u8; 16],
    e_type: U16,
    e_machine: U16,
    e_version: U32,
    e_entry: U64,
    e_phoff: U64,
    e_shoff: U64,
    e_flags: U32,
    e_ehsize: U16,
    e_phentsize: U16,
    e_phnum: U16,
    e_shentsize: U16,
    e_shnum: U16,
    e_shstrndx: U16,
}

/// `Elf64_Phdr`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct ProgramHeader {
    p_type: U32,
    p_flags: U32,
    p_offset: U64,
    p_vaddr: U64,
    p_paddr: U64,
    p_filesz: U64,
    p_memsz: U64,
    p_align: U64,
}

/// `Elf64_Shdr`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct SectionHeader {
    sh_name: U32,
    sh_type: U32,
    sh_flags: U64,
    sh_addr: U64,
    sh_offset: U64,
    sh_size: U64,
    sh_link: U32,
    sh_info: U32,
    sh_addralign: U64,
    sh_entsize: U64,
}

/// `Elf64_Sym`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct SymbolEntry {
    st_name: U32,
    st_info: u8,
    st_other: u8,
    st_shndx: U16,
    st_value: U64,
    st_size: U64,
}

/// `Elf64_Nhdr`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct NoteHeader {
    namesz: U32,
    descsz: U32,
    n_type: U32,
}

const EHDR_SIZE: u64 = size_of::<FileHeader>() as u64;
const PHDR_SIZE: u64 = size_of::<ProgramHeader>() as u64;
const SHDR_SIZE: u64 = size_of::<SectionHeader>() as u64;
const SYM_SIZE: u64 = size_of::<SymbolEntry>() as u64;
const NHDR_SIZE: u64 = size_of::<NoteHeader>() as u64;
const _: () = assert!(EHDR_SIZE == 64 && PHDR_SIZE == 56 && SHDR_SIZE == 64 && SYM_SIZE == 24 && NHDR_SIZE == 12);

/// Why an image could not be loaded. Every message is one line naming the problem.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// `--app` names a service the image does not offer.
    #[error("no service named '{app}' in kernel image {path}; it offers: {known}")]
    UnknownService {
        /// The image.
        path: PathBuf,
        /// The name given.
        app: String,
        /// The services it has.
        known: String,
    },
    /// The file could not be opened or read.
    #[error("cannot read kernel image {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The path names something other than a regular file.
    #[error("kernel image {path} is a {kind}, not a regular file")]
    NotRegularFile {
        /// The path.
        path: PathBuf,
        /// What it is ("FIFO", "directory", ...).
        kind: &'static str,
    },
    /// The file is empty.
    #[error("kernel image {0} is empty")]
    Empty(PathBuf),
    /// The file is larger than [`MAX_IMAGE_FILE_SIZE`].
    #[error("kernel image {path} is {size} bytes; a kernel image may be at most {MAX_IMAGE_FILE_SIZE} bytes (4 GiB)")]
    FileTooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Not an ELF file.
    #[error("kernel image {path} is not an ELF file: {reason}")]
    NotElf {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Wrong machine or class.
    #[error("kernel image {0} is not a 64-bit little-endian x86_64 ELF")]
    WrongMachine(PathBuf),
    /// Position-independent or otherwise non-executable ELF.
    #[error("kernel image {0} is position-independent (ET_DYN); link it as a non-PIE executable at a fixed address")]
    NotExecutable(PathBuf),
    /// The ELF header or program header table is inconsistent.
    #[error("kernel image {path} has malformed ELF headers: {problem}")]
    BadHeaders {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A `PT_NOTE` segment is out of range or its notes are inconsistent.
    #[error("kernel image {path} has a malformed note segment: {problem}")]
    BadNote {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The ABI note is missing.
    #[error(
        "kernel image {0} has no ELASTIC ABI note (.note.elastic.abi): it was not built for this shim's hypercall ABI"
    )]
    MissingAbiNote(PathBuf),
    /// The ABI note is there but malformed.
    #[error("kernel image {path} has a malformed ELASTIC ABI note: {problem}")]
    BadAbiNote {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
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
    /// The file became shorter than its checked headers say (truncated while in use).
    #[error("kernel image {path} ended early: {what} is cut off (was the file truncated while in use?)")]
    Truncated {
        /// The path.
        path: PathBuf,
        /// What could not be read.
        what: String,
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

/// One `PT_LOAD` segment, checked: its file bytes lie inside the file, it lies inside
/// `[KERNEL_MIN_LOAD_ADDR, MAX_IMAGE_END)`, and `filesz <= memsz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Guest-physical load address.
    pub(crate) paddr: u64,
    /// Bytes in memory (`filesz` of them from the file, the rest zero).
    pub(crate) memsz: u64,
    /// Offset of the file bytes.
    pub(crate) offset: u64,
    /// Bytes from the file.
    pub(crate) filesz: u64,
}

/// Where the image's bytes come from.
enum Source {
    /// An open regular file, read with `pread`.
    File(File),
    /// Bytes already in memory ([`KernelImage::parse`], for tests).
    #[cfg(test)]
    Memory(Vec<u8>),
}

impl Source {
    /// Fills `buf` from `offset`; a short file is `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Source::File(f) => f.read_exact_at(buf, offset),
            #[cfg(test)]
            Source::Memory(bytes) => {
                let range = usize::try_from(offset)
                    .ok()
                    .and_then(|start| Some(start..start.checked_add(buf.len())?))
                    .and_then(|r| bytes.get(r));
                match range {
                    Some(src) => {
                        buf.copy_from_slice(src);
                        Ok(())
                    }
                    None => Err(io::ErrorKind::UnexpectedEof.into()),
                }
            }
        }
    }

    /// [`Source::read_vec`] with a [`LoaderError`] naming `what` was read.
    fn read_checked(&self, path: &Path, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, LoaderError> {
        self.read_vec(offset, len).map_err(|e| read_error(path, e, || what.to_string()))
    }

    /// Reads `len` bytes at `offset` into a new buffer (callers bound `len`).
    fn read_vec(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// The error for a failed read of `what`: a short file was truncated after it was checked.
fn read_error(path: &Path, e: io::Error, what: impl FnOnce() -> String) -> LoaderError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => LoaderError::Truncated { path: path.to_path_buf(), what: what() },
        _ => LoaderError::Read { path: path.to_path_buf(), source: e },
    }
}

/// A function symbol: address, size and the offset of its (mangled) name in the string table.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    addr: u64,
    size: u64,
    name: u32,
}

/// The function symbols, sorted by address, with their string table.
#[derive(Debug, Default)]
struct Symbols {
    symbols: Vec<Symbol>,
    strtab: Vec<u8>,
}

impl Symbols {
    /// The NUL-terminated UTF-8 name at `offset` in the string table.
    fn name(&self, offset: u32) -> Option<&str> {
        let tail = self.strtab.get(usize::try_from(offset).ok()?..)?;
        let len = tail.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&tail[..len]).ok()
    }
}

/// What the note segments declare.
#[derive(Debug, Default)]
struct Notes {
    abi: Option<AbiNoteDesc>,
    pvh_entry: bool,
    services: Option<Vec<String>>,
}

/// A checked kernel image. The file stays open; see the module documentation.
pub struct KernelImage {
    /// Where it came from.
    pub(crate) path: PathBuf,
    /// Entry point (`_start`).
    pub(crate) entry: u64,
    /// Lowest load address.
    pub(crate) start: u64,
    /// End of the highest segment.
    pub(crate) end: u64,
    /// The declared ABI version.
    pub(crate) abi_version: u32,
    segments: Vec<Segment>,
    pvh_entry: bool,
    services: Option<Vec<String>>,
    header: FileHeader,
    file_size: u64,
    source: Source,
    symbols: OnceLock<Symbols>,
}

impl std::fmt::Debug for KernelImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelImage")
            .field("path", &self.path)
            .field("entry", &self.entry)
            .field("start", &self.start)
            .field("end", &self.end)
            .field("abi_version", &self.abi_version)
            .field("segments", &self.segments)
            .finish_non_exhaustive()
    }
}

/// What a non-regular file is, for the refusal message.
fn file_kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO (named pipe)"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Opens `path` without blocking and checks it is a regular file of acceptable size; returns
/// the file and its size.
fn open_regular(path: &Path) -> Result<(File, u64), LoaderError> {
    let read_err = |source| LoaderError::Read { path: path.to_path_buf(), source };
    let check = |meta: &std::fs::Metadata| -> Result<u64, LoaderError> {
        if !meta.file_type().is_file() {
            return Err(LoaderError::NotRegularFile { path: path.to_path_buf(), kind: file_kind(meta.file_type()) });
        }
        match meta.len() {
            0 => Err(LoaderError::Empty(path.to_path_buf())),
            size if size > MAX_IMAGE_FILE_SIZE => Err(LoaderError::FileTooLarge { path: path.to_path_buf(), size }),
            size => Ok(size),
        }
    };
    // Refuse what is plainly not an image without opening it (opening a device can have
    // effects)...
    check(&std::fs::metadata(path).map_err(read_err)?)?;
    // ...and check again what was actually opened, in case the path changed in between.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(read_err)?;
    let size = check(&file.metadata().map_err(read_err)?)?;
    Ok((file, size))
}

impl KernelImage {
    /// Opens and checks the image at `path` (see the module documentation for what is read).
    pub fn open(path: &Path) -> Result<Self, LoaderError> {
        let (file, size) = open_regular(path)?;
        Self::check(path, Source::File(file), size)
    }

    /// Checks an image already in memory (`path` only names it in messages).
    #[cfg(test)]
    pub(crate) fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, LoaderError> {
        let size = bytes.len() as u64;
        if size == 0 {
            return Err(LoaderError::Empty(path.to_path_buf()));
        }
        if size > MAX_IMAGE_FILE_SIZE {
            return Err(LoaderError::FileTooLarge { path: path.to_path_buf(), size });
        }
        Self::check(path, Source::Memory(bytes), size)
    }

    fn check(path: &Path, source: Source, size: u64) -> Result<Self, LoaderError> {
        let p = || path.to_path_buf();
        let read = |offset: u64, len: u64, what: &str| source.read_checked(path, offset, len, what);

        // The ELF header.
        if size < EHDR_SIZE {
            return Err(LoaderError::NotElf {
                path: p(),
                reason: format!("{size} bytes is too short for an ELF header"),
            });
        }
        let bytes = read(0, EHDR_SIZE, "the ELF header")?;
        let header = FileHeader::read_from_bytes(&bytes)
            .map_err(|_| LoaderError::NotElf { path: p(), reason: "unreadable ELF header".into() })?;
        let ident = header.ident;
        if ident[..4] != ELF_MAGIC {
            return Err(LoaderError::NotElf { path: p(), reason: "no ELF magic number".into() });
        }
        if ident[4] != ELFCLASS64 || ident[5] != ELFDATA2LSB || header.e_machine.get() != EM_X86_64 {
            return Err(LoaderError::WrongMachine(p()));
        }
        if ident[6] != EV_CURRENT {
            return Err(LoaderError::NotElf { path: p(), reason: format!("unknown ELF version {}", ident[6]) });
        }
        match header.e_type.get() {
            ET_EXEC => {}
            ET_DYN => return Err(LoaderError::NotExecutable(p())),
            other => {
                return Err(LoaderError::NotElf {
                    path: p(),
                    reason: format!("ELF type {other} is not an executable"),
                });
            }
        }

        // The program header table.
        let bad_headers = |problem: String| LoaderError::BadHeaders { path: p(), problem };
        let (phoff, phnum, phentsize) = (header.e_phoff.get(), header.e_phnum.get(), header.e_phentsize.get());
        if u64::from(phentsize) != PHDR_SIZE {
            return Err(bad_headers(format!("program header entries are {phentsize} bytes, not {PHDR_SIZE}")));
        }
        if phnum == 0 || phnum > MAX_PROGRAM_HEADERS {
            return Err(bad_headers(format!(
                "{phnum} program headers; between 1 and {MAX_PROGRAM_HEADERS} are accepted"
            )));
        }
        let table_len = u64::from(phnum) * PHDR_SIZE;
        if phoff.checked_add(table_len).is_none_or(|end| end > size) {
            return Err(bad_headers(format!(
                "the program header table ({table_len} bytes at offset {phoff:#x}) runs past the end of the {size}-byte file"
            )));
        }
        let table = read(phoff, table_len, "the program header table")?;
        let phdrs: Vec<ProgramHeader> =
            table.chunks_exact(PHDR_SIZE as usize).filter_map(|c| ProgramHeader::read_from_bytes(c).ok()).collect();

        // The notes, then the ABI version they declare.
        let notes = read_notes(&phdrs, size, &source, path).map_err(|e| match e {
            NoteError::Segment(problem) => LoaderError::BadNote { path: p(), problem },
            NoteError::Abi(problem) => LoaderError::BadAbiNote { path: p(), problem },
            NoteError::Loader(e) => e,
        })?;
        let abi = notes.abi.ok_or_else(|| LoaderError::MissingAbiNote(p()))?;
        if abi.abi_version != ABI_VERSION {
            return Err(LoaderError::WrongAbiVersion { path: p(), found: abi.abi_version });
        }

        // The loadable segments.
        let segments =
            check_segments(&phdrs, size).map_err(|problem| LoaderError::BadSegment { path: p(), problem })?;
        let bad = |problem: String| LoaderError::BadSegment { path: p(), problem };
        let (Some(first), Some(last)) = (segments.first(), segments.last()) else {
            return Err(bad("no loadable segment".into()));
        };
        // Both sums were checked in `check_segments`.
        let (start, end) = (first.paddr, last.paddr + last.memsz);
        let entry = header.e_entry.get();
        if !segments.iter().any(|s| s.paddr <= entry && entry - s.paddr < s.memsz) {
            return Err(bad(format!("entry point {entry:#x} is outside every segment")));
        }
        Ok(KernelImage {
            path: p(),
            entry,
            start,
            end,
            abi_version: abi.abi_version,
            segments,
            pvh_entry: notes.pvh_entry,
            services: notes.services,
            header,
            file_size: size,
            source,
            symbols: OnceLock::new(),
        })
    }

    /// Whether the image carries the Xen PVH entry note (name "Xen", type 18, a 4- or 8-byte
    /// entry address) that QEMU's `-kernel` loader needs. Found by the same bounded note
    /// parser as the ABI note, when the image was opened.
    pub fn has_pvh_note(&self) -> bool {
        self.pvh_entry
    }

    /// The services the image declares in its service-list note (`None` for an image
    /// without one: then only the guest can say whether `--app` names one).
    pub(crate) fn services(&self) -> Option<&[String]> {
        self.services.as_deref()
    }

    /// Checks that the image offers service `app`: a one-line error listing the ones it has
    /// otherwise.
    pub fn check_service(&self, app: &str) -> Result<(), LoaderError> {
        match self.services() {
            Some(list) if !list.iter().any(|s| s == app) => Err(LoaderError::UnknownService {
                path: self.path.clone(),
                app: app.to_string(),
                known: list.join(", "),
            }),
            _ => Ok(()),
        }
    }

    /// The loadable segments, sorted by address.
    #[cfg(test)]
    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Copies the segments' file bytes into guest memory, [`LOAD_CHUNK`] bytes at a time (the
    /// zero-filled tails are already zero in a fresh mapping).
    pub(crate) fn load(&self, mem: &GuestMemory) -> Result<(), LoaderError> {
        if self.end > mem.ram_size() {
            return Err(LoaderError::TooLarge { end: self.end, ram: mem.ram_size() });
        }
        let largest = self.segments.iter().map(|s| s.filesz).max().unwrap_or(0);
        let mut buf = vec![0u8; usize::try_from(largest).unwrap_or(LOAD_CHUNK).min(LOAD_CHUNK)];
        for s in &self.segments {
            let mut done = 0u64;
            while done < s.filesz {
                // At most LOAD_CHUNK, so the cast is lossless.
                let n = (s.filesz - done).min(buf.len() as u64) as usize;
                let chunk = &mut buf[..n];
                // `offset + filesz` and `paddr + memsz` were checked when the image was opened.
                self.source.read_exact_at(chunk, s.offset + done).map_err(|e| {
                    read_error(&self.path, e, || {
                        format!("the segment at {:#x} ({} bytes at offset {:#x})", s.paddr, s.filesz, s.offset)
                    })
                })?;
                mem.write(s.paddr + done, chunk)?;
                done += n as u64;
            }
        }
        Ok(())
    }

    /// `function+0xoffset` for an address inside the image, if a function symbol covers it.
    /// The symbol table is read on the first call (a malformed or missing one names nothing).
    pub(crate) fn symbolize(&self, addr: u64) -> Option<String> {
        let table = self.symbols.get_or_init(|| self.read_symbols().unwrap_or_default());
        let i = table.symbols.partition_point(|s| s.addr <= addr).checked_sub(1)?;
        let s = table.symbols[i];
        let off = addr - s.addr;
        if off >= s.size.max(1) {
            return None;
        }
        // Demangled only here, for the one symbol asked about.
        Some(format!("{:#}+{off:#x}", rustc_demangle::demangle(table.name(s.name)?)))
    }

    /// Whether the symbol table has been read (by a [`KernelImage::symbolize`] call).
    #[cfg(test)]
    pub(crate) fn symbols_loaded(&self) -> bool {
        self.symbols.get().is_some()
    }

    /// Reads the function symbols from `.symtab` (`None` when the image has none or its
    /// section or symbol tables are out of range).
    fn read_symbols(&self) -> Option<Symbols> {
        let h = &self.header;
        let (shoff, shnum) = (h.e_shoff.get(), h.e_shnum.get());
        if u64::from(h.e_shentsize.get()) != SHDR_SIZE || shnum == 0 || shnum > MAX_SECTION_HEADERS {
            return None;
        }
        let table = self.read_within(shoff, u64::from(shnum) * SHDR_SIZE)?;
        let sections: Vec<SectionHeader> =
            table.chunks_exact(SHDR_SIZE as usize).filter_map(|c| SectionHeader::read_from_bytes(c).ok()).collect();
        let symtab = sections.iter().find(|s| s.sh_type.get() == SHT_SYMTAB)?;
        let strtab = sections.get(usize::try_from(symtab.sh_link.get()).ok()?)?;
        if symtab.sh_entsize.get() != SYM_SIZE
            || strtab.sh_type.get() != SHT_STRTAB
            || symtab.sh_size.get() > MAX_SYMBOL_TABLE_BYTES
            || strtab.sh_size.get() > MAX_SYMBOL_TABLE_BYTES
        {
            return None;
        }
        let count = symtab.sh_size.get() / SYM_SIZE;
        let entries = self.read_within(symtab.sh_offset.get(), count * SYM_SIZE)?;
        let strtab = self.read_within(strtab.sh_offset.get(), strtab.sh_size.get())?;
        let mut symbols: Vec<Symbol> = entries
            .chunks_exact(SYM_SIZE as usize)
            .filter_map(|c| SymbolEntry::read_from_bytes(c).ok())
            .filter(|s| s.st_info & 0xf == STT_FUNC && s.st_shndx.get() != SHN_UNDEF && s.st_value.get() != 0)
            .map(|s| Symbol { addr: s.st_value.get(), size: s.st_size.get(), name: s.st_name.get() })
            .collect();
        symbols.sort_unstable_by_key(|s| s.addr);
        Some(Symbols { symbols, strtab })
    }

    /// Reads `len` bytes at `offset` if the range lies inside the file (callers bound `len`).
    fn read_within(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        offset.checked_add(len).filter(|&end| end <= self.file_size)?;
        self.source.read_vec(offset, len).ok()
    }
}

/// Checks every `PT_LOAD` header against the file size and the load window; returns the
/// non-empty segments sorted by address, or the first problem.
fn check_segments(phdrs: &[ProgramHeader], size: u64) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    for ph in phdrs.iter().filter(|ph| ph.p_type.get() == PT_LOAD) {
        let s = Segment {
            paddr: ph.p_paddr.get(),
            memsz: ph.p_memsz.get(),
            offset: ph.p_offset.get(),
            filesz: ph.p_filesz.get(),
        };
        if s.filesz > s.memsz {
            return Err(format!(
                "segment at {:#x} takes {:#x} bytes from the file but is only {:#x} bytes in memory",
                s.paddr, s.filesz, s.memsz
            ));
        }
        if s.offset.checked_add(s.filesz).is_none_or(|end| end > size) {
            return Err(format!(
                "segment at {:#x} takes {:#x} bytes from file offset {:#x}, past the end of the {size}-byte file",
                s.paddr, s.filesz, s.offset
            ));
        }
        if s.memsz == 0 {
            continue;
        }
        if s.paddr < KERNEL_MIN_LOAD_ADDR {
            return Err(format!(
                "segment at {:#x} lies below {KERNEL_MIN_LOAD_ADDR:#x}, which belongs to the platform",
                s.paddr
            ));
        }
        if s.paddr.checked_add(s.memsz).is_none_or(|end| end > MAX_IMAGE_END) {
            return Err(format!(
                "segment at {:#x} ({:#x} bytes in memory) ends beyond {MAX_IMAGE_END:#x}, the highest address a kernel image may use",
                s.paddr, s.memsz
            ));
        }
        segments.push(s);
    }
    segments.sort_by_key(|s| s.paddr);
    for w in segments.windows(2) {
        if w[0].paddr + w[0].memsz > w[1].paddr {
            return Err(format!("segments at {:#x} and {:#x} overlap", w[0].paddr, w[1].paddr));
        }
    }
    Ok(segments)
}

/// A note-reading failure, sorted by the error it becomes.
enum NoteError {
    /// A `PT_NOTE` segment or a note in it is inconsistent.
    Segment(String),
    /// The ELASTIC ABI note is malformed.
    Abi(String),
    /// Reading failed.
    Loader(LoaderError),
}

/// Reads every `PT_NOTE` segment (at most [`MAX_NOTE_BYTES`] in all) and collects the ABI
/// and PVH notes.
fn read_notes(phdrs: &[ProgramHeader], size: u64, source: &Source, path: &Path) -> Result<Notes, NoteError> {
    let mut found = Notes::default();
    let mut total = 0u64;
    for ph in phdrs.iter().filter(|ph| ph.p_type.get() == PT_NOTE) {
        let (offset, len) = (ph.p_offset.get(), ph.p_filesz.get());
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(NoteError::Segment(format!(
                "{len} bytes at offset {offset:#x} run past the end of the {size}-byte file"
            )));
        }
        total = total.saturating_add(len);
        if total > MAX_NOTE_BYTES {
            return Err(NoteError::Segment(format!("note segments total more than {MAX_NOTE_BYTES} bytes")));
        }
        let bytes = source.read_checked(path, offset, len, "a note segment").map_err(NoteError::Loader)?;
        // Notes are padded to 4 bytes, or to 8 in segments aligned to 8 (as readelf does).
        let align = if ph.p_align.get() == 8 { 8 } else { 4 };
        for note in notes(&bytes, align) {
            let note = note.map_err(NoteError::Segment)?;
            if note.name == ABI_NOTE_NAME && note.n_type == NT_ELASTIC_ABI {
                let desc = AbiNoteDesc::read_from_bytes(note.desc).map_err(|_| {
                    NoteError::Abi(format!(
                        "its descriptor is {} bytes, expected {}",
                        note.desc.len(),
                        size_of::<AbiNoteDesc>()
                    ))
                })?;
                if found.abi.is_some_and(|a| a != desc) {
                    return Err(NoteError::Abi("the image carries two ABI notes that disagree".into()));
                }
                found.abi = Some(desc);
            } else if note.name == ABI_NOTE_NAME && note.n_type == hypercall_abi::NT_ELASTIC_SERVICES {
                // The names the image offers for --app (bounded by the note budget).
                let names: Vec<String> = hypercall_abi::ServiceListNote::names(note.desc).map(str::to_string).collect();
                found.services = Some(names);
            } else if note.name == XEN_NOTE_NAME
                && note.n_type == XEN_ELFNOTE_PHYS32_ENTRY
                && matches!(note.desc.len(), 4 | 8)
            {
                found.pvh_entry = true;
            }
        }
    }
    Ok(found)
}

/// One note: its name (`namesz` bytes, NUL included), type and descriptor.
#[derive(Debug, PartialEq, Eq)]
struct Note<'a> {
    name: &'a [u8],
    n_type: u32,
    desc: &'a [u8],
}

/// The notes in the contents of a `PT_NOTE` segment (`Elf64_Nhdr`, then the name and the
/// descriptor, each padded to `align`), in order. Yields an error for the first note that does
/// not fit in the segment, and nothing after it. Every note takes at least 12 bytes, so this
/// yields at most `seg.len() / 12 + 1` items.
struct NoteIter<'a> {
    seg: &'a [u8],
    align: u64,
    at: u64,
}

fn notes(seg: &[u8], align: u64) -> NoteIter<'_> {
    NoteIter { seg, align, at: 0 }
}

impl<'a> Iterator for NoteIter<'a> {
    type Item = Result<Note<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        let (seg, len, at) = (self.seg, self.seg.len() as u64, self.at);
        if at >= len {
            return None;
        }
        // Stop after this note whatever happens; a good note moves the cursor on below.
        self.at = u64::MAX;
        // `at < len <= MAX_NOTE_BYTES` and the sizes are u32: no sum below overflows a u64.
        let cut = |what: String| format!("the note at offset {at:#x} of its segment {what}");
        let Some(h) = seg.get(at as usize..(at + NHDR_SIZE) as usize).and_then(|b| NoteHeader::read_from_bytes(b).ok())
        else {
            return Some(Err(cut(format!("has only {} bytes left for its 12-byte header", len - at))));
        };
        let (namesz, descsz) = (u64::from(h.namesz.get()), u64::from(h.descsz.get()));
        let name_at = at + NHDR_SIZE;
        let desc_at = name_at + namesz.next_multiple_of(self.align);
        let desc_end = desc_at + descsz;
        if desc_end > len {
            return Some(Err(cut(format!(
                "declares a {namesz}-byte name and a {descsz}-byte descriptor, more than the {} bytes left",
                len - at
            ))));
        }
        let (Some(name), Some(desc)) =
            (seg.get(name_at as usize..(name_at + namesz) as usize), seg.get(desc_at as usize..desc_end as usize))
        else {
            return Some(Err(cut("does not fit in its segment".into())));
        };
        // The last note's padding may be left out at the end of the segment.
        self.at = desc_at + descsz.next_multiple_of(self.align);
        Some(Ok(Note { name, n_type: h.n_type.get(), desc }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use hypercall_abi::note::AbiNote;
    use proptest::prelude::*;

    use super::*;

    fn path() -> &'static Path {
        Path::new("test-image")
    }

    /// The real kernel image this shim was built with.
    fn real_kernel() -> Vec<u8> {
        std::fs::read(elastic_images::KERNEL).expect("the kernel image built by build.rs")
    }

    const TEXT_OFFSET: usize = 0x100;
    const NOTES_OFFSET: usize = 64 + 2 * 56;

    /// A minimal valid image: header, a PT_LOAD and a PT_NOTE header, the ABI and PVH notes,
    /// and 64 bytes of code at 0x200000 in a 4 KiB segment.
    fn minimal() -> Vec<u8> {
        let mut notes = AbiNote::current().as_bytes().to_vec();
        let xen = NoteHeader { namesz: 4.into(), descsz: 4.into(), n_type: XEN_ELFNOTE_PHYS32_ENTRY.into() };
        notes.extend_from_slice(xen.as_bytes());
        notes.extend_from_slice(XEN_NOTE_NAME);
        notes.extend_from_slice(&0x20_0000u32.to_le_bytes());
        let mut ident = [0u8; 16];
        ident[..4].copy_from_slice(&ELF_MAGIC);
        (ident[4], ident[5], ident[6]) = (ELFCLASS64, ELFDATA2LSB, EV_CURRENT);
        let header = FileHeader {
            ident,
            e_type: ET_EXEC.into(),
            e_machine: EM_X86_64.into(),
            e_version: 1.into(),
            e_entry: 0x20_0000.into(),
            e_phoff: 64.into(),
            e_shoff: 0.into(),
            e_flags: 0.into(),
            e_ehsize: 64.into(),
            e_phentsize: 56.into(),
            e_phnum: 2.into(),
            e_shentsize: 64.into(),
            e_shnum: 0.into(),
            e_shstrndx: 0.into(),
        };
        let load = ProgramHeader {
            p_type: PT_LOAD.into(),
            p_flags: 5.into(),
            p_offset: (TEXT_OFFSET as u64).into(),
            p_vaddr: 0x20_0000.into(),
            p_paddr: 0x20_0000.into(),
            p_filesz: 64.into(),
            p_memsz: 0x1000.into(),
            p_align: 0x1000.into(),
        };
        let note = ProgramHeader {
            p_type: PT_NOTE.into(),
            p_flags: 4.into(),
            p_offset: (NOTES_OFFSET as u64).into(),
            p_vaddr: 0.into(),
            p_paddr: 0.into(),
            p_filesz: (notes.len() as u64).into(),
            p_memsz: (notes.len() as u64).into(),
            p_align: 4.into(),
        };
        let mut image = vec![0u8; TEXT_OFFSET + 64];
        image[..64].copy_from_slice(header.as_bytes());
        image[64..120].copy_from_slice(load.as_bytes());
        image[120..176].copy_from_slice(note.as_bytes());
        image[NOTES_OFFSET..NOTES_OFFSET + notes.len()].copy_from_slice(&notes);
        image[TEXT_OFFSET..].fill(0x90);
        image
    }

    /// Offset of the `index`-th program header of `image` whose type is `p_type`.
    fn phdr_at(image: &[u8], p_type: u32, index: usize) -> usize {
        let h = FileHeader::read_from_bytes(&image[..64]).unwrap();
        (0..usize::from(h.e_phnum.get()))
            .map(|i| h.e_phoff.get() as usize + i * 56)
            .filter(|&at| ProgramHeader::read_from_bytes(&image[at..at + 56]).unwrap().p_type.get() == p_type)
            .nth(index)
            .expect("program header")
    }

    /// Offset of the ELASTIC ABI note's header in `image`.
    fn abi_note_at(image: &[u8]) -> usize {
        let at = image.windows(8).position(|w| w == ABI_NOTE_NAME).expect("ABI note");
        at - 12
    }

    fn put_u32(image: &mut [u8], at: usize, v: u32) {
        image[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(image: &mut [u8], at: usize, v: u64) {
        image[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn refused(image: Vec<u8>) -> LoaderError {
        let started = Instant::now();
        let e = KernelImage::parse(path(), image).expect_err("the image must be refused");
        assert!(started.elapsed() < Duration::from_secs(1), "refusing took {:?}", started.elapsed());
        assert_eq!(e.to_string().lines().count(), 1, "one-line message: {e}");
        e
    }

    #[test]
    fn the_minimal_image_loads_and_has_both_notes() {
        let image = KernelImage::parse(path(), minimal()).unwrap();
        assert_eq!((image.entry, image.start, image.end, image.abi_version), (0x20_0000, 0x20_0000, 0x20_1000, 1));
        assert!(image.has_pvh_note());
        let mem = GuestMemory::new(4 << 20).unwrap();
        image.load(&mem).unwrap();
        assert_eq!(mem.read_vec(0x20_0000, 65).unwrap(), [[0x90; 64].as_slice(), &[0]].concat());
        assert_eq!(image.symbolize(0x20_0000), None, "no symbol table");
    }

    #[test]
    fn the_real_kernel_loads_and_symbols_wait_for_a_diagnosis() {
        let image = KernelImage::open(Path::new(elastic_images::KERNEL)).unwrap();
        assert!(image.has_pvh_note());
        assert_eq!(image.abi_version, ABI_VERSION);
        let mem = GuestMemory::new(64 << 20).unwrap();
        image.load(&mem).unwrap();
        let bytes = real_kernel();
        for s in image.segments() {
            let from = s.offset as usize;
            let want = &bytes[from..from + s.filesz as usize];
            assert_eq!(mem.read_vec(s.paddr, s.filesz).unwrap(), want, "segment at {:#x}", s.paddr);
        }
        assert!(!image.symbols_loaded(), "opening and loading do not read the symbol table");
        let text = &image.segments()[0];
        let named: Vec<String> =
            (text.paddr..text.paddr + text.memsz).step_by(64).filter_map(|a| image.symbolize(a)).collect();
        assert!(image.symbols_loaded());
        assert!(named.len() > 100, "most of the code is named: {} names", named.len());
        assert!(named.iter().all(|n| n.contains("+0x")), "{named:?}");
        assert!(named.iter().any(|n| n.starts_with("kernel::")), "demangled kernel functions: {named:?}");
        assert_eq!(image.symbolize(0x10), None);
    }

    #[test]
    fn garbage_is_not_an_elf() {
        let e = refused(b"definitely not an ELF file but long enough to hold a header........".to_vec());
        assert!(matches!(e, LoaderError::NotElf { .. }), "{e}");
        assert!(matches!(refused(b"\x7fELF".to_vec()), LoaderError::NotElf { .. }));
        assert!(matches!(refused(Vec::new()), LoaderError::Empty(_)));
    }

    #[test]
    fn the_host_binary_is_refused() {
        // The test binary itself is a PIE (or at least has no ABI note): refused either way.
        let exe = std::env::current_exe().unwrap();
        let e = KernelImage::open(&exe).unwrap_err();
        assert!(matches!(e, LoaderError::NotExecutable(_) | LoaderError::MissingAbiNote(_)), "{e}");
    }

    #[test]
    fn huge_note_sizes_are_refused_at_once() {
        for image in [minimal(), real_kernel()] {
            let at = abi_note_at(&image);
            for field in [0, 4] {
                for v in [0xffff_fff0, u32::MAX, 0x8000_0000] {
                    let mut bad = image.clone();
                    put_u32(&mut bad, at + field, v);
                    let e = refused(bad);
                    assert!(matches!(e, LoaderError::BadNote { .. }), "{e}");
                    assert!(e.to_string().contains("more than the"), "{e}");
                }
            }
        }
    }

    #[test]
    fn a_note_segment_beyond_the_file_is_refused() {
        for image in [minimal(), real_kernel()] {
            let ph = phdr_at(&image, PT_NOTE, 0);
            for (field, v) in [(8, 1 << 40), (8, u64::MAX - 4), (32, 1 << 40), (32, u64::MAX), (8, image.len() as u64)]
            {
                let mut bad = image.clone();
                put_u64(&mut bad, ph + field, v);
                let e = refused(bad);
                assert!(matches!(e, LoaderError::BadNote { .. }), "{e}");
            }
            // Within the file but larger than the note budget.
            let mut bad = image.clone();
            put_u64(&mut bad, ph + 8, 0);
            put_u64(&mut bad, ph + 32, (MAX_NOTE_BYTES + 1).min(image.len() as u64));
            let e = refused(bad);
            assert!(matches!(e, LoaderError::BadNote { .. }), "{e}");
        }
    }

    #[test]
    fn an_abi_note_with_a_wrong_descriptor_size_is_refused() {
        for image in [minimal(), real_kernel()] {
            let at = abi_note_at(&image);
            for descsz in [0, 4, 12, 16] {
                let mut bad = image.clone();
                put_u32(&mut bad, at + 4, descsz);
                let e = refused(bad);
                assert!(matches!(e, LoaderError::BadAbiNote { .. }), "{e}");
                assert!(e.to_string().contains(&format!("descriptor is {descsz} bytes, expected 8")), "{e}");
            }
        }
        // The same in an otherwise well-formed segment (the Xen note moved up behind a 4-byte
        // descriptor, the segment shortened to match).
        let mut image = minimal();
        put_u32(&mut image, NOTES_OFFSET + 4, 4);
        image.copy_within(NOTES_OFFSET + 28..NOTES_OFFSET + 52, NOTES_OFFSET + 24);
        put_u64(&mut image, 120 + 32, 48);
        let e = refused(image);
        assert!(e.to_string().contains("descriptor is 4 bytes, expected 8"), "{e}");
    }

    #[test]
    fn missing_and_foreign_abi_notes() {
        let mut image = minimal();
        image[NOTES_OFFSET + 12] = b'X';
        assert!(matches!(refused(image), LoaderError::MissingAbiNote(_)));
        let mut image = minimal();
        put_u32(&mut image, NOTES_OFFSET + 20, 7);
        let e = refused(image);
        assert!(matches!(e, LoaderError::WrongAbiVersion { found: 7, .. }), "{e}");
        let mut image = minimal();
        put_u32(&mut image, 120, 0); // the PT_NOTE header becomes PT_NULL
        assert!(matches!(refused(image), LoaderError::MissingAbiNote(_)));
    }

    #[test]
    fn absurd_load_segments_are_refused() {
        for image in [minimal(), real_kernel()] {
            let ph = phdr_at(&image, PT_LOAD, 0);
            let memsz = u64::from_le_bytes(image[ph + 40..ph + 48].try_into().unwrap());
            for (field, v, needle) in [
                (32, 0x7fff_ffff_ffff_ffff, "file but is only"),
                (32, memsz + 1, "file but is only"),
                (8, u64::MAX - 8, "past the end"),
                (8, image.len() as u64, "past the end"),
                (40, u64::MAX, "ends beyond"),
                (40, MAX_IMAGE_END, "ends beyond"),
                (24, u64::MAX - 0x10, "ends beyond"),
                (24, 0x1000, "belongs to the platform"),
            ] {
                let mut bad = image.clone();
                put_u64(&mut bad, ph + field, v);
                let e = refused(bad);
                assert!(matches!(e, LoaderError::BadSegment { .. }), "{e}");
                assert!(e.to_string().contains(needle), "{needle}: {e}");
            }
            // A huge p_filesz with a matching p_memsz.
            let mut bad = image.clone();
            put_u64(&mut bad, ph + 32, 1 << 60);
            put_u64(&mut bad, ph + 40, 1 << 60);
            assert!(refused(bad).to_string().contains("past the end"));
        }
    }

    #[test]
    fn bad_program_header_tables_are_refused() {
        for (at, bytes, needle) in [
            (54, 32u16.to_le_bytes().to_vec(), "entries are 32 bytes"),
            (56, 0u16.to_le_bytes().to_vec(), "0 program headers"),
            (56, 0xffffu16.to_le_bytes().to_vec(), "65535 program headers"),
            (56, 60u16.to_le_bytes().to_vec(), "runs past the end"),
            (32, u64::MAX.to_le_bytes().to_vec(), "runs past the end"),
            (32, (u64::MAX - 100).to_le_bytes().to_vec(), "runs past the end"),
        ] {
            let mut image = minimal();
            image[at..at + bytes.len()].copy_from_slice(&bytes);
            let e = refused(image);
            assert!(matches!(e, LoaderError::BadHeaders { .. }), "{e}");
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
        let mut image = minimal();
        image[4] = 1; // ELFCLASS32
        assert!(matches!(refused(image), LoaderError::WrongMachine(_)));
        let mut image = minimal();
        image[16] = ET_DYN as u8;
        assert!(matches!(refused(image), LoaderError::NotExecutable(_)));
        let mut image = minimal();
        put_u64(&mut image, 24, 0x30_0000);
        assert!(refused(image).to_string().contains("entry point 0x300000 is outside every segment"));
    }

    /// `image` with its program header table moved to the end of the file and `extra`
    /// appended to it.
    fn with_extra_phdr(mut image: Vec<u8>, extra: ProgramHeader) -> Vec<u8> {
        let h = FileHeader::read_from_bytes(&image[..64]).unwrap();
        let (phoff, phnum) = (h.e_phoff.get() as usize, h.e_phnum.get());
        let table = image.len();
        image.extend_from_within(phoff..phoff + usize::from(phnum) * 56);
        image.extend_from_slice(extra.as_bytes());
        put_u64(&mut image, 32, table as u64);
        image[56..58].copy_from_slice(&(phnum + 1).to_le_bytes());
        image
    }

    fn load_header(paddr: u64, offset: u64, filesz: u64, memsz: u64) -> ProgramHeader {
        ProgramHeader {
            p_type: PT_LOAD.into(),
            p_flags: 4.into(),
            p_offset: offset.into(),
            p_vaddr: paddr.into(),
            p_paddr: paddr.into(),
            p_filesz: filesz.into(),
            p_memsz: memsz.into(),
            p_align: 0x1000.into(),
        }
    }

    #[test]
    fn overlapping_segments_are_refused() {
        let image = with_extra_phdr(minimal(), load_header(0x20_0800, 0, 0, 0x1000));
        let e = refused(image);
        assert!(e.to_string().contains("segments at 0x200000 and 0x200800 overlap"), "{e}");
    }

    #[test]
    fn an_empty_segment_with_file_bytes_is_refused() {
        // memsz 0 used to make a segment skipped before its other fields were looked at.
        for image in [minimal(), real_kernel()] {
            for (offset, filesz) in [(0, 1 << 60), (u64::MAX, 1), (0, 1)] {
                let e = refused(with_extra_phdr(image.clone(), load_header(0x3000_0000, offset, filesz, 0)));
                assert!(matches!(e, LoaderError::BadSegment { .. }), "{e}");
            }
        }
        // An empty segment without file bytes is harmless and ignored.
        let image = with_extra_phdr(minimal(), load_header(0, 0, 0, 0));
        assert_eq!(KernelImage::parse(path(), image).unwrap().segments().len(), 1);
    }

    fn parse_all(seg: &[u8], align: u64) -> Result<Vec<Note<'_>>, String> {
        notes(seg, align).collect()
    }

    #[test]
    fn note_parser_bounds() {
        // A header cut short, an empty segment, a note with padding left out at the end.
        assert!(parse_all(&[0; 11], 4).unwrap_err().contains("12-byte header"));
        assert_eq!(parse_all(&[], 4).unwrap(), []);
        let mut seg = Vec::new();
        seg.extend_from_slice(NoteHeader { namesz: 3.into(), descsz: 1.into(), n_type: 9.into() }.as_bytes());
        seg.extend_from_slice(b"ab\0\0x");
        assert_eq!(parse_all(&seg, 4).unwrap(), [Note { name: b"ab\0", n_type: 9, desc: b"x" }]);
        // 8-byte alignment pads the name to 8.
        seg.truncate(12);
        seg.extend_from_slice(b"ab\0\0\0\0\0\0x");
        assert_eq!(parse_all(&seg, 8).unwrap()[0].desc, b"x");
        // Zero-sized notes still advance by their header: 1000 of them are 1000 notes.
        assert_eq!(parse_all(&[0; 12_000], 4).unwrap().len(), 1000);
        // Nothing follows an error.
        let mut seg = vec![0u8; 24];
        seg[16..20].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        let items: Vec<_> = notes(&seg, 4).collect();
        assert_eq!(items.len(), 2);
        assert!(items[1].as_ref().unwrap_err().contains("4294967280-byte descriptor"), "{items:?}");
    }

    #[test]
    fn non_regular_files_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("loader-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = KernelImage::open(&dir).unwrap_err();
        assert!(e.to_string().contains("is a directory, not a regular file"), "{e}");
        let fifo = dir.join("fifo");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(status.success());
        let e = KernelImage::open(&fifo).unwrap_err();
        assert!(e.to_string().contains("is a FIFO (named pipe), not a regular file"), "{e}");
        let e = KernelImage::open(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("is a character device"), "{e}");
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(KernelImage::open(&empty).unwrap_err(), LoaderError::Empty(_)));
        let huge = dir.join("huge");
        File::create(&huge).unwrap().set_len(MAX_IMAGE_FILE_SIZE + 1).unwrap();
        assert!(matches!(KernelImage::open(&huge).unwrap_err(), LoaderError::FileTooLarge { .. }));
        let e = KernelImage::open(&dir.join("absent")).unwrap_err();
        assert!(matches!(e, LoaderError::Read { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_truncated_after_opening_fails_to_load_cleanly() {
        let dir = std::env::temp_dir().join(format!("loader-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kernel");
        std::fs::write(&file, real_kernel()).unwrap();
        let image = KernelImage::open(&file).unwrap();
        File::options().write(true).open(&file).unwrap().set_len(4096).unwrap();
        let mem = GuestMemory::new(64 << 20).unwrap();
        let e = image.load(&mem).unwrap_err();
        assert!(matches!(e, LoaderError::Truncated { .. }), "{e}");
        assert_eq!(image.symbolize(image.entry), None, "the symbol table is gone too: no symbols, no crash");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Parses (and, when accepted, loads and symbolizes) `image`; must neither panic nor
    /// take long.
    fn survives(image: Vec<u8>) -> Result<(), TestCaseError> {
        let started = Instant::now();
        if let Ok(k) = KernelImage::parse(path(), image) {
            k.has_pvh_note();
            if let Ok(mem) = GuestMemory::new(8 << 20) {
                let _ = k.load(&mem);
            }
            let _ = k.symbolize(k.entry);
            let _ = k.symbolize(k.end.wrapping_sub(1));
        }
        prop_assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        Ok(())
    }

    /// Interesting values for a size or offset field.
    fn field_value(len: u64) -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0),
            Just(1),
            Just(len),
            Just(len - 1),
            Just(len + 1),
            Just(0xffff_fff0),
            Just(u64::from(u32::MAX)),
            Just(u64::MAX),
            Just(u64::MAX - 7),
            Just(1 << 63),
            any::<u64>(),
            0..len + 64,
        ]
    }

    proptest! {
        // 256 cases unless PROPTEST_CASES says otherwise. A long fuzz:
        // PROPTEST_CASES=100000 cargo test --release -p hypervisor-shim --lib loader::tests::mutated
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        /// Random bytes of the real kernel changed anywhere.
        #[test]
        fn mutated_kernels_never_panic_or_hang(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..32)) {
            let mut image = real_kernel();
            for (i, b) in edits {
                let at = i.index(image.len());
                image[at] = b;
            }
            survives(image)?;
        }

        /// Random bytes changed in the header area: ELF header, program headers, notes.
        #[test]
        fn mutated_headers_never_panic_or_hang(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16), real in any::<bool>()) {
            let mut image = if real { real_kernel() } else { minimal() };
            let note = phdr_at(&image, PT_NOTE, 0);
            let note_end = (u64::from_le_bytes(image[note + 8..note + 16].try_into().unwrap())
                + u64::from_le_bytes(image[note + 32..note + 40].try_into().unwrap())) as usize;
            let header_end = note + 56;
            for (i, b) in edits {
                // Half the edits in the ELF and program headers, half in the note segment.
                let at = i.index(header_end + note_end);
                let at = if at < header_end { at } else { at - header_end };
                image[at] = b;
            }
            survives(image)?;
        }

        /// Whole fields (program header fields, note sizes, ELF header fields) set to
        /// interesting values, several at once.
        #[test]
        fn mutated_fields_never_panic_or_hang(
            fields in prop::collection::vec((0usize..3, any::<prop::sample::Index>(), any::<prop::sample::Index>()), 1..4),
            values in prop::collection::vec(field_value(0x4_8000), 4),
            real in any::<bool>(),
        ) {
            let mut image = if real { real_kernel() } else { minimal() };
            let phnum = usize::from(u16::from_le_bytes([image[56], image[57]]));
            let note = abi_note_at(&image);
            for ((kind, which, field), v) in fields.into_iter().zip(values) {
                match kind {
                    0 => {
                        let at = 64 + which.index(phnum) * 56 + 8 * field.index(7) + 8;
                        put_u64(&mut image, at, v);
                    }
                    1 => put_u32(&mut image, note + 4 * field.index(3), v as u32),
                    _ => {
                        let at = [24, 32, 40, 54, 56][field.index(5)];
                        if at >= 54 {
                            image[at..at + 2].copy_from_slice(&(v as u16).to_le_bytes());
                        } else {
                            put_u64(&mut image, at, v);
                        }
                    }
                }
            }
            survives(image)?;
        }
    }
}
