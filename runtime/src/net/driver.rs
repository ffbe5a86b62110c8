//! The vsock device under the request channel: two virtqueues (`virtio-drivers`'
//! [`VirtQueue`]) over the paravirtual transport, and the packet header. Nothing here waits.
//!
//! * **Transmit**: [`Driver::post`] copies a header and payload into a pooled buffer, adds it to
//!   the TX queue and returns; the host takes it whenever its I/O thread runs. Buffers the
//!   host used come back at the next [`Driver::reap`]. When every descriptor is in flight,
//!   `post` says so (the caller keeps its bytes for later) and asks the host to wake the guest
//!   once it has used some.
//! * **Receive**: [`RX_SIZE`] buffers of [`RX_BUFFER`] bytes wait in the RX queue;
//!   [`Driver::receive`] hands out the next packet the host filled and [`Driver::recycle`]
//!   puts its buffer back.
//! * **Notifications**: a batch of posts or recycles costs at most one DEVICE_NOTIFY per queue
//!   ([`Driver::flush_notify`]), and none while the host polls (it sets the used ring's
//!   `NO_NOTIFY` flag). A notify may be deferred to the vCPU's next BLOCK (see the module
//!   above). A full fence separates publishing the available index from reading
//!   that flag, so a host that is just turning notifications back on cannot be missed.
//!
//! The caller serialises access (the driver sits behind a lock that is only ever tried, never
//! waited for: see the module above).

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{Ordering, fence};

pub(super) use hypercall_abi::virtio::vsock::op;
use hypercall_abi::virtio::vsock::{GUEST_CID, HOST_CID, RX_QUEUE, TX_QUEUE};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::virtio::{IdentityHal, PageTransport};

/// Receive buffers posted to the host.
pub(super) const RX_SIZE: usize = 64;
/// Transmit descriptors (one per packet in flight).
pub(super) const TX_SIZE: usize = 128;
/// Size of each receive buffer, header included (the host fills at most this much).
pub(super) const RX_BUFFER: usize = 4096;
/// Transmit buffers kept for reuse.
const TX_POOL: usize = 32;
/// Transmit buffers larger than this are not kept for reuse.
const TX_POOL_BUFFER: usize = 8 * 1024;

/// `VIRTIO_F_VERSION_1`: the only feature this driver takes.
const VERSION_1: u64 = 1 << 32;

/// The virtio-vsock packet header (little endian, as on x86_64).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(super) struct Header {
    pub(super) src_cid: u64,
    pub(super) dst_cid: u64,
    pub(super) src_port: u32,
    pub(super) dst_port: u32,
    pub(super) len: u32,
    pub(super) kind: u16,
    pub(super) op: u16,
    pub(super) flags: u32,
    pub(super) buf_alloc: u32,
    pub(super) fwd_cnt: u32,
}

/// Size of [`Header`] on the wire.
pub(super) const HEADER: usize = core::mem::size_of::<Header>();
const _: () = assert!(HEADER == 44);

impl Header {
    /// A stream packet from guest port `local` to host port `peer`.
    pub(super) fn to_host(local: u32, peer: u32, op: u16) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: local,
            dst_port: peer,
            kind: op::TYPE_STREAM,
            op,
            ..Header::default()
        }
    }

    /// Whether the host sent it to this guest on a stream socket.
    pub(super) fn is_for_us(&self) -> bool {
        let (src, dst, kind) = (self.src_cid, self.dst_cid, self.kind);
        src == HOST_CID && dst == GUEST_CID && kind == op::TYPE_STREAM
    }
}

/// Why the device cannot be driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SetupError {
    /// The host refused the features or the queues.
    Refused,
    /// A queue could not be made (no memory, or the host's queues are too small).
    Queue,
}

/// A packet the host put in a receive buffer; give it back with [`Driver::recycle`].
pub(super) struct Received {
    buffer: Box<[u8]>,
    len: usize,
}

impl Received {
    /// Its header (`None`: shorter than a header).
    pub(super) fn header(&self) -> Option<Header> {
        Header::read_from_prefix(&self.buffer[..self.len]).ok().map(|(h, _)| h)
    }

    /// Its payload: what follows the header, up to the header's `len` and what the host wrote.
    pub(super) fn payload(&self) -> &[u8] {
        let declared = self.header().map_or(0, |h| h.len as usize);
        let end = self.len.min(HEADER.saturating_add(declared));
        self.buffer.get(HEADER..end).unwrap_or(&[])
    }
}

