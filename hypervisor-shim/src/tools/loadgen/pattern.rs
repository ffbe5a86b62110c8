//! Load patterns: the offered level as a function of time.
//!
//! A [`Pattern`] is a list of [`Phase`]s played one after another. Each phase has a shape, a
//! peak `N` and a duration `D`; its level at time `t` (from the start of the phase) is:
//!
//! | shape    | level(t)                                                                      |
//! | -------- | ----------------------------------------------------------------------------- |
//! | steady   | `N`                                                                           |
//! | ramp     | `N * t / D`: linear from 0 at the start to `N` at the end                      |
//! | square   | `N` for the first half of every period `P`, `N / 10` for the second half       |
//! | spike    | `N / 10`, except `N` during the middle fifth of the phase (`0.4 D ..= 0.6 D`)  |
//!
//! The level means requests per second in open-loop mode and active connections in
//! closed-loop mode (rounded up: [`Pattern::active`]). After the last phase the level is 0.

use std::time::Duration;

use serde::Serialize;

/// Level of the low half of a square wave and of the baseline around a spike, as a fraction
/// of the peak.
pub const LOW_FRACTION: f64 = 0.1;
/// Where the spike window starts and ends, as fractions of the phase.
pub const SPIKE_WINDOW: (f64, f64) = (0.4, 0.6);

/// The shape of one phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
pub enum Shape {
    /// The peak throughout.
    Steady,
    /// Linear from 0 to the peak.
    Ramp,
    /// The peak for the first half of each period, [`LOW_FRACTION`] of it for the second half.
    Square {
        /// The period of the wave.
        #[serde(rename = "period_s", serialize_with = "super::secs")]
        period: Duration,
    },
    /// [`LOW_FRACTION`] of the peak, with the peak during [`SPIKE_WINDOW`].
    Spike,
}

/// One phase of a pattern.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phase {
    /// Its shape.
    #[serde(flatten)]
    pub shape: Shape,
    /// Its peak level: requests per second (open loop) or connections (closed loop).
    pub peak: f64,
    /// How long it lasts.
    #[serde(rename = "duration_s", serialize_with = "super::secs")]
    pub duration: Duration,
}

impl Phase {
    /// The level `t` into this phase (`t < duration`).
    fn level(&self, t: Duration) -> f64 {
        let n = self.peak;
        let d = self.duration.as_secs_f64();
        let t = t.as_secs_f64();
        match self.shape {
            Shape::Steady => n,
            Shape::Ramp => n * (t / d).clamp(0.0, 1.0),
            Shape::Square { period } => {
                let p = period.as_secs_f64();
                if t % p < p / 2.0 { n } else { n * LOW_FRACTION }
            }
            Shape::Spike => {
                let (from, to) = SPIKE_WINDOW;
                if t >= from * d && t <= to * d { n } else { n * LOW_FRACTION }
            }
        }
    }
}

/// A sequence of phases: the offered level over a whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Pattern {
    /// The phases, in order.
    pub phases: Vec<Phase>,
}

/// Why a pattern cannot be run.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PatternError {
    /// No phases at all.
    #[error("the load pattern has no phases")]
    Empty,
    /// A phase lasts no time.
    #[error("phase {0} of the load pattern lasts no time")]
    ZeroDuration(usize),
    /// A peak is negative or not a number.
    #[error("phase {0} of the load pattern has a peak that is not a non-negative number")]
    BadPeak(usize),
    /// A square wave's period is too short to be played.
    #[error("phase {0} of the load pattern: the square period must be at least 2ms")]
    ShortPeriod(usize),
}

impl Pattern {
    /// One phase of `shape`.
    pub fn single(shape: Shape, peak: f64, duration: Duration) -> Self {
        Pattern { phases: vec![Phase { shape, peak, duration }] }
    }

    /// `peak` throughout.
    #[cfg(test)]
    pub fn steady(peak: f64, duration: Duration) -> Self {
        Self::single(Shape::Steady, peak, duration)
    }

    /// Linear from 0 to `peak`.
    pub fn ramp(peak: f64, duration: Duration) -> Self {
        Self::single(Shape::Ramp, peak, duration)
    }

    /// `peak` and `peak / 10` alternating every half `period`.
    #[cfg(test)]
    pub fn square(peak: f64, duration: Duration, period: Duration) -> Self {
        Self::single(Shape::Square { period }, peak, duration)
    }

    /// `peak / 10` with `peak` during the middle fifth.
    pub fn spike(peak: f64, duration: Duration) -> Self {
        Self::single(Shape::Spike, peak, duration)
    }

    /// This pattern followed by `next`.
    pub fn then(mut self, next: Pattern) -> Self {
        self.phases.extend(next.phases);
        self
    }

