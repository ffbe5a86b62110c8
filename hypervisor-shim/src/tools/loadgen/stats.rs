//! Latency histograms (HDR, 3 significant digits) and the per-second series.
//!
//! Workers send one [`Event`] per request to the thread that called `run`, which keeps a
//! histogram for the whole run and one for each second not yet reported. A request counts in
//! the second in which its answer arrived (or its error was seen); one that arrives after its
//! second was reported counts in the earliest second still open.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in nanoseconds, up to 2 minutes, at 3 significant digits (a
/// 50 µs latency is known to within 32 ns).
const LOWEST_NS: u64 = 1;
const HIGHEST_NS: u64 = 120_000_000_000;
/// Distinct error messages kept in the report (the first ones seen).
pub const MAX_SAMPLES: usize = 5;

fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low).
    Histogram::new_with_bounds(LOWEST_NS, HIGHEST_NS, 3).expect("constant histogram bounds are valid")
}

/// Nanoseconds as microseconds, to 0.1 µs.
fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

/// Latency percentiles of a set of requests, in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    /// Requests measured.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Option<Latency> {
        (!h.is_empty()).then(|| Latency {
            count: h.len(),
            mean_us: (h.mean() / 100.0).round() / 10.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        })
    }
}

/// Failed requests by cause.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    /// A well-formed answer that is wrong (failed verification), or a malformed answer.
    pub wrong: u64,
    /// No complete answer within the timeout.
    pub timeout: u64,
    /// The connection failed or was closed (including failed reconnections).
    pub io: u64,
    /// Open loop: the request was already a timeout late when a connection became free, so
    /// it was not sent.
    pub missed: u64,
}

impl ErrorCounts {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.wrong + self.timeout + self.io + self.missed
    }

    fn add(&mut self, kind: ErrorKind) {
        match kind {
            ErrorKind::Wrong => self.wrong += 1,
            ErrorKind::Timeout => self.timeout += 1,
            ErrorKind::Io => self.io += 1,
            ErrorKind::Missed => self.missed += 1,
        }
    }
}

/// One second of a run, as passed to the `on_second` callback and stored in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecondStats {
    /// Index of the second from the start of the measured phase (0, 1, ...).
    pub second: u32,
    /// The load offered during this second: the mean target rate in requests per second
    /// (open loop) or the mean number of active connections (closed loop).
    pub offered: f64,
    /// Requests answered correctly.
    pub completed: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Correct answers per second of wall time (equals `completed` except in a last, partial
    /// second).
    pub throughput: f64,
    /// Median latency of this second's correct answers (`None` if there were none).
    pub p50_us: Option<f64>,
    /// 99th percentile.
    pub p99_us: Option<f64>,
    /// Largest.
    pub max_us: Option<f64>,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// See [`ErrorCounts::wrong`].
    Wrong,
    /// See [`ErrorCounts::timeout`].
    Timeout,
    /// See [`ErrorCounts::io`].
    Io,
    /// See [`ErrorCounts::missed`].
    Missed,
}

/// What happened to one request.
#[derive(Debug)]
pub enum Outcome {
    /// Answered correctly after this latency.
    Ok(Duration),
    /// Failed; the message says how.
    Error(ErrorKind, String),
}

/// One request's outcome and when it was known (from the start of the measured phase).
#[derive(Debug)]
pub struct Event {
    /// When.
    pub at: Duration,
    /// What.
    pub outcome: Outcome,
}

#[derive(Debug)]
struct Open {
    latency: Histogram<u64>,
    completed: u64,
    errors: u64,
}

/// Accumulates events into the run's totals and its per-second series.
#[derive(Debug)]
pub struct Aggregator {
    /// Seconds of the run; the last absorbs anything later.
    seconds: usize,
    open: Vec<Option<Open>>,
    /// Seconds already reported.
    emitted: usize,
    total: Histogram<u64>,
    completed: u64,
    errors: ErrorCounts,
    samples: Vec<String>,
}

impl Aggregator {
    /// For a run of `seconds` seconds (at least 1).
    pub fn new(seconds: usize) -> Self {
        let seconds = seconds.max(1);
        Aggregator {
            seconds,
            open: (0..seconds).map(|_| None).collect(),
            emitted: 0,
            total: histogram(),
            completed: 0,
            errors: ErrorCounts::default(),
            samples: Vec::new(),
        }
    }

    /// Seconds reported so far.
    pub fn emitted(&self) -> usize {
        self.emitted
    }

    /// Seconds in the run.
    pub fn seconds(&self) -> usize {
        self.seconds
    }

