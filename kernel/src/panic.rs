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
