//! The shim (`start` / `delete` actions) and its task service: one task per shim process,
//! backed by one `hypervisor-shim run` child.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExit, TaskIO, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageField};
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::{timestamp, write_address};
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult, api};
use log::{info, warn};
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxResources, Spec};
use thiserror::Error;

use crate::cgroup::{self, CgroupError, Join};
use crate::checkpoint::{self, CheckpointError};
use crate::events::Events;
use crate::metrics::{Figures, MetricsError};
use crate::node::{self, NodeError, NodePool};
use crate::rootfs::{self, RootfsError};
use crate::spec::{self, SpecError, VmPlan, Workload};
use crate::stdio::{StdioError, StdioPaths};
use crate::vmm::{self, Vmm, VmmError};

/// The runtime name containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.elastic.v1";
/// The VMM's pid, recorded in the bundle so `delete` can end it if this shim died.
const PID_FILE: &str = "vmm.pid";
/// A node pool task's pool socket and VM name (two lines), recorded in the bundle so `delete`
/// can end the VM if this shim died.
const NODE_FILE: &str = "node-pool-vm";

/// Why a task request failed.
#[derive(Debug, Error)]
pub enum TaskError {
    /// The OCI spec cannot be read.
    #[error("cannot read the OCI spec {path}: {message}")]
    Spec {
        /// `config.json`.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The spec or rootfs asks for something this runtime refuses.
    #[error(transparent)]
    Plan(#[from] SpecError),
    /// A rootfs mount failed.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// A standard stream cannot be served.
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// The VMM cannot be found, started or controlled.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A CreateTaskRequest field this runtime does not support.
    #[error("{0} is not supported by the elastic runtime")]
    Unsupported(&'static str),
    /// This shim already has its task.
    #[error("task {0} already exists in this shim")]
    Exists(String),
    /// No such task (or exec process).
    #[error("{0} not found")]
    NotFound(String),
    /// The task is not in a state that allows the request.
    #[error("task {id} is {state}: cannot {what}")]
    State {
        /// Task id.
        id: String,
        /// Its state.
        state: &'static str,
        /// The request.
        what: &'static str,
    },
    /// The task's process already exited.
    #[error("process already finished")]
    Finished,
    /// A signal the VM has no meaning for.
    #[error(
        "signal {0} is not supported: SIGTERM or SIGINT asks the guest to stop (twice ends the VM), SIGKILL kills it"
    )]
    Signal(u32),
    /// The VMM cannot join the spec's cgroup.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// A checkpoint cannot be taken into the bundle.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The task's metrics cannot be made.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// An Update whose resources cannot be read.
    #[error("cannot read the update's resources ({type_url}): {message}")]
    Resources {
        /// The resources' type.
        type_url: String,
        /// Why.
        message: String,
    },
    /// Exec: a unikernel has no second process.
    #[error(
        "exec is not supported: the VM runs one service and has no other process to start (use the service's own \
         protocol, or `hypervisor-shim ctl --api-sock BUNDLE/api.sock get|policy|pause|snapshot vm0`)"
    )]
    Exec,
    /// The node pool cannot be configured, reached or asked.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Sending a signal failed.
    #[error("cannot signal pid {pid}: {source}")]
    Kill {
        /// The VMM's pid.
        pid: u32,
        /// Why.
        source: nix::Error,
    },
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        let code = match &e {
            TaskError::Exists(_) => Code::ALREADY_EXISTS,
            TaskError::NotFound(_) | TaskError::Finished => Code::NOT_FOUND,
            TaskError::State { .. } => Code::FAILED_PRECONDITION,
            TaskError::Plan(_)
            | TaskError::Unsupported(_)
            | TaskError::Signal(_)
            | TaskError::Stdio(_)
            | TaskError::Resources { .. } => Code::INVALID_ARGUMENT,
            TaskError::Exec => Code::UNIMPLEMENTED,
            TaskError::Spec { .. }
            | TaskError::Rootfs(_)
            | TaskError::Vmm(_)
            | TaskError::Kill { .. }
            | TaskError::Cgroup(_)
            | TaskError::Checkpoint(_)
            | TaskError::Metrics(_)
            | TaskError::Node(_) => Code::UNKNOWN,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

/// The containerd-facing shim: spawns the long-lived server (`start`) and cleans up after a
/// dead one (`delete`).
pub struct ElasticShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    id: String,
    bundle: PathBuf,
}

