//! Host helpers (base layer): seccomp allow-lists, CPU placement, signals, clocks and process
//! figures, the host endpoints clients connect to, and stderr diagnostics that never block.

pub(crate) mod affinity;
pub(crate) mod clock;
pub(crate) mod diag;
pub(crate) mod endpoint;
pub(crate) mod process;
pub(crate) mod seccomp;
pub(crate) mod signals;
