//! The command line's flags: every subcommand's arguments (`clap`), and the parsers that turn
//! a flag's text into a value with a one-line error.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use elastic_config::{Policy, parse_credit, parse_duration, parse_memory_policy, parse_size, parse_vcpu_policy};
use elastic_vmm::{OnViolation, Wake};

use crate::tools::bench;
use crate::tools::qemu::Accel;

/// The kernel image built together with this shim: embedded in the binary and written to a
/// per-user cache file on first use (`elastic_images::builtin`); exits 66 when it cannot be.
pub(super) static BUILT_KERNEL: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(|| {
    elastic_images::builtin::kernel_file().unwrap_or_else(|e| {
        eline!("hypervisor-shim: the built-in kernel image is unavailable ({e}); give one with --kernel PATH");
        // The line goes through the stderr buffer: let it out before the process ends.
        elastic_vmm::flush_diagnostics(super::STDERR_DRAIN);
        std::process::exit(elastic_vmm::exit::NO_INPUT.into())
    })
});

/// Boots the elastic unikernel on KVM and serves its hypercalls.
///
/// With no arguments at all, `hypervisor-shim` runs the self-driving demo (`demo`). With flags
/// but no subcommand, `run` is assumed: `hypervisor-shim --app spin -- 1000` is
/// `hypervisor-shim run --app spin -- 1000`.
#[derive(Debug, Parser)]
#[command(name = "hypervisor-shim", version, args_conflicts_with_subcommands = true, after_help = EXIT_CODES)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) command: Option<Command>,
    #[command(flatten)]
    pub(super) run: RunArgs,
}

pub(super) const EXIT_CODES: &str = "\
Exit codes: 0-63 are the guest's own shutdown code (0 = success, 1 = service failure,
2 = kernel panic, 3 = out of memory, 4 = bad command line). The shim's own:
64 bad flag or configuration, 65 kernel image refused, 66 kernel image unreadable or
snapshot directory missing,
69 /dev/kvm or QEMU unavailable, 70 internal error, 71 guest CPU exception,
72 guest touched unbacked memory, 73 guest exit the shim does not serve,
74 cannot write an output file, 75 ended for a policy violation (--on-violation kill),
76 timeout, 77 a pool VM or stress scenario did not end as expected, 130 Ctrl-C twice, or once
when the guest has not stopped 500 ms later (once while `receive` waits), 137 a node pool's VM
killed through its control API (its exit code on `GET /api/v1/vms/NAME/wait`). A closed or unread stdout/stderr never changes the code.";

#[derive(Debug, Subcommand)]
pub(super) enum Command {
    /// Boot the kernel under this shim on /dev/kvm (the default).
    Run(Box<RunArgs>),
    /// Run several VMs sharing one host pool, as described by a TOML file; with `--serve`, a
    /// node pool that also admits VMs through its control API while it runs.
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
    /// it; its published ports come along. While it waits, --timeout (exit 76) and Ctrl-C
    /// (exit 130) end it, --api-sock is served, and the socket file is removed on every exit.
    Receive(ReceiveArgs),
    /// Print the path of the built-in kernel image (written to the per-user cache), or copy it
    /// to a file with --output (a containerd rootfs needs one: `kernel --output rootfs/kernel`).
    Kernel(KernelArgs),
    /// Make a throwaway CA and one certificate and key per host in DIR (ca.pem, HOST.pem,
    /// HOST.key), for trying migration over TCP: each host's certificate names it and serves
    /// both ends of mutual TLS. Existing files are never overwritten (exit 74). Use your own CA
    /// in production.
    TlsCerts(TlsCertsArgs),
}

/// `tls-certs`: a CA and host certificates for TCP migration.
#[derive(Debug, Args, Clone)]
pub(super) struct TlsCertsArgs {
    /// Directory for the files (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(super) out: PathBuf,
    /// A host's address or DNS name, as `ctl migrate --to tcp:HOST:PORT` names it
    /// (repeatable).
    #[arg(long = "host", value_name = "HOST", required = true)]
    pub(super) hosts: Vec<String>,
}

/// `kernel`: where the built-in image is, or a copy of it.
#[derive(Debug, Args, Clone)]
pub(super) struct KernelArgs {
    /// Copy the image to FILE (mode 0644, replaced if it exists) instead of printing its path;
    /// a file that cannot be written exits 74.
    #[arg(long, short, value_name = "FILE")]
    pub(super) output: Option<PathBuf>,
}

