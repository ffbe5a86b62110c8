//! The thread that owns a VM: it starts the VM, then serves, one at a time, everything that
//! happens to it — the VM's own events (it ended, a device asks it to stop), Ctrl-C, its time
//! limit, and the control requests the API sends ([`ControlRequest`]) — until the VM ends.
//! No other thread pauses, snapshots or migrates a VM: they send a request here and get the
//! answer back through a [`crate::control::request::Replier`].

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use hypercall_abi::notice;
use serde_json::{Value, json};

use crate::base::config::Policy;
use crate::base::timeline::detail;
use crate::control::governor::Members;
use crate::control::registry::Registry;
use crate::control::request::{ControlReply, ControlRequest, OwnerEvent};
use crate::devices::StopReason;
use crate::host::signals::SIGINT_STOP_GRACE;
use crate::policy::resource::Resource;
use crate::report::summary::Summary;
use crate::snapshot::VmState;
use crate::snapshot::template::{TemplateKey, Templates};
use crate::vmm::outcome::{IDLE_STOP_GRACE, Outcome};
use crate::vmm::shared::{EventSink, VmEvent, VmShared};
use crate::vmm::stats::RunReport;
use crate::vmm::vm::{RunningVm, Vm};

/// How long `pause` waits for running vCPUs to leave the guest before answering.
const PAUSE_WAIT: Duration = Duration::from_secs(1);

/// The owner's channel: made before the VM (whose events go into it).
#[derive(Debug)]
pub(crate) struct Owner {
    tx: Sender<OwnerEvent>,
    rx: Receiver<OwnerEvent>,
}

impl Owner {
    /// A new channel.
    pub(crate) fn new() -> Owner {
        let (tx, rx) = std::sync::mpsc::channel();
        Owner { tx, rx }
    }

    /// Where the VM sends its events.
    pub(crate) fn sink(&self) -> EventSink {
        let tx = self.tx.clone();
        Arc::new(move |e| {
            let _ = tx.send(OwnerEvent::Vm(e));
        })
    }
}

/// How a driven VM ended.
#[derive(Debug)]
pub(crate) struct Driven {
    /// Its report.
    pub(crate) report: RunReport,
    /// It stopped because a device asked (scale to zero: no client for the idle time).
    pub(crate) idle_stopped: bool,
    /// It went to sleep: the state its sleep directory holds.
    pub(crate) slept: Option<Box<VmState>>,
}

/// What an owner needs besides its VM: the registry the API finds VMs in, the governor's
/// members, and the VM's time limit.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) registry: Registry,
    pub(crate) members: Members,
}

/// What an on-demand slot's VM does at rest: where an idle stop puts it to sleep, and where
/// the template of its service goes when the VM is to take it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AtRest<'a> {
    /// With it, an idle stop snapshots the VM there and ends it ([`Outcome::Asleep`])
    /// instead of asking the guest to stop.
    pub(crate) sleep_to: Option<&'a Path>,
    /// With it, the VM's template point (its device stopped at the first accepted client)
    /// takes the service's template into this store.
    pub(crate) template: Option<(&'a Templates, &'a TemplateKey)>,
}

/// Starts `vm` and serves everything that happens to it until it ends (`timeout`: its time
/// limit). The calling thread is the VM's owner; `rest` says what it does when the VM is idle
/// or first serves; `announce` is called once the control API can reach the VM.
pub(crate) fn drive(
    vm: Vm,
    owner: Owner,
    ctx: &Context,
    timeout: Option<Duration>,
    rest: AtRest<'_>,
    announce: Option<Box<dyn FnOnce() + '_>>,
) -> Driven {
    let Owner { tx, rx } = owner;
    let interrupts = {
        let tx = tx.clone();
        crate::host::signals::subscribe(move |n| {
            let _ = tx.send(OwnerEvent::Interrupt(n));
        })
    };
    let running = vm.start();
    let shared = Arc::clone(running.shared());
    ctx.members.add(Arc::clone(&shared));
    // An admitted VM that starts after a signal asked its pool to end is asked to stop as the
    // others were (the signal came before it subscribed).
    let late = crate::host::signals::interrupts();
    if announce.is_some() && late > 0 {
        let _ = tx.send(OwnerEvent::Interrupt(late));
    }
    let registered = ctx.registry.register(shared.name(), tx);
    if let Some(announce) = announce {
        announce();
    }
    let (idle_stopped, slept) = serve(&running, &rx, timeout, rest);
    drop(registered);
    drop(interrupts);
    let report = running.end();
    // Requests that came too late are answered (404) as the channel goes.
    drop(rx);
    Driven { report, idle_stopped, slept }
}