impl std::fmt::Debug for ElasticShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElasticShim")
            .field("namespace", &self.namespace)
            .field("id", &self.id)
            .field("bundle", &self.bundle)
            .finish_non_exhaustive()
    }
}

impl containerd_shim::Shim for ElasticShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        ElasticShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle,
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        // The server died with its task: end the VM it left behind and release the rootfs.
        if let Some((node, name)) = read_node_vm(&self.bundle) {
            info!("ending VM {name} left in the node pool by a dead shim for {}", self.id);
            if node.remove(&name) {
                let _ = std::fs::remove_file(self.bundle.join(NODE_FILE));
            }
        }
        let pid = read_pid(&self.bundle);
        if let Some(pid) = pid.filter(|p| vmm_belongs_to(*p, &self.bundle)) {
            info!("ending VMM {pid} left by a dead shim for {}", self.id);
            let _ = vmm::signal(pid, Signal::SIGKILL);
        }
        // Its cgroup can go once the killed VMM has left it (it is not our child, and leaves
        // the cgroup only when it has exited): retried for a while.
        let config = self.bundle.join("config.json");
        if let Some(path) = Spec::load(&config).ok().and_then(|s| spec::cgroups_path(&s)) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !cgroup::remove_path(&path) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let rootfs = self.bundle.join(rootfs::ROOTFS_DIR);
        if let Err(e) = rootfs::unmount(&rootfs) {
            warn!("{e}");
        }
        let _ = std::fs::remove_file(self.bundle.join(vmm::API_SOCK));
        remove_shim_socket(&self.bundle);
        Ok(DeleteResponse {
            pid: pid.unwrap_or(0),
            exit_status: 128 + Signal::SIGKILL as u32,
            exited_at: MessageField::some(timestamp()?),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService {
            inner: Arc::new(Inner {
                namespace: self.namespace.clone(),
                events: Events::start(publisher, self.namespace.clone()),
                exit: self.exit.clone(),
                task: Mutex::new(None),
                exited: Condvar::new(),
            }),
        }
    }
}

/// The ttrpc task service.
#[derive(Debug, Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    events: Events,
    exit: Arc<ExitSignal>,
    task: Mutex<Option<Task>>,
    exited: Condvar,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("task", &self.task).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Created => "created",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Stopped => "stopped",
        }
    }

    fn status(self) -> api::Status {
        match self {
            Phase::Created => api::Status::CREATED,
            Phase::Running => api::Status::RUNNING,
            Phase::Paused => api::Status::PAUSED,
            Phase::Stopped => api::Status::STOPPED,
        }
    }
}

/// How a VM task runs.
#[derive(Debug)]
struct VmRun {
    vmm: Vmm,
    args: Vec<std::ffi::OsString>,
    /// What it runs; its policies follow Updates.
    plan: VmPlan,
    /// `--api-sock` as passed (absolute, or relative to the bundle).
    api_sock: PathBuf,
    /// The cgroup directories this shim created for the VMM (removed at delete).
    cgroup_created: Vec<PathBuf>,
    /// Restored from a checkpoint, and no Update since: its policies are the snapshot's, not
    /// the plan's, until the first Update reads them from the VMM.
    restored: bool,
    /// The VM's name on the control API: [`vmm::VM_NAME`] for a VMM of its own,
    /// `NAMESPACE:ID` in the node pool.
    vm_name: String,
    /// The node pool it runs in (`api_sock` is then the pool's), or `None`: a VMM of its own.
    node: Option<NodePool>,
    /// The checkpoint it is restored from (moved into the bundle).
    restore_dir: Option<PathBuf>,
}

impl VmRun {
    /// The control API path of this VM's `action` (`""`: the VM itself).
    fn api_path(&self, action: &str) -> String {
        if action.is_empty() {
            format!("/api/v1/vms/{}", self.vm_name)
        } else {
            format!("/api/v1/vms/{}/{action}", self.vm_name)
        }
    }
}

