//! Per-VM resource policy over time: burst credit (a token bucket in resource-seconds) and
//! the reclaim state machine.
//!
//! For each resource a VM has `min <= max <= burst`. Holding above max drains the credit in
//! proportion to the excess (one vCPU above max for one second costs one vCPU-second; one GiB
//! for one second, one GiB-second); holding at or below max refills it up to the cap. When the
//! credit is empty while the VM is above max, or when the pool needs capacity back, a
//! **reclaim** starts: the guest is told to come down to max within the grace period. A
//! reclaim is *answered* when the VM is at or below max; if the grace expires first, a
//! **violation** is counted and the shim enforces. While a reclaim is in force, or the credit
//! is empty, the VM's ceiling is max instead of burst.

use std::time::Duration;

use crate::base::config::Policy;

/// The two resources a policy governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Resource {
    /// vCPUs (units: vCPUs; credit in vCPU-seconds).
    Vcpus,
    /// Memory (units: bytes; credit in GiB-seconds).
    Memory,
}

impl Resource {
    /// Both resources.
    pub(crate) const ALL: [Resource; 2] = [Resource::Vcpus, Resource::Memory];

    /// Lower-case name for logs, timelines and summaries.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Resource::Vcpus => "vcpus",
            Resource::Memory => "memory",
        }
    }

    /// How many units make one credit unit (1 vCPU; 1 GiB).
    pub(crate) const fn credit_unit(self) -> f64 {
        match self {
            Resource::Vcpus => 1.0,
            Resource::Memory => (1u64 << 30) as f64,
        }
    }
}

/// A token bucket in resource-seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Credit {
    /// Current balance (may dip below zero by at most one tick's drain).
    pub(crate) balance: f64,
    /// Cap.
    pub(crate) cap: f64,
    /// Refill rate per second while at or below max.
    pub(crate) refill: f64,
    /// Lowest balance seen.
    pub(crate) lowest: f64,
    /// Largest drain of a single tick seen (the bound on how far below zero the balance may
    /// go).
    pub(crate) largest_tick_drain: f64,
}

impl Credit {
    /// A full bucket.
    pub(crate) fn new(cap: f64, refill: f64) -> Credit {
        Credit { balance: cap, cap, refill, lowest: cap, largest_tick_drain: 0.0 }
    }

    /// Advances by `dt` seconds while holding `excess` credit units above max. An empty
    /// bucket does not go further into debt: what the VM holds above max from then on is the
    /// reclaim's business, so the balance is never below zero by more than one tick's drain.
    pub(crate) fn tick(&mut self, excess: f64, dt: f64) {
        if excess > 0.0 {
            let drain = excess * dt;
            self.largest_tick_drain = self.largest_tick_drain.max(drain);
            if self.balance > 0.0 {
                self.balance -= drain;
            }
        } else {
            self.balance = (self.balance + self.refill * dt).min(self.cap);
        }
        self.lowest = self.lowest.min(self.balance);
    }

    /// Whether the balance has stayed within one tick's drain below zero.
    pub(crate) fn within_one_tick(&self) -> bool {
        self.lowest >= -self.largest_tick_drain - 1e-9
    }

    /// Whether the bucket is empty.
    pub(crate) fn exhausted(&self) -> bool {
        self.balance <= 0.0
    }
}

/// Why a reclaim started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReclaimReason {
    /// The burst credit ran out.
    Credit,
    /// The pool needs the capacity for a VM below its own max.
    Pool,
    /// The operator lowered the VM's max (`ctl policy`).
    Operator,
}

impl ReclaimReason {
    /// Lower-case name.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            ReclaimReason::Credit => "credit",
            ReclaimReason::Pool => "pool",
            ReclaimReason::Operator => "operator",
        }
    }
}

/// One reclaim in progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Reclaim {
    /// Why.
    pub(crate) reason: ReclaimReason,
    /// When it started (run time).
    pub(crate) started: Duration,
    /// When the grace period ends.
    pub(crate) deadline: Duration,
    /// What the VM must come down to (its max).
    pub(crate) target: u64,
    /// When the VM first was at or below the target.
    pub(crate) answered: Option<Duration>,
    /// Whether the grace expired with the VM above the target.
    pub(crate) violated: bool,
    /// Whether this reclaim has been counted as answered (once, however often the VM dips
    /// above the target and back while the reclaim stays in force).
    pub(crate) counted: bool,
}

/// What a policy step changed, for the governor to act on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum PolicyEvent {
    /// A reclaim started: post the notice.
    ReclaimStarted(Reclaim),
    /// The VM came down to the target (`in_grace`: before the deadline).
    Answered {
        /// Whether it was in time.
        in_grace: bool,
    },
    /// The grace expired with the VM above the target: count and enforce.
    Violation,
    /// The reclaim is over: lift the target (and any enforcement).
    ReclaimOver,
}

