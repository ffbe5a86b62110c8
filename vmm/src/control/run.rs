//! Running VMs: one (`run`) or several sharing a pool (`pool`, `stress`). Creates and admits
//! the VMs, routes their consoles, runs each on its own thread under one governor, and turns
//! the results into summaries.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::base::exit;
use crate::base::timeline::Timeline;
use crate::policy::admission::Governor;
use crate::policy::pool::{Capacity, Pool};
use crate::report::summary::Summary;
use crate::vmm::loader::KernelImage;
use crate::vmm::vm::{Outcome, RunReport, Vm, VmConfig, VmError, open_kvm};

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
    Endpoint(#[from] crate::devices::vsock::EndpointError),
    /// The control API could not start.
    #[error(transparent)]
    Api(#[from] crate::control::api::ApiError),
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
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Vm(e) => e.exit_code(),
            RunError::Thread(_) | RunError::Seccomp(_) => exit::INTERNAL,
            RunError::Endpoint(_) | RunError::Api(_) => exit::USAGE,
            RunError::Timeline { .. } => exit::IO_ERROR,
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
    pub restore: Option<Arc<Mutex<Option<RestoreSource>>>>,
}

/// Told whether a restored VM was built (`Err`: why not).
pub type ReadyCallback = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A VM to restore: its state and memory, its endpoints when they were handed over (else the
/// configuration's are bound), and whom to tell once it is built.
pub struct RestoreSource {
    /// The state.
    pub state: crate::snapshot::VmState,
    /// Its memory.
    pub memory: crate::vmm::vm::RestoreMemory,
    /// Endpoints handed over by a migration source.
    pub endpoints: Option<Vec<crate::devices::vsock::Bound>>,
    /// Called once the VM is built (or failed to be).
    pub on_ready: Option<ReadyCallback>,
}

impl std::fmt::Debug for RestoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreSource").field("memory", &self.memory).finish_non_exhaustive()
    }
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

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The VMs, admitted in this order.
    pub vms: Vec<VmSpec>,
    /// The pool's capacity.
    pub capacity: Capacity,
    /// Timeline file.
    pub timeline: Option<PathBuf>,
    /// Console routing.
    pub console: ConsoleMode,
    /// Called each time a VM (or on-demand slot) finishes, with how many of how many have.
    pub on_vm_end: Option<VmEndHook>,
    /// Serve the control API on this Unix socket.
    pub api_sock: Option<PathBuf>,
    /// Keep the timeline in memory (a plot is drawn from it).
    pub keep_timeline: bool,
    /// Run under the seccomp filters (`--no-seccomp` turns them off).
    pub seccomp: bool,
}

/// One VM's result.
#[derive(Debug, Clone)]
pub struct VmResult {
    /// The spec it ran from.
    pub spec: VmSpec,
    /// What happened.
    pub report: RunReport,
    /// Its captured console (capture mode).
    pub output: Option<String>,
    /// Its on-demand figures (an on-demand VM).
    pub on_demand: Option<crate::control::on_demand::OnDemandFigures>,
}

/// A VM ready to run, or an on-demand slot.
enum Prepared {
    /// Runs from the start.
    Now(Vm),
    /// Boots when a client connects.
    OnDemand {
        /// Its listening endpoints.
        endpoints: Vec<crate::devices::vsock::Bound>,
        /// Its image.
        image: Arc<KernelImage>,
        /// Its pool reservation.
        member: usize,
    },
}

/// A finished VM slot: its (last) report and, on demand, its figures.
type Ran = (RunReport, Option<crate::control::on_demand::OnDemandFigures>);

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

impl VmResult {
    /// Whether it ended with the expected exit code.
    pub fn as_expected(&self) -> bool {
        // An on-demand VM may have been stopped for being idle when the run ended.
        self.report.outcome.exit_code() == self.spec.expect_exit || matches!(self.report.outcome, Outcome::NoVm)
    }

    /// Its summary.
    pub fn summary(&self, started_monotonic_ns: u64) -> Summary {
        let c = &self.spec.config;
        let mut s = Summary::new(&self.report, &c.name, &c.app, c.vcpus, c.memory, started_monotonic_ns);
        s.restarts = self.on_demand.as_ref().map_or(0, |f| f.restarts);
        s.on_demand = self.on_demand.clone().filter(|_| c.on_demand);
        s
    }
}

