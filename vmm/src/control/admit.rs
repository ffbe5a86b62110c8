//! The node pool's admissions (`hypervisor-shim pool --serve`): VMs asked for while the pool
//! runs, through `POST /api/v1/vms`, and their exits, kept until whoever asked reads them
//! (`GET /api/v1/vms/{name}/wait`) and forgets them (`DELETE /api/v1/vms/{name}`).
//!
//! The API thread parses and checks a request ([`Admission::parse`]) and claims its name in
//! the [`Exits`] table; the pool's main thread then binds the VM's ports, opens its image and
//! console, admits its min against the pool and starts it (see [`crate::control::run`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Deserialize;
use serde_json::json;
use thiserror::Error;

use crate::base::config::{Policy, VmConfig, parse_log_level, parse_memory_policy, parse_vcpu_policy};
use crate::control::request::{ControlReply, Replier};

/// Why an admission request is refused before any VM exists.
#[derive(Debug, Error)]
pub(crate) enum AdmitError {
    /// The body is not the expected JSON object.
    #[error("the body is not an admission request: {0}")]
    Body(String),
    /// The name is not usable.
    #[error("VM name '{0}' must be 1 to 256 letters, digits, ':', '.', '-' or '_'")]
    Name(String),
    /// A field's value is refused.
    #[error("{field}: {message}")]
    Field {
        /// The field.
        field: &'static str,
        /// Why.
        message: String,
    },
}

/// The body of `POST /api/v1/vms`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    name: String,
    app: String,
    kernel: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    vcpus: Option<String>,
    memory: Option<String>,
    #[serde(default)]
    publish: Vec<String>,
    log: Option<String>,
    console: Option<PathBuf>,
    netns: Option<PathBuf>,
    restore: Option<PathBuf>,
}

/// A VM to admit: what it runs, where its console goes, and the network namespace its
/// published ports are bound in.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) config: VmConfig,
    /// Its kernel image.
    pub(crate) kernel: PathBuf,
    /// A FIFO (opened read-write, so it never blocks) or a file (appended to); none: the
    /// pool's standard output, prefixed.
    pub(crate) console: Option<PathBuf>,
    pub(crate) netns: Option<PathBuf>,
    /// Restore the VM from the snapshot in this directory instead of booting it: its service
    /// (which must be `app`), arguments, policies and memory are the snapshot's; its name,
    /// kernel file, ports and console the request's.
    pub(crate) restore: Option<PathBuf>,
}

impl Admission {
    /// Opens the console's target without ever blocking: a FIFO read-write (the guest's
    /// output waits in the pipe while nobody reads), a regular file for appending (created if
    /// missing), or `/dev/null`; anything else (a directory, another device) is refused before
    /// it is opened (opening a device can have effects), and what was opened is checked again.
    /// `None`: no console path.
    pub(crate) fn open_console(&self) -> Result<Option<std::fs::File>, String> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
        let Some(path) = &self.console else { return Ok(None) };
        let err = |e: String| format!("console {}: {e}", path.display());
        let kind = |meta: &std::fs::Metadata| {
            let t = meta.file_type();
            if t.is_file() {
                Ok(libc::O_APPEND)
            } else if t.is_fifo() || (t.is_char_device() && meta.rdev() == libc::makedev(1, 3)) {
                Ok(0)
            } else {
                Err(err("must be a FIFO, a regular file or /dev/null".into()))
            }
        };
        let flags = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        let file = match std::fs::metadata(path) {
            Ok(meta) => {
                let mut options = std::fs::OpenOptions::new();
                if kind(&meta)? == libc::O_APPEND {
                    options.append(true);
                } else {
                    // A FIFO read-write never waits for a reader.
                    options.read(true).write(true);
                }
                options.custom_flags(flags).open(path).map_err(|e| err(e.to_string()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .custom_flags(flags | libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| err(e.to_string()))?,
            Err(e) => return Err(err(e.to_string())),
        };
        // What was opened (the path may have changed since), and writes that block again
        // (a full pipe waits for its reader); a file appends.
        let mode = kind(&file.metadata().map_err(|e| err(e.to_string()))?)?;
        // SAFETY: F_SETFL on an open descriptor only changes its status flags.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, mode) } != 0 {
            return Err(err(std::io::Error::last_os_error().to_string()));
        }
        Ok(Some(file))
    }

    /// Parses and checks a request body (the image is checked for the service later, when it
    /// is opened).
    pub(crate) fn parse(body: &str) -> Result<Admission, AdmitError> {
        let b: Body = serde_json::from_str(body).map_err(|e| AdmitError::Body(e.to_string()))?;
        let field = |field: &'static str, message: String| AdmitError::Field { field, message };
        if b.name.is_empty()
            || b.name.len() > 256
            || !b.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '-' | '_'))
        {
            return Err(AdmitError::Name(b.name));
        }
        crate::base::config::kernel_cmdline(&b.app, &[], &b.args).map_err(|e| field("app", e.to_string()))?;
        if !b.kernel.is_absolute() {
            return Err(field("kernel", format!("must be an absolute path (got {})", b.kernel.display())));
        }
        for (name, path) in [("console", &b.console), ("netns", &b.netns), ("restore", &b.restore)] {
            if let Some(p) = path.as_ref().filter(|p| !p.is_absolute()) {
                return Err(field(name, format!("must be an absolute path (got {})", p.display())));
            }
        }
        let policy = |name: &'static str, text: &Option<String>, parse: fn(&str) -> Result<Policy, _>, default| {
            text.as_deref()
                .map_or(Ok(default), |t| parse(t).map_err(|e: elastic_config::PolicyError| field(name, e.to_string())))
        };
        let vcpus = policy("vcpus", &b.vcpus, parse_vcpu_policy, elastic_config::DEFAULT_VCPU_POLICY)?;
        let memory = policy("memory", &b.memory, parse_memory_policy, elastic_config::DEFAULT_MEMORY_POLICY)?;
        let mut publish = Vec::new();
        for p in &b.publish {
            publish.push(elastic_config::parse_publish(p).map_err(|e| field("publish", e.to_string()))?);
        }
        let mut config = VmConfig::new(b.name, b.app);
        config.guest.args = b.args;
        if let Some(level) = &b.log {
            config.guest.log_level = parse_log_level(level).map_err(|e| field("log", e.to_string()))?;
        }
        config.resources.vcpus = vcpus;
        config.resources.memory = memory;
        config.endpoints.publish = publish;
        Ok(Admission { config, kernel: b.kernel, console: b.console, netns: b.netns, restore: b.restore })
    }
}

