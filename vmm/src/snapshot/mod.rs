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
//! Restore reads `memory` at once into huge-page-backed memory when a region holds little data
//! (a VM at min: the guest then takes few paging faults), and otherwise maps it privately
//! (copy-on-write), pages read when the guest first touches them; the guest's writes never
//! reach the file either way, so one snapshot restores many times (a [`template`] does).
//! The submodule [`migrate`] sends the same state over a socket, with pre-copy; [`leftovers`]
//! removes the sleep and template directories of shims that were killed.

pub(crate) mod channel;
pub(crate) mod compat;
pub(crate) mod leftovers;
pub(crate) mod migrate;
pub(crate) mod postcopy;
pub(crate) mod restore;
pub(crate) mod template;
pub(crate) mod throttle;
pub(crate) mod wire;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::base::config::VmConfig;
use crate::base::layout::Layout;
use crate::base::memory::{MemoryState, PAGE_SIZE};
use crate::base::persist::Persist;
use crate::devices::DevicesState;
use crate::policy::admission::PolicyState;
use crate::vmm::cpu_state::VcpuState;
use crate::vmm::notices::Notices;
use crate::vmm::shared::VmShared;

/// The snapshot format this shim writes. v2: the state is composed of each component's own
/// state (vCPUs, devices by name, policy, memory regions, notices); v3: a vCPU's xsave area
/// is a hex string.
pub(crate) const FORMAT_VERSION: u32 = 3;
/// The oldest format this shim reads (v2's xsave list still reads).
const OLDEST_FORMAT: u32 = 2;
/// The state file in a snapshot directory.
pub(crate) const STATE_FILE: &str = "state.json";
/// The memory file in a snapshot directory.
pub(crate) const MEMORY_FILE: &str = "memory";
/// The memory file while it is written.
const MEMORY_TMP: &str = ".memory.tmp";
/// The state file while it is written.
const STATE_TMP: &str = ".state.tmp";
/// Every file a snapshot directory may hold.
pub(crate) const FILES: [&str; 4] = [STATE_FILE, MEMORY_FILE, MEMORY_TMP, STATE_TMP];
const MAGIC: &str = "elastic-unikernel-snapshot";
/// Longest wait for the VM's threads to quiesce.
pub(crate) const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);

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
    #[error("{path}: snapshot format v{found}; this shim reads v{OLDEST_FORMAT} to v{FORMAT_VERSION}")]
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
    /// The snapshot directory's parent does not exist (it is not created).
    #[error("{0}: its parent directory does not exist (create it first)")]
    NoParent(PathBuf),
}

impl SnapshotError {
    /// The process exit code for this error.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            SnapshotError::Io { .. } => crate::base::exit::IO_ERROR,
            SnapshotError::Vm(_) => crate::base::exit::INTERNAL,
            SnapshotError::NoParent(_) => crate::base::exit::USAGE,
            _ => crate::base::exit::IMAGE_REFUSED,
        }
    }
}

/// Everything but memory contents: the VM's configuration and each component's state.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct VmState {
    /// The hypercall ABI the guest was built for.
    pub(crate) abi_version: u32,
    /// The kernel image (read again for fault diagnoses).
    pub(crate) kernel: PathBuf,
    /// The configuration (with the resource limits as they were, live changes included).
    pub(crate) config: VmConfig,
    /// The memory layout (boot memory and the hot-plug window).
    pub(crate) layout: Layout,
    /// The TSC frequency the guest was told.
    pub(crate) tsc_khz: u64,
    /// Limits and burst credit.
    pub(crate) policy: PolicyState,
    /// Notices posted and not yet taken.
    pub(crate) notices: Notices,
    /// Per vCPU id: online (else parked).
    pub(crate) online: Vec<bool>,
    /// The online vCPUs' states.
    pub(crate) vcpus: Vec<VcpuState>,
    /// Memory regions: boot memory first, then extents.
    pub(crate) memory: MemoryState,
    /// The devices.
    pub(crate) devices: DevicesState,
    /// How long the VM had run when it was saved (its uptime goes on from there).
    #[serde(default)]
    pub(crate) uptime_us: u64,
}

impl VmState {
    /// Checks the state against itself: regions inside the layout, vCPU lists consistent.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let l = &self.layout;
        let regions = &self.memory.regions;
        let Some(boot) = regions.first() else { return Err("no memory regions".into()) };
        if boot.gpa != 0 || boot.len != l.ram_size || l.ram_size == 0 || !l.ram_size.is_multiple_of(PAGE_SIZE) {
            return Err("boot memory does not match the layout".into());
        }
        for r in &regions[1..] {
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
        if self.vcpus.iter().any(|v| !self.online.get(v.id as usize).copied().unwrap_or(false)) {
            return Err("a saved vCPU state belongs to a vCPU that is not online".into());
        }
        Ok(())
    }
}

