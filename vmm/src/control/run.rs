//! Running VMs: one (`run`) or several sharing a pool (`pool`, `stress`). Binds every
//! endpoint and checks every image before any VM exists, creates and admits the VMs, gives
//! each an owner thread ([`crate::control::controller`]) under one governor, and turns the
//! results into summaries.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use thiserror::Error;

use crate::base::config::VmConfig;
use crate::base::exit;
use crate::base::timeline::{Line, Timeline};
use crate::control::admit::{Admission, AdmitEvent, Exits, Node};
use crate::control::api::{ApiError, ApiServer};
use crate::control::controller::{Context, Driven, Owner};
use crate::control::governor::Governor;
use crate::control::on_demand::{self, Slot};
use crate::control::registry::Registry;
use crate::control::request::ControlReply;
use crate::host::endpoint::{Bound, EndpointError};
use crate::policy::pool::{Capacity, Pool};
use crate::report::summary::{OnDemandFigures, PoolFigures, PoolSummary, PoolVm, Summary};
use crate::snapshot::VmState;
use crate::snapshot::migrate::ReadyCallback;
use crate::snapshot::restore::{RestoreMemory, restore};
use crate::snapshot::template::Templates;
use crate::vmm::error::{VmError, open_kvm};
use crate::vmm::loader::KernelImage;
use crate::vmm::outcome::Outcome;
use crate::vmm::stats::RunReport;
use crate::vmm::vm::{Host, Vm};

/// Failures before any VM ran.
#[derive(Debug, Error)]
pub enum RunError {
    /// A VM could not be created (image, KVM, pool admission...).
    #[error("{0}")]
    Vm(#[from] VmError),
    /// A VM's thread failed.
    #[error("the thread running VM '{0}' failed")]
    Thread(String),
    /// A host endpoint could not be set up (a port in use, a bad socket path).
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The control API could not start.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The seccomp filters could not be applied.
    #[error(transparent)]
    Seccomp(#[from] crate::host::seccomp::SeccompError),
    /// The timeline file could not be created.
    #[error("cannot create timeline {path}: {source}")]
    Timeline {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The VM a migration's target waited for did not arrive whole.
    #[error("{reason}")]
    Arrival {
        /// Why.
        reason: String,
        /// The exit code the receiving command ends with.
        code: u8,
    },
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Vm(e) => e.exit_code(),
            RunError::Thread(_) | RunError::Seccomp(_) => exit::INTERNAL,
            RunError::Endpoint(_) | RunError::Api(_) => exit::USAGE,
            RunError::Timeline { .. } => exit::IO_ERROR,
            RunError::Arrival { code, .. } => *code,
        }
    }
}

/// One VM to run.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Its configuration.
    pub config: VmConfig,
    /// Its kernel image.
    pub kernel: PathBuf,
    /// The exit code it should end with (pool and stress runs check it).
    pub expect_exit: u8,
    /// Restore it from a snapshot or a migration instead of booting it (taken by the run).
    pub(crate) restore: Option<Arc<Mutex<Option<RestoreSource>>>>,
}

impl VmSpec {
    /// A VM booted from `kernel` as `config` says, expected to end with `expect_exit`.
    pub fn new(config: VmConfig, kernel: PathBuf, expect_exit: u8) -> VmSpec {
        VmSpec { config, kernel, expect_exit, restore: None }
    }
}

/// A VM to restore: its endpoints when they were handed over (else the configuration's are
/// bound), and the saved VM, which a migration's target waits for while its run prepares.
pub(crate) struct RestoreSource {
    pub(crate) endpoints: Option<Vec<Bound>>,
    /// Returns the saved VM (at once for a snapshot; for a migration, once its state arrived).
    pub(crate) saved: Box<dyn FnOnce() -> Result<Saved, RunError> + Send>,
}

impl std::fmt::Debug for RestoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreSource").field("endpoints", &self.endpoints).finish_non_exhaustive()
    }
}

