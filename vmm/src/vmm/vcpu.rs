//! vCPUs: creation at CPL 3 in long mode, the per-thread run loop (exits, hypercalls, the
//! events the vCPU's handle delivers), and the state a snapshot saves.

use std::sync::Arc;
use std::time::Instant;

use hypercall_abi::{FAULT_PORT, HYPERCALL_PORT, NOP_PORT};
use kvm_bindings::{CpuId, Msrs, kvm_msr_entry, kvm_pre_fault_memory, kvm_regs, kvm_run, kvm_segment};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;

use crate::base::layout::{GDT_ADDR, GDT_SIZE, IDT_ADDR, Layout, PML4_ADDR, selector};
use crate::base::memory::PAGE_SIZE;
use crate::base::persist::Persist;
use crate::vmm::cpu_state::{SAVED_MSRS, VcpuState};
use crate::vmm::fault::{self, GuestFault};
use crate::vmm::hypercall::{self, Flow, VcpuStart};
use crate::vmm::outcome::Outcome;
use crate::vmm::shared::VmShared;
use crate::vmm::vcpus::{Entry, Served, THROTTLE_PAUSE, VcpuEvent, VcpuHandle, VcpuResponse, bind_kvm_run};

/// vCPU failures.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// A KVM ioctl on a vCPU failed.
    #[error("KVM vCPU {id}: {what}: {source}")]
    Kvm {
        /// vCPU id.
        id: u32,
        /// What was being done.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    /// The call a vCPU made could not be completed before its state was read.
    #[error("vCPU {0}: could not complete its pending exit")]
    PendingExit(u32),
    /// The list of MSRs to read could not be built.
    #[error("vCPU {0}: cannot build the MSR list")]
    MsrList(u32),
}

/// Control-register bits the shim sets.
mod bits {
    pub(crate) const CR0_PE: u64 = 1 << 0;
    pub(crate) const CR0_MP: u64 = 1 << 1;
    pub(crate) const CR0_ET: u64 = 1 << 4;
    pub(crate) const CR0_NE: u64 = 1 << 5;
    pub(crate) const CR0_WP: u64 = 1 << 16;
    pub(crate) const CR0_PG: u64 = 1 << 31;
    pub(crate) const CR4_PAE: u64 = 1 << 5;
    pub(crate) const CR4_OSFXSR: u64 = 1 << 9;
    pub(crate) const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub(crate) const CR4_FSGSBASE: u64 = 1 << 16;
    pub(crate) const EFER_LME: u64 = 1 << 8;
    pub(crate) const EFER_LMA: u64 = 1 << 10;
    /// RFLAGS: reserved bit 1 and IOPL = 3 (interrupts stay disabled: there are none).
    pub(crate) const RFLAGS_ENTRY: u64 = 0x2 | (3 << 12);
}

fn user_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// What a vCPU exit asks the loop to do (copied out of `kvm_run` before handling).
enum Exit {
    Hypercall { call: Option<u32>, gpa: u64 },
    Nop,
    Fault,
    Port { port: u16, write: bool },
    Mmio { gpa: u64, write: bool },
    Interrupted,
    Other(String),
}

/// One KVM vCPU.
#[derive(Debug)]
pub(crate) struct Vcpu {
    id: u32,
    fd: VcpuFd,
    /// KVM keeps this vCPU's steal-time record ([`hypercall_abi::steal`]).
    steal_time: bool,
}

/// KVM's paravirtual steal-time MSR (`MSR_KVM_STEAL_TIME`): the guest-physical address of a
/// 64-byte record, with bit 0 set to enable it.
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;

