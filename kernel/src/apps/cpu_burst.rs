//! `cpu-burst [ROUNDS] [SEGMENT]`: CPU-bound prime counting whose parallelism ramps up
//! (1, 2, 4, 8 tasks), holds, and ramps down again. Every stage's total is checked against an
//! independent reference sieve; at the end the service waits for the elastic controller to
//! bring the vCPUs back to min and reports both checks.

use alloc::vec;
use alloc::vec::Vec;
use elastic_rt::prelude::*;
use elastic_rt::println;

use hypercall_abi::exit_code;

const NAME: &str = "cpu-burst";
const USAGE: &str = "[ROUNDS] [SEGMENT]";

/// The `cpu-burst` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "prime counting whose parallelism ramps 1-2-4-8-(hold)-4-2-1; checks results and vCPUs back at min",
    main: |env| boxed(main(env)),
};

/// Tasks per stage: ramp up, hold, ramp down.
const STAGES: [usize; 11] = [1, 2, 4, 8, 8, 8, 8, 8, 4, 2, 1];

/// Counts primes in `[lo, hi)` with a segmented byte sieve.
pub fn count_primes_segment(lo: u64, hi: u64) -> u64 {
    if hi <= 2 || hi <= lo {
        return 0;
    }
    let lo = lo.max(2);
    let root = (hi - 1).isqrt();
    // Base primes up to sqrt(hi) by a small plain sieve.
    let mut small = vec![true; root as usize + 1];
    let mut base = Vec::new();
    for i in 2..=root as usize {
        if small[i] {
            base.push(i as u64);
            let mut j = i * i;
            while j <= root as usize {
                small[j] = false;
                j += i;
            }
        }
    }
    let mut seg = vec![true; (hi - lo) as usize];
    for &p in &base {
        let mut m = (p * p).max(lo.div_ceil(p) * p);
        while m < hi {
            seg[(m - lo) as usize] = false;
            m += p;
        }
    }
    seg.iter().filter(|&&b| b).count() as u64
}

/// Reference: an odd-only bit sieve (a different algorithm from the tasks') returning
/// `pi(k * step)` for `k = 0..=steps`.
pub fn reference_counts(step: u64, steps: usize) -> Vec<u64> {
    let n = step * steps as u64;
    // bit i stands for the odd number 2i+1
    let bits = (n / 2 + 1) as usize;
    let mut composite = vec![0u64; bits / 64 + 1];
    let mut i = 1usize;
    while (2 * i + 1) * (2 * i + 1) < n as usize {
        if composite[i / 64] & (1 << (i % 64)) == 0 {
            let p = 2 * i + 1;
            let mut j = (p * p) / 2;
            while j < bits {
                composite[j / 64] |= 1 << (j % 64);
                j += p;
            }
        }
        i += 1;
    }
    let mut out = vec![0u64; steps + 1];
    let mut count = 0u64;
    let mut k = 1;
    let mut next_edge = step;
    // walk numbers in order; count 2, then odd primes
    for v in 2..n {
        while v >= next_edge && k <= steps {
            out[k] = count;
            k += 1;
            next_edge += step;
        }
        let prime = v == 2 || (v % 2 == 1 && composite[(v / 2) as usize / 64] & (1 << ((v / 2) as usize % 64)) == 0);
        if prime && v > 1 {
            count += 1;
        }
    }
    while k <= steps {
        out[k] = count;
        k += 1;
    }
    out
}

async fn main(env: Env) -> u32 {
    let parse = |i: usize, default: u64| env.args.get(i).map_or(Some(default), |a| a.parse::<u64>().ok());
    let (Some(rounds), Some(segment)) = (parse(0, 5), parse(1, 2_000_000)) else {
        return usage_error(NAME, USAGE, format_args!("ROUNDS and SEGMENT must be positive numbers"));
    };
    if rounds == 0 || !(1000..=50_000_000).contains(&segment) {
        return usage_error(NAME, USAGE, format_args!("ROUNDS must be >= 1 and SEGMENT within 1000..=50000000"));
    }
    let widest = *STAGES.iter().max().unwrap_or(&1);
    let started = time::now_ns();
    let reference = reference_counts(segment, widest);
    println!(
        "cpu-burst: {} stages x {rounds} rounds, {segment} numbers per task; reference sieve in {} ms",
        STAGES.len(),
        (time::now_ns() - started) / 1_000_000
    );
    let (min, _, burst) = vcpus::limits();
    let mut all_ok = true;
    let mut mismatches = 0u64;
    let mut peak = vcpus::online();
    let mut done_tasks = 0u64;
    for (i, &p) in STAGES.iter().enumerate() {
        let stage_start = time::now_ns();
        let mut stage_ok = true;
        for _ in 0..rounds {
            let handles: Vec<_> = (0..p as u64)
                .map(|k| spawn(async move { count_primes_segment(k * segment, (k + 1) * segment) }))
                .collect();
            let mut total = 0;
            for h in handles {
                total += h.await;
                done_tasks += 1;
                report::set_user_figure(done_tasks);
                peak = peak.max(vcpus::online());
            }
            if total != reference[p] {
                stage_ok = false;
                mismatches += 1;
            }
        }
        all_ok &= stage_ok;
        println!(
            "  stage {}/{}: {p} parallel tasks x {rounds}: primes below {} = {} ({}), {} ms, {} vCPU(s) online",
            i + 1,
            STAGES.len(),
            p as u64 * segment,
            reference[p],
            if stage_ok { "ok" } else { "MISMATCH" },
            (time::now_ns() - stage_start) / 1_000_000,
            vcpus::online()
        );
    }
    // Ramp down: idle vCPUs go down after the controller's hysteresis.
    let wait_start = time::now_ns();
    while vcpus::online() > min && time::now_ns() - wait_start < 5_000_000_000 {
        sleep_ms(5).await;
    }
    let back_at_min = vcpus::online() == min;
    let (ups, denials) = vcpus::counters();
    println!(
        "cpu-burst: vCPUs peak {peak} (policy min {min}, burst {burst}), {ups} up(s) by the controller, {denials} DENIED"
    );
    println!(
        "cpu-burst: vCPUs {} at min ({} online) {} ms after the last stage",
        if back_at_min { "back" } else { "NOT back" },
        vcpus::online(),
        (time::now_ns() - wait_start) / 1_000_000
    );
    println!(
        "cpu-burst: result check {} ({} tasks, {} ms)",
        if all_ok { "PASSED" } else { "FAILED" },
        done_tasks,
        (time::now_ns() - started) / 1_000_000
    );
    println!("VERIFY data_errors={}", mismatches);
    if all_ok && back_at_min { exit_code::SUCCESS } else { exit_code::FAILURE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_counts_match_known_values() {
        assert_eq!(count_primes_segment(0, 100), 25);
        assert_eq!(count_primes_segment(0, 1_000_000), 78_498);
        assert_eq!(count_primes_segment(0, 500_000) + count_primes_segment(500_000, 1_000_000), 78_498);
    }

    #[test]
    fn reference_agrees_with_segments() {
        let r = reference_counts(250_000, 4);
        assert_eq!(r[0], 0);
        assert_eq!(r[4], 78_498);
        for k in 1..=4u64 {
            let seg: u64 = (0..k).map(|i| count_primes_segment(i * 250_000, (i + 1) * 250_000)).sum();
            assert_eq!(r[k as usize], seg);
        }
    }
}
