//! vCPUs: creation at CPL 3 in long mode, the per-thread run loop, exit dispatch and kicks.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once};

use hypercall_abi::{FAULT_PORT, HYPERCALL_PORT, NOP_PORT};
use kvm_bindings::{CpuId, Msrs, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, kvm_sregs, kvm_xsave};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::base::layout::{GDT_ADDR, GDT_SIZE, IDT_ADDR, Layout, PML4_ADDR, selector};
use crate::vmm::fault::{self, GuestFault};
use crate::vmm::hypercall::{self, Flow};
use crate::vmm::vcpus::{Entry, VcpuControl};
use crate::vmm::vm::{Outcome, VmShared};

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
    Thread(String),
}

/// Control-register bits the shim sets.
mod bits {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const CR4_FSGSBASE: u64 = 1 << 16;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    /// RFLAGS: reserved bit 1 and IOPL = 3 (interrupts stay disabled: there are none).
    pub const RFLAGS_ENTRY: u64 = 0x2 | (3 << 12);
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own `kvm_run` mapping, installed by `Vcpu::run`
        // before the thread can be kicked and cleared before the mapping goes away. Setting
        // `immediate_exit` makes the next (or current) KVM_RUN return EINTR.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    install_kick_handler();
    SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Registration can only fail for an invalid signal number; SIGRTMIN is valid.
        let _ = register_signal_handler(SIGRTMIN(), kick_handler);
    });
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

