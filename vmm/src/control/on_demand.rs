//! VM slots that boot a VM more than once: scale to zero and restart on failure.
//!
//! Scale to zero (`--on-demand`): the shim holds a VM's published endpoints with no VM
//! running; the first client to connect boots one, which is handed that connection (and every
//! one that queued meanwhile in the listen backlog). After `--idle-shutdown` with no connection
//! open, the device stops accepting (newcomers wait in the backlog) and the VM goes to sleep:
//! it is snapshotted into the slot's sleep directory (its state and the memory it holds, zero
//! pages as holes) and ends, and the next client resumes it from there, with what it kept in
//! memory. With `--on-demand=boot` the guest is asked to stop instead and the next client boots
//! a new VM. Every boot is a `cold_start` line in the timeline, every wake a `wake` line, every
//! idle stop an `idle_shutdown` line (followed by `sleep` when the VM went to sleep).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::base::config::{RESTART_BACKOFF_MAX, VmConfig, Wake};
use crate::base::timeline::{Timeline, detail};
use crate::control::controller::{AtRest, Context, Driven, Owner, drive};
use crate::control::registry::StandIn;
use crate::control::request::{ControlReply, ControlRequest};
use crate::host::endpoint::{Bound, copies};
use crate::policy::pool::Pool;
use crate::report::summary::{OnDemandFigures, WakePhases};
use crate::snapshot::restore::{RestoreMemory, restore};
use crate::snapshot::template::{TemplateKey, Templates};
use crate::vmm::error::VmError;
use crate::vmm::loader::KernelImage;
use crate::vmm::outcome::Outcome;
use crate::vmm::stats::RunReport;
use crate::vmm::vm::{Host, Shell, Vm, WarmPool};

/// What a slot needs to boot its VM again and again.
pub(crate) struct Slot<'a> {
    /// The VM's configuration (its `timeout` bounds the whole slot).
    pub(crate) config: &'a VmConfig,
    /// Its kernel image.
    pub(crate) image: Arc<KernelImage>,
    /// `/dev/kvm`.
    pub(crate) kvm: &'a Kvm,
    /// When the shim started.
    pub(crate) started: Instant,
    /// The run's timeline.
    pub(crate) timeline: Arc<Timeline>,
    /// The pool the VM is admitted to at every boot.
    pub(crate) pool: &'a Arc<Pool>,
    /// The run's registry and governor, which the VM joins at every boot.
    pub(crate) ctx: &'a Context,
    /// The listening endpoints (the slot keeps them for the whole run; each VM gets copies).
    pub(crate) endpoints: Vec<Bound>,
    /// Makes a console sink for each VM.
    pub(crate) console: &'a (dyn Fn() -> Box<dyn Write + Send> + Sync),
    /// The slot's pool member (its min reserved for the whole run: see
    /// [`Pool::reserve`](crate::policy::pool::Pool::reserve)).
    pub(crate) member: usize,
    /// The run's templates (an on-demand slot that wakes by resume starts from its service's
    /// template, or takes it at its first boot).
    pub(crate) templates: Option<&'a Templates>,
    /// The run's KVM VMs made ahead (see [`WarmPool`]).
    pub(crate) warm: &'a WarmPool,
    /// A VM made before the slot started (restored from a snapshot), which it runs first.
    pub(crate) first: Option<(Vm, Owner)>,
}

impl std::fmt::Debug for Slot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("vm", &self.config.name())
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// The directory a slot's VM sleeps in: private to this process, removed when the slot ends.
/// A slot's sleep directory, locked while the slot lives (see [`crate::snapshot::leftovers`]).
struct SleepDir {
    path: std::path::PathBuf,
    _held: std::fs::File,
}

impl SleepDir {
    fn create(vm: &str) -> Result<SleepDir, VmError> {
        let name: String = vm.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "{}{}-{nanos}-{name}",
            crate::snapshot::leftovers::SLEEP_PREFIX,
            std::process::id()
        ));
        let held = crate::snapshot::leftovers::create_held(&path).map_err(|source| {
            VmError::Device(crate::devices::DeviceError::Host {
                device: "every",
                what: "cannot create the sleep directory in the temporary directory",
                source,
            })
        })?;
        Ok(SleepDir { path, _held: held })
    }
}

