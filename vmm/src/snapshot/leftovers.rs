//! Private directories a shim keeps in the temporary directory while it runs (the sleeps of
//! on-demand VMs, the templates of their services), named `PREFIX-PID-…`: the shim removes
//! them at its end, and a shim that was killed leaves them behind. [`sweep`] removes those of
//! processes that no longer run. A shim holds a lock on each of its directories
//! ([`create_held`]) as long as it runs, so that one in another PID namespace sharing the
//! temporary directory (whose process id means nothing here) is never taken for gone.

use std::os::fd::AsRawFd;
use std::path::Path;

/// Makes the private directory `path` (mode 0700) and locks it (`flock`) for as long as the
/// returned handle lives.
pub(crate) fn create_held(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(path)?;
    let dir = std::fs::File::open(path)?;
    // SAFETY: flock on a descriptor `dir` owns; the lock goes with it.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(dir)
}

/// Whether a process holds the lock of directory `path` (one that cannot be opened counts as
/// held: it is left alone).
fn held(path: &Path) -> bool {
    let Ok(dir) = std::fs::File::open(path) else { return true };
    // SAFETY: flock on a descriptor `dir` owns; a lock taken here goes when `dir` closes.
    unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Prefix of an on-demand VM's sleep directory.
pub(crate) const SLEEP_PREFIX: &str = "elastic-sleep-";
/// Prefix of a run's template store.
pub(crate) const TEMPLATES_PREFIX: &str = "elastic-templates-";

/// The process id in a directory name made by a shim (`PREFIX-PID-…`), if it is one.
fn owner_pid(name: &str) -> Option<libc::pid_t> {
    let rest = name.strip_prefix(SLEEP_PREFIX).or_else(|| name.strip_prefix(TEMPLATES_PREFIX))?;
    let (pid, tail) = rest.split_once('-')?;
    if tail.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|&p: &libc::pid_t| p > 0)
}

/// Whether process `pid` is gone (no process has that id now; a process of another user
/// counts as running).
fn gone(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Removes, from `tmp`, the directories of this user that shims which no longer run left
/// behind; returns how many. Best effort: what cannot be read or removed stays.
pub(crate) fn sweep(tmp: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(tmp) else { return 0 };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner_pid) else { continue };
        // A directory (never a symbolic link) of this user, whose shim is gone.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else { continue };
        if !meta.is_dir() || meta.uid() != me || pid == std::process::id() as libc::pid_t || !gone(pid) {
            continue;
        }
        if held(&entry.path()) {
            continue;
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_of_shims_that_are_gone_are_removed() {
        assert_eq!(owner_pid("elastic-sleep-123-456-vm0"), Some(123));
        assert_eq!(owner_pid("elastic-templates-77-1"), Some(77));
        assert_eq!(owner_pid("elastic-sleep-x1-2"), None);
        assert_eq!(owner_pid("elastic-sleep-12"), None);
        assert_eq!(owner_pid("other-12-3"), None);
        let tmp = std::env::temp_dir().join(format!("leftovers-test-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        // A process that has ended: a child reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let left = tmp.join(format!("{SLEEP_PREFIX}{dead}-1-vm0"));
        std::fs::create_dir_all(left.join("inner")).unwrap();
        std::fs::write(left.join("memory"), b"x").unwrap();
        let mine = tmp.join(format!("{TEMPLATES_PREFIX}{}-1", std::process::id()));
        std::fs::create_dir_all(&mine).unwrap();
        let unrelated = tmp.join("elastic-sleep-notes");
        std::fs::create_dir_all(&unrelated).unwrap();
        // Named after the dead process, but locked: a live shim of another PID namespace.
        let elsewhere = tmp.join(format!("{SLEEP_PREFIX}{dead}-2-vm0"));
        let lock = create_held(&elsewhere).unwrap();
        assert_eq!(sweep(&tmp), 1);
        assert!(!left.exists() && mine.exists() && unrelated.exists() && elsewhere.exists());
        drop(lock);
        assert_eq!(sweep(&tmp), 1, "unlocked, it goes");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
