//! Runs that start from a saved VM: a snapshot directory (`restore DIR`) or a live migration
//! received on a socket (`receive --listen unix:PATH`, or `tcp:ADDR:PORT` with mutual TLS).
//! Each gives a [`VmSpec`] that [`crate::control::run::run`] runs like any other.
//!
//! While `receive` waits for its source, and while it receives the VM, it honours `--timeout`
//! (exit 76) and Ctrl-C/SIGTERM (exit 130); while it waits it serves its `--api-sock` (no VM is
//! listed yet); it removes its socket file on every way out. Over TCP, a client that fails the
//! TLS handshake (no certificate, or one the CA did not sign) is turned away with one line and
//! the wait goes on.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::base::config::{Lifecycle, VmConfig};
use crate::base::exit;
use crate::control::api::{ApiError, ApiServer};
use crate::control::registry::Registry;
use crate::control::run::{RestoreSource, RunError, Saved, VmSpec};
use crate::host::endpoint::Publish;
use crate::policy::pool::{Capacity, Pool};
use crate::snapshot::SnapshotError;
use crate::snapshot::channel::{Channel, TlsFiles, TlsListener, host_port};
use crate::snapshot::migrate::{MigrateError, Received, Welcomed, welcome_source};
use crate::snapshot::restore::RestoreMemory;
use crate::vmm::error::{VmError, open_kvm};

/// Why a saved VM could not be taken up.
#[derive(Debug, Error)]
pub enum ResumeError {
    /// The snapshot was refused or unreadable.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A flag that does not fit (a bad `--listen`, `--publish` on a migration).
    #[error("{0}")]
    Usage(String),
    /// KVM is not usable.
    #[error(transparent)]
    Kvm(VmError),
    /// The socket to receive on could not be listened on.
    #[error("{0}")]
    Listen(MigrateError),
    /// The migration failed while receiving.
    #[error("{0}")]
    Receive(MigrateError),
    /// The snapshot directory does not exist.
    #[error("{0}: no such snapshot directory")]
    NoSnapshot(PathBuf),
    /// The control API could not be served while waiting.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// `--timeout` passed before a source arrived, or before its transfer was complete.
    #[error("no migration arrived on {path} within {secs} s (--timeout)")]
    TimedOut {
        /// The socket.
        path: String,
        /// The time limit, in seconds.
        secs: f64,
    },
    /// Ctrl-C or SIGTERM while waiting (or while the VM was being received).
    #[error("interrupted while waiting for a migration on {0}")]
    Interrupted(String),
}

impl ResumeError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ResumeError::Snapshot(SnapshotError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                exit::NO_INPUT
            }
            ResumeError::NoSnapshot(_) => exit::NO_INPUT,
            ResumeError::Snapshot(e) => e.exit_code(),
            ResumeError::Usage(_) | ResumeError::Listen(_) | ResumeError::Api(_) => exit::USAGE,
            ResumeError::TimedOut { .. } => exit::TIMEOUT,
            ResumeError::Interrupted(_) => exit::INTERRUPTED,
            ResumeError::Kvm(e) => e.exit_code(),
            ResumeError::Receive(_) => exit::IO_ERROR,
        }
    }
}

/// What the resuming command may change: the time limit, the published ports (a restore
/// only) and the kernel image (by default the one the VM was saved with).
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// Stop the run after this long.
    pub timeout: Option<Duration>,
    /// Publish these ports instead of the saved ones.
    pub publish: Vec<Publish>,
    /// The kernel image (for diagnoses).
    pub kernel: Option<PathBuf>,
    /// The control API socket, served while `receive` waits (the run serves it afterwards).
    pub api_sock: Option<PathBuf>,
}

/// The saved configuration as the resumed VM runs it: no time limit but the command's, scale
/// to zero as saved (an on-demand VM sleeps when idle and wakes for the next client), no
/// restarts.
fn lifecycle(saved: Lifecycle, opts: &ResumeOptions) -> Lifecycle {
    Lifecycle { timeout: opts.timeout, on_demand: saved.on_demand, idle_shutdown: saved.idle_shutdown, restart: None }
}

/// The VM of the snapshot in `dir`, restored as `opts` says.
pub fn restore_spec(dir: &Path, opts: &ResumeOptions) -> Result<VmSpec, ResumeError> {
    if !dir.is_dir() {
        return Err(ResumeError::NoSnapshot(dir.to_path_buf()));
    }
    let loaded = crate::snapshot::load(dir)?;
    let mut state = loaded.state;
    let mut config = state.config.clone();
    config.lifecycle = lifecycle(config.lifecycle, opts);
    if !opts.publish.is_empty() {
        config.endpoints.publish = opts.publish.clone();
    }
    let kernel = opts.kernel.clone().unwrap_or_else(|| state.kernel.clone());
    state.kernel = kernel.clone();
    let memory = RestoreMemory::File(loaded.memory);
    let saved = Saved { config: None, state, memory, on_ready: None };
    let source = RestoreSource { endpoints: None, saved: Box::new(move || Ok(saved)) };
    Ok(VmSpec { config, kernel, expect_exit: 0, restore: Some(Arc::new(Mutex::new(Some(source)))) })
}