/// How long a VM must stay compliant before a pool reclaim is lifted (so the capacity it
/// gave back can go to the VM that needed it).
pub(crate) const POOL_RECLAIM_HOLD: Duration = Duration::from_millis(500);

/// One resource's policy state.
#[derive(Debug, Clone)]
pub(crate) struct ResourcePolicy {
    /// Which resource.
    pub(crate) resource: Resource,
    /// `min <= max <= burst`.
    pub(crate) limits: Policy,
    /// The burst credit.
    pub(crate) credit: Credit,
    /// The reclaim in force, if any.
    pub(crate) reclaim: Option<Reclaim>,
    /// The pool asked for this resource back.
    pub(crate) pool_wants: bool,
    /// The operator lowered max below what the VM holds.
    pub(crate) operator_wants: bool,
    /// Reclaims started.
    pub(crate) reclaims: u64,
    /// Reclaims answered within their grace.
    pub(crate) answered_in_grace: u64,
    /// Reclaims whose grace expired first.
    pub(crate) violations: u64,
}

impl ResourcePolicy {
    /// A policy with a full credit bucket.
    pub(crate) fn new(resource: Resource, limits: Policy, budget: f64, refill: f64) -> ResourcePolicy {
        ResourcePolicy {
            resource,
            limits,
            credit: Credit::new(budget, refill),
            reclaim: None,
            pool_wants: false,
            operator_wants: false,
            reclaims: 0,
            answered_in_grace: 0,
            violations: 0,
        }
    }

    /// The most this VM may hold right now: burst normally, max while a reclaim is in force
    /// or the credit is empty.
    pub(crate) fn ceiling(&self) -> u64 {
        if self.reclaim.is_some() || self.credit.exhausted() { self.limits.max } else { self.limits.burst }
    }

    /// Whether the grace of the reclaim in force has expired with the VM above the target
    /// (enforcement applies).
    pub(crate) fn enforcing(&self) -> bool {
        self.reclaim.is_some_and(|r| r.violated && r.answered.is_none())
    }

    /// Reclaims neither answered in grace nor counted as violations: at most the one still in
    /// force and within its grace.
    pub(crate) fn unresolved(&self) -> u64 {
        self.reclaims.saturating_sub(self.answered_in_grace + self.violations)
    }

    /// Whether a reclaim is in force, unanswered and still within its grace at `now`.
    pub(crate) fn open_within_grace(&self) -> bool {
        self.reclaim.is_some_and(|r| !r.counted && !r.violated)
    }

