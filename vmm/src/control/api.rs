//! The control API (`--api-sock PATH` on `run` and `pool`): HTTP/1.1 + JSON on a Unix socket,
//! served by `tiny_http` on its own thread, specified in `docs/api.yaml`.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/v1/vms` | the running VMs: name, app, state, vCPUs online, memory held |
//! | `GET /api/v1/vms/{name}` | one VM's live figures (the summary's keys, `state` for `exit_code`) |
//! | `PUT /api/v1/vms/{name}/policy` | `{"vcpus": "MIN:MAX:BURST", "memory": "MIN:MAX:BURST"}` (either) |
//! | `PUT /api/v1/vms/{name}/pause`, `/resume`, `/stop` | lifecycle |
//! | `PUT /api/v1/vms/{name}/snapshot` | `{"dir": "/abs/path"}`: save the VM there (it runs on) |
//! | `PUT /api/v1/vms/{name}/migrate` | `{"to": "unix:PATH", "verify": false, "postcopy": false}`: move it to `receive --listen` (`postcopy`: the VM runs there at once, its pages follow); `"to": "tcp:HOST:PORT"` needs `"tls": {"cert", "key", "ca"}` (absolute paths) |
//! | `GET /api/v1/pool` | the pool: capacity, in use now, the most in use at once |
//! | `GET /metrics` | Prometheus text format |
//!
//! A node pool (`pool --serve`) also admits VMs while it runs:
//!
//! | method and path | what |
//! |---|---|
//! | `POST /api/v1/vms` | `{"name", "app", "kernel", "vcpus", "memory", "publish", "args", "log", "console", "netns"}`: admit and start a VM (201), or say why not (400, 409, 503) |
//! | `GET /api/v1/vms/{name}/wait` | answers when the VM has ended: `{"exit_code", "exit_reason"}` |
//! | `PUT /api/v1/vms/{name}/kill` | end the VM at once (exit code 137) |
//! | `DELETE /api/v1/vms/{name}` | forget an ended VM's exit (its name can be admitted again) |
//!
//! Errors are `{"error": "..."}` with 400 (bad request body), 404 (no such VM or path), 405
//! (wrong method) or 409 (a state that does not allow it: resuming a running VM...).
//!
//! The API thread only speaks HTTP: it parses a request, hands it to the thread that owns the
//! VM ([`crate::control::controller`], through [`crate::control::registry`]) and goes on; that thread does the work and answers the
//! client. A long operation (a migration) therefore never holds the API up, and the API
//! thread's seccomp list has no `ioctl` and no file creation.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::snapshot::channel::{Destination, TlsFiles};
use crate::snapshot::migrate::CopyMode;
use thiserror::Error;

use crate::control::admit::{Admission, AdmitEvent, Node};
use crate::control::registry::Registry;
use crate::control::request::{ControlReply, ControlRequest, Replier};
use crate::policy::pool::Pool;

/// Control API failures.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket path is unusable.
    #[error("--api-sock {path}: {reason}")]
    Socket {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Largest request body accepted.
const MAX_BODY: u64 = 64 * 1024;

/// The Prometheus families: name, type, help (the values come from each VM's owner).
pub(crate) const FAMILIES: [(&str, &str, &str); 20] = [
    ("elastic_vm_up", "gauge", "1 while the VM runs (0 paused or sleeping)"),
    ("elastic_vcpus_online", "gauge", "vCPUs online"),
    ("elastic_vcpus_min", "gauge", "vCPU policy min"),
    ("elastic_vcpus_max", "gauge", "vCPU policy max"),
    ("elastic_vcpus_burst", "gauge", "vCPU policy burst"),
    ("elastic_memory_bytes", "gauge", "guest memory held"),
    ("elastic_memory_min_bytes", "gauge", "memory policy min"),
    ("elastic_memory_max_bytes", "gauge", "memory policy max"),
    ("elastic_memory_burst_bytes", "gauge", "memory policy burst"),
    ("elastic_hypercalls_total", "counter", "hypercalls served"),
    ("elastic_vcpu_ups_total", "counter", "vCPUs brought up"),
    ("elastic_vcpu_downs_total", "counter", "vCPUs taken down"),
    ("elastic_memory_grants_total", "counter", "memory grants"),
    ("elastic_memory_releases_total", "counter", "memory releases"),
    ("elastic_denied_total", "counter", "requests refused above the ceiling"),
    ("elastic_reclaims_total", "counter", "reclaim notices"),
    ("elastic_violations_total", "counter", "reclaims not answered in grace"),
    ("elastic_vsock_connections_total", "counter", "client connections accepted"),
    ("elastic_uptime_seconds", "gauge", "time since the VM was created"),
    (
        "elastic_host_cpu_seconds_total",
        "counter",
        "CPU time of the shim process serving the VM (shared by a pool's VMs)",
    ),
];

/// The API server thread (stopped and its socket removed when dropped).
pub(crate) struct ApiServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Dropped here, after the thread ended: closing the server removes its socket file,
    /// which the API thread's seccomp list does not allow.
    server: Arc<tiny_http::Server>,
}

