//! The control layer: who runs the VMs and how the outside reaches them.
//!
//! * [`run`]: a run of one or several VMs (binding endpoints, admitting VMs, the governor,
//!   the API), and [`on_demand`]: slots that boot a VM when a client comes or again after a
//!   failure.
//! * [`controller`]: the owner thread of each VM, which serves its events and control
//!   requests ([`request`]); [`registry`]: the running VMs by name; [`api`]: the HTTP control
//!   API, which only forwards requests to owners; [`governor`]: the accounting thread.
//! * [`resume`]: runs that start from a snapshot or a migration.

pub(crate) mod admit;
pub(crate) mod api;
pub(crate) mod controller;
pub(crate) mod governor;
pub(crate) mod on_demand;
pub(crate) mod registry;
pub(crate) mod request;
pub(crate) mod resume;
pub(crate) mod run;