    /// One accounting step: `held` now, `dt` since the last step, `now` run time.
    pub(crate) fn step(&mut self, held: u64, dt: Duration, now: Duration, grace: Duration) -> Vec<PolicyEvent> {
        let mut events = Vec::new();
        let excess = held.saturating_sub(self.limits.max);
        self.credit.tick(excess as f64 / self.resource.credit_unit(), dt.as_secs_f64());
        if self.reclaim.is_none() && excess > 0 {
            let reason = if self.credit.exhausted() {
                Some(ReclaimReason::Credit)
            } else if self.pool_wants {
                Some(ReclaimReason::Pool)
            } else if self.operator_wants {
                Some(ReclaimReason::Operator)
            } else {
                None
            };
            if let Some(reason) = reason {
                let r = Reclaim {
                    reason,
                    started: now,
                    deadline: now + grace,
                    target: self.limits.max,
                    answered: None,
                    violated: false,
                    counted: false,
                };
                self.reclaim = Some(r);
                self.reclaims += 1;
                events.push(PolicyEvent::ReclaimStarted(r));
            }
        }
        if excess == 0 {
            self.pool_wants = false;
            self.operator_wants = false;
        }
        if let Some(r) = self.reclaim.as_mut() {
            if held <= r.target && r.answered.is_none() {
                r.answered = Some(now);
                if !r.counted {
                    r.counted = true;
                    let in_grace = !r.violated;
                    if in_grace {
                        self.answered_in_grace += 1;
                    }
                    events.push(PolicyEvent::Answered { in_grace });
                }
            }
            if held > r.target && r.answered.is_none() && now > r.deadline && !r.violated {
                r.violated = true;
                self.violations += 1;
                events.push(PolicyEvent::Violation);
            }
            if held > r.target && r.answered.is_some() {
                // Above the target again (e.g. a straggling grant): the reclaim goes on.
                r.answered = None;
            }
            let lift = match (r.reason, r.answered) {
                (_, None) => false,
                (ReclaimReason::Credit, Some(_)) => self.credit.balance >= self.credit.cap / 2.0,
                (ReclaimReason::Pool | ReclaimReason::Operator, Some(at)) => {
                    now.saturating_sub(at) >= POOL_RECLAIM_HOLD
                }
            };
            if lift {
                self.reclaim = None;
                events.push(PolicyEvent::ReclaimOver);
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn vcpus(budget: f64) -> ResourcePolicy {
        ResourcePolicy::new(Resource::Vcpus, Policy { min: 1, max: 2, burst: 4 }, budget, 0.5)
    }

    #[test]
    fn credit_drains_with_the_excess_and_refills_to_the_cap() {
        let mut c = Credit::new(1.0, 0.5);
        c.tick(2.0, 0.25); // 2 above max for 250 ms
        assert!((c.balance - 0.5).abs() < 1e-9);
        c.tick(0.0, 10.0);
        assert_eq!(c.balance, 1.0, "refill stops at the cap");
        c.tick(1.0, 1.5);
        assert!(c.exhausted() && (c.lowest + 0.5).abs() < 1e-9);
        c.tick(1.0, 1.0);
        assert!((c.balance + 0.5).abs() < 1e-9, "no further debt once empty");
        assert!(c.within_one_tick());
    }

    #[test]
    fn an_exhausted_credit_starts_a_reclaim_that_the_guest_answers_in_grace() {
        let mut p = vcpus(0.1);
        assert_eq!(p.ceiling(), 4);
        let grace = ms(200);
        // Hold 4 (2 above max): 0.1 vCPU-s lasts 50 ms.
        assert!(p.step(4, ms(40), ms(40), grace).is_empty());
        let ev = p.step(4, ms(20), ms(60), grace);
        assert!(
            matches!(ev[..], [PolicyEvent::ReclaimStarted(r)] if r.reason == ReclaimReason::Credit && r.target == 2)
        );
        assert_eq!(p.ceiling(), 2, "no bursting during a reclaim");
        assert!(p.step(3, ms(50), ms(110), grace).is_empty());
        assert_eq!(p.step(2, ms(50), ms(160), grace), [PolicyEvent::Answered { in_grace: true }]);
        assert_eq!((p.reclaims, p.answered_in_grace, p.violations), (1, 1, 0));
        // Lifted once the credit has refilled to half the cap (0.05 at 0.5/s).
        let mut t = 160;
        let mut over = false;
        for _ in 0..100 {
            t += 10;
            over |= p.step(2, ms(10), ms(t), grace).contains(&PolicyEvent::ReclaimOver);
        }
        assert!(over && p.reclaim.is_none());
        assert_eq!(p.ceiling(), 4);
    }

    #[test]
    fn ignoring_a_reclaim_is_a_violation_once_and_enforced_until_compliance() {
        let mut p = vcpus(0.01);
        let grace = ms(200);
        assert!(matches!(p.step(4, ms(10), ms(10), grace)[..], [PolicyEvent::ReclaimStarted(_)]));
        assert!(p.step(4, ms(100), ms(110), grace).is_empty());
        assert_eq!(p.step(4, ms(150), ms(260), grace), [PolicyEvent::Violation]);
        assert!(p.enforcing());
        assert!(p.step(4, ms(100), ms(360), grace).is_empty(), "counted once");
        assert_eq!(p.violations, 1);
        assert_eq!(p.step(2, ms(10), ms(370), grace), [PolicyEvent::Answered { in_grace: false }]);
        assert!(!p.enforcing());
        assert_eq!(p.answered_in_grace, 0);
    }

    #[test]
    fn a_pool_reclaim_lasts_until_the_hold_time_after_compliance() {
        let mut p = vcpus(100.0);
        let grace = ms(200);
        p.pool_wants = true;
        let ev = p.step(3, ms(10), ms(10), grace);
        assert!(matches!(ev[..], [PolicyEvent::ReclaimStarted(r)] if r.reason == ReclaimReason::Pool));
        assert_eq!(p.step(2, ms(10), ms(20), grace), [PolicyEvent::Answered { in_grace: true }]);
        assert!(p.step(2, ms(100), ms(120), grace).is_empty());
        assert_eq!(p.step(2, ms(500), ms(620), grace), [PolicyEvent::ReclaimOver]);
        assert!(!p.pool_wants);
    }

    #[test]
    fn no_reclaim_while_at_or_below_max_even_with_no_credit() {
        let mut p = vcpus(1.0);
        p.credit.balance = 0.0;
        assert_eq!(p.ceiling(), 2, "empty credit: no bursting");
        assert!(p.step(2, ms(10), ms(10), ms(200)).is_empty());
        p.step(2, ms(1000), ms(1010), ms(200));
        assert_eq!(p.ceiling(), 4, "refilled");
    }

    #[test]
    fn memory_credit_is_in_gib_seconds() {
        let gib = 1u64 << 30;
        let mut p = ResourcePolicy::new(Resource::Memory, Policy { min: gib, max: 2 * gib, burst: 4 * gib }, 1.0, 0.1);
        p.step(3 * gib, ms(500), ms(500), ms(200)); // 1 GiB above max for 0.5 s
        assert!((p.credit.balance - 0.5).abs() < 1e-9);
    }
}
