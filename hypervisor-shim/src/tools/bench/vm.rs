//! A shim serving one published service for the benchmark.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::host::free_port;
use super::{BenchError, BenchOptions};

/// A shim serving one published service for the benchmark (killed when dropped).
pub(crate) struct ServiceRun {
    child: Child,
    /// The published host port.
    pub(crate) port: u16,
    summary: std::path::PathBuf,
}

impl ServiceRun {
    /// Starts `run --app APP --publish PORT:GUEST_PORT EXTRA...` and waits for the service's
    /// "listening" line.
    pub(crate) fn start(
        opts: &BenchOptions,
        app: &str,
        guest_port: u32,
        extra: &[&str],
        dir: &std::path::Path,
    ) -> Result<ServiceRun, BenchError> {
        let mut run = ServiceRun::spawn(opts, app, guest_port, extra, dir, Stdio::piped(), Stdio::null())?;
        crate::tools::child::wait_until_listening(&mut run.child, Duration::from_secs(30))
            .map_err(|e| BenchError::Summary(format!("{app}: {e}")))?;
        Ok(run)
    }

    /// Starts `run --app APP --publish PORT:GUEST_PORT EXTRA...` for an on-demand VM (EXTRA
    /// holds `--on-demand[=MODE]`) and waits until the shim waits for its first client.
    pub(crate) fn start_on_demand(
        opts: &BenchOptions,
        app: &str,
        guest_port: u32,
        extra: &[&str],
        dir: &std::path::Path,
    ) -> Result<ServiceRun, BenchError> {
        use std::io::BufRead;
        let mut run = ServiceRun::spawn(opts, app, guest_port, extra, dir, Stdio::null(), Stdio::piped())?;
        let err = run.child.stderr.take().ok_or_else(|| BenchError::Summary("no stderr".into()))?;
        let mut lines = std::io::BufReader::new(err).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("on demand, no VM running") => break,
                Some(Ok(_)) => {}
                _ => return Err(BenchError::Summary(format!("{app}: the on-demand shim did not wait for clients"))),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(run)
    }

    fn spawn(
        opts: &BenchOptions,
        app: &str,
        guest_port: u32,
        extra: &[&str],
        dir: &std::path::Path,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<ServiceRun, BenchError> {
        let port = free_port()?;
        let summary = dir.join(format!("{app}-{port}.json"));
        let child = Command::new(&opts.shim)
            .args(["run", "--app", app, "--publish", &format!("127.0.0.1:{port}:{guest_port}")])
            .args(extra)
            .arg("--kernel")
            .arg(&opts.kernel)
            .arg("--summary")
            .arg(&summary)
            .args(["--timeout", "600"])
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| BenchError::Spawn(opts.shim.clone(), e))?;
        Ok(ServiceRun { child, port, summary })
    }

    /// The shim's process id: it is spawned directly (no shell in between) and serves the VM
    /// in this one process (vCPU threads, the vsock I/O thread), starting no children, so its
    /// CPU time is the VM's whole cost on the host.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the VM (a STOP notice) and returns its summary.
    pub(crate) fn stop(mut self) -> Result<serde_json::Value, BenchError> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.summary).map_err(|e| BenchError::Summary(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| BenchError::Summary(e.to_string()))
    }
}

impl Drop for ServiceRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
