//! Hypercall dispatch: copy the argument block out of guest memory once, validate it, serve
//! the call, write results and status back.
//!
//! Nothing a guest passes is trusted: the block address, every address and length inside it
//! and every count are checked before use, and a bad call gets a status back, never a crash.

use hypercall_abi::{
    ABI_VERSION, ArgBlock, CONSOLE_WRITE_MAX, Call, ConsoleWriteArgs, HelloArgs, SHUTDOWN_CODE_MAX, ShutdownArgs,
    Status,
};

use crate::vm::{Outcome, VmShared};

/// What the vCPU loop does after a call.
#[derive(Debug)]
pub enum Flow {
    /// Resume the guest.
    Continue,
    /// End the run with this outcome.
    Stop(Outcome),
}

/// Serves one hypercall from vCPU `vcpu`: `call` is the number from `eax` (`None` if the
/// `out` was not 4 bytes wide), `gpa` the argument block's address from `rdi`. Returns the
/// status (also written into the block when it is readable) and what to do next.
pub fn dispatch(vm: &VmShared, vcpu: u32, call: Option<u32>, gpa: u64) -> (Status, Flow) {
    let Some(number) = call else {
        vm.stats.count_call(0);
        return (write_status_only(vm, gpa, Status::INVALID), Flow::Continue);
    };
    vm.stats.count_call(number);
    match Call::from_number(number) {
        Some(Call::Hello) => serve(vm, gpa, |a: &mut HelloArgs| hello(vm, vcpu, a)),
        Some(Call::ConsoleWrite) => serve(vm, gpa, |a: &mut ConsoleWriteArgs| console_write(vm, a)),
        Some(Call::Shutdown) => serve(vm, gpa, |a: &mut ShutdownArgs| shutdown(a)),
        None => (write_status_only(vm, gpa, Status::UNSUPPORTED), Flow::Continue),
    }
}

/// Copies the block in, runs `f` on the copy, writes the copy (with its status) back.
fn serve<T: ArgBlock>(vm: &VmShared, gpa: u64, f: impl FnOnce(&mut T) -> (Status, Flow)) -> (Status, Flow) {
    let Ok(mut block) = vm.mem.read_obj::<T>(gpa) else {
        return (Status::INVALID, Flow::Continue);
    };
    let (status, flow) = f(&mut block);
    block.header_mut().status = status.0;
    // The block was readable a moment ago; if it vanished since, rax still carries the status.
    let _ = vm.mem.write_obj(gpa, &block);
    (status, flow)
}

/// Writes `status` into the header at `gpa` if that is guest RAM.
fn write_status_only(vm: &VmShared, gpa: u64, status: Status) -> Status {
    let _ = vm.mem.write_obj(gpa, &status.0);
    status
}

fn hello(vm: &VmShared, vcpu: u32, a: &mut HelloArgs) -> (Status, Flow) {
    let _ = vm.first_hello.set(vm.started.elapsed());
    a.host_abi_version = ABI_VERSION;
    a.vcpu_id = vcpu;
    a.host_features = 0;
    a.features = a.guest_features & a.host_features;
    a.vcpus = vm.vcpus.limits();
    a.memory = vm.memory.limits();
    a.tsc_khz = vm.tsc_khz;
    let status = if a.guest_abi_version == ABI_VERSION { Status::OK } else { Status::UNSUPPORTED };
    (status, Flow::Continue)
}

fn console_write(vm: &VmShared, a: &mut ConsoleWriteArgs) -> (Status, Flow) {
    a.written = 0;
    if a.len > CONSOLE_WRITE_MAX {
        return (Status::INVALID, Flow::Continue);
    }
    match vm.mem.read_vec(a.buf, a.len) {
        Ok(bytes) => {
            vm.console_write(&bytes);
            a.written = a.len;
            (Status::OK, Flow::Continue)
        }
        Err(_) => (Status::INVALID, Flow::Continue),
    }
}

fn shutdown(a: &mut ShutdownArgs) -> (Status, Flow) {
    if a.code > SHUTDOWN_CODE_MAX {
        return (Status::INVALID, Flow::Continue);
    }
    (Status::OK, Flow::Stop(Outcome::Shutdown { code: a.code }))
}
