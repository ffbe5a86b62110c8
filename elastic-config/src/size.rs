//! Byte sizes: `4096`, `512K`, `64M`, `1G`, `2T` (binary units), with `i` and `B` spellings
//! (`64Mi`, `64MiB`, `64MB`) so Kubernetes-style binary quantities parse too.

use thiserror::Error;

/// A size that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    /// Not a whole number with an optional binary suffix, or too large for 64 bits.
    #[error("'{0}' is not a size (examples: 4096, 512K, 64M, 1G)")]
    BadSize(String),
}

/// Binary suffixes, largest first: the shift and the one-letter spelling [`format_size`] uses.
const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];

/// Parses a byte size: a whole number with an optional binary suffix `K`, `M`, `G` or `T`,
/// each optionally followed by `i`, `B` or `iB`; `B` alone means bytes. Case and surrounding
/// whitespace are ignored. `K` is always 1024: there are no decimal units.
///
/// ```
/// use elastic_config::parse_size;
/// assert_eq!(parse_size("64M"), Ok(64 << 20));
/// assert_eq!(parse_size("1Gi"), Ok(1 << 30));
/// assert_eq!(parse_size("512kib"), Ok(512 << 10));
/// assert!(parse_size("1.5G").is_err());
/// ```
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let bad = || SizeError::BadSize(text.to_string());
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let suffix = suffix.to_ascii_lowercase();
    let shift = match suffix.as_str() {
        "" | "b" => 0,
        _ => {
            let (letter, rest) = suffix.split_at(suffix.chars().next().map_or(0, char::len_utf8));
            let shift = UNITS.iter().find(|(_, u)| u.eq_ignore_ascii_case(letter)).ok_or_else(bad)?.0;
            if !matches!(rest, "" | "i" | "b" | "ib") {
                return Err(bad());
            }
            shift
        }
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Formats a byte count with the largest binary suffix that divides it exactly (`64M`,
/// `1536K`, `4097`); [`parse_size`] reads it back to the same count.
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in UNITS {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 4096B "), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("512KB"), Ok(512 << 10));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("3Ti"), Ok(3 << 40));
        assert_eq!(parse_size("256Mi"), Ok(256 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "M", "1.5G", "-1", "+1", "1 G", "1GG", "1Gb2", "1iB", "1P", "1E", "1bi", "1Mx", "１G", "1µ"] {
            assert_eq!(parse_size(bad), Err(SizeError::BadSize(bad.to_string())), "{bad:?}");
        }
        assert!(parse_size("99999999999999999999T").is_err());
        assert!(parse_size("16777216T").is_err(), "2^64 bytes");
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 << 40));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(4097), "4097");
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(5 << 40), "5T");
        assert_eq!(format_size(u64::MAX), u64::MAX.to_string());
    }

    #[test]
    fn the_message_is_the_shims() {
        assert_eq!(parse_size("lots").unwrap_err().to_string(), "'lots' is not a size (examples: 4096, 512K, 64M, 1G)");
    }
}
