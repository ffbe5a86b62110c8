//! `vcpu-bench [SAMPLES]`: measures, from inside the guest with the TSC, the cost of a no-op
//! hypercall and of a bare exit (the floor), vCPU bring-up on a fresh and on a reused vCPU
//! (request to the new vCPU's first instruction), vCPU down (the call to the host counting
//! the vCPU offline) and kick-to-wake. Prints one `BENCH {json}` line of samples in ns, which
//! `hypervisor-shim bench` collects.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;
use elastic_rt::prelude::*;
use elastic_rt::println;
use elastic_rt::raw::{CPUS, PerCpu, cpu_state as state};
use elastic_rt::time::rdtsc;

use hypercall_abi::exit_code;

const NAME: &str = "vcpu-bench";
const USAGE: &str = "[SAMPLES]";

/// The `vcpu-bench` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "measure hypercall, exit, vCPU up/down and kick latencies (used by `bench`)",
    main: |env| boxed(main(env)),
};

fn ns(ticks: u64) -> u64 {
    time::ticks_to_ns(ticks)
}

fn json_array(out: &mut String, key: &str, v: &[u64]) {
    let _ = write!(out, "\"{key}\":[");
    for (i, x) in v.iter().enumerate() {
        let _ = write!(out, "{}{x}", if i > 0 { "," } else { "" });
    }
    out.push(']');
}

/// Waits (at most 1 s) until `done()` holds. The waiting vCPU BLOCKs for 20 µs between
/// checks instead of spinning: on a 2-core host a spinning requester competes with the very
/// vCPU thread being measured. The samples are TSC stamps taken by the measured vCPU itself,
/// so how promptly the waiter notices does not change them.
fn wait_until(done: impl Fn() -> bool) -> bool {
    let deadline = rdtsc() + time::ns_to_ticks(1_000_000_000);
    while !done() {
        if rdtsc() > deadline {
            return false;
        }
        let _ = raw::block(20_000);
    }
    true
}

/// Waits until `slot` has recorded its first instruction; the time from `t0`, in ns.
fn wait_started(slot: &PerCpu, t0: u64) -> Option<u64> {
    wait_until(|| slot.started_tsc.load(Ordering::Acquire) != 0)
        .then(|| ns(slot.started_tsc.load(Ordering::Acquire).saturating_sub(t0)))
}

/// Brings a vCPU up and measures request -> first instruction.
fn timed_up() -> Option<(u64, &'static PerCpu)> {
    let t0 = rdtsc();
    let (_, slot) = vcpus::up().ok()?;
    wait_started(slot, t0).map(|d| (d, slot))
}

async fn main(env: Env) -> u32 {
    let samples = match env.args.first().map(|a| a.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if (1..=100_000).contains(&n) => n,
        _ => return usage_error(NAME, USAGE, format_args!("SAMPLES must be within 1..=100000")),
    };
    vcpus::set_auto(false);
    let (_, _, burst) = vcpus::limits();
    let (mut rtt, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let t0 = rdtsc();
        let _ = raw::ping();
        let t1 = rdtsc();
        raw::nop_exit();
        let t2 = rdtsc();
        rtt.push(ns(t1 - t0));
        floor.push(ns(t2 - t1));
    }
    // Fresh vCPUs: the host has none parked yet.
    let mut fresh = Vec::new();
    let mut up_slots = Vec::new();
    while vcpus::online() < burst {
        match timed_up() {
            Some((d, slot)) => {
                fresh.push(d);
                up_slots.push(slot);
            }
            None => break,
        }
    }
    sleep_ms(5).await;
    // Kick -> wake of a blocked vCPU.
    let mut kick = Vec::new();
    if let Some(target) = up_slots.first() {
        for _ in 0..samples.min(50) {
            sleep_ms(1).await; // let it block again
            let before = target.woke_tsc.load(Ordering::Acquire);
            let t0 = rdtsc();
            let _ = raw::kick(target.vcpu_id.load(Ordering::Acquire));
            if wait_until(|| target.woke_tsc.load(Ordering::Acquire) != before) {
                kick.push(ns(target.woke_tsc.load(Ordering::Acquire).saturating_sub(t0)));
            }
        }
    }
    // Down (call -> host counts it offline) and reused up.
    let (mut down, mut reused) = (Vec::new(), Vec::new());
    for _ in 0..samples.min(30) {
        let Some(victim) = CPUS.iter().skip(1).find(|s| s.state() == state::IDLE) else { break };
        let host_before = vcpus::host_online_vcpus();
        victim.down_requested.store(true, Ordering::Release);
        let _ = raw::kick(victim.vcpu_id.load(Ordering::Acquire));
        // The host counts the vCPU offline in the notice page while serving VCPU_DOWN; the
        // sample runs from the victim's own TSC stamp right before its call to the moment the
        // waiter sees the new count (an upper bound: it includes the waiter's polling delay).
        if !wait_until(|| vcpus::host_online_vcpus() < host_before) {
            break;
        }
        down.push(ns(rdtsc().saturating_sub(victim.down_tsc.load(Ordering::Acquire))));
        sleep_ms(1).await;
        match timed_up() {
            Some((d, _)) => reused.push(d),
            None => break,
        }
        sleep_ms(2).await;
    }
    let mut out = String::from("BENCH {");
    json_array(&mut out, "hypercall_rtt_ns", &rtt);
    out.push(',');
    json_array(&mut out, "bare_pio_exit_rtt_ns", &floor);
    out.push(',');
    json_array(&mut out, "vcpu_up_fresh_ns", &fresh);
    out.push(',');
    json_array(&mut out, "vcpu_up_reused_ns", &reused);
    out.push(',');
    json_array(&mut out, "vcpu_down_ns", &down);
    out.push(',');
    json_array(&mut out, "kick_wake_ns", &kick);
    out.push('}');
    println!("{out}");
    vcpus::set_auto(true);
    exit_code::SUCCESS
}
