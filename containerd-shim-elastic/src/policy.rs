//! The min / max / burst policies and published ports handed to `hypervisor-shim run`, with
//! the same grammar and limits its `--vcpus`, `--memory` and `--publish` flags accept.

use std::fmt;
use std::net::Ipv4Addr;

use thiserror::Error;

/// Most vCPUs a VM may have (the shim's limit).
pub const MAX_VCPUS: u64 = 128;
/// Smallest boot memory the shim accepts.
pub const MEMORY_MIN_FLOOR: u64 = 8 << 20;
/// Memory sizes are whole 2 MiB extents.
pub const MEMORY_ALIGN: u64 = 2 << 20;

/// A policy or port that does not parse or is out of range.
#[derive(Debug, Error, PartialEq)]
pub enum PolicyError {
    /// Not `MIN:MAX:BURST` (or one value).
    #[error("{0:?} is not MIN:MAX:BURST")]
    Shape(String),
    /// A vCPU count that is not a number.
    #[error("{0:?} is not a vCPU count")]
    Count(String),
    /// A size that is not `N[K|M|G|T]`.
    #[error("{0:?} is not a size (N with an optional K, M, G or T suffix)")]
    Size(String),
    /// min <= max <= burst does not hold.
    #[error("{what} policy {policy} is not ordered min <= max <= burst")]
    Unordered {
        /// vCPU or memory.
        what: &'static str,
        /// The policy, formatted `MIN:MAX:BURST`.
        policy: String,
    },
    /// vCPU counts out of 1..=128.
    #[error("vCPU counts must be between 1 and {MAX_VCPUS} (got {0})")]
    VcpuRange(u64),
    /// Memory below the floor.
    #[error("memory min {0} is below the smallest boot memory (8M)")]
    MemoryFloor(String),
    /// Not `[ADDR:]HOST:GUEST`.
    #[error("{0:?} is not [ADDR:]HOST:GUEST with IPv4 ADDR and ports 1-65535")]
    Publish(String),
}

/// A vCPU policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuPolicy {
    /// Started at boot, never gone below.
    pub min: u64,
    /// Sustained ceiling.
    pub max: u64,
    /// Temporary ceiling.
    pub burst: u64,
}

impl Default for VcpuPolicy {
    fn default() -> Self {
        VcpuPolicy { min: 1, max: 1, burst: 1 }
    }
}

impl VcpuPolicy {
    /// Parses `MIN:MAX:BURST` (or one count for all three).
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let [a, b, c] = split_policy(text)?;
        let count = |s: &str| s.trim().parse::<u64>().map_err(|_| PolicyError::Count(s.to_string()));
        let p = VcpuPolicy { min: count(a)?, max: count(b)?, burst: count(c)? };
        p.check()?;
        Ok(p)
    }

    /// Checks ordering and range.
    pub fn check(&self) -> Result<(), PolicyError> {
        if !(self.min <= self.max && self.max <= self.burst) {
            return Err(PolicyError::Unordered { what: "vCPU", policy: self.to_string() });
        }
        for v in [self.min, self.burst] {
            if v == 0 || v > MAX_VCPUS {
                return Err(PolicyError::VcpuRange(v));
            }
        }
        Ok(())
    }
}

impl fmt::Display for VcpuPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.min, self.max, self.burst)
    }
}

/// A memory policy in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPolicy {
    /// Boot memory.
    pub min: u64,
    /// Sustained ceiling.
    pub max: u64,
    /// Temporary ceiling.
    pub burst: u64,
}

impl Default for MemoryPolicy {
    fn default() -> Self {
        MemoryPolicy { min: 64 << 20, max: 64 << 20, burst: 64 << 20 }
    }
}

impl MemoryPolicy {
    /// Parses `MIN:MAX:BURST` sizes (or one size for all three); sizes are rounded down to
    /// whole 2 MiB extents.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let [a, b, c] = split_policy(text)?;
        let p = MemoryPolicy {
            min: round_memory(parse_size(a)?),
            max: round_memory(parse_size(b)?),
            burst: round_memory(parse_size(c)?),
        };
        p.check()?;
        Ok(p)
    }

    /// Checks ordering and the boot-memory floor.
    pub fn check(&self) -> Result<(), PolicyError> {
        if !(self.min <= self.max && self.max <= self.burst) {
            return Err(PolicyError::Unordered { what: "memory", policy: self.to_string() });
        }
        if self.min < MEMORY_MIN_FLOOR {
            return Err(PolicyError::MemoryFloor(format_size(self.min)));
        }
        Ok(())
    }
}

