//! The command line: `run` (default), `pool`, `stress`, `qemu`, `bench`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

mod args;
pub(crate) mod ctl;
pub(crate) mod pool_config;

use args::{
    BUILT_KERNEL, BenchArgs, Cli, Command, DemoArgs, KernelArgs, PoolArgs, QemuArgs, ReceiveArgs, RestartMode,
    RestoreArgs, ResumeArgs, RunArgs, StressArgs, TlsCertsArgs, default_kernel, kernel_path,
};

use crate::tools::bench;
use crate::tools::plot::{self, PlotVm};
use crate::tools::qemu::{self, QemuConfig};
use elastic_vmm::{
    Capacity, ConsoleMode, DEFAULT_IDLE_SHUTDOWN, KernelImage, PolicyConfig, ResumeOptions, RunOptions, RunResult,
    RunSpec, TimelineOptions, VmConfig, VmSpec, Wake, exit,
};

/// Checks every output path a command names before any work starts.
fn check_outputs(outputs: &[(&str, &Option<PathBuf>)]) -> Result<(), elastic_vmm::ConfigError> {
    for (flag, path) in outputs {
        if let Some(p) = path {
            elastic_vmm::check_output_path(flag, p)?;
        }
    }
    Ok(())
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eline!("hypervisor-shim: {message}");
    ExitCode::from(code)
}

/// How long the end of the process waits for stderr's buffered lines to be read.
const STDERR_DRAIN: Duration = Duration::from_millis(500);

/// Parses the command line and runs it; returns the process exit code. `started` and
/// `started_monotonic_ns` are taken at the top of `main`.
///
/// A closed or unread stdout or stderr never changes the exit code: SIGPIPE is ignored, no
/// write to either panics, and stderr's lines go through a bounded buffer that the end of the
/// process waits for at most [`STDERR_DRAIN`].
pub fn main(started: Instant, started_monotonic_ns: u64) -> ExitCode {
    // SAFETY: setting SIGPIPE's disposition to "ignore" has no preconditions; a write to a
    // closed pipe then fails with EPIPE, which every writer here handles.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    elastic_vmm::start_diagnostics();
    let code = dispatch(started, started_monotonic_ns);
    elastic_vmm::flush_diagnostics(STDERR_DRAIN);
    code
}

fn dispatch(started: Instant, started_monotonic_ns: u64) -> ExitCode {
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
            return fail(exit::USAGE, format_args!("{} (see --help)", one_line(&e.to_string())));
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
        Some(Command::Kernel(args)) => kernel(&args),
        Some(Command::TlsCerts(args)) => tls_certs(&args),
    }
}

/// A clap error as one line: its first line names the problem; the lines right below it (up
/// to the first blank one) name what it is about, e.g. the required arguments not given.
fn one_line(text: &str) -> String {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("invalid command line").trim_start_matches("error: ").trim_end();
    let more: Vec<&str> = lines.take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
    if more.is_empty() { first.to_string() } else { format!("{first} {}", more.join(", ")) }
}

