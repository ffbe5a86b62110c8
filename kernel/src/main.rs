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
mod elastic;
mod executor;
mod heap;
mod hypercall;
mod logger;
mod notices;
mod panic;
mod percpu;
mod platform;
mod smp;
mod time;
mod timer;

use alloc::string::ToString;
use core::sync::atomic::{AtomicU32, Ordering};

use hypercall_abi::{BootInfo, exit_code};

/// `SERVICE_EXIT` while the service runs.
const RUNNING: u32 = u32::MAX;

/// The service's exit code once it finished.
static SERVICE_EXIT: AtomicU32 = AtomicU32::new(RUNNING);

hypercall_abi::declare_abi_note!();

/// The kernel proper, entered on vCPU 0 from either boot path with a validated boot-info block.
pub fn kernel_main(boot: BootInfo) -> ! {
    time::init(boot.tsc_khz, time::TscSource::Shim);
    let hello = hypercall::hello();
    platform::init(hello.is_some());
    match &hello {
        // The host's TSC figure is authoritative under the shim.
        Some(h) => time::init(h.tsc_khz.max(boot.tsc_khz), time::TscSource::Shim),
        None => {
            let (khz, source) = time::tsc_khz_from_cpuid();
            time::init(khz, source);
        }
    }
    if !heap::init(boot.heap_base, boot.heap_size, boot.ram_size, boot.window_base, boot.window_size) {
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
    for (key, _) in &cmd.options {
        if *key != "app" && hypercall_abi::find_option(key).is_none() {
            log::warn!("ignoring unknown kernel option '{key}'");
        }
    }
    let tuning = elastic::Tuning::from_cmdline(&cmd, &mut |k, v| log::warn!("ignoring bad value {k}={v}"));
    if let Some(v) = cmd.option("elastic.cooperate") {
        match elastic::parse_switch(v) {
            Some(on) => notices::set_cooperate(on),
            None => log::warn!("ignoring bad value elastic.cooperate={v}"),
        }
    }
    elastic::init(tuning);
    smp::init(hello.as_ref().map(|h| h.vcpus));
    log::debug!("per-CPU pointer in GS: {}", arch::cpu::has_fsgsbase());
    let name = cmd.option("app").unwrap_or("hello");
    let Some(app) = apps::find(name) else {
        println!("kernel: no service named '{name}' in this image; available:");
        for a in apps::APPS {
            println!("  {:<12} {}", a.name, a.about);
        }
        platform::exit(exit_code::BAD_COMMAND_LINE);
    };
    // The policy's min is reserved for this VM: bring it online now.
    let (min, _, _) = smp::limits();
    while smp::online() < min {
        if let Err(e) = smp::bring_up() {
            log::error!("could not bring the reserved minimum of {min} vCPUs online: {e:?}");
            break;
        }
    }
    log::debug!("starting service '{}' with {} argument(s) on {} vCPU(s)", app.name, cmd.args.len(), smp::online());
    let env = apps::Env {
        args: cmd.args.iter().map(|a| a.to_string()).collect(),
        boot,
        hello,
        platform: platform::current(),
    };
    let service = (app.main)(env);
    executor::spawn(async move {
        let code = service.await;
        SERVICE_EXIT.store(code, Ordering::Release);
        // vCPU 0 may be blocked with nothing to do: wake it to shut down.
        smp::kick_boot_vcpu();
    });
    let slot = percpu::current();
    executor::worker_loop(slot, &|| SERVICE_EXIT.load(Ordering::Acquire) != RUNNING || notices::stop_requested());
    let code = match SERVICE_EXIT.load(Ordering::Acquire) {
        RUNNING => {
            println!("kernel: stopping at the host's request");
            exit_code::STOPPED
        }
        code => code,
    };
    platform::exit(code)
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "the kernel is built for x86_64-unknown-none and booted by hypervisor-shim; this host build only exists for tests and lints"
    );
}
