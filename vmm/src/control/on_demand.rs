//! VM slots that boot a VM more than once: scale to zero and restart on failure.
//!
//! Scale to zero (`--on-demand`): the shim holds a VM's published endpoints with no VM
//! running; the first client to connect boots one, which is handed that connection (and every
//! one that queued meanwhile in the listen backlog). After `--idle-shutdown` with no connection
//! open, the device stops accepting (newcomers wait in the backlog), the guest is asked to stop,
//! and once it has, the shim waits for the next client. Every boot is a `cold_start` line in the
//! timeline, every idle stop an `idle_shutdown` line.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use serde::Serialize;

use crate::base::timeline::{Timeline, detail};
use crate::devices::vsock::Bound;
use crate::policy::admission::Members;
use crate::policy::pool::Pool;
use crate::vmm::loader::KernelImage;
use crate::vmm::vm::{Outcome, RunReport, Vm, VmConfig, VmError};

/// The on-demand figures of a VM slot (the summary's `on_demand`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct OnDemandFigures {
    /// VMs booted because a client connected.
    pub cold_starts: u64,
    /// VMs stopped for being idle.
    pub idle_shutdowns: u64,
    /// For each cold start: µs from the shim seeing the waiting client to the guest's HELLO.
    pub boot_us: Vec<u64>,
    /// VMs booted again after a failure (`restart = "on-failure"`).
    #[serde(skip)]
    pub restarts: u64,
}

/// What a slot needs to boot its VM again and again.
pub struct Slot<'a> {
    /// The VM's configuration (its `timeout` bounds the whole slot).
    pub config: &'a VmConfig,
    /// Its kernel image.
    pub image: Arc<KernelImage>,
    /// `/dev/kvm`.
    pub kvm: &'a Kvm,
    /// When the shim started.
    pub started: Instant,
    /// The run's timeline.
    pub timeline: Arc<Timeline>,
    /// The pool the VM is admitted to at every boot.
    pub pool: &'a Arc<Pool>,
    /// The governor the VM joins at every boot.
    pub members: Members,
    /// The listening endpoints (the slot keeps them for the whole run; each VM gets copies).
    pub endpoints: Vec<Bound>,
    /// Makes a console sink for each VM.
    pub console: &'a (dyn Fn() -> Box<dyn Write + Send> + Sync),
    /// The slot's pool member (its min reserved for the whole run: see
    /// [`Pool::reserve`](crate::policy::pool::Pool::reserve)).
    pub member: usize,
}

impl std::fmt::Debug for Slot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("vm", &self.config.name)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

/// Why the wait for a client ended.
enum Waited {
    Client,
    Interrupted,
    Timeout,
}

/// Waits until a client is waiting on one of `endpoints`, the operator interrupts (the
/// interrupt count moves from `seen`), or `deadline` passes.
fn wait_for_client(endpoints: &[Bound], deadline: Option<Instant>, seen: u32) -> Waited {
    let mut fds: Vec<libc::pollfd> =
        endpoints.iter().map(|e| libc::pollfd { fd: e.raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    loop {
        if crate::host::signals::interrupts() != seen {
            return Waited::Interrupted;
        }
        let mut wait = Duration::from_millis(50);
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Waited::Timeout;
            }
            wait = wait.min(left);
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.as_millis() as libc::c_int) };
        if n > 0 && fds.iter().any(|f| f.revents & libc::POLLIN != 0) {
            return Waited::Client;
        }
    }
}

