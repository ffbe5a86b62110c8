//! `elastic-vmm`: the KVM VMM core of the elastic unikernel.

pub mod base;
pub mod control;
pub mod devices;
pub mod host;
pub mod policy;
pub mod report;
pub mod snapshot;
pub mod vmm;
