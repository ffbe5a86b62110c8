//! The request channel: stream sockets over virtio-vsock, for services that clients on the
//! host reach through the shim's published ports (`--publish HOST_PORT:GUEST_PORT`).
//!
//! ```text
//! let server = net::serve(6379, |mut stream| async move {
//!     /* stream.read(..).await, stream.write_all(..).await */
//! })?;
//! println!("kv: listening on vsock port 6379");
//! server.await; // one task per connection, until the listener stops accepting
//! ```
//!
//! [`serve`] is the usual way in; [`listen`] and [`Listener::accept`] are what it is made of.
//!
//! # How it works
//!
//! One `virtio-drivers` `VsockConnectionManager` (over the paravirtual transport of
//! [`crate::virtio`]) drives the device. Tasks never touch it: they read from and write to
//! per-connection buffers, and a *pump* moves bytes between those buffers and the driver.
//! Only vCPU 0 pumps: at each of its task boundaries, after each of its wake-ups, and right
//! after one of its own tasks queued data, made room or closed a connection. A task on another
//! vCPU that needs the pump wakes vCPU 0 if it is idle and carries on with its own work. The
//! driver waits (spinning) for the host to take each packet it sends; with one pumping vCPU,
//! no second vCPU spins on the driver or its lock, which on a host with few cores would starve
//! the very thread it waits for.
//!
//! There are no interrupts: the host wakes a blocked vCPU when it queued packets, and a busy
//! guest notices them at its next task boundary by reading the used ring's index (no exit).
//! Backpressure: a writer waits while its connection has [`OUT_BUFFER`] bytes queued; the host
//! takes at most its advertised credit
//! ([`HOST_BUF_ALLOC`](hypercall_abi::virtio::vsock::HOST_BUF_ALLOC)) per connection. Each
//! connection's task becomes runnable when its data arrives, which is what the elastic vCPU
//! controller sees as load.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec;
use alloc::vec::Vec;
use core::future::{Future, poll_fn};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering};
use core::task::{Poll, Waker};

use hypercall_abi::virtio::VIRTIO_ID_VSOCK;
use hypercall_abi::virtio::vsock::{HOST_BUF_ALLOC, HOST_CID, RX_QUEUE};
use spin::Mutex;
use virtio_drivers::Error as DriverError;
use virtio_drivers::device::socket::{
    SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEvent, VsockEventType,
};

use crate::executor;
use crate::virtio::{IdentityHal, PageTransport, Unavailable};

/// Size of each receive buffer the driver posts (header included): up to 4052 payload bytes
/// per packet.
const RX_BUFFER_SIZE: usize = 4096;

/// The driver's receive buffer per connection (what the guest advertises to the host).
pub const CONNECTION_BUFFER: u32 = 16 * 1024;

/// Bytes received and not yet read by the service, per connection, beyond which the pump
/// leaves data with the driver (and so stops the host by credit).
pub const IN_BUFFER: usize = 64 * 1024;

/// Bytes a connection may have queued for sending before a writer waits.
pub const OUT_BUFFER: usize = 64 * 1024;

/// Largest packet the pump sends (a quarter of the host's buffer, so a few are in flight).
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
    inbound: VecDeque<u8>,
    outbound: VecDeque<u8>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// The peer shut down or reset: once `inbound` is drained, reads see EOF.
    peer_closed: bool,
    /// The peer disconnected; data may still wait in the driver.
    peer_disconnecting: bool,
    /// Sending failed for good: writes fail.
    reset: bool,
    /// The service closed it: shut down once `outbound` is sent.
    local_closed: bool,
    /// Bytes taken from the driver since the host was last told (credit update).
    unacked: u32,
}

#[derive(Debug, Default)]
struct ListenerState {
    backlog: VecDeque<Key>,
    waker: Option<Waker>,
}

/// Connections and listeners: what tasks and the pump share (short critical sections only).
#[derive(Debug, Default)]
struct Table {
    conns: BTreeMap<Key, Conn>,
    listeners: BTreeMap<u32, ListenerState>,
    /// Connections the pump should look at.
    dirty: BTreeSet<Key>,
}

const UNINIT: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
static DRIVER: Mutex<Option<Driver>> = Mutex::new(None);

/// The driver and the pump's bounce buffer (used only under the driver's lock).
struct Driver {
    mgr: Manager,
    scratch: Vec<u8>,
}
static TABLE: Mutex<Table> =
    Mutex::new(Table { conns: BTreeMap::new(), listeners: BTreeMap::new(), dirty: BTreeSet::new() });
