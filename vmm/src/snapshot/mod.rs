//! Snapshots: a VM's whole state in a directory, restored by a new shim process.
//!
//! A snapshot is taken with the VM quiesced ([`Quiesced`]): every vCPU out of the guest with
//! its pending call completed, the device's I/O thread holding still. It holds
//!
//! * `state.json`: one header line `elastic-unikernel-snapshot v<FORMAT> crc32=<hex> len=<n>`
//!   and the JSON state ([`VmState`]): configuration, layout, every vCPU's registers (parked
//!   vCPUs are listed as such), notices, policy limits and credit, the device's negotiation,
//!   queue positions and open connections, and where each memory region sits in `memory`;
//! * `memory`: the memory the VM holds and nothing else (boot memory, then each granted
//!   extent), written sparse: all-zero pages are holes, so a VM at min snapshots small.
//!
//! Restore maps `memory` privately (copy-on-write): pages are read when the guest first
//! touches them and its writes never reach the file, so one snapshot restores many times.
//! The submodule [`migrate`] sends the same state over a socket, with pre-copy.

pub mod migrate;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::base::config::Policy;
use crate::base::layout::Layout;
use crate::base::memory::PAGE_SIZE;
use crate::devices::vsock::DeviceState;
use crate::vmm::vcpu::VcpuState;
use crate::vmm::vm::{Notices, VmConfig, VmShared};

/// The snapshot format this shim writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
const MAGIC: &str = "elastic-unikernel-snapshot";
/// Longest wait for the VM's threads to quiesce.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);

/// Snapshot failures.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory does not hold a snapshot of this shim.
    #[error("{0}: not a snapshot (no '{MAGIC}' header)")]
    NotSnapshot(PathBuf),
    /// The snapshot has another format version.
    #[error("{path}: snapshot format v{found}; this shim reads v{FORMAT_VERSION}")]
    Version {
        /// The state file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The state's checksum or length does not match.
    #[error("{0}: checksum mismatch: the state file is corrupt")]
    Checksum(PathBuf),
    /// The state is inconsistent.
    #[error("{path}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The VM could not be quiesced or its state read.
    #[error("{0}")]
    Vm(String),
}

impl SnapshotError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            SnapshotError::Io { .. } => crate::base::exit::IO_ERROR,
            SnapshotError::Vm(_) => crate::base::exit::INTERNAL,
            _ => crate::base::exit::IMAGE_REFUSED,
        }
    }
}

/// The configuration a snapshot carries (what a restore needs to run the VM as before).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedConfig {
    /// The VM's name.
    pub name: String,
    /// Its service.
    pub app: String,
    /// The kernel image (read again for fault diagnoses).
    pub kernel: PathBuf,
    /// vCPU limits (as they were, live changes included).
    pub vcpus: Policy,
    /// Memory limits.
    pub memory: Policy,
    /// Pool weight.
    pub weight: u64,
    /// Credit caps.
    pub budget: [f64; 2],
    /// Credit refill rates.
    pub refill: [f64; 2],
    /// Reclaim grace in milliseconds.
    pub grace_ms: u64,
    /// `throttle` or `kill`.
    pub on_violation: String,
    /// Published ports, as given.
    pub publish: Vec<String>,
    /// The hybrid-vsock socket.
    pub vsock_uds: Option<PathBuf>,
    /// Idle shutdown in milliseconds.
    pub idle_shutdown_ms: Option<u64>,
}

impl SavedConfig {
    /// The configuration of `vm` now.
    pub fn of(vm: &VmShared) -> SavedConfig {
        use crate::policy::resource::Resource;
        let c = &vm.config;
        SavedConfig {
            name: c.name.clone(),
            app: c.app.clone(),
            kernel: vm.image.path.clone(),
            vcpus: vm.policy.resource(Resource::Vcpus).limits,
            memory: vm.policy.resource(Resource::Memory).limits,
            weight: c.weight,
            budget: c.policy.budget,
            refill: c.policy.refill,
            grace_ms: c.policy.grace.as_millis() as u64,
            on_violation: match c.policy.on_violation {
                crate::base::config::OnViolation::Throttle => "throttle".into(),
                crate::base::config::OnViolation::Kill => "kill".into(),
            },
            publish: c.publish.iter().map(|p| p.spec.clone()).collect(),
            vsock_uds: c.vsock_uds.clone(),
            idle_shutdown_ms: c.idle_shutdown.map(|d| d.as_millis() as u64),
        }
    }