#[derive(Debug)]
struct Task {
    id: String,
    bundle: PathBuf,
    stdio: StdioPaths,
    /// The rootfs this shim mounted (unmounted at delete).
    mounted_rootfs: Option<PathBuf>,
    /// `None` for a pod sandbox.
    vm: Option<VmRun>,
    pid: u32,
    phase: Phase,
    exit_status: u32,
    exited_at: Option<Timestamp>,
}

impl Task {
    fn check_id(&self, id: &str) -> Result<(), TaskError> {
        if id != self.id { Err(TaskError::NotFound(format!("task {id}"))) } else { Ok(()) }
    }

    fn state_error(&self, what: &'static str) -> TaskError {
        TaskError::State { id: self.id.clone(), state: self.phase.name(), what }
    }
}

fn now() -> Timestamp {
    timestamp().unwrap_or_default()
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Option<Task>> {
        self.task.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The task `id` (exec processes do not exist: the VM is the only process).
    fn task<'a>(
        guard: &'a mut MutexGuard<'_, Option<Task>>,
        id: &str,
        exec_id: &str,
    ) -> Result<&'a mut Task, TaskError> {
        if !exec_id.is_empty() {
            return Err(TaskError::NotFound(format!("exec process {exec_id}")));
        }
        let task = guard.as_mut().ok_or_else(|| TaskError::NotFound(format!("task {id}")))?;
        task.check_id(id)?;
        Ok(task)
    }

    fn create(&self, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        let mut guard = self.lock();
        if let Some(t) = guard.as_ref() {
            return Err(TaskError::Exists(t.id.clone()));
        }
        if req.terminal {
            return Err(SpecError::Terminal.into());
        }
        if !req.parent_checkpoint.is_empty() {
            return Err(TaskError::Unsupported("an incremental checkpoint (a parent checkpoint)"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let config = bundle.join("config.json");
        let spec = Spec::load(&config).map_err(|e| TaskError::Spec { path: config, message: e.to_string() })?;
        let mounted_rootfs = if req.rootfs.is_empty() { None } else { Some(rootfs::mount(&bundle, &req.rootfs)?) };
        let prepared = prepare(&spec, &bundle, req, &self.namespace).and_then(|(stdio, vm)| match vm {
            // A task restored from a checkpoint: the VM comes back from its snapshot (in a VMM
            // of its own, or in the node pool).
            Some(mut vm) if !req.checkpoint.is_empty() => {
                let dir = checkpoint::take(Path::new(&req.checkpoint), &bundle)?;
                if vm.node.is_none() {
                    vm.args = vm.vmm.restore_args(&vm.plan, &dir, &vm.api_sock);
                }
                vm.restore_dir = Some(dir);
                vm.restored = true;
                Ok((stdio, Some(vm)))
            }
            None if !req.checkpoint.is_empty() => Err(TaskError::Unsupported("restoring a pod sandbox")),
            other => Ok((stdio, other)),
        });
        let (stdio, vm) = match prepared {
            Ok(p) => p,
            Err(e) => {
                if let Some(dir) = &mounted_rootfs {
                    let _ = rootfs::unmount(dir);
                }
                return Err(e);
            }
        };
        match &vm {
            Some(VmRun { node: Some(n), vm_name, .. }) => {
                info!("task {}: VM {vm_name} in the node pool {}", req.id, n.socket.display())
            }
            Some(v) => info!("task {}: {} {}", req.id, v.vmm.path.display(), display_args(&v.args)),
            None => info!("task {}: pod sandbox (no VM)", req.id),
        }
        *guard = Some(Task {
            id: req.id.clone(),
            bundle,
            stdio,
            mounted_rootfs,
            vm,
            pid: 0,
            phase: Phase::Created,
            exit_status: 0,
            exited_at: None,
        });
        self.events.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid: 0,
            ..Default::default()
        });
        Ok(0)
    }

    fn start(self: &Arc<Self>, req: &api::StartRequest) -> Result<u32, TaskError> {
        let mut guard = self.lock();
        let task = Self::task(&mut guard, &req.id, &req.exec_id)?;
        if task.phase != Phase::Created {
            return Err(task.state_error("start"));
        }
        let pid = match &mut task.vm {
            None => std::process::id(),
            Some(VmRun { node: Some(node), vm_name, plan, vmm, restore_dir, .. }) => {
                node.ensure(vmm)?;
                // Recorded before the VM exists: a shim that dies from here on leaves a VM
                // that `delete` can find (and a name it forgets).
                let record = format!("{}\n{vm_name}\n", node.socket.display());
                if let Err(e) = std::fs::write(task.bundle.join(NODE_FILE), record) {
                    warn!("cannot record the node pool VM: {e}");
                }
                let pid = match node.admit(vm_name, plan, &task.stdio.stdout, restore_dir.as_deref()) {
                    Ok(pid) => pid,
                    Err(e) => {
                        // Refused, or no answer in time: a VM admitted late is ended.
                        if node.remove(vm_name) {
                            let _ = std::fs::remove_file(task.bundle.join(NODE_FILE));
                        }
                        return Err(e.into());
                    }
                };
                let (inner, node, name) = (Arc::clone(self), node.clone(), vm_name.clone());
                std::thread::spawn(move || {
                    let code = node.wait(&name).unwrap_or_else(|e| {
                        warn!("VM {name}: {e}: the node pool ended with it");
                        128 + Signal::SIGKILL as u8
                    });
                    inner.on_exit(pid, i32::from(code));
                });
                pid
            }
            Some(vm) => {
                let (stdout, stderr) = task.stdio.open()?;
                let _ = std::fs::remove_file(task.bundle.join(vmm::API_SOCK));
                let cgroup = vm.plan.cgroups_path.as_deref().map(Join::prepare).transpose()?;
                if let Some(join) = &cgroup {
                    vm.cgroup_created = join.created().to_vec();
                }
                let spawned =
                    vm.vmm.spawn(&vm.args, &task.bundle, (stdout, stderr), vm.plan.netns.as_deref(), cgroup.as_ref());
                let (pid, subscription) = match spawned {
                    Ok(s) => s,
                    Err(e) => {
                        cgroup::remove_dirs(&std::mem::take(&mut vm.cgroup_created));
                        return Err(e.into());
                    }
                };
                if let Err(e) = std::fs::write(task.bundle.join(PID_FILE), pid.to_string()) {
                    warn!("cannot record the VMM pid: {e}");
                }
                let inner = Arc::clone(self);
                std::thread::spawn(move || {
                    let code = vmm::wait_exit(pid, &subscription);
                    inner.on_exit(pid, code);
                });
                pid
            }
        };
        task.pid = pid;
        task.phase = Phase::Running;
        self.events.publish(TaskStart { container_id: task.id.clone(), pid, ..Default::default() });
        Ok(pid)
    }

    /// Records the VMM's exit (code, or 128 + signal).
    fn on_exit(&self, pid: u32, code: i32) {
        let mut guard = self.lock();
        let Some(task) = guard.as_mut().filter(|t| t.pid == pid) else { return };
        info!("task {}: VMM {pid} exited with {code}", task.id);
        self.stop(task, code as u32);
    }

    /// Marks `task` stopped with `status` and tells waiters and containerd.
    fn stop(&self, task: &mut Task, status: u32) {
        let at = now();
        task.phase = Phase::Stopped;
        task.exit_status = status;
        task.exited_at = Some(at.clone());
        let _ = std::fs::remove_file(task.bundle.join(PID_FILE));
        self.exited.notify_all();
        self.events.publish(TaskExit {
            container_id: task.id.clone(),
            id: task.id.clone(),
            pid: task.pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        });
    }

    fn kill(&self, req: &api::KillRequest) -> Result<(), TaskError> {
        let mut guard = self.lock();
        let task = Self::task(&mut guard, &req.id, &req.exec_id)?;
        let signal = match req.signal {
            0 => None,
            s if s == Signal::SIGKILL as u32 => Some(Signal::SIGKILL),
            s if s == Signal::SIGTERM as u32 => Some(Signal::SIGTERM),
            s if s == Signal::SIGINT as u32 => Some(Signal::SIGINT),
            s => return Err(TaskError::Signal(s)),
        };
        match (task.phase, &task.vm, signal) {
            (Phase::Stopped, _, _) => Err(TaskError::Finished),
            (_, _, None) => Ok(()),
            // Nothing runs yet: the task ends as the signal would have ended it.
            (Phase::Created, _, Some(sig)) => {
                self.stop(task, 128 + sig as u32);
                Ok(())
            }
            // A sandbox ends the way `pause` does: 0 on SIGTERM/SIGINT.
            (_, None, Some(sig)) => {
                self.stop(task, if sig == Signal::SIGKILL { 128 + sig as u32 } else { 0 });
                Ok(())
            }
            (_, Some(vm @ VmRun { node: Some(_), .. }), Some(sig)) => {
                let action = if sig == Signal::SIGKILL { "kill" } else { "stop" };
                vmm::api(&task.bundle, &vm.api_sock, ("PUT", &vm.api_path(action), ""), vmm::HELPER_TIMEOUT)
                    .map(|_| ())
                    .map_err(|e| match e {
                        VmmError::Api { source: control_client::ClientError::Refused { status: 404, .. }, .. } => {
                            TaskError::Finished
                        }
                        e => e.into(),
                    })
            }
            (_, Some(_), Some(sig)) => vmm::signal(task.pid, sig).map_err(|source| match source {
                nix::Error::ESRCH => TaskError::Finished,
                source => TaskError::Kill { pid: task.pid, source },
            }),
        }
    }

    fn pause_resume(&self, id: &str, pause: bool) -> Result<(), TaskError> {
        let mut guard = self.lock();
        let task = Self::task(&mut guard, id, "")?;
        let (from, to, verb) =
            if pause { (Phase::Running, Phase::Paused, "pause") } else { (Phase::Paused, Phase::Running, "resume") };
        if task.phase != from {
            return Err(task.state_error(verb));
        }
        let Some(vm) = &task.vm else {
            // A sandbox has nothing to freeze.
            task.phase = to;
            self.publish_pause(task, pause);
            return Ok(());
        };
        vmm::api(&task.bundle, &vm.api_sock, ("PUT", &vm.api_path(verb), ""), vmm::HELPER_TIMEOUT)?;
        task.phase = to;
        self.publish_pause(task, pause);
        Ok(())
    }

    /// Update: the resources become the VM's live max and burst (see [`spec::resized`]),
    /// through the control API as `ctl policy` (the guest gets a POLICY notice; a max below
    /// what it holds posts a reclaim). Returns the time the VMM took to answer.
    fn update(&self, req: &api::UpdateTaskRequest) -> Result<std::time::Duration, TaskError> {
        let mut guard = self.lock();
        let task = Self::task(&mut guard, &req.id, "")?;
        if !matches!(task.phase, Phase::Running | Phase::Paused) {
            return Err(task.state_error("update"));
        }
        let Some(vm) = &mut task.vm else {
            // A sandbox runs nothing to resize.
            return Ok(std::time::Duration::ZERO);
        };
        let resources = match req.resources.as_ref() {
            Some(any) if any.type_url.ends_with("LinuxResources") => {
                serde_json::from_slice::<LinuxResources>(&any.value)
                    .map_err(|e| TaskError::Resources { type_url: any.type_url.clone(), message: e.to_string() })?
            }
            Some(any) => {
                return Err(TaskError::Resources {
                    type_url: any.type_url.clone(),
                    message: "not OCI LinuxResources".to_string(),
                });
            }
            None => LinuxResources::default(),
        };
        if vm.restored {
            (vm.plan.vcpus, vm.plan.memory) = vmm::policies(&task.bundle, &vm.api_sock, &vm.vm_name)?;
            vm.restored = false;
        }
        let bursts = spec::update_bursts(&req.annotations, vm.plan.bursts)?;
        let (vcpus, memory) = spec::resized((vm.plan.vcpus, vm.plan.memory), &resources, bursts)?;
        if (vcpus, memory) == (vm.plan.vcpus, vm.plan.memory) {
            vm.plan.bursts = bursts;
            return Ok(std::time::Duration::ZERO);
        }
        let memory_text = elastic_config::format_memory_policy(&memory);
        let body = serde_json::json!({ "vcpus": vcpus.to_string(), "memory": memory_text }).to_string();
        let path = vm.api_path("policy");
        let t = std::time::Instant::now();
        vmm::api(&task.bundle, &vm.api_sock, ("PUT", &path, &body), vmm::HELPER_TIMEOUT)?;
        let took = t.elapsed();
        info!("task {}: policy now --vcpus {vcpus} --memory {memory_text}", task.id);
        (vm.plan.vcpus, vm.plan.memory, vm.plan.bursts) = (vcpus, memory, bursts);
        Ok(took)
    }

    /// Checkpoint: the VM's snapshot in `req.path` (`ctl snapshot`; it runs on, or is killed
    /// when the options ask for `exit`). containerd pauses the task around it.
    fn checkpoint(&self, req: &api::CheckpointTaskRequest) -> Result<(), TaskError> {
        let (sock, bundle, pid, vm_path, in_pool) = {
            let mut guard = self.lock();
            let task = Self::task(&mut guard, &req.id, "")?;
            if !matches!(task.phase, Phase::Running | Phase::Paused) {
                return Err(task.state_error("checkpoint"));
            }
            let Some(vm) = &task.vm else {
                return Err(TaskError::Unsupported("checkpointing a pod sandbox"));
            };
            (vm.api_sock.clone(), task.bundle.clone(), task.pid, vm.api_path(""), vm.node.is_some())
        };
        // Not under the lock: writing a large VM's memory takes a while, and a kill, a state
        // query or the VMM's exit must not wait for it.
        let body = serde_json::json!({ "dir": req.path }).to_string();
        vmm::api(&bundle, &sock, ("PUT", &format!("{vm_path}/snapshot"), &body), vmm::SNAPSHOT_TIMEOUT)?;
        info!("task {}: checkpoint in {}", req.id, req.path);
        if checkpoint::exit_after(req.options.as_ref()) {
            // As runc's --exit: the task ends once its checkpoint is written (137). In the
            // node pool only its VM is ended, never the pool.
            let ended = if in_pool {
                vmm::api(&bundle, &sock, ("PUT", &format!("{vm_path}/kill"), ""), vmm::HELPER_TIMEOUT)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                vmm::signal(pid, Signal::SIGKILL).map_err(|e| e.to_string())
            };
            if let Err(e) = ended {
                warn!("checkpoint {}: the checkpoint is written, but the VMM cannot be ended: {e}", req.id);
            }
        }
        Ok(())
    }

    /// Stats: the VM's figures as containerd's cgroup metrics (see [`crate::metrics`]).
    fn stats(&self, id: &str) -> Result<api::StatsResponse, TaskError> {
        let (sock, bundle, pid, path, in_pool) = {
            let mut guard = self.lock();
            let task = Self::task(&mut guard, id, "")?;
            if !matches!(task.phase, Phase::Running | Phase::Paused) {
                return Err(task.state_error("report metrics"));
            }
            let Some(vm) = &task.vm else {
                // A sandbox: nothing runs, nothing is held.
                let any = Figures { threads: 0, ..Figures::default() }.to_any(cgroup::unified_host())?;
                return Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() });
            };
            (vm.api_sock.clone(), task.bundle.clone(), task.pid, vm.api_path(""), vm.node.is_some())
        };
        // Not under the lock: a kill must not wait for the VMM's answer.
        let json = vmm::api(&bundle, &sock, ("GET", &path, ""), vmm::HELPER_TIMEOUT)?;
        let figures = if in_pool {
            // The pool's process serves every pod's VM: only this VM's own figures count.
            Figures::of_pool_vm(&json)?
        } else {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            Figures::parse(&json, &stat, &status)?
        };
        let any = figures.to_any(cgroup::unified_host())?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    fn publish_pause(&self, task: &Task, pause: bool) {
        let container_id = task.id.clone();
        if pause {
            self.events.publish(TaskPaused { container_id, ..Default::default() });
        } else {
            self.events.publish(TaskResumed { container_id, ..Default::default() });
        }
    }

    fn wait(&self, req: &api::WaitRequest) -> Result<(u32, Timestamp), TaskError> {
        let mut guard = self.lock();
        Self::task(&mut guard, &req.id, &req.exec_id)?;
        loop {
            match guard.as_ref() {
                Some(t) if t.id == req.id && t.phase == Phase::Stopped => {
                    return Ok((t.exit_status, t.exited_at.clone().unwrap_or_default()));
                }
                Some(t) if t.id == req.id => {}
                _ => return Err(TaskError::NotFound(format!("task {}", req.id))),
            }
            guard = self.exited.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse, TaskError> {
        let mut guard = self.lock();
        let task = Self::task(&mut guard, &req.id, &req.exec_id)?;
        match task.phase {
            Phase::Created => {
                // Never started: nothing ran, so there is no exit to report.
                task.phase = Phase::Stopped;
                task.exited_at = Some(now());
            }
            Phase::Stopped => {}
            _ => return Err(task.state_error("delete (kill it first)")),
        }
        if let Some(dir) = &task.mounted_rootfs {
            rootfs::unmount(dir)?;
        }
        if let Some(vm) = &mut task.vm {
            cgroup::remove_dirs(&std::mem::take(&mut vm.cgroup_created));
            if task.bundle.join(NODE_FILE).exists()
                && let Some(node) = &vm.node
                && node.remove(&vm.vm_name)
            {
                let _ = std::fs::remove_file(task.bundle.join(NODE_FILE));
            }
        }
        let _ = std::fs::remove_file(task.bundle.join(vmm::API_SOCK));
        let at = task.exited_at.clone().unwrap_or_else(now);
        let resp = api::DeleteResponse {
            pid: task.pid,
            exit_status: task.exit_status,
            exited_at: MessageField::some(at.clone()),
            ..Default::default()
        };
        self.events.publish(TaskDelete {
            container_id: task.id.clone(),
            id: task.id.clone(),
            pid: task.pid,
            exit_status: task.exit_status,
            exited_at: MessageField::some(at),
            ..Default::default()
        });
        *guard = None;
        self.exited.notify_all();
        Ok(resp)
    }

    fn state(&self, req: &api::StateRequest) -> Result<api::StateResponse, TaskError> {
        let mut guard = self.lock();
        let task = Self::task(&mut guard, &req.id, &req.exec_id)?;
        Ok(api::StateResponse {
            id: task.id.clone(),
            bundle: task.bundle.display().to_string(),
            pid: task.pid,
            status: EnumOrUnknown::new(task.phase.status()),
            stdin: task.stdio.stdin.clone(),
            stdout: task.stdio.stdout.clone(),
            stderr: task.stdio.stderr.clone(),
            terminal: false,
            exit_status: task.exit_status,
            exited_at: task.exited_at.clone().map(MessageField::some).unwrap_or_default(),
            ..Default::default()
        })
    }
}

/// Everything create checks and resolves after the rootfs is in place.
fn prepare(
    spec: &Spec,
    bundle: &Path,
    req: &api::CreateTaskRequest,
    namespace: &str,
) -> Result<(StdioPaths, Option<VmRun>), TaskError> {
    let rootfs_dir = spec::rootfs_dir(spec, bundle)?;
    let stdio = StdioPaths { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone() };
    stdio.check()?;
    let plan = match spec::plan(spec, &rootfs_dir)? {
        Workload::Sandbox => return Ok((stdio, None)),
        Workload::Vm(plan) => *plan,
    };
    if let Some(path) = &plan.netns {
        std::fs::File::open(path).map_err(|source| VmmError::Netns { path: path.clone(), source })?;
    }
    let vmm = Vmm::locate()?;
    let node = node::config_path(req.options.as_ref())?.map(|p| node::load(&p)).transpose()?.flatten();
    let (api_sock, vm_name, args) = match &node {
        // ':' is in neither a namespace nor an id: two tasks never share a name.
        Some(n) => (n.socket.clone(), format!("{namespace}:{}", req.id), Vec::new()),
        None => {
            let sock = vmm::api_sock_arg(bundle);
            let args = vmm.run_args(&plan, &sock);
            (sock, vmm::VM_NAME.to_string(), args)
        }
    };
    let vm = VmRun {
        vmm,
        args,
        plan,
        api_sock,
        cgroup_created: Vec::new(),
        restored: false,
        vm_name,
        node,
        restore_dir: None,
    };
    Ok((stdio, Some(vm)))
}

fn display_args(args: &[std::ffi::OsString]) -> String {
    args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

/// Removes the ttrpc socket a dead shim left (its address is in the bundle's `address` file).
fn remove_shim_socket(bundle: &Path) {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else { return };
    let path = Path::new(address.trim().trim_start_matches("unix://"));
    if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        let _ = std::fs::remove_file(path);
    }
}

/// The node pool VM a task of this bundle runs (what [`NODE_FILE`] records).
fn read_node_vm(bundle: &Path) -> Option<(NodePool, String)> {
    let text = std::fs::read_to_string(bundle.join(NODE_FILE)).ok()?;
    let mut lines = text.lines();
    let (socket, name) = (lines.next()?, lines.next()?);
    Some((NodePool { socket: socket.into(), start: false, vcpus: None, memory: None, cgroup: None }, name.to_string()))
}

fn read_pid(bundle: &Path) -> Option<u32> {
    std::fs::read_to_string(bundle.join(PID_FILE)).ok()?.trim().parse().ok()
}

/// Whether `pid` is still our VMM: a process whose working directory is the bundle (where
/// `start` runs it), so a recycled pid is never killed.
fn vmm_belongs_to(pid: u32, bundle: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == bundle)
}