/// Runs a slot (an on-demand VM, or one that restarts on failure) until the operator stops it,
/// its timeout passes, or a VM ends for a reason that neither an idle shutdown nor the
/// restart policy covers. Returns the last
/// VM's report (or one saying no VM ran) and the slot's figures.
pub fn serve(slot: Slot<'_>) -> Result<(RunReport, OnDemandFigures), VmError> {
    let config = slot.config;
    let deadline = config.timeout.map(|t| Instant::now() + t);
    let mut figures = OnDemandFigures::default();
    let mut last: Option<RunReport> = None;
    let interrupts = crate::host::signals::interrupts();
    let end_without_vm = |last: Option<RunReport>, outcome: Outcome| match last {
        Some(mut r) => {
            r.outcome = outcome;
            r.wall = slot.started.elapsed();
            r
        }
        None => RunReport::without_vm(config, outcome, slot.started.elapsed()),
    };
    if config.on_demand {
        let addresses: Vec<String> = slot.endpoints.iter().map(Bound::describe).collect();
        eprintln!(
            "hypervisor-shim: {}: on demand, no VM running; the first client on {} boots it",
            config.name,
            addresses.join(", ")
        );
    }
    let mut boot_now = !config.on_demand;
    loop {
        if !boot_now {
            match wait_for_client(&slot.endpoints, deadline, interrupts) {
                Waited::Client => {}
                Waited::Interrupted => return Ok((end_without_vm(last, Outcome::NoVm), figures)),
                Waited::Timeout => {
                    let outcome = Outcome::Timeout(config.timeout.unwrap_or_default(), "no VM running".into());
                    return Ok((end_without_vm(last, outcome), figures));
                }
            }
        }
        boot_now = false;
        let seen_at = slot.started.elapsed();
        if config.on_demand {
            slot.timeline.record(
                &config.name,
                "cold_start",
                0,
                0,
                detail([("cold_starts", (figures.cold_starts + 1).into())]),
            );
        }
        let endpoints = slot
            .endpoints
            .iter()
            .map(Bound::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VmError::Device(format!("cannot share the listening sockets with the new VM: {e}")))?;
        let mut cycle = config.clone();
        cycle.pool_member = Some(slot.member);
        cycle.timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        let vm = Vm::create(
            &cycle,
            Arc::clone(&slot.image),
            slot.kvm,
            slot.started,
            Arc::clone(&slot.timeline),
            slot.pool,
            (slot.console)(),
            endpoints,
        )?;
        slot.members.add(Arc::clone(vm.shared()));
        let report = vm.run();
        let _ = slot.timeline.flush();
        if config.on_demand {
            figures.cold_starts += 1;
            if let Some(boot) = report.boot {
                figures.boot_us.push(boot.saturating_sub(seen_at).as_micros() as u64);
            }
        }
        let idle = report.vsock.as_ref().is_some_and(|v| v.idle_shutdown);
        if idle && matches!(report.outcome, Outcome::Shutdown { .. }) {
            figures.idle_shutdowns += 1;
            last = Some(report);
            continue;
        }
        // Restart on failure, unless the operator interrupted or the time is up.
        let Some(restart) = config.restart else { return Ok((report, figures)) };
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        if !report.outcome.is_failure()
            || figures.restarts >= u64::from(restart.limit)
            || crate::host::signals::interrupts() != interrupts
            || out_of_time
        {
            return Ok((report, figures));
        }
        figures.restarts += 1;
        let backoff = restart
            .backoff
            .saturating_mul(1u32 << (figures.restarts - 1).min(16) as u32)
            .min(crate::vmm::vm::RESTART_BACKOFF_MAX);
        slot.timeline.record(
            &config.name,
            "restart",
            0,
            0,
            detail([
                ("restarts", figures.restarts.into()),
                ("after_exit_code", report.outcome.exit_code().into()),
                ("backoff_ms", (backoff.as_millis() as u64).into()),
            ]),
        );
        eprintln!(
            "hypervisor-shim: {}: ended with exit code {}; restart {} of {} in {} ms",
            config.name,
            report.outcome.exit_code(),
            figures.restarts,
            restart.limit,
            backoff.as_millis()
        );
        if let Some(d) = report.outcome.diagnosis() {
            eprintln!("hypervisor-shim: {}: {}", config.name, d.trim_end());
        }
        std::thread::sleep(backoff);
        boot_now = true;
        last = Some(report);
    }
}
