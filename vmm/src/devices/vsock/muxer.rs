//! The vsock I/O thread: accepts clients on the published endpoints, runs one state machine
//! per connection, and moves bytes between host sockets and the guest's virtqueues.
//!
//! * Guest to host (TX queue): packets are taken from the queue and answered at once (the
//!   guest's driver waits for each); payload goes to the client's socket, and what the socket
//!   cannot take yet waits in a buffer bounded by the credit the host advertised.
//! * Host to guest (RX queue): control packets first, then data, read from a client only when
//!   the guest has credit for it and a receive buffer is free; a blocked vCPU is woken.
//! * Notifications: while there is traffic the thread keeps polling (`POLL_WINDOW`) with the
//!   guest's transmit notifications suppressed, so a busy guest sends without exits; the RX
//!   queue's notifications stay off unless the thread waits for a receive buffer.
//! * Connection set-up is host-initiated (a client connects; the device sends REQUEST to the
//!   guest port). A guest that is not listening yet (still booting) answers RST: the request is
//!   repeated with back-off for [`CONNECT_TIMEOUT`] before the client is closed.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::base::memory::Mmap as GuestMemoryMmap;
use hypercall_abi::virtio::vsock::{GUEST_CID, HOST_BUF_ALLOC, HOST_CID, MAX_PACKET_DATA};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::endpoint::{Bound, CONNECT_LINE_MAX, parse_connect_line};
use super::{Core, MAX_CONNECTIONS, VsockShared, Wake};
use crate::base::memory::GuestMemory;

/// Vsock packet types and operations (virtio spec 5.10.6).
mod op {
    pub const TYPE_STREAM: u16 = 1;
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
    /// SHUTDOWN flags: no more receiving, no more sending.
    pub const SHUTDOWN_BOTH: u32 = 3;
}

/// How long the thread keeps polling after the last traffic before it sleeps.
const POLL_WINDOW: Duration = Duration::from_micros(200);
/// How long after re-enabling notifications the rings are looked at once more (see
/// `Muxer::settled_late`).
const SETTLE: Duration = Duration::from_micros(50);
/// How long a client waits for the guest to accept (a booting guest may not listen yet).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of the first connection retries to a guest port nobody listens on yet.
const FAST_RETRY: Duration = Duration::from_micros(250);
/// How many retries come at [`FAST_RETRY`] (50 ms worth) before the back-off.
const FAST_RETRIES: u32 = 200;
/// How long the guest has to answer a SHUTDOWN with RST.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a hybrid-vsock client has to send its CONNECT line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Packets handled per queue per pass (bounded work between socket events).
const BATCH: usize = 256;
/// First host-side port number given to connections.
pub(super) const FIRST_HOST_PORT: u32 = 1 << 30;

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_LISTENER: u64 = 2;
const TOKEN_CONN: u64 = 1 << 32;