    /// The VM configuration to restore with (no timeout, no restart policy).
    pub fn to_config(&self) -> Result<VmConfig, String> {
        let publish = self
            .publish
            .iter()
            .map(|p| crate::devices::vsock::endpoint::parse_publish(p).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let on_violation = match self.on_violation.as_str() {
            "throttle" => crate::base::config::OnViolation::Throttle,
            "kill" => crate::base::config::OnViolation::Kill,
            other => return Err(format!("unknown on_violation '{other}'")),
        };
        Ok(VmConfig {
            name: self.name.clone(),
            app: self.app.clone(),
            app_args: Vec::new(),
            log_level: "info".into(),
            guest_opts: Vec::new(),
            vcpus: self.vcpus,
            memory: self.memory,
            timeout: None,
            policy: crate::base::config::PolicyConfig {
                budget: self.budget,
                refill: self.refill,
                grace: Duration::from_millis(self.grace_ms),
                on_violation,
            },
            weight: self.weight,
            publish,
            vsock_uds: self.vsock_uds.clone(),
            on_demand: false,
            idle_shutdown: self.idle_shutdown_ms.map(Duration::from_millis),
            restart: None,
            pool_member: None,
        })
    }
}

/// One memory region: where it is in the guest and (in a snapshot) in the memory file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedRegion {
    /// Guest-physical base.
    pub gpa: u64,
    /// Length.
    pub len: u64,
    /// Offset in the memory file.
    pub offset: u64,
}

/// Everything but memory contents.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The hypercall ABI the guest was built for.
    pub abi_version: u32,
    /// The configuration.
    pub config: SavedConfig,
    /// The memory layout (boot memory and the hot-plug window).
    pub layout: Layout,
    /// The TSC frequency the guest was told.
    pub tsc_khz: u64,
    /// Burst credit balances.
    pub credits: [f64; 2],
    /// Notices posted and not yet taken.
    pub notices: Notices,
    /// Per vCPU id: online (else parked).
    pub online: Vec<bool>,
    /// The online vCPUs' states.
    pub vcpus: Vec<VcpuState>,
    /// Memory regions: boot memory first, then extents.
    pub regions: Vec<SavedRegion>,
    /// The device page's address.
    pub device_page: u64,
    /// The vsock device.
    pub device: Option<DeviceState>,
}

impl VmState {
    /// Checks the state against itself: regions inside the layout, vCPU lists consistent.
    pub fn validate(&self) -> Result<(), String> {
        let l = &self.layout;
        let Some(boot) = self.regions.first() else { return Err("no memory regions".into()) };
        if boot.gpa != 0 || boot.len != l.ram_size || l.ram_size == 0 || !l.ram_size.is_multiple_of(PAGE_SIZE) {
            return Err("boot memory does not match the layout".into());
        }
        for r in &self.regions[1..] {
            let aligned = r.gpa % hypercall_abi::EXTENT_ALIGN == 0 && r.len % hypercall_abi::EXTENT_ALIGN == 0;
            if !aligned || r.len == 0 || !l.in_window(r.gpa, r.len) {
                return Err(format!("extent {:#x}+{:#x} is outside the hot-plug window", r.gpa, r.len));
            }
        }
        if self.online.is_empty() || self.online.len() > hypercall_abi::MAX_VCPUS as usize {
            return Err(format!("{} vCPUs", self.online.len()));
        }
        let up = self.online.iter().filter(|&&o| o).count();
        if up == 0 || up != self.vcpus.len() {
            return Err("the saved vCPU states do not match the online vCPUs".into());
        }
        Ok(())
    }
}

