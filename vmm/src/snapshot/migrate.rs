//! Live migration over a [`Channel`] (a Unix socket on one host, mutual TLS over TCP between
//! hosts): pre-copy with KVM's dirty log plus the shim's own writes, then a short
//! stop-and-copy.
//!
//! The source ([`send`], from `ctl migrate`):
//!
//! 0. says hello (versions, layout, CPU features and TSC rate, the VM's configuration and
//!    kernel path); the target answers before any memory moves: it refuses a version, CPU or
//!    TSC it cannot run, and, over TCP, binds the published ports itself (a port it cannot bind
//!    refuses too). On one host the published listening sockets follow at once, as file
//!    descriptors (`L`): clients keep connecting to the same sockets, served here until the
//!    switch and waiting in their backlog meanwhile. The target then prepares its run (filters,
//!    API, timeline, image, vCPUs) while the memory moves;
//! 1. turns dirty logging on, sends the layout and every non-zero page the VM holds while it
//!    runs;
//! 2. repeats: sends the pages written since the previous round (the guest's, from KVM's
//!    dirty log; the shim's, from the regions' bitmaps), until a round is small
//!    ([`SMALL_ROUND`]) or [`MAX_ROUNDS`] passed, the guest slowed by [`super::throttle`]
//!    while the rounds do not halve (auto-converge); then waits until the target has written
//!    everything sent (`Y`, answered `A`): over TCP megabytes can sit in socket buffers, and
//!    the VM must not stop while the target still works through them;
//! 3. quiesces the VM (vCPUs paused with their calls completed, the device's I/O thread
//!    holding), sends the last dirty pages, the region list and the state. With `verify`,
//!    every held page is then compared (CRC-32) with what was sent, and a page the logs
//!    missed is sent too and counted (`missed_by_log`; it costs downtime: the whole memory is
//!    read while the VM is stopped);
//! 4. waits for the target to say its VM is built. Then the source's VM ends (exit reason
//!    `migrated`) and the target's vCPUs start. If anything fails before that, the source
//!    resumes and the target gives up. A target that cannot deliver its answer does not run
//!    the VM. One case is left open: a channel that breaks (a timeout, a reset) after the
//!    state was sent and before the answer arrived; the target may run the VM then, so the
//!    source keeps it stopped and says so (`ctl resume` brings it back if the target does not
//!    run it).
//!
//! On one host a VM whose regions are all memfds (`--memory-backing memfd`) skips 1–3
//! ([`hand_over`]): each region goes as its memfd's descriptor (`F`), the target maps them
//! (`Y`, `A`), the VM is quiesced, the region list and the regions granted since follow, then
//! the state. Nothing is copied (`verify` has nothing to compare). From the state on, this
//! side writes no more to that memory; a target that closes without answering may have written
//! to it, so that case too leaves the VM stopped here.
//!
//! Only held memory travels: zero pages are skipped in the first round, and extents the VM
//! released are dropped on the target.
//!
//! Wire format: messages `[kind: u8][len: u64 LE][payload]`. `H` hello (JSON; answered `A` or
//! `E`), `L` one listening socket (JSON, with the descriptor attached), `R` regions (JSON
//! list), `P` pages (`[gpa u64][pages u32][data]` runs), `F` one region by descriptor (JSON,
//! with the memfd attached), `Y` catch-up (answered `A`), `S` the state
//! ([`super::encode_state`]); the target answers `A` (ready) or `E` (JSON error). Post-copy
//! ([`super::postcopy`], `--postcopy`) skips the pre-copy: region list, catch-up, stop, the
//! region list again and the state; the target then asks for pages (`Q`, `B`) and says when it
//! has them all (`D`).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypercall_abi::Extent;
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::channel::{Channel, ChannelError, Destination};
use super::compat::HostProfile;
use super::postcopy::{PostcopyError, PostcopyFigures};
use super::throttle::{StopOnDrop, Throttle};
use super::wire::{self, WireError, json, read_msg, read_msg_into, write_msg, write_msg_with_fd};
use super::{Quiesced, SnapshotError, VmState};
use crate::base::config::VmConfig;
use crate::base::layout::Layout;
use crate::base::memory::{Backing, GuestMemory, PAGE_SIZE, RegionInfo};
use crate::host::endpoint::{Bound, Publish};
use crate::vmm::shared::{Started, VmShared};
use crate::vmm::vcpu::Vcpu;

/// Told whether a received VM was built (`Err`: why not); the source then ends its copy (or
/// resumes its VM). Returns whether the source was told: a VM whose source may not know must
/// not run (the source resumes it when it hears nothing); and, when told, what to call once
/// the VM's vCPUs have started (it tells the source when: `G`).
pub(crate) type ReadyCallback = Box<dyn FnOnce(Result<(), String>) -> Result<Option<Started>, String> + Send>;

/// A round that dirtied fewer pages than this ends the pre-copy (1 MiB: ~3 ms over TLS here).
pub(crate) const SMALL_ROUND: usize = 256;
/// Most pre-copy rounds.
pub(crate) const MAX_ROUNDS: u32 = 12;
/// Pages per `P` message.
const BATCH_PAGES: usize = 1024;
/// Largest JSON message accepted.
const MAX_JSON: u64 = 16 << 20;
/// How long the source waits for the target's answer, and a write may block.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// The message protocol's version (2: hello and the catch-up are answered; 3: hello carries
/// the configuration, and the listening sockets follow its answer).
const PROTOCOL: u32 = 3;
/// The protocol of a post-copy migration (3 with the requests of [`super::postcopy`]): a
/// target that speaks only 3 refuses it at hello.
const PROTOCOL_POSTCOPY: u32 = 4;

