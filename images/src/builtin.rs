//! The embedded default kernel as a file.
//!
//! Everything that boots a kernel names it by path: the loader, QEMU's `-kernel`, the child
//! shims of the demo and `bench`, and snapshots (a restore reopens the path the snapshot
//! names). So the embedded image is written once to a per-user cache file named after its
//! SHA-256, `$XDG_CACHE_HOME/elastic-unikernel/kernel-<16 hex digits>` (or
//! `~/.cache/elastic-unikernel/…`), and that path is the default kernel. A path that outlives
//! the process keeps snapshots restorable by another process; a name made of the digest keeps
//! two builds from sharing a file.
//!
//! Every call checks the file against the embedded bytes (about 0.5 MB read and compared) and
//! rewrites it when it differs or is missing: a temporary file in the same directory, renamed
//! over the name, so concurrent shims never see a partial image. The directory must be a real
//! directory owned by this user that nobody else can write to; when the cache directory
//! cannot be used, `$TMPDIR/elastic-unikernel-<uid>` (same checks) is tried.

use std::fs::{self, DirBuilder};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::{KERNEL_IMAGE, KERNEL_SHA256};

/// The directory's name under the cache directory.
const DIR_NAME: &str = "elastic-unikernel";

/// Why the built-in kernel could not be written to a file.
#[derive(Debug, Error)]
pub enum BuiltinError {
    /// The directory could not be created or inspected.
    #[error("cannot create the directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The directory exists but others could change what is in it.
    #[error("{path} is not a private directory of this user: {problem}")]
    NotPrivate {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// The image could not be written.
    #[error("cannot write the built-in kernel image to {path}: {source}")]
    Write {
        /// The file (or the directory of its temporary file).
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// This binary was built without a kernel (under clippy).
    #[error("this binary was built without a kernel image (a clippy build)")]
    Empty,
}

/// The embedded default kernel as a file: its path in the per-user cache (see the module
/// documentation), written or repaired when needed.
pub fn kernel_file() -> Result<PathBuf, BuiltinError> {
    if KERNEL_IMAGE.is_empty() {
        return Err(BuiltinError::Empty);
    }
    let name = format!("kernel-{}", KERNEL_SHA256.get(..16).unwrap_or(KERNEL_SHA256));
    let fallback = std::env::temp_dir().join(format!("{DIR_NAME}-{}", euid()));
    match cache_dir() {
        Some(dir) => write_image(&dir, &name, KERNEL_IMAGE).or_else(|first| {
            // The cache's error says more than the fallback's when both fail.
            write_image(&fallback, &name, KERNEL_IMAGE).map_err(|_| first)
        }),
        None => write_image(&fallback, &name, KERNEL_IMAGE),
    }
}

/// `$XDG_CACHE_HOME/elastic-unikernel` (when absolute) or `~/.cache/elastic-unikernel`.
fn cache_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).filter(|p| p.is_absolute());
    let base = xdg.or_else(|| std::env::home_dir().filter(|h| h.is_absolute()).map(|h| h.join(".cache")))?;
    Some(base.join(DIR_NAME))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes sure `dir/name` holds exactly `bytes` and returns its path.
pub(crate) fn write_image(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, BuiltinError> {
    private_dir(dir)?;
    let path = dir.join(name);
    if holds(&path, bytes) {
        return Ok(path);
    }
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BuiltinError::Write { path, source }
    };
    let mut tmp = tempfile::Builder::new().prefix(".kernel-").tempfile_in(dir).map_err(write_err(dir))?;
    tmp.write_all(bytes).map_err(write_err(tmp.path()))?;
    tmp.as_file().sync_all().map_err(write_err(tmp.path()))?;
    tmp.persist(&path).map_err(|e| BuiltinError::Write { path: path.clone(), source: e.error })?;
    Ok(path)
}

/// Creates `dir` (mode 0700) when missing and checks it is a directory of this user that
/// neither its group nor others can write to.
fn private_dir(dir: &Path) -> Result<(), BuiltinError> {
    let create_err = |source| BuiltinError::CreateDir { path: dir.to_path_buf(), source };
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(create_err)?;
    let meta = fs::symlink_metadata(dir).map_err(create_err)?;
    let not_private = |problem: String| BuiltinError::NotPrivate { path: dir.to_path_buf(), problem };
    if !meta.file_type().is_dir() {
        return Err(not_private("it is not a directory (a symbolic link?)".into()));
    }
    if meta.uid() != euid() {
        return Err(not_private(format!("it belongs to uid {}, not {}", meta.uid(), euid())));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(not_private(format!("its mode {:o} lets others write to it", meta.mode() & 0o7777)));
    }
    Ok(())
}

/// Whether `path` is a regular file holding exactly `bytes` (reads at most one byte more).
fn holds(path: &Path, bytes: &[u8]) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else { return false };
    if !meta.file_type().is_file() || meta.len() != bytes.len() as u64 {
        return false;
    }
    let Ok(file) = fs::File::open(path) else { return false };
    let mut found = Vec::with_capacity(bytes.len() + 1);
    file.take(bytes.len() as u64 + 1).read_to_end(&mut found).is_ok() && found == bytes
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn writes_the_image_then_reuses_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("a/b");
        let path = write_image(&cache, "kernel-x", b"image one").unwrap();
        assert_eq!(path, cache.join("kernel-x"));
        assert_eq!(fs::read(&path).unwrap(), b"image one");
        assert_eq!(fs::metadata(&cache).unwrap().mode() & 0o777, 0o700);
        let inode = fs::metadata(&path).unwrap().ino();
        assert_eq!(write_image(&cache, "kernel-x", b"image one").unwrap(), path);
        assert_eq!(fs::metadata(&path).unwrap().ino(), inode, "an intact file is not rewritten");
        let left: Vec<_> = fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["kernel-x"], "no temporary file is left behind");
    }

    #[test]
    fn repairs_a_changed_truncated_or_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel-x");
        for damage in [&b"image twO"[..], b"image", b"image one and more", b""] {
            fs::write(&path, damage).unwrap();
            write_image(dir.path(), "kernel-x", b"image one").unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"image one", "after {damage:?}");
        }
        // A symbolic link is replaced, and what it pointed to is left alone.
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"image one").unwrap();
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        write_image(dir.path(), "kernel-x", b"image one").unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        assert_eq!(fs::read(&elsewhere).unwrap(), b"image one");
    }

    #[test]
    fn refuses_a_directory_others_can_write_to_or_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let e = write_image(&shared, "kernel-x", b"image").unwrap_err();
        assert!(matches!(e, BuiltinError::NotPrivate { .. }), "{e}");
        assert!(e.to_string().contains("lets others write"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let e = write_image(&link, "kernel-x", b"image").unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert!(!shared.join("kernel-x").exists() && !dir.path().join("kernel-x").exists());
    }

    #[test]
    fn the_embedded_image_is_the_built_kernel() {
        let built = fs::read(crate::KERNEL).unwrap();
        assert!(!KERNEL_IMAGE.is_empty());
        assert_eq!(KERNEL_IMAGE, &built[..]);
        assert_eq!(KERNEL_SHA256.len(), 64);
    }
}