/// The device: its transport, queues and buffers.
pub(super) struct Driver {
    transport: PageTransport,
    rx: VirtQueue<IdentityHal, RX_SIZE>,
    tx: VirtQueue<IdentityHal, TX_SIZE>,
    /// Receive buffers in the queue, by descriptor (token).
    rx_buffers: Vec<Option<Box<[u8]>>>,
    /// Transmit buffers in flight, by descriptor (token).
    tx_buffers: Vec<Option<Vec<u8>>>,
    tx_pool: Vec<Vec<u8>>,
    rx_added: bool,
    tx_added: bool,
    /// Waiting for the host to use transmit buffers (the queue was full).
    tx_waiting: bool,
    /// Counters.
    pub(super) stats: DriverStats,
}

/// What the driver did (for tests and the summary).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct DriverStats {
    /// Packets posted.
    pub(super) sent: u64,
    /// Packets received.
    pub(super) received: u64,
    /// DEVICE_NOTIFY calls for the queues.
    pub(super) notifies: u64,
    /// Times a post found the transmit queue full.
    pub(super) tx_full: u64,
}

// SAFETY: the transport's page and the queues' rings are shared with the host only; the
// driver is owned by one lock holder at a time (see the module doc).
unsafe impl Send for Driver {}

impl Driver {
    /// Negotiates the device, sets up both queues, posts the receive buffers and tells the
    /// device the driver is ready.
    pub(super) fn new(mut transport: PageTransport) -> Result<Driver, SetupError> {
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let features = transport.read_device_features() & VERSION_1;
        transport.write_driver_features(features);
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        if transport.refused() || !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(SetupError::Refused);
        }
        let rx = VirtQueue::new(&mut transport, RX_QUEUE, false, false).map_err(|_| SetupError::Queue)?;
        let tx = VirtQueue::new(&mut transport, TX_QUEUE, false, false).map_err(|_| SetupError::Queue)?;
        let mut d = Driver {
            transport,
            rx,
            tx,
            rx_buffers: (0..RX_SIZE).map(|_| None).collect(),
            tx_buffers: (0..TX_SIZE).map(|_| None).collect(),
            tx_pool: Vec::new(),
            rx_added: false,
            tx_added: false,
            tx_waiting: false,
            stats: DriverStats::default(),
        };
        // The host wakes the guest for received packets in any case; for used transmit
        // buffers only when the driver asks (a full queue).
        d.rx.set_dev_notify(false);
        d.tx.set_dev_notify(false);
        for _ in 0..RX_SIZE {
            d.add_rx(vec![0u8; RX_BUFFER].into_boxed_slice())?;
        }
        d.transport.set_status(
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK | DeviceStatus::DRIVER_OK,
        );
        if d.transport.refused() {
            return Err(SetupError::Refused);
        }
        d.flush_notify();
        Ok(d)
    }

    /// The transport (for the used rings' addresses).
    pub(super) fn transport(&self) -> &PageTransport {
        &self.transport
    }

    fn add_rx(&mut self, mut buffer: Box<[u8]>) -> Result<(), SetupError> {
        // SAFETY: the buffer is moved into `rx_buffers` right below and stays there (its heap
        // allocation does not move) until `receive` pops the same token with it.
        let token = unsafe { self.rx.add(&[], &mut [&mut buffer[..]]) }.map_err(|_| SetupError::Queue)?;
        match self.rx_buffers.get_mut(usize::from(token)) {
            Some(slot) => *slot = Some(buffer),
            None => return Err(SetupError::Queue),
        }
        self.rx_added = true;
        Ok(())
    }

    /// The next packet the host delivered, if any.
    pub(super) fn receive(&mut self) -> Option<Received> {
        let token = self.rx.peek_used()?;
        let mut buffer = self.rx_buffers.get_mut(usize::from(token))?.take()?;
        // SAFETY: `buffer` is the one added with this token (see `add_rx`).
        let len = unsafe { self.rx.pop_used(token, &[], &mut [&mut buffer[..]]) }.ok()?;
        self.stats.received += 1;
        Some(Received { len: (len as usize).min(buffer.len()), buffer })
    }

    /// Gives a received packet's buffer back to the host.
    pub(super) fn recycle(&mut self, packet: Received) {
        // The queue has room: this buffer's descriptor just came back.
        let _ = self.add_rx(packet.buffer);
    }

    /// Returns the transmit buffers the host has used to the pool; `true` if any came back.
    pub(super) fn reap(&mut self) -> bool {
        let mut any = false;
        while let Some(token) = self.tx.peek_used() {
            let Some(buffer) = self.tx_buffers.get_mut(usize::from(token)).and_then(Option::take) else { break };
            // SAFETY: `buffer` is the one added with this token (see `post`).
            if unsafe { self.tx.pop_used(token, &[&buffer[..]], &mut []) }.is_err() {
                break;
            }
            any = true;
            if self.tx_pool.len() < TX_POOL && buffer.capacity() <= TX_POOL_BUFFER {
                self.tx_pool.push(buffer);
            }
        }
        if any && self.tx_waiting {
            self.tx_waiting = false;
            self.tx.set_dev_notify(false);
        }
        any
    }

    /// Whether a post found the queue full and no buffer came back since.
    pub(super) fn tx_waiting(&self) -> bool {
        self.tx_waiting
    }

    /// Queues one packet: `header` (its `len` set here) followed by the concatenation of
    /// `parts`. Returns `false` when every transmit descriptor is in flight: the caller keeps
    /// the bytes and tries again after the host used some (it then wakes the guest).
    pub(super) fn post(&mut self, mut header: Header, parts: &[&[u8]]) -> bool {
        if self.tx.available_desc() == 0 {
            self.reap();
        }
        if self.tx.available_desc() == 0 {
            self.stats.tx_full += 1;
            if !self.tx_waiting {
                self.tx_waiting = true;
                self.tx.set_dev_notify(true);
                // Buffers used meanwhile would not wake anybody: look once more.
                fence(Ordering::SeqCst);
                if self.reap() {
                    return self.post(header, parts);
                }
            }
            return false;
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        header.len = len as u32;
        let mut buffer = self.tx_pool.pop().unwrap_or_default();
        buffer.clear();
        buffer.reserve(HEADER + len);
        buffer.extend_from_slice(header.as_bytes());
        for p in parts {
            buffer.extend_from_slice(p);
        }
        // SAFETY: the buffer is moved into `tx_buffers` right below (its heap allocation does
        // not move) and stays there until `reap` pops the same token with it.
        let token = match unsafe { self.tx.add(&[&buffer[..]], &mut []) } {
            Ok(t) => t,
            Err(_) => return false,
        };
        if let Some(slot) = self.tx_buffers.get_mut(usize::from(token)) {
            *slot = Some(buffer);
        }
        self.tx_added = true;
        self.stats.sent += 1;
        true
    }

    /// Tells the host about what was posted or recycled since the last call, one notify per
    /// queue at most, and none for a queue whose notifications the host turned off.
    pub(super) fn flush_notify(&mut self) {
        if !self.tx_added && !self.rx_added {
            return;
        }
        // The available indexes are published (release stores); the host's flag must be read
        // after them, not before (see the module doc).
        fence(Ordering::SeqCst);
        if core::mem::take(&mut self.tx_added) && self.tx.should_notify() {
            self.stats.notifies += 1;
            super::notify_or_defer(&mut self.transport, TX_QUEUE);
        }
        if core::mem::take(&mut self.rx_added) && self.rx.should_notify() {
            self.stats.notifies += 1;
            super::notify_or_defer(&mut self.transport, RX_QUEUE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(header: Header, payload: &[u8], written: usize) -> Received {
        let mut buffer = vec![0u8; RX_BUFFER].into_boxed_slice();
        buffer[..HEADER].copy_from_slice(header.as_bytes());
        buffer[HEADER..HEADER + payload.len()].copy_from_slice(payload);
        Received { buffer, len: written }
    }

    #[test]
    fn a_header_is_read_back_as_written() {
        let mut h = Header::to_host(6379, 1 << 30, op::RW);
        h.len = 5;
        h.buf_alloc = 65536;
        h.fwd_cnt = 7;
        let mut from_host = h;
        from_host.src_cid = HOST_CID;
        from_host.dst_cid = GUEST_CID;
        let p = packet(from_host, b"hello", HEADER + 5);
        let back = p.header().expect("a whole header");
        assert!(back.is_for_us());
        let (len, fwd, alloc) = (back.len, back.fwd_cnt, back.buf_alloc);
        assert_eq!((len, fwd, alloc), (5, 7, 65536));
        assert_eq!(p.payload(), b"hello");
        assert!(!h.is_for_us(), "a packet to the host is not for the guest");
    }

    #[test]
    fn the_payload_never_reaches_past_what_the_host_wrote_or_declared() {
        let mut h = Header { src_cid: HOST_CID, dst_cid: GUEST_CID, kind: op::TYPE_STREAM, ..Header::default() };
        h.len = 4000;
        assert_eq!(packet(h, b"abc", HEADER + 3).payload(), b"abc", "declared more than written");
        h.len = 2;
        assert_eq!(packet(h, b"abc", HEADER + 3).payload(), b"ab", "written more than declared");
        h.len = u32::MAX;
        assert_eq!(packet(h, b"", RX_BUFFER).payload().len(), RX_BUFFER - HEADER);
        assert!(packet(h, b"", 10).header().is_none(), "shorter than a header");
        assert_eq!(packet(h, b"", 10).payload(), b"");
    }
}
