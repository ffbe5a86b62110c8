//! Argument blocks: one `#[repr(C)]` structure per call that takes one. Which call takes which
//! block is written once, in the call table of the crate root (`calls!`, which generates every
//! [`ArgBlock`] impl); [`Call::block_name`](crate::Call::block_name) and [`ArgBlock::CALL`]
//! read it back.
//!
//! Every block starts with a [`Header`] whose `status` the host overwrites with the call's
//! [`Status`](crate::Status). Fields are marked *in* (written by the guest, read by the host),
//! *out* (written by the host) or *reserved* (zero; ignored by the host in this revision and
//! available for append-only extension). Layouts are pinned by compile-time assertions below
//! and by the golden-byte tests in `tests/layout.rs`.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{Call, Status};

/// The first 8 bytes of every argument block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Header {
    /// *out*: the call's status code. The guest presets [`Status::PENDING`].
    pub status: i32,
    /// *reserved*.
    pub reserved: u32,
}

impl Header {
    /// A header with `status` preset to [`Status::PENDING`].
    pub const fn pending() -> Self {
        Header { status: Status::PENDING.0, reserved: 0 }
    }

    /// The status as a [`Status`].
    pub const fn status(&self) -> Status {
        Status(self.status)
    }
}

/// Implemented by every argument block: ties the layout to its call number. The impls are
/// generated from the call table (`calls!` in the crate root), the one place that pairs a
/// call with its block.
pub trait ArgBlock: FromBytes + IntoBytes + Immutable + KnownLayout + Copy {
    /// The call this block belongs to.
    const CALL: Call;

    /// The block's header.
    fn header(&self) -> &Header;

    /// The block's header, mutably.
    fn header_mut(&mut self) -> &mut Header;
}

/// Pins a block's size and that its [`Header`] comes first. Which call a block belongs to is
/// not written here: the call table in the crate root (`calls!`) generates every [`ArgBlock`]
/// impl.
macro_rules! block_layout {
    ($ty:ty, $size:expr) => {
        const _: () = assert!(size_of::<$ty>() == $size);
        const _: () = assert!(offset_of!($ty, header) == 0);
    };
}

/// `min ≤ max ≤ burst` for one resource (vCPUs, or memory in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ResourceLimits {
    /// Reserved at admission, held from boot, never reclaimed.
    pub min: u64,
    /// Sustained ceiling: grants up to here succeed while the host pool has room.
    pub max: u64,
    /// Temporary ceiling above `max`, paid from burst credit.
    pub burst: u64,
}

const _: () = assert!(size_of::<ResourceLimits>() == 24);

/// The block that negotiates version and features and returns the VM's limits.
///
/// The first call a guest makes. Statuses: `OK`; `UNSUPPORTED` when `guest_abi_version` is not
/// a version the host speaks (the *out* fields are then still filled so the guest can report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct HelloArgs {
    /// Status header.
    pub header: Header,
    /// *in*: the ABI version the guest was built for ([`crate::ABI_VERSION`]).
    pub guest_abi_version: u32,
    /// *reserved*.
    pub reserved0: u32,
    /// *in*: feature bits the guest would like ([`crate::features`]).
    pub guest_features: u64,
    /// *out*: the ABI version the host speaks.
    pub host_abi_version: u32,
    /// *out*: the id of the vCPU that made the call.
    pub vcpu_id: u32,
    /// *out*: feature bits the host offers.
    pub host_features: u64,
    /// *out*: negotiated feature bits (`guest_features & host_features`).
    pub features: u64,
    /// *out*: the VM's vCPU policy.
    pub vcpus: ResourceLimits,
    /// *out*: the VM's memory policy, in bytes.
    pub memory: ResourceLimits,
    /// *out*: TSC frequency in kHz as the guest sees it.
    pub tsc_khz: u64,
    /// *reserved*.
    pub reserved: [u64; 8],
}

block_layout!(HelloArgs, 168);
const _: () = assert!(offset_of!(HelloArgs, guest_abi_version) == 8);
const _: () = assert!(offset_of!(HelloArgs, guest_features) == 16);
const _: () = assert!(offset_of!(HelloArgs, host_abi_version) == 24);
const _: () = assert!(offset_of!(HelloArgs, vcpu_id) == 28);
const _: () = assert!(offset_of!(HelloArgs, host_features) == 32);
const _: () = assert!(offset_of!(HelloArgs, features) == 40);
const _: () = assert!(offset_of!(HelloArgs, vcpus) == 48);
const _: () = assert!(offset_of!(HelloArgs, memory) == 72);
const _: () = assert!(offset_of!(HelloArgs, tsc_khz) == 96);

