//! Host endpoints of the request channel: TCP ports published with `--publish
//! [ADDR:]HOST_PORT:GUEST_PORT` (loopback unless an address is given), and a Unix socket that
//! speaks Firecracker's hybrid-vsock protocol (`--vsock-uds PATH`: a client writes
//! `CONNECT <port>\n` and, once the guest accepted, reads `OK <hostport>\n`).
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

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Host address to listen on.
    pub host: SocketAddr,
    /// Guest vsock port connections are forwarded to.
    pub guest_port: u32,
    /// The spec as given (for messages).
    pub spec: String,
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

impl Drop for Bound {
    fn drop(&mut self) {
        if let Bound::Uds { path, owner: true, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Longest `CONNECT <port>\n` line accepted on the hybrid socket.
pub const CONNECT_LINE_MAX: usize = 32;

/// Parses a complete hybrid-vsock `CONNECT <port>` line (without the newline; the keyword is
/// case-insensitive, as Firecracker's is).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let (word, port) = text.split_once(' ')?;
    if !word.eq_ignore_ascii_case("connect") {
        return None;
    }
    port.trim().parse::<u32>().ok().filter(|&p| p != 0)
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
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"connect 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT x"), None);
        assert_eq!(parse_connect_line(b"HELLO 52"), None);
        assert_eq!(parse_connect_line(b"CONNECT 0"), None);
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