/// What reaches the node pool's main thread.
#[derive(Debug)]
pub(crate) enum AdmitEvent {
    /// Admit this VM (its name is claimed) and answer.
    Admit(Box<Admission>, Replier),
    /// The pool is asked to end: admit no more.
    Shutdown,
}

/// What the control API of a node pool needs: the exits table and the way to the main
/// thread.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) exits: Exits,
    pub(crate) admit: std::sync::mpsc::Sender<AdmitEvent>,
    /// Set once the pool admits no more (after a signal).
    pub(crate) closing: Arc<std::sync::atomic::AtomicBool>,
}

/// The most ended VMs kept for a later `wait` (the oldest is forgotten past it).
const ENDED_KEPT: usize = 1024;

#[derive(Debug)]
enum Entry {
    /// Claimed: being admitted, or running; these wait for its end.
    Live(Vec<Replier>),
    /// Ended with this exit code and reason (the `n`th to end).
    Ended { code: u8, reason: String, n: u64 },
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<String, Entry>,
    ended: u64,
}

/// The names of admitted VMs and, once they end, their exit codes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Exits(Arc<Mutex<Table>>);

impl Exits {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `name` for a VM being admitted; `false` when an admitted VM (running, or ended
    /// and not forgotten) has it.
    pub(crate) fn claim(&self, name: &str) -> bool {
        let mut t = self.lock();
        if t.entries.contains_key(name) {
            return false;
        }
        t.entries.insert(name.to_string(), Entry::Live(Vec::new()));
        true
    }

    /// Releases the name of a VM whose admission failed (its waiters get 404).
    pub(crate) fn refused(&self, name: &str) {
        self.lock().entries.remove(name);
    }

    /// Answers `replier` with VM `name`'s exit once it has ended (at once if it has); `Err`
    /// gives it back when no admitted VM has that name.
    pub(crate) fn wait(&self, name: &str, replier: Replier) -> Result<(), Replier> {
        let mut t = self.lock();
        match t.entries.get_mut(name) {
            Some(Entry::Live(waiters)) => {
                waiters.push(replier);
                Ok(())
            }
            Some(Entry::Ended { code, reason, .. }) => {
                let reply = ended_reply(name, *code, reason);
                drop(t);
                replier.reply(reply);
                Ok(())
            }
            None => Err(replier),
        }
    }

    /// Records that VM `name` ended, and answers its waiters.
    pub(crate) fn ended(&self, name: &str, code: u8, reason: &str) {
        let waiters = {
            let mut t = self.lock();
            t.ended += 1;
            let n = t.ended;
            let old = t.entries.insert(name.to_string(), Entry::Ended { code, reason: reason.to_string(), n });
            let ended = t.entries.values().filter(|e| matches!(e, Entry::Ended { .. })).count();
            if ended > ENDED_KEPT {
                let oldest = t
                    .entries
                    .iter()
                    .filter_map(|(k, e)| match e {
                        Entry::Ended { n, .. } => Some((*n, k.clone())),
                        Entry::Live(_) => None,
                    })
                    .min();
                if let Some((_, k)) = oldest {
                    t.entries.remove(&k);
                }
            }
            match old {
                Some(Entry::Live(w)) => w,
                _ => Vec::new(),
            }
        };
        for w in waiters {
            w.reply(ended_reply(name, code, reason));
        }
    }

    /// Forgets ended VM `name` (`DELETE`): 200, 404 when unknown, 409 while it runs.
    pub(crate) fn forget(&self, name: &str) -> ControlReply {
        let mut t = self.lock();
        match t.entries.get(name) {
            Some(Entry::Ended { .. }) => {
                t.entries.remove(name);
                ControlReply::ok(json!({ "name": name, "forgotten": true }))
            }
            Some(Entry::Live(_)) => {
                ControlReply::error(409, format!("VM '{name}' is running: stop or kill it before deleting it"))
            }
            None => ControlReply::error(404, format!("no admitted VM named '{name}'")),
        }
    }
}

fn ended_reply(name: &str, code: u8, reason: &str) -> ControlReply {
    ControlReply::ok(json!({ "name": name, "exit_code": code, "exit_reason": reason }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_checked_field_by_field() {
        let a = Admission::parse(
            r#"{"name": "k8s.io:kv-1", "app": "kv", "kernel": "/k", "vcpus": "1:2:4", "memory": "64M:128M:256M",
                "publish": ["127.0.0.1:6379:6379"], "console": "/run/fifo", "args": ["--x"]}"#,
        )
        .expect("valid");
        assert_eq!(a.config.name(), "k8s.io:kv-1");
        assert_eq!(a.config.resources.vcpus, Policy { min: 1, max: 2, burst: 4 });
        assert_eq!(a.config.endpoints.publish.len(), 1);
        assert_eq!(a.console, Some(PathBuf::from("/run/fifo")));
        let refused = |body: &str, what: &str| {
            let e = Admission::parse(body).expect_err(body).to_string();
            assert!(e.contains(what), "{body}: {e}");
        };
        refused(r#"{"name": "a b", "app": "kv", "kernel": "/k"}"#, "VM name");
        refused(r#"{"name": "", "app": "kv", "kernel": "/k"}"#, "VM name");
        refused(r#"{"name": "a", "app": "kv", "kernel": "k"}"#, "kernel: must be an absolute path");
        refused(r#"{"name": "a", "app": "kv", "kernel": "/k", "vcpus": "2:1:1"}"#, "vcpus:");
        refused(r#"{"name": "a", "app": "kv", "kernel": "/k", "publish": ["x"]}"#, "publish:");
        refused(r#"{"name": "a", "app": "k v", "kernel": "/k"}"#, "app:");
        refused(r#"{"name": "a", "app": "kv", "kernel": "/k", "cpus": 1}"#, "unknown field");
        refused(r#"{"name": "a", "app": "kv", "kernel": "/k", "console": "rel"}"#, "console:");
        refused(r#"{"name": "a", "app": "kv", "kernel": "/k", "restore": "snap"}"#, "restore:");
    }

    #[test]
    fn a_console_is_a_fifo_a_file_or_dev_null() {
        let dir = std::env::temp_dir().join(format!("admit-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("path");
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let console = |p: &std::path::Path| {
            let a = Admission::parse(&format!(
                r#"{{"name": "a", "app": "kv", "kernel": "/k", "console": "{}"}}"#,
                p.display()
            ))
            .expect("valid");
            a.open_console().map(|f| f.is_some())
        };
        // A FIFO without a reader opens at once.
        assert_eq!(console(&fifo), Ok(true));
        let log = dir.join("new.log");
        assert_eq!(console(&log), Ok(true));
        assert!(log.is_file(), "a missing file is created");
        assert_eq!(console(std::path::Path::new("/dev/null")), Ok(true));
        for refused in [dir.as_path(), std::path::Path::new("/dev/zero")] {
            let e = console(refused).expect_err("refused");
            assert!(e.contains("must be a FIFO, a regular file or /dev/null") || e.contains("directory"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn exits_are_kept_until_forgotten() {
        let exits = Exits::default();
        assert!(exits.claim("a"));
        assert!(!exits.claim("a"), "a claimed name is refused");
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        exits.wait("a", Replier::new("a", move |r| tx.send(r).expect("send"))).expect("known");
        assert!(rx.try_recv().is_err(), "no answer before the end");
        assert_eq!(exits.forget("a").status, 409);
        exits.ended("a", 3, "shutdown");
        assert_eq!(rx.try_recv().expect("answered").body["exit_code"], 3);
        exits.wait("a", Replier::new("a", move |r| tx2.send(r).expect("send"))).expect("kept");
        assert_eq!(rx.try_recv().expect("answered at once").body["exit_reason"], "shutdown");
        assert!(!exits.claim("a"), "an ended name stays taken until forgotten");
        assert_eq!(exits.forget("a").status, 200);
        assert_eq!(exits.forget("a").status, 404);
        assert!(exits.claim("a"));
        exits.refused("a");
        assert!(exits.wait("a", Replier::new("a", |_| {})).is_err());
    }

    #[test]
    fn old_exits_are_forgotten_past_the_bound() {
        let exits = Exits::default();
        for i in 0..=ENDED_KEPT {
            let name = format!("vm{i}");
            assert!(exits.claim(&name));
            exits.ended(&name, 0, "shutdown");
        }
        assert_eq!(exits.lock().entries.len(), ENDED_KEPT);
        assert!(exits.claim("vm0"), "the oldest went first");
    }
}
