//! Published ports: `[ADDR:]HOST_PORT:GUEST_PORT`, a host TCP address whose connections are
//! forwarded to a guest vsock port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use thiserror::Error;

/// A published port that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PublishError {
    /// Not `[ADDR:]HOST_PORT:GUEST_PORT`, or `ADDR` is not an IP address.
    #[error("'{0}' is not [ADDR:]HOST_PORT:GUEST_PORT (e.g. 6379:6379 or 127.0.0.1:8080:80)")]
    BadPublish(String),
    /// A port number out of range.
    #[error("'{0}': ports are 1-65535 on the host and 1-4294967295 in the guest")]
    BadPort(String),
}

/// One published port (as data, its spec: `"6379:6379"`).
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

impl Publish {
    /// The spec with the address spelled out (`127.0.0.1:6379:6379`, `[::1]:8080:80`):
    /// [`parse_publish`] reads it back to the same address and port.
    pub fn canonical(&self) -> String {
        format!("{}:{}", self.host, self.guest_port)
    }
}

impl TryFrom<String> for Publish {
    type Error = PublishError;

    fn try_from(spec: String) -> Result<Self, Self::Error> {
        parse_publish(&spec)
    }
}

impl From<Publish> for String {
    fn from(p: Publish) -> String {
        p.spec
    }
}

/// `127.0.0.1:6379 -> guest port 6379`.
impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> guest port {}", self.host, self.guest_port)
    }
}

/// Parses `[ADDR:]HOST_PORT:GUEST_PORT`; `ADDR` may be an IPv4 address or a bracketed IPv6
/// one; without it the port is published on 127.0.0.1 only. The host port is 1-65535, the
/// guest (vsock) port 1-4294967295.
///
/// ```
/// use elastic_config::parse_publish;
/// assert_eq!(parse_publish("6379:6379").unwrap().canonical(), "127.0.0.1:6379:6379");
/// assert_eq!(parse_publish("[::1]:8080:80").unwrap().canonical(), "[::1]:8080:80");
/// ```
pub fn parse_publish(spec: &str) -> Result<Publish, PublishError> {
    let bad = || PublishError::BadPublish(spec.to_string());
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
    let host_port: u16 = host_port.parse().map_err(|_| PublishError::BadPort(spec.to_string()))?;
    let guest_port: u32 = guest_port.parse().map_err(|_| PublishError::BadPort(spec.to_string()))?;
    if host_port == 0 || guest_port == 0 {
        return Err(PublishError::BadPort(spec.to_string()));
    }
    let ip = addr.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    Ok(Publish { host: SocketAddr::new(ip, host_port), guest_port, spec: spec.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs() {
        let p = parse_publish("6379:6379").unwrap();
        assert_eq!(p.host, "127.0.0.1:6379".parse().unwrap());
        assert_eq!(p.guest_port, 6379);
        assert_eq!(p.spec, "6379:6379");
        assert_eq!(p.to_string(), "127.0.0.1:6379 -> guest port 6379");
        let p = parse_publish("0.0.0.0:8080:80").unwrap();
        assert_eq!(p.host, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(p.guest_port, 80);
        let p = parse_publish("[::1]:8080:80").unwrap();
        assert_eq!(p.host, "[::1]:8080".parse().unwrap());
        assert_eq!(parse_publish("1:4294967295").unwrap().guest_port, u32::MAX);
        for bad in ["6379", "a:b", "1:2:3:4", "0:80", "80:0", "70000:80", "x.y:1:2", ":80", "", "[::1]:80", "::1:80:80"]
        {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages() {
        assert_eq!(
            parse_publish("6379").unwrap_err().to_string(),
            "'6379' is not [ADDR:]HOST_PORT:GUEST_PORT (e.g. 6379:6379 or 127.0.0.1:8080:80)"
        );
        assert_eq!(
            parse_publish("0:1").unwrap_err().to_string(),
            "'0:1': ports are 1-65535 on the host and 1-4294967295 in the guest"
        );
    }
}