impl Drop for SleepDir {
    fn drop(&mut self) {
        // The files a snapshot writes, one by one: listing the directory is not in the
        // shim's system-call allow-list.
        for file in crate::snapshot::FILES {
            let _ = std::fs::remove_file(self.path.join(file));
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Why the wait for a client ended.
enum Waited {
    Client,
    Interrupted,
    Timeout,
}

/// Waits until a client is waiting on one of `endpoints`, the operator interrupts (the
/// signal thread writes `interrupted`), or `deadline` passes. Nothing polls: one `poll(2)`
/// sleeps on the listening sockets and the eventfd.
fn wait_for_client(endpoints: &[Bound], interrupted: &EventFd, deadline: Option<Instant>) -> Waited {
    let mut fds: Vec<libc::pollfd> =
        endpoints.iter().map(|e| libc::pollfd { fd: e.raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    fds.push(libc::pollfd { fd: interrupted.as_raw_fd(), events: libc::POLLIN, revents: 0 });
    loop {
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Waited::Timeout;
                }
                i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            }
            None => -1,
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 {
            continue;
        }
        if fds.last().is_some_and(|f| f.revents & libc::POLLIN != 0) {
            return Waited::Interrupted;
        }
        if fds.iter().any(|f| f.revents & libc::POLLIN != 0) {
            return Waited::Client;
        }
    }
}

/// What the control API sees of an on-demand VM while no VM runs (between clients): `list`,
/// `get` and `metrics` show it as `sleeping` with nothing held (`get` adds the slot's cold
/// starts, sleeps and wakes, and whether a sleeping VM waits to be resumed); `stop` ends the
/// slot as Ctrl-C does; what needs a running VM (pause, policy, snapshot, migrate) is refused
/// with 409.
fn stand_in(
    config: &VmConfig,
    started: Instant,
    figures: &OnDemandFigures,
    resumable: bool,
    interrupted: Arc<EventFd>,
) -> StandIn {
    let (cold_starts, sleeps, wakes) = (figures.cold_starts, figures.sleeps, figures.wakes);
    let (name, app) = (config.name().to_string(), config.guest.app.clone());
    let (v, m) = (config.resources.vcpus, config.resources.memory);
    Arc::new(move |request| {
        let uptime = started.elapsed();
        match request {
            ControlRequest::Brief => ControlReply::ok(json!({
                "name": name, "app": app, "state": "sleeping", "vcpus": 0, "memory_bytes": 0,
                "uptime_us": uptime.as_micros() as u64,
            })),
            ControlRequest::Get => ControlReply::ok(json!({
                "name": name, "app": app, "state": "sleeping",
                "vcpus": { "min": v.min, "max": v.max, "burst": v.burst, "final": 0 },
                "memory_bytes": { "min": m.min, "max": m.max, "burst": m.burst, "final": 0 },
                "on_demand": {
                    "cold_starts": cold_starts, "sleeps": sleeps, "wakes": wakes,
                    "next": if resumable { "resume" } else { "boot" },
                },
                "uptime_us": uptime.as_micros() as u64,
            })),
            ControlRequest::Metrics => {
                let mut values = serde_json::Map::new();
                for (family, _, _) in crate::control::api::FAMILIES {
                    values.insert(family.into(), json!(0.0));
                }
                for (family, value) in [
                    ("elastic_vcpus_min", v.min),
                    ("elastic_vcpus_max", v.max),
                    ("elastic_vcpus_burst", v.burst),
                    ("elastic_memory_min_bytes", m.min),
                    ("elastic_memory_max_bytes", m.max),
                    ("elastic_memory_burst_bytes", m.burst),
                ] {
                    values.insert(family.into(), json!(value as f64));
                }
                values.insert("elastic_uptime_seconds".into(), json!(uptime.as_secs_f64()));
                values.insert(
                    "elastic_host_cpu_seconds_total".into(),
                    json!(crate::host::process::process_cpu_us() as f64 / 1e6),
                );
                ControlReply::ok(json!({ "name": name, "app": app, "values": Value::Object(values) }))
            }
            ControlRequest::Stop => {
                // Ends the wait for a client, as Ctrl-C does.
                let _ = interrupted.write(1);
                ControlReply::ok(json!({ "name": name, "state": "stopping" }))
            }
            _ => ControlReply::error(
                409,
                format!("VM '{name}' is sleeping (on demand, no VM runs until the next client): nothing to act on"),
            ),
        }
    })
}

/// Copies of a slot's `endpoints` for one of its VMs (`what` says why when they cannot be made).
pub(crate) fn shared_endpoints(endpoints: &[Bound], what: &'static str) -> Result<Vec<Bound>, VmError> {
    copies(endpoints)
        .map_err(|source| VmError::Device(crate::devices::DeviceError::Host { device: "every", what, source }))
}

/// What a VM of `slot` is built with, its events going to `events` (in `shell`, when one was
/// made ahead).
fn host_for<'h>(slot: &Slot<'h>, events: crate::vmm::shared::EventSink, shell: Option<Box<Shell>>) -> Host<'h> {
    Host {
        kvm: slot.kvm,
        started: slot.started,
        timeline: Arc::clone(&slot.timeline),
        pool: slot.pool,
        console: (slot.console)(),
        events,
        shell,
    }
}

/// Where a VM that does not boot comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Its own sleep (a wake).
    Sleep,
    /// The service's template (a cold start that resumes instead of booting).
    Template,
    /// A snapshot the run was started from (`resume DIR` of an on-demand VM): the slot's
    /// first VM.
    Restored,
    /// The snapshot a restart restores from (`--restart-from DIR`).
    Snapshot,
}