/// Options of a VM that resumes here (`restore`, `receive`).
#[derive(Debug, Args, Clone)]
pub(super) struct ResumeArgs {
    /// Kernel ELF, for fault diagnoses [default: the path the snapshot names].
    #[arg(long, value_name = "PATH")]
    pub(super) kernel: Option<PathBuf>,
    /// Serve the control API on this Unix socket (see `run --api-sock`); `receive` serves it
    /// while it waits, too (no VM listed yet).
    #[arg(long, value_name = "PATH")]
    pub(super) api_sock: Option<PathBuf>,
    /// Write a JSON summary of the run to FILE (`restore_us`: start to VM ready).
    #[arg(long, value_name = "FILE")]
    pub(super) summary: Option<PathBuf>,
    /// Record vCPUs and memory held over time (JSON lines).
    #[arg(long, value_name = "FILE.jsonl")]
    pub(super) timeline: Option<PathBuf>,
    /// Stop after this many seconds, counted from the command's start (exit code 76; for
    /// `receive`, the wait for the source counts too).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout, allow_negative_numbers = true)]
    pub(super) timeout: Option<Duration>,
    /// Run without the seccomp filters (for debugging a refused system call).
    #[arg(long)]
    pub(super) no_seccomp: bool,
    /// Publish these ports instead of the saved ones (repeatable; `restore`, and `receive --listen
    /// tcp:`, whose target binds the ports itself: on one host the sockets come from the source).
    #[arg(long, value_name = "[ADDR:]HOST_PORT:GUEST_PORT", value_parser = parse_publish_arg)]
    pub(super) publish: Vec<elastic_config::Publish>,
}

#[derive(Debug, Args, Clone)]
pub(super) struct RestoreArgs {
    /// The snapshot directory (`ctl snapshot --to DIR`); a missing one exits 66.
    #[arg(value_name = "DIR")]
    pub(super) dir: PathBuf,
    #[command(flatten)]
    pub(super) resume: ResumeArgs,
}

#[derive(Debug, Args, Clone)]
pub(super) struct ReceiveArgs {
    /// Where to wait for the source: unix:PATH on this host (the path must not exist), or
    /// tcp:ADDR:PORT from another host (mutual TLS: give --tls-cert, --tls-key and --tls-ca; a
    /// source whose certificate the CA did not sign is turned away and the wait goes on). Over
    /// TCP this shim listens on the VM's published ports itself (or on --publish instead).
    #[arg(long, value_name = "unix:PATH|tcp:ADDR:PORT")]
    pub(super) listen: String,
    #[command(flatten)]
    pub(super) tls: crate::cli::ctl::TlsArgs,
    #[command(flatten)]
    pub(super) resume: ResumeArgs,
}

#[derive(Debug, Args, Clone)]
pub(super) struct DemoArgs {
    /// Peak requests per second of the ramp and the spike [default: 250 per vCPU of the burst
    /// ceiling].
    #[arg(long, value_name = "N", value_parser = parse_rate)]
    pub(super) rate: Option<f64>,
    /// The VM's vCPU burst ceiling (its policy is 1:min(2,N):N) [default: the CPUs this process
    /// may use, between 2 and 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(super) burst: Option<u32>,
    /// Directory for demo.svg and demo.json.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub(super) out_dir: PathBuf,
    /// Kernel ELF [default: the image built with this shim].
    #[arg(long, value_name = "PATH")]
    pub(super) kernel: Option<PathBuf>,
}

pub(super) fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (10.0..=100_000.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a rate between 10 and 100000 requests per second")),
    }
}

#[derive(Debug, Args, Clone)]
pub(super) struct BenchArgs {
    /// Where to write the JSON results.
    #[arg(long, value_name = "FILE")]
    pub(super) out: PathBuf,
    /// Repetitions per figure (medians are reported); the services section runs at most 3
    /// rounds, fewer when this is smaller.
    #[arg(long, value_name = "N", default_value = "20", value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub(super) runs: u32,
    /// Kernel ELF to measure [default: the image built with this shim].
    #[arg(long, value_name = "PATH")]
    pub(super) kernel: Option<PathBuf>,
    /// Measure only these sections (repeatable): boot, vcpus, memory, services, serving,
    /// lifecycle.
    #[arg(long, value_name = "SECTION", value_parser = clap::builder::PossibleValuesParser::new(bench::SECTIONS))]
    pub(super) only: Vec<String>,
}