/// The owner's loop. Returns whether a device's stop request ended the VM, and the state of
/// its sleep if it went to sleep.
fn serve(
    running: &RunningVm,
    rx: &Receiver<OwnerEvent>,
    timeout: Option<Duration>,
    rest: AtRest<'_>,
) -> (bool, Option<Box<VmState>>) {
    let vm = running.shared();
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut idle_stop_at: Option<Instant> = None;
    let mut slept = None;
    // After a SIGINT: when the run ends whether or not the guest stopped.
    let mut interrupt_end_at: Option<Instant> = None;
    while vm.outcome().is_none() {
        let wake_at =
            [deadline, idle_stop_at.map(|t| t + IDLE_STOP_GRACE), interrupt_end_at].into_iter().flatten().min();
        let event = match wake_at {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match event {
            Err(RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    vm.finish(Outcome::Timeout(timeout.unwrap_or_default(), vm.vcpu_states()));
                } else if interrupt_end_at.is_some_and(|t| now >= t) {
                    vm.finish(Outcome::InterruptIgnored(SIGINT_STOP_GRACE));
                } else if idle_stop_at.is_some_and(|t| now >= t + IDLE_STOP_GRACE) {
                    vm.finish(Outcome::IgnoredStop);
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Ok(OwnerEvent::Vm(VmEvent::Ended)) => {}
            Ok(OwnerEvent::Vm(VmEvent::TemplatePoint)) => {
                if let Some((store, key)) = rest.template {
                    take_template(vm, store, key);
                }
            }
            Ok(OwnerEvent::Vm(VmEvent::DeviceStop(StopReason::Idle(after)))) => {
                if idle_stop_at.is_none() {
                    vm.record("idle_shutdown", detail([("idle_ms", (after.as_millis() as u64).into())]));
                    idle_stop_at = Some(Instant::now());
                    slept = rest.sleep_to.and_then(|dir| go_to_sleep(vm, dir));
                    if slept.is_none() {
                        vm.post_notice(notice::STOP, |_| {});
                    }
                }
            }
            Ok(OwnerEvent::Interrupt(n)) => {
                if n >= 2 {
                    vm.finish(Outcome::Interrupted);
                } else if crate::host::signals::sigint_seen() {
                    crate::host::diag::say(format_args!(
                        "asking the guest to stop (the run ends in {} ms if it does not; Ctrl-C again to end it now)",
                        SIGINT_STOP_GRACE.as_millis()
                    ));
                    vm.post_notice(notice::STOP, |_| {});
                    interrupt_end_at = Some(Instant::now() + SIGINT_STOP_GRACE);
                } else {
                    crate::host::diag::say(format_args!("asking the guest to stop (a second signal ends the run now)"));
                    vm.post_notice(notice::STOP, |_| {});
                }
            }
            Ok(OwnerEvent::Control(request, replier)) => replier.reply(answer(vm, request)),
        }
    }
    (idle_stop_at.is_some(), slept)
}

/// Snapshots the idle `vm` into `dir` and ends it asleep, returning the state written; `None`
/// (said on stderr) when the snapshot failed and the VM runs on (the caller then stops it:
/// the next client boots).
fn go_to_sleep(vm: &VmShared, dir: &Path) -> Option<Box<VmState>> {
    match crate::snapshot::save_and_keep_stopped(vm, dir) {
        Ok((f, state)) => {
            vm.record(
                "sleep",
                detail([
                    ("held_bytes", f.held_bytes.into()),
                    ("written_bytes", f.written_bytes.into()),
                    ("took_us", f.total_us.into()),
                ]),
            );
            vm.finish(Outcome::Asleep);
            Some(state)
        }
        Err(e) => {
            crate::host::diag::say(format_args!(
                "{}: cannot go to sleep ({e}); stopping instead (the next client boots afresh)",
                vm.name()
            ));
            None
        }
    }
}

/// Takes the service's template from `vm`, stopped at its template point (a `template` line in
/// the timeline), then lets client data flow; a failure is said on stderr and the VM serves on
/// (the next first start boots).
fn take_template(vm: &VmShared, store: &Templates, key: &TemplateKey) {
    let taken = store.take(vm, key);
    vm.devices().open_gates();
    match taken {
        Ok(f) => vm.record(
            "template",
            detail([
                ("held_bytes", f.held_bytes.into()),
                ("written_bytes", f.written_bytes.into()),
                ("paused_us", f.paused_us.into()),
                ("took_us", f.total_us.into()),
            ]),
        ),
        Err(e) => {
            crate::host::diag::say(format_args!("{}: cannot take the service's template ({e})", vm.name()));
        }
    }
}

/// `took_us`: how long the operation took inside the shim.
fn with_took(mut v: Value, since: Instant) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.insert("took_us".into(), (since.elapsed().as_micros() as u64).into());
    }
    v
}

