//! The VM's vCPUs as the shim tracks them: one [`VcpuHandle`] per vCPU, through which every
//! other thread drives it, and the [`VcpuSet`] with the counts the policy and the summary need.
//!
//! A handle carries two things to its vCPU thread:
//!
//! * **events** ([`VcpuEvent`]: pause, resume, save state, throttle, finish), queued and
//!   answered on a channel the sender gives ([`VcpuResponse`]). Sending kicks the thread: a
//!   vCPU in `KVM_RUN` is forced out by a signal whose handler sets `immediate_exit` (both live
//!   here); one asleep in BLOCK or parked is woken. The thread serves events where it waits
//!   (at the top of its loop, in BLOCK, parked), so a paused VM's vCPUs cost no CPU.
//! * **wake bits** ([`wake`]) for the guest: a KICK, a device's packets, a host notice. They
//!   end a BLOCK and are what the guest sees.
//!
//! States: `Running` (in or around KVM_RUN), `Blocked` (asleep in BLOCK), `Parked` (went down;
//! its thread sleeps until the vCPU is reused), `Starting` (reused, not yet resumed), `Gone`
//! (its creation failed; never reused).

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use hypercall_abi::wake;
use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::vmm::cpu_state::VcpuState;

/// A throttled vCPU is held back this long each time the governor throttles it (every tick),
/// so it gets about a tenth of the run time.
pub(crate) const THROTTLE_PAUSE: Duration = Duration::from_millis(9);

/// Most REPORTs per second per vCPU that the host records (the timeline's `report` lines);
/// the rest are answered `OK` and counted (`reports_not_recorded`).
pub(crate) const REPORTS_PER_SECOND: u32 = 1000;

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own `kvm_run` mapping, installed by
        // `bind_kvm_run` before the thread can be kicked and cleared before the mapping goes
        // away. Setting `immediate_exit` makes the next (or current) KVM_RUN return EINTR.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn kick_signal() -> libc::c_int {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Registration can only fail for an invalid signal number; SIGRTMIN is valid.
        let _ = register_signal_handler(SIGRTMIN(), kick_handler);
    });
    SIGRTMIN()
}

/// Makes the kick signal set `immediate_exit` in `run` (this thread's `kvm_run`) while this
/// thread runs the vCPU; null unbinds it.
pub(crate) fn bind_kvm_run(run: *mut kvm_run) {
    kick_signal();
    KVM_RUN.with(|c| c.set(run));
}

/// Where a (re)started vCPU begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// `rip`.
    pub(crate) rip: u64,
    /// `rsp`.
    pub(crate) rsp: u64,
    /// `rdi`.
    pub(crate) arg: u64,
}

/// A vCPU's scheduling state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Running guest code (or serving one of its exits).
    Running,
    /// Sleeping in BLOCK.
    Blocked,
    /// Went down; waiting to be reused.
    Parked,
    /// Reused by VCPU_UP; will resume at this entry.
    Starting(Entry),
    /// Its creation failed: never reused, not counted.
    Gone,
}

impl State {
    /// Online (counted against the policy): everything but parked and gone.
    pub(crate) fn online(self) -> bool {
        !matches!(self, State::Parked | State::Gone)
    }
}

/// What a vCPU thread is asked to do.
#[derive(Debug)]
pub(crate) enum VcpuEvent {
    /// Stay out of the guest until [`VcpuEvent::Resume`]; answer [`VcpuResponse::Paused`]
    /// once out.
    Pause(Sender<(u32, VcpuResponse)>),
    /// Enter the guest again.
    Resume,
    /// Answer the vCPU's state ([`VcpuResponse::Saved`]; [`VcpuResponse::Parked`] for a vCPU
    /// that is down). A vCPU asleep in BLOCK leaves it first (its BLOCK returns KICK, which a
    /// guest treats as a spurious wake-up) so its call completes before the state is read.
    SaveState(Sender<(u32, VcpuResponse)>),
    /// Enforcement: hold the vCPU out of the guest for [`THROTTLE_PAUSE`] (the governor sends
    /// this every tick while the vCPU is throttled).
    Throttle,
    /// The VM is ending: leave the loop.
    Finish,
}

/// A vCPU thread's answer.
#[derive(Debug)]
pub(crate) enum VcpuResponse {
    /// Out of the guest, and staying out.
    Paused,
    /// Its state.
    Saved(Box<VcpuState>),
    /// It is down: no state to save.
    Parked,
    /// Its state could not be read.
    Failed(String),
}

