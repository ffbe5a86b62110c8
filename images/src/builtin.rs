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
//!
//! Each build has its own file, so they would pile up (about 0.5 MB a build). A use refreshes
//! the file's modification time (at most once a day), and writing a new image removes the other
//! `kernel-*` files of the directory unused for [`UNUSED_FOR`]. A snapshot names its kernel's
//! path, so one whose build has not run for that long must be restored with `--kernel` naming
//! a copy of that build's image.

use std::fs::{self, DirBuilder};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::{KERNEL_IMAGE, KERNEL_SHA256};

/// The directory's name under the cache directory.
const DIR_NAME: &str = "elastic-unikernel";

/// How long another build's image may go unused before writing a new one removes it.
const UNUSED_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

/// How stale a used file's modification time may get before a use refreshes it.
const REFRESH_AFTER: Duration = Duration::from_secs(24 * 3600);

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
        refresh(&path);
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
    prune(dir, name, SystemTime::now());
    Ok(path)
}

/// Marks `path` as used: its modification time becomes now when it is older than a day (one
/// `stat`, and one `utimensat` a day). Failure only makes the file look older.
fn refresh(path: &Path) {
    let stale = fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| SystemTime::now().duration_since(t).is_ok_and(|age| age > REFRESH_AFTER));
    if stale {
        let _ = fs::File::options().append(true).open(path).and_then(|f| f.set_modified(SystemTime::now()));
    }
}

/// Removes the `kernel-*` files of `dir` other than `keep` that were last used more than
/// [`UNUSED_FOR`] before `now` (other builds' images). Best effort: what cannot be read or
/// removed stays.
fn prune(dir: &Path, keep: &str, now: SystemTime) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == keep || !name.starts_with("kernel-") {
            continue;
        }
        let unused = entry
            .metadata()
            .ok()
            .filter(|m| m.file_type().is_file())
            .and_then(|m| m.modified().ok())
            .is_some_and(|t| now.duration_since(t).is_ok_and(|age| age > UNUSED_FOR));
        if unused {
            let _ = fs::remove_file(entry.path());
        }
    }
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
    let Ok(mut file) = fs::File::open(path) else { return false };
    // Compared a chunk at a time: a shim starts with this check, and reading the whole image
    // into fresh memory first cost it ~0.5 ms of page faults on a nested host.
    let mut chunk = vec![0u8; 64 << 10];
    let mut at = 0;
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return at == bytes.len(),
            Ok(n) => {
                if bytes.get(at..at + n) != Some(&chunk[..n]) {
                    return false;
                }
                at += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
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
    fn a_new_image_removes_other_builds_unused_for_a_month_and_a_use_keeps_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let month_ago = SystemTime::now() - UNUSED_FOR - Duration::from_secs(60);
        let age = |name: &str, t: SystemTime| {
            fs::File::options().append(true).open(d.join(name)).unwrap().set_modified(t).unwrap();
        };
        for name in ["kernel-old", "kernel-used", "kernel-recent", "notes"] {
            fs::write(d.join(name), b"image").unwrap();
        }
        for name in ["kernel-old", "kernel-used", "notes"] {
            age(name, month_ago);
        }
        // A use of an old build's file refreshes it.
        write_image(d, "kernel-used", b"image").unwrap();
        write_image(d, "kernel-new", b"image two").unwrap();
        let mut left: Vec<_> =
            fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["kernel-new", "kernel-recent", "kernel-used", "notes"]);
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
