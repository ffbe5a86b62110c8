//! The panic handler: reports `file:line:column` and the message, then exits with
//! [`exit_code::PANIC`](hypercall_abi::exit_code::PANIC).

#[cfg(target_os = "none")]
use core::sync::atomic::{AtomicBool, Ordering};

#[cfg(target_os = "none")]
static PANICKING: AtomicBool = AtomicBool::new(false);

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use hypercall_abi::exit_code;
    if PANICKING.swap(true, Ordering::SeqCst) {
        // A panic while reporting a panic (or on a second vCPU): just stop.
        crate::platform::exit(exit_code::PANIC);
    }
    // `handle_alloc_error` ends up here with "memory allocation of N bytes failed".
    if let Some(crate::heap::OutOfMemory { asked, held, refusal }) = crate::heap::out_of_memory() {
        let mut w = crate::console::StackWriter::<64>::new();
        let _ = core::fmt::write(&mut w, format_args!("{}", info.message()));
        if w.bytes().starts_with(b"memory allocation of") {
            let boot = crate::heap::boot_ram();
            match refusal {
                Some((bytes, status)) => crate::console::emergency_print(format_args!(
                    "\n!!! out of memory: an allocation of {asked} bytes could not be served; the VM holds {} MiB \
                     ({} MiB boot + {} MiB granted); the host answered {} to a request for {} MiB\n",
                    held >> 20,
                    boot >> 20,
                    (held - boot) >> 20,
                    status.name(),
                    bytes >> 20
                )),
                None => crate::console::emergency_print(format_args!(
                    "\n!!! out of memory: an allocation of {asked} bytes could not be served; the VM holds {} MiB \
                     ({} MiB boot + {} MiB granted) and cannot grow\n",
                    held >> 20,
                    boot >> 20,
                    (held - boot) >> 20
                )),
            }
            crate::platform::exit(exit_code::OUT_OF_MEMORY);
        }
    }
    match info.location() {
        Some(loc) => crate::console::emergency_print(format_args!(
            "\n!!! kernel panic at {}:{}:{}: {}\n",
            loc.file(),
            loc.line(),
            loc.column(),
            info.message()
        )),
        None => crate::console::emergency_print(format_args!("\n!!! kernel panic: {}\n", info.message())),
    }
    crate::platform::exit(exit_code::PANIC)
}
