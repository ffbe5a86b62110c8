//! Post-copy migration (`ctl migrate --postcopy`): the VM stops at the source, only its state
//! and region list move, and it runs on the target at once; its memory follows on demand.
//!
//! The target registers every region of guest RAM with a `userfaultfd` (missing pages) before
//! the VM runs there. One thread ([`start`]) then owns the channel:
//!
//! * a page the VM (or the shim) touches before it arrived faults; the thread reads the fault,
//!   asks the source for the page (`Q`, a list of page addresses) and copies the reply in
//!   (`UFFDIO_COPY`, which wakes the faulting thread);
//! * once the source was told the VM runs here, the thread also walks all of RAM in order,
//!   [`BACKGROUND_PAGES`] at a time (`B`, a range; [`IN_FLIGHT`] requests at once): the source
//!   answers with the range's non-zero pages, and the rest of the range is known to be zero;
//! * when the walk is done, the regions are unregistered (pages still missing are zero pages
//!   the kernel fills as usual, and any thread waiting on one is woken) and the source is told
//!   (`D`, with [`PostcopyFigures`]); it then ends its VM.
//!
//! Every reply is a `P` message of page runs; replies come in the order of the requests. A
//! page is copied in at most once: a page the guest has since written is never overwritten.
//!
//! The source ([`serve_until_answer`], [`serve_rest`]) keeps its VM paused and answers the
//! requests from its memory. **A lost source during post-copy ends the VM**: the target holds
//! only part of its memory and cannot go on, so it exits with [`crate::base::exit::POSTCOPY_LOST`];
//! the source keeps its (older) copy stopped and says so.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::channel::Channel;
use super::wire::{self, WireError, json, push_run, read_msg, read_msg_into, refusal, tell, write_msg};
use crate::base::memory::{GuestMemory, PAGE_SIZE};
use crate::host::uffd::{Copied, Uffd, UffdError};

/// Pages one background request asks for (512 KiB: a fault waits for at most
/// [`IN_FLIGHT`] of these ahead of its own request).
pub(crate) const BACKGROUND_PAGES: u32 = 128;
/// Background requests in flight at once.
pub(crate) const IN_FLIGHT: usize = 2;
/// How long the target waits for a reply before it gives its source up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most pages one `Q` request lists.
const MAX_ASK: usize = 4096;
/// Largest request or figures message.
const MAX_REQUEST: u64 = 1 << 20;
/// Largest reply: a range of non-zero pages with its header, or [`MAX_ASK`] single pages.
const MAX_REPLY: u64 = MAX_ASK as u64 * (PAGE_SIZE + 12);

/// Post-copy failures.
#[derive(Debug, Error)]
pub enum PostcopyError {
    /// The channel failed or the peer sent something malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The target refused the VM.
    #[error("the target refused the VM: {0}")]
    Refused(String),
    /// The peer broke the protocol.
    #[error("post-copy protocol: {0}")]
    Protocol(String),
    /// The userfaultfd could not be set up or used.
    #[error("userfaultfd: {0}")]
    Uffd(#[from] UffdError),
}

impl From<std::io::Error> for PostcopyError {
    fn from(e: std::io::Error) -> Self {
        PostcopyError::Wire(WireError::Io(e))
    }
}

/// What a post-copy did, as the target counted it (the source's `ctl migrate` answer).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PostcopyFigures {
    /// Pages the VM or the shim touched before they arrived, fetched on demand.
    pub(crate) demand_pages: u64,
    /// Longest wait of one such fault, from its request to its page copied in (µs).
    pub(crate) fault_wait_max_us: u64,
    /// Their mean wait (µs).
    pub(crate) fault_wait_mean_us: u64,
    /// Pages copied in, on demand and in the background (zero pages are not copied).
    pub(crate) pages_copied: u64,
    /// From the answer (the VM runs at the target) to the last page (µs).
    pub(crate) tail_us: u64,
}

