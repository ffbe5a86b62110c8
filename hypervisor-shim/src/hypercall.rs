//! Hypercall dispatch: copy the argument block out of guest memory once, validate it, serve
//! the call, write results and status back.
//!
//! Nothing a guest passes is trusted: the block address, every address and length inside it
//! and every count are checked before use, and a bad call gets a status back, never a crash.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hypercall_abi::{
    ABI_VERSION, ArgBlock, BLOCK_FOREVER, BlockArgs, CONSOLE_WRITE_MAX, Call, ConsoleWriteArgs, EXTENT_ALIGN,
    EXTENTS_HELD_MAX, EventsArgs, Extent, HelloArgs, KERNEL_MIN_LOAD_ADDR, KickArgs, MEM_EXTENTS_MAX, MemGrantArgs,
    MemReleaseArgs, PingArgs, ReportArgs, SHUTDOWN_CODE_MAX, ShutdownArgs, Status, VcpuUpArgs, wake,
};
use serde_json::Value;
use zerocopy::{FromBytes, IntoBytes};

use crate::policy::Resource;
use crate::timeline::detail;
use crate::vcpu_set::{Entry, UpPlan, VcpuControl};
use crate::vm::{Outcome, VmShared};

/// What the vCPU loop does after a call.
#[derive(Debug)]
pub enum Flow {
    /// Resume the guest.
    Continue,
    /// The calling vCPU went down: park its thread until it is reused.
    Park,
    /// End the run with this outcome.
    Stop(Outcome),
}

/// Serves one hypercall from the vCPU `ctl`: `call` is the number from `eax` (`None` if the
/// `out` was not 4 bytes wide), `gpa` the argument block's address from `rdi`. Returns the
/// status (also written into the block when it is readable) and what to do next.
pub fn dispatch(vm: &Arc<VmShared>, ctl: &Arc<VcpuControl>, call: Option<u32>, gpa: u64) -> (Status, Flow) {
    let Some(number) = call else {
        vm.stats.count_call(0);
        return (write_status_only(vm, gpa, Status::INVALID), Flow::Continue);
    };
    vm.stats.count_call(number);
    let Some(call) = Call::from_number(number) else {
        return (write_status_only(vm, gpa, Status::UNSUPPORTED), Flow::Continue);
    };
    match call {
        Call::Hello => serve(vm, gpa, |a: &mut HelloArgs| hello(vm, ctl.id, a)),
        Call::ConsoleWrite => serve(vm, gpa, |a: &mut ConsoleWriteArgs| console_write(vm, a)),
        Call::Shutdown => serve(vm, gpa, |a: &mut ShutdownArgs| shutdown(a)),
        Call::Ping => serve(vm, gpa, |_: &mut PingArgs| (Status::OK, Flow::Continue)),
        Call::VcpuUp => serve(vm, gpa, |a: &mut VcpuUpArgs| vcpu_up(vm, a)),
        Call::VcpuDown => vcpu_down(vm, ctl),
        Call::Block => serve(vm, gpa, |a: &mut BlockArgs| block(vm, ctl, a)),
        Call::Kick => serve(vm, gpa, |a: &mut KickArgs| kick(vm, a)),
        Call::Events => serve(vm, gpa, |a: &mut EventsArgs| events(vm, a)),
        Call::Report => serve(vm, gpa, |a: &mut ReportArgs| report(vm, ctl, a)),
        Call::MemGrant => serve(vm, gpa, |a: &mut MemGrantArgs| mem_grant(vm, a)),
        Call::MemRelease => serve(vm, gpa, |a: &mut MemReleaseArgs| mem_release(vm, a)),
        // No block: `gpa` (rdi) carries the device and queue.
        Call::DeviceNotify => (vm.devices.notify(&vm.mem, gpa), Flow::Continue),
    }
}

/// Whether the guest may name `[gpa, gpa + len)` as a hypercall block, buffer or extent
/// array: guest RAM at or above [`KERNEL_MIN_LOAD_ADDR`]. Below it lie the shim's GDT, TSS,
/// IDT, exception stubs, page tables, boot info, command line and notice page, which no call
/// may read or overwrite (the guest-protected region, docs/abi.md).
pub fn guest_range(vm: &VmShared, gpa: u64, len: u64) -> bool {
    gpa >= KERNEL_MIN_LOAD_ADDR && vm.mem.is_ram(gpa, len)
}

/// Copies the block in, runs `f` on the copy, writes the copy (with its status) back.
fn serve<T: ArgBlock>(vm: &VmShared, gpa: u64, f: impl FnOnce(&mut T) -> (Status, Flow)) -> (Status, Flow) {
    if !guest_range(vm, gpa, size_of::<T>() as u64) {
        return (Status::INVALID, Flow::Continue);
    }
    let Ok(mut block) = vm.mem.read_obj::<T>(gpa) else {
        return (Status::INVALID, Flow::Continue);
    };
    let (status, flow) = f(&mut block);
    block.header_mut().status = status.0;
    // The block was readable a moment ago; if it vanished since, rax still carries the status.
    let _ = vm.mem.write_obj(gpa, &block);
    (status, flow)
}