/// A VM held still for a snapshot: paused, its devices holding, its vCPU states collected.
/// Dropping it lets the devices go on and resumes the VM unless it was paused before.
#[derive(Debug)]
pub(crate) struct Quiesced<'a> {
    vm: &'a VmShared,
    was_paused: bool,
    online: Vec<bool>,
    vcpus: Vec<VcpuState>,
    keep_held: bool,
    /// How long quiescing took.
    pub(crate) took: Duration,
}

impl<'a> Quiesced<'a> {
    /// Quiesces `vm`: pauses its vCPUs, holds its devices, has every online vCPU save its
    /// state.
    pub(crate) fn new(vm: &'a VmShared) -> Result<Quiesced<'a>, SnapshotError> {
        let t = Instant::now();
        let was_paused = !vm.pause(QUIESCE_TIMEOUT);
        let release = |vm: &VmShared| {
            if !was_paused {
                vm.resume();
            }
        };
        // The vCPU threads save their state while the devices' threads come to a hold (both
        // only wait for their threads; the vCPUs no longer run guest code). A device's wake of
        // a vCPU after its state was saved is not in it (the wake bits never are): the guest
        // checks its queues after any return from BLOCK, and the device's writes to memory
        // are in the memory saved after this.
        let (saved, held) = vm.save_vcpus_while(QUIESCE_TIMEOUT, || vm.devices().quiesce(QUIESCE_TIMEOUT));
        if let Err(e) = held {
            release(vm);
            return Err(SnapshotError::Vm(e.to_string()));
        }
        match saved {
            Ok((online, vcpus)) => Ok(Quiesced { vm, was_paused, online, vcpus, keep_held: false, took: t.elapsed() }),
            Err(e) => {
                vm.devices().release();
                release(vm);
                Err(SnapshotError::Vm(e))
            }
        }
    }

    /// The VM's state, composed of its components' (memory regions without file offsets:
    /// the caller places them).
    pub(crate) fn state(&mut self) -> Result<VmState, SnapshotError> {
        let vm = self.vm;
        let never = |e: std::convert::Infallible| -> SnapshotError { match e {} };
        let policy = vm.policy().save().map_err(never)?;
        let mut config = vm.config().clone();
        config.resources.vcpus = policy.limits[0];
        config.resources.memory = policy.limits[1];
        Ok(VmState {
            abi_version: hypercall_abi::ABI_VERSION,
            kernel: vm.image().path.clone(),
            config,
            layout: vm.layout(),
            tsc_khz: vm.tsc_khz(),
            policy,
            notices: vm.notices().save().map_err(never)?,
            online: self.online.clone(),
            vcpus: std::mem::take(&mut self.vcpus),
            memory: vm.mem().save().map_err(|e| SnapshotError::Vm(e.to_string()))?,
            devices: vm.devices().save(),
            uptime_us: vm.uptime().as_micros() as u64,
        })
    }

    /// Keeps the VM paused and its devices holding after the guard goes (a migrated VM must
    /// not run on, nor accept clients from the listening sockets it handed over).
    pub(crate) fn keep_stopped(&mut self) {
        self.was_paused = true;
        self.keep_held = true;
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        if !self.keep_held {
            self.vm.devices().release();
        }
        if !self.was_paused {
            self.vm.resume();
        }
    }
}

/// What a snapshot took.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SaveFigures {
    /// The directory.
    pub(crate) dir: PathBuf,
    /// Memory the VM held (bytes).
    pub(crate) held_bytes: u64,
    /// Bytes written to the memory file (all-zero pages are holes).
    pub(crate) written_bytes: u64,
    /// Time the VM was held still (µs).
    pub(crate) paused_us: u64,
    /// Whole snapshot time (µs).
    pub(crate) total_us: u64,
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'p {
    move |source| SnapshotError::Io { what, path: path.to_path_buf(), source }
}

