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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hypercall_abi::{EXTENT_ALIGN, Extent};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};
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

/// One granted extent.
#[derive(Debug, Clone, Copy)]
struct Granted {
    len: u64,
    slot: u32,
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
pub struct GuestMemory {
    map: GuestMemoryAtomic<GuestMemoryMmap>,
    ram_size: u64,
    hotplug: Arc<Mutex<Hotplug>>,
    held: Arc<AtomicU64>,
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
    pub fn new(ram_size: u64) -> Result<Self, MemoryError> {
        Self::with_window(ram_size, 0, 0, 1)
    }

    /// As [`GuestMemory::new`], with a hot-plug window and at most `max_slots` KVM slots.
    pub fn with_window(ram_size: u64, window_base: u64, window_size: u64, max_slots: u32) -> Result<Self, MemoryError> {
        let map_err = |reason: String| MemoryError::Map { size: ram_size, reason };
        let size = usize::try_from(ram_size).map_err(|e| map_err(e.to_string()))?;
        let region =
            GuestRegionMmap::<()>::from_range(GuestAddress(0), size, None).map_err(|e| map_err(e.to_string()))?;
        let mmap = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| map_err(e.to_string()))?;
        let free = if window_size > 0 { vec![(window_base, window_size)] } else { Vec::new() };
        Ok(GuestMemory {
            map: GuestMemoryAtomic::new(mmap),
            ram_size,
            hotplug: Arc::new(Mutex::new(Hotplug {
                free,
                granted: BTreeMap::new(),
                free_slots: Vec::new(),
                next_slot: 1,
                max_slots,
            })),
            held: Arc::new(AtomicU64::new(ram_size)),
        })
    }

    fn hotplug(&self) -> MutexGuard<'_, Hotplug> {
        self.hotplug.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current set of regions, for code that works on guest memory directly (the device
    /// models' virtqueues). Hold it for one pass only: a released extent stays mapped while a
    /// snapshot that holds it lives.
    pub fn snapshot(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.map.memory()
    }

    /// Size of boot memory.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Memory held now: boot memory plus granted extents.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// Granted extents now.
    pub fn extents(&self) -> Vec<Extent> {
        self.hotplug().granted.iter().map(|(&base, g)| Extent { base, len: g.len }).collect()
    }

    fn set_slot(vm: &VmFd, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), MemoryError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
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
    pub fn register_boot_slot(&self, vm: &VmFd) -> Result<(), MemoryError> {
        let snapshot = self.map.memory();
        let host = snapshot
            .get_host_address(GuestAddress(0))
            .map_err(|_| MemoryError::OutOfRange { gpa: 0, len: self.ram_size })?;
        Self::set_slot(vm, 0, 0, self.ram_size, host as u64)
    }

    /// Grants up to `bytes` (rounded up to 2 MiB) in at most `max_extents` extents, each with
    /// its own host mapping and KVM slot. Returns the extents (they may cover less than asked
    /// when the window is short of room or fragmented); `NoRoom` when nothing is free.
    pub fn grant(&self, vm: &VmFd, bytes: u64, max_extents: usize) -> Result<Vec<Extent>, MemoryError> {
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
        let slot = hp.take_slot().ok_or(MemoryError::NoRoom)?;
        let map_err = |reason: String| MemoryError::Map { size: e.len, reason };
        let region = usize::try_from(e.len).map_err(|err| map_err(err.to_string())).and_then(|len| {
            GuestRegionMmap::<()>::from_range(GuestAddress(e.base), len, None).map_err(|err| map_err(err.to_string()))
        });
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
        if let Err(err) = Self::set_slot(vm, slot, e.base, e.len, host as u64) {
            self.unpublish(e);
            hp.free_slots.push(slot);
            return Err(err);
        }
        hp.granted.insert(e.base, Granted { len: e.len, slot });
        self.held.fetch_add(e.len, Ordering::AcqRel);
        Ok(())
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
    pub fn release(&self, vm: &VmFd, extents: &[Extent]) -> Result<u64, MemoryError> {
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
            let Some(g) = hp.granted.remove(&e.base) else { continue };
            // Slot first: from here on the guest cannot reach the memory.
            Self::set_slot(vm, g.slot, e.base, 0, 0)?;
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
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len() as u64;
        self.check(gpa, len)?;
        self.map.memory().read_slice(buf, GuestAddress(gpa)).map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Copies `bytes` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        let len = bytes.len() as u64;
        self.check(gpa, len)?;
        self.map.memory().write_slice(bytes, GuestAddress(gpa)).map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Reads a plain-data value at `gpa` (one copy; any bit pattern is valid for `T`).
    pub fn read_obj<T: FromBytes + IntoBytes + KnownLayout + Immutable>(&self, gpa: u64) -> Result<T, MemoryError> {
        let mut value = T::new_zeroed();
        self.read(gpa, value.as_mut_bytes())?;
        Ok(value)
    }

    /// Writes a plain-data value at `gpa`.
    pub fn write_obj<T: IntoBytes + Immutable>(&self, gpa: u64, value: &T) -> Result<(), MemoryError> {
        self.write(gpa, value.as_bytes())
    }

    /// Reads `len` bytes at `gpa` into a new buffer.
    pub fn read_vec(&self, gpa: u64, len: u64) -> Result<Vec<u8>, MemoryError> {
        self.check(gpa, len)?;
        let mut v = vec![0u8; len as usize];
        self.read(gpa, &mut v)?;
        Ok(v)
    }

    /// Whether `[gpa, gpa + len)` is entirely guest RAM (boot memory or granted extents).
    pub fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.check(gpa, len).is_ok()
    }
}

/// The shim process's resident set size now, in bytes (0 if /proc cannot say).
pub fn process_rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}

/// The shim process's peak resident set size so far, in bytes (kernel-tracked high water).
pub fn process_peak_rss_bytes() -> u64 {
    // SAFETY: `getrusage` fills the zeroed struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    usage.ru_maxrss as u64 * 1024
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

    #[test]
    fn window_carving_and_coalescing() {
        let mb = 1 << 20;
        let mut hp = Hotplug {
            free: vec![(1 << 30, 64 * mb)],
            granted: BTreeMap::new(),
            free_slots: vec![],
            next_slot: 1,
            max_slots: 10,
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
