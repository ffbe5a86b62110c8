//! Golden-byte and round-trip tests that pin the wire layout of every ABI structure.

use hypercall_abi::*;
use zerocopy::{FromBytes, IntoBytes};

/// Serializes, checks the bytes against `golden`, parses back and compares.
fn round_trip<T: FromBytes + IntoBytes + zerocopy::Immutable + Copy + PartialEq + core::fmt::Debug>(
    value: T,
    golden: &[(usize, &[u8])],
) {
    let bytes = value.as_bytes().to_vec();
    for (offset, expected) in golden {
        assert_eq!(&bytes[*offset..*offset + expected.len()], *expected, "bytes at offset {offset}");
    }
    let back = T::read_from_bytes(&bytes).expect("size matches");
    assert_eq!(back, value);
}

#[test]
fn header_starts_pending() {
    let h = Header::pending();
    assert_eq!(h.status(), Status::PENDING);
    assert_eq!(h.as_bytes(), &[0, 0, 0, 0x80, 0, 0, 0, 0]);
}

#[test]
fn hello_layout() {
    let mut a = HelloArgs::new(0x0102_0304_0506_0708);
    a.header.status = Status::OK.0;
    a.host_abi_version = 1;
    a.vcpu_id = 3;
    a.vcpus = ResourceLimits { min: 1, max: 2, burst: 4 };
    a.memory = ResourceLimits { min: 64 << 20, max: 512 << 20, burst: 1 << 30 };
    a.tsc_khz = 2_600_000;
    round_trip(
        a,
        &[
            (0, &[0, 0, 0, 0]),
            (8, &[1, 0, 0, 0]),
            (16, &[8, 7, 6, 5, 4, 3, 2, 1]),
            (24, &[1, 0, 0, 0, 3, 0, 0, 0]),
            (48, &[1, 0, 0, 0, 0, 0, 0, 0]),
            (56, &[2, 0, 0, 0, 0, 0, 0, 0]),
            (64, &[4, 0, 0, 0, 0, 0, 0, 0]),
            (72, &(64u64 << 20).to_le_bytes()),
            (96, &2_600_000u64.to_le_bytes()),
        ],
    );
    assert_eq!(<HelloArgs as ArgBlock>::CALL, Call::Hello);
}

#[test]
fn console_write_layout() {
    let a = ConsoleWriteArgs::new(0x20_1000, 17);
    round_trip(
        a,
        &[(0, &Status::PENDING.0.to_le_bytes()), (8, &0x20_1000u64.to_le_bytes()), (16, &17u64.to_le_bytes())],
    );
    assert_eq!(<ConsoleWriteArgs as ArgBlock>::CALL, Call::ConsoleWrite);
}

#[test]
fn shutdown_layout() {
    let a = ShutdownArgs::new(42);
    round_trip(a, &[(8, &[42, 0, 0, 0])]);
    assert_eq!(<ShutdownArgs as ArgBlock>::CALL, Call::Shutdown);
}

#[test]
fn boot_info_layout() {
    let mut b = BootInfo::zeroed();
    b.magic = BOOT_INFO_MAGIC;
    b.abi_version = ABI_VERSION;
    b.size = core::mem::size_of::<BootInfo>() as u32;
    b.ram_size = 64 << 20;
    b.window_base = 1 << 30;
    b.cmdline = CMDLINE_ADDR;
    b.cmdline_len = 9;
    assert!(b.is_valid());
    round_trip(
        b,
        &[
            (0, b"ELASTBI1"),
            (8, &[1, 0, 0, 0, 8, 1, 0, 0]),
            (24, &(64u64 << 20).to_le_bytes()),
            (48, &(1u64 << 30).to_le_bytes()),
            (72, &CMDLINE_ADDR.to_le_bytes()),
        ],
    );
    let mut wrong = b;
    wrong.abi_version = 2;
    assert!(!wrong.is_valid());
    wrong = b;
    wrong.size = 8;
    assert!(!wrong.is_valid());
}

#[test]
fn abi_note_layout() {
    let n = AbiNote::current();
    round_trip(
        n,
        &[(0, &[8, 0, 0, 0, 8, 0, 0, 0]), (8, b"ABI1"), (12, b"ELASTIC\0"), (20, &ABI_VERSION.to_le_bytes())],
    );
}

#[test]
fn unanswered_block_reads_as_pending() {
    // A guest detects "no hypervisor" by finding the preset status unchanged.
    let bytes = ShutdownArgs::new(0).as_bytes().to_vec();
    let back = ShutdownArgs::read_from_bytes(&bytes).unwrap();
    assert_eq!(back.header.status(), Status::PENDING);
}

