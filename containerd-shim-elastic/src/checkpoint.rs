//! Checkpoints through containerd: `ctr task checkpoint` / `ctr container checkpoint --task`
//! ask the shim to save the task in a directory containerd then packs into a checkpoint image,
//! and a task created from such an image (`ctr container restore --live`) gets the unpacked
//! directory in its CreateTaskRequest.
//!
//! The directory holds the VM's snapshot exactly as `hypervisor-shim ctl snapshot --to DIR`
//! writes it (state and memory, the guest's code included), so the restored task runs
//! `hypervisor-shim restore`: the same service with its memory (a kv store's keys), vCPUs
//! where they were, its published ports bound again by the new VMM. The restored VM reads its
//! memory from the snapshot as it touches it, so the snapshot must live as long as the task:
//! Create moves containerd's unpacked directory into the bundle (across file systems: copies
//! it, then removes containerd's), and it goes with the bundle when the task is deleted.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::CodedInputStream;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use thiserror::Error;

/// The checkpoint's directory inside the bundle of a restored task.
pub const BUNDLE_DIR: &str = "checkpoint";

/// Checkpoint failures.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// The checkpoint cannot be taken into the bundle.
    #[error("cannot take the checkpoint {from} into {to}: {source}")]
    Take {
        /// containerd's directory.
        from: PathBuf,
        /// The bundle's.
        to: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Moves containerd's checkpoint directory `from` to `bundle/checkpoint` (across file systems:
/// copies its files, then removes it) and returns the new directory.
pub fn take(from: &Path, bundle: &Path) -> Result<PathBuf, CheckpointError> {
    let to = bundle.join(BUNDLE_DIR);
    let err = |source| CheckpointError::Take { from: from.to_path_buf(), to: to.clone(), source };
    if to.exists() {
        std::fs::remove_dir_all(&to).map_err(err)?;
    }
    if std::fs::rename(from, &to).is_ok() {
        return Ok(to);
    }
    std::fs::create_dir(&to).map_err(err)?;
    for entry in std::fs::read_dir(from).map_err(err)? {
        let entry = entry.map_err(err)?;
        if entry.file_type().map_err(err)?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).map_err(err)?;
        }
    }
    // As a rename would have: containerd leaves its unpacked copy behind otherwise.
    let _ = std::fs::remove_dir_all(from);
    Ok(to)
}

/// Whether checkpoint `options` (runc's `CheckpointOptions`, which `ctr task checkpoint --exit`
/// sends) ask the task to end after the checkpoint: field 1, `exit`. Anything else (no
/// options, another message) is `false`.
pub fn exit_after(options: Option<&Any>) -> bool {
    let Some(any) = options.filter(|a| a.type_url.ends_with("CheckpointOptions")) else { return false };
    let mut input = CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        // Field 1, varint.
        if tag == (1 << 3) {
            return input.read_bool().unwrap_or(false);
        }
        let wire = tag & 7;
        let skipped = match wire {
            0 => input.read_raw_varint64().map(|_| ()),
            1 => input.read_raw_bytes(8).map(|_| ()),
            2 => input.read_raw_varint32().and_then(|n| input.skip_raw_bytes(n)),
            5 => input.read_raw_bytes(4).map(|_| ()),
            _ => return false,
        };
        if skipped.is_err() {
            return false;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(value: Vec<u8>) -> Any {
        Any { type_url: "containerd.runc.v1.CheckpointOptions".into(), value, ..Default::default() }
    }

    #[test]
    fn the_exit_option() {
        assert!(!exit_after(None));
        assert!(exit_after(Some(&options(vec![0x08, 0x01]))));
        assert!(!exit_after(Some(&options(vec![0x08, 0x00]))));
        // Other fields first (open_tcp = true; a string field 6), then exit.
        assert!(exit_after(Some(&options(vec![0x10, 0x01, 0x32, 0x03, b'n', b'e', b't', 0x08, 0x01]))));
        assert!(!exit_after(Some(&options(vec![0x32, 0x7f]))), "a truncated message");
        let other = Any { type_url: "something.Else".into(), value: vec![0x08, 0x01], ..Default::default() };
        assert!(!exit_after(Some(&other)));
    }

    #[test]
    fn a_checkpoint_moves_into_the_bundle() {
        let base = std::env::temp_dir().join(format!("ckpt-test-{}", std::process::id()));
        let (from, bundle) = (base.join("from"), base.join("bundle"));
        std::fs::create_dir_all(&from).expect("from");
        std::fs::create_dir_all(&bundle).expect("bundle");
        std::fs::write(from.join("state.json"), "{}").expect("state");
        let to = take(&from, &bundle).expect("take");
        assert_eq!(to, bundle.join(BUNDLE_DIR));
        assert_eq!(std::fs::read_to_string(to.join("state.json")).expect("moved"), "{}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