fn resume_options(args: &ResumeArgs) -> ResumeOptions {
    ResumeOptions {
        timeout: args.timeout,
        publish: args.publish.clone(),
        kernel: args.kernel.clone(),
        api_sock: args.api_sock.clone(),
    }
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
    let tls = args.tls.files().map(|(cert, key, ca)| elastic_vmm::TlsFiles { cert, key, ca });
    if tls.is_some() && !args.listen.starts_with("tcp:") {
        return fail(exit::USAGE, format!("--tls-*: for --listen tcp:ADDR:PORT only (got {})", args.listen));
    }
    match elastic_vmm::receive_spec(&args.listen, tls.as_ref(), &resume_options(&args.resume)) {
        // The run starts once the source was welcomed (it prepares while the memory moves);
        // the VM's restore time and uptime count from the moment its state arrived.
        Ok((vm, welcomed)) => resume_vm(vm, &args.resume, welcomed, started_monotonic_ns),
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
        eline!("hypervisor-shim: {}", d.trim_end());
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
    if (args.on_demand.is_some() || args.idle_shutdown.is_some()) && !endpoints {
        let flag = if args.on_demand.is_some() { "--on-demand" } else { "--idle-shutdown" };
        return fail(exit::USAGE, format_args!("{flag} needs a client endpoint: give --publish or --vsock-uds"));
    }
    if args.idle_shutdown.is_some_and(|d| d.is_zero()) {
        return fail(exit::USAGE, "--idle-shutdown must be longer than 0");
    }
    if args.restart_from.is_some() && args.restart != RestartMode::OnFailure {
        return fail(exit::USAGE, "--restart-from needs --restart on-failure");
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
    config.endpoints.pin_io = args.pin_io;
    config.resources.set_memory_backing(args.memory_backing.into());
    config.lifecycle.timeout = args.guest.timeout;
    config.lifecycle.on_demand = args.on_demand.map(Wake::from);
    config.lifecycle.idle_shutdown = args.idle_shutdown.or(args.on_demand.is_some().then_some(DEFAULT_IDLE_SHUTDOWN));
    config.lifecycle.restart = (args.restart == RestartMode::OnFailure).then(|| elastic_vmm::RestartPolicy {
        limit: args.restart_limit,
        backoff: args.restart_backoff,
        from: args.restart_from.clone(),
    });
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
        eline!("hypervisor-shim: cannot write summary {}: {e}", path.display());
        code = exit::IO_ERROR;
    }
    if let Some(path) = plot
        && let Err(e) = draw(path, result)
    {
        eline!("hypervisor-shim: {e}");
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
    let config = match &args.config {
        Some(path) => match crate::cli::pool_config::load(path, &BUILT_KERNEL) {
            Ok(c) => c,
            Err(e) => return fail(exit::USAGE, e),
        },
        None => crate::cli::pool_config::PoolConfig { capacity: node_capacity(&args), vms: Vec::new() },
    };
    if args.vcpus == Some(0) {
        return fail(exit::USAGE, "--vcpus must be at least 1");
    }
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
    if args.serve {
        eline!(
            "pool: serving {} vCPUs and {} on {} (SIGTERM or Ctrl-C ends it)",
            spec.capacity.vcpus,
            elastic_config::format_size(spec.capacity.memory),
            args.api_sock.as_deref().unwrap_or(std::path::Path::new("")).display()
        );
    }
    let result = if args.serve { elastic_vmm::serve(&spec, started) } else { elastic_vmm::run(&spec, started) };
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
        eline!(
            "pool: {} ({}) exit {code} (expected {}) {mark}; {} reclaim(s), {} violation(s)",
            v.spec.config.name(),
            v.spec.config.guest.app,
            v.spec.expect_exit,
            v.reclaims(),
            v.violations()
        );
        if let Some(d) = v.outcome().diagnosis() {
            eline!("pool: {}: {}", v.spec.config.name(), d.trim_end());
        }
    }
    let code = summary.exit_code();
    let summary = args.summary.as_ref().map(|path| (path, &summary));
    ExitCode::from(write_outputs(code, summary, args.plot.as_deref(), &result))
}

/// A node pool's capacity without a configuration file: `--vcpus` (else the host's CPUs) and
/// `--memory` (else half the host's memory).
fn node_capacity(args: &PoolArgs) -> elastic_vmm::Capacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let half_of_host = || {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(2 << 20);
        (kib << 10) / 2
    };
    elastic_vmm::Capacity { vcpus: args.vcpus.unwrap_or(cpus), memory: args.memory.unwrap_or_else(half_of_host) }
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
            oline!("{name:<18} {about}");
        }
        return ExitCode::SUCCESS;
    }
    let kernel = default_kernel(&args.kernel);
    match crate::tools::stress::run(&args.scenario, args.short, &args.out, &kernel) {
        Ok(reports) => {
            let failed = reports.iter().filter(|r| !r.passed).count();
            eline!(
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
        eline!("  {k:<24} {v:>12.3}");
    }
    eline!("bench: wrote {}", args.out.display());
    ExitCode::SUCCESS
}

/// `kernel`: prints the built-in image's cached path, or copies the image to `--output`.
fn kernel(args: &KernelArgs) -> ExitCode {
    let Some(out) = &args.output else {
        oline!("{}", BUILT_KERNEL.display());
        return ExitCode::SUCCESS;
    };
    let copied = std::fs::copy(&*BUILT_KERNEL, out)
        .and_then(|_| std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o644)));
    match copied {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(elastic_vmm::exit::IO_ERROR, format_args!("--output {}: {e}", out.display())),
    }
}

/// `tls-certs`: writes the CA and the host files, and says which flags use them.
fn tls_certs(args: &TlsCertsArgs) -> ExitCode {
    match crate::tools::certs::make(&args.out, &args.hosts) {
        Ok(made) => {
            let ca = args.out.join("ca.pem");
            for (h, f) in args.hosts.iter().zip(&made) {
                oline!("{h}: --tls-cert {} --tls-key {} --tls-ca {}", f.cert.display(), f.key.display(), ca.display());
            }
            ExitCode::SUCCESS
        }
        Err(e @ crate::tools::certs::CertsError::BadHost(_)) => fail(exit::USAGE, e),
        Err(e) => fail(exit::IO_ERROR, e),
    }
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
                eline!("hypervisor-shim: {d}");
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
    fn a_missing_required_argument_is_named() {
        let cases: [(&[&str], &str); 5] = [
            (&["ctl", "list"], "--api-sock <PATH>"),
            (&["receive"], "--listen <unix:PATH|tcp:ADDR:PORT>"),
            (&["restore"], "<DIR>"),
            (&["pool"], "<CONFIG.toml>"),
            (&["load"], "--"),
        ];
        for (args, name) in cases {
            let e = Cli::try_parse_from(std::iter::once("hypervisor-shim").chain(args.iter().copied())).unwrap_err();
            let line = one_line(&e.to_string());
            assert!(line.starts_with("the following required arguments were not provided: "), "{args:?}: {line}");
            assert!(line.contains(name), "{args:?}: {line}");
        }
        let e = Cli::try_parse_from(["hypervisor-shim", "--restart-limit", "-1"]).unwrap_err();
        assert!(one_line(&e.to_string()).contains("invalid value '-1' for '--restart-limit <N>'"), "{e}");
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