/// Migration failures.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// The socket failed.
    #[error("migration channel: {0}")]
    Io(#[from] std::io::Error),
    /// The channel could not be set up (an address, a TLS file, the connection, the
    /// handshake).
    #[error("migration channel: {0}")]
    Channel(#[from] ChannelError),
    /// The peer sent something malformed.
    #[error("migration protocol: {0}")]
    Protocol(String),
    /// The peer closed the channel before the message it owed.
    #[error("migration protocol: the peer closed the channel")]
    PeerClosed,
    /// The target refused the VM.
    #[error("the target refused the VM: {0}")]
    Refused(String),
    /// The channel broke after the state was sent, before the target answered: the target may
    /// be running the VM, so it stays stopped here (paused, its devices holding).
    #[error(
        "no answer from the target after the VM's state was sent ({0}): the target may be running it, so it stays \
         stopped here; `ctl resume` it here only if the target does not run it (its process is gone)"
    )]
    Unclear(String),
    /// The VM could not be quiesced or read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Guest memory failed.
    #[error(transparent)]
    Memory(#[from] crate::base::memory::MemoryError),
    /// Post-copy could not start here.
    #[error(transparent)]
    Postcopy(#[from] PostcopyError),
    /// Post-copy broke after the VM started at the target: the target cannot go on without
    /// this memory, and this copy is older than what ran there.
    #[error(
        "post-copy broke after the VM started at the target ({0}): the target cannot go on without the pages \
         still here (it ends, exit code 78) unless it had them all already; this copy is older than what ran \
         there and stays stopped here: `ctl resume` it only if the target process is gone and losing what it did \
         since the move is acceptable"
    )]
    PostcopyLost(String),
}

impl From<WireError> for MigrateError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Io(e) => MigrateError::Io(e),
            WireError::PeerClosed => MigrateError::PeerClosed,
            WireError::Malformed(why) => MigrateError::Protocol(why),
        }
    }
}

/// Figures of one migration (the API's answer).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MigrateFigures {
    /// Pre-copy rounds (the first full copy included).
    pub(crate) rounds: u32,
    /// Pages sent in all.
    pub(crate) pages_sent: u64,
    /// With `verify`: pages the final check found changed although no dirty log reported
    /// them (sent too); 0 means the logs caught every write.
    pub(crate) missed_by_log: Option<u64>,
    /// Pages sent while the VM was stopped (the last dirty log; `verify`'s not counted).
    pub(crate) stopped_pages: u64,
    /// The guest's highest write rate in a pre-copy round of 100 ms or more, as the dirty log
    /// saw it (distinct pages written per second; the throttle lowers it in later rounds).
    pub(crate) dirty_pages_per_s: u64,
    /// The share of the guest's time the throttle took at the end of the pre-copy (%; 0: the
    /// rounds shrank by themselves).
    pub(crate) throttle_percent: u32,
    /// Memory the VM held (bytes).
    pub(crate) held_bytes: u64,
    /// The memory was handed over by descriptor (a VM backed by memfds, on one host), not
    /// copied.
    pub(crate) memory_by_fd: bool,
    /// With `--postcopy`: what the target fetched after the VM started there.
    pub(crate) postcopy: Option<PostcopyFigures>,
    /// Time the VM did not run (µs): from the quiesce here to its vCPUs' start at the target
    /// on one host (the target says when, by the same clock), to the target's answer between
    /// hosts.
    pub(crate) downtime_us: u64,
    /// From the quiesce to the target's answer read here (µs).
    pub(crate) answer_us: u64,
    /// From the quiesce to the target's first vCPU about to enter the guest, by the target's
    /// clock (µs; on one host, when the target said so: `downtime_us` is this then).
    pub(crate) started_us: Option<u64>,
    /// Whole migration (µs).
    pub(crate) total_us: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    protocol: u32,
    format: u32,
    abi_version: u32,
    layout: Layout,
    /// The source's CPU features and the VM's TSC rate.
    profile: HostProfile,
    /// The VM's configuration as it is now, and its kernel image: the target prepares its run
    /// (filters, API, timeline, image) while the memory moves, not while the VM is stopped
    /// (the state's own configuration, at the end, is the one the VM runs with).
    config: VmConfig,
    kernel: PathBuf,
    /// On one host, how many listening sockets follow the answer (as descriptors).
    listeners: u32,
    /// On one host, with every region a memfd: the memory is handed over by descriptor (`F`),
    /// not copied.
    memory_by_fd: bool,
    /// Post-copy: the state comes first and the VM runs at the target at once; its pages
    /// follow on request ([`super::postcopy`]).
    #[serde(default)]
    postcopy: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct WireRegion {
    gpa: u64,
    len: u64,
    serial: u64,
}

#[derive(Debug, Serialize, Deserialize)]
enum WireListener {
    Tcp { guest_port: u32 },
    Uds { path: PathBuf },
}

/// What the target holds: per region (by serial), the CRC-32 of each page as last sent
/// (`None`: never sent, zero there).
#[derive(Debug, Default)]
struct Sent {
    regions: BTreeMap<u64, (u64, Vec<Option<u32>>)>,
}

impl Sent {
    /// Follows the source's regions: forgets released ones, adds new ones (all zero there).
    fn sync(&mut self, regions: &[crate::base::memory::RegionInfo]) {
        self.regions.retain(|serial, _| regions.iter().any(|r| r.serial == *serial));
        for r in regions {
            self.regions.entry(r.serial).or_insert_with(|| (r.gpa, vec![None; (r.len / PAGE_SIZE) as usize]));
        }
    }

    /// Whether the target holds region `serial` at `gpa`.
    fn knows(&self, serial: u64, gpa: u64) -> bool {
        self.regions.get(&serial).is_some_and(|(base, _)| *base == gpa)
    }

    fn slot(&mut self, gpa: u64) -> Option<&mut Option<u32>> {
        let (_, (base, pages)) =
            self.regions.iter_mut().find(|(_, (b, p))| *b <= gpa && gpa < b + p.len() as u64 * PAGE_SIZE)?;
        pages.get_mut(((gpa - *base) / PAGE_SIZE) as usize)
    }
}