impl HelloArgs {
    /// A request for this crate's ABI version with the given feature wishes.
    pub const fn new(guest_features: u64) -> Self {
        HelloArgs {
            header: Header::pending(),
            guest_abi_version: crate::ABI_VERSION,
            reserved0: 0,
            guest_features,
            host_abi_version: 0,
            vcpu_id: 0,
            host_features: 0,
            features: 0,
            vcpus: ResourceLimits { min: 0, max: 0, burst: 0 },
            memory: ResourceLimits { min: 0, max: 0, burst: 0 },
            tsc_khz: 0,
            reserved: [0; 8],
        }
    }
}

/// Largest `len` one [`Call::ConsoleWrite`] accepts.
pub const CONSOLE_WRITE_MAX: u64 = 64 * 1024;

/// The block that writes bytes to the VM's console (the shim's standard output).
///
/// Statuses: `OK` (all `len` bytes taken); `INVALID` when `len > CONSOLE_WRITE_MAX` or
/// `[buf, buf + len)` is not inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ConsoleWriteArgs {
    /// Status header.
    pub header: Header,
    /// *in*: guest-physical address of the bytes.
    pub buf: u64,
    /// *in*: number of bytes.
    pub len: u64,
    /// *out*: number of bytes taken.
    pub written: u64,
    /// *reserved*.
    pub reserved: [u64; 2],
}

block_layout!(ConsoleWriteArgs, 48);
const _: () = assert!(offset_of!(ConsoleWriteArgs, buf) == 8);
const _: () = assert!(offset_of!(ConsoleWriteArgs, len) == 16);
const _: () = assert!(offset_of!(ConsoleWriteArgs, written) == 24);

impl ConsoleWriteArgs {
    /// A request to write `len` bytes at guest-physical `buf`.
    pub const fn new(buf: u64, len: u64) -> Self {
        ConsoleWriteArgs { header: Header::pending(), buf, len, written: 0, reserved: [0; 2] }
    }
}

/// Largest exit code [`Call::Shutdown`] accepts. Host process exit codes above it are the
/// shim's own (see the README).
pub const SHUTDOWN_CODE_MAX: u32 = 63;

/// Exit codes the kernel uses by convention (any value up to [`SHUTDOWN_CODE_MAX`] is valid).
pub mod exit_code {
    /// The service finished and its own checks passed.
    pub const SUCCESS: u32 = 0;
    /// The service finished but reported a failure (for example a failed self-check).
    pub const FAILURE: u32 = 1;
    /// The kernel panicked.
    pub const PANIC: u32 = 2;
    /// An allocation could not be served even after asking the host for memory.
    pub const OUT_OF_MEMORY: u32 = 3;
    /// The command line named no known service or carried bad arguments.
    pub const BAD_COMMAND_LINE: u32 = 4;
    /// The host asked the VM to stop (a STOP notice) and the service wound down.
    pub const STOPPED: u32 = 5;
}

/// The block that stops the whole VM with `code`.
///
/// Does not return when accepted. Statuses: `INVALID` when `code > SHUTDOWN_CODE_MAX`
/// (the VM keeps running).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ShutdownArgs {
    /// Status header.
    pub header: Header,
    /// *in*: the exit code, `0..=SHUTDOWN_CODE_MAX`.
    pub code: u32,
    /// *reserved*.
    pub reserved0: u32,
    /// *reserved*.
    pub reserved: [u64; 2],
}

block_layout!(ShutdownArgs, 32);
const _: () = assert!(offset_of!(ShutdownArgs, code) == 8);

impl ShutdownArgs {
    /// A request to stop with `code`.
    pub const fn new(code: u32) -> Self {
        ShutdownArgs { header: Header::pending(), code, reserved0: 0, reserved: [0; 2] }
    }
}

/// The block answered with `OK` and nothing else: it measures the cost of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PingArgs {
    /// Status header.
    pub header: Header,
    /// *reserved*.
    pub reserved: [u64; 1],
}

block_layout!(PingArgs, 16);

impl PingArgs {
    /// A ping.
    pub const fn new() -> Self {
        PingArgs { header: Header::pending(), reserved: [0] }
    }
}

impl Default for PingArgs {
    fn default() -> Self {
        Self::new()
    }
}

