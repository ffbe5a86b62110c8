//! The guest half of the paravirtual virtio transport (`hypercall_abi::virtio`, docs/abi.md):
//! a [`Transport`] for `virtio-drivers` over a device page in shared memory, with notification
//! by the DEVICE_NOTIFY hypercall, and the identity-mapping [`Hal`].
//!
//! There is no register emulation and no interrupt: the driver writes the page, tells the host
//! with one hypercall when the status changes or a queue has buffers (unless the host
//! suppressed notifications because it is polling), and polls the used rings itself.

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hypercall_abi::virtio::{
    STATUS_CHANGED, VIRTIO_CONFIG_SIZE, VIRTIO_DEVICE_MAGIC, VIRTIO_DEVICE_PAGE, VIRTIO_QUEUES_MAX,
    VIRTIO_TRANSPORT_VERSION, VirtioDeviceRegs, VirtioQueueRegs, status,
};
use hypercall_abi::{BootInfo, HelloArgs, Status, features};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Error, Hal, PAGE_SIZE, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Guest-physical address of the first device page (0: none).
static DEVICES: AtomicU64 = AtomicU64::new(0);
/// Number of device pages.
static DEVICE_COUNT: AtomicU64 = AtomicU64::new(0);

/// Whether the host serves a DEVICE_NOTIFY inside BLOCK (`features::BLOCK_NOTIFY`).
static BLOCK_NOTIFY: AtomicBool = AtomicBool::new(false);

/// Whether BLOCK may carry a DEVICE_NOTIFY (the host offered `features::BLOCK_NOTIFY`).
pub(crate) fn block_notify() -> bool {
    BLOCK_NOTIFY.load(Ordering::Relaxed)
}

/// Records the devices the shim described, if it offered the transport.
pub(crate) fn init(boot: &BootInfo, hello: Option<&HelloArgs>) {
    let offered = hello.is_some_and(|h| h.features & features::VIRTIO_TRANSPORT != 0);
    BLOCK_NOTIFY.store(offered && hello.is_some_and(|h| h.features & features::BLOCK_NOTIFY != 0), Ordering::Relaxed);
    if offered && boot.devices != 0 && boot.device_count != 0 {
        DEVICES.store(boot.devices, Ordering::Release);
        DEVICE_COUNT.store(boot.device_count, Ordering::Release);
    }
}

/// Why a device cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No host offers the transport (for example under QEMU).
    NoTransport,
    /// The host describes no device of this kind.
    NoDevice,
    /// The device page is not what this runtime speaks.
    BadPage,
}

/// Finds the first device of virtio type `device_id`.
pub(crate) fn find(device_id: u32) -> Result<PageTransport, Unavailable> {
    let base = DEVICES.load(Ordering::Acquire);
    if base == 0 {
        return Err(Unavailable::NoTransport);
    }
    let count = DEVICE_COUNT.load(Ordering::Acquire).min(u64::from(u16::MAX));
    for index in 0..count {
        let page = (base + index * VIRTIO_DEVICE_PAGE) as *mut VirtioDeviceRegs;
        // SAFETY: the shim placed `device_count` device pages at `devices`, identity mapped
        // and writable at CPL 3; the fields read here are plain integers.
        let (magic, version, id) = unsafe {
            (
                (&raw const (*page).magic).read_volatile(),
                (&raw const (*page).version).read_volatile(),
                (&raw const (*page).device_id).read_volatile(),
            )
        };
        if magic != VIRTIO_DEVICE_MAGIC || version != VIRTIO_TRANSPORT_VERSION {
            return Err(Unavailable::BadPage);
        }
        if id == device_id {
            return Ok(PageTransport { regs: page, index: index as u16, refused: false });
        }
    }
    Err(Unavailable::NoDevice)
}

/// A device reached through its page.
#[derive(Debug)]
pub struct PageTransport {
    regs: *mut VirtioDeviceRegs,
    index: u16,
    refused: bool,
}

// SAFETY: the page is shared memory with the host, not with other guest threads: the transport
// is owned by one driver, which callers keep behind a lock.
unsafe impl Send for PageTransport {}

/// Reads field `$f` of the device page.
macro_rules! rd {
    ($self:ident . $f:ident) => {
        // SAFETY: `regs` points at this device's page (see `find`); volatile because the host
        // writes it.
        unsafe { (&raw const (*$self.regs).$f).read_volatile() }
    };
}

/// Writes field `$f` of the device page.
macro_rules! wr {
    ($self:ident . $f:ident, $v:expr) => {
        // SAFETY: as for `rd!`; the guest owns the fields it writes.
        unsafe { (&raw mut (*$self.regs).$f).write_volatile($v) }
    };
}

impl PageTransport {
    /// Whether the host refused a status change (features or queues) since the last reset.
    pub fn refused(&self) -> bool {
        self.refused || rd!(self.status) & status::DEVICE_NEEDS_RESET != 0
    }