/// The longest a source may say nothing while it sends a VM (it scans the VM's memory
/// before its first pages, and again with `verify`).
const SOURCE_SILENCE: Duration = Duration::from_secs(120);

/// Where `receive` listens.
enum Listen<'a> {
    Unix(&'a Path),
    Tcp(&'a str, &'a TlsFiles),
}

/// Waits for one migration on `listen` (`unix:PATH`, or `tcp:ADDR:PORT` with `tls`: this
/// side's certificate and key, and the CA of the sources) and returns the VM as its source
/// announced it, once it was welcomed, with the moment (the run starts from there). The run
/// prepares everything it can (filters, API, timeline, image, endpoints), then receives the
/// memory and the state: only the restore itself happens while the VM is stopped.
pub fn receive_spec(
    listen: &str,
    tls: Option<&TlsFiles>,
    opts: &ResumeOptions,
) -> Result<(VmSpec, Instant), ResumeError> {
    let how = if let Some(path) = listen.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        if !opts.publish.is_empty() {
            return Err(ResumeError::Usage(
                "--publish: a VM migrated on this host keeps the ports its source published".into(),
            ));
        }
        Listen::Unix(Path::new(path))
    } else if let Some(addr) = listen.strip_prefix("tcp:") {
        host_port(addr).map_err(|e| ResumeError::Usage(format!("--listen {listen}: {e}")))?;
        let tls = tls.ok_or_else(|| {
            ResumeError::Usage(format!(
                "--listen {listen}: a TCP migration is always mutual TLS: give --tls-cert, --tls-key and --tls-ca"
            ))
        })?;
        Listen::Tcp(addr, tls)
    } else {
        return Err(ResumeError::Usage(format!("--listen must be unix:PATH or tcp:ADDR:PORT (got {listen})")));
    };
    let kvm = open_kvm().map_err(ResumeError::Kvm)?;
    // What hello compares is asked of KVM now, not while a source waits for the answer (a
    // throwaway vCPU for the TSC rate: ~80 ms here). A failure is said at hello.
    let _ = crate::snapshot::compat::HostProfile::here(&kvm);
    let waiting = Instant::now();
    let channel = wait_for_source(&how, opts)?;
    let left = opts.timeout.map(|t| t.saturating_sub(waiting.elapsed()).max(Duration::from_millis(1)));
    // A source that stops sending cannot hold the command past its time limit, nor, without
    // one, for longer than SOURCE_SILENCE at a time.
    let _ = channel.set_read_timeout(Some(left.unwrap_or(SOURCE_SILENCE)));
    // Ctrl-C from here to the end of the transfer (the run's set-up included) shuts the
    // channel down, so the read it is, or will be, blocked in returns.
    let interrupted = Arc::new(AtomicBool::new(false));
    let interrupts = {
        let (flag, stopper) = (Arc::clone(&interrupted), channel.shutter().ok());
        crate::host::signals::subscribe(move |_| {
            flag.store(true, Ordering::SeqCst);
            if let Some(s) = &stopper {
                s.shut();
            }
        })
    };
    let why = {
        let (listen, timeout, interrupted) = (listen.to_string(), opts.timeout, Arc::clone(&interrupted));
        move |e: MigrateError| {
            if interrupted.load(Ordering::SeqCst) {
                ResumeError::Interrupted(listen.clone())
            } else if let Some(t) = timeout.filter(|&t| waiting.elapsed() >= t) {
                ResumeError::TimedOut { path: listen.clone(), secs: t.as_secs_f64() }
            } else {
                ResumeError::Receive(e)
            }
        }
    };
    let welcomed = welcome_source(&kvm, channel, &opts.publish);
    let Welcomed { config: announced, kernel, endpoints, transfer } = welcomed.map_err(&why)?;
    // --timeout counts from the start of the command: the wait used part of it.
    let opts = ResumeOptions { timeout: left, ..opts.clone() };
    let kernel = opts.kernel.clone().unwrap_or(kernel);
    let resumed = move |mut config: VmConfig| {
        if !opts.publish.is_empty() {
            config.endpoints.publish = opts.publish.clone();
        }
        config.lifecycle = lifecycle(config.lifecycle, &opts);
        config
    };
    let config = resumed(announced);
    let image = kernel.clone();
    // The memory and the state arrive once the run is prepared (the source's socket buffer
    // holds what it sends meanwhile); the run's own thread receives them, so nothing is handed
    // from thread to thread while the VM is stopped.
    let saved = move || {
        let arrival = |e: ResumeError| RunError::Arrival { reason: e.to_string(), code: e.exit_code() };
        let received = transfer.receive(&kvm);
        drop(interrupts);
        let Received { fd, mem, mut state, answer, stopped_at, vcpus } = received.map_err(why).map_err(arrival)?;
        state.kernel = image;
        let config = resumed(state.config.clone());
        let memory = RestoreMemory::Live { fd, mem, arrived: stopped_at, vcpus };
        Ok(Saved { config: Some(config), state, memory, on_ready: Some(answer) })
    };
    let source = RestoreSource { endpoints: Some(endpoints), saved: Box::new(saved) };
    let spec = VmSpec { config, kernel, expect_exit: 0, restore: Some(Arc::new(Mutex::new(Some(source)))) };
    Ok((spec, Instant::now()))
}

