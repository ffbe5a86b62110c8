//! Image rootfs mounts: when containerd's snapshotter prepared the rootfs (an image rather
//! than `ctr run --rootfs DIR`), CreateTaskRequest carries the mounts and the shim mounts them
//! at `BUNDLE/rootfs`, as runc's shim does, so `elastic.toml` and the kernel can be read.

use std::path::{Path, PathBuf};

use containerd_shim::mount::{mount_rootfs, umount_recursive};
use containerd_shim::protos::types::mount::Mount;
use thiserror::Error;

/// The rootfs directory inside the bundle.
pub const ROOTFS_DIR: &str = "rootfs";

/// A mount or unmount failed.
#[derive(Debug, Error)]
pub enum RootfsError {
    /// Creating the mount point failed.
    #[error("cannot create {path}: {source}")]
    MountPoint {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A mount failed.
    #[error("cannot mount {typ} {source_path} at {target}: {message}")]
    Mount {
        /// Mount type.
        typ: String,
        /// Mount source.
        source_path: String,
        /// The target directory.
        target: PathBuf,
        /// Why.
        message: String,
    },
    /// Unmounting failed.
    #[error("cannot unmount {target}: {message}")]
    Unmount {
        /// The directory.
        target: PathBuf,
        /// Why.
        message: String,
    },
}

/// Mounts `mounts` at `BUNDLE/rootfs`; returns the directory (to unmount at delete).
pub fn mount(bundle: &Path, mounts: &[Mount]) -> Result<PathBuf, RootfsError> {
    let target = bundle.join(ROOTFS_DIR);
    std::fs::create_dir_all(&target).map_err(|source| RootfsError::MountPoint { path: target.clone(), source })?;
    for m in mounts {
        if let Err(e) = mount_rootfs(Some(m.type_.as_str()), Some(m.source.as_str()), &m.options, &target) {
            let _ = unmount(&target);
            return Err(RootfsError::Mount {
                typ: m.type_.clone(),
                source_path: m.source.clone(),
                target,
                message: e.to_string(),
            });
        }
    }
    Ok(target)
}

/// Unmounts everything at or below `target`.
pub fn unmount(target: &Path) -> Result<(), RootfsError> {
    let text = target.to_string_lossy();
    umount_recursive(Some(&text), libc_mnt_detach())
        .map_err(|e| RootfsError::Unmount { target: target.to_path_buf(), message: e.to_string() })
}

/// `MNT_DETACH`: a lazy unmount, so a busy mount cannot block task deletion.
fn libc_mnt_detach() -> i32 {
    nix::mount::MntFlags::MNT_DETACH.bits()
}