fn state(vm: &VmShared) -> &'static str {
    if vm.is_stopping() {
        "stopping"
    } else if vm.is_paused() {
        "paused"
    } else {
        "running"
    }
}

fn brief(vm: &VmShared) -> Value {
    json!({
        "name": vm.name(),
        "app": vm.app(),
        "state": state(vm),
        "vcpus": vm.vcpus().online(),
        "memory_bytes": vm.memory_held(),
        "uptime_us": vm.uptime().as_micros() as u64,
    })
}

/// The summary's keys, live (`state` instead of `exit_code` and `exit_reason`).
fn live(vm: &VmShared) -> Value {
    let report = vm.report(Outcome::NoVm);
    let [pv, pm] = &report.policy;
    let summary = Summary::new(&report, vm.name(), vm.app(), pv.limits, pm.limits, 0);
    let mut v = serde_json::to_value(summary).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("exit_code");
        o.remove("exit_reason");
        o.remove("started_monotonic_ns");
        o.insert("state".into(), state(vm).into());
        o.insert("restarts".into(), vm.restarts_before().into());
        let vcpu_ns: u64 = vm.vcpus().all().iter().map(|h| h.cpu_ns()).sum();
        o.insert("vcpu_cpu_us".into(), (vcpu_ns / 1000).into());
    }
    v
}

/// The figures of [`crate::control::api`]'s Prometheus families, for this VM.
fn metrics(vm: &VmShared) -> Value {
    let r = vm.report(Outcome::NoVm);
    let connections =
        r.devices.iter().find(|(name, _)| *name == "vsock").and_then(|(_, f)| f["connections"].as_f64()).unwrap_or(0.0);
    json!({
        "name": vm.name(),
        "app": vm.app(),
        "values": {
            "elastic_vm_up": f64::from(u8::from(!vm.is_paused())),
            "elastic_vcpus_online": f64::from(r.vcpus.online),
            "elastic_vcpus_min": r.policy[0].limits.min as f64,
            "elastic_vcpus_max": r.policy[0].limits.max as f64,
            "elastic_vcpus_burst": r.policy[0].limits.burst as f64,
            "elastic_memory_bytes": r.memory.final_bytes as f64,
            "elastic_memory_min_bytes": r.policy[1].limits.min as f64,
            "elastic_memory_max_bytes": r.policy[1].limits.max as f64,
            "elastic_memory_burst_bytes": r.policy[1].limits.burst as f64,
            "elastic_hypercalls_total": r.hypercalls as f64,
            "elastic_vcpu_ups_total": r.vcpus.ups as f64,
            "elastic_vcpu_downs_total": r.vcpus.downs as f64,
            "elastic_memory_grants_total": r.memory.grants as f64,
            "elastic_memory_releases_total": r.memory.releases as f64,
            "elastic_denied_total": r.denied as f64,
            "elastic_reclaims_total": (r.policy[0].reclaims + r.policy[1].reclaims) as f64,
            "elastic_violations_total": (r.policy[0].violations + r.policy[1].violations) as f64,
            "elastic_vsock_connections_total": connections,
            "elastic_uptime_seconds": vm.uptime().as_secs_f64(),
            "elastic_host_cpu_seconds_total": crate::host::process::process_cpu_us() as f64 / 1e6,
        },
    })
}