struct Inner {
    state: State,
    events: VecDeque<VcpuEvent>,
    /// The thread waits for an event (paused or throttled at the top of its loop): a send
    /// wakes it without a signal.
    waiting: bool,
}

/// One vCPU's handle, shared by its thread and every thread that drives or wakes it.
pub(crate) struct VcpuHandle {
    id: u32,
    inner: Mutex<Inner>,
    cond: Condvar,
    /// Events are queued (checked without the lock after every exit).
    has_events: AtomicBool,
    /// Pending [`wake`] bits, consumed by the next BLOCK.
    wake: AtomicU32,
    /// The thread running this vCPU (`pthread_t`), for kicks out of KVM_RUN; 0 until known.
    thread: AtomicU64,
    /// RIP at the vCPU's latest exit (for diagnosing a hang).
    last_rip: AtomicU64,
    /// REPORTs recorded in the current second: (second, count).
    reports: Mutex<(u64, u32)>,
    /// CPU time of this vCPU's thread: the thread's CPU clock and its reading when the thread
    /// took the vCPU (while it runs it), and the time of threads that ran it before.
    cpu: Mutex<(Option<(libc::clockid_t, u64)>, u64)>,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle").field("id", &self.id).field("state", &self.state()).finish_non_exhaustive()
    }
}

/// A thread CPU clock's reading in ns (0 if it cannot be read).
fn cpu_clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; a clock of a thread that ended fails (EINVAL), it
    // is not undefined behaviour.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// What a vCPU thread does with an event it got while waiting (in BLOCK or parked).
#[derive(Debug)]
pub(crate) enum Served {
    /// Keep waiting.
    Stay,
    /// Stop waiting; an event given back is served first by the thread's loop.
    Leave(Option<VcpuEvent>),
}

impl VcpuHandle {
    /// A handle in state `Running`.
    pub(crate) fn new(id: u32) -> Self {
        VcpuHandle {
            id,
            inner: Mutex::new(Inner { state: State::Running, events: VecDeque::new(), waiting: false }),
            cond: Condvar::new(),
            has_events: AtomicBool::new(false),
            wake: AtomicU32::new(0),
            thread: AtomicU64::new(0),
            last_rip: AtomicU64::new(0),
            reports: Mutex::new((0, 0)),
            cpu: Mutex::new((None, 0)),
        }
    }

    /// The vCPU id.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state.
    pub(crate) fn state(&self) -> State {
        self.lock().state
    }

    /// Records the RIP of the latest exit.
    pub(crate) fn set_last_rip(&self, rip: u64) {
        self.last_rip.store(rip, Ordering::Relaxed);
    }

    /// The RIP of the latest exit.
    pub(crate) fn last_rip(&self) -> u64 {
        self.last_rip.load(Ordering::Relaxed)
    }

    /// Whether a REPORT made in second `now_s` (of the run) may be recorded: at most
    /// [`REPORTS_PER_SECOND`] per second.
    pub(crate) fn report_allowed(&self, now_s: u64) -> bool {
        let mut r = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        if r.0 != now_s {
            *r = (now_s, 0);
        }
        r.1 += 1;
        r.1 <= REPORTS_PER_SECOND
    }

