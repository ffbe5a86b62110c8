//! Host endpoints of the request channel: TCP ports published with `--publish
//! [ADDR:]HOST_PORT:GUEST_PORT` (loopback unless an address is given), and a Unix socket that
//! speaks Firecracker's hybrid-vsock protocol (`--vsock-uds PATH`; the protocol itself is the
//! vsock device's).
//!
//! Listening sockets are bound before any VM boots, so a port already in use is a one-line
//! error up front.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Endpoint failures.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EndpointError {
    /// `--publish` value malformed.
    #[error("'{0}' is not [ADDR:]HOST_PORT:GUEST_PORT (e.g. 6379:6379 or 127.0.0.1:8080:80)")]
    BadPublish(String),
    /// A port number out of range.
    #[error("'{0}': ports are 1-65535 on the host and 1-4294967295 in the guest")]
    BadPort(String),
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
}

/// One published port (kept as its spec in a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Publish {
    /// Host address to listen on.
    pub host: SocketAddr,
    /// Guest vsock port connections are forwarded to.
    pub guest_port: u32,
    /// The spec as given (for messages).
    pub spec: String,
}

impl TryFrom<String> for Publish {
    type Error = EndpointError;

    fn try_from(spec: String) -> Result<Self, Self::Error> {
        parse_publish(&spec)
    }
}

impl From<Publish> for String {
    fn from(p: Publish) -> String {
        p.spec
    }
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> guest port {}", self.host, self.guest_port)
    }
}

/// Parses `[ADDR:]HOST_PORT:GUEST_PORT`; `ADDR` may be an IPv4 address or a bracketed IPv6
/// one; without it the port is published on 127.0.0.1 only.
pub fn parse_publish(spec: &str) -> Result<Publish, EndpointError> {
    let bad = || EndpointError::BadPublish(spec.to_string());
    let (addr, rest) = if let Some(stripped) = spec.strip_prefix('[') {
        let (a, r) = stripped.split_once("]:").ok_or_else(bad)?;
        (Some(a.parse::<IpAddr>().map_err(|_| bad())?), r)
    } else {
        let parts: Vec<&str> = spec.split(':').collect();
        match parts.as_slice() {
            [_, _] => (None, spec),
            [a, _, _] => (Some(a.parse::<IpAddr>().map_err(|_| bad())?), spec.split_once(':').map_or("", |x| x.1)),
            _ => return Err(bad()),
        }
    };
    let (host_port, guest_port) = rest.split_once(':').ok_or_else(bad)?;
    let host_port: u16 = host_port.parse().map_err(|_| EndpointError::BadPort(spec.to_string()))?;
    let guest_port: u32 = guest_port.parse().map_err(|_| EndpointError::BadPort(spec.to_string()))?;
    if host_port == 0 || guest_port == 0 {
        return Err(EndpointError::BadPort(spec.to_string()));
    }
    let ip = addr.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    Ok(Publish { host: SocketAddr::new(ip, host_port), guest_port, spec: spec.to_string() })
}

/// A bound endpoint, handed to the I/O thread.
#[derive(Debug)]
pub enum Bound {
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

/// Binds every endpoint (all or nothing).
pub fn bind(publish: &[Publish], uds: Option<&Path>) -> Result<Vec<Bound>, EndpointError> {
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
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Bound::Tcp { listener, .. } => listener.as_raw_fd(),
            Bound::Uds { listener, .. } => listener.as_raw_fd(),
        }
    }

    /// Where clients connect (`127.0.0.1:8080`, or the Unix socket's path).
    pub fn describe(&self) -> String {
        match self {
            Bound::Tcp { listener, .. } => listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            Bound::Uds { path, .. } => path.display().to_string(),
        }
    }

    /// Another handle on the same listening socket (its backlog is shared). The copy of a
    /// Unix socket does not remove the socket's path when dropped; the original does.
    pub fn try_clone(&self) -> std::io::Result<Bound> {
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

impl Bound {
    /// Leaves a Unix socket's path in place when this handle goes (another process took the
    /// socket over).
    pub fn disown(&mut self) {
        if let Bound::Uds { owner, .. } = self {
            *owner = false;
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
    fn publish_specs() {
        let p = parse_publish("6379:6379").unwrap();
        assert_eq!(p.host, "127.0.0.1:6379".parse().unwrap());
        assert_eq!(p.guest_port, 6379);
        let p = parse_publish("0.0.0.0:8080:80").unwrap();
        assert_eq!(p.host, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(p.guest_port, 80);
        let p = parse_publish("[::1]:8080:80").unwrap();
        assert_eq!(p.host, "[::1]:8080".parse().unwrap());
        for bad in ["6379", "a:b", "1:2:3:4", "0:80", "80:0", "70000:80", "x.y:1:2", ":80"] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_port_in_use_is_refused_and_nothing_stays_bound() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let free_port = free.local_addr().unwrap().port();
        drop(free);
        let specs = [parse_publish(&format!("{free_port}:1")).unwrap(), parse_publish(&format!("{port}:2")).unwrap()];
        let e = bind(&specs, None).unwrap_err();
        assert!(matches!(e, EndpointError::Bind { .. }), "{e}");
        // The first listener was dropped with the error: its port is free again.
        assert!(TcpListener::bind(("127.0.0.1", free_port)).is_ok());
    }
}
