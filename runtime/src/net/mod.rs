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
//! Tasks never touch the device: they read from and write to per-connection buffers, and a
//! *pump* moves bytes between those buffers and the device's queues ([`driver`]). Any vCPU
//! pumps: at each of its task boundaries when packets arrived or a task asked, and right after
//! one of its own tasks queued data, made room or closed a connection. The pump only *tries*
//! the driver's lock: a vCPU that finds it taken leaves a note (`PUMP_WANTED`) that the
//! holder reads before it lets go, so no vCPU ever waits for another. Nothing waits for the
//! host either: sent packets are posted and their buffers reaped later, and a full transmit
//! queue leaves the bytes in the connection's buffer until the host has used some (it then
//! wakes the guest).
//!
//! There are no interrupts: the host wakes a blocked vCPU when it queued packets, and a busy
//! guest notices them at its next task boundary by reading the used ring's index (no exit).
//! Backpressure both ways is vsock's credit: the guest advertises [`IN_BUFFER`] per
//! connection and counts what the service read; a writer waits while its connection has
//! [`OUT_BUFFER`] bytes queued, and the pump sends no more than the host's credit
//! ([`HOST_BUF_ALLOC`](hypercall_abi::virtio::vsock::HOST_BUF_ALLOC)). Each connection's task
//! becomes runnable when its data arrives, which is what the elastic vCPU controller sees as
//! load.

mod driver;

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::future::{Future, poll_fn};
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering};
use core::task::{Poll, Waker};

use crate::sync::Mutex;
use hypercall_abi::virtio::VIRTIO_ID_VSOCK;
use hypercall_abi::virtio::vsock::{HOST_BUF_ALLOC, RX_QUEUE, TX_QUEUE};

use crate::executor;
use crate::virtio::Unavailable;
use driver::{Driver, Header, Received, op};

/// Bytes received and not yet read by the service, per connection: the credit the guest
/// advertises to the host (it sends no more until the service reads).
pub const IN_BUFFER: usize = 64 * 1024;

/// Bytes a connection may have queued for sending before a writer waits.
pub const OUT_BUFFER: usize = 64 * 1024;

/// Largest packet the pump sends (a quarter of the host's buffer, so a few are in flight).
const SEND_CHUNK: usize = (HOST_BUF_ALLOC / 4) as usize;

/// Connections accepted by the driver but not yet taken by `accept`, per listener; beyond it
/// new connections are reset.
pub const BACKLOG: usize = 4096;

/// Rounds one pump makes before it leaves the rest to the next task boundary.
const PUMP_ROUNDS: usize = 64;

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
    /// A packet header for this connection, carrying the guest's credit.
    fn header(self, op: u16, c: &Conn) -> Header {
        let mut h = Header::to_host(self.local_port, self.peer_port, op);
        h.buf_alloc = IN_BUFFER as u32;
        h.fwd_cnt = c.fwd_cnt;
        h
    }
}

#[derive(Debug, Default)]
struct Conn {
    inbound: VecDeque<u8>,
    outbound: VecDeque<u8>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// The peer will send no more: once `inbound` is drained, reads see EOF.
    peer_closed: bool,
    /// The peer reset the connection (or the guest gave up on it): writes fail.
    reset: bool,
    /// The service closed it: shut down once `outbound` is sent.
    local_closed: bool,
    /// The host's receive buffer for this connection, and what it has consumed of our data.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the host.
    tx_cnt: u32,
    /// A CREDIT_REQUEST is out (no credit left with data waiting).
    credit_requested: bool,
    /// Bytes the service has read (our credit), and the value the host last heard.
    fwd_cnt: u32,
    fwd_told: u32,
    /// The host asked for our credit.
    credit_wanted: bool,
}

