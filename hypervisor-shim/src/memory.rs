//! Guest RAM: boot memory as one anonymous mapping in KVM slot 0.
//!
//! Every access the shim makes on the guest's behalf goes through [`GuestMemory::read`] /
//! [`GuestMemory::write`], which bounds-check the whole range against guest RAM first and copy
//! (never hand out references into guest memory, which the guest may change concurrently).

use std::sync::Arc;

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
}

/// The VM's RAM, shared by all vCPU threads.
#[derive(Debug, Clone)]
pub struct GuestMemory {
    map: GuestMemoryAtomic<GuestMemoryMmap>,
    ram_size: u64,
}

impl GuestMemory {
    /// Maps `ram_size` bytes of boot memory at guest-physical 0 (not yet registered with KVM).
    pub fn new(ram_size: u64) -> Result<Self, MemoryError> {
        let map_err = |reason: String| MemoryError::Map { size: ram_size, reason };
        let size = usize::try_from(ram_size).map_err(|e| map_err(e.to_string()))?;
        let region =
            GuestRegionMmap::<()>::from_range(GuestAddress(0), size, None).map_err(|e| map_err(e.to_string()))?;
        let mmap = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| map_err(e.to_string()))?;
        Ok(GuestMemory { map: GuestMemoryAtomic::new(mmap), ram_size })
    }

    /// Size of boot memory.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Registers boot memory as KVM slot 0.
    pub fn register_boot_slot(&self, vm: &VmFd) -> Result<(), MemoryError> {
        let snapshot = self.map.memory();
        let host = snapshot
            .get_host_address(GuestAddress(0))
            .map_err(|_| MemoryError::OutOfRange { gpa: 0, len: self.ram_size })?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.ram_size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live anonymous mapping of `ram_size` bytes owned by
        // `self.map`; the mapping outlives the VM because every vCPU thread and the VM hold
        // clones of this `GuestMemory`.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| MemoryError::Slot { slot: 0, source })
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

    /// The current region collection (for callers that must hold a stable view).
    pub fn snapshot(&self) -> Arc<GuestMemoryMmap> {
        self.map.memory().into_inner()
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
}
