//! The governor thread: every accounting tick it advances each VM's policy
//! ([`crate::policy::admission::VmPolicy::tick`]) and carries out what the tick decided: reclaim
//! notices to the guest, timeline lines, the end of a VM that ignored a reclaim
//! (`--on-violation kill`), and throttling the excess vCPUs through their handles.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypercall_abi::notice;
use serde_json::Value;

use crate::base::config::OnViolation;
use crate::base::timeline::detail;
use crate::policy::admission::TICK;
use crate::policy::resource::{PolicyEvent, Resource, ResourcePolicy};
use crate::vmm::outcome::Outcome;
use crate::vmm::shared::VmShared;
use crate::vmm::vcpus::VcpuEvent;

/// One governor step for one VM.
fn step_vm(vm: &VmShared, now: Duration, credit_line: bool) {
    let online = vm.vcpus().online();
    let tick = vm.policy().tick(now, u64::from(online), vm.memory_held());
    for (r, event, state) in tick.events {
        apply(vm, r, event, &state);
    }
    // Enforcement: the excess vCPUs are held out of the guest for most of the next tick.
    for h in vm.vcpus().highest_online(tick.throttle) {
        let _ = h.send(VcpuEvent::Throttle);
    }
    if credit_line && let Some([c, m]) = vm.policy().credit_line() {
        vm.record("credit", detail([("vcpu_credit", c.into()), ("memory_credit", m.into())]));
    }
}

fn apply(vm: &VmShared, r: Resource, event: PolicyEvent, state: &ResourcePolicy) {
    let credit = state.credit.balance;
    let config = vm.policy().config();
    match event {
        PolicyEvent::ReclaimStarted(rc) => {
            let grace_ns = config.grace.as_nanos() as u64;
            match r {
                Resource::Vcpus => vm.post_notice(notice::RECLAIM_VCPUS, |n| {
                    n.vcpu_target = rc.target;
                    n.grace_ns = grace_ns;
                }),
                Resource::Memory => vm.post_notice(notice::RECLAIM_MEMORY, |n| {
                    n.memory_target = rc.target;
                    n.grace_ns = grace_ns;
                }),
            }
            vm.record(
                "reclaim",
                detail([
                    ("resource", r.name().into()),
                    ("reason", rc.reason.name().into()),
                    ("target", rc.target.into()),
                    ("grace_ms", (grace_ns / 1_000_000).into()),
                    ("credit", credit.into()),
                ]),
            );
        }
        PolicyEvent::Answered { in_grace } => {
            vm.record("reclaim_answered", detail([("resource", r.name().into()), ("in_grace", in_grace.into())]));
        }
        PolicyEvent::Violation => {
            vm.record(
                "violation",
                detail([("resource", r.name().into()), ("enforcement", Value::from(config.on_violation.name()))]),
            );
            if config.on_violation == OnViolation::Kill {
                vm.finish(Outcome::Killed { resource: r.name() });
            }
        }
        PolicyEvent::ReclaimOver => {
            let bit = match r {
                Resource::Vcpus => notice::RECLAIM_VCPUS_OVER,
                Resource::Memory => notice::RECLAIM_MEMORY_OVER,
            };
            vm.post_notice(bit, |_| {});
            vm.record("reclaim_over", detail([("resource", r.name().into()), ("credit", credit.into())]));
        }
    }
}

/// The VMs a running [`Governor`] governs; VMs booted later (on demand) join through it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Members(Arc<Mutex<Vec<Arc<VmShared>>>>);

impl Members {
    /// Governs `vm` from the next tick on (it leaves by itself once it is ending).
    pub(crate) fn add(&self, vm: Arc<VmShared>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(vm);
    }

    /// The VMs governed now, those that ended removed.
    fn current(&self) -> Vec<Arc<VmShared>> {
        let mut l = self.0.lock().unwrap_or_else(|p| p.into_inner());
        l.retain(|vm| !vm.is_stopping());
        l.clone()
    }
}

/// The governor thread of a run.
#[derive(Debug)]
pub(crate) struct Governor {
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    members: Members,
}

impl Governor {
    /// Starts governing (times are measured from `started`); VMs join through
    /// [`Governor::members`].
    pub(crate) fn start(started: Instant) -> Governor {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let members = Members::default();
        let list = members.clone();
        let handle = std::thread::Builder::new()
            .name("governor".into())
            .spawn(move || {
                crate::host::seccomp::install_thread(crate::host::seccomp::Role::Governor);
                let mut last_credit_line = Duration::ZERO;
                while !stop2.load(Ordering::Acquire) {
                    // `stop` unparks the thread, so the run's end never waits for a tick.
                    std::thread::park_timeout(TICK);
                    if stop2.load(Ordering::Acquire) {
                        break;
                    }
                    let now = started.elapsed();
                    let credit_line = now.saturating_sub(last_credit_line) >= Duration::from_millis(100);
                    for vm in &list.current() {
                        step_vm(vm, now, credit_line);
                    }
                    if credit_line {
                        last_credit_line = now;
                    }
                }
            })
            .inspect_err(|e| {
                // The VMs still run; only the policy's timed steps (credit, reclaims,
                // enforcement) are missing. Say so rather than run silently without them.
                crate::host::diag::say(format_args!(
                    "cannot start the governor thread ({e}): credit, reclaims and enforcement are off for this run"
                ));
            })
            .ok();
        Governor { handle, stop, members }
    }

    /// A handle that adds VMs to this governor (from any thread).
    pub(crate) fn members(&self) -> Members {
        self.members.clone()
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}
