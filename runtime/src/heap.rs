//! The kernel heap: two `talc` allocators behind one global allocator.
//!
//! * The **boot heap** covers the free part of boot memory (the policy's `min`, never given
//!   back). Small allocations live here, so long-lived kernel structures never pin granted
//!   memory.
//! * The **elastic heap** is made of extents granted by the host (MEM_GRANT). Its `talc`
//!   source asks the host for a chunk when an allocation cannot be served; each extent is its
//!   own talc heap, so an extent whose allocations are all freed can be handed back whole
//!   (MEM_RELEASE) — never while anything live is in it. Its allocator metadata lives in a
//!   small static arena, not in an extent, so every extent can go.
//!
//! Large allocations (at least [`LARGE`]) go to the elastic heap first when the VM has a
//! hot-plug window, and fall back to the boot heap; small ones go to the boot heap first and
//! fall back to the elastic heap. A failed allocation is remembered so the panic that follows
//! (`handle_alloc_error`) can report what was asked and what is held.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use hypercall_abi::{EXTENT_ALIGN, Extent, MemGrantArgs, MemReleaseArgs, Status};
use talc::TalcLock;
use talc::base::Talc;
use talc::base::binning::Binning;
use talc::source::{Manual, Source};

use crate::{hypercall, time};

/// Allocations of at least this size prefer the elastic heap.
pub const LARGE: usize = 256 * 1024;

/// Most extents the elastic heap tracks at once.
const MAX_EXTENTS: usize = 256;

/// Room talc needs in a heap beyond the allocation itself (tags and alignment).
const HEAP_OVERHEAD: usize = 4096;

/// One extent of the elastic heap.
#[derive(Debug, Clone, Copy)]
struct ExtentRec {
    base: usize,
    len: usize,
    heap_end: NonNull<u8>,
    /// Kernel time since which the extent has had no allocation (0 = in use).
    free_since_ns: u64,
}

/// The elastic heap's memory source: grants extents from the host.
#[derive(Debug)]
pub struct ElasticSource {
    extents: [Option<ExtentRec>; MAX_EXTENTS],
    granted: usize,
    /// Grant size when more memory is needed (at least what the allocation needs).
    chunk: usize,
    /// No asking before this kernel time (after a refusal).
    deny_until_ns: u64,
    backoff_ns: u64,
}

// SAFETY: the raw pointers in `ExtentRec` point into extents this source owns; it is only
// used behind the elastic heap's lock.
unsafe impl Send for ElasticSource {}

impl ElasticSource {
    const fn new() -> Self {
        ElasticSource {
            extents: [None; MAX_EXTENTS],
            granted: 0,
            chunk: 16 << 20,
            deny_until_ns: 0,
            backoff_ns: 50_000_000,
        }
    }
}

// SAFETY: `acquire` only uses the `talc` it is given and makes hypercalls with stack-allocated
// blocks; it never touches the global allocator.
unsafe impl Source for ElasticSource {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        let need = layout.size().saturating_add(layout.align()).saturating_add(HEAP_OVERHEAD);
        grow(talc, need).map(|_| ()).map_err(|_| ())
    }
}

/// Asks the host for at least `need` bytes (rounded up to the chunk size) and claims the
/// extents as new heaps. Returns the bytes added.
fn grow<B: Binning>(talc: &mut Talc<ElasticSource, B>, need: usize) -> Result<usize, Status> {
    if WINDOW_SIZE.load(Ordering::Relaxed) == 0 {
        return Err(Status::UNSUPPORTED);
    }
    let now = time::now_ns();
    if now < talc.source.deny_until_ns {
        return Err(Status::DENIED);
    }
    let bytes = (need.div_ceil(EXTENT_ALIGN as usize) * EXTENT_ALIGN as usize).max(talc.source.chunk);
    let mut got = [Extent::default(); 8];
    let mut args = MemGrantArgs::new(bytes as u64, got.as_mut_ptr() as u64, got.len() as u32);
    let status = hypercall::call(&mut args);
    LAST_WAS_AGAIN.store(status == Status::AGAIN, Ordering::Relaxed);
    if !status.is_ok() {
        // AGAIN: the pool is reclaiming capacity for this VM; ask again soon.
        let wait = if status == Status::AGAIN { AGAIN_RETRY_NS } else { talc.source.backoff_ns };
        talc.source.deny_until_ns = now + wait;
        LAST_REFUSAL.store(((bytes as u64) << 8) | (status.0 as u8 as u64), Ordering::Relaxed);
        return Err(status);
    }
    let mut added = 0;
    for e in &got[..(args.count as usize).min(got.len())] {
        let Some(slot) = talc.source.extents.iter().position(|s| s.is_none()) else {
            // No room to track it: give it straight back rather than leak it.
            let _ = release_to_host(&[*e]);
            continue;
        };
        // SAFETY: the host just granted `[base, base + len)`: guest RAM in the identity-mapped
        // window that nothing else uses; from now on only this allocator manages it.
        let end = unsafe { talc.claim(e.base as *mut u8, e.len as usize) };
        match end {
            Some(heap_end) => {
                talc.source.extents[slot] =
                    Some(ExtentRec { base: e.base as usize, len: e.len as usize, heap_end, free_since_ns: 0 });
                added += e.len as usize;
            }
            None => {
                let _ = release_to_host(&[*e]);
            }
        }
    }
    talc.source.granted += added;
    GRANTED.store(talc.source.granted, Ordering::Release);
    GRANTS.fetch_add(1, Ordering::Relaxed);
    Ok(added)
}

