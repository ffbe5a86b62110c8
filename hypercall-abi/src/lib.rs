//! The hypercall ABI shared by the elastic unikernel (guest) and `hypervisor-shim` (host).
//!
//! This crate is the single source of truth for every number and layout the two sides agree
//! on: the ABI version and the ELF note that carries it, the I/O ports, the call numbers, the
//! status codes, the `#[repr(C)]` argument blocks and the boot-info block. `docs/abi.md` in the
//! repository is the prose specification of the same contract.
//!
//! # Transport in one paragraph
//!
//! The guest runs at CPL 3 with IOPL = 3. To make call `N` it fills an argument block in guest
//! RAM (its first field, `status`, preset to [`Status::PENDING`]), puts the block's
//! guest-physical address in `rdi`, the call number in `eax`, and executes
//! `out dx, eax` with `dx` = [`HYPERCALL_PORT`]. The host reads `rdi` through KVM's shared
//! `kvm_run` register area (no extra ioctl), copies the block out once, validates it, performs
//! the call and writes the results and the status back into the block. When the guest resumes,
//! the call is complete. A block whose status is still [`Status::PENDING`] after the `out` was
//! not answered: no shim is present (for example under QEMU).
//!
//! All structures are append-only: a later ABI revision may add fields at the end (taking them
//! from the trailing `reserved` arrays), never move or retype existing ones.

#![no_std]
#![deny(missing_docs)]

pub mod args;
pub mod boot;
pub mod note;
pub mod notice_page;
pub mod options;
pub mod steal;
pub mod virtio;

pub use args::*;
pub use boot::*;
pub use note::*;
pub use notice_page::*;
pub use options::*;
pub use steal::*;

/// Version of this ABI. The kernel declares it in its ELF note ([`note::AbiNote`]); the shim
/// refuses, before creating a VM, any image whose note is missing or carries another version.
pub const ABI_VERSION: u32 = 1;

/// The port a guest writes (`out dx, eax`, 4 bytes) to make a hypercall.
pub const HYPERCALL_PORT: u16 = 0x0500;

/// A port the shim ignores: a write to it exits to the host and resumes the guest with no other
/// effect. It exists to measure the bare cost of an exit (the floor every hypercall pays).
pub const NOP_PORT: u16 = 0x0501;

/// The port the shim's CPL-0 exception stubs write to report a guest exception. Only the
/// stubs (at CPL 0) use it; a write from CPL 3 is treated as an unserved exit.
pub const FAULT_PORT: u8 = 0xFA;

/// Start of the kernel's permitted load range: the first 2 MiB of guest-physical memory belong
/// to the platform (page tables, GDT, IDT, TSSs, boot info, command line). Every loadable
/// segment of the kernel ELF must lie at or above this address.
pub const KERNEL_MIN_LOAD_ADDR: u64 = 0x20_0000;

/// Granularity of memory extents (grants, releases, the hot-plug window): 2 MiB.
pub const EXTENT_ALIGN: u64 = 0x20_0000;

/// The ports QEMU's `isa-debug-exit` device listens on in the kernel's QEMU mode. A value `v`
/// written there makes QEMU exit with status `(v << 1) | 1`.
pub const QEMU_DEBUG_EXIT_PORT: u16 = 0xF4;

/// The value the kernel's QEMU-mode CPL-0 exception stubs write to isa-debug-exit. It lies
/// outside the guest's exit codes (`0..=SHUTDOWN_CODE_MAX`), so a fault is told apart from a
/// shutdown: QEMU then exits with status `(0x7E << 1) | 1`.
pub const QEMU_FAULT_EXIT_VALUE: u32 = 0x7E;

