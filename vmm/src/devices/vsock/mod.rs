//! The virtio-vsock device: the request channel between clients on the host and services in
//! the guest.
//!
//! * [`conn`]: one client connection (its socket, state machine, buffers and credit).
//! * [`packets`]: the work on the guest's virtqueues (TX packets in, RX packets out).
//! * [`muxer`]: the I/O thread (epoll) that accepts clients and drives the connections.
//! * [`persist`]: the device's state in a snapshot.
//! * This module: the state vCPU threads and the I/O thread share (the transport's device
//!   page and the live queues), DEVICE_NOTIFY, and the device as the VM sees it ([`Device`]).
//!
//! The host endpoints clients connect to are the VM's (`crate::host::endpoint`); the device
//! serves copies of them.
//!
//! Bounds (a guest or a client cannot grow the shim's memory without limit): at most
//! [`MAX_CONNECTIONS`] connections per VM; per connection at most
//! [`HOST_BUF_ALLOC`](hypercall_abi::virtio::vsock::HOST_BUF_ALLOC) bytes from the guest
//! waiting for a slow client (the guest's credit), and at most one packet's worth read from
//! the client ahead of the guest's credit.

mod conn;
mod muxer;
mod packets;
mod persist;
mod poll;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use hypercall_abi::Status;
use hypercall_abi::virtio::{VIRTIO_CONFIG_SIZE, VIRTIO_ID_VSOCK, feature, vsock};
use serde::Serialize;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::pv::{PvDevice, StatusChange};
use super::{Device, DeviceContext, DeviceError, DeviceKind, DeviceSetup};
use crate::base::memory::GuestMemory;
use crate::base::persist::Persist;
use muxer::IoCommand;

/// The device's name (summaries, snapshots).
const NAME: &str = "vsock";

/// How the device manager makes and restores this device.
pub(super) const KIND: DeviceKind = DeviceKind::new(NAME, create, restore);

fn create(page: u64, mem: &GuestMemory, setup: DeviceSetup) -> Result<Box<dyn Device>, DeviceError> {
    Ok(Box::new(Vsock::new(page, mem, setup)?))
}

fn restore(
    page: u64,
    mem: &GuestMemory,
    setup: DeviceSetup,
    state: &serde_json::Value,
) -> Result<Box<dyn Device>, DeviceError> {
    let state: persist::VsockState = serde_json::from_value(state.clone())
        .map_err(|e| DeviceError::Restore { device: NAME, why: format!("state does not parse: {e}") })?;
    Ok(Box::new(Vsock::restore(persist::RestoreArgs { page, mem, setup }, &state)?))
}

/// Most connections one VM may have open; further clients are refused (closed at once).
pub(crate) const MAX_CONNECTIONS: usize = 2048;

/// Largest queue the device accepts.
const QUEUE_MAX_SIZE: u16 = 256;

/// The device's live queues.
#[derive(Debug)]
struct Queues {
    rx: Queue,
    tx: Queue,
}

/// What the vCPU threads and the I/O thread share.
#[derive(Debug)]
struct Core {
    pv: PvDevice,
    queues: Option<Queues>,
    /// Changes at every reset and activation.
    generation: u64,
    /// Set when a queue turned out malformed: the device stops for this VM.
    broken: Option<String>,
}

/// Counters of the device (the summary's `vsock` section).
#[derive(Debug, Default)]
struct VsockStats {
    /// Connections accepted from clients.
    connections: AtomicU64,
    /// Connections open now.
    open: AtomicU64,
    /// Clients refused (connection cap, the guest never accepted, or an unused guest port).
    refused: AtomicU64,
    /// Of those, clients of a guest port nobody listens on (refused at once).
    refused_unused_port: AtomicU64,
    /// Packets taken from the guest's transmit queue.
    packets_from_guest: AtomicU64,
    /// Packets put in the guest's receive queue.
    packets_to_guest: AtomicU64,
    /// Payload bytes from clients to the guest.
    bytes_to_guest: AtomicU64,
    /// Payload bytes from the guest to clients.
    bytes_from_guest: AtomicU64,
    /// Malformed packets or descriptor chains (answered, dropped).
    malformed: AtomicU64,
    /// DEVICE_NOTIFY calls for this device's queues.
    queue_notifies: AtomicU64,
    /// Times the guest woke up because the device had packets for it.
    guest_wakeups: AtomicU64,
    /// Times the I/O thread went to sleep (epoll with a timeout).
    io_sleeps: AtomicU64,
    /// Microseconds the I/O thread spent polling (after traffic, before sleeping).
    io_poll_us: AtomicU64,
    /// The I/O thread's poll window when it last went to sleep (µs).
    io_poll_window_us: AtomicU64,
    /// Device resets by the guest.
    resets: AtomicU64,
    /// The device was marked broken.
    broken: AtomicBool,
    /// The idle shutdown fired.
    idle_shutdown: AtomicBool,
}