impl Vcpu {
    /// Creates vCPU `id` in long mode at CPL 3 with the VM's CPUID, GDT, IDT, TSS and page
    /// tables. Registers are set by [`Vcpu::enter`].
    pub(crate) fn create(vm_fd: &VmFd, cpuid: &CpuId, id: u32) -> Result<Vcpu, VcpuError> {
        let err = |what| move |source| VcpuError::Kvm { id, what, source };
        let mut fd = vm_fd.create_vcpu(u64::from(id)).map_err(err("create"))?;
        fd.set_cpuid2(cpuid).map_err(err("set CPUID"))?;
        let mut s = fd.get_sregs().map_err(err("get sregs"))?;
        use bits::*;
        s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        s.cr3 = PML4_ADDR;
        s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_FSGSBASE;
        s.efer = EFER_LME | EFER_LMA;
        s.cs = user_segment(selector::USER_CODE, true);
        let data = user_segment(selector::USER_DATA, false);
        (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
        s.tr = kvm_segment {
            base: Layout::tss_addr(id),
            limit: Layout::tss_limit(id) as u32,
            selector: selector::tss(id),
            type_: 0xB, // busy 64-bit TSS
            present: 1,
            ..Default::default()
        };
        s.gdt.base = GDT_ADDR;
        s.gdt.limit = (GDT_SIZE - 1) as u16;
        s.idt.base = IDT_ADDR;
        s.idt.limit = 256 * 16 - 1;
        fd.set_sregs(&s).map_err(err("set sregs"))?;
        fd.set_sync_valid_reg(SyncReg::Register);
        let steal_time = enable_steal_time(&fd, id);
        Ok(Vcpu { id, fd, steal_time })
    }

    /// Its id.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// This fresh vCPU (made by [`Vcpu::create`], never run) with the saved state `st`; its
    /// id must be `st`'s.
    pub(crate) fn with_state(self, st: &VcpuState) -> Result<Vcpu, VcpuError> {
        self.load(st)?;
        Ok(self)
    }

    /// Whether KVM keeps this vCPU's steal-time record.
    pub(crate) fn steal_time(&self) -> bool {
        self.steal_time
    }

    /// The TSC frequency KVM gives this vCPU, in kHz (0 if KVM does not say).
    pub(crate) fn tsc_khz(&self) -> u64 {
        self.fd.get_tsc_khz().map(u64::from).unwrap_or(0)
    }

    /// Sets the registers for entry at `rip` with `rsp`, `rdi`, `rsi` at CPL 3, IOPL 3.
    pub(crate) fn enter(&self, rip: u64, rsp: u64, rdi: u64, rsi: u64) -> Result<(), VcpuError> {
        let regs = kvm_regs { rip, rsp, rdi, rsi, rflags: bits::RFLAGS_ENTRY, ..Default::default() };
        self.fd.set_regs(&regs).map_err(|source| VcpuError::Kvm { id: self.id, what: "set regs", source })
    }

    /// Does ahead, for a warm pool's VM (off the path of a wake), what KVM does at a vCPU's
    /// first entry: ~0.15 ms here of the ~0.2 ms the first `KVM_RUN` of a woken VM took.
    /// * One `KVM_RUN` with `immediate_exit`, which returns without entering the guest: since
    ///   Linux 6.13 a VM's first `KVM_RUN` starts its NX huge page recovery thread.
    /// * One `KVM_PRE_FAULT_MEMORY` of a page of boot memory (Linux 6.10 and later): it loads
    ///   the vCPU's MMU, which fills its caches of page-table pages (~0.1 ms of page
    ///   allocations and zeroing). Under shadow paging (this host) KVM then refuses the
    ///   mapping itself (`EOPNOTSUPP`): no guest mapping is made while the memory is still
    ///   empty. With two-dimensional paging it maps that page, zero as the guest would find it.
    ///
    /// Boot memory must be registered first (a root outside guest memory makes KVM fail the
    /// vCPU's next entry). Any refusal (older kernels: `ENOTTY`) leaves the work to the first
    /// real run, as before.
    pub(crate) fn prepare_first_run(&mut self) {
        // EINTR is the expected answer.
        let _ = self.run_without_entering();
        // kvm-ioctls 0.25 has no wrapper for it.
        vmm_sys_util::ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, kvm_bindings::KVMIO, 0xd5, kvm_pre_fault_memory);
        let mut range = kvm_pre_fault_memory { gpa: 0, size: PAGE_SIZE, ..Default::default() };
        // SAFETY: the ioctl reads and updates `range`, a `kvm_pre_fault_memory` that lives
        // across the call, on this vCPU's fd; at most it maps guest page 0 of the registered
        // boot memory.
        unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.fd, KVM_PRE_FAULT_MEMORY(), &mut range) };
    }

    /// One `KVM_RUN` with `immediate_exit`: KVM completes what the last exit left pending and
    /// returns (EINTR, or EAGAIN) without entering the guest.
    fn run_without_entering(&mut self) -> Result<(), i32> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        r
    }

    /// Completes the call the vCPU made (its `out`): one KVM_RUN with `immediate_exit`, which
    /// loads the status written to `rax` and steps past the instruction without entering the
    /// guest, so a state read now resumes after the call.
    fn complete_pending_exit(&mut self) -> Result<(), VcpuError> {
        match self.run_without_entering() {
            Err(e) if e == libc::EINTR || e == libc::EAGAIN => Ok(()),
            Ok(()) | Err(_) => Err(VcpuError::PendingExit(self.id)),
        }
    }

    /// Saves the vCPU's state, on its own thread while the VM is paused: its pending call is
    /// completed first.
    fn save_state(&mut self) -> Result<VcpuState, VcpuError> {
        self.complete_pending_exit()?;
        Persist::save(&*self)
    }
}

