//! One VM's policy over time: its admission decisions (policy ceiling, then the pool), its
//! burst-credit books, reclaims and enforcement, advanced one accounting tick at a time
//! ([`VmPolicy::tick`]), and the invariants the stress suite relies on.
//!
//! Decisions return values: a status, and the timeline lines the caller should record
//! ([`Decision`]); a tick returns the policy events for its caller to carry out. Nothing here
//! reaches into the VM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hypercall_abi::{EXTENT_ALIGN, Status};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::base::config::{Policy, PolicyConfig};
use crate::base::persist::Persist;
use crate::base::timeline::detail;
use crate::policy::pool::{Pool, Take};
use crate::policy::resource::{PolicyEvent, Resource, ResourcePolicy};

/// The accounting tick.
pub(crate) const TICK: Duration = Duration::from_millis(10);

/// A timeline line a decision asks its caller to record: event name and fields.
pub(crate) type Record = (&'static str, Map<String, Value>);

/// A decision: its result (or the status refusing it) and the lines to record.
#[derive(Debug)]
pub(crate) struct Decision<T> {
    /// What was decided: the amount granted, or the status to answer.
    pub(crate) result: Result<T, Status>,
    /// Timeline lines about the decision (a refusal above the ceiling, the pool's arbitration).
    pub(crate) records: Vec<Record>,
}

/// What one accounting tick decided for a VM.
#[derive(Debug, Default)]
pub(crate) struct Tick {
    /// Policy events to carry out (post notices, record lines, end the VM): the resource,
    /// the event, and the resource's state after it.
    pub(crate) events: Vec<(Resource, PolicyEvent, ResourcePolicy)>,
    /// How many of the highest online vCPUs to throttle now (enforcement of a violated vCPU
    /// reclaim).
    pub(crate) throttle: usize,
}

/// Invariant checks made while the VM ran (from the shim's own accounting).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Invariants {
    /// Checks made (each tick and each grant checks all of them).
    pub(crate) checks: u64,
    /// Times a resource was held above burst.
    pub(crate) above_burst: u64,
    /// Times the pool was charged above its capacity.
    pub(crate) above_capacity: u64,
    /// Times the VM held less than its min.
    pub(crate) below_min: u64,
    /// Times a credit balance was below zero by more than one tick's drain.
    pub(crate) credit_overdrawn: u64,
}

/// Counters of answers other than OK.
#[derive(Debug, Default)]
pub(crate) struct Answers {
    /// AGAIN (pool full, reclaim under way).
    pub(crate) again: AtomicU64,
    /// EXHAUSTED (pool full, nobody to reclaim from).
    pub(crate) exhausted: AtomicU64,
}

/// One VM's policy: its state per resource, its place in the pool, and its counters.
#[derive(Debug)]
pub(crate) struct VmPolicy {
    /// The pool it draws from.
    pool: Arc<Pool>,
    /// Its member index there.
    member: usize,
    /// Its settings.
    config: PolicyConfig,
    state: Mutex<[ResourcePolicy; 2]>,
    invariants: Mutex<Invariants>,
    /// Non-OK answers.
    answers: Answers,
    last_tick: Mutex<Option<Duration>>,
    /// Held across a MEM_GRANT's ceiling check, pool reservation and grant: two vCPUs granting
    /// at once cannot both pass the ceiling.
    grant_decision: Mutex<()>,
}

