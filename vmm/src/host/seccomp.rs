//! seccomp allow-lists (`seccompiler`): what each thread of a shim that runs VMs may ask of the
//! host kernel.
//!
//! * When a run starts (before any VM's first `KVM_RUN`), a **process** filter, the union of
//!   every role's list, is applied to every thread (`TSYNC`); threads created later inherit
//!   it, so every thread of the process runs filtered (`Seccomp: 2` in /proc).
//! * Each thread that serves a VM then narrows itself with its **role**'s list at its start:
//!   vCPU threads, the vsock I/O threads, the console threads, the governor and the control
//!   API. Filters stack: a thread may make a call only if both allow it.
//!
//! A call outside the lists raises `SIGSYS`; the handler prints the call number and ends the
//! process with exit code 70 (it is a shim bug). `--no-seccomp` runs without filters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

/// seccomp failures.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// The filter could not be built.
    #[error("cannot build the seccomp filter for {role}: {reason}")]
    Build {
        /// The role.
        role: &'static str,
        /// Why.
        reason: String,
    },
    /// The kernel refused the filter.
    #[error("cannot apply the seccomp filter for {role}: {reason} (--no-seccomp runs without it)")]
    Apply {
        /// The role.
        role: &'static str,
        /// Why.
        reason: String,
    },
}

/// A thread's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Every thread (the union; applied to the whole process).
    Process,
    /// A vCPU thread.
    Vcpu,
    /// A vsock I/O thread.
    Io,
    /// A console thread.
    Console,
    /// The governor.
    Governor,
    /// The control API.
    Api,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Process => "the process",
            Role::Vcpu => "a vCPU thread",
            Role::Io => "an I/O thread",
            Role::Console => "a console thread",
            Role::Governor => "the governor",
            Role::Api => "the control API",
        }
    }
}

/// What every thread needs: memory, locks, signals, thread exit, time, stderr diagnostics.
const COMMON: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_prctl,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_getrusage,
    // A thread narrows itself with its role's filter.
    libc::SYS_seccomp,
];

/// Files: the kernel image (symbols for a diagnosis), /proc figures, timeline and snapshot
/// files.
const FILES: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_mkdir,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_fcntl,
    // Locks on the shim's own directories in the temporary directory.
    libc::SYS_flock,
];

/// Sockets: published ports, the hybrid socket, the API, migration channels.
const SOCKETS: &[libc::c_long] = &[
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
];

/// KVM and threads: vCPU threads create vCPUs (and their threads) and memory slots, and the
/// memfds of a VM backed by them (`--memory-backing memfd`).
const KVM: &[libc::c_long] =
    &[libc::SYS_ioctl, libc::SYS_clone, libc::SYS_clone3, libc::SYS_sched_setaffinity, libc::SYS_memfd_create];

/// The main thread's extras: signal handlers, limits, process start-up leftovers.
const MAIN: &[libc::c_long] = &[
    libc::SYS_prlimit64,
    libc::SYS_setpriority,
    libc::SYS_getpriority,
    libc::SYS_arch_prctl,
    libc::SYS_set_tid_address,
    libc::SYS_access,
    libc::SYS_pipe2,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_wait4,
    libc::SYS_kill,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    // A node pool binds a pod's published ports inside the pod's network namespace (after
    // checking that the file is one).
    libc::SYS_setns,
    libc::SYS_fstatfs,
    // A post-copy target's userfaultfd, made by the thread that receives the VM (never a
    // vCPU's: it is a known aid to kernel exploits).
    libc::SYS_userfaultfd,
];

