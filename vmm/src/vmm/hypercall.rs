//! Hypercall dispatch: copy the argument block out of guest memory once, validate it, serve
//! the call, write results and status back.
//!
//! Nothing a guest passes is trusted: the block address, every address and length inside it
//! and every count are checked before use, and a bad call gets a status back, never a crash.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hypercall_abi::{
    ABI_VERSION, ArgBlock, BLOCK_FOREVER, BlockArgs, CONSOLE_WRITE_MAX, Call, ConsoleWriteArgs, EXTENT_ALIGN,
    EXTENTS_HELD_MAX, EventsArgs, Extent, HelloArgs, KERNEL_MIN_LOAD_ADDR, KickArgs, MEM_EXTENTS_MAX, MemGrantArgs,
    MemReleaseArgs, PingArgs, ReportArgs, SHUTDOWN_CODE_MAX, ShutdownArgs, Status, VcpuUpArgs, block_flags, wake,
};
use serde_json::Value;
use zerocopy::{FromBytes, IntoBytes};

use crate::base::timeline::detail;
use crate::policy::resource::Resource;
use crate::vmm::outcome::Outcome;
use crate::vmm::shared::VmShared;
use crate::vmm::vcpus::{Entry, Served, UpPlan, VcpuEvent, VcpuHandle};

/// What the vCPU loop does after a call.
#[derive(Debug)]
pub(crate) enum Flow {
    /// Resume the guest.
    Continue,
    /// The calling vCPU went down: park its thread until it is reused.
    Park,
    /// End the run with this outcome.
    Stop(Outcome),
    /// VCPU_UP decided on a new KVM vCPU: the vCPU layer creates and starts it, then
    /// [`VcpuStart::confirm`]s or [`VcpuStart::abandon`]s the decision.
    Start(VcpuStart),
}

/// A new vCPU that VCPU_UP admitted (its slot reserved in the policy and the pool).
#[derive(Debug)]
pub(crate) struct VcpuStart {
    /// Its id.
    pub(crate) id: u32,
    /// Where it begins.
    pub(crate) entry: Entry,
    /// The VCPU_UP block (its status is rewritten if the vCPU cannot be made).
    gpa: u64,
    /// vCPUs online with it.
    online: u32,
}

impl VcpuStart {
    /// The vCPU runs: the call is recorded.
    pub(crate) fn confirm(&self, vm: &VmShared) -> Status {
        vm.refresh_notice_page();
        vm.record(
            "vcpu_up",
            detail([("vcpu", self.id.into()), ("reused", false.into()), ("online", self.online.into())]),
        );
        Status::OK
    }

    /// The vCPU could not be made (`why`): its reservation is undone and the call answers
    /// EXHAUSTED.
    pub(crate) fn abandon(&self, vm: &VmShared, why: &dyn std::fmt::Display) -> Status {
        vm.vcpus().abandon_create(self.id);
        vm.policy().give_back(Resource::Vcpus, 1);
        vm.diag().say(format_args!("cannot create vCPU {}: {why}", self.id));
        if let Ok(mut block) = vm.mem().read_obj::<VcpuUpArgs>(self.gpa) {
            block.header.status = Status::EXHAUSTED.0;
            block.vcpu_id = 0;
            let _ = vm.mem().write_obj(self.gpa, &block);
        }
        Status::EXHAUSTED
    }
}