/// Sends the pages at `pages` (sorted guest-physical page addresses) that lie in regions the
/// target holds, recording what was sent.
///
/// The guest runs meanwhile and may release an extent and be granted another at the same
/// address after the target was last told the regions: a page there is then skipped (the new
/// region reaches the target with the next region list, and the dirty log has every write to
/// it since its grant). The regions are read before the memory snapshot, so a page sent under
/// a region the target knows is either that region's or belongs to one that replaced it since,
/// which the target drops at the next region list.
fn send_pages(s: &mut Channel, vm: &VmShared, pages: &[u64], sent_map: &mut Sent) -> Result<u64, MigrateError> {
    let mem = vm.mem();
    let live = mem.regions();
    let guard = mem.snapshot();
    let mut sent = 0u64;
    let mut buf = Vec::with_capacity(BATCH_PAGES * (PAGE_SIZE as usize + 12));
    let mut in_batch = 0;
    let mut i = 0;
    while i < pages.len() {
        // A run of consecutive pages inside one region (adjacent extents are separate
        // mappings: a run never crosses into the next one).
        let start = pages[i];
        let known = live.iter().find(|r| r.gpa <= start && start - r.gpa < r.len && sent_map.knows(r.serial, r.gpa));
        let (Some(region), Some(end)) = (known, mem.region_end(&guard, start)) else {
            // Released since it was written (the target drops the region), or granted since
            // the target was last told the regions (its pages go in a later round).
            i += 1;
            continue;
        };
        let end = end.min(region.gpa + region.len);
        let mut n = 1;
        while i + n < pages.len()
            && pages[i + n] == start + n as u64 * PAGE_SIZE
            && pages[i + n] < end
            && in_batch + n < BATCH_PAGES
        {
            n += 1;
        }
        i += n;
        let Some(bytes) = mem.host_range(&guard, start, n as u64 * PAGE_SIZE) else {
            // Released since it was written: the target drops the region.
            continue;
        };
        // The copy is hashed, not guest memory: the guest may write the pages meanwhile.
        let at = buf.len() + 12;
        wire::push_run(&mut buf, start, bytes);
        for (k, page) in buf[at..].chunks(PAGE_SIZE as usize).enumerate() {
            if let Some(slot) = sent_map.slot(start + k as u64 * PAGE_SIZE) {
                *slot = Some(crc32fast::hash(page));
            }
        }
        in_batch += n;
        sent += n as u64;
        if in_batch >= BATCH_PAGES {
            write_msg(s, b'P', &buf)?;
            buf.clear();
            in_batch = 0;
        }
    }
    if !buf.is_empty() {
        write_msg(s, b'P', &buf)?;
    }
    Ok(sent)
}

/// Every page, in the regions the target knows, whose contents differ from what the target
/// holds (the first round: every non-zero page; with the VM paused, the final check that
/// nothing was missed).
fn changed_pages(vm: &VmShared, sent: &Sent) -> Vec<u64> {
    let mem = vm.mem();
    let guard = mem.snapshot();
    let mut pages = Vec::new();
    for r in mem.regions() {
        // A region granted since the target was last told the regions is not there yet: its
        // pages go in a later round (the dirty log has every write to it since).
        let Some((_, hashes)) = sent.regions.get(&r.serial) else { continue };
        let Some(bytes) = mem.host_range(&guard, r.gpa, r.len) else { continue };
        for (i, page) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
            let changed = match hashes.get(i).copied().flatten() {
                None => !super::is_zero(page),
                Some(h) => crc32fast::hash(page) != h,
            };
            if changed {
                pages.push(r.gpa + i as u64 * PAGE_SIZE);
            }
        }
    }
    pages
}

fn send_regions(s: &mut Channel, vm: &VmShared, sent: &mut Sent) -> Result<(), MigrateError> {
    let regions = vm.mem().regions();
    sent.sync(&regions);
    let wire: Vec<WireRegion> =
        regions.iter().map(|r| WireRegion { gpa: r.gpa, len: r.len, serial: r.serial }).collect();
    Ok(write_msg(s, b'R', &json(&wire))?)
}

/// Sends the VM's listening sockets, as descriptors (`L`, one per socket).
fn send_listeners(s: &mut Channel, vm: &VmShared) -> Result<(), MigrateError> {
    for l in vm.endpoints().iter() {
        let meta = match l {
            Bound::Tcp { guest_port, .. } => WireListener::Tcp { guest_port: *guest_port },
            Bound::Uds { path, .. } => WireListener::Uds { path: path.clone() },
        };
        write_msg_with_fd(s, b'L', l.raw_fd(), &json(&meta))?;
    }
    Ok(())
}

/// Migrates `vm` to the receiver listening on `to`. On success the VM runs there and the
/// caller ends it here; on failure it keeps running here.
pub(crate) fn send(vm: &VmShared, to: &Destination, how: CopyMode) -> Result<MigrateFigures, MigrateError> {
    let config = vm.config();
    if config.lifecycle.on_demand.is_some() {
        return Err(MigrateError::Protocol("an on-demand VM cannot be migrated".into()));
    }
    let t0 = Instant::now();
    let profile = HostProfile::of_vm(vm.cpuid(), vm.tsc_khz());
    let mut s = to.connect()?;
    s.set_read_timeout(Some(ACK_TIMEOUT))?;
    // A target that stops reading cannot hold the VM (paused, at the end) for long.
    s.set_write_timeout(Some(ACK_TIMEOUT))?;
    let passes = s.passes_descriptors();
    let postcopy = how == CopyMode::Post;
    // Post-copy copies, even memory it could hand over.
    let memfds = if passes && !postcopy { vm.mem().memfds() } else { None };
    let hello = Hello {
        protocol: if postcopy { PROTOCOL_POSTCOPY } else { PROTOCOL },
        format: super::FORMAT_VERSION,
        abi_version: hypercall_abi::ABI_VERSION,
        layout: vm.layout(),
        profile,
        config: config.clone(),
        kernel: vm.image().path.clone(),
        listeners: if passes { vm.endpoints().len() as u32 } else { 0 },
        memory_by_fd: memfds.is_some(),
        postcopy,
    };
    write_msg(&mut s, b'H', &json(&hello))?;
    // Nothing moves before the target said it can run the VM (over TLS, a refused
    // certificate surfaces here too).
    answer(&mut s)?;
    if passes {
        // On one host the target takes the listening sockets themselves, now: it prepares its
        // run with them while the memory moves. Clients keep connecting to the same sockets,
        // and this side serves them until the VM stops.
        send_listeners(&mut s, vm)?;
    }
    if let Some(regions) = memfds {
        return hand_over(vm, &mut s, t0, regions);
    }
    if postcopy {
        return post_copy(vm, &mut s, t0);
    }
    vm.mem().set_dirty_logging(vm.fd(), true)?;
    let result = pre_copy_and_switch(vm, &mut s, t0, how == CopyMode::PreVerified);
    if result.is_err() {
        let _ = vm.mem().set_dirty_logging(vm.fd(), false);
    }
    result
}