impl ApiServer {
    /// Listens on `path` (which must not exist) and serves the VMs of `registry`, in `pool`;
    /// with `node`, it also admits VMs.
    pub(crate) fn start(
        path: &Path,
        registry: Registry,
        pool: Arc<Pool>,
        node: Option<Node>,
    ) -> Result<ApiServer, ApiError> {
        let err = |reason: String| ApiError::Socket { path: path.display().to_string(), reason };
        if path.exists() {
            return Err(err("already exists (remove it first)".into()));
        }
        let server = Arc::new(tiny_http::Server::http_unix(path).map_err(|e| err(e.to_string()))?);
        let served = Arc::clone(&server);
        // /proc figures are opened now: the thread may not open files once narrowed.
        let _ = crate::host::process::process_rss_bytes();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::host::seccomp::install_thread(crate::host::seccomp::Role::Api);
                while !stop2.load(Ordering::Acquire) {
                    match served.recv_timeout(Duration::from_millis(100)) {
                        Ok(Some(request)) => serve(request, &registry, &pool, node.as_ref()),
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            })
            .map_err(|e| err(format!("cannot start the API thread: {e}")))?;
        Ok(ApiServer { stop, thread: Some(thread), path: path.to_path_buf(), server })
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the thread's wait at once (else the join waits out its 100 ms: a `receive`
        // that stops its waiting API when the source arrives held the source that long).
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An answer to the client.
struct Reply {
    status: u16,
    body: String,
    content_type: &'static str,
}

impl From<ControlReply> for Reply {
    fn from(r: ControlReply) -> Reply {
        Reply { status: r.status, body: format!("{}\n", r.body), content_type: "application/json" }
    }
}

fn error(status: u16, message: impl std::fmt::Display) -> Reply {
    ControlReply::error(status, message).into()
}

fn respond(request: tiny_http::Request, reply: Reply) {
    let mut response = tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], reply.content_type.as_bytes()) {
        response = response.with_header(h);
    }
    let _ = request.respond(response);
}

/// What to do with a request.
enum Route {
    /// Answer now.
    Now(Reply),
    /// Ask one VM's owner.
    One(String, ControlRequest),
    /// Ask every VM's owner and combine the answers.
    All(ControlRequest, fn(Vec<Value>) -> Reply),
    /// The pool's figures.
    Pool,
    /// Admit a VM (a node pool).
    Admit(Box<Admission>),
    /// Answer when this admitted VM has ended.
    Wait(String),
    /// Forget this ended VM.
    Forget(String),
}

/// The refusal of a node pool's request by a pool that does not admit VMs.
const NOT_A_NODE: &str = "this shim does not admit VMs while it runs (`hypervisor-shim pool --serve` does)";

