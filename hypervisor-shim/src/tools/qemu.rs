//! `hypervisor-shim qemu`: boots the same kernel ELF under QEMU through its PVH entry.
//!
//! The kernel finds no shim there (HELLO goes unanswered), uses COM1 as its console and
//! isa-debug-exit for its exit code; this module maps QEMU's exit status back to that code.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypercall_abi::{QEMU_DEBUG_EXIT_PORT, QEMU_FAULT_EXIT_VALUE, SHUTDOWN_CODE_MAX};
use thiserror::Error;

use elastic_config::format_size;
use elastic_vmm::exit;
use elastic_vmm::{ConfigError, kernel_cmdline};
use elastic_vmm::{KernelImage, LoaderError};

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
    /// QEMU with KVM stopped before the guest ran (`--accel kvm` given explicitly).
    #[error("QEMU could not start the guest with KVM (try --accel auto or tcg): {0}")]
    KvmFailed(String),
    /// QEMU stopped before the guest ran.
    #[error("QEMU could not start the guest: {0}")]
    StartFailed(String),
}

impl QemuError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            QemuError::Loader(LoaderError::Read { .. }) => exit::NO_INPUT,
            QemuError::Loader(LoaderError::UnknownService { .. }) => exit::USAGE,
            QemuError::Loader(_) | QemuError::NoPvhNote(_) => exit::IMAGE_REFUSED,
            QemuError::Config(_) => exit::USAGE,
            QemuError::NotFound(_) | QemuError::NoKvm(_) | QemuError::KvmFailed(_) => exit::UNAVAILABLE,
            QemuError::Spawn { .. } | QemuError::StartFailed(_) => exit::INTERNAL,
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

/// The `-cpu` model for an accelerator. Under KVM: the host's CPU without
/// `arch-capabilities` (QEMU cannot set MSR 0x10a on AMD hosts and some nested KVMs, and
/// aborts), with an invariant TSC and the hypervisor timing leaf 0x40000010
/// (`vmware-cpuid-freq`), so the kernel reads the TSC frequency on Intel and AMD alike.
/// Under TCG: QEMU's `max` model, which has what the PVH trampoline needs.
pub fn cpu_model(accel: &str) -> &'static str {
    if accel == "kvm" { "host,-arch-capabilities,+invtsc,vmware-cpuid-freq=on" } else { "max" }
}

/// How one QEMU process ended.
enum Attempt {
    /// QEMU ran the guest (it printed, or exited through isa-debug-exit).
    Ran(QemuOutcome),
    /// QEMU stopped before the guest ran: the accelerator failed at start. Carries QEMU's
    /// first error line.
    FailedAtStart(String),
}

/// Boots the kernel under QEMU and waits for it. With `--accel auto`, a KVM start that fails
/// (QEMU exits before the guest runs) is retried under TCG and the accelerator line says why.
pub fn run(config: &QemuConfig) -> Result<QemuOutcome, QemuError> {
    let image = KernelImage::open(&config.kernel)?;
    image.check_service(&config.app)?;
    if !image.has_pvh_note() {
        return Err(QemuError::NoPvhNote(config.kernel.clone()));
    }
    let cmdline = kernel_cmdline(&config.app, &[("log", config.log_level.clone())], &config.app_args)?;
    elastic_vmm::install_signal_handlers();
    let started = Instant::now();
    match config.accel {
        Accel::Tcg => finish(attempt(config, &cmdline, "tcg", started, None)?),
        Accel::Kvm => {
            kvm_usable().map_err(QemuError::NoKvm)?;
            match attempt(config, &cmdline, "kvm", started, None)? {
                Attempt::Ran(o) => Ok(o),
                Attempt::FailedAtStart(why) => Err(QemuError::KvmFailed(why)),
            }
        }
        Accel::Auto => {
            let why = match kvm_usable() {
                Err(e) => format!("/dev/kvm cannot be opened: {e}"),
                Ok(()) => match attempt(config, &cmdline, "kvm", started, None)? {
                    Attempt::Ran(o) => return Ok(o),
                    Attempt::FailedAtStart(why) => format!("KVM failed at start: {why}"),
                },
            };
            match attempt(config, &cmdline, "tcg", started, Some(why.clone()))? {
                Attempt::Ran(o) => Ok(o),
                Attempt::FailedAtStart(tcg) => Err(QemuError::StartFailed(format!("{tcg}; before that, {why}"))),
            }
        }
    }
}

fn finish(a: Attempt) -> Result<QemuOutcome, QemuError> {
    match a {
        Attempt::Ran(o) => Ok(o),
        Attempt::FailedAtStart(why) => Err(QemuError::StartFailed(why)),
    }
}