/// How the memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyMode {
    /// Pre-copy: while the VM runs here, then what it wrote meanwhile.
    Pre,
    /// Pre-copy, then every held page compared with what was sent (`--verify`).
    PreVerified,
    /// Post-copy: the state first, the pages after, on request (`--postcopy`).
    Post,
}

/// Post-copy: quiesces the VM at once, sends the region list and the state, serves the
/// target's page requests until it answers (downtime ends there: the VM runs at the target),
/// then until it holds every page.
fn post_copy(vm: &VmShared, s: &mut Channel, t0: Instant) -> Result<MigrateFigures, MigrateError> {
    // The target maps the regions while the VM still runs here; the list after the stop
    // says which changed meanwhile.
    let mut sent = Sent::default();
    send_regions(s, vm, &mut sent)?;
    // Mapping them and registering their slots takes ~0.1 ms a region there: done before
    // the VM stops.
    write_msg(s, b'Y', &[])?;
    s.flush()?;
    answer(s)?;
    let t_stop = Instant::now();
    let mut q = Quiesced::new(vm)?;
    send_regions(s, vm, &mut sent)?;
    // The page the target's shim writes as it restores the VM goes now, not on request.
    send_pages(s, vm, &[hypercall_abi::NOTICE_ADDR], &mut sent)?;
    let state = q.state()?;
    let held_bytes = state.memory.regions.iter().map(|r| r.len).sum();
    write_msg(s, b'S', &super::encode_state(&state)?)?;
    s.flush()?;
    match super::postcopy::serve_until_answer(s, vm.mem()) {
        Ok(()) => {}
        // The target does not run the VM: it resumes here (the guard).
        Err(PostcopyError::Refused(why)) => return Err(MigrateError::Refused(why)),
        Err(PostcopyError::Wire(e @ (WireError::PeerClosed | WireError::Malformed(_)))) => return Err(e.into()),
        Err(e) => {
            q.keep_stopped();
            vm.stopped_by_migration();
            return Err(MigrateError::Unclear(e.to_string()));
        }
    }
    let downtime_us = t_stop.elapsed().as_micros() as u64;
    q.keep_stopped();
    if s.passes_descriptors() {
        vm.endpoints().iter_mut().for_each(Bound::disown);
    }
    drop(q);
    vm.record("migrated", crate::base::timeline::detail([("downtime_us", downtime_us.into()), ("rounds", 0.into())]));
    // The VM runs there; its pages are still here.
    let figures = super::postcopy::serve_rest(s, vm.mem()).map_err(|e| {
        vm.stopped_by_migration();
        MigrateError::PostcopyLost(e.to_string())
    })?;
    Ok(MigrateFigures {
        rounds: 0,
        pages_sent: figures.pages_copied,
        missed_by_log: None,
        stopped_pages: 0,
        dirty_pages_per_s: 0,
        throttle_percent: 0,
        held_bytes,
        memory_by_fd: false,
        postcopy: Some(figures),
        downtime_us,
        answer_us: downtime_us,
        started_us: None,
        total_us: t0.elapsed().as_micros() as u64,
    })
}

/// Reads the target's answer: `A` (go on) or `E` (why not).
fn answer(s: &mut Channel) -> Result<(), MigrateError> {
    let (kind, payload, _) = read_msg(s, MAX_JSON)?;
    match kind {
        b'A' => Ok(()),
        b'E' => Err(MigrateError::Refused(wire::refusal(&payload))),
        k => Err(MigrateError::Protocol(format!("unexpected answer '{}'", k as char))),
    }
}

/// The pre-copy rounds after the first: each sends the pages written during the one before,
/// until one is small or [`MAX_ROUNDS`] passed; a round that is not smaller than the one
/// before raises `throttle`. Returns (rounds, pages sent, the guest's highest write rate in a
/// round of 100 ms or more, or the average since `logging_since` when none was that long, in
/// distinct pages a second).
fn dirty_rounds(
    vm: &VmShared,
    s: &mut Channel,
    sent: &mut Sent,
    throttle: &Throttle,
    logging_since: Instant,
) -> Result<(u32, u64, u64), MigrateError> {
    let (mut rounds, mut pages_sent, mut previous, mut top_rate) = (0u32, 0u64, None, 0u64);
    let mut logged_at = logging_since;
    let mut logged = 0u64;
    loop {
        let dirty = vm.mem().take_dirty(vm.fd())?;
        // A rate over a round of a few milliseconds says little: rounds of 100 ms or more count.
        let took = logged_at.elapsed().as_secs_f64();
        if took >= 0.1 {
            top_rate = top_rate.max((dirty.len() as f64 / took) as u64);
        }
        logged += dirty.len() as u64;
        logged_at = Instant::now();
        send_regions(s, vm, sent)?;
        pages_sent += send_pages(s, vm, &dirty, sent)?;
        rounds += 1;
        if dirty.len() < SMALL_ROUND || rounds + 1 >= MAX_ROUNDS {
            // No round was long enough: the average over the whole pre-copy.
            if top_rate == 0 {
                top_rate = (logged as f64 / logging_since.elapsed().as_secs_f64().max(1e-6)) as u64;
            }
            return Ok((rounds, pages_sent, top_rate));
        }
        if let Some(p) = previous {
            throttle.after_round(p, dirty.len());
        }
        previous = Some(dirty.len());
    }
}

