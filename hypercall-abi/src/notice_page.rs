//! The notice page: a page of guest memory the host writes and the guest reads, so the guest
//! can notice host requests at task boundaries without an exit.
//!
//! The host increments `seq` after it posts a notice (sets a bit in `pending` and the matching
//! targets) and then wakes the VM's vCPUs. A guest that sees `seq` change calls
//! [`Call::Events`](crate::Call::Events), which returns the authoritative values and
//! acknowledges them. The page also carries the host's own count of the resources the VM
//! holds, kept current at every change.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Guest-physical address of the notice page (user read-only).
pub const NOTICE_ADDR: u64 = 0x0000_A000;

/// Notice kinds (bits of [`NoticePage::pending`] and `EventsArgs::pending`).
pub mod notice {
    /// The host asks the service to wind down and shut down (for example on Ctrl-C).
    pub const STOP: u64 = 1 << 0;
    /// The host asks the VM to come down to `vcpu_target` vCPUs within the grace period.
    pub const RECLAIM_VCPUS: u64 = 1 << 1;
    /// The host asks the VM to come down to `memory_target` bytes within the grace period.
    pub const RECLAIM_MEMORY: u64 = 1 << 2;
    /// The reclaim of vCPUs is over: the target no longer applies.
    pub const RECLAIM_VCPUS_OVER: u64 = 1 << 3;
    /// The reclaim of memory is over: the target no longer applies.
    pub const RECLAIM_MEMORY_OVER: u64 = 1 << 4;
    /// The host changed the VM's policy (an operator's `ctl policy`, a containerd Update): the
    /// page's `vcpu_max`, `vcpu_burst`, `memory_max` and `memory_burst` hold the new values.
    pub const POLICY: u64 = 1 << 5;
}

/// Layout of the notice page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct NoticePage {
    /// Incremented after every posted notice.
    pub seq: u64,
    /// Posted, unacknowledged [`notice`] bits.
    pub pending: u64,
    /// Target vCPU count of the latest vCPU reclaim.
    pub vcpu_target: u64,
    /// Target bytes of the latest memory reclaim.
    pub memory_target: u64,
    /// Grace period of the latest reclaim, in nanoseconds.
    pub grace_ns: u64,
    /// vCPUs the host counts as online (kept current).
    pub online_vcpus: u64,
    /// Memory bytes the host counts as held: boot memory plus granted extents.
    pub memory_bytes: u64,
    /// The VM's vCPU max now (kept current; 0 from a host that predates the field).
    pub vcpu_max: u64,
    /// The VM's vCPU burst now (kept current; 0 from an older host).
    pub vcpu_burst: u64,
    /// The VM's memory max in bytes now (kept current; 0 from an older host).
    pub memory_max: u64,
    /// The VM's memory burst in bytes now (kept current; 0 from an older host).
    pub memory_burst: u64,
    /// *reserved*.
    pub reserved: [u64; 5],
}

const _: () = assert!(size_of::<NoticePage>() == 128);
const _: () = assert!(offset_of!(NoticePage, pending) == 8);
const _: () = assert!(offset_of!(NoticePage, vcpu_target) == 16);
const _: () = assert!(offset_of!(NoticePage, memory_target) == 24);
const _: () = assert!(offset_of!(NoticePage, grace_ns) == 32);
const _: () = assert!(offset_of!(NoticePage, online_vcpus) == 40);
const _: () = assert!(offset_of!(NoticePage, memory_bytes) == 48);
const _: () = assert!(offset_of!(NoticePage, vcpu_max) == 56);
const _: () = assert!(offset_of!(NoticePage, vcpu_burst) == 64);
const _: () = assert!(offset_of!(NoticePage, memory_max) == 72);
const _: () = assert!(offset_of!(NoticePage, memory_burst) == 80);
const _: () = assert!(crate::CMDLINE_ADDR + crate::CMDLINE_MAX <= NOTICE_ADDR);