/// The block that brings one more vCPU online.
///
/// The new vCPU starts at CPL 3 in the same machine state as vCPU 0 (section 2 of
/// `docs/abi.md`) with `rip = entry`, `rsp = stack`, `rdi = arg`, `rsi =` its id. The host
/// reuses a vCPU that went down when it has one. Statuses: `OK` (`vcpu_id` set; the new vCPU
/// may already be running); `DENIED` when the VM already holds its policy's ceiling (burst,
/// or max when burst credit is exhausted); `EXHAUSTED` when the host pool has no vCPU slot;
/// `INVALID` when `entry` or `stack - 8` is not in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct VcpuUpArgs {
    /// Status header.
    pub header: Header,
    /// *in*: entry point.
    pub entry: u64,
    /// *in*: initial stack pointer (the stack grows down from here).
    pub stack: u64,
    /// *in*: value for `rdi` at entry.
    pub arg: u64,
    /// *out*: the new vCPU's id.
    pub vcpu_id: u32,
    /// *reserved*.
    pub reserved0: u32,
    /// *reserved*.
    pub reserved: [u64; 2],
}

block_layout!(VcpuUpArgs, 56);
const _: () = assert!(offset_of!(VcpuUpArgs, entry) == 8);
const _: () = assert!(offset_of!(VcpuUpArgs, stack) == 16);
const _: () = assert!(offset_of!(VcpuUpArgs, arg) == 24);
const _: () = assert!(offset_of!(VcpuUpArgs, vcpu_id) == 32);

impl VcpuUpArgs {
    /// A request to start a vCPU at `entry` on `stack` with `arg`.
    pub const fn new(entry: u64, stack: u64, arg: u64) -> Self {
        VcpuUpArgs { header: Header::pending(), entry, stack, arg, vcpu_id: 0, reserved0: 0, reserved: [0; 2] }
    }
}

/// Why a [`Call::Block`] returned (bits of [`BlockArgs::woken_by`]).
pub mod wake {
    /// Another vCPU (or the host) kicked this one.
    pub const KICK: u32 = 1 << 0;
    /// A host notice was posted (see [`crate::NoticePage`]).
    pub const NOTICE: u32 = 1 << 1;
    /// The timeout elapsed.
    pub const TIMEOUT: u32 = 1 << 2;
    /// A paravirtual device has used buffers for the guest (poll its queues).
    pub const DEVICE: u32 = 1 << 3;
}

/// `BlockArgs::timeout_ns` value meaning "no timeout".
pub const BLOCK_FOREVER: u64 = u64::MAX;

/// The block that sleeps until kicked, a host notice, or `timeout_ns` elapses.
///
/// A kick or notice that arrived since the vCPU's previous BLOCK returned makes this one
/// return at once, so a wake-up racing with the decision to sleep is never lost. A blocked
/// vCPU costs the host no CPU. Statuses: `OK` (`woken_by` says why).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BlockArgs {
    /// Status header.
    pub header: Header,
    /// *in*: longest sleep in nanoseconds ([`BLOCK_FOREVER`] for none; 0 only collects
    /// pending wake-ups).
    pub timeout_ns: u64,
    /// *out*: [`wake`] bits.
    pub woken_by: u32,
    /// *in*: [`block_flags`] bits (0 without the
    /// [`BLOCK_NOTIFY`](crate::features::BLOCK_NOTIFY) feature).
    pub flags: u32,
    /// *in*: with [`block_flags::NOTIFY`], the DEVICE_NOTIFY value
    /// ([`notify_value`](crate::virtio::notify_value)) served before the vCPU sleeps.
    pub notify: u64,
    /// *reserved*.
    pub reserved: [u64; 1],
}

block_layout!(BlockArgs, 40);
const _: () = assert!(offset_of!(BlockArgs, flags) == 20);
const _: () = assert!(offset_of!(BlockArgs, notify) == 24);

/// [`BlockArgs::flags`] bits.
pub mod block_flags {
    /// Serve [`BlockArgs::notify`](super::BlockArgs::notify) as a DEVICE_NOTIFY first: a guest
    /// that queued packets and has nothing else to do tells the device and sleeps in one exit.
    pub const NOTIFY: u32 = 1 << 0;
    /// Every flag this revision defines.
    pub const ALL: u32 = NOTIFY;
}
const _: () = assert!(offset_of!(BlockArgs, timeout_ns) == 8);
const _: () = assert!(offset_of!(BlockArgs, woken_by) == 16);