fn pre_copy_and_switch(
    vm: &VmShared,
    s: &mut Channel,
    t0: Instant,
    verify: bool,
) -> Result<MigrateFigures, MigrateError> {
    // Round 1: everything held (the log, on since just now, collects what changes meanwhile).
    let logging_since = Instant::now();
    let mut sent = Sent::default();
    send_regions(s, vm, &mut sent)?;
    let mut pages_sent = send_pages(s, vm, &changed_pages(vm, &sent), &mut sent)?;
    // Rounds of what was written meanwhile, the guest throttled while they do not shrink.
    let throttle = Throttle::default();
    let (rounds, more, dirty_pages_per_s, throttled) = std::thread::scope(|scope| {
        let throttling = std::thread::Builder::new()
            .name("migrate-throttle".into())
            .spawn_scoped(scope, || throttle.run(vm))
            .is_ok();
        // Stopped however this ends, and only after the catch-up below (the guest stays
        // throttled while the target works through its backlog).
        let _stop = StopOnDrop(&throttle);
        let (rounds, more, rate) = dirty_rounds(vm, s, &mut sent, &throttle, logging_since)?;
        // The target catches up before the VM stops (what it has not written yet would be
        // downtime).
        write_msg(s, b'Y', &[])?;
        s.flush()?;
        answer(s)?;
        Ok::<_, MigrateError>((rounds, more, rate, if throttling { throttle.percent() } else { 0 }))
    })?;
    pages_sent += more;
    let rounds = rounds + 1;
    // Stop and copy: the pages logged since; with `verify`, then a check of every page
    // against what was sent (a page the logs missed is sent too, and counted).
    let t_stop = Instant::now();
    let q = Quiesced::new(vm)?;
    let dirty = vm.mem().take_dirty(vm.fd())?;
    send_regions(s, vm, &mut sent)?;
    let stopped_pages = send_pages(s, vm, &dirty, &mut sent)?;
    pages_sent += stopped_pages;
    let missed = if verify { Some(changed_pages(vm, &sent)) } else { None };
    if let Some(m) = &missed {
        pages_sent += send_pages(s, vm, m, &mut sent)?;
    }
    let missed = missed.map(|m| m.len() as u64);
    let copied = Copied { rounds, pages_sent, missed, stopped_pages, dirty_pages_per_s, memory_by_fd: false };
    switch(vm, s, q, (t0, t_stop), copied, throttled)
}

/// What a migration sent before the state.
#[derive(Default)]
struct Copied {
    rounds: u32,
    pages_sent: u64,
    missed: Option<u64>,
    stopped_pages: u64,
    dirty_pages_per_s: u64,
    /// The memory went by descriptor ([`hand_over`]), nothing copied.
    memory_by_fd: bool,
}

/// With the VM quiesced and its memory at the target: sends the state and waits for the
/// target's answer; then the VM stays stopped here (it runs there) or, on a refusal, resumes.
fn switch(
    vm: &VmShared,
    s: &mut Channel,
    mut q: Quiesced<'_>,
    (t0, t_stop): (Instant, Instant),
    copied: Copied,
    throttle_percent: u32,
) -> Result<MigrateFigures, MigrateError> {
    let state = q.state()?;
    let held_bytes = state.memory.regions.iter().map(|r| r.len).sum();
    let encoded = super::encode_state(&state)?;
    let by_fd = copied.memory_by_fd;
    if by_fd {
        // From here the target may run the VM on this very memory: nothing here writes to it
        // (a notice, a device) unless the target refuses.
        vm.mem().freeze(true);
    }
    let sent = write_msg(s, b'S', &encoded).and_then(|()| s.flush());
    let answered = sent.map_err(MigrateError::from).and_then(|()| answer(s));
    let answer_us = t_stop.elapsed().as_micros() as u64;
    match answered {
        Ok(()) => {}
        // An explicit refusal: the target does not run the VM, which resumes here.
        Err(e @ MigrateError::Refused(_)) => {
            vm.mem().freeze(false);
            return Err(e);
        }
        // A target that closed without answering does not run the VM either; but with the
        // memory shared it may have written to it before it died (its devices start just
        // before it answers): then the VM stays stopped here, as below.
        Err(e @ MigrateError::PeerClosed) if !by_fd => return Err(e),
        Err(MigrateError::Io(e)) if !by_fd && e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(e.into()),
        Err(e) => {
            // Paused, its devices holding (they would serve the guest's queues, and accept on
            // sockets the target may be serving), its memory frozen: `ctl resume` lets all of
            // it go on.
            q.keep_stopped();
            vm.stopped_by_migration();
            return Err(MigrateError::Unclear(e.to_string()));
        }
    }
    q.keep_stopped();
    let one_host = s.passes_descriptors();
    if one_host {
        // The endpoints belong to the target now: their Unix socket paths stay.
        vm.endpoints().iter_mut().for_each(Bound::disown);
    }
    drop(q);
    // On one host the target says when its vCPUs started, by the clock this side reads too:
    // the downtime ends there, not when this side got round to reading the answer (a
    // wake-up of ~0.1–1 ms on a busy host, with the VM already running there). Between hosts
    // the clocks differ: the answer ends it.
    let started_us = if one_host { started_at(s, t_stop) } else { None };
    let downtime_us = started_us.unwrap_or(answer_us);
    vm.record(
        "migrated",
        crate::base::timeline::detail([("downtime_us", downtime_us.into()), ("rounds", copied.rounds.into())]),
    );
    Ok(MigrateFigures {
        rounds: copied.rounds,
        pages_sent: copied.pages_sent,
        missed_by_log: copied.missed,
        stopped_pages: copied.stopped_pages,
        dirty_pages_per_s: copied.dirty_pages_per_s,
        throttle_percent,
        held_bytes,
        memory_by_fd: copied.memory_by_fd,
        postcopy: None,
        downtime_us,
        answer_us,
        started_us,
        total_us: t0.elapsed().as_micros() as u64,
    })
}

/// The target's `G` (its vCPUs started at this CLOCK_MONOTONIC time): µs since `t_stop`.
/// `None` when it does not come within a second (a target of an earlier build).
fn started_at(s: &mut Channel, t_stop: Instant) -> Option<u64> {
    let stop_ns = crate::host::clock::now_monotonic_ns().checked_sub(t_stop.elapsed().as_nanos() as u64)?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let (kind, payload, _) = read_msg(s, 64).ok()?;
    let at = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    (kind == b'G' && at >= stop_ns).then(|| (at - stop_ns) / 1000)
}

/// Sends region `r` as the descriptor of the memfd that holds it (`F`).
fn send_memfd(s: &mut Channel, r: &RegionInfo, file: &std::fs::File) -> Result<(), MigrateError> {
    use std::os::fd::AsRawFd;
    let payload = json(&WireRegion { gpa: r.gpa, len: r.len, serial: r.serial });
    Ok(write_msg_with_fd(s, b'F', file.as_raw_fd(), &payload)?)
}

