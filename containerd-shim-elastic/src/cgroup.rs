//! The VMM in the cgroup the OCI spec names (`linux.cgroupsPath`), as runc puts a container's
//! process there: kubelet's accounting and eviction, `systemd-cgtop` and the node's limits then
//! see the VM's CPU time and the memory it holds, and memory the VM gives back leaves the
//! cgroup's usage (the VMM's pages are charged to it from its first instruction: it moves
//! before `exec`).
//!
//! * The path is read as runc reads it: `/a/b` (what `ctr` and CRI's cgroupfs driver give) is
//!   the same path in every hierarchy; the systemd driver's `SLICE:PREFIX:NAME` becomes
//!   `SLICE`'s nested slices and `PREFIX-NAME.scope` (`kubepods-burstable-pod1.slice:cri:c1`
//!   is `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-c1.scope`).
//! * Every cgroup hierarchy mounted (from `/proc/self/mountinfo`: the unified one on a cgroup
//!   v2 host; each v1 controller, `name=systemd` and the unified one on a hybrid host) gets the
//!   directory, created when missing (a new v1 `cpuset` cgroup gets its parent's CPUs and
//!   memory nodes, without which nothing can join it).
//! * [`Join::prepare`] does all that and opens each `cgroup.procs` before the fork; the forked
//!   child only writes `0` to each (one async-signal-safe `write` per hierarchy) before it
//!   execs the VMM.
//! * At delete, the directories this shim created are removed again (deepest first; one that
//!   still holds a process stays).

use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why the VMM cannot join its cgroup.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// The path cannot name a cgroup.
    #[error("cgroupsPath {0:?} is not a cgroup path (/a/b, or SLICE:PREFIX:NAME for the systemd driver)")]
    BadPath(String),
    /// No cgroup hierarchy is mounted.
    #[error("cgroupsPath {0:?}: no cgroup file system is mounted on this host")]
    NoHierarchy(String),
    /// A directory or file of the cgroup could not be made or opened.
    #[error("cannot prepare cgroup {path}: {source}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A cgroup, ready for a child to join.
#[derive(Debug)]
pub struct Join {
    /// `cgroup.procs` of each hierarchy, open for writing.
    procs: Vec<OwnedFd>,
    /// The directories this call created, parents first.
    created: Vec<PathBuf>,
}

impl Join {
    /// Creates `cgroups_path` (an OCI `linux.cgroupsPath`) in every mounted hierarchy when
    /// missing and opens each `cgroup.procs`.
    pub fn prepare(cgroups_path: &str) -> Result<Join, CgroupError> {
        let relative = relative_path(cgroups_path)?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|source| CgroupError::Io { path: "/proc/self/mountinfo".into(), source })?;
        let mounts = hierarchies(&mountinfo);
        if mounts.is_empty() {
            return Err(CgroupError::NoHierarchy(cgroups_path.to_string()));
        }
        let mut join = Join { procs: Vec::new(), created: Vec::new() };
        for (mount, cpuset) in mounts {
            let dir = mount.join(&relative);
            let result = join.make_dirs(&mount, &dir, cpuset).and_then(|()| {
                let procs = dir.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .map(|f| join.procs.push(f.into()))
                    .map_err(|source| CgroupError::Io { path: procs, source })
            });
            if let Err(e) = result {
                join.remove();
                return Err(e);
            }
        }
        Ok(join)
    }

    /// Creates `dir` and its missing parents below `mount`, recording what it made.
    fn make_dirs(&mut self, mount: &Path, dir: &Path, cpuset: bool) -> Result<(), CgroupError> {
        let mut missing: Vec<&Path> = dir.ancestors().take_while(|d| *d != mount && !d.exists()).collect();
        missing.reverse();
        for d in missing {
            match std::fs::create_dir(d) {
                Ok(()) => self.created.push(d.to_path_buf()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(CgroupError::Io { path: d.to_path_buf(), source }),
            }
            if cpuset {
                inherit_cpuset(d)?;
            }
        }
        Ok(())
    }

    /// Moves the calling process into the cgroup: writes `0` to each `cgroup.procs`. Meant for
    /// the child between fork and exec: it allocates nothing and only calls `write(2)`.
    pub fn enter(&self) -> std::io::Result<()> {
        for fd in &self.procs {
            nix::unistd::write(fd.as_fd(), b"0").map_err(std::io::Error::from)?;
        }
        Ok(())
    }

    /// Another handle on the same `cgroup.procs` files (for a child to [`Join::enter`]).
    pub fn try_clone(&self) -> std::io::Result<Join> {
        let procs = self.procs.iter().map(OwnedFd::try_clone).collect::<Result<_, _>>()?;
        Ok(Join { procs, created: Vec::new() })
    }

    /// The directories this shim created (parents first), for [`remove_dirs`] at delete.
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }

    fn remove(&self) {
        remove_dirs(&self.created);
    }
}