impl Origin {
    fn path(self) -> &'static str {
        match self {
            Origin::Sleep => "resume",
            Origin::Template => "template",
            Origin::Restored | Origin::Snapshot => "restore",
        }
    }
}

/// Resumes a VM for a waiting client from `loaded` (its sleep, or its service's template, read
/// in `load_us`): a `wake` or `cold_start` line in the timeline with the phases. When the
/// state cannot be used (it belongs to another kernel file, the pool has no room for what it
/// held...), says why and hands `host` and `endpoints` back: the caller boots afresh.
#[allow(clippy::too_many_arguments)]
fn resume_from<'h>(
    slot: &Slot<'h>,
    cycle: &VmConfig,
    (loaded, load_us, from): (crate::snapshot::Loaded, u64, Origin),
    host: Host<'h>,
    endpoints: Vec<Bound>,
    figures: &mut OnDemandFigures,
    seen_at: Duration,
) -> Result<Vm, (Host<'h>, Vec<Bound>)> {
    let name = cycle.name();
    let what = match from {
        Origin::Sleep => "its sleep",
        Origin::Template | Origin::Restored => "its service's template",
        Origin::Snapshot => "the snapshot to restart from",
    };
    if from == Origin::Snapshot && loaded.state.config.guest.app != cycle.guest.app {
        crate::host::diag::say(format_args!(
            "{name}: {what} is of another service ({}); booting afresh",
            loaded.state.config.guest.app
        ));
        return Err((host, endpoints));
    }
    if loaded.state.kernel != slot.image.path {
        crate::host::diag::say(format_args!(
            "{name}: {what} is of another kernel file ({}); booting afresh",
            loaded.state.kernel.display()
        ));
        return Err((host, endpoints));
    }
    let Ok(copies) = copies(&endpoints) else { return Err((host, endpoints)) };
    let retry = host_for(slot, host.events.clone(), None);
    let mut state = loaded.state;
    if from == Origin::Snapshot {
        // A restart runs under the VM's configured limits, as a boot does, not those in force
        // when the snapshot was taken (a max lowered then would have it killed again).
        state.policy.limits = [cycle.resources.vcpus, cycle.resources.memory];
    }
    match restore(cycle, &state, RestoreMemory::File(loaded.memory), Arc::clone(&slot.image), host, copies) {
        Ok((vm, p)) => {
            let us = slot.started.elapsed().saturating_sub(seen_at).as_micros() as u64;
            let phases = WakePhases {
                load_us,
                kvm_us: p.kvm_us,
                memory_us: p.memory_us,
                vcpus_us: p.vcpus_us,
                devices_us: p.devices_us,
                ready_us: us,
                first_reply_us: None,
                post_wake_faults: None,
            };
            let mut line = detail([
                ("path", from.path().into()),
                ("load_us", load_us.into()),
                ("kvm_us", p.kvm_us.into()),
                ("memory_us", p.memory_us.into()),
                ("vcpus_us", p.vcpus_us.into()),
                ("devices_us", p.devices_us.into()),
            ]);
            match from {
                Origin::Sleep => {
                    figures.wakes += 1;
                    figures.wake_us.push(us);
                    figures.wake_phases.push(phases);
                    line.insert("wakes".into(), figures.wakes.into());
                    line.insert("wake_us".into(), us.into());
                    slot.timeline.record(name, "wake", 0, 0, line);
                }
                Origin::Snapshot => {
                    line.insert("ready_us".into(), us.into());
                    slot.timeline.record(name, "restore", 0, 0, line);
                }
                Origin::Template | Origin::Restored => {
                    figures.cold_starts += 1;
                    figures.template_phases.push(phases);
                    line.insert("cold_starts".into(), figures.cold_starts.into());
                    line.insert("ready_us".into(), us.into());
                    slot.timeline.record(name, "cold_start", 0, 0, line);
                }
            }
            Ok(vm)
        }
        Err(e) => {
            crate::host::diag::say(format_args!("{name}: cannot resume from {what} ({e}); booting afresh"));
            Err((retry, endpoints))
        }
    }
}

