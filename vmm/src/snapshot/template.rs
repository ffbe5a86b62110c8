//! Templates: a snapshot of a service taken once, when it first accepted a client and before
//! any client byte reached it, from which every later first start of the same service resumes
//! instead of booting.
//!
//! An on-demand slot (`--on-demand`, waking by resume) whose service has no template yet boots
//! its VM with the device's template point armed: at the guest's first accepted connection the
//! device stops client data short of the guest, the owner snapshots the VM into the store, and
//! data flows on. Slots of the same service (same kernel file, app, arguments, options, log
//! level and resources; a pool of many such slots) then start from the template: the first
//! boots, the others resume. The store is private to the shim process (a directory in the
//! temporary directory, removed at exit). Each template records its key; one whose key no
//! longer matches (its kernel file changed since: size or modification time) is refused,
//! removed and taken again at the next boot.
//!
//! A template holds no client data: the gate stops every byte, and a template whose device
//! counted bytes to the guest anyway is discarded. Every instance started from it shares the
//! guest's state at that point (its random seeds included).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Value, json};

use super::{FILES, Loaded, SaveFigures, SnapshotError, load, save};
use crate::base::config::VmConfig;
use crate::vmm::loader::KernelImage;
use crate::vmm::shared::VmShared;

/// The file in a template's directory that holds its key.
const KEY_FILE: &str = "key.json";

/// What a template is of: its directory name and the full key it must match.
#[derive(Debug, Clone)]
pub(crate) struct TemplateKey {
    name: String,
    doc: Value,
}

impl TemplateKey {
    /// The key of `config`'s service on `image`: what the guest sees at its first accepted
    /// connection (kernel file, app, arguments, options, log level, resources and policy) and
    /// the formats it is kept in.
    pub(crate) fn of(config: &VmConfig, image: &KernelImage) -> TemplateKey {
        let service = json!({
            "app": config.guest.app,
            "args": config.guest.args,
            "log": config.guest.log_level,
            "options": config.guest.options,
            "vcpus": [config.resources.vcpus.min, config.resources.vcpus.max, config.resources.vcpus.burst],
            "memory": [config.resources.memory.min, config.resources.memory.max, config.resources.memory.burst],
            "policy": config.resources.policy,
            "weight": config.resources.weight,
            "kernel": image.path,
            "snapshot_format": super::FORMAT_VERSION,
            "abi": hypercall_abi::ABI_VERSION,
        });
        let mut h = DefaultHasher::new();
        service.to_string().hash(&mut h);
        let name = format!("{:016x}", h.finish());
        let doc = json!({ "service": service, "kernel_file": kernel_identity(&image.path) });
        TemplateKey { name, doc }
    }
}

/// The kernel file as it is now: size and modification time (a rebuilt kernel changes them).
fn kernel_identity(path: &Path) -> Value {
    match std::fs::metadata(path) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64);
            json!({ "size": m.len(), "mtime_ns": mtime })
        }
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// A process's templates (see the module documentation).
#[derive(Debug)]
pub(crate) struct Templates {
    root: PathBuf,
    /// The lock held on `root` once it is made (see [`super::leftovers`]).
    held: std::sync::OnceLock<std::fs::File>,
    /// Template directories made (removed at drop; listing directories is not in the shim's
    /// system-call allow-list).
    made: Mutex<Vec<PathBuf>>,
}

impl Templates {
    /// A new, empty store private to this process (its directory is made with the first
    /// template: a run that takes none touches nothing).
    pub(crate) fn new() -> Templates {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let root =
            std::env::temp_dir().join(format!("{}{}-{nanos}", super::leftovers::TEMPLATES_PREFIX, std::process::id()));
        Templates { root, held: std::sync::OnceLock::new(), made: Mutex::new(Vec::new()) }
    }

