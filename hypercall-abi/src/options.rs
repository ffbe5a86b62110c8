//! The kernel options a VM's command line may carry (`key=value`), with the syntax of their
//! values. The shim validates `--guest-opt` and pool `guest_opts` against this table before
//! any VM exists; the kernel reads its settings with the same parsers, so the two sides never
//! disagree on what a value means.

/// Most vCPUs a VM may have (the kernel's per-CPU table has this many slots).
pub const MAX_VCPUS: u32 = 64;

/// Guest log levels, least to most verbose.
pub const LOG_LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// The syntax of an option's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Whole milliseconds.
    Millis,
    /// Whole microseconds.
    Micros,
    /// Whole mebibytes.
    Mebibytes,
    /// A decimal number with up to two fractional digits (`1`, `1.5`, `0.25`).
    Fraction,
    /// A [`ValueKind::Fraction`] from 0 to 1 (a share of time).
    Share,
    /// `on`/`off` (also `true`/`false`, `1`/`0`).
    Switch,
    /// One of [`LOG_LEVELS`].
    LogLevel,
}

impl ValueKind {
    /// What a valid value looks like (for error messages).
    pub const fn describe(self) -> &'static str {
        match self {
            ValueKind::Millis => "whole milliseconds, e.g. 20",
            ValueKind::Micros => "whole microseconds, e.g. 200",
            ValueKind::Mebibytes => "whole MiB, e.g. 16",
            ValueKind::Fraction => "a number with up to two decimals, e.g. 1.5",
            ValueKind::Share => "a number from 0 to 1 with up to two decimals, e.g. 0.8",
            ValueKind::Switch => "on or off",
            ValueKind::LogLevel => "off, error, warn, info, debug or trace",
        }
    }

    /// Whether `value` is valid for this kind.
    pub fn accepts(self, value: &str) -> bool {
        match self {
            ValueKind::Millis | ValueKind::Micros | ValueKind::Mebibytes => parse_whole(value).is_some(),
            ValueKind::Fraction => parse_fraction_pct(value).is_some(),
            ValueKind::Share => parse_share_pct(value).is_some(),
            ValueKind::Switch => parse_switch(value).is_some(),
            ValueKind::LogLevel => LOG_LEVELS.contains(&value),
        }
    }
}

/// One kernel option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOption {
    /// The key.
    pub key: &'static str,
    /// Its value's syntax.
    pub kind: ValueKind,
    /// What it does.
    pub about: &'static str,
}

const fn opt(key: &'static str, kind: ValueKind, about: &'static str) -> KernelOption {
    KernelOption { key, kind, about }
}

/// Every option the kernel reads (besides `app`, which the shim sets from `--app`).
pub const KERNEL_OPTIONS: &[KernelOption] = &[
    opt("log", ValueKind::LogLevel, "guest log level"),
    opt("elastic.cooperate", ValueKind::Switch, "honour host reclaim notices (off: a misbehaving guest)"),
    opt("vcpu.up_load", ValueKind::Fraction, "ask for a vCPU when runnable tasks per online vCPU exceed this"),
    opt("vcpu.up_ms", ValueKind::Millis, "... for this long"),
    opt("vcpu.up_busy", ValueKind::Share, "... while the online vCPUs were busy at least this share of it"),
    opt(
        "vcpu.up_sat",
        ValueKind::Share,
        "also ask when the online vCPUs were busy this share of twice vcpu.up_ms and the queue is long at its end (0: never)",
    ),
    opt("vcpu.down_ms", ValueKind::Millis, "an idle vCPU goes down after this long; also the window of vcpu.down_busy"),
    opt(
        "vcpu.down_busy",
        ValueKind::Share,
        "one vCPU goes down when, over vcpu.down_ms, the vCPUs were busy less than this share of one fewer",
    ),
    opt("vcpu.deny_backoff_ms", ValueKind::Millis, "wait after a DENIED before asking again"),
    opt("vcpu.report_ms", ValueKind::Millis, "REPORT interval while busy (at least 1)"),
    opt("vcpu.tick_us", ValueKind::Micros, "shortest interval between controller decisions"),
    opt(
        "vcpu.kick_us",
        ValueKind::Micros,
        "queued work waits this long for busy vCPUs before an idle one is kicked (0: at once)",
    ),
    opt("vcpu.auto", ValueKind::Switch, "automatic vCPU ups and idle downs"),
    opt("mem.low_mb", ValueKind::Mebibytes, "grow the heap when free heap drops below this"),
    opt("mem.high_mb", ValueKind::Mebibytes, "release when free heap stays above this"),
    opt("mem.chunk_mb", ValueKind::Mebibytes, "grant size (at least 2)"),
    opt("mem.release_ms", ValueKind::Millis, "how long free heap must stay high before a release"),
    opt("mem.auto", ValueKind::Switch, "proactive heap growth and release"),
];

/// The option called `key`.
pub fn find_option(key: &str) -> Option<&'static KernelOption> {
    KERNEL_OPTIONS.iter().find(|o| o.key == key)
}

/// Parses a whole non-negative decimal number (no sign, no spaces).
pub fn parse_whole(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a share from 0 to 1 (see [`parse_fraction_pct`]) into percent (0 to 100).
pub fn parse_share_pct(s: &str) -> Option<u64> {
    parse_fraction_pct(s).filter(|&v| v <= 100)
}

/// Parses `on`/`off` (or `true`/`false`, `1`/`0`).
pub fn parse_switch(s: &str) -> Option<bool> {
    match s {
        "on" | "true" | "1" => Some(true),
        "off" | "false" | "0" => Some(false),
        _ => None,
    }
}

/// Parses `1`, `1.5`, `0.25` into percent (100, 150, 25). At most two decimals.
pub fn parse_fraction_pct(s: &str) -> Option<u64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let int = if int.is_empty() { 0 } else { parse_whole(int)? };
    let frac2 = match frac.len() {
        0 => 0,
        1 => parse_whole(frac)? * 10,
        2 => parse_whole(frac)?,
        _ => return None,
    };
    int.checked_mul(100)?.checked_add(frac2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_documented() {
        assert_eq!(parse_fraction_pct("1"), Some(100));
        assert_eq!(parse_share_pct("0.8"), Some(80));
        assert_eq!(parse_share_pct("1"), Some(100));
        assert_eq!(parse_share_pct("1.01"), None);
        assert_eq!(parse_fraction_pct("1.5"), Some(150));
        assert_eq!(parse_fraction_pct("0.25"), Some(25));
        assert_eq!(parse_fraction_pct(".5"), Some(50));
        for bad in ["", ".", "1.234", "-1", "x", "1.x", "+1"] {
            assert_eq!(parse_fraction_pct(bad), None, "{bad}");
        }
        assert_eq!(parse_whole("20"), Some(20));
        assert_eq!(parse_whole("-20"), None);
        assert_eq!(parse_whole(" 2"), None);
        assert!(ValueKind::LogLevel.accepts("debug") && !ValueKind::LogLevel.accepts("loud"));
        assert!(ValueKind::Switch.accepts("off") && !ValueKind::Switch.accepts("maybe"));
    }

    #[test]
    fn keys_are_unique() {
        for (i, o) in KERNEL_OPTIONS.iter().enumerate() {
            assert!(KERNEL_OPTIONS[i + 1..].iter().all(|p| p.key != o.key), "{}", o.key);
            assert_eq!(find_option(o.key), Some(o));
        }
        assert!(find_option("app").is_none(), "app is set by --app, not an option");
    }
}