/// MEM_RELEASE of `extents` (at most 64).
fn release_to_host(extents: &[Extent]) -> Status {
    let mut args = MemReleaseArgs::new(extents.as_ptr() as u64, extents.len() as u32);
    let status = hypercall::call(&mut args);
    if status.is_ok() {
        RELEASES.fetch_add(1, Ordering::Relaxed);
    }
    status
}

/// Size of the elastic heap's metadata arena (talc needs its first heap to hold its bins).
const META_ARENA: usize = 16 * 1024;
const _: () = assert!(META_ARENA >= talc::min_first_heap_size::<talc::DefaultBinning>() + 64);

static BOOT: TalcLock<crate::sync::Mutex<()>, Manual> = TalcLock::new(Manual);
static ELASTIC: TalcLock<crate::sync::Mutex<()>, ElasticSource> = TalcLock::new(ElasticSource::new());
static WINDOW_BASE: AtomicUsize = AtomicUsize::new(0);
/// Start of the elastic heap's metadata arena (0 before `init`).
static META_BASE: AtomicUsize = AtomicUsize::new(0);
static WINDOW_SIZE: AtomicUsize = AtomicUsize::new(0);
static GRANTED: AtomicUsize = AtomicUsize::new(0);
static RAW_GRANTED: AtomicUsize = AtomicUsize::new(0);
static BOOT_RAM: AtomicUsize = AtomicUsize::new(0);
static GRANTS: AtomicU64 = AtomicU64::new(0);
static RELEASES: AtomicU64 = AtomicU64::new(0);
/// The last refused grant: `(bytes << 8) | (status as u8)`.
static LAST_REFUSAL: AtomicU64 = AtomicU64::new(0);
/// Size of the last allocation that could not be served (0 = none).
static LAST_FAILED_SIZE: AtomicUsize = AtomicUsize::new(0);
static INITIALISED: AtomicBool = AtomicBool::new(false);
/// Whether the latest grant attempt was answered AGAIN.
static LAST_WAS_AGAIN: AtomicBool = AtomicBool::new(false);

/// After an AGAIN the heap asks again after this long.
const AGAIN_RETRY_NS: u64 = 1_000_000;
/// An allocation that meets AGAIN waits (in BLOCKs of this length)...
const AGAIN_WAIT_NS: u64 = 2_000_000;
/// ...at most this many times (about a second: several reclaim grace periods).
const AGAIN_WAITS: u32 = 500;

/// The global allocator: routes between the boot and the elastic heap.
#[derive(Debug)]
pub struct KernelAllocator;

/// Whether `ptr` belongs to the elastic heap: an extent in the hot-plug window, or the small
/// metadata arena that heap starts with (its leftover space serves small allocations too, so
/// a block from there must go back to the elastic heap, never to the boot heap).
fn in_elastic(ptr: *mut u8) -> bool {
    let a = ptr as usize;
    let base = WINDOW_BASE.load(Ordering::Relaxed);
    let meta = META_BASE.load(Ordering::Relaxed);
    (a >= base && a - base < WINDOW_SIZE.load(Ordering::Relaxed)) || (meta != 0 && a >= meta && a - meta < META_ARENA)
}

