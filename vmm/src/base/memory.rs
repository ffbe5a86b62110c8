//! Guest RAM: boot memory in KVM slot 0, and extents granted in the hot-plug window, each
//! with its own anonymous host mapping and its own KVM slot.
//!
//! Every access the shim makes on the guest's behalf goes through [`GuestMemory::read`] /
//! [`GuestMemory::write`], which bounds-check the whole range against guest RAM first and copy
//! (never hand out references into guest memory, which the guest may change concurrently).
//!
//! The set of regions is an RCU-style snapshot (`GuestMemoryAtomic`): a reader holds the
//! snapshot it loaded, so an extent released concurrently stays mapped until that read is
//! done. Release removes the KVM slot first (the guest can no longer reach the memory), then
//! publishes a snapshot without the region; the host mapping is unmapped when the last
//! snapshot holding it goes away, and the host's RSS falls.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hypercall_abi::{EXTENT_ALIGN, Extent};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegion as MmapRegionDeref, MmapRegionBuilder};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
};

/// Guest memory as the shim maps it: every region carries a dirty bitmap that records the
/// shim's own writes (hypercall blocks, device queues), which live migration sends along with
/// the pages KVM's dirty log reports for the guest's writes.
pub(crate) type Mmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`Mmap`].
pub(crate) type Region = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Where a restored region's contents come from.
#[derive(Debug)]
pub(crate) enum Backing<'a> {
    /// Fresh zeroed memory.
    Anonymous,
    /// Fresh zeroed memory in a memfd of its own, mapped shared: another process can take the
    /// region over by its descriptor ([`GuestMemory::memfds`]), without a copy. The VM's later
    /// grants are memfds too.
    Shared,
    /// An existing memfd (another shim's region, passed over a Unix socket), mapped shared.
    Memfd(&'a std::fs::File),
    /// A snapshot's memory file at `offset`. When the region holds at most `eager` bytes of
    /// data (the file's holes are zero pages), they are read at once into fresh memory backed
    /// by transparent huge pages, and `eager` goes down by as much: the guest maps its RAM
    /// with 2 MiB pages, so KVM can then map it 2 MiB at a time, and a woken VM takes a
    /// handful of shadow-paging faults instead of one per 4 KiB page (6 ms of a 8 ms wake
    /// here). A region with more is mapped privately (copy-on-write) and read lazily, on first
    /// touch; the guest's writes never reach the file either way. One budget (at most
    /// [`EAGER_LOAD_MAX`]) serves all the regions of a restore: a VM holding 1 GiB of data
    /// in extents of a few MiB is not read whole at once.
    File {
        /// The snapshot's memory file.
        file: &'a std::fs::File,
        /// Offset of the region's contents.
        offset: u64,
        /// Where the region's data is, if the snapshot says ([`SavedRegion::data`]).
        data: Option<&'a [(u64, u64)]>,
        /// The data still to be read at once, for this region and the ones after it.
        eager: &'a std::cell::Cell<u64>,
    },
}

impl Backing<'static> {
    /// Fresh zeroed memory: in a memfd of its own when `shared`.
    pub(crate) fn fresh(shared: bool) -> Self {
        if shared { Backing::Shared } else { Backing::Anonymous }
    }
}

/// Most data (bytes outside the file's holes) a restored region may hold to be read at once
/// into huge-page-backed memory (see [`Backing::File`]); a region with more is mapped lazily.
pub(crate) const EAGER_LOAD_MAX: u64 = 16 << 20;

/// A fresh private anonymous mapping of `size` bytes (zeroed on first touch).
fn anonymous_mapping(size: usize) -> Result<MmapRegionDeref<AtomicBitmap>, MemoryError> {
    MmapRegionBuilder::new_with_bitmap(size, vm_memory::bitmap::NewBitmap::with_len(size))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
        .build()
        .map_err(|e| MemoryError::Map { size: size as u64, reason: e.to_string() })
}

