//! The command line: `run` (default), `pool`, `stress`, `qemu`, `bench`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

pub(crate) mod ctl;
pub(crate) mod pool_config;

use crate::tools::bench;
use crate::tools::plot::{self, PlotVm};
use crate::tools::qemu::{self, Accel, QemuConfig};
use elastic_config::{Policy, parse_credit, parse_duration, parse_memory_policy, parse_size, parse_vcpu_policy};
use elastic_vmm::{
    Capacity, ConsoleMode, DEFAULT_IDLE_SHUTDOWN, KernelImage, OnViolation, PolicyConfig, ResumeOptions, RunOptions,
    RunResult, RunSpec, TimelineOptions, VmConfig, VmSpec, exit,
};

/// The kernel image built together with this shim.
pub const BUILT_KERNEL: &str = elastic_images::KERNEL;

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
74 cannot write an output file, 75 ended for a policy violation (--on-violation kill),
76 timeout, 77 a pool VM or stress scenario did not end as expected, 130 Ctrl-C twice.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot the kernel under this shim on /dev/kvm (the default).
    Run(Box<RunArgs>),
    /// Run several VMs sharing one host pool, as described by a TOML file.
    Pool(PoolArgs),
    /// Run the elasticity stress scenarios and check their invariants.
    Stress(StressArgs),
    /// Boot the same kernel under QEMU (PVH entry, COM1 console, isa-debug-exit).
    Qemu(QemuArgs),
    /// Measure boot time and the elasticity operations; write the medians as JSON.
    Bench(BenchArgs),
    /// The self-driving demo (what a bare `hypervisor-shim` runs): an elastic http service under
    /// a ramp and a spike of real requests; writes demo.svg and demo.json.
    Demo(DemoArgs),
    /// Drive a service over TCP (kv or http), verify every answer, measure latency.
    Load(crate::tools::loadgen::LoadArgs),
    /// Talk to a running shim's control API (`--api-sock`): list, get, metrics, policy,
    /// pause, resume, stop, snapshot, migrate.
    Ctl(crate::cli::ctl::CtlArgs),
    /// Bring back a VM saved with `ctl snapshot` in this process: memory mapped from the
    /// snapshot (read on first touch), vCPUs where they were, published ports listened on
    /// again (open connections are reset).
    Restore(RestoreArgs),
    /// Wait for a VM that another shim migrates here (`ctl migrate --to unix:PATH`), then run
    /// it; its published ports come along.
    Receive(ReceiveArgs),
}

/// Options of a VM that resumes here (`restore`, `receive`).
#[derive(Debug, Args, Clone)]
struct ResumeArgs {
    /// Kernel ELF, for fault diagnoses [default: the path the snapshot names].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Serve the control API on this Unix socket (see `run --api-sock`).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Write a JSON summary of the run to FILE (`restore_us`: start to VM ready).
    #[arg(long, value_name = "FILE")]
    summary: Option<PathBuf>,
    /// Record vCPUs and memory held over time (JSON lines).
    #[arg(long, value_name = "FILE.jsonl")]
    timeline: Option<PathBuf>,
    /// Stop the run after this many seconds (exit code 76).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout, allow_negative_numbers = true)]
    timeout: Option<Duration>,
    /// Run without the seccomp filters (for debugging a refused system call).
    #[arg(long)]
    no_seccomp: bool,
    /// Publish these ports instead of the snapshot's (repeatable; `restore` only).
    #[arg(long, value_name = "[ADDR:]HOST_PORT:GUEST_PORT", value_parser = parse_publish_arg)]
    publish: Vec<elastic_config::Publish>,
}

#[derive(Debug, Args, Clone)]
struct RestoreArgs {
    /// The snapshot directory (`ctl snapshot --to DIR`).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    #[command(flatten)]
    resume: ResumeArgs,
}

#[derive(Debug, Args, Clone)]
struct ReceiveArgs {
    /// Where to wait for the source: unix:PATH (the path must not exist).
    #[arg(long, value_name = "unix:PATH")]
    listen: String,
    #[command(flatten)]
    resume: ResumeArgs,
}

