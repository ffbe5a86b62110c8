//! `hypervisor-shim ctl --api-sock PATH VERB`: the control API's client. It writes one
//! HTTP/1.1 request on the Unix socket, parses the answer with `httparse`, prints the body
//! (JSON pretty-printed, metrics as they are) and exits 0 for a 2xx answer. An API refusal
//! prints its one-line `error` and exits 64 (4xx) or 70 (5xx); a socket nobody serves, 69.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use thiserror::Error;

use elastic_vmm::exit;

/// `ctl` arguments.
#[derive(Debug, Args, Clone)]
pub struct CtlArgs {
    /// The control socket of a running `run` or `pool` (its `--api-sock`).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// A `ctl` verb.
#[derive(Debug, Subcommand, Clone)]
pub enum Verb {
    /// List the running VMs.
    List,
    /// One VM's live figures (the summary's keys).
    Get {
        /// The VM (`vm0` for `run`; the `name` of a pool VM).
        vm: String,
    },
    /// All VMs' figures in Prometheus text format.
    Metrics,
    /// Change a running VM's max and burst (min stays); lowering max below what it holds
    /// posts a reclaim.
    Policy {
        /// The VM.
        vm: String,
        /// New vCPU policy MIN:MAX:BURST.
        #[arg(long, value_name = "MIN:MAX:BURST")]
        vcpus: Option<String>,
        /// New memory policy MIN:MAX:BURST.
        #[arg(long, value_name = "MIN:MAX:BURST")]
        memory: Option<String>,
    },
    /// Stop the VM's vCPUs (it keeps its memory; costs no CPU) until `resume`.
    Pause {
        /// The VM.
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM.
        vm: String,
    },
    /// Ask the VM's guest to stop (a STOP notice, as Ctrl-C does).
    Stop {
        /// The VM.
        vm: String,
    },
    /// Save the VM's whole state in DIR (it runs on; a paused VM stays paused); bring it back
    /// in a new process with `hypervisor-shim restore DIR`.
    Snapshot {
        /// The VM.
        vm: String,
        /// Directory for the snapshot (created, but not its parent: a missing parent is refused;
        /// an older snapshot there is replaced).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
    /// Move the running VM to a shim started with `hypervisor-shim receive --listen
    /// unix:PATH` (pre-copy live migration); this VM ends once the target runs it.
    Migrate {
        /// The VM.
        vm: String,
        /// The receiver's socket, `unix:PATH`.
        #[arg(long, value_name = "unix:PATH")]
        to: String,
        /// After the last copy, compare every held page with what was sent and send any the
        /// dirty logs missed (counted in `missed_by_log`; adds the time to read all memory to
        /// the downtime).
        #[arg(long)]
        verify: bool,
    },
}

/// `ctl` failures.
#[derive(Debug, Error)]
pub enum CtlError {
    /// Nothing serves the socket.
    #[error("cannot reach the control API at {path}: {reason}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
    },
    /// The exchange failed midway or the answer is not HTTP.
    #[error("control API at {path}: {reason}")]
    Protocol {
        /// The socket.
        path: String,
        /// Why.
        reason: String,
    },
    /// The API refused the request.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
}

impl CtlError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Connect { .. } => exit::UNAVAILABLE,
            CtlError::Protocol { .. } => exit::INTERNAL,
            CtlError::Refused { status, .. } if *status < 500 => exit::USAGE,
            CtlError::Refused { .. } => exit::INTERNAL,
        }
    }
}

/// One request: method, path, body. Returns the answer's body.
pub fn request(sock: &std::path::Path, method: &str, path: &str, body: &str) -> Result<String, CtlError> {
    let shown = sock.display().to_string();
    let mut s =
        UnixStream::connect(sock).map_err(|e| CtlError::Connect { path: shown.clone(), reason: e.to_string() })?;
    let proto = |reason: String| CtlError::Protocol { path: shown.clone(), reason };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|_| s.write_all(body.as_bytes())).map_err(|e| proto(e.to_string()))?;
    let mut raw = Vec::new();
    s.take(64 << 20).read_to_end(&mut raw).map_err(|e| proto(e.to_string()))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let at = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(proto("the answer ended early".into())),
        Err(e) => return Err(proto(format!("not an HTTP answer: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let text = String::from_utf8_lossy(&raw[at..]).into_owned();
    if (200..300).contains(&status) {
        return Ok(text);
    }
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("HTTP {status}: {}", text.trim()));
    Err(CtlError::Refused { status, message })
}

/// Runs `ctl`; returns the exit code.
pub fn command(args: &CtlArgs) -> u8 {
    let (method, path, body) = match &args.verb {
        Verb::List => ("GET", "/api/v1/vms".to_string(), String::new()),
        Verb::Get { vm } => ("GET", format!("/api/v1/vms/{vm}"), String::new()),
        Verb::Metrics => ("GET", "/metrics".to_string(), String::new()),
        Verb::Policy { vm, vcpus, memory } => {
            if vcpus.is_none() && memory.is_none() {
                eline!("hypervisor-shim: ctl policy: give --vcpus and/or --memory");
                return exit::USAGE;
            }
            let mut b = serde_json::Map::new();
            if let Some(v) = vcpus {
                b.insert("vcpus".into(), v.clone().into());
            }
            if let Some(m) = memory {
                b.insert("memory".into(), m.clone().into());
            }
            ("PUT", format!("/api/v1/vms/{vm}/policy"), serde_json::Value::Object(b).to_string())
        }
        Verb::Pause { vm } => ("PUT", format!("/api/v1/vms/{vm}/pause"), String::new()),
        Verb::Resume { vm } => ("PUT", format!("/api/v1/vms/{vm}/resume"), String::new()),
        Verb::Stop { vm } => ("PUT", format!("/api/v1/vms/{vm}/stop"), String::new()),
        Verb::Snapshot { vm, to } => {
            let dir = std::path::absolute(to).unwrap_or_else(|_| to.clone());
            ("PUT", format!("/api/v1/vms/{vm}/snapshot"), serde_json::json!({ "dir": dir }).to_string())
        }
        Verb::Migrate { vm, to, verify } => {
            let Some(path) = to.strip_prefix("unix:") else {
                eline!("hypervisor-shim: ctl migrate: --to must be unix:PATH (got {to})");
                return exit::USAGE;
            };
            let abs = std::path::absolute(path).unwrap_or_else(|_| PathBuf::from(path));
            let body = serde_json::json!({ "to": format!("unix:{}", abs.display()), "verify": verify }).to_string();
            ("PUT", format!("/api/v1/vms/{vm}/migrate"), body)
        }
    };
    match request(&args.api_sock, method, &path, &body) {
        Ok(text) => {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) if !matches!(args.verb, Verb::Metrics) => {
                    oline!("{}", serde_json::to_string_pretty(&v).unwrap_or(text));
                }
                _ => {
                    let _ = std::io::stdout().write_all(text.as_bytes());
                }
            }
            0
        }
        Err(e) => {
            eline!("hypervisor-shim: ctl: {e}");
            e.exit_code()
        }
    }
}
