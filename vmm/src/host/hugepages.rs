//! Zeroed transparent huge pages made ahead of need. A woken VM's memory is loaded into huge
//! pages (see `base::memory`), and the host's first touch of a fresh one costs 0.5–0.8 ms
//! here (allocation, zeroing, and compaction when memory is fragmented): most of a wake. An
//! on-demand slot that waits for a client ([`top_up`]) faults a few in ahead; a wake moves one
//! into place with `mremap`, which moves the page-table entry and copies nothing.

use std::sync::Mutex;

/// The size of one huge page (x86_64's 2 MiB PMD mapping).
const HUGE_PAGE: usize = 2 << 20;

/// Most pages kept ready (4 MiB of the shim's RSS while they wait).
const STOCK_SIZE: usize = 2;

/// Ready pages: the start of a 2 MiB-aligned private anonymous mapping of [`HUGE_PAGE`]
/// bytes, advised `MADV_HUGEPAGE` and touched once (zero bytes), owned by the stock.
static STOCK: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn stock() -> std::sync::MutexGuard<'static, Vec<usize>> {
    STOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Maps, advises and touches one page; `None` when the host refuses the mapping.
fn make() -> Option<usize> {
    let len = 2 * HUGE_PAGE;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return None;
    }
    let at = at as usize;
    let start = at.next_multiple_of(HUGE_PAGE);
    // SAFETY: both trims lie inside the mapping just made (`start - at < HUGE_PAGE`), and only
    // `[start, start + HUGE_PAGE)` is kept.
    unsafe {
        if start > at {
            libc::munmap(at as *mut libc::c_void, start - at);
        }
        let end = start + HUGE_PAGE;
        if end < at + len {
            libc::munmap(end as *mut libc::c_void, at + len - end);
        }
        // Failure (huge pages off) only leaves the page in 4 KiB pages: still zeroed memory.
        libc::madvise(start as *mut libc::c_void, HUGE_PAGE, libc::MADV_HUGEPAGE);
        // A write fault allocates the (zeroed) huge page; the byte written is a zero.
        std::ptr::write_volatile(start as *mut u8, 0);
    }
    Some(start)
}

/// Faults pages in until [`STOCK_SIZE`] are ready (best effort).
pub(crate) fn top_up() {
    while stock().len() < STOCK_SIZE {
        let Some(page) = make() else { return };
        let mut s = stock();
        if s.len() < STOCK_SIZE {
            s.push(page);
        } else {
            drop(s);
            // SAFETY: the page is the stock's own mapping, not handed out.
            unsafe { libc::munmap(page as *mut libc::c_void, HUGE_PAGE) };
        }
    }
}

/// Moves a ready page to `dst`, replacing the 2 MiB mapped there; `false` (nothing changed)
/// when the stock is empty, `dst` is not 2 MiB-aligned, or the move fails.
///
/// # Safety
///
/// `[dst, dst + HUGE_PAGE)` must be private anonymous memory the caller owns and nothing
/// else reads or writes meanwhile (a KVM slot may map it while no vCPU runs: KVM follows the
/// move); afterwards it reads as zeroes.
pub(crate) unsafe fn place(dst: *mut u8) -> bool {
    if !(dst as usize).is_multiple_of(HUGE_PAGE) {
        return false;
    }
    let Some(page) = stock().pop() else { return false };
    // SAFETY: `page` is a mapping of HUGE_PAGE bytes the stock owned and no longer lists; the
    // caller owns `dst`'s range, which MREMAP_FIXED replaces.
    let moved = unsafe {
        libc::mremap(
            page as *mut libc::c_void,
            HUGE_PAGE,
            HUGE_PAGE,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst.cast::<libc::c_void>(),
        )
    };
    if moved == libc::MAP_FAILED {
        // SAFETY: the page stayed where it was, still ours.
        unsafe { libc::munmap(page as *mut libc::c_void, HUGE_PAGE) };
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placed_page_reads_as_zeroes_and_takes_writes() {
        top_up();
        let len = 4 * HUGE_PAGE;
        // SAFETY: a fresh anonymous mapping this test owns and unmaps.
        let area = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + HUGE_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        let dst = area.next_multiple_of(HUGE_PAGE) + HUGE_PAGE;
        // SAFETY: `dst` is aligned and lies inside `area`, which this test owns.
        assert!(unsafe { place(dst as *mut u8) });
        // SAFETY: the placed page is mapped read-write at `dst`.
        let page = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, HUGE_PAGE) };
        assert!(page.iter().all(|&b| b == 0));
        page[HUGE_PAGE - 1] = 7;
        assert_eq!(page[HUGE_PAGE - 1], 7);
        // SAFETY: not aligned: refused without touching anything.
        assert!(!unsafe { place((dst + 4096) as *mut u8) });
        // SAFETY: the test's own mapping (the placed page included).
        unsafe { libc::munmap(area as *mut libc::c_void, len + HUGE_PAGE) };
    }
}
