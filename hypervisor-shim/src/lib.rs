//! `hypervisor-shim`: a small KVM VMM that boots the elastic unikernel at CPL 3, serves its
//! hypercalls (`hypercall-abi`, `docs/abi.md`) and enforces its resource policy.
//!
//! Modules: [`config`] (flags and policies), [`loader`] (kernel ELF), [`layout`] and
//! [`platform`] (the guest-physical map and the privileged structures built in it),
//! [`memory`] (guest RAM), [`vm`] and [`vcpu`] (KVM objects and threads), [`hypercall`]
//! (dispatch), [`fault`] (diagnoses), [`summary`] (JSON), [`qemu`] (the QEMU path),
//! [`bench`] (measurements) and [`cli`].

pub mod affinity;
pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod console;
pub mod ctl;
pub mod demo;
pub mod devices;
pub mod exit;
pub mod fault;
pub mod governor;
pub mod hypercall;
pub mod layout;
pub mod loader;
pub mod loadgen;
pub mod memory;
pub mod on_demand;
pub mod platform;
pub mod plot;
pub mod policy;
pub mod pool;
pub mod pool_config;
pub mod qemu;
pub mod run;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod stress;
pub mod summary;
pub mod timeline;
pub mod vcpu;
pub mod vcpu_set;
pub mod vm;
