//! The kernel console: a buffered writer over the platform's console.
//!
//! Under the shim every flush is one CONSOLE_WRITE exit (~58 µs on this machine), so output is
//! collected in a buffer and flushed when it fills, when a line ends more than
//! [`FLUSH_INTERVAL_NS`] after the previous flush, and explicitly (before BLOCK, shutdown and
//! panic). A `print!` is written under one lock, so lines from different vCPUs never interleave.

use core::fmt::{self, Write};

use spin::Mutex;

use crate::{platform, time};

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
            platform::console_out(&self.buf[..self.len]);
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
/// printing): waits briefly for the lock, then bypasses it with a direct platform write.
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
    platform::console_out(w.bytes());
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
