//! The virtio-vsock device: the request channel between clients on the host and services in
//! the guest.
//!
//! * [`endpoint`]: the host side clients connect to (published TCP ports, the hybrid-vsock
//!   Unix socket).
//! * [`muxer`]: the I/O thread (epoll) that moves bytes between host sockets and the guest's
//!   virtqueues, one state machine per connection, with vsock credit flow in both directions.
//! * This module: the state vCPU threads and the I/O thread share (the transport's device
//!   page and the live queues), and the DEVICE_NOTIFY handling.
//!
//! Bounds (a guest or a client cannot grow the shim's memory without limit): at most
//! [`MAX_CONNECTIONS`] connections per VM; per connection at most
//! [`HOST_BUF_ALLOC`](hypercall_abi::virtio::vsock::HOST_BUF_ALLOC) bytes from the guest
//! waiting for a slow client (the guest's credit), and at most one packet's worth read from
//! the client ahead of the guest's credit.

pub mod endpoint;
mod muxer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use hypercall_abi::Status;
use hypercall_abi::virtio::{VIRTIO_CONFIG_SIZE, VIRTIO_ID_VSOCK, feature, vsock};
use serde::Serialize;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::pv::{PvDevice, StatusChange};
use crate::base::memory::GuestMemory;

pub use endpoint::{Bound, EndpointError, Publish};

impl std::fmt::Debug for IdleShutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleShutdown").field("after", &self.after).finish_non_exhaustive()
    }
}

/// Most connections one VM may have open; further clients are refused (closed at once).
pub const MAX_CONNECTIONS: usize = 2048;

/// Largest queue the device accepts.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Wakes the guest so it polls its queues (the VM wakes a blocked vCPU).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Scale to zero: after `after` with no connection open, the I/O thread stops accepting (new
/// clients wait in the listen backlog) and calls `fire` (which asks the guest to stop).
#[derive(Clone)]
pub struct IdleShutdown {
    /// Idle time before the shutdown.
    pub after: std::time::Duration,
    /// Called once, from the I/O thread.
    pub fire: Wake,
}

/// The device's live queues.
#[derive(Debug)]
pub(crate) struct Queues {
    pub(crate) rx: Queue,
    pub(crate) tx: Queue,
}

/// What the vCPU threads and the I/O thread share.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) pv: PvDevice,
    pub(crate) queues: Option<Queues>,
    /// Changes at every reset and activation.
    pub(crate) generation: u64,
    /// Set when a queue turned out malformed: the device stops for this VM.
    pub(crate) broken: Option<String>,
}

/// Counters of the device (the summary's `vsock` section).
#[derive(Debug, Default)]
pub struct VsockStats {
    /// Connections accepted from clients.
    pub connections: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Clients refused (connection cap, or the guest never accepted).
    pub refused: AtomicU64,
    /// Packets taken from the guest's transmit queue.
    pub packets_from_guest: AtomicU64,
    /// Packets put in the guest's receive queue.
    pub packets_to_guest: AtomicU64,
    /// Payload bytes from clients to the guest.
    pub bytes_to_guest: AtomicU64,
    /// Payload bytes from the guest to clients.
    pub bytes_from_guest: AtomicU64,
    /// Malformed packets or descriptor chains (answered, dropped).
    pub malformed: AtomicU64,
    /// DEVICE_NOTIFY calls for this device's queues.
    pub queue_notifies: AtomicU64,
    /// Times the guest woke up because the device had packets for it.
    pub guest_wakeups: AtomicU64,
    /// Device resets by the guest.
    pub resets: AtomicU64,
    /// The device was marked broken.
    pub broken: AtomicBool,
    /// The idle shutdown fired.
    pub idle_shutdown: AtomicBool,
}

/// A snapshot of [`VsockStats`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct VsockFigures {
    /// Connections accepted from clients.
    pub connections: u64,
    /// Clients refused.
    pub refused: u64,
    /// Packets from the guest.
    pub packets_from_guest: u64,
    /// Packets to the guest.
    pub packets_to_guest: u64,
    /// Bytes clients sent to the guest.
    pub bytes_to_guest: u64,
    /// Bytes the guest sent to clients.
    pub bytes_from_guest: u64,
    /// Malformed packets or chains.
    pub malformed: u64,
    /// DEVICE_NOTIFY calls for queues.
    pub queue_notifies: u64,
    /// Wake-ups of a blocked vCPU for packets.
    pub guest_wakeups: u64,
    /// Whether the device was marked broken.
    pub broken: bool,
    /// Whether the VM was asked to stop because no client had a connection open for the
    /// idle-shutdown time.
    pub idle_shutdown: bool,
}

