//! `mem-bench [ROUNDS]`: measures, from inside the guest with the TSC, MEM_GRANT of 2 MiB,
//! 64 MiB and 1 GiB (request to usable, no first touch), the first touch of a fresh 1 GiB
//! (one write per 4 KiB page) and MEM_RELEASE of 1 GiB. Prints one `BENCH {json}` line of
//! samples in ns, which `hypervisor-shim bench` collects. Needs a window of at least 1 GiB.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use elastic_rt::prelude::*;
use elastic_rt::println;
use elastic_rt::time::rdtsc;

use hypercall_abi::{Extent, exit_code};

const NAME: &str = "mem-bench";
const USAGE: &str = "[ROUNDS]";

/// The `mem-bench` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "measure memory grant, first touch and release latencies (used by `bench`)",
    main: |env| boxed(main(env)),
};

const GIB: u64 = 1 << 30;

fn json_array(out: &mut String, key: &str, v: &[u64]) {
    let _ = write!(out, "\"{key}\":[");
    for (i, x) in v.iter().enumerate() {
        let _ = write!(out, "{}{x}", if i > 0 { "," } else { "" });
    }
    out.push(']');
}

/// Grants `bytes` and returns (ns, extents).
fn timed_grant(bytes: u64) -> Option<(u64, Vec<Extent>)> {
    let mut ext = [Extent::default(); 8];
    let t0 = rdtsc();
    let n = memory::grant_raw(bytes, &mut ext).ok()?;
    let ns = time::ticks_to_ns(rdtsc() - t0);
    (ext[..n].iter().map(|e| e.len).sum::<u64>() == bytes).then(|| (ns, ext[..n].to_vec()))
}

async fn main(env: Env) -> u32 {
    let rounds = match env.args.first().map(|a| a.parse::<usize>()) {
        None => 5,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        _ => return usage_error(NAME, USAGE, format_args!("ROUNDS must be within 1..=1000")),
    };
    if memory::window_size() < GIB {
        println!("mem-bench: needs a hot-plug window of at least 1 GiB, e.g. --memory 64M:2G:2G");
        return exit_code::BAD_COMMAND_LINE;
    }
    let mut out = String::from("BENCH {");
    let mut first = true;
    for (key, bytes, reps) in [("mem_grant_2m_ns", 2 << 20, rounds * 4), ("mem_grant_64m_ns", 64 << 20, rounds * 2)] {
        let mut samples = Vec::new();
        for _ in 0..reps {
            let Some((ns, ext)) = timed_grant(bytes) else { break };
            samples.push(ns);
            let _ = memory::release_raw(&ext);
        }
        if !first {
            out.push(',');
        }
        first = false;
        json_array(&mut out, key, &samples);
    }
    let (mut grant, mut touch, mut release) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let Some((ns, ext)) = timed_grant(GIB) else { break };
        grant.push(ns);
        if round < 3 {
            let t0 = rdtsc();
            for e in &ext {
                let mut a = e.base;
                while a < e.end() {
                    // SAFETY: freshly granted to this service; identity-mapped.
                    unsafe { (a as *mut u8).write_volatile(1) };
                    a += 4096;
                }
            }
            touch.push(time::ticks_to_ns(rdtsc() - t0));
        }
        let t0 = rdtsc();
        let _ = memory::release_raw(&ext);
        release.push(time::ticks_to_ns(rdtsc() - t0));
    }
    out.push(',');
    json_array(&mut out, "mem_grant_1g_ns", &grant);
    out.push(',');
    json_array(&mut out, "mem_touch_1g_ns", &touch);
    out.push(',');
    json_array(&mut out, "mem_release_1g_ns", &release);
    out.push('}');
    println!("{out}");
    exit_code::SUCCESS
}
