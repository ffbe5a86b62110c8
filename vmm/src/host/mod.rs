//! Host helpers.

pub mod affinity;
pub mod seccomp;
pub mod signals;