#[derive(Debug, Args, Clone)]
struct DemoArgs {
    /// Peak requests per second of the ramp and the spike [default: 225 per vCPU of the burst
    /// ceiling].
    #[arg(long, value_name = "N", value_parser = parse_rate)]
    rate: Option<f64>,
    /// The VM's vCPU burst ceiling (its policy is 1:min(2,N):N) [default: the CPUs this process
    /// may use, between 2 and 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    burst: Option<u32>,
    /// Directory for demo.svg and demo.json.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out_dir: PathBuf,
    /// Kernel ELF [default: the image built with this shim].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (10.0..=100_000.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a rate between 10 and 100000 requests per second")),
    }
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
    /// Measure only these sections (repeatable): boot, vcpus, memory, services, serving,
    /// lifecycle.
    #[arg(long, value_name = "SECTION", value_parser = clap::builder::PossibleValuesParser::new(bench::SECTIONS))]
    only: Vec<String>,
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
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_log_arg)]
    log: String,
    /// Stop the run after this many seconds (exit code 76).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout, allow_negative_numbers = true)]
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
    /// Kernel option KEY=VALUE (repeatable), e.g. vcpu.up_load=2; unknown keys and bad
    /// values are refused (see README for the list).
    #[arg(long = "guest-opt", value_name = "KEY=VALUE", value_parser = parse_guest_opt_arg)]
    guest_opts: Vec<(String, String)>,
    /// Burst credit cap: vCPU-seconds[:GiB-seconds] (one value sets both).
    #[arg(long, value_name = "VCPU_S[:GIB_S]", default_value = "10", value_parser = parse_credit_arg,
          allow_negative_numbers = true)]
    burst_budget: [f64; 2],
    /// Burst credit refill per second while at or below max: vCPU-seconds[:GiB-seconds].
    #[arg(long, value_name = "VCPU_S[:GIB_S]", default_value = "1", value_parser = parse_credit_arg,
          allow_negative_numbers = true)]
    burst_refill: [f64; 2],
    /// Time a VM has to come down to max after a reclaim notice (e.g. 200ms, 1s).
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration_arg)]
    reclaim_grace: Duration,
    /// What happens when the grace expires: throttle the excess vCPUs and refuse grants above
    /// max, or end the VM (exit code 75).
    #[arg(long, value_enum, default_value = "throttle")]
    on_violation: OnViolationArg,
    /// Draw vCPUs and memory held over time, with the policy lines, reclaims and violations.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Forward TCP connections on a host port to a guest vsock port (repeatable). ADDR defaults
    /// to 127.0.0.1 (loopback only); give 0.0.0.0 to publish on every interface.
    #[arg(long, value_name = "[ADDR:]HOST_PORT:GUEST_PORT", value_parser = parse_publish_arg)]
    publish: Vec<elastic_config::Publish>,
    /// Listen on a Unix socket speaking Firecracker's hybrid-vsock protocol: a client writes
    /// `CONNECT <guest port>\n` and reads `OK <host port>\n` once the guest accepted.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// Scale to zero: hold the published endpoints with no VM; the first client boots the VM
    /// (clients that come meanwhile wait and are served); after --idle-shutdown without a
    /// connection the VM stops and the next client boots it again. Runs until Ctrl-C or
    /// --timeout.
    #[arg(long)]
    on_demand: bool,
    /// Stop the VM after this long with no client connection open (e.g. 1s, 500ms)
    /// [default with --on-demand: 30s]. Without --on-demand the run then ends.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    idle_shutdown: Option<Duration>,
    /// Serve the control API (HTTP/1.1 + JSON, docs/api.yaml) on this Unix socket, for
    /// `hypervisor-shim ctl`: list, live figures, metrics, policy changes, pause/resume, stop.
    /// The VM is named vm0.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Boot the VM again when it fails (a guest fault, unbacked memory, an unserved exit, or an
    /// exit code other than 0 and 5), at most --restart-limit times.
    #[arg(long, value_enum, default_value = "never")]
    restart: RestartMode,
    /// Run without the seccomp filters (for debugging a refused system call; every VM thread
    /// otherwise runs under an allow-list).
    #[arg(long)]
    no_seccomp: bool,
    /// Most restarts with --restart on-failure.
    #[arg(long, value_name = "N", default_value_t = elastic_vmm::DEFAULT_RESTART_LIMIT)]
    restart_limit: u32,
    /// Wait before the first restart (doubling after each, at most 5 s).
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration_arg)]
    restart_backoff: Duration,
}

