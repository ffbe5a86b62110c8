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
//! | `PUT /api/v1/vms/{name}/migrate` | `{"to": "unix:PATH", "verify": false}`: move it to `receive --listen` |
//! | `GET /metrics` | Prometheus text format |
//!
//! Errors are `{"error": "..."}` with 400 (bad request body), 404 (no such VM or path), 405
//! (wrong method) or 409 (a state that does not allow it: resuming a running VM...).

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;

use crate::policy::admission::Members;
use crate::policy::resource::Resource;
use crate::vmm::vm::{Outcome, VmShared};

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

/// How long `pause` waits for running vCPUs to leave the guest before answering.
const PAUSE_WAIT: Duration = Duration::from_secs(1);
/// Largest request body accepted.
const MAX_BODY: u64 = 64 * 1024;

/// The API server thread (stopped and its socket removed when dropped).
#[derive(Debug)]
pub struct ApiServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path` (which must not exist) and serves the VMs of `members`.
    pub fn start(path: &Path, members: Members) -> Result<ApiServer, ApiError> {
        let err = |reason: String| ApiError::Socket { path: path.display().to_string(), reason };
        if path.exists() {
            return Err(err("already exists (remove it first)".into()));
        }
        let server = tiny_http::Server::http_unix(path).map_err(|e| err(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::host::seccomp::install_thread(crate::host::seccomp::Role::Api);
                while !stop2.load(Ordering::Acquire) {
                    match server.recv_timeout(Duration::from_millis(100)) {
                        Ok(Some(request)) => serve(request, &members),
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            })
            .map_err(|e| err(format!("cannot start the API thread: {e}")))?;
        Ok(ApiServer { stop, thread: Some(thread), path: path.to_path_buf() })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An answer: status and body.
struct Reply {
    status: u16,
    body: String,
    content_type: &'static str,
}

impl Reply {
    fn json(status: u16, v: &Value) -> Reply {
        Reply { status, body: format!("{v}\n"), content_type: "application/json" }
    }

    fn error(status: u16, message: impl std::fmt::Display) -> Reply {
        Reply::json(status, &json!({ "error": message.to_string() }))
    }
}

fn serve(mut request: tiny_http::Request, members: &Members) {
    let mut body = String::new();
    let read = request.as_reader().take(MAX_BODY).read_to_string(&mut body);
    let reply = match read {
        Ok(_) => route(request.method(), request.url(), &body, members),
        Err(e) => Reply::error(400, format!("unreadable request body: {e}")),
    };
    let mut response = tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
    if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], reply.content_type.as_bytes()) {
        response = response.with_header(h);
    }
    let _ = request.respond(response);
}

fn route(method: &tiny_http::Method, url: &str, body: &str, members: &Members) -> Reply {
    use tiny_http::Method::{Get, Put};
    let path = url.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let find = |name: &str| members.list().into_iter().find(|vm| vm.name == name);
    match (method, parts.as_slice()) {
        (Get, ["metrics"]) => {
            Reply { status: 200, body: metrics(&members.list()), content_type: "text/plain; version=0.0.4" }
        }
        (Get, ["api", "v1", "vms"]) => {
            let list: Vec<Value> = members.list().iter().map(|vm| brief(vm)).collect();
            Reply::json(200, &Value::Array(list))
        }
        (Get, ["api", "v1", "vms", name]) => match find(name) {
            Some(vm) => Reply::json(200, &live(&vm)),
            None => no_such_vm(name),
        },
        (Put, ["api", "v1", "vms", name, action]) => match find(name) {
            None => no_such_vm(name),
            Some(vm) => act(&vm, action, body),
        },
        (_, ["metrics"] | ["api", "v1", "vms"] | ["api", "v1", "vms", _] | ["api", "v1", "vms", _, _]) => {
            Reply::error(405, format!("{method} is not allowed on {path}"))
        }
        _ => Reply::error(404, format!("no such path: {path}")),
    }
}

fn no_such_vm(name: &str) -> Reply {
    Reply::error(404, format!("no running VM named '{name}'"))
}

fn state(vm: &VmShared) -> &'static str {
    if vm.is_stopping() {
        "stopping"
    } else if vm.is_paused() {
        "paused"
    } else {
        "running"
    }
}

fn brief(vm: &VmShared) -> Value {
    json!({
        "name": vm.name,
        "app": vm.app,
        "state": state(vm),
        "vcpus": vm.vcpu_set.online(),
        "memory_bytes": vm.memory_held(),
        "uptime_us": vm.started.elapsed().as_micros() as u64,
    })
}

/// The summary's keys, live (`state` instead of `exit_code` and `exit_reason`).
fn live(vm: &VmShared) -> Value {
    let report = vm.report(Outcome::NoVm);
    let [pv, pm] = &report.policy;
    let summary = crate::report::summary::Summary::new(&report, &vm.name, &vm.app, pv.limits, pm.limits, 0);
    let mut v = serde_json::to_value(summary).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("exit_code");
        o.remove("exit_reason");
        o.remove("started_monotonic_ns");
        o.insert("state".into(), state(vm).into());
    }
    v
}

/// Adds `took_us`: how long the operation took inside the shim (pause: until every running
/// vCPU left the guest).
fn with_took(mut v: Value, since: std::time::Instant) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.insert("took_us".into(), (since.elapsed().as_micros() as u64).into());
    }
    v
}

fn act(vm: &VmShared, action: &str, body: &str) -> Reply {
    match action {
        "pause" => {
            let t = std::time::Instant::now();
            if vm.pause(PAUSE_WAIT) {
                Reply::json(200, &with_took(brief(vm), t))
            } else {
                Reply::error(409, format!("VM '{}' is already paused", vm.name))
            }
        }
        "resume" => {
            let t = std::time::Instant::now();
            if vm.resume() {
                Reply::json(200, &with_took(brief(vm), t))
            } else {
                Reply::error(409, format!("VM '{}' is not paused", vm.name))
            }
        }
        "stop" => {
            vm.post_notice(hypercall_abi::notice::STOP, |_| {});
            Reply::json(202, &brief(vm))
        }
        "policy" => policy(vm, body),
        "snapshot" => snapshot(vm, body),
        "migrate" => migrate(vm, body),
        other => Reply::error(404, format!("no such action: {other} (pause, resume, stop, policy, snapshot, migrate)")),
    }
}

/// The string `key` of a JSON object body.
fn body_string(body: &str, key: &str) -> Result<String, Reply> {
    let v: Value = serde_json::from_str(body).map_err(|e| Reply::error(400, format!("the body is not JSON: {e}")))?;
    match v.get(key).and_then(Value::as_str) {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(Reply::error(400, format!("the body must be an object with a string \"{key}\""))),
    }
}

fn snapshot(vm: &VmShared, body: &str) -> Reply {
    let dir = match body_string(body, "dir") {
        Ok(d) => PathBuf::from(d),
        Err(r) => return r,
    };
    if !dir.is_absolute() {
        return Reply::error(400, format!("\"dir\" must be an absolute path (got {})", dir.display()));
    }
    if vm.is_stopping() {
        return Reply::error(409, format!("VM '{}' is stopping", vm.name));
    }
    match crate::snapshot::save(vm, &dir) {
        Ok(f) => Reply::json(200, &serde_json::to_value(f).unwrap_or(Value::Null)),
        Err(e) => Reply::error(500, e),
    }
}

fn migrate(vm: &VmShared, body: &str) -> Reply {
    let to = match body_string(body, "to") {
        Ok(t) => t,
        Err(r) => return r,
    };
    let Some(path) = to.strip_prefix("unix:") else {
        return Reply::error(400, format!("\"to\" must be unix:PATH (got {to})"));
    };
    if vm.is_stopping() {
        return Reply::error(409, format!("VM '{}' is stopping", vm.name));
    }
    let verify = serde_json::from_str::<Value>(body).ok().and_then(|v| v["verify"].as_bool()).unwrap_or(false);
    match crate::snapshot::migrate::send(vm, Path::new(path), verify) {
        Ok(f) => {
            vm.finish(Outcome::Migrated { to: to.clone() });
            Reply::json(200, &serde_json::to_value(f).unwrap_or(Value::Null))
        }
        Err(e) => Reply::error(500, format!("{e} (the VM keeps running here)")),
    }
}

fn policy(vm: &VmShared, body: &str) -> Reply {
    let v: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => return Reply::error(400, format!("the body is not JSON: {e}")),
    };
    let Some(obj) = v.as_object() else {
        return Reply::error(400, "the body must be an object with \"vcpus\" and/or \"memory\"");
    };
    if let Some(k) = obj.keys().find(|k| *k != "vcpus" && *k != "memory") {
        return Reply::error(400, format!("unknown key \"{k}\" (vcpus, memory)"));
    }
    let mut changes = Vec::new();
    for (key, r) in [("vcpus", Resource::Vcpus), ("memory", Resource::Memory)] {
        let Some(val) = obj.get(key) else { continue };
        let Some(text) = val.as_str() else {
            return Reply::error(400, format!("\"{key}\" must be a string MIN:MAX:BURST"));
        };
        let parsed = match r {
            Resource::Vcpus => crate::base::config::parse_vcpu_policy(text),
            Resource::Memory => crate::base::config::parse_memory_policy(text),
        };
        match parsed {
            Ok(p) => changes.push((r, p)),
            Err(e) => return Reply::error(400, format!("{key}: {e}")),
        }
    }
    if changes.is_empty() {
        return Reply::error(400, "nothing to change: give \"vcpus\" and/or \"memory\"");
    }
    // Check every change before applying any.
    for (r, p) in &changes {
        let cur = vm.policy.resource(*r).limits;
        if p.min != cur.min {
            return Reply::error(400, format!("{}: min cannot change on a running VM (it is {})", r.name(), cur.min));
        }
    }
    for (r, p) in changes {
        let held = match r {
            Resource::Vcpus => u64::from(vm.vcpu_set.online()),
            Resource::Memory => vm.memory_held(),
        };
        if let Err(e) = vm.policy.set_limits(r, p, held) {
            return Reply::error(400, e);
        }
        vm.record(
            "policy",
            crate::base::timeline::detail([
                ("resource", r.name().into()),
                ("min", p.min.into()),
                ("max", p.max.into()),
                ("burst", p.burst.into()),
            ]),
        );
    }
    Reply::json(200, &live(vm))
}

/// Prometheus text format (version 0.0.4).
fn metrics(vms: &[Arc<VmShared>]) -> String {
    let mut out = String::new();
    type Get = fn(&VmShared, &crate::vmm::vm::RunReport) -> f64;
    let families: [(&str, &str, &str, Get); 16] = [
        ("elastic_vm_up", "gauge", "1 while the VM runs (0 paused)", |vm, _| f64::from(u8::from(!vm.is_paused()))),
        ("elastic_vcpus_online", "gauge", "vCPUs online", |_, r| f64::from(r.vcpus.online)),
        ("elastic_vcpus_min", "gauge", "vCPU policy min", |_, r| r.policy[0].limits.min as f64),
        ("elastic_vcpus_max", "gauge", "vCPU policy max", |_, r| r.policy[0].limits.max as f64),
        ("elastic_vcpus_burst", "gauge", "vCPU policy burst", |_, r| r.policy[0].limits.burst as f64),
        ("elastic_memory_bytes", "gauge", "guest memory held", |_, r| r.memory.final_bytes as f64),
        ("elastic_memory_max_bytes", "gauge", "memory policy max", |_, r| r.policy[1].limits.max as f64),
        ("elastic_hypercalls_total", "counter", "hypercalls served", |_, r| r.hypercalls as f64),
        ("elastic_vcpu_ups_total", "counter", "vCPUs brought up", |_, r| r.vcpus.ups as f64),
        ("elastic_memory_grants_total", "counter", "memory grants", |_, r| r.memory.grants as f64),
        ("elastic_memory_releases_total", "counter", "memory releases", |_, r| r.memory.releases as f64),
        ("elastic_denied_total", "counter", "requests refused above the ceiling", |_, r| r.denied as f64),
        ("elastic_reclaims_total", "counter", "reclaim notices", |_, r| {
            (r.policy[0].reclaims + r.policy[1].reclaims) as f64
        }),
        ("elastic_violations_total", "counter", "reclaims not answered in grace", |_, r| {
            (r.policy[0].violations + r.policy[1].violations) as f64
        }),
        ("elastic_vsock_connections_total", "counter", "client connections accepted", |_, r| {
            r.vsock.as_ref().map_or(0.0, |v| v.connections as f64)
        }),
        ("elastic_uptime_seconds", "gauge", "time since the VM was created", |vm, _| {
            vm.started.elapsed().as_secs_f64()
        }),
    ];
    let reports: Vec<_> = vms.iter().map(|vm| (vm, vm.report(Outcome::NoVm))).collect();
    for (name, kind, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}.");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (vm, r) in &reports {
            let _ = writeln!(out, "{name}{{vm=\"{}\",app=\"{}\"}} {}", vm.name, vm.app, get(vm, r));
        }
    }
    let _ = writeln!(out, "# HELP elastic_process_resident_bytes The shim's resident set size.");
    let _ = writeln!(out, "# TYPE elastic_process_resident_bytes gauge");
    let _ = writeln!(out, "elastic_process_resident_bytes {}", crate::base::memory::process_rss_bytes());
    out
}
