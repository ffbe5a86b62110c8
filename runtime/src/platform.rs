//! Where the kernel runs: under `hypervisor-shim` (HELLO answered) or under QEMU (HELLO
//! unanswered: COM1 for the console, see [`crate::console`], and isa-debug-exit for the exit
//! code), and stopping the VM.

use core::sync::atomic::{AtomicU8, Ordering};

use hypercall_abi::{QEMU_DEBUG_EXIT_PORT, exit_code};

use crate::arch::cpu;
use crate::{console, hypercall};

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

/// Records the platform; in QEMU mode also sends the console to COM1.
pub(crate) fn init(shim_answered: bool) {
    if shim_answered {
        PLATFORM.store(SHIM, Ordering::Release);
        return;
    }
    PLATFORM.store(QEMU, Ordering::Release);
    console::use_com1();
}

/// The current platform.
pub fn current() -> Platform {
    if PLATFORM.load(Ordering::Acquire) == QEMU { Platform::Qemu } else { Platform::Shim }
}

/// Stops the VM with `code` after flushing the console. Never returns.
pub fn exit(code: u32) -> ! {
    console::flush();
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