/// `--on-violation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnViolationArg {
    /// Throttle the excess vCPUs and refuse grants above max (the VM keeps running).
    Throttle,
    /// End the VM (exit code 75).
    Kill,
}

impl From<OnViolationArg> for OnViolation {
    fn from(a: OnViolationArg) -> Self {
        match a {
            OnViolationArg::Throttle => OnViolation::Throttle,
            OnViolationArg::Kill => OnViolation::Kill,
        }
    }
}

/// `--restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RestartMode {
    /// The run ends with the VM.
    Never,
    /// Boot the VM again after a failure.
    OnFailure,
}

#[derive(Debug, Args, Clone)]
struct PoolArgs {
    /// The pool configuration (see README for the format).
    #[arg(value_name = "CONFIG.toml")]
    config: PathBuf,
    /// Write a JSON summary: one entry per VM plus the pool's figures.
    #[arg(long, value_name = "FILE")]
    summary: Option<PathBuf>,
    /// Record every VM's vCPUs and memory over time (JSON lines).
    #[arg(long, value_name = "FILE.jsonl")]
    timeline: Option<PathBuf>,
    /// Draw every VM's vCPUs and memory over time.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Do not print the guests' consoles.
    #[arg(long)]
    quiet: bool,
    /// Serve the control API (HTTP/1.1 + JSON, docs/api.yaml) on this Unix socket, for
    /// `hypervisor-shim ctl`.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Run without the seccomp filters (for debugging a refused system call).
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(Debug, Args, Clone)]
struct StressArgs {
    /// Scenario to run, or `all` (repeatable).
    #[arg(long, value_name = "NAME|all", default_value = "all")]
    scenario: Vec<String>,
    /// Directory for report.json, one SVG per scenario, timelines and guest consoles.
    #[arg(long, value_name = "DIR", default_value = "stress-out")]
    out: PathBuf,
    /// Run the short versions (what the integration tests run).
    #[arg(long)]
    short: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Kernel ELF [default: the image built with this shim].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

fn parse_credit_arg(s: &str) -> Result<[f64; 2], String> {
    parse_credit(s).map_err(|e| e.to_string())
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn parse_guest_opt_arg(s: &str) -> Result<(String, String), String> {
    elastic_vmm::parse_guest_opt(s).map_err(|e| e.to_string())
}

fn parse_publish_arg(s: &str) -> Result<elastic_config::Publish, String> {
    elastic_config::parse_publish(s).map_err(|e| e.to_string())
}

fn parse_log_arg(s: &str) -> Result<String, String> {
    elastic_vmm::parse_log_level(s).map_err(|e| e.to_string())
}

/// Checks every output path a command names before any work starts.
fn check_outputs(outputs: &[(&str, &Option<PathBuf>)]) -> Result<(), elastic_vmm::ConfigError> {
    for (flag, path) in outputs {
        if let Some(p) = path {
            elastic_vmm::check_output_path(flag, p)?;
        }
    }
    Ok(())
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
    // No arguments at all (a bare `cargo run`): the demo.
    if std::env::args_os().len() == 1 {
        return run_demo(DemoArgs { rate: None, burst: None, out_dir: PathBuf::from("."), kernel: None });
    }
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
        Some(Command::Run(args)) => run(*args, started, started_monotonic_ns),
        None => run(cli.run, started, started_monotonic_ns),
        Some(Command::Pool(args)) => run_pool(args, started, started_monotonic_ns),
        Some(Command::Stress(args)) => run_stress(args),
        Some(Command::Qemu(args)) => run_qemu(args),
        Some(Command::Bench(args)) => run_bench(args),
        Some(Command::Demo(args)) => run_demo(args),
        Some(Command::Load(args)) => crate::tools::loadgen::command(&args),
        Some(Command::Ctl(args)) => ExitCode::from(crate::cli::ctl::command(&args)),
        Some(Command::Restore(args)) => restore(args, started, started_monotonic_ns),
        Some(Command::Receive(args)) => receive(args, started_monotonic_ns),
    }
}

fn resume_options(args: &ResumeArgs) -> ResumeOptions {
    ResumeOptions { timeout: args.timeout, publish: args.publish.clone(), kernel: args.kernel.clone() }
}

fn restore(args: RestoreArgs, started: Instant, started_monotonic_ns: u64) -> ExitCode {
    if let Err(e) = check_outputs(&[("--summary", &args.resume.summary), ("--timeline", &args.resume.timeline)]) {
        return fail(exit::USAGE, e);
    }
    match elastic_vmm::restore_spec(&args.dir, &resume_options(&args.resume)) {
        Ok(vm) => resume_vm(vm, &args.resume, started, started_monotonic_ns),
        Err(e) => fail(e.exit_code(), e),
    }
}

fn receive(args: ReceiveArgs, started_monotonic_ns: u64) -> ExitCode {
    if let Err(e) = check_outputs(&[("--summary", &args.resume.summary), ("--timeline", &args.resume.timeline)]) {
        return fail(exit::USAGE, e);
    }
    match elastic_vmm::receive_spec(&args.listen, &resume_options(&args.resume)) {
        // The VM's restore time counts from the moment its state arrived.
        Ok((vm, arrived)) => resume_vm(vm, &args.resume, arrived, started_monotonic_ns),
        Err(e) => fail(e.exit_code(), e),
    }
}

/// Runs a restored or received VM to its end, as `run` does.
fn resume_vm(vm: VmSpec, args: &ResumeArgs, started: Instant, started_monotonic_ns: u64) -> ExitCode {
    let spec = RunSpec {
        vms: vec![vm],
        capacity: Capacity::UNLIMITED,
        options: RunOptions {
            timeline: TimelineOptions { file: args.timeline.clone(), keep: false },
            console: ConsoleMode::Stdout,
            api_sock: args.api_sock.clone(),
            seccomp: !args.no_seccomp,
        },
        on_vm_end: None,
    };
    run_one_vm(&spec, started, started_monotonic_ns, args.summary.as_ref(), None)
}

/// Runs a one-VM spec: prints the diagnosis, writes the outputs asked for, returns the exit code.
fn run_one_vm(
    spec: &RunSpec,
    started: Instant,
    started_monotonic_ns: u64,
    summary: Option<&PathBuf>,
    plot: Option<&std::path::Path>,
) -> ExitCode {
    let result = match elastic_vmm::run(spec, started) {
        Ok(r) => r,
        Err(e) => return fail(e.exit_code(), e),
    };
    let Some(vm) = result.vms().first() else {
        return fail(exit::INTERNAL, "the run produced no result");
    };
    if let Some(d) = vm.outcome().diagnosis() {
        eprintln!("hypervisor-shim: {}", d.trim_end());
    }
    let code = vm.outcome().exit_code();
    let summary = summary.map(|path| (path, vm.summary(started_monotonic_ns)));
    ExitCode::from(write_outputs(code, summary, plot, &result))
}

fn run(args: RunArgs, started: Instant, started_monotonic_ns: u64) -> ExitCode {
    if let Err(e) =
        check_outputs(&[("--summary", &args.summary), ("--timeline", &args.timeline), ("--plot", &args.plot)])
    {
        return fail(exit::USAGE, e);
    }
    let endpoints = !args.publish.is_empty() || args.vsock_uds.is_some();
    if (args.on_demand || args.idle_shutdown.is_some()) && !endpoints {
        let flag = if args.on_demand { "--on-demand" } else { "--idle-shutdown" };
        return fail(exit::USAGE, format_args!("{flag} needs a client endpoint: give --publish or --vsock-uds"));
    }
    if args.idle_shutdown.is_some_and(|d| d.is_zero()) {
        return fail(exit::USAGE, "--idle-shutdown must be longer than 0");
    }
    let mut config = VmConfig::new("vm0", args.guest.app.clone());
    config.guest.args = args.guest.args.clone();
    config.guest.log_level = args.guest.log.clone();
    config.guest.options = args.guest_opts.clone();
    config.resources.vcpus = args.vcpus;
    config.resources.memory = args.memory;
    config.resources.policy = PolicyConfig {
        budget: args.burst_budget,
        refill: args.burst_refill,
        grace: args.reclaim_grace,
        on_violation: args.on_violation.into(),
    };
    config.endpoints.publish = args.publish.clone();
    config.endpoints.vsock_uds = args.vsock_uds.clone();
    config.lifecycle.timeout = args.guest.timeout;
    config.lifecycle.on_demand = args.on_demand;
    config.lifecycle.idle_shutdown = args.idle_shutdown.or(args.on_demand.then_some(DEFAULT_IDLE_SHUTDOWN));
    config.lifecycle.restart = (args.restart == RestartMode::OnFailure)
        .then_some(elastic_vmm::RestartPolicy { limit: args.restart_limit, backoff: args.restart_backoff });
    let spec = RunSpec {
        vms: vec![VmSpec::new(config, kernel_path(&args.guest), 0)],
        capacity: Capacity::UNLIMITED,
        options: RunOptions {
            timeline: TimelineOptions { file: args.timeline.clone(), keep: args.plot.is_some() },
            console: ConsoleMode::Stdout,
            api_sock: args.api_sock.clone(),
            seccomp: !args.no_seccomp,
        },
        on_vm_end: None,
    };
    run_one_vm(&spec, started, started_monotonic_ns, args.summary.as_ref(), args.plot.as_deref())
}

/// Writes the summary and the plot a run asked for; an output that cannot be written turns the
/// exit code into [`exit::IO_ERROR`].
fn write_outputs<S: serde::Serialize>(
    code: u8,
    summary: Option<(&PathBuf, S)>,
    plot: Option<&std::path::Path>,
    result: &RunResult,
) -> u8 {
    let mut code = code;
    if let Some((path, summary)) = summary
        && let Err(e) = elastic_vmm::write_json(&summary, path)
    {
        eprintln!("hypervisor-shim: cannot write summary {}: {e}", path.display());
        code = exit::IO_ERROR;
    }
    if let Some(path) = plot
        && let Err(e) = draw(path, result)
    {
        eprintln!("hypervisor-shim: {e}");
        code = exit::IO_ERROR;
    }
    code
}

/// Draws the run's plot.
fn draw(path: &std::path::Path, result: &RunResult) -> Result<(), plot::PlotError> {
    let vms: Vec<PlotVm> = result.vms().iter().map(|v| PlotVm::of(&v.spec.config)).collect();
    let title = match result.vms() {
        [one] => format!("{} ({})", one.spec.config.name(), one.spec.config.guest.app),
        many => format!("pool of {} VMs", many.len()),
    };
    plot::render(path, &title, &result.timeline_lines(), &vms)
}

fn run_pool(args: PoolArgs, started: Instant, started_monotonic_ns: u64) -> ExitCode {
    if let Err(e) =
        check_outputs(&[("--summary", &args.summary), ("--timeline", &args.timeline), ("--plot", &args.plot)])
    {
        return fail(exit::USAGE, e);
    }
    let config = match crate::cli::pool_config::load(&args.config, std::path::Path::new(BUILT_KERNEL)) {
        Ok(c) => c,
        Err(e) => return fail(exit::USAGE, e),
    };
    let bar = pool_progress_bar(config.vms.len());
    let spec = RunSpec {
        vms: config.vms,
        capacity: config.capacity,
        options: RunOptions {
            timeline: TimelineOptions { file: args.timeline.clone(), keep: args.plot.is_some() },
            console: if args.quiet { ConsoleMode::Capture { echo: false } } else { ConsoleMode::Prefixed },
            api_sock: args.api_sock.clone(),
            seccomp: !args.no_seccomp,
        },
        on_vm_end: bar.clone().map(|b| elastic_vmm::VmEndHook(std::sync::Arc::new(move |_, _| b.inc(1)))),
    };
    let result = elastic_vmm::run(&spec, started);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let result = match result {
        Ok(r) => r,
        Err(e) => return fail(e.exit_code(), e),
    };
    let summary = result.pool_summary(started_monotonic_ns);
    for v in result.vms() {
        let code = v.outcome().exit_code();
        let mark = if v.as_expected() { "ok" } else { "UNEXPECTED" };
        eprintln!(
            "pool: {} ({}) exit {code} (expected {}) {mark}; {} reclaim(s), {} violation(s)",
            v.spec.config.name(),
            v.spec.config.guest.app,
            v.spec.expect_exit,
            v.reclaims(),
            v.violations()
        );
        if let Some(d) = v.outcome().diagnosis() {
            eprintln!("pool: {}: {}", v.spec.config.name(), d.trim_end());
        }
    }
    let code = summary.exit_code();
    let summary = args.summary.as_ref().map(|path| (path, &summary));
    ExitCode::from(write_outputs(code, summary, args.plot.as_deref(), &result))
}

/// A progress bar of finished VMs, on a terminal and for more than one VM.
fn pool_progress_bar(vms: usize) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    (std::io::stderr().is_terminal() && vms > 1).then(|| {
        let b = indicatif::ProgressBar::new(vms as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos}/{len} VMs finished {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    })
}

fn run_stress(args: StressArgs) -> ExitCode {
    if args.list {
        for (name, about) in crate::tools::stress::list() {
            println!("{name:<18} {about}");
        }
        return ExitCode::SUCCESS;
    }
    let kernel = default_kernel(&args.kernel);
    match crate::tools::stress::run(&args.scenario, args.short, &args.out, &kernel) {
        Ok(reports) => {
            let failed = reports.iter().filter(|r| !r.passed).count();
            eprintln!(
                "stress: {} of {} scenario(s) passed; report in {}",
                reports.len() - failed,
                reports.len(),
                args.out.join("report.json").display()
            );
            ExitCode::from(if failed == 0 { 0 } else { exit::RUN_FAILED })
        }
        Err(crate::tools::stress::StressError::Start { scenario, source }) => {
            fail(source.exit_code(), format_args!("scenario '{scenario}' could not start: {source}"))
        }
        Err(e @ crate::tools::stress::StressError::UnknownScenario(_)) => fail(exit::USAGE, e),
        Err(e) => fail(exit::IO_ERROR, e),
    }
}

fn run_demo(args: DemoArgs) -> ExitCode {
    let shim = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(exit::INTERNAL, format_args!("cannot find this program's path: {e}")),
    };
    if !args.out_dir.is_dir() {
        return fail(exit::USAGE, format_args!("--out-dir {}: not a directory", args.out_dir.display()));
    }
    if let Err(e) = elastic_vmm::open_kvm() {
        return fail(e.exit_code(), e);
    }
    let burst = args.burst.unwrap_or_else(crate::tools::demo::default_burst);
    let opts = crate::tools::demo::DemoOptions {
        shim,
        kernel: default_kernel(&args.kernel),
        out_dir: args.out_dir,
        rate: args.rate.unwrap_or_else(|| crate::tools::demo::default_rate(burst)),
        burst,
        quiet: false,
    };
    match crate::tools::demo::run(&opts) {
        Ok(r) => {
            let scaled = r.peak_vcpus > 1 && r.final_vcpus == 1;
            if r.errors == 0 && scaled {
                ExitCode::SUCCESS
            } else {
                fail(
                    exit::RUN_FAILED,
                    format_args!(
                        "the demo did not go as expected ({} errors; vCPUs peak {}, final {})",
                        r.errors, r.peak_vcpus, r.final_vcpus
                    ),
                )
            }
        }
        Err(e) => fail(exit::RUN_FAILED, e),
    }
}

