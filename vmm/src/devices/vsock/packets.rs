//! The vsock device's ring work: packets the guest queued for the host (TX) and packets the
//! host puts in the guest's receive buffers (RX), on the I/O thread's [`Muxer`].

use std::collections::HashMap;
use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hypercall_abi::virtio::vsock::{GUEST_CID, HOST_BUF_ALLOC, HOST_CID, MAX_PACKET_DATA};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};

use super::conn::{Conn, Control, State, op};
use super::muxer::{CLOSE_TIMEOUT, FAST_RETRIES, FAST_RETRY, Muxer};
use super::{Core, VsockShared};
use crate::base::memory::Mmap as GuestMemoryMmap;

/// Packets handled per queue per pass (bounded work between socket events).
const BATCH: usize = 256;

/// Whether every buffer of `chain` lies at or above the kernel's load address (the device
/// never reads or writes the guest-protected region).
fn chain_in_kernel_ram<M: vm_memory::GuestMemory, T: std::ops::Deref<Target = M> + Clone>(
    chain: &virtio_queue::DescriptorChain<T>,
) -> bool {
    chain.clone().all(|d| d.addr().0 >= hypercall_abi::KERNEL_MIN_LOAD_ADDR)
}

impl Muxer {
    /// Takes what the guest queued for the host and answers each chain.
    pub(super) fn process_tx(&mut self) -> bool {
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
        // A guest whose transmit queue was full asked to hear when buffers come back.
        let wants_wake =
            handled > 0 && core.queues.as_mut().is_some_and(|q| q.tx.needs_notification(mem).unwrap_or(false));
        drop(core);
        if wants_wake && self.ctx.wake() {
            shared.stats.guest_wakeups.fetch_add(1, Ordering::Relaxed);
        }
        // The chains are answered; now the (slower) socket writes.
        let ports = std::mem::take(&mut self.to_flush);
        for port in ports {
            self.flush(port);
        }
        handled > 0
    }

    /// Re-enables the guest's transmit notifications before sleeping; `true` when the guest
    /// queued something meanwhile.
    pub(super) fn enable_tx_notifications(&mut self) -> bool {
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

    fn handle_tx<B: vm_memory::bitmap::BitmapSlice>(&mut self, pkt: &VsockPacket<'_, B>) {
        let stats = &self.shared.stats;
        if pkt.src_cid() != GUEST_CID || pkt.dst_cid() != HOST_CID {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (guest_port, host_port, kind) = (pkt.src_port(), pkt.dst_port(), pkt.op());
        let rst = Control::new(guest_port, host_port, op::RST);
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
                    c.preamble = ok.len();
                }
                self.accepted();
                self.mark_ready(host_port);
                self.to_flush.push(host_port);
            }
            (op::RST, State::Connecting { .. }) if pkt.flags() & op::RST_NO_LISTENER != 0 => {
                // The service is up and nobody listens on that port: the client is refused at
                // once (a reset, as a host with no listener would answer), not after the
                // retries meant for a booting guest.
                let guest_port = c.guest_port;
                c.stream.reset_on_close();
                stats.refused.fetch_add(1, Ordering::Relaxed);
                stats.refused_unused_port.fetch_add(1, Ordering::Relaxed);
                self.ctx.record("vsock_refused", guest_port);
                self.close(host_port);
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
                self.control.push_back(Control::new(guest_port, host_port, op::CREDIT_UPDATE));
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

    /// Fills the guest's receive queue: control packets first, then data the guest has
    /// credit for. Wakes the guest when it put anything there.
    pub(super) fn process_rx(&mut self) -> bool {
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
                // No client data while the template gate is closed (a second guard: the gate
                // also keeps connections out of the ready queue).
                None if self.gate_closed() => None,
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
            if self.ctx.wake() {
                shared.stats.guest_wakeups.fetch_add(1, Ordering::Relaxed);
            }
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
                        self.control.push_back(Control::new(c.guest_port, port, op::CREDIT_REQUEST));
                    }
                    continue;
                }
                c.inbound.resize(room, 0);
                match c.stream.read(&mut c.inbound) {
                    Ok(0) => {
                        c.inbound.clear();
                        c.client_eof = true;
                    }
                    Ok(n) => {
                        c.inbound.truncate(n);
                        // A short read emptied the socket (the next data is a new edge), so
                        // the read that would only say EAGAIN is skipped; after a hang-up the
                        // EOF is still to be read.
                        if n < room && !c.hung_up {
                            c.readable = false;
                        }
                    }
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
