//! The host pool several VMs share: capacity in vCPU slots and bytes, admission, and
//! arbitration when it is full.
//!
//! * **Charges**: a VM is charged `max(online vCPUs, min)` slots and `max(held bytes, min)`
//!   bytes, so its `min` is reserved from admission on and never given to anyone else.
//! * **Admission** refuses a VM whose min does not fit next to the VMs already admitted.
//! * **Grants** come from free capacity; the capacity is never exceeded (every check and
//!   charge happens under one lock).
//! * **Arbitration**: a VM *below its max* that finds the pool full gets AGAIN, and the pool
//!   asks the VMs *above their max* to come down (a reclaim), largest weighted excess first
//!   (excess divided by weight: a heavier VM keeps its burst longer; ties by name). A VM at or
//!   above its max that finds the pool full gets EXHAUSTED: bursting never takes capacity from
//!   anyone.
//!
//! Every decision is deterministic (it depends only on the charges, policies, weights and
//! names) and is returned as a line for the log.

use std::sync::{Mutex, MutexGuard};

use thiserror::Error;

use crate::base::config::{Policy, format_size};
use crate::policy::resource::Resource;

/// Pool failures.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PoolError {
    /// A VM's min does not fit.
    #[error(
        "VM '{name}' needs at least {need} but the pool has only {free} left of {capacity} after the VMs before it"
    )]
    MinDoesNotFit {
        /// The VM.
        name: String,
        /// Its min (formatted).
        need: String,
        /// What was left (formatted).
        free: String,
        /// The capacity (formatted).
        capacity: String,
    },
    /// A restored VM holds more above its min than the pool has free.
    #[error("VM '{name}' holds more {resource} above its min than the pool has free")]
    HeldDoesNotFit {
        /// The VM.
        name: String,
        /// The resource.
        resource: &'static str,
    },
}

/// A pool's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// vCPU slots.
    pub vcpus: u64,
    /// Bytes.
    pub memory: u64,
}

impl Capacity {
    /// No limit (a single VM run without a pool).
    pub const UNLIMITED: Capacity = Capacity { vcpus: u64::MAX, memory: u64::MAX };

    fn of(&self, r: Resource) -> u64 {
        match r {
            Resource::Vcpus => self.vcpus,
            Resource::Memory => self.memory,
        }
    }
}

/// What the pool said to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Take {
    /// Granted this much (for memory possibly less than asked).
    Granted(u64),
    /// The pool is full; the requester is below its max, and these VMs were asked to come
    /// down (answer AGAIN).
    Again(Vec<usize>),
    /// The pool is full and the requester is at or above its max (answer EXHAUSTED).
    Exhausted,
}

#[derive(Debug, Clone)]
struct Member {
    name: String,
    limits: [Policy; 2],
    weight: u64,
    held: [u64; 2],
    active: bool,
    /// The pool asked this VM to give `r` back (read and cleared by the governor).
    reclaim_wanted: [bool; 2],
    /// An on-demand slot: its min stays reserved between its VMs (see [`Pool::reserve`]).
    keep_min: bool,
}

impl Member {
    fn charge(&self, r: Resource) -> u64 {
        let i = r as usize;
        self.held[i].max(self.limits[i].min)
    }
}

#[derive(Debug)]
struct Inner {
    capacity: Capacity,
    members: Vec<Member>,
    peak: [u64; 2],
}

impl Inner {
    fn used(&self, r: Resource) -> u64 {
        self.members.iter().filter(|m| m.active).map(|m| m.charge(r)).sum()
    }
}

/// The shared pool.
#[derive(Debug)]
pub(crate) struct Pool {
    inner: Mutex<Inner>,
}

fn format_amount(r: Resource, v: u64) -> String {
    match r {
        Resource::Vcpus => format!("{v} vCPU slot(s)"),
        Resource::Memory if v == u64::MAX => "unlimited".into(),
        Resource::Memory => format!("{} of memory", format_size(v)),
    }
}