impl Conn {
    /// Bytes the host can take now.
    fn peer_free(&self) -> usize {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt)) as usize
    }

    /// Whether the host should hear about the room the service made.
    fn owes_credit(&self) -> bool {
        self.credit_wanted || self.fwd_cnt.wrapping_sub(self.fwd_told) as usize >= IN_BUFFER / 2
    }
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
    /// Packets for connections that are not in the table (RST answers).
    resets: Vec<Key>,
}

const UNINIT: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
/// The driver. Only ever *tried* on the hot path (`pump`); a plain lock only while setting up.
static DRIVER: Mutex<Option<Driver>> = Mutex::new(None);
static TABLE: Mutex<Table> = Mutex::new(Table {
    conns: BTreeMap::new(),
    listeners: BTreeMap::new(),
    dirty: BTreeSet::new(),
    resets: Vec::new(),
});
/// Something for the pump besides received packets (queued data, a close, room made).
static PUMP_WANTED: AtomicBool = AtomicBool::new(false);
/// The driver waits for the host to use transmit buffers (its queue was full).
static TX_WAITING: AtomicBool = AtomicBool::new(false);
/// The RX used index up to which packets were taken, and the TX used index last looked at.
static RX_SEEN: AtomicU16 = AtomicU16::new(0);
static TX_SEEN: AtomicU16 = AtomicU16::new(0);
/// Addresses of the RX and TX used rings' `idx` (0 before the device is set up).
static RX_USED_IDX: AtomicU64 = AtomicU64::new(0);
static TX_USED_IDX: AtomicU64 = AtomicU64::new(0);
/// Deferred DEVICE_NOTIFYs, per queue (RX, TX): the notify value + 1 (0: none).
static DEFERRED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// Kernel time (ns) of the oldest deferred notify (0: none).
static DEFERRED_SINCE: AtomicU64 = AtomicU64::new(0);
/// Counters (see [`NetStats`]).
static NOTIFIES_IN_BLOCK: AtomicU64 = AtomicU64::new(0);
static PUMPS: AtomicU64 = AtomicU64::new(0);
static PUMP_BUSY: AtomicU64 = AtomicU64::new(0);

/// A used ring's index now (no exit: the ring is in guest memory).
fn used_now(at: &AtomicU64) -> Option<u16> {
    let addr = at.load(Ordering::Acquire);
    // SAFETY: `addr` is the `idx` field of a used ring the driver allocated (identity mapped,
    // never freed while the device lives); the host writes it, hence volatile.
    (addr != 0).then(|| unsafe { (addr as *const u16).read_volatile() })
}

/// Connection counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Connections open now.
    pub open: usize,
    /// Listening ports.
    pub listeners: usize,
    /// Pumps run, and pumps skipped because another vCPU held the driver (it did the work).
    pub pumps: (u64, u64),
    /// Packets sent and received, DEVICE_NOTIFY calls, and posts that found the queue full.
    pub packets: (u64, u64, u64, u64),
    /// Of the DEVICE_NOTIFYs, those a BLOCK carried (no exit of their own).
    pub notifies_in_block: u64,
}

