//! `min <= max <= burst` resource policies: vCPU counts and memory sizes.
//!
//! A policy is written `MIN:MAX:BURST`, `MIN:MAX` (burst = max) or as one value for all
//! three. vCPU policies hold counts, memory policies sizes ([`crate::size`]).

use std::fmt;

use hypercall_abi::{EXTENT_ALIGN, MAX_VCPUS, ResourceLimits};
use thiserror::Error;

use crate::layout::{self, MAX_GUEST_PHYS};
use crate::size::{SizeError, format_size, parse_size};

/// Smallest boot memory (`min`): the kernel image and its boot heap live there.
pub const MEMORY_MIN_FLOOR: u64 = 8 << 20;

/// The vCPU policy `hypervisor-shim run` uses without `--vcpus` (`1:1:1`).
pub const DEFAULT_VCPU_POLICY: Policy = Policy::fixed(1);

/// The memory policy `hypervisor-shim run` uses without `--memory` (`64M:64M:64M`).
pub const DEFAULT_MEMORY_POLICY: Policy = Policy::fixed(64 << 20);

/// A count or policy that does not parse, or a policy outside the limits.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// A memory size did not parse.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// A count could not be parsed.
    #[error("'{0}' is not a whole number")]
    BadCount(String),
    /// A policy did not have the `MIN:MAX:BURST` shape.
    #[error("'{0}' is not MIN:MAX:BURST (or MIN:MAX, or a single value)")]
    BadPolicy(String),
    /// `min <= max <= burst` does not hold.
    #[error("{what} policy {policy} must satisfy min <= max <= burst")]
    Unordered {
        /// Which resource (`vCPU` or `memory`).
        what: &'static str,
        /// The policy as given.
        policy: String,
    },
    /// vCPU counts out of range.
    #[error("vCPU policy {0}: min must be at least 1 and burst at most {MAX_VCPUS}")]
    VcpuRange(String),
    /// Memory sizes out of range or misaligned.
    #[error("memory policy {policy}: {problem}")]
    MemoryRange {
        /// The policy as given.
        policy: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// One resource's `min <= max <= burst` policy (vCPUs, or memory in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// Reserved at admission and held from boot.
    pub min: u64,
    /// Sustained ceiling.
    pub max: u64,
    /// Temporary ceiling, paid from burst credit.
    pub burst: u64,
}

impl Policy {
    /// The same value for all three.
    pub const fn fixed(v: u64) -> Self {
        Policy { min: v, max: v, burst: v }
    }

    /// As the ABI's [`ResourceLimits`].
    pub const fn limits(&self) -> ResourceLimits {
        ResourceLimits { min: self.min, max: self.max, burst: self.burst }
    }
}

/// `MIN:MAX:BURST` as plain numbers: the form [`parse_vcpu_policy`] reads (and, in bytes,
/// [`parse_memory_policy`]; [`format_memory_policy`] writes sizes with suffixes).
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.min, self.max, self.burst)
    }
}

/// Formats a memory policy with size suffixes (`64M:256M:1G`), as [`parse_memory_policy`]
/// reads it.
pub fn format_memory_policy(p: &Policy) -> String {
    format!("{}:{}:{}", format_size(p.min), format_size(p.max), format_size(p.burst))
}

/// The three parts of a policy: one value for all, `MIN:MAX` (burst = max), or all three.
fn split_policy(text: &str) -> Result<[&str; 3], PolicyError> {
    let parts: Vec<&str> = text.split(':').collect();
    match parts.as_slice() {
        [v] => Ok([v, v, v]),
        [a, b] => Ok([a, b, b]),
        [a, b, c] => Ok([a, b, c]),
        _ => Err(PolicyError::BadPolicy(text.to_string())),
    }
}

/// Parses a count: a whole non-negative number (surrounding whitespace ignored).
pub fn parse_count(text: &str) -> Result<u64, PolicyError> {
    text.trim().parse::<u64>().map_err(|_| PolicyError::BadCount(text.to_string()))
}

/// Parses and validates a vCPU policy such as `1:4:8`, `1:4` or `2`.
pub fn parse_vcpu_policy(text: &str) -> Result<Policy, PolicyError> {
    let [a, b, c] = split_policy(text)?;
    check_vcpus(Policy { min: parse_count(a)?, max: parse_count(b)?, burst: parse_count(c)? }, text)
}

