//! What the control API asks of a VM's owner ([`ControlRequest`]), how the answer goes back
//! ([`Replier`]), and everything that reaches an owner ([`OwnerEvent`]).

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::base::config::Policy;
use crate::snapshot::channel::Destination;
use crate::vmm::shared::VmEvent;

/// What the API asks of a VM.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ControlRequest {
    /// Name, service, state, holdings, uptime.
    Brief,
    /// The summary's figures, live.
    Get,
    /// The figures the Prometheus exposition shows.
    Metrics,
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Ask the guest to stop (a STOP notice).
    Stop,
    /// End the VM at once.
    Kill,
    /// New max and burst (min stays) for the resources given.
    SetPolicy { vcpus: Option<Policy>, memory: Option<Policy> },
    /// Save the VM into this directory; it runs on.
    Snapshot { dir: PathBuf },
    /// Move the VM to the receiver at `to` (`receive --listen`); it ends here.
    Migrate { to: Destination, how: crate::snapshot::migrate::CopyMode },
}

/// An answer: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ControlReply {
    pub(crate) status: u16,
    pub(crate) body: Value,
}

impl ControlReply {
    pub(crate) fn ok(body: Value) -> Self {
        ControlReply { status: 200, body }
    }

    /// An error: `{"error": message}`.
    pub(crate) fn error(status: u16, message: impl std::fmt::Display) -> Self {
        ControlReply { status, body: json!({ "error": message.to_string() }) }
    }
}

/// Where an answer goes. A request dropped unanswered (its VM ended first) answers 404.
pub(crate) struct Replier {
    send: Option<Box<dyn FnOnce(ControlReply) + Send>>,
    vm: String,
}

impl std::fmt::Debug for Replier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replier").field("vm", &self.vm).finish_non_exhaustive()
    }
}

impl Replier {
    /// Answers through `send` (a request about VM `vm`).
    pub(crate) fn new(vm: &str, send: impl FnOnce(ControlReply) + Send + 'static) -> Self {
        Replier { send: Some(Box::new(send)), vm: vm.to_string() }
    }

    /// Answers.
    pub(crate) fn reply(mut self, r: ControlReply) {
        if let Some(send) = self.send.take() {
            send(r);
        }
    }
}

impl Drop for Replier {
    fn drop(&mut self) {
        if let Some(send) = self.send.take() {
            send(ControlReply::error(404, format!("no running VM named '{}'", self.vm)));
        }
    }
}

/// What reaches the owner of a VM.
#[derive(Debug)]
pub(crate) enum OwnerEvent {
    /// The VM's own events.
    Vm(VmEvent),
    /// The operator pressed Ctrl-C (the count so far).
    Interrupt(u32),
    /// A control request.
    Control(ControlRequest, Replier),
}