/// Options shared by every way of booting a kernel.
#[derive(Debug, Args, Clone)]
pub(super) struct GuestArgs {
    /// Kernel ELF to boot [default: the image built with this shim].
    #[arg(long, value_name = "PATH")]
    pub(super) kernel: Option<PathBuf>,
    /// Service to start (run `--app help` to list the services in the image).
    #[arg(long, value_name = "NAME", default_value = "hello")]
    pub(super) app: String,
    /// Guest log level: off, error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_log_arg)]
    pub(super) log: String,
    /// Stop the run after this many seconds (exit code 76).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout, allow_negative_numbers = true)]
    pub(super) timeout: Option<Duration>,
    /// Arguments for the service (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    pub(super) args: Vec<String>,
}

#[derive(Debug, Args, Clone)]
pub(super) struct RunArgs {
    #[command(flatten)]
    pub(super) guest: GuestArgs,
    /// vCPU policy MIN:MAX:BURST: MIN started at boot, MAX sustained, BURST the temporary
    /// ceiling.
    #[arg(long, value_name = "MIN:MAX:BURST", default_value = "1:1:1", value_parser = parse_vcpu_policy)]
    pub(super) vcpus: Policy,
    /// Memory policy MIN:MAX:BURST in bytes with K/M/G suffixes; MIN is boot memory.
    #[arg(long, value_name = "MIN:MAX:BURST", default_value = "64M:64M:64M", value_parser = parse_memory_policy)]
    pub(super) memory: Policy,
    /// Write a JSON summary of the run to FILE.
    #[arg(long, value_name = "FILE")]
    pub(super) summary: Option<PathBuf>,
    /// Record vCPUs and memory held over time, one JSON line per change and per REPORT.
    #[arg(long, value_name = "FILE.jsonl")]
    pub(super) timeline: Option<PathBuf>,
    /// Kernel option KEY=VALUE (repeatable), e.g. vcpu.up_load=2; unknown keys and bad
    /// values are refused (see README for the list).
    #[arg(long = "guest-opt", value_name = "KEY=VALUE", value_parser = parse_guest_opt_arg)]
    pub(super) guest_opts: Vec<(String, String)>,
    /// Burst credit cap: vCPU-seconds[:GiB-seconds] (one value sets both).
    #[arg(long, value_name = "VCPU_S[:GIB_S]", default_value = "10", value_parser = parse_credit_arg,
          allow_negative_numbers = true)]
    pub(super) burst_budget: [f64; 2],
    /// Burst credit refill per second while at or below max: vCPU-seconds[:GiB-seconds].
    #[arg(long, value_name = "VCPU_S[:GIB_S]", default_value = "1", value_parser = parse_credit_arg,
          allow_negative_numbers = true)]
    pub(super) burst_refill: [f64; 2],
    /// Time a VM has to come down to max after a reclaim notice (e.g. 200ms, 1s).
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration_arg)]
    pub(super) reclaim_grace: Duration,
    /// What happens when the grace expires: throttle the excess vCPUs and refuse grants above
    /// max, or end the VM (exit code 75).
    #[arg(long, value_enum, default_value = "throttle")]
    pub(super) on_violation: OnViolationArg,
    /// Draw vCPUs and memory held over time, with the policy lines, reclaims and violations.
    #[arg(long, value_name = "FILE.svg")]
    pub(super) plot: Option<PathBuf>,
    /// Forward TCP connections on a host port to a guest vsock port (repeatable). ADDR defaults
    /// to 127.0.0.1 (loopback only); give 0.0.0.0 to publish on every interface.
    #[arg(long, value_name = "[ADDR:]HOST_PORT:GUEST_PORT", value_parser = parse_publish_arg)]
    pub(super) publish: Vec<elastic_config::Publish>,
    /// Listen on a Unix socket speaking Firecracker's hybrid-vsock protocol: a client writes
    /// `CONNECT <guest port>\n` and reads `OK <host port>\n` once the guest accepted.
    #[arg(long, value_name = "PATH")]
    pub(super) vsock_uds: Option<PathBuf>,
    /// For hosts that run only this VM: pin vCPU 0 and the request channel's I/O thread to two
    /// different CPUs. Off by default, because on a shared host a pinned thread cannot move
    /// off a CPU that another process keeps busy.
    #[arg(long)]
    pub(super) pin_io: bool,
    /// How the host backs guest RAM: anonymous (private memory in transparent huge pages where
    /// the host gives them), or memfd (one memfd per region, mapped shared: `ctl migrate --to
    /// unix:PATH` then hands the memory to the receiving shim by descriptor instead of copying
    /// it, for a live upgrade whose downtime does not grow with memory; 4 KiB host pages unless
    /// the host enables huge pages for shmem).
    #[arg(long, value_enum, value_name = "KIND", default_value = "anonymous")]
    pub(super) memory_backing: MemoryBackingArg,
    /// Scale to zero: hold the published endpoints with no VM; the first client boots the VM
    /// (clients that come meanwhile wait and are served); after --idle-shutdown without a
    /// connection the VM goes to sleep: it is snapshotted (state and the memory it holds) and
    /// ends, and the next client resumes it with what it kept. --on-demand=boot stops it
    /// instead and boots a new one for the next client (state lost). Runs until Ctrl-C or
    /// --timeout.
    #[arg(long, value_name = "WAKE", num_args = 0..=1, require_equals = true, default_missing_value = "resume")]
    pub(super) on_demand: Option<WakeArg>,
    /// Stop the VM after this long with no client connection open (e.g. 1s, 500ms)
    /// [default with --on-demand: 30s]. Without --on-demand the run then ends.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub(super) idle_shutdown: Option<Duration>,
    /// Serve the control API (HTTP/1.1 + JSON, docs/api.yaml) on this Unix socket, for
    /// `hypervisor-shim ctl`: list, live figures, metrics, policy changes, pause/resume, stop.
    /// The VM is named vm0.
    #[arg(long, value_name = "PATH")]
    pub(super) api_sock: Option<PathBuf>,
    /// Boot the VM again when it fails (a guest fault, unbacked memory, an unserved exit, a
    /// policy kill, or a guest exit code other than 0 and 5), at most --restart-limit times.
    #[arg(long, value_enum, default_value = "never")]
    pub(super) restart: RestartMode,
    /// Run without the seccomp filters (for debugging a refused system call; every VM thread
    /// otherwise runs under an allow-list).
    #[arg(long)]
    pub(super) no_seccomp: bool,
    /// Most restarts with --restart on-failure.
    #[arg(long, value_name = "N", default_value_t = elastic_vmm::DEFAULT_RESTART_LIMIT,
          value_parser = parse_restart_limit, allow_negative_numbers = true)]
    pub(super) restart_limit: u32,
    /// Wait before the first restart (doubling after each, at most 5 s).
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration_arg)]
    pub(super) restart_backoff: Duration,
    /// With --restart on-failure: restart the VM from the snapshot in DIR (the last one written
    /// there, e.g. by `ctl snapshot vm0 DIR`) instead of booting it afresh. A snapshot that is
    /// missing or cannot be used is said on stderr and the VM boots.
    #[arg(long, value_name = "DIR")]
    pub(super) restart_from: Option<PathBuf>,
}