/// Points KVM's steal-time record of vCPU `id` at its slot of the steal-time page; `false`
/// when this KVM does not keep steal time (the guest then sees no steal, as before).
fn enable_steal_time(fd: &VcpuFd, id: u32) -> bool {
    let entry =
        kvm_msr_entry { index: MSR_KVM_STEAL_TIME, data: hypercall_abi::StealTime::addr(id) | 1, ..Default::default() };
    Msrs::from_entries(&[entry]).is_ok_and(|msrs| matches!(fd.set_msrs(&msrs), Ok(1)))
}

/// Where a restored vCPU is made: the VM's KVM handle and CPUID, and its id.
pub(crate) struct VcpuArgs<'a> {
    pub(crate) vm: &'a VmFd,
    pub(crate) cpuid: &'a CpuId,
}

impl Persist for Vcpu {
    type State = VcpuState;
    type Args<'a> = VcpuArgs<'a>;
    type Error = VcpuError;

    /// The registers, segment and control registers, FPU state and MSRs (the caller completes
    /// a pending call first).
    fn save(&self) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        let err = |what| move |source| VcpuError::Kvm { id, what, source };
        let regs = self.fd.get_regs().map_err(err("get regs"))?;
        let sregs = self.fd.get_sregs().map_err(err("get sregs"))?;
        let xsave = self.fd.get_xsave().map_err(err("get xsave"))?;
        // One call reads them all; KVM stops at the first it refuses, which is left out, and
        // the rest are read by the next call.
        let mut msrs = Vec::new();
        let mut rest: &[u32] = &SAVED_MSRS;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> =
                rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut batch = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList(id))?;
            let read = self.fd.get_msrs(&mut batch).unwrap_or(0);
            msrs.extend_from_slice(batch.as_slice().get(..read).unwrap_or_default());
            rest = rest.get(read + 1..).unwrap_or_default();
        }
        Ok(VcpuState { id: self.id, regs, sregs, xsave, msrs })
    }

    /// A new vCPU with the saved state `st`.
    fn restore(args: VcpuArgs<'_>, st: &VcpuState) -> Result<Vcpu, VcpuError> {
        let vcpu = Vcpu::create(args.vm, args.cpuid, st.id)?;
        vcpu.load(st)?;
        Ok(vcpu)
    }
}

impl Vcpu {
    /// Loads a saved state into this (new) vCPU.
    fn load(&self, st: &VcpuState) -> Result<(), VcpuError> {
        let err = |what| move |source| VcpuError::Kvm { id: self.id, what, source };
        self.fd.set_sregs(&st.sregs).map_err(err("set sregs"))?;
        // SAFETY: `st.xsave` is a whole 4 KiB `kvm_xsave` (the legacy size, which KVM_SET_XSAVE
        // reads; the VM did not enable KVM_CAP_XSAVE2).
        unsafe { self.fd.set_xsave(&st.xsave) }.map_err(err("set xsave"))?;
        // One call sets them all; KVM stops at the first it refuses, which is left at its reset
        // value (none of them matters to the guest's correctness: the TSC only moves time
        // forward), and the rest are set by the next call.
        let mut rest: &[kvm_msr_entry] = &st.msrs;
        while !rest.is_empty() {
            let set = match Msrs::from_entries(rest) {
                Ok(batch) => self.fd.set_msrs(&batch).unwrap_or(0),
                Err(_) => 0,
            };
            rest = rest.get(set + 1..).unwrap_or_default();
        }
        self.fd.set_regs(&st.regs).map_err(err("set regs"))
    }
}

