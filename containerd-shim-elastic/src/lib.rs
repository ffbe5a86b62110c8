//! containerd runtime v2 shim for the elastic unikernel: `ctr run --runtime
//! io.containerd.elastic.v1` (or a Kubernetes RuntimeClass) starts one `hypervisor-shim run`
//! per task, with the service, policies and published ports taken from the OCI bundle.
//!
//! * [`cgroup`]: the VMM in the cgroup the spec names.
//! * [`checkpoint`]: checkpoints through containerd.
//! * [`config`]: the rootfs's `elastic.toml`.
//! * [`metrics`]: the task's metrics as containerd's cgroup shapes.
//! * [`node`]: the node pool that tasks join instead of a VMM each (`[node_pool]`).
//! * [`policy`]: the containerd-specific steps around [`elastic_config`]'s policies and
//!   published ports (memory limits rounded to extents, the publish list).
//! * [`spec`]: OCI spec → what the VM runs (and what is refused).
//! * [`vmm`]: the `hypervisor-shim` child process and its `ctl` commands.
//! * [`stdio`]: the console FIFOs.
//! * [`rootfs`]: image rootfs mounts.
//! * [`events`]: lifecycle events to containerd.
//! * [`service`]: the shim and its task service.

pub mod cgroup;
pub mod checkpoint;
pub mod config;
pub mod events;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod rootfs;
pub mod service;
pub mod spec;
pub mod stdio;
pub mod vmm;
