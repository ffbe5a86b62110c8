//! CPU placement of the threads that hand packets to each other, for dedicated hosts.
//!
//! By default nothing is pinned: on a shared host the scheduler must be free to move a thread
//! off a CPU that a neighbour keeps busy (nothing in the request path waits by spinning, so
//! two threads on one CPU cost a context switch, not a time slice). With `--pin-io`
//! ([`EndpointConfig::pin_io`](crate::base::config::EndpointConfig)) a host that runs only
//! this VM keeps vCPU 0 on the first CPU the process may use and the vsock I/O thread on the
//! last, with the I/O thread at nice -5 when the process may raise it.

/// The CPUs this process may run on.
pub fn allowed() -> Vec<usize> {
    // SAFETY: `set` is a zeroed cpu_set_t that sched_getaffinity fills; CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: `set` is a zeroed cpu_set_t with one CPU added; sched_setaffinity(0) applies to
    // the calling thread. A failure leaves the thread where it was.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Which end of the pair the calling thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// vCPU 0 (drives the guest's devices).
    DeviceVcpu,
    /// A device's I/O thread.
    DeviceIo,
}

/// Pins the calling thread for `role`, when the process may use at least two CPUs, and gives
/// the I/O thread a higher scheduling weight (nice -5, when the process may raise it).
pub(crate) fn place(role: Role) {
    if role == Role::DeviceIo {
        // SAFETY: setpriority on the calling thread (tid) only changes its nice value; a
        // refusal (no CAP_SYS_NICE) leaves it as it was.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, -5);
        }
    }
    let cpus = allowed();
    if cpus.len() < 2 {
        return;
    }
    match role {
        Role::DeviceVcpu => pin_to(cpus[0]),
        Role::DeviceIo => pin_to(cpus[cpus.len() - 1]),
    }
}
