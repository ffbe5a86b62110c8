//! The kernel console: a buffered writer over the platform's console device.
//!
//! The device is the shim's CONSOLE_WRITE hypercall, or COM1 under QEMU (chosen once at boot by
//! [`crate::platform`], through `use_com1`). Under the shim every flush is one CONSOLE_WRITE
//! exit (~58 µs on this machine), so output is collected in a buffer and flushed when it fills,
//! when a line ends more than [`FLUSH_INTERVAL_NS`] after the previous flush, and explicitly
//! (before BLOCK, shutdown and panic). A `print!` is written under one lock, so lines from
//! different vCPUs never interleave.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::sync::Mutex;
use hypercall_abi::CONSOLE_WRITE_MAX;
use uart_16550::Uart16550;
use uart_16550::backend::PioBackend;

use crate::{hypercall, time};

/// Console buffer size.
const BUFFER_SIZE: usize = 8192;

/// A completed line is flushed when the previous flush is older than this.
pub const FLUSH_INTERVAL_NS: u64 = 20_000_000;

struct Console {
    buf: [u8; BUFFER_SIZE],
    len: usize,
    last_flush_ns: u64,
}

impl Console {
    fn flush(&mut self) {
        if self.len > 0 {
            device_write(&self.buf[..self.len]);
            self.len = 0;
        }
        self.last_flush_ns = time::now_ns();
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut bytes = s.as_bytes();
        while !bytes.is_empty() {
            let room = BUFFER_SIZE - self.len;
            if room == 0 {
                self.flush();
                continue;
            }
            let n = room.min(bytes.len());
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

/// Whether output goes to COM1 (QEMU) rather than to the shim.
static TO_COM1: AtomicBool = AtomicBool::new(false);

/// COM1, initialised only in QEMU mode. Under the shim the UART is never touched.
static COM1: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

/// Sends the console to COM1 from now on (QEMU: no shim answered HELLO) and initialises it.
pub(crate) fn use_com1() {
    TO_COM1.store(true, Ordering::Release);
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

/// Sends console bytes to the console device.
fn device_write(bytes: &[u8]) {
    if !TO_COM1.load(Ordering::Acquire) {
        for chunk in bytes.chunks(CONSOLE_WRITE_MAX as usize) {
            // A refused write has nowhere to be reported; the bytes are dropped.
            let _ = hypercall::console_write(chunk);
        }
        return;
    }
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

static CONSOLE: Mutex<Console> = Mutex::new(Console { buf: [0; BUFFER_SIZE], len: 0, last_flush_ns: 0 });

/// Formats `args` into the console buffer (used by [`print!`](crate::print)).
pub fn print(args: fmt::Arguments<'_>) {
    let mut c = CONSOLE.lock();
    // Writing into the buffer cannot fail.
    let _ = c.write_fmt(args);
    let ends_line = c.len > 0 && c.buf[c.len - 1] == b'\n';
    if ends_line && time::now_ns().saturating_sub(c.last_flush_ns) >= FLUSH_INTERVAL_NS {
        c.flush();
    }
}

/// Sends everything buffered to the platform console now.
pub fn flush() {
    CONSOLE.lock().flush();
}

/// Flushes if anything is buffered (an idle vCPU calls this before it blocks: idle time is
/// the cheapest time to pay for the exit).
pub(crate) fn flush_if_pending() {
    if let Some(mut c) = CONSOLE.try_lock()
        && c.len > 0
    {
        c.flush();
    }
}

/// A fixed-size, stack-allocated formatter used where the console lock may be unavailable.
pub(crate) struct StackWriter<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackWriter<N> {
    /// An empty writer.
    pub const fn new() -> Self {
        StackWriter { buf: [0; N], len: 0 }
    }

    /// The bytes written so far (truncated at `N`).
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Write for StackWriter<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = (N - self.len).min(s.len());
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Prints `args` even if the console lock is held (by a vCPU that faulted or panicked while
/// printing): waits briefly for the lock, then bypasses it with a direct device write.
pub(crate) fn emergency_print(args: fmt::Arguments<'_>) {
    for _ in 0..1_000_000 {
        if let Some(mut c) = CONSOLE.try_lock() {
            let _ = c.write_fmt(args);
            c.flush();
            return;
        }
        core::hint::spin_loop();
    }
    let mut w = StackWriter::<512>::new();
    let _ = w.write_fmt(args);
    device_write(w.bytes());
}

/// Prints to the kernel console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// Prints a line to the kernel console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}