fn serve(mut request: tiny_http::Request, registry: &Registry, pool: &Pool, node: Option<&Node>) {
    let mut body = String::new();
    let read = request.as_reader().take(MAX_BODY).read_to_string(&mut body);
    let route = match read {
        Ok(_) => route(request.method(), request.url(), &body),
        Err(e) => Route::Now(error(400, format!("unreadable request body: {e}"))),
    };
    match route {
        Route::Now(reply) => respond(request, reply),
        Route::Pool => respond(request, ControlReply::ok(pool_figures(pool, registry.names().len())).into()),
        Route::Admit(_) | Route::Wait(_) | Route::Forget(_) if node.is_none() => {
            respond(request, error(405, NOT_A_NODE))
        }
        Route::Admit(admission) => {
            let Some(node) = node else { return };
            let name = admission.config.name().to_string();
            if node.closing.load(Ordering::Acquire) {
                return respond(request, error(503, "the pool is shutting down: it admits no more VMs"));
            }
            if registry.names().contains(&name) || !node.exits.claim(&name) {
                return respond(request, error(409, format!("a VM named '{name}' exists in this pool")));
            }
            let replier = Replier::new(&name, move |r| respond(request, r.into()));
            if let Err(e) = node.admit.send(AdmitEvent::Admit(admission, replier)) {
                node.exits.refused(&name);
                if let AdmitEvent::Admit(_, replier) = e.0 {
                    replier.reply(ControlReply::error(503, "the pool is shutting down: it admits no more VMs"));
                }
            }
        }
        Route::Wait(name) => {
            let Some(node) = node else { return };
            let replier = Replier::new(&name, move |r| respond(request, r.into()));
            if let Err(replier) = node.exits.wait(&name, replier) {
                replier.reply(ControlReply::error(404, format!("no admitted VM named '{name}'")));
            }
        }
        Route::Forget(name) => {
            let Some(node) = node else { return };
            respond(request, node.exits.forget(&name).into());
        }
        Route::One(name, what) => {
            let replier = Replier::new(&name, move |r| respond(request, r.into()));
            // No such VM: the replier answers 404 as it goes.
            let _ = registry.send(&name, what, replier);
        }
        Route::All(what, combine) => {
            let names = registry.names();
            let gather = Gather::new(names.len(), move |answers| respond(request, combine(answers)));
            for (i, name) in names.iter().enumerate() {
                let g = gather.clone();
                let replier = Replier::new(name, move |r| g.answer(i, (r.status == 200).then_some(r.body)));
                let _ = registry.send(name, what.clone(), replier);
            }
        }
    }
}

/// What a [`Gather`] waits for: how many answers are still out, those in (by VM), and what to
/// do with them.
struct Gathering {
    left: usize,
    answers: Vec<Option<Value>>,
    done: Option<Box<dyn FnOnce(Vec<Value>) + Send>>,
}

/// Answers from several VMs, combined once the last one is in.
#[derive(Clone)]
struct Gather(Arc<Mutex<Gathering>>);

impl Gather {
    fn new(n: usize, done: impl FnOnce(Vec<Value>) + Send + 'static) -> Gather {
        let g = Gather(Arc::new(Mutex::new(Gathering { left: n, answers: vec![None; n], done: Some(Box::new(done)) })));
        if n == 0 {
            g.finish();
        }
        g
    }

    fn answer(&self, i: usize, v: Option<Value>) {
        let last = {
            let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = inner.answers.get_mut(i) {
                *slot = v;
            }
            inner.left = inner.left.saturating_sub(1);
            inner.left == 0
        };
        if last {
            self.finish();
        }
    }

    fn finish(&self) {
        let (done, answers) = {
            let mut inner = self.0.lock().unwrap_or_else(|p| p.into_inner());
            (inner.done.take(), std::mem::take(&mut inner.answers))
        };
        if let Some(done) = done {
            done(answers.into_iter().flatten().collect());
        }
    }
}

/// The pool's capacity, use and peak (`GET /api/v1/pool`).
fn pool_figures(pool: &Pool, vms: usize) -> Value {
    let c = pool.capacity();
    let ([used_vcpus, used_memory], [peak_vcpus, peak_memory]) = (pool.used(), pool.peak());
    let limit = |v: u64| if v == u64::MAX { Value::Null } else { v.into() };
    serde_json::json!({
        "vcpus": limit(c.vcpus),
        "memory_bytes": limit(c.memory),
        "used_vcpus": used_vcpus,
        "used_memory_bytes": used_memory,
        "peak_vcpus": peak_vcpus,
        "peak_memory_bytes": peak_memory,
        "vms": vms,
        "pid": std::process::id(),
    })
}

