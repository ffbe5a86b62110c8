//! Guest side of the hypercall ABI: typed wrappers over the `out`-based transport.

use hypercall_abi::virtio::notify_value;
use hypercall_abi::{
    ArgBlock, BlockArgs, Call, ConsoleWriteArgs, EventsArgs, HelloArgs, KickArgs, PingArgs, ReportArgs, ShutdownArgs,
    Status, VcpuUpArgs,
};

use crate::arch::cpu;

/// Issues the call `T::CALL` with `block` and returns the status the host wrote back
/// ([`Status::PENDING`] when no host answered).
pub fn call<T: ArgBlock>(block: &mut T) -> Status {
    block.header_mut().status = Status::PENDING.0;
    let number = T::CALL.number();
    let addr = block as *mut T as u64;
    // SAFETY: `block` is a live, exclusively borrowed argument block of the right type for
    // `T::CALL`; guest-virtual equals guest-physical (identity mapping), so `addr` is its GPA.
    let eax = unsafe { cpu::hypercall(number, addr) };
    // SAFETY: `status` is a plain i32 inside `block`; the host may have written it during the
    // `out`, so it is re-read from memory.
    let status = Status(unsafe { core::ptr::read_volatile(&block.header().status) });
    match status {
        // The block was not written: trust eax if the host changed it.
        Status::PENDING if eax != number => Status(eax as i32),
        s => s,
    }
}

/// HELLO: negotiates the ABI. `None` when no host answered (the kernel is not under the shim).
pub fn hello() -> Option<HelloArgs> {
    let mut args = HelloArgs::new(hypercall_abi::features::ALL);
    match call(&mut args) {
        Status::PENDING => None,
        _ => Some(args),
    }
}

/// CONSOLE_WRITE of `bytes` (at most `CONSOLE_WRITE_MAX` at a time; the caller chunks).
pub fn console_write(bytes: &[u8]) -> Status {
    let mut args = ConsoleWriteArgs::new(bytes.as_ptr() as u64, bytes.len() as u64);
    call(&mut args)
}

/// SHUTDOWN with `code`. Returns only if the host refused the request.
pub fn shutdown(code: u32) -> Status {
    let mut args = ShutdownArgs::new(code);
    call(&mut args)
}

/// PING: a call that does nothing (measures the cost of a call).
pub fn ping() -> Status {
    call(&mut PingArgs::new())
}

/// VCPU_UP at `entry` with `stack` and `arg`: the new vCPU's id, or the refusal.
pub fn vcpu_up(entry: u64, stack: u64, arg: u64) -> Result<u32, Status> {
    let mut args = VcpuUpArgs::new(entry, stack, arg);
    match call(&mut args) {
        Status::OK => Ok(args.vcpu_id),
        s => Err(s),
    }
}

/// VCPU_DOWN for the calling vCPU, after storing `offline` into `state`.
///
/// The store and the `out` are one asm block that touches no stack
/// ([`cpu::store_then_hypercall`]), so the moment `state` reads `offline` another vCPU may
/// reuse this vCPU's stack. Returns only if the host refused (it refuses only vCPU 0).
///
/// # Safety
///
/// `state` must point to the caller's per-CPU state byte; nothing may rely on this vCPU's
/// stack once the store is visible.
pub unsafe fn vcpu_down(state: *mut u8, offline: u8) -> Status {
    // SAFETY: the caller vouches for `state` and for not using the stack afterwards; VCPU_DOWN
    // takes no argument block.
    let eax = unsafe { cpu::store_then_hypercall(state, offline, Call::VcpuDown.number()) };
    Status(eax as i32)
}

/// DEVICE_NOTIFY for `queue` of paravirtual device `device` (`queue` =
/// [`STATUS_CHANGED`](hypercall_abi::virtio::STATUS_CHANGED): the device page changed). The
/// call has no argument block: `rdi` carries the value and the status comes back in `eax`.
pub fn device_notify(device: u16, queue: u16) -> Status {
    device_notify_value(notify_value(device, queue))
}

/// BLOCK for at most `timeout_ns`: the wake bits, or `None` when no host answered.
pub fn block(timeout_ns: u64) -> Option<u32> {
    let mut args = BlockArgs::new(timeout_ns);
    match call(&mut args) {
        Status::OK => Some(args.woken_by),
        _ => None,
    }
}

/// BLOCK for at most `timeout_ns` after the host served the DEVICE_NOTIFY `notify` (one exit
/// for both; needs `features::BLOCK_NOTIFY`). `Err` with the status when the host refused it
/// (the notify may not have been served, and the vCPU did not sleep).
pub fn block_notifying(timeout_ns: u64, notify: u64) -> Result<u32, Status> {
    let mut args = BlockArgs::notifying(timeout_ns, notify);
    match call(&mut args) {
        Status::OK => Ok(args.woken_by),
        s => Err(s),
    }
}

/// DEVICE_NOTIFY with a whole notify value ([`notify_value`]).
pub fn device_notify_value(value: u64) -> Status {
    // SAFETY: DEVICE_NOTIFY takes no argument block; the host touches no guest memory on its
    // behalf but the device page and the rings the guest registered.
    let eax = unsafe { cpu::hypercall(Call::DeviceNotify.number(), value) };
    Status(eax as i32)
}

/// KICK vCPU `vcpu_id`.
pub fn kick(vcpu_id: u32) -> Status {
    call(&mut KickArgs::new(vcpu_id))
}

/// EVENTS: the pending notices (acknowledged by this call).
pub fn events() -> Option<EventsArgs> {
    let mut args = EventsArgs::new();
    match call(&mut args) {
        Status::OK => Some(args),
        _ => None,
    }
}

/// REPORT the given figures.
pub fn report(mut args: ReportArgs) -> Status {
    call(&mut args)
}