/// `--on-violation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum OnViolationArg {
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

/// `--memory-backing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum MemoryBackingArg {
    /// Private anonymous memory.
    Anonymous,
    /// One memfd per region, mapped shared.
    Memfd,
}

impl From<MemoryBackingArg> for elastic_vmm::MemoryBacking {
    fn from(a: MemoryBackingArg) -> Self {
        match a {
            MemoryBackingArg::Anonymous => elastic_vmm::MemoryBacking::Anonymous,
            MemoryBackingArg::Memfd => elastic_vmm::MemoryBacking::Memfd,
        }
    }
}

/// `--on-demand=WAKE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum WakeArg {
    /// Resume the VM from its sleep (the default).
    Resume,
    /// Boot a new VM (state lost).
    Boot,
}

impl From<WakeArg> for Wake {
    fn from(a: WakeArg) -> Self {
        match a {
            WakeArg::Resume => Wake::Resume,
            WakeArg::Boot => Wake::Boot,
        }
    }
}

/// `--restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum RestartMode {
    /// The run ends with the VM.
    Never,
    /// Boot the VM again after a failure.
    OnFailure,
}

#[derive(Debug, Args, Clone)]
pub(super) struct PoolArgs {
    /// The pool configuration (see README for the format); optional with --serve.
    #[arg(value_name = "CONFIG.toml", required_unless_present = "serve")]
    pub(super) config: Option<PathBuf>,
    /// Serve as a node pool: run until SIGTERM or SIGINT, admitting VMs through the control
    /// API (`POST /api/v1/vms`, what containerd-shim-elastic's node pool option uses).
    /// Needs --api-sock.
    #[arg(long, requires = "api_sock")]
    pub(super) serve: bool,
    /// The pool's vCPUs, without CONFIG.toml [default: the host's CPUs].
    #[arg(long, value_name = "N", requires = "serve", conflicts_with = "config")]
    pub(super) vcpus: Option<u64>,
    /// The pool's memory, without CONFIG.toml [default: half the host's memory].
    #[arg(long, value_name = "SIZE", requires = "serve", conflicts_with = "config", value_parser = parse_size_arg)]
    pub(super) memory: Option<u64>,
    /// Write a JSON summary: one entry per VM plus the pool's figures.
    #[arg(long, value_name = "FILE")]
    pub(super) summary: Option<PathBuf>,
    /// Record every VM's vCPUs and memory over time (JSON lines).
    #[arg(long, value_name = "FILE.jsonl")]
    pub(super) timeline: Option<PathBuf>,
    /// Draw every VM's vCPUs and memory over time.
    #[arg(long, value_name = "FILE.svg")]
    pub(super) plot: Option<PathBuf>,
    /// Do not print the guests' consoles.
    #[arg(long)]
    pub(super) quiet: bool,
    /// Serve the control API (HTTP/1.1 + JSON, docs/api.yaml) on this Unix socket, for
    /// `hypervisor-shim ctl`.
    #[arg(long, value_name = "PATH")]
    pub(super) api_sock: Option<PathBuf>,
    /// Run without the seccomp filters (for debugging a refused system call).
    #[arg(long)]
    pub(super) no_seccomp: bool,
}