/// A fresh memfd of `size` bytes, mapped shared (zeroed on first touch; the memory goes when
/// the last mapping and descriptor of it do).
fn memfd_mapping(size: usize) -> Result<MmapRegionDeref<AtomicBitmap>, MemoryError> {
    use std::os::fd::FromRawFd;
    let map_err = |reason: String| MemoryError::Map { size: size as u64, reason };
    // SAFETY: the name is a NUL-terminated string; the call only creates a descriptor.
    let fd = unsafe { libc::memfd_create(c"elastic-guest-ram".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(map_err(format!("memfd_create: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size as u64).map_err(|e| map_err(format!("memfd size: {e}")))?;
    // Its size is fixed: a shim it is handed to can rely on it (a shrunk memfd would fault
    // that shim's accesses with SIGBUS).
    // SAFETY: F_ADD_SEALS only adds seals to the descriptor this function owns.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) } < 0 {
        return Err(map_err(format!("memfd seals: {}", std::io::Error::last_os_error())));
    }
    shared_mapping(&file, size)
}

/// Maps `size` bytes of memfd `file` shared, from its start.
fn shared_mapping(file: &std::fs::File, size: usize) -> Result<MmapRegionDeref<AtomicBitmap>, MemoryError> {
    let map_err = |reason: String| MemoryError::Map { size: size as u64, reason };
    let have = file.metadata().map_err(|e| map_err(e.to_string()))?.len();
    if have < size as u64 {
        return Err(map_err(format!("the memory descriptor holds {have} bytes")));
    }
    file_mapping(file, 0, size, libc::MAP_SHARED)
}

/// Maps `size` bytes of `file` from `offset`, `MAP_SHARED` or `MAP_PRIVATE` (`sharing`).
fn file_mapping(
    file: &std::fs::File,
    offset: u64,
    size: usize,
    sharing: libc::c_int,
) -> Result<MmapRegionDeref<AtomicBitmap>, MemoryError> {
    let map_err = |reason: String| MemoryError::Map { size: size as u64, reason };
    let file = file.try_clone().map_err(|e| map_err(e.to_string()))?;
    MmapRegionBuilder::new_with_bitmap(size, vm_memory::bitmap::NewBitmap::with_len(size))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_NORESERVE | sharing)
        .with_file_offset(FileOffset::new(file, offset))
        .build()
        .map_err(|e| map_err(e.to_string()))
}

/// Boot memory mapped and registered with a KVM VM ahead of need (a warm pool's VM): a fresh
/// anonymous mapping, KVM slot 0 at guest-physical 0 (registering a slot costs ~0.2 ms here,
/// on the path of a wake), with the 2 MiB blocks where the kernel image goes already backed
/// by zeroed huge pages (every VM of the image has data there; a fresh huge page costs
/// 0.3 ms to several ms).
#[derive(Debug)]
pub(crate) struct Premapped {
    mapping: MmapRegionDeref<AtomicBitmap>,
    /// The blocks `[from, to)` (block numbers) backed ahead.
    faulted: (usize, usize),
}

/// The blocks of a mapping already backed by zeroed huge pages: `[from, to)`, block numbers.
type Faulted = (usize, usize);

impl Premapped {
    /// Maps `size` bytes, backs the 2 MiB blocks holding guest-physical `image` with huge
    /// pages (none of the first block, which the guest maps with 4 KiB pages), and registers
    /// them as `vm`'s slot 0.
    pub(crate) fn new(vm: &VmFd, size: u64, image: (u64, u64)) -> Result<Premapped, MemoryError> {
        let len = usize::try_from(size).map_err(|e| MemoryError::Map { size, reason: e.to_string() })?;
        let mapping = anonymous_mapping(len)?;
        let block = EXTENT_ALIGN as usize;
        let from = ((image.0 / EXTENT_ALIGN) as usize).max(1);
        let to = (image.1.div_ceil(EXTENT_ALIGN) as usize).min(len / block).max(from);
        if to > from {
            // SAFETY: `[from, to)` are whole blocks inside the fresh mapping.
            advise_huge_pages(unsafe { mapping.as_ptr().add(from * block) }, (to - from) * block);
            // A write fault backs each block with a zeroed huge page.
            back_with_zeroes(&mapping, (from * block, to * block), block);
        }
        for (from, to) in early_pages(size) {
            back_with_zeroes(&mapping, (from as usize, to as usize), PAGE_SIZE as usize);
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: mapping.as_ptr() as u64,
        };
        // SAFETY: the mapping of `size` bytes lives in the returned value, which deletes the
        // slot ([`Premapped::discard`]), hands the mapping to the `GuestMemory` that keeps it
        // as long as the VM, or is dropped with the VM's fd (a `Shell` holds both), which
        // takes the slot with it.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot { slot: 0, source })?;
        Ok(Premapped { mapping, faulted: (from, to) })
    }

    /// Its size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.mapping.size() as u64
    }

    /// Gives it up: deletes slot 0 (another boot memory can then be registered) and unmaps.
    fn discard(self, vm: &VmFd) -> Result<(), MemoryError> {
        Self::discard_slot(vm)
    }

    /// Deletes `vm`'s slot 0.
    fn discard_slot(vm: &VmFd) -> Result<(), MemoryError> {
        let region = kvm_userspace_memory_region { slot: 0, ..Default::default() };
        // SAFETY: a size of 0 deletes the slot; nothing is mapped.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot { slot: 0, source })
    }
}

/// Has the host back `[from, to)` of `mapping` now, one write fault per `step` bytes: it
/// writes a zero at each step (the memory reads as zeroes either way), clipped to the mapping.
fn back_with_zeroes(mapping: &MmapRegionDeref<AtomicBitmap>, (from, to): (usize, usize), step: usize) {
    for at in (from..to.min(mapping.size())).step_by(step) {
        // SAFETY: `at` is inside the mapping, which the caller owns and nothing else uses yet.
        unsafe { std::ptr::write_volatile(mapping.as_ptr().add(at), 0) };
    }
}

/// The 4 KiB pages of boot memory (of `size` bytes) that every VM writes from its boot on,
/// outside the kernel image: the structures the shim lays out (descriptor tables, boot
/// information, the notice and steal-time pages, TSSs and the I/O bitmap; the first page
/// tables) and the last page. A warm pool's boot memory has them backed ahead (with zeroes):
/// each first touch costs ~4 µs here, on the path of a wake or a boot otherwise.
fn early_pages(size: u64) -> [(u64, u64); 3] {
    use crate::base::layout::{GDT_ADDR, IO_BITMAP_ADDR, IO_BITMAP_SIZE, PD_BASE, PML4_ADDR};
    let clip = |(from, to): (u64, u64)| (from.min(size), to.min(size));
    [
        clip((GDT_ADDR, (IO_BITMAP_ADDR + IO_BITMAP_SIZE).next_multiple_of(PAGE_SIZE))),
        clip((PML4_ADDR, PD_BASE + PAGE_SIZE)),
        clip((size.saturating_sub(PAGE_SIZE), size)),
    ]
}

/// Maps `len` bytes at `gpa` with `backing`, in `premapped` when it is given and the backing
/// is read into fresh memory (the second value says whether it was used).
fn map_region(
    gpa: u64,
    len: u64,
    backing: &Backing<'_>,
    premapped: Option<(MmapRegionDeref<AtomicBitmap>, Faulted)>,
) -> Result<(Region, bool), MemoryError> {
    let map_err = |reason: String| MemoryError::Map { size: len, reason };
    let size = usize::try_from(len).map_err(|e| map_err(e.to_string()))?;
    let premapped = premapped.filter(|(m, _)| m.size() == size);
    let used = premapped.is_some();
    let faulted = premapped.as_ref().map_or((0, 0), |p| p.1);
    let premapped = premapped.map(|p| p.0);
    let region = |mapping| {
        Region::new(mapping, GuestAddress(gpa)).ok_or_else(|| map_err("region overflows the address space".into()))
    };
    let fresh = |premapped: Option<MmapRegionDeref<AtomicBitmap>>| match premapped {
        Some(m) => Ok(m),
        None => anonymous_mapping(size),
    };
    match backing {
        Backing::Anonymous => Ok((region(fresh(premapped)?)?, used)),
        Backing::Shared => Ok((region(memfd_mapping(size)?)?, false)),
        Backing::Memfd(file) => Ok((region(shared_mapping(file, size)?)?, false)),
        Backing::File { file, offset, data, eager } => {
            let runs = match data {
                Some(runs) => checked_runs(runs, len).map_err(map_err)?,
                None => data_runs(file, *offset, len, Some(eager.get()))
                    .map_err(|e| map_err(format!("cannot read the memory file: {e}")))?,
            };
            let data = runs.iter().map(|&(_, n)| n).sum::<u64>();
            if data <= eager.get() {
                eager.set(eager.get() - data);
                let mapping = fresh(premapped)?;
                place_pages(mapping.as_ptr(), (gpa, len), &runs, faulted);
                for &(at, n) in &runs {
                    // SAFETY: `data_runs` keeps every run inside `[0, len)` of the region,
                    // whose fresh mapping of `size` bytes nothing else references yet.
                    let dst = unsafe { std::slice::from_raw_parts_mut(mapping.as_ptr().add(at as usize), n as usize) };
                    file.read_exact_at(dst, offset + at)
                        .map_err(|e| map_err(format!("cannot read the memory file: {e}")))?;
                }
                return Ok((region(mapping)?, used));
            }
            Ok((region(file_mapping(file, *offset, size, libc::MAP_PRIVATE)?)?, false))
        }
    }
}

/// Least data a 2 MiB block of a restored region holds to be loaded into a fresh huge page
/// when none is ready (see [`place_pages`]).
const HUGE_BLOCK_MIN_DATA: u64 = 64 << 10;

/// Prepares the fresh mapping at `base` of a region (`gpa`, `len`) about to receive the data
/// `runs`, 2 MiB block by block:
/// * a block with data gets a huge page faulted in ahead ([`crate::host::hugepages`]) when one
///   is ready: no allocation on this path, and KVM maps the block 2 MiB at a time where the
///   guest does;
/// * when none is ready, a block with at least [`HUGE_BLOCK_MIN_DATA`] is advised to fault a
///   fresh huge page (0.3 ms to several ms here), and a block with a few pages of data (a
///   stack, a page table) is left in 4 KiB pages, cheaper then;
/// * an empty block is advised, so that the guest's later first touches fault 2 MiB at a time.
///
/// Blocks `faulted` (block numbers) are backed already, and the first 2 MiB of boot memory
/// (`gpa` 0), which the guest maps with 4 KiB pages, stays in 4 KiB pages.
fn place_pages(base: *mut u8, (gpa, len): (u64, u64), runs: &[(u64, u64)], faulted: Faulted) {
    let blocks = (len / EXTENT_ALIGN) as usize;
    let mut data = vec![0u64; blocks];
    for &(at, n) in runs {
        let mut at = at;
        let end = at + n;
        while at < end {
            let block = at / EXTENT_ALIGN;
            let stop = ((block + 1) * EXTENT_ALIGN).min(end);
            if let Some(d) = data.get_mut(block as usize) {
                *d += stop - at;
            }
            at = stop;
        }
    }
    let mut advise: Option<(usize, usize)> = None;
    let flush = |range: &mut Option<(usize, usize)>| {
        if let Some((from, to)) = range.take() {
            // SAFETY: `[from, to)` are whole blocks inside the region's mapping at `base`.
            advise_huge_pages(unsafe { base.add(from) }, to - from);
        }
    };
    for (block, &d) in data.iter().enumerate() {
        let at = block * EXTENT_ALIGN as usize;
        let first = gpa == 0 && block == 0;
        let dense = !first && d >= HUGE_BLOCK_MIN_DATA;
        if (faulted.0..faulted.1).contains(&block) {
            flush(&mut advise);
            continue;
        }
        // SAFETY: the block lies inside the fresh private anonymous mapping at `base`, which
        // nothing reads or writes yet (a warm pool's KVM slot may map it, with no vCPU
        // running).
        if dense && unsafe { crate::host::hugepages::place(base.add(at)) } {
            flush(&mut advise);
            continue;
        }
        if !first && (d == 0 || dense) {
            advise = Some((advise.map_or(at, |(from, _)| from), at + EXTENT_ALIGN as usize));
        } else {
            flush(&mut advise);
        }
    }
    flush(&mut advise);
}

/// The runs a snapshot lists for a region of `len` bytes, checked: in order, not
/// overlapping, not empty, inside the region (a snapshot file is not trusted).
fn checked_runs(runs: &[(u64, u64)], len: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut end = 0u64;
    for &(at, n) in runs {
        let stop = at.checked_add(n).filter(|&stop| n > 0 && at >= end && stop <= len);
        end = stop
            .ok_or_else(|| format!("the snapshot lists data at {at:#x}+{n:#x}, outside its region or out of order"))?;
    }
    Ok(runs.to_vec())
}

/// The data runs of `file` in `[offset, offset + len)`, as `(start, length)` relative to
/// `offset`: everything but the holes (`SEEK_DATA` / `SEEK_HOLE`; a file system without hole
/// support reports one run). With `stop_after`, stops once the runs hold more than that.
fn data_runs(file: &std::fs::File, offset: u64, len: u64, stop_after: Option<u64>) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let end = offset.checked_add(len).ok_or_else(|| std::io::Error::other("region overflows"))?;
    let seek = |at: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let at = libc::off_t::try_from(at).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a descriptor `file` keeps open; it only moves the file offset,
        // which nothing else of this file handle relies on (reads use explicit offsets).
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `at`.
        if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) }
    };
    let mut runs = Vec::new();
    let mut total = 0u64;
    let mut at = offset;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else { break };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        if hole <= data {
            break;
        }
        runs.push((data - offset, hole - data));
        total += hole - data;
        at = hole;
        if stop_after.is_some_and(|most| total > most) {
            break;
        }
    }
    Ok(runs)
}
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Guest-memory failures.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The host could not map the memory.
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map {
        /// Requested size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}: {source}")]
    Slot {
        /// The slot.
        slot: u32,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// A guest-physical range is not (entirely) guest RAM.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not guest RAM")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The memory was handed to another shim ([`GuestMemory::freeze`]).
    #[error("guest memory was handed to another shim: this one writes to it no more")]
    HandedOver,
    /// The hot-plug window has no free space (or KVM no free slot).
    #[error("the hot-plug window has no room")]
    NoRoom,
    /// A release named memory that is not exactly a granted extent.
    #[error("extent {base:#x}+{len:#x} is not a granted extent (or is listed twice)")]
    NotGranted {
        /// Its base.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// The page size of dirty tracking (KVM's and the shim's).
pub(crate) const PAGE_SIZE: u64 = 4096;

/// One granted extent.
#[derive(Debug, Clone, Copy)]
struct Granted {
    len: u64,
    slot: u32,
    /// Unique per grant (a migration tells a re-granted range from the one before it).
    serial: u64,
}

#[derive(Debug)]
struct Hotplug {
    /// Free ranges of the window, `(base, len)`, sorted and coalesced.
    free: Vec<(u64, u64)>,
    /// Granted extents by base.
    granted: BTreeMap<u64, Granted>,
    /// Slot numbers to reuse.
    free_slots: Vec<u32>,
    next_slot: u32,
    max_slots: u32,
    next_serial: u64,
}

impl Hotplug {
    fn take_slot(&mut self) -> Option<u32> {
        if let Some(s) = self.free_slots.pop() {
            return Some(s);
        }
        (self.next_slot < self.max_slots).then(|| {
            self.next_slot += 1;
            self.next_slot - 1
        })
    }

    /// Carves up to `bytes` (2 MiB multiples) from the free ranges, first fit, in at most
    /// `max` pieces.
    fn carve(&mut self, mut bytes: u64, max: usize) -> Vec<Extent> {
        let mut out = Vec::new();
        while bytes > 0 && out.len() < max {
            let Some(first) = self.free.first_mut() else { break };
            let len = first.1.min(bytes);
            out.push(Extent { base: first.0, len });
            first.0 += len;
            first.1 -= len;
            if first.1 == 0 {
                self.free.remove(0);
            }
            bytes -= len;
        }
        out
    }

    /// Takes exactly `[base, base + len)` out of the free ranges; `false` if it is not free.
    fn take_exact(&mut self, base: u64, len: u64) -> bool {
        let Some(end) = base.checked_add(len) else { return false };
        let Some(i) = self.free.iter().position(|&(b, l)| b <= base && end <= b + l) else { return false };
        let (b, l) = self.free.remove(i);
        if end < b + l {
            self.free.insert(i, (end, b + l - end));
        }
        if b < base {
            self.free.insert(i, (b, base - b));
        }
        true
    }

    /// Returns a range to the free list, coalescing neighbours.
    fn give_back(&mut self, base: u64, len: u64) {
        let i = self.free.partition_point(|r| r.0 < base);
        self.free.insert(i, (base, len));
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

/// The VM's RAM, shared by all vCPU threads.
#[derive(Debug, Clone)]
pub(crate) struct GuestMemory {
    map: GuestMemoryAtomic<Mmap>,
    ram_size: u64,
    hotplug: Arc<Mutex<Hotplug>>,
    held: Arc<AtomicU64>,
    /// KVM logs the guest's writes (live migration is under way).
    log_dirty: Arc<std::sync::atomic::AtomicBool>,
    /// Grants are memfds mapped shared ([`Backing::Shared`]).
    shared: bool,
    /// The shim writes no more ([`GuestMemory::freeze`]).
    frozen: Arc<std::sync::atomic::AtomicBool>,
    /// Pages are still arriving from a post-copy source ([`GuestMemory::arriving`]).
    arriving: Arc<std::sync::atomic::AtomicBool>,
}

/// One region of guest RAM as a snapshot or a migration sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegionInfo {
    /// Guest-physical base.
    pub(crate) gpa: u64,
    /// Length in bytes.
    pub(crate) len: u64,
    /// 0 for boot memory; unique per grant for extents.
    pub(crate) serial: u64,
}

/// Asks the host kernel to back `[addr, addr + len)` with transparent huge pages where it
/// can: first touches then fault 2 MiB at a time instead of 4 KiB.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: madvise only changes the paging policy of a mapping this process owns; failure
    // (THP disabled) is harmless and ignored.
    unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
}

impl GuestMemory {
    /// Maps `ram_size` bytes of boot memory at guest-physical 0 (not yet registered with KVM)
    /// and prepares the hot-plug window `[window_base, window_base + window_size)`.
    #[cfg(test)]
    pub(crate) fn new(ram_size: u64) -> Result<Self, MemoryError> {
        Self::with_window(ram_size, 0, 0, 1)
    }

    /// As [`GuestMemory::new`], with a hot-plug window and at most `max_slots` KVM slots.
    #[cfg(test)]
    pub(crate) fn with_window(
        ram_size: u64,
        window_base: u64,
        window_size: u64,
        max_slots: u32,
    ) -> Result<Self, MemoryError> {
        Ok(Self::with_backing(ram_size, window_base, window_size, max_slots, &Backing::Anonymous, None)?.0)
    }

    /// Boot memory of `ram_size` bytes from `backing` (fresh zeroed memory, or a snapshot's
    /// file), registered with `vm` as slot 0, and the hot-plug window. `premapped` (memory a
    /// warm pool registered ahead) is used when it has the size and the backing is read into
    /// fresh memory; otherwise its slot is deleted first.
    pub(crate) fn boot(
        vm: &VmFd,
        (ram_size, window_base, window_size, max_slots): (u64, u64, u64, u32),
        backing: &Backing<'_>,
        premapped: Option<Premapped>,
    ) -> Result<Self, MemoryError> {
        let (premapped, registered) = match premapped {
            Some(p) if p.size() == ram_size => (Some((p.mapping, p.faulted)), true),
            Some(p) => {
                p.discard(vm)?;
                (None, false)
            }
            None => (None, false),
        };
        let (mem, used) = Self::with_backing(ram_size, window_base, window_size, max_slots, backing, premapped)?;
        if registered && !used {
            // The premapped memory was not used (the region is mapped from its file).
            Premapped::discard_slot(vm)?;
        }
        if !used {
            mem.register_boot_slot(vm)?;
        }
        Ok(mem)
    }

    /// `ram_size` bytes of boot memory at guest-physical 0 (not yet registered with KVM) with
    /// its contents from `backing` (fresh memory, or a restored snapshot), a hot-plug window
    /// and at most `max_slots` KVM slots; in `premapped` when given (see [`map_region`]; the second value
    /// says whether it was used).
    fn with_backing(
        ram_size: u64,
        window_base: u64,
        window_size: u64,
        max_slots: u32,
        backing: &Backing<'_>,
        premapped: Option<(MmapRegionDeref<AtomicBitmap>, Faulted)>,
    ) -> Result<(Self, bool), MemoryError> {
        let map_err = |reason: String| MemoryError::Map { size: ram_size, reason };
        let (region, used) = map_region(0, ram_size, backing, premapped)?;
        let mmap = Mmap::from_regions(vec![region]).map_err(|e| map_err(e.to_string()))?;
        let free = if window_size > 0 { vec![(window_base, window_size)] } else { Vec::new() };
        let mem = GuestMemory {
            map: GuestMemoryAtomic::new(mmap),
            ram_size,
            hotplug: Arc::new(Mutex::new(Hotplug {
                free,
                granted: BTreeMap::new(),
                free_slots: Vec::new(),
                next_slot: 1,
                max_slots,
                next_serial: 1,
            })),
            held: Arc::new(AtomicU64::new(ram_size)),
            log_dirty: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            shared: matches!(backing, Backing::Shared | Backing::Memfd(_)),
            frozen: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            arriving: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        Ok((mem, used))
    }

    fn hotplug(&self) -> MutexGuard<'_, Hotplug> {
        self.hotplug.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current set of regions, for code that works on guest memory directly (the device
    /// models' virtqueues). Hold it for one pass only: a released extent stays mapped while a
    /// snapshot that holds it lives.
    pub(crate) fn snapshot(&self) -> vm_memory::GuestMemoryLoadGuard<Mmap> {
        self.map.memory()
    }

    /// Size of boot memory.
    pub(crate) fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Memory held now: boot memory plus granted extents.
    pub(crate) fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// Number of granted extents now.
    pub(crate) fn extent_count(&self) -> usize {
        self.hotplug().granted.len()
    }

    /// Granted extents now.
    #[cfg(test)]
    pub(crate) fn extents(&self) -> Vec<Extent> {
        self.hotplug().granted.iter().map(|(&base, g)| Extent { base, len: g.len }).collect()
    }

    fn set_slot(&self, vm: &VmFd, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), MemoryError> {
        let log = size > 0 && self.log_dirty.load(Ordering::Acquire);
        let region = kvm_userspace_memory_region {
            slot,
            flags: if log { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: either `size` is 0 (deleting the slot), or `host` is the start of a live
        // mapping of `size` bytes that this `GuestMemory` keeps (through its region snapshot)
        // at least until the slot is deleted.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot { slot, source })
    }

    /// Registers boot memory as KVM slot 0.
    pub(crate) fn register_boot_slot(&self, vm: &VmFd) -> Result<(), MemoryError> {
        let snapshot = self.map.memory();
        let host = snapshot
            .get_host_address(GuestAddress(0))
            .map_err(|_| MemoryError::OutOfRange { gpa: 0, len: self.ram_size })?;
        self.set_slot(vm, 0, 0, self.ram_size, host as u64)
    }

    /// Grants up to `bytes` (rounded up to 2 MiB) in at most `max_extents` extents, each with
    /// its own host mapping and KVM slot. Returns the extents (they may cover less than asked
    /// when the window is short of room or fragmented); `NoRoom` when nothing is free.
    pub(crate) fn grant(&self, vm: &VmFd, bytes: u64, max_extents: usize) -> Result<Vec<Extent>, MemoryError> {
        let bytes = bytes.div_ceil(EXTENT_ALIGN).saturating_mul(EXTENT_ALIGN);
        let mut hp = self.hotplug();
        let pieces = hp.carve(bytes, max_extents);
        if pieces.is_empty() {
            return Err(MemoryError::NoRoom);
        }
        let mut granted = Vec::with_capacity(pieces.len());
        let mut failure = None;
        for e in pieces {
            if failure.is_some() {
                hp.give_back(e.base, e.len);
                continue;
            }
            match self.map_extent(vm, &mut hp, e) {
                Ok(()) => granted.push(e),
                Err(err) => {
                    hp.give_back(e.base, e.len);
                    failure = Some(err);
                }
            }
        }
        match (granted.is_empty(), failure) {
            (true, Some(err)) => Err(err),
            _ => Ok(granted),
        }
    }

    /// Maps one extent: host mapping, region snapshot, KVM slot.
    fn map_extent(&self, vm: &VmFd, hp: &mut Hotplug, e: Extent) -> Result<(), MemoryError> {
        self.map_extent_from(vm, hp, e, &self.fresh_backing())
    }

    /// Maps one extent with its contents from `backing`.
    fn map_extent_from(
        &self,
        vm: &VmFd,
        hp: &mut Hotplug,
        e: Extent,
        backing: &Backing<'_>,
    ) -> Result<(), MemoryError> {
        let slot = hp.take_slot().ok_or(MemoryError::NoRoom)?;
        let map_err = |reason: String| MemoryError::Map { size: e.len, reason };
        let region = map_region(e.base, e.len, backing, None).map(|(r, _)| r);
        let region = match region {
            Ok(r) => Arc::new(r),
            Err(err) => {
                hp.free_slots.push(slot);
                return Err(err);
            }
        };
        let host = region.as_ptr();
        advise_huge_pages(host, e.len as usize);
        {
            let guard = self.map.lock().unwrap_or_else(|p| p.into_inner());
            match self.map.memory().insert_region(Arc::clone(&region)) {
                Ok(next) => guard.replace(next),
                Err(err) => {
                    hp.free_slots.push(slot);
                    return Err(map_err(err.to_string()));
                }
            }
        }
        if let Err(err) = self.set_slot(vm, slot, e.base, e.len, host as u64) {
            self.unpublish(e);
            hp.free_slots.push(slot);
            return Err(err);
        }
        hp.next_serial += 1;
        let serial = hp.next_serial;
        hp.granted.insert(e.base, Granted { len: e.len, slot, serial });
        self.held.fetch_add(e.len, Ordering::AcqRel);
        Ok(())
    }

    /// Maps extent `e` exactly where it was (a restored snapshot or a migrated VM), with its
    /// contents from `backing`. The range must be free in the window.
    pub(crate) fn restore_extent(&self, vm: &VmFd, e: Extent, backing: &Backing<'_>) -> Result<(), MemoryError> {
        let mut hp = self.hotplug();
        if !hp.take_exact(e.base, e.len) {
            return Err(MemoryError::NotGranted { base: e.base, len: e.len });
        }
        self.map_extent_from(vm, &mut hp, e, backing).inspect_err(|_| hp.give_back(e.base, e.len))
    }

    /// Fresh memory for a region mapped here: a memfd when the VM's memory is memfds.
    pub(crate) fn fresh_backing(&self) -> Backing<'static> {
        Backing::fresh(self.shared)
    }

    /// Stops (or lets again) the shim's own writes to guest memory ([`GuestMemory::write`]
    /// fails with [`MemoryError::HandedOver`]): memory handed to another shim, which may be
    /// running the VM on it, must not change under that shim.
    pub(crate) fn freeze(&self, on: bool) {
        self.frozen.store(on, Ordering::Release);
    }

    /// Whether pages are still arriving from a post-copy source: a page not yet here reads as
    /// unbacked to the host (a snapshot would save it as zero) and a memfd handed on would
    /// fill it with zeroes, so snapshots and migrations wait until it is done.
    pub(crate) fn arriving(&self) -> bool {
        self.arriving.load(Ordering::Acquire)
    }

    /// The flag behind [`GuestMemory::arriving`], for the post-copy thread to set and clear.
    pub(crate) fn arriving_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.arriving)
    }

    /// Every region of RAM now with a descriptor of the memfd that holds it, when every
    /// region is a memfd mapped shared from its start ([`Backing::Shared`]); `None` otherwise
    /// (a region of anonymous memory, or mapped from a snapshot's file).
    pub(crate) fn memfds(&self) -> Option<Vec<(RegionInfo, std::fs::File)>> {
        let guard = self.map.memory();
        let mut out = Vec::new();
        for info in self.regions() {
            let region = guard.find_region(GuestAddress(info.gpa))?;
            let file = region.file_offset().filter(|f| f.start() == 0)?;
            if region.flags() & libc::MAP_SHARED == 0 || region.len() != info.len {
                return None;
            }
            out.push((info, file.file().try_clone().ok()?));
        }
        Some(out)
    }

    /// Every region of RAM now: boot memory first, then the granted extents by address.
    pub(crate) fn regions(&self) -> Vec<RegionInfo> {
        let mut out = vec![RegionInfo { gpa: 0, len: self.ram_size, serial: 0 }];
        let hp = self.hotplug();
        out.extend(hp.granted.iter().map(|(&gpa, g)| RegionInfo { gpa, len: g.len, serial: g.serial }));
        out
    }

    /// The host address of `[gpa, gpa + len)` when it lies in one region (for bulk copies
    /// while the VM is paused). The pointer stays valid while `guard` lives.
    pub(crate) fn host_range<'g>(&self, guard: &'g Mmap, gpa: u64, len: u64) -> Option<&'g [u8]> {
        let region = guard.find_region(GuestAddress(gpa))?;
        let offset = gpa - region.start_addr().0;
        if offset.checked_add(len)? > region.len() {
            return None;
        }
        let size = usize::try_from(len).ok()?;
        // SAFETY: the range lies inside the region's live mapping, which `guard` keeps mapped
        // for the returned lifetime; the caller reads it as plain bytes (the guest may change
        // them concurrently unless it is paused, which only makes the copy stale, never
        // unsound for `u8`).
        Some(unsafe { std::slice::from_raw_parts(region.as_ptr().add(offset as usize), size) })
    }

    /// Which 4 KiB pages of `[gpa, gpa + len)` (inside one region) may hold data: in an
    /// anonymous region, the pages the host backs (a page never touched reads as zeroes);
    /// `None` means any page may (a region mapped from a snapshot's file, or the host cannot
    /// say).
    pub(crate) fn pages_in_use(&self, guard: &Mmap, gpa: u64, len: u64) -> Option<Vec<bool>> {
        let region = guard.find_region(GuestAddress(gpa))?;
        if region.file_offset().is_some() {
            return None;
        }
        let offset = gpa - region.start_addr().0;
        if offset.checked_add(len)? > region.len() {
            return None;
        }
        crate::host::process::pages_in_use(region.as_ptr() as usize + offset as usize, usize::try_from(len).ok()?)
    }

    /// The end of the region holding `gpa` (`None`: no region does).
    pub(crate) fn region_end(&self, guard: &Mmap, gpa: u64) -> Option<u64> {
        let region = guard.find_region(GuestAddress(gpa))?;
        Some(region.start_addr().0 + region.len())
    }

    /// Starts (or stops) KVM's dirty-page logging on every slot, and clears the shim's own
    /// dirty bitmaps, so that [`GuestMemory::take_dirty`] reports writes from now on.
    pub(crate) fn set_dirty_logging(&self, vm: &VmFd, on: bool) -> Result<(), MemoryError> {
        let hp = self.hotplug();
        self.log_dirty.store(on, Ordering::Release);
        let guard = self.map.memory();
        for region in guard.iter() {
            let gpa = region.start_addr().0;
            let slot = if gpa == 0 { Some(0) } else { hp.granted.get(&gpa).map(|g| g.slot) };
            if let Some(slot) = slot {
                self.set_slot(vm, slot, gpa, region.len(), region.as_ptr() as u64)?;
            }
            MmapRegionDeref::bitmap(&**region).reset();
        }
        Ok(())
    }

    /// The pages written since the previous call (or since logging started), by the guest
    /// (KVM's dirty log) or by the shim (the regions' bitmaps), as guest-physical page
    /// addresses in ascending order. Both logs are read and cleared atomically.
    pub(crate) fn take_dirty(&self, vm: &VmFd) -> Result<Vec<u64>, MemoryError> {
        let hp = self.hotplug();
        let guard = self.map.memory();
        let mut pages = Vec::new();
        for region in guard.iter() {
            let gpa = region.start_addr().0;
            let slot = if gpa == 0 { Some(0) } else { hp.granted.get(&gpa).map(|g| g.slot) };
            let size = region.len() as usize;
            let kvm = match slot {
                Some(slot) => vm.get_dirty_log(slot, size).map_err(|source| MemoryError::Slot { slot, source })?,
                None => Vec::new(),
            };
            let shim = MmapRegionDeref::bitmap(&**region).get_and_reset();
            let words = kvm.len().max(shim.len());
            for w in 0..words {
                let mut bits = kvm.get(w).copied().unwrap_or(0) | shim.get(w).copied().unwrap_or(0);
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let page = (w as u64 * 64 + b) * PAGE_SIZE;
                    if page < region.len() {
                        pages.push(gpa + page);
                    }
                }
            }
        }
        Ok(pages)
    }

    /// Publishes a snapshot without extent `e` (its mapping goes when the last reader is done).
    fn unpublish(&self, e: Extent) {
        let guard = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok((next, _region)) = self.map.memory().remove_region(GuestAddress(e.base), e.len) {
            guard.replace(next);
        }
    }

    /// Releases `extents`, each of which must be exactly a granted extent, listed once.
    /// All-or-nothing: on any mismatch nothing changes. Returns the bytes released.
    pub(crate) fn release(&self, vm: &VmFd, extents: &[Extent]) -> Result<u64, MemoryError> {
        let mut hp = self.hotplug();
        for (i, e) in extents.iter().enumerate() {
            let exact = hp.granted.get(&e.base).is_some_and(|g| g.len == e.len);
            let repeated = extents[..i].iter().any(|o| o.base == e.base);
            if !exact || repeated {
                return Err(MemoryError::NotGranted { base: e.base, len: e.len });
            }
        }
        let mut released = 0;
        for e in extents {
            let Some(g) = hp.granted.get(&e.base).copied() else { continue };
            // Slot first: from here on the guest cannot reach the memory. If KVM refuses, the
            // extent stays granted and accounted (nothing is orphaned); the rest of the list
            // is not released either.
            self.set_slot(vm, g.slot, e.base, 0, 0)?;
            hp.granted.remove(&e.base);
            self.unpublish(*e);
            hp.free_slots.push(g.slot);
            hp.give_back(e.base, e.len);
            self.held.fetch_sub(e.len, Ordering::AcqRel);
            released += e.len;
        }
        Ok(released)
    }

    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let snapshot = self.map.memory();
        let ok = gpa.checked_add(len).is_some() && (len == 0 || snapshot.check_range(GuestAddress(gpa), len as usize));
        if ok { Ok(()) } else { Err(MemoryError::OutOfRange { gpa, len }) }
    }

    /// Copies `buf.len()` bytes out of guest memory at `gpa`.
    pub(crate) fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len() as u64;
        self.check(gpa, len)?;
        self.map.memory().read_slice(buf, GuestAddress(gpa)).map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Copies `bytes` into guest memory at `gpa`.
    pub(crate) fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        if self.frozen.load(Ordering::Acquire) {
            return Err(MemoryError::HandedOver);
        }
        let len = bytes.len() as u64;
        self.check(gpa, len)?;
        self.map.memory().write_slice(bytes, GuestAddress(gpa)).map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Reads a plain-data value at `gpa` (one copy; any bit pattern is valid for `T`).
    pub(crate) fn read_obj<T: FromBytes + IntoBytes + KnownLayout + Immutable>(
        &self,
        gpa: u64,
    ) -> Result<T, MemoryError> {
        let mut value = T::new_zeroed();
        self.read(gpa, value.as_mut_bytes())?;
        Ok(value)
    }

    /// Writes a plain-data value at `gpa`.
    pub(crate) fn write_obj<T: IntoBytes + Immutable>(&self, gpa: u64, value: &T) -> Result<(), MemoryError> {
        self.write(gpa, value.as_bytes())
    }

    /// Reads `len` bytes at `gpa` into a new buffer.
    pub(crate) fn read_vec(&self, gpa: u64, len: u64) -> Result<Vec<u8>, MemoryError> {
        self.check(gpa, len)?;
        let mut v = vec![0u8; len as usize];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Whether `[gpa, gpa + len)` is entirely guest RAM (boot memory or granted extents).
    pub(crate) fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.check(gpa, len).is_ok()
    }
}

