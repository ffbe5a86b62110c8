//! The vsock device's I/O thread: accepts clients on the published endpoints, runs one state
//! machine per connection ([`super::conn`]), and moves bytes between host sockets and the
//! guest's virtqueues (the ring work is in [`super::packets`]).
//!
//! * Guest to host (TX queue): packets are taken from the queue and answered at once (the
//!   guest's driver waits for each); payload goes to the client's socket, and what the socket
//!   cannot take yet waits in a buffer bounded by the credit the host advertised.
//! * Host to guest (RX queue): control packets first, then data, read from a client only when
//!   the guest has credit for it and a receive buffer is free; a blocked vCPU is woken.
//! * Notifications: after traffic the thread keeps polling for a window that adapts to what
//!   polling catches ([`super::poll`]; zero when it does not pay), with the guest's transmit
//!   notifications suppressed, so a busy guest sends without exits; the RX queue's
//!   notifications stay off unless the thread waits for a receive buffer. The guest asks to be
//!   woken for used transmit buffers only when its queue is full.
//! * Connection set-up is host-initiated (a client connects; the device sends REQUEST to the
//!   guest port). A guest that is not listening yet (still booting) answers RST: the request is
//!   repeated with back-off for [`CONNECT_TIMEOUT`] before the client is closed.
//! * The VM drives the thread with [`IoCommand`]s (hold still for a snapshot, go on, stop),
//!   and the thread reaches the VM only through its [`DeviceContext`] (wake the guest, ask the
//!   VM to stop when idle).

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::time::{Duration, Instant};

use hypercall_abi::virtio::vsock::HOST_BUF_ALLOC;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::conn::{CONNECT_LINE_MAX, Conn, Control, HostStream, State, op, parse_connect_line};
use super::poll::PollWindow;
use super::{Held, MAX_CONNECTIONS, VsockShared};
use crate::base::memory::GuestMemory;
use crate::devices::{DeviceContext, StopReason};
use crate::host::endpoint::Bound;

/// How long a client waits for the guest to accept (a booting guest may not listen yet).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of the first connection retries to a guest port nobody listens on yet.
pub(super) const FAST_RETRY: Duration = Duration::from_micros(250);
/// How many retries come at [`FAST_RETRY`] (50 ms worth) before the back-off.
pub(super) const FAST_RETRIES: u32 = 200;
/// How long the guest has to answer a SHUTDOWN with RST.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a hybrid-vsock client has to send its CONNECT line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// First host-side port number given to connections.
pub(super) const FIRST_HOST_PORT: u32 = 1 << 30;

const TOKEN_KICK: u64 = 0;
const TOKEN_COMMAND: u64 = 1;
const TOKEN_LISTENER: u64 = 2;
const TOKEN_CONN: u64 = 1 << 32;

/// What the VM asks of the I/O thread.
#[derive(Debug)]
pub(super) enum IoCommand {
    /// Hold still (touch neither queues nor sockets; clients wait in the kernel's buffers)
    /// and answer what is open, until [`IoCommand::Release`] or [`IoCommand::Stop`].
    Hold(SyncSender<Held>),
    /// Go on after a hold.
    Release,
    /// Let client data flow after the template point (the template is taken, or will not be).
    OpenGate,
    /// End the thread (every connection closes).
    Stop,
}

