//! Host helpers (base layer): seccomp allow-lists, CPU placement, signals, clocks and process
//! figures, and the host endpoints clients connect to.

pub(crate) mod affinity;
pub(crate) mod clock;
pub(crate) mod endpoint;
pub(crate) mod process;
pub(crate) mod seccomp;
pub(crate) mod signals;