/// Prints the accelerator line on stderr.
fn announce(accel: &str, memory: u64, fallback: Option<&str>) {
    let what = match (accel, fallback) {
        ("kvm", _) => "hardware virtualization via /dev/kvm".to_string(),
        (_, Some(why)) => format!("software emulation; {why}"),
        _ => "software emulation".to_string(),
    };
    eline!(
        "[qemu] accelerator: {} ({what}), cpu {}, memory {}, machine microvm",
        accel.to_uppercase(),
        cpu_model(accel),
        format_size(memory)
    );
}

/// Runs QEMU once with `accel`. The guest's serial output is forwarded to standard output as
/// it arrives; QEMU's own standard error is held back until the guest has spoken, so a start
/// failure can be told apart (and retried) without printing it.
fn attempt(
    config: &QemuConfig,
    cmdline: &str,
    accel: &'static str,
    started: Instant,
    fallback: Option<String>,
) -> Result<Attempt, QemuError> {
    let mut cmd = Command::new(&config.qemu);
    cmd.args(["-M", "microvm", "-accel", accel, "-cpu", cpu_model(accel)])
        .args(["-m", &format!("{}M", config.memory >> 20)])
        .args(["-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-device", &format!("isa-debug-exit,iobase={QEMU_DEBUG_EXIT_PORT:#x},iosize=0x04")])
        .arg("-kernel")
        .arg(&config.kernel)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            QemuError::NotFound(config.qemu.clone())
        } else {
            QemuError::Spawn { program: config.qemu.clone(), source }
        }
    })?;
    let spoke = Arc::new(AtomicBool::new(false));
    let held_stderr = Arc::new(Mutex::new(Vec::<u8>::new()));
    let memory = config.memory;
    let out_thread = child.stdout.take().map(|mut out| {
        let spoke = Arc::clone(&spoke);
        let held = Arc::clone(&held_stderr);
        let fallback = fallback.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if !spoke.swap(true, Ordering::SeqCst) {
                    announce(accel, memory, fallback.as_deref());
                    let held = std::mem::take(&mut *held.lock().unwrap_or_else(|p| p.into_inner()));
                    let _ = std::io::stderr().write_all(&held);
                }
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(&buf[..n]).and_then(|_| stdout.flush());
            }
        })
    });
    let err_thread = child.stderr.take().map(|mut err| {
        let spoke = Arc::clone(&spoke);
        let held = Arc::clone(&held_stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match err.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
                if spoke.load(Ordering::SeqCst) {
                    drop(h);
                    let _ = std::io::stderr().write_all(&buf[..n]);
                } else if h.len() < 64 * 1024 {
                    h.extend_from_slice(&buf[..n]);
                }
            }
        })
    });
    let spawn_err = |source| QemuError::Spawn { program: config.qemu.clone(), source };
    let mut stopped: Option<(u8, String)> = None;
    let interrupts_at_start = elastic_vmm::interrupts();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            break status;
        }
        if stopped.is_none() {
            if config.timeout.is_some_and(|t| started.elapsed() >= t) {
                stopped = Some((exit::TIMEOUT, "QEMU run stopped at the timeout".into()));
            } else if elastic_vmm::interrupts() != interrupts_at_start {
                stopped = Some((exit::INTERRUPTED, "QEMU run interrupted (signal)".into()));
            }
            if stopped.is_some() {
                let _ = child.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    for t in [out_thread, err_thread].into_iter().flatten() {
        let _ = t.join();
    }
    let held = String::from_utf8_lossy(&held_stderr.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    if let Some((exit_code, why)) = stopped {
        let _ = std::io::stderr().write_all(held.as_bytes());
        return Ok(Attempt::Ran(QemuOutcome { accel, exit_code, diagnosis: Some(why) }));
    }
    // isa-debug-exit makes QEMU exit with an odd status, but QEMU's own start-up errors exit
    // with 1 too (the status of a silent guest exit 0): a run counts as started when the
    // guest printed, or exited with another odd status.
    let guest_ran = spoke.load(Ordering::SeqCst) || status.code().is_some_and(|s| s & 1 == 1 && s != 1);
    if !guest_ran {
        let first = held.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("QEMU exited without a message");
        let first = format!("{first} (QEMU exit status {})", status.code().map_or("signal".into(), |c| c.to_string()));
        return Ok(Attempt::FailedAtStart(first));
    }
    if !spoke.load(Ordering::SeqCst) {
        announce(accel, memory, fallback.as_deref());
        let _ = std::io::stderr().write_all(held.as_bytes());
    }
    let (exit_code, diagnosis) = map_status(status.code());
    Ok(Attempt::Ran(QemuOutcome { accel, exit_code, diagnosis }))
}

/// Makes the child die with this process: a parent-death signal (SIGKILL), so no QEMU is left
/// behind whatever ends the shim (the shim's own signal handling kills it first when it can).
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then do not run at all.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the shim exited while starting QEMU"));
            }
            Ok(())
        });
    }
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
