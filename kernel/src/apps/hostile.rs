//! `hostile`: a guest that misbehaves on purpose. It issues malformed hypercalls (argument
//! blocks and buffers outside guest RAM, lengths that overflow, unknown call numbers, codes
//! and ids out of range, an `out` of the wrong width) and checks that every one gets the
//! documented status back while the VM keeps running.
//!
//! `hostile setup-flood [N]`: N (default: without end) refused device-setup steps, each of
//! which makes the shim want to print a diagnostic; it must rate-limit them and never wait
//! for a stderr that nobody reads.

use core::arch::asm;
use elastic_rt::prelude::*;
use elastic_rt::println;
use elastic_rt::raw::call;

use hypercall_abi::{
    BlockArgs, CONSOLE_WRITE_MAX, Call, ConsoleWriteArgs, Extent, HYPERCALL_PORT, HelloArgs, KickArgs, MemGrantArgs,
    MemReleaseArgs, ShutdownArgs, Status, VcpuUpArgs, exit_code,
};

/// The `hostile` service.
pub const SERVICE: Service = Service {
    name: "hostile",
    usage: "[setup-flood [N]]",
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
    Status(unsafe { raw::out_hypercall(number, gpa) } as i32)
}

fn grant(bytes: u64, out: &mut [Extent]) -> (Status, u32) {
    let mut g = MemGrantArgs::new(bytes, out.as_mut_ptr() as u64, out.len() as u32);
    let s = call(&mut g);
    (s, g.count)
}

fn release(extents: &[Extent]) -> Status {
    call(&mut MemReleaseArgs::new(extents.as_ptr() as u64, extents.len() as u32))
}

/// Malformed grants and releases. With a hot-plug window (at least 4 MiB below burst) it also
/// grants, refuses bad releases of a live extent, fills up to burst and releases.
fn memory_checks(c: &mut Checks, has_window: bool) {
    let mut ext = [Extent::default(); 4];
    c.expect("MEM_GRANT of 0 bytes", grant(0, &mut ext).0, Status::INVALID);
    let mut g = MemGrantArgs::new(2 << 20, ext.as_mut_ptr() as u64, 0);
    c.expect("MEM_GRANT with no room for extents", call(&mut g), Status::INVALID);
    let mut g = MemGrantArgs::new(2 << 20, ext.as_mut_ptr() as u64, 1000);
    c.expect("MEM_GRANT with a huge extent count", call(&mut g), Status::INVALID);
    let mut g = MemGrantArgs::new(2 << 20, OUTSIDE, 4);
    c.expect("MEM_GRANT with its array outside RAM", call(&mut g), Status::INVALID);
    let mut r = MemReleaseArgs::new(ext.as_ptr() as u64, 0);
    c.expect("MEM_RELEASE of no extents", call(&mut r), Status::INVALID);
    let mut r = MemReleaseArgs::new(ext.as_ptr() as u64, 100_000);
    c.expect("MEM_RELEASE with a huge count", call(&mut r), Status::INVALID);
    let mut r = MemReleaseArgs::new(OUTSIDE, 1);
    c.expect("MEM_RELEASE with its array outside RAM", call(&mut r), Status::INVALID);
    c.expect("MEM_RELEASE of boot memory", release(&[Extent { base: 0x20_0000, len: 2 << 20 }]), Status::INVALID);
    if !has_window {
        c.expect("MEM_GRANT without a hot-plug window", grant(2 << 20, &mut ext).0, Status::DENIED);
        return;
    }
    let (s, n) = grant(4 << 20, &mut ext);
    c.expect("MEM_GRANT of 4 MiB", s, Status::OK);
    if s != Status::OK || n == 0 {
        return;
    }
    let e = ext[0];
    let p = e.base as *mut u64;
    // SAFETY: the host just granted this extent; identity-mapped.
    unsafe { p.write_volatile(0x1234_5678) };
    c.expect("MEM_RELEASE of half an extent", release(&[Extent { base: e.base, len: e.len / 2 }]), Status::INVALID);
    c.expect("MEM_RELEASE of an extent listed twice", release(&[e, e]), Status::INVALID);
    c.expect(
        "MEM_RELEASE overlapping a granted extent",
        release(&[Extent { base: e.base + (2 << 20), len: e.len }]),
        Status::INVALID,
    );
    // Nothing was released by the refused calls: the data is intact.
    // SAFETY: still granted.
    let intact = unsafe { p.read_volatile() } == 0x1234_5678;
    c.expect("data intact after refused releases", if intact { Status::OK } else { Status::INVALID }, Status::OK);
    let mut rest = [Extent::default(); 4];
    let (s, m) = grant(1 << 40, &mut rest);
    c.expect("MEM_GRANT far beyond burst: partial grant", s, Status::OK);
    let (s, _) = grant(2 << 20, &mut [Extent::default(); 1]);
    c.expect("MEM_GRANT at burst", s, Status::DENIED);
    c.expect("MEM_RELEASE of the partial grant", release(&rest[..m as usize]), Status::OK);
    c.expect("MEM_RELEASE of the extent", release(&ext[..n as usize]), Status::OK);
    c.expect("MEM_RELEASE of an already released extent", release(&ext[..n as usize]), Status::INVALID);
}