    /// Checks that the pattern can be played.
    pub fn validate(&self) -> Result<(), PatternError> {
        if self.phases.is_empty() {
            return Err(PatternError::Empty);
        }
        for (i, p) in self.phases.iter().enumerate() {
            if p.duration.is_zero() {
                return Err(PatternError::ZeroDuration(i));
            }
            if !p.peak.is_finite() || p.peak < 0.0 {
                return Err(PatternError::BadPeak(i));
            }
            if let Shape::Square { period } = p.shape
                && period < Duration::from_millis(2)
            {
                return Err(PatternError::ShortPeriod(i));
            }
        }
        Ok(())
    }

    /// The whole pattern's length.
    pub fn duration(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }

    /// The highest level any phase reaches.
    pub fn peak(&self) -> f64 {
        self.phases.iter().map(|p| p.peak).fold(0.0, f64::max)
    }

    /// The level at `t` from the start (0 after the end).
    pub fn level(&self, t: Duration) -> f64 {
        let mut start = Duration::ZERO;
        for p in &self.phases {
            if t < start + p.duration {
                return p.level(t - start);
            }
            start += p.duration;
        }
        0.0
    }

    /// Closed loop: how many connections are active at `t` (the level rounded up, so a low
    /// level still keeps one connection busy).
    pub fn active(&self, t: Duration) -> usize {
        self.level(t).ceil() as usize
    }

    /// The mean level over `[from, to)`, sampled every millisecond (or at 100 points if the
    /// window is shorter than 100 ms).
    pub fn mean_level(&self, from: Duration, to: Duration, closed_loop: bool) -> f64 {
        if to <= from {
            return 0.0;
        }
        let span = (to - from).as_secs_f64();
        let n = ((span * 1000.0).round() as usize).max(100);
        let step = span / n as f64;
        let sum: f64 = (0..n)
            .map(|i| {
                let t = from + Duration::from_secs_f64(step * (i as f64 + 0.5));
                if closed_loop { self.active(t) as f64 } else { self.level(t) }
            })
            .sum();
        sum / n as f64
    }
}

/// The open-loop send schedule: the times at which requests are due, so that the number due
/// in any interval is the integral of the level over it.
///
/// Time is cut into 1 ms slices; within a slice the rate is the level at the slice's middle and
/// requests are evenly spaced. A fractional request carries over to the next slice, so a
/// steady rate `N` puts exactly `N` requests in every second.
#[derive(Debug)]
pub struct Schedule<'a> {
    pattern: &'a Pattern,
    /// The slice being played.
    slice: u64,
    /// Seconds from the start: the last request issued, or the start of the slice.
    t: f64,
    /// Requests accumulated but not yet issued (in `[0, 1)`).
    credit: f64,
    end: f64,
}

const SLICE: f64 = 1e-3;

impl<'a> Schedule<'a> {
    /// A schedule over `pattern`, starting at time 0.
    pub fn new(pattern: &'a Pattern) -> Self {
        // Half a request of credit centres each request in its interval.
        Schedule { pattern, slice: 0, t: 0.0, credit: 0.5, end: pattern.duration().as_secs_f64() }
    }

