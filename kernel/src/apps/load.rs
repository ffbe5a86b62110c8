//! `load SHAPE [CYCLES] [STEP_MS] [TASKS] [MB]`: a CPU and memory load whose shape is a ramp
//! (parallelism and working set grow to TASKS / MB and shrink again) or a square wave (full
//! load, then idle). Each step builds a checksummed working set of 1 MiB chunks and runs that
//! many tasks that keep re-verifying random chunks for STEP_MS. It is reclaim-aware the way a
//! cache would be: while the host reclaims memory it sizes its working set to fit under the
//! target, and a step running when a memory reclaim arrives ends early so its working set can
//! be freed. Ends with `VERIFY data_errors=N`.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use elastic_rt::prelude::*;
use elastic_rt::println;

use hypercall_abi::exit_code;

use super::mem_wave::{checksum, fill};

const NAME: &str = "load";
const USAGE: &str = "ramp|square [CYCLES] [STEP_MS] [TASKS] [MB]";

/// The `load` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "ramp or square-wave CPU + memory load with a verified working set (stress scenarios)",
    main: |env| boxed(main(env)),
};

const MIB: u64 = 1 << 20;

/// Whether a memory reclaim is in force and the VM is above its target.
fn over_memory_target() -> bool {
    memory::reclaim_target().is_some_and(|t| memory::held() > t)
}

/// Builds up to `mb` checksummed chunks (fewer if memory runs short or a memory reclaim
/// arrives), yielding between chunks so notices are seen promptly.
async fn working_set(mb: u64, seed: u64) -> Vec<(Vec<u8>, u64)> {
    let mut set = Vec::new();
    for i in 0..mb {
        if over_memory_target() {
            break;
        }
        let mut buf: Vec<u8> = Vec::new();
        if buf.try_reserve_exact(MIB as usize).is_err() {
            break;
        }
        buf.resize(MIB as usize, 0);
        let sum = fill(&mut buf, seed ^ (i << 20) ^ 0x51_7cc1_b727_220a);
        set.push((buf, sum));
        yield_now().await;
    }
    set
}

/// Re-verifies random chunks of `set` for `ms`; returns (checks, errors).
async fn churn_task(set: Arc<Vec<(Vec<u8>, u64)>>, ms: u64, seed: u64) -> (u64, u64) {
    let end = time::now_ns() + ms * 1_000_000;
    let (mut checks, mut errors) = (0, 0);
    let mut x = seed | 1;
    while time::now_ns() < end {
        // A memory reclaim is in force and the VM is above its target: end the step early so
        // the working set is freed and the heap can hand the extents back in time.
        if !set.is_empty() && over_memory_target() {
            break;
        }
        if set.is_empty() {
            // CPU-only step: spin in small slices.
            let mut h = x;
            for _ in 0..50_000 {
                h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17);
            }
            x ^= h;
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (buf, sum) = &set[(x % set.len() as u64) as usize];
            checks += 1;
            if checksum(buf) != *sum {
                errors += 1;
            }
        }
        yield_now().await;
    }
    (checks, errors)
}

async fn main(env: Env) -> u32 {
    let shape = env.args.first().map(|s| s.as_str()).unwrap_or("ramp");
    let arg = |i: usize, d: u64| env.args.get(i).map_or(Some(d), |a| a.parse::<u64>().ok());
    let (Some(cycles), Some(step_ms), Some(tasks), Some(mb)) = (arg(1, 2), arg(2, 150), arg(3, 8), arg(4, 128)) else {
        return usage_error(NAME, USAGE, format_args!("numbers expected after the shape"));
    };
    let steps: &[(u64, u64)] = match shape {
        // (tasks, MB) per step, in eighths of the maxima.
        "ramp" => &[(1, 1), (2, 2), (4, 4), (8, 8), (8, 8), (4, 4), (2, 2), (1, 1)],
        "square" => &[(8, 8), (0, 0)],
        _ => return usage_error(NAME, USAGE, format_args!("unknown shape '{shape}'")),
    };
    if cycles == 0 || step_ms == 0 || tasks == 0 || tasks > 64 {
        return usage_error(NAME, USAGE, format_args!("CYCLES, STEP_MS >= 1 and TASKS within 1..=64"));
    }
    let started = time::now_ns();
    let checks = Arc::new(AtomicU64::new(0));
    let mut errors = 0u64;
    let mut shortfall = 0u64;
    let mut peak_mb = 0u64;
    let mut step_no = 0u64;
    for cycle in 0..cycles {
        for &(t8, m8) in steps {
            step_no += 1;
            let p = (tasks * t8).div_ceil(8);
            if p == 0 {
                sleep_ms(step_ms).await;
                continue;
            }
            let mut want = (mb * m8).div_ceil(8);
            if let Some(target) = memory::reclaim_target() {
                // Cooperate with a memory reclaim: fit the working set under the target.
                want = want.min(target.saturating_sub(memory::boot_ram()) / MIB * 3 / 4);
            }
            let set = working_set(want, (cycle << 32) ^ step_no).await;
            shortfall += want - set.len() as u64;
            peak_mb = peak_mb.max(set.len() as u64);
            let set = Arc::new(set);
            let handles: Vec<_> = (0..p)
                .map(|i| spawn(churn_task(Arc::clone(&set), step_ms, (step_no << 8) ^ i ^ 0x2545_f491)))
                .collect();
            for h in handles {
                let (c, e) = h.await;
                checks.fetch_add(c, Ordering::Relaxed);
                errors += e;
            }
            errors += set.iter().filter(|(b, s)| checksum(b) != *s).count() as u64;
            report::set_user_figure(step_no);
        }
        println!(
            "load: {shape} cycle {}/{cycles} done, {} vCPU(s) online, {} MiB held",
            cycle + 1,
            vcpus::online(),
            memory::held() / MIB
        );
    }
    println!(
        "load: {step_no} steps in {} ms, {} chunk checks, working set peak {peak_mb} MiB ({shortfall} MiB not allocated), {errors} data errors",
        (time::now_ns() - started) / 1_000_000,
        checks.load(Ordering::Relaxed)
    );
    println!("VERIFY data_errors={errors}");
    if errors == 0 { exit_code::SUCCESS } else { exit_code::FAILURE }
}
