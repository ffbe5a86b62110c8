//! Property tests: what this crate formats, it parses back to the same value; parsing never
//! panics; a computed policy passes validation exactly when its written form parses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use elastic_config::layout::{MAX_GUEST_PHYS, fits};
use elastic_config::{
    MEMORY_MIN_FLOOR, Policy, format_memory_policy, format_size, parse_credit, parse_duration, parse_memory_policy,
    parse_publish, parse_size, parse_vcpu_policy, validate_memory_policy, validate_vcpu_policy,
};
use hypercall_abi::{EXTENT_ALIGN, MAX_VCPUS};
use proptest::prelude::*;

/// Byte counts: anything, multiples of every unit, and values near the unit boundaries.
fn bytes() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0u64..1 << 24, 0u32..=40).prop_map(|(n, shift)| n << shift),
        (1u32..64).prop_map(|shift| (1u64 << shift) - 1),
    ]
}

/// Valid vCPU policies.
fn vcpu_policy() -> impl Strategy<Value = Policy> {
    let top = u64::from(MAX_VCPUS);
    (1..=top)
        .prop_flat_map(move |min| (Just(min), min..=top))
        .prop_flat_map(move |(min, max)| (Just(min), Just(max), max..=top))
        .prop_map(|(min, max, burst)| Policy { min, max, burst })
}

/// Valid memory policies: whole extents, at least the floor, inside the guest-physical space.
fn memory_policy() -> impl Strategy<Value = Policy> {
    let floor = MEMORY_MIN_FLOOR / EXTENT_ALIGN;
    let top = MAX_GUEST_PHYS / EXTENT_ALIGN;
    (floor..=top)
        .prop_flat_map(move |min| (Just(min), min..=top))
        .prop_flat_map(move |(min, max)| (Just(min), Just(max), max..=top))
        .prop_map(|(min, max, burst)| Policy {
            min: min * EXTENT_ALIGN,
            max: max * EXTENT_ALIGN,
            burst: burst * EXTENT_ALIGN,
        })
        .prop_filter("the window fits", |p| fits(p.min, p.burst))
}

/// Published host addresses: IPv4 or IPv6, any port but 0.
fn host() -> impl Strategy<Value = SocketAddr> {
    let ip = prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ];
    (ip, 1u16..).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn sizes_round_trip(n in bytes()) {
        let text = format_size(n);
        prop_assert_eq!(parse_size(&text), Ok(n), "{}", text);
        // Every spelling of the same unit means the same.
        if let Some(unit) = text.chars().last().filter(char::is_ascii_alphabetic) {
            let num = &text[..text.len() - 1];
            let lower = unit.to_ascii_lowercase();
            for suffix in [format!("{unit}i"), format!("{unit}B"), format!("{unit}iB"), format!("{lower}ib")] {
                prop_assert_eq!(parse_size(&format!("{num}{suffix}")), Ok(n));
            }
        }
    }

    #[test]
    fn vcpu_policies_round_trip(p in vcpu_policy()) {
        prop_assert_eq!(parse_vcpu_policy(&p.to_string()), Ok(p));
        prop_assert_eq!(validate_vcpu_policy(p), Ok(p));
        if p.max == p.burst {
            prop_assert_eq!(parse_vcpu_policy(&format!("{}:{}", p.min, p.max)), Ok(p));
        }
    }

    #[test]
    fn memory_policies_round_trip(p in memory_policy()) {
        prop_assert_eq!(parse_memory_policy(&format_memory_policy(&p)), Ok(p));
        prop_assert_eq!(parse_memory_policy(&p.to_string()), Ok(p), "plain bytes parse too");
        prop_assert_eq!(validate_memory_policy(p), Ok(p));
    }

    /// Validation of a computed policy and parsing of its written form agree, error included.
    #[test]
    fn validation_agrees_with_parsing(
        min in 0u64..80,
        max in 0u64..80,
        burst in 0u64..80,
        unit in prop::sample::select(vec![1u64 << 20, EXTENT_ALIGN, 1 << 30]),
    ) {
        let v = Policy { min, max, burst };
        prop_assert_eq!(validate_vcpu_policy(v), parse_vcpu_policy(&v.to_string()));
        let m = Policy { min: min * unit, max: max * unit, burst: burst * unit };
        prop_assert_eq!(validate_memory_policy(m), parse_memory_policy(&format_memory_policy(&m)));
    }

    #[test]
    fn published_ports_round_trip(host in host(), guest_port in 1u32..) {
        let spec = format!("{}:{}", host, guest_port);
        let p = parse_publish(&spec).expect("a formatted spec parses");
        prop_assert_eq!(p.host, host);
        prop_assert_eq!(p.guest_port, guest_port);
        prop_assert_eq!(p.canonical(), spec);
        if host.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) {
            let short = parse_publish(&format!("{}:{}", host.port(), guest_port)).expect("the short form parses");
            prop_assert_eq!(short.host, host);
        }
    }

    #[test]
    fn parsing_never_panics(text in "\\PC{0,24}", structured in "[0-9a-zA-Z:.\\[\\] ]{0,24}") {
        for t in [&text, &structured] {
            let _ = parse_size(t);
            let _ = parse_vcpu_policy(t);
            let _ = parse_memory_policy(t);
            let _ = parse_credit(t);
            let _ = parse_duration(t);
            let _ = parse_publish(t);
        }
    }
}