/// Generates [`Call`] and everything derived from the call table, from one list.
///
/// Each entry is `Variant = NUMBER => "name", block ArgsType;` or, for a call whose `rdi`
/// carries a value instead of a block, `Variant = NUMBER => "name", no block;`, preceded by the
/// variant's doc comment. From it come the enum (with those docs, plus a generated line naming
/// the block), [`Call::ALL`], [`Call::from_number`], [`Call::number`], [`Call::name`],
/// [`Call::block_name`], [`Call::block_size`], and the [`ArgBlock`] impl of each block type
/// (which ties the type to its call: [`ArgBlock::CALL`]). A number, name or block type
/// therefore appears exactly once in this crate, in the `calls!` invocation below; the
/// compiler refuses a duplicate number (two equal discriminants) and a test refuses a
/// duplicate name.
macro_rules! calls {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $number:literal => $name:literal, $($block:ident)+;
    )*) => {
        /// Hypercall numbers (the value in `eax` at the `out`).
        ///
        /// Unknown numbers are answered with [`Status::UNSUPPORTED`]. Deliberately exhaustive: a new
        /// call must be handled by every `match` in the shim before it compiles.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum Call {
            $(
                $(#[doc = $doc])*
                #[doc = ""]
                #[doc = call_block_doc!($($block)+)]
                $variant = $number,
            )*
        }

        impl Call {
            /// Every call this ABI revision defines, in number order.
            pub const ALL: &'static [Call] = &[$(Call::$variant),*];

            /// The call with number `n`, if this ABI revision defines one.
            pub const fn from_number(n: u32) -> Option<Call> {
                match n {
                    $($number => Some(Call::$variant),)*
                    _ => None,
                }
            }

            /// The call's number.
            pub const fn number(self) -> u32 {
                self as u32
            }

            /// A short lower-case name (used in logs and summaries).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Call::$variant => $name,)*
                }
            }

            /// The name of the call's argument-block type (`"HelloArgs"`), or `None` for a call
            /// that takes no block (its `rdi` carries a value).
            pub const fn block_name(self) -> Option<&'static str> {
                match self {
                    $(Call::$variant => call_block_name!($($block)+),)*
                }
            }

            /// The size in bytes of the call's argument block, or `None` for a call that takes
            /// no block. The host copies exactly this many bytes from `rdi`.
            pub const fn block_size(self) -> Option<usize> {
                match self {
                    $(Call::$variant => call_block_size!($($block)+),)*
                }
            }
        }

        $(call_arg_block!($variant, $($block)+);)*
    };
}

/// The generated doc line naming a variant's block (see `calls!`).
macro_rules! call_block_doc {
    (block $ty:ident) => {
        concat!("Block: [`", stringify!($ty), "`].")
    };
    (no block) => {
        "Takes no argument block."
    };
}

/// [`Call::block_name`] of one entry (see `calls!`).
macro_rules! call_block_name {
    (block $ty:ident) => {
        Some(stringify!($ty))
    };
    (no block) => {
        None
    };
}

/// [`Call::block_size`] of one entry (see `calls!`).
macro_rules! call_block_size {
    (block $ty:ident) => {
        Some(core::mem::size_of::<$ty>())
    };
    (no block) => {
        None
    };
}

/// The [`ArgBlock`] impl of one entry's block type (see `calls!`).
macro_rules! call_arg_block {
    ($variant:ident, block $ty:ident) => {
        impl ArgBlock for $ty {
            #[doc = concat!("[`Call::", stringify!($variant), "`].")]
            const CALL: Call = Call::$variant;
            fn header(&self) -> &Header {
                &self.header
            }
            fn header_mut(&mut self) -> &mut Header {
                &mut self.header
            }
        }
    };
    ($variant:ident, no block) => {};
}

// The call table: the only place a call's number, name and argument block are written down.
calls! {
    /// Negotiate the ABI version and features; learn the VM's limits.
    Hello = 1 => "hello", block HelloArgs;
    /// Write bytes to the VM's console.
    ConsoleWrite = 2 => "console_write", block ConsoleWriteArgs;
    /// Stop the VM with an exit code.
    Shutdown = 3 => "shutdown", block ShutdownArgs;
    /// Do nothing but answer (measures the cost of a call).
    Ping = 4 => "ping", block PingArgs;
    /// Bring one more vCPU online at an entry point.
    VcpuUp = 5 => "vcpu_up", block VcpuUpArgs;
    /// Take the calling vCPU offline. `rdi` is ignored and guest memory is not touched (the
    /// caller's stack may be reused the moment the call is made).
    VcpuDown = 6 => "vcpu_down", no block;
    /// Sleep until kicked, a host notice, or a timeout.
    Block = 7 => "block", block BlockArgs;
    /// Wake a blocked vCPU (or force a running one out of the hypervisor's run loop).
    Kick = 8 => "kick", block KickArgs;
    /// Fetch and acknowledge pending host notices.
    Events = 9 => "events", block EventsArgs;
    /// Report the guest's load figures (recorded in the host's timeline).
    Report = 10 => "report", block ReportArgs;
    /// Ask for memory: one or more extents in the hot-plug window.
    MemGrant = 11 => "mem_grant", block MemGrantArgs;
    /// Give granted extents back.
    MemRelease = 12 => "mem_release", block MemReleaseArgs;
    /// Notify a paravirtual virtio device (a queue has buffers, or the device page changed).
    /// `rdi` is [`virtio::notify_value`]`(device, queue)`; the status is in `rax`.
    DeviceNotify = 13 => "device_notify", no block;
}

