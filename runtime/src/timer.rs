//! Timers on the TSC: `sleep` futures, fired by the executor at task boundaries. An idle vCPU
//! BLOCKs until the earliest deadline.

use alloc::collections::BinaryHeap;
use core::cmp::{Ordering as CmpOrdering, Reverse};
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicU64, Ordering};
use core::task::{Context, Poll, Waker};

use crate::sync::Mutex;

use crate::time;

struct Timer {
    deadline_ns: u64,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline_ns, self.seq) == (other.deadline_ns, other.seq)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.deadline_ns, self.seq).cmp(&(other.deadline_ns, other.seq))
    }
}

static TIMERS: Mutex<BinaryHeap<Reverse<Timer>>> = Mutex::new(BinaryHeap::new());
static SEQ: AtomicU64 = AtomicU64::new(0);
/// Earliest armed deadline (u64::MAX when none), readable without the lock.
static NEXT: AtomicU64 = AtomicU64::new(u64::MAX);

fn arm(deadline_ns: u64, waker: Waker) {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let earlier = {
        let mut heap = TIMERS.lock();
        heap.push(Reverse(Timer { deadline_ns, seq, waker }));
        let next = heap.peek().map_or(u64::MAX, |t| t.0.deadline_ns);
        NEXT.swap(next, Ordering::SeqCst) > next
    };
    // Idle vCPU 0 sleeps until the deadline it saw when it blocked; a new, earlier one must
    // wake it to re-plan.
    if earlier {
        crate::smp::kick_boot_vcpu_if_idle();
    }
}

/// Wakes every timer whose deadline has passed.
pub fn fire_expired() {
    let now = time::now_ns();
    if NEXT.load(Ordering::Acquire) > now {
        return;
    }
    let mut due = alloc::vec::Vec::new();
    {
        let mut heap = TIMERS.lock();
        while heap.peek().is_some_and(|t| t.0.deadline_ns <= now) {
            if let Some(Reverse(t)) = heap.pop() {
                due.push(t.waker);
            }
        }
        NEXT.store(heap.peek().map_or(u64::MAX, |t| t.0.deadline_ns), Ordering::Release);
    }
    for w in due {
        w.wake();
    }
}

/// The earliest armed deadline (kernel ns), if any.
pub fn next_deadline() -> Option<u64> {
    match NEXT.load(Ordering::SeqCst) {
        u64::MAX => None,
        d => Some(d),
    }
}

/// A future that completes at a kernel time (ns since boot).
#[derive(Debug)]
pub struct Sleep {
    deadline_ns: u64,
    armed: bool,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if time::now_ns() >= self.deadline_ns {
            return Poll::Ready(());
        }
        if !self.armed {
            self.armed = true;
            arm(self.deadline_ns, cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Completes `ns` nanoseconds from now.
pub fn sleep_ns(ns: u64) -> Sleep {
    Sleep { deadline_ns: time::now_ns().saturating_add(ns), armed: false }
}

/// Completes `ms` milliseconds from now.
pub fn sleep_ms(ms: u64) -> Sleep {
    sleep_ns(ms.saturating_mul(1_000_000))
}
