//! Host helpers (base layer): seccomp allow-lists, CPU placement, signals, clocks and process
//! figures, the host endpoints clients connect to, threads and huge pages made ahead of need, stderr
//! diagnostics that never block, and the userfaultfd of a post-copy migration.

pub(crate) mod affinity;
pub(crate) mod clock;
pub(crate) mod diag;
pub(crate) mod endpoint;
pub(crate) mod hugepages;
pub(crate) mod process;
pub(crate) mod seccomp;
pub(crate) mod signals;
pub(crate) mod standby;
pub(crate) mod uffd;