/// One memory region: where it is in the guest and (in a snapshot) in the memory file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct SavedRegion {
    /// Guest-physical base.
    pub(crate) gpa: u64,
    /// Length.
    pub(crate) len: u64,
    /// Offset in the memory file.
    pub(crate) offset: u64,
    /// The runs of data the file holds for the region, as `(start, length)` relative to the
    /// region, in order (the rest are holes, zeroes): a restore reads them without asking the
    /// file system where they are (two `lseek`s per run, ~2 µs each here). Absent in
    /// snapshots of older shims: then the file's holes are looked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) data: Option<Vec<(u64, u64)>>,
}

/// Guest memory's part of a snapshot: its regions (contents are in the memory file).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct MemoryState {
    /// Boot memory first, then the granted extents by address.
    pub(crate) regions: Vec<SavedRegion>,
}

impl MemoryState {
    /// Boot memory of `ram_size` bytes and nothing granted.
    #[cfg(test)]
    pub(crate) fn boot_only(ram_size: u64) -> MemoryState {
        MemoryState { regions: vec![SavedRegion { gpa: 0, len: ram_size, offset: 0, data: None }] }
    }
}

/// Where restored memory goes and comes from: the VM's KVM handle, the hot-plug window, the
/// slot limit, and the snapshot's memory file.
pub(crate) struct MemoryArgs<'a> {
    pub(crate) vm: &'a VmFd,
    pub(crate) window: (u64, u64),
    pub(crate) max_slots: u32,
    pub(crate) file: &'a std::fs::File,
    /// Boot memory a warm pool registered ahead, if any.
    pub(crate) premapped: Option<Premapped>,
}