/// MSRs a snapshot carries (those this KVM reads are saved; the rest are skipped): the TSC,
/// syscall and segment-base MSRs, PAT.
const SAVED_MSRS: [u32; 11] = [
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// One vCPU's architectural state, as a snapshot or a migration carries it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU id.
    pub id: u32,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// The MSRs of [`SAVED_MSRS`] this KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
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
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` in long mode at CPL 3 with the VM's CPUID, GDT, IDT, TSS and page
    /// tables. Registers are set by [`Vcpu::enter`].
    pub fn create(vm: &VmShared, id: u32) -> Result<Vcpu, VcpuError> {
        Self::create_on(&vm.fd, &vm.cpuid, id)
    }

    /// As [`Vcpu::create`], from the VM's KVM handle and CPUID (before its shared state
    /// exists: the boot vCPU is prepared while guest memory is set up).
    pub fn create_on(vm_fd: &VmFd, cpuid: &CpuId, id: u32) -> Result<Vcpu, VcpuError> {
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
        Ok(Vcpu { id, fd })
    }

    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The TSC frequency KVM gives this vCPU, in kHz (0 if KVM does not say).
    pub fn tsc_khz(&self) -> u64 {
        self.fd.get_tsc_khz().map(u64::from).unwrap_or(0)
    }

    /// Sets the registers for entry at `rip` with `rsp`, `rdi`, `rsi` at CPL 3, IOPL 3.
    pub fn enter(&self, rip: u64, rsp: u64, rdi: u64, rsi: u64) -> Result<(), VcpuError> {
        let regs = kvm_regs { rip, rsp, rdi, rsi, rflags: bits::RFLAGS_ENTRY, ..Default::default() };
        self.fd.set_regs(&regs).map_err(|source| VcpuError::Kvm { id: self.id, what: "set regs", source })
    }

    /// Saves the vCPU's state, called on its own thread while the VM is paused. A call the
    /// vCPU made (its `out`) is completed first (one KVM_RUN with `immediate_exit`, which
    /// loads the status written to `rax` and steps past the instruction without entering the
    /// guest), so the state resumes after the call.
    pub fn save_state(&mut self) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        let err = |what| move |source| VcpuError::Kvm { id, what, source };
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e == libc::EINTR || e == libc::EAGAIN => {}
            Ok(()) | Err(_) => {
                return Err(VcpuError::Thread(format!("vCPU {}: could not complete its pending exit", self.id)));
            }
        }
        let regs = self.fd.get_regs().map_err(err("get regs"))?;
        let sregs = self.fd.get_sregs().map_err(err("get sregs"))?;
        let xsave = self.fd.get_xsave().map_err(err("get xsave"))?;
        let mut msrs = Vec::new();
        for index in SAVED_MSRS {
            let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
                .map_err(|_| VcpuError::Thread("MSR list".into()))?;
            if matches!(self.fd.get_msrs(&mut one), Ok(1)) {
                msrs.extend_from_slice(one.as_slice());
            }
        }
        Ok(VcpuState { id: self.id, regs, sregs, xsave, msrs })
    }

    /// Loads a saved state into this (new) vCPU.
    pub fn load_state(&self, st: &VcpuState) -> Result<(), VcpuError> {
        let err = |what| move |source| VcpuError::Kvm { id: self.id, what, source };
        self.fd.set_sregs(&st.sregs).map_err(err("set sregs"))?;
        // SAFETY: `st.xsave` is a whole 4 KiB `kvm_xsave` (the legacy size, which KVM_SET_XSAVE
        // reads; the VM did not enable KVM_CAP_XSAVE2).
        unsafe { self.fd.set_xsave(&st.xsave) }.map_err(err("set xsave"))?;
        for e in &st.msrs {
            // An MSR this KVM refuses to set is left at its reset value (none of them matters
            // to the guest's correctness: the TSC only moves time forward).
            if let Ok(one) = Msrs::from_entries(&[*e]) {
                let _ = self.fd.set_msrs(&one);
            }
        }
        self.fd.set_regs(&st.regs).map_err(err("set regs"))
    }

    /// The vCPU thread: runs the guest until the VM stops, parking while the vCPU is down.
    pub fn run(self, vm: &Arc<VmShared>, ctl: &Arc<VcpuControl>) {
        self.run_from(vm, ctl, false);
    }

    /// As [`Vcpu::run`]; a restored vCPU that was down starts `parked`.
    pub fn run_from(mut self, vm: &Arc<VmShared>, ctl: &Arc<VcpuControl>, parked: bool) {
        install_kick_handler();
        crate::host::seccomp::install_thread(crate::host::seccomp::Role::Vcpu);
        if self.id == 0 && vm.devices.serving() {
            crate::host::affinity::place(crate::host::affinity::Role::DeviceVcpu);
        }
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        ctl.bind_current_thread();
        if parked {
            match ctl.park(&|| vm.is_stopping()) {
                Some(entry) => self.resume_at(entry),
                None => {
                    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
                    return;
                }
            }
        }
        while !vm.is_stopping() {
            if vm.is_paused() {
                vm.wait_while_paused(self.id, &mut || self.save_state().map_err(|e| e.to_string()));
                continue;
            }
            let exit = self.next_exit();
            ctl.last_rip.store(self.fd.sync_regs().regs.rip, Ordering::Relaxed);
            let flow = match exit {
                Exit::Hypercall { call, gpa } => {
                    let (status, flow) = hypercall::dispatch(vm, ctl, call, gpa);
                    if !matches!(flow, Flow::Park) {
                        // The status also goes to rax, so a call whose block is unreadable
                        // still gets an answer. Sync regs make this free of extra ioctls.
                        self.fd.sync_regs_mut().regs.rax = i64::from(status.0) as u64;
                        self.fd.set_sync_dirty_reg(SyncReg::Register);
                    }
                    flow
                }
                Exit::Nop => {
                    vm.stats.nop_exits.fetch_add(1, Ordering::Relaxed);
                    Flow::Continue
                }
                Exit::Fault => Flow::Stop(self.fault_outcome(vm)),
                Exit::Port { port, write } => Flow::Stop(Outcome::Unserved {
                    vcpu: self.id,
                    what: format!(
                        "{} I/O port {port:#x}, which the shim does not serve (RIP {})",
                        if write { "wrote to" } else { "read from" },
                        self.rip_description(vm)
                    ),
                }),
                Exit::Mmio { gpa, write } => {
                    Flow::Stop(Outcome::Unbacked { vcpu: self.id, gpa, write, rip: self.rip_description(vm) })
                }
                Exit::Interrupted => {
                    self.fd.set_kvm_immediate_exit(0);
                    if ctl.is_throttled() && !vm.is_stopping() {
                        // Enforcement: the governor interrupts a throttled vCPU every tick;
                        // holding it back here leaves it a small share of run time. Its
                        // memory and registers are untouched.
                        std::thread::sleep(crate::policy::admission::THROTTLE_PAUSE);
                    }
                    Flow::Continue
                }
                Exit::Other(what) => Flow::Stop(Outcome::Unserved {
                    vcpu: self.id,
                    what: format!("{what} (RIP {})\n{}", self.rip_description(vm), self.register_dump()),
                }),
            };
            match flow {
                Flow::Continue => {}
                Flow::Stop(outcome) => {
                    vm.finish(outcome);
                    break;
                }
                Flow::Park => match ctl.park(&|| vm.is_stopping()) {
                    Some(entry) => self.resume_at(entry),
                    None => break,
                },
            }
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
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
        match vm.image.symbolize(rip) {
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
            match vm.mem.read_obj::<u64>(regs.rsp + 8 * i as u64) {
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
            symbol: vm.image.symbolize(rip),
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
