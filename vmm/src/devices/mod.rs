//! Paravirtual devices: the host half of the virtio transport ([`pv`]), the [`Device`] model
//! every device implements, the [`DeviceManager`] that places device pages and routes
//! DEVICE_NOTIFY by device index, and the devices themselves ([`vsock`]).
//!
//! Each device is one page in guest memory after the kernel image plus a model the shim
//! serves, usually from a thread of its own. A device reaches its VM only through the
//! [`DeviceContext`] it is started with (wake the guest, ask the VM to stop); the VM reaches
//! the device only through [`Device`]. A new device is a folder here and one line in
//! [`KINDS`].

pub(crate) mod pv;
pub(crate) mod vsock;

use std::sync::Arc;
use std::time::Duration;

use hypercall_abi::Status;
use hypercall_abi::virtio::{STATUS_CHANGED, VIRTIO_DEVICE_PAGE, split_notify_value};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::base::memory::GuestMemory;
use crate::host::endpoint::Bound;

/// The device kinds every VM gets, in device-index order (the guest finds them in this order
/// in its boot info). Adding a device is one line here.
const KINDS: &[DeviceKind] = &[vsock::KIND];

/// The names of the devices every VM gets, in index order.
pub(crate) fn names() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|k| k.name)
}

/// Device failures.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A host resource (eventfd, thread, epoll) could not be had.
    #[error("{device}: {what}: {source}")]
    Host {
        /// The device.
        device: &'static str,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The device page could not be written.
    #[error("{device}: {source}")]
    Page {
        /// The device.
        device: &'static str,
        /// Why.
        source: pv::TransportError,
    },
    /// A saved state was refused.
    #[error("restoring the {device} device: {why}")]
    Restore {
        /// The device.
        device: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The device did not hold still in time.
    #[error("the {0} device did not hold still")]
    Quiesce(&'static str),
}

/// Why a device asks the VM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// Scale to zero: no client connection was open for this long.
    Idle(Duration),
}

/// Longest a device waits, stopped at its template point, for the VM to take the template.
pub(crate) const TEMPLATE_GATE_MAX: Duration = Duration::from_secs(5);

/// What a device may do to its VM: the only way it reaches it.
#[derive(Clone)]
pub(crate) struct DeviceContext {
    wake: Arc<dyn Fn() -> bool + Send + Sync>,
    request_stop: Arc<dyn Fn(StopReason) + Send + Sync>,
    record: Arc<dyn Fn(&'static str, u32) + Send + Sync>,
    replied: Arc<dyn Fn() + Send + Sync>,
    template_point: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for DeviceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceContext")
    }
}

impl DeviceContext {
    /// A context whose `wake` wakes the guest's device-driving vCPU (returning whether it was
    /// asleep in BLOCK) and whose `request_stop` asks the VM's owner to stop the VM.
    /// `record(event, port)` puts a line about a guest port in the VM's timeline; `replied`
    /// notes that the guest's bytes reached a client (a device calls it once, at the first).
    pub(crate) fn new(
        wake: Arc<dyn Fn() -> bool + Send + Sync>,
        request_stop: Arc<dyn Fn(StopReason) + Send + Sync>,
        record: Arc<dyn Fn(&'static str, u32) + Send + Sync>,
        replied: Arc<dyn Fn() + Send + Sync>,
        template_point: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        DeviceContext { wake, request_stop, record, replied, template_point }
    }

    /// Tells the VM that its service accepted its first client and that no client byte has
    /// reached the guest: the moment for a template (the device goes on when the VM opens the
    /// gate, [`DeviceManager::open_gates`], or by itself after [`TEMPLATE_GATE_MAX`]).
    pub(crate) fn template_point(&self) {
        (self.template_point)()
    }

    /// Notes that the guest's first bytes reached a client (the time to a first answer after a
    /// boot or a wake).
    pub(crate) fn replied(&self) {
        (self.replied)()
    }

    /// Records `event` about guest port `port` in the VM's timeline.
    pub(crate) fn record(&self, event: &'static str, port: u32) {
        (self.record)(event, port)
    }

    /// Wakes the guest so it looks at its queues; `true` if a vCPU was asleep in BLOCK.
    pub(crate) fn wake(&self) -> bool {
        (self.wake)()
    }

    /// Asks the VM to stop (its owner posts the STOP notice and watches the guest end).
    pub(crate) fn request_stop(&self, why: StopReason) {
        (self.request_stop)(why)
    }
}

/// What a device is given at creation: the VM's name (thread names), the host endpoints its
/// clients connect to (copies; the VM keeps the originals), and the idle time after which it
/// asks the VM to stop.
#[derive(Debug)]
pub(crate) struct DeviceSetup {
    pub(crate) vm_name: String,
    pub(crate) endpoints: Vec<Bound>,
    pub(crate) idle_shutdown: Option<Duration>,
    /// Pin the I/O thread (see `EndpointConfig::pin_io`).
    pub(crate) pin_io: bool,
    /// The VM's limit on the diagnostics its guest can cause.
    pub(crate) diag: Arc<crate::host::diag::Limiter>,
    /// Stop at the guest's first accepted connection, before any client byte reaches it, and
    /// tell the VM ([`DeviceContext::template_point`]) so that it can take a template.
    pub(crate) template_gate: bool,
}

/// One device as the VM sees it.
pub(crate) trait Device: Send + Sync + std::fmt::Debug {
    /// The device's name (its key in summaries and snapshots).
    fn name(&self) -> &'static str;
    /// DEVICE_NOTIFY for queue `queue` (from a vCPU thread).
    fn notify(&self, mem: &GuestMemory, queue: u16) -> Status;
    /// DEVICE_NOTIFY for a status change in the device page (from a vCPU thread).
    fn status_changed(&self, mem: &GuestMemory) -> Status;
    /// Starts serving (its thread, if it has one).
    fn start(&self, mem: GuestMemory, ctx: DeviceContext) -> Result<(), DeviceError>;
    /// Whether it serves the guest now (a thread of its own runs).
    fn serving(&self) -> bool;
    /// Holds still: no more access to guest memory or host sockets until [`Device::release`].
    fn quiesce(&self, within: Duration) -> Result<(), DeviceError>;
    /// Goes on after [`Device::quiesce`].
    fn release(&self);
    /// Lets client data flow after the template point (see [`DeviceSetup::template_gate`]);
    /// nothing for a device without one.
    fn open_gate(&self) {}
    /// Its state, for a snapshot or a migration (while quiesced).
    fn save(&self) -> serde_json::Value;
    /// Stops serving and waits for its thread.
    fn stop(&self);
    /// Its figures (the summary's section named after it).
    fn figures(&self) -> serde_json::Value;
}

/// Makes a device whose page is at `page`.
type Create = fn(page: u64, mem: &GuestMemory, setup: DeviceSetup) -> Result<Box<dyn Device>, DeviceError>;

/// Rebuilds a device from its saved state (its page is already in guest memory).
type Restore = fn(
    page: u64,
    mem: &GuestMemory,
    setup: DeviceSetup,
    state: &serde_json::Value,
) -> Result<Box<dyn Device>, DeviceError>;

/// How to make one kind of device.
pub(crate) struct DeviceKind {
    name: &'static str,
    create: Create,
    restore: Restore,
}

impl DeviceKind {
    /// A kind named `name`.
    pub(crate) const fn new(name: &'static str, create: Create, restore: Restore) -> Self {
        DeviceKind { name, create, restore }
    }
}

/// One device's saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SavedDevice {
    /// The device's name.
    pub(crate) name: String,
    /// Its state (the device's own format).
    pub(crate) state: serde_json::Value,
}

/// The devices' part of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DevicesState {
    /// Guest-physical address of the first device page.
    pub(crate) base: u64,
    /// One per device, in index order.
    pub(crate) devices: Vec<SavedDevice>,
}