impl crate::base::persist::Persist for GuestMemory {
    type State = MemoryState;
    type Args<'a> = MemoryArgs<'a>;
    type Error = MemoryError;

    /// The regions held now (file offsets are placed by the snapshot that writes them).
    fn save(&self) -> Result<MemoryState, MemoryError> {
        Ok(MemoryState {
            regions: self
                .regions()
                .iter()
                .map(|r| SavedRegion { gpa: r.gpa, len: r.len, offset: 0, data: None })
                .collect(),
        })
    }

    /// Memory from the snapshot's file (each region read at once or mapped lazily: see
    /// [`Backing::File`]), boot memory registered with KVM and every extent mapped where it was.
    fn restore(args: MemoryArgs<'_>, state: &MemoryState) -> Result<GuestMemory, MemoryError> {
        let Some(boot) = state.regions.first() else {
            return Err(MemoryError::OutOfRange { gpa: 0, len: 0 });
        };
        let (window_base, window_size) = args.window;
        let eager = std::cell::Cell::new(EAGER_LOAD_MAX);
        let backing = Backing::File { file: args.file, offset: boot.offset, data: boot.data.as_deref(), eager: &eager };
        let sizes = (boot.len, window_base, window_size, args.max_slots);
        let mem = GuestMemory::boot(args.vm, sizes, &backing, args.premapped)?;
        for r in &state.regions[1..] {
            let e = Extent { base: r.gpa, len: r.len };
            let backing = Backing::File { file: args.file, offset: r.offset, data: r.data.as_deref(), eager: &eager };
            mem.restore_extent(args.vm, e, &backing)?;
        }
        Ok(mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_are_bounds_checked() {
        let m = GuestMemory::new(4 << 20).unwrap();
        m.write_obj(0x1000, &0x1122_3344_5566_7788u64).unwrap();
        assert_eq!(m.read_obj::<u64>(0x1000).unwrap(), 0x1122_3344_5566_7788);
        assert!(m.write((4 << 20) - 4, &[0u8; 8]).is_err());
        assert!(m.read_vec(u64::MAX - 2, 8).is_err());
        assert!(m.read_vec(4 << 20, 1).is_err());
        assert!(m.read_vec(0, 4 << 20).is_ok());
        assert!(m.read_vec(0, 0).is_ok());
    }

    /// A sparse file: a region with little data is read at once, one with more than
    /// [`EAGER_LOAD_MAX`] is mapped lazily; both read back exactly the file's bytes (holes as
    /// zeros) and neither writes to the file.
    #[test]
    fn restored_regions_hold_the_files_bytes_read_at_once_or_lazily() {
        let path = std::env::temp_dir().join(format!("mem-restore-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let page = PAGE_SIZE as usize;
        let small = 8 << 20;
        file.set_len(4096 + small + 2 * EAGER_LOAD_MAX).unwrap();
        // Region 1 at offset 4096: two pages of data, the rest holes.
        file.write_all_at(&[7u8; 4096], 4096 + 3 * 4096).unwrap();
        file.write_all_at(&[9u8; 4096], 4096 + small - 4096).unwrap();
        let runs = data_runs(&file, 4096, small, None).unwrap();
        assert!(runs.iter().map(|r| r.1).sum::<u64>() <= 2 * 4096 || runs == vec![(0, small)], "{runs:?}");
        let eager = std::cell::Cell::new(EAGER_LOAD_MAX);
        let (r, _) =
            map_region(0, small, &Backing::File { file: &file, offset: 4096, data: None, eager: &eager }, None)
                .unwrap();
        assert_eq!(eager.get(), EAGER_LOAD_MAX - 2 * 4096, "what was read at once is spent");
        assert!(r.file_offset().is_none(), "read at once");
        // With less budget left than its data, the same region is mapped from the file.
        let short = std::cell::Cell::new(4096);
        let (lazy, _) =
            map_region(0, small, &Backing::File { file: &file, offset: 4096, data: None, eager: &short }, None)
                .unwrap();
        assert!(lazy.file_offset().is_some() && short.get() == 4096, "read at once past the budget");
        drop(lazy);
        // Listed runs are read as listed (no holes looked up), and checked.
        let listed = [(3 * 4096, 4096), (small - 4096, 4096)];
        let full = std::cell::Cell::new(EAGER_LOAD_MAX);
        let (from_list, _) =
            map_region(0, small, &Backing::File { file: &file, offset: 4096, data: Some(&listed), eager: &full }, None)
                .unwrap();
        assert_eq!(full.get(), EAGER_LOAD_MAX - 2 * 4096);
        // SAFETY: the region's mapping lives as long as `from_list`.
        let listed_bytes = unsafe { std::slice::from_raw_parts(from_list.as_ptr(), small as usize) };
        assert!(listed_bytes[3 * page..4 * page].iter().all(|&b| b == 7));
        assert!(listed_bytes[small as usize - page..].iter().all(|&b| b == 9));
        assert!(listed_bytes[..3 * page].iter().all(|&b| b == 0));
        for bad in [vec![(small - 4096, 8192)], vec![(8192, 4096), (4096, 4096)], vec![(0, 0)], vec![(u64::MAX, 2)]] {
            let backing = Backing::File { file: &file, offset: 4096, data: Some(&bad), eager: &full };
            assert!(map_region(0, small, &backing, None).is_err(), "{bad:?} accepted");
        }
        // SAFETY: the region's mapping lives as long as `r`.
        let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), small as usize) };
        assert!(bytes[3 * page..4 * page].iter().all(|&b| b == 7));
        assert!(bytes[small as usize - page..].iter().all(|&b| b == 9));
        assert!(
            bytes[..3 * page].iter().all(|&b| b == 0) && bytes[4 * page..small as usize - page].iter().all(|&b| b == 0)
        );
        // Region 2: more data than the eager bound, mapped lazily.
        let big = EAGER_LOAD_MAX + (2 << 20);
        let at = 4096 + small;
        file.write_all_at(&vec![5u8; big as usize], at).unwrap();
        let (r2, _) = map_region(
            0,
            big,
            &Backing::File { file: &file, offset: at, data: None, eager: &std::cell::Cell::new(EAGER_LOAD_MAX) },
            None,
        )
        .unwrap();
        // SAFETY: as above.
        let bytes2 = unsafe { std::slice::from_raw_parts_mut(r2.as_ptr(), big as usize) };
        assert!(bytes2.iter().all(|&b| b == 5));
        bytes2[0] = 6;
        let mut back = [0u8; 1];
        file.read_exact_at(&mut back, at).unwrap();
        assert_eq!(back[0], 5, "a guest write reached the file");
        drop((r, r2));
        std::fs::remove_file(&path).unwrap();
    }

    /// Data read into memory made ahead (blocks backed already, huge pages from the stock,
    /// blocks left in 4 KiB pages) reads back exactly the file's bytes; memory of another size
    /// is not used.
    #[test]
    fn a_region_read_into_memory_made_ahead_holds_the_files_bytes() {
        let path = std::env::temp_dir().join(format!("mem-premapped-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let block = EXTENT_ALIGN as usize;
        let len = 8 * block;
        file.set_len(len as u64).unwrap();
        // Block 0: one page; block 1 (backed ahead): dense; block 3: dense (a stock page);
        // block 7: one page (4 KiB pages).
        file.write_all_at(&[1u8; 4096], 4096).unwrap();
        file.write_all_at(&vec![2u8; 300 << 10], block as u64 + 8192).unwrap();
        file.write_all_at(&vec![3u8; 200 << 10], 3 * block as u64).unwrap();
        file.write_all_at(&[4u8; 4096], (len - 4096) as u64).unwrap();
        let mut expected = vec![0u8; len];
        file.read_exact_at(&mut expected, 0).unwrap();
        crate::host::hugepages::top_up();
        let ahead = anonymous_mapping(len).unwrap();
        // SAFETY: block 1 of the fresh mapping; a zero written backs it, as `Premapped` does.
        unsafe { std::ptr::write_volatile(ahead.as_ptr().add(block), 0) };
        let eager = std::cell::Cell::new(EAGER_LOAD_MAX);
        let backing = Backing::File { file: &file, offset: 0, data: None, eager: &eager };
        let (r, used) = map_region(0, len as u64, &backing, Some((ahead, (1, 2)))).unwrap();
        assert!(used);
        // SAFETY: the region's mapping lives as long as `r`.
        let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), len) };
        assert!(bytes == expected.as_slice(), "the region differs from the file");
        let other = anonymous_mapping(len / 2).unwrap();
        let (_, used) = map_region(0, len as u64, &backing, Some((other, (0, 0)))).unwrap();
        assert!(!used, "memory of another size was used");
        drop(r);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn window_carving_and_coalescing() {
        let mb = 1 << 20;
        let mut hp = Hotplug {
            free: vec![(1 << 30, 64 * mb)],
            granted: BTreeMap::new(),
            free_slots: vec![],
            next_slot: 1,
            max_slots: 10,
            next_serial: 1,
        };
        let a = hp.carve(8 * mb, 4);
        assert_eq!(a, [Extent { base: 1 << 30, len: 8 * mb }]);
        let b = hp.carve(4 * mb, 4);
        assert_eq!(b[0].base, (1 << 30) + 8 * mb);
        hp.give_back(a[0].base, a[0].len);
        // Now [0, 8M) and [12M, 64M) are free: a 16 MiB request takes two pieces.
        let c = hp.carve(16 * mb, 4);
        assert_eq!(c.len(), 2);
        assert_eq!(c.iter().map(|e| e.len).sum::<u64>(), 16 * mb);
        // Limited pieces give a partial grant.
        hp.give_back(c[0].base, c[0].len);
        hp.give_back(c[1].base, c[1].len);
        hp.give_back(b[0].base, b[0].len);
        assert_eq!(hp.free, vec![(1 << 30, 64 * mb)], "everything coalesced again");
        assert_eq!(hp.carve(128 * mb, 4), [Extent { base: 1 << 30, len: 64 * mb }], "partial: the window is short");
        assert!(hp.carve(2 * mb, 4).is_empty());
        assert_eq!((1..=9).filter_map(|_| hp.take_slot()).count(), 9);
        assert_eq!(hp.take_slot(), None);
    }
}