#[test]
fn vcpu_call_layouts() {
    round_trip(
        VcpuUpArgs::new(0x20_1000, 0x30_0000, 0xabcd),
        &[(8, &0x20_1000u64.to_le_bytes()), (16, &0x30_0000u64.to_le_bytes()), (24, &0xabcdu64.to_le_bytes())],
    );
    let mut b = BlockArgs::new(BLOCK_FOREVER);
    b.woken_by = wake::KICK | wake::TIMEOUT;
    round_trip(b, &[(8, &[0xff; 8]), (16, &[5, 0, 0, 0])]);
    round_trip(KickArgs::new(3), &[(8, &[3, 0, 0, 0])]);
    let mut e = EventsArgs::new();
    e.pending = notice::RECLAIM_VCPUS;
    e.vcpu_target = 2;
    e.grace_ns = 200_000_000;
    round_trip(
        e,
        &[(8, &[2, 0, 0, 0, 0, 0, 0, 0]), (16, &[2, 0, 0, 0, 0, 0, 0, 0]), (32, &200_000_000u64.to_le_bytes())],
    );
    let r = ReportArgs { runnable: 7, user: 9, ..Default::default() };
    round_trip(
        r,
        &[(0, &Status::PENDING.0.to_le_bytes()), (8, &[7, 0, 0, 0, 0, 0, 0, 0]), (48, &[9, 0, 0, 0, 0, 0, 0, 0])],
    );
    round_trip(PingArgs::new(), &[(0, &Status::PENDING.0.to_le_bytes())]);
    assert_eq!(<VcpuUpArgs as ArgBlock>::CALL, Call::VcpuUp);
    assert_eq!(<BlockArgs as ArgBlock>::CALL, Call::Block);
    assert_eq!(<KickArgs as ArgBlock>::CALL, Call::Kick);
    assert_eq!(<EventsArgs as ArgBlock>::CALL, Call::Events);
    assert_eq!(<ReportArgs as ArgBlock>::CALL, Call::Report);
    assert_eq!(<PingArgs as ArgBlock>::CALL, Call::Ping);
}

#[test]
fn notice_page_layout() {
    let n = NoticePage {
        seq: 1,
        pending: notice::STOP,
        online_vcpus: 4,
        memory_bytes: 64 << 20,
        vcpu_max: 2,
        vcpu_burst: 3,
        memory_max: 5,
        memory_burst: 6,
        ..Default::default()
    };
    round_trip(
        n,
        &[
            (0, &[1, 0, 0, 0, 0, 0, 0, 0]),
            (8, &[1, 0, 0, 0, 0, 0, 0, 0]),
            (40, &[4, 0, 0, 0, 0, 0, 0, 0]),
            (56, &[2, 0, 0, 0, 0, 0, 0, 0]),
            (64, &[3, 0, 0, 0, 0, 0, 0, 0]),
            (72, &[5, 0, 0, 0, 0, 0, 0, 0]),
            (80, &[6, 0, 0, 0, 0, 0, 0, 0]),
        ],
    );
    assert_eq!(
        notice::STOP
            | notice::RECLAIM_VCPUS
            | notice::RECLAIM_MEMORY
            | notice::RECLAIM_VCPUS_OVER
            | notice::RECLAIM_MEMORY_OVER
            | notice::POLICY,
        0b111111
    );
}

#[test]
fn memory_call_layouts() {
    let mut g = MemGrantArgs::new(64 << 20, 0x30_0000, 8);
    g.count = 2;
    g.granted = 64 << 20;
    round_trip(
        g,
        &[(8, &(64u64 << 20).to_le_bytes()), (16, &0x30_0000u64.to_le_bytes()), (24, &[8, 0, 0, 0, 2, 0, 0, 0])],
    );
    let mut r = MemReleaseArgs::new(0x30_0000, 3);
    r.released = 6 << 20;
    round_trip(r, &[(8, &0x30_0000u64.to_le_bytes()), (16, &[3, 0, 0, 0]), (24, &(6u64 << 20).to_le_bytes())]);
    let e = Extent { base: 1 << 30, len: 2 << 20 };
    round_trip(e, &[(0, &(1u64 << 30).to_le_bytes()), (8, &(2u64 << 20).to_le_bytes())]);
    assert_eq!(e.end(), (1 << 30) + (2 << 20));
    assert_eq!(<MemGrantArgs as ArgBlock>::CALL, Call::MemGrant);
    assert_eq!(<MemReleaseArgs as ArgBlock>::CALL, Call::MemRelease);
}