/// Reads the snapshot in `dir` (`kept`: its state, which this slot wrote and kept, is not
/// decoded from its file again) to start from as `origin`: its sleep, or the snapshot a restart
/// restores from; `None`, said on stderr as `from`, when there is none or it cannot be used
/// (the VM boots).
fn load_snapshot(
    name: &str,
    dir: &std::path::Path,
    kept: Option<Box<crate::snapshot::VmState>>,
    (origin, from): (Origin, &str),
) -> Option<(crate::snapshot::Loaded, u64, Origin)> {
    let loading = Instant::now();
    let loaded = match kept {
        Some(state) => crate::snapshot::load_kept(dir, *state),
        None => crate::snapshot::load(dir),
    };
    match loaded {
        Ok(l) => Some((l, loading.elapsed().as_micros() as u64, origin)),
        Err(e) => {
            crate::host::diag::say(format_args!("{name}: cannot {from} ({e}); booting afresh"));
            None
        }
    }
}

/// Reads the service's template: `Ok(Some)` to start from, `Ok(None)` when there is none yet
/// (or it was refused, said on stderr): the boot takes it.
fn load_template(name: &str, store: &Templates, key: &TemplateKey) -> Option<(crate::snapshot::Loaded, u64, Origin)> {
    let loading = Instant::now();
    match store.load(key) {
        Ok(Some(l)) => Some((l, loading.elapsed().as_micros() as u64, Origin::Template)),
        Ok(None) => None,
        Err(e) => {
            crate::host::diag::say(format_args!(
                "{name}: the service's template is refused ({e}); booting to take it again"
            ));
            None
        }
    }
}