/// The devices of one VM: device `i`'s page is at `base + i` pages.
#[derive(Debug)]
pub(crate) struct DeviceManager {
    base: u64,
    devices: Vec<Box<dyn Device>>,
}

impl DeviceManager {
    /// Creates every device kind with its page from `base` on (written into guest memory).
    /// Each device gets copies of the endpoints.
    pub(crate) fn create(base: u64, mem: &GuestMemory, setup: &DeviceSetup) -> Result<Self, DeviceError> {
        let mut devices = Vec::new();
        for (i, kind) in KINDS.iter().enumerate() {
            let page = base + i as u64 * VIRTIO_DEVICE_PAGE;
            devices.push((kind.create)(page, mem, copy(setup, kind.name)?)?);
        }
        Ok(DeviceManager { base, devices })
    }

    /// Rebuilds the devices of a snapshot (their pages are already in guest memory).
    pub(crate) fn restore(mem: &GuestMemory, setup: &DeviceSetup, state: &DevicesState) -> Result<Self, DeviceError> {
        let mut devices = Vec::new();
        if state.devices.len() != KINDS.len() {
            return Err(DeviceError::Restore {
                device: "every",
                why: format!("{} devices saved, this shim has {}", state.devices.len(), KINDS.len()),
            });
        }
        for (i, (kind, saved)) in KINDS.iter().zip(&state.devices).enumerate() {
            if saved.name != kind.name {
                return Err(DeviceError::Restore { device: kind.name, why: format!("device {i} is '{}'", saved.name) });
            }
            let page = state.base + i as u64 * VIRTIO_DEVICE_PAGE;
            devices.push((kind.restore)(page, mem, copy(setup, kind.name)?, &saved.state)?);
        }
        Ok(DeviceManager { base: state.base, devices })
    }