/// Tells the source whether the VM was built here; returns whether the source was told.
pub(crate) type Answer = Box<dyn FnOnce(Result<(), String>) -> Result<(), String> + Send>;

/// A page's state at the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    /// Not here yet, not asked for.
    Missing,
    /// Asked for on demand; its reply is on the way.
    Asked,
    /// Zero at the source: a fault on it is answered here.
    Zero,
    /// Copied in (or its region is gone).
    Here,
}

/// A region of guest RAM registered at the switch.
struct Region {
    gpa: u64,
    /// This side's serial of the region (a grant's, 0 for boot memory): a region released
    /// and granted again at the same address is another region.
    serial: u64,
    host: usize,
    pages: Vec<Page>,
    /// Released since (its mapping is gone): nothing more to copy into it.
    gone: bool,
}

impl Region {
    fn len(&self) -> u64 {
        self.pages.len() as u64 * PAGE_SIZE
    }
}

/// An outstanding request, in the order its reply comes.
enum Pending {
    Demand,
    Background { gpa: u64, pages: u32 },
}

/// What the target's answer callback hands the post-copy thread: the result, and where to
/// say whether the source was told.
type Told = (Result<(), String>, Sender<Result<(), String>>);

/// Guest RAM registered with a userfaultfd (missing pages), ahead of the state: the target
/// makes it at the catch-up before the VM stops, while the regions are known.
pub(crate) struct Registration {
    uffd: Uffd,
    regions: Vec<Region>,
}

impl Registration {
    /// Registers every region of `mem` (memfds mapped shared when `shared`).
    pub(crate) fn new(mem: &GuestMemory, shared: bool) -> Result<Registration, PostcopyError> {
        let uffd = Uffd::new(shared)?;
        let mut r = Registration { uffd, regions: Vec::new() };
        r.sync(mem)?;
        Ok(r)
    }

    /// Follows `mem`'s regions: registers those mapped since, forgets those released.
    pub(crate) fn sync(&mut self, mem: &GuestMemory) -> Result<(), PostcopyError> {
        let guard = mem.snapshot();
        let mut now = Vec::new();
        for r in mem.regions() {
            let bytes = mem
                .host_range(&guard, r.gpa, r.len)
                .ok_or_else(|| PostcopyError::Protocol(format!("region {:#x}+{:#x} is not mapped", r.gpa, r.len)))?;
            now.push((r.serial, r.gpa, bytes.as_ptr() as usize, bytes.len()));
        }
        for region in &mut self.regions {
            if !now.iter().any(|&(serial, gpa, ..)| (serial, gpa) == (region.serial, region.gpa)) {
                region.gone = true;
            }
        }
        for (serial, gpa, host, len) in now {
            if self.regions.iter().any(|r| !r.gone && (r.serial, r.gpa) == (serial, gpa)) {
                continue;
            }
            self.uffd.register(host, len)?;
            let pages = vec![Page::Missing; len / PAGE_SIZE as usize];
            self.regions.push(Region { gpa, serial, host, pages, gone: false });
        }
        Ok(())
    }

    /// Copies in the runs of a `P` message (pages already here are left as they are); returns
    /// the pages copied.
    pub(crate) fn install(&mut self, payload: &[u8]) -> Result<Vec<u64>, PostcopyError> {
        let mut copied = Vec::new();
        for run in wire::runs(payload) {
            let (gpa, data) = run?;
            for (k, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
                let at = gpa + k as u64 * PAGE_SIZE;
                let Some((r, p)) = self.page_of(at) else {
                    return Err(PostcopyError::Protocol(format!("a page at {at:#x}, outside guest RAM")));
                };
                if self.copy_in(r, p, page)? {
                    copied.push(at);
                }
            }
        }
        Ok(copied)
    }