/// The device's figures (the summary's `vsock` section).
#[derive(Debug, Clone, Default, Serialize)]
struct VsockFigures {
    /// Connections accepted from clients.
    connections: u64,
    /// Clients refused.
    refused: u64,
    /// Of those, clients of a guest port nobody listens on (refused at once).
    refused_unused_port: u64,
    /// Packets from the guest.
    packets_from_guest: u64,
    /// Packets to the guest.
    packets_to_guest: u64,
    /// Bytes clients sent to the guest.
    bytes_to_guest: u64,
    /// Bytes the guest sent to clients.
    bytes_from_guest: u64,
    /// Malformed packets or chains.
    malformed: u64,
    /// DEVICE_NOTIFY calls for queues.
    queue_notifies: u64,
    /// Wake-ups of a blocked vCPU for packets.
    guest_wakeups: u64,
    /// Times the I/O thread went to sleep.
    io_sleeps: u64,
    /// Microseconds the I/O thread spent polling.
    io_poll_us: u64,
    /// Its adaptive poll window when it last went to sleep (µs).
    io_poll_window_us: u64,
    /// Whether the device was marked broken.
    broken: bool,
    /// Whether the device stopped accepting because no connection was open for the
    /// idle-shutdown time.
    idle_shutdown: bool,
}

impl VsockStats {
    fn figures(&self) -> VsockFigures {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VsockFigures {
            connections: l(&self.connections),
            refused: l(&self.refused),
            refused_unused_port: l(&self.refused_unused_port),
            packets_from_guest: l(&self.packets_from_guest),
            packets_to_guest: l(&self.packets_to_guest),
            bytes_to_guest: l(&self.bytes_to_guest),
            bytes_from_guest: l(&self.bytes_from_guest),
            malformed: l(&self.malformed),
            queue_notifies: l(&self.queue_notifies),
            guest_wakeups: l(&self.guest_wakeups),
            io_sleeps: l(&self.io_sleeps),
            io_poll_us: l(&self.io_poll_us),
            io_poll_window_us: l(&self.io_poll_window_us),
            broken: self.broken.load(Ordering::Relaxed),
            idle_shutdown: self.idle_shutdown.load(Ordering::Relaxed),
        }
    }
}

/// What the I/O thread reports when it holds still: the connections open (guest port, host
/// port) and the next host port it would hand out.
#[derive(Debug, Clone, Default)]
struct Held {
    connections: Vec<(u32, u32)>,
    next_port: u32,
}

/// State shared by the vCPU threads (notifies) and the I/O thread.
#[derive(Debug)]
struct VsockShared {
    core: Mutex<Core>,
    /// Written by DEVICE_NOTIFY: the I/O thread looks at the queues.
    kick: Arc<EventFd>,
    stats: VsockStats,
    /// The VM's limit on guest-caused diagnostics.
    diag: Arc<crate::host::diag::Limiter>,
}

impl VsockShared {
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the device broken for this VM (a malformed queue): it stops serving; the shim
    /// carries on.
    fn mark_broken(&self, core: &mut Core, mem: &GuestMemory, why: String) {
        if core.broken.is_none() {
            self.diag.say(format_args!("vsock device stopped for this VM: {why}"));
            core.broken = Some(why);
            core.queues = None;
            core.generation += 1;
            core.pv.set_needs_reset(mem);
            self.stats.broken.store(true, Ordering::Relaxed);
        }
    }
}

/// The running I/O thread and how to reach it.
#[derive(Debug)]
struct Running {
    handle: JoinHandle<()>,
    commands: Sender<IoCommand>,
    command_kick: Arc<EventFd>,
}

impl Running {
    fn send(&self, c: IoCommand) {
        // A thread that ended (it failed to start its loop) no longer listens: nothing to do.
        if self.commands.send(c).is_ok() {
            let _ = self.command_kick.write(1);
        }
    }
}