impl VmPolicy {
    /// The policy for a VM admitted to `pool` as `member`.
    pub(crate) fn new(pool: Arc<Pool>, member: usize, vcpus: Policy, memory: Policy, config: PolicyConfig) -> Self {
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

    /// The pool it draws from.
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Its member index in the pool.
    pub(crate) fn member(&self) -> usize {
        self.member
    }

    /// Its settings.
    pub(crate) fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Its answers other than OK.
    pub(crate) fn answers(&self) -> &Answers {
        &self.answers
    }

    /// Held from a MEM_GRANT's ceiling check to its grant: one decision at a time per VM.
    pub(crate) fn grant_decision(&self) -> MutexGuard<'_, ()> {
        self.grant_decision.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, [ResourcePolicy; 2]> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the policy state of `r`.
    pub(crate) fn resource(&self, r: Resource) -> ResourcePolicy {
        self.state()[r as usize].clone()
    }

    /// Both resources' limits now, vCPUs then memory (one lock).
    pub(crate) fn limits(&self) -> [Policy; 2] {
        let st = self.state();
        [st[0].limits, st[1].limits]
    }

    /// Whether `limits` may replace `r`'s on a running VM ([`VmPolicy::set_limits`]'s checks,
    /// for a caller that checks several changes before it applies any).
    pub(crate) fn check_limits(&self, r: Resource, limits: Policy) -> Result<(), LimitsError> {
        Self::allowed(&self.state()[r as usize], limits)
    }

    /// The same min, and `min <= max <= burst`.
    fn allowed(now: &ResourcePolicy, limits: Policy) -> Result<(), LimitsError> {
        if limits.min != now.limits.min {
            return Err(LimitsError::MinChanges { resource: now.resource.name(), min: now.limits.min });
        }
        if !(limits.min <= limits.max && limits.max <= limits.burst) {
            return Err(LimitsError::Unordered(now.resource.name()));
        }
        Ok(())
    }

    /// The invariant checks so far.
    pub(crate) fn invariants(&self) -> Invariants {
        self.invariants.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the pool for `amount` of `r`; contention decisions become records.
    fn take_from_pool(
        &self,
        r: Resource,
        amount: u64,
        granularity: u64,
        records: &mut Vec<Record>,
    ) -> Result<u64, Status> {
        let (take, why) = self.pool.take(self.member, r, amount, granularity);
        if let Some(why) = why {
            records.push(("pool", detail([("resource", r.name().into()), ("decision", why.into())])));
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

    fn deny<T>(&self, r: Resource, held: u64, asked: u64, ceiling: u64) -> Decision<T> {
        let line = detail([
            ("resource", r.name().into()),
            ("held", held.into()),
            ("asked", asked.into()),
            ("ceiling", ceiling.into()),
        ]);
        Decision { result: Err(Status::DENIED), records: vec![("denied", line)] }
    }

    /// Decides a VCPU_UP with `online` vCPUs online: the policy ceiling first, then the pool
    /// (which reserves the slot on success).
    pub(crate) fn admit_vcpu(&self, online: u32) -> Decision<()> {
        let ceiling = self.state()[Resource::Vcpus as usize].ceiling();
        if u64::from(online) + 1 > ceiling {
            return self.deny(Resource::Vcpus, online.into(), 1, ceiling);
        }
        let mut records = Vec::new();
        let result = self.take_from_pool(Resource::Vcpus, 1, 1, &mut records).map(|_| ());
        Decision { result, records }
    }

    /// Decides a MEM_GRANT of `want` bytes while holding `held`: how many bytes may be granted
    /// (reserved in the pool), possibly fewer than asked.
    pub(crate) fn admit_memory(&self, held: u64, want: u64) -> Decision<u64> {
        let ceiling = self.state()[Resource::Memory as usize].ceiling();
        let room = ceiling.saturating_sub(held) / EXTENT_ALIGN * EXTENT_ALIGN;
        if room == 0 {
            return self.deny(Resource::Memory, held, want, ceiling);
        }
        let mut records = Vec::new();
        let result = self.take_from_pool(Resource::Memory, want.min(room), EXTENT_ALIGN, &mut records);
        Decision { result, records }
    }

    /// Returns `amount` of `r` to the pool (a VCPU_DOWN, a release, an unused reservation).
    pub(crate) fn give_back(&self, r: Resource, amount: u64) {
        if amount > 0 {
            self.pool.give_back(self.member, r, amount);
        }
    }

    /// Changes the max and burst of `r` on a running VM (`min` cannot change: it was reserved
    /// at admission). When the VM holds more than the new max, a reclaim starts at the
    /// governor's next tick; grants above the new ceiling are refused from now on.
    pub(crate) fn set_limits(&self, r: Resource, limits: Policy, held: u64) -> Result<(), LimitsError> {
        let mut st = self.state();
        Self::allowed(&st[r as usize], limits)?;
        st[r as usize].limits = limits;
        if held > limits.max {
            st[r as usize].operator_wants = true;
        }
        drop(st);
        self.pool.set_limits(self.member, r, limits);
        Ok(())
    }

    /// Sets the credit balances (a restored VM keeps what it had).
    fn set_credits(&self, balances: [f64; 2]) {
        let mut s = self.state();
        for (r, b) in s.iter_mut().zip(balances) {
            if b.is_finite() {
                r.credit.balance = b.min(r.credit.cap);
            }
        }
    }

    /// One accounting tick at `now` (time since the run started) for a VM holding `online`
    /// vCPUs and `memory` bytes: credit, reclaims (its own, and those the pool asks for),
    /// enforcement, and the invariant checks.
    pub(crate) fn tick(&self, now: Duration, online: u64, memory: u64) -> Tick {
        let dt = {
            let mut last = self.last_tick.lock().unwrap_or_else(|e| e.into_inner());
            let dt = last.map_or(TICK, |l| now.saturating_sub(l));
            *last = Some(now);
            dt
        };
        let wanted = self.pool.take_reclaim_requests(self.member);
        let held = [online, memory];
        let mut tick = Tick::default();
        let mut st = self.state();
        for r in Resource::ALL {
            let i = r as usize;
            st[i].pool_wants |= wanted[i];
            for e in st[i].step(held[i], dt, now, self.config.grace) {
                tick.events.push((r, e, st[i].clone()));
            }
        }
        // Invariants from the shim's own accounting.
        let mut inv = self.invariants.lock().unwrap_or_else(|e| e.into_inner());
        inv.checks += 1;
        let cap = self.pool.capacity();
        let used = self.pool.used();
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
        // Enforcement: throttle the excess vCPUs while a vCPU reclaim is violated.
        let v = &st[Resource::Vcpus as usize];
        if v.enforcing() {
            tick.throttle = online.saturating_sub(v.limits.max) as usize;
        }
        tick
    }

    /// Credit balances below their caps (the governor's `credit` lines), `None` when both are
    /// full.
    pub(crate) fn credit_line(&self) -> Option<[f64; 2]> {
        let s = self.state();
        let [v, m] = [&s[0].credit, &s[1].credit];
        (v.balance < v.cap || m.balance < m.cap).then_some([v.balance, m.balance])
    }
}

/// Why new limits were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum LimitsError {
    /// `min` differs from the admitted one.
    #[error("{resource}: min cannot change on a running VM (it is {min})")]
    MinChanges {
        /// vcpus or memory.
        resource: &'static str,
        /// The min now.
        min: u64,
    },
    /// Not `min <= max <= burst`.
    #[error("{0}: need min <= max <= burst")]
    Unordered(&'static str),
}

/// The policy's part of a snapshot: the limits as they are now (live changes included) and
/// the credit balances.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct PolicyState {
    /// vCPU and memory limits.
    pub(crate) limits: [Policy; 2],
    /// Credit balances: vCPU-seconds, GiB-seconds.
    pub(crate) credits: [f64; 2],
}

/// A restored VM's place in the pool and its settings.
pub(crate) struct PolicyArgs {
    pub(crate) pool: Arc<Pool>,
    pub(crate) member: usize,
    pub(crate) config: PolicyConfig,
}

impl Persist for VmPolicy {
    type State = PolicyState;
    type Args<'a> = PolicyArgs;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<PolicyState, Self::Error> {
        let s = self.state();
        Ok(PolicyState { limits: [s[0].limits, s[1].limits], credits: [s[0].credit.balance, s[1].credit.balance] })
    }

    fn restore(args: PolicyArgs, state: &PolicyState) -> Result<VmPolicy, Self::Error> {
        let p = VmPolicy::new(args.pool, args.member, state.limits[0], state.limits[1], args.config);
        p.set_credits(state.credits);
        Ok(p)
    }
}