impl VsockStats {
    /// The current figures.
    pub fn figures(&self) -> VsockFigures {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VsockFigures {
            connections: l(&self.connections),
            refused: l(&self.refused),
            packets_from_guest: l(&self.packets_from_guest),
            packets_to_guest: l(&self.packets_to_guest),
            bytes_to_guest: l(&self.bytes_to_guest),
            bytes_from_guest: l(&self.bytes_from_guest),
            malformed: l(&self.malformed),
            queue_notifies: l(&self.queue_notifies),
            guest_wakeups: l(&self.guest_wakeups),
            broken: self.broken.load(Ordering::Relaxed),
            idle_shutdown: self.idle_shutdown.load(Ordering::Relaxed),
        }
    }
}

/// One virtqueue's device-side state, as a snapshot carries it.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct SavedQueue {
    /// Largest size the device accepts.
    pub max_size: u16,
    /// Next available-ring entry the device takes.
    pub next_avail: u16,
    /// Next used-ring entry the device fills.
    pub next_used: u16,
    /// EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl SavedQueue {
    fn of(q: &Queue) -> SavedQueue {
        let s = q.state();
        SavedQueue {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }

    fn queue(&self, mem: &GuestMemory) -> Result<Queue, String> {
        let q = Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("saved queue refused: {e:?}"))?;
        if self.ready && !virtio_queue::QueueT::is_valid(&q, &*mem.snapshot()) {
            return Err("saved queue lies outside guest memory".into());
        }
        Ok(q)
    }
}

/// The device's state in a snapshot: the transport's negotiation, the live queues, and the
/// connections that were open (reset on restore: their clients belonged to the old process).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeviceState {
    /// Features the driver accepted.
    pub negotiated: u64,
    /// Device status.
    pub status: u32,
    /// RX and TX queues when the driver had set them up.
    pub queues: Option<[SavedQueue; 2]>,
    /// Why the device was broken, if it was.
    pub broken: Option<String>,
    /// Open connections: (guest port, host port).
    pub connections: Vec<(u32, u32)>,
    /// Next host port the device hands out.
    pub next_port: u32,
}

/// What the I/O thread reports when it holds still.
#[derive(Debug, Clone, Default)]
pub(crate) struct Held {
    pub(crate) connections: Vec<(u32, u32)>,
    pub(crate) next_port: u32,
}

#[derive(Debug, Default)]
pub(crate) struct Hold {
    /// A snapshot asked the I/O thread to hold still.
    pub(crate) requested: bool,
    /// Set by the I/O thread while it holds.
    pub(crate) held: Option<Held>,
}

/// State shared by the vCPU threads (notifies) and the I/O thread.
#[derive(Debug)]
pub struct VsockShared {
    core: Mutex<Core>,
    kick: EventFd,
    /// Counters.
    pub stats: VsockStats,
    pub(crate) hold: Mutex<Hold>,
    pub(crate) hold_cond: std::sync::Condvar,
    /// The endpoints moved to another process (a migration): their Unix socket paths stay.
    pub(crate) keep_paths: AtomicBool,
}

impl VsockShared {
    pub(crate) fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the device broken for this VM (a malformed queue): it stops serving; the shim
    /// carries on.
    pub(crate) fn mark_broken(&self, core: &mut Core, mem: &GuestMemory, why: String) {
        if core.broken.is_none() {
            eprintln!("hypervisor-shim: vsock device stopped for this VM: {why}");
            core.broken = Some(why);
            core.queues = None;
            core.generation += 1;
            core.pv.set_needs_reset(mem);
            self.stats.broken.store(true, Ordering::Relaxed);
        }
    }
}

/// One VM's vsock device.
pub struct Vsock {
    /// Shared state.
    pub shared: Arc<VsockShared>,
    thread: Mutex<Option<(JoinHandle<()>, EventFd)>>,
    /// A restored device: the connections to reset and the next host port.
    resume: Mutex<Option<Held>>,
    /// Copies of the listening sockets the I/O thread serves (a migration hands them over).
    listeners: Mutex<Vec<Bound>>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock").field("shared", &self.shared).finish_non_exhaustive()
    }
}

