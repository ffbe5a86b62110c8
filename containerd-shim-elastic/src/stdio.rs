//! The task's standard streams: the guest console (the VMM's stdout) and the VMM's
//! diagnostics (its stderr) go straight to the FIFOs containerd named in CreateTaskRequest.
//!
//! Each FIFO is opened read-write: that never blocks waiting for containerd's reader, and the
//! VMM never gets SIGPIPE if a detached client goes away (output then waits in the pipe, as it
//! does under runc). The VMM's copies are the only ones left once it is spawned, so the
//! reader sees end-of-file exactly when the VM exits. The guest has no console input: stdin is
//! not read.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use thiserror::Error;

/// A stream that cannot be opened.
#[derive(Debug, Error)]
pub enum StdioError {
    /// Opening the path failed.
    #[error("cannot open {stream} {path}: {source}")]
    Open {
        /// stdout or stderr.
        stream: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A URI scheme this shim does not serve.
    #[error("{stream} {uri:?}: only FIFO paths and file:// URIs are supported (not binary:// loggers)")]
    Scheme {
        /// stdout or stderr.
        stream: &'static str,
        /// The URI.
        uri: String,
    },
}

/// The stdio paths of a task, as containerd gave them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// Standard input (never read).
    pub stdin: String,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl StdioPaths {
    /// Checks the paths can be served (at create, before anything starts).
    pub fn check(&self) -> Result<(), StdioError> {
        target("stdout", &self.stdout)?;
        target("stderr", &self.stderr)?;
        Ok(())
    }

    /// Opens stdout and stderr for the VMM.
    pub fn open(&self) -> Result<(File, File), StdioError> {
        let stdout = open("stdout", &self.stdout)?;
        let stderr = if self.stderr == self.stdout && !self.stdout.is_empty() {
            stdout.try_clone().map_err(|source| StdioError::Open {
                stream: "stderr",
                path: self.stderr.clone().into(),
                source,
            })?
        } else {
            open("stderr", &self.stderr)?
        };
        Ok((stdout, stderr))
    }
}

enum Target {
    Null,
    Fifo(PathBuf),
    File(PathBuf),
}

fn target(stream: &'static str, uri: &str) -> Result<Target, StdioError> {
    if uri.is_empty() {
        return Ok(Target::Null);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(Target::File(PathBuf::from(path)));
    }
    if uri.contains("://") {
        return Err(StdioError::Scheme { stream, uri: uri.to_string() });
    }
    Ok(Target::Fifo(PathBuf::from(uri)))
}

fn open(stream: &'static str, uri: &str) -> Result<File, StdioError> {
    let (path, result) = match target(stream, uri)? {
        Target::Null => (PathBuf::from("/dev/null"), OpenOptions::new().write(true).open("/dev/null")),
        Target::Fifo(p) => {
            let r = OpenOptions::new().read(true).write(true).open(&p);
            (p, r)
        }
        Target::File(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::create_dir_all(dir);
            }
            let r = OpenOptions::new().create(true).append(true).open(&p);
            (p, r)
        }
    };
    result.map_err(|source| StdioError::Open { stream, path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn empty_paths_go_to_dev_null_and_loggers_are_refused() {
        let paths = StdioPaths::default();
        assert!(paths.check().is_ok());
        let (mut out, _) = paths.open().expect("null");
        out.write_all(b"discarded").expect("write");
        let bad = StdioPaths { stdout: "binary:///usr/bin/logger".into(), ..Default::default() };
        assert!(bad.check().expect_err("binary").to_string().contains("binary://"));
    }

    #[test]
    fn file_uris_append() {
        let dir = std::env::temp_dir().join(format!("ctd-elastic-stdio-{}", std::process::id()));
        let path = dir.join("log.txt");
        let paths = StdioPaths { stdout: format!("file://{}", path.display()), ..Default::default() };
        {
            let (mut out, _) = paths.open().expect("file");
            out.write_all(b"one ").expect("write");
        }
        let (mut out, _) = paths.open().expect("file again");
        out.write_all(b"two").expect("write");
        let mut text = String::new();
        File::open(&path).expect("read").read_to_string(&mut text).expect("text");
        assert_eq!(text, "one two");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
