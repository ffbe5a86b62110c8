//! Policy enforcement over time: each VM's admission decisions (policy, then pool), and the
//! governor thread that keeps the burst-credit books every accounting tick, starts and
//! resolves reclaims, enforces after the grace period, and checks the invariants the stress
//! suite relies on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypercall_abi::{EXTENT_ALIGN, Status, notice};
use serde::Serialize;
use serde_json::Value;

use crate::base::config::{OnViolation, PolicyConfig};
use crate::base::timeline::detail;
use crate::policy::pool::{Pool, Take};
use crate::policy::resource::{PolicyEvent, Resource, ResourcePolicy};
use crate::vmm::vm::{Outcome, VmShared};

/// The accounting tick.
pub const TICK: Duration = Duration::from_millis(10);

/// A throttled vCPU is held back this long after every interruption (the governor interrupts
/// it every tick), so it gets about a tenth of the run time.
pub const THROTTLE_PAUSE: Duration = Duration::from_millis(9);

/// Invariant checks made while the VM ran (from the shim's own accounting).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Invariants {
    /// Checks made (each tick and each grant checks all of them).
    pub checks: u64,
    /// Times a resource was held above burst.
    pub above_burst: u64,
    /// Times the pool was charged above its capacity.
    pub above_capacity: u64,
    /// Times the VM held less than its min.
    pub below_min: u64,
    /// Times a credit balance was below zero by more than one tick's drain.
    pub credit_overdrawn: u64,
}

impl Invariants {
    /// Whether every check held.
    pub fn all_held(&self) -> bool {
        self.above_burst + self.above_capacity + self.below_min + self.credit_overdrawn == 0
    }
}

/// Counters of answers other than OK.
#[derive(Debug, Default)]
pub struct Answers {
    /// DENIED (policy).
    pub denied: AtomicU64,
    /// AGAIN (pool full, reclaim under way).
    pub again: AtomicU64,
    /// EXHAUSTED (pool full, nobody to reclaim from).
    pub exhausted: AtomicU64,
}

/// One VM's policy: its state per resource, its place in the pool, and its counters.
#[derive(Debug)]
pub struct VmPolicy {
    /// The pool it draws from.
    pub pool: Arc<Pool>,
    /// Its member index there.
    pub member: usize,
    /// Its settings.
    pub config: PolicyConfig,
    state: Mutex<[ResourcePolicy; 2]>,
    invariants: Mutex<Invariants>,
    /// Non-OK answers.
    pub answers: Answers,
    last_tick: Mutex<Option<Duration>>,
    /// Held across a MEM_GRANT's ceiling check, pool reservation and grant: two vCPUs granting
    /// at once cannot both pass the ceiling.
    pub grant_decision: Mutex<()>,
}

