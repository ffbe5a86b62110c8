//! `GET /work?ms=N`: the work unit the caller repeats, the order it is given, and the reply
//! that reports what was computed.
//!
//! The work is a chain of xorshift64 rounds: each [`work_unit`] takes the previous checksum
//! and returns the next, so the final checksum proves that exactly `units` units were run
//! from `seed` — anyone can check a reply with [`work_units`]`(seed, units)`.

use alloc::format;

use super::request::Persist;
use super::response::{JSON, Reply, Response};

/// xorshift64 rounds in one [`work_unit`] (a few microseconds of CPU).
pub const WORK_UNIT_ROUNDS: u32 = 4096;

/// The seed of the work for `ms` milliseconds (never zero).
fn seed_for(ms: u64) -> u64 {
    0x9E37_79B9_7F4A_7C15 ^ ms
}

/// One unit of CPU-bound work: [`WORK_UNIT_ROUNDS`] rounds of xorshift64 from `x` (a zero
/// `x`, the one fixed point of xorshift, is replaced by a constant). Deterministic.
pub fn work_unit(x: u64) -> u64 {
    let mut x = if x == 0 { 0x2545_F491_4F6C_DD1D } else { x };
    for _ in 0..WORK_UNIT_ROUNDS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

#[cfg_attr(not(test), allow(dead_code))] // part of the core's API; the tests use it
/// `units` work units chained from `seed`: the checksum a `/work` reply must report.
pub fn work_units(seed: u64, units: u64) -> u64 {
    (0..units).fold(seed, |x, _| work_unit(x))
}

/// What the caller did for a [`WorkOrder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkDone {
    /// Work units run.
    pub units: u64,
    /// The last unit's result ([`work_units`]`(order.seed, units)`).
    pub checksum: u64,
    /// Wall time the work took, in microseconds.
    pub elapsed_us: u64,
}

/// A request for CPU-bound work: run [`work_unit`] from `seed`, feeding each result into the
/// next, until `ms` milliseconds have passed (at least one unit), then send
/// [`reply`](Self::reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkOrder {
    /// Milliseconds of work asked for (at most [`MAX_WORK_MS`](super::MAX_WORK_MS)).
    pub ms: u64,
    /// KiB of working set the work should touch (at most [`MAX_WORK_KB`](super::MAX_WORK_KB));
    /// the caller allocates it for the duration of the work.
    pub kb: u64,
    /// The first unit's input.
    pub seed: u64,
    /// The connection closes after the reply.
    pub close: bool,
    head_only: bool,
    persist: Persist,
}

impl WorkOrder {
    pub(super) fn new(ms: u64, kb: u64, head_only: bool, persist: Persist) -> Self {
        WorkOrder { ms, kb, seed: seed_for(ms), close: persist == Persist::Close, head_only, persist }
    }

    #[cfg_attr(not(test), allow(dead_code))] // part of the core's API; the tests use it
    /// Does the work, reading a microsecond clock with `now_us`; at least one unit runs.
    /// (A caller that must yield during long work repeats [`work_unit`] itself instead.)
    pub fn perform(&self, now_us: &mut dyn FnMut() -> u64) -> WorkDone {
        let start = now_us();
        let budget = self.ms.saturating_mul(1000);
        let mut checksum = self.seed;
        let mut units = 0u64;
        loop {
            checksum = work_unit(checksum);
            units += 1;
            let elapsed = now_us().saturating_sub(start);
            if elapsed >= budget {
                return WorkDone { units, checksum, elapsed_us: elapsed };
            }
        }
    }

    /// The `200` reply reporting `done`: JSON with the milliseconds asked for, the units run,
    /// the elapsed microseconds, and the seed and checksum (as hex strings, so that no JSON
    /// reader rounds them).
    pub fn reply(&self, done: &WorkDone) -> Reply {
        let body = format!(
            "{{\"ms\":{},\"units\":{},\"elapsed_us\":{},\"seed\":\"{:#018x}\",\"checksum\":\"{:#018x}\"}}\n",
            self.ms, done.units, done.elapsed_us, self.seed, done.checksum
        );
        let response = Response {
            status: 200,
            content_type: JSON,
            body: body.as_bytes(),
            head_only: self.head_only,
            persist: self.persist,
            allow: None,
        };
        Reply { bytes: response.to_bytes(), status: 200, close: self.close }
    }
}