/// Removes `created` (parents first, as [`Join::created`] lists them) deepest first; a
/// directory that still holds a process or another cgroup stays.
pub fn remove_dirs(created: &[PathBuf]) {
    for d in created.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// Removes the cgroup `cgroups_path` names from every hierarchy (not its parents): for a shim
/// that died before it could remove what it made. One that still holds a process stays.
/// Returns whether none is left (`false`: try again once its processes have exited).
pub fn remove_path(cgroups_path: &str) -> bool {
    let Ok(relative) = relative_path(cgroups_path) else { return true };
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else { return true };
    let mut gone = true;
    for (mount, _) in hierarchies(&mountinfo) {
        let dir = mount.join(&relative);
        if let Err(e) = std::fs::remove_dir(&dir) {
            gone &= e.kind() == std::io::ErrorKind::NotFound;
        }
    }
    gone
}

/// A new v1 cpuset cgroup starts with no CPUs and no memory nodes, and a process cannot join
/// it until it has some: it gets its parent's.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else { return Ok(()) };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let from = parent.join(file);
        let to = dir.join(file);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CgroupError::Io { path, source }
        };
        let value = std::fs::read_to_string(&from).map_err(io(&from))?;
        if std::fs::read_to_string(&to).map_err(io(&to))?.trim().is_empty() {
            std::fs::write(&to, value.trim()).map_err(io(&to))?;
        }
    }
    Ok(())
}

/// The cgroup mounts of `mountinfo` (`/proc/self/mountinfo` text): each mount point, and
/// whether it is the v1 `cpuset` controller's.
fn hierarchies(mountinfo: &str) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
        let Some((before, after)) = line.split_once(" - ") else { continue };
        let mut fields = after.split(' ');
        let fstype = fields.next().unwrap_or("");
        let super_options = fields.nth(1).unwrap_or("");
        let mut head = before.split(' ');
        let (Some(device), Some(root), Some(mount_point)) = (head.nth(2), head.next(), head.next()) else { continue };
        // A hierarchy once (the same one mounted twice has one device), and only where its
        // root is mounted: a bind mount of a subtree would put paths somewhere else.
        if !(fstype == "cgroup" || fstype == "cgroup2") || root != "/" || seen.contains(&device) {
            continue;
        }
        seen.push(device);
        let cpuset = fstype == "cgroup" && super_options.split(',').any(|o| o == "cpuset");
        out.push((PathBuf::from(unescape(mount_point)), cpuset));
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|o| bytes[i] == b'\\' && o.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(o) => {
                out.push(o.iter().fold(0u8, |v, b| v.wrapping_mul(8).wrapping_add(b - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `cgroups_path` as a path relative to a hierarchy's root (see the module documentation).
fn relative_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = || CgroupError::BadPath(cgroups_path.to_string());
    let path = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
        [single] => single.trim_start_matches('/').to_string(),
        [slice, prefix, name] => {
            let scope = if prefix.is_empty() { format!("{name}.scope") } else { format!("{prefix}-{name}.scope") };
            let slice = if slice.is_empty() { "system.slice" } else { slice };
            let parent = expand_slice(slice).ok_or_else(bad)?;
            if parent.is_empty() { scope } else { format!("{parent}/{scope}") }
        }
        _ => return Err(bad()),
    };
    let rel = PathBuf::from(&path);
    let clean = !path.is_empty()
        && rel.components().all(|c| matches!(c, std::path::Component::Normal(n) if n != "." && n != ".."));
    if clean { Ok(rel) } else { Err(bad()) }
}

/// systemd's slice nesting: `a-b-c.slice` lives in `a.slice/a-b.slice/a-b-c.slice`
/// (`-.slice` is the root).
fn expand_slice(slice: &str) -> Option<String> {
    let name = slice.strip_suffix(".slice")?;
    if name == "-" {
        return Some(String::new());
    }
    if name.is_empty() || name.starts_with('-') || name.ends_with('-') || name.contains("--") || name.contains('/') {
        return None;
    }
    let parts: Vec<&str> = name.split('-').collect();
    let nested: Vec<String> = (1..=parts.len()).map(|n| format!("{}.slice", parts[..n].join("-"))).collect();
    Some(nested.join("/"))
}

/// Whether the host has the cgroup v2 unified hierarchy at `/sys/fs/cgroup` (no v1 controllers).
pub fn unified_host() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_as_runc_reads_them() {
        assert_eq!(relative_path("/default/c1").expect("fs"), PathBuf::from("default/c1"));
        assert_eq!(relative_path("kubepods/pod1/c1").expect("relative"), PathBuf::from("kubepods/pod1/c1"));
        assert_eq!(
            relative_path("kubepods-burstable-pod1.slice:cri-containerd:c1").expect("systemd"),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-c1.scope"
            )
        );
        assert_eq!(relative_path(":p:n").expect("default slice"), PathBuf::from("system.slice/p-n.scope"));
        assert_eq!(relative_path("-.slice::n").expect("root slice"), PathBuf::from("n.scope"));
        for bad in ["", "/", "/a/../b", "a:b", "a-.slice:p:n", "notaslice:p:n", "a:b:c:d", "/./a"] {
            assert!(relative_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hierarchies_from_mountinfo() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime shared:9 - cgroup cgroup rw,cpuset
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /mnt/with\\040space rw - cgroup2 cgroup2 rw
43 31 0:38 / /mnt/again rw - cgroup2 cgroup2 rw
44 31 0:40 /sub /mnt/subtree rw - cgroup2 cgroup2 rw
";
        let h = hierarchies(text);
        let names: Vec<(String, bool)> = h.iter().map(|(p, c)| (p.display().to_string(), *c)).collect();
        assert_eq!(
            names,
            [
                ("/sys/fs/cgroup/cpu".to_string(), false),
                ("/sys/fs/cgroup/cpuset".to_string(), true),
                ("/sys/fs/cgroup/systemd".to_string(), false),
                ("/sys/fs/cgroup/unified".to_string(), false),
                ("/mnt/with space".to_string(), false),
            ]
        );
    }
}
