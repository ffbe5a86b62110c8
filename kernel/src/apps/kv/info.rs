//! INFO: the server's figures in Redis's INFO text format (`# Section` headers, `name:value`
//! lines, `\r\n` line ends, a blank line between sections).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use super::store::Store;

/// The Redis version whose protocol and replies this service follows (clients read it from
/// `INFO server`).
pub const REDIS_VERSION: &str = "7.0.0";

/// Figures only the caller knows, supplied for INFO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Milliseconds since the service started.
    pub uptime_ms: u64,
    /// The TCP port the service listens on.
    pub tcp_port: u16,
    /// Open client connections.
    pub connected_clients: u64,
    /// Bytes allocated on the kernel heap (INFO `used_memory`).
    pub heap_used_bytes: u64,
    /// Most bytes ever allocated on the kernel heap (INFO `used_memory_peak`).
    pub heap_peak_bytes: u64,
    /// Memory the VM holds from the host now: boot memory plus granted extents.
    pub memory_held_bytes: u64,
    /// vCPUs online now.
    pub vcpus_online: u32,
    /// Most vCPUs the VM may bring online.
    pub vcpus_max: u32,
    /// The vCPU policy as the guest knows it now: (min, max, burst).
    pub vcpus_policy: (u32, u32, u32),
}

/// The sections, in output order.
const SECTIONS: [&str; 6] = ["server", "clients", "memory", "stats", "elastic", "keyspace"];

/// Which sections the INFO arguments `args` ask for: none, `default`, `all` or
/// `everything` = all of them; otherwise each named one (case-insensitive; unknown names are
/// ignored, as in Redis).
fn wanted(args: &[Vec<u8>]) -> [bool; SECTIONS.len()] {
    let every = |a: &Vec<u8>| {
        a.eq_ignore_ascii_case(b"all") || a.eq_ignore_ascii_case(b"default") || a.eq_ignore_ascii_case(b"everything")
    };
    if args.is_empty() || args.iter().any(every) {
        return [true; SECTIONS.len()];
    }
    SECTIONS.map(|s| args.iter().any(|a| a.eq_ignore_ascii_case(s.as_bytes())))
}

/// Renders the INFO text for `args` (the arguments after `INFO`).
pub fn render(args: &[Vec<u8>], store: &Store, f: &Figures, now: u64) -> String {
    let want = wanted(args);
    let mut s = String::new();
    for (name, _) in SECTIONS.iter().zip(want).filter(|(_, w)| *w) {
        if !s.is_empty() {
            s.push_str("\r\n");
        }
        // Writing to a String cannot fail.
        let _ = section(&mut s, name, store, f, now);
    }
    s
}

fn section(s: &mut String, name: &str, store: &Store, f: &Figures, now: u64) -> core::fmt::Result {
    match name {
        "server" => {
            write!(s, "# Server\r\n")?;
            write!(s, "redis_version:{REDIS_VERSION}\r\n")?;
            write!(s, "redis_mode:standalone\r\n")?;
            write!(s, "os:elastic unikernel\r\n")?;
            write!(s, "arch_bits:64\r\n")?;
            write!(s, "tcp_port:{}\r\n", f.tcp_port)?;
            write!(s, "uptime_in_seconds:{}\r\n", f.uptime_ms / 1000)?;
            write!(s, "uptime_in_days:{}\r\n", f.uptime_ms / 86_400_000)?;
        }
        "clients" => {
            write!(s, "# Clients\r\n")?;
            write!(s, "connected_clients:{}\r\n", f.connected_clients)?;
        }
        "memory" => {
            write!(s, "# Memory\r\n")?;
            write!(s, "used_memory:{}\r\n", f.heap_used_bytes)?;
            write!(s, "used_memory_human:{}\r\n", Human(f.heap_used_bytes))?;
            write!(s, "used_memory_peak:{}\r\n", f.heap_peak_bytes)?;
            write!(s, "used_memory_peak_human:{}\r\n", Human(f.heap_peak_bytes))?;
            write!(s, "used_memory_dataset:{}\r\n", store.bytes())?;
            write!(s, "used_memory_dataset_human:{}\r\n", Human(store.bytes() as u64))?;
            write!(s, "maxmemory:0\r\n")?;
            write!(s, "maxmemory_human:0B\r\n")?;
            write!(s, "maxmemory_policy:noeviction\r\n")?;
            write!(s, "mem_allocator:talc\r\n")?;
        }
        "stats" => {
            let st = store.stats();
            write!(s, "# Stats\r\n")?;
            write!(s, "total_commands_processed:{}\r\n", st.commands)?;
            write!(s, "expired_keys:{}\r\n", st.expired_keys)?;
            write!(s, "keyspace_hits:{}\r\n", st.hits)?;
            write!(s, "keyspace_misses:{}\r\n", st.misses)?;
        }
        "elastic" => {
            write!(s, "# Elastic\r\n")?;
            write!(s, "vcpus_online:{}\r\n", f.vcpus_online)?;
            write!(s, "vcpus_max:{}\r\n", f.vcpus_max)?;
            let (min, max, burst) = f.vcpus_policy;
            write!(s, "vcpus_policy:{min}:{max}:{burst}\r\n")?;
            write!(s, "memory_held:{}\r\n", f.memory_held_bytes)?;
            write!(s, "memory_held_human:{}\r\n", Human(f.memory_held_bytes))?;
        }
        "keyspace" => {
            write!(s, "# Keyspace\r\n")?;
            if !store.is_empty() {
                write!(
                    s,
                    "db0:keys={},expires={},avg_ttl={}\r\n",
                    store.len(),
                    store.volatile_len(),
                    store.avg_ttl_ms(now)
                )?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A byte count as Redis's `bytesToHuman`: `512B`, `1.46M`, `23.54G` (two decimals, rounded;
/// plain bytes from 1024 PiB on).
#[derive(Debug, Clone, Copy)]
pub struct Human(pub u64);

impl core::fmt::Display for Human {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
        let n = self.0;
        if n < 1024 {
            return write!(f, "{n}B");
        }
        for (i, unit) in UNITS.iter().enumerate() {
            let scale = 1u128 << (10 * (i + 1));
            if u128::from(n) < scale * 1024 {
                // Hundredths, rounded half up (printf's %.2f on a double, to within rounding).
                let hundredths = (u128::from(n) * 100 + scale / 2) / scale;
                return write!(f, "{}.{:02}{unit}", hundredths / 100, hundredths % 100);
            }
        }
        write!(f, "{n}B")
    }
}