/// Writes `status` into the header at `gpa` if the guest may name it.
fn write_status_only(vm: &VmShared, gpa: u64, status: Status) -> Status {
    if guest_range(vm, gpa, size_of::<i32>() as u64) {
        let _ = vm.mem.write_obj(gpa, &status.0);
    }
    status
}

fn hello(vm: &VmShared, vcpu: u32, a: &mut HelloArgs) -> (Status, Flow) {
    if vm.first_hello.set(vm.started.elapsed()).is_ok() {
        let _ = vm.stats.rss_boot.set(crate::memory::process_rss_bytes());
    }
    a.host_abi_version = ABI_VERSION;
    a.vcpu_id = vcpu;
    a.host_features = if vm.devices.count() > 0 { hypercall_abi::features::VIRTIO_TRANSPORT } else { 0 };
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
    if !guest_range(vm, a.buf, a.len) {
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

/// `true` when `[addr, addr + len)` is guest RAM the kernel may use (not the platform's first
/// 2 MiB).
fn kernel_ram(vm: &VmShared, addr: u64, len: u64) -> bool {
    guest_range(vm, addr, len)
}

fn vcpu_up(vm: &Arc<VmShared>, a: &mut VcpuUpArgs) -> (Status, Flow) {
    if !kernel_ram(vm, a.entry, 1) || a.stack < 8 || !kernel_ram(vm, a.stack - 8, 8) {
        return (Status::INVALID, Flow::Continue);
    }
    let entry = Entry { rip: a.entry, rsp: a.stack, arg: a.arg };
    let planned = vm.vcpu_set.up(entry, |online| vm.policy.admit_vcpu(vm, online), |id| Arc::new(VcpuControl::new(id)));
    let (plan, online) = match planned {
        Ok(p) => p,
        Err(status) => return (status, Flow::Continue),
    };
    let (id, reused) = match plan {
        UpPlan::Reused(id) => (id, true),
        UpPlan::Create(id) => {
            let ctl = vm.vcpu_set.get(id).expect("the set reserved this id");
            if let Err(e) = vm.start_new_vcpu(id, entry, ctl) {
                vm.vcpu_set.abandon_create(id);
                vm.policy.give_back(Resource::Vcpus, 1);
                eprintln!("hypervisor-shim: cannot create vCPU {id}: {e}");
                return (Status::EXHAUSTED, Flow::Continue);
            }
            (id, false)
        }
    };
    a.vcpu_id = id;
    vm.refresh_notice_page();
    vm.record("vcpu_up", detail([("vcpu", id.into()), ("reused", reused.into()), ("online", online.into())]));
    (Status::OK, Flow::Continue)
}

fn vcpu_down(vm: &VmShared, ctl: &VcpuControl) -> (Status, Flow) {
    if ctl.id == 0 {
        // vCPU 0 is the boot vCPU and stays online.
        return (Status::INVALID, Flow::Continue);
    }
    let online = vm.vcpu_set.down(ctl.id);
    vm.policy.give_back(Resource::Vcpus, 1);
    vm.refresh_notice_page();
    vm.record("vcpu_down", detail([("vcpu", ctl.id.into()), ("online", online.into())]));
    (Status::OK, Flow::Park)
}

fn block(vm: &VmShared, ctl: &VcpuControl, a: &mut BlockArgs) -> (Status, Flow) {
    let timeout = (a.timeout_ns != BLOCK_FOREVER).then(|| Duration::from_nanos(a.timeout_ns));
    a.woken_by = ctl.block(timeout, &|| vm.is_stopping());
    (Status::OK, Flow::Continue)
}

fn kick(vm: &VmShared, a: &mut KickArgs) -> (Status, Flow) {
    match vm.vcpu_set.get(a.vcpu_id) {
        Some(target) if target.state() != crate::vcpu_set::State::Parked => {
            target.wake(wake::KICK, true);
            (Status::OK, Flow::Continue)
        }
        _ => (Status::INVALID, Flow::Continue),
    }
}

fn events(vm: &VmShared, a: &mut EventsArgs) -> (Status, Flow) {
    let n = vm.take_notices();
    a.pending = n.pending;
    a.vcpu_target = n.vcpu_target;
    a.memory_target = n.memory_target;
    a.grace_ns = n.grace_ns;
    (Status::OK, Flow::Continue)
}

fn report(vm: &VmShared, ctl: &VcpuControl, a: &mut ReportArgs) -> (Status, Flow) {
    vm.stats.reports.fetch_add(1, Ordering::Relaxed);
    if !ctl.report_allowed(vm.started.elapsed().as_secs()) {
        // Answered, counted, not recorded: a flood of REPORTs costs the host nothing more.
        vm.stats.reports_not_recorded.fetch_add(1, Ordering::Relaxed);
        return (Status::OK, Flow::Continue);
    }
    let figures: [(&str, Value); 7] = [
        ("host_cpu_us", crate::summary::process_cpu_us().into()),
        ("runnable", a.runnable.into()),
        ("guest_online", a.online_vcpus.into()),
        ("guest_idle", a.idle_vcpus.into()),
        ("heap_used", a.heap_used.into()),
        ("heap_free", a.heap_free.into()),
        ("user", a.user.into()),
    ];
    vm.record("report", detail(figures));
    (Status::OK, Flow::Continue)
}

fn mem_grant(vm: &VmShared, a: &mut MemGrantArgs) -> (Status, Flow) {
    a.count = 0;
    a.granted = 0;
    let array_len = u64::from(a.max_extents) * size_of::<Extent>() as u64;
    if a.bytes == 0 || a.max_extents == 0 || a.max_extents > MEM_EXTENTS_MAX || !guest_range(vm, a.extents, array_len) {
        return (Status::INVALID, Flow::Continue);
    }
    // Policy (never above the ceiling: burst, or max without credit / during a reclaim), then
    // the pool; both may shorten the grant.
    let held = vm.memory_held();
    let want = a.bytes.div_ceil(EXTENT_ALIGN).saturating_mul(EXTENT_ALIGN);
    let reserved = match vm.policy.admit_memory(vm, held, want) {
        Ok(n) => n,
        Err(status) => return (status, Flow::Continue),
    };
    // A VM holds a bounded number of extents (host mappings, KVM slots, shim records).
    let room = (EXTENTS_HELD_MAX as usize).saturating_sub(vm.mem.extent_count());
    if room == 0 {
        vm.policy.give_back(Resource::Memory, reserved);
        vm.stats.denied.fetch_add(1, Ordering::Relaxed);
        return (Status::DENIED, Flow::Continue);
    }
    let extents = match vm.mem.grant(&vm.fd, reserved, (a.max_extents as usize).min(room)) {
        Ok(e) => e,
        Err(e) => {
            vm.policy.give_back(Resource::Memory, reserved);
            if !matches!(e, crate::memory::MemoryError::NoRoom) {
                eprintln!("hypervisor-shim: memory grant failed: {e}");
            }
            return (Status::EXHAUSTED, Flow::Continue);
        }
    };
    let got: u64 = extents.iter().map(|e| e.len).sum();
    vm.policy.give_back(Resource::Memory, reserved - got);
    let bytes: Vec<u8> = extents.iter().flat_map(|e| e.as_bytes().to_vec()).collect();
    if vm.mem.write(a.extents, &bytes).is_err() {
        // The array vanished (released concurrently): undo, so nothing leaks.
        if let Ok(n) = vm.mem.release(&vm.fd, &extents) {
            vm.policy.give_back(Resource::Memory, n);
        }
        return (Status::INVALID, Flow::Continue);
    }
    a.count = extents.len() as u32;
    a.granted = extents.iter().map(|e| e.len).sum();
    let now_held = vm.memory_held();
    vm.stats.mem_grants.fetch_add(1, Ordering::Relaxed);
    vm.stats.mem_peak.fetch_max(now_held, Ordering::Relaxed);
    vm.refresh_notice_page();
    vm.record(
        "memory_grant",
        detail([("bytes", a.granted.into()), ("asked", want.into()), ("extents", a.count.into())]),
    );
    (Status::OK, Flow::Continue)
}

fn mem_release(vm: &VmShared, a: &mut MemReleaseArgs) -> (Status, Flow) {
    a.released = 0;
    if a.count == 0 || a.count > MEM_EXTENTS_MAX {
        return (Status::INVALID, Flow::Continue);
    }
    let array_len = u64::from(a.count) * size_of::<Extent>() as u64;
    if !guest_range(vm, a.extents, array_len) {
        return (Status::INVALID, Flow::Continue);
    }
    let Ok(raw) = vm.mem.read_vec(a.extents, array_len) else {
        return (Status::INVALID, Flow::Continue);
    };
    let extents: Vec<Extent> =
        raw.chunks_exact(size_of::<Extent>()).filter_map(|c| Extent::read_from_bytes(c).ok()).collect();
    match vm.mem.release(&vm.fd, &extents) {
        Ok(released) => {
            a.released = released;
            vm.policy.give_back(Resource::Memory, released);
            vm.stats.mem_releases.fetch_add(1, Ordering::Relaxed);
            vm.refresh_notice_page();
            vm.record("memory_release", detail([("bytes", released.into()), ("extents", a.count.into())]));
            (Status::OK, Flow::Continue)
        }
        Err(crate::memory::MemoryError::NotGranted { .. }) => (Status::INVALID, Flow::Continue),
        Err(e) => {
            eprintln!("hypervisor-shim: memory release failed: {e}");
            (Status::INVALID, Flow::Continue)
        }
    }
}
