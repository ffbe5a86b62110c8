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
        let port = free_port()?;
        let summary = dir.join(format!("{app}-{port}.json"));
        let mut child = Command::new(&opts.shim)
            .args(["run", "--app", app, "--publish", &format!("127.0.0.1:{port}:{guest_port}")])
            .args(extra)
            .arg("--kernel")
            .arg(&opts.kernel)
            .arg("--summary")
            .arg(&summary)
            .args(["--timeout", "600"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Spawn(opts.shim.clone(), e))?;
        crate::tools::child::wait_until_listening(&mut child, Duration::from_secs(30))
            .map_err(|e| BenchError::Summary(format!("{app}: {e}")))?;
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