/// Whether a page is all zero.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    // SAFETY: any bytes are valid u128s; `align_to` yields the aligned middle part.
    let (head, mid, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Takes a snapshot of `vm` into `dir` (created if needed, but not its parent; an older
/// snapshot there is replaced). The VM is held still while its memory is written and then resumes (unless it
/// was paused before).
pub(crate) fn save(vm: &VmShared, dir: &Path) -> Result<SaveFigures, SnapshotError> {
    save_then(vm, dir, false).map(|(figures, _)| figures)
}

/// Like [`save`], but the VM stays paused and its devices holding afterwards (it is about to
/// end: an on-demand VM going to sleep). Also returns the state written, which the wake can
/// use instead of decoding its file again ([`load_kept`]).
pub(crate) fn save_and_keep_stopped(vm: &VmShared, dir: &Path) -> Result<(SaveFigures, Box<VmState>), SnapshotError> {
    save_then(vm, dir, true).map(|(figures, state)| (figures, Box::new(state)))
}

fn save_then(vm: &VmShared, dir: &Path, keep_stopped: bool) -> Result<(SaveFigures, VmState), SnapshotError> {
    let t0 = Instant::now();
    if !dir.is_dir() {
        if dir.parent().is_some_and(|p| !p.as_os_str().is_empty() && !p.is_dir()) {
            return Err(SnapshotError::NoParent(dir.to_path_buf()));
        }
        std::fs::create_dir(dir).map_err(io("create", dir))?;
    }
    let mut q = Quiesced::new(vm)?;
    let t_held = Instant::now();
    let mut state = q.state()?;
    let mem_tmp = dir.join(MEMORY_TMP);
    let file = std::fs::File::create(&mem_tmp).map_err(io("create", &mem_tmp))?;
    let mut offset = 0u64;
    let mut written = 0u64;
    {
        let mem = vm.mem();
        let guard = mem.snapshot();
        for r in &mut state.memory.regions {
            r.offset = offset;
            let bytes = mem
                .host_range(&guard, r.gpa, r.len)
                .ok_or_else(|| SnapshotError::Vm(format!("region {:#x} vanished", r.gpa)))?;
            // Pages the host never backed are zeroes: not even read (a read would fault them in).
            let in_use = mem.pages_in_use(&guard, r.gpa, r.len);
            let runs = write_sparse(&file, offset, bytes, in_use.as_deref()).map_err(io("write", &mem_tmp))?;
            written += runs.iter().map(|&(_, n)| n).sum::<u64>();
            r.data = Some(runs);
            offset += r.len;
        }
    }
    file.set_len(offset).map_err(io("size", &mem_tmp))?;
    let held_bytes = offset;
    let paused_us = (t_held.elapsed() + q.took).as_micros() as u64;
    let mem_path = dir.join(MEMORY_FILE);
    let write_rest = || -> Result<(), SnapshotError> {
        write_state(dir, &state)?;
        std::fs::rename(&mem_tmp, &mem_path).map_err(io("rename", &mem_path))
    };
    if keep_stopped {
        // Only a complete snapshot keeps the VM stopped: after any error it runs on.
        write_rest()?;
        q.keep_stopped();
        drop(q);
    } else {
        drop(q);
        write_rest()?;
    }
    vm.record(
        "snapshot",
        crate::base::timeline::detail([("dir", dir.display().to_string().into()), ("paused_us", paused_us.into())]),
    );
    let figures = SaveFigures {
        dir: dir.to_path_buf(),
        held_bytes,
        written_bytes: written,
        paused_us,
        total_us: t0.elapsed().as_micros() as u64,
    };
    Ok((figures, state))
}

/// The runs of `bytes` that may hold data, as byte ranges: all-zero pages and, with
/// `in_use`, the pages it marks unused (known zeroes, not read: a read would fault them in)
/// are left out.
pub(crate) fn non_zero_runs(bytes: &[u8], in_use: Option<&[bool]>) -> Vec<std::ops::Range<usize>> {
    let page = PAGE_SIZE as usize;
    let mut runs = Vec::new();
    let mut run_start: Option<usize> = None;
    let pages = bytes.len().div_ceil(page);
    for i in 0..=pages {
        let used = in_use.is_none_or(|u| u.get(i).copied().unwrap_or(true));
        let nonzero = i < pages && used && !is_zero(&bytes[i * page..((i + 1) * page).min(bytes.len())]);
        match (nonzero, run_start) {
            (true, None) => run_start = Some(i * page),
            (false, Some(s)) => {
                runs.push(s..(i * page).min(bytes.len()));
                run_start = None;
            }
            _ => {}
        }
    }
    runs
}

/// Writes `bytes` at `offset`, skipping the pages [`non_zero_runs`] leaves out (holes).
/// Returns the runs written, as `(start, length)` relative to `offset`.
fn write_sparse(
    file: &std::fs::File,
    offset: u64,
    bytes: &[u8],
    in_use: Option<&[bool]>,
) -> std::io::Result<Vec<(u64, u64)>> {
    let mut runs = Vec::new();
    for r in non_zero_runs(bytes, in_use) {
        file.write_all_at(&bytes[r.clone()], offset + r.start as u64)?;
        runs.push((r.start as u64, r.len() as u64));
    }
    Ok(runs)
}

/// Encodes a state: header line (format, CRC-32 and length of the JSON) and the JSON.
pub(crate) fn encode_state(state: &VmState) -> Result<Vec<u8>, SnapshotError> {
    let body = serde_json::to_vec(state).map_err(|e| SnapshotError::Vm(format!("cannot encode the state: {e}")))?;
    let mut out =
        format!("{MAGIC} v{FORMAT_VERSION} crc32={:08x} len={}\n", crc32fast::hash(&body), body.len()).into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes and checks a state encoded by [`encode_state`] (`path` names it in errors).
pub(crate) fn decode_state(bytes: &[u8], path: &Path) -> Result<VmState, SnapshotError> {
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
    if !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&version) {
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
    let tmp = dir.join(STATE_TMP);
    let bytes = encode_state(state)?;
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&bytes).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &path))
}