impl fmt::Display for MemoryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", format_size(self.min), format_size(self.max), format_size(self.burst))
    }
}

fn split_policy(text: &str) -> Result<[&str; 3], PolicyError> {
    let parts: Vec<&str> = text.split(':').collect();
    match parts.as_slice() {
        [v] => Ok([v, v, v]),
        [a, b, c] => Ok([a, b, c]),
        _ => Err(PolicyError::Shape(text.to_string())),
    }
}

/// Rounds a byte count down to whole 2 MiB extents (a limit must not be exceeded).
pub fn round_memory(bytes: u64) -> u64 {
    bytes - bytes % MEMORY_ALIGN
}

/// Parses `N[K|M|G|T]` (binary units; `B`, `i` and `iB` suffixes too, so Kubernetes
/// quantities such as `1Gi` parse).
pub fn parse_size(text: &str) -> Result<u64, PolicyError> {
    let t = text.trim();
    let bad = || PolicyError::Size(text.to_string());
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Formats a byte count with the largest exact binary suffix (`64M`, `1536K`).
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A published port: host `addr:host_port` forwards to the guest's `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    /// Host address to bind (127.0.0.1 when not given).
    pub addr: Ipv4Addr,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl Publish {
    /// Parses `[ADDR:]HOST:GUEST`.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::Publish(text.to_string());
        let parts: Vec<&str> = text.trim().split(':').collect();
        let (addr, host, guest) = match parts.as_slice() {
            [h, g] => (Ipv4Addr::LOCALHOST, *h, *g),
            [a, h, g] => (a.parse().map_err(|_| bad())?, *h, *g),
            _ => return Err(bad()),
        };
        let port = |s: &str| s.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        Ok(Publish { addr, host_port: port(host)?, guest_port: port(guest)? })
    }

    /// Parses a comma-separated list (the `elastic.publish` annotation); empty items are
    /// refused.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, PolicyError> {
        text.split(',').map(Publish::parse).collect()
    }
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.addr, self.host_port, self.guest_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_policies() {
        assert_eq!(VcpuPolicy::parse("2").expect("one value"), VcpuPolicy { min: 2, max: 2, burst: 2 });
        assert_eq!(VcpuPolicy::parse("1:2:4").expect("three").to_string(), "1:2:4");
        assert!(matches!(VcpuPolicy::parse("2:1:4"), Err(PolicyError::Unordered { .. })));
        assert_eq!(VcpuPolicy::parse("0:1:1"), Err(PolicyError::VcpuRange(0)));
        assert_eq!(VcpuPolicy::parse("1:1:129"), Err(PolicyError::VcpuRange(129)));
        assert!(matches!(VcpuPolicy::parse("1:2"), Err(PolicyError::Shape(_))));
        assert!(matches!(VcpuPolicy::parse("a:2:3"), Err(PolicyError::Count(_))));
    }

    #[test]
    fn memory_policies() {
        let p = MemoryPolicy::parse("64M:256M:1G").expect("valid");
        assert_eq!(p, MemoryPolicy { min: 64 << 20, max: 256 << 20, burst: 1 << 30 });
        assert_eq!(p.to_string(), "64M:256M:1G");
        // 300 MB (decimal) rounds down to whole 2 MiB extents.
        assert_eq!(MemoryPolicy::parse("300000000").expect("bytes").min, 286 << 20);
        assert!(matches!(MemoryPolicy::parse("4M"), Err(PolicyError::MemoryFloor(_))));
        assert!(matches!(MemoryPolicy::parse("64Q"), Err(PolicyError::Size(_))));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert!(matches!(MemoryPolicy::parse("128M:64M:1G"), Err(PolicyError::Unordered { .. })));
    }

    #[test]
    fn publish_specs() {
        let p = Publish::parse("6379:6379").expect("short");
        assert_eq!(p.to_string(), "127.0.0.1:6379:6379");
        assert_eq!(Publish::parse("0.0.0.0:8080:80").expect("addr").to_string(), "0.0.0.0:8080:80");
        assert_eq!(Publish::parse_list("1:2,127.0.0.1:3:4").expect("list").len(), 2);
        for bad in ["", "1", "0:80", "1:70000", "host:1:2", "1:2:3:4", "1:2,"] {
            assert!(Publish::parse_list(bad).is_err(), "{bad:?} accepted");
        }
    }
}