fn route(method: &tiny_http::Method, url: &str, body: &str) -> Route {
    use tiny_http::Method::{Delete, Get, Post, Put};
    let path = url.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (Get, ["metrics"]) => Route::All(ControlRequest::Metrics, metrics),
        (Get, ["api", "v1", "vms"]) => {
            Route::All(ControlRequest::Brief, |list| ControlReply { status: 200, body: Value::Array(list) }.into())
        }
        (Get, ["api", "v1", "pool"]) => Route::Pool,
        (Post, ["api", "v1", "vms"]) => match Admission::parse(body) {
            Ok(a) => Route::Admit(Box::new(a)),
            Err(e) => Route::Now(error(400, e)),
        },
        (Get, ["api", "v1", "vms", name]) => Route::One(name.to_string(), ControlRequest::Get),
        (Get, ["api", "v1", "vms", name, "wait"]) => Route::Wait(name.to_string()),
        (Delete, ["api", "v1", "vms", name]) => Route::Forget(name.to_string()),
        (Put, ["api", "v1", "vms", name, action]) => match action_request(action, body) {
            Ok(what) => Route::One(name.to_string(), what),
            Err(reply) => Route::Now(reply),
        },
        (
            _,
            ["metrics"]
            | ["api", "v1", "pool"]
            | ["api", "v1", "vms"]
            | ["api", "v1", "vms", _]
            | ["api", "v1", "vms", _, _],
        ) => Route::Now(error(405, format!("{method} is not allowed on {path}"))),
        _ => Route::Now(error(404, format!("no such path: {path}"))),
    }
}

fn action_request(action: &str, body: &str) -> Result<ControlRequest, Reply> {
    match action {
        "pause" => Ok(ControlRequest::Pause),
        "resume" => Ok(ControlRequest::Resume),
        "stop" => Ok(ControlRequest::Stop),
        "kill" => Ok(ControlRequest::Kill),
        "policy" => policy_request(body),
        "snapshot" => {
            let dir = PathBuf::from(body_string(body, "dir")?);
            if !dir.is_absolute() {
                return Err(error(400, format!("\"dir\" must be an absolute path (got {})", dir.display())));
            }
            Ok(ControlRequest::Snapshot { dir })
        }
        "migrate" => migrate_request(body),
        other => {
            Err(error(404, format!("no such action: {other} (pause, resume, stop, kill, policy, snapshot, migrate)")))
        }
    }
}

/// The string `key` of a JSON object body.
/// `{"to": "unix:PATH" | "tcp:HOST:PORT", "verify": bool, "postcopy": bool, "tls": {"cert", "key", "ca"}}`.
fn migrate_request(body: &str) -> Result<ControlRequest, Reply> {
    let to = body_string(body, "to")?;
    let v: Value = serde_json::from_str(body).unwrap_or_default();
    let verify = v["verify"].as_bool().unwrap_or(false);
    let how = match (verify, v["postcopy"].as_bool().unwrap_or(false)) {
        (true, true) => {
            return Err(error(
                400,
                "\"verify\" checks pre-copied pages before the switch; \"postcopy\" sends each page once, after it",
            ));
        }
        (false, true) => CopyMode::Post,
        (true, false) => CopyMode::PreVerified,
        (false, false) => CopyMode::Pre,
    };
    let tls = match v.get("tls") {
        None | Some(Value::Null) => None,
        Some(t) => {
            let file = |key: &str| -> Result<PathBuf, Reply> {
                match t.get(key).and_then(Value::as_str) {
                    Some(p) if Path::new(p).is_absolute() => Ok(PathBuf::from(p)),
                    _ => Err(error(400, format!("\"tls\" needs \"{key}\": an absolute path"))),
                }
            };
            Some(TlsFiles { cert: file("cert")?, key: file("key")?, ca: file("ca")? })
        }
    };
    let to = Destination::parse(&to, tls).map_err(|e| error(400, format!("\"to\": {e}")))?;
    if let Destination::Unix(p) = &to
        && !p.is_absolute()
    {
        return Err(error(400, format!("\"to\": unix:PATH needs an absolute path (got {})", p.display())));
    }
    Ok(ControlRequest::Migrate { to, how })
}