/// One VM's vsock device.
pub(crate) struct Vsock {
    shared: Arc<VsockShared>,
    /// Until the I/O thread starts: what it serves.
    setup: Mutex<Option<DeviceSetup>>,
    thread: Mutex<Option<Running>>,
    /// A restored device: the connections to reset and the next host port.
    resume: Mutex<Option<Held>>,
    /// What the I/O thread reported while it holds still.
    held: Mutex<Option<Held>>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock").field("shared", &self.shared).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    fn new(page: u64, mem: &GuestMemory, setup: DeviceSetup) -> Result<Vsock, DeviceError> {
        let pv = Self::pv(page);
        pv.write_page(mem).map_err(|source| DeviceError::Page { device: NAME, source })?;
        Self::with_core(Core { pv, queues: None, generation: 0, broken: None }, setup, None)
    }

    fn with_core(core: Core, setup: DeviceSetup, resume: Option<Held>) -> Result<Vsock, DeviceError> {
        let kick = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::Host {
            device: NAME,
            what: "cannot create an eventfd",
            source,
        })?;
        let shared = Arc::new(VsockShared {
            core: Mutex::new(core),
            kick: Arc::new(kick),
            stats: VsockStats::default(),
            diag: Arc::clone(&setup.diag),
        });
        Ok(Vsock {
            shared,
            setup: Mutex::new(Some(setup)),
            thread: Mutex::new(None),
            resume: Mutex::new(resume),
            held: Mutex::new(None),
        })
    }

    /// What the I/O thread reported while holding (or, if it never ran, what a restore gave).
    fn held(&self) -> Held {
        if let Some(h) = lock(&self.held).clone() {
            return h;
        }
        lock(&self.resume).clone().unwrap_or(Held { connections: Vec::new(), next_port: muxer::FIRST_HOST_PORT })
    }
}

impl Device for Vsock {
    fn name(&self) -> &'static str {
        NAME
    }

    fn notify(&self, _mem: &GuestMemory, queue: u16) -> Status {
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
                shared.diag.say(format_args!("vsock device: the guest's setup was refused: {e}"));
                return Status::INVALID;
            }
        }
        drop(core);
        let _ = shared.kick.write(1);
        Status::OK
    }

    /// Starts the I/O thread (named `VM-io`) when the VM has endpoints; without any the device
    /// stays idle.
    fn start(&self, mem: GuestMemory, ctx: DeviceContext) -> Result<(), DeviceError> {
        let Some(setup) = lock(&self.setup).take() else { return Ok(()) };
        if setup.endpoints.is_empty() {
            return Ok(());
        }
        let host = |what| move |source| DeviceError::Host { device: NAME, what, source };
        let command_kick = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(host("cannot create an eventfd"))?);
        let (commands, receiver) = std::sync::mpsc::channel();
        let start = muxer::Start {
            shared: Arc::clone(&self.shared),
            mem,
            endpoints: setup.endpoints,
            ctx,
            kick: Arc::clone(&self.shared.kick),
            commands: receiver,
            command_kick: Arc::clone(&command_kick),
            idle: setup.idle_shutdown,
            pin: setup.pin_io,
            template_gate: setup.template_gate,
            resume: lock(&self.resume).clone(),
        };
        // A pinned thread places itself before it narrows itself: it starts afresh.
        let role = (!start.pin).then_some(crate::host::seccomp::Role::Io);
        let handle =
            crate::host::standby::spawn(role, format!("{}-io", setup.vm_name), Box::new(move || muxer::run(start)))
                .map_err(host("cannot start the I/O thread"))?;
        *lock(&self.thread) = Some(Running { handle, commands, command_kick });
        Ok(())
    }

    fn serving(&self) -> bool {
        lock(&self.thread).is_some()
    }

    fn quiesce(&self, within: Duration) -> Result<(), DeviceError> {
        let thread = lock(&self.thread);
        let Some(running) = thread.as_ref() else {
            // No thread: nothing moves; the state is what the device was restored with.
            *lock(&self.held) = None;
            return Ok(());
        };
        let (tx, rx) = sync_channel(1);
        running.send(IoCommand::Hold(tx));
        match rx.recv_timeout(within) {
            Ok(held) => {
                *lock(&self.held) = Some(held);
                Ok(())
            }
            Err(_) => {
                // Given up on: if the thread holds later, it goes on at once.
                running.send(IoCommand::Release);
                Err(DeviceError::Quiesce(NAME))
            }
        }
    }

    fn release(&self) {
        if lock(&self.held).take().is_some()
            && let Some(running) = lock(&self.thread).as_ref()
        {
            running.send(IoCommand::Release);
        }
    }

    fn open_gate(&self) {
        if let Some(running) = lock(&self.thread).as_ref() {
            running.send(IoCommand::OpenGate);
        }
    }

    fn save(&self) -> serde_json::Value {
        Persist::save(self).ok().and_then(|s| serde_json::to_value(s).ok()).unwrap_or(serde_json::Value::Null)
    }

    /// Stops the I/O thread (closing every connection) and waits for it.
    fn stop(&self) {
        let running = lock(&self.thread).take();
        if let Some(r) = running {
            r.send(IoCommand::Stop);
            let _ = r.handle.join();
        }
    }

    fn figures(&self) -> serde_json::Value {
        serde_json::to_value(self.shared.stats.figures()).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop();
    }
}