/// Failures setting the device up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// The I/O thread could not start.
    #[error("cannot start the vsock I/O thread: {0}")]
    Thread(std::io::Error),
    /// The device page could not be written.
    #[error(transparent)]
    Page(#[from] super::pv::TransportError),
    /// A saved device state was refused.
    #[error("restoring the vsock device: {0}")]
    Restore(String),
}

impl Vsock {
    /// The transport's description of the device whose page is at `page`.
    fn pv(page: u64) -> PvDevice {
        let mut config = [0u8; VIRTIO_CONFIG_SIZE];
        config[..8].copy_from_slice(&vsock::GUEST_CID.to_le_bytes());
        PvDevice {
            page,
            device_id: VIRTIO_ID_VSOCK,
            num_queues: 3,
            // EVENT_IDX is not offered: with virtio-drivers it costs more notifies than
            // the used-ring flag; nor are indirect descriptors (a heap allocation per packet
            // in the driver, for chains of two). See docs/abi.md.
            offered: feature::VERSION_1,
            queue_max_size: QUEUE_MAX_SIZE,
            config,
            negotiated: 0,
            status: 0,
        }
    }

    /// The device whose page is at `page`, not yet serving.
    pub fn new(page: u64, mem: &GuestMemory) -> Result<Vsock, VsockError> {
        let pv = Self::pv(page);
        pv.write_page(mem)?;
        Self::with_core(Core { pv, queues: None, generation: 0, broken: None })
    }

    fn with_core(core: Core) -> Result<Vsock, VsockError> {
        let kick = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        let shared = Arc::new(VsockShared {
            core: Mutex::new(core),
            kick,
            stats: VsockStats::default(),
            hold: Mutex::new(Hold::default()),
            hold_cond: std::sync::Condvar::new(),
            keep_paths: AtomicBool::new(false),
        });
        Ok(Vsock { shared, thread: Mutex::new(None), resume: Mutex::new(None), listeners: Mutex::new(Vec::new()) })
    }