/// A client's socket.
#[derive(Debug)]
enum HostStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl HostStream {
    fn fd(&self) -> RawFd {
        match self {
            HostStream::Tcp(s) => s.as_raw_fd(),
            HostStream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.read(buf),
            HostStream::Unix(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            HostStream::Tcp(s) => s.write(buf),
            HostStream::Unix(s) => s.write(buf),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            HostStream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            HostStream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hybrid socket: waiting for `CONNECT <port>\n`.
    Handshake { deadline: Instant },
    /// Waiting for the guest's RESPONSE (or for the device to come up).
    Connecting { deadline: Instant, retry_at: Option<Instant>, attempts: u32, sent: bool },
    /// Data flows both ways.
    Established,
    /// The client closed: SHUTDOWN sent, waiting for the guest's RST.
    ClientClosed { deadline: Instant },
    /// The guest shut down: flushing what it sent, then closing.
    GuestClosed,
}

#[derive(Debug)]
struct Conn {
    stream: HostStream,
    guest_port: u32,
    state: State,
    uds: bool,
    readable: bool,
    writable: bool,
    /// The client's socket reported EOF or an error.
    client_eof: bool,
    /// Bytes from the guest not yet written to the client (at most HOST_BUF_ALLOC).
    outbound: VecDeque<u8>,
    /// Bytes read from the client not yet delivered (at most one packet).
    inbound: Vec<u8>,
    /// In the RX ready list.
    queued: bool,
    handshake: Vec<u8>,
    // Credit: the guest's receive buffer and what it consumed; what the host sent it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    rx_cnt: u32,
    // Credit: bytes the host forwarded to the client, and the figure last told the guest.
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    credit_requested: bool,
}

impl Conn {
    fn guest_free(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn host_free(&self) -> usize {
        (HOST_BUF_ALLOC as usize).saturating_sub(self.outbound.len())
    }
}

/// Whether every buffer of `chain` lies at or above the kernel's load address (the device
/// never reads or writes the guest-protected region).
fn chain_in_kernel_ram<M: vm_memory::GuestMemory, T: std::ops::Deref<Target = M> + Clone>(
    chain: &virtio_queue::DescriptorChain<T>,
) -> bool {
    chain.clone().all(|d| d.addr().0 >= hypercall_abi::KERNEL_MIN_LOAD_ADDR)
}

/// A control packet to send.
#[derive(Debug, Clone, Copy)]
struct Control {
    guest_port: u32,
    host_port: u32,
    op: u16,
    flags: u32,
}

struct Muxer {
    shared: Arc<VsockShared>,
    mem: GuestMemory,
    epoll: Epoll,
    endpoints: Vec<Bound>,
    conns: HashMap<u32, Conn>,
    control: VecDeque<Control>,
    ready: VecDeque<u32>,
    next_port: u32,
    generation: u64,
    live: bool,
    wake: Wake,
    kick: EventFd,
    stop: EventFd,
    rx_starved: bool,
    /// The guest's transmit notifications are off (the thread is polling).
    tx_suppressed: bool,
    /// Connections with guest data to write out after the current transmit batch.
    to_flush: Vec<u32>,
    buf: Vec<u8>,
    /// Idle shutdown: after this long with no connection open, stop accepting and call the
    /// closure (which asks the guest to stop).
    idle: Option<super::IdleShutdown>,
    /// The last time a connection opened or closed (or the thread started).
    last_activity: Instant,
    /// Whether the listeners are watched (false once the idle shutdown fired: clients that
    /// connect from then on wait in the listen backlog for the next VM).
    accepting: bool,
    /// A restored device: RSTs for the connections the guest had open at the snapshot (their
    /// clients belonged to the old process), sent once the queues are live.
    pending_resets: Vec<Control>,
}

/// The thread's body.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    shared: Arc<VsockShared>,
    mem: GuestMemory,
    endpoints: Vec<Bound>,
    wake: Wake,
    kick: EventFd,
    stop: EventFd,
    idle: Option<super::IdleShutdown>,
    resume: Option<super::Held>,
) {
    crate::host::seccomp::install_thread(crate::host::seccomp::Role::Io);
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("hypervisor-shim: vsock I/O thread: cannot create an epoll instance: {e}");
            return;
        }
    };
    let mut m = Muxer {
        shared,
        mem,
        epoll,
        endpoints,
        conns: HashMap::new(),
        control: VecDeque::new(),
        ready: VecDeque::new(),
        next_port: resume.as_ref().map_or(FIRST_HOST_PORT, |r| r.next_port.max(FIRST_HOST_PORT)),
        generation: u64::MAX,
        live: false,
        wake,
        kick,
        stop,
        rx_starved: false,
        tx_suppressed: false,
        to_flush: Vec::new(),
        buf: vec![0u8; 64 * 1024],
        idle,
        last_activity: Instant::now(),
        accepting: true,
        pending_resets: resume
            .map(|r| {
                r.connections
                    .into_iter()
                    .map(|(guest_port, host_port)| Control { guest_port, host_port, op: op::RST, flags: 0 })
                    .collect()
            })
            .unwrap_or_default(),
    };
    if let Err(e) = m.register() {
        eprintln!("hypervisor-shim: vsock I/O thread: cannot watch its sockets: {e}");
        return;
    }
    m.main_loop();
    if m.shared.keep_paths.load(Ordering::Acquire) {
        for e in &mut m.endpoints {
            if let Bound::Uds { owner, .. } = e {
                *owner = false;
            }
        }
    }
}

impl Muxer {
    fn register(&mut self) -> std::io::Result<()> {
        let add =
            |fd: RawFd, token: u64| self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(self.kick.as_raw_fd(), TOKEN_KICK)?;
        add(self.stop.as_raw_fd(), TOKEN_STOP)?;
        for (i, e) in self.endpoints.iter().enumerate() {
            add(e.raw_fd(), TOKEN_LISTENER + i as u64)?;
        }
        Ok(())
    }

    /// When the idle shutdown is due (`None`: not armed, or connections are open).
    fn idle_deadline(&self) -> Option<Instant> {
        let idle = self.idle.as_ref()?;
        (self.accepting && self.conns.is_empty()).then(|| self.last_activity + idle.after)
    }

