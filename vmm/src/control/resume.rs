//! Runs that start from a saved VM: a snapshot directory (`restore DIR`) or a live migration
//! received on a socket (`receive --listen unix:PATH`). Each gives a [`VmSpec`] that
//! [`crate::control::run::run`] runs like any other.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::base::config::Lifecycle;
use crate::base::exit;
use crate::control::run::{RestoreSource, VmSpec};
use crate::host::endpoint::Publish;
use crate::snapshot::SnapshotError;
use crate::snapshot::migrate::{MigrateError, Received, accept_one, receive};
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
}

impl ResumeError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ResumeError::Snapshot(e) => e.exit_code(),
            ResumeError::Usage(_) | ResumeError::Listen(_) => exit::USAGE,
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
}

/// The saved configuration as the resumed VM runs it: no time limit but the command's, no
/// scale to zero, no restarts.
fn lifecycle(saved: Lifecycle, opts: &ResumeOptions) -> Lifecycle {
    Lifecycle { timeout: opts.timeout, on_demand: false, idle_shutdown: saved.idle_shutdown, restart: None }
}

/// The VM of the snapshot in `dir`, restored as `opts` says.
pub fn restore_spec(dir: &Path, opts: &ResumeOptions) -> Result<VmSpec, ResumeError> {
    let loaded = crate::snapshot::load(dir)?;
    let mut state = loaded.state;
    let mut config = state.config.clone();
    config.lifecycle = lifecycle(config.lifecycle, opts);
    if !opts.publish.is_empty() {
        config.endpoints.publish = opts.publish.clone();
    }
    let kernel = opts.kernel.clone().unwrap_or_else(|| state.kernel.clone());
    state.kernel = kernel.clone();
    let source = RestoreSource { state, memory: RestoreMemory::File(loaded.memory), endpoints: None, on_ready: None };
    Ok(VmSpec { config, kernel, expect_exit: 0, restore: Some(Arc::new(Mutex::new(Some(source)))) })
}

/// Waits for one migration on `listen` (`unix:PATH`) and returns the VM received, with the
/// moment its state arrived (its restore time is measured from there).
pub fn receive_spec(listen: &str, opts: &ResumeOptions) -> Result<(VmSpec, Instant), ResumeError> {
    let Some(path) = listen.strip_prefix("unix:") else {
        return Err(ResumeError::Usage(format!("--listen must be unix:PATH (got {listen})")));
    };
    if !opts.publish.is_empty() {
        return Err(ResumeError::Usage("--publish: a migrated VM keeps the ports its source published".into()));
    }
    let kvm = open_kvm().map_err(ResumeError::Kvm)?;
    eprintln!("hypervisor-shim: waiting for a migration on {path}");
    let mut channel = accept_one(Path::new(path)).map_err(ResumeError::Listen)?;
    let Received { fd, mem, mut state, endpoints, answer, stopped_at } =
        receive(&kvm, &mut channel).map_err(ResumeError::Receive)?;
    let mut config = state.config.clone();
    config.lifecycle = lifecycle(config.lifecycle, opts);
    let kernel = opts.kernel.clone().unwrap_or_else(|| state.kernel.clone());
    state.kernel = kernel.clone();
    let source = RestoreSource {
        state,
        memory: RestoreMemory::Live { fd, mem },
        endpoints: Some(endpoints),
        on_ready: Some(answer),
    };
    let spec = VmSpec { config, kernel, expect_exit: 0, restore: Some(Arc::new(Mutex::new(Some(source)))) };
    Ok((spec, stopped_at))
}
