//! `hostile`: a guest that misbehaves on purpose. It issues malformed hypercalls (argument
//! blocks and buffers outside guest RAM, lengths that overflow, unknown call numbers, codes
//! and ids out of range, an `out` of the wrong width) and checks that every one gets the
//! documented status back while the VM keeps running.

use core::arch::asm;

use hypercall_abi::{
    BlockArgs, CONSOLE_WRITE_MAX, Call, ConsoleWriteArgs, HYPERCALL_PORT, HelloArgs, KickArgs, ShutdownArgs, Status,
    VcpuUpArgs, exit_code,
};

use super::{App, Env, run_sync};
use crate::arch::cpu;
use crate::hypercall::call;
use crate::println;

/// The `hostile` service.
pub const APP: App = App {
    name: "hostile",
    usage: "",
    about: "issue malformed hypercalls and check each gets a status (the shim must stay up)",
    main: |env| run_sync(env, main),
};

/// A guest-physical address far outside any VM's RAM.
const OUTSIDE: u64 = 0x7fff_0000_0000;

struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    fn expect(&mut self, what: &str, got: Status, want: Status) {
        if got == want {
            self.passed += 1;
        } else {
            self.failed += 1;
            println!("hostile: {what}: got {} ({}), expected {}", got.name(), got.0, want.name());
        }
    }
}

/// A raw call with an arbitrary number and block address; the status from `eax`.
fn raw(number: u32, gpa: u64) -> Status {
    // SAFETY: deliberately malformed calls; the shim must refuse them without touching guest
    // memory outside RAM. Nothing here relies on the block being valid.
    Status(unsafe { cpu::hypercall(number, gpa) } as i32)
}

fn main(env: &Env) -> u32 {
    if env.hello.is_none() {
        println!("hostile: needs the shim (no host answered HELLO)");
        return exit_code::FAILURE;
    }
    let mut c = Checks { passed: 0, failed: 0 };
    c.expect("unknown call number", raw(999, 0x20_0000), Status::UNSUPPORTED);
    c.expect("call number 0", raw(0, 0x20_0000), Status::UNSUPPORTED);
    c.expect("HELLO block outside RAM", raw(Call::Hello.number(), OUTSIDE), Status::INVALID);
    c.expect(
        "HELLO block straddling the end of the address space",
        raw(Call::Hello.number(), u64::MAX - 8),
        Status::INVALID,
    );
    c.expect("BLOCK block outside RAM", raw(Call::Block.number(), OUTSIDE), Status::INVALID);
    let mut w = ConsoleWriteArgs::new(0x20_0000, CONSOLE_WRITE_MAX + 1);
    c.expect("CONSOLE_WRITE too long", call(&mut w), Status::INVALID);
    let mut w = ConsoleWriteArgs::new(OUTSIDE, 16);
    c.expect("CONSOLE_WRITE buffer outside RAM", call(&mut w), Status::INVALID);
    let mut w = ConsoleWriteArgs::new(u64::MAX - 10, 100);
    c.expect("CONSOLE_WRITE buffer wrapping around", call(&mut w), Status::INVALID);
    let mut s = ShutdownArgs::new(200);
    c.expect("SHUTDOWN with an out-of-range code", call(&mut s), Status::INVALID);
    let mut up = VcpuUpArgs::new(0x1000, 0x30_0000, 0);
    c.expect("VCPU_UP entry in the platform area", call(&mut up), Status::INVALID);
    let mut up = VcpuUpArgs::new(OUTSIDE, 0x30_0000, 0);
    c.expect("VCPU_UP entry outside RAM", call(&mut up), Status::INVALID);
    let mut up = VcpuUpArgs::new(0x20_0000, 0, 0);
    c.expect("VCPU_UP stack 0", call(&mut up), Status::INVALID);
    let mut up = VcpuUpArgs::new(0x20_0000, OUTSIDE, 0);
    c.expect("VCPU_UP stack outside RAM", call(&mut up), Status::INVALID);
    c.expect("VCPU_DOWN of vCPU 0", raw(Call::VcpuDown.number(), 0), Status::INVALID);
    let mut k = KickArgs::new(9999);
    c.expect("KICK of a vCPU that does not exist", call(&mut k), Status::INVALID);
    let mut h = HelloArgs::new(0);
    h.guest_abi_version = 77;
    c.expect("HELLO for another ABI version", call(&mut h), Status::UNSUPPORTED);
    // An `out` of the wrong width to the hypercall port.
    let mut b = BlockArgs::new(0);
    let eax: u32;
    // SAFETY: a 1-byte `out`; the shim answers INVALID in eax and ignores the block.
    unsafe {
        asm!("out dx, al", in("dx") HYPERCALL_PORT, inout("eax") Call::Block.number() => eax,
             in("rdi") &mut b as *mut BlockArgs as u64, options(nostack, preserves_flags));
    }
    c.expect("1-byte out to the hypercall port", Status(eax as i32), Status::INVALID);
    // The VM is still healthy: a normal call works.
    c.expect("a normal call afterwards", crate::hypercall::ping(), Status::OK);
    println!("hostile: {} checks passed, {} failed", c.passed, c.failed);
    if c.failed == 0 { exit_code::SUCCESS } else { exit_code::FAILURE }
}