/// Starts `vcpu` on a thread of its own (named `VM-vcpuN`), `parked` (a restored vCPU that
/// was down) or running; the thread is joined when the VM ends.
pub(crate) fn spawn(vm: &Arc<VmShared>, vcpu: Vcpu, handle: Arc<VcpuHandle>, parked: bool) -> Result<(), VcpuError> {
    let shared = Arc::clone(vm);
    let name = format!("{}-vcpu{}", vm.name(), vcpu.id);
    let job = Box::new(move || VcpuThread { vcpu, vm: shared, handle, mode: Mode::default() }.run(parked));
    let thread =
        crate::host::standby::spawn(Some(crate::host::seccomp::Role::Vcpu), name, job).map_err(VcpuError::Thread)?;
    vm.add_thread(thread);
    Ok(())
}

/// What the handle's events set on the thread.
#[derive(Debug, Default)]
struct Mode {
    /// Stay out of the guest until resumed.
    paused: bool,
    /// Leave the loop.
    finishing: bool,
    /// Enforcement: stay out of the guest until then.
    throttled_until: Option<Instant>,
}

/// Where the thread waits while it serves an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// At the top of its loop, out of the guest with its last call completable.
    Loop,
    /// Asleep in BLOCK (its call not yet answered).
    Block,
    /// Parked (the vCPU is down).
    Parked,
}

impl Mode {
    /// Serves `event` where the thread waits. `vcpu` saves the state (the loop only).
    fn serve(&mut self, id: u32, event: VcpuEvent, at: Waiting, vcpu: Option<&mut Vcpu>) -> Served {
        match event {
            VcpuEvent::Pause(reply) => {
                self.paused = true;
                let _ = reply.send((id, VcpuResponse::Paused));
                Served::Stay
            }
            VcpuEvent::Resume => {
                self.paused = false;
                Served::Stay
            }
            // A vCPU that does not run guest code needs no throttling.
            VcpuEvent::Throttle if at != Waiting::Loop => Served::Stay,
            VcpuEvent::Throttle => {
                self.throttled_until = Some(Instant::now() + THROTTLE_PAUSE);
                Served::Stay
            }
            VcpuEvent::SaveState(reply) => match (at, vcpu) {
                (Waiting::Parked, _) => {
                    let _ = reply.send((id, VcpuResponse::Parked));
                    Served::Stay
                }
                (Waiting::Loop, Some(v)) => {
                    let answer = match v.save_state() {
                        Ok(s) => VcpuResponse::Saved(Box::new(s)),
                        Err(e) => VcpuResponse::Failed(e.to_string()),
                    };
                    let _ = reply.send((id, answer));
                    Served::Stay
                }
                // In BLOCK: leave it (its call completes), then the loop saves.
                (_, _) => Served::Leave(Some(VcpuEvent::SaveState(reply))),
            },
            VcpuEvent::Finish => {
                self.finishing = true;
                Served::Leave(None)
            }
        }
    }
}

/// A vCPU's thread.
struct VcpuThread {
    vcpu: Vcpu,
    vm: Arc<VmShared>,
    handle: Arc<VcpuHandle>,
    mode: Mode,
}

impl VcpuThread {
    /// Runs the guest until the VM stops, parking while the vCPU is down.
    fn run(mut self, parked: bool) {
        crate::host::seccomp::install_thread(crate::host::seccomp::Role::Vcpu);
        if self.vcpu.id == 0 && self.vm.config().endpoints.pin_io && self.vm.devices().serving() {
            crate::host::affinity::place(crate::host::affinity::Role::DeviceVcpu);
        }
        bind_kvm_run(self.vcpu.fd.get_kvm_run() as *mut kvm_run);
        self.handle.bind_current_thread();
        // A vCPU that starts while the VM is paused starts paused.
        self.mode.paused = self.vm.is_paused();
        if !parked || self.park() {
            self.run_loop();
        }
        self.handle.unbind_current_thread();
        bind_kvm_run(std::ptr::null_mut());
    }

    /// Parks until the vCPU is reused (`true`: it resumes at its new entry) or the VM ends.
    fn park(&mut self) -> bool {
        let id = self.vcpu.id;
        let mode = &mut self.mode;
        match self.handle.park(&mut |e| mode.serve(id, e, Waiting::Parked, None)) {
            Some(entry) => {
                self.vcpu.resume_at(entry);
                true
            }
            None => false,
        }
    }

