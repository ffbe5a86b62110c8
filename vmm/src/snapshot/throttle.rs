//! Auto-converge: a guest that writes memory faster than a migration copies it never lets the
//! pre-copy rounds shrink, and the last round, copied with the VM stopped, is long. The
//! throttle then takes a share of every [`PERIOD`] from the guest (its vCPUs paused, asleep on
//! their condition variable: no CPU used) and raises the share round after round while the
//! rounds do not halve. The guest runs slower while it migrates; its downtime stays short.
//!
//! The throttle thread sleeps on a condition variable between its steps; it never spins.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::vmm::shared::VmShared;

/// One run-then-pause cycle.
const PERIOD: Duration = Duration::from_millis(20);
/// The first share taken, and the step by which it rises.
const FIRST_PERCENT: u32 = 30;
const STEP_PERCENT: u32 = 20;
/// The largest share: the guest keeps a tenth of its time.
const MAX_PERCENT: u32 = 90;
/// A round that is not at most this share (in %) of the one before raises the share: rounds
/// that do not halve cannot get from a GiB to under 1 MiB within the rounds allowed
/// (QEMU's auto-converge uses the same half).
const KEEP_PERCENT: usize = 50;
/// How long a pause may wait for the vCPUs to leave the guest.
const PAUSE_WITHIN: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
struct State {
    percent: u32,
    stop: bool,
}

/// Stops a throttle when dropped (however the pre-copy ends).
#[derive(Debug)]
pub(crate) struct StopOnDrop<'a>(pub(crate) &'a Throttle);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The throttle of one migration's pre-copy.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    state: Mutex<State>,
    changed: Condvar,
}

impl Throttle {
    /// The share taken now (%).
    pub(crate) fn percent(&self) -> u32 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).percent
    }

    /// Told a round's dirty pages and the previous round's: raises the share when the rounds
    /// do not shrink. Returns the share now.
    pub(crate) fn after_round(&self, previous: usize, this: usize) -> u32 {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if this * 100 > previous * KEEP_PERCENT {
            s.percent = if s.percent == 0 { FIRST_PERCENT } else { (s.percent + STEP_PERCENT).min(MAX_PERCENT) };
            self.changed.notify_all();
        }
        s.percent
    }

    /// Ends [`Throttle::run`] (which resumes the VM if it paused it).
    pub(crate) fn stop(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        self.changed.notify_all();
    }

    /// Sleeps until `deadline` or a change; `true` when told to stop.
    fn sleep_until(&self, deadline: Option<Instant>) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if s.stop {
                return true;
            }
            let wait = match deadline {
                None if s.percent == 0 => None,
                None => return false,
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return false,
                },
            };
            s = match wait {
                None => self.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(left) => self.changed.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0,
            };
        }
    }

    /// Runs the throttle on `vm` until [`Throttle::stop`]: while the share is 0 it sleeps;
    /// then each period it lets the guest run, then pauses it for the share. A VM paused by
    /// someone else is left alone. Returns with the VM as it found it.
    pub(crate) fn run(&self, vm: &VmShared) {
        loop {
            // Idle until a share is set.
            if self.sleep_until(None) {
                return;
            }
            let p = self.percent();
            let pause = PERIOD * p / 100;
            if self.sleep_until(Some(Instant::now() + (PERIOD - pause))) {
                return;
            }
            if vm.pause_quietly(PAUSE_WITHIN) {
                let stopped = self.sleep_until(Some(Instant::now() + pause));
                vm.resume_quietly();
                if stopped {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_rises_while_rounds_do_not_shrink_and_stays_within_bounds() {
        let t = Throttle::default();
        assert_eq!(t.after_round(1000, 500), 0, "a round that halves needs nothing");
        assert_eq!(t.after_round(1000, 600), FIRST_PERCENT);
        assert_eq!(t.after_round(950, 950), FIRST_PERCENT + STEP_PERCENT);
        assert_eq!(t.after_round(950, 100), FIRST_PERCENT + STEP_PERCENT, "a halving round keeps it");
        for _ in 0..10 {
            t.after_round(1000, 1200);
        }
        assert_eq!(t.percent(), MAX_PERCENT);
        t.stop();
        assert!(t.sleep_until(None));
    }
}