// SAFETY: every block is allocated from and returned to exactly one of the two talc heaps,
// told apart by address (elastic extents all lie in the hot-plug window, the boot heap never
// does); talc itself upholds the GlobalAlloc contract.
unsafe impl GlobalAlloc for KernelAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let large = layout.size() >= LARGE && WINDOW_SIZE.load(Ordering::Relaxed) != 0;
        let mut waits = 0;
        loop {
            // SAFETY: forwarding the caller's valid, non-zero-sized layout.
            let p = unsafe {
                if large {
                    let p = ELASTIC.alloc(layout);
                    if p.is_null() { BOOT.alloc(layout) } else { p }
                } else {
                    let p = BOOT.alloc(layout);
                    if p.is_null() && WINDOW_SIZE.load(Ordering::Relaxed) != 0 { ELASTIC.alloc(layout) } else { p }
                }
            };
            if !p.is_null() {
                return p;
            }
            // The pool answered AGAIN: capacity is being reclaimed for this VM. Wait for it
            // (no allocator lock is held here) rather than fail.
            if LAST_WAS_AGAIN.load(Ordering::Relaxed) && waits < AGAIN_WAITS {
                waits += 1;
                let _ = hypercall::block(AGAIN_WAIT_NS);
                continue;
            }
            LAST_FAILED_SIZE.store(layout.size().max(1), Ordering::Relaxed);
            return p;
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with `layout`; the address says which heap.
        unsafe { if in_elastic(ptr) { ELASTIC.dealloc(ptr, layout) } else { BOOT.dealloc(ptr, layout) } }
    }
}

#[cfg(target_os = "none")]
#[global_allocator]
static ALLOCATOR: KernelAllocator = KernelAllocator;

/// Sets up both heaps: the boot heap over `[base, base + size)`, the elastic heap's metadata,
/// and the hot-plug window the elastic heap will grow into. Returns `false` if the boot heap
/// cannot be established.
pub fn init(base: u64, size: u64, boot_ram: u64, window_base: u64, window_size: u64) -> bool {
    #[cfg(target_os = "none")]
    {
        static mut META: [u8; META_ARENA] = [0; META_ARENA];
        // SAFETY: boot info reports `[base, base + size)` as free RAM above the kernel image,
        // used by nothing else; `META` is a private static handed over once (guarded by
        // INITIALISED). From here on only the allocators manage them.
        unsafe {
            if INITIALISED.swap(true, Ordering::AcqRel) {
                return true;
            }
            if BOOT.lock().claim(base as *mut u8, size as usize).is_none() {
                return false;
            }
            let meta = core::ptr::addr_of_mut!(META).cast::<u8>();
            META_BASE.store(meta as usize, Ordering::Relaxed);
            let _ = ELASTIC.lock().claim(meta, META_ARENA);
        }
    }
    #[cfg(not(target_os = "none"))]
    let _ = (base, size, &INITIALISED);
    BOOT_RAM.store(boot_ram as usize, Ordering::Relaxed);
    WINDOW_BASE.store(window_base as usize, Ordering::Relaxed);
    WINDOW_SIZE.store(window_size as usize, Ordering::Relaxed);
    true
}

/// Sets the elastic heap's grant chunk and refusal back-off.
pub fn configure(chunk: usize, backoff_ns: u64) {
    let mut t = ELASTIC.lock();
    t.source.chunk = chunk.max(EXTENT_ALIGN as usize);
    t.source.backoff_ns = backoff_ns;
}

/// Heap figures for banners, reports and the controller.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeapStats {
    /// Bytes handed to the allocators (boot heap + elastic heap).
    pub claimed: usize,
    /// Bytes free for allocation in both heaps.
    pub available: usize,
}

/// Current heap figures.
pub fn stats() -> HeapStats {
    let (boot_claimed, boot_avail) = {
        let b = BOOT.lock();
        (b.counters().claimed_bytes, b.counters().available_bytes)
    };
    let e = ELASTIC.lock();
    let c = e.counters();
    HeapStats { claimed: boot_claimed + c.claimed_bytes, available: boot_avail + c.available_bytes }
}

/// Memory the kernel holds: boot memory plus every granted extent.
pub fn held() -> u64 {
    (BOOT_RAM.load(Ordering::Relaxed) + GRANTED.load(Ordering::Acquire) + RAW_GRANTED.load(Ordering::Acquire)) as u64
}

/// Bytes of granted extents in the elastic heap (raw grants not included).
pub fn elastic_granted() -> u64 {
    GRANTED.load(Ordering::Acquire) as u64
}

/// Boot memory size.
pub fn boot_ram() -> u64 {
    BOOT_RAM.load(Ordering::Relaxed) as u64
}

/// Size of the hot-plug window (0: the VM cannot grow).
pub fn window_size() -> u64 {
    WINDOW_SIZE.load(Ordering::Relaxed) as u64
}