/// Serves one hypercall from the vCPU `me`: `call` is the number from `eax` (`None` if the
/// `out` was not 4 bytes wide), `gpa` the argument block's address from `rdi`. `serve` handles
/// the vCPU's events while it sleeps in BLOCK. Returns the status (also written into the
/// block when it is readable) and what to do next.
pub(crate) fn dispatch(
    vm: &VmShared,
    me: &VcpuHandle,
    call: Option<u32>,
    gpa: u64,
    serve: &mut dyn FnMut(VcpuEvent) -> Served,
) -> (Status, Flow) {
    let stats = vm.stats();
    let Some(number) = call else {
        stats.count_call(0);
        return (write_status_only(vm, gpa, Status::INVALID), Flow::Continue);
    };
    stats.count_call(number);
    let Some(call) = Call::from_number(number) else {
        return (write_status_only(vm, gpa, Status::UNSUPPORTED), Flow::Continue);
    };
    match call {
        Call::Hello => with_block(vm, gpa, |a: &mut HelloArgs| hello(vm, me.id(), a)),
        Call::ConsoleWrite => with_block(vm, gpa, |a: &mut ConsoleWriteArgs| console_write(vm, a)),
        Call::Shutdown => with_block(vm, gpa, |a: &mut ShutdownArgs| shutdown(a)),
        Call::Ping => with_block(vm, gpa, |_: &mut PingArgs| (Status::OK, Flow::Continue)),
        Call::VcpuUp => with_block(vm, gpa, |a: &mut VcpuUpArgs| vcpu_up(vm, gpa, a)),
        Call::VcpuDown => vcpu_down(vm, me),
        Call::Block => with_block(vm, gpa, |a: &mut BlockArgs| block(vm, me, a, serve)),
        Call::Kick => with_block(vm, gpa, |a: &mut KickArgs| kick(vm, a)),
        Call::Events => with_block(vm, gpa, |a: &mut EventsArgs| events(vm, a)),
        Call::Report => with_block(vm, gpa, |a: &mut ReportArgs| report(vm, me, a)),
        Call::MemGrant => with_block(vm, gpa, |a: &mut MemGrantArgs| mem_grant(vm, a)),
        Call::MemRelease => with_block(vm, gpa, |a: &mut MemReleaseArgs| mem_release(vm, a)),
        // No block: `gpa` (rdi) carries the device and queue.
        Call::DeviceNotify => (vm.devices().notify(vm.mem(), gpa), Flow::Continue),
    }
}

/// Whether the guest may name `[gpa, gpa + len)` as a hypercall block, buffer or extent
/// array: guest RAM at or above [`KERNEL_MIN_LOAD_ADDR`]. Below it lie the shim's GDT, TSS,
/// IDT, exception stubs, page tables, boot info, command line and notice page, which no call
/// may read or overwrite (the guest-protected region, docs/abi.md).
pub(crate) fn guest_range(vm: &VmShared, gpa: u64, len: u64) -> bool {
    gpa >= KERNEL_MIN_LOAD_ADDR && vm.mem().is_ram(gpa, len)
}

/// Copies the block in, runs `f` on the copy, writes the copy (with its status) back.
fn with_block<T: ArgBlock>(vm: &VmShared, gpa: u64, f: impl FnOnce(&mut T) -> (Status, Flow)) -> (Status, Flow) {
    if !guest_range(vm, gpa, size_of::<T>() as u64) {
        return (Status::INVALID, Flow::Continue);
    }
    let Ok(mut block) = vm.mem().read_obj::<T>(gpa) else {
        return (Status::INVALID, Flow::Continue);
    };
    let (status, flow) = f(&mut block);
    block.header_mut().status = status.0;
    // The block was readable a moment ago; if it vanished since, rax still carries the status.
    let _ = vm.mem().write_obj(gpa, &block);
    (status, flow)
}

/// Writes `status` into the header at `gpa` if the guest may name it.
fn write_status_only(vm: &VmShared, gpa: u64, status: Status) -> Status {
    if guest_range(vm, gpa, size_of::<i32>() as u64) {
        let _ = vm.mem().write_obj(gpa, &status.0);
    }
    status
}