/// Calls whose block, buffer or extent array lies below the kernel (GDT, IDT, page tables,
/// boot info, notice page) must be refused with INVALID, and nothing there may change.
fn protected_checks(c: &mut Checks) {
    let info = hypercall_abi::BOOT_INFO_ADDR as *const u8;
    let len = core::mem::size_of::<hypercall_abi::BootInfo>();
    let read_info = || -> alloc::vec::Vec<u8> {
        // SAFETY: boot info is identity-mapped and readable at CPL 3 (the runtime reads it at
        // boot); this only copies it.
        (0..len).map(|i| unsafe { info.add(i).read_volatile() }).collect()
    };
    let before = read_info();
    let protected =
        [0u64, 0x1000, 0x2000, hypercall_abi::BOOT_INFO_ADDR, hypercall_abi::NOTICE_ADDR, 0x10_0000, 0x1f_fff0];
    for gpa in protected {
        for call in [Call::Ping, Call::Events, Call::Report, Call::Shutdown, Call::Hello, Call::Block] {
            c.expect("a block below the kernel", raw(call.number(), gpa), Status::INVALID);
        }
        let _ = raw(999, gpa);
        let mut w = ConsoleWriteArgs::new(gpa, 16);
        c.expect("CONSOLE_WRITE of a buffer below the kernel", call(&mut w), Status::INVALID);
        let mut g = MemGrantArgs::new(2 << 20, gpa, 1);
        c.expect("MEM_GRANT with its array below the kernel", call(&mut g), Status::INVALID);
        let mut r = MemReleaseArgs::new(gpa, 1);
        c.expect("MEM_RELEASE with its array below the kernel", call(&mut r), Status::INVALID);
    }
    let intact = read_info() == before;
    c.expect("boot info intact after the calls", if intact { Status::OK } else { Status::INVALID }, Status::OK);
    if intact {
        println!("hostile: boot info intact after {} calls below the kernel", protected.len() * 10);
    }
}

/// Refused vsock setup steps: the first device's page gets features the device never offered
/// and FEATURES_OK, then a STATUS_CHANGED notify, `n` times (`None`: until the VM is stopped).
fn setup_flood(env: &Env, n: Option<u64>) -> u32 {
    use hypercall_abi::virtio::{STATUS_CHANGED, VirtioDeviceRegs, feature, notify_value, status};
    if env.boot.device_count == 0 {
        println!("hostile: setup-flood needs a device");
        return exit_code::FAILURE;
    }
    let regs = env.boot.devices as *mut VirtioDeviceRegs;
    let mut refused = 0u64;
    let mut i = 0u64;
    println!("hostile: flooding the device with refused setup steps");
    while n.is_none_or(|n| i < n) {
        // SAFETY: the first device page, identity-mapped and writable by the driver; only the
        // driver's fields are written.
        unsafe {
            core::ptr::addr_of_mut!((*regs).status).write_volatile(0);
            core::ptr::addr_of_mut!((*regs).driver_features).write_volatile(feature::VERSION_1 | 1 << 63);
            core::ptr::addr_of_mut!((*regs).status)
                .write_volatile(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        }
        let s = raw(Call::DeviceNotify.number(), notify_value(0, STATUS_CHANGED));
        refused += u64::from(s == Status::INVALID);
        i += 1;
    }
    println!("hostile: {refused} of {i} setup steps refused");
    if refused == i { exit_code::SUCCESS } else { exit_code::FAILURE }
}

fn main(env: &Env) -> u32 {
    if env.hello.is_none() {
        println!("hostile: needs the shim (no host answered HELLO)");
        return exit_code::FAILURE;
    }
    match env.args.first().map(alloc::string::String::as_str) {
        None => {}
        Some("setup-flood") => {
            return match env.args.get(1).map(|a| a.parse::<u64>()) {
                None => setup_flood(env, None),
                Some(Ok(n)) if n > 0 => setup_flood(env, Some(n)),
                _ => usage_error("hostile", "[setup-flood [N]]", format_args!("N must be a positive number")),
            };
        }
        Some(other) => {
            return usage_error("hostile", "[setup-flood [N]]", format_args!("unknown mode '{other}'"));
        }
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
    memory_checks(&mut c, env.boot.window_size > 0);
    protected_checks(&mut c);
    // The VM is still healthy: a normal call works.
    c.expect("a normal call afterwards", raw::ping(), Status::OK);
    println!("hostile: {} checks passed, {} failed", c.passed, c.failed);
    if c.failed == 0 { exit_code::SUCCESS } else { exit_code::FAILURE }
}