impl Pool {
    /// A pool with `capacity`.
    pub(crate) fn new(capacity: Capacity) -> Pool {
        Pool { inner: Mutex::new(Inner { capacity, members: Vec::new(), peak: [0, 0] }) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The capacity.
    pub(crate) fn capacity(&self) -> Capacity {
        self.lock().capacity
    }

    /// Admits a VM: reserves its mins. Returns its member index.
    pub(crate) fn admit(&self, name: &str, vcpus: Policy, memory: Policy, weight: u64) -> Result<usize, PoolError> {
        let mut p = self.lock();
        for (r, limits) in [(Resource::Vcpus, vcpus), (Resource::Memory, memory)] {
            let free = p.capacity.of(r).saturating_sub(p.used(r));
            if limits.min > free {
                return Err(PoolError::MinDoesNotFit {
                    name: name.to_string(),
                    need: format_amount(r, limits.min),
                    free: format_amount(r, free),
                    capacity: format_amount(r, p.capacity.of(r)),
                });
            }
        }
        p.members.push(Member {
            name: name.to_string(),
            limits: [vcpus, memory],
            weight: weight.max(1),
            held: [vcpus.min, memory.min],
            active: true,
            reclaim_wanted: [false, false],
            keep_min: false,
        });
        for r in Resource::ALL {
            p.peak[r as usize] = p.peak[r as usize].max(p.used(r));
        }
        Ok(p.members.len() - 1)
    }

    /// Asks for `amount` more of `r` for member `id`. For memory the answer may be partial
    /// (rounded down to `granularity`); for vCPUs it is all or nothing.
    pub(crate) fn take(&self, id: usize, r: Resource, amount: u64, granularity: u64) -> (Take, Option<String>) {
        let mut p = self.lock();
        let i = r as usize;
        let Some(m) = p.members.get(id) else { return (Take::Exhausted, None) };
        let before = m.charge(r);
        let after = (m.held[i] + amount).max(m.limits[i].min);
        let need = after - before;
        let free = p.capacity.of(r).saturating_sub(p.used(r));
        let grant = if need <= free {
            amount
        } else if r == Resource::Memory {
            // Partial: whatever fits (above the part covered by the reservation).
            (free + (before - m.held[i])) / granularity.max(1) * granularity.max(1)
        } else {
            0
        };
        if grant > 0 {
            let m = &mut p.members[id];
            m.held[i] += grant;
            let used = p.used(r);
            p.peak[i] = p.peak[i].max(used);
            return (Take::Granted(grant), None);
        }
        let m = &p.members[id];
        let (name, held, max) = (m.name.clone(), m.held[i], m.limits[i].max);
        if held >= max {
            let why = format!(
                "pool: {name} asked for {} more {}: pool full ({} used of {}); {name} is at or above its max: EXHAUSTED",
                amount,
                r.name(),
                p.used(r),
                p.capacity.of(r)
            );
            return (Take::Exhausted, Some(why));
        }
        // Victims: VMs above their max, largest excess per unit of weight first.
        let mut victims: Vec<(usize, f64, String)> = p
            .members
            .iter()
            .enumerate()
            .filter(|(j, v)| *j != id && v.active && v.held[i] > v.limits[i].max)
            .map(|(j, v)| (j, (v.held[i] - v.limits[i].max) as f64 / v.weight as f64, v.name.clone()))
            .collect();
        victims.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.2.cmp(&b.2)));
        let unit = if r == Resource::Memory { (1u64 << 20) as f64 } else { 1.0 };
        let unit_name = if r == Resource::Memory { " MiB" } else { "" };
        let names: Vec<String> =
            victims.iter().map(|v| format!("{} ({:.2}{unit_name} weighted excess)", v.2, v.1 / unit)).collect();
        let why = format!(
            "pool: {name} asked for {amount} more {} below its max: pool full ({} used of {}); reclaim from [{}]: AGAIN",
            r.name(),
            p.used(r),
            p.capacity.of(r),
            names.join(", ")
        );
        if victims.is_empty() {
            return (Take::Exhausted, Some(why.replace(": AGAIN", ", nobody above max: EXHAUSTED")));
        }
        for v in &victims {
            p.members[v.0].reclaim_wanted[i] = true;
        }
        (Take::Again(victims.into_iter().map(|v| v.0).collect()), Some(why))
    }