/// A hypercall status code as stored in the `status` field of every argument block.
///
/// It is a plain integer on the wire; this newtype only gives the known values names. A host
/// never writes [`Status::PENDING`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Status(pub i32);

impl Status {
    /// The call succeeded (possibly partially, where the call says so).
    pub const OK: Status = Status(0);
    /// An argument was malformed: an address outside guest RAM, a length too large, a value
    /// out of range. Nothing was changed.
    pub const INVALID: Status = Status(-1);
    /// The VM's policy does not allow this (for example a request above burst).
    pub const DENIED: Status = Status(-2);
    /// The host pool has no room right now.
    pub const EXHAUSTED: Status = Status(-3);
    /// Try again later; the request could not be completed now but may be later.
    pub const AGAIN: Status = Status(-4);
    /// Unknown call number, or a call this host does not provide.
    pub const UNSUPPORTED: Status = Status(-5);
    /// Guest-side sentinel: preset before the call; still present afterwards means no host
    /// answered.
    pub const PENDING: Status = Status(i32::MIN);

    /// `true` for [`Status::OK`].
    pub const fn is_ok(self) -> bool {
        self.0 == 0
    }

    /// A short upper-case name for known codes, `"UNKNOWN"` otherwise.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "OK",
            -1 => "INVALID",
            -2 => "DENIED",
            -3 => "EXHAUSTED",
            -4 => "AGAIN",
            -5 => "UNSUPPORTED",
            i32::MIN => "PENDING",
            _ => "UNKNOWN",
        }
    }
}

/// Feature bits negotiated by [`Call::Hello`]. The negotiated set is the intersection of what
/// the guest asks for and what the host offers. Bits are allocated from bit 0 upwards as
/// features are added within v1.
pub mod features {
    /// The paravirtual virtio transport ([`crate::virtio`]): boot info describes device pages
    /// and [`Call::DeviceNotify`](crate::Call::DeviceNotify) is served.
    pub const VIRTIO_TRANSPORT: u64 = 1 << 0;
    /// BLOCK serves a DEVICE_NOTIFY before it sleeps
    /// ([`block_flags::NOTIFY`](crate::block_flags::NOTIFY)): one exit instead of two when a
    /// guest queued packets and then goes idle. Offered with [`VIRTIO_TRANSPORT`].
    pub const BLOCK_NOTIFY: u64 = 1 << 1;
    /// The steal-time page ([`crate::steal`]) is kept for every vCPU.
    pub const STEAL_TIME: u64 = 1 << 2;
    /// Every feature this revision defines.
    pub const ALL: u64 = VIRTIO_TRANSPORT | BLOCK_NOTIFY | STEAL_TIME;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_numbers_round_trip() {
        for &c in Call::ALL {
            assert_eq!(Call::from_number(c.number()), Some(c));
        }
        assert_eq!(Call::from_number(0), None);
        assert_eq!(Call::from_number(u32::MAX), None);
    }

    #[test]
    fn call_names_are_distinct_lower_case_words() {
        for (i, a) in Call::ALL.iter().enumerate() {
            assert!(a.name().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{}", a.name());
            for b in &Call::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn status_codes_are_pinned() {
        assert_eq!(Status::OK.0, 0);
        assert_eq!(Status::INVALID.0, -1);
        assert_eq!(Status::DENIED.0, -2);
        assert_eq!(Status::EXHAUSTED.0, -3);
        assert_eq!(Status::AGAIN.0, -4);
        assert_eq!(Status::UNSUPPORTED.0, -5);
        assert_eq!(Status::PENDING.0, i32::MIN);
        assert_eq!(Status(-77).name(), "UNKNOWN");
        assert!(Status::OK.is_ok() && !Status::DENIED.is_ok());
    }

    #[test]
    fn ports_do_not_collide() {
        let ports = [HYPERCALL_PORT, NOP_PORT, u16::from(FAULT_PORT), QEMU_DEBUG_EXIT_PORT];
        for (i, a) in ports.iter().enumerate() {
            for b in &ports[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