/// A migration on one host of a VM whose regions are all memfds: the target maps the same
/// memory, handed over by descriptor while the VM runs; nothing is copied. The VM is then
/// quiesced, regions granted since are handed over too, the region list tells the target
/// which are gone, and the state follows.
fn hand_over(
    vm: &VmShared,
    s: &mut Channel,
    t0: Instant,
    regions: Vec<(RegionInfo, std::fs::File)>,
) -> Result<MigrateFigures, MigrateError> {
    let mut handed = std::collections::BTreeSet::new();
    for (r, file) in &regions {
        send_memfd(s, r, file)?;
        handed.insert(r.serial);
    }
    drop(regions);
    // The target maps them and registers its memory slots (~0.2 ms a region here) before
    // the VM stops.
    write_msg(s, b'Y', &[])?;
    s.flush()?;
    answer(s)?;
    let t_stop = Instant::now();
    let q = Quiesced::new(vm)?;
    // The list first: the target drops the extents released since, whose addresses a later
    // grant may have taken; then the regions granted since (every grant of a VM backed by
    // memfds is a memfd too).
    let now = vm.mem().regions();
    let wire: Vec<WireRegion> = now.iter().map(|r| WireRegion { gpa: r.gpa, len: r.len, serial: r.serial }).collect();
    write_msg(s, b'R', &json(&wire))?;
    if now.iter().any(|r| !handed.contains(&r.serial)) {
        let fds = vm.mem().memfds().ok_or_else(|| MigrateError::Protocol("a region is no longer a memfd".into()))?;
        for (r, file) in fds.iter().filter(|(r, _)| !handed.contains(&r.serial)) {
            send_memfd(s, r, file)?;
        }
    }
    let copied = Copied { memory_by_fd: true, ..Copied::default() };
    switch(vm, s, q, (t0, t_stop), copied, 0)
}

/// A VM received from a source: its KVM VM and filled memory, its state, and the channel to
/// answer on.
pub(crate) struct Received {
    /// The KVM VM, memory slots registered.
    pub(crate) fd: VmFd,
    /// Its memory, filled.
    pub(crate) mem: GuestMemory,
    /// The state.
    pub(crate) state: VmState,
    /// When the state arrived.
    pub(crate) stopped_at: Instant,
    /// vCPUs 0, 1, ... made ahead, in their fresh state.
    pub(crate) vcpus: Vec<Vcpu>,
    /// Tells the source the VM is built (it ends its copy) or why not (it resumes).
    pub(crate) answer: ReadyCallback,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received").field("state", &self.state).finish_non_exhaustive()
    }
}

/// A source this target welcomed: what the target prepares its run with while the memory
/// moves, and the rest of the transfer ([`Welcomed::transfer`]).
pub(crate) struct Welcomed {
    /// The VM's configuration at hello (the state's, at the end, is the one it runs with).
    pub(crate) config: VmConfig,
    /// The kernel image the source runs it with.
    pub(crate) kernel: PathBuf,
    /// The published endpoints: bound here (over TCP), or handed over (on one host).
    pub(crate) endpoints: Vec<Bound>,
    /// The rest of the transfer.
    pub(crate) transfer: Transfer,
}

impl std::fmt::Debug for Welcomed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Welcomed").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The memory and state still to come from a welcomed source.
pub(crate) struct Transfer {
    channel: Channel,
    layout: Layout,
    /// The memory comes by descriptor ([`Hello::memory_by_fd`]).
    by_fd: bool,
    /// vCPUs to make ahead, while the VM still runs at the source (its burst at hello).
    vcpus: u32,
    /// Copied memory goes into memfds (the VM runs with `--memory-backing memfd`).
    shared: bool,
    /// The pages come after the state, on request ([`super::postcopy`]).
    postcopy: bool,
}

/// What the target checked and set up at hello.
struct Welcome {
    hello: Hello,
    /// The published ports, bound here (over TCP); `None`: they come as descriptors.
    endpoints: Option<Vec<Bound>>,
}

/// Checks the source's hello: the versions, the layout, that this host can run the VM; over
/// TCP binds the published ports (`publish`, if not empty, instead of the source's).
fn welcome(kvm: &Kvm, payload: &[u8], bind: bool, publish: &[Publish]) -> Result<Welcome, String> {
    let loose: serde_json::Value = serde_json::from_slice(payload).map_err(|e| format!("hello: {e}"))?;
    let (protocol, format, abi) = (&loose["protocol"], &loose["format"], &loose["abi_version"]);
    if !matches!(protocol.as_u64(), Some(p) if p == u64::from(PROTOCOL) || p == u64::from(PROTOCOL_POSTCOPY))
        || format.as_u64() != Some(u64::from(super::FORMAT_VERSION))
        || abi.as_u64() != Some(u64::from(hypercall_abi::ABI_VERSION))
    {
        return Err(format!(
            "version mismatch: the source speaks protocol {protocol}, format {format}, ABI {abi}; this shim speaks \
             protocol {PROTOCOL}, format {}, ABI {}",
            super::FORMAT_VERSION,
            hypercall_abi::ABI_VERSION
        ));
    }
    let hello: Hello = serde_json::from_value(loose).map_err(|e| format!("hello: {e}"))?;
    if hello.postcopy != (hello.protocol == PROTOCOL_POSTCOPY) || (hello.postcopy && hello.memory_by_fd) {
        return Err("hello: post-copy is protocol 4, and copies the memory".into());
    }
    if hello.memory_by_fd && bind {
        return Err("memory by descriptor is for a migration on one host".into());
    }
    let l = &hello.layout;
    if l.ram_size == 0 || !l.ram_size.is_multiple_of(PAGE_SIZE) || l.window_base < l.ram_size {
        return Err("bad layout".into());
    }
    if let Some(why) = HostProfile::here(kvm)?.refuses(&hello.profile) {
        return Err(why);
    }
    let endpoints = if bind {
        let e = &hello.config.endpoints;
        let publish = if publish.is_empty() { &e.publish } else { publish };
        let bound = crate::host::endpoint::bind(publish, e.vsock_uds.as_deref())
            .map_err(|e| format!("the target cannot listen for the VM: {e}"))?;
        Some(bound)
    } else {
        None
    };
    Ok(Welcome { hello, endpoints })
}