fn run_bench(args: BenchArgs) -> ExitCode {
    if let Err(e) = check_outputs(&[("--out", &Some(args.out.clone()))]) {
        return fail(exit::USAGE, e);
    }
    let shim = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(exit::INTERNAL, format_args!("cannot find this program's path: {e}")),
    };
    let kernel = default_kernel(&args.kernel);
    if let Err(e) = KernelImage::open(&kernel) {
        let err = elastic_vmm::VmError::from(e);
        return fail(err.exit_code(), err);
    }
    if let Err(e) = elastic_vmm::open_kvm() {
        return fail(e.exit_code(), e);
    }
    let opts = bench::BenchOptions { shim, kernel, runs: args.runs as usize, only: args.only.clone() };
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
        assert!(Cli::try_parse_from(["hypervisor-shim", "--burst-budget", "lots"]).is_err());
        assert!(Cli::try_parse_from(["hypervisor-shim", "--reclaim-grace", "soon"]).is_err());
        assert!(Cli::try_parse_from(["hypervisor-shim", "--on-violation", "shrug"]).is_err());
    }

    #[test]
    fn policy_flags_parse() {
        let cli = Cli::try_parse_from(["hypervisor-shim", "--burst-budget", "1", "--reclaim-grace", "0.5s"]).unwrap();
        assert_eq!(cli.run.burst_budget, [1.0, 1.0]);
        assert_eq!(cli.run.reclaim_grace, Duration::from_millis(500));
        let cli = Cli::try_parse_from(["hypervisor-shim", "pool", "p.toml", "--quiet"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Pool(ref p)) if p.quiet));
    }
}
