//! The request channel: stream sockets over virtio-vsock, for services that clients on the
//! host reach through the shim's published ports (`--publish HOST_PORT:GUEST_PORT`).
//!
//! ```text
//! let listener = net::listen(6379)?;
//! loop {
//!     let stream = listener.accept().await?;
//!     task::spawn(async move { /* stream.read(..).await, stream.write_all(..).await */ });
//! }
//! ```
//!
//! Underneath, one `virtio-drivers` `VsockConnectionManager` (over the paravirtual transport
//! of [`crate::virtio`]) is shared by every vCPU behind a lock. It is polled at every task
//! boundary and whenever a vCPU wakes from BLOCK (the host wakes a blocked vCPU when it has
//! queued packets), so there are no interrupts and, while the guest is busy, no exits for
//! incoming data. Reads and writes are futures: a reader waits for data, a writer waits for the
//! host's credit (backpressure: the host buffers at most
//! [`HOST_BUF_ALLOC`](hypercall_abi::virtio::vsock::HOST_BUF_ALLOC) bytes per connection).
//! Each connection's task becomes runnable when its data arrives, which is what the elastic
//! vCPU controller sees as load.

use alloc::collections::{BTreeMap, VecDeque};
use core::future::poll_fn;
use core::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use core::task::{Poll, Waker};

use hypercall_abi::virtio::VIRTIO_ID_VSOCK;
use hypercall_abi::virtio::vsock::{HOST_BUF_ALLOC, HOST_CID, RX_QUEUE};
use spin::Mutex;
use virtio_drivers::Error as DriverError;
use virtio_drivers::device::socket::{
    DisconnectReason, SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEvent, VsockEventType,
};

use crate::virtio::{IdentityHal, PageTransport, Unavailable};

/// Size of each receive buffer the driver posts (header included): up to 4052 payload bytes
/// per packet.
const RX_BUFFER_SIZE: usize = 4096;

/// Receive buffer per connection (what the guest advertises to the host as `buf_alloc`).
pub const CONNECTION_BUFFER: u32 = 16 * 1024;

/// Largest write sent as one packet (a quarter of the host's buffer, so a few are in flight).
const SEND_CHUNK: usize = (HOST_BUF_ALLOC / 4) as usize;

/// Connections accepted by the driver but not yet taken by `accept`, per listener; beyond it
/// new connections are reset.
pub const BACKLOG: usize = 4096;

type Manager = VsockConnectionManager<IdentityHal, PageTransport, RX_BUFFER_SIZE>;

/// Network failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetError {
    /// The request channel is not available on this platform (no shim, or a shim without the
    /// virtio transport; under QEMU there is no vsock backend).
    Unavailable,
    /// The device could not be set up (the host refused it).
    DeviceFailed,
    /// The port is already listened on.
    PortInUse,
    /// The peer reset the connection, or it is closed.
    ConnectionReset,
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            NetError::Unavailable => {
                "the request channel (virtio-vsock) is unavailable here: it needs hypervisor-shim (under QEMU there is no vsock backend)"
            }
            NetError::DeviceFailed => "the vsock device could not be set up (the host refused it)",
            NetError::PortInUse => "the port is already listened on",
            NetError::ConnectionReset => "connection reset",
        })
    }
}

/// A connection's key: the host-side port (the client's) and the local port it came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    peer_port: u32,
    local_port: u32,
}

impl Key {
    fn peer(self) -> VsockAddr {
        VsockAddr { cid: HOST_CID, port: self.peer_port }
    }
}

#[derive(Debug, Default)]
struct Conn {
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// The peer shut down or reset: no more data will arrive.
    peer_closed: bool,
    /// Bytes read since the guest last told the host (credit update).
    unacked: u32,
}

#[derive(Debug, Default)]
struct ListenerState {
    backlog: VecDeque<Key>,
    waker: Option<Waker>,
}

struct Net {
    mgr: Manager,
    conns: BTreeMap<Key, Conn>,
    listeners: BTreeMap<u32, ListenerState>,
}

impl core::fmt::Debug for Net {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Net").field("connections", &self.conns.len()).field("listeners", &self.listeners.len()).finish()
    }
}

const UNINIT: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
static NET: Mutex<Option<Net>> = Mutex::new(None);
/// The RX used index up to which the driver has been polled.
static RX_SEEN: AtomicU16 = AtomicU16::new(0);
/// Address of the RX used ring's `idx` (0 before the device is set up).
static RX_USED_IDX: AtomicU64 = AtomicU64::new(0);

/// The device's RX used index now (no exit: the ring is in guest memory).
fn rx_used_now() -> Option<u16> {
    let addr = RX_USED_IDX.load(Ordering::Acquire);
    // SAFETY: `addr` is the `idx` field of the RX used ring the driver allocated (identity
    // mapped, never freed while the device lives); the host writes it, hence volatile.
    (addr != 0).then(|| unsafe { (addr as *const u16).read_volatile() })
}

