//! `panic` and `fault`: deliberate failures that show how the platform reports them.

use super::{App, Env, run_sync};

/// The `panic` service: panics with a message.
pub const PANIC: App = App {
    name: "panic",
    usage: "",
    about: "panic on purpose (shows the panic report)",
    main: |env| run_sync(env, panic_main),
};

/// The `fault` service: touches an unmapped address.
pub const FAULT: App = App {
    name: "fault",
    usage: "",
    about: "touch an unmapped address (shows the #PF diagnosis)",
    main: |env| run_sync(env, fault_main),
};

/// A canonical address that no page table maps (64 TiB): touching it raises #PF.
pub const UNMAPPED_ADDRESS: u64 = 0x0000_4000_0000_0000;

fn panic_main(_env: &Env) -> u32 {
    panic!("the 'panic' service panicked on purpose");
}

fn fault_main(_env: &Env) -> u32 {
    crate::println!("fault: writing to unmapped address {UNMAPPED_ADDRESS:#x}");
    crate::console::flush();
    let p = UNMAPPED_ADDRESS as *mut u64;
    // SAFETY: deliberately unsound: this write is meant to fault, and the fault ends the VM.
    unsafe { p.write_volatile(0xdead_beef) };
    crate::println!("fault: the write did not fault");
    hypercall_abi::exit_code::FAILURE
}