    /// The guest-physical address of `queue`'s used ring (`None` before it is set up).
    pub fn used_ring(&self, queue: u16) -> Option<u64> {
        self.queue(queue).filter(|q| q.ready != 0 && q.device != 0).map(|q| q.device)
    }

    fn queue(&self, queue: u16) -> Option<VirtioQueueRegs> {
        let i = usize::from(queue);
        if i >= VIRTIO_QUEUES_MAX {
            return None;
        }
        // SAFETY: as for `rd!`; `i` is in bounds.
        Some(unsafe { (&raw const (*self.regs).queues[i]).read_volatile() })
    }

    fn set_queue(&mut self, queue: u16, regs: VirtioQueueRegs) {
        let i = usize::from(queue);
        if i < VIRTIO_QUEUES_MAX {
            // SAFETY: as for `wr!`; `i` is in bounds.
            unsafe { (&raw mut (*self.regs).queues[i]).write_volatile(regs) };
        }
    }

    /// The DEVICE_NOTIFY value for `queue` of this device.
    pub fn notify_value(&self, queue: u16) -> u64 {
        hypercall_abi::virtio::notify_value(self.index, queue)
    }

    fn notify_host(&self, queue: u16) -> Status {
        crate::hypercall::device_notify(self.index, queue)
    }
}

impl Transport for PageTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::try_from(rd!(self.device_id)).unwrap_or(DeviceType::Socket)
    }

    fn read_device_features(&mut self) -> u64 {
        rd!(self.device_features)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        wr!(self.driver_features, driver_features);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        if u32::from(queue) < rd!(self.num_queues) { rd!(self.queue_max_size) } else { 0 }
    }

    fn notify(&mut self, queue: u16) {
        // A refused notify (bad queue) leaves the buffers unused; the driver then waits, which
        // is what a device that ignores a queue looks like.
        let _ = self.notify_host(queue);
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(rd!(self.status))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        if status.is_empty() {
            self.refused = false;
            for q in 0..VIRTIO_QUEUES_MAX as u16 {
                self.set_queue(q, VirtioQueueRegs::default());
            }
        }
        wr!(self.status, status.bits());
        if !self.notify_host(STATUS_CHANGED).is_ok() || rd!(self.status) & status::DEVICE_NEEDS_RESET != 0 {
            self.refused = true;
        }
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.set_queue(
            queue,
            VirtioQueueRegs { size, ready: 1, desc: descriptors, driver: driver_area, device: device_area },
        );
    }

    fn queue_unset(&mut self, queue: u16) {
        self.set_queue(queue, VirtioQueueRegs::default());
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.queue(queue).is_some_and(|q| q.ready != 0)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        // There are no interrupts: the guest polls.
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        rd!(self.config_generation)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let size = core::mem::size_of::<T>();
        if offset.checked_add(size).is_none_or(|end| end > VIRTIO_CONFIG_SIZE) {
            return Err(Error::ConfigSpaceTooSmall);
        }
        let mut value = T::new_zeroed();
        let bytes = value.as_mut_bytes();
        for (i, b) in bytes.iter_mut().enumerate() {
            // SAFETY: `offset + i < VIRTIO_CONFIG_SIZE` (checked above): inside the page's
            // config array.
            *b = unsafe { (&raw const (*self.regs).config[offset + i]).read_volatile() };
        }
        Ok(value)
    }

    fn write_config_space<T: IntoBytes + Immutable>(&mut self, offset: usize, value: T) -> Result<(), Error> {
        let bytes = value.as_bytes();
        if offset.checked_add(bytes.len()).is_none_or(|end| end > VIRTIO_CONFIG_SIZE) {
            return Err(Error::ConfigSpaceTooSmall);
        }
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: bounds checked above.
            unsafe { (&raw mut (*self.regs).config[offset + i]).write_volatile(*b) };
        }
        Ok(())
    }
}

/// DMA for virtio-drivers: guest-virtual equals guest-physical (the shim identity-maps all of
/// guest RAM), and the host reaches all of it, so buffers are shared as they are.
#[derive(Debug)]
pub struct IdentityHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned memory from the kernel heap at an address
// that is its own guest-physical address, live until `dma_dealloc`; `share` returns a buffer's
// own address, which the host can reach (all guest RAM is shared with it).
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Ok(layout) = Layout::from_size_align(pages.saturating_mul(PAGE_SIZE), PAGE_SIZE) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size (pages >= 1 for every virtio-drivers caller);
        // a zero-size request fails the null check below.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        match NonNull::new(p) {
            Some(nn) => (p as PhysAddr, nn),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Ok(layout) = Layout::from_size_align(pages.saturating_mul(PAGE_SIZE), PAGE_SIZE) else {
            return -1;
        };
        // SAFETY: the caller passes back what `dma_alloc` returned for the same `pages`.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // There is no MMIO under this transport; identity, as for all memory.
        NonNull::new(paddr as *mut u8).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
