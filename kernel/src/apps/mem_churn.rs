//! `mem-churn [CYCLES] [TASKS]`: many concurrent grant/release cycles from several tasks (so
//! several vCPUs) with data verification. Half the tasks grant and release raw extents
//! directly, writing and checking a pattern in every page; the other half allocate large
//! buffers through the heap (which grows and releases extents underneath) and keep a few
//! alive across cycles, checking them before they are freed. Any memory released under live
//! data, or granted twice, shows up as a checksum error.

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use elastic_rt::prelude::*;
use elastic_rt::println;

use hypercall_abi::{Extent, Status, exit_code};

use super::mem_wave::{checksum, fill};

const NAME: &str = "mem-churn";
const USAGE: &str = "[CYCLES] [TASKS]";

/// The `mem-churn` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "concurrent grant/release cycles from several vCPUs with data verification",
    main: |env| boxed(main(env)),
};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

#[derive(Default)]
struct Tally {
    cycles: AtomicU64,
    errors: AtomicU64,
    denied: AtomicU64,
}

fn page_value(e: &Extent, page: u64, round: u64) -> u64 {
    (e.base + page * PAGE) ^ (round << 48) ^ 0x5bd1_e995
}

/// Raw path: grant, write one word per page, yield, verify, release.
async fn raw_task(id: u64, cycles: u64, t: Arc<Tally>) {
    let mut x = id.wrapping_mul(0x9e37_79b9) | 1;
    for round in 0..cycles {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = (2 + x % 4) * 2 * MIB; // 4..10 MiB
        let mut ext = [Extent::default(); 8];
        let n = match memory::grant_raw(bytes, &mut ext) {
            Ok(n) => n,
            Err(Status::DENIED | Status::EXHAUSTED | Status::AGAIN) => {
                t.denied.fetch_add(1, Ordering::Relaxed);
                sleep_ms(1).await;
                continue;
            }
            Err(_) => {
                t.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        for e in &ext[..n] {
            for p in 0..e.len / PAGE {
                let a = (e.base + p * PAGE) as *mut u64;
                // SAFETY: the host just granted this extent to this task alone; the window is
                // identity-mapped, so the address is usable as is.
                unsafe { a.write_volatile(page_value(e, p, round)) };
            }
        }
        yield_now().await;
        for e in &ext[..n] {
            for p in 0..e.len / PAGE {
                let a = (e.base + p * PAGE) as *const u64;
                // SAFETY: still granted to this task (released below).
                if unsafe { a.read_volatile() } != page_value(e, p, round) {
                    t.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if memory::release_raw(&ext[..n]) != Status::OK {
            t.errors.fetch_add(1, Ordering::Relaxed);
        }
        t.cycles.fetch_add(1, Ordering::Relaxed);
        yield_now().await;
    }
}

/// Heap path: large buffers (the heap grants extents for them), a few kept alive across
/// cycles and checked before they are dropped.
async fn heap_task(id: u64, cycles: u64, t: Arc<Tally>) {
    let mut live: VecDeque<(Vec<u8>, u64)> = VecDeque::new();
    for round in 0..cycles {
        let size = ((1 + (id + round) % 4) * MIB) as usize;
        let mut buf = alloc::vec![0u8; size];
        let sum = fill(&mut buf, (id << 40) ^ round);
        live.push_back((buf, sum));
        if live.len() > 3
            && let Some((old, s)) = live.pop_front()
            && checksum(&old) != s
        {
            t.errors.fetch_add(1, Ordering::Relaxed);
        }
        t.cycles.fetch_add(1, Ordering::Relaxed);
        yield_now().await;
    }
    for (b, s) in live {
        if checksum(&b) != s {
            t.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn main(env: Env) -> u32 {
    let arg = |i: usize, d: u64| env.args.get(i).map_or(Some(d), |a| a.parse::<u64>().ok());
    let (Some(cycles), Some(tasks)) = (arg(0, 200), arg(1, 4)) else {
        return usage_error(NAME, USAGE, format_args!("CYCLES and TASKS must be whole numbers"));
    };
    if cycles == 0 || !(1..=32).contains(&tasks) {
        return usage_error(NAME, USAGE, format_args!("CYCLES must be >= 1 and TASKS within 1..=32"));
    }
    if memory::window_size() == 0 {
        println!(
            "mem-churn: the VM has no hot-plug window (memory burst == min); give it one, e.g. --memory 64M:256M:512M"
        );
        return exit_code::BAD_COMMAND_LINE;
    }
    let min = memory::boot_ram();
    let tally = Arc::new(Tally::default());
    let started = time::now_ns();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let t = tally.clone();
            if i % 2 == 0 { spawn(raw_task(i, cycles, t)) } else { spawn(heap_task(i, cycles, t)) }
        })
        .collect();
    let mut peak_vcpus = vcpus::online();
    for h in handles {
        peak_vcpus = peak_vcpus.max(vcpus::online());
        h.await;
    }
    let churn_ms = (time::now_ns() - started) / 1_000_000;
    let wait = time::now_ns();
    while memory::held() > min && time::now_ns() - wait < 5_000_000_000 {
        sleep_ms(5).await;
    }
    let (grants, releases) = memory::counters();
    let errors = tally.errors.load(Ordering::Relaxed);
    let back = memory::held() == min;
    println!(
        "mem-churn: {} cycles on {tasks} tasks in {churn_ms} ms ({grants} grants, {releases} releases, {} DENIED, up to {peak_vcpus} vCPUs)",
        tally.cycles.load(Ordering::Relaxed),
        tally.denied.load(Ordering::Relaxed)
    );
    println!(
        "mem-churn: checksum errors: {errors}; memory {} at min ({} MiB held)",
        if back { "back" } else { "NOT back" },
        memory::held() / MIB
    );
    println!("VERIFY data_errors={errors}");
    let ok = errors == 0 && back;
    println!("mem-churn: {}", if ok { "PASSED" } else { "FAILED" });
    if ok { exit_code::SUCCESS } else { exit_code::FAILURE }
}
