//! `hypervisor-shim ctl --api-sock PATH VERB`: the control API's command-line client. It sends
//! one request with [`control_client::request`], prints the body (JSON pretty-printed, metrics
//! as they are) and exits 0 for a 2xx answer. An API refusal
//! prints its one-line `error` and exits 64 (4xx) or 70 (5xx); a socket nobody serves, 69.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use control_client::ClientError;

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
    /// Move the running VM to a shim started with `hypervisor-shim receive --listen` (pre-copy
    /// live migration); this VM ends once the target runs it. On this host use unix:PATH (the
    /// published listening sockets are handed over); to another host tcp:HOST:PORT, always
    /// mutual TLS (the target binds the published ports itself; clients reconnect to it). If
    /// anything fails, the VM keeps running here and the error says why.
    Migrate {
        /// The VM.
        vm: String,
        /// The receiver: unix:PATH, or tcp:HOST:PORT (HOST as the target's certificate names
        /// it; IPv6 in brackets).
        #[arg(long, value_name = "unix:PATH|tcp:HOST:PORT")]
        to: String,
        /// After the last copy, compare every held page with what was sent and send any the
        /// dirty logs missed (counted in `missed_by_log`; adds the time to read all memory to
        /// the downtime).
        #[arg(long, conflicts_with = "postcopy")]
        verify: bool,
        /// Post-copy: stop the VM here at once and send only its state; it runs on the target
        /// straight away and its pages follow, on first touch and in the background. The
        /// downtime does not grow with memory or with the guest's write rate; but if either
        /// side is lost before the last page arrived, the VM is lost (the target exits 78,
        /// this side keeps its older copy stopped).
        #[arg(long)]
        postcopy: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

/// The process exit code for a failed request.
fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Connect { .. } => exit::UNAVAILABLE,
        ClientError::Protocol { .. } => exit::INTERNAL,
        ClientError::Refused { status, .. } if *status < 500 => exit::USAGE,
        ClientError::Refused { .. } => exit::INTERNAL,
    }
}

/// How long `ctl` waits for an answer (a snapshot or a migration answers when it is done).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

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
        Verb::Migrate { vm, to, verify, postcopy, tls } => {
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            let (to, tls) = if let Some(path) = to.strip_prefix("unix:") {
                if tls.any() {
                    eline!("hypervisor-shim: ctl migrate: --tls-* are for tcp: destinations (got {to})");
                    return exit::USAGE;
                }
                (format!("unix:{}", abs(&PathBuf::from(path)).display()), serde_json::Value::Null)
            } else if to.starts_with("tcp:") {
                let Some(files) = tls.files() else {
                    eline!(
                        "hypervisor-shim: ctl migrate: --to {to}: a TCP migration is always mutual TLS: give --tls-cert, \
                         --tls-key and --tls-ca"
                    );
                    return exit::USAGE;
                };
                let files = serde_json::json!({ "cert": abs(&files.0), "key": abs(&files.1), "ca": abs(&files.2) });
                (to.clone(), files)
            } else {
                eline!("hypervisor-shim: ctl migrate: --to must be unix:PATH or tcp:HOST:PORT (got {to})");
                return exit::USAGE;
            };
            let body = serde_json::json!({ "to": to, "verify": verify, "postcopy": postcopy, "tls": tls }).to_string();
            ("PUT", format!("/api/v1/vms/{vm}/migrate"), body)
        }
    };
    match control_client::request(&args.api_sock, method, &path, &body, ANSWER_TIMEOUT) {
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
            exit_code(&e)
        }
    }
}

/// Mutual TLS for a migration over TCP: this side's certificate and key, the other side's CA.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct TlsArgs {
    /// This side's certificate chain (PEM), for tcp: migrations.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub(crate) tls_cert: Option<PathBuf>,
    /// This side's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub(crate) tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) the other side's certificate must be signed by.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub(crate) tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// Whether any of the three was given.
    pub(crate) fn any(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some()
    }

    /// (cert, key, ca), when all three were given.
    pub(crate) fn files(&self) -> Option<(PathBuf, PathBuf, PathBuf)> {
        Some((self.tls_cert.clone()?, self.tls_key.clone()?, self.tls_ca.clone()?))
    }
}
