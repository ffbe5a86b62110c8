//! Figures of this process: resident memory, the pages in use, CPU time.

/// Reads `/proc/self/<name>` into `buf` through a file opened once (then `pread`), so a thread
/// whose seccomp list has no `openat` (the control API) can read it too.
fn read_proc<'b>(file: &std::sync::OnceLock<Option<std::fs::File>>, name: &str, buf: &'b mut [u8]) -> Option<&'b str> {
    use std::os::unix::fs::FileExt;
    let n =
        file.get_or_init(|| std::fs::File::open(format!("/proc/self/{name}")).ok()).as_ref()?.read_at(buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()
}

static STATM: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
static STATUS: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

/// The shim process's resident set size now, in bytes (0 if /proc cannot say). The first call
/// opens the /proc files of both figures.
pub(crate) fn process_rss_bytes() -> u64 {
    let _ = read_proc(&STATUS, "status", &mut []);
    let mut buf = [0u8; 128];
    let pages = read_proc(&STATM, "statm", &mut buf)
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}

/// The `VmHWM:` line of a `/proc/PID/status` text, in bytes.
fn vm_hwm_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line["VmHWM:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The shim process's own peak resident set size so far, in bytes: the kernel's high-water
/// mark of this process's memory (`VmHWM`), never below the RSS now. Not `getrusage`'s
/// `ru_maxrss`: that one survives `exec` and so includes the peak of whatever process
/// (a test harness, a shell, cargo) this one was exec'd from.
pub(crate) fn process_peak_rss_bytes() -> u64 {
    let mut buf = [0u8; 4096];
    let hwm = read_proc(&STATUS, "status", &mut buf).and_then(vm_hwm_bytes).unwrap_or(0);
    hwm.max(process_rss_bytes())
}

fn usage() -> libc::rusage {
    // SAFETY: `getrusage` fills the zeroed struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    }
}

/// CPU time used by this process so far (user + system), in µs.
pub(crate) fn process_cpu_us() -> u64 {
    let usage = usage();
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// Page faults this process has taken so far (minor and major), its vCPU threads' included:
/// KVM faults guest memory in on the vCPU thread that touches it.
pub(crate) fn page_faults() -> u64 {
    let usage = usage();
    (usage.ru_minflt as u64).saturating_add(usage.ru_majflt as u64)
}

static PAGEMAP: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

/// Which 4 KiB pages of `[addr, addr + len)` of this process's private anonymous memory may
/// hold data: those present or swapped out (`/proc/self/pagemap`). A page never touched is
/// neither, and reads as zeroes; reading it just to learn that costs a fault on this host.
/// `None` when the kernel cannot say. (For file-backed memory, a page that is neither may
/// still hold the file's data: ask only about anonymous memory.)
pub(crate) fn pages_in_use(addr: usize, len: usize) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let file = PAGEMAP.get_or_init(|| std::fs::File::open("/proc/self/pagemap").ok()).as_ref()?;
    let first = addr / 4096;
    let pages = len.div_ceil(4096);
    let mut entries = vec![0u8; pages * 8];
    file.read_exact_at(&mut entries, (first as u64).checked_mul(8)?).ok()?;
    Some(
        entries
            .chunks_exact(8)
            .map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()) & (PRESENT | SWAPPED) != 0)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_this_process_s_high_water_mark() {
        assert_eq!(
            vm_hwm_bytes("Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    6144 kB\nVmRSS:\t 5000 kB\n"),
            Some(6144 * 1024)
        );
        assert_eq!(vm_hwm_bytes("Name:\tx\n"), None);
        let now = process_rss_bytes();
        let peak = process_peak_rss_bytes();
        assert!(now > 0 && peak >= now, "peak {peak} now {now}");
        // Touch 64 MiB: the high-water mark follows this process's own memory (compared with
        // the RSS while it is held: tests running beside this one allocate and free too).
        let big = vec![1u8; 64 << 20];
        let during = process_rss_bytes();
        assert!(during >= 60 << 20, "RSS {during} with 64 MiB touched");
        assert!(process_peak_rss_bytes() >= during, "{}", big.iter().map(|&b| b as usize).sum::<usize>());
    }

    #[test]
    fn only_touched_pages_of_fresh_memory_are_in_use() {
        let len = 16 * 4096;
        // SAFETY: a fresh private anonymous mapping this test owns and unmaps.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        // SAFETY: page 3 of the mapping.
        unsafe { std::ptr::write_volatile((at + 3 * 4096) as *mut u8, 1) };
        let used = pages_in_use(at, len).expect("pagemap");
        assert_eq!(used.len(), 16);
        assert_eq!(used.iter().enumerate().filter(|(_, u)| **u).map(|(i, _)| i).collect::<Vec<_>>(), [3]);
        // SAFETY: the test's own mapping.
        unsafe { libc::munmap(at as *mut libc::c_void, len) };
    }
}