/// Successful grants and releases so far (heap and raw).
pub fn counters() -> (u64, u64) {
    (GRANTS.load(Ordering::Relaxed), RELEASES.load(Ordering::Relaxed))
}

/// Grows the elastic heap by at least `bytes` now (the controller's low-watermark growth).
pub fn grow_now(bytes: usize) -> Result<usize, Status> {
    let mut t = ELASTIC.lock();
    grow(&mut t, bytes)
}

/// Hands back wholly free extents: each must have been free for `min_free_ns`, and only while
/// `keep(free_after_release_bytes, held_after_release_bytes)` allows. Returns bytes released.
pub fn release_free_extents(min_free_ns: u64, keep: &dyn Fn(usize, u64) -> bool) -> usize {
    let now = time::now_ns();
    let mut batch = [Extent::default(); 16];
    let mut n = 0;
    {
        let mut t = ELASTIC.lock();
        let mut free = t.counters().available_bytes + BOOT.lock().counters().available_bytes;
        let mut held_now = held();
        for i in 0..MAX_EXTENTS {
            let Some(mut rec) = t.source.extents[i] else { continue };
            // SAFETY: `heap_end` is the up-to-date end of this extent's heap (extents are only
            // claimed, never extended or partly truncated).
            let in_use = unsafe { t.reserved(rec.heap_end) }.any;
            if in_use {
                rec.free_since_ns = 0;
            } else if rec.free_since_ns == 0 {
                rec.free_since_ns = now;
            }
            t.source.extents[i] = Some(rec);
            let long_enough = rec.free_since_ns != 0 && now - rec.free_since_ns >= min_free_ns;
            if in_use
                || !long_enough
                || n == batch.len()
                || !keep(free.saturating_sub(rec.len), held_now - rec.len as u64)
            {
                continue;
            }
            // SAFETY: as above; the heap holds no allocation, so truncating to null deletes it.
            let left = unsafe { t.truncate(rec.heap_end, core::ptr::null_mut()) };
            if left.is_some() {
                continue; // talc kept part of it: not wholly free after all; leave it
            }
            t.source.extents[i] = None;
            t.source.granted -= rec.len;
            free = free.saturating_sub(rec.len);
            held_now -= rec.len as u64;
            batch[n] = Extent { base: rec.base as u64, len: rec.len as u64 };
            n += 1;
        }
        GRANTED.store(t.source.granted, Ordering::Release);
    }
    if n == 0 {
        return 0;
    }
    // Outside the lock: the extents are no longer in any heap, so nothing can be allocated
    // in them while the host takes them back.
    let status = release_to_host(&batch[..n]);
    if !status.is_ok() {
        log::error!("the host refused to take back {n} free extent(s): {}", status.name());
    }
    batch[..n].iter().map(|e| e.len as usize).sum()
}

/// A grant outside the heap, for services that manage memory themselves.
pub fn grant_raw(bytes: u64, out: &mut [Extent]) -> Result<usize, Status> {
    let mut args = MemGrantArgs::new(bytes, out.as_mut_ptr() as u64, out.len().min(64) as u32);
    let status = hypercall::call(&mut args);
    if !status.is_ok() {
        return Err(status);
    }
    RAW_GRANTED.fetch_add(args.granted as usize, Ordering::AcqRel);
    GRANTS.fetch_add(1, Ordering::Relaxed);
    Ok(args.count as usize)
}

/// Releases extents obtained with [`grant_raw`].
pub fn release_raw(extents: &[Extent]) -> Status {
    let status = release_to_host(extents);
    if status.is_ok() {
        let bytes: u64 = extents.iter().map(|e| e.len).sum();
        RAW_GRANTED.fetch_sub(bytes as usize, Ordering::AcqRel);
    }
    status
}

/// What the kernel knows when an allocation could not be served.
#[derive(Debug, Clone, Copy)]
pub struct OutOfMemory {
    /// Bytes the failed allocation asked for.
    pub asked: usize,
    /// Memory held (boot + granted).
    pub held: u64,
    /// The last grant the host refused: bytes asked and its answer.
    pub refusal: Option<(u64, Status)>,
}

/// The pending out-of-memory report, if the last allocation failed.
pub fn out_of_memory() -> Option<OutOfMemory> {
    let asked = LAST_FAILED_SIZE.load(Ordering::Relaxed);
    if asked == 0 {
        return None;
    }
    let r = LAST_REFUSAL.load(Ordering::Relaxed);
    let refusal = (r != 0).then(|| (r >> 8, Status(i32::from(r as u8 as i8))));
    Some(OutOfMemory { asked, held: held(), refusal })
}