/// Most listening sockets a source may hand over.
const MAX_LISTENERS: u32 = 1024;

/// Takes a source's hello on `channel` and answers it; on one host, then takes the listening
/// sockets handed over. Over TCP the target binds the published ports itself (`publish`, if
/// not empty, instead of the source's).
pub(crate) fn welcome_source(kvm: &Kvm, mut channel: Channel, publish: &[Publish]) -> Result<Welcomed, MigrateError> {
    let s = &mut channel;
    let bad = |w: String| MigrateError::Protocol(w);
    let (kind, payload, _) = read_msg(s, MAX_JSON)?;
    if kind != b'H' {
        return Err(bad("the source did not start with hello".into()));
    }
    let Welcome { hello, endpoints: bound } = match welcome(kvm, &payload, !s.passes_descriptors(), publish) {
        Ok(w) => w,
        Err(why) => {
            let _ = write_msg(s, b'E', &json(&why)).and_then(|()| s.flush());
            return Err(MigrateError::Refused(why));
        }
    };
    write_msg(s, b'A', &[])?;
    s.flush()?;
    let endpoints = match bound {
        Some(bound) => bound,
        None => {
            if hello.listeners > MAX_LISTENERS {
                return Err(bad(format!("{} listening sockets", hello.listeners)));
            }
            let mut handed = Vec::with_capacity(hello.listeners as usize);
            for _ in 0..hello.listeners {
                let (kind, payload, file) = read_msg(s, MAX_JSON)?;
                if kind != b'L' {
                    return Err(bad(format!("'{}' where a listening socket was due", kind as char)));
                }
                let fd = file.ok_or_else(|| bad("a listener without its descriptor".into()))?;
                let meta: WireListener = serde_json::from_slice(&payload).map_err(|e| bad(format!("listener: {e}")))?;
                handed.push(listener_from(fd, meta)?);
            }
            handed
        }
    };
    let vcpus = hello.config.resources.vcpus.burst.clamp(1, u64::from(hypercall_abi::MAX_VCPUS)) as u32;
    let shared = hello.config.resources.memory_backing() == crate::base::config::MemoryBacking::Memfd;
    Ok(Welcomed {
        config: hello.config,
        kernel: hello.kernel,
        endpoints,
        transfer: Transfer {
            channel,
            layout: hello.layout,
            by_fd: hello.memory_by_fd,
            vcpus,
            shared,
            postcopy: hello.postcopy,
        },
    })
}

impl Transfer {
    /// Receives the VM's memory (pages, or memfds) and state.
    pub(crate) fn receive(self, kvm: &Kvm) -> Result<Received, MigrateError> {
        let Transfer { mut channel, layout: l, by_fd, vcpus, shared, postcopy } = self;
        let s = &mut channel;
        let bad = |w: String| MigrateError::Protocol(w);
        let fd = kvm.create_vm().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // The threads the VM will run on are started (and narrowed to their filters) now, not
        // while it is stopped; and so is the one that tells the source when the vCPUs run.
        crate::host::standby::top_up();
        let ending = if postcopy { None } else { Ending::start() };
        // The vCPUs are made now (~0.1 ms each here), not while the VM is stopped; the restore
        // loads their state. One that cannot be made here is made (or refused) there.
        let warm: Vec<Vcpu> = match crate::vmm::vm::supported_cpuid(kvm) {
            Ok(cpuid) => (0..vcpus).map_while(|id| Vcpu::create(&fd, &cpuid, id).ok()).collect(),
            Err(_) => Vec::new(),
        };
        let max_slots = crate::vmm::vm::max_slots(kvm);
        let sizes = (l.ram_size, l.window_base, l.window_size, max_slots);
        // Copied memory fills fresh boot memory; handed-over memory starts with the boot
        // region's descriptor.
        let fresh = Backing::fresh(shared);
        let mut mem = if by_fd { None } else { Some(GuestMemory::boot(&fd, sizes, &fresh, None)?) };
        // serial on the source -> extent here
        let mut extents: BTreeMap<u64, Extent> = BTreeMap::new();
        let mut buf = Vec::new();
        // Post-copy: guest RAM registered at the catch-up, before the VM stops.
        let mut registered: Option<super::postcopy::Registration> = None;
        loop {
            let (kind, len, file) = read_msg_into(s, MAX_JSON, &mut buf)?;
            let payload = &buf[..len];
            match (kind, &mem) {
                (b'F', _) if by_fd => {
                    let r: WireRegion = serde_json::from_slice(payload).map_err(|e| bad(format!("region: {e}")))?;
                    let file = std::fs::File::from(file.ok_or_else(|| bad("a region without its descriptor".into()))?);
                    if !is_sealed_memfd(&file) {
                        return Err(bad("a region's descriptor is not a memfd sealed against shrinking".into()));
                    }
                    match &mem {
                        None if r.serial == 0 && r.gpa == 0 && r.len == l.ram_size => {
                            mem = Some(GuestMemory::boot(&fd, sizes, &Backing::Memfd(&file), None)?);
                        }
                        Some(m) if r.serial != 0 && !extents.contains_key(&r.serial) => {
                            let e = Extent { base: r.gpa, len: r.len };
                            m.restore_extent(&fd, e, &Backing::Memfd(&file))?;
                            extents.insert(r.serial, e);
                        }
                        _ => return Err(bad(format!("region {:#x}+{:#x} out of place", r.gpa, r.len))),
                    }
                }
                (b'R', Some(m)) => {
                    let list: Vec<WireRegion> =
                        serde_json::from_slice(payload).map_err(|e| bad(format!("regions: {e}")))?;
                    sync_extents(&fd, m, &mut extents, &list, !by_fd)?;
                }
                (b'P', Some(m)) if !by_fd => match &mut registered {
                    Some(r) => drop(r.install(payload)?),
                    None => write_pages(m, payload)?,
                },
                (b'Y', Some(m)) if postcopy && registered.is_none() => {
                    match super::postcopy::Registration::new(m, shared) {
                        Ok(r) => registered = Some(r),
                        Err(e) => {
                            // The source is told (its VM runs on).
                            let why = format!("post-copy cannot start here: {e}");
                            let _ = write_msg(s, b'E', &json(&why)).and_then(|()| s.flush());
                            return Err(e.into());
                        }
                    }
                    write_msg(s, b'A', &[])?;
                    s.flush()?;
                }
                (b'Y', _) => {
                    write_msg(s, b'A', &[])?;
                    s.flush()?;
                }
                (b'S', Some(m)) => {
                    let stopped_at = Instant::now();
                    let state = super::decode_state(payload, Path::new("migration state"))?;
                    let here: Vec<(u64, u64)> = m.regions().iter().map(|r| (r.gpa, r.len)).collect();
                    let there: Vec<(u64, u64)> = state.memory.regions.iter().map(|r| (r.gpa, r.len)).collect();
                    if here != there || state.layout != l {
                        return Err(bad("the state's memory regions differ from those received".into()));
                    }
                    if let Some(reg) = registered {
                        // Its pages come on request, after the state: the post-copy thread
                        // takes the channel and the answer goes through it.
                        let mem = m.clone();
                        drop(buf);
                        let told = super::postcopy::start(channel, &mem, reg)?;
                        let answer: ReadyCallback = Box::new(move |result| told(result).map(|()| None));
                        return Ok(Received { fd, mem, state, stopped_at, answer, vcpus: warm });
                    }
                    if postcopy {
                        return Err(bad("a post-copy state before the catch-up".into()));
                    }
                    s.set_read_timeout(None)?;
                    // The receive buffer (4 MiB) is freed once the source was answered:
                    // unmapping it takes ~0.7 ms here, which would be downtime.
                    let buffer = std::mem::take(&mut buf);
                    let answer: ReadyCallback = Box::new(move |result: Result<(), String>| {
                        let run = result.is_ok();
                        wire::tell(&mut channel, &result)?;
                        if !run {
                            return Ok(None);
                        }
                        // When the first vCPU enters the guest (the source's downtime ends
                        // there; on one host both read the same clock), the ending thread says
                        // so and frees the channel and the buffer, off the vCPU's path.
                        let Some(ending) = ending else { return Ok(None) };
                        Ok(Some(ending.hand_over(channel, buffer)))
                    });
                    let mem = m.clone();
                    return Ok(Received { fd, mem, state, stopped_at, answer, vcpus: warm });
                }
                (k, _) => return Err(bad(format!("unexpected message '{}'", k as char))),
            }
        }
    }
}

