//! The base layer: configuration and its grammar, the guest-physical layout, guest memory,
//! the [`persist::Persist`] trait, the timeline and the exit codes. Everything above uses it;
//! it uses nothing above it.

pub(crate) mod config;
pub mod exit;
pub(crate) mod layout;
pub(crate) mod memory;
pub(crate) mod persist;
pub(crate) mod timeline;