    /// The device of a restored VM: its page is already in guest memory (not rewritten), the
    /// negotiation and queues come from `state`; the connections it lists are reset when the
    /// I/O thread starts.
    pub fn restore(page: u64, mem: &GuestMemory, state: &DeviceState) -> Result<Vsock, VsockError> {
        let mut core = Core { pv: Self::pv(page), queues: None, generation: 0, broken: None };
        core.pv.negotiated = state.negotiated;
        core.pv.status = state.status;
        core.broken = state.broken.clone();
        core.queues = match &state.queues {
            Some([rx, tx]) if state.broken.is_none() => Some(Queues {
                rx: rx.queue(mem).map_err(VsockError::Restore)?,
                tx: tx.queue(mem).map_err(VsockError::Restore)?,
            }),
            _ => None,
        };
        let v = Self::with_core(core)?;
        *v.resume.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Held { connections: state.connections.clone(), next_port: state.next_port });
        Ok(v)
    }

    /// The device's state for a snapshot, with the I/O thread holding still (`held`).
    pub(crate) fn state(&self, held: &Held) -> DeviceState {
        let core = self.shared.core();
        DeviceState {
            negotiated: core.pv.negotiated,
            status: core.pv.status,
            queues: core.queues.as_ref().map(|q| [SavedQueue::of(&q.rx), SavedQueue::of(&q.tx)]),
            broken: core.broken.clone(),
            connections: held.connections.clone(),
            next_port: held.next_port,
        }
    }

    /// Makes the I/O thread hold still (it stops touching the queues and sockets; clients
    /// wait in the kernel's buffers) and returns what it reports; at most `within`.
    pub(crate) fn hold(&self, within: std::time::Duration) -> Result<Held, String> {
        if !self.is_running() {
            let resume = self.resume.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return Ok(resume.unwrap_or(Held { connections: Vec::new(), next_port: muxer::FIRST_HOST_PORT }));
        }
        let deadline = std::time::Instant::now() + within;
        let mut h = self.shared.hold.lock().unwrap_or_else(|p| p.into_inner());
        h.requested = true;
        let _ = self.shared.kick.write(1);
        loop {
            if let Some(held) = &h.held {
                return Ok(held.clone());
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                h.requested = false;
                return Err("the vsock I/O thread did not hold still".into());
            }
            h = self.shared.hold_cond.wait_timeout(h, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The listening sockets, for a migration to hand over; after it succeeded, `handed_over`
    /// keeps Unix socket paths in place when this process ends.
    pub(crate) fn listeners(&self) -> std::sync::MutexGuard<'_, Vec<Bound>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoints now belong to another process: their Unix socket paths stay.
    pub(crate) fn handed_over(&self) {
        self.shared.keep_paths.store(true, Ordering::Release);
    }

    /// Lets a held I/O thread go on.
    pub(crate) fn release(&self) {
        let mut h = self.shared.hold.lock().unwrap_or_else(|p| p.into_inner());
        h.requested = false;
        self.shared.hold_cond.notify_all();
    }

    /// Starts the I/O thread serving `endpoints` (named `name-io`), with an optional idle
    /// shutdown.
    pub fn start(
        &self,
        name: &str,
        mem: GuestMemory,
        endpoints: Vec<Bound>,
        wake: Wake,
        idle: Option<IdleShutdown>,
    ) -> Result<(), VsockError> {
        let copies =
            endpoints.iter().map(Bound::try_clone).collect::<Result<Vec<_>, _>>().map_err(VsockError::EventFd)?;
        *self.listeners.lock().unwrap_or_else(|p| p.into_inner()) = copies;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        let stop_thread = stop.try_clone().map_err(VsockError::EventFd)?;
        let kick = self.shared.kick.try_clone().map_err(VsockError::EventFd)?;
        let shared = Arc::clone(&self.shared);
        let resume = self.resume.lock().unwrap_or_else(|p| p.into_inner()).take();
        let handle = std::thread::Builder::new()
            .name(format!("{name}-io"))
            .spawn(move || muxer::run(shared, mem, endpoints, wake, kick, stop_thread, idle, resume))
            .map_err(VsockError::Thread)?;
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some((handle, stop));
        Ok(())
    }

    /// Whether the I/O thread runs.
    pub fn is_running(&self) -> bool {
        self.thread.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Serves DEVICE_NOTIFY for queue `queue` of this device (or a status change), from a
    /// vCPU thread.
    pub fn notify(&self, mem: &GuestMemory, queue: u16) -> Status {
        if queue == hypercall_abi::virtio::STATUS_CHANGED {
            return self.status_changed(mem);
        }
        if u32::from(queue) >= 3 {
            return Status::INVALID;
        }
        self.shared.stats.queue_notifies.fetch_add(1, Ordering::Relaxed);
        // The I/O thread does the work; a full counter (it cannot be, at 2^64) would only
        // mean a kick is already pending.
        let _ = self.shared.kick.write(1);
        Status::OK
    }

    fn status_changed(&self, mem: &GuestMemory) -> Status {
        let shared = &self.shared;
        let mut core = shared.core();
        if core.broken.is_some() {
            return Status::INVALID;
        }
        match core.pv.status_changed(mem) {
            Ok(StatusChange::Reset) => {
                core.queues = None;
                core.generation += 1;
                shared.stats.resets.fetch_add(1, Ordering::Relaxed);
            }
            Ok(StatusChange::DriverOk(mut queues)) => {
                if queues.len() < 2 {
                    shared.mark_broken(&mut core, mem, "the driver set up fewer than two queues".into());
                    return Status::INVALID;
                }
                let tx = queues.swap_remove(1);
                let rx = queues.swap_remove(0);
                core.queues = Some(Queues { rx, tx });
                core.generation += 1;
            }
            Ok(StatusChange::Progress) => return Status::OK,
            Err(e) => {
                core.pv.set_needs_reset(mem);
                eprintln!("hypervisor-shim: vsock device: the guest's setup was refused: {e}");
                return Status::INVALID;
            }
        }
        drop(core);
        let _ = shared.kick.write(1);
        Status::OK
    }

    /// Stops the I/O thread (closing every connection) and waits for it.
    pub fn stop(&self) {
        let running = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((handle, stop)) = running {
            // Stop first, then release a hold: a held thread ends without serving again.
            let _ = stop.write(1);
            self.release();
            let _ = handle.join();
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop();
    }
}
