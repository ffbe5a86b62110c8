//! How a VM's creation fails ([`VmError`]), with the process exit code each failure maps to.

use kvm_ioctls::Kvm;
use thiserror::Error;

use crate::base::config::ConfigError;
use crate::base::exit;
use crate::base::memory::MemoryError;
use crate::devices::DeviceError;
use crate::policy::pool::PoolError;
use crate::vmm::loader::LoaderError;
use crate::vmm::vcpu::VcpuError;

/// Failures while creating or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("{0}")]
    KvmUnavailable(String),
    /// A KVM ioctl on the VM failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel image was refused or could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// A vCPU could not be created or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pool refused the VM.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// A host-side failure with no more specific cause.
    #[error("{0}")]
    Internal(&'static str),
    /// A device could not be set up.
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    /// A snapshot or migrated state could not be restored.
    #[error("restore: {0}")]
    Restore(String),
}

impl VmError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmError::KvmUnavailable(_) => exit::UNAVAILABLE,
            VmError::Loader(LoaderError::Read { .. }) => exit::NO_INPUT,
            VmError::Loader(LoaderError::TooLarge { .. } | LoaderError::UnknownService { .. })
            | VmError::Config(_)
            | VmError::Pool(_) => exit::USAGE,
            VmError::Loader(_) | VmError::Restore(_) => exit::IMAGE_REFUSED,
            VmError::Kvm { .. } | VmError::Memory(_) | VmError::Vcpu(_) | VmError::Internal(_) | VmError::Device(_) => {
                exit::INTERNAL
            }
        }
    }
}

/// Opens `/dev/kvm`, turning the common failures into one clear line.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(|e| {
        VmError::KvmUnavailable(match e.errno() {
            libc::ENOENT => "/dev/kvm does not exist: this machine does not offer KVM".to_string(),
            libc::EACCES | libc::EPERM => {
                "permission denied opening /dev/kvm: run as root or add your user to the 'kvm' group".to_string()
            }
            _ => format!("cannot open /dev/kvm: {e}"),
        })
    })
}