    /// Fires the idle shutdown if it is due: the listeners are no longer watched (new clients
    /// wait in the backlog), and the VM is asked to stop.
    fn check_idle(&mut self, now: Instant) {
        if self.idle_deadline().is_none_or(|d| now < d) {
            return;
        }
        self.accepting = false;
        for e in &self.endpoints {
            let _ = self.epoll.ctl(ControlOperation::Delete, e.raw_fd(), EpollEvent::default());
        }
        self.shared.stats.idle_shutdown.store(true, Ordering::Release);
        if let Some(idle) = &self.idle {
            (idle.fire)();
        }
    }

    fn main_loop(&mut self) {
        let mut events = vec![EpollEvent::default(); 256];
        let mut busy_until: Option<Instant> = None;
        let mut polls = 0u32;
        loop {
            if self.hold_requested() && !self.hold_still() {
                return;
            }
            // While busy, poll; the end of the iteration decides when to stop (and turns the
            // guest's notifications back on first), so the thread never sleeps with them off.
            let timeout = if busy_until.is_some() { 0 } else { self.next_timer_ms(Instant::now()) };
            if busy_until.is_some() {
                // Polling: now and then leave the core to a vCPU that wants it (this host may
                // have fewer cores than runnable threads).
                polls = polls.wrapping_add(1);
                if polls.is_multiple_of(8) {
                    std::thread::yield_now();
                }
            }
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => {
                    eprintln!("hypervisor-shim: vsock I/O thread: epoll failed: {e}");
                    return;
                }
            };
            let mut work = n > 0;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KICK => {
                        let _ = self.kick.read();
                    }
                    TOKEN_STOP => return,
                    t if t >= TOKEN_CONN => self.conn_event((t - TOKEN_CONN) as u32, ev.event_set()),
                    t => self.accept((t - TOKEN_LISTENER) as usize),
                }
            }
            work |= self.sync_device();
            work |= self.process_tx();
            work |= self.process_rx();
            let now = Instant::now();
            self.run_timers(now);
            self.check_idle(now);
            if work {
                busy_until = Some(Instant::now() + POLL_WINDOW);
            } else if busy_until.is_none_or(|t| Instant::now() >= t) {
                busy_until = None;
                // Going to sleep: let the guest notify again, and look once more for what it
                // queued meanwhile.
                let enabled = self.tx_suppressed;
                if (enabled && self.enable_tx_notifications()) || ((enabled || self.rx_starved) && self.settled_late())
                {
                    busy_until = Some(Instant::now() + POLL_WINDOW);
                }
            }
        }
    }

    fn hold_requested(&self) -> bool {
        self.shared.hold.lock().unwrap_or_else(|p| p.into_inner()).requested
    }

    /// A snapshot asked the thread to hold still: it reports its connections and waits
    /// (touching neither queues nor sockets) until released. `false` when the thread is to
    /// stop meanwhile.
    fn hold_still(&mut self) -> bool {
        let mut connections: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.state, State::Handshake { .. }))
            .map(|(&host_port, c)| (c.guest_port, host_port))
            .collect();
        connections.sort_unstable();
        let mut h = self.shared.hold.lock().unwrap_or_else(|p| p.into_inner());
        h.held = Some(super::Held { connections, next_port: self.next_port });
        self.shared.hold_cond.notify_all();
        while h.requested {
            h = self.shared.hold_cond.wait_timeout(h, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
            if self.stop.read().is_ok() {
                h.held = None;
                return false;
            }
        }
        h.held = None;
        // Released because the thread is to stop: stop before touching anything.
        self.stop.read().is_err()
    }

    /// Milliseconds until the next timer (-1: none).
    fn next_timer_ms(&self, now: Instant) -> i32 {
        let mut next: Option<Instant> = None;
        for c in self.conns.values() {
            let t = match c.state {
                State::Handshake { deadline } | State::ClientClosed { deadline } => Some(deadline),
                State::Connecting { deadline, retry_at, .. } => Some(retry_at.map_or(deadline, |r| r.min(deadline))),
                _ => None,
            };
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        if let Some(t) = self.idle_deadline() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        match next {
            None => -1,
            Some(t) => {
                i32::try_from(t.saturating_duration_since(now).as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            }
        }
    }

    fn accept(&mut self, index: usize) {
        loop {
            let accepted = match self.endpoints.get(index) {
                Some(Bound::Tcp { listener, guest_port }) => {
                    listener.accept().map(|(s, _)| (HostStream::Tcp(s), Some(*guest_port)))
                }
                Some(Bound::Uds { listener, .. }) => listener.accept().map(|(s, _)| (HostStream::Unix(s), None)),
                None => return,
            };
            let (stream, guest_port) = match accepted {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Per-connection failures (the client left, no fds): keep listening.
                Err(_) => return,
            };
            self.add_conn(stream, guest_port);
        }
    }

    fn add_conn(&mut self, stream: HostStream, guest_port: Option<u32>) {
        let shared = Arc::clone(&self.shared);
        let stats = &shared.stats;
        if self.conns.len() >= MAX_CONNECTIONS {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let nonblocking = match &stream {
            HostStream::Tcp(s) => s.set_nonblocking(true).and_then(|_| s.set_nodelay(true)),
            HostStream::Unix(s) => s.set_nonblocking(true),
        };
        if nonblocking.is_err() {
            return;
        }
        let host_port = self.allocate_port();
        let token = TOKEN_CONN + u64::from(host_port);
        let interest = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if self.epoll.ctl(ControlOperation::Add, stream.fd(), EpollEvent::new(interest, token)).is_err() {
            return;
        }
        let now = Instant::now();
        let uds = guest_port.is_none();
        let state = if uds {
            State::Handshake { deadline: now + HANDSHAKE_TIMEOUT }
        } else {
            State::Connecting { deadline: now + CONNECT_TIMEOUT, retry_at: None, attempts: 0, sent: false }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        self.last_activity = now;
        self.conns.insert(
            host_port,
            Conn {
                stream,
                guest_port: guest_port.unwrap_or(0),
                state,
                uds,
                readable: uds,
                writable: true,
                client_eof: false,
                outbound: VecDeque::new(),
                inbound: Vec::new(),
                queued: false,
                handshake: Vec::new(),
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                rx_cnt: 0,
                fwd_cnt: 0,
                fwd_cnt_told: 0,
                credit_requested: false,
            },
        );
        if uds {
            self.read_handshake(host_port);
        } else {
            self.send_request(host_port);
        }
    }

    fn allocate_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = if p == u32::MAX { FIRST_HOST_PORT } else { p + 1 };
            if !self.conns.contains_key(&p) {
                return p;
            }
        }
    }

    fn conn_event(&mut self, port: u32, events: EventSet) {
        let Some(c) = self.conns.get_mut(&port) else { return };
        let readable = events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR);
        let writable = events.contains(EventSet::OUT);
        c.readable |= readable;
        c.writable |= writable;
        let handshake = matches!(c.state, State::Handshake { .. });
        if readable && handshake {
            return self.read_handshake(port);
        }
        if readable {
            self.mark_ready(port);
        }
        if writable {
            self.flush(port);
        }
    }

    fn mark_ready(&mut self, port: u32) {
        if let Some(c) = self.conns.get_mut(&port)
            && !c.queued
        {
            c.queued = true;
            self.ready.push_back(port);
        }
    }

    /// Reads the hybrid-vsock `CONNECT <port>` line.
    fn read_handshake(&mut self, port: u32) {
        let Some(c) = self.conns.get_mut(&port) else { return };
        let mut byte = [0u8; 1];
        loop {
            match c.stream.read(&mut byte) {
                Ok(0) => return self.close(port),
                Ok(_) if byte[0] == b'\n' => {
                    let Some(guest_port) = parse_connect_line(&c.handshake) else { return self.close(port) };
                    c.guest_port = guest_port;
                    c.state = State::Connecting {
                        deadline: Instant::now() + CONNECT_TIMEOUT,
                        retry_at: None,
                        attempts: 0,
                        sent: false,
                    };
                    return self.send_request(port);
                }
                Ok(_) if c.handshake.len() < CONNECT_LINE_MAX => c.handshake.push(byte[0]),
                Ok(_) => return self.close(port),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.close(port),
            }
        }
    }

    fn send_request(&mut self, port: u32) {
        let live = self.live;
        let Some(c) = self.conns.get_mut(&port) else { return };
        if let State::Connecting { deadline, attempts, .. } = c.state
            && live
        {
            c.state = State::Connecting { deadline, retry_at: None, attempts, sent: true };
            self.control.push_back(Control { guest_port: c.guest_port, host_port: port, op: op::REQUEST, flags: 0 });
        }
    }

    /// Follows the device: a reset or a new activation drops established connections; those
    /// still connecting are (re)requested once the device is live.
    fn sync_device(&mut self) -> bool {
        let (generation, live) = {
            let core = self.shared.core();
            (core.generation, core.queues.is_some() && core.broken.is_none())
        };
        if generation == self.generation {
            return false;
        }
        self.generation = generation;
        self.live = live;
        self.control.clear();
        if live {
            self.control.extend(self.pending_resets.drain(..));
        }
        self.rx_starved = false;
        self.tx_suppressed = false;
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for port in ports {
            let Some(c) = self.conns.get_mut(&port) else { continue };
            match c.state {
                State::Handshake { .. } => {}
                State::Connecting { deadline, attempts, .. } => {
                    c.state = State::Connecting { deadline, retry_at: None, attempts, sent: false };
                    self.send_request(port);
                }
                _ => self.close(port),
            }
        }
        if live {
            // RX notifications stay off until the device waits for a buffer.
            let snapshot = self.mem.snapshot();
            let mut core = self.shared.core();
            if let Some(q) = core.queues.as_mut() {
                let _ = q.rx.disable_notification(&*snapshot);
            }
        }
        true
    }

    /// Takes what the guest queued for the host and answers each chain.
    fn process_tx(&mut self) -> bool {
        if !self.live {
            return false;
        }
        let shared = Arc::clone(&self.shared);
        let snapshot = self.mem.snapshot();
        let mem: &GuestMemoryMmap = &snapshot;
        let mut core = shared.core();
        let mut handled = 0;
        while handled < BATCH {
            let Some(queues) = core.queues.as_mut() else { break };
            let chain = match queues.tx.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    shared.mark_broken(&mut core, &self.mem, format!("transmit queue: {e}"));
                    break;
                }
            };
            let Some(mut chain) = chain else { break };
            if !self.tx_suppressed {
                // Traffic: the thread polls for a while, so the guest need not notify.
                let _ = queues.tx.disable_notification(mem);
                self.tx_suppressed = true;
            }
            let head = chain.head_index();
            if !chain_in_kernel_ram(&chain) {
                shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                let _ = queues.tx.add_used(mem, head, 0);
                continue;
            }
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PACKET_DATA) {
                Ok(pkt) => self.handle_tx(&pkt),
                Err(_) => {
                    shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            shared.stats.packets_from_guest.fetch_add(1, Ordering::Relaxed);
            handled += 1;
            if let Some(queues) = core.queues.as_mut()
                && let Err(e) = queues.tx.add_used(mem, head, 0)
            {
                shared.mark_broken(&mut core, &self.mem, format!("transmit queue: {e}"));
                break;
            }
        }
        drop(core);
        // The chains are answered; now the (slower) socket writes, so the guest waiting for
        // its transmit buffer does not wait for them too.
        let ports = std::mem::take(&mut self.to_flush);
        for port in ports {
            self.flush(port);
        }
        handled > 0
    }

    /// Re-enables the guest's transmit notifications before sleeping; `true` when the guest
    /// queued something meanwhile.
    fn enable_tx_notifications(&mut self) -> bool {
        if !self.live {
            return false;
        }
        let snapshot = self.mem.snapshot();
        let mut core = self.shared.core();
        self.tx_suppressed = false;
        match core.queues.as_mut() {
            Some(q) => q.tx.enable_notification(&*snapshot).unwrap_or(false),
            None => false,
        }
    }

    /// Looks at the rings once more a little after notifications were turned back on.
    ///
    /// virtio-drivers 0.13 publishes a new available index with a release store and then reads
    /// the device's `NO_NOTIFY` flag with an acquire load, with no full fence between them: the
    /// guest's load can pass its own store, see the flag the host is just clearing, and skip
    /// the notify while the host's re-check still sees the old index. The guest would then wait
    /// forever. Its store is visible within microseconds (a store buffer drains that fast, and
    /// any exit drains it), so a second look after [`SETTLE`] closes the window.
    fn settled_late(&mut self) -> bool {
        if !self.live {
            return false;
        }
        std::thread::sleep(SETTLE);
        let snapshot = self.mem.snapshot();
        let mem: &GuestMemoryMmap = &snapshot;
        let mut core = self.shared.core();
        let Some(q) = core.queues.as_mut() else { return false };
        let fresh = |q: &virtio_queue::Queue| {
            q.avail_idx(mem, std::sync::atomic::Ordering::Acquire).is_ok_and(|i| i.0 != q.next_avail())
        };
        fresh(&q.tx) || (self.rx_starved && fresh(&q.rx))
    }

    fn handle_tx<B: vm_memory::bitmap::BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        let stats = &self.shared.stats;
        if pkt.src_cid() != GUEST_CID || pkt.dst_cid() != HOST_CID {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (guest_port, host_port, kind) = (pkt.src_port(), pkt.dst_port(), pkt.op());
        let rst = Control { guest_port, host_port, op: op::RST, flags: 0 };
        if pkt.type_() != op::TYPE_STREAM {
            self.control.push_back(rst);
            return;
        }
        let Some(c) = self.conns.get_mut(&host_port).filter(|c| c.guest_port == guest_port) else {
            if kind != op::RST {
                self.control.push_back(rst);
            }
            return;
        };
        // Every packet carries the guest's credit.
        let credit_moved = pkt.fwd_cnt() != c.peer_fwd_cnt || pkt.buf_alloc() != c.peer_buf_alloc;
        c.peer_buf_alloc = pkt.buf_alloc();
        c.peer_fwd_cnt = pkt.fwd_cnt();
        if credit_moved {
            c.credit_requested = false;
        }
        let wants_data = credit_moved || kind == op::CREDIT_UPDATE;
        match (kind, c.state) {
            (op::RESPONSE, State::Connecting { .. }) => {
                c.state = State::Established;
                if c.uds {
                    let ok = format!("OK {host_port}\n");
                    for (i, b) in ok.bytes().enumerate() {
                        c.outbound.insert(i, b);
                    }
                }
                self.mark_ready(host_port);
                self.to_flush.push(host_port);
            }
            (op::RST, State::Connecting { deadline, attempts, .. }) => {
                // Not listening (yet): ask again shortly. A booting service (a cold start)
                // listens within milliseconds, so the first retries come every
                // FAST_RETRY; after FAST_RETRIES of them, with back-off up to 64 ms.
                let attempts = attempts + 1;
                let backoff = if attempts <= FAST_RETRIES {
                    FAST_RETRY
                } else {
                    Duration::from_millis(1u64 << (attempts - FAST_RETRIES).min(6))
                };
                c.state =
                    State::Connecting { deadline, retry_at: Some(Instant::now() + backoff), attempts, sent: false };
            }
            (op::RW, State::Established | State::ClientClosed { .. }) => {
                let len = pkt.len() as usize;
                let Some(data) = pkt.data_slice() else { return };
                if len > c.host_free() || len > data.len() {
                    // The guest ignored the credit the host gave it.
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    self.control.push_back(rst);
                    return self.close(host_port);
                }
                if self.buf.len() < len {
                    self.buf.resize(len, 0);
                }
                if data.subslice(0, len).map(|d| d.copy_to(&mut self.buf[..len])).is_err() {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                c.outbound.extend(&self.buf[..len]);
                stats.bytes_from_guest.fetch_add(len as u64, Ordering::Relaxed);
                self.to_flush.push(host_port);
            }
            (op::SHUTDOWN, _) => {
                c.state = State::GuestClosed;
                self.to_flush.push(host_port);
            }
            (op::RST, _) => self.close(host_port),
            (op::CREDIT_UPDATE, _) => {}
            (op::CREDIT_REQUEST, _) => {
                self.control.push_back(Control { guest_port, host_port, op: op::CREDIT_UPDATE, flags: 0 });
            }
            // REQUEST (the guest connecting out) is not offered; anything else is a protocol
            // error on this connection.
            _ => {
                self.control.push_back(rst);
                self.close(host_port);
            }
        }
        // More room in the guest: data from the client may flow again.
        if wants_data {
            self.mark_ready(host_port);
        }
    }

    /// Writes what the guest sent to the client; tells the guest about the room made.
    fn flush(&mut self, port: u32) {
        let Some(c) = self.conns.get_mut(&port) else { return };
        while c.writable && !c.outbound.is_empty() {
            let (front, _) = c.outbound.as_slices();
            match c.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    c.outbound.drain(..n);
                    // The OK line of the hybrid protocol is not guest data.
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.writable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    let rst = Control { guest_port: c.guest_port, host_port: port, op: op::RST, flags: 0 };
                    self.control.push_back(rst);
                    return self.close(port);
                }
            }
        }
        let told = c.fwd_cnt.wrapping_sub(c.fwd_cnt_told);
        if told >= HOST_BUF_ALLOC / 4 {
            c.fwd_cnt_told = c.fwd_cnt;
            self.control.push_back(Control {
                guest_port: c.guest_port,
                host_port: port,
                op: op::CREDIT_UPDATE,
                flags: 0,
            });
        }
        if c.state == State::GuestClosed && c.outbound.is_empty() {
            let rst = Control { guest_port: c.guest_port, host_port: port, op: op::RST, flags: 0 };
            self.control.push_back(rst);
            c.stream.shutdown_write();
            self.close(port);
        }
    }

    /// Drops a connection (its socket closes).
    fn close(&mut self, port: u32) {
        if self.conns.remove(&port).is_some() {
            self.shared.stats.open.fetch_sub(1, Ordering::Relaxed);
            self.last_activity = Instant::now();
        }
    }

    /// Fills the guest's receive queue: control packets first, then data the guest has
    /// credit for. Wakes the guest when it put anything there.
    fn process_rx(&mut self) -> bool {
        if !self.live || (self.control.is_empty() && self.ready.is_empty()) {
            return false;
        }
        let shared = Arc::clone(&self.shared);
        let snapshot = self.mem.snapshot();
        let mem: &GuestMemoryMmap = &snapshot;
        let mut core = shared.core();
        if self.rx_starved {
            // Buffers came back (that is why we run): stop the guest's notifications again.
            if let Some(q) = core.queues.as_mut() {
                let _ = q.rx.disable_notification(mem);
            }
            self.rx_starved = false;
        }
        let mut delivered = 0usize;
        let mut rounds = 0usize;
        while rounds < BATCH * 2 {
            rounds += 1;
            let next = match self.control.pop_front() {
                Some(c) => Some(Outgoing::Control(c)),
                None => self.next_data(),
            };
            let Some(out) = next else { break };
            match Self::deliver(&mut core, mem, &out, &self.conns, &shared) {
                Delivery::Done(bytes) => {
                    delivered += 1;
                    self.after_delivery(out, bytes);
                }
                Delivery::NoBuffer => {
                    // Keep it for when the guest recycles a buffer; let the guest notify then.
                    match out {
                        Outgoing::Control(c) => self.control.push_front(c),
                        Outgoing::Data(port) => {
                            if let Some(c) = self.conns.get_mut(&port) {
                                c.queued = true;
                            }
                            self.ready.push_front(port);
                        }
                    }
                    // The guest recycles buffers as it polls: ask it to notify when it does.
                    if let Some(q) = core.queues.as_mut()
                        && q.rx.enable_notification(mem).unwrap_or(false)
                    {
                        let _ = q.rx.disable_notification(mem);
                        continue;
                    }
                    self.rx_starved = true;
                    break;
                }
                Delivery::Broken(why) => {
                    shared.mark_broken(&mut core, &self.mem, why);
                    break;
                }
            }
        }
        drop(core);
        if delivered > 0 {
            shared.stats.packets_to_guest.fetch_add(delivered as u64, Ordering::Relaxed);
            (self.wake)();
        }
        delivered > 0
    }

    /// The next connection with data for the guest (read from its client if needed).
    fn next_data(&mut self) -> Option<Outgoing> {
        while let Some(port) = self.ready.pop_front() {
            let Some(c) = self.conns.get_mut(&port) else { continue };
            c.queued = false;
            if c.state != State::Established {
                continue;
            }
            if c.inbound.is_empty() && c.readable && !c.client_eof {
                let room = (c.guest_free() as usize).min(4096 - PKT_HEADER_SIZE);
                if room == 0 {
                    if !c.credit_requested {
                        c.credit_requested = true;
                        self.control.push_back(Control {
                            guest_port: c.guest_port,
                            host_port: port,
                            op: op::CREDIT_REQUEST,
                            flags: 0,
                        });
                    }
                    continue;
                }
                c.inbound.resize(room, 0);
                match c.stream.read(&mut c.inbound) {
                    Ok(0) => {
                        c.inbound.clear();
                        c.client_eof = true;
                    }
                    Ok(n) => c.inbound.truncate(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                        c.inbound.clear();
                        c.readable = e.kind() == ErrorKind::Interrupted;
                    }
                    Err(_) => {
                        c.inbound.clear();
                        c.client_eof = true;
                    }
                }
            }
            if c.client_eof && c.inbound.is_empty() {
                // The client is done: tell the guest, then wait for its RST.
                c.state = State::ClientClosed { deadline: Instant::now() + CLOSE_TIMEOUT };
                self.control.push_back(Control {
                    guest_port: c.guest_port,
                    host_port: port,
                    op: op::SHUTDOWN,
                    flags: op::SHUTDOWN_BOTH,
                });
                return self.control.pop_front().map(Outgoing::Control);
            }
            if !c.inbound.is_empty() {
                return Some(Outgoing::Data(port));
            }
        }
        None
    }

    fn after_delivery(&mut self, out: Outgoing, bytes: usize) {
        if let Outgoing::Data(port) = out
            && let Some(c) = self.conns.get_mut(&port)
        {
            c.rx_cnt = c.rx_cnt.wrapping_add(bytes as u32);
            c.inbound.drain(..bytes.min(c.inbound.len()));
            self.shared.stats.bytes_to_guest.fetch_add(bytes as u64, Ordering::Relaxed);
            if c.readable || !c.inbound.is_empty() {
                self.mark_ready(port);
            }
        }
    }

    /// Writes one packet into the next receive buffer.
    fn deliver(
        core: &mut Core,
        mem: &GuestMemoryMmap,
        out: &Outgoing,
        conns: &HashMap<u32, Conn>,
        shared: &VsockShared,
    ) -> Delivery {
        let Some(queues) = core.queues.as_mut() else { return Delivery::NoBuffer };
        let chain = match queues.rx.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => return Delivery::Broken(format!("receive queue: {e}")),
        };
        let Some(mut chain) = chain else { return Delivery::NoBuffer };
        let head = chain.head_index();
        if !chain_in_kernel_ram(&chain) {
            return Delivery::Broken("a receive buffer lies below the kernel (the guest-protected region)".into());
        }
        let (used, bytes) = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PACKET_DATA) {
            Ok(mut pkt) => {
                let (guest_port, host_port, kind, flags, data) = match out {
                    Outgoing::Control(c) => (c.guest_port, c.host_port, c.op, c.flags, &[][..]),
                    Outgoing::Data(port) => match conns.get(port) {
                        Some(c) => (c.guest_port, *port, op::RW, 0, &c.inbound[..]),
                        None => return Delivery::Done(0),
                    },
                };
                let room = pkt.data_slice().map_or(0, |d| d.len());
                let n = data.len().min(room);
                let (buf_alloc, fwd_cnt) = conns.get(&host_port).map_or((0, 0), |c| (HOST_BUF_ALLOC, c.fwd_cnt));
                if pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE]).is_err() {
                    shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    (0, 0)
                } else {
                    if n > 0
                        && let Some(d) = pkt.data_slice()
                    {
                        match d.subslice(0, n) {
                            Ok(s) => s.copy_from(&data[..n]),
                            Err(_) => {
                                shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    pkt.set_src_cid(HOST_CID)
                        .set_dst_cid(GUEST_CID)
                        .set_src_port(host_port)
                        .set_dst_port(guest_port)
                        .set_type(op::TYPE_STREAM)
                        .set_op(kind)
                        .set_flags(flags)
                        .set_len(n as u32)
                        .set_buf_alloc(buf_alloc)
                        .set_fwd_cnt(fwd_cnt);
                    ((PKT_HEADER_SIZE + n) as u32, n)
                }
            }
            Err(_) => {
                shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
                (0, 0)
            }
        };
        match queues.rx.add_used(mem, head, used) {
            Ok(()) if used > 0 => Delivery::Done(bytes),
            // An unusable buffer was returned empty; try the next one.
            Ok(()) => Delivery::Done(0),
            Err(e) => Delivery::Broken(format!("receive queue: {e}")),
        }
    }

    fn run_timers(&mut self, now: Instant) {
        let mut due = Vec::new();
        for (&port, c) in &self.conns {
            match c.state {
                State::Handshake { deadline } | State::ClientClosed { deadline } if now >= deadline => {
                    due.push((port, true))
                }
                State::Connecting { deadline, .. } if now >= deadline => due.push((port, true)),
                State::Connecting { retry_at: Some(r), .. } if now >= r => due.push((port, false)),
                _ => {}
            }
        }
        for (port, expired) in due {
            if expired {
                if let Some(c) = self.conns.get(&port) {
                    if matches!(c.state, State::Connecting { .. }) {
                        self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    if matches!(c.state, State::ClientClosed { .. }) {
                        let rst = Control { guest_port: c.guest_port, host_port: port, op: op::RST, flags: 0 };
                        self.control.push_back(rst);
                    }
                }
                self.close(port);
            } else {
                self.send_request(port);
            }
        }
    }
}

/// What to put in the next receive buffer.
#[derive(Debug, Clone, Copy)]
enum Outgoing {
    Control(Control),
    Data(u32),
}

enum Delivery {
    /// Delivered, with this many payload bytes.
    Done(usize),
    /// No receive buffer is free.
    NoBuffer,
    /// The queue is malformed.
    Broken(String),
}
