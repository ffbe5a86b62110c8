//! How a VM's run ends ([`Outcome`]), with the process exit code and the diagnosis of each
//! ending.

use std::time::Duration;

use crate::base::exit;
use crate::vmm::fault::GuestFault;

impl Outcome {
    /// Whether a restart policy treats this ending as a failure: a guest fault, unbacked
    /// memory, an unserved exit, a policy kill (`--on-violation kill`, exit code 75), or a
    /// SHUTDOWN code other than 0 and 5. Timeouts, Ctrl-C and the shim's own errors are not
    /// restarted.
    pub(crate) fn is_failure(&self) -> bool {
        match self {
            Outcome::Shutdown { code } => *code != 0 && *code != 5,
            // A VM ended for keeping what it was asked to give back (exit code 75) failed too,
            // as a container killed for its memory limit has.
            Outcome::Fault(_) | Outcome::Unbacked { .. } | Outcome::Unserved { .. } | Outcome::Killed { .. } => true,
            _ => false,
        }
    }
}

/// How long a guest has to end after the idle shutdown's STOP notice before it is ended.
pub(crate) const IDLE_STOP_GRACE: Duration = Duration::from_secs(5);

/// How a run ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The guest called SHUTDOWN.
    Shutdown {
        /// Its exit code.
        code: u32,
    },
    /// The guest raised a CPU exception.
    Fault(Box<GuestFault>),
    /// The guest touched guest-physical memory that nothing backs.
    Unbacked {
        /// The vCPU.
        vcpu: u32,
        /// The address.
        gpa: u64,
        /// Whether it was a write.
        write: bool,
        /// The instruction, with its symbol when known.
        rip: String,
    },
    /// The guest caused an exit the shim does not serve.
    Unserved {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        what: String,
    },
    /// The shim itself failed.
    Internal(String),
    /// `--timeout` expired (with each vCPU's state at that moment).
    Timeout(Duration, String),
    /// The operator interrupted the run twice (Ctrl-C or SIGTERM).
    Interrupted,
    /// The guest did not stop within the grace after a SIGINT's STOP notice.
    InterruptIgnored(Duration),
    /// The VM was ended for ignoring a reclaim (`--on-violation kill`).
    Killed {
        /// The resource it would not give back.
        resource: &'static str,
    },
    /// The VM was ended for not stopping within [`IDLE_STOP_GRACE`] of its idle shutdown.
    IgnoredStop,
    /// On demand: the run ended while no VM was running (no client came, or the last VM had
    /// stopped for being idle).
    NoVm,
    /// The VM moved to another shim process (`ctl migrate`) and runs there.
    Migrated {
        /// Where to.
        to: String,
    },
    /// On demand: the idle VM was snapshotted and ended; the next client resumes it.
    Asleep,
    /// Ended at once on the control API's request (`PUT /api/v1/vms/{name}/kill`).
    KilledOnRequest,
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Shutdown { code } => u8::try_from(*code).unwrap_or(exit::GUEST_UNSERVED).min(exit::GUEST_MAX),
            Outcome::Fault(_) => exit::GUEST_FAULT,
            Outcome::Unbacked { .. } => exit::GUEST_UNBACKED,
            Outcome::Unserved { .. } => exit::GUEST_UNSERVED,
            Outcome::Internal(_) => exit::INTERNAL,
            Outcome::Timeout(..) => exit::TIMEOUT,
            Outcome::Interrupted | Outcome::InterruptIgnored(_) => exit::INTERRUPTED,
            Outcome::Killed { .. } | Outcome::IgnoredStop => exit::POLICY_KILL,
            Outcome::NoVm | Outcome::Migrated { .. } | Outcome::Asleep => 0,
            Outcome::KilledOnRequest => exit::KILLED,
        }
    }

    /// A short machine-readable reason (the summary's `exit_reason`).
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Outcome::Shutdown { .. } => "shutdown",
            Outcome::Fault(_) => "guest_fault",
            Outcome::Unbacked { .. } => "unbacked_memory",
            Outcome::Unserved { .. } => "unserved_exit",
            Outcome::Internal(_) => "internal_error",
            Outcome::Timeout(..) => "timeout",
            Outcome::Interrupted | Outcome::InterruptIgnored(_) => "interrupted",
            Outcome::Killed { .. } => "policy_kill",
            Outcome::IgnoredStop => "ignored_stop",
            Outcome::NoVm => "no_vm_running",
            Outcome::Migrated { .. } => "migrated",
            Outcome::Asleep => "asleep",
            Outcome::KilledOnRequest => "killed",
        }
    }

    /// The diagnosis printed on stderr (`None` for a normal shutdown).
    pub fn diagnosis(&self) -> Option<String> {
        match self {
            Outcome::Shutdown { .. } => None,
            Outcome::Fault(f) => Some(f.to_string()),
            Outcome::Unbacked { vcpu, gpa, write, rip } => Some(format!(
                "guest on vCPU {vcpu} {} guest-physical address {gpa:#x}, which no memory backs (RIP {rip})",
                if *write { "wrote to" } else { "read from" }
            )),
            Outcome::Unserved { vcpu, what } => Some(format!("guest on vCPU {vcpu}: {what}")),
            Outcome::Internal(what) => Some(format!("shim error: {what}")),
            Outcome::Timeout(d, states) => {
                Some(format!("run stopped after the {:.1} s timeout; vCPUs then:\n{states}", d.as_secs_f64()))
            }
            Outcome::Interrupted => Some("run interrupted (Ctrl-C twice)".into()),
            Outcome::InterruptIgnored(grace) => {
                Some(format!("run interrupted: the guest did not stop within {} ms of Ctrl-C", grace.as_millis()))
            }
            Outcome::Killed { resource } => Some(format!(
                "VM ended: it kept its {resource} above max past the reclaim grace period (--on-violation kill)"
            )),
            Outcome::IgnoredStop => Some(format!(
                "VM ended: it did not stop within {} s of the idle shutdown's STOP notice",
                IDLE_STOP_GRACE.as_secs()
            )),
            Outcome::NoVm | Outcome::Asleep => None,
            Outcome::Migrated { to } => Some(format!("VM migrated to {to}; it runs there now")),
            Outcome::KilledOnRequest => Some("VM killed on a control API request".into()),
        }
    }
}
