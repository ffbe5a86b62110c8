//! Figures of this process: resident memory and CPU time.

/// The shim process's resident set size now, in bytes (0 if /proc cannot say).
///
/// `/proc/self/statm` is opened once and read with `pread` afterwards, so a thread whose
/// seccomp list has no `openat` (the control API) can read it too.
pub(crate) fn process_rss_bytes() -> u64 {
    use std::os::unix::fs::FileExt;
    static STATM: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    let mut buf = [0u8; 128];
    let text = STATM
        .get_or_init(|| std::fs::File::open("/proc/self/statm").ok())
        .as_ref()
        .and_then(|f| f.read_at(&mut buf, 0).ok())
        .and_then(|n| std::str::from_utf8(&buf[..n]).ok());
    let pages = text.and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok())).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}

/// The shim process's peak resident set size so far, in bytes (kernel-tracked high water).
pub(crate) fn process_peak_rss_bytes() -> u64 {
    // SAFETY: `getrusage` fills the zeroed struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    usage.ru_maxrss as u64 * 1024
}

/// CPU time used by this process so far (user + system), in µs.
pub(crate) fn process_cpu_us() -> u64 {
    // SAFETY: `getrusage` fills the zeroed struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}