/// Something for the pump besides received packets (queued data, a close, room made).
static PUMP_WANTED: AtomicBool = AtomicBool::new(false);
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
    let t = TABLE.lock();
    NetStats { open: t.conns.len(), listeners: t.listeners.len() }
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
    let mut guard = DRIVER.lock();
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
    *guard = Some(Driver { mgr, scratch: vec![0u8; SEND_CHUNK.max(RX_BUFFER_SIZE)] });
    STATE.store(READY, Ordering::Release);
    log::debug!("vsock: device ready (guest cid {})", hypercall_abi::virtio::vsock::GUEST_CID);
    Ok(())
}

/// Starts listening on vsock `port`; connections the host forwards to it queue up for
/// [`Listener::accept`].
pub fn listen(port: u32) -> Result<Listener, NetError> {
    ensure_ready()?;
    {
        let mut t = TABLE.lock();
        if t.listeners.contains_key(&port) {
            return Err(NetError::PortInUse);
        }
        t.listeners.insert(port, ListenerState::default());
    }
    // Setting up needs the driver itself (a plain lock: this is not a hot path).
    match DRIVER.lock().as_mut() {
        Some(d) => d.mgr.listen(port),
        None => return Err(NetError::DeviceFailed),
    }
    Ok(Listener { port })
}

/// Listens on vsock `port` and returns the server: a future that accepts the connections the
/// host forwards to the port and runs `handler(stream)` for each as its own task, until the
/// listener stops accepting (the request channel failed: the future's output says how).
///
/// Listening starts at once, and connections that arrive before the server is awaited wait in
/// the backlog, so a service can announce the port in between (see the module example).
/// `handler` is called on the server's task, once per connection in accept order; the future
/// it returns is spawned and left to run. What the handler does before its `async` block, such
/// as counting the connection, therefore happens at accept time. Dropping the server closes
/// the listener: connections still in its backlog are reset, accepted ones run on.
///
/// # Errors
///
/// Those of [`listen`]: the channel is unavailable here, the device could not be set up, or
/// the port is already listened on.
pub fn serve<H, F>(port: u32, mut handler: H) -> Result<impl Future<Output = NetError> + Send + 'static, NetError>
where
    H: FnMut(Stream) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = listen(port)?;
    Ok(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    executor::spawn(handler(stream));
                }
                Err(e) => return e,
            }
        }
    })
}

/// Runs the pump if there is anything for it and this is vCPU 0. Called by the worker loop at
/// every task boundary (so after every wake-up too); costs one read of the used ring's index
/// when nothing arrived.
pub(crate) fn poll() {
    if pending() {
        pump();
    }
}

/// Whether the pump has something to do (packets arrived, or a task asked for it) that this
/// vCPU would do: only vCPU 0 pumps.
pub(crate) fn pending() -> bool {
    crate::percpu::current().index() == 0
        && STATE.load(Ordering::Acquire) == READY
        && (PUMP_WANTED.load(Ordering::Acquire) || rx_used_now() != Some(RX_SEEN.load(Ordering::Acquire)))
}

/// Asks for a pump. On vCPU 0 it runs now (unless the driver is busy: the request then waits
/// for vCPU 0's next task boundary); on another vCPU it wakes vCPU 0 if that one is idle.
fn kick_pump() {
    PUMP_WANTED.store(true, Ordering::Release);
    pump();
}

/// Moves bytes between the driver and the connection buffers until there is nothing left to
/// do. Only vCPU 0 pumps: the driver waits (spinning) for the host to take every packet it
/// sends, and on a host with few cores a second vCPU spinning there, or on the driver's lock,
/// starves the very thread it waits for. Another vCPU that needs the pump wakes vCPU 0 if it
/// sleeps.
fn pump() {
    if crate::percpu::current().index() != 0 {
        crate::smp::kick_boot_vcpu_if_idle();
        return;
    }
    let Some(mut guard) = DRIVER.try_lock() else { return };
    let Some(driver) = guard.as_mut() else { return };
    let (mgr, scratch) = (&mut driver.mgr, &mut driver.scratch);
    let mut wake: Vec<Waker> = Vec::new();
    for _ in 0..64 {
        PUMP_WANTED.store(false, Ordering::Release);
        let received = receive(mgr, &mut wake);
        let keys: Vec<Key> = core::mem::take(&mut TABLE.lock().dirty).into_iter().collect();
        for key in &keys {
            service(mgr, *key, scratch, &mut wake);
        }
        // Wake outside every lock: waking may kick another vCPU (an exit).
        for w in wake.drain(..) {
            w.wake();
        }
        let more = PUMP_WANTED.load(Ordering::Acquire) || rx_used_now() != Some(RX_SEEN.load(Ordering::Acquire));
        if !received && keys.is_empty() && !more {
            break;
        }
        if !more {
            break;
        }
    }
}