    /// Which resources the pool wants member `id` to give back (and clears the requests).
    pub(crate) fn take_reclaim_requests(&self, id: usize) -> [bool; 2] {
        let mut p = self.lock();
        p.members.get_mut(id).map_or([false, false], |m| std::mem::take(&mut m.reclaim_wanted))
    }

    /// Gives `amount` of `r` back for member `id`.
    pub(crate) fn give_back(&self, id: usize, r: Resource, amount: u64) {
        let mut p = self.lock();
        if let Some(m) = p.members.get_mut(id) {
            m.held[r as usize] = m.held[r as usize].saturating_sub(amount);
        }
    }

    /// Admits an on-demand slot: its mins are reserved now and stay reserved while no VM runs
    /// (a VM the slot boots later always fits); every VM it boots uses this member, and
    /// [`Pool::leave`] of one of them gives back only what it held above min.
    pub(crate) fn reserve(&self, name: &str, vcpus: Policy, memory: Policy, weight: u64) -> Result<usize, PoolError> {
        let id = self.admit(name, vcpus, memory, weight)?;
        if let Some(m) = self.lock().members.get_mut(id) {
            m.keep_min = true;
        }
        Ok(id)
    }

    /// Member `id`'s VM ended: everything it held returns to the pool (for an on-demand slot,
    /// everything above its reserved min).
    pub(crate) fn leave(&self, id: usize) {
        if let Some(m) = self.lock().members.get_mut(id) {
            if m.keep_min {
                m.held = [m.limits[0].min, m.limits[1].min];
                m.reclaim_wanted = [false, false];
            } else {
                m.active = false;
            }
        }
    }

    /// New limits for member `id`'s resource `r` (a live policy change; min unchanged).
    pub(crate) fn set_limits(&self, id: usize, r: Resource, limits: Policy) {
        if let Some(m) = self.lock().members.get_mut(id) {
            m.limits[r as usize] = limits;
        }
    }

    /// Ends an on-demand slot: its reservation returns to the pool.
    pub(crate) fn close(&self, id: usize) {
        if let Some(m) = self.lock().members.get_mut(id) {
            m.keep_min = false;
            m.active = false;
        }
    }

    /// Capacity in use now, per resource.
    pub(crate) fn used(&self) -> [u64; 2] {
        let p = self.lock();
        [p.used(Resource::Vcpus), p.used(Resource::Memory)]
    }

    /// Highest use seen, per resource.
    pub(crate) fn peak(&self) -> [u64; 2] {
        self.lock().peak
    }

