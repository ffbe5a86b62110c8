//! `elastic-rt`: the runtime of the elastic paravirtual unikernel.
//!
//! A `no_std` x86_64 runtime that runs entirely at CPL 3 inside its VM and asks the
//! hypervisor for everything through the hypercall ABI (`hypercall-abi`, `docs/abi.md`): it
//! boots (under `hypervisor-shim`, entry `_start`, or under QEMU, PVH entry), runs an SMP task
//! executor whose vCPUs come and go with the load, keeps an elastic heap that grows by memory
//! grants and gives extents back, and carries a request channel (virtio-vsock over a
//! paravirtual transport) that clients on the host reach through the shim's published ports.
//!
//! # Writing a service
//!
//! A service is an `async` function from its [`Env`] to an exit code (`0..=63`). An image is a
//! binary crate that depends on this one, lists its services and hands them to [`entry!`]:
//!
//! ```text
//! #![no_std]
//! #![no_main]
//! use elastic_rt::{Env, Service, println};
//!
//! const HELLO: Service = Service::new("greet", "", "say hello", |env: Env| {
//!     elastic_rt::boxed(async move {
//!         println!("hello with {} argument(s)", env.args.len());
//!         0
//!     })
//! });
//! elastic_rt::entry!(&[HELLO]);
//! ```
//!
//! The image's build script links it with the runtime's linker script (see the README, "Write
//! your own service"). A service uses only this crate's public API:
//!
//! * [`task`]: spawn tasks on any online vCPU, yield, sleep;
//! * [`net`]: serve a vsock port with a task per connection ([`net::serve`]), or listen and
//!   accept yourself; read and write connections;
//! * [`time`]: the clock;
//! * [`vcpus`] and [`memory`]: what the VM holds, and explicit requests to the host;
//! * [`println!`], [`print!`] and the `log` crate for output;
//! * [`platform`]: where the kernel runs, and exiting;
//! * [`raw`]: the hypercall layer itself, for test and benchmark services.
//!
//! The runtime's controllers see the load without any service-specific code: runnable tasks
//! (each connection is a task) bring vCPUs up, heap use brings memory in.

#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(not(target_os = "none"), allow(dead_code, unused_imports))]

extern crate alloc;

// Layers, bottom up. A module uses modules of lower layers only, never its own layer or a
// higher one; news travels up through return values and the closures a caller passes down
// (`smp::idle_block` is told what counts as work, `smp::begin_idle_down` whether it may go).
// The module-cycles check (`module-cycles runtime/src`) finds no cycle.
//
//   0  arch::cpu, cmdline         instructions legal at CPL 3; command-line parsing
//   1  hypercall, time, percpu    typed hypercalls; the TSC clock; per-CPU slots
//   2  sync                       the lock vCPUs share (backs off to the host when held long)
//   3  console, heap, virtio      console device and buffer; boot + elastic heap; PV transport
//   4  platform, logger           shim or QEMU, and exit; `log` over the console
//   5  service, smp               what an image offers; vCPU mechanics (up, down, idle, kick)
//   6  executor, timer            the run queue (spawn, join); sleeps
//   7  net, elastic               request channel and `serve`; the vCPU and memory controllers
//   8  notices                    host notices, applied to the controllers
//   9  worker                     each vCPU's loop: task boundaries, running tasks, idling
//  10  lib.rs, panic, arch::entry, arch::pvh
//                                 boot (`kernel_main`), the facade below, the panic handler,
//                                 and the entry points. Entering the kernel is the one upward
//                                 step: `_start` (and QEMU's `pvh_main`) continue in
//                                 `kernel_main`, and `secondary_entry`, whose address `smp`
//                                 hands to VCPU_UP, calls `worker::secondary_main` by symbol.
mod arch;
mod cmdline;
pub mod console;
mod elastic;
mod executor;
mod heap;
mod hypercall;
mod logger;
pub mod net;
mod notices;
mod panic;
mod percpu;
pub mod platform;
#[doc(hidden)]
pub mod service;
mod smp;
mod steal;
mod sync;
pub mod time;
mod timer;
mod virtio;
mod worker;

pub use service::{Env, Service, ServiceFuture, boxed, run_sync, services, usage_error};

use alloc::string::ToString;
use core::sync::atomic::{AtomicU32, Ordering};

use hypercall_abi::{BootInfo, exit_code};

/// Tasks: spawn, join, yield and sleep. Tasks run on whichever vCPU is online; the executor
/// is cooperative (a task runs until it awaits), so long computations should
/// [`yield_now`](task::yield_now) now and then.
pub mod task {
    pub use crate::executor::{JoinHandle, runnable, spawn, yield_now};
    pub use crate::timer::{Sleep, sleep_ms, sleep_ns};
}

