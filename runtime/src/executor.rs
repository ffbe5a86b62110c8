//! The SMP task executor: cooperative, with one shared run queue that every online vCPU
//! serves (the loop that serves it is `crate::worker`).
//!
//! There are no interrupts. A vCPU runs a task until it returns `Pending` or finishes. The
//! vCPU that queues work kicks an idle one when the busy vCPUs will not get to it soon.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::task::Wake;
use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use core::task::{Context, Poll, Waker};

use crate::sync::Mutex;

use crate::{smp, time};

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Task states.
mod task_state {
    pub const IDLE: u8 = 0;
    pub const SCHEDULED: u8 = 1;
    pub const RUNNING: u8 = 2;
    /// Woken while running: run again.
    pub const NOTIFIED: u8 = 3;
    pub const DONE: u8 = 4;
}

/// A spawned task (what the run queue holds).
pub(crate) struct Task {
    state: AtomicU8,
    future: Mutex<Option<BoxFuture>>,
}

static QUEUE: Mutex<VecDeque<Arc<Task>>> = Mutex::new(VecDeque::new());
static QUEUED: AtomicUsize = AtomicUsize::new(0);
/// Kernel time (ns) since when the queue has not been empty (0: it is empty).
static WAITING_SINCE: AtomicU64 = AtomicU64::new(0);
/// See [`set_kick_after`].
static KICK_AFTER: AtomicU64 = AtomicU64::new(KICK_AFTER_NS);
/// How long a task runs per poll, on average (ns; a moving average over the last ~8 polls).
static AVG_RUN_NS: AtomicU64 = AtomicU64::new(0);

/// How long a task runs per poll, on average (ns).
pub(crate) fn avg_run_ns() -> u64 {
    AVG_RUN_NS.load(Ordering::Relaxed)
}

fn note_run_time(ns: u64) {
    let avg = AVG_RUN_NS.load(Ordering::Relaxed);
    AVG_RUN_NS.store(avg - avg / 8 + ns / 8, Ordering::Relaxed);
}

/// How long queued work waits for the busy vCPUs before an idle one is kicked, by default:
/// about what the KICK and the wake-up it causes cost on a nested host. Work the busy vCPUs
/// get to sooner is cheaper left to them.
pub(crate) const KICK_AFTER_NS: u64 = 50_000;

/// Sets how long queued work waits for the busy vCPUs before an idle one is kicked (0: kick
/// as soon as more tasks are queued than vCPUs are busy).
pub(crate) fn set_kick_after(ns: u64) {
    KICK_AFTER.store(ns, Ordering::Relaxed);
}