/// A saved VM: its state and memory, the configuration it runs with when it differs from its
/// spec's (a migration's final state), and whom to tell once it is built.
pub(crate) struct Saved {
    /// The configuration to run with (`None`: the spec's).
    pub(crate) config: Option<VmConfig>,
    /// The VM's state.
    pub(crate) state: VmState,
    /// Its memory.
    pub(crate) memory: RestoreMemory,
    /// Whom to tell once it is built (a migration's source).
    pub(crate) on_ready: Option<ReadyCallback>,
}

/// Where guest consoles go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Straight to standard output (a single VM).
    Stdout,
    /// To standard output, every line prefixed with `[name] `.
    Prefixed,
    /// Kept in memory (and also printed, prefixed, when `echo`).
    Capture {
        /// Print as well.
        echo: bool,
    },
}

/// Told how many VMs of a run have finished, and of how many (a progress display).
#[derive(Clone)]
pub struct VmEndHook(pub Arc<dyn Fn(usize, usize) + Send + Sync>);

impl std::fmt::Debug for VmEndHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VmEndHook")
    }
}

/// Where the run's timeline goes.
#[derive(Debug, Clone, Default)]
pub struct TimelineOptions {
    /// The file (JSON lines).
    pub file: Option<PathBuf>,
    /// Keep the lines in memory as well (a plot is drawn from them).
    pub keep: bool,
}

/// How a run is set up on the host.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The timeline.
    pub timeline: TimelineOptions,
    /// Console routing.
    pub console: ConsoleMode,
    /// Serve the control API on this Unix socket.
    pub api_sock: Option<PathBuf>,
    /// Run under the seccomp filters (`--no-seccomp` turns them off).
    pub seccomp: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { timeline: TimelineOptions::default(), console: ConsoleMode::Stdout, api_sock: None, seccomp: true }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The VMs, admitted in this order.
    pub vms: Vec<VmSpec>,
    /// The pool's capacity.
    pub capacity: Capacity,
    /// Timeline, consoles, control API, seccomp.
    pub options: RunOptions,
    /// Called each time a VM (or on-demand slot) finishes, with how many of how many have.
    pub on_vm_end: Option<VmEndHook>,
}

/// One VM's result.
#[derive(Debug, Clone)]
pub struct VmResult {
    /// The spec it ran from.
    pub spec: VmSpec,
    /// Its captured console (capture mode).
    pub output: Option<String>,
    report: RunReport,
    on_demand: Option<OnDemandFigures>,
}

impl VmResult {
    /// How it ended.
    pub fn outcome(&self) -> &Outcome {
        &self.report.outcome
    }

    /// Whether it ended with the expected exit code.
    pub fn as_expected(&self) -> bool {
        // An on-demand VM may have been stopped for being idle when the run ended.
        self.report.outcome.exit_code() == self.spec.expect_exit || matches!(self.report.outcome, Outcome::NoVm)
    }

    /// Reclaim notices it got (vCPUs and memory).
    pub fn reclaims(&self) -> u64 {
        self.report.policy.iter().map(|p| p.reclaims).sum()
    }

    /// Reclaims it let the grace expire on (vCPUs and memory).
    pub fn violations(&self) -> u64 {
        self.report.policy.iter().map(|p| p.violations).sum()
    }

    /// Whether every reclaim was answered in grace or counted as a violation (at most one
    /// may still be open, within its grace, when the run ended).
    pub fn reclaims_settled(&self) -> bool {
        self.report.policy.iter().all(|p| p.unresolved() == 0 || (p.unresolved() == 1 && p.open_within_grace()))
    }

    /// Its summary (`started_monotonic_ns`: the shim's start on CLOCK_MONOTONIC).
    pub fn summary(&self, started_monotonic_ns: u64) -> Summary {
        let c = &self.spec.config;
        let r = &c.resources;
        let mut s = Summary::new(&self.report, c.name(), &c.guest.app, r.vcpus, r.memory, started_monotonic_ns);
        s.restarts = self.on_demand.as_ref().map_or(0, |f| f.restarts);
        s.on_demand = self.on_demand.clone().filter(|_| c.lifecycle.on_demand.is_some());
        s
    }
}