/// A socket file this process created, removed when dropped (every way out of the wait).
struct SocketFile<'p>(&'p Path);

impl Drop for SocketFile<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// What `receive` listens on while it waits.
enum Listening<'a> {
    /// The socket file goes when the wait ends.
    Unix {
        listener: UnixListener,
        _file: SocketFile<'a>,
    },
    Tcp(TlsListener),
}

impl Listening<'_> {
    fn fds(&self) -> [RawFd; 2] {
        match self {
            Listening::Unix { listener, .. } => [listener.as_raw_fd(), -1],
            Listening::Tcp(t) => t.fds(),
        }
    }

    /// A source that connected, if one did (`Ok(None)`: nobody yet, or one turned away).
    fn accept(&self) -> std::io::Result<Option<Channel>> {
        match self {
            Listening::Unix { listener, .. } => {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(false)?;
                Ok(Some(Channel::Unix(s)))
            }
            Listening::Tcp(t) => match t.accept()? {
                Some(Ok(c)) => Ok(Some(c)),
                Some(Err(why)) => {
                    crate::host::diag::say(format_args!("turned a migration source away: {why}"));
                    Ok(None)
                }
                None => Ok(None),
            },
        }
    }
}

/// Listens on `how` (a Unix path must not exist) until a source connects, `opts.timeout`
/// passes or an interrupt arrives; serves `opts.api_sock` meanwhile. A socket file is removed
/// on return, whatever the outcome.
fn wait_for_source(how: &Listen<'_>, opts: &ResumeOptions) -> Result<Channel, ResumeError> {
    let shown = match how {
        Listen::Unix(p) => format!("unix:{}", p.display()),
        Listen::Tcp(a, _) => format!("tcp:{a}"),
    };
    let listen_err = |reason: String| ResumeError::Usage(format!("--listen {shown}: {reason}"));
    let listening = match *how {
        Listen::Unix(path) => {
            if path.exists() {
                return Err(listen_err("already exists (remove it first)".into()));
            }
            let listener = UnixListener::bind(path).map_err(|e| listen_err(e.to_string()))?;
            let file = SocketFile(path);
            listener.set_nonblocking(true).map_err(|e| listen_err(e.to_string()))?;
            Listening::Unix { listener, _file: file }
        }
        Listen::Tcp(addr, tls) => Listening::Tcp(TlsListener::bind(addr, tls).map_err(|e| listen_err(e.to_string()))?),
    };
    // Interrupts wake the wait through an eventfd (nobody polls a counter).
    crate::host::signals::install();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| listen_err(e.to_string()))?);
    let w = Arc::clone(&wake);
    let _interrupts = crate::host::signals::subscribe(move |_| {
        let _ = w.write(1);
    });
    let _api = opts
        .api_sock
        .as_deref()
        .map(|p| ApiServer::start(p, Registry::default(), Arc::new(Pool::new(Capacity::UNLIMITED)), None))
        .transpose()?;
    crate::host::diag::say(format_args!("waiting for a migration on {shown}"));
    let deadline = opts.timeout.map(|t| Instant::now() + t);
    loop {
        match listening.accept() {
            Ok(Some(channel)) => return Ok(channel),
            Ok(None) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(listen_err(e.to_string())),
        }
        if wake.read().is_ok() {
            return Err(ResumeError::Interrupted(shown));
        }
        let wait_ms = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ResumeError::TimedOut {
                        path: shown,
                        secs: opts.timeout.map_or(0.0, |t| t.as_secs_f64()),
                    });
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
            None => -1,
        };
        let [a, b] = listening.fds();
        let mut fds = [
            libc::pollfd { fd: a, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: b, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of three pollfds for the duration of the call (poll
        // ignores a negative descriptor); the others stay open (owned by `listening` and
        // `wake`).
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
    }
}
