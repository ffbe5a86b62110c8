//! Burst credits (`VCPU_SECONDS[:GIB_SECONDS]`) and durations (`200ms`, `0.5s`).

use std::time::Duration;

use thiserror::Error;

/// A credit or duration that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TimeError {
    /// A credit figure could not be parsed.
    #[error("'{0}' is not VCPU_SECONDS[:GIB_SECONDS] (non-negative numbers, e.g. 2 or 2:0.5)")]
    BadCredit(String),
    /// A duration could not be parsed.
    #[error("'{0}' is not a duration (examples: 200ms, 0.5s, 2s; a bare number is milliseconds)")]
    BadDuration(String),
}

/// Longest duration accepted, in seconds (about 11.6 days).
const DURATION_MAX_SECS: f64 = 1e6;

/// Parses a credit pair `VCPU_SECONDS[:GIB_SECONDS]` (one value applies to both): finite,
/// non-negative decimals.
pub fn parse_credit(text: &str) -> Result<[f64; 2], TimeError> {
    let bad = || TimeError::BadCredit(text.to_string());
    let num = |s: &str| s.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(bad);
    match text.split_once(':') {
        None => {
            let v = num(text)?;
            Ok([v, v])
        }
        Some((a, b)) => Ok([num(a)?, num(b)?]),
    }
}

/// Parses a duration: `200ms`, `0.5s`, `2s`, or a bare number of milliseconds; finite,
/// non-negative, at most 10⁶ seconds.
pub fn parse_duration(text: &str) -> Result<Duration, TimeError> {
    let t = text.trim();
    let bad = || TimeError::BadDuration(text.to_string());
    let (num, scale) = if let Some(v) = t.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = t.strip_suffix('s') {
        (v, 1.0)
    } else {
        (t, 1e-3)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v < 0.0 || v * scale > DURATION_MAX_SECS {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits() {
        assert_eq!(parse_credit("2"), Ok([2.0, 2.0]));
        assert_eq!(parse_credit("1:0.5"), Ok([1.0, 0.5]));
        assert_eq!(parse_credit(" 0 : 3 "), Ok([0.0, 3.0]));
        for bad in ["-1", "1:x", "inf", "NaN", "1:2:3", ""] {
            assert_eq!(parse_credit(bad), Err(TimeError::BadCredit(bad.to_string())), "{bad:?}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("150"), Ok(Duration::from_millis(150)));
        assert_eq!(parse_duration("1000000s"), Ok(Duration::from_secs(1_000_000)));
        for bad in ["soon", "-5ms", "1000001s", "inf", "NaN", "", "5 m"] {
            assert_eq!(parse_duration(bad), Err(TimeError::BadDuration(bad.to_string())), "{bad:?}");
        }
    }

    #[test]
    fn messages() {
        assert_eq!(
            parse_credit("-1").unwrap_err().to_string(),
            "'-1' is not VCPU_SECONDS[:GIB_SECONDS] (non-negative numbers, e.g. 2 or 2:0.5)"
        );
        assert_eq!(
            parse_duration("soon").unwrap_err().to_string(),
            "'soon' is not a duration (examples: 200ms, 0.5s, 2s; a bare number is milliseconds)"
        );
    }
}
