//! The call table's facts restated by hand, as a check on what `calls!` generates: kept out of
//! `src/` so that each call's number, name and argument block are written there once.

use hypercall_abi::*;

/// The wire facts restated by hand, as a check on the generated table: number, name and
/// block size of every call (`None`: the call takes no block).
#[test]
fn call_numbers_names_and_blocks_are_pinned() {
    let pinned = [
        (Call::Hello, 1, "hello", Some(168)),
        (Call::ConsoleWrite, 2, "console_write", Some(48)),
        (Call::Shutdown, 3, "shutdown", Some(32)),
        (Call::Ping, 4, "ping", Some(16)),
        (Call::VcpuUp, 5, "vcpu_up", Some(56)),
        (Call::VcpuDown, 6, "vcpu_down", None),
        (Call::Block, 7, "block", Some(40)),
        (Call::Kick, 8, "kick", Some(24)),
        (Call::Events, 9, "events", Some(72)),
        (Call::Report, 10, "report", Some(72)),
        (Call::MemGrant, 11, "mem_grant", Some(56)),
        (Call::MemRelease, 12, "mem_release", Some(48)),
        (Call::DeviceNotify, 13, "device_notify", None),
    ];
    assert_eq!(pinned.len(), Call::ALL.len());
    for ((c, n, name, size), &listed) in pinned.into_iter().zip(Call::ALL) {
        assert_eq!(c, listed, "ALL is in number order");
        assert_eq!(c.number(), n, "{name}");
        assert_eq!(c.name(), name);
        assert_eq!(c.block_size(), size, "{name}");
    }
}

#[test]
fn blocks_belong_to_their_calls() {
    fn check<T: ArgBlock>() {
        let c = T::CALL;
        assert_eq!(c.block_size(), Some(core::mem::size_of::<T>()), "{}", c.name());
        let type_name = core::any::type_name::<T>();
        assert!(type_name.ends_with(c.block_name().unwrap_or("(none)")), "{type_name} vs {}", c.name());
    }
    check::<HelloArgs>();
    check::<ConsoleWriteArgs>();
    check::<ShutdownArgs>();
    check::<PingArgs>();
    check::<VcpuUpArgs>();
    check::<BlockArgs>();
    check::<KickArgs>();
    check::<EventsArgs>();
    check::<ReportArgs>();
    check::<MemGrantArgs>();
    check::<MemReleaseArgs>();
    assert_eq!(Call::VcpuDown.block_name(), None);
    assert_eq!(Call::DeviceNotify.block_name(), None);
}
