//! The host half of the paravirtual virtio transport (`hypercall_abi::virtio`, docs/abi.md):
//! one device page in guest memory per device, read when the guest notifies a status change.
//!
//! Nothing the guest writes in the page is trusted: features must be a subset of what was
//! offered, queue sizes powers of two within the maximum, ring addresses aligned and inside
//! guest RAM. A refused step sets `DEVICE_NEEDS_RESET` in the page and answers `INVALID`.

use hypercall_abi::virtio::{
    VIRTIO_CONFIG_SIZE, VIRTIO_DEVICE_MAGIC, VIRTIO_QUEUES_MAX, VIRTIO_TRANSPORT_VERSION, VirtioDeviceRegs,
    VirtioQueueRegs, status,
};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use crate::base::memory::GuestMemory;

/// Why the guest's view of a device was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The device page could not be read or written.
    #[error("device page at {0:#x} is not guest RAM")]
    Page(u64),
    /// The driver accepted features the device did not offer.
    #[error("driver features {driver:#x} are not a subset of the offered {offered:#x}")]
    Features {
        /// What the driver wrote.
        driver: u64,
        /// What the device offered.
        offered: u64,
    },
    /// `DRIVER_OK` without `FEATURES_OK`, or features without `VERSION_1`.
    #[error("driver skipped feature negotiation (status {0:#x})")]
    Sequence(u32),
    /// A queue's registers are invalid.
    #[error("queue {queue}: {problem}")]
    Queue {
        /// The queue.
        queue: usize,
        /// What is wrong.
        problem: String,
    },
}

/// What a status change did.
#[derive(Debug)]
pub(crate) enum StatusChange {
    /// Status 0: the device was reset (queues and connections are gone).
    Reset,
    /// `DRIVER_OK`: the queues are live.
    DriverOk(Vec<Queue>),
    /// An intermediate step (ACKNOWLEDGE, DRIVER, FEATURES_OK) or a repeat.
    Progress,
}

/// One paravirtual device as the host describes it.
#[derive(Debug, Clone)]
pub(crate) struct PvDevice {
    /// Guest-physical address of its page.
    pub(crate) page: u64,
    /// Virtio device type.
    pub(crate) device_id: u32,
    /// Queues it has.
    pub(crate) num_queues: u32,
    /// Features it offers.
    pub(crate) offered: u64,
    /// Largest queue size it accepts.
    pub(crate) queue_max_size: u16,
    /// Its configuration space.
    pub(crate) config: [u8; VIRTIO_CONFIG_SIZE],
    /// Features the driver accepted (valid from `FEATURES_OK`).
    pub(crate) negotiated: u64,
    /// Status as last accepted.
    pub(crate) status: u32,
}

impl PvDevice {
    /// Writes the device's page (host fields set, guest fields zero).
    pub(crate) fn write_page(&self, mem: &GuestMemory) -> Result<(), TransportError> {
        let regs = VirtioDeviceRegs {
            magic: VIRTIO_DEVICE_MAGIC,
            version: VIRTIO_TRANSPORT_VERSION,
            device_id: self.device_id,
            num_queues: self.num_queues,
            device_features: self.offered,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_max_size: u32::from(self.queue_max_size),
            reserved0: 0,
            queues: [VirtioQueueRegs::default(); VIRTIO_QUEUES_MAX],
            config: self.config,
            reserved: [0; 2],
        };
        mem.write_obj(self.page, &regs).map_err(|_| TransportError::Page(self.page))
    }

    fn read_page(&self, mem: &GuestMemory) -> Result<VirtioDeviceRegs, TransportError> {
        mem.read_obj::<VirtioDeviceRegs>(self.page).map_err(|_| TransportError::Page(self.page))
    }

    /// Marks the device as needing a reset in its page (what a refused step leaves behind).
    pub(crate) fn set_needs_reset(&mut self, mem: &GuestMemory) {
        let at = self.page + std::mem::offset_of!(VirtioDeviceRegs, status) as u64;
        if let Ok(s) = mem.read_obj::<u32>(at) {
            let _ = mem.write_obj(at, &(s | status::DEVICE_NEEDS_RESET));
        }
    }