impl Task {
    fn schedule(self: &Arc<Self>) {
        loop {
            match self.state.load(Ordering::Acquire) {
                task_state::IDLE => {
                    if self
                        .state
                        .compare_exchange(task_state::IDLE, task_state::SCHEDULED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        push(self.clone());
                        return;
                    }
                }
                task_state::RUNNING => {
                    if self
                        .state
                        .compare_exchange(
                            task_state::RUNNING,
                            task_state::NOTIFIED,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                    {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Polls the task once on the calling vCPU (queueing it again if it was woken meanwhile).
    pub(crate) fn run(self: Arc<Self>) {
        let started = time::now_ns();
        self.run_once();
        note_run_time(time::now_ns().saturating_sub(started));
    }

    fn run_once(self: Arc<Self>) {
        self.state.store(task_state::RUNNING, Ordering::Release);
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        let done = {
            let mut slot = self.future.lock();
            match slot.as_mut() {
                Some(f) => {
                    let ready = f.as_mut().poll(&mut cx).is_ready();
                    if ready {
                        *slot = None;
                    }
                    ready
                }
                None => true,
            }
        };
        if done {
            self.state.store(task_state::DONE, Ordering::Release);
            return;
        }
        if self
            .state
            .compare_exchange(task_state::RUNNING, task_state::IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Woken while it ran: queue it again.
            self.state.store(task_state::SCHEDULED, Ordering::Release);
            push(self);
        }
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.schedule();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.schedule();
    }
}

fn push(task: Arc<Task>) {
    QUEUE.lock().push_back(task);
    let queued = QUEUED.fetch_add(1, Ordering::AcqRel) + 1;
    if queued == 1 {
        let _ = WAITING_SINCE.compare_exchange(0, time::now_ns().max(1), Ordering::AcqRel, Ordering::Relaxed);
    }
    // Waking an idle vCPU costs two exits (its KICK and, later, its BLOCK): worth it when the
    // queued work would otherwise wait longer than KICK_AFTER for the busy vCPUs, judging by
    // how long tasks have been running per poll. Short tasks are left to the busy vCPUs (if
    // they fall behind, `kick_if_waiting` kicks at a task boundary); long ones (the request
    // that computes for milliseconds) kick at once.
    let busy = smp::online().saturating_sub(smp::idle()).max(1);
    let after = KICK_AFTER.load(Ordering::Relaxed);
    let expected_wait = (queued as u64).saturating_mul(AVG_RUN_NS.load(Ordering::Relaxed)) / busy as u64;
    if queued > busy && (after == 0 || expected_wait > after) {
        smp::kick_one_idle();
    }
}

/// Kicks an idle vCPU when queued work has waited longer than the kick delay for the busy
/// ones (see [`set_kick_after`]). Every vCPU calls it at its task boundaries.
pub(crate) fn kick_if_waiting() {
    let after = KICK_AFTER.load(Ordering::Relaxed);
    let since = WAITING_SINCE.load(Ordering::Acquire);
    if after == 0 || since == 0 || smp::idle() == 0 {
        return;
    }
    let now = time::now_ns();
    if now.saturating_sub(since) > after
        && WAITING_SINCE.compare_exchange(since, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    {
        // The clock restarts: another kick only if the work waits that long again.
        smp::kick_one_idle();
    }
}

/// Takes the next queued task.
pub(crate) fn pop() -> Option<Arc<Task>> {
    if QUEUED.load(Ordering::Acquire) == 0 {
        return None;
    }
    let t = QUEUE.lock().pop_front();
    if t.is_some() && QUEUED.fetch_sub(1, Ordering::AcqRel) == 1 {
        WAITING_SINCE.store(0, Ordering::Release);
    }
    t
}

/// Tasks queued and ready to run (not counting running ones).
pub fn runnable() -> usize {
    QUEUED.load(Ordering::Acquire)
}

struct JoinState<T> {
    result: Mutex<Option<T>>,
    waker: Mutex<Option<Waker>>,
    done: AtomicBool,
}

/// Awaits a spawned task's result.
pub struct JoinHandle<T> {
    state: Arc<JoinState<T>>,
}

impl<T> core::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("JoinHandle").field("finished", &self.is_finished()).finish()
    }
}

impl<T> JoinHandle<T> {
    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.state.done.load(Ordering::Acquire)
    }

    /// Takes the result of a finished task.
    #[cfg(test)]
    pub fn try_take(&self) -> Option<T> {
        if self.is_finished() { self.state.result.lock().take() } else { None }
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if !self.state.done.load(Ordering::Acquire) {
            *self.state.waker.lock() = Some(cx.waker().clone());
            if !self.state.done.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        match self.state.result.lock().take() {
            Some(v) => Poll::Ready(v),
            // Taken already (polled after completion): never completes again.
            None => Poll::Pending,
        }
    }
}

/// Spawns `future` as a task; any online vCPU may run it.
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let join = Arc::new(JoinState { result: Mutex::new(None), waker: Mutex::new(None), done: AtomicBool::new(false) });
    let completion = join.clone();
    let wrapped = async move {
        let value = future.await;
        *completion.result.lock() = Some(value);
        completion.done.store(true, Ordering::Release);
        if let Some(w) = completion.waker.lock().take() {
            w.wake();
        }
    };
    let task =
        Arc::new(Task { state: AtomicU8::new(task_state::SCHEDULED), future: Mutex::new(Some(Box::pin(wrapped))) });
    push(task);
    JoinHandle { state: join }
}

/// Gives other tasks a turn (and the vCPU a task boundary).
pub fn yield_now() -> impl Future<Output = ()> {
    struct YieldNow(bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    YieldNow(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_task_runs_and_joins() {
        let h = spawn(async { 40 + 2 });
        while let Some(t) = pop() {
            t.run();
        }
        assert!(h.is_finished());
        assert_eq!(h.try_take(), Some(42));
    }
}