/// Parses and validates a memory policy such as `64M:512M:1G`, `64M:512M` or `64M`.
pub fn parse_memory_policy(text: &str) -> Result<Policy, PolicyError> {
    let [a, b, c] = split_policy(text)?;
    check_memory(Policy { min: parse_size(a)?, max: parse_size(b)?, burst: parse_size(c)? }, text)
}

/// Applies the checks of [`parse_vcpu_policy`] to a policy that was computed rather than
/// written (the error shows it as `MIN:MAX:BURST`).
pub fn validate_vcpu_policy(p: Policy) -> Result<Policy, PolicyError> {
    check_vcpus(p, &p.to_string())
}

/// Applies the checks of [`parse_memory_policy`] to a policy that was computed rather than
/// written (the error shows it as [`format_memory_policy`] does).
pub fn validate_memory_policy(p: Policy) -> Result<Policy, PolicyError> {
    check_memory(p, &format_memory_policy(&p))
}

/// `1 <= min <= max <= burst <= MAX_VCPUS`; `text` names the policy in errors.
fn check_vcpus(p: Policy, text: &str) -> Result<Policy, PolicyError> {
    if !(p.min <= p.max && p.max <= p.burst) {
        return Err(PolicyError::Unordered { what: "vCPU", policy: text.to_string() });
    }
    if p.min == 0 || p.burst > u64::from(MAX_VCPUS) {
        return Err(PolicyError::VcpuRange(text.to_string()));
    }
    Ok(p)
}

