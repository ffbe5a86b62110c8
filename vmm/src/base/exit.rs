//! The shim's process exit codes.
//!
//! `0..=63` are the guest's own SHUTDOWN codes, passed through unchanged. Everything the shim
//! itself decides uses a fixed code from 64 upwards, so a script can always tell the guest's
//! verdict from the platform's.

/// Highest exit code that is the guest's own.
pub const GUEST_MAX: u8 = hypercall_abi::SHUTDOWN_CODE_MAX as u8;
/// A flag or configuration value was invalid (clap usage errors included).
pub const USAGE: u8 = 64;
/// The kernel image was refused (not an ELF, wrong ABI note, bad segments).
pub const IMAGE_REFUSED: u8 = 65;
/// The kernel image file could not be read.
pub const NO_INPUT: u8 = 66;
/// `/dev/kvm` (or QEMU, for `qemu`) is missing or not permitted.
pub const UNAVAILABLE: u8 = 69;
/// A host-side failure inside the shim (a KVM ioctl failed, a thread could not start).
pub const INTERNAL: u8 = 70;
/// The guest raised a CPU exception (diagnosis on stderr).
pub const GUEST_FAULT: u8 = 71;
/// The guest touched a guest-physical address that no memory backs.
pub const GUEST_UNBACKED: u8 = 72;
/// The guest caused an exit the shim does not serve (unknown port, `hlt`, triple fault,
/// KVM internal error).
pub const GUEST_UNSERVED: u8 = 73;
/// A file the shim was asked to write (summary, timeline) could not be written.
pub const IO_ERROR: u8 = 74;
/// The VM was ended for a policy violation (`--on-violation kill`).
pub const POLICY_KILL: u8 = 75;
/// The run exceeded `--timeout`.
pub const TIMEOUT: u8 = 76;
/// A pool or stress run: at least one VM (or scenario) did not end as expected.
pub const RUN_FAILED: u8 = 77;
/// A migration target lost its source during post-copy (`ctl migrate --postcopy`): part of
/// the VM's memory never arrived, so the VM cannot go on.
pub const POSTCOPY_LOST: u8 = 78;
/// The operator interrupted the run twice (Ctrl-C): 128 + SIGINT, as shells report it.
pub const INTERRUPTED: u8 = 130;
/// A node pool's VM killed on a control API request (`PUT /api/v1/vms/{name}/kill`): 128 +
/// SIGKILL, as a killed process reports it.
pub const KILLED: u8 = 137;
