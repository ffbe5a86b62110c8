//! `hypervisor-shim`: the command line of the elastic unikernel's VMM ([`elastic_vmm`]) and
//! the tools around it (benchmark, demo, load generator, stress suite, plots, QEMU runner).

mod cli;
mod tools;

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    // Boot time is measured from here.
    let started = Instant::now();
    let started_monotonic_ns = tools::bench::now_monotonic_ns();
    cli::main(started, started_monotonic_ns)
}