    /// When the next request is due (from the start), or `None` after the end.
    pub fn next_due(&mut self) -> Option<Duration> {
        loop {
            let slice_start = self.slice as f64 * SLICE;
            if slice_start >= self.end {
                return None;
            }
            let slice_end = ((self.slice + 1) as f64 * SLICE).min(self.end);
            let t = self.t.max(slice_start);
            let rate = self.pattern.level(Duration::from_secs_f64((slice_start + slice_end) / 2.0));
            if rate > 0.0 {
                let dt = (1.0 - self.credit) / rate;
                if t + dt < slice_end {
                    self.t = t + dt;
                    self.credit = 0.0;
                    return Some(Duration::from_secs_f64(self.t));
                }
            }
            self.credit += rate * (slice_end - t);
            self.t = slice_end;
            self.slice += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: f64) -> Duration {
        Duration::from_secs_f64(v)
    }

    #[test]
    fn steady_and_ramp() {
        let p = Pattern::steady(100.0, s(10.0));
        assert_eq!(p.level(s(0.0)), 100.0);
        assert_eq!(p.level(s(9.99)), 100.0);
        assert_eq!(p.level(s(10.0)), 0.0);
        let r = Pattern::ramp(100.0, s(10.0));
        assert_eq!(r.level(s(0.0)), 0.0);
        assert!((r.level(s(2.5)) - 25.0).abs() < 1e-9);
        assert!((r.level(s(9.9)) - 99.0).abs() < 1e-9);
    }

    #[test]
    fn square_alternates_peak_and_tenth() {
        let p = Pattern::square(100.0, s(8.0), s(2.0));
        for (t, want) in [(0.0, 100.0), (0.99, 100.0), (1.0, 10.0), (1.99, 10.0), (2.0, 100.0), (7.5, 10.0)] {
            assert!((p.level(s(t)) - want).abs() < 1e-9, "t={t}");
        }
    }

    #[test]
    fn spike_is_the_middle_fifth() {
        let p = Pattern::spike(50.0, s(10.0));
        for (t, want) in [(0.0, 5.0), (3.9, 5.0), (4.0, 50.0), (5.0, 50.0), (6.0, 50.0), (6.1, 5.0), (9.9, 5.0)] {
            assert!((p.level(s(t)) - want).abs() < 1e-9, "t={t}");
        }
    }

    #[test]
    fn phases_play_in_order() {
        let p = Pattern::ramp(10.0, s(4.0)).then(Pattern::spike(20.0, s(5.0)));
        assert_eq!(p.duration(), s(9.0));
        assert_eq!(p.peak(), 20.0);
        assert!((p.level(s(2.0)) - 5.0).abs() < 1e-9);
        assert!((p.level(s(4.0)) - 2.0).abs() < 1e-9); // spike baseline
        assert!((p.level(s(6.5)) - 20.0).abs() < 1e-9); // 2.5 s into the spike phase
        assert_eq!(p.level(s(9.0)), 0.0);
    }

    #[test]
    fn closed_loop_rounds_up() {
        let p = Pattern::square(4.0, s(2.0), s(2.0));
        assert_eq!(p.active(s(0.5)), 4);
        assert_eq!(p.active(s(1.5)), 1); // 0.4 rounds up to one connection
        let r = Pattern::ramp(4.0, s(4.0));
        assert_eq!(r.active(s(0.0)), 0);
        assert_eq!(r.active(s(0.1)), 1);
        assert_eq!(r.active(s(3.9)), 4);
        assert!((r.mean_level(s(0.0), s(4.0), true) - 2.5).abs() < 0.01);
    }

    #[test]
    fn validation() {
        assert_eq!(Pattern { phases: vec![] }.validate(), Err(PatternError::Empty));
        assert_eq!(Pattern::steady(1.0, Duration::ZERO).validate(), Err(PatternError::ZeroDuration(0)));
        assert_eq!(Pattern::steady(f64::NAN, s(1.0)).validate(), Err(PatternError::BadPeak(0)));
        assert_eq!(
            Pattern::steady(1.0, s(1.0)).then(Pattern::square(1.0, s(1.0), s(0.001))).validate(),
            Err(PatternError::ShortPeriod(1))
        );
        assert!(Pattern::spike(1.0, s(1.0)).validate().is_ok());
    }

    fn due_per_second(p: &Pattern) -> Vec<usize> {
        let mut counts = vec![0; p.duration().as_secs_f64().ceil() as usize];
        let mut sched = Schedule::new(p);
        let mut last = Duration::ZERO;
        while let Some(t) = sched.next_due() {
            assert!(t >= last, "the schedule goes forward");
            last = t;
            counts[t.as_secs() as usize] += 1;
        }
        counts
    }

    #[test]
    fn schedule_matches_the_rate() {
        assert_eq!(due_per_second(&Pattern::steady(1000.0, s(3.0))), [1000, 1000, 1000]);
        assert_eq!(due_per_second(&Pattern::steady(3.0, s(2.0))), [3, 3]);
        assert_eq!(due_per_second(&Pattern::square(100.0, s(4.0), s(2.0))), [100, 10, 100, 10]);
        // A ramp to 100 over 4 s: seconds carry 12.5, 37.5, 62.5, 87.5 requests.
        let ramp = due_per_second(&Pattern::ramp(100.0, s(4.0)));
        for (got, want) in ramp.iter().zip([12.5, 37.5, 62.5, 87.5]) {
            assert!((*got as f64 - want).abs() <= 1.0, "{ramp:?}");
        }
        // The spike second carries the peak.
        let spike = due_per_second(&Pattern::spike(200.0, s(5.0)));
        assert_eq!(spike[2], 200, "{spike:?}");
        assert_eq!(spike[0], 20, "{spike:?}");
        assert_eq!(due_per_second(&Pattern::steady(0.0, s(2.0))), [0, 0]);
    }

    #[test]
    fn requests_are_evenly_spaced() {
        let p = Pattern::steady(4.0, s(1.0));
        let mut sched = Schedule::new(&p);
        let due: Vec<f64> = std::iter::from_fn(|| sched.next_due()).map(|d| d.as_secs_f64()).collect();
        let want = [0.125, 0.375, 0.625, 0.875];
        assert_eq!(due.len(), 4);
        for (g, w) in due.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{due:?}");
        }
    }
}
