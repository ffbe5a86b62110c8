//! Where the kernel runs: under `hypervisor-shim` (HELLO answered) or under QEMU (HELLO
//! unanswered: COM1 via `uart_16550` for the console, isa-debug-exit for the exit code).

use core::sync::atomic::{AtomicU8, Ordering};

use hypercall_abi::{CONSOLE_WRITE_MAX, QEMU_DEBUG_EXIT_PORT, exit_code};
use spin::Mutex;
use uart_16550::Uart16550;
use uart_16550::backend::PioBackend;

use crate::arch::cpu;
use crate::hypercall;

/// The two environments the kernel knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Under `hypervisor-shim`: every service is a hypercall.
    Shim,
    /// Under QEMU (PVH boot): fixed resources, COM1 console, isa-debug-exit.
    Qemu,
}

impl Platform {
    /// A human-readable name for banners.
    pub fn describe(self) -> &'static str {
        match self {
            Platform::Shim => "hypervisor-shim (KVM, hypercall ABI)",
            Platform::Qemu => "QEMU (PVH boot, COM1 console, no shim)",
        }
    }
}

const SHIM: u8 = 0;
const QEMU: u8 = 1;

static PLATFORM: AtomicU8 = AtomicU8::new(SHIM);

/// COM1, initialised only in QEMU mode. Under the shim the UART is never touched.
static COM1: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

/// Records the platform; in QEMU mode also initialises COM1.
pub(crate) fn init(shim_answered: bool) {
    if shim_answered {
        PLATFORM.store(SHIM, Ordering::Release);
        return;
    }
    PLATFORM.store(QEMU, Ordering::Release);
    // SAFETY: 0x3f8 is COM1 on QEMU's PC-compatible machines, reachable at CPL 3 with IOPL 3,
    // and only this module drives it.
    if let Ok(mut uart) = unsafe { Uart16550::new_port(0x3f8) } {
        // A UART that fails its self-test is left unused: output then only reaches nobody, but
        // the exit code still does.
        if uart.init(uart_16550::Config::default()).is_ok() {
            *COM1.lock() = Some(uart);
        }
    }
}

/// The current platform.
pub fn current() -> Platform {
    if PLATFORM.load(Ordering::Acquire) == QEMU { Platform::Qemu } else { Platform::Shim }
}

/// Sends console bytes to wherever this platform's console is.
pub(crate) fn console_out(bytes: &[u8]) {
    match current() {
        Platform::Shim => {
            for chunk in bytes.chunks(CONSOLE_WRITE_MAX as usize) {
                // A refused write has nowhere to be reported; the bytes are dropped.
                let _ = hypercall::console_write(chunk);
            }
        }
        Platform::Qemu => {
            if let Some(uart) = COM1.lock().as_mut() {
                // Translate "\n" to "\r\n" in small batches so the UART's FIFO is used.
                let mut out = [0u8; 128];
                let mut n = 0;
                for &b in bytes {
                    if n + 2 > out.len() {
                        uart.send_bytes_exact(&out[..n]);
                        n = 0;
                    }
                    if b == b'\n' {
                        out[n] = b'\r';
                        n += 1;
                    }
                    out[n] = b;
                    n += 1;
                }
                uart.send_bytes_exact(&out[..n]);
            }
        }
    }
}

/// Stops the VM with `code` after flushing the console. Never returns.
pub fn exit(code: u32) -> ! {
    crate::console::flush();
    match current() {
        Platform::Shim => {
            if !hypercall::shutdown(code).is_ok() {
                // The host refused the code (out of range): stop with the panic code instead.
                let _ = hypercall::shutdown(exit_code::PANIC);
            }
        }
        // SAFETY: isa-debug-exit is attached at this port in QEMU mode (see `hypervisor-shim
        // qemu`); writing it ends the QEMU process with status (code << 1) | 1.
        Platform::Qemu => unsafe { cpu::outl(QEMU_DEBUG_EXIT_PORT, code) },
    }
    cpu::halt_forever()
}
