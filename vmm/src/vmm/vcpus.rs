//! The VM's vCPUs as the shim tracks them: one control block per vCPU (its state, pending
//! wake-ups, its thread), and the counts the policy and the summary need.
//!
//! States: `Running` (in or around KVM_RUN), `Blocked` (sleeping in BLOCK), `Parked` (went
//! down; its thread sleeps until the vCPU is reused), `Starting` (reused, not yet resumed).
//! Blocked and parked vCPUs cost no host CPU: their threads wait on a condition variable.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hypercall_abi::wake;

/// Where a (re)started vCPU begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// `rip`.
    pub rip: u64,
    /// `rsp`.
    pub rsp: u64,
    /// `rdi`.
    pub arg: u64,
}

/// A vCPU's scheduling state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Running guest code (or serving one of its exits).
    Running,
    /// Sleeping in BLOCK.
    Blocked,
    /// Went down; waiting to be reused.
    Parked,
    /// Reused by VCPU_UP; will resume at this entry.
    Starting(Entry),
}

/// One vCPU's control block, shared by its thread and every other thread that wakes it.
#[derive(Debug)]
pub struct VcpuControl {
    /// The vCPU id.
    pub id: u32,
    state: Mutex<State>,
    cond: Condvar,
    /// Pending [`wake`] bits, consumed by the next BLOCK.
    wake: AtomicU32,
    /// The thread running this vCPU (`pthread_t`), for kicks out of KVM_RUN; 0 until known.
    thread: AtomicU64,
    /// RIP at the vCPU's latest exit (for diagnosing a hang).
    pub last_rip: AtomicU64,
    /// Enforcement: the vCPU gets only a small share of run time.
    throttled: std::sync::atomic::AtomicBool,
    /// REPORTs recorded in the current second: (second, count).
    reports: Mutex<(u64, u32)>,
}

/// Most REPORTs per second per vCPU that the host records (the timeline's `report` lines);
/// the rest are answered `OK` and counted (`reports_not_recorded`).
pub const REPORTS_PER_SECOND: u32 = 1000;

impl VcpuControl {
    /// A control block in state `Running`.
    pub fn new(id: u32) -> Self {
        VcpuControl {
            id,
            state: Mutex::new(State::Running),
            cond: Condvar::new(),
            wake: AtomicU32::new(0),
            thread: AtomicU64::new(0),
            last_rip: AtomicU64::new(0),
            throttled: std::sync::atomic::AtomicBool::new(false),
            reports: Mutex::new((0, 0)),
        }
    }

    /// Whether a REPORT made in second `now_s` (of the run) may be recorded: at most
    /// [`REPORTS_PER_SECOND`] per second.
    pub fn report_allowed(&self, now_s: u64) -> bool {
        let mut r = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        if r.0 != now_s {
            *r = (now_s, 0);
        }
        r.1 += 1;
        r.1 <= REPORTS_PER_SECOND
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.lock()
    }