/// Everything a run produced.
#[derive(Debug)]
pub struct RunResult {
    vms: Vec<VmResult>,
    timeline: Arc<Timeline>,
    capacity: Capacity,
    pool_peak: [u64; 2],
    wall: std::time::Duration,
}

impl RunResult {
    /// One result per VM, in spec order.
    pub fn vms(&self) -> &[VmResult] {
        &self.vms
    }

    /// The timeline's lines (kept in memory when [`TimelineOptions::keep`]).
    pub fn timeline_lines(&self) -> Vec<Line> {
        self.timeline.lines()
    }

    /// The pool's capacity and the most of each resource it had in use at once.
    pub fn pool_use(&self) -> (Capacity, [u64; 2]) {
        (self.capacity, self.pool_peak)
    }

    /// The summary of a pool run: exit code 0 when every VM ended as expected, else
    /// [`exit::RUN_FAILED`].
    pub fn pool_summary(&self, started_monotonic_ns: u64) -> PoolSummary {
        let vms: Vec<PoolVm> = self
            .vms
            .iter()
            .map(|v| PoolVm {
                expected_exit_code: v.spec.expect_exit,
                as_expected: v.as_expected(),
                summary: v.summary(started_monotonic_ns),
            })
            .collect();
        PoolSummary {
            exit_code: if self.vms.iter().all(VmResult::as_expected) { 0 } else { exit::RUN_FAILED },
            wall_us: self.wall.as_micros() as u64,
            pool: PoolFigures {
                vcpus: self.capacity.vcpus,
                memory_bytes: self.capacity.memory,
                peak_vcpus: self.pool_peak[0],
                peak_memory_bytes: self.pool_peak[1],
            },
            reclaims: self.vms.iter().map(VmResult::reclaims).sum(),
            violations: self.vms.iter().map(VmResult::violations).sum(),
            vms,
        }
    }
}

/// A VM ready to run, or a slot that boots one when asked (on demand, or again on failure).
enum Prepared {
    /// Runs from the start.
    Now(Vm, Owner),
    /// Boots when a client connects, or again after a failure.
    Slot {
        /// Its listening endpoints.
        endpoints: Vec<Bound>,
        /// Its image.
        image: Arc<KernelImage>,
        /// Its pool reservation.
        member: usize,
        /// A VM restored for it, which it runs first.
        first: Option<(Vm, Owner)>,
    },
}

/// Makes console sinks for one VM (an on-demand VM gets a new one at every boot; they share
/// the capture buffer).
struct SinkMaker {
    prefix: Option<String>,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
    echo: bool,
}

impl SinkMaker {
    fn make(&self) -> Box<dyn Write + Send> {
        Box::new(ConsoleSink {
            prefix: self.prefix.clone(),
            capture: self.capture.clone(),
            echo: self.echo,
            at_line_start: true,
        })
    }
}

