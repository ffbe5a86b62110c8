//! What is containerd's own about policies and published ports. The grammar, limits and
//! messages are [`elastic_config`]'s, the same `hypervisor-shim` applies to its `--vcpus`,
//! `--memory` and `--publish` flags: a value written in `elastic.toml` or an `elastic.*`
//! annotation is accepted here exactly when the VMM would accept it.
//!
//! Only two things are containerd-specific: Kubernetes hands over a memory limit in bytes,
//! which [`limit_to_extents`] rounds down to whole extents before it becomes a policy (that
//! policy is then validated like any other), and the `elastic.publish` annotation carries a
//! comma-separated list ([`parse_publish_list`]).

use elastic_config::{Publish, PublishError, parse_publish};
use hypercall_abi::EXTENT_ALIGN;

/// Rounds a memory limit in bytes (Kubernetes' `limits.memory`, `linux.resources.memory.limit`)
/// down to whole 2 MiB extents: the VM must not exceed the limit. Only for figures Kubernetes
/// computed; a size a user wrote must already be a whole number of extents.
pub fn limit_to_extents(bytes: u64) -> u64 {
    bytes - bytes % EXTENT_ALIGN
}

/// Parses a comma-separated list of `[ADDR:]HOST_PORT:GUEST_PORT` (the `elastic.publish`
/// annotation); an empty item is refused.
pub fn parse_publish_list(text: &str) -> Result<Vec<Publish>, PublishError> {
    text.split(',').map(parse_publish).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_round_down_to_extents() {
        assert_eq!(limit_to_extents(300_000_000), 286 << 20);
        assert_eq!(limit_to_extents(256 << 20), 256 << 20);
        assert_eq!(limit_to_extents((2 << 20) - 1), 0);
    }

    #[test]
    fn publish_lists() {
        let list = parse_publish_list("1:2,127.0.0.1:3:4,[::1]:5:6").expect("list");
        let specs: Vec<String> = list.iter().map(Publish::canonical).collect();
        assert_eq!(specs, ["127.0.0.1:1:2", "127.0.0.1:3:4", "[::1]:5:6"]);
        for bad in ["", "1", "0:80", "70000:80", "host:1:2", "1:2:3:4", "1:2,"] {
            assert!(parse_publish_list(bad).is_err(), "{bad:?} accepted");
        }
    }
}