/// Current connection counters (zeros before the channel is used).
pub fn stats() -> NetStats {
    let (open, listeners) = {
        let t = TABLE.lock();
        (t.conns.len(), t.listeners.len())
    };
    let d = DRIVER.try_lock().and_then(|g| g.as_ref().map(|d| d.stats)).unwrap_or_default();
    NetStats {
        open,
        listeners,
        pumps: (PUMPS.load(Ordering::Relaxed), PUMP_BUSY.load(Ordering::Relaxed)),
        packets: (d.sent, d.received, d.notifies, d.tx_full),
        notifies_in_block: NOTIFIES_IN_BLOCK.load(Ordering::Relaxed),
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
    let mut guard = DRIVER.lock();
    if guard.is_some() {
        return Ok(());
    }
    let transport = crate::virtio::find(VIRTIO_ID_VSOCK).map_err(|e| match e {
        Unavailable::NoTransport | Unavailable::NoDevice => NetError::Unavailable,
        Unavailable::BadPage => NetError::DeviceFailed,
    })?;
    let driver = match Driver::new(transport) {
        Ok(d) => d,
        Err(e) => {
            log::error!("vsock: device setup failed: {e:?}");
            STATE.store(FAILED, Ordering::Release);
            return Err(NetError::DeviceFailed);
        }
    };
    let rings = (driver.transport().used_ring(RX_QUEUE), driver.transport().used_ring(TX_QUEUE));
    let (Some(rx), Some(tx)) = rings else {
        log::error!("vsock: the host refused the device setup");
        STATE.store(FAILED, Ordering::Release);
        return Err(NetError::DeviceFailed);
    };
    RX_USED_IDX.store(rx + 2, Ordering::Release);
    TX_USED_IDX.store(tx + 2, Ordering::Release);
    *guard = Some(driver);
    STATE.store(READY, Ordering::Release);
    log::debug!("vsock: device ready (guest cid {})", hypercall_abi::virtio::vsock::GUEST_CID);
    Ok(())
}

/// Starts listening on vsock `port`; connections the host forwards to it queue up for
/// [`Listener::accept`].
pub fn listen(port: u32) -> Result<Listener, NetError> {
    ensure_ready()?;
    let mut t = TABLE.lock();
    if t.listeners.contains_key(&port) {
        return Err(NetError::PortInUse);
    }
    t.listeners.insert(port, ListenerState::default());
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

/// Runs the pump if there is anything for it, and sends deferred notifies that waited
/// [`NOTIFY_DEFER_NS`]. Called by the worker loop at every task boundary (so after every
/// wake-up too); costs a read of the used rings' indexes when nothing arrived.
pub(crate) fn poll() {
    if pending() {
        pump();
    }
    let since = DEFERRED_SINCE.load(Ordering::Acquire);
    if since != 0 && crate::time::now_ns().saturating_sub(since) >= NOTIFY_DEFER_NS {
        flush_deferred();
    }
}

/// Longest a DEVICE_NOTIFY waits for the vCPU's next BLOCK (checked at task boundaries):
/// about what the notify's own exit costs on a nested host, so a deferral never delays the
/// host more than the exit it saves. Tasks that run longer than this on average are not
/// deferred for.
pub(crate) const NOTIFY_DEFER_NS: u64 = 50_000;

/// A DEVICE_NOTIFY for `queue` that the driver owes the host: sent now, or, when the host
/// serves notifies inside BLOCK and tasks are short, deferred so that the vCPU that next goes
/// idle tells the host and sleeps in one exit ([`take_deferred`]). A task boundary sends
/// what waited [`NOTIFY_DEFER_NS`] ([`poll`]).
fn notify_or_defer(transport: &mut crate::virtio::PageTransport, queue: u16) {
    let slot = DEFERRED.get(usize::from(queue));
    match slot {
        Some(slot) if crate::virtio::block_notify() && executor::avg_run_ns() < NOTIFY_DEFER_NS => {
            slot.store(transport.notify_value(queue) + 1, Ordering::SeqCst);
            let now = crate::time::now_ns().max(1);
            let _ = DEFERRED_SINCE.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
        }
        _ => {
            use virtio_drivers::transport::Transport;
            transport.notify(queue);
        }
    }
}

/// Takes the deferred notifies (RX, TX).
fn take_all_deferred() -> (Option<u64>, Option<u64>) {
    if DEFERRED_SINCE.load(Ordering::SeqCst) == 0 {
        return (None, None);
    }
    DEFERRED_SINCE.store(0, Ordering::SeqCst);
    (DEFERRED[0].swap(0, Ordering::SeqCst).checked_sub(1), DEFERRED[1].swap(0, Ordering::SeqCst).checked_sub(1))
}

/// Takes the deferred notifies for a vCPU about to BLOCK: the one its BLOCK is to carry
/// (`None`: none is owed); another one is sent here.
pub(crate) fn take_deferred() -> Option<u64> {
    let (rx, tx) = take_all_deferred();
    if let (Some(rx), Some(_)) = (rx, tx) {
        let _ = crate::hypercall::device_notify_value(rx);
    }
    let carried = tx.or(rx);
    if carried.is_some() {
        NOTIFIES_IN_BLOCK.fetch_add(1, Ordering::Relaxed);
    }
    carried
}

/// Sends the deferred notifies now (a vCPU leaving the worker loop or going down, or a
/// notify that waited [`NOTIFY_DEFER_NS`]).
pub(crate) fn flush_deferred() {
    let (rx, tx) = take_all_deferred();
    for value in [rx, tx].into_iter().flatten() {
        let _ = crate::hypercall::device_notify_value(value);
    }
}

/// Whether the pump has something to do that this vCPU should do: packets arrived, a task
/// asked for it, or the host used transmit buffers the pump waits for, and no other vCPU is
/// pumping (that one looks again before it lets go, so this vCPU may block).
pub(crate) fn pending() -> bool {
    STATE.load(Ordering::Acquire) == READY
        && !DRIVER.is_locked()
        && (PUMP_WANTED.load(Ordering::Acquire)
            || used_now(&RX_USED_IDX) != Some(RX_SEEN.load(Ordering::Acquire))
            || (TX_WAITING.load(Ordering::Acquire) && used_now(&TX_USED_IDX) != Some(TX_SEEN.load(Ordering::Acquire))))
}

/// Asks for a pump and runs it here unless another vCPU is pumping (that one then goes round
/// again before it lets go).
fn kick_pump() {
    PUMP_WANTED.store(true, Ordering::Release);
    pump();
}

/// Moves bytes between the driver and the connection buffers until there is nothing left to
/// do (or [`PUMP_ROUNDS`] rounds went by: the next task boundary goes on). Never waits: if
/// another vCPU holds the driver, the request stays in `PUMP_WANTED` for it.
fn pump() {
    for _ in 0..4 {
        let Some(mut guard) = DRIVER.try_lock() else {
            PUMP_BUSY.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(driver) = guard.as_mut() else { return };
        PUMPS.fetch_add(1, Ordering::Relaxed);
        let mut wake: Vec<Waker> = Vec::new();
        for _ in 0..PUMP_ROUNDS {
            PUMP_WANTED.store(false, Ordering::Release);
            if driver.reap() || TX_WAITING.load(Ordering::Acquire) {
                TX_SEEN.store(used_now(&TX_USED_IDX).unwrap_or(0), Ordering::Release);
            }
            let received = receive(driver, &mut wake);
            let keys: Vec<Key> = {
                let mut t = TABLE.lock();
                for key in core::mem::take(&mut t.resets) {
                    let _ = driver.post(Header::to_host(key.local_port, key.peer_port, op::RST), &[]);
                }
                core::mem::take(&mut t.dirty).into_iter().collect()
            };
            for key in &keys {
                service(driver, *key, &mut wake);
            }
            TX_WAITING.store(driver.tx_waiting(), Ordering::Release);
            driver.flush_notify();
            // Wake outside every lock: waking may kick another vCPU (an exit).
            for w in wake.drain(..) {
                w.wake();
            }
            let more =
                PUMP_WANTED.load(Ordering::Acquire) || used_now(&RX_USED_IDX) != Some(RX_SEEN.load(Ordering::Acquire));
            if !more && !received {
                break;
            }
        }
        drop(guard);
        // A vCPU that found the lock taken after the last look left its note: go round again.
        if !PUMP_WANTED.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Takes every packet the host delivered; `true` if there was any.
fn receive(driver: &mut Driver, wake: &mut Vec<Waker>) -> bool {
    let mut any = false;
    for _ in 0..driver::RX_SIZE {
        let Some(packet) = driver.receive() else { break };
        any = true;
        RX_SEEN.store(RX_SEEN.load(Ordering::Relaxed).wrapping_add(1), Ordering::Release);
        dispatch(driver, &packet, wake);
        driver.recycle(packet);
    }
    any
}

/// Acts on one packet from the host.
fn dispatch(driver: &mut Driver, packet: &Received, wake: &mut Vec<Waker>) {
    let Some(h) = packet.header() else { return };
    if !h.is_for_us() {
        log::debug!("vsock: dropped a packet not meant for this guest");
        return;
    }
    let key = Key { peer_port: h.src_port, local_port: h.dst_port };
    let (op, flags, payload) = (h.op, h.flags, packet.payload());
    let mut t = TABLE.lock();
    if op == op::REQUEST {
        let has_room = t.listeners.get(&key.local_port).is_some_and(|l| l.backlog.len() < BACKLOG);
        if !has_room || t.conns.contains_key(&key) {
            // Nobody listens on this port while the service listens on others: the port is
            // unused, and the host refuses the client at once. Otherwise (booting, or a full
            // backlog) the host asks again.
            let unused = !t.listeners.is_empty() && !t.listeners.contains_key(&key.local_port);
            drop(t);
            let mut rst = Header::to_host(key.local_port, key.peer_port, op::RST);
            if unused {
                rst.flags = op::RST_NO_LISTENER;
            }
            let _ = driver.post(rst, &[]);
            return;
        }
        let conn = Conn { peer_buf_alloc: h.buf_alloc, peer_fwd_cnt: h.fwd_cnt, ..Conn::default() };
        let response = key.header(op::RESPONSE, &conn);
        t.conns.insert(key, conn);
        if let Some(l) = t.listeners.get_mut(&key.local_port) {
            l.backlog.push_back(key);
            wake.extend(l.waker.take());
        }
        drop(t);
        if !driver.post(response, &[]) {
            // No descriptor for the answer now: the connection is reset instead of half-open.
            TABLE.lock().resets.push(key);
        }
        return;
    }
    let Some(c) = t.conns.get_mut(&key) else {
        drop(t);
        if op != op::RST {
            let _ = driver.post(Header::to_host(key.local_port, key.peer_port, op::RST), &[]);
        }
        return;
    };
    // Every packet carries the host's credit.
    let credit_moved = h.fwd_cnt != c.peer_fwd_cnt || h.buf_alloc != c.peer_buf_alloc;
    c.peer_buf_alloc = h.buf_alloc;
    c.peer_fwd_cnt = h.fwd_cnt;
    if credit_moved {
        c.credit_requested = false;
    }
    let mut dirty = credit_moved && !c.outbound.is_empty();
    match op {
        op::RW => {
            if c.local_closed || c.reset {
                // Nobody will read it: count it as read so the host is not held up.
                c.fwd_cnt = c.fwd_cnt.wrapping_add(payload.len() as u32);
            } else if c.inbound.len() + payload.len() > IN_BUFFER {
                // The host ignored our credit: give up on the connection.
                c.reset = true;
                c.peer_closed = true;
                c.outbound.clear();
                wake.extend(c.read_waker.take());
                wake.extend(c.write_waker.take());
                t.resets.push(key);
            } else {
                c.inbound.extend(payload);
                wake.extend(c.read_waker.take());
            }
        }
        op::SHUTDOWN => {
            // The host keeps taking data after the client closed its side (a half-close),
            // so only reads end here.
            if flags & op::SHUTDOWN_SEND != 0 || flags & op::SHUTDOWN_RECEIVE != 0 {
                c.peer_closed = true;
                wake.extend(c.read_waker.take());
                wake.extend(c.write_waker.take());
            }
        }
        op::RST => {
            c.reset = true;
            c.peer_closed = true;
            c.outbound.clear();
            wake.extend(c.read_waker.take());
            wake.extend(c.write_waker.take());
            if c.local_closed {
                t.conns.remove(&key);
                return;
            }
        }
        op::CREDIT_UPDATE => {}
        op::CREDIT_REQUEST => {
            c.credit_wanted = true;
            dirty = true;
        }
        // RESPONSE (this guest never connects out) or an unknown operation.
        _ => {
            c.reset = true;
            c.peer_closed = true;
            wake.extend(c.read_waker.take());
            wake.extend(c.write_waker.take());
            t.resets.push(key);
        }
    }
    if dirty {
        t.dirty.insert(key);
    }
}

/// Brings one connection up to date: queued data out as far as the host's credit and the
/// transmit queue go, credit to the host, a close through.
fn service(driver: &mut Driver, key: Key, wake: &mut Vec<Waker>) {
    let mut t = TABLE.lock();
    let Some(c) = t.conns.get_mut(&key) else { return };
    if c.reset {
        if c.local_closed {
            t.conns.remove(&key);
        }
        return;
    }
    let mut blocked = false;
    while !c.outbound.is_empty() {
        let free = c.peer_free();
        if free == 0 {
            if !c.credit_requested {
                c.credit_requested = true;
                blocked = !driver.post(key.header(op::CREDIT_REQUEST, c), &[]);
            }
            break;
        }
        let n = c.outbound.len().min(free).min(SEND_CHUNK);
        let (a, b) = c.outbound.as_slices();
        let first = a.len().min(n);
        let header = key.header(op::RW, c);
        if !driver.post(header, &[&a[..first], &b[..n - first]]) {
            blocked = true;
            break;
        }
        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
        c.fwd_told = c.fwd_cnt;
        c.credit_wanted = false;
        c.outbound.drain(..n);
        if c.outbound.is_empty() && c.outbound.capacity() > 4 * driver::RX_BUFFER {
            c.outbound = VecDeque::new();
        }
        wake.extend(c.write_waker.take());
    }
    if !blocked && c.owes_credit() {
        if driver.post(key.header(op::CREDIT_UPDATE, c), &[]) {
            c.fwd_told = c.fwd_cnt;
            c.credit_wanted = false;
        } else {
            blocked = true;
        }
    }
    if !blocked && c.local_closed && c.outbound.is_empty() {
        let mut header = key.header(op::SHUTDOWN, c);
        header.flags = op::SHUTDOWN_BOTH;
        if driver.post(header, &[]) {
            // The host flushes what it holds, closes the client and answers RST, which then
            // finds no connection (and is ignored).
            t.conns.remove(&key);
            return;
        }
        blocked = true;
    }
    if blocked {
        // The transmit queue is full: again once the host used some (it wakes the guest).
        t.dirty.insert(key);
    }
}

/// A listening port.
#[derive(Debug)]
pub struct Listener {
    port: u32,
}

impl Drop for Listener {
    fn drop(&mut self) {
        {
            let mut t = TABLE.lock();
            let backlog = t.listeners.remove(&self.port).map(|l| l.backlog).unwrap_or_default();
            for key in backlog {
                if let Some(c) = t.conns.get_mut(&key) {
                    c.local_closed = true;
                    c.reset = true;
                }
                t.conns.remove(&key);
                t.resets.push(key);
            }
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
                let n = c.inbound.len().min(buf.len());
                let (a, b) = c.inbound.as_slices();
                let first = a.len().min(n);
                buf[..first].copy_from_slice(&a[..first]);
                buf[first..n].copy_from_slice(&b[..n - first]);
                c.inbound.drain(..n);
                if c.inbound.is_empty() && c.inbound.capacity() > 4 * driver::RX_BUFFER {
                    c.inbound = VecDeque::new();
                }
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                if c.owes_credit() {
                    // Half the buffer was read since the host last heard: tell it.
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
                if c.reset {
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