/// A console sink: optional `[name] ` prefix per line, optional capture.
struct ConsoleSink {
    prefix: Option<String>,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
    echo: bool,
    at_line_start: bool,
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(c) = &self.capture {
            c.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        }
        if !self.echo {
            return Ok(buf.len());
        }
        let out = std::io::stdout();
        let mut out = out.lock();
        match &self.prefix {
            None => out.write_all(buf)?,
            Some(prefix) => {
                for line in buf.split_inclusive(|&b| b == b'\n') {
                    if self.at_line_start {
                        out.write_all(prefix.as_bytes())?;
                    }
                    out.write_all(line)?;
                    self.at_line_start = line.ends_with(b"\n");
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Raises this process's open-file limit to its hard limit: each client of a published port
/// is a file descriptor, and the default soft limit (often 1024) is below the device's
/// connection cap.
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs every VM of `spec` to its end (`started`: when the shim started; boot times are
/// measured from it).
pub fn run(spec: &RunSpec, started: Instant) -> Result<RunResult, RunError> {
    run_or_serve(spec, started, false)
}

/// Runs `spec` as a node pool: its VMs, and those the control API admits while it runs
/// (`POST /api/v1/vms`), until SIGTERM or SIGINT (which also ask every VM to stop). The
/// control API (`spec.options.api_sock`) is required.
pub fn serve(spec: &RunSpec, started: Instant) -> Result<RunResult, RunError> {
    if spec.options.api_sock.is_none() {
        return Err(ApiError::Socket { path: String::new(), reason: "a node pool needs its control API".into() }.into());
    }
    run_or_serve(spec, started, true)
}

fn run_or_serve(spec: &RunSpec, started: Instant, serve: bool) -> Result<RunResult, RunError> {
    let kvm = open_kvm()?;
    let options = &spec.options;
    if spec.vms.iter().any(|v| v.config.lifecycle.on_demand == Some(crate::base::config::Wake::Resume)) {
        // What killed shims left (listing a directory is not allowed once filtered).
        let removed = crate::snapshot::leftovers::sweep(&std::env::temp_dir());
        if removed > 0 {
            crate::host::diag::say(format_args!(
                "removed {removed} sleep or template director{} left in {} by shims that were killed",
                if removed == 1 { "y" } else { "ies" },
                std::env::temp_dir().display()
            ));
        }
    }
    if options.seccomp {
        crate::host::seccomp::install_process()?;
    }
    let timeline =
        Timeline::new(started, options.timeline.file.as_deref(), options.timeline.keep).map_err(|source| {
            RunError::Timeline {
                path: options.timeline.file.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                source,
            }
        })?;
    let timeline = Arc::new(timeline);
    let pool = Arc::new(Pool::new(spec.capacity));
    raise_open_file_limit();
    // Every endpoint is bound before any VM exists: a port in use stops the run up front.
    let mut endpoints = Vec::new();
    let mut restores = Vec::new();
    for vs in &spec.vms {
        let mut restore = vs.restore.as_ref().and_then(|r| r.lock().unwrap_or_else(|p| p.into_inner()).take());
        let e = &vs.config.endpoints;
        match restore.as_mut().and_then(|r| r.endpoints.take()) {
            Some(handed_over) => endpoints.push(handed_over),
            None => endpoints.push(crate::host::endpoint::bind(&e.publish, e.vsock_uds.as_deref())?),
        }
        restores.push(restore);
    }
    // Every image is opened, and every VM's service checked, before any VM is created.
    let mut images: Vec<(PathBuf, Arc<KernelImage>)> = Vec::new();
    let mut vm_images = Vec::new();
    for vs in &spec.vms {
        let image = match images.iter().find(|(p, _)| *p == vs.kernel) {
            Some((_, i)) => Arc::clone(i),
            None => {
                let i = Arc::new(KernelImage::open(&vs.kernel).map_err(VmError::from)?);
                images.push((vs.kernel.clone(), Arc::clone(&i)));
                i
            }
        };
        image.check_service(&vs.config.guest.app).map_err(VmError::from)?;
        vm_images.push(image);
    }
    // The governor, and the control API, before any VM exists (a bad socket path stops the run
    // up front).
    let governor = Governor::start(started);
    let registry = Registry::default();
    let (admit_tx, admit_rx) = std::sync::mpsc::channel();
    let node = serve.then(|| Node { exits: Exits::default(), admit: admit_tx.clone(), closing: Default::default() });
    let _api = match &options.api_sock {
        Some(path) => match ApiServer::start(path, registry.clone(), Arc::clone(&pool), node.clone()) {
            Ok(a) => Some(a),
            Err(e) => {
                governor.stop();
                return Err(e.into());
            }
        },
        None => None,
    };
    let ctx = Context { registry, members: governor.members() };
    // VMs that run from the start are created now (an admission failure stops the run before
    // any VM runs); on-demand ones boot when their first client arrives.
    let mut prepared = Vec::new();
    let mut sinks = Vec::new();
    let mut captures = Vec::new();
    for (((vs, bound), image), restored) in spec.vms.iter().zip(endpoints).zip(vm_images).zip(restores) {
        let capture = matches!(options.console, ConsoleMode::Capture { .. }).then(|| Arc::new(Mutex::new(Vec::new())));
        let sink = SinkMaker {
            prefix: (options.console != ConsoleMode::Stdout).then(|| format!("[{}] ", vs.config.name())),
            capture: capture.clone(),
            echo: !matches!(options.console, ConsoleMode::Capture { echo: false }),
        };
        let owner = Owner::new();
        let host = |sink: &SinkMaker, owner: &Owner| Host {
            kvm: &kvm,
            started,
            timeline: Arc::clone(&timeline),
            pool: &pool,
            console: sink.make(),
            events: owner.sink(),
            shell: None,
        };
        if let Some(r) = restored {
            // A migration's target waits here for the VM's state, everything else ready.
            let mut r = (r.saved)()?;
            // A restored on-demand VM runs in a slot of its own (its min reserved for the run):
            // idle, it goes to sleep, and the next client wakes it.
            let mut config = r.config.take().unwrap_or_else(|| vs.config.clone());
            let on_demand = config.lifecycle.on_demand.is_some();
            let mut slot_endpoints = Vec::new();
            let bound = if on_demand {
                let r = &config.resources;
                config.pool_member =
                    Some(pool.reserve(config.name(), r.vcpus, r.memory, r.weight).map_err(VmError::from)?);
                let copies =
                    on_demand::shared_endpoints(&bound, "cannot share the listening sockets with the restored VM")?;
                slot_endpoints = bound;
                copies
            } else {
                bound
            };
            let vm =
                restore(&config, &r.state, r.memory, Arc::clone(&image), host(&sink, &owner), bound).map(|(vm, _)| vm);
            if let Some(ready) = r.on_ready.take() {
                let told = ready(vm.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                // A source that was not told resumes the VM: it must not run here too.
                match (&vm, told) {
                    (Ok(_), Err(why)) => return Err(VmError::Restore(why).into()),
                    // The source gave the listening sockets up: their paths are this run's.
                    (Ok(v), Ok(started)) => {
                        v.shared().endpoints().iter_mut().for_each(Bound::own);
                        if let Some(started) = started {
                            v.shared().on_started(started);
                        }
                    }
                    _ => {}
                }
            }
            match config.pool_member {
                Some(member) => prepared.push(Prepared::Slot {
                    endpoints: slot_endpoints,
                    image,
                    member,
                    first: Some((vm?, owner)),
                }),
                None => prepared.push(Prepared::Now(vm?, owner)),
            }
        } else if vs.config.lifecycle.on_demand.is_some() || vs.config.lifecycle.restart.is_some() {
            // Its min is reserved now, as for a VM that runs from the start.
            let c = &vs.config;
            let r = &c.resources;
            let member = pool.reserve(c.name(), r.vcpus, r.memory, r.weight).map_err(VmError::from)?;
            prepared.push(Prepared::Slot { endpoints: bound, image, member, first: None });
        } else {
            let vm = Vm::create(&vs.config, image, host(&sink, &owner), bound)?;
            prepared.push(Prepared::Now(vm, owner));
        }
        sinks.push(sink);
        captures.push(capture);
    }
    // One template store for the whole run: every on-demand slot of a service (a pool of many)
    // starts from the template the first one took.
    let templates = spec
        .vms
        .iter()
        .any(|v| v.config.lifecycle.on_demand == Some(crate::base::config::Wake::Resume))
        .then(Templates::new);
    let warm = crate::vmm::vm::WarmPool::default();
    crate::host::signals::install();
    // A node pool admits VMs until a signal asks it to end.
    let _shutdown = serve.then(|| {
        crate::host::signals::subscribe(move |_| {
            let _ = admit_tx.send(AdmitEvent::Shutdown);
        })
    });
    let admitted = Mutex::new(std::collections::VecDeque::new());
    let total = prepared.len();
    let finished = AtomicUsize::new(0);
    let run_one =
        |p: Prepared, vs: &VmSpec, sink: &SinkMaker| -> Result<(RunReport, Option<OnDemandFigures>), VmError> {
            let ran = match p {
                Prepared::Now(vm, owner) => {
                    let Driven { report, .. } = crate::control::controller::drive(
                        vm,
                        owner,
                        &ctx,
                        vs.config.lifecycle.timeout,
                        Default::default(),
                        None,
                    );
                    (report, None)
                }
                Prepared::Slot { endpoints, image, member, first } => {
                    let make = || sink.make();
                    let slot = Slot {
                        config: &vs.config,
                        image,
                        kvm: &kvm,
                        started,
                        timeline: Arc::clone(&timeline),
                        pool: &pool,
                        ctx: &ctx,
                        endpoints,
                        console: &make,
                        member,
                        templates: templates.as_ref(),
                        warm: &warm,
                        first,
                    };
                    let served = on_demand::serve(slot);
                    pool.close(member);
                    let (report, figures) = served?;
                    (report, Some(figures))
                }
            };
            if let Some(hook) = &spec.on_vm_end {
                (hook.0)(finished.fetch_add(1, Ordering::Relaxed) + 1, total);
            }
            Ok(ran)
        };
    // One VM runs on this thread (no thread to start and join on the path of a short run);
    // several run on a thread each.
    let reports: Vec<Result<(RunReport, Option<OnDemandFigures>), RunError>> = if prepared.len() == 1 && !serve {
        prepared.into_iter().zip(&spec.vms).zip(&sinks).map(|((p, vs), sink)| Ok(run_one(p, vs, sink)?)).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = prepared
                .into_iter()
                .zip(&spec.vms)
                .zip(&sinks)
                .map(|((p, vs), sink)| {
                    let run_one = &run_one;
                    (vs, scope.spawn(move || run_one(p, vs, sink)))
                })
                .collect();
            if let Some(node) = &node {
                let env = AdmitEnv { kvm: &kvm, started, timeline: &timeline, pool: &pool, console: options.console };
                serve_admissions(scope, &admit_rx, node, &env, &ctx, &admitted);
            }
            handles
                .into_iter()
                .map(|(vs, h)| match h.join() {
                    Ok(r) => Ok(r?),
                    Err(_) => Err(RunError::Thread(vs.config.name().to_string())),
                })
                .collect()
        })
    };
    // The governor stops whatever the VMs' threads returned.
    governor.stop();
    let _ = timeline.flush();
    let mut results = Vec::new();
    for ((ran, vs), capture) in reports.into_iter().zip(&spec.vms).zip(captures) {
        let (report, on_demand) = ran?;
        let output =
            capture.map(|c| String::from_utf8_lossy(&c.lock().unwrap_or_else(|p| p.into_inner())).into_owned());
        results.push(VmResult { spec: vs.clone(), report, output, on_demand });
    }
    for (spec, report) in admitted.into_inner().unwrap_or_else(|p| p.into_inner()) {
        results.push(VmResult { spec, report, output: None, on_demand: None });
    }
    Ok(RunResult { vms: results, timeline, capacity: spec.capacity, pool_peak: pool.peak(), wall: started.elapsed() })
}

/// The largest state file a node pool reads from a snapshot it is asked to restore.
const MAX_STATE_FILE: u64 = 64 << 20;

/// Checks, without opening anything, that `dir` holds a snapshot's files as regular files (a
/// FIFO would block the pool's main thread, a device or a huge state file exhaust it).
fn check_snapshot_files(dir: &std::path::Path) -> Result<(), String> {
    use crate::snapshot::{MEMORY_FILE, STATE_FILE};
    for (name, max) in [(STATE_FILE, MAX_STATE_FILE), (MEMORY_FILE, u64::MAX)] {
        let path = dir.join(name);
        let meta = std::fs::metadata(&path).map_err(|e| format!("restore: {}: {e}", path.display()))?;
        if !meta.file_type().is_file() {
            return Err(format!("restore: {} is not a regular file", path.display()));
        }
        if meta.len() > max {
            return Err(format!("restore: {} is {} bytes (at most {max})", path.display(), meta.len()));
        }
    }
    Ok(())
}

/// The most results of ended admitted VMs a node pool keeps for its summary (the oldest go).
const ADMITTED_KEPT: usize = 1024;

/// The refusal of an admission once the pool is ending.
const SHUTTING_DOWN: &str = "the pool is shutting down: it admits no more VMs";

/// A node pool's main thread: admits the VMs the control API asks for, each run by an owner
/// thread of `scope`, until a signal; then refuses what is queued and joins them all. The
/// results of ended VMs go to `admitted` (the last [`ADMITTED_KEPT`]).
fn serve_admissions<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    admit_rx: &std::sync::mpsc::Receiver<AdmitEvent>,
    node: &Node,
    env: &AdmitEnv<'_>,
    ctx: &'env Context,
    admitted: &Mutex<std::collections::VecDeque<(VmSpec, RunReport)>>,
) {
    let mut running: Vec<std::thread::ScopedJoinHandle<'scope, (VmSpec, RunReport)>> = Vec::new();
    let keep = |h: std::thread::ScopedJoinHandle<'scope, (VmSpec, RunReport)>| match h.join() {
        Ok(r) => {
            let mut kept = admitted.lock().unwrap_or_else(|p| p.into_inner());
            kept.push_back(r);
            if kept.len() > ADMITTED_KEPT {
                kept.pop_front();
            }
        }
        Err(_) => {
            crate::host::diag::say(format_args!("the thread of an admitted VM failed"));
        }
    };
    while let Ok(AdmitEvent::Admit(a, replier)) = admit_rx.recv() {
        // The admitted VMs that ended are joined as the pool goes (a node pool runs for
        // months).
        let (ended, live): (Vec<_>, Vec<_>) = running.into_iter().partition(|h| h.is_finished());
        running = live;
        ended.into_iter().for_each(keep);
        let name = a.config.name().to_string();
        if crate::host::signals::interrupts() > 0 {
            node.exits.refused(&name);
            replier.reply(ControlReply::error(503, SHUTTING_DOWN));
            continue;
        }
        let (vm, owner) = match admit(&a, env) {
            Ok(v) => v,
            Err((status, message)) => {
                node.exits.refused(&name);
                replier.reply(ControlReply::error(status, message));
                continue;
            }
        };
        // Given back if the thread cannot be started.
        let replier = Arc::new(Mutex::new(Some(replier)));
        let shared = Arc::clone(vm.shared());
        let (exits, answer, announced) = (node.exits.clone(), Arc::clone(&replier), name.clone());
        let thread = std::thread::Builder::new().name(format!("{name}-owner"));
        let spawned = thread.spawn_scoped(scope, move || {
            let announce = move || {
                let body = serde_json::json!({ "name": announced, "pid": std::process::id() });
                if let Some(r) = answer.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    r.reply(ControlReply { status: 201, body });
                }
            };
            let Driven { report, .. } =
                crate::control::controller::drive(vm, owner, ctx, None, Default::default(), Some(Box::new(announce)));
            let (code, reason) = (report.outcome.exit_code(), report.outcome.reason());
            exits.ended(a.config.name(), code, reason);
            (VmSpec::new(a.config, a.kernel, code), report)
        });
        match spawned {
            Ok(h) => running.push(h),
            Err(e) => {
                // The VM never started (dropped with the closure): its pool share goes back.
                let policy = shared.policy();
                policy.pool().leave(policy.member());
                node.exits.refused(&name);
                if let Some(r) = replier.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    r.reply(ControlReply::error(503, format!("cannot start the VM's thread: {e}")));
                }
            }
        }
    }
    // Admissions queued behind the signal are refused; the API refuses new ones.
    node.closing.store(true, Ordering::Release);
    let refuse_queued = || {
        while let Ok(event) = admit_rx.try_recv() {
            if let AdmitEvent::Admit(a, replier) = event {
                node.exits.refused(a.config.name());
                replier.reply(ControlReply::error(503, SHUTTING_DOWN));
            }
        }
    };
    refuse_queued();
    running.into_iter().for_each(keep);
    refuse_queued();
}

