//! The one grammar for what a user writes about an elastic VM: resource policies, sizes, burst
//! credits, durations and published ports.
//!
//! `hypervisor-shim` (its flags, pool files and control API) and `containerd-shim-elastic`
//! (`elastic.toml`, `elastic.*` annotations) both parse with this crate, so a value one
//! accepts the other accepts, and a value one refuses the other refuses with the same message.
//! The limits come from the ABI ([`hypercall_abi::MAX_VCPUS`],
//! [`hypercall_abi::EXTENT_ALIGN`]) and from [`layout`] (the guest-physical ceiling).
//!
//! # Grammar
//!
//! * **Size** ([`parse_size`]): a whole number of bytes with an optional binary suffix `K`,
//!   `M`, `G` or `T`, each optionally followed by `i`, `B` or `iB` (`64M`, `64MB`, `64Mi`,
//!   `64MiB` are the same), in any case; `B` alone means bytes. It must fit in a `u64`. There
//!   are no fractions, signs or decimal units: `1M` is 1048576 bytes (Kubernetes would read
//!   `1M` as 10⁶; write `Mi` there to mean the same thing in both).
//! * **vCPU policy** ([`parse_vcpu_policy`]): `MIN:MAX:BURST`, `MIN:MAX` (burst = max) or one
//!   count for all three, with `1 <= min <= max <= burst <= MAX_VCPUS` (64).
//! * **Memory policy** ([`parse_memory_policy`]): the same shapes, of sizes, with
//!   `min <= max <= burst`, min at least [`MEMORY_MIN_FLOOR`] (8M), every value a whole number
//!   of 2M extents (refused otherwise, never rounded), and the hot-plug window
//!   ([`layout::window_base`]`(min)`, `burst - min` long) ending inside
//!   [`layout::MAX_GUEST_PHYS`] (253G).
//! * **Credit** ([`parse_credit`]): `VCPU_SECONDS[:GIB_SECONDS]`, one value for both; finite,
//!   non-negative decimals.
//! * **Duration** ([`parse_duration`]): `200ms`, `0.5s`, or a bare number of milliseconds;
//!   finite, non-negative, at most 10⁶ s.
//! * **Published port** ([`parse_publish`]): `[ADDR:]HOST_PORT:GUEST_PORT`, `ADDR` an IPv4
//!   address or a bracketed IPv6 one (`[::1]`), 127.0.0.1 when absent; host port 1-65535,
//!   guest (vsock) port 1-4294967295.
//!
//! Whitespace around a whole size, count or number is ignored. A value that is computed rather
//! than written (a policy derived from Kubernetes resources) goes through the same checks with
//! [`validate_vcpu_policy`] and [`validate_memory_policy`].
//!
//! Each module has one error enum whose messages are the ones the shim prints; [`Error`]
//! gathers them for callers that parse several kinds of value.

pub mod layout;
pub mod policy;
pub mod publish;
pub mod size;
pub mod time;

pub use policy::{
    DEFAULT_MEMORY_POLICY, DEFAULT_VCPU_POLICY, MEMORY_MIN_FLOOR, Policy, PolicyError, format_memory_policy,
    parse_count, parse_memory_policy, parse_vcpu_policy, validate_memory_policy, validate_vcpu_policy,
};
pub use publish::{Publish, PublishError, parse_publish};
pub use size::{SizeError, format_size, parse_size};
pub use time::{TimeError, parse_credit, parse_duration};

/// Any error of this crate (each variant shows its inner message unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A size.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// A count or policy.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A credit or duration.
    #[error(transparent)]
    Time(#[from] TimeError),
    /// A published port.
    #[error(transparent)]
    Publish(#[from] PublishError),
}