impl BlockArgs {
    /// A block of at most `timeout_ns`.
    pub const fn new(timeout_ns: u64) -> Self {
        BlockArgs { header: Header::pending(), timeout_ns, woken_by: 0, flags: 0, notify: 0, reserved: [0; 1] }
    }

    /// A block of at most `timeout_ns` that first serves the DEVICE_NOTIFY `notify` (needs
    /// the [`BLOCK_NOTIFY`](crate::features::BLOCK_NOTIFY) feature).
    pub const fn notifying(timeout_ns: u64, notify: u64) -> Self {
        BlockArgs {
            header: Header::pending(),
            timeout_ns,
            woken_by: 0,
            flags: block_flags::NOTIFY,
            notify,
            reserved: [0; 1],
        }
    }
}

/// The block that wakes vCPU `vcpu_id`.
///
/// A blocked target returns from BLOCK with [`wake::KICK`]; a running target is forced out of
/// the hypervisor's run loop and its next BLOCK returns at once. Statuses: `OK`; `INVALID`
/// when `vcpu_id` is not an online vCPU of this VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct KickArgs {
    /// Status header.
    pub header: Header,
    /// *in*: the vCPU to wake.
    pub vcpu_id: u32,
    /// *reserved*.
    pub reserved0: u32,
    /// *reserved*.
    pub reserved: [u64; 1],
}

block_layout!(KickArgs, 24);
const _: () = assert!(offset_of!(KickArgs, vcpu_id) == 8);

impl KickArgs {
    /// A kick of `vcpu_id`.
    pub const fn new(vcpu_id: u32) -> Self {
        KickArgs { header: Header::pending(), vcpu_id, reserved0: 0, reserved: [0] }
    }
}

/// The block that fetches and acknowledges the pending host notices.
///
/// Returns every notice posted since the last EVENTS and clears them. Statuses: `OK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct EventsArgs {
    /// Status header.
    pub header: Header,
    /// *out*: [`crate::notice`] bits that were pending.
    pub pending: u64,
    /// *out*: for a vCPU reclaim, how many vCPUs to come down to.
    pub vcpu_target: u64,
    /// *out*: for a memory reclaim, how many bytes to come down to.
    pub memory_target: u64,
    /// *out*: time the host allows for a reclaim, in nanoseconds.
    pub grace_ns: u64,
    /// *reserved*.
    pub reserved: [u64; 4],
}

block_layout!(EventsArgs, 72);
const _: () = assert!(offset_of!(EventsArgs, pending) == 8);
const _: () = assert!(offset_of!(EventsArgs, vcpu_target) == 16);
const _: () = assert!(offset_of!(EventsArgs, memory_target) == 24);
const _: () = assert!(offset_of!(EventsArgs, grace_ns) == 32);

impl EventsArgs {
    /// An EVENTS request.
    pub const fn new() -> Self {
        EventsArgs {
            header: Header::pending(),
            pending: 0,
            vcpu_target: 0,
            memory_target: 0,
            grace_ns: 0,
            reserved: [0; 4],
        }
    }
}

impl Default for EventsArgs {
    fn default() -> Self {
        Self::new()
    }
}

/// The block that carries the guest's load figures, recorded in the host's timeline.
///
/// Statuses: `OK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ReportArgs {
    /// Status header.
    pub header: Header,
    /// *in*: tasks ready to run (queued, not running).
    pub runnable: u64,
    /// *in*: vCPUs the guest counts as online.
    pub online_vcpus: u64,
    /// *in*: of those, how many are idle.
    pub idle_vcpus: u64,
    /// *in*: heap bytes in use.
    pub heap_used: u64,
    /// *in*: heap bytes free.
    pub heap_free: u64,
    /// *in*: a service-defined figure (e.g. work done).
    pub user: u64,
    /// *reserved*.
    pub reserved: [u64; 2],
}

block_layout!(ReportArgs, 72);
const _: () = assert!(offset_of!(ReportArgs, runnable) == 8);
const _: () = assert!(offset_of!(ReportArgs, online_vcpus) == 16);
const _: () = assert!(offset_of!(ReportArgs, idle_vcpus) == 24);
const _: () = assert!(offset_of!(ReportArgs, heap_used) == 32);
const _: () = assert!(offset_of!(ReportArgs, heap_free) == 40);
const _: () = assert!(offset_of!(ReportArgs, user) == 48);

