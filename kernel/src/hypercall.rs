//! Guest side of the hypercall ABI: typed wrappers over the `out`-based transport.

use hypercall_abi::{ArgBlock, ConsoleWriteArgs, HelloArgs, ShutdownArgs, Status};

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
    let mut args = HelloArgs::new(0);
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