/// A VM held still for a snapshot: paused, its device's I/O thread holding, its vCPU states
/// collected. Dropping it lets the device go on and resumes the VM unless it was paused before.
#[derive(Debug)]
pub struct Quiesced<'a> {
    vm: &'a VmShared,
    was_paused: bool,
    /// The online vCPUs' states.
    pub vcpus: Vec<VcpuState>,
    held: crate::devices::vsock::Held,
    keep_held: bool,
    /// How long quiescing took.
    pub took: Duration,
}

impl<'a> Quiesced<'a> {
    /// Quiesces `vm`.
    pub fn new(vm: &'a VmShared) -> Result<Quiesced<'a>, SnapshotError> {
        let t = Instant::now();
        let was_paused = !vm.pause(QUIESCE_TIMEOUT);
        let release = |vm: &VmShared| {
            if !was_paused {
                vm.resume();
            }
        };
        let held = match vm.devices.vsock.as_ref().map(|v| v.hold(QUIESCE_TIMEOUT)) {
            Some(Err(e)) => {
                release(vm);
                return Err(SnapshotError::Vm(e));
            }
            Some(Ok(h)) => h,
            None => crate::devices::vsock::Held::default(),
        };
        match vm.capture_vcpus(QUIESCE_TIMEOUT) {
            Ok(vcpus) => Ok(Quiesced { vm, was_paused, vcpus, held, keep_held: false, took: t.elapsed() }),
            Err(e) => {
                if let Some(v) = &vm.devices.vsock {
                    v.release();
                }
                release(vm);
                Err(SnapshotError::Vm(e))
            }
        }
    }

    /// The VM's state (memory regions without file offsets: the caller places them).
    pub fn state(&mut self) -> VmState {
        let vm = self.vm;
        let online = vm.vcpu_set.all().iter().map(|c| c.state() != crate::vmm::vcpus::State::Parked).collect();
        VmState {
            abi_version: hypercall_abi::ABI_VERSION,
            config: SavedConfig::of(vm),
            layout: vm.layout,
            tsc_khz: vm.tsc_khz,
            credits: vm.policy.credits(),
            notices: vm.notices(),
            online,
            vcpus: std::mem::take(&mut self.vcpus),
            regions: vm.mem.regions().iter().map(|r| SavedRegion { gpa: r.gpa, len: r.len, offset: 0 }).collect(),
            device_page: vm.image.end.next_multiple_of(4096),
            device: vm.devices.vsock.as_ref().map(|v| v.state(&self.held)),
        }
    }

    /// The VM.
    pub fn vm(&self) -> &VmShared {
        self.vm
    }

    /// Keeps the VM paused and its device holding after the guard goes (a migrated VM must
    /// not run on, nor accept clients from the listening sockets it handed over).
    pub fn keep_stopped(&mut self) {
        self.was_paused = true;
        self.keep_held = true;
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        if let Some(v) = self.vm.devices.vsock.as_ref().filter(|_| !self.keep_held) {
            v.release();
        }
        if !self.was_paused {
            self.vm.resume();
        }
    }
}

/// What a snapshot took.
#[derive(Debug, Clone, Serialize)]
pub struct SaveFigures {
    /// The directory.
    pub dir: PathBuf,
    /// Memory the VM held (bytes).
    pub held_bytes: u64,
    /// Bytes written to the memory file (all-zero pages are holes).
    pub written_bytes: u64,
    /// Time the VM was held still (µs).
    pub paused_us: u64,
    /// Whole snapshot time (µs).
    pub total_us: u64,
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'p {
    move |source| SnapshotError::Io { what, path: path.to_path_buf(), source }
}

/// Whether a page is all zero.
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: any bytes are valid u128s; `align_to` yields the aligned middle part.
    let (head, mid, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Takes a snapshot of `vm` into `dir` (created if needed; an older snapshot there is
/// replaced). The VM is held still while its memory is written and then resumes (unless it
/// was paused before).
pub fn save(vm: &VmShared, dir: &Path) -> Result<SaveFigures, SnapshotError> {
    let t0 = Instant::now();
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let mut q = Quiesced::new(vm)?;
    let t_held = Instant::now();
    let mut state = q.state();
    let mem_tmp = dir.join(".memory.tmp");
    let file = std::fs::File::create(&mem_tmp).map_err(io("create", &mem_tmp))?;
    let mut offset = 0u64;
    let mut written = 0u64;
    {
        let guard = vm.mem.snapshot();
        for r in &mut state.regions {
            r.offset = offset;
            let bytes = vm
                .mem
                .host_range(&guard, r.gpa, r.len)
                .ok_or_else(|| SnapshotError::Vm(format!("region {:#x} vanished", r.gpa)))?;
            written += write_sparse(&file, offset, bytes).map_err(io("write", &mem_tmp))?;
            offset += r.len;
        }
    }
    file.set_len(offset).map_err(io("size", &mem_tmp))?;
    let held_bytes = offset;
    let paused_us = (t_held.elapsed() + q.took).as_micros() as u64;
    drop(q);
    write_state(dir, &state)?;
    let mem_path = dir.join(MEMORY_FILE);
    std::fs::rename(&mem_tmp, &mem_path).map_err(io("rename", &mem_path))?;
    vm.record(
        "snapshot",
        crate::base::timeline::detail([("dir", dir.display().to_string().into()), ("paused_us", paused_us.into())]),
    );
    Ok(SaveFigures {
        dir: dir.to_path_buf(),
        held_bytes,
        written_bytes: written,
        paused_us,
        total_us: t0.elapsed().as_micros() as u64,
    })
}

/// Writes `bytes` at `offset`, skipping all-zero pages (holes). Returns the bytes written.
fn write_sparse(file: &std::fs::File, offset: u64, bytes: &[u8]) -> std::io::Result<u64> {
    let page = PAGE_SIZE as usize;
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let pages = bytes.len().div_ceil(page);
    for i in 0..=pages {
        let nonzero = i < pages && !is_zero(&bytes[i * page..((i + 1) * page).min(bytes.len())]);
        match (nonzero, run_start) {
            (true, None) => run_start = Some(i * page),
            (false, Some(s)) => {
                let end = (i * page).min(bytes.len());
                file.write_all_at(&bytes[s..end], offset + s as u64)?;
                written += (end - s) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// Encodes a state: header line (format, CRC-32 and length of the JSON) and the JSON.
pub fn encode_state(state: &VmState) -> Result<Vec<u8>, SnapshotError> {
    let body = serde_json::to_vec(state).map_err(|e| SnapshotError::Vm(format!("cannot encode the state: {e}")))?;
    let mut out =
        format!("{MAGIC} v{FORMAT_VERSION} crc32={:08x} len={}\n", crc32fast::hash(&body), body.len()).into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes and checks a state encoded by [`encode_state`] (`path` names it in errors).
pub fn decode_state(bytes: &[u8], path: &Path) -> Result<VmState, SnapshotError> {
    let nl = bytes.iter().position(|&b| b == b'\n').ok_or_else(|| SnapshotError::NotSnapshot(path.into()))?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| SnapshotError::NotSnapshot(path.into()))?;
    let mut words = header.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(SnapshotError::NotSnapshot(path.into()));
    }
    let field = |w: Option<&str>, prefix: &str| w.and_then(|w| w.strip_prefix(prefix)).map(str::to_string);
    let version = field(words.next(), "v").and_then(|v| v.parse::<u32>().ok());
    let crc = field(words.next(), "crc32=").and_then(|v| u32::from_str_radix(&v, 16).ok());
    let len = field(words.next(), "len=").and_then(|v| v.parse::<usize>().ok());
    let (Some(version), Some(crc), Some(len)) = (version, crc, len) else {
        return Err(SnapshotError::NotSnapshot(path.into()));
    };
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { path: path.into(), found: version });
    }
    let body = &bytes[nl + 1..];
    if body.len() != len || crc32fast::hash(body) != crc {
        return Err(SnapshotError::Checksum(path.into()));
    }
    let state: VmState = serde_json::from_slice(body)
        .map_err(|e| SnapshotError::Corrupt { path: path.into(), why: format!("state does not parse: {e}") })?;
    if state.abi_version != hypercall_abi::ABI_VERSION {
        return Err(SnapshotError::Corrupt {
            path: path.into(),
            why: format!("guest ABI v{}, this shim serves v{}", state.abi_version, hypercall_abi::ABI_VERSION),
        });
    }
    state.validate().map_err(|why| SnapshotError::Corrupt { path: path.into(), why })?;
    Ok(state)
}

fn write_state(dir: &Path, state: &VmState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(".state.tmp");
    let bytes = encode_state(state)?;
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&bytes).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &path))
}

/// A snapshot read back: its state and its memory file.
#[derive(Debug)]
pub struct Loaded {
    /// The state.
    pub state: VmState,
    /// The memory file (mapped privately by the restore).
    pub memory: std::fs::File,
}

/// Reads and checks the snapshot in `dir`: header, format, checksum, consistency, and that the
/// memory file covers every region.
pub fn load(dir: &Path) -> Result<Loaded, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    let state = decode_state(&bytes, &path)?;
    let mem_path = dir.join(MEMORY_FILE);
    let memory = std::fs::File::open(&mem_path).map_err(io("open", &mem_path))?;
    let size = memory.metadata().map_err(io("stat", &mem_path))?.len();
    for r in &state.regions {
        if r.offset % PAGE_SIZE != 0 || r.offset.checked_add(r.len).is_none_or(|end| end > size) {
            return Err(SnapshotError::Corrupt {
                path: mem_path,
                why: format!("memory file is {size} bytes; region {:#x} needs {}+{}", r.gpa, r.offset, r.len),
            });
        }
    }
    Ok(Loaded { state, memory })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> VmState {
        VmState {
            abi_version: hypercall_abi::ABI_VERSION,
            config: SavedConfig {
                name: "vm0".into(),
                app: "kv".into(),
                kernel: "/k".into(),
                vcpus: Policy::fixed(1),
                memory: Policy::fixed(64 << 20),
                weight: 1,
                budget: [10.0; 2],
                refill: [1.0; 2],
                grace_ms: 200,
                on_violation: "throttle".into(),
                publish: vec!["6379:6379".into()],
                vsock_uds: None,
                idle_shutdown_ms: None,
            },
            layout: Layout::new(64 << 20, 64 << 20),
            tsc_khz: 1,
            credits: [1.0; 2],
            notices: Notices::default(),
            online: vec![false],
            vcpus: Vec::new(),
            regions: vec![SavedRegion { gpa: 0, len: 64 << 20, offset: 0 }],
            device_page: 0,
            device: None,
        }
    }

