//! `spin N`: N iterations of a two-instruction loop, timed with the TSC. At CPL 3 it runs
//! natively (about a cycle per iteration); at CPL 0 on this machine's KVM it would be emulated
//! and roughly 1000 times slower.

use elastic_rt::prelude::*;
use elastic_rt::println;
use elastic_rt::time::rdtsc;
use hypercall_abi::exit_code;

const NAME: &str = "spin";
const USAGE: &str = "N";

/// The `spin` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "run N iterations of a tight loop and time them",
    main: |env| run_sync(env, main),
};

fn main(env: &Env) -> u32 {
    let n: u64 = match env.args.as_slice() {
        [] => 100_000_000,
        [n] => match n.parse() {
            Ok(n) if n > 0 => n,
            _ => return usage_error(NAME, USAGE, format_args!("'{n}' is not a positive number of iterations")),
        },
        _ => return usage_error(NAME, USAGE, format_args!("takes one argument")),
    };
    let start = rdtsc();
    spin_loop(n);
    let ticks = rdtsc().wrapping_sub(start);
    let ns = time::ticks_to_ns(ticks);
    println!(
        "spin: {n} iterations in {}.{:03} ms ({:.3} ns/iteration, {} TSC ticks)",
        ns / 1_000_000,
        (ns / 1000) % 1000,
        ns as f64 / n as f64,
        ticks
    );
    exit_code::SUCCESS
}

/// `dec; jnz` `n` times.
fn spin_loop(n: u64) {
    // SAFETY: a register-only loop; no memory, no stack, flags clobbered (not preserved).
    unsafe {
        core::arch::asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) n => _, options(nomem, nostack));
    }
}
