//! The default unikernel image: the elastic runtime (`elastic-rt`) with every bundled service,
//! selected on the shim with `--app NAME` (`--app help` lists them).
//!
//! Built for `x86_64-unknown-none` by `hypervisor-shim`'s build script and booted by the shim
//! (or by QEMU through its PVH entry). A host build (for clippy and unit tests) compiles the
//! services' platform-independent parts only.

#![cfg_attr(target_os = "none", no_std, no_main)]
#![cfg_attr(not(target_os = "none"), allow(dead_code, unused_imports))]

extern crate alloc;

mod apps;

elastic_rt::entry!(apps::SERVICES);

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "the kernel is built for x86_64-unknown-none and booted by hypervisor-shim; this host build only exists for tests and lints"
    );
}
