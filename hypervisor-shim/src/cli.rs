//! The command line: `run` (default), `qemu`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::bench;
use crate::config::{Policy, parse_memory_policy, parse_size, parse_vcpu_policy};
use crate::exit;
use crate::loader::KernelImage;
use crate::qemu::{self, Accel, QemuConfig};
use crate::signals;
use crate::summary::Summary;
use crate::timeline::Timeline;
use crate::vm::{Vm, VmConfig, VmError, open_kvm};

/// The kernel image built together with this shim.
pub const BUILT_KERNEL: &str = env!("KERNEL_PATH");

/// Boots the elastic unikernel on KVM and serves its hypercalls.
///
/// With no subcommand, `run` is assumed: `hypervisor-shim --app spin -- 1000` is
/// `hypervisor-shim run --app spin -- 1000`.
#[derive(Debug, Parser)]
#[command(name = "hypervisor-shim", version, args_conflicts_with_subcommands = true, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

const EXIT_CODES: &str = "\
Exit codes: 0-63 are the guest's own shutdown code (0 = success, 1 = service failure,
2 = kernel panic, 3 = out of memory, 4 = bad command line). The shim's own:
64 bad flag or configuration, 65 kernel image refused, 66 kernel image unreadable,
69 /dev/kvm or QEMU unavailable, 70 internal error, 71 guest CPU exception,
72 guest touched unbacked memory, 73 guest exit the shim does not serve,
74 cannot write an output file, 76 timeout.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot the kernel under this shim on /dev/kvm (the default).
    Run(RunArgs),
    /// Boot the same kernel under QEMU (PVH entry, COM1 console, isa-debug-exit).
    Qemu(QemuArgs),
    /// Measure boot time and the elasticity operations; write the medians as JSON.
    Bench(BenchArgs),
}

#[derive(Debug, Args, Clone)]
struct BenchArgs {
    /// Where to write the JSON results.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Repetitions per figure (medians are reported).
    #[arg(long, value_name = "N", default_value = "20", value_parser = clap::value_parser!(u32).range(1..=10000))]
    runs: u32,
    /// Kernel ELF to measure [default: the image built with this shim].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

/// Options shared by every way of booting a kernel.
#[derive(Debug, Args, Clone)]
struct GuestArgs {
    /// Kernel ELF to boot [default: the image built with this shim].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Service to start (run `--app help` to list the services in the image).
    #[arg(long, value_name = "NAME", default_value = "hello")]
    app: String,
    /// Guest log level: off, error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log: String,
    /// Stop the run after this many seconds (exit code 76).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<Duration>,
    /// Arguments for the service (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(Debug, Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// vCPU policy MIN:MAX:BURST: MIN started at boot, MAX sustained, BURST the temporary
    /// ceiling.
    #[arg(long, value_name = "MIN:MAX:BURST", default_value = "1:1:1", value_parser = parse_vcpu_policy)]
    vcpus: Policy,
    /// Memory policy MIN:MAX:BURST in bytes with K/M/G suffixes; MIN is boot memory.
    #[arg(long, value_name = "MIN:MAX:BURST", default_value = "64M:64M:64M", value_parser = parse_memory_policy)]
    memory: Policy,
    /// Write a JSON summary of the run to FILE.
    #[arg(long, value_name = "FILE")]
    summary: Option<PathBuf>,
    /// Record vCPUs and memory held over time, one JSON line per change and per REPORT.
    #[arg(long, value_name = "FILE.jsonl")]
    timeline: Option<PathBuf>,
    /// Extra kernel option KEY=VALUE (repeatable), e.g. vcpu.up_load=2 (see README).
    #[arg(long = "guest-opt", value_name = "KEY=VALUE", value_parser = parse_guest_opt)]
    guest_opts: Vec<(String, String)>,
}

fn parse_guest_opt(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v))
            if !k.is_empty()
                && !v.is_empty()
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
                && k != "app" =>
        {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("'{s}' is not KEY=VALUE without spaces (and 'app' is set with --app)")),
    }
}

#[derive(Debug, Args, Clone)]
struct QemuArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Guest RAM.
    #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = parse_qemu_memory)]
    memory: u64,
    /// QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Accelerator: auto picks KVM when /dev/kvm can be opened, TCG otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    accel: Accel,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

fn parse_qemu_memory(s: &str) -> Result<u64, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    if v < 16 << 20 || v % (1 << 20) != 0 {
        return Err(format!("'{s}' must be a whole number of MiB, at least 16M"));
    }
    Ok(v)
}

fn kernel_path(guest: &GuestArgs) -> PathBuf {
    default_kernel(&guest.kernel)
}

fn default_kernel(given: &Option<PathBuf>) -> PathBuf {
    given.clone().unwrap_or_else(|| PathBuf::from(BUILT_KERNEL))
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("hypervisor-shim: {message}");
    ExitCode::from(code)
}