/// The thread that, once a received VM's first vCPU runs, tells the source when (`G`) and
/// then closes the channel and frees the receive buffer: neither on the vCPU's path (the vCPU
/// thread's filter has no `sendto` for TLS, and unmapping 4 MiB took ~0.7 ms here), nor
/// started while the VM is stopped.
struct Ending(std::sync::mpsc::Sender<EndingStep>);

enum EndingStep {
    /// The channel (the answer was written) and the buffer.
    Channel(Box<Channel>, Vec<u8>),
    /// The first vCPU entered the guest at this CLOCK_MONOTONIC time (ns).
    Started(u64),
}

impl Ending {
    /// Starts the thread; `None` if it cannot be (the source then measures to the answer).
    fn start() -> Option<Ending> {
        let (tx, rx) = std::sync::mpsc::channel::<EndingStep>();
        let run = move || {
            let Ok(EndingStep::Channel(mut channel, buffer)) = rx.recv() else { return };
            if let Ok(EndingStep::Started(ns)) = rx.recv() {
                let _ = write_msg(&mut channel, b'G', &ns.to_le_bytes()).and_then(|()| channel.flush());
            }
            drop(buffer);
        };
        std::thread::Builder::new().name("migrate-end".into()).spawn(run).ok().map(|_| Ending(tx))
    }

    /// Hands the channel and the buffer over; returns what the first vCPU calls as it starts.
    fn hand_over(self, channel: Channel, buffer: Vec<u8>) -> Started {
        let _ = self.0.send(EndingStep::Channel(Box::new(channel), buffer));
        let tx = self.0;
        Box::new(move || {
            let _ = tx.send(EndingStep::Started(crate::host::clock::now_monotonic_ns()));
        })
    }
}

/// Whether `file` is a memfd whose size is sealed (as [`Backing::Shared`] makes them): the
/// source cannot shrink it under this shim's mappings.
fn is_sealed_memfd(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GET_SEALS only reads the descriptor's seals (an error on any other file).
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// Makes the extents here match the source's list: released ones go; new ones are mapped
/// (zeroed: their pages follow) when `map_new`, else their descriptors follow.
fn sync_extents(
    fd: &VmFd,
    mem: &GuestMemory,
    extents: &mut BTreeMap<u64, Extent>,
    list: &[WireRegion],
    map_new: bool,
) -> Result<(), MigrateError> {
    let wanted: BTreeMap<u64, WireRegion> = list.iter().filter(|r| r.serial != 0).map(|r| (r.serial, *r)).collect();
    let gone: Vec<u64> = extents.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
    for serial in gone {
        if let Some(e) = extents.remove(&serial) {
            mem.release(fd, &[e])?;
        }
    }
    for (serial, r) in wanted {
        if let std::collections::btree_map::Entry::Vacant(v) = extents.entry(serial) {
            if !map_new {
                // Its descriptor follows (the state is checked against every region).
                continue;
            }
            let e = Extent { base: r.gpa, len: r.len };
            mem.restore_extent(fd, e, &mem.fresh_backing())?;
            v.insert(e);
        }
    }
    Ok(())
}

/// Writes the runs of a `P` message into guest memory (every run bounds-checked).
fn write_pages(mem: &GuestMemory, payload: &[u8]) -> Result<(), MigrateError> {
    for run in wire::runs(payload) {
        let (gpa, data) = run?;
        mem.write(gpa, data)?;
    }
    Ok(())
}

fn listener_from(fd: OwnedFd, meta: WireListener) -> Result<Bound, MigrateError> {
    Ok(match meta {
        WireListener::Tcp { guest_port } => {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            Bound::Tcp { listener, guest_port }
        }
        WireListener::Uds { path } => {
            let listener = std::os::unix::net::UnixListener::from(fd);
            listener.set_nonblocking(true)?;
            // The source serves it until the switch: its path is this side's to remove only
            // once the VM runs here.
            Bound::Uds { listener, path, owner: false }
        }
    })
}
