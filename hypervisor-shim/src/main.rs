//! `hypervisor-shim` binary: see the library's `cli` module.

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    // Boot time is measured from here.
    let started = Instant::now();
    hypervisor_shim::cli::main(started)
}
