//! `panic` and `fault`: deliberate failures that show how the platform reports them.

use elastic_rt::prelude::*;
use elastic_rt::println;

/// The `panic` service: panics with a message.
pub const PANIC: Service = Service {
    name: "panic",
    usage: "",
    about: "panic on purpose (shows the panic report)",
    main: |env| run_sync(env, panic_main),
};

/// The `fault` service: touches an address that must not work.
pub const FAULT: Service = Service {
    name: "fault",
    usage: "[unmapped|window|released]",
    about: "touch an unmapped address (#PF), an ungranted or a released window address (unbacked)",
    main: |env| run_sync(env, fault_main),
};

/// A canonical address that no page table maps (64 TiB): touching it raises #PF.
pub const UNMAPPED_ADDRESS: u64 = 0x0000_4000_0000_0000;

fn panic_main(_env: &Env) -> u32 {
    panic!("the 'panic' service panicked on purpose");
}

fn fault_main(env: &Env) -> u32 {
    let target = match env.args.first().map(|a| a.as_str()) {
        None | Some("unmapped") => UNMAPPED_ADDRESS,
        Some("window") if env.boot.window_size > 0 => env.boot.window_base,
        Some("released") if env.boot.window_size > 0 => {
            let mut ext = [hypercall_abi::Extent::default(); 1];
            match memory::grant_raw(2 << 20, &mut ext) {
                Ok(1) => {
                    let base = ext[0].base;
                    // SAFETY: granted just now; identity-mapped.
                    unsafe { (base as *mut u64).write_volatile(7) };
                    let _ = memory::release_raw(&ext);
                    println!("fault: granted, wrote and released {:#x}+2M", base);
                    base
                }
                _ => {
                    println!("fault: the host granted nothing");
                    return hypercall_abi::exit_code::FAILURE;
                }
            }
        }
        Some("window" | "released") => {
            println!("fault: this VM has no hot-plug window (give it one with --memory MIN:MAX:BURST)");
            return hypercall_abi::exit_code::BAD_COMMAND_LINE;
        }
        Some(other) => {
            println!("fault: unknown target '{other}' (unmapped, window, released)");
            return hypercall_abi::exit_code::BAD_COMMAND_LINE;
        }
    };
    println!("fault: writing to {target:#x}");
    console::flush();
    let p = target as *mut u64;
    // SAFETY: deliberately unsound: this write is meant to fail, and the failure ends the VM.
    unsafe { p.write_volatile(0xdead_beef) };
    println!("fault: the write did not fault");
    hypercall_abi::exit_code::FAILURE
}
