//! The one JSON writer of reports: summaries, benchmark results, stress and demo outputs.

use std::path::Path;

/// Writes `value` as pretty JSON with a trailing newline.
pub fn write_json<T: serde::Serialize + ?Sized>(value: &T, path: &Path) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(path, json + "\n")
}