#[derive(Debug, Args, Clone)]
pub(super) struct StressArgs {
    /// Scenario to run, or `all` (repeatable).
    #[arg(long, value_name = "NAME|all", default_value = "all")]
    pub(super) scenario: Vec<String>,
    /// Directory for report.json, one SVG per scenario, timelines and guest consoles.
    #[arg(long, value_name = "DIR", default_value = "stress-out")]
    pub(super) out: PathBuf,
    /// Run the short versions (what the integration tests run).
    #[arg(long)]
    pub(super) short: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    pub(super) list: bool,
    /// Kernel ELF [default: the image built with this shim].
    #[arg(long, value_name = "PATH")]
    pub(super) kernel: Option<PathBuf>,
}

pub(super) fn parse_credit_arg(s: &str) -> Result<[f64; 2], String> {
    parse_credit(s).map_err(|e| e.to_string())
}

pub(super) fn parse_size_arg(s: &str) -> Result<u64, String> {
    elastic_config::parse_size(s).map_err(|e| e.to_string())
}

pub(super) fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

pub(super) fn parse_guest_opt_arg(s: &str) -> Result<(String, String), String> {
    elastic_vmm::parse_guest_opt(s).map_err(|e| e.to_string())
}

pub(super) fn parse_publish_arg(s: &str) -> Result<elastic_config::Publish, String> {
    elastic_config::parse_publish(s).map_err(|e| e.to_string())
}

pub(super) fn parse_log_arg(s: &str) -> Result<String, String> {
    elastic_vmm::parse_log_level(s).map_err(|e| e.to_string())
}

#[derive(Debug, Args, Clone)]
pub(super) struct QemuArgs {
    #[command(flatten)]
    pub(super) guest: GuestArgs,
    /// Guest RAM.
    #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = parse_qemu_memory)]
    pub(super) memory: u64,
    /// QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    pub(super) qemu: String,
    /// Accelerator: auto picks KVM when /dev/kvm can be opened, TCG otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    pub(super) accel: Accel,
}

pub(super) fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

pub(super) fn parse_restart_limit(s: &str) -> Result<u32, String> {
    s.parse::<u32>().map_err(|_| format!("'{s}' is not a number of restarts (a whole number, 0 or more)"))
}

pub(super) fn parse_qemu_memory(s: &str) -> Result<u64, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    if v < 16 << 20 || v % (1 << 20) != 0 {
        return Err(format!("'{s}' must be a whole number of MiB, at least 16M"));
    }
    Ok(v)
}

pub(super) fn kernel_path(guest: &GuestArgs) -> PathBuf {
    default_kernel(&guest.kernel)
}

pub(super) fn default_kernel(given: &Option<PathBuf>) -> PathBuf {
    given.clone().unwrap_or_else(|| BUILT_KERNEL.clone())
}
