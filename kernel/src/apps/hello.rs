//! `hello`: prints a banner naming the ABI version, the vCPUs and memory the VM was given.

use elastic_rt::prelude::*;
use elastic_rt::println;
use hypercall_abi::{ABI_VERSION, exit_code};

/// The `hello` service.
pub const SERVICE: Service = Service {
    name: "hello",
    usage: "",
    about: "print a banner with the VM's resources and exit",
    main: |env| run_sync(env, main),
};

const MIB: u64 = 1024 * 1024;

fn main(env: &Env) -> u32 {
    let (vcpus, memory) = match &env.hello {
        Some(h) => (h.vcpus, h.memory),
        None => (env.boot.vcpus, env.boot.memory),
    };
    let heap = memory::stats();
    let (khz, source) = time::tsc_khz();
    println!("Hello from the elastic unikernel! (ABI v{ABI_VERSION})");
    println!("  platform : {}", env.platform.describe());
    println!(
        "  vCPUs    : {} online (policy min {} / max {} / burst {})",
        vcpus::online(),
        vcpus.min,
        vcpus.max,
        vcpus.burst
    );
    println!(
        "  memory   : {} MiB held ({} MiB boot), heap {} KiB free of {} KiB (policy min {} / max {} / burst {} MiB)",
        memory::held() / MIB,
        env.boot.ram_size / MIB,
        heap.available / 1024,
        heap.claimed / 1024,
        memory.min / MIB,
        memory.max / MIB,
        memory.burst / MIB
    );
    if source == time::TscSource::Assumed {
        let max = time::hypervisor_max_leaf();
        println!("  TSC      : {khz} kHz ({}; hypervisor CPUID leaves up to {max:#x})", source.describe());
    } else {
        println!("  TSC      : {khz} kHz ({})", source.describe());
    }
    exit_code::SUCCESS
}