/// Polls the driver once per used RX buffer since the last time; records what happened.
fn receive(mgr: &mut Manager, wake: &mut Vec<Waker>) -> bool {
    let Some(now) = rx_used_now() else { return false };
    let seen = RX_SEEN.load(Ordering::Acquire);
    let pending = now.wrapping_sub(seen);
    if pending == 0 {
        return false;
    }
    for _ in 0..pending {
        match mgr.poll() {
            Ok(Some(event)) => dispatch(mgr, event, wake),
            Ok(None) => {}
            Err(e) => log::debug!("vsock: dropped a packet: {e}"),
        }
    }
    RX_SEEN.store(now, Ordering::Release);
    true
}

fn dispatch(mgr: &mut Manager, event: VsockEvent, wake: &mut Vec<Waker>) {
    let key = Key { peer_port: event.source.port, local_port: event.destination.port };
    let mut t = TABLE.lock();
    match event.event_type {
        VsockEventType::ConnectionRequest => {
            let Some(l) = t.listeners.get_mut(&key.local_port) else {
                drop(t);
                let _ = mgr.force_close(key.peer(), key.local_port);
                return;
            };
            if l.backlog.len() >= BACKLOG {
                drop(t);
                let _ = mgr.force_close(key.peer(), key.local_port);
                return;
            }
            l.backlog.push_back(key);
            wake.extend(l.waker.take());
            t.conns.insert(key, Conn::default());
        }
        VsockEventType::Received { .. } | VsockEventType::CreditUpdate => {
            if t.conns.contains_key(&key) {
                t.dirty.insert(key);
            }
        }
        VsockEventType::Disconnected { .. } => {
            if let Some(c) = t.conns.get_mut(&key) {
                c.peer_disconnecting = true;
                t.dirty.insert(key);
            }
        }
        VsockEventType::Connected | VsockEventType::CreditRequest => {}
    }
}

