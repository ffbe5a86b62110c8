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

use crate::base::timeline::detail;
use crate::policy::resource::Resource;
use crate::vmm::vcpus::{Entry, UpPlan, VcpuControl};
use crate::vmm::vm::{Outcome, VmShared};

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
        let _ = vm.stats.rss_boot.set(crate::base::memory::process_rss_bytes());
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
        Some(target) if target.state() != crate::vmm::vcpus::State::Parked => {
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
        ("host_cpu_us", crate::report::summary::process_cpu_us().into()),
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
    let _decision = vm.policy.grant_decision.lock().unwrap_or_else(|p| p.into_inner());
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
            if !matches!(e, crate::base::memory::MemoryError::NoRoom) {
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
    let held_before = vm.memory_held();
    match vm.mem.release(&vm.fd, &extents) {
        Ok(released) => {
            a.released = released;
            vm.policy.give_back(Resource::Memory, released);
            vm.stats.mem_releases.fetch_add(1, Ordering::Relaxed);
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
            vm.policy.give_back(Resource::Memory, released);
            vm.refresh_notice_page();
            eprintln!("hypervisor-shim: memory release failed: {e}");
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
    use crate::base::config::Policy;
    use crate::vmm::vm::{Vm, VmConfig};

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
            let config = VmConfig {
                name: "fuzz".into(),
                app: "hello".into(),
                app_args: Vec::new(),
                log_level: "off".into(),
                guest_opts: Vec::new(),
                vcpus: Policy { min: 1, max: 2, burst: 2 },
                memory: Policy { min: 64 * MIB, max: 96 * MIB, burst: 128 * MIB },
                timeout: None,
                policy: crate::base::config::PolicyConfig::default(),
                weight: 1,
                publish: Vec::new(),
                vsock_uds: None,
                on_demand: false,
                idle_shutdown: None,
                restart: None,
                pool_member: None,
            };
            let image =
                Arc::new(crate::vmm::loader::KernelImage::open(elastic_images::KERNEL.as_ref()).expect("kernel"));
            let kvm = crate::vmm::vm::open_kvm().expect("/dev/kvm");
            let timeline =
                Arc::new(crate::base::timeline::Timeline::new(Instant::now(), None, false).expect("timeline"));
            let pool = Arc::new(crate::policy::pool::Pool::new(crate::policy::pool::Capacity::UNLIMITED));
            Vm::create(&config, image, &kvm, Instant::now(), timeline, &pool, Box::new(std::io::sink()), Vec::new())
                .expect("a VM")
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
    fn play(vm: &Arc<VmShared>, ctl: &Arc<VcpuControl>, op: &Op) -> Result<(), String> {
        if op.gpa >= KERNEL_MIN_LOAD_ADDR && vm.mem.is_ram(op.gpa, op.block.len() as u64) {
            let _ = vm.mem.write(op.gpa, &op.block);
        }
        let (status, _flow) = dispatch(vm, ctl, Some(op.number), op.gpa);
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
        let extents = vm.mem.extents();
        let sum: u64 = extents.iter().map(|e| e.len).sum();
        let held = vm.memory_held();
        if held != vm.layout.ram_size + sum {
            return Err(format!("held {held} != boot {} + extents {sum}", vm.layout.ram_size));
        }
        if held > vm.memory.burst {
            return Err(format!("held {held} above burst {}", vm.memory.burst));
        }
        let charged = vm.policy.pool.held(vm.policy.member)[1];
        if charged != held {
            return Err(format!("the pool charges {charged}, the VM holds {held}"));
        }
        for (i, a) in extents.iter().enumerate() {
            if !vm.layout.in_window(a.base, a.len)
                || extents[i + 1..].iter().any(|b| a.base < b.end() && b.base < a.end())
            {
                return Err(format!("extent {a:?} outside the window or overlapping"));
            }
        }
        Ok(())
    }

    fn low_memory(vm: &VmShared) -> Vec<u8> {
        let mut low = vm.mem.read_vec(0, KERNEL_MIN_LOAD_ADDR).unwrap_or_default();
        // The notice page is the host's to write.
        low[NOTICE_ADDR as usize..NOTICE_ADDR as usize + 4096].fill(0);
        low
    }

    #[test]
    fn the_fake_guest_really_grants_and_releases() {
        let _one = exclusive();
        let vm = vm().shared();
        let ctl = Arc::new(VcpuControl::new(1));
        let grants = vm.stats.mem_grants.load(Ordering::Relaxed);
        let g = hypercall_abi::MemGrantArgs::new(4 * MIB, SCRATCH + 32 * 1024, 2);
        let op = Op { number: Call::MemGrant.number(), gpa: SCRATCH + 4096, block: g.as_bytes().to_vec() };
        play(vm, &ctl, &op).unwrap();
        let back: hypercall_abi::MemGrantArgs = vm.mem.read_obj(SCRATCH + 4096).unwrap();
        assert!(vm.stats.mem_grants.load(Ordering::Relaxed) > grants && back.count >= 1, "{back:?}");
        let r = hypercall_abi::MemReleaseArgs::new(SCRATCH + 32 * 1024, back.count);
        let op = Op { number: Call::MemRelease.number(), gpa: SCRATCH + 4096, block: r.as_bytes().to_vec() };
        play(vm, &ctl, &op).unwrap();
        let back: hypercall_abi::MemReleaseArgs = vm.mem.read_obj(SCRATCH + 4096).unwrap();
        assert_eq!(back.header.status, 0, "{back:?}");
        invariants(vm).unwrap();
    }

    #[test]
    fn two_vcpus_granting_at_once_never_pass_the_ceiling() {
        let _one = exclusive();
        let vm = vm().shared();
        let burst = vm.memory.burst;
        std::thread::scope(|s| {
            for (id, array) in [(1u32, SCRATCH + 40 * 1024), (2, SCRATCH + 48 * 1024)] {
                s.spawn(move || {
                    let ctl = Arc::new(VcpuControl::new(id));
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
                        let back: hypercall_abi::MemGrantArgs = vm.mem.read_obj(block).unwrap();
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
            let ctl0 = vm.vcpu_set.get(0).expect("vCPU 0");
            let ctl1 = Arc::new(VcpuControl::new(1));
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
