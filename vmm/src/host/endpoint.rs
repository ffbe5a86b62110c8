//! Host endpoints of the request channel: TCP ports published with `--publish
//! [ADDR:]HOST_PORT:GUEST_PORT` (loopback unless an address is given), and a Unix socket that
//! speaks Firecracker's hybrid-vsock protocol (`--vsock-uds PATH`; the protocol itself is the
//! vsock device's).
//!
//! Listening sockets are bound before any VM boots, so a port already in use is a one-line
//! error up front.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Endpoint failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EndpointError {
    /// A `--publish` value that does not parse.
    #[error(transparent)]
    Parse(#[from] elastic_config::PublishError),
    /// Binding failed.
    #[error("--publish {spec}: cannot listen on {addr}: {reason}")]
    Bind {
        /// The spec as given.
        spec: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Two publications of the same host address.
    #[error("--publish {0}: the host address is published twice")]
    Duplicate(String),
    /// The Unix socket path is unusable.
    #[error("--vsock-uds {path}: {reason}")]
    Uds {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The network namespace to bind in cannot be entered.
    #[error("network namespace {path}: {reason}")]
    Netns {
        /// Its path.
        path: String,
        /// Why.
        reason: String,
    },
}

pub(crate) use elastic_config::Publish;

/// A bound endpoint, handed to the I/O thread.
#[derive(Debug)]
pub(crate) enum Bound {
    /// A published TCP port.
    Tcp {
        /// The listening socket (non-blocking).
        listener: TcpListener,
        /// Where its connections go.
        guest_port: u32,
    },
    /// The hybrid-vsock Unix socket.
    Uds {
        /// The listening socket (non-blocking).
        listener: UnixListener,
        /// Its path (removed when the owning endpoint goes).
        path: PathBuf,
        /// Whether this handle removes the path when dropped (not a [`Bound::try_clone`]).
        owner: bool,
    },
}

/// Binds the TCP ports of `publish` inside the network namespace `netns` (a pod's): a
/// short-lived thread enters it and binds (the sockets stay in it), so no thread that goes on
/// ever changes namespace. `netns` must be a namespace file (nsfs); it is opened without
/// blocking.
pub(crate) fn bind_in(netns: &Path, publish: &[Publish]) -> Result<Vec<Bound>, EndpointError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    /// `NSFS_MAGIC` (linux/magic.h).
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let err = |reason: String| EndpointError::Netns { path: netns.display().to_string(), reason };
    // A namespace file is a regular (empty) file: anything else is refused before it is
    // opened (opening a device can have effects); what was opened is checked below.
    let meta = std::fs::metadata(netns).map_err(|e| err(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(err("not a namespace file (a /proc/PID/ns/net or a bind mount of one)".into()));
    }
    let target = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(netns)
        .map_err(|e| err(e.to_string()))?;
    // SAFETY: fstatfs writes only into `fs`, a zeroed statfs; the descriptor is open.
    let fs_type = unsafe {
        let mut fs: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(target.as_raw_fd(), &mut fs) != 0 {
            return Err(err(std::io::Error::last_os_error().to_string()));
        }
        fs.f_type as i64
    };
    if fs_type != NSFS_MAGIC {
        return Err(err("not a namespace file (a /proc/PID/ns/net or a bind mount of one)".into()));
    }
    let binder = std::thread::Builder::new().name("netns-bind".into());
    std::thread::scope(|scope| {
        let joined = binder
            .spawn_scoped(scope, || {
                // SAFETY: setns only reads the descriptor, which is open; it changes the
                // network namespace of this short-lived thread alone.
                if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(err(format!("cannot enter it: {}", std::io::Error::last_os_error())));
                }
                bind(publish, None)
            })
            .map_err(|e| err(format!("cannot start the thread that binds in it: {e}")))?
            .join();
        joined.unwrap_or_else(|_| Err(err("the thread that binds in it failed".into())))
    })
}

/// Binds every endpoint (all or nothing).
pub(crate) fn bind(publish: &[Publish], uds: Option<&Path>) -> Result<Vec<Bound>, EndpointError> {
    let mut bound = Vec::new();
    for (i, p) in publish.iter().enumerate() {
        if publish[..i].iter().any(|q| q.host == p.host) {
            return Err(EndpointError::Duplicate(p.spec.clone()));
        }
        let listener = TcpListener::bind(p.host).map_err(|e| EndpointError::Bind {
            spec: p.spec.clone(),
            addr: p.host,
            reason: e.to_string(),
        })?;
        listener.set_nonblocking(true).map_err(|e| EndpointError::Bind {
            spec: p.spec.clone(),
            addr: p.host,
            reason: e.to_string(),
        })?;
        bound.push(Bound::Tcp { listener, guest_port: p.guest_port });
    }
    if let Some(path) = uds {
        let err = |reason: String| EndpointError::Uds { path: path.display().to_string(), reason };
        if path.exists() {
            return Err(err("already exists (remove it first)".into()));
        }
        let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
        listener.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
        bound.push(Bound::Uds { listener, path: path.to_path_buf(), owner: true });
    }
    Ok(bound)
}

impl Bound {
    /// The listening socket's descriptor.
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Bound::Tcp { listener, .. } => listener.as_raw_fd(),
            Bound::Uds { listener, .. } => listener.as_raw_fd(),
        }
    }

    /// Where clients connect (`127.0.0.1:8080`, or the Unix socket's path).
    pub(crate) fn describe(&self) -> String {
        match self {
            Bound::Tcp { listener, .. } => listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            Bound::Uds { path, .. } => path.display().to_string(),
        }
    }

    /// Another handle on the same listening socket (its backlog is shared). The copy of a
    /// Unix socket does not remove the socket's path when dropped; the original does.
    pub(crate) fn try_clone(&self) -> std::io::Result<Bound> {
        Ok(match self {
            Bound::Tcp { listener, guest_port } => {
                Bound::Tcp { listener: listener.try_clone()?, guest_port: *guest_port }
            }
            Bound::Uds { listener, path, owner: _ } => {
                Bound::Uds { listener: listener.try_clone()?, path: path.clone(), owner: false }
            }
        })
    }
}

/// Copies of every endpoint of `endpoints` (see [`Bound::try_clone`]).
pub(crate) fn copies(endpoints: &[Bound]) -> std::io::Result<Vec<Bound>> {
    endpoints.iter().map(Bound::try_clone).collect()
}

impl Bound {
    /// Leaves a Unix socket's path in place when this handle goes (another process took the
    /// socket over).
    pub(crate) fn disown(&mut self) {
        if let Bound::Uds { owner, .. } = self {
            *owner = false;
        }
    }

    /// Removes a Unix socket's path when this handle goes (a socket handed over, once the
    /// process that handed it gave it up).
    pub(crate) fn own(&mut self) {
        if let Bound::Uds { owner, .. } = self {
            *owner = true;
        }
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Bound::Uds { path, owner: true, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_refused_and_nothing_stays_bound() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let free_port = free.local_addr().unwrap().port();
        drop(free);
        use elastic_config::parse_publish;
        let specs = [parse_publish(&format!("{free_port}:1")).unwrap(), parse_publish(&format!("{port}:2")).unwrap()];
        let e = bind(&specs, None).unwrap_err();
        assert!(matches!(e, EndpointError::Bind { .. }), "{e}");
        // The first listener was dropped with the error: its port is free again.
        assert!(TcpListener::bind(("127.0.0.1", free_port)).is_ok());
    }
}