    /// Reads the page after the guest notified a status change and applies it. The page is
    /// copied once; every value in it is checked.
    pub(crate) fn status_changed(&mut self, mem: &GuestMemory) -> Result<StatusChange, TransportError> {
        let regs = self.read_page(mem)?;
        let new = regs.status;
        if new == 0 {
            self.status = 0;
            self.negotiated = 0;
            return Ok(StatusChange::Reset);
        }
        if new & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            if regs.driver_features & !self.offered != 0 {
                return Err(TransportError::Features { driver: regs.driver_features, offered: self.offered });
            }
            if regs.driver_features & hypercall_abi::virtio::feature::VERSION_1 == 0 {
                return Err(TransportError::Sequence(new));
            }
            self.negotiated = regs.driver_features;
        }
        let becomes_ok = new & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0;
        self.status = new;
        if !becomes_ok {
            return Ok(StatusChange::Progress);
        }
        if new & status::FEATURES_OK == 0 {
            return Err(TransportError::Sequence(new));
        }
        let mut queues = Vec::new();
        for (i, q) in regs.queues.iter().enumerate().take(self.num_queues as usize) {
            queues.push(self.activate(mem, i, q)?);
        }
        Ok(StatusChange::DriverOk(queues))
    }

    /// Builds a live queue from the guest's registers, checking every value.
    fn activate(&self, mem: &GuestMemory, index: usize, q: &VirtioQueueRegs) -> Result<Queue, TransportError> {
        let bad = |problem: String| TransportError::Queue { queue: index, problem };
        let mut queue = Queue::new(self.queue_max_size).map_err(|e| bad(format!("{e:?}")))?;
        if q.ready == 0 {
            // A queue the driver did not set up stays inactive (the vsock event queue, say).
            return Ok(queue);
        }
        let size = u16::try_from(q.size).map_err(|_| bad(format!("size {} is too large", q.size)))?;
        if size == 0 || !size.is_power_of_two() || size > self.queue_max_size {
            return Err(bad(format!("size {size} is not a power of two up to {}", self.queue_max_size)));
        }
        queue.try_set_size(size).map_err(|e| bad(format!("size {size}: {e:?}")))?;
        // Rings live in the kernel's RAM, never in the guest-protected region below it.
        if [q.desc, q.driver, q.device].iter().any(|&a| a < hypercall_abi::KERNEL_MIN_LOAD_ADDR) {
            return Err(bad("a ring lies below the kernel (the guest-protected region)".into()));
        }
        queue.try_set_desc_table_address(GuestAddress(q.desc)).map_err(|e| bad(format!("descriptors: {e:?}")))?;
        queue.try_set_avail_ring_address(GuestAddress(q.driver)).map_err(|e| bad(format!("driver ring: {e:?}")))?;
        queue.try_set_used_ring_address(GuestAddress(q.device)).map_err(|e| bad(format!("device ring: {e:?}")))?;
        queue.set_event_idx(false);
        queue.set_ready(true);
        let snapshot = mem.snapshot();
        if !queue.is_valid(&*snapshot) {
            return Err(bad("its rings are not inside guest RAM".into()));
        }
        // The rings must not overlap the platform's structures below the kernel.
        for (what, addr) in [("descriptors", q.desc), ("driver ring", q.driver), ("device ring", q.device)] {
            if addr < hypercall_abi::KERNEL_MIN_LOAD_ADDR {
                return Err(bad(format!("{what} at {addr:#x} lie in the platform's area")));
            }
        }
        Ok(queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypercall_abi::virtio::feature;

    const PAGE: u64 = 0x30_0000;

    fn device() -> (PvDevice, GuestMemory) {
        let mem = GuestMemory::new(8 << 20).unwrap();
        let d = PvDevice {
            page: PAGE,
            device_id: 19,
            num_queues: 3,
            offered: feature::VERSION_1,
            queue_max_size: 256,
            config: [0; VIRTIO_CONFIG_SIZE],
            negotiated: 0,
            status: 0,
        };
        d.write_page(&mem).unwrap();
        (d, mem)
    }

    fn set(mem: &GuestMemory, f: impl FnOnce(&mut VirtioDeviceRegs)) {
        let mut r: VirtioDeviceRegs = mem.read_obj(PAGE).unwrap();
        f(&mut r);
        mem.write_obj(PAGE, &r).unwrap();
    }

    #[test]
    fn a_driver_that_follows_the_protocol_gets_live_queues() {
        let (mut d, mem) = device();
        set(&mem, |r| r.status = status::ACKNOWLEDGE | status::DRIVER);
        assert!(matches!(d.status_changed(&mem), Ok(StatusChange::Progress)));
        set(&mem, |r| {
            r.driver_features = feature::VERSION_1;
            r.status |= status::FEATURES_OK;
        });
        assert!(matches!(d.status_changed(&mem), Ok(StatusChange::Progress)));
        set(&mem, |r| {
            for (i, q) in r.queues.iter_mut().take(2).enumerate() {
                let base = 0x40_0000 + i as u64 * 0x2000;
                *q = VirtioQueueRegs { size: 8, ready: 1, desc: base, driver: base + 0x100, device: base + 0x1000 };
            }
            r.status |= status::DRIVER_OK;
        });
        match d.status_changed(&mem) {
            Ok(StatusChange::DriverOk(q)) => {
                assert_eq!(q.len(), 3);
                assert!(q[0].ready() && q[1].ready() && !q[2].ready());
            }
            other => panic!("{other:?}"),
        }
        set(&mem, |r| r.status = 0);
        assert!(matches!(d.status_changed(&mem), Ok(StatusChange::Reset)));
    }

    #[test]
    fn hostile_pages_are_refused() {
        let (mut d, mem) = device();
        set(&mem, |r| {
            r.driver_features = feature::VERSION_1 | feature::RING_EVENT_IDX;
            r.status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        });
        assert!(matches!(d.status_changed(&mem), Err(TransportError::Features { .. })));
        for bad in [
            VirtioQueueRegs { size: 7, ready: 1, desc: 0x40_0000, driver: 0x40_0100, device: 0x40_1000 },
            VirtioQueueRegs { size: 8, ready: 1, desc: 0x40_0001, driver: 0x40_0100, device: 0x40_1000 },
            VirtioQueueRegs { size: 8, ready: 1, desc: u64::MAX - 8, driver: 0x40_0100, device: 0x40_1000 },
            VirtioQueueRegs { size: 8, ready: 1, desc: 0x1000, driver: 0x40_0100, device: 0x40_1000 },
            VirtioQueueRegs { size: 1 << 20, ready: 1, desc: 0x40_0000, driver: 0x40_0100, device: 0x40_1000 },
        ] {
            let (mut d, mem) = device();
            set(&mem, |r| {
                r.driver_features = feature::VERSION_1;
                r.status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
            });
            d.status_changed(&mem).unwrap();
            set(&mem, |r| {
                r.queues[0] = bad;
                r.status |= status::DRIVER_OK;
            });
            assert!(matches!(d.status_changed(&mem), Err(TransportError::Queue { .. })), "{bad:?}");
        }
        // DRIVER_OK without FEATURES_OK.
        let (mut d, mem) = device();
        set(&mem, |r| r.status = status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
        assert!(matches!(d.status_changed(&mem), Err(TransportError::Sequence(_))));
    }
}
