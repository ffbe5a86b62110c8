//! The native anchors the services are compared with: Debian's `redis-server` and `nginx`,
//! run on the host as one process each, on a free loopback port, for one measurement.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;
use super::clients::GREETING;
use super::host::free_port;

/// The nginx binary Debian installs.
const NGINX: &str = "/usr/sbin/nginx";
/// How long a native server may take to listen.
const START: Duration = Duration::from_secs(10);

/// A native server process on a loopback port (killed and reaped when dropped).
pub(crate) struct NativeServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub(crate) port: u16,
    /// What it is, for messages.
    name: &'static str,
    /// Where it logs errors (read into a failure's message), if anywhere.
    log: Option<PathBuf>,
}

impl NativeServer {
    /// Debian's `redis-server` on a free port, without persistence (`--save ''
    /// --appendonly no`), bound to 127.0.0.1.
    pub(crate) fn redis() -> Result<NativeServer, BenchError> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Summary(format!("cannot run redis-server ({e}): apt-get install redis-server")))?;
        NativeServer { child, port, name: "redis-server", log: None }.wait_listening()
    }

    /// Debian's nginx as one process (`master_process off`: the one process is the worker)
    /// serving [`GREETING`] as `text/plain` on `GET /` of a free port, from a configuration
    /// written to `dir` (its logs, pid file and temporary paths are there too; no access log).
    /// Connections are kept alive for the whole run, as the http service keeps them.
    pub(crate) fn nginx(dir: &Path) -> Result<NativeServer, BenchError> {
        if !Path::new(NGINX).exists() {
            return Err(BenchError::Summary(format!("{NGINX} is not installed: apt-get install nginx-light")));
        }
        let port = free_port()?;
        let prefix = dir.join(format!("nginx-{port}"));
        std::fs::create_dir_all(&prefix).map_err(|e| BenchError::Write(prefix.clone(), e))?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(&prefix, port)).map_err(|e| BenchError::Write(conf.clone(), e))?;
        let log = prefix.join("error.log");
        let child = Command::new(NGINX)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&prefix)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Summary(format!("cannot run {NGINX} ({e}): apt-get install nginx-light")))?;
        NativeServer { child, port, name: "nginx", log: Some(log) }.wait_listening()
    }

    /// Its process id (the process whose CPU time is measured).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the server accepts connections; an exit or [`START`] passing is an error
    /// carrying its error log.
    fn wait_listening(mut self) -> Result<NativeServer, BenchError> {
        let deadline = Instant::now() + START;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let ended = self.child.try_wait().ok().flatten();
            if ended.is_some() || Instant::now() > deadline {
                let why = ended
                    .map_or_else(|| format!("did not listen within {} s", START.as_secs()), |s| format!("ended: {s}"));
                let log = self.log.as_ref().and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
                return Err(BenchError::Summary(format!("{} {why} {}", self.name, log.trim())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(self)
    }
}

impl Drop for NativeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The anchor's nginx.conf: one process in the foreground, everything it writes under
/// `prefix`, `GET /` answered with [`GREETING`].
fn nginx_conf(prefix: &Path, port: u16) -> String {
    let p = prefix.display();
    let body = GREETING.replace('\n', "\\n");
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = / {{
            default_type text/plain;
            charset utf-8;
            return 200 \"{body}\";
        }}
    }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_conf_serves_the_greeting() {
        let conf = nginx_conf(Path::new("/tmp/x"), 8080);
        assert!(conf.contains("listen 127.0.0.1:8080;"));
        assert!(conf.contains("return 200 \"Hello from the elastic unikernel!\\n\";"));
        assert!(conf.contains("master_process off;") && conf.contains("access_log off;"));
        assert!(conf.contains("error_log /tmp/x/error.log"));
    }
}