/// A snapshot read back: its state and its memory file.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The state.
    pub(crate) state: VmState,
    /// The memory file (mapped privately by the restore).
    pub(crate) memory: std::fs::File,
}

/// Reads and checks the snapshot in `dir`: header, format, checksum, consistency, and that the
/// memory file covers every region.
pub(crate) fn load(dir: &Path) -> Result<Loaded, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io("read", &path))?;
    let state = decode_state(&bytes, &path)?;
    load_kept(dir, state)
}

/// Like [`load`], with the state this process wrote to `dir` and kept
/// ([`save_and_keep_stopped`]): only the memory file is opened (and checked against it).
pub(crate) fn load_kept(dir: &Path, state: VmState) -> Result<Loaded, SnapshotError> {
    let mem_path = dir.join(MEMORY_FILE);
    let memory = std::fs::File::open(&mem_path).map_err(io("open", &mem_path))?;
    let size = memory.metadata().map_err(io("stat", &mem_path))?.len();
    for r in &state.memory.regions {
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
        let mut config = VmConfig::new("vm0", "kv");
        config.endpoints.publish = vec![elastic_config::parse_publish("6379:6379").unwrap()];
        VmState {
            abi_version: hypercall_abi::ABI_VERSION,
            kernel: "/k".into(),
            config,
            layout: Layout::new(64 << 20, 64 << 20),
            tsc_khz: 1,
            policy: PolicyState {
                limits: [crate::base::config::Policy::fixed(1), crate::base::config::Policy::fixed(64 << 20)],
                credits: [1.0; 2],
            },
            notices: Notices::default(),
            online: vec![false],
            vcpus: Vec::new(),
            memory: MemoryState::boot_only(64 << 20),
            devices: DevicesState { base: 0, devices: Vec::new() },
            uptime_us: 0,
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
        let other = String::from_utf8(bytes.clone()).unwrap().replacen(" v3 ", " v9 ", 1);
        assert!(matches!(decode_state(other.as_bytes(), p), Err(SnapshotError::Version { found: 9, .. })));
        // A snapshot of the format before the per-component states is refused with one line.
        let old = String::from_utf8(bytes.clone()).unwrap().replacen(" v3 ", " v1 ", 1);
        let e = decode_state(old.as_bytes(), p).unwrap_err();
        assert_eq!(e.to_string(), "s: snapshot format v1; this shim reads v2 to v3");
        // v2 (the xsave area as a list of bytes) still reads as far as its version.
        let v2 = String::from_utf8(bytes.clone()).unwrap().replacen(" v3 ", " v2 ", 1);
        assert!(matches!(decode_state(v2.as_bytes(), p), Err(SnapshotError::Corrupt { .. })));
        // The configuration travels whole.
        let back: VmState =
            serde_json::from_slice(&bytes[bytes.iter().position(|&b| b == b'\n').unwrap() + 1..]).unwrap();
        assert_eq!(back.config.name(), "vm0");
        assert_eq!(back.config.endpoints.publish[0].guest_port, 6379);
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
        assert_eq!(write_sparse(&f, 0, &bytes, None).unwrap(), vec![(5 * 4096, 2 * 4096)]);
        f.set_len(bytes.len() as u64).unwrap();
        let back = std::fs::read(dir.join("m")).unwrap();
        assert_eq!(back, bytes);
        // Pages marked unused are not written (nor read); the others as before.
        let g = std::fs::File::create(dir.join("g")).unwrap();
        let mut in_use = vec![true; 16];
        in_use[6] = false;
        assert_eq!(write_sparse(&g, 0, &bytes, Some(&in_use)).unwrap(), vec![(5 * 4096, 4096)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