/// Connection counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Connections open now.
    pub open: usize,
    /// Listening ports.
    pub listeners: usize,
}

/// Current connection counters (zeros before the channel is used).
pub fn stats() -> NetStats {
    match NET.lock().as_ref() {
        Some(n) => NetStats { open: n.conns.len(), listeners: n.listeners.len() },
        None => NetStats::default(),
    }
}

/// Whether the request channel can be used here (without setting it up).
pub fn available() -> bool {
    crate::virtio::find(VIRTIO_ID_VSOCK).is_ok()
}

fn ensure_ready() -> Result<(), NetError> {
    match STATE.load(Ordering::Acquire) {
        READY => return Ok(()),
        FAILED => return Err(NetError::DeviceFailed),
        _ => {}
    }
    let mut guard = NET.lock();
    if guard.is_some() {
        return Ok(());
    }
    let transport = crate::virtio::find(VIRTIO_ID_VSOCK).map_err(|e| match e {
        Unavailable::NoTransport | Unavailable::NoDevice => NetError::Unavailable,
        Unavailable::BadPage => NetError::DeviceFailed,
    })?;
    let socket = match VirtIOSocket::<IdentityHal, PageTransport, RX_BUFFER_SIZE>::new(transport) {
        Ok(s) => s,
        Err(e) => {
            log::error!("vsock: device setup failed: {e}");
            STATE.store(FAILED, Ordering::Release);
            return Err(NetError::DeviceFailed);
        }
    };
    let mgr = VsockConnectionManager::new_with_capacity(socket, CONNECTION_BUFFER);
    let page = crate::virtio::find(VIRTIO_ID_VSOCK).ok();
    let used = page.as_ref().and_then(|t| t.used_ring(RX_QUEUE)).unwrap_or(0);
    if used == 0 || page.is_none_or(|t| t.refused()) {
        log::error!("vsock: the host refused the device setup");
        STATE.store(FAILED, Ordering::Release);
        return Err(NetError::DeviceFailed);
    }
    RX_USED_IDX.store(used + 2, Ordering::Release);
    *guard = Some(Net { mgr, conns: BTreeMap::new(), listeners: BTreeMap::new() });
    STATE.store(READY, Ordering::Release);
    log::debug!("vsock: device ready (guest cid {})", hypercall_abi::virtio::vsock::GUEST_CID);
    Ok(())
}

/// Starts listening on vsock `port`; connections the host forwards to it queue up for
/// [`Listener::accept`].
pub fn listen(port: u32) -> Result<Listener, NetError> {
    ensure_ready()?;
    let mut guard = NET.lock();
    let net = guard.as_mut().ok_or(NetError::DeviceFailed)?;
    if net.listeners.contains_key(&port) {
        return Err(NetError::PortInUse);
    }
    net.listeners.insert(port, ListenerState::default());
    net.mgr.listen(port);
    Ok(Listener { port })
}

/// Handles whatever the device delivered. Called by the executor at task boundaries and after
/// every wake-up; cheap when nothing arrived (one read of the used ring's index, no exit).
pub(crate) fn poll() {
    if STATE.load(Ordering::Acquire) != READY || rx_used_now() == Some(RX_SEEN.load(Ordering::Acquire)) {
        return;
    }
    // Another vCPU is polling or sending: it will see what arrived.
    let Some(mut guard) = NET.try_lock() else { return };
    let Some(net) = guard.as_mut() else { return };
    net.drain();
}

impl Net {
    /// Polls the driver once per used RX buffer since the last drain.
    fn drain(&mut self) {
        let Some(now) = rx_used_now() else { return };
        let seen = RX_SEEN.load(Ordering::Acquire);
        let pending = now.wrapping_sub(seen);
        if pending == 0 {
            return;
        }
        for _ in 0..pending {
            match self.mgr.poll() {
                Ok(Some(event)) => self.dispatch(event),
                Ok(None) => {}
                Err(e) => log::debug!("vsock: dropped a packet: {e}"),
            }
        }
        RX_SEEN.store(now, Ordering::Release);
    }

    fn dispatch(&mut self, event: VsockEvent) {
        let key = Key { peer_port: event.source.port, local_port: event.destination.port };
        match event.event_type {
            VsockEventType::ConnectionRequest => {
                let Some(l) = self.listeners.get_mut(&key.local_port) else {
                    let _ = self.mgr.force_close(key.peer(), key.local_port);
                    return;
                };
                if l.backlog.len() >= BACKLOG {
                    let _ = self.mgr.force_close(key.peer(), key.local_port);
                    return;
                }
                l.backlog.push_back(key);
                if let Some(w) = l.waker.take() {
                    w.wake();
                }
                self.conns.insert(key, Conn::default());
            }
            VsockEventType::Received { .. } => {
                if let Some(c) = self.conns.get_mut(&key)
                    && let Some(w) = c.read_waker.take()
                {
                    w.wake();
                }
            }
            VsockEventType::Disconnected { reason } => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.peer_closed = true;
                    if reason == DisconnectReason::Reset {
                        log::trace!("vsock: {key:?} reset by the host");
                    }
                    if let Some(w) = c.read_waker.take() {
                        w.wake();
                    }
                    if let Some(w) = c.write_waker.take() {
                        w.wake();
                    }
                }
            }
            VsockEventType::CreditUpdate => {
                if let Some(c) = self.conns.get_mut(&key)
                    && let Some(w) = c.write_waker.take()
                {
                    w.wake();
                }
            }
            VsockEventType::Connected | VsockEventType::CreditRequest => {}
        }
    }
}

