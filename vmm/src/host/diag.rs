//! The shim's diagnostics on stderr, written so that no thread ever waits for them.
//!
//! Every line goes into a bounded buffer that a thread of its own (`stderr`) writes to file
//! descriptor 2. When nobody reads stderr (a full pipe) or it is closed, the buffer fills and
//! further lines are dropped and counted ([`lost_lines`]); the thread that had something to
//! say (a vCPU, an I/O thread, a VM's owner) goes on at once, so `--timeout` and Ctrl-C keep
//! working. A failed write never panics (as `eprintln!` does).
//!
//! Lines a guest can cause (a refused device setup, a failed memory release, ...) go through
//! their VM's [`Limiter`] first: a burst of [`BURST`] lines, then at most [`PER_SECOND`] a
//! second; the next line printed says how many were suppressed, and the VM's summary counts
//! them (`diagnostics`).
//!
//! [`start`] starts the thread (the command line does it first thing; a run does it before
//! the seccomp filters, so no filtered thread needs `clone` for it). Until it runs, lines are
//! written directly, errors ignored.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Bytes of lines the buffer holds before further lines are dropped.
pub(crate) const BUFFER: usize = 64 * 1024;
/// Lines a VM may cause in a burst before the limit applies.
pub(crate) const BURST: f64 = 10.0;
/// Lines a VM may cause per second once its burst is spent.
pub(crate) const PER_SECOND: f64 = 1.0;

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The thread is writing a line (taken out of `lines`, not yet written).
    writing: bool,
}

struct Writer {
    queue: Mutex<Queue>,
    cond: Condvar,
    lost: AtomicU64,
}