impl Default for ReportArgs {
    fn default() -> Self {
        ReportArgs {
            header: Header::pending(),
            runnable: 0,
            online_vcpus: 0,
            idle_vcpus: 0,
            heap_used: 0,
            heap_free: 0,
            user: 0,
            reserved: [0; 2],
        }
    }
}

/// A range of guest-physical memory: `[base, base + len)`, both multiples of
/// [`EXTENT_ALIGN`](crate::EXTENT_ALIGN) (2 MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Extent {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

const _: () = assert!(size_of::<Extent>() == 16);

impl Extent {
    /// One past the last byte (saturating).
    pub const fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }
}

/// Most extents one MEM_GRANT returns or one MEM_RELEASE takes.
pub const MEM_EXTENTS_MAX: u32 = 64;

/// Most extents a VM holds at once (each is a host mapping and a KVM memory slot). A grant at
/// the limit is `DENIED`; a grant near it returns fewer extents (a partial grant).
pub const EXTENTS_HELD_MAX: u32 = 1024;

/// The block that asks for `bytes` more memory.
///
/// `bytes` is rounded up to a multiple of 2 MiB. The host answers with up to `max_extents`
/// extents written to the array at `extents`, each backed by its own host mapping and
/// immediately usable (the boot page tables already map the whole hot-plug window).
/// Statuses: `OK` with `granted <= bytes` (a partial grant is reported in `granted`);
/// `DENIED` when the policy allows nothing more (burst reached, or above max without burst
/// credit) or the VM already holds [`EXTENTS_HELD_MAX`] extents; `EXHAUSTED` when the host
/// pool (or the host's memory slots) has no room; `INVALID` when `bytes` is 0,
/// `max_extents` is 0 or above [`MEM_EXTENTS_MAX`], or the array is not in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MemGrantArgs {
    /// Status header.
    pub header: Header,
    /// *in*: bytes wanted.
    pub bytes: u64,
    /// *in*: GPA of an array of `max_extents` [`Extent`]s the host fills.
    pub extents: u64,
    /// *in*: capacity of that array.
    pub max_extents: u32,
    /// *out*: extents written.
    pub count: u32,
    /// *out*: bytes granted (the sum of the extents' lengths).
    pub granted: u64,
    /// *reserved*.
    pub reserved: [u64; 2],
}

block_layout!(MemGrantArgs, 56);
const _: () = assert!(offset_of!(MemGrantArgs, bytes) == 8);
const _: () = assert!(offset_of!(MemGrantArgs, extents) == 16);
const _: () = assert!(offset_of!(MemGrantArgs, max_extents) == 24);
const _: () = assert!(offset_of!(MemGrantArgs, count) == 28);
const _: () = assert!(offset_of!(MemGrantArgs, granted) == 32);

impl MemGrantArgs {
    /// A request for `bytes`, results into `max_extents` extents at GPA `extents`.
    pub const fn new(bytes: u64, extents: u64, max_extents: u32) -> Self {
        MemGrantArgs { header: Header::pending(), bytes, extents, max_extents, count: 0, granted: 0, reserved: [0; 2] }
    }
}

/// The block that gives extents back.
///
/// Every extent must be exactly one the host granted (same base and length) and listed once;
/// otherwise nothing is released and the status is `INVALID`. On `OK` the extents are no
/// longer backed: the host removes their memory slots and unmaps them, so the host's memory
/// use falls; touching them afterwards ends the VM with an "unbacked memory" error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MemReleaseArgs {
    /// Status header.
    pub header: Header,
    /// *in*: GPA of an array of `count` [`Extent`]s.
    pub extents: u64,
    /// *in*: number of extents (1..=[`MEM_EXTENTS_MAX`]).
    pub count: u32,
    /// *reserved*.
    pub reserved0: u32,
    /// *out*: bytes released.
    pub released: u64,
    /// *reserved*.
    pub reserved: [u64; 2],
}

block_layout!(MemReleaseArgs, 48);
const _: () = assert!(offset_of!(MemReleaseArgs, extents) == 8);
const _: () = assert!(offset_of!(MemReleaseArgs, count) == 16);
const _: () = assert!(offset_of!(MemReleaseArgs, released) == 24);

impl MemReleaseArgs {
    /// A release of the `count` extents at GPA `extents`.
    pub const fn new(extents: u64, count: u32) -> Self {
        MemReleaseArgs { header: Header::pending(), extents, count, reserved0: 0, released: 0, reserved: [0; 2] }
    }
}
