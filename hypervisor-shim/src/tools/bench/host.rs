//! What the benchmark takes from and does to the host: free loopback ports, a process's CPU
//! time, and one busy process competing for the CPUs.

use std::process::{Child, Command, Stdio};

use super::BenchError;

/// A free loopback port (bound, then released).
pub(crate) fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Summary(format!("no free port: {e}")))
}

/// CPU time process `pid` has used so far, user plus system, in µs: `utime + stime` of
/// `/proc/PID/stat`, in clock ticks (`sysconf(_SC_CLK_TCK)`, 10 ms on most kernels). The
/// process's line sums all its threads, exited ones included; children are not counted.
pub(crate) fn cpu_us(pid: u32) -> Result<f64, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::Summary(format!("cannot read {path}: {e}")))?;
    let ticks = stat_cpu_ticks(&text).ok_or_else(|| BenchError::Summary(format!("unexpected {path}: {text}")))?;
    // SAFETY: sysconf only reads a configuration value.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if per_s <= 0 {
        return Err(BenchError::Summary("sysconf(_SC_CLK_TCK) failed".into()));
    }
    Ok(ticks as f64 * 1e6 / per_s as f64)
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from its last `)`.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// One busy process on the host: `sh -c 'while :; do :; done'`, a child process (not a thread
/// of the benchmark) spinning on one CPU for as long as the guard lives. Dropping the guard
/// kills and reaps it, on an error path too.
pub(crate) struct BusyProcess(Child);

impl BusyProcess {
    /// Starts the spinning shell.
    pub(crate) fn start() -> Result<BusyProcess, BenchError> {
        Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(BusyProcess)
            .map_err(|e| BenchError::Summary(format!("cannot start a busy process (sh): {e}")))
    }

    /// Fails when the busy process is no longer running (the measurement it was meant to
    /// disturb was then partly quiet).
    pub(crate) fn check(&mut self) -> Result<(), BenchError> {
        match self.0.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::Summary(format!("the busy process ended early: {status}"))),
            Err(e) => Err(BenchError::Summary(format!("cannot check the busy process: {e}"))),
        }
    }
}

impl Drop for BusyProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 99 0 0";
        assert_eq!(stat_cpu_ticks(line), Some(325));
        assert_eq!(stat_cpu_ticks("1234 (x) S 1 2"), None);
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn own_cpu_time_grows() {
        let pid = std::process::id();
        let before = cpu_us(pid).expect("own stat");
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_us(pid).expect("own stat") > before);
    }
}