/// The I/O thread's state.
pub(super) struct Muxer {
    pub(super) shared: Arc<VsockShared>,
    pub(super) mem: GuestMemory,
    epoll: Epoll,
    endpoints: Vec<Bound>,
    pub(super) conns: HashMap<u32, Conn>,
    pub(super) control: VecDeque<Control>,
    pub(super) ready: VecDeque<u32>,
    next_port: u32,
    generation: u64,
    pub(super) live: bool,
    pub(super) ctx: DeviceContext,
    kick: Arc<EventFd>,
    commands: Receiver<IoCommand>,
    command_kick: Arc<EventFd>,
    pub(super) rx_starved: bool,
    /// The guest's transmit notifications are off (the thread is polling).
    pub(super) tx_suppressed: bool,
    /// Connections with guest data to write out after the current transmit batch.
    pub(super) to_flush: Vec<u32>,
    pub(super) buf: Vec<u8>,
    /// Idle shutdown: after this long with no connection open, stop accepting and ask the VM
    /// to stop.
    idle: Option<Duration>,
    /// The last time a connection opened or closed (or the thread started).
    last_activity: Instant,
    /// Whether the listeners are watched (false once the idle shutdown fired: clients that
    /// connect from then on wait in the listen backlog for the next VM).
    accepting: bool,
    /// A restored device: RSTs for the connections the guest had open at the snapshot (their
    /// clients belonged to the old process), sent once the queues are live.
    pending_resets: Vec<Control>,
    /// The guest's bytes have reached a client (told to the VM once).
    replied: bool,
    /// The template point: where client data waits while the VM takes a template.
    gate: Gate,
}

/// The template point of a VM that is to leave a template (see
/// [`DeviceSetup::template_gate`](crate::devices::DeviceSetup)): at the guest's first accepted
/// connection, client data stops short of the guest (the connections queued for data move to
/// `waiting`, and no data leaves while the gate is closed) until the VM opens the gate
/// ([`IoCommand::OpenGate`], after the template is taken or given up), or for at most
/// [`TEMPLATE_GATE_MAX`](crate::devices::TEMPLATE_GATE_MAX).
#[derive(Debug)]
enum Gate {
    /// No template wanted, or taken.
    Open,
    /// Closes at the guest's first accepted connection.
    Armed,
    /// Closed: the connections whose data waits, and when the gate opens by itself.
    Closed { waiting: Vec<u32>, until: Instant },
}

/// Everything the thread starts from.
pub(super) struct Start {
    pub(super) shared: Arc<VsockShared>,
    pub(super) mem: GuestMemory,
    pub(super) endpoints: Vec<Bound>,
    pub(super) ctx: DeviceContext,
    pub(super) kick: Arc<EventFd>,
    pub(super) commands: Receiver<IoCommand>,
    pub(super) command_kick: Arc<EventFd>,
    pub(super) idle: Option<Duration>,
    pub(super) resume: Option<Held>,
    /// Pin the thread (`--pin-io`).
    pub(super) pin: bool,
    /// Stop at the template point (see [`Gate`]).
    pub(super) template_gate: bool,
}

/// The thread's body.
pub(super) fn run(start: Start) {
    if start.pin {
        crate::host::affinity::place(crate::host::affinity::Role::DeviceIo);
    }
    crate::host::seccomp::install_thread(crate::host::seccomp::Role::Io);
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            start.shared.diag.say(format_args!("vsock I/O thread: cannot create an epoll instance: {e}"));
            return;
        }
    };
    let Start { shared, mem, endpoints, ctx, kick, commands, command_kick, idle, resume, pin: _, template_gate } =
        start;
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
        ctx,
        kick,
        commands,
        command_kick,
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
                    .map(|(guest_port, host_port)| Control::new(guest_port, host_port, op::RST))
                    .collect()
            })
            .unwrap_or_default(),
        replied: false,
        gate: if template_gate { Gate::Armed } else { Gate::Open },
    };
    if let Err(e) = m.register() {
        m.shared.diag.say(format_args!("vsock I/O thread: cannot watch its sockets: {e}"));
        return;
    }
    m.main_loop();
}

impl Muxer {
    fn register(&mut self) -> std::io::Result<()> {
        let add =
            |fd: RawFd, token: u64| self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(self.kick.as_raw_fd(), TOKEN_KICK)?;
        add(self.command_kick.as_raw_fd(), TOKEN_COMMAND)?;
        for (i, e) in self.endpoints.iter().enumerate() {
            add(e.raw_fd(), TOKEN_LISTENER + i as u64)?;
        }
        Ok(())
    }

    /// When the idle shutdown is due (`None`: not armed, or connections are open).
    fn idle_deadline(&self) -> Option<Instant> {
        let idle = self.idle?;
        (self.accepting && self.conns.is_empty()).then(|| self.last_activity + idle)
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
        if let Some(after) = self.idle {
            self.ctx.request_stop(StopReason::Idle(after));
        }
    }