    fn run_loop(&mut self) {
        let id = self.vcpu.id;
        // Whether this vCPU has entered the guest yet: the first vCPU to (a migrated VM tells
        // its source when it runs again).
        let mut entered = false;
        loop {
            if self.vm.is_stopping() || self.mode.finishing {
                return;
            }
            if self.handle.has_events() {
                if let Some(e) = self.handle.next_event() {
                    self.mode.serve(id, e, Waiting::Loop, Some(&mut self.vcpu));
                }
                continue;
            }
            if self.mode.paused {
                if let Some(e) = self.handle.wait_event(None) {
                    self.mode.serve(id, e, Waiting::Loop, Some(&mut self.vcpu));
                }
                continue;
            }
            if let Some(until) = self.mode.throttled_until {
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    // Enforcement: held out of the guest (its memory and registers untouched),
                    // serving events meanwhile.
                    if let Some(e) = self.handle.wait_event(Some(left)) {
                        self.mode.serve(id, e, Waiting::Loop, Some(&mut self.vcpu));
                    }
                    continue;
                }
                self.mode.throttled_until = None;
            }
            if !entered {
                entered = true;
                self.vm.started_now();
            }
            let flow = self.step();
            match flow {
                Flow::Continue => {}
                Flow::Stop(outcome) => {
                    self.vm.finish(outcome);
                    return;
                }
                Flow::Park => {
                    if !self.park() {
                        return;
                    }
                }
                Flow::Start(start) => {
                    let status = match self.start(&start) {
                        Ok(()) => start.confirm(&self.vm),
                        Err(e) => start.abandon(&self.vm, &e),
                    };
                    self.vcpu.set_rax(status);
                }
            }
        }
    }

    /// Runs the guest to its next exit and serves it.
    fn step(&mut self) -> Flow {
        let vm = &*self.vm;
        let exit = self.vcpu.next_exit();
        self.handle.set_last_rip(self.vcpu.fd.sync_regs().regs.rip);
        match exit {
            Exit::Hypercall { call, gpa } => {
                let id = self.vcpu.id;
                let mode = &mut self.mode;
                let mut serve = |e| mode.serve(id, e, Waiting::Block, None);
                let (status, flow) = hypercall::dispatch(vm, &self.handle, call, gpa, &mut serve);
                if !matches!(flow, Flow::Park) {
                    // The status also goes to rax, so a call whose block is unreadable still
                    // gets an answer. Sync regs make this free of extra ioctls.
                    self.vcpu.set_rax(status);
                }
                flow
            }
            Exit::Nop => {
                vm.stats().nop_exits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Flow::Continue
            }
            Exit::Fault => Flow::Stop(self.vcpu.fault_outcome(vm)),
            Exit::Port { port, write } => Flow::Stop(Outcome::Unserved {
                vcpu: self.vcpu.id,
                what: format!(
                    "{} I/O port {port:#x}, which the shim does not serve (RIP {})",
                    if write { "wrote to" } else { "read from" },
                    self.vcpu.rip_description(vm)
                ),
            }),
            Exit::Mmio { gpa, write } => {
                Flow::Stop(Outcome::Unbacked { vcpu: self.vcpu.id, gpa, write, rip: self.vcpu.rip_description(vm) })
            }
            Exit::Interrupted => {
                // Kicked out of KVM_RUN: the loop serves the events that came.
                self.vcpu.fd.set_kvm_immediate_exit(0);
                Flow::Continue
            }
            Exit::Other(what) => Flow::Stop(Outcome::Unserved {
                vcpu: self.vcpu.id,
                what: format!("{what} (RIP {})\n{}", self.vcpu.rip_description(vm), self.vcpu.register_dump()),
            }),
        }
    }

    /// Creates the vCPU VCPU_UP admitted, points it at its entry and starts its thread.
    fn start(&self, start: &VcpuStart) -> Result<(), VcpuError> {
        let vm = &self.vm;
        let handle = vm.vcpus().get(start.id).ok_or(VcpuError::PendingExit(start.id))?;
        let vcpu = Vcpu::create(vm.fd(), vm.cpuid(), start.id)?;
        vcpu.enter(start.entry.rip, start.entry.rsp, start.entry.arg, u64::from(start.id))?;
        spawn(vm, vcpu, handle, false)
    }
}