/// Parses the command line and runs it; returns the process exit code. `started` and
/// `started_monotonic_ns` are taken at the top of `main`.
pub fn main(started: Instant, started_monotonic_ns: u64) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line names the problem.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid command line").trim_start_matches("error: ");
            return fail(exit::USAGE, format_args!("{first} (see --help)"));
        }
    };
    match cli.command {
        Some(Command::Run(args)) => run(args, started, started_monotonic_ns),
        None => run(cli.run, started, started_monotonic_ns),
        Some(Command::Qemu(args)) => run_qemu(args),
        Some(Command::Bench(args)) => run_bench(args),
    }
}

fn run(args: RunArgs, started: Instant, started_monotonic_ns: u64) -> ExitCode {
    let config = VmConfig {
        name: "vm0".into(),
        guest_opts: args.guest_opts.clone(),
        app: args.guest.app.clone(),
        app_args: args.guest.args.clone(),
        log_level: args.guest.log.clone(),
        vcpus: args.vcpus,
        memory: args.memory,
        timeout: args.guest.timeout,
    };
    // Refuse a bad image before touching KVM at all.
    let image = match KernelImage::open(&kernel_path(&args.guest)) {
        Ok(i) => Arc::new(i),
        Err(e) => {
            let err = VmError::from(e);
            return fail(err.exit_code(), err);
        }
    };
    let kvm = match open_kvm() {
        Ok(k) => k,
        Err(e) => return fail(e.exit_code(), e),
    };
    let timeline = match Timeline::new(started, args.timeline.as_deref()) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            let path = args.timeline.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
            return fail(exit::IO_ERROR, format_args!("cannot create timeline {path}: {e}"));
        }
    };
    signals::install();
    let vm = match Vm::create(&config, image, &kvm, started, Arc::clone(&timeline)) {
        Ok(vm) => vm,
        Err(e) => return fail(e.exit_code(), e),
    };
    let report = vm.run();
    if let Some(d) = report.outcome.diagnosis() {
        eprintln!("hypervisor-shim: {}", d.trim_end());
    }
    let mut code = report.outcome.exit_code();
    if let Err(e) = timeline.flush() {
        eprintln!("hypervisor-shim: cannot write the timeline: {e}");
        code = exit::IO_ERROR;
    }
    if let Some(path) = &args.summary {
        let summary = Summary::new(&report, &config.app, config.vcpus, config.memory, started_monotonic_ns);
        if let Err(e) = summary.write(path) {
            eprintln!("hypervisor-shim: cannot write summary {}: {e}", path.display());
            code = exit::IO_ERROR;
        }
    }
    ExitCode::from(code)
}

fn run_bench(args: BenchArgs) -> ExitCode {
    let shim = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(exit::INTERNAL, format_args!("cannot find this program's path: {e}")),
    };
    let kernel = default_kernel(&args.kernel);
    if let Err(e) = KernelImage::open(&kernel) {
        let err = VmError::from(e);
        return fail(err.exit_code(), err);
    }
    if let Err(e) = open_kvm() {
        return fail(e.exit_code(), e);
    }
    let opts = bench::BenchOptions { shim, kernel, runs: args.runs as usize };
    let report = match bench::run(&opts) {
        Ok(r) => r,
        Err(e) => return fail(exit::INTERNAL, e),
    };
    if let Err(e) = bench::write(&report, &args.out) {
        return fail(exit::IO_ERROR, e);
    }
    for (k, v) in &report.figures {
        eprintln!("  {k:<24} {v:>12.3}");
    }
    eprintln!("bench: wrote {}", args.out.display());
    ExitCode::SUCCESS
}

fn run_qemu(args: QemuArgs) -> ExitCode {
    let config = QemuConfig {
        kernel: kernel_path(&args.guest),
        qemu: args.qemu,
        accel: args.accel,
        memory: args.memory,
        app: args.guest.app,
        app_args: args.guest.args,
        log_level: args.guest.log,
        timeout: args.guest.timeout,
    };
    match qemu::run(&config) {
        Ok(outcome) => {
            if let Some(d) = &outcome.diagnosis {
                eprintln!("hypervisor-shim: {d}");
            }
            ExitCode::from(outcome.exit_code)
        }
        Err(e) => fail(e.exit_code(), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_is_the_default_subcommand() {
        let cli = Cli::try_parse_from(["hypervisor-shim", "--app", "spin", "--", "10"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.guest.app, "spin");
        assert_eq!(cli.run.guest.args, ["10"]);
        let cli = Cli::try_parse_from(["hypervisor-shim", "run", "--vcpus", "1:2:4"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Run(ref r)) if r.vcpus.burst == 4));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(Cli::try_parse_from(["hypervisor-shim", "--vcpus", "4:1:1"]).is_err());
        assert!(Cli::try_parse_from(["hypervisor-shim", "--memory", "3M"]).is_err());
        assert!(Cli::try_parse_from(["hypervisor-shim", "--timeout", "-1"]).is_err());
        assert!(Cli::try_parse_from(["hypervisor-shim", "qemu", "--memory", "1M"]).is_err());
    }
}
