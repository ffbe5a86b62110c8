//! The paravirtual virtio transport: virtio devices without an emulated register file.
//!
//! Each device is one page of guest memory (a [`VirtioDeviceRegs`]) that the shim places
//! after the kernel image and describes in [`BootInfo`](crate::BootInfo) (`devices`,
//! `device_count`). The page holds what a virtio-mmio register file would: device id and
//! features (written by the host), driver features, status and queue addresses (written by
//! the guest), and the device's configuration space. Notification is a hypercall,
//! [`Call::DeviceNotify`](crate::Call::DeviceNotify): no argument block; `rdi` carries
//! [`notify_value`]`(device, queue)`.
//!
//! Protocol (the order a virtio driver follows):
//!
//! 1. The guest writes `status`, then notifies [`STATUS_CHANGED`]. The host reads the page
//!    once per notify, at that moment: status 0 resets the device (every queue and connection
//!    is dropped); `FEATURES_OK` makes the host check `driver_features` ⊆ `device_features`;
//!    `DRIVER_OK` activates the queues whose `ready` is 1, after checking every address and
//!    size (inside guest RAM, aligned, size a power of two ≤ `queue_max_size`).
//!    A refused step answers `INVALID` and sets `DEVICE_NEEDS_RESET` in `status`.
//! 2. The guest notifies queue `q` after adding buffers, unless the host suppressed it
//!    (`VRING_USED_F_NO_NOTIFY` in the used ring while the host is polling that queue).
//! 3. The host never interrupts: it writes used buffers and, when a vCPU is blocked, wakes it
//!    ([`wake::DEVICE`](crate::wake::DEVICE)); a running guest polls its queues at task
//!    boundaries.
//!
//! Split virtqueues, `VIRTIO_F_VERSION_1` semantics, little-endian. Device 0 is a
//! virtio-vsock device (virtio device type 19); its configuration space is the 64-bit
//! `guest_cid`.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `VirtioDeviceRegs::magic`: ASCII "VDEV" read as a little-endian `u32`.
pub const VIRTIO_DEVICE_MAGIC: u32 = u32::from_le_bytes(*b"VDEV");

/// `VirtioDeviceRegs::version` of this revision.
pub const VIRTIO_TRANSPORT_VERSION: u32 = 1;

/// Bytes of guest memory per device (one page).
pub const VIRTIO_DEVICE_PAGE: u64 = 4096;

/// Queues per device (at most).
pub const VIRTIO_QUEUES_MAX: usize = 4;

/// Bytes of device configuration space.
pub const VIRTIO_CONFIG_SIZE: usize = 64;

/// The `queue` value of a notify that means "status (and features, queue addresses) changed:
/// read the page".
pub const STATUS_CHANGED: u16 = 0xFFFF;

/// Virtio device type of a vsock device.
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// The value a guest puts in `rdi` for [`Call::DeviceNotify`](crate::Call::DeviceNotify).
pub const fn notify_value(device: u16, queue: u16) -> u64 {
    ((device as u64) << 16) | queue as u64
}

/// Splits a [`notify_value`] into `(device, queue)`; `None` when bits above 32 are set.
pub const fn split_notify_value(v: u64) -> Option<(u16, u16)> {
    if v >> 32 != 0 {
        return None;
    }
    Some(((v >> 16) as u16, v as u16))
}

/// Device status bits (the virtio spec's).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: queues are live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device refused something and must be reset (set by the host).
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Feature bits the host may offer.
pub mod feature {
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u64 = 1 << 32;
    /// `VIRTIO_F_RING_INDIRECT_DESC`.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `VIRTIO_F_RING_EVENT_IDX` (not offered: see docs/abi.md).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// One queue's registers (guest-written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct VirtioQueueRegs {
    /// Queue size (entries; a power of two ≤ `queue_max_size`).
    pub size: u32,
    /// 1 when the guest set the queue up.
    pub ready: u32,
    /// Guest-physical address of the descriptor table (16-byte aligned).
    pub desc: u64,
    /// Guest-physical address of the driver (available) ring (2-byte aligned).
    pub driver: u64,
    /// Guest-physical address of the device (used) ring (4-byte aligned).
    pub device: u64,
}

const _: () = assert!(size_of::<VirtioQueueRegs>() == 32);