    /// Copies one page in, unless it is here already, and wakes its waiters; returns whether
    /// it copied.
    fn copy_in(&mut self, r: usize, p: usize, data: &[u8]) -> Result<bool, PostcopyError> {
        let region = &mut self.regions[r];
        if region.gone || region.pages[p] == Page::Here {
            return Ok(false);
        }
        let dst = region.host + p * PAGE_SIZE as usize;
        let copied = match self.uffd.copy_page(data, dst)? {
            Copied::Done => true,
            // Written before its region was registered.
            Copied::AlreadyThere => false,
            // Released since: the region's mapping is gone.
            Copied::Unmapped => {
                region.gone = true;
                return Ok(false);
            }
        };
        region.pages[p] = Page::Here;
        Ok(copied)
    }

    /// The region and page index of guest-physical `gpa`.
    fn page_of(&self, gpa: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (!r.gone && gpa >= r.gpa && gpa - r.gpa < r.len()).then(|| (i, ((gpa - r.gpa) / PAGE_SIZE) as usize))
        })
    }

    /// The region and page index of host address `addr`.
    fn locate(&self, addr: usize) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (!r.gone && addr >= r.host && ((addr - r.host) as u64) < r.len())
                .then(|| (i, (addr - r.host) / PAGE_SIZE as usize))
        })
    }
}

/// The target's side, once the state arrived: follows `mem`'s regions in `reg` and starts the
/// thread that fetches the pages over `channel`. The answer it returns goes to the source
/// through that thread (which serves faults before it, too: the restore may touch memory).
pub(crate) fn start(channel: Channel, mem: &GuestMemory, mut reg: Registration) -> Result<Answer, PostcopyError> {
    reg.sync(mem)?;
    let arriving = mem.arriving_flag();
    arriving.store(true, Ordering::Release);
    channel.set_read_timeout(Some(REPLY_TIMEOUT))?;
    // A source that stops reading cannot hold the VM here forever either.
    channel.set_write_timeout(Some(REPLY_TIMEOUT))?;
    let wake = EventFd::new(EFD_NONBLOCK)?;
    let waker = Waker(wake.try_clone()?);
    let (tx, rx) = mpsc::channel::<Told>();
    let puller = Puller { reg, channel, figures: PostcopyFigures::default(), waits: BTreeMap::new(), arriving };
    std::thread::Builder::new().name("postcopy".into()).spawn(move || puller.run(&rx, &wake))?;
    Ok(Box::new(move |result: Result<(), String>| {
        let (told_tx, told_rx) = mpsc::channel();
        tx.send((result, told_tx))
            .map_err(|_| "the post-copy thread has ended: the source was not told".to_string())?;
        drop(waker);
        told_rx.recv().unwrap_or_else(|_| Err("the post-copy thread has ended: the source was not told".into()))
    }))
}

/// Wakes the post-copy thread when dropped: the answer was given, or never will be.
struct Waker(EventFd);

impl Drop for Waker {
    fn drop(&mut self) {
        let _ = self.0.write(1);
    }
}

/// Why the post-copy thread ended early.
enum Ended {
    /// The VM does not run here (refused, or the source could not be told).
    NotRun,
    /// The source (or the way to it) is gone while the VM runs here.
    Lost(String),
}

struct Puller {
    reg: Registration,
    channel: Channel,
    figures: PostcopyFigures,
    /// Pages asked for on demand: when.
    waits: BTreeMap<u64, Instant>,
    /// Set while pages are still to come ([`GuestMemory::arriving`]).
    arriving: Arc<AtomicBool>,
}

/// A zero page to copy in where the source holds zeroes.
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

impl Puller {
    fn run(mut self, answers: &Receiver<Told>, wake: &EventFd) {
        let ended = self.pull(answers, wake);
        self.arriving.store(false, Ordering::Release);
        match ended {
            Ok(()) | Err(Ended::NotRun) => {}
            Err(Ended::Lost(why)) => {
                eprintln!(
                    "hypervisor-shim: post-copy: {why}: part of the VM's memory is still at its source and can no \
                     longer come; the VM cannot go on and ends here (exit code {})",
                    crate::base::exit::POSTCOPY_LOST
                );
                std::process::exit(i32::from(crate::base::exit::POSTCOPY_LOST));
            }
        }
    }

