//! Paravirtual devices: the host half of the virtio transport ([`pv`]) and the devices that
//! use it ([`vsock`]). Each device is a page in guest memory after the kernel image plus a
//! device model the shim serves from its own thread; the guest reaches it with DEVICE_NOTIFY.

pub mod pv;
pub mod vsock;

use hypercall_abi::Status;
use hypercall_abi::virtio::split_notify_value;

use crate::base::memory::GuestMemory;

/// The devices of one VM (device index = position).
#[derive(Debug, Default)]
pub struct Devices {
    /// The vsock device (index 0), when the VM has one.
    pub vsock: Option<vsock::Vsock>,
}

impl Devices {
    /// Number of device pages.
    pub fn count(&self) -> u64 {
        u64::from(self.vsock.is_some())
    }

    /// Serves DEVICE_NOTIFY: `value` is the guest's `rdi`.
    pub fn notify(&self, mem: &GuestMemory, value: u64) -> Status {
        match split_notify_value(value) {
            Some((0, queue)) => match &self.vsock {
                Some(v) => v.notify(mem, queue),
                None => Status::INVALID,
            },
            _ => Status::INVALID,
        }
    }

    /// Whether a device thread serves the guest (a vsock device with host endpoints).
    pub fn serving(&self) -> bool {
        self.vsock.as_ref().is_some_and(|v| v.is_running())
    }

    /// Stops every device thread.
    pub fn stop(&self) {
        if let Some(v) = &self.vsock {
            v.stop();
        }
    }
}
