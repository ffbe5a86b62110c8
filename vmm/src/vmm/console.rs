//! The guest console's way out: a bounded buffer that vCPU threads append to and a thread of
//! its own that writes it to the sink (standard output, a prefixing or capturing writer).
//!
//! A vCPU never waits for the sink: when nobody reads the shim's output (a full pipe), the
//! buffer fills, further output is dropped and counted (the summary's `console_dropped_bytes`),
//! and the run goes on, so `--timeout` and Ctrl-C keep working.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes the buffer holds before output is dropped.
pub(crate) const CONSOLE_BUFFER: usize = 1 << 20;
/// How long the end of a run waits for the buffer to drain.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Buffer {
    bytes: VecDeque<u8>,
    closed: bool,
    /// The writer thread is in a write (its bytes are out of `bytes` but not yet written).
    writing: bool,
}

struct Shared {
    buf: Mutex<Buffer>,
    cond: Condvar,
    dropped: AtomicU64,
}

/// One VM's console.
pub(crate) struct Console {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").field("dropped", &self.dropped()).finish_non_exhaustive()
    }
}

impl Console {
    /// A console writing to `sink` from a thread named `name-console`.
    pub(crate) fn new(name: &str, sink: Box<dyn Write + Send>) -> Console {
        let shared =
            Arc::new(Shared { buf: Mutex::new(Buffer::default()), cond: Condvar::new(), dropped: AtomicU64::new(0) });
        let s = Arc::clone(&shared);
        // Without the thread (the host is out of threads) output is counted as dropped.
        let job = Box::new(move || drain(&s, sink));
        if crate::host::standby::spawn(Some(crate::host::seccomp::Role::Console), format!("{name}-console"), job)
            .is_err()
        {
            shared.buf.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        }
        Console { shared }
    }

    /// Appends guest output; what does not fit is dropped and counted. Never blocks on the sink.
    pub(crate) fn write(&self, bytes: &[u8]) {
        let mut b = self.shared.buf.lock().unwrap_or_else(|p| p.into_inner());
        let room = if b.closed { 0 } else { CONSOLE_BUFFER.saturating_sub(b.bytes.len()) };
        let take = bytes.len().min(room);
        b.bytes.extend(&bytes[..take]);
        drop(b);
        if take < bytes.len() {
            self.shared.dropped.fetch_add((bytes.len() - take) as u64, Ordering::Relaxed);
        }
        if take > 0 {
            self.shared.cond.notify_all();
        }
    }

    /// Bytes dropped because the buffer was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits (at most `within`) until everything buffered is written, then stops the thread.
    /// A sink that does not drain in time keeps its thread blocked; the rest is dropped.
    pub(crate) fn finish(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut b = self.shared.buf.lock().unwrap_or_else(|p| p.into_inner());
        while (!b.bytes.is_empty() || b.writing) && !b.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            b = self.shared.cond.wait_timeout(b, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        let left = b.bytes.len() as u64;
        b.bytes.clear();
        b.closed = true;
        drop(b);
        self.shared.dropped.fetch_add(left, Ordering::Relaxed);
        self.shared.cond.notify_all();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let mut b = self.shared.buf.lock().unwrap_or_else(|p| p.into_inner());
        b.closed = true;
        drop(b);
        self.shared.cond.notify_all();
    }
}

fn drain(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    crate::host::seccomp::install_thread(crate::host::seccomp::Role::Console);
    let mut chunk = Vec::with_capacity(64 * 1024);
    loop {
        {
            let mut b = shared.buf.lock().unwrap_or_else(|p| p.into_inner());
            b.writing = false;
            shared.cond.notify_all();
            while b.bytes.is_empty() && !b.closed {
                b = shared.cond.wait(b).unwrap_or_else(|p| p.into_inner());
            }
            if b.bytes.is_empty() && b.closed {
                return;
            }
            let n = b.bytes.len().min(64 * 1024);
            chunk.clear();
            chunk.extend(b.bytes.drain(..n));
            b.writing = true;
        }
        // A closed or failing sink must not stop the guest: the bytes are dropped.
        if sink.write_all(&chunk).and_then(|_| sink.flush()).is_err() {
            shared.dropped.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that blocks until released.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cond) = &*self.0;
            let mut go = lock.lock().unwrap();
            while !*go {
                go = cond.wait(go).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_sink_never_blocks_the_writer_and_drops_are_counted() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let out = Arc::new(Mutex::new(Vec::new()));
        let c = Console::new("t", Box::new(Stuck(Arc::clone(&gate), Arc::clone(&out))));
        let t = Instant::now();
        let line = [b'x'; 4096];
        for _ in 0..1024 {
            c.write(&line);
        }
        assert!(t.elapsed() < Duration::from_secs(2), "writes never wait for the sink");
        // The thread holds at most one chunk; the buffer at most CONSOLE_BUFFER bytes.
        let dropped = c.dropped();
        assert!(dropped >= (4096 * 1024 - CONSOLE_BUFFER - 64 * 1024) as u64, "dropped {dropped}");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        c.finish(Duration::from_secs(5));
        assert_eq!(out.lock().unwrap().len() as u64 + c.dropped(), 4096 * 1024, "every byte written or counted");
    }
}