    fn pull(&mut self, answers: &Receiver<Told>, wake: &EventFd) -> Result<(), Ended> {
        let lost = |e: PostcopyError| Ended::Lost(e.to_string());
        let mut answered: Option<Instant> = None;
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut cursor = (0usize, 0usize);
        // Every range was asked for.
        let mut walked = false;
        let mut buf = Vec::new();
        loop {
            let given = if answered.is_none() { Some(answers.try_recv()) } else { None };
            if let Some(Err(mpsc::TryRecvError::Disconnected)) = given {
                // The run gave up before it answered: the VM does not run here.
                return Err(Ended::NotRun);
            }
            if let Some(Ok((result, told))) = given {
                let _ = wake.read();
                let run = result.is_ok();
                let said = tell(&mut self.channel, &result);
                let ok = said.is_ok();
                let _ = told.send(said);
                if !run || !ok {
                    return Err(Ended::NotRun);
                }
                answered = Some(Instant::now());
            }
            let ask = self.faults().map_err(lost)?;
            if !ask.is_empty() {
                for part in ask.chunks(MAX_ASK) {
                    let list: Vec<u8> = part.iter().flat_map(|g| g.to_le_bytes()).collect();
                    write_msg(&mut self.channel, b'Q', &list).map_err(|e| lost(e.into()))?;
                    pending.push_back(Pending::Demand);
                }
                self.channel.flush().map_err(|e| lost(e.into()))?;
            } else if answered.is_some()
                && !walked
                && pending.len() < IN_FLIGHT
                && let Some((gpa, pages)) = self.next_background(&mut cursor).or_else(|| {
                    walked = true;
                    None
                })
            {
                let mut req = gpa.to_le_bytes().to_vec();
                req.extend_from_slice(&pages.to_le_bytes());
                write_msg(&mut self.channel, b'B', &req)
                    .and_then(|()| self.channel.flush())
                    .map_err(|e| lost(e.into()))?;
                pending.push_back(Pending::Background { gpa, pages });
                if pending.len() < IN_FLIGHT {
                    continue;
                }
            }
            if let Some(p) = pending.pop_front() {
                let (kind, len, _) =
                    read_msg_into(&mut self.channel, MAX_REPLY, &mut buf).map_err(|e| lost(e.into()))?;
                if kind != b'P' {
                    return Err(Ended::Lost(format!("'{}' where pages were due", kind as char)));
                }
                self.take(&buf[..len]).map_err(lost)?;
                if let Pending::Background { gpa, pages } = p {
                    self.zero_rest(gpa, pages);
                }
            } else if let Some(at) = answered
                && walked
            {
                self.finish(at);
                return Ok(());
            } else if answered.is_none() {
                // Nothing asked, not yet answered: wait for a fault or the answer.
                let mut fds = [
                    libc::pollfd { fd: self.reg.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                ];
                // SAFETY: `fds` is a valid array of two pollfds for the call's duration.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            }
        }
    }

    /// Reads the faults waiting: answers those on zero pages (or pages already here) at once,
    /// and returns the guest-physical pages to ask the source for.
    fn faults(&mut self) -> Result<Vec<u64>, PostcopyError> {
        let mut ask = Vec::new();
        loop {
            let addrs = self.reg.uffd.faults(64)?;
            if addrs.is_empty() {
                return Ok(ask);
            }
            for addr in addrs {
                let Some((r, p)) = self.reg.locate(addr) else {
                    // Not a page of the regions registered here: nothing to copy in.
                    let _ = self.reg.uffd.wake(addr, PAGE_SIZE as usize);
                    continue;
                };
                match self.reg.regions[r].pages[p] {
                    Page::Missing => {
                        let gpa = self.reg.regions[r].gpa + p as u64 * PAGE_SIZE;
                        self.reg.regions[r].pages[p] = Page::Asked;
                        self.waits.insert(gpa, Instant::now());
                        ask.push(gpa);
                    }
                    Page::Asked => {}
                    Page::Zero => {
                        self.reg.copy_in(r, p, &ZERO_PAGE)?;
                    }
                    // Copied in meanwhile; the waiting thread may have missed the wake.
                    Page::Here => {
                        let _ = self.reg.uffd.wake(addr, PAGE_SIZE as usize);
                    }
                }
            }
        }
    }

    /// Copies in a reply's pages, and counts them (and the faults they end).
    fn take(&mut self, payload: &[u8]) -> Result<(), PostcopyError> {
        let copied = self.reg.install(payload)?;
        let f = &mut self.figures;
        f.pages_copied += copied.len() as u64;
        for gpa in copied {
            if let Some(at) = self.waits.remove(&gpa) {
                let us = at.elapsed().as_micros() as u64;
                f.demand_pages += 1;
                f.fault_wait_max_us = f.fault_wait_max_us.max(us);
                f.fault_wait_mean_us += us;
            }
        }
        Ok(())
    }

    /// After a background reply: the pages of its range that did not come are zero there.
    fn zero_rest(&mut self, gpa: u64, pages: u32) {
        let Some((r, p)) = self.reg.page_of(gpa) else { return };
        let region = &mut self.reg.regions[r];
        let end = (p + pages as usize).min(region.pages.len());
        for page in &mut region.pages[p..end] {
            if *page == Page::Missing {
                *page = Page::Zero;
            }
        }
    }

    /// The next range of missing pages to ask for in the background, moving `cursor`.
    fn next_background(&self, cursor: &mut (usize, usize)) -> Option<(u64, u32)> {
        while let Some(region) = self.reg.regions.get(cursor.0) {
            if region.gone {
                *cursor = (cursor.0 + 1, 0);
                continue;
            }
            let start = cursor.1;
            if start >= region.pages.len() {
                *cursor = (cursor.0 + 1, 0);
                continue;
            }
            let end = (start + BACKGROUND_PAGES as usize).min(region.pages.len());
            cursor.1 = end;
            if region.pages[start..end].contains(&Page::Missing) {
                return Some((region.gpa + start as u64 * PAGE_SIZE, (end - start) as u32));
            }
        }
        None
    }

    /// Every page is here or known zero: unregisters the regions (the kernel fills the zero
    /// pages as usual from now on, and wakes any thread waiting on one) and tells the source.
    /// The VM is whole here from then on: a source that cannot be told is only said.
    fn finish(&mut self, answered: Instant) {
        for r in self.reg.regions.iter().filter(|r| !r.gone) {
            let _ = self.reg.uffd.unregister(r.host, r.len() as usize);
        }
        self.arriving.store(false, Ordering::Release);
        let f = &mut self.figures;
        f.fault_wait_mean_us = f.fault_wait_mean_us.checked_div(f.demand_pages).unwrap_or(0);
        f.tail_us = answered.elapsed().as_micros() as u64;
        let told = write_msg(&mut self.channel, b'D', &json(&self.figures)).and_then(|()| self.channel.flush());
        if let Err(e) = told {
            eprintln!(
                "hypervisor-shim: post-copy: every page is here, but the source was not told ({e}): it keeps its \
                 older copy stopped; do not resume it there"
            );
        }
    }
}

/// The source's side, after it sent the state: serves page requests until the target answers
/// (`A`: the VM runs there; `E`: it refused, and the VM may resume here).
pub(crate) fn serve_until_answer(s: &mut Channel, mem: &GuestMemory) -> Result<(), PostcopyError> {
    serve(s, mem, true).map(|_| ())
}

/// The source's side, once the VM runs at the target: serves page requests until the target
/// has every page (`D`), and returns its figures.
pub(crate) fn serve_rest(s: &mut Channel, mem: &GuestMemory) -> Result<PostcopyFigures, PostcopyError> {
    serve(s, mem, false)?.ok_or_else(|| PostcopyError::Protocol("no figures".into()))
}

fn serve(s: &mut Channel, mem: &GuestMemory, until_answer: bool) -> Result<Option<PostcopyFigures>, PostcopyError> {
    let bad = |w: String| PostcopyError::Protocol(w);
    loop {
        let (kind, payload, _) = read_msg(s, MAX_REQUEST)?;
        match kind {
            b'A' if until_answer => return Ok(None),
            b'E' if until_answer => return Err(PostcopyError::Refused(refusal(&payload))),
            b'D' if !until_answer => {
                let f: PostcopyFigures = serde_json::from_slice(&payload).map_err(|e| bad(format!("figures: {e}")))?;
                return Ok(Some(f));
            }
            b'Q' => {
                if !payload.len().is_multiple_of(8) || payload.len() / 8 > MAX_ASK {
                    return Err(bad(format!("a request of {} bytes", payload.len())));
                }
                let pages: Vec<u64> =
                    payload.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
                let reply = pages_at(mem, &pages)?;
                write_msg(s, b'P', &reply)?;
                s.flush()?;
            }
            b'B' => {
                if payload.len() != 12 {
                    return Err(bad(format!("a range request of {} bytes", payload.len())));
                }
                let gpa = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
                let n = u32::from_le_bytes(payload[8..].try_into().unwrap_or([0; 4]));
                let reply = non_zero_pages(mem, gpa, n)?;
                write_msg(s, b'P', &reply)?;
                s.flush()?;
            }
            k => return Err(bad(format!("unexpected message '{}'", k as char))),
        }
    }
}

/// A reply with the pages at `pages` (each a page-aligned address of guest RAM), consecutive
/// ones in one run.
fn pages_at(mem: &GuestMemory, pages: &[u64]) -> Result<Vec<u8>, PostcopyError> {
    let guard = mem.snapshot();
    let mut out = Vec::with_capacity(pages.len() * (PAGE_SIZE as usize + 12));
    let mut i = 0;
    while i < pages.len() {
        let start = pages[i];
        let mut n = 1;
        while i + n < pages.len() && start.checked_add(n as u64 * PAGE_SIZE) == Some(pages[i + n]) {
            n += 1;
        }
        let bytes = (start.is_multiple_of(PAGE_SIZE))
            .then(|| mem.host_range(&guard, start, n as u64 * PAGE_SIZE))
            .flatten()
            .ok_or_else(|| PostcopyError::Protocol(format!("a request for {start:#x}+{n} pages, not in guest RAM")))?;
        push_run(&mut out, start, bytes);
        i += n;
    }
    Ok(out)
}

/// A reply with the non-zero pages of `[gpa, gpa + pages × 4 KiB)` (inside one region).
fn non_zero_pages(mem: &GuestMemory, gpa: u64, pages: u32) -> Result<Vec<u8>, PostcopyError> {
    let guard = mem.snapshot();
    let len = u64::from(pages.min(MAX_ASK as u32)) * PAGE_SIZE;
    let bytes = (gpa.is_multiple_of(PAGE_SIZE))
        .then(|| mem.host_range(&guard, gpa, len))
        .flatten()
        .ok_or_else(|| PostcopyError::Protocol(format!("a request for {gpa:#x}+{pages} pages, not in one region")))?;
    // Pages the host never backed are zeroes: not read (a read would fault them in here).
    let in_use = mem.pages_in_use(&guard, gpa, len);
    let mut out = Vec::new();
    for r in super::non_zero_runs(bytes, in_use.as_deref()) {
        push_run(&mut out, gpa + r.start as u64, &bytes[r]);
    }
    Ok(out)
}