    fn main_loop(&mut self) {
        let mut events = vec![EpollEvent::default(); 256];
        let mut window = PollWindow::new();
        // While polling: until when (the end of an iteration decides when to stop, and turns
        // the guest's notifications back on first, so the thread never sleeps with them off).
        let mut busy_until: Option<Instant> = None;
        let mut polls = 0u32;
        let mut poll_started: Option<Instant> = None;
        loop {
            let timeout = if busy_until.is_some() { 0 } else { self.next_timer_ms(Instant::now()) };
            if busy_until.is_some() {
                // Polling: now and then leave the CPU to a thread that wants it (this host may
                // have fewer CPUs than runnable threads).
                polls = polls.wrapping_add(1);
                if polls.is_multiple_of(8) {
                    std::thread::yield_now();
                }
            } else {
                window.sleeping(Instant::now());
                self.shared.stats.io_sleeps.fetch_add(1, Ordering::Relaxed);
            }
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => {
                    self.shared.diag.say(format_args!("vsock I/O thread: epoll failed: {e}"));
                    return;
                }
            };
            let mut work = n > 0;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KICK => {
                        let _ = self.kick.read();
                    }
                    TOKEN_COMMAND => {
                        let _ = self.command_kick.read();
                        if !self.serve_commands() {
                            return;
                        }
                    }
                    t if t >= TOKEN_CONN => self.conn_event((t - TOKEN_CONN) as u32, ev.event_set()),
                    t => self.accept((t - TOKEN_LISTENER) as usize),
                }
            }
            work |= self.sync_device();
            work |= self.process_tx();
            work |= self.process_rx();
            let now = Instant::now();
            window.woke(now, work);
            self.run_timers(now);
            self.check_idle(now);
            if work {
                // Look once more at once, and keep looking for the window's length.
                busy_until = Some(window.after_work(now).unwrap_or(now));
                poll_started.get_or_insert(now);
            } else if busy_until.is_none_or(|t| now >= t) {
                busy_until = None;
                if let Some(at) = poll_started.take() {
                    let us = now.saturating_duration_since(at).as_micros() as u64;
                    self.shared.stats.io_poll_us.fetch_add(us, Ordering::Relaxed);
                }
                self.shared.stats.io_poll_window_us.store(window.window().as_micros() as u64, Ordering::Relaxed);
                // Going to sleep: let the guest notify again; if it queued something
                // meanwhile, go round once more.
                if self.tx_suppressed && self.enable_tx_notifications() {
                    busy_until = Some(now);
                    poll_started = Some(now);
                }
            }
        }
    }

    /// Serves the VM's commands; `false` when the thread is to end.
    fn serve_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(IoCommand::Hold(reply)) => {
                    if !self.hold_still(&reply) {
                        return false;
                    }
                }
                // A release with no hold under way (the hold was given up on): nothing to do.
                Ok(IoCommand::Release) => {}
                Ok(IoCommand::OpenGate) => self.open_gate(),
                Ok(IoCommand::Stop) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    /// A snapshot asked the thread to hold still: it reports its connections and waits
    /// (touching neither queues nor sockets) for the release. `false` when it is to stop
    /// instead.
    fn hold_still(&mut self, reply: &SyncSender<Held>) -> bool {
        let mut connections: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.state, State::Handshake { .. }))
            .map(|(&host_port, c)| (c.guest_port, host_port))
            .collect();
        connections.sort_unstable();
        let _ = reply.send(Held { connections, next_port: self.next_port });
        loop {
            match self.commands.recv() {
                Ok(IoCommand::Release) => return true,
                // Only after the template's hold is released.
                Ok(IoCommand::OpenGate) => {}
                Ok(IoCommand::Hold(again)) => {
                    let _ = again.send(Held { connections: Vec::new(), next_port: self.next_port });
                }
                Ok(IoCommand::Stop) | Err(_) => return false,
            }
        }
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
        if let Gate::Closed { until, .. } = self.gate {
            next = Some(next.map_or(until, |n| n.min(until)));
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
        if stream.prepare().is_err() {
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
        self.conns.insert(host_port, Conn::new(stream, guest_port.unwrap_or(0), state, uds));
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
        c.hung_up |= events.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR);
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

    /// The guest accepted a connection: at the first one, a VM taking a template closes the
    /// gate and is told (see [`Gate`]).
    pub(super) fn accepted(&mut self) {
        if matches!(self.gate, Gate::Armed) {
            // Connections already queued for data wait too (the ready queue holds them).
            let mut waiting = Vec::new();
            for port in self.ready.drain(..) {
                if let Some(c) = self.conns.get_mut(&port) {
                    c.queued = false;
                }
                if !waiting.contains(&port) {
                    waiting.push(port);
                }
            }
            self.gate = Gate::Closed { waiting, until: Instant::now() + crate::devices::TEMPLATE_GATE_MAX };
            self.ctx.template_point();
        }
    }

    /// Lets the data that waited at the template point flow.
    pub(super) fn gate_closed(&self) -> bool {
        matches!(self.gate, Gate::Closed { .. })
    }

    fn open_gate(&mut self) {
        if let Gate::Closed { waiting, .. } = std::mem::replace(&mut self.gate, Gate::Open) {
            for port in waiting {
                self.mark_ready(port);
                self.to_flush.push(port);
            }
        }
    }

    pub(super) fn mark_ready(&mut self, port: u32) {
        if let Gate::Closed { waiting, .. } = &mut self.gate {
            if !waiting.contains(&port) {
                waiting.push(port);
            }
            return;
        }
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
            self.control.push_back(Control::new(c.guest_port, port, op::REQUEST));
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
            // RX notifications stay off until the device waits for a buffer. TX notifications
            // go on: a device restored from a snapshot taken while it polled would otherwise
            // inherit, in guest memory, a guest told not to notify, with no thread polling.
            let snapshot = self.mem.snapshot();
            let mut core = self.shared.core();
            if let Some(q) = core.queues.as_mut() {
                let _ = q.rx.disable_notification(&*snapshot);
                let _ = q.tx.enable_notification(&*snapshot);
            }
        }
        true
    }

    /// Writes what the guest sent to the client; tells the guest about the room made.
    pub(super) fn flush(&mut self, port: u32) {
        let Some(c) = self.conns.get_mut(&port) else { return };
        while c.writable && !c.outbound.is_empty() {
            let (front, _) = c.outbound.as_slices();
            match c.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    c.outbound.drain(..n);
                    // The OK line of the hybrid protocol is not guest data.
                    let own = n.min(c.preamble);
                    c.preamble -= own;
                    c.fwd_cnt = c.fwd_cnt.wrapping_add((n - own) as u32);
                    if n > own && !self.replied {
                        self.replied = true;
                        self.ctx.replied();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.writable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    let rst = Control::new(c.guest_port, port, op::RST);
                    self.control.push_back(rst);
                    return self.close(port);
                }
            }
        }
        let told = c.fwd_cnt.wrapping_sub(c.fwd_cnt_told);
        if told >= HOST_BUF_ALLOC / 4 {
            c.fwd_cnt_told = c.fwd_cnt;
            self.control.push_back(Control::new(c.guest_port, port, op::CREDIT_UPDATE));
        }
        if c.state == State::GuestClosed && c.outbound.is_empty() {
            let rst = Control::new(c.guest_port, port, op::RST);
            self.control.push_back(rst);
            c.stream.shutdown_write();
            self.close(port);
        }
    }

    /// Drops a connection (its socket closes).
    pub(super) fn close(&mut self, port: u32) {
        if self.conns.remove(&port).is_some() {
            self.shared.stats.open.fetch_sub(1, Ordering::Relaxed);
            self.last_activity = Instant::now();
        }
    }

    fn run_timers(&mut self, now: Instant) {
        if matches!(self.gate, Gate::Closed { until, .. } if now >= until) {
            self.open_gate();
        }
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
                        let rst = Control::new(c.guest_port, port, op::RST);
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