/// vCPUs: how many are online, the VM's policy, and explicit requests to the controller.
pub mod vcpus {
    pub use crate::elastic::{
        cancel_down_requests, counters, request_down, set_auto, up, vcpu_target as reclaim_target,
    };
    pub use crate::notices::host_online_vcpus;
    pub use crate::smp::{UpError, idle, limits, online, take_peak};
}

/// Memory: what the VM holds, heap figures, and raw extents for services that manage memory
/// themselves.
pub mod memory {
    pub use crate::elastic::memory_target as reclaim_target;
    pub use crate::heap::{HeapStats, boot_ram, counters, grant_raw, grow_now, held, release_raw, stats, window_size};
}

/// Load figures the host records in its timeline (REPORT).
pub mod report {
    pub use crate::elastic::{report, set_user_figure};
}

/// The hypercall layer and per-CPU internals, for test and benchmark services (`hostile`,
/// `vcpu-bench`). Ordinary services never need these.
pub mod raw {
    pub use crate::arch::cpu::{hypercall as out_hypercall, nop_exit};
    pub use crate::hypercall::{block, call, kick, ping};
    pub use crate::percpu::{CPUS, PerCpu, state as cpu_state};
}

/// Everything a service usually needs, in one import: `use elastic_rt::prelude::*;` (import
/// [`println!`](crate::println) by name: `use elastic_rt::println;`).
pub mod prelude {
    pub use crate::task::{JoinHandle, sleep_ms, sleep_ns, spawn, yield_now};
    pub use crate::{Env, Service, ServiceFuture, boxed, run_sync, usage_error};
    pub use crate::{console, memory, net, platform, raw, report, task, time, vcpus};
}

/// `SERVICE_EXIT` while the service runs.
const RUNNING: u32 = u32::MAX;

/// The service's exit code once it finished.
static SERVICE_EXIT: AtomicU32 = AtomicU32::new(RUNNING);

/// Declares the image's services and the notes the shim reads before it boots the image (the
/// ABI version and the service list). Use once, in the image's binary crate, with an
/// expression of type `&'static [Service]` that can be evaluated in a const.
#[macro_export]
macro_rules! entry {
    ($services:expr) => {
        const __ELASTIC_SERVICES: &[$crate::Service] = $services;
        const __ELASTIC_SERVICE_NAMES: [&str; __ELASTIC_SERVICES.len()] =
            $crate::service::names::<{ __ELASTIC_SERVICES.len() }>(__ELASTIC_SERVICES);
        $crate::__abi::declare_abi_note!();
        $crate::__abi::declare_service_list!(&__ELASTIC_SERVICE_NAMES);

        /// The runtime's entry into the image: its services.
        #[unsafe(no_mangle)]
        pub fn __elastic_rt_services() -> &'static [$crate::Service] {
            __ELASTIC_SERVICES
        }
    };
}

#[doc(hidden)]
pub use hypercall_abi as __abi;

/// The kernel proper, entered on vCPU 0 from either boot path with a validated boot-info block.
pub(crate) fn kernel_main(boot: BootInfo) -> ! {
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
        match hypercall_abi::parse_switch(v) {
            Some(on) => notices::set_cooperate(on),
            None => log::warn!("ignoring bad value elastic.cooperate={v}"),
        }
    }
    elastic::init(tuning);
    smp::init(hello.as_ref().map(|h| h.vcpus));
    virtio::init(&boot, hello.as_ref());
    steal::init(hello.as_ref());
    log::debug!("per-CPU pointer in GS: {}", arch::cpu::has_fsgsbase());
    let name = cmd.option("app").unwrap_or("hello");
    let Some(service) = service::find(name) else {
        println!("kernel: no service named '{name}' in this image; available:");
        for s in service::services() {
            println!("  {:<12} {}", s.name, s.about);
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
    log::debug!("starting service '{}' with {} argument(s) on {} vCPU(s)", service.name, cmd.args.len(), smp::online());
    let env =
        Env { args: cmd.args.iter().map(|a| a.to_string()).collect(), boot, hello, platform: platform::current() };
    let body = (service.main)(env);
    executor::spawn(async move {
        let code = body.await;
        SERVICE_EXIT.store(code, Ordering::Release);
        // vCPU 0 may be blocked with nothing to do: wake it to shut down.
        smp::kick_boot_vcpu();
    });
    let slot = percpu::current();
    worker::run(slot, &|| SERVICE_EXIT.load(Ordering::Acquire) != RUNNING || notices::stop_requested());
    let code = match SERVICE_EXIT.load(Ordering::Acquire) {
        RUNNING => {
            println!("kernel: stopping at the host's request");
            exit_code::STOPPED
        }
        code => code,
    };
    let n = net::stats();
    log::debug!(
        "request path: {} pumps ({} left to another vCPU), {} packets sent, {} received, {} notifies, {} full transmit queues; {} lock back-offs",
        n.pumps.0,
        n.pumps.1,
        n.packets.0,
        n.packets.1,
        n.packets.2,
        n.packets.3,
        sync::back_offs()
    );
    platform::exit(code)
}
