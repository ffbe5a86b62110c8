//! The elastic paravirtual unikernel.
//!
//! A `no_std` x86_64 kernel that runs entirely at CPL 3 inside its VM and asks the hypervisor
//! for everything through the hypercall ABI (`hypercall-abi`, `docs/abi.md`). The same ELF
//! boots under `hypervisor-shim` (entry `_start`) and under QEMU (PVH entry `pvh_start32`).
//!
//! Built for `x86_64-unknown-none` by `hypervisor-shim`'s build script. A host build (for
//! clippy and unit tests) compiles the platform-independent parts only.

#![cfg_attr(target_os = "none", no_std, no_main)]
#![cfg_attr(not(target_os = "none"), allow(dead_code, unused_imports))]

extern crate alloc;

mod apps;
mod arch;
mod cmdline;
mod console;
mod heap;
mod hypercall;
mod logger;
mod panic;
mod platform;
mod time;

use hypercall_abi::{BootInfo, exit_code};

hypercall_abi::declare_abi_note!();

/// The kernel proper, entered on vCPU 0 from either boot path with a validated boot-info block.
pub fn kernel_main(boot: BootInfo) -> ! {
    time::init(boot.tsc_khz);
    let hello = hypercall::hello();
    platform::init(hello.is_some());
    if let Some(h) = &hello {
        // The host's TSC figure is authoritative under the shim.
        time::init(h.tsc_khz.max(boot.tsc_khz));
    }
    if !heap::init(boot.heap_base, boot.heap_size) {
        println!("kernel: boot memory too small for a heap ({} bytes free)", boot.heap_size);
        platform::exit(exit_code::OUT_OF_MEMORY);
    }
    // SAFETY: the command line is `cmdline_len` bytes at `cmdline` in identity-mapped memory
    // written by the loader and never modified afterwards.
    let raw = unsafe { core::slice::from_raw_parts(boot.cmdline as *const u8, boot.cmdline_len as usize) };
    let text = core::str::from_utf8(raw).unwrap_or("");
    let cmd = match cmdline::CommandLine::parse(text) {
        Ok(c) => c,
        Err(e) => {
            println!("kernel: {e}");
            platform::exit(exit_code::BAD_COMMAND_LINE);
        }
    };
    if !logger::init(cmd.option("log").unwrap_or("info")) {
        println!("kernel: unknown log level '{}', using info", cmd.option("log").unwrap_or(""));
    }
    let name = cmd.option("app").unwrap_or("hello");
    let Some(app) = apps::find(name) else {
        println!("kernel: no service named '{name}' in this image; available:");
        for a in apps::APPS {
            println!("  {:<12} {}", a.name, a.about);
        }
        platform::exit(exit_code::BAD_COMMAND_LINE);
    };
    log::debug!("starting service '{}' with {} argument(s)", app.name, cmd.args.len());
    let env = apps::Env { args: &cmd.args, boot: &boot, hello: hello.as_ref(), platform: platform::current() };
    let code = (app.main)(&env);
    platform::exit(code)
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "the kernel is built for x86_64-unknown-none and booted by hypervisor-shim; this host build only exists for tests and lints"
    );
}