    /// What member `id` holds, per resource.
    #[cfg(test)]
    pub(crate) fn held(&self, id: usize) -> [u64; 2] {
        self.lock().members.get(id).map_or([0, 0], |m| m.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn pol(min: u64, max: u64, burst: u64) -> Policy {
        Policy { min, max, burst }
    }

    #[test]
    fn admission_reserves_min_and_refuses_what_does_not_fit() {
        let pool = Pool::new(Capacity { vcpus: 4, memory: 256 * MB });
        pool.admit("a", pol(2, 3, 4), pol(64 * MB, 128 * MB, 256 * MB), 1).unwrap();
        pool.admit("b", pol(1, 2, 4), pol(128 * MB, 128 * MB, 128 * MB), 1).unwrap();
        assert_eq!(pool.used(), [3, 192 * MB]);
        let e = pool.admit("c", pol(2, 2, 2), pol(8 * MB, 8 * MB, 8 * MB), 1).unwrap_err();
        assert!(
            e.to_string().contains("VM 'c' needs at least 2 vCPU slot(s) but the pool has only 1 vCPU slot(s) left"),
            "{e}"
        );
    }

    #[test]
    fn an_on_demand_reservation_keeps_min_between_vms_and_only_close_frees_it() {
        let pool = Pool::new(Capacity { vcpus: 4, memory: 256 * MB });
        let od = pool.reserve("od", pol(1, 2, 2), pol(64 * MB, 64 * MB, 64 * MB), 1).unwrap();
        let other = pool.admit("busy", pol(1, 3, 3), pol(64 * MB, 64 * MB, 64 * MB), 1).unwrap();
        // The other VM takes everything else; the slot's min is still there for its next VM.
        assert_eq!(pool.take(other, Resource::Vcpus, 2, 1).0, Take::Granted(2));
        assert_eq!(pool.used(), [4, 128 * MB]);
        assert_eq!(pool.take(od, Resource::Vcpus, 1, 1).0, Take::Exhausted, "pool full, nobody above max");
        // Its VM ends: what it held above min returns, the min stays reserved.
        pool.leave(od);
        assert_eq!(pool.held(od), [1, 64 * MB]);
        assert_eq!(pool.used(), [4, 128 * MB]);
        assert!(pool.admit("late", pol(1, 1, 1), pol(64 * MB, 64 * MB, 64 * MB), 1).is_err(), "nothing free");
        pool.close(od);
        assert_eq!(pool.used(), [3, 64 * MB]);
    }

    #[test]
    fn grants_never_exceed_capacity_and_memory_can_be_partial() {
        let pool = Pool::new(Capacity { vcpus: 3, memory: 128 * MB });
        let a = pool.admit("a", pol(1, 4, 4), pol(64 * MB, 256 * MB, 256 * MB), 1).unwrap();
        assert_eq!(pool.take(a, Resource::Vcpus, 1, 1).0, Take::Granted(1)); // online 2 (charged 2)
        assert_eq!(pool.take(a, Resource::Vcpus, 1, 1).0, Take::Granted(1)); // 3
        assert!(matches!(pool.take(a, Resource::Vcpus, 1, 1).0, Take::Exhausted), "nobody to reclaim from");
        assert_eq!(pool.take(a, Resource::Memory, 100 * MB, 2 * MB).0, Take::Granted(64 * MB), "partial");
        assert_eq!(pool.used(), [3, 128 * MB]);
        pool.give_back(a, Resource::Memory, 64 * MB);
        assert_eq!(pool.used()[1], 64 * MB);
        assert_eq!(pool.peak(), [3, 128 * MB]);
    }

    #[test]
    fn a_vm_below_max_gets_again_and_the_largest_weighted_excess_is_reclaimed_first() {
        let pool = Pool::new(Capacity { vcpus: 6, memory: u64::MAX });
        let big = pool.admit("big", pol(1, 1, 4), pol(MB, MB, MB), 1).unwrap();
        let heavy = pool.admit("heavy", pol(1, 1, 4), pol(MB, MB, MB), 4).unwrap();
        let small = pool.admit("small", pol(1, 2, 2), pol(MB, MB, MB), 1).unwrap();
        for _ in 0..2 {
            assert!(matches!(pool.take(big, Resource::Vcpus, 1, 1).0, Take::Granted(1)));
        }
        assert!(matches!(pool.take(heavy, Resource::Vcpus, 1, 1).0, Take::Granted(1)));
        // 3 + 2 + 1 = 6: full. `small` is below its max (1 < 2).
        let (take, why) = pool.take(small, Resource::Vcpus, 1, 1);
        assert_eq!(take, Take::Again(vec![big, heavy]), "big: excess 2/1; heavy: excess 1/4");
        assert!(why.unwrap().contains("reclaim from [big (2.00 weighted excess), heavy (0.25 weighted excess)]"));
        // A bursting VM finding the pool full gets EXHAUSTED and reclaims nothing.
        assert_eq!(pool.take(big, Resource::Vcpus, 1, 1).0, Take::Exhausted);
        assert_eq!(pool.take_reclaim_requests(big), [true, false]);
        assert_eq!(pool.take_reclaim_requests(big), [false, false], "cleared once read");
        pool.leave(big);
        assert_eq!(pool.used()[0], 3);
    }
}