    #[test]
    fn a_state_round_trips_and_corruption_is_refused() {
        let s = state();
        let bytes = encode_state(&s).unwrap();
        let p = Path::new("s");
        // The state above has no online vCPU: refused as inconsistent after the checksum.
        assert!(matches!(decode_state(&bytes, p), Err(SnapshotError::Corrupt { .. })));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        assert!(matches!(decode_state(&flipped, p), Err(SnapshotError::Checksum(_))));
        let other = String::from_utf8(bytes.clone()).unwrap().replacen(" v1 ", " v9 ", 1);
        assert!(matches!(decode_state(other.as_bytes(), p), Err(SnapshotError::Version { found: 9, .. })));
        assert!(matches!(decode_state(b"hello\n{}", p), Err(SnapshotError::NotSnapshot(_))));
    }

    #[test]
    fn zero_pages_become_holes() {
        let dir = std::env::temp_dir().join(format!("snap-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::File::create(dir.join("m")).unwrap();
        let mut bytes = vec![0u8; 16 * 4096];
        bytes[5 * 4096 + 7] = 1;
        bytes[6 * 4096] = 2;
        assert_eq!(write_sparse(&f, 0, &bytes).unwrap(), 2 * 4096);
        f.set_len(bytes.len() as u64).unwrap();
        let back = std::fs::read(dir.join("m")).unwrap();
        assert_eq!(back, bytes);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