/// Ordered, min at least the floor, whole extents, and inside the guest-physical space;
/// `text` names the policy in errors.
fn check_memory(p: Policy, text: &str) -> Result<Policy, PolicyError> {
    let range = |problem: String| PolicyError::MemoryRange { policy: text.to_string(), problem };
    if !(p.min <= p.max && p.max <= p.burst) {
        return Err(PolicyError::Unordered { what: "memory", policy: text.to_string() });
    }
    if p.min < MEMORY_MIN_FLOOR {
        return Err(range(format!("min must be at least {}", format_size(MEMORY_MIN_FLOOR))));
    }
    for v in [p.min, p.max, p.burst] {
        if !v.is_multiple_of(EXTENT_ALIGN) {
            return Err(range(format!("{} is not a multiple of {}", format_size(v), format_size(EXTENT_ALIGN))));
        }
    }
    if !layout::fits(p.min, p.burst) {
        return Err(range(format!(
            "burst is too large (guest-physical space ends at {})",
            format_size(MAX_GUEST_PHYS)
        )));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_policies() {
        assert_eq!(parse_vcpu_policy("1:4:8"), Ok(Policy { min: 1, max: 4, burst: 8 }));
        assert_eq!(parse_vcpu_policy("2"), Ok(Policy::fixed(2)));
        assert_eq!(parse_vcpu_policy(" 1 : 3 "), Ok(Policy { min: 1, max: 3, burst: 3 }));
        assert_eq!(parse_vcpu_policy("1:64:64"), Ok(Policy { min: 1, max: 64, burst: 64 }));
        assert!(matches!(parse_vcpu_policy("4:2:8"), Err(PolicyError::Unordered { .. })));
        assert!(matches!(parse_vcpu_policy("0:1:1"), Err(PolicyError::VcpuRange(_))));
        assert!(matches!(parse_vcpu_policy("1:65:65"), Err(PolicyError::VcpuRange(_))));
        assert!(matches!(parse_vcpu_policy("1:1:100000"), Err(PolicyError::VcpuRange(_))));
        assert!(matches!(parse_vcpu_policy("1:x:2"), Err(PolicyError::BadCount(_))));
        assert!(matches!(parse_vcpu_policy("1::2"), Err(PolicyError::BadCount(_))));
        assert!(matches!(parse_vcpu_policy("-1"), Err(PolicyError::BadCount(_))));
        assert!(matches!(parse_vcpu_policy("1:2:3:4"), Err(PolicyError::BadPolicy(_))));
    }

    #[test]
    fn memory_policies() {
        let p = parse_memory_policy("64M:512M:1G").unwrap();
        assert_eq!((p.min, p.max, p.burst), (64 << 20, 512 << 20, 1 << 30));
        assert_eq!(parse_memory_policy("64Mi:1Gi"), Ok(Policy { min: 64 << 20, max: 1 << 30, burst: 1 << 30 }));
        assert_eq!(parse_memory_policy("67108864"), Ok(Policy::fixed(64 << 20)));
        assert!(matches!(parse_memory_policy("4M"), Err(PolicyError::MemoryRange { .. })));
        assert!(matches!(parse_memory_policy("65M"), Err(PolicyError::MemoryRange { .. })));
        assert!(matches!(parse_memory_policy("64M:32M"), Err(PolicyError::Unordered { .. })));
        assert!(matches!(parse_memory_policy("64M:64M:1000G"), Err(PolicyError::MemoryRange { .. })));
        assert!(matches!(parse_memory_policy("64Q"), Err(PolicyError::Size(_))));
        assert!(matches!(parse_memory_policy("64M:1G:2G:3G"), Err(PolicyError::BadPolicy(_))));
        // Sizes near the top of u64 are refused, never overflow.
        assert!(matches!(parse_memory_policy("17592186044414M"), Err(PolicyError::MemoryRange { .. })));
        assert!(parse_memory_policy("64M:64M:17592186044414M").is_err());
        // The largest window that fits: boot memory below 1G, the window from 1G to 253G.
        assert!(parse_memory_policy("64M:64M:258112M").is_ok());
        assert!(parse_memory_policy("64M:64M:258114M").is_err());
        assert!(parse_memory_policy("253G").is_ok(), "all boot memory, no window");
        assert!(parse_memory_policy("254G").is_err());
    }

    #[test]
    fn computed_policies_get_the_same_checks() {
        assert_eq!(validate_vcpu_policy(Policy { min: 1, max: 2, burst: 4 }), Ok(Policy { min: 1, max: 2, burst: 4 }));
        assert_eq!(
            validate_vcpu_policy(Policy { min: 1, max: 65, burst: 65 }).unwrap_err().to_string(),
            "vCPU policy 1:65:65: min must be at least 1 and burst at most 64"
        );
        assert_eq!(
            validate_memory_policy(Policy { min: 64 << 20, max: (256 << 20) + 4096, burst: 1 << 30 })
                .unwrap_err()
                .to_string(),
            "memory policy 64M:262148K:1G: 262148K is not a multiple of 2M"
        );
        assert_eq!(validate_memory_policy(DEFAULT_MEMORY_POLICY), Ok(DEFAULT_MEMORY_POLICY));
        assert_eq!(validate_vcpu_policy(DEFAULT_VCPU_POLICY), Ok(DEFAULT_VCPU_POLICY));
    }

    /// The messages, word for word: the shim's flags, pool files and containerd's
    /// `elastic.toml` all print these.
    #[test]
    fn messages() {
        let msg = |r: Result<Policy, PolicyError>| r.unwrap_err().to_string();
        assert_eq!(msg(parse_vcpu_policy("4:2:8")), "vCPU policy 4:2:8 must satisfy min <= max <= burst");
        assert_eq!(msg(parse_vcpu_policy("0")), "vCPU policy 0: min must be at least 1 and burst at most 64");
        assert_eq!(msg(parse_vcpu_policy("1:x")), "'x' is not a whole number");
        assert_eq!(msg(parse_vcpu_policy("1:2:3:4")), "'1:2:3:4' is not MIN:MAX:BURST (or MIN:MAX, or a single value)");
        assert_eq!(msg(parse_memory_policy("5M")), "memory policy 5M: min must be at least 8M");
        assert_eq!(msg(parse_memory_policy("65M")), "memory policy 65M: 65M is not a multiple of 2M");
        assert_eq!(msg(parse_memory_policy("1.5G")), "'1.5G' is not a size (examples: 4096, 512K, 64M, 1G)");
        assert_eq!(
            msg(parse_memory_policy("64M:64M:1000G")),
            "memory policy 64M:64M:1000G: burst is too large (guest-physical space ends at 253G)"
        );
        assert_eq!(msg(parse_memory_policy("64M:32M")), "memory policy 64M:32M must satisfy min <= max <= burst");
    }
}