fn body_string(body: &str, key: &str) -> Result<String, Reply> {
    let v: Value = serde_json::from_str(body).map_err(|e| error(400, format!("the body is not JSON: {e}")))?;
    match v.get(key).and_then(Value::as_str) {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(error(400, format!("the body must be an object with a string \"{key}\""))),
    }
}

fn policy_request(body: &str) -> Result<ControlRequest, Reply> {
    let v: Value = serde_json::from_str(body).map_err(|e| error(400, format!("the body is not JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(error(400, "the body must be an object with \"vcpus\" and/or \"memory\""));
    };
    if let Some(k) = obj.keys().find(|k| *k != "vcpus" && *k != "memory") {
        return Err(error(400, format!("unknown key \"{k}\" (vcpus, memory)")));
    }
    let parse =
        |key: &str, grammar: fn(&str) -> Result<crate::base::config::Policy, elastic_config::PolicyError>| match obj
            .get(key)
        {
            None => Ok(None),
            Some(Value::String(text)) => grammar(text).map(Some).map_err(|e| error(400, format!("{key}: {e}"))),
            Some(_) => Err(error(400, format!("\"{key}\" must be a string MIN:MAX:BURST"))),
        };
    let vcpus = parse("vcpus", crate::base::config::parse_vcpu_policy)?;
    let memory = parse("memory", crate::base::config::parse_memory_policy)?;
    if vcpus.is_none() && memory.is_none() {
        return Err(error(400, "nothing to change: give \"vcpus\" and/or \"memory\""));
    }
    Ok(ControlRequest::SetPolicy { vcpus, memory })
}

