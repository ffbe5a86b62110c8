//! Ctrl-C: the first SIGINT/SIGTERM asks the guest to stop (a STOP notice); the second ends the
//! run at once. After a SIGINT (someone at a terminal) the run also ends by itself when the
//! guest has not stopped within [`SIGINT_STOP_GRACE`]; after a SIGTERM whoever sent it
//! (containerd, systemd, kubelet) owns the deadline.
//!
//! The handler only counts and writes to an eventfd (both async-signal-safe). A thread of its
//! own, blocked reading that eventfd, tells every subscriber (each VM's owner, an on-demand
//! slot waiting for a client): nobody polls for interrupts.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

static INTERRUPTS: AtomicU32 = AtomicU32::new(0);
/// Whether any of them was a SIGINT.
static SIGINT_SEEN: AtomicBool = AtomicBool::new(false);

/// How long a guest has to stop after a SIGINT's STOP notice before the run ends without it.
pub(crate) const SIGINT_STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);
/// The eventfd the handler writes (-1 until installed).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

type Callback = Arc<dyn Fn(u32) + Send + Sync>;

static SUBSCRIBERS: Mutex<Vec<(u64, Callback)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

extern "C" fn on_interrupt(sig: libc::c_int) {
    if sig == libc::SIGINT {
        SIGINT_SEEN.store(true, Ordering::SeqCst);
    }
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer, as an eventfd
        // write needs.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Installs the SIGINT/SIGTERM handler and the thread that tells subscribers (once per
/// process).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd >= 0 {
            let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || watch(fd));
            if spawned.is_ok() {
                WAKE_FD.store(fd, Ordering::SeqCst);
            } else {
                crate::host::diag::say(format_args!(
                    "cannot start the signal thread: Ctrl-C ends the run only with --timeout"
                ));
            }
        }
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `on_interrupt` only increments an atomic and writes to an eventfd, both
            // async-signal-safe; the sigaction struct is fully initialised (zeroed, handler and
            // flags set).
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_interrupt as *const () as usize;
                act.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
    });
}

/// The signal thread: waits for the handler's eventfd and tells every subscriber. It lives as
/// long as the process and keeps the process's seccomp filter as it is: a thread that narrowed
/// its own would stop a later run (`stress` runs several) from synchronizing the process filter
/// over every thread.
fn watch(fd: libc::c_int) {
    let mut buf = 0u64;
    loop {
        // SAFETY: `buf` is a valid 8-byte buffer, as an eventfd read needs; `fd` stays open
        // for the process's life.
        let n = unsafe { libc::read(fd, std::ptr::addr_of_mut!(buf).cast(), 8) };
        if n != 8 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        let count = interrupts();
        let subscribers: Vec<Callback> =
            SUBSCRIBERS.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(_, f)| Arc::clone(f)).collect();
        for f in subscribers {
            f(count);
        }
    }
}

/// How many interrupts arrived so far.
pub fn interrupts() -> u32 {
    INTERRUPTS.load(Ordering::SeqCst)
}

/// Whether a SIGINT was among the interrupts so far (a SIGTERM's sender keeps its own deadline).
pub(crate) fn sigint_seen() -> bool {
    SIGINT_SEEN.load(Ordering::SeqCst)
}

/// Calls `f` with the interrupt count after every interrupt, until the subscription is dropped.
#[must_use = "the subscription ends when dropped"]
pub(crate) fn subscribe(f: impl Fn(u32) + Send + Sync + 'static) -> Subscription {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    SUBSCRIBERS.lock().unwrap_or_else(|p| p.into_inner()).push((id, Arc::new(f)));
    Subscription(id)
}

/// A [`subscribe`]r's registration.
#[derive(Debug)]
pub(crate) struct Subscription(u64);

impl Drop for Subscription {
    fn drop(&mut self) {
        SUBSCRIBERS.lock().unwrap_or_else(|p| p.into_inner()).retain(|(id, _)| *id != self.0);
    }
}