/// Runs a slot (an on-demand VM, or one that restarts on failure) until the operator stops it,
/// its timeout passes, or a VM ends for a reason that neither an idle shutdown nor the
/// restart policy covers. Returns the last
/// VM's report (or one saying no VM ran) and the slot's figures.
pub(crate) fn serve(mut slot: Slot<'_>) -> Result<(RunReport, OnDemandFigures), VmError> {
    let config = slot.config;
    let deadline = config.lifecycle.timeout.map(|t| Instant::now() + t);
    let mut figures = OnDemandFigures::default();
    let mut last: Option<RunReport> = None;
    let interrupts = crate::host::signals::interrupts();
    let interrupted = Arc::new(
        EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::KvmUnavailable(format!("cannot create an eventfd: {e}")))?,
    );
    let _subscription = {
        let fd = Arc::clone(&interrupted);
        crate::host::signals::subscribe(move |_| {
            let _ = fd.write(1);
        })
    };
    let end_without_vm = |last: Option<RunReport>, outcome: Outcome| match last {
        Some(mut r) => {
            r.outcome = outcome;
            r.wall = slot.started.elapsed();
            r
        }
        None => RunReport::without_vm(config, outcome, slot.started.elapsed()),
    };
    if config.lifecycle.on_demand.is_some() {
        let addresses: Vec<String> = slot.endpoints.iter().map(Bound::describe).collect();
        crate::host::diag::say(format_args!(
            "{}: on demand, no VM running; the first client on {} boots it",
            config.name(),
            addresses.join(", ")
        ));
    }
    let mut first = slot.first.take();
    let mut boot_now = config.lifecycle.on_demand.is_none() || first.is_some();
    // The size of the VMs' boot memory, which the warm pool maps ahead.
    let ram_size =
        crate::base::layout::Layout::new(config.resources.memory.min, config.resources.memory.burst).ram_size;
    let sleep_dir = match config.lifecycle.on_demand {
        Some(Wake::Resume) => Some(SleepDir::create(config.name())?),
        _ => None,
    };
    // A complete snapshot of the last VM waits in the sleep directory (and its state here).
    let mut asleep = false;
    let mut kept: Option<Box<crate::snapshot::VmState>> = None;
    // This start is a restart after a failure.
    let mut restarting = false;
    loop {
        if !boot_now {
            if crate::host::signals::interrupts() != interrupts {
                return Ok((end_without_vm(last, Outcome::NoVm), figures));
            }
            let _sleeping = slot.ctx.registry.register_sleeping(
                config.name(),
                stand_in(config, slot.started, &figures, asleep, Arc::clone(&interrupted)),
            );
            // The KVM VM the next VM is made in, made while the slot waits.
            slot.warm.top_up(ram_size, &slot.image);
            match wait_for_client(&slot.endpoints, &interrupted, deadline) {
                Waited::Client => {}
                Waited::Interrupted => return Ok((end_without_vm(last, Outcome::NoVm), figures)),
                Waited::Timeout => {
                    let outcome =
                        Outcome::Timeout(config.lifecycle.timeout.unwrap_or_default(), "no VM running".into());
                    return Ok((end_without_vm(last, outcome), figures));
                }
            }
        }
        boot_now = false;
        let seen_at = slot.started.elapsed();
        let mut cycle = config.clone();
        cycle.pool_member = Some(slot.member);
        cycle.lifecycle.timeout =
            deadline.map(|d| d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        // Where the VM comes from: the VM the slot started with, its sleep, its service's
        // template, or a boot (which takes the template when the slot keeps them and there is
        // none yet).
        let templates = slot.templates.filter(|_| config.lifecycle.on_demand == Some(Wake::Resume));
        // The template's key (it looks at the kernel file) is not needed to wake from a sleep.
        let from_sleep = first.is_none() && asleep && sleep_dir.is_some();
        let mut key = templates.filter(|_| !from_sleep).map(|_| TemplateKey::of(&cycle, &slot.image));
        let (vm, from, owner) = match first.take() {
            Some((vm, owner)) => (vm, Some(Origin::Restored), owner),
            None => {
                let endpoints =
                    shared_endpoints(&slot.endpoints, "cannot share the listening sockets with the new VM")?;
                let owner = Owner::new();
                let host = host_for(&slot, owner.sink(), slot.warm.take(ram_size));
                let restart_from = config.lifecycle.restart.as_ref().and_then(|r| r.from.as_deref());
                let source = match sleep_dir.as_ref().filter(|_| std::mem::take(&mut asleep)) {
                    Some(dir) => {
                        load_snapshot(config.name(), &dir.path, kept.take(), (Origin::Sleep, "resume from its sleep"))
                    }
                    None => restart_from
                        .filter(|_| std::mem::take(&mut restarting))
                        .and_then(|dir| {
                            let from = format!("restart from {}", dir.display());
                            load_snapshot(config.name(), dir, None, (Origin::Snapshot, &from))
                        })
                        .or_else(|| templates.zip(key.as_ref()).and_then(|(t, k)| load_template(config.name(), t, k))),
                };
                let started_from = source.as_ref().map(|s| s.2);
                let woken = match source {
                    Some(source) => resume_from(&slot, &cycle, source, host, endpoints, &mut figures, seen_at),
                    None => Err((host, endpoints)),
                };
                let (vm, from) = match woken {
                    Ok(vm) => (vm, started_from),
                    Err((host, endpoints)) => {
                        if config.lifecycle.on_demand.is_some() {
                            slot.timeline.record(
                                config.name(),
                                "cold_start",
                                0,
                                0,
                                detail([("cold_starts", (figures.cold_starts + 1).into()), ("path", "boot".into())]),
                            );
                        }
                        // A template taken meanwhile (or one a failed resume did not use) is
                        // not taken again.
                        if key.is_none() {
                            key = templates.map(|_| TemplateKey::of(&cycle, &slot.image));
                        }
                        cycle.take_template = templates.zip(key.as_ref()).is_some_and(|(t, k)| !t.has(k));
                        (Vm::create(&cycle, Arc::clone(&slot.image), host, endpoints)?, None)
                    }
                };
                (vm, from, owner)
            }
        };
        vm.shared().set_restarts_before(figures.restarts);
        let rest = AtRest {
            sleep_to: sleep_dir.as_ref().map(|d| d.path.as_path()),
            template: templates.zip(key.as_ref()).filter(|_| cycle.take_template),
        };
        let Driven { report, idle_stopped, slept } = drive(vm, owner, slot.ctx, cycle.lifecycle.timeout, rest, None);
        kept = slept;
        let _ = slot.timeline.flush();
        let first_reply_us = report.first_reply.map(|f| f.at.saturating_sub(seen_at).as_micros() as u64);
        let resumed = match from {
            Some(Origin::Sleep) => figures.wake_phases.last_mut(),
            Some(Origin::Template) => figures.template_phases.last_mut(),
            Some(Origin::Restored | Origin::Snapshot) | None => None,
        };
        if let Some(w) = resumed {
            w.first_reply_us = first_reply_us;
            w.post_wake_faults = report.first_reply.map(|f| f.faults);
        } else if from.is_none() && config.lifecycle.on_demand.is_some() {
            figures.cold_starts += 1;
            if let Some(boot) = report.boot {
                figures.boot_us.push(boot.saturating_sub(seen_at).as_micros() as u64);
            }
            figures.boot_first_reply_us.push(first_reply_us);
        }
        asleep = matches!(report.outcome, Outcome::Asleep);
        if idle_stopped && (asleep || matches!(report.outcome, Outcome::Shutdown { .. })) {
            figures.idle_shutdowns += 1;
            figures.sleeps += u64::from(asleep);
            last = Some(report);
            continue;
        }
        // Restart on failure, unless the operator interrupted or the time is up.
        let Some(restart) = &config.lifecycle.restart else { return Ok((report, figures)) };
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        if !report.outcome.is_failure()
            || figures.restarts >= u64::from(restart.limit)
            || crate::host::signals::interrupts() != interrupts
            || out_of_time
        {
            return Ok((report, figures));
        }
        figures.restarts += 1;
        let backoff =
            restart.backoff.saturating_mul(1u32 << (figures.restarts - 1).min(16) as u32).min(RESTART_BACKOFF_MAX);
        slot.timeline.record(
            config.name(),
            "restart",
            0,
            0,
            detail([
                ("restarts", figures.restarts.into()),
                ("after_exit_code", report.outcome.exit_code().into()),
                ("backoff_ms", (backoff.as_millis() as u64).into()),
            ]),
        );
        crate::host::diag::say(format_args!(
            "{}: ended with exit code {}; restart {} of {} in {} ms",
            config.name(),
            report.outcome.exit_code(),
            figures.restarts,
            restart.limit,
            backoff.as_millis()
        ));
        if let Some(d) = report.outcome.diagnosis() {
            crate::host::diag::say(format_args!("{}: {}", config.name(), d.trim_end()));
        }
        std::thread::sleep(backoff);
        boot_now = true;
        restarting = true;
        last = Some(report);
    }
}
