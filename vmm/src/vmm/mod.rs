//! VMM.

pub mod console;
pub mod fault;
pub mod hypercall;
pub mod loader;
pub mod platform;
pub mod vcpu;
pub mod vcpus;
pub mod vm;