/// Everything a run produced.
#[derive(Debug)]
pub struct RunResult {
    /// One result per VM, in spec order.
    pub vms: Vec<VmResult>,
    /// The timeline (lines kept in memory as well).
    pub timeline: Arc<Timeline>,
    /// The pool's capacity.
    pub capacity: Capacity,
    /// Peak pool use per resource.
    pub pool_peak: [u64; 2],
    /// Wall time of the whole run.
    pub wall: Duration,
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

/// Runs every VM of `spec` to its end.
pub fn run(spec: &RunSpec, started: Instant) -> Result<RunResult, RunError> {
    let kvm = open_kvm()?;
    if spec.seccomp {
        crate::host::seccomp::install_process()?;
    }
    let timeline =
        Timeline::new(started, spec.timeline.as_deref(), spec.keep_timeline).map_err(|source| RunError::Timeline {
            path: spec.timeline.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            source,
        })?;
    let timeline = Arc::new(timeline);
    let pool = Arc::new(Pool::new(spec.capacity));
    raise_open_file_limit();
    // Every endpoint is bound before any VM exists: a port in use stops the run up front.
    let mut endpoints = Vec::new();
    let mut restores = Vec::new();
    for vs in &spec.vms {
        let mut restore = vs.restore.as_ref().and_then(|r| r.lock().unwrap_or_else(|p| p.into_inner()).take());
        match restore.as_mut().and_then(|r| r.endpoints.take()) {
            Some(handed_over) => endpoints.push(handed_over),
            None => endpoints
                .push(crate::devices::vsock::endpoint::bind(&vs.config.publish, vs.config.vsock_uds.as_deref())?),
        }
        restores.push(restore);
    }
    let mut images: Vec<(PathBuf, Arc<KernelImage>)> = Vec::new();
    let mut captures = Vec::new();
    // Every image is opened, and every VM's service checked, before any VM is created.
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
        image.check_service(&vs.config.app).map_err(VmError::from)?;
        vm_images.push(image);
    }
    // The governor, and the control API, before any VM exists (a bad socket path stops the run
    // up front).
    let governor = Governor::start(Vec::new(), started);
    let _api = match &spec.api_sock {
        Some(path) => match crate::control::api::ApiServer::start(path, governor.members()) {
            Ok(a) => Some(a),
            Err(e) => {
                governor.stop();
                return Err(e.into());
            }
        },
        None => None,
    };
    // VMs that run from the start are created now (an admission failure stops the run before
    // any VM runs); on-demand ones boot when their first client arrives.
    let mut prepared = Vec::new();
    let mut sinks = Vec::new();
    for (((vs, bound), image), restore) in spec.vms.iter().zip(endpoints).zip(vm_images).zip(restores) {
        let capture = matches!(spec.console, ConsoleMode::Capture { .. }).then(|| Arc::new(Mutex::new(Vec::new())));
        let sink = SinkMaker {
            prefix: (spec.console != ConsoleMode::Stdout).then(|| format!("[{}] ", vs.config.name)),
            capture: capture.clone(),
            echo: !matches!(spec.console, ConsoleMode::Capture { echo: false }),
        };
        if let Some(mut r) = restore {
            let tl = Arc::clone(&timeline);
            let vm = Vm::restore(&vs.config, image, &kvm, started, tl, &pool, sink.make(), bound, r.state, r.memory);
            if let Some(ready) = r.on_ready.take() {
                ready(vm.as_ref().map(|_| ()).map_err(|e| e.to_string()));
            }
            prepared.push(Prepared::Now(vm?));
        } else if vs.config.on_demand || vs.config.restart.is_some() {
            // Its min is reserved now, as for a VM that runs from the start.
            let c = &vs.config;
            let member = pool.reserve(&c.name, c.vcpus, c.memory, c.weight).map_err(VmError::from)?;
            prepared.push(Prepared::OnDemand { endpoints: bound, image, member });
        } else {
            let vm = Vm::create(&vs.config, image, &kvm, started, Arc::clone(&timeline), &pool, sink.make(), bound)?;
            prepared.push(Prepared::Now(vm));
        }
        sinks.push(sink);
        captures.push(capture);
    }
    crate::host::signals::install();
    for p in &prepared {
        if let Prepared::Now(vm) = p {
            governor.members().add(Arc::clone(vm.shared()));
        }
    }
    let members = governor.members();
    let total = prepared.len();
    let finished = std::sync::atomic::AtomicUsize::new(0);
    let run_one = |p: Prepared, vs: &VmSpec, sink: &SinkMaker| -> Result<Ran, VmError> {
        let ran = match p {
            Prepared::Now(vm) => (vm.run(), None),
            Prepared::OnDemand { endpoints, image, member } => {
                let make = || sink.make();
                let slot = crate::control::on_demand::Slot {
                    config: &vs.config,
                    image,
                    kvm: &kvm,
                    started,
                    timeline: Arc::clone(&timeline),
                    pool: &pool,
                    members: members.clone(),
                    endpoints,
                    console: &make,
                    member,
                };
                let served = crate::control::on_demand::serve(slot);
                pool.close(member);
                let (report, figures) = served?;
                (report, Some(figures))
            }
        };
        if let Some(hook) = &spec.on_vm_end {
            (hook.0)(finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1, total);
        }
        Ok(ran)
    };
    // One VM runs on this thread (no thread to start and join on the path of a short run);
    // several run on a thread each.
    let reports: Vec<Result<Ran, RunError>> = if prepared.len() == 1 {
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
            handles
                .into_iter()
                .map(|(vs, h)| match h.join() {
                    Ok(r) => Ok(r?),
                    Err(_) => Err(RunError::Thread(vs.config.name.clone())),
                })
                .collect()
        })
    };
    let mut results = Vec::new();
    for ((ran, vs), capture) in reports.into_iter().zip(&spec.vms).zip(captures) {
        let (report, on_demand) = ran?;
        let output =
            capture.map(|c| String::from_utf8_lossy(&c.lock().unwrap_or_else(|p| p.into_inner())).into_owned());
        results.push(VmResult { spec: vs.clone(), report, output, on_demand });
    }
    governor.stop();
    let _ = timeline.flush();
    Ok(RunResult { vms: results, timeline, capacity: spec.capacity, pool_peak: pool.peak(), wall: started.elapsed() })
}
