//! `hypervisor-shim` binary: see the library's `cli` module.

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    // Boot time is measured from here.
    let started = Instant::now();
    let started_monotonic_ns = hypervisor_shim::bench::now_monotonic_ns();
    hypervisor_shim::cli::main(started, started_monotonic_ns)
}