/// A listening port.
#[derive(Debug)]
pub struct Listener {
    port: u32,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut guard = NET.lock();
        let Some(net) = guard.as_mut() else { return };
        net.mgr.unlisten(self.port);
        if let Some(l) = net.listeners.remove(&self.port) {
            for key in l.backlog {
                net.conns.remove(&key);
                let _ = net.mgr.force_close(key.peer(), key.local_port);
            }
        }
    }
}

impl Listener {
    /// The port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> Result<Stream, NetError> {
        poll_fn(|cx| {
            let mut guard = NET.lock();
            let Some(net) = guard.as_mut() else { return Poll::Ready(Err(NetError::DeviceFailed)) };
            net.drain();
            let Some(l) = net.listeners.get_mut(&self.port) else { return Poll::Ready(Err(NetError::DeviceFailed)) };
            match l.backlog.pop_front() {
                Some(key) => Poll::Ready(Ok(Stream { key, closed: false })),
                None => {
                    l.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

/// One connection from a client on the host.
#[derive(Debug)]
pub struct Stream {
    key: Key,
    closed: bool,
}

impl Stream {
    /// The client's port on the host side of the channel (unique among open connections).
    pub fn peer_port(&self) -> u32 {
        self.key.peer_port
    }

    /// Reads up to `buf.len()` bytes; waits until at least one arrives. `Ok(0)` means the
    /// client closed the connection.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, NetError> {
        let key = self.key;
        poll_fn(|cx| {
            let mut guard = NET.lock();
            let Some(net) = guard.as_mut() else { return Poll::Ready(Err(NetError::DeviceFailed)) };
            net.drain();
            match net.mgr.recv(key.peer(), key.local_port, buf) {
                Ok(0) => {
                    let closed = net.conns.get(&key).is_none_or(|c| c.peer_closed);
                    if closed || buf.is_empty() {
                        return Poll::Ready(Ok(0));
                    }
                    if let Some(c) = net.conns.get_mut(&key) {
                        c.read_waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                Ok(n) => {
                    // Tell the host about the room made (the driver does not by itself), once
                    // half the buffer is free again or it ran empty.
                    let left = net.mgr.recv_buffer_available_bytes(key.peer(), key.local_port).unwrap_or(0);
                    if let Some(c) = net.conns.get_mut(&key) {
                        c.unacked = c.unacked.saturating_add(n as u32);
                        if c.unacked >= CONNECTION_BUFFER / 2 || left == 0 {
                            c.unacked = 0;
                            let _ = net.mgr.update_credit(key.peer(), key.local_port);
                        }
                    }
                    Poll::Ready(Ok(n))
                }
                // The driver removed the connection (reset, or shut down and drained).
                Err(_) => Poll::Ready(Ok(0)),
            }
        })
        .await
    }

    /// Writes all of `buf`, waiting for the host's credit when its buffer for this connection
    /// is full.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> Result<(), NetError> {
        let key = self.key;
        while !buf.is_empty() {
            let chunk = buf.len().min(SEND_CHUNK);
            poll_fn(|cx| {
                let mut guard = NET.lock();
                let Some(net) = guard.as_mut() else { return Poll::Ready(Err(NetError::DeviceFailed)) };
                net.drain();
                if net.conns.get(&key).is_none_or(|c| c.peer_closed) {
                    return Poll::Ready(Err(NetError::ConnectionReset));
                }
                match net.mgr.send(key.peer(), key.local_port, &buf[..chunk]) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(DriverError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => {
                        if let Some(c) = net.conns.get_mut(&key) {
                            c.write_waker = Some(cx.waker().clone());
                        }
                        Poll::Pending
                    }
                    Err(_) => Poll::Ready(Err(NetError::ConnectionReset)),
                }
            })
            .await?;
            buf = &buf[chunk..];
        }
        Ok(())
    }

    /// Closes the connection (the host then closes the client's side once it has sent what
    /// the guest wrote).
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let key = self.key;
        let mut guard = NET.lock();
        let Some(net) = guard.as_mut() else { return };
        let peer_gone = net.conns.remove(&key).is_none_or(|c| c.peer_closed);
        if peer_gone {
            // Already removed by the driver, or to be reset now.
            let _ = net.mgr.force_close(key.peer(), key.local_port);
        } else if net.mgr.shutdown(key.peer(), key.local_port).is_err() {
            let _ = net.mgr.force_close(key.peer(), key.local_port);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shutdown();
    }
}