/// One device's page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct VirtioDeviceRegs {
    /// [`VIRTIO_DEVICE_MAGIC`] (host).
    pub magic: u32,
    /// [`VIRTIO_TRANSPORT_VERSION`] (host).
    pub version: u32,
    /// Virtio device type, e.g. [`VIRTIO_ID_VSOCK`] (host).
    pub device_id: u32,
    /// Queues this device has (host).
    pub num_queues: u32,
    /// Features the device offers (host).
    pub device_features: u64,
    /// Features the driver accepted (guest).
    pub driver_features: u64,
    /// Device status ([`status`]; guest, plus `DEVICE_NEEDS_RESET` from the host).
    pub status: u32,
    /// Changes whenever the host changes `config` (host).
    pub config_generation: u32,
    /// Largest queue size the device accepts (host).
    pub queue_max_size: u32,
    /// *reserved*.
    pub reserved0: u32,
    /// Queue registers (guest).
    pub queues: [VirtioQueueRegs; VIRTIO_QUEUES_MAX],
    /// Device configuration space (host).
    pub config: [u8; VIRTIO_CONFIG_SIZE],
    /// *reserved*.
    pub reserved: [u64; 2],
}

const _: () = assert!(size_of::<VirtioDeviceRegs>() == 256);
const _: () = assert!(offset_of!(VirtioDeviceRegs, device_id) == 8);
const _: () = assert!(offset_of!(VirtioDeviceRegs, device_features) == 16);
const _: () = assert!(offset_of!(VirtioDeviceRegs, driver_features) == 24);
const _: () = assert!(offset_of!(VirtioDeviceRegs, status) == 32);
const _: () = assert!(offset_of!(VirtioDeviceRegs, config_generation) == 36);
const _: () = assert!(offset_of!(VirtioDeviceRegs, queue_max_size) == 40);
const _: () = assert!(offset_of!(VirtioDeviceRegs, queues) == 48);
const _: () = assert!(offset_of!(VirtioDeviceRegs, config) == 176);
const _: () = assert!(size_of::<VirtioDeviceRegs>() as u64 <= VIRTIO_DEVICE_PAGE);

/// Vsock specifics of this transport.
pub mod vsock {
    /// The guest's context id (the host is 2).
    pub const GUEST_CID: u64 = 3;
    /// The host's context id.
    pub const HOST_CID: u64 = 2;
    /// Bytes of receive buffer the host advertises per connection (`buf_alloc`): the most a
    /// guest may have in flight towards the host on one connection. A guest splits larger
    /// writes.
    pub const HOST_BUF_ALLOC: u32 = 128 * 1024;
    /// Largest payload of one packet the host accepts from the guest.
    pub const MAX_PACKET_DATA: u32 = 64 * 1024;
    /// Queue indices.
    pub const RX_QUEUE: u16 = 0;
    /// Transmit queue.
    pub const TX_QUEUE: u16 = 1;
    /// Event queue (never used: this transport sends no transport events).
    pub const EVENT_QUEUE: u16 = 2;

    /// Packet types, operations and SHUTDOWN flags (virtio spec 5.10.6), for both ends.
    pub mod op {
        /// Stream sockets (the only type).
        pub const TYPE_STREAM: u16 = 1;
        /// Connection request.
        pub const REQUEST: u16 = 1;
        /// Connection accepted.
        pub const RESPONSE: u16 = 2;
        /// Reset.
        pub const RST: u16 = 3;
        /// Shutdown (the flags say which directions).
        pub const SHUTDOWN: u16 = 4;
        /// Data.
        pub const RW: u16 = 5;
        /// Here is my credit.
        pub const CREDIT_UPDATE: u16 = 6;
        /// Tell me your credit.
        pub const CREDIT_REQUEST: u16 = 7;
        /// SHUTDOWN flag: the sender will receive no more.
        pub const SHUTDOWN_RECEIVE: u32 = 1;
        /// SHUTDOWN flag: the sender will send no more.
        pub const SHUTDOWN_SEND: u32 = 2;
        /// SHUTDOWN flags: both directions.
        pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RECEIVE | SHUTDOWN_SEND;
        /// RST flag (this ABI's own; virtio leaves RST's flags 0): the guest answers a REQUEST
        /// for a port it does not listen on while it listens on another, so its service is up
        /// and the port is unused. The host refuses the client at once instead of asking again
        /// (a plain RST, during boot or with a full backlog, is retried for a while).
        pub const RST_NO_LISTENER: u32 = 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_values_round_trip() {
        assert_eq!(split_notify_value(notify_value(0, 1)), Some((0, 1)));
        assert_eq!(split_notify_value(notify_value(3, STATUS_CHANGED)), Some((3, STATUS_CHANGED)));
        assert_eq!(split_notify_value(1 << 40), None);
    }
}