    /// Ends the run early: seconds from `seconds` on will not be reported, and what arrives
    /// later counts in the last one that is.
    pub fn truncate(&mut self, seconds: usize) {
        self.seconds = seconds.clamp(self.emitted.max(1), self.seconds);
    }

    /// Counts one event.
    pub fn add(&mut self, event: Event) {
        let second = (event.at.as_secs() as usize).min(self.seconds - 1).max(self.emitted.min(self.seconds - 1));
        let slot = self.open[second].get_or_insert_with(|| Open { latency: histogram(), completed: 0, errors: 0 });
        match event.outcome {
            Outcome::Ok(latency) => {
                let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(LOWEST_NS);
                slot.latency.saturating_record(ns);
                slot.completed += 1;
                self.total.saturating_record(ns);
                self.completed += 1;
            }
            Outcome::Error(kind, message) => {
                slot.errors += 1;
                self.errors.add(kind);
                if self.samples.len() < MAX_SAMPLES && !self.samples.contains(&message) {
                    self.samples.push(message);
                }
            }
        }
    }

    /// Closes the next second; `offered` is its offered load and `window` its length in
    /// seconds (1 except for a partial last second).
    pub fn close_next(&mut self, offered: f64, window: f64) -> SecondStats {
        let index = self.emitted;
        self.emitted += 1;
        let acc = self.open.get_mut(index).and_then(Option::take);
        let (latency, completed, errors) = match acc {
            Some(a) => (Latency::of(&a.latency), a.completed, a.errors),
            None => (None, 0, 0),
        };
        SecondStats {
            second: index as u32,
            offered: (offered * 100.0).round() / 100.0,
            completed,
            errors,
            throughput: if window > 0.0 { (completed as f64 / window * 10.0).round() / 10.0 } else { 0.0 },
            p50_us: latency.as_ref().map(|l| l.p50_us),
            p99_us: latency.as_ref().map(|l| l.p99_us),
            max_us: latency.as_ref().map(|l| l.max_us),
        }
    }

    /// Correct answers over the run.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Errors over the run.
    pub fn errors(&self) -> &ErrorCounts {
        &self.errors
    }

    /// Latency over the run.
    pub fn latency(&self) -> Option<Latency> {
        Latency::of(&self.total)
    }

    /// The first few error messages.
    pub fn samples(&self) -> &[String] {
        &self.samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(at_ms: u64, latency_us: u64) -> Event {
        Event { at: Duration::from_millis(at_ms), outcome: Outcome::Ok(Duration::from_micros(latency_us)) }
    }

    #[test]
    fn percentiles_per_second_and_overall() {
        let mut a = Aggregator::new(2);
        for i in 1..=100 {
            a.add(ok(5 * i, i)); // second 0: 1..=100 µs
        }
        a.add(ok(1500, 5000));
        for _ in 0..2 {
            a.add(Event { at: Duration::from_millis(1600), outcome: Outcome::Error(ErrorKind::Wrong, "bad".into()) });
        }
        let s0 = a.close_next(100.0, 1.0);
        assert_eq!((s0.second, s0.completed, s0.errors), (0, 100, 0));
        assert_eq!(s0.p50_us, Some(50.0));
        assert_eq!(s0.p99_us, Some(99.0));
        assert_eq!(s0.max_us, Some(100.0));
        let s1 = a.close_next(10.0, 0.5);
        assert_eq!((s1.completed, s1.errors, s1.throughput), (1, 2, 2.0));
        assert!(s1.p50_us.is_some_and(|v| (v - 5000.0).abs() < 5.0));
        let total = a.latency().unwrap();
        assert_eq!(total.count, 101);
        assert_eq!(total.p50_us, 51.0);
        assert_eq!(a.errors().wrong, 2);
        assert_eq!(a.samples(), ["bad"], "distinct messages only");
    }

    #[test]
    fn late_events_count_in_the_earliest_open_second() {
        let mut a = Aggregator::new(3);
        a.close_next(1.0, 1.0);
        a.add(ok(500, 10)); // belongs to second 0, already reported
        a.add(ok(9000, 10)); // after the end: the last second
        assert_eq!(a.close_next(1.0, 1.0).completed, 1);
        assert_eq!(a.close_next(1.0, 1.0).completed, 1);
        assert_eq!(a.completed(), 2);
    }

    #[test]
    fn an_empty_second_has_no_percentiles() {
        let mut a = Aggregator::new(1);
        let s = a.close_next(0.0, 1.0);
        assert_eq!((s.completed, s.p50_us, s.p99_us), (0, None, None));
        assert!(a.latency().is_none());
    }
}