/// Prometheus text format (version 0.0.4) from each VM's figures.
fn metrics(vms: Vec<Value>) -> Reply {
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}.");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for vm in &vms {
            let value = vm["values"][name].as_f64().unwrap_or(0.0);
            let (n, app) = (vm["name"].as_str().unwrap_or(""), vm["app"].as_str().unwrap_or(""));
            let _ = writeln!(out, "{name}{{vm=\"{n}\",app=\"{app}\"}} {value}");
        }
    }
    let _ = writeln!(out, "# HELP elastic_process_resident_bytes The shim's resident set size.");
    let _ = writeln!(out, "# TYPE elastic_process_resident_bytes gauge");
    let _ = writeln!(out, "elastic_process_resident_bytes {}", crate::host::process::process_rss_bytes());
    Reply { status: 200, body: out, content_type: "text/plain; version=0.0.4" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(method: tiny_http::Method, url: &str, body: &str) -> Result<ControlRequest, u16> {
        match route(&method, url, body) {
            Route::One(_, r) | Route::All(r, _) => Ok(r),
            Route::Now(reply) => Err(reply.status),
            Route::Pool | Route::Admit(_) | Route::Wait(_) | Route::Forget(_) => Err(0),
        }
    }

    #[test]
    fn requests_are_parsed_before_any_vm_sees_them() {
        use tiny_http::Method::{Delete, Get, Post, Put};
        assert_eq!(req(Get, "/api/v1/vms/kv", ""), Ok(ControlRequest::Get));
        assert_eq!(req(Put, "/api/v1/vms/kv/pause", ""), Ok(ControlRequest::Pause));
        assert_eq!(
            req(Put, "/api/v1/vms/kv/snapshot", r#"{"dir": "/tmp/s"}"#),
            Ok(ControlRequest::Snapshot { dir: "/tmp/s".into() })
        );
        assert_eq!(req(Put, "/api/v1/vms/kv/snapshot", r#"{"dir": "rel"}"#), Err(400));
        assert_eq!(
            req(Put, "/api/v1/vms/kv/migrate", r#"{"to": "unix:/tmp/m", "verify": true}"#),
            Ok(ControlRequest::Migrate { to: Destination::Unix("/tmp/m".into()), how: CopyMode::PreVerified })
        );
        assert_eq!(
            req(Put, "/api/v1/vms/kv/migrate", r#"{"to": "unix:/tmp/m", "postcopy": true}"#),
            Ok(ControlRequest::Migrate { to: Destination::Unix("/tmp/m".into()), how: CopyMode::Post })
        );
        assert_eq!(
            req(Put, "/api/v1/vms/kv/migrate", r#"{"to": "unix:/tmp/m", "postcopy": true, "verify": true}"#),
            Err(400)
        );
        assert_eq!(req(Put, "/api/v1/vms/kv/migrate", r#"{"to": "unix:rel"}"#), Err(400));
        // TCP is always mutual TLS, from absolute paths.
        assert_eq!(req(Put, "/api/v1/vms/kv/migrate", r#"{"to": "tcp:1.2.3.4:5"}"#), Err(400));
        let tls = r#""tls": {"cert": "/c.pem", "key": "/k.pem", "ca": "/ca.pem"}"#;
        assert_eq!(
            req(Put, "/api/v1/vms/kv/migrate", &format!(r#"{{"to": "tcp:1.2.3.4:5", {tls}}}"#)),
            Ok(ControlRequest::Migrate {
                to: Destination::Tcp {
                    host: "1.2.3.4".into(),
                    port: 5,
                    tls: TlsFiles { cert: "/c.pem".into(), key: "/k.pem".into(), ca: "/ca.pem".into() }
                },
                how: CopyMode::Pre
            })
        );
        let relative = r#""tls": {"cert": "c.pem", "key": "/k.pem", "ca": "/ca.pem"}"#;
        assert_eq!(req(Put, "/api/v1/vms/kv/migrate", &format!(r#"{{"to": "tcp:h:5", {relative}}}"#)), Err(400));
        assert!(matches!(
            req(Put, "/api/v1/vms/kv/policy", r#"{"vcpus": "1:2:4"}"#),
            Ok(ControlRequest::SetPolicy { vcpus: Some(_), memory: None })
        ));
        assert_eq!(req(Put, "/api/v1/vms/kv/policy", r#"{"vcpus": "1:65:65"}"#), Err(400));
        assert_eq!(req(Put, "/api/v1/vms/kv/policy", r#"{"cpus": "1"}"#), Err(400));
        assert_eq!(req(Put, "/api/v1/vms/kv/policy", "{}"), Err(400));
        assert_eq!(req(Put, "/api/v1/vms/kv/jump", ""), Err(404));
        assert_eq!(req(Put, "/api/v1/vms/kv/kill", ""), Ok(ControlRequest::Kill));
        assert!(matches!(route(&Delete, "/api/v1/vms/kv", ""), Route::Forget(n) if n == "kv"));
        assert!(matches!(route(&Get, "/api/v1/vms/kv/wait", ""), Route::Wait(n) if n == "kv"));
        assert!(matches!(route(&Get, "/api/v1/pool", ""), Route::Pool));
        let body = r#"{"name": "a", "app": "kv", "kernel": "/k"}"#;
        assert!(matches!(route(&Post, "/api/v1/vms", body), Route::Admit(_)));
        assert_eq!(req(Post, "/api/v1/vms", "{}"), Err(400));
        assert_eq!(req(Delete, "/api/v1/pool", ""), Err(405));
        assert_eq!(req(Get, "/nope", ""), Err(404));
    }

    #[test]
    fn a_gather_answers_once_with_what_came() {
        let (tx, rx) = std::sync::mpsc::channel();
        let g = Gather::new(3, move |v| tx.send(v).unwrap());
        g.answer(2, Some(json!(2)));
        g.answer(0, None);
        assert!(rx.try_recv().is_err());
        g.answer(1, Some(json!(1)));
        assert_eq!(rx.try_recv().unwrap(), vec![json!(1), json!(2)]);
        let (tx, rx) = std::sync::mpsc::channel();
        let _none = Gather::new(0, move |v| tx.send(v).unwrap());
        assert_eq!(rx.try_recv().unwrap(), Vec::<Value>::new());
    }
}
