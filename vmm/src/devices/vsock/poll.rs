//! How long the I/O thread polls after traffic before it sleeps: a window that adapts the way
//! KVM's halt polling does.
//!
//! Polling saves the guest an exit per transmit batch (it does not notify while the host
//! polls) and saves the thread a wake-up, but it burns a CPU that, on a shared host, a
//! neighbour or one of the VM's own vCPUs may need. So the thread polls only while polling
//! pays: each time it slept and was woken by work, it looks at how long it slept. A short
//! sleep (at most [`POLL_MAX`]) is work a window would have caught, and the window grows
//! (doubling, from [`POLL_MIN`]); a long one means the traffic has gaps polling does not
//! bridge, and the window halves, down to zero (no polling at all).

use std::time::{Duration, Instant};

/// The longest window: about what the guest's notify exit and the thread's wake-up cost on a
/// nested host, so that polling never costs more than what it saves.
pub(super) const POLL_MAX: Duration = Duration::from_micros(50);
/// The shortest window that is not zero.
pub(super) const POLL_MIN: Duration = Duration::from_micros(10);

/// The adaptive poll window.
#[derive(Debug, Clone, Copy)]
pub(super) struct PollWindow {
    window: Duration,
    slept_at: Option<Instant>,
}

impl PollWindow {
    /// Starts with no polling: the first short sleeps earn it.
    pub(super) fn new() -> PollWindow {
        PollWindow { window: Duration::ZERO, slept_at: None }
    }

    /// The window now.
    pub(super) fn window(&self) -> Duration {
        self.window
    }

    /// Work was found at `now`: poll until the returned instant (`None`: sleep at once).
    pub(super) fn after_work(&self, now: Instant) -> Option<Instant> {
        (!self.window.is_zero()).then(|| now + self.window)
    }

    /// The thread goes to sleep at `now`.
    pub(super) fn sleeping(&mut self, now: Instant) {
        self.slept_at = Some(now);
    }

    /// The thread woke at `now`; `work` if it found any. Adapts the window.
    pub(super) fn woke(&mut self, now: Instant, work: bool) {
        let Some(at) = self.slept_at.take() else { return };
        if !work {
            return;
        }
        if now.saturating_duration_since(at) <= POLL_MAX {
            self.window = (self.window * 2).clamp(POLL_MIN, POLL_MAX);
        } else {
            self.window /= 2;
            if self.window < POLL_MIN {
                self.window = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_sleeps_grow_the_window_up_to_the_max_and_long_ones_shrink_it_to_zero() {
        let t0 = Instant::now();
        let mut p = PollWindow::new();
        assert_eq!(p.after_work(t0), None, "no polling before it paid");
        let us = Duration::from_micros;
        let mut widths = Vec::new();
        for _ in 0..4 {
            p.sleeping(t0);
            p.woke(t0 + us(30), true);
            widths.push(p.window().as_micros());
        }
        assert_eq!(widths, [10, 20, 40, 50]);
        assert_eq!(p.after_work(t0), Some(t0 + us(50)));
        // A wake-up without work (a timer, a command) says nothing.
        p.sleeping(t0);
        p.woke(t0 + us(10_000), false);
        assert_eq!(p.window(), us(50));
        let mut widths = Vec::new();
        for _ in 0..3 {
            p.sleeping(t0);
            p.woke(t0 + us(5_000), true);
            widths.push(p.window().as_micros());
        }
        assert_eq!(widths, [25, 12, 0]);
        assert_eq!(p.after_work(t0), None);
    }

    #[test]
    fn a_wake_up_without_a_sleep_changes_nothing() {
        let mut p = PollWindow::new();
        p.woke(Instant::now(), true);
        assert_eq!(p.window(), Duration::ZERO);
    }
}