impl VmPolicy {
    /// The policy for a VM admitted to `pool` as `member`.
    pub fn new(
        pool: Arc<Pool>,
        member: usize,
        vcpus: crate::base::config::Policy,
        memory: crate::base::config::Policy,
        config: PolicyConfig,
    ) -> Self {
        VmPolicy {
            pool,
            member,
            config,
            state: Mutex::new([
                ResourcePolicy::new(Resource::Vcpus, vcpus, config.budget[0], config.refill[0]),
                ResourcePolicy::new(Resource::Memory, memory, config.budget[1], config.refill[1]),
            ]),
            invariants: Mutex::new(Invariants::default()),
            answers: Answers::default(),
            last_tick: Mutex::new(None),
            grant_decision: Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, [ResourcePolicy; 2]> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the policy state of `r`.
    pub fn resource(&self, r: Resource) -> ResourcePolicy {
        self.state()[r as usize].clone()
    }

    /// The invariant checks so far.
    pub fn invariants(&self) -> Invariants {
        self.invariants.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the pool for `amount` of `r`; logs contention decisions.
    fn take_from_pool(&self, vm: &VmShared, r: Resource, amount: u64, granularity: u64) -> Result<u64, Status> {
        let (take, why) = self.pool.take(self.member, r, amount, granularity);
        if let Some(why) = &why {
            vm.record("pool", detail([("resource", r.name().into()), ("decision", why.clone().into())]));
        }
        match take {
            Take::Granted(n) => Ok(n),
            Take::Again(_) => {
                self.answers.again.fetch_add(1, Ordering::Relaxed);
                Err(Status::AGAIN)
            }
            Take::Exhausted => {
                self.answers.exhausted.fetch_add(1, Ordering::Relaxed);
                Err(Status::EXHAUSTED)
            }
        }
    }

    fn deny(&self, vm: &VmShared, r: Resource, held: u64, asked: u64, ceiling: u64) -> Status {
        self.answers.denied.fetch_add(1, Ordering::Relaxed);
        vm.stats.denied.fetch_add(1, Ordering::Relaxed);
        vm.record(
            "denied",
            detail([
                ("resource", r.name().into()),
                ("held", held.into()),
                ("asked", asked.into()),
                ("ceiling", ceiling.into()),
            ]),
        );
        Status::DENIED
    }

    /// Decides a VCPU_UP with `online` vCPUs online: the policy ceiling first, then the pool
    /// (which reserves the slot on success).
    pub fn admit_vcpu(&self, vm: &VmShared, online: u32) -> Result<(), Status> {
        let ceiling = self.state()[Resource::Vcpus as usize].ceiling();
        if u64::from(online) + 1 > ceiling {
            return Err(self.deny(vm, Resource::Vcpus, online.into(), 1, ceiling));
        }
        self.take_from_pool(vm, Resource::Vcpus, 1, 1).map(|_| ())
    }

    /// Decides a MEM_GRANT of `want` bytes while holding `held`: how many bytes may be granted
    /// (reserved in the pool), possibly fewer than asked.
    pub fn admit_memory(&self, vm: &VmShared, held: u64, want: u64) -> Result<u64, Status> {
        let ceiling = self.state()[Resource::Memory as usize].ceiling();
        let room = ceiling.saturating_sub(held) / EXTENT_ALIGN * EXTENT_ALIGN;
        if room == 0 {
            return Err(self.deny(vm, Resource::Memory, held, want, ceiling));
        }
        self.take_from_pool(vm, Resource::Memory, want.min(room), EXTENT_ALIGN)
    }

    /// Returns `amount` of `r` to the pool (a VCPU_DOWN, a release, an unused reservation).
    pub fn give_back(&self, r: Resource, amount: u64) {
        if amount > 0 {
            self.pool.give_back(self.member, r, amount);
        }
    }

    /// Changes the max and burst of `r` on a running VM (`min` cannot change: it was reserved
    /// at admission). When the VM holds more than the new max, a reclaim starts at the
    /// governor's next tick; grants above the new ceiling are refused from now on.
    pub fn set_limits(&self, r: Resource, limits: crate::base::config::Policy, held: u64) -> Result<(), String> {
        let mut st = self.state();
        let cur = st[r as usize].limits;
        if limits.min != cur.min {
            return Err(format!("{}: min cannot change on a running VM (it is {})", r.name(), cur.min));
        }
        if !(limits.min <= limits.max && limits.max <= limits.burst) {
            return Err(format!("{}: need min <= max <= burst", r.name()));
        }
        st[r as usize].limits = limits;
        if held > limits.max {
            st[r as usize].operator_wants = true;
        }
        drop(st);
        self.pool.set_limits(self.member, r, limits);
        Ok(())
    }

    /// Sets the credit balances (a restored VM keeps what it had).
    pub fn set_credits(&self, balances: [f64; 2]) {
        let mut s = self.state();
        for (r, b) in s.iter_mut().zip(balances) {
            if b.is_finite() {
                r.credit.balance = b.min(r.credit.cap);
            }
        }
    }

    /// Balances for the timeline: vCPU-seconds, GiB-seconds.
    pub fn credits(&self) -> [f64; 2] {
        let s = self.state();
        [s[0].credit.balance, s[1].credit.balance]
    }
}

/// One governor step for one VM.
fn step_vm(vm: &VmShared, now: Duration) {
    let p = &vm.policy;
    let dt = {
        let mut last = p.last_tick.lock().unwrap_or_else(|e| e.into_inner());
        let dt = last.map_or(TICK, |l| now.saturating_sub(l));
        *last = Some(now);
        dt
    };
    let wanted = p.pool.take_reclaim_requests(p.member);
    let online = u64::from(vm.vcpu_set.online());
    let held = [online, vm.memory_held()];
    let mut all_events = Vec::new();
    {
        let mut st = p.state();
        for r in Resource::ALL {
            let i = r as usize;
            st[i].pool_wants |= wanted[i];
            for e in st[i].step(held[i], dt, now, p.config.grace) {
                all_events.push((r, e, st[i].clone()));
            }
        }
        // Invariants from the shim's own accounting.
        let mut inv = p.invariants.lock().unwrap_or_else(|e| e.into_inner());
        inv.checks += 1;
        let cap = p.pool.capacity();
        let used = p.pool.used();
        for r in Resource::ALL {
            let i = r as usize;
            let lim = st[i].limits;
            if held[i] > lim.burst {
                inv.above_burst += 1;
            }
            // vCPUs: the min is reserved in the pool from admission; at least vCPU 0 runs.
            let floor = if r == Resource::Vcpus { 1 } else { lim.min };
            if held[i] < floor {
                inv.below_min += 1;
            }
            if !st[i].credit.within_one_tick() {
                inv.credit_overdrawn += 1;
            }
        }
        if used[0] > cap.vcpus || used[1] > cap.memory {
            inv.above_capacity += 1;
        }
    }
    for (r, event, state) in all_events {
        apply(vm, r, event, &state);
    }
    // Enforcement: throttle the excess vCPUs while a vCPU reclaim is violated.
    let v = p.resource(Resource::Vcpus);
    let excess = online.saturating_sub(v.limits.max) as usize;
    let throttle = if v.enforcing() { excess } else { 0 };
    let chosen = vm.vcpu_set.highest_online(throttle);
    for ctl in vm.vcpu_set.all() {
        let on = chosen.iter().any(|c| c.id == ctl.id);
        ctl.set_throttled(on);
        if on {
            ctl.interrupt();
        }
    }
}

fn apply(vm: &VmShared, r: Resource, event: PolicyEvent, state: &ResourcePolicy) {
    let credit = state.credit.balance;
    match event {
        PolicyEvent::ReclaimStarted(rc) => {
            let grace_ns = vm.policy.config.grace.as_nanos() as u64;
            match r {
                Resource::Vcpus => vm.post_notice(notice::RECLAIM_VCPUS, |n| {
                    n.vcpu_target = rc.target;
                    n.grace_ns = grace_ns;
                }),
                Resource::Memory => vm.post_notice(notice::RECLAIM_MEMORY, |n| {
                    n.memory_target = rc.target;
                    n.grace_ns = grace_ns;
                }),
            }
            vm.record(
                "reclaim",
                detail([
                    ("resource", r.name().into()),
                    ("reason", rc.reason.name().into()),
                    ("target", rc.target.into()),
                    ("grace_ms", (grace_ns / 1_000_000).into()),
                    ("credit", credit.into()),
                ]),
            );
        }
        PolicyEvent::Answered { in_grace } => {
            vm.record("reclaim_answered", detail([("resource", r.name().into()), ("in_grace", in_grace.into())]));
        }
        PolicyEvent::Violation => {
            vm.record(
                "violation",
                detail([
                    ("resource", r.name().into()),
                    ("enforcement", Value::from(format!("{:?}", vm.policy.config.on_violation).to_lowercase())),
                ]),
            );
            if vm.policy.config.on_violation == OnViolation::Kill {
                vm.finish(Outcome::Killed { resource: r.name() });
            }
        }
        PolicyEvent::ReclaimOver => {
            let bit = match r {
                Resource::Vcpus => notice::RECLAIM_VCPUS_OVER,
                Resource::Memory => notice::RECLAIM_MEMORY_OVER,
            };
            vm.post_notice(bit, |_| {});
            vm.record("reclaim_over", detail([("resource", r.name().into()), ("credit", credit.into())]));
        }
    }
}

/// Adds VMs to a running [`Governor`] (an on-demand VM booted after the run started).
#[derive(Debug, Clone)]
pub struct Members(Arc<std::sync::Mutex<Vec<Arc<VmShared>>>>);

impl Members {
    /// Governs `vm` from the next tick on.
    pub fn add(&self, vm: Arc<VmShared>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(vm);
    }

    /// The VMs governed now (those still running; a VM that ended leaves at the next tick).
    pub fn list(&self) -> Vec<Arc<VmShared>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|vm| !vm.is_stopping()).cloned().collect()
    }
}

/// The governor thread of a run.
#[derive(Debug)]
pub struct Governor {
    handle: Option<JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    members: Arc<std::sync::Mutex<Vec<Arc<VmShared>>>>,
}

impl Governor {
    /// Starts governing `vms` (times are measured from `started`); more join through
    /// [`Governor::members`], and VMs that ended leave by themselves.
    pub fn start(vms: Vec<Arc<VmShared>>, started: Instant) -> Governor {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let members = Arc::new(std::sync::Mutex::new(vms));
        let list = Arc::clone(&members);
        let handle = std::thread::Builder::new()
            .name("governor".into())
            .spawn(move || {
                crate::host::seccomp::install_thread(crate::host::seccomp::Role::Governor);
                let mut last_credit_line = Duration::ZERO;
                while !stop2.load(Ordering::Acquire) {
                    // `stop` unparks the thread, so the run's end never waits for a tick.
                    std::thread::park_timeout(TICK);
                    if stop2.load(Ordering::Acquire) {
                        break;
                    }
                    let now = started.elapsed();
                    let credit_line = now.saturating_sub(last_credit_line) >= Duration::from_millis(100);
                    let vms: Vec<Arc<VmShared>> = {
                        let mut l = list.lock().unwrap_or_else(|p| p.into_inner());
                        l.retain(|vm| !vm.is_stopping());
                        l.clone()
                    };
                    for vm in &vms {
                        step_vm(vm, now);
                        if credit_line {
                            let [c, m] = vm.policy.credits();
                            let v = vm.policy.resource(Resource::Vcpus);
                            let mm = vm.policy.resource(Resource::Memory);
                            if c < v.credit.cap || m < mm.credit.cap {
                                vm.record("credit", detail([("vcpu_credit", c.into()), ("memory_credit", m.into())]));
                            }
                        }
                    }
                    if credit_line {
                        last_credit_line = now;
                    }
                }
            })
            .inspect_err(|e| {
                // The VMs still run; only the policy's timed steps (credit, reclaims,
                // enforcement) are missing. Say so rather than run silently without them.
                eprintln!("hypervisor-shim: cannot start the governor thread ({e}): credit, reclaims and enforcement are off for this run");
            })
            .ok();
        Governor { handle, stop, members }
    }

    /// A handle that adds VMs to this governor (from any thread).
    pub fn members(&self) -> Members {
        Members(Arc::clone(&self.members))
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}
