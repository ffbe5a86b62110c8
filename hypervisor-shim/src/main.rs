//! `hypervisor-shim`: the command line of the elastic unikernel's VMM ([`elastic_vmm`]) and
//! the tools around it (benchmark, demo, load generator, stress suite, plots, QEMU runner).

/// `eprintln!` that never panics and never waits: the line goes through the shim's bounded
/// stderr buffer (dropped and counted when nobody reads stderr or it is closed). Defined
/// before the modules, so the command line and every tool use it.
macro_rules! eline {
    ($($t:tt)*) => {{
        let _ = elastic_vmm::diag_line(&format!($($t)*));
    }};
}
/// `println!` that never panics: a failed write (a closed stdout) is ignored.
macro_rules! oline {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod cli;
mod tools;

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    // Boot time is measured from here.
    let started = Instant::now();
    abort_on_panic();
    let started_monotonic_ns = tools::bench::now_monotonic_ns();
    cli::main(started, started_monotonic_ns)
}

/// A panic ends the process at once, after its message: no thread goes on beside a VM left
/// half-changed. (The release profile unwinds so that tests and binaries share one build.)
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}
