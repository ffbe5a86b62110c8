//! `hypervisor-shim qemu`: boots the same kernel ELF under QEMU through its PVH entry.
//!
//! The kernel finds no shim there (HELLO goes unanswered), uses COM1 as its console and
//! isa-debug-exit for its exit code; this module maps QEMU's exit status back to that code.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use goblin::elf::Elf;
use hypercall_abi::{QEMU_DEBUG_EXIT_PORT, QEMU_FAULT_EXIT_VALUE, SHUTDOWN_CODE_MAX};
use thiserror::Error;

use crate::config::{ConfigError, format_size, kernel_cmdline};
use crate::exit;
use crate::loader::{KernelImage, LoaderError};

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point note.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// QEMU-path failures.
#[derive(Debug, Error)]
pub enum QemuError {
    /// The kernel image was refused.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The image has no PVH note.
    #[error("kernel image {0} has no PVH entry note (Xen, type 18): QEMU cannot boot it with -kernel")]
    NoPvhNote(PathBuf),
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// QEMU is not installed.
    #[error("{0} not found: install it (apt-get install qemu-system-x86) or pass --qemu PATH")]
    NotFound(String),
    /// QEMU could not be started or waited for.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// KVM was requested but cannot be opened.
    #[error("--accel kvm requested but /dev/kvm cannot be opened read-write: {0}")]
    NoKvm(std::io::Error),
}

impl QemuError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            QemuError::Loader(LoaderError::Read { .. }) => exit::NO_INPUT,
            QemuError::Loader(_) | QemuError::NoPvhNote(_) => exit::IMAGE_REFUSED,
            QemuError::Config(_) => exit::USAGE,
            QemuError::NotFound(_) | QemuError::NoKvm(_) => exit::UNAVAILABLE,
            QemuError::Spawn { .. } => exit::INTERNAL,
        }
    }
}

/// Which QEMU accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm can be opened, TCG otherwise.
    Auto,
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

/// What to boot under QEMU.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// QEMU binary.
    pub qemu: String,
    /// Accelerator choice.
    pub accel: Accel,
    /// RAM size in bytes.
    pub memory: u64,
    /// Service and its arguments.
    pub app: String,
    /// Service arguments.
    pub app_args: Vec<String>,
    /// Guest log level.
    pub log_level: String,
    /// Stop QEMU after this long.
    pub timeout: Option<Duration>,
}

/// How a QEMU run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuOutcome {
    /// The accelerator that ran.
    pub accel: &'static str,
    /// The shim's exit code (the guest's own code when it shut down normally).
    pub exit_code: u8,
    /// A diagnosis when the guest did not shut down normally.
    pub diagnosis: Option<String>,
}

fn has_pvh_note(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else { return false };
    let Ok(elf) = Elf::parse(&bytes) else { return false };
    elf.iter_note_headers(&bytes)
        .is_some_and(|notes| notes.flatten().any(|n| n.n_type == XEN_ELFNOTE_PHYS32_ENTRY && n.name == "Xen"))
}

/// Maps QEMU's exit status to the shim's exit code. isa-debug-exit makes QEMU exit with
/// `(value << 1) | 1`; any other status means the guest never reported.
pub fn map_status(status: Option<i32>) -> (u8, Option<String>) {
    match status {
        Some(s) if s & 1 == 1 => {
            let value = (s >> 1) as u32;
            if value <= SHUTDOWN_CODE_MAX {
                (value as u8, None)
            } else if value == QEMU_FAULT_EXIT_VALUE {
                (
                    exit::GUEST_FAULT,
                    Some("guest fault under QEMU (the CPU exception line above has the details)".into()),
                )
            } else {
                (
                    exit::GUEST_UNSERVED,
                    Some(format!("guest wrote {value:#x} to isa-debug-exit, which is not an exit code")),
                )
            }
        }
        Some(s) => (
            exit::GUEST_UNSERVED,
            Some(format!("QEMU exited with status {s} without a guest exit code (triple fault or power-off)")),
        ),
        None => (exit::INTERNAL, Some("QEMU was killed by a signal".into())),
    }
}

fn kvm_usable() -> Result<(), std::io::Error> {
    OpenOptions::new().read(true).write(true).open("/dev/kvm").map(|_| ())
}

/// Boots the kernel under QEMU and waits for it.
pub fn run(config: &QemuConfig) -> Result<QemuOutcome, QemuError> {
    KernelImage::open(&config.kernel)?;
    if !has_pvh_note(&config.kernel) {
        return Err(QemuError::NoPvhNote(config.kernel.clone()));
    }
    let cmdline = kernel_cmdline(&config.app, &[("log", config.log_level.clone())], &config.app_args)?;
    let accel = match config.accel {
        Accel::Kvm => {
            kvm_usable().map_err(QemuError::NoKvm)?;
            "kvm"
        }
        Accel::Tcg => "tcg",
        Accel::Auto => {
            if kvm_usable().is_ok() {
                "kvm"
            } else {
                "tcg"
            }
        }
    };
    // The kernel needs the TSC frequency from CPUID (invtsc); TCG's "max" model has what the
    // trampoline needs and runs everything in software.
    let cpu = if accel == "kvm" { "host,+invtsc" } else { "max" };
    eprintln!(
        "[qemu] accelerator: {} ({}), memory {}, machine microvm",
        accel.to_uppercase(),
        if accel == "kvm" { "hardware virtualization via /dev/kvm" } else { "software emulation" },
        format_size(config.memory)
    );
    let mut cmd = Command::new(&config.qemu);
    cmd.args(["-M", "microvm", "-accel", accel, "-cpu", cpu])
        .args(["-m", &format!("{}M", config.memory >> 20)])
        .args(["-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-device", &format!("isa-debug-exit,iobase={QEMU_DEBUG_EXIT_PORT:#x},iosize=0x04")])
        .arg("-kernel")
        .arg(&config.kernel)
        .args(["-append", &cmdline])
        .stdin(Stdio::null());
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            QemuError::NotFound(config.qemu.clone())
        } else {
            QemuError::Spawn { program: config.qemu.clone(), source }
        }
    })?;
    let started = Instant::now();
    let spawn_err = |source| QemuError::Spawn { program: config.qemu.clone(), source };
    let status = loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            break status;
        }
        if config.timeout.is_some_and(|t| started.elapsed() >= t) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(QemuOutcome {
                accel,
                exit_code: exit::TIMEOUT,
                diagnosis: Some("QEMU run stopped at the timeout".into()),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (exit_code, diagnosis) = map_status(status.code());
    Ok(QemuOutcome { accel, exit_code, diagnosis })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_back_to_guest_codes() {
        assert_eq!(map_status(Some(1)), (0, None));
        assert_eq!(map_status(Some((2 << 1) | 1)).0, 2);
        assert_eq!(map_status(Some(((QEMU_FAULT_EXIT_VALUE as i32) << 1) | 1)).0, exit::GUEST_FAULT);
        assert_eq!(map_status(Some(0)).0, exit::GUEST_UNSERVED);
        assert_eq!(map_status(Some((100 << 1) | 1)).0, exit::GUEST_UNSERVED);
        assert_eq!(map_status(None).0, exit::INTERNAL);
    }
}