impl Writer {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `line`; `false` when it did not fit (dropped and counted).
    fn push(&self, line: Vec<u8>) -> bool {
        let mut q = self.lock();
        if q.bytes + line.len() > BUFFER {
            drop(q);
            self.lost.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        q.bytes += line.len();
        q.lines.push_back(line);
        drop(q);
        self.cond.notify_all();
        true
    }

    fn drain(&self) {
        let mut stderr = std::io::stderr();
        loop {
            let line = {
                let mut q = self.lock();
                q.writing = false;
                self.cond.notify_all();
                while q.lines.is_empty() {
                    q = self.cond.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                let line = q.lines.pop_front().unwrap_or_default();
                q.bytes -= line.len();
                q.writing = true;
                line
            };
            // A closed or failing stderr must not stop anything: the line is counted as lost.
            if stderr.write_all(&line).and_then(|_| stderr.flush()).is_err() {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

static WRITER: OnceLock<Option<Arc<Writer>>> = OnceLock::new();
/// Lines lost while no writer thread ran (a direct write failed).
static LOST_DIRECT: AtomicU64 = AtomicU64::new(0);

/// Starts the writer thread (once per process; later calls do nothing). Without a thread (the
/// host is out of threads) lines are written directly.
pub fn start() {
    WRITER.get_or_init(|| {
        let w = Arc::new(Writer { queue: Mutex::new(Queue::default()), cond: Condvar::new(), lost: AtomicU64::new(0) });
        let t = Arc::clone(&w);
        // The thread lives as long as the process and keeps the process's seccomp filter as
        // it is (a thread that narrowed its own would stop a later run from synchronizing the
        // process filter over every thread).
        std::thread::Builder::new().name("stderr".into()).spawn(move || t.drain()).ok().map(|_| w)
    });
}

/// Writes `line` (a newline is added) without waiting; `false` if it was dropped.
pub fn emit(line: &str) -> bool {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    match WRITER.get() {
        Some(Some(w)) => w.push(bytes),
        _ => {
            let ok = std::io::stderr().write_all(&bytes).is_ok();
            if !ok {
                LOST_DIRECT.fetch_add(1, Ordering::Relaxed);
            }
            ok
        }
    }
}

/// Writes `hypervisor-shim: {args}` without waiting; `false` if it was dropped.
pub fn say(args: std::fmt::Arguments<'_>) -> bool {
    emit(&format!("hypervisor-shim: {args}"))
}

/// Waits (at most `within`) until every queued line is written. A stderr nobody reads keeps
/// the rest queued (the process may end without them; they count as lost).
pub fn flush(within: Duration) {
    let Some(Some(w)) = WRITER.get() else { return };
    let deadline = Instant::now() + within;
    let mut q = w.lock();
    while !q.lines.is_empty() || q.writing {
        let now = Instant::now();
        if now >= deadline {
            let left = q.lines.len() as u64 + u64::from(q.writing);
            w.lost.fetch_add(left, Ordering::Relaxed);
            return;
        }
        q = w.cond.wait_timeout(q, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
    }
}

/// Lines dropped (buffer full) or lost (the write failed) so far, over the whole process.
pub fn lost_lines() -> u64 {
    LOST_DIRECT.load(Ordering::Relaxed)
        + WRITER.get().and_then(|w| w.as_ref()).map_or(0, |w| w.lost.load(Ordering::Relaxed))
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Lines suppressed since the last one printed.
    pending: u64,
}

/// One VM's limit on the diagnostics its guest can cause.
#[derive(Debug)]
pub(crate) struct Limiter {
    bucket: Mutex<Bucket>,
    printed: AtomicU64,
    suppressed: AtomicU64,
    dropped: AtomicU64,
}

/// A VM's diagnostics figures (the summary's `diagnostics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct DiagFigures {
    /// Lines queued for stderr.
    pub(crate) printed: u64,
    /// Lines suppressed by the rate limit.
    pub(crate) suppressed: u64,
    /// Lines dropped because stderr's buffer was full (nobody read it).
    pub(crate) dropped: u64,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new()
    }
}

impl Limiter {
    /// A limiter with its burst available.
    pub(crate) fn new() -> Limiter {
        Limiter {
            bucket: Mutex::new(Bucket { tokens: BURST, at: Instant::now(), pending: 0 }),
            printed: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Says `hypervisor-shim: {args}` if the limit allows (never waits); the next line printed
    /// after suppressed ones says how many there were.
    pub(crate) fn say(&self, args: std::fmt::Arguments<'_>) {
        let pending = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * PER_SECOND).min(BURST);
            b.at = now;
            if b.tokens < 1.0 {
                b.pending += 1;
                drop(b);
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            b.tokens -= 1.0;
            std::mem::take(&mut b.pending)
        };
        let line = if pending > 0 {
            format!(
                "hypervisor-shim: {args} ({pending} earlier lines the guest caused were suppressed: \
                 {BURST} at once, then at most {PER_SECOND} a second)"
            )
        } else {
            format!("hypervisor-shim: {args}")
        };
        if emit(&line) {
            self.printed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The figures so far.
    pub(crate) fn figures(&self) -> DiagFigures {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DiagFigures { printed: l(&self.printed), suppressed: l(&self.suppressed), dropped: l(&self.dropped) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_limited_to_the_burst_and_counted() {
        let l = Limiter::new();
        for i in 0..20_000 {
            l.say(format_args!("line {i}"));
        }
        let f = l.figures();
        assert_eq!(f.printed + f.suppressed + f.dropped, 20_000);
        // The burst, and at most a few refilled while the loop ran.
        assert!(f.printed + f.dropped <= BURST as u64 + 5, "{f:?}");
        assert!(f.suppressed >= 20_000 - BURST as u64 - 5, "{f:?}");
    }

    #[test]
    fn a_full_buffer_drops_lines_without_waiting() {
        let w = Writer { queue: Mutex::new(Queue::default()), cond: Condvar::new(), lost: AtomicU64::new(0) };
        // No thread drains it: it fills, then drops.
        let line = vec![b'x'; 1000];
        let kept = (0..200).filter(|_| w.push(line.clone())).count();
        assert_eq!(kept, BUFFER / 1000);
        assert_eq!(w.lost.load(Ordering::Relaxed), 200 - kept as u64);
    }
}