fn hello(vm: &VmShared, vcpu: u32, a: &mut HelloArgs) -> (Status, Flow) {
    if vm.hello_seen() {
        let _ = vm.stats().rss_boot.set(crate::host::process::process_rss_bytes());
    }
    let r = &vm.config().resources;
    a.host_abi_version = ABI_VERSION;
    a.vcpu_id = vcpu;
    use hypercall_abi::features;
    a.host_features = if vm.devices().count() > 0 { features::VIRTIO_TRANSPORT | features::BLOCK_NOTIFY } else { 0 };
    if vm.steal_time() {
        a.host_features |= features::STEAL_TIME;
    }
    a.features = a.guest_features & a.host_features;
    a.vcpus = r.vcpus.limits();
    a.memory = r.memory.limits();
    a.tsc_khz = vm.tsc_khz();
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
    match vm.mem().read_vec(a.buf, a.len) {
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

fn vcpu_up(vm: &VmShared, gpa: u64, a: &mut VcpuUpArgs) -> (Status, Flow) {
    if !guest_range(vm, a.entry, 1) || a.stack < 8 || !guest_range(vm, a.stack - 8, 8) {
        return (Status::INVALID, Flow::Continue);
    }
    let entry = Entry { rip: a.entry, rsp: a.stack, arg: a.arg };
    let mut records = Vec::new();
    let planned = vm.vcpus().up(entry, |online| {
        let d = vm.policy().admit_vcpu(online);
        records = d.records;
        d.result
    });
    vm.record_all(records);
    let (plan, online) = match planned {
        Ok(p) => p,
        Err(status) => {
            if status == Status::DENIED {
                vm.stats().denied.fetch_add(1, Ordering::Relaxed);
            }
            return (status, Flow::Continue);
        }
    };
    match plan {
        UpPlan::Reused(id) => {
            a.vcpu_id = id;
            vm.refresh_notice_page();
            vm.record("vcpu_up", detail([("vcpu", id.into()), ("reused", true.into()), ("online", online.into())]));
            (Status::OK, Flow::Continue)
        }
        UpPlan::Create(id) => {
            a.vcpu_id = id;
            (Status::OK, Flow::Start(VcpuStart { id, entry, gpa, online }))
        }
    }
}

fn vcpu_down(vm: &VmShared, me: &VcpuHandle) -> (Status, Flow) {
    if me.id() == 0 {
        // vCPU 0 is the boot vCPU and stays online.
        return (Status::INVALID, Flow::Continue);
    }
    let online = vm.vcpus().down(me.id());
    vm.policy().give_back(Resource::Vcpus, 1);
    vm.refresh_notice_page();
    vm.record("vcpu_down", detail([("vcpu", me.id().into()), ("online", online.into())]));
    (Status::OK, Flow::Park)
}

/// BLOCK: with `block_flags::NOTIFY`, the DEVICE_NOTIFY in `notify` is served first (a bad
/// one answers its status and the vCPU does not sleep); unknown flags are `INVALID`.
fn block(
    vm: &VmShared,
    me: &VcpuHandle,
    a: &mut BlockArgs,
    serve: &mut dyn FnMut(VcpuEvent) -> Served,
) -> (Status, Flow) {
    if a.flags & !block_flags::ALL != 0 {
        return (Status::INVALID, Flow::Continue);
    }
    if a.flags & block_flags::NOTIFY != 0 {
        let status = vm.devices().notify(vm.mem(), a.notify);
        if !status.is_ok() {
            return (status, Flow::Continue);
        }
        vm.stats().notifies_in_block.fetch_add(1, Ordering::Relaxed);
    }
    let timeout = (a.timeout_ns != BLOCK_FOREVER).then(|| Duration::from_nanos(a.timeout_ns));
    a.woken_by = me.block(timeout, serve);
    (Status::OK, Flow::Continue)
}

fn kick(vm: &VmShared, a: &mut KickArgs) -> (Status, Flow) {
    match vm.vcpus().get(a.vcpu_id) {
        Some(target) if target.state().online() => {
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

fn report(vm: &VmShared, me: &VcpuHandle, a: &mut ReportArgs) -> (Status, Flow) {
    vm.stats().reports.fetch_add(1, Ordering::Relaxed);
    if !me.report_allowed(vm.started().elapsed().as_secs()) {
        // Answered, counted, not recorded: a flood of REPORTs costs the host nothing more.
        vm.stats().reports_not_recorded.fetch_add(1, Ordering::Relaxed);
        return (Status::OK, Flow::Continue);
    }
    let figures: [(&str, Value); 7] = [
        ("host_cpu_us", crate::host::process::process_cpu_us().into()),
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
    // the pool; both may shorten the grant. One decision at a time per VM, so the ceiling
    // check and the grant are atomic.
    let policy = vm.policy();
    let mem = vm.mem();
    let _decision = policy.grant_decision();
    let held = vm.memory_held();
    let want = a.bytes.div_ceil(EXTENT_ALIGN).saturating_mul(EXTENT_ALIGN);
    let decision = policy.admit_memory(held, want);
    vm.record_all(decision.records);
    let reserved = match decision.result {
        Ok(n) => n,
        Err(status) => {
            if status == Status::DENIED {
                vm.stats().denied.fetch_add(1, Ordering::Relaxed);
            }
            return (status, Flow::Continue);
        }
    };
    // A VM holds a bounded number of extents (host mappings, KVM slots, shim records).
    let room = (EXTENTS_HELD_MAX as usize).saturating_sub(mem.extent_count());
    if room == 0 {
        policy.give_back(Resource::Memory, reserved);
        vm.stats().denied.fetch_add(1, Ordering::Relaxed);
        return (Status::DENIED, Flow::Continue);
    }
    let extents = match mem.grant(vm.fd(), reserved, (a.max_extents as usize).min(room)) {
        Ok(e) => e,
        Err(e) => {
            policy.give_back(Resource::Memory, reserved);
            if !matches!(e, crate::base::memory::MemoryError::NoRoom) {
                vm.diag().say(format_args!("memory grant failed: {e}"));
            }
            return (Status::EXHAUSTED, Flow::Continue);
        }
    };
    let got: u64 = extents.iter().map(|e| e.len).sum();
    policy.give_back(Resource::Memory, reserved - got);
    let bytes: Vec<u8> = extents.iter().flat_map(|e| e.as_bytes().iter().copied()).collect();
    if mem.write(a.extents, &bytes).is_err() {
        // The array vanished (released concurrently): undo, so nothing leaks.
        if let Ok(n) = mem.release(vm.fd(), &extents) {
            policy.give_back(Resource::Memory, n);
        }
        return (Status::INVALID, Flow::Continue);
    }
    a.count = extents.len() as u32;
    a.granted = extents.iter().map(|e| e.len).sum();
    let now_held = vm.memory_held();
    vm.stats().mem_grants.fetch_add(1, Ordering::Relaxed);
    vm.stats().mem_peak.fetch_max(now_held, Ordering::Relaxed);
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
    let Ok(raw) = vm.mem().read_vec(a.extents, array_len) else {
        return (Status::INVALID, Flow::Continue);
    };
    let extents: Vec<Extent> =
        raw.chunks_exact(size_of::<Extent>()).filter_map(|c| Extent::read_from_bytes(c).ok()).collect();
    let held_before = vm.memory_held();
    match vm.mem().release(vm.fd(), &extents) {
        Ok(released) => {
            a.released = released;
            vm.policy().give_back(Resource::Memory, released);
            vm.stats().mem_releases.fetch_add(1, Ordering::Relaxed);
            vm.refresh_notice_page();
            vm.record("memory_release", detail([("bytes", released.into()), ("extents", a.count.into())]));
            (Status::OK, Flow::Continue)
        }
        Err(crate::base::memory::MemoryError::NotGranted { .. }) => (Status::INVALID, Flow::Continue),
        Err(e) => {
            // KVM refused to delete a slot: the extents before it are released (given back to
            // the pool), that one and the rest stay granted and accounted.
            let released = held_before.saturating_sub(vm.memory_held());
            a.released = released;
            vm.policy().give_back(Resource::Memory, released);
            vm.refresh_notice_page();
            vm.diag().say(format_args!("memory release failed: {e}"));
            (Status::INVALID, Flow::Continue)
        }
    }
}

/// Property tests of the dispatch against a real KVM VM whose guest never runs: the test
/// plays the guest, writing random blocks at random places and calling from two "vCPUs" at
/// once. Long run: `PROPTEST_CASES=100000 cargo test --release -p hypervisor-shim --lib
/// hypercall::fuzz`.
#[cfg(test)]
mod fuzz {
    use std::sync::{Arc, OnceLock};
    use std::time::Instant;

    use hypercall_abi::{NOTICE_ADDR, Status};
    use proptest::prelude::*;

    use super::*;
    use crate::base::config::{Policy, VmConfig};
    use crate::vmm::vcpus::VcpuHandle;
    use crate::vmm::vm::{Host, Vm};

    const MIB: u64 = 1 << 20;
    /// Where the fake guest puts its blocks and arrays.
    const SCRATCH: u64 = 48 * MIB;

    /// The tests share one VM and check its accounting at quiet moments: one at a time.
    fn exclusive() -> std::sync::MutexGuard<'static, ()> {
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        ONE.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vm() -> &'static Vm {
        static VM: OnceLock<Vm> = OnceLock::new();
        VM.get_or_init(|| {
            let mut config = VmConfig::new("fuzz", "hello");
            config.guest.log_level = "off".into();
            config.resources.vcpus = Policy { min: 1, max: 2, burst: 2 };
            config.resources.memory = Policy { min: 64 * MIB, max: 96 * MIB, burst: 128 * MIB };
            let image =
                Arc::new(crate::vmm::loader::KernelImage::open(elastic_images::KERNEL.as_ref()).expect("kernel"));
            let kvm = crate::vmm::error::open_kvm().expect("/dev/kvm");
            let timeline =
                Arc::new(crate::base::timeline::Timeline::new(Instant::now(), None, false).expect("timeline"));
            let pool = Arc::new(crate::policy::pool::Pool::new(crate::policy::pool::Capacity::UNLIMITED));
            let host = Host {
                kvm: &kvm,
                started: Instant::now(),
                timeline,
                pool: &pool,
                console: Box::new(std::io::sink()),
                events: Arc::new(|_| {}),
                shell: None,
            };
            Vm::create(&config, image, host, Vec::new()).expect("a VM")
        })
    }

    /// One call the fake guest makes: number, where its block is, the block's bytes.
    #[derive(Debug, Clone)]
    struct Op {
        number: u32,
        gpa: u64,
        block: Vec<u8>,
    }

    fn gpa() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => (0u64..64).prop_map(|k| SCRATCH + k * 256),
            1 => (0u64..(2 * MIB)).prop_map(|a| a & !7),
            1 => Just(hypercall_abi::BOOT_INFO_ADDR),
            1 => Just(64 * MIB - 8),
            1 => any::<u64>(),
        ]
    }

    /// A block: random bytes, or a plausible MEM_GRANT / MEM_RELEASE whose array is in the
    /// scratch area (so grants and releases really happen).
    fn op() -> impl Strategy<Value = Op> {
        let number = prop_oneof![
            6 => prop::sample::select(vec![
                Call::Hello, Call::ConsoleWrite, Call::Shutdown, Call::Ping, Call::Kick, Call::Events,
                Call::Report, Call::MemGrant, Call::MemRelease, Call::DeviceNotify,
            ]).prop_map(|c| c.number()),
            1 => any::<u32>(),
        ];
        (number, gpa(), prop::collection::vec(any::<u8>(), 0..128), 1u64..=48, 1u32..=8, any::<bool>()).prop_map(
            |(number, gpa, mut block, mb, n, plausible)| {
                if plausible && number == Call::MemGrant.number() {
                    let a = hypercall_abi::MemGrantArgs::new(mb * MIB, SCRATCH + 32 * 1024, n);
                    block = a.as_bytes().to_vec();
                } else if plausible && number == Call::MemRelease.number() {
                    let a = hypercall_abi::MemReleaseArgs::new(SCRATCH + 32 * 1024, n.min(2));
                    block = a.as_bytes().to_vec();
                }
                Op { number, gpa, block }
            },
        )
    }

    /// Plays one op on `ctl`'s "vCPU": writes the block (where a guest could), calls, checks
    /// the status is one the spec allows for it.
    fn play(vm: &VmShared, me: &VcpuHandle, op: &Op) -> Result<(), String> {
        if op.gpa >= KERNEL_MIN_LOAD_ADDR && vm.mem().is_ram(op.gpa, op.block.len() as u64) {
            let _ = vm.mem().write(op.gpa, &op.block);
        }
        let (status, _flow) = dispatch(vm, me, Some(op.number), op.gpa, &mut |_| Served::Stay);
        let known =
            [Status::OK, Status::INVALID, Status::DENIED, Status::EXHAUSTED, Status::AGAIN, Status::UNSUPPORTED];
        if !known.contains(&status) {
            return Err(format!("{op:?}: status {} is not in the spec", status.0));
        }
        let call = Call::from_number(op.number);
        if call.is_none() && status != Status::UNSUPPORTED {
            return Err(format!("unknown call {} answered {}", op.number, status.0));
        }
        if call.is_some_and(|c| c != Call::DeviceNotify) && op.gpa < KERNEL_MIN_LOAD_ADDR && status != Status::INVALID {
            return Err(format!("{op:?}: a block below the kernel answered {}", status.0));
        }
        Ok(())
    }

    /// The shim's accounting agrees with itself.
    fn invariants(vm: &VmShared) -> Result<(), String> {
        let extents = vm.mem().extents();
        let sum: u64 = extents.iter().map(|e| e.len).sum();
        let held = vm.memory_held();
        let layout = vm.layout();
        if held != layout.ram_size + sum {
            return Err(format!("held {held} != boot {} + extents {sum}", layout.ram_size));
        }
        let burst = vm.config().resources.memory.burst;
        if held > burst {
            return Err(format!("held {held} above burst {burst}"));
        }
        let charged = vm.policy().pool().held(vm.policy().member())[1];
        if charged != held {
            return Err(format!("the pool charges {charged}, the VM holds {held}"));
        }
        for (i, a) in extents.iter().enumerate() {
            if !layout.in_window(a.base, a.len) || extents[i + 1..].iter().any(|b| a.base < b.end() && b.base < a.end())
            {
                return Err(format!("extent {a:?} outside the window or overlapping"));
            }
        }
        Ok(())
    }

    fn low_memory(vm: &VmShared) -> Vec<u8> {
        let mut low = vm.mem().read_vec(0, KERNEL_MIN_LOAD_ADDR).unwrap_or_default();
        // The notice page is the host's to write.
        low[NOTICE_ADDR as usize..NOTICE_ADDR as usize + 4096].fill(0);
        low
    }

    /// Gives back, through MEM_RELEASE, every extent the shared VM holds, so a test starts at
    /// the boot size whatever the tests before it left granted.
    fn release_everything(vm: &VmShared, me: &VcpuHandle) {
        let array = SCRATCH + 56 * 1024;
        for e in vm.mem().extents() {
            let extent = hypercall_abi::Extent { base: e.base, len: e.len };
            vm.mem().write(array, extent.as_bytes()).expect("the array is RAM");
            let r = hypercall_abi::MemReleaseArgs::new(array, 1);
            let op = Op { number: Call::MemRelease.number(), gpa: SCRATCH + 8192, block: r.as_bytes().to_vec() };
            play(vm, me, &op).expect("a release");
        }
        assert_eq!(vm.memory_held(), vm.layout().ram_size, "the VM is back at its boot size");
    }

    #[test]
    fn the_fake_guest_really_grants_and_releases() {
        let _one = exclusive();
        let vm = vm().shared();
        let ctl = VcpuHandle::new(1);
        release_everything(vm, &ctl);
        let grants = vm.stats().mem_grants.load(Ordering::Relaxed);
        let g = hypercall_abi::MemGrantArgs::new(4 * MIB, SCRATCH + 32 * 1024, 2);
        let op = Op { number: Call::MemGrant.number(), gpa: SCRATCH + 4096, block: g.as_bytes().to_vec() };
        play(vm, &ctl, &op).unwrap();
        let back: hypercall_abi::MemGrantArgs = vm.mem().read_obj(SCRATCH + 4096).unwrap();
        assert!(vm.stats().mem_grants.load(Ordering::Relaxed) > grants && back.count >= 1, "{back:?}");
        let r = hypercall_abi::MemReleaseArgs::new(SCRATCH + 32 * 1024, back.count);
        let op = Op { number: Call::MemRelease.number(), gpa: SCRATCH + 4096, block: r.as_bytes().to_vec() };
        play(vm, &ctl, &op).unwrap();
        let back: hypercall_abi::MemReleaseArgs = vm.mem().read_obj(SCRATCH + 4096).unwrap();
        assert_eq!(back.header.status, 0, "{back:?}");
        invariants(vm).unwrap();
    }

    #[test]
    fn block_serves_its_notify_first_and_refuses_bad_flags_or_a_bad_notify_without_sleeping() {
        let _one = exclusive();
        let vm = vm().shared();
        let ctl = VcpuHandle::new(1);
        let at = SCRATCH + 12 * 1024;
        let call = |b: BlockArgs| {
            let start = Instant::now();
            play(vm, &ctl, &Op { number: Call::Block.number(), gpa: at, block: b.as_bytes().to_vec() }).unwrap();
            let back: BlockArgs = vm.mem().read_obj(at).unwrap();
            (Status(back.header.status), start.elapsed())
        };
        let in_block = || vm.stats().notifies_in_block.load(Ordering::Relaxed);
        let before = in_block();
        // Unknown flags, and a notify for a device that does not exist: refused at once (a
        // 10 s timeout that was slept would show).
        let mut odd = BlockArgs::new(10_000_000_000);
        odd.flags = 1 << 7;
        let (status, took) = call(odd);
        assert_eq!(status, Status::INVALID);
        assert!(took < Duration::from_secs(5), "slept {took:?}");
        let (status, took) = call(BlockArgs::notifying(10_000_000_000, hypercall_abi::virtio::notify_value(99, 1)));
        assert_eq!(status, Status::INVALID);
        assert!(took < Duration::from_secs(5), "slept {took:?}");
        assert_eq!(in_block(), before, "refused notifies are not counted");
        // A good one (device 0's TX queue) is served and counted; BLOCK(0) then returns.
        let good = BlockArgs::notifying(0, hypercall_abi::virtio::notify_value(0, 1));
        let expected = if vm.devices().count() > 0 { Status::OK } else { Status::INVALID };
        assert_eq!(call(good).0, expected);
        assert_eq!(in_block(), before + u64::from(expected == Status::OK));
    }

    #[test]
    fn two_vcpus_granting_at_once_never_pass_the_ceiling() {
        let _one = exclusive();
        let vm = vm().shared();
        let burst = vm.config().resources.memory.burst;
        std::thread::scope(|s| {
            for (id, array) in [(1u32, SCRATCH + 40 * 1024), (2, SCRATCH + 48 * 1024)] {
                s.spawn(move || {
                    let ctl = VcpuHandle::new(id);
                    let block = SCRATCH + 16 * 1024 + u64::from(id) * 512;
                    for _ in 0..200 {
                        let g = hypercall_abi::MemGrantArgs::new(burst - 64 * MIB, array, 8);
                        play(
                            vm,
                            &ctl,
                            &Op { number: Call::MemGrant.number(), gpa: block, block: g.as_bytes().to_vec() },
                        )
                        .unwrap();
                        assert!(vm.memory_held() <= burst, "held {} above burst {burst}", vm.memory_held());
                        let back: hypercall_abi::MemGrantArgs = vm.mem().read_obj(block).unwrap();
                        if back.header.status == 0 {
                            let r = hypercall_abi::MemReleaseArgs::new(array, back.count);
                            play(
                                vm,
                                &ctl,
                                &Op { number: Call::MemRelease.number(), gpa: block, block: r.as_bytes().to_vec() },
                            )
                            .unwrap();
                        }
                    }
                });
            }
        });
        invariants(vm).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn dispatch_answers_every_call_as_specified_and_keeps_its_accounting(
            a in prop::collection::vec(op(), 1..12),
            b in prop::collection::vec(op(), 1..12),
        ) {
            let _one = exclusive();
            let vm = vm().shared();
            let low = low_memory(vm);
            let ctl0 = vm.vcpus().get(0).expect("vCPU 0");
            let ctl1 = VcpuHandle::new(1);
            // Two vCPUs at once.
            let results = std::thread::scope(|s| {
                let h0 = s.spawn(|| a.iter().try_for_each(|op| play(vm, &ctl0, op)));
                let h1 = s.spawn(|| b.iter().try_for_each(|op| play(vm, &ctl1, op)));
                [h0.join(), h1.join()]
            });
            for r in results {
                prop_assert!(r.is_ok(), "a dispatch panicked");
                if let Ok(Err(e)) = r {
                    prop_assert!(false, "{}", e);
                }
            }
            if let Err(e) = invariants(vm) {
                prop_assert!(false, "{}", e);
            }
            prop_assert!(low_memory(vm) == low, "the shim wrote below the kernel");
        }
    }
}
