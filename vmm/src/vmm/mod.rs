//! The VMM layer: one VM and its threads.
//!
//! * [`vm`]: creation, start and end of a VM; [`shared`]: the state its threads share.
//! * [`vcpu`]: a vCPU and its thread's loop; [`vcpus`]: the handles that drive vCPU threads
//!   (events, wake-ups, the kick signal) and the set of them; [`cpu_state`]: what a snapshot
//!   saves of a vCPU.
//! * [`hypercall`]: the calls a guest makes; [`notices`]: the host's notices to it.
//! * [`loader`] (the kernel ELF), [`platform`] (the privileged structures the shim builds),
//!   [`console`], [`fault`] (diagnoses), [`outcome`], [`error`], [`stats`].

pub(crate) mod console;
pub(crate) mod cpu_state;
pub(crate) mod error;
pub(crate) mod fault;
pub(crate) mod hypercall;
pub(crate) mod loader;
pub(crate) mod notices;
pub(crate) mod outcome;
pub(crate) mod platform;
pub(crate) mod shared;
pub(crate) mod stats;
pub(crate) mod vcpu;
pub(crate) mod vcpus;
pub(crate) mod vm;