/// What the node pool's main thread admits VMs with.
struct AdmitEnv<'a> {
    kvm: &'a kvm_ioctls::Kvm,
    started: Instant,
    timeline: &'a Arc<Timeline>,
    pool: &'a Arc<Pool>,
    console: ConsoleMode,
}

/// Admits `a` on the node pool's main thread: opens its console, opens and checks its image
/// (each admission opens its own: a long-running pool keeps no image of an ended VM), binds
/// its ports (in its network namespace), admits its min against the pool and creates it. A
/// refusal is an HTTP status and the reason.
fn admit(a: &Admission, env: &AdmitEnv<'_>) -> Result<(Vm, Owner), (u16, String)> {
    let c = &a.config;
    let console: Box<dyn Write + Send> = match a.open_console().map_err(|e| (400, e))? {
        Some(file) => Box::new(file),
        None => Box::new(ConsoleSink {
            prefix: (env.console != ConsoleMode::Stdout).then(|| format!("[{}] ", c.name())),
            capture: None,
            echo: !matches!(env.console, ConsoleMode::Capture { echo: false }),
            at_line_start: true,
        }),
    };
    let image = Arc::new(KernelImage::open(&a.kernel).map_err(|e| (400, e.to_string()))?);
    image.check_service(&c.guest.app).map_err(|e| (400, e.to_string()))?;
    let e = &c.endpoints;
    let bound = match &a.netns {
        Some(ns) => crate::host::endpoint::bind_in(ns, &e.publish),
        None => crate::host::endpoint::bind(&e.publish, None),
    }
    .map_err(|e| (409, e.to_string()))?;
    let owner = Owner::new();
    let host = Host {
        kvm: env.kvm,
        started: env.started,
        timeline: Arc::clone(env.timeline),
        pool: env.pool,
        console,
        events: owner.sink(),
        shell: None,
    };
    let vm = match &a.restore {
        None => Vm::create(c, image, host, bound),
        Some(dir) => {
            check_snapshot_files(dir).map_err(|e| (400, e))?;
            let loaded = crate::snapshot::load(dir).map_err(|e| (400, e.to_string()))?;
            let mut state = loaded.state;
            if state.config.guest.app != c.guest.app {
                return Err((
                    400,
                    format!(
                        "the snapshot in {} runs '{}', not '{}'",
                        dir.display(),
                        state.config.guest.app,
                        c.guest.app
                    ),
                ));
            }
            let mut config = state.config.clone().renamed(c.name());
            config.endpoints = c.endpoints.clone();
            config.lifecycle = c.lifecycle.clone();
            state.kernel = a.kernel.clone();
            restore(&config, &state, RestoreMemory::File(loaded.memory), image, host, bound).map(|(vm, _)| vm)
        }
    };
    match vm {
        Ok(vm) => Ok((vm, owner)),
        Err(e @ (VmError::Pool(_) | VmError::Config(_))) => Err((409, e.to_string())),
        Err(e) => Err((500, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_to_restore_is_regular_files() {
        use crate::snapshot::{MEMORY_FILE, STATE_FILE};
        let dir = std::env::temp_dir().join(format!("run-snapshot-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        assert!(check_snapshot_files(&dir).expect_err("empty").contains(STATE_FILE));
        std::fs::write(dir.join(STATE_FILE), "{}").expect("state");
        let fifo = std::ffi::CString::new(dir.join(MEMORY_FILE).to_str().expect("utf-8")).expect("path");
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = check_snapshot_files(&dir).expect_err("a FIFO");
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_file(dir.join(MEMORY_FILE)).expect("rm");
        std::fs::write(dir.join(MEMORY_FILE), "").expect("memory");
        assert_eq!(check_snapshot_files(&dir), Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