/// Serves one control request on the owner's thread.
fn answer(vm: &VmShared, request: ControlRequest) -> ControlReply {
    let name = vm.name();
    match request {
        ControlRequest::Brief => ControlReply::ok(brief(vm)),
        ControlRequest::Get => ControlReply::ok(live(vm)),
        ControlRequest::Metrics => ControlReply::ok(metrics(vm)),
        ControlRequest::Pause => {
            let t = Instant::now();
            if vm.pause(PAUSE_WAIT) {
                ControlReply::ok(with_took(brief(vm), t))
            } else {
                ControlReply::error(409, format!("VM '{name}' is already paused"))
            }
        }
        ControlRequest::Resume => {
            let t = Instant::now();
            if vm.resume() {
                ControlReply::ok(with_took(brief(vm), t))
            } else {
                ControlReply::error(409, format!("VM '{name}' is not paused"))
            }
        }
        ControlRequest::Stop => {
            vm.post_notice(notice::STOP, |_| {});
            ControlReply { status: 202, body: brief(vm) }
        }
        ControlRequest::Kill => {
            vm.finish(Outcome::KilledOnRequest);
            ControlReply { status: 202, body: brief(vm) }
        }
        ControlRequest::SetPolicy { vcpus, memory } => set_policy(vm, vcpus, memory),
        ControlRequest::Snapshot { dir } => {
            if vm.is_stopping() {
                return ControlReply::error(409, format!("VM '{name}' is stopping"));
            }
            if vm.mem().arriving() {
                return ControlReply::error(409, format!("VM '{name}' is still receiving its memory (post-copy)"));
            }
            match crate::snapshot::save(vm, &dir) {
                Ok(f) => ControlReply::ok(serde_json::to_value(f).unwrap_or(Value::Null)),
                Err(e @ crate::snapshot::SnapshotError::NoParent(_)) => ControlReply::error(400, e),
                Err(e) => ControlReply::error(500, e),
            }
        }
        ControlRequest::Migrate { to, how } => {
            if vm.is_stopping() {
                return ControlReply::error(409, format!("VM '{name}' is stopping"));
            }
            if vm.mem().arriving() {
                return ControlReply::error(409, format!("VM '{name}' is still receiving its memory (post-copy)"));
            }
            match crate::snapshot::migrate::send(vm, &to, how) {
                Ok(f) => {
                    vm.finish(Outcome::Migrated { to: to.to_string() });
                    ControlReply::ok(serde_json::to_value(f).unwrap_or(Value::Null))
                }
                // Its message says the VM stays stopped here.
                Err(
                    e @ (crate::snapshot::migrate::MigrateError::Unclear(_)
                    | crate::snapshot::migrate::MigrateError::PostcopyLost(_)),
                ) => ControlReply::error(500, e),
                Err(e) => ControlReply::error(500, format!("{e} (the VM keeps running here)")),
            }
        }
    }
}

fn set_policy(vm: &VmShared, vcpus: Option<Policy>, memory: Option<Policy>) -> ControlReply {
    let changes: Vec<(Resource, Policy)> =
        [(Resource::Vcpus, vcpus), (Resource::Memory, memory)].into_iter().filter_map(|(r, p)| Some((r, p?))).collect();
    if changes.is_empty() {
        return ControlReply::error(400, "nothing to change: give \"vcpus\" and/or \"memory\"");
    }
    // Check every change before applying any.
    for (r, p) in &changes {
        if let Err(e) = vm.policy().check_limits(*r, *p) {
            return ControlReply::error(400, e);
        }
        // Granted memory lives in the hot-plug window laid out (and mapped by the guest's
        // page tables) at boot: a burst past its end could never be granted.
        let layout = vm.layout();
        let ceiling = layout.ram_size + layout.window_size;
        if *r == Resource::Memory && p.burst > ceiling {
            return ControlReply::error(
                400,
                format!(
                    "memory: burst cannot rise above {} MiB on a running VM (the hot-plug window it booted with ends \
                     there; boot it with a higher memory burst)",
                    ceiling >> 20
                ),
            );
        }
    }
    for (r, p) in changes {
        let held = match r {
            Resource::Vcpus => u64::from(vm.vcpus().online()),
            Resource::Memory => vm.memory_held(),
        };
        if let Err(e) = vm.policy().set_limits(r, p, held) {
            return ControlReply::error(400, e);
        }
        vm.record(
            "policy",
            detail([
                ("resource", r.name().into()),
                ("min", p.min.into()),
                ("max", p.max.into()),
                ("burst", p.burst.into()),
            ]),
        );
    }
    // The page shows the new limits; the notice tells the guest to take them.
    vm.post_notice(hypercall_abi::notice::POLICY, |_| {});
    ControlReply::ok(live(vm))
}