    /// Records the calling thread as this vCPU's thread (and starts counting its CPU time).
    pub(crate) fn bind_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.thread.store(me as u64, Ordering::Release);
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `me` is the calling thread, alive; `clock` is a valid out-pointer.
        if unsafe { libc::pthread_getcpuclockid(me, &mut clock) } == 0 {
            self.cpu.lock().unwrap_or_else(|p| p.into_inner()).0 = Some((clock, cpu_clock_ns(clock)));
        }
    }

    /// The calling thread leaves this vCPU (it may serve another VM next): its CPU time so far
    /// is kept.
    pub(crate) fn unbind_current_thread(&self) {
        let mut cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((clock, start)) = cpu.0.take() {
            cpu.1 += cpu_clock_ns(clock).saturating_sub(start);
        }
    }

    /// CPU time its threads have spent on this vCPU, in ns (in the guest and serving its exits).
    pub(crate) fn cpu_ns(&self) -> u64 {
        let cpu = self.cpu.lock().unwrap_or_else(|p| p.into_inner());
        cpu.1 + cpu.0.map_or(0, |(clock, start)| cpu_clock_ns(clock).saturating_sub(start))
    }

    /// Sends `event` to the vCPU thread and kicks it: out of KVM_RUN (a signal), out of a
    /// wait (the condition variable). Returns the state the vCPU was in.
    pub(crate) fn send(&self, event: VcpuEvent) -> State {
        let mut inner = self.lock();
        inner.events.push_back(event);
        self.has_events.store(true, Ordering::Release);
        let state = inner.state;
        let in_guest = state == State::Running && !inner.waiting;
        self.cond.notify_all();
        drop(inner);
        if in_guest {
            self.interrupt();
        }
        state
    }

    /// Whether events wait (a lock-free look, made after every exit).
    pub(crate) fn has_events(&self) -> bool {
        self.has_events.load(Ordering::Acquire)
    }

    /// The next event, if any.
    pub(crate) fn next_event(&self) -> Option<VcpuEvent> {
        let mut inner = self.lock();
        Self::pop(&self.has_events, &mut inner)
    }

    fn pop(flag: &AtomicBool, inner: &mut Inner) -> Option<VcpuEvent> {
        let e = inner.events.pop_front();
        if inner.events.is_empty() {
            flag.store(false, Ordering::Release);
        }
        e
    }

    /// Waits for the next event (a paused vCPU), at most `timeout` (`None`: without limit).
    pub(crate) fn wait_event(&self, timeout: Option<Duration>) -> Option<VcpuEvent> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut inner = self.lock();
        inner.waiting = true;
        let event = loop {
            if let Some(e) = Self::pop(&self.has_events, &mut inner) {
                break Some(e);
            }
            match deadline {
                None => inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break None;
                    }
                    inner = self.cond.wait_timeout(inner, d - now).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
        };
        inner.waiting = false;
        event
    }

    /// Adds wake-up `bits` and wakes the vCPU: a blocked one returns from BLOCK; a running
    /// one is forced out of KVM_RUN when `interrupt` is set. Returns whether it was blocked.
    pub(crate) fn wake(&self, bits: u32, interrupt: bool) -> bool {
        self.wake.fetch_or(bits, Ordering::SeqCst);
        let inner = self.lock();
        match inner.state {
            State::Blocked | State::Parked => {
                self.cond.notify_all();
                inner.state == State::Blocked
            }
            State::Running if interrupt => {
                drop(inner);
                self.interrupt();
                false
            }
            _ => false,
        }
    }

    /// Forces the vCPU's thread out of KVM_RUN (no-op before the thread is known).
    fn interrupt(&self) {
        let t = self.thread.load(Ordering::Acquire);
        if t != 0 {
            // SAFETY: `t` is the pthread_t of this vCPU's thread, stored by the thread itself;
            // vCPU threads are joined only after the VM stops, and a signal to an exited
            // thread is harmless (ESRCH).
            unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
        }
    }

    /// Sleeps in BLOCK for at most `timeout`, serving events meanwhile with `serve` (called
    /// without the handle's lock; it may end the sleep). Returns the [`wake`] bits that ended
    /// it (KICK when an event did).
    pub(crate) fn block(&self, timeout: Option<Duration>, serve: &mut dyn FnMut(VcpuEvent) -> Served) -> u32 {
        let pending = self.wake.swap(0, Ordering::SeqCst);
        if pending != 0 {
            return pending;
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut inner = self.lock();
        inner.state = State::Blocked;
        let bits = loop {
            if let Some(e) = Self::pop(&self.has_events, &mut inner) {
                drop(inner);
                let served = serve(e);
                inner = self.lock();
                if let Served::Leave(back) = served {
                    self.requeue(&mut inner, back);
                    break wake::KICK;
                }
                continue;
            }
            let pending = self.wake.swap(0, Ordering::SeqCst);
            if pending != 0 {
                break pending;
            }
            match deadline {
                None => inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break wake::TIMEOUT;
                    }
                    inner = self.cond.wait_timeout(inner, d - now).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
        };
        inner.state = State::Running;
        bits
    }

    fn requeue(&self, inner: &mut Inner, event: Option<VcpuEvent>) {
        if let Some(e) = event {
            inner.events.push_front(e);
            self.has_events.store(true, Ordering::Release);
        }
    }

    /// Parks the vCPU's thread (it went down) until it is reused, serving events meanwhile
    /// with `serve` (called without the handle's lock). Returns the entry to resume at, or
    /// `None` when `serve` ends the wait.
    pub(crate) fn park(&self, serve: &mut dyn FnMut(VcpuEvent) -> Served) -> Option<Entry> {
        let mut inner = self.lock();
        loop {
            if let State::Starting(entry) = inner.state {
                inner.state = State::Running;
                self.wake.store(0, Ordering::SeqCst);
                return Some(entry);
            }
            if let Some(e) = Self::pop(&self.has_events, &mut inner) {
                drop(inner);
                let served = serve(e);
                inner = self.lock();
                if let Served::Leave(back) = served {
                    self.requeue(&mut inner, back);
                    return None;
                }
                continue;
            }
            inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn set_state(&self, state: State) {
        self.lock().state = state;
    }

    /// Hands a parked vCPU a new entry and wakes its thread. `false` if it was not parked.
    fn restart(&self, entry: Entry) -> bool {
        let mut inner = self.lock();
        if inner.state != State::Parked {
            return false;
        }
        inner.state = State::Starting(entry);
        self.cond.notify_all();
        true
    }
}

/// Counts the summary reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VcpuCounts {
    /// vCPUs online now (not parked).
    pub(crate) online: u32,
    /// Most vCPUs online at once.
    pub(crate) peak: u32,
    /// Successful VCPU_UPs.
    pub(crate) ups: u64,
    /// VCPU_DOWNs.
    pub(crate) downs: u64,
    /// KVM vCPUs created (the rest of the ups reused parked ones).
    pub(crate) created: u32,
}

/// What VCPU_UP decided.
#[derive(Debug)]
pub(crate) enum UpPlan {
    /// A parked vCPU was restarted.
    Reused(u32),
    /// A new KVM vCPU with this id must be created (the slot is reserved and counted).
    Create(u32),
}

#[derive(Debug, Default)]
struct SetInner {
    handles: Vec<Arc<VcpuHandle>>,
    counts: VcpuCounts,
}

/// Every vCPU of one VM.
#[derive(Debug, Default)]
pub(crate) struct VcpuSet {
    inner: Mutex<SetInner>,
    /// `counts.online`, readable without the lock (policy decisions made while the lock is
    /// held record timeline lines that need it).
    online: AtomicU32,
}

impl VcpuSet {
    fn lock(&self) -> MutexGuard<'_, SetInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers vCPU 0 (online from boot).
    pub(crate) fn add_boot_vcpu(&self) -> Arc<VcpuHandle> {
        let mut inner = self.lock();
        let h = Arc::new(VcpuHandle::new(inner.handles.len() as u32));
        inner.handles.push(h.clone());
        inner.counts.online += 1;
        inner.counts.created += 1;
        inner.counts.peak = inner.counts.peak.max(inner.counts.online);
        self.online.store(inner.counts.online, Ordering::Release);
        h
    }

    /// The set of a restored VM: one handle per vCPU, `online[id]` running, the rest parked
    /// (their threads wait to be reused, as before the snapshot).
    pub(crate) fn restored(online: &[bool]) -> (VcpuSet, Vec<Arc<VcpuHandle>>) {
        let handles: Vec<_> = online
            .iter()
            .enumerate()
            .map(|(id, &on)| {
                let h = Arc::new(VcpuHandle::new(id as u32));
                if !on {
                    h.set_state(State::Parked);
                }
                h
            })
            .collect();
        let up = online.iter().filter(|&&on| on).count() as u32;
        let counts = VcpuCounts { online: up, peak: up, ups: 0, downs: 0, created: online.len() as u32 };
        let set = VcpuSet { inner: Mutex::new(SetInner { handles: handles.clone(), counts }), online: up.into() };
        (set, handles)
    }

    /// Counts now.
    pub(crate) fn counts(&self) -> VcpuCounts {
        self.lock().counts
    }

    /// vCPUs online now (lock-free).
    pub(crate) fn online(&self) -> u32 {
        self.online.load(Ordering::Acquire)
    }

    /// Per vCPU id: online (else parked or gone).
    pub(crate) fn online_map(&self) -> Vec<bool> {
        self.lock().handles.iter().map(|h| h.state().online()).collect()
    }

    /// The handle of vCPU `id`.
    pub(crate) fn get(&self, id: u32) -> Option<Arc<VcpuHandle>> {
        self.lock().handles.get(id as usize).cloned()
    }

    /// Every handle.
    pub(crate) fn all(&self) -> Vec<Arc<VcpuHandle>> {
        self.lock().handles.clone()
    }

    /// Brings one vCPU up if `allowed(online)` says so (it may also reserve capacity):
    /// restarts a parked vCPU, or reserves a new id for the caller to create. Returns the plan
    /// and the new online count, or `allowed`'s refusal.
    pub(crate) fn up<E>(&self, entry: Entry, allowed: impl FnOnce(u32) -> Result<(), E>) -> Result<(UpPlan, u32), E> {
        let mut inner = self.lock();
        allowed(inner.counts.online)?;
        let plan = match inner.handles.iter().find(|h| h.restart(entry)) {
            Some(h) => UpPlan::Reused(h.id),
            None => {
                let id = inner.handles.len() as u32;
                inner.handles.push(Arc::new(VcpuHandle::new(id)));
                inner.counts.created += 1;
                UpPlan::Create(id)
            }
        };
        inner.counts.online += 1;
        inner.counts.ups += 1;
        inner.counts.peak = inner.counts.peak.max(inner.counts.online);
        self.online.store(inner.counts.online, Ordering::Release);
        Ok((plan, inner.counts.online))
    }

    /// Undoes an `UpPlan::Create` whose vCPU could not be created: its handle is gone for good.
    pub(crate) fn abandon_create(&self, id: u32) {
        let mut inner = self.lock();
        if let Some(h) = inner.handles.get(id as usize) {
            h.set_state(State::Gone);
        }
        inner.counts.online -= 1;
        inner.counts.ups -= 1;
        inner.counts.created -= 1;
        self.online.store(inner.counts.online, Ordering::Release);
    }

    /// The online vCPUs with the highest ids, `n` of them (the ones enforcement throttles).
    pub(crate) fn highest_online(&self, n: usize) -> Vec<Arc<VcpuHandle>> {
        let inner = self.lock();
        inner.handles.iter().rev().filter(|h| h.state().online()).take(n).cloned().collect()
    }

    /// Takes vCPU `id` down (its thread then parks). Returns the new online count.
    pub(crate) fn down(&self, id: u32) -> u32 {
        let mut inner = self.lock();
        if let Some(h) = inner.handles.get(id as usize) {
            h.set_state(State::Parked);
        }
        inner.counts.online -= 1;
        inner.counts.downs += 1;
        self.online.store(inner.counts.online, Ordering::Release);
        inner.counts.online
    }

    /// Sends `make()` to every vCPU (but those whose creation failed) and waits, at most
    /// `within`, for the answers of those whose state when asked `must_answer` says. Returns
    /// the answers that came, by vCPU id.
    pub(crate) fn ask_all(
        &self,
        make: impl Fn(Sender<(u32, VcpuResponse)>) -> VcpuEvent,
        must_answer: impl Fn(State) -> bool,
        within: Duration,
    ) -> Vec<(u32, VcpuResponse)> {
        self.ask_all_while(make, must_answer, within, || ()).0
    }

    /// [`VcpuSet::ask_all`], running `meanwhile` on this thread while the vCPUs answer.
    pub(crate) fn ask_all_while<R>(
        &self,
        make: impl Fn(Sender<(u32, VcpuResponse)>) -> VcpuEvent,
        must_answer: impl Fn(State) -> bool,
        within: Duration,
        meanwhile: impl FnOnce() -> R,
    ) -> (Vec<(u32, VcpuResponse)>, R) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut expected = 0;
        for h in self.all().into_iter().filter(|h| h.state() != State::Gone) {
            // A vCPU whose thread is only starting answers once it runs (the event waits).
            if must_answer(h.send(make(tx.clone()))) {
                expected += 1;
            }
        }
        drop(tx);
        let deadline = Instant::now() + within;
        let done = meanwhile();
        let mut answers = Vec::new();
        while answers.len() < expected {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(a) => answers.push(a),
                Err(_) => break,
            }
        }
        answers.sort_by_key(|(id, _)| *id);
        (answers, done)
    }

    /// Sends `event()` to every vCPU (no answer expected).
    pub(crate) fn tell_all(&self, event: impl Fn() -> VcpuEvent) {
        for h in self.all() {
            let _ = h.send(event());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(rip: u64) -> Entry {
        Entry { rip, rsp: 0x1000, arg: 0 }
    }

    fn stay(_: VcpuEvent) -> Served {
        Served::Stay
    }

    #[test]
    fn up_reuses_parked_vcpus_before_creating() {
        let set = VcpuSet::default();
        set.add_boot_vcpu();
        let (plan, online) = set.up(entry(1), |_| Ok::<(), ()>(())).unwrap();
        assert!(matches!(plan, UpPlan::Create(1)));
        assert_eq!(online, 2);
        assert_eq!(set.down(1), 1);
        let (plan, _) = set.up(entry(2), |_| Ok::<(), ()>(())).unwrap();
        assert!(matches!(plan, UpPlan::Reused(1)));
        assert_eq!(set.get(1).unwrap().state(), State::Starting(entry(2)));
        let c = set.counts();
        assert_eq!((c.online, c.peak, c.ups, c.downs, c.created), (2, 2, 2, 1, 2));
    }

    #[test]
    fn a_failed_creation_is_never_reused() {
        let set = VcpuSet::default();
        set.add_boot_vcpu();
        let (plan, _) = set.up(entry(1), |_| Ok::<(), ()>(())).unwrap();
        assert!(matches!(plan, UpPlan::Create(1)));
        set.abandon_create(1);
        assert_eq!(set.get(1).unwrap().state(), State::Gone);
        let (plan, _) = set.up(entry(2), |_| Ok::<(), ()>(())).unwrap();
        assert!(matches!(plan, UpPlan::Create(2)), "{plan:?}");
        assert_eq!(set.online_map(), [true, false, true]);
    }

    #[test]
    fn up_respects_the_policy_check() {
        let set = VcpuSet::default();
        set.add_boot_vcpu();
        let refused = set.up(entry(1), |online| if online < 1 { Ok(()) } else { Err(online) });
        assert_eq!(refused.unwrap_err(), 1);
        assert_eq!(set.counts().ups, 0);
    }

    #[test]
    fn a_kick_before_block_is_not_lost() {
        let c = VcpuHandle::new(0);
        c.wake(wake::KICK, false);
        assert_eq!(c.block(Some(Duration::from_secs(5)), &mut stay), wake::KICK);
        assert_eq!(c.block(Some(Duration::from_millis(1)), &mut stay), wake::TIMEOUT);
    }

    #[test]
    fn a_kick_wakes_a_blocked_thread() {
        let c = Arc::new(VcpuHandle::new(0));
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.block(None, &mut stay));
        while c.state() != State::Blocked {
            std::thread::yield_now();
        }
        assert!(c.wake(wake::KICK, false), "it was blocked");
        assert_eq!(t.join().unwrap(), wake::KICK);
    }

    #[test]
    fn events_are_served_where_the_thread_waits() {
        let c = Arc::new(VcpuHandle::new(3));
        let c2 = c.clone();
        // A blocked vCPU answers a pause in place and stays blocked; a save makes it leave.
        let t = std::thread::spawn(move || {
            let mut served = Vec::new();
            let bits = c2.block(None, &mut |e| match e {
                VcpuEvent::Pause(tx) => {
                    let _ = tx.send((3, VcpuResponse::Paused));
                    served.push("pause");
                    Served::Stay
                }
                other => Served::Leave(Some(other)),
            });
            (bits, served)
        });
        while c.state() != State::Blocked {
            std::thread::yield_now();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = c.send(VcpuEvent::Pause(tx.clone()));
        assert!(matches!(rx.recv_timeout(Duration::from_secs(5)), Ok((3, VcpuResponse::Paused))));
        assert_eq!(c.state(), State::Blocked);
        let _ = c.send(VcpuEvent::SaveState(tx));
        let (bits, served) = t.join().unwrap();
        assert_eq!((bits, served), (wake::KICK, vec!["pause"]));
        assert!(matches!(c.next_event(), Some(VcpuEvent::SaveState(_))), "put back for the loop");
        assert!(!c.has_events());
    }

    #[test]
    fn a_parked_vcpu_resumes_at_its_new_entry() {
        let set = Arc::new(VcpuSet::default());
        set.add_boot_vcpu();
        set.up(entry(1), |_| Ok::<(), ()>(())).unwrap();
        set.down(1);
        let h = set.get(1).unwrap();
        let t = std::thread::spawn(move || h.park(&mut stay));
        set.up(entry(9), |_| Ok::<(), ()>(())).unwrap();
        assert_eq!(t.join().unwrap(), Some(entry(9)));
    }

    #[test]
    fn a_finish_ends_a_park() {
        let h = Arc::new(VcpuHandle::new(1));
        h.set_state(State::Parked);
        let h2 = h.clone();
        let t = std::thread::spawn(move || {
            h2.park(&mut |e| if matches!(e, VcpuEvent::Finish) { Served::Leave(None) } else { Served::Stay })
        });
        let _ = h.send(VcpuEvent::Throttle);
        let _ = h.send(VcpuEvent::Finish);
        assert_eq!(t.join().unwrap(), None);
    }
}