fn syscalls(role: Role) -> Vec<libc::c_long> {
    let mut all: Vec<libc::c_long> = COMMON.to_vec();
    let extra: &[&[libc::c_long]] = match role {
        Role::Process => &[FILES, SOCKETS, KVM, MAIN],
        // A vCPU thread serves hypercalls: KVM, memory slots, new vCPU threads, /proc and the
        // kernel image (diagnoses), the timeline file, the device's eventfd.
        Role::Vcpu => &[FILES, KVM, &[libc::SYS_setpriority]],
        Role::Io => &[SOCKETS, FILES, &[libc::SYS_ioctl, libc::SYS_sched_setaffinity, libc::SYS_setpriority]],
        Role::Console => &[],
        Role::Governor => &[FILES],
        // The API only talks HTTP on its socket and hands requests to the threads that own
        // the VMs (which do the work: snapshots, migrations); /proc figures come from a file
        // opened before the thread narrowed itself.
        Role::Api => &[SOCKETS, &[libc::SYS_read, libc::SYS_pread64]],
    };
    for e in extra {
        all.extend_from_slice(e);
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// `role`'s filter, compiled once per process: every VM an on-demand slot boots or wakes
/// starts its threads again, each narrowing itself.
fn program(role: Role) -> Result<BpfProgram, SeccompError> {
    const ROLES: usize = 6;
    const _: () = assert!(Role::Api as usize + 1 == ROLES, "one compiled filter per role");
    static COMPILED: [std::sync::OnceLock<BpfProgram>; ROLES] = [const { std::sync::OnceLock::new() }; ROLES];
    let slot = &COMPILED[role as usize];
    if let Some(p) = slot.get() {
        return Ok(p.clone());
    }
    let compiled = compile(role)?;
    Ok(slot.get_or_init(|| compiled).clone())
}

fn compile(role: Role) -> Result<BpfProgram, SeccompError> {
    let err = |reason: String| SeccompError::Build { role: role.name(), reason };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = syscalls(role).into_iter().map(|n| (n, vec![])).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(e.to_string()))?;
    let filter =
        SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch).map_err(|e| err(e.to_string()))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| err(e.to_string()))
}

static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether the process runs filtered.
pub(crate) fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SIGSYS's siginfo: after signo, errno, code (and padding) come the call address (8 bytes)
    // and the call number (4 bytes), at offset 24.
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; only a 4-byte read at a fixed
    // offset inside it.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let mut msg = *b"hypervisor-shim: seccomp: a thread made system call #000, which its allow-list does not permit (a shim bug; --no-seccomp runs without filters)\n";
    let digits = [(nr / 100 % 10) as u8, (nr / 10 % 10) as u8, (nr % 10) as u8];
    for (i, d) in digits.iter().enumerate() {
        msg[53 + i] = b'0' + d;
    }
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(i32::from(crate::base::exit::INTERNAL));
    }
}

/// Filters the whole process (every existing thread and all later ones) with the union list,
/// after installing the `SIGSYS` diagnosis. A process filtered already (an earlier run of this
/// process) stays as it is: its threads are filtered, and some (the standby threads an
/// on-demand run left waiting) narrowed further, which a second process-wide filter could not
/// be synchronised with.
pub(crate) fn install_process() -> Result<(), SeccompError> {
    if active() {
        return Ok(());
    }
    let bpf = program(Role::Process)?;
    // The stderr thread is started now: a filtered thread may have no `clone` to start it.
    crate::host::diag::start();
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
    seccompiler::apply_filter_all_threads(&bpf)
        .map_err(|e| SeccompError::Apply { role: Role::Process.name(), reason: e.to_string() })?;
    ACTIVE.store(true, Ordering::Release);
    Ok(())
}

/// Narrows the calling thread to `role`'s list (a no-op when the process is not filtered).
/// A failure is reported on stderr; the thread goes on under the process filter.
pub(crate) fn install_thread(role: Role) {
    thread_local! {
        /// The role this thread narrowed itself to (a thread started ahead of need narrows
        /// itself before it is given its work, which asks again).
        static NARROWED: std::cell::Cell<Option<Role>> = const { std::cell::Cell::new(None) };
    }
    if !active() || NARROWED.get() == Some(role) {
        return;
    }
    NARROWED.set(Some(role));
    let applied = program(role).and_then(|bpf| {
        seccompiler::apply_filter(&bpf).map_err(|e| SeccompError::Apply { role: role.name(), reason: e.to_string() })
    });
    if let Err(e) = applied {
        crate::host::diag::say(format_args!("{e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_and_is_a_subset_of_the_process_list() {
        let all = syscalls(Role::Process);
        for role in [Role::Vcpu, Role::Io, Role::Console, Role::Governor, Role::Api] {
            assert!(program(role).is_ok());
            for n in syscalls(role) {
                assert!(all.contains(&n), "{role:?} allows {n}, the process list does not");
            }
        }
        assert!(!syscalls(Role::Console).contains(&libc::SYS_socket));
        let api = syscalls(Role::Api);
        for forbidden in [libc::SYS_ioctl, libc::SYS_openat, libc::SYS_mkdir, libc::SYS_clone, libc::SYS_clone3] {
            assert!(!api.contains(&forbidden), "the API thread may make system call {forbidden}");
        }
        assert!(!syscalls(Role::Process).contains(&libc::SYS_execve), "no exec once filtered");
    }
}