    fn made(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.made.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The template of `key`: `Ok(None)` when there is none yet; an error when it cannot be
    /// used (it no longer matches its kernel file, or does not load): it is then removed, and
    /// the next boot takes it again.
    pub(crate) fn load(&self, key: &TemplateKey) -> Result<Option<Loaded>, SnapshotError> {
        let dir = self.root.join(&key.name);
        let key_path = dir.join(KEY_FILE);
        let saved = match std::fs::read(&key_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SnapshotError::Io { what: "read", path: key_path, source }),
        };
        let saved: Value = serde_json::from_slice(&saved).unwrap_or(Value::Null);
        if saved != key.doc {
            remove(&dir);
            let why = if saved.get("service") == key.doc.get("service") {
                "its kernel file changed since it was taken".to_string()
            } else {
                "it is of another service".to_string()
            };
            return Err(SnapshotError::Corrupt { path: dir, why });
        }
        load(&dir).inspect_err(|_| remove(&dir)).map(Some)
    }

    /// Whether the template of `key` is there (taken by this run, not yet found stale).
    pub(crate) fn has(&self, key: &TemplateKey) -> bool {
        self.root.join(&key.name).join(KEY_FILE).exists()
    }

    /// Takes the template of `key` from `vm`, stopped at its template point (see
    /// [`crate::devices::DeviceSetup::template_gate`]); the VM runs on. Another slot's template
    /// of the same key, taken meanwhile, wins.
    pub(crate) fn take(&self, vm: &VmShared, key: &TemplateKey) -> Result<SaveFigures, SnapshotError> {
        if self.held.get().is_none() {
            match super::leftovers::create_held(&self.root) {
                Ok(held) => {
                    let _ = self.held.set(held);
                }
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(SnapshotError::Io { what: "create", path: self.root.clone(), source: e });
                }
                Err(_) => {}
            }
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tmp = self.root.join(format!(".{}-{nanos}", key.name));
        let done = |r: Result<SaveFigures, SnapshotError>| {
            if r.is_err() {
                remove(&tmp);
            }
            r
        };
        // The device's gate keeps every client byte from the guest until the VM opens it, after
        // this; had one passed anyway (the gate gave up waiting), the template would carry a
        // client's data into every instance: the count is checked before and after the hold.
        let to_guest = || -> u64 {
            vm.devices().figures().iter().filter_map(|(_, v)| v.get("bytes_to_guest").and_then(Value::as_u64)).sum()
        };
        let leaked = |n: u64| SnapshotError::Vm(format!("{n} client bytes reached the guest before the template"));
        if to_guest() > 0 {
            return Err(leaked(to_guest()));
        }
        let figures = match save(vm, &tmp) {
            Ok(f) => f,
            Err(e) => return done(Err(e)),
        };
        if to_guest() > 0 {
            return done(Err(leaked(to_guest())));
        }
        let key_path = tmp.join(KEY_FILE);
        if let Err(source) = std::fs::write(&key_path, key.doc.to_string()) {
            return done(Err(SnapshotError::Io { what: "write", path: key_path, source }));
        }
        let dir = self.root.join(&key.name);
        if dir.exists() {
            remove(&tmp);
            return Ok(SaveFigures { dir, ..figures });
        }
        if let Err(source) = std::fs::rename(&tmp, &dir) {
            return done(Err(SnapshotError::Io { what: "rename", path: tmp.clone(), source }));
        }
        self.made().push(dir.clone());
        Ok(SaveFigures { dir, ..figures })
    }
}

/// Removes a template directory (its known files, then itself).
fn remove(dir: &Path) {
    for file in FILES.iter().chain([&KEY_FILE]) {
        let _ = std::fs::remove_file(dir.join(file));
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Templates {
    fn drop(&mut self) {
        for dir in self.made().drain(..) {
            remove(&dir);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_service_and_the_kernel_file() {
        let dir = std::env::temp_dir().join(format!("template-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("k");
        std::fs::write(&kernel, b"one").unwrap();
        let identity = kernel_identity(&kernel);
        assert_eq!(identity["size"], 3);
        std::fs::write(&kernel, b"three").unwrap();
        assert_ne!(kernel_identity(&kernel), identity, "a rebuilt kernel changes the key");
        assert!(kernel_identity(&dir.join("none")).get("error").is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