/// Brings one connection up to date: received data into its buffer, queued data out, a
/// close through.
fn service(mgr: &mut Manager, key: Key, scratch: &mut [u8], wake: &mut Vec<Waker>) {
    // 1. Received data, as far as the service's buffer has room.
    loop {
        let room = {
            let t = TABLE.lock();
            let Some(c) = t.conns.get(&key) else { return };
            IN_BUFFER.saturating_sub(c.inbound.len()).min(scratch.len())
        };
        if room == 0 {
            break;
        }
        let (n, gone) = match mgr.recv(key.peer(), key.local_port, &mut scratch[..room]) {
            Ok(n) => (n, false),
            // The driver dropped the connection (reset, or shut down and drained).
            Err(_) => (0, true),
        };
        let mut t = TABLE.lock();
        let Some(c) = t.conns.get_mut(&key) else { return };
        if n > 0 {
            c.inbound.extend(&scratch[..n]);
            c.unacked = c.unacked.saturating_add(n as u32);
            wake.extend(c.read_waker.take());
        }
        if gone || (n == 0 && c.peer_disconnecting) {
            c.peer_closed = true;
            wake.extend(c.read_waker.take());
            wake.extend(c.write_waker.take());
        }
        let ack = c.unacked >= CONNECTION_BUFFER / 2 && !c.peer_closed;
        if ack {
            c.unacked = 0;
        }
        drop(t);
        if ack {
            // The driver does not tell the host about room made; without this the host would
            // wait for credit (it asks, eventually, but that costs a round trip).
            let _ = mgr.update_credit(key.peer(), key.local_port);
        }
        if n < room || gone {
            break;
        }
    }
    // 2. Queued data, as far as the host's credit goes.
    loop {
        let n = {
            let t = TABLE.lock();
            let Some(c) = t.conns.get(&key) else { return };
            if c.reset || c.peer_closed || c.outbound.is_empty() {
                break;
            }
            let n = c.outbound.len().min(scratch.len());
            let (a, b) = c.outbound.as_slices();
            let first = a.len().min(n);
            scratch[..first].copy_from_slice(&a[..first]);
            scratch[first..n].copy_from_slice(&b[..n - first]);
            n
        };
        let sent = mgr.send(key.peer(), key.local_port, &scratch[..n]);
        let mut t = TABLE.lock();
        let Some(c) = t.conns.get_mut(&key) else { return };
        match sent {
            Ok(()) => {
                c.outbound.drain(..n);
                if c.outbound.is_empty() && c.outbound.capacity() > 4 * RX_BUFFER_SIZE {
                    c.outbound = VecDeque::new();
                }
                wake.extend(c.write_waker.take());
            }
            // Wait for the host's credit update (the driver asked for one).
            Err(DriverError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => break,
            Err(_) => {
                c.reset = true;
                c.outbound.clear();
                wake.extend(c.write_waker.take());
                break;
            }
        }
    }
    // 3. A close, once everything queued went out (or cannot).
    let close = {
        let t = TABLE.lock();
        t.conns.get(&key).and_then(|c| {
            (c.local_closed && (c.outbound.is_empty() || c.reset || c.peer_closed)).then_some(c.peer_closed || c.reset)
        })
    };
    if let Some(abort) = close {
        TABLE.lock().conns.remove(&key);
        if abort || mgr.shutdown(key.peer(), key.local_port).is_err() {
            let _ = mgr.force_close(key.peer(), key.local_port);
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
        let backlog = TABLE.lock().listeners.remove(&self.port).map(|l| l.backlog).unwrap_or_default();
        for key in &backlog {
            if let Some(c) = TABLE.lock().conns.get_mut(key) {
                c.local_closed = true;
                c.reset = true;
            }
            TABLE.lock().dirty.insert(*key);
        }
        if let Some(d) = DRIVER.lock().as_mut() {
            d.mgr.unlisten(self.port);
        }
        kick_pump();
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
            poll();
            let mut t = TABLE.lock();
            let Some(l) = t.listeners.get_mut(&self.port) else { return Poll::Ready(Err(NetError::DeviceFailed)) };
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
            let mut t = TABLE.lock();
            let Some(c) = t.conns.get_mut(&key) else { return Poll::Ready(Ok(0)) };
            if !c.inbound.is_empty() {
                let was_full = c.inbound.len() >= IN_BUFFER;
                let n = c.inbound.len().min(buf.len());
                let (a, b) = c.inbound.as_slices();
                let first = a.len().min(n);
                buf[..first].copy_from_slice(&a[..first]);
                buf[first..n].copy_from_slice(&b[..n - first]);
                c.inbound.drain(..n);
                if c.inbound.is_empty() && c.inbound.capacity() > 4 * RX_BUFFER_SIZE {
                    c.inbound = VecDeque::new();
                }
                if was_full {
                    // Data may still wait in the driver for room.
                    t.dirty.insert(key);
                    drop(t);
                    kick_pump();
                }
                return Poll::Ready(Ok(n));
            }
            if c.peer_closed || buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            c.read_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Queues all of `buf` for sending, waiting while [`OUT_BUFFER`] bytes are already queued
    /// on this connection. Fails once the connection was reset.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> Result<(), NetError> {
        let key = self.key;
        while !buf.is_empty() {
            let taken = poll_fn(|cx| {
                let mut t = TABLE.lock();
                let Some(c) = t.conns.get_mut(&key) else { return Poll::Ready(Err(NetError::ConnectionReset)) };
                if c.reset || c.peer_closed {
                    return Poll::Ready(Err(NetError::ConnectionReset));
                }
                let room = OUT_BUFFER.saturating_sub(c.outbound.len());
                if room == 0 {
                    c.write_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                let n = room.min(buf.len());
                c.outbound.extend(&buf[..n]);
                t.dirty.insert(key);
                Poll::Ready(Ok(n))
            })
            .await?;
            buf = &buf[taken..];
            kick_pump();
        }
        Ok(())
    }

    /// Closes the connection once what was written is sent (the host then closes the
    /// client's side).
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        {
            let mut t = TABLE.lock();
            if let Some(c) = t.conns.get_mut(&self.key) {
                c.local_closed = true;
                t.dirty.insert(self.key);
            }
        }
        kick_pump();
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shutdown();
    }
}