impl containerd_shim::Task for TaskService {
    fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        info!("create {} (bundle {})", req.id, req.bundle);
        let pid = self.inner.create(&req).inspect_err(|e| warn!("create {}: {e}", req.id))?;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pid = self.inner.start(&req).inspect_err(|e| warn!("start {}: {e}", req.id))?;
        info!("start {}: VMM pid {pid}", req.id);
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        Ok(self.inner.state(&req)?)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        info!("kill {} signal {}", req.id, req.signal);
        self.inner.kill(&req)?;
        Ok(api::Empty::default())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (exit_status, at) = self.inner.wait(&req)?;
        Ok(api::WaitResponse { exit_status, exited_at: MessageField::some(at), ..Default::default() })
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        info!("delete {}", req.id);
        Ok(self.inner.delete(&req)?)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        info!("pause {}", req.id);
        self.inner.pause_resume(&req.id, true).inspect_err(|e| warn!("pause {}: {e}", req.id))?;
        Ok(api::Empty::default())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        info!("resume {}", req.id);
        self.inner.pause_resume(&req.id, false).inspect_err(|e| warn!("resume {}: {e}", req.id))?;
        Ok(api::Empty::default())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        info!("update {}", req.id);
        let took = self.inner.update(&req).inspect_err(|e| warn!("update {}: {e}", req.id))?;
        info!("update {}: the VMM answered in {} us", req.id, took.as_micros());
        Ok(api::Empty::default())
    }

    fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        Ok(self.inner.stats(&req.id).inspect_err(|e| warn!("stats {}: {e}", req.id))?)
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        info!("checkpoint {} to {}", req.id, req.path);
        self.inner.checkpoint(&req).inspect_err(|e| warn!("checkpoint {}: {e}", req.id))?;
        Ok(api::Empty::default())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        warn!("exec {} in {}: refused", req.exec_id, req.id);
        Err(TaskError::Exec.into())
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let mut guard = self.inner.lock();
        let task = Inner::task(&mut guard, &req.id, "")?;
        let processes = if task.pid != 0 && task.phase != Phase::Stopped {
            vec![ProcessInfo { pid: task.pid, ..Default::default() }]
        } else {
            Vec::new()
        };
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    fn close_io(&self, _ctx: &TtrpcContext, _req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // stdin is never read, so there is nothing to close.
        Ok(api::Empty::default())
    }

    fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let guard = self.inner.lock();
        let task_pid = guard.as_ref().filter(|t| t.id == req.id).map_or(0, |t| t.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // containerd asks after every delete; the server stays while a task remains.
        if self.inner.lock().is_none() {
            info!("shutdown");
            self.inner.exit.signal();
        }
        Ok(api::Empty::default())
    }
}
