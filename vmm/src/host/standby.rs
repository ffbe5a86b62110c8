//! Threads started ahead of need: a thread that serves a VM (its vCPU, its vsock I/O, its
//! console) costs ~0.1 ms to create and another ~0.1 ms to narrow itself with its seccomp
//! filter here, on the path of a wake. An on-demand slot that waits for a client
//! ([`top_up`]) leaves a few threads of each role waiting, already narrowed; a VM that starts
//! [`take`]s one if there is one, and hands it its work.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::host::seccomp::Role;

/// The work a waiting thread is given.
type Job = Box<dyn FnOnce() + Send>;

/// A thread that waits, narrowed to its role's filter, for one job.
#[derive(Debug)]
pub(crate) struct Standby {
    job: SyncSender<Job>,
    handle: JoinHandle<()>,
}

/// Roles that may be kept waiting, in the order of [`STOCK`].
const ROLES: [Role; 3] = [Role::Vcpu, Role::Io, Role::Console];

/// Most threads of each role kept waiting.
const STOCK_SIZE: usize = 2;

/// The waiting threads by role.
static STOCK: [Mutex<Vec<Standby>>; ROLES.len()] = [const { Mutex::new(Vec::new()) }; ROLES.len()];

fn stock(role: Role) -> Option<std::sync::MutexGuard<'static, Vec<Standby>>> {
    let i = ROLES.iter().position(|&r| r == role)?;
    Some(STOCK[i].lock().unwrap_or_else(|p| p.into_inner()))
}

impl Standby {
    /// Starts a thread that narrows itself to `role`'s filter and waits for its job.
    fn spawn(role: Role) -> std::io::Result<Standby> {
        let (job, jobs): (SyncSender<Job>, Receiver<Job>) = sync_channel(1);
        let handle = std::thread::Builder::new().name("standby".into()).spawn(move || {
            crate::host::seccomp::install_thread(role);
            // No job (the stock was dropped, the process ends): the thread just ends.
            if let Ok(job) = jobs.recv() {
                job();
            }
        })?;
        Ok(Standby { job, handle })
    }

    /// Gives the thread its job, naming it `name` (as `ps` and `/proc/PID/task/*/comm` show
    /// it); the handle joins it. `Err` gives the job back when the thread is gone.
    pub(crate) fn run(self, name: String, job: Job) -> Result<JoinHandle<()>, Job> {
        let named: Job = Box::new(move || {
            set_name(&name);
            job();
        });
        match self.job.send(named) {
            Ok(()) => Ok(self.handle),
            // The job comes back (named: naming a thread twice does no harm).
            Err(e) => Err(e.0),
        }
    }
}

/// Names the calling thread for the host (the kernel keeps 15 bytes); Rust's own name of the
/// thread (in a panic message) stays `standby`.
fn set_name(name: &str) {
    let mut bytes = [0u8; 16];
    for (b, c) in bytes.iter_mut().zip(name.bytes().take(15)) {
        *b = c;
    }
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `bytes`,
    // which lives across the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr()) };
}

/// Starts waiting threads until every role has [`STOCK_SIZE`] (best effort: a thread that
/// cannot be started leaves the VM to start its own).
pub(crate) fn top_up() {
    for role in ROLES {
        while stock(role).is_some_and(|s| s.len() < STOCK_SIZE) {
            let Ok(t) = Standby::spawn(role) else { return };
            if let Some(mut s) = stock(role) {
                s.push(t);
            }
        }
    }
}

/// A waiting thread of `role`, if there is one.
fn take(role: Role) -> Option<Standby> {
    stock(role)?.pop()
}

/// Runs `job` on a thread named `name`: a waiting one of `role` when there is one, else a new
/// one (`job` narrows its thread to its role's filter either way: a waiting thread has
/// already). `None`: always a new thread (a thread that must do something before it narrows
/// itself).
pub(crate) fn spawn(role: Option<Role>, name: String, job: Job) -> std::io::Result<JoinHandle<()>> {
    let job = match role.and_then(take) {
        Some(t) => match t.run(name.clone(), job) {
            Ok(handle) => return Ok(handle),
            Err(job) => job,
        },
        None => job,
    };
    std::thread::Builder::new().name(name).spawn(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of_this_thread() -> String {
        std::fs::read_to_string("/proc/thread-self/comm").unwrap().trim_end().to_string()
    }

    #[test]
    fn a_waiting_thread_runs_its_job_under_its_new_name() {
        top_up();
        assert!(stock(Role::Console).is_some_and(|s| s.len() == STOCK_SIZE));
        let (tx, rx) = std::sync::mpsc::channel();
        let handle =
            spawn(Some(Role::Console), "vm7-console".into(), Box::new(move || tx.send(name_of_this_thread()).unwrap()))
                .unwrap();
        handle.join().unwrap();
        assert_eq!(rx.recv().unwrap(), "vm7-console");
        // Without a role (or with none waiting) a new thread, named from its start.
        let (tx, rx) = std::sync::mpsc::channel();
        spawn(None, "vm7-io".into(), Box::new(move || tx.send(name_of_this_thread()).unwrap()))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(rx.recv().unwrap(), "vm7-io");
    }
}