    /// Records the calling thread as this vCPU's thread.
    pub fn bind_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.thread.store(me as u64, Ordering::Release);
    }

    /// Adds wake-up `bits` and wakes the vCPU: a blocked one returns from BLOCK; a running
    /// one is forced out of KVM_RUN when `interrupt` is set.
    pub fn wake(&self, bits: u32, interrupt: bool) {
        self.wake.fetch_or(bits, Ordering::SeqCst);
        let st = self.lock();
        match *st {
            State::Blocked | State::Parked => self.cond.notify_all(),
            State::Running if interrupt => self.interrupt(),
            _ => {}
        }
    }

    /// Whether the vCPU is throttled.
    pub fn is_throttled(&self) -> bool {
        self.throttled.load(Ordering::Acquire)
    }

    /// Throttles (or releases) the vCPU; a throttled running vCPU is also interrupted so the
    /// throttle takes effect now.
    pub fn set_throttled(&self, on: bool) {
        let was = self.throttled.swap(on, Ordering::AcqRel);
        if on && !was {
            self.interrupt();
        }
    }

    /// Forces the vCPU's thread out of KVM_RUN (no-op before the thread is known).
    pub fn interrupt(&self) {
        let t = self.thread.load(Ordering::Acquire);
        if t != 0 {
            // SAFETY: `t` is the pthread_t of this vCPU's thread, stored by the thread itself;
            // vCPU threads are joined only after the VM stops, and a signal to an exited
            // thread is harmless (ESRCH).
            unsafe { libc::pthread_kill(t as libc::pthread_t, crate::vmm::vcpu::kick_signal()) };
        }
    }

    /// Wakes the vCPU's thread wherever it waits, so it notices that the VM is stopping.
    pub fn stop(&self) {
        let _st = self.lock();
        self.cond.notify_all();
        self.interrupt();
    }

    /// Sleeps in BLOCK for at most `timeout` (or until `stopping` turns true). Returns the
    /// [`wake`] bits that ended the sleep.
    pub fn block(&self, timeout: Option<Duration>, stopping: &dyn Fn() -> bool) -> u32 {
        let pending = self.wake.swap(0, Ordering::SeqCst);
        if pending != 0 {
            return pending;
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        *st = State::Blocked;
        let bits = loop {
            let pending = self.wake.swap(0, Ordering::SeqCst);
            if pending != 0 {
                break pending;
            }
            if stopping() {
                break 0;
            }
            match deadline {
                None => st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break wake::TIMEOUT;
                    }
                    st = self.cond.wait_timeout(st, d - now).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
        };
        *st = State::Running;
        bits
    }

    /// Parks the vCPU (it went down) and sleeps until it is reused or the VM stops. Returns
    /// the entry to resume at, or `None` when the VM is stopping.
    pub fn park(&self, stopping: &dyn Fn() -> bool) -> Option<Entry> {
        let mut st = self.lock();
        loop {
            if let State::Starting(entry) = *st {
                *st = State::Running;
                self.wake.store(0, Ordering::SeqCst);
                return Some(entry);
            }
            if stopping() {
                return None;
            }
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Marks the vCPU parked (called with the set's lock held, before the thread parks).
    fn set_parked(&self) {
        *self.lock() = State::Parked;
    }

    /// Hands a parked vCPU a new entry and wakes its thread. `false` if it was not parked.
    fn restart(&self, entry: Entry) -> bool {
        let mut st = self.lock();
        if *st != State::Parked {
            return false;
        }
        *st = State::Starting(entry);
        self.cond.notify_all();
        true
    }
}

/// Counts the summary reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuCounts {
    /// vCPUs online now (not parked).
    pub online: u32,
    /// Most vCPUs online at once.
    pub peak: u32,
    /// Successful VCPU_UPs.
    pub ups: u64,
    /// VCPU_DOWNs.
    pub downs: u64,
    /// KVM vCPUs created (the rest of the ups reused parked ones).
    pub created: u32,
}

/// What VCPU_UP decided.
#[derive(Debug)]
pub enum UpPlan {
    /// A parked vCPU was restarted.
    Reused(u32),
    /// A new KVM vCPU with this id must be created (the slot is reserved and counted).
    Create(u32),
}

#[derive(Debug, Default)]
struct Inner {
    ctls: Vec<std::sync::Arc<VcpuControl>>,
    counts: VcpuCounts,
}

/// Every vCPU of one VM.
#[derive(Debug, Default)]
pub struct VcpuSet {
    inner: Mutex<Inner>,
    /// `counts.online`, readable without the lock (policy decisions made while the lock is
    /// held record timeline lines that need it).
    online: AtomicU32,
}

impl VcpuSet {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers vCPU 0 (online from boot).
    pub fn add_boot_vcpu(&self) -> std::sync::Arc<VcpuControl> {
        let mut inner = self.lock();
        let ctl = std::sync::Arc::new(VcpuControl::new(inner.ctls.len() as u32));
        inner.ctls.push(ctl.clone());
        inner.counts.online += 1;
        inner.counts.created += 1;
        inner.counts.peak = inner.counts.peak.max(inner.counts.online);
        self.online.store(inner.counts.online, Ordering::Release);
        ctl
    }

    /// Rebuilds the set of a restored VM: one control block per vCPU, `online[id]` running,
    /// the rest parked (their threads wait to be reused, as before the snapshot).
    pub fn restore(&self, online: &[bool]) -> Vec<std::sync::Arc<VcpuControl>> {
        let mut inner = self.lock();
        let ctls: Vec<_> = online
            .iter()
            .enumerate()
            .map(|(id, &on)| {
                let c = std::sync::Arc::new(VcpuControl::new(id as u32));
                if !on {
                    c.set_parked();
                }
                c
            })
            .collect();
        let up = online.iter().filter(|&&on| on).count() as u32;
        inner.ctls = ctls.clone();
        inner.counts = VcpuCounts { online: up, peak: up, ups: 0, downs: 0, created: online.len() as u32 };
        self.online.store(up, Ordering::Release);
        ctls
    }

    /// Counts now.
    pub fn counts(&self) -> VcpuCounts {
        self.lock().counts
    }

    /// vCPUs online now (lock-free).
    pub fn online(&self) -> u32 {
        self.online.load(Ordering::Acquire)
    }

    /// The control block of vCPU `id`.
    pub fn get(&self, id: u32) -> Option<std::sync::Arc<VcpuControl>> {
        self.lock().ctls.get(id as usize).cloned()
    }

    /// Every control block.
    pub fn all(&self) -> Vec<std::sync::Arc<VcpuControl>> {
        self.lock().ctls.clone()
    }

    /// Brings one vCPU up if `allowed(online)` says so (it may also reserve capacity):
    /// restarts a parked vCPU, or reserves a new id for the caller to create. Returns the plan
    /// and the new online count, or `allowed`'s refusal.
    pub fn up<E>(
        &self,
        entry: Entry,
        allowed: impl FnOnce(u32) -> Result<(), E>,
        new_control: impl FnOnce(u32) -> std::sync::Arc<VcpuControl>,
    ) -> Result<(UpPlan, u32), E> {
        let mut inner = self.lock();
        allowed(inner.counts.online)?;
        let plan = match inner.ctls.iter().find(|c| c.restart(entry)) {
            Some(c) => UpPlan::Reused(c.id),
            None => {
                let id = inner.ctls.len() as u32;
                let ctl = new_control(id);
                inner.ctls.push(ctl);
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

    /// Undoes an `UpPlan::Create` whose vCPU could not be created.
    pub fn abandon_create(&self, id: u32) {
        let mut inner = self.lock();
        if let Some(c) = inner.ctls.get(id as usize) {
            c.set_parked();
        }
        inner.counts.online -= 1;
        inner.counts.ups -= 1;
        self.online.store(inner.counts.online, Ordering::Release);
    }

    /// The online vCPUs with the highest ids, `n` of them (the ones enforcement throttles).
    pub fn highest_online(&self, n: usize) -> Vec<std::sync::Arc<VcpuControl>> {
        let inner = self.lock();
        inner.ctls.iter().rev().filter(|c| !matches!(c.state(), State::Parked)).take(n).cloned().collect()
    }

    /// Takes vCPU `id` down (its thread then parks). Returns the new online count.
    pub fn down(&self, id: u32) -> u32 {
        let mut inner = self.lock();
        if let Some(c) = inner.ctls.get(id as usize) {
            c.set_parked();
        }
        inner.counts.online -= 1;
        inner.counts.downs += 1;
        self.online.store(inner.counts.online, Ordering::Release);
        inner.counts.online
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn entry(rip: u64) -> Entry {
        Entry { rip, rsp: 0x1000, arg: 0 }
    }

    #[test]
    fn up_reuses_parked_vcpus_before_creating() {
        let set = VcpuSet::default();
        set.add_boot_vcpu();
        let (plan, online) = set.up(entry(1), |_| Ok::<(), ()>(()), |id| Arc::new(VcpuControl::new(id))).unwrap();
        assert!(matches!(plan, UpPlan::Create(1)));
        assert_eq!(online, 2);
        assert_eq!(set.down(1), 1);
        let (plan, _) = set.up(entry(2), |_| Ok::<(), ()>(()), |id| Arc::new(VcpuControl::new(id))).unwrap();
        assert!(matches!(plan, UpPlan::Reused(1)));
        assert_eq!(set.get(1).unwrap().state(), State::Starting(entry(2)));
        let c = set.counts();
        assert_eq!((c.online, c.peak, c.ups, c.downs, c.created), (2, 2, 2, 1, 2));
    }

    #[test]
    fn up_respects_the_policy_check() {
        let set = VcpuSet::default();
        set.add_boot_vcpu();
        let refused = set.up(
            entry(1),
            |online| if online < 1 { Ok(()) } else { Err(online) },
            |id| Arc::new(VcpuControl::new(id)),
        );
        assert_eq!(refused.unwrap_err(), 1);
        assert_eq!(set.counts().ups, 0);
    }

    #[test]
    fn a_kick_before_block_is_not_lost() {
        let c = VcpuControl::new(0);
        c.wake(wake::KICK, false);
        assert_eq!(c.block(Some(Duration::from_secs(5)), &|| false), wake::KICK);
        assert_eq!(c.block(Some(Duration::from_millis(1)), &|| false), wake::TIMEOUT);
    }

    #[test]
    fn a_kick_wakes_a_blocked_thread() {
        let c = Arc::new(VcpuControl::new(0));
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.block(None, &|| false));
        while c.state() != State::Blocked {
            std::thread::yield_now();
        }
        c.wake(wake::KICK, false);
        assert_eq!(t.join().unwrap(), wake::KICK);
    }

    #[test]
    fn a_parked_vcpu_resumes_at_its_new_entry() {
        let set = Arc::new(VcpuSet::default());
        set.add_boot_vcpu();
        set.up(entry(1), |_| Ok::<(), ()>(()), |id| Arc::new(VcpuControl::new(id))).unwrap();
        set.down(1);
        let ctl = set.get(1).unwrap();
        let t = std::thread::spawn(move || ctl.park(&|| false));
        set.up(entry(9), |_| Ok::<(), ()>(()), |id| Arc::new(VcpuControl::new(id))).unwrap();
        assert_eq!(t.join().unwrap(), Some(entry(9)));
    }
}