    /// Guest-physical address of the first device page.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// Number of devices (device pages).
    pub(crate) fn count(&self) -> u64 {
        self.devices.len() as u64
    }

    /// The first address after the device pages.
    pub(crate) fn end(&self) -> u64 {
        self.base + self.count() * VIRTIO_DEVICE_PAGE
    }

    /// Serves DEVICE_NOTIFY: `value` is the guest's `rdi` (device index and queue).
    pub(crate) fn notify(&self, mem: &GuestMemory, value: u64) -> Status {
        let Some((index, queue)) = split_notify_value(value) else { return Status::INVALID };
        match self.devices.get(index as usize) {
            Some(d) if queue == STATUS_CHANGED => d.status_changed(mem),
            Some(d) => d.notify(mem, queue),
            None => Status::INVALID,
        }
    }

    /// Starts every device.
    pub(crate) fn start(&self, mem: &GuestMemory, ctx: &DeviceContext) -> Result<(), DeviceError> {
        self.devices.iter().try_for_each(|d| d.start(mem.clone(), ctx.clone()))
    }

    /// Whether a device thread serves the guest.
    pub(crate) fn serving(&self) -> bool {
        self.devices.iter().any(|d| d.serving())
    }

    /// Holds every device still (all or none).
    pub(crate) fn quiesce(&self, within: Duration) -> Result<(), DeviceError> {
        for (i, d) in self.devices.iter().enumerate() {
            if let Err(e) = d.quiesce(within) {
                self.devices[..i].iter().for_each(|d| d.release());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Lets every device go on.
    pub(crate) fn release(&self) {
        self.devices.iter().for_each(|d| d.release());
    }

    /// Opens every device's template gate (the template is taken, or will not be).
    pub(crate) fn open_gates(&self) {
        self.devices.iter().for_each(|d| d.open_gate());
    }

    /// The devices' states (while quiesced).
    pub(crate) fn save(&self) -> DevicesState {
        DevicesState {
            base: self.base,
            devices: self.devices.iter().map(|d| SavedDevice { name: d.name().into(), state: d.save() }).collect(),
        }
    }

    /// Stops every device thread.
    pub(crate) fn stop(&self) {
        self.devices.iter().for_each(|d| d.stop());
    }

    /// Each device's figures, by name.
    pub(crate) fn figures(&self) -> Vec<(&'static str, serde_json::Value)> {
        self.devices.iter().map(|d| (d.name(), d.figures())).collect()
    }
}

/// `setup` for one device (its own copies of the endpoints).
fn copy(setup: &DeviceSetup, device: &'static str) -> Result<DeviceSetup, DeviceError> {
    let endpoints = crate::host::endpoint::copies(&setup.endpoints).map_err(|source| DeviceError::Host {
        device,
        what: "cannot share the listening sockets",
        source,
    })?;
    Ok(DeviceSetup {
        vm_name: setup.vm_name.clone(),
        endpoints,
        idle_shutdown: setup.idle_shutdown,
        pin_io: setup.pin_io,
        diag: Arc::clone(&setup.diag),
        template_gate: setup.template_gate,
    })
}
