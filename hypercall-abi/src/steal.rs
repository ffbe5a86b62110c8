//! The steal-time page: how long each vCPU was ready to run but waited for a host CPU.
//!
//! This is KVM's own paravirtual steal time (`MSR_KVM_STEAL_TIME`), which the shim enables for
//! every vCPU it creates, pointing vCPU `id`'s record at
//! `STEAL_TIME_ADDR + id * STEAL_TIME_STRIDE`. KVM (not the shim) updates a record each time
//! it enters that vCPU after its thread waited on the host's run queue: `version` is odd
//! while it writes, and `steal` only grows. The guest reads the page without an exit
//! (user read-only); the host offers [`features::STEAL_TIME`](crate::features::STEAL_TIME)
//! when KVM took the setting.
//!
//! A guest that counts how busy its vCPUs were can subtract what was stolen: a vCPU that
//! waited for the host is not short of work to share with one more vCPU, it is short of a
//! host CPU, and one more vCPU would wait too.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Guest-physical address of the steal-time page (user read-only).
pub const STEAL_TIME_ADDR: u64 = 0x0000_B000;
/// Bytes between two vCPUs' records (KVM wants each 64-byte aligned).
pub const STEAL_TIME_STRIDE: u64 = 64;

/// One vCPU's record, as KVM writes it (`struct kvm_steal_time`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct StealTime {
    /// Nanoseconds the vCPU was runnable but not running, since the setting took effect.
    pub steal: u64,
    /// Odd while KVM updates the record.
    pub version: u32,
    /// KVM's flags (unused).
    pub flags: u32,
    /// Whether the vCPU was preempted (KVM's hint; unused).
    pub preempted: u8,
    /// *reserved*.
    pub pad: [u8; 3],
    /// *reserved*.
    pub reserved: [u32; 11],
}

impl StealTime {
    /// Guest-physical address of vCPU `id`'s record.
    pub const fn addr(id: u32) -> u64 {
        STEAL_TIME_ADDR + id as u64 * STEAL_TIME_STRIDE
    }
}

const _: () = assert!(size_of::<StealTime>() as u64 == STEAL_TIME_STRIDE);
const _: () = assert!(offset_of!(StealTime, version) == 8);
const _: () = assert!(offset_of!(StealTime, preempted) == 16);
const _: () = assert!(crate::MAX_VCPUS as u64 * STEAL_TIME_STRIDE <= 0x1000);
const _: () = assert!(crate::NOTICE_ADDR + 0x1000 <= STEAL_TIME_ADDR);