impl Vcpu {
    /// Writes a call's status into `rax` (through sync regs, loaded at the next KVM_RUN).
    fn set_rax(&mut self, status: hypercall_abi::Status) {
        self.fd.sync_regs_mut().regs.rax = i64::from(status.0) as u64;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Points a reused vCPU at its new entry. Written through sync regs (marked dirty), which
    /// KVM loads at the next KVM_RUN, replacing whatever the vCPU held when it went down.
    fn resume_at(&mut self, entry: Entry) {
        self.fd.set_kvm_immediate_exit(0);
        self.fd.sync_regs_mut().regs = kvm_regs {
            rip: entry.rip,
            rsp: entry.rsp,
            rdi: entry.arg,
            rsi: u64::from(self.id),
            rflags: bits::RFLAGS_ENTRY,
            ..Default::default()
        };
        self.fd.set_sync_dirty_reg(SyncReg::Register);
    }

    /// Runs the vCPU once and classifies the exit.
    fn next_exit(&mut self) -> Exit {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match port {
                HYPERCALL_PORT => {
                    let call = <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes);
                    Exit::Hypercall { call, gpa: 0 }
                }
                NOP_PORT => Exit::Nop,
                p if p == u16::from(FAULT_PORT) => Exit::Fault,
                p => Exit::Port { port: p, write: true },
            },
            Ok(VcpuExit::IoIn(port, _)) => Exit::Port { port, write: false },
            Ok(VcpuExit::MmioRead(gpa, _)) => Exit::Mmio { gpa, write: false },
            Ok(VcpuExit::MmioWrite(gpa, _)) => Exit::Mmio { gpa, write: true },
            Ok(VcpuExit::Hlt) => Exit::Other("executed hlt outside the exception path".into()),
            Ok(VcpuExit::Shutdown) => Exit::Other("triple fault (the CPU could not deliver an exception)".into()),
            Ok(VcpuExit::FailEntry(reason, _)) => Exit::Other(format!("KVM entry failure, reason {reason:#x}")),
            Ok(VcpuExit::InternalError) => {
                Exit::Other("KVM internal error (an instruction this KVM cannot run at the guest's CPL)".into())
            }
            Ok(other) => Exit::Other(format!("unexpected KVM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Interrupted,
            Err(e) => Exit::Other(format!("KVM_RUN failed: {e}")),
        }
        .with_gpa(self)
    }

    /// Describes the current RIP (`0x...` plus `<symbol>` when known).
    fn rip_description(&self, vm: &VmShared) -> String {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        match vm.image().symbolize(rip) {
            Some(s) => format!("{rip:#x} <{s}>"),
            None => format!("{rip:#x}"),
        }
    }

    fn register_dump(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.fd.get_regs() {
            let _ = fault::write_regs(&mut out, &r, None);
        }
        out
    }

    /// Builds the diagnosis for an exception reported by a CPL-0 stub. The stub pushed
    /// `[vector][error code]` on top of the CPU's frame `[rip][cs][rflags][rsp][ss]`.
    fn fault_outcome(&self, vm: &VmShared) -> Outcome {
        let (regs, sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => return Outcome::Internal(format!("cannot read vCPU {} state: {e}", self.id)),
        };
        if sregs.cs.dpl != 0 {
            return Outcome::Unserved {
                vcpu: self.id,
                what: format!("wrote to the exception-report port from CPL {} (RIP {:#x})", sregs.cs.dpl, regs.rip),
            };
        }
        let mut frame = [0u64; 7];
        for (i, slot) in frame.iter_mut().enumerate() {
            match vm.mem().read_obj::<u64>(regs.rsp + 8 * i as u64) {
                Ok(v) => *slot = v,
                Err(e) => return Outcome::Internal(format!("cannot read the exception frame: {e}")),
            }
        }
        let [vector, error_code, rip, cs, rflags, rsp, _ss] = frame;
        let mut gregs = regs;
        gregs.rip = rip;
        Outcome::Fault(Box::new(GuestFault {
            vcpu: self.id,
            vector,
            error_code,
            rip,
            symbol: vm.image().symbolize(rip),
            cs,
            rflags,
            rsp,
            cr2: sregs.cr2,
            regs: gregs,
        }))
    }
}

impl Exit {
    /// Fills in the argument-block address of a hypercall from the synced registers.
    fn with_gpa(self, vcpu: &Vcpu) -> Exit {
        match self {
            Exit::Hypercall { call, .. } => Exit::Hypercall { call, gpa: vcpu.fd.sync_regs().regs.rdi },
            other => other,
        }
    }
}
