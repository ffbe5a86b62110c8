//! The timeline: one JSON object per line for every change in what a VM holds and every
//! REPORT it makes, with a timestamp in µs since the shim started.
//!
//! Every line carries the VM's current `vcpus` and `memory_bytes`, so a plot can be drawn from
//! the timeline alone.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One timeline line (one JSON object of a `--timeline` file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Line {
    /// µs since the shim started.
    t_us: u64,
    /// The VM's name.
    vm: String,
    /// What happened: `boot`, `vcpu_up`, `vcpu_down`, `denied`, `report`, `notice`, `end`...
    event: String,
    /// vCPUs online after the event.
    vcpus: u32,
    /// Memory bytes held after the event.
    memory_bytes: u64,
    /// Event-specific fields.
    #[serde(flatten)]
    detail: Map<String, Value>,
}

impl Line {
    /// µs since the shim started.
    pub fn t_us(&self) -> u64 {
        self.t_us
    }

    /// The VM's name.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// What happened: `boot`, `vcpu_up`, `vcpu_down`, `denied`, `report`, `notice`, `end`...
    pub fn event(&self) -> &str {
        &self.event
    }

    /// vCPUs online after the event.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Memory bytes held after the event.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// An event-specific field.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.detail.get(key)
    }
}

/// Most lines kept in memory (for a plot); later ones go only to the file.
pub(crate) const MAX_KEPT_LINES: usize = 200_000;

/// A timeline sink: lines stream to the `--timeline` file (a bounded buffer), and are kept in
/// memory only when a plot needs them, at most [`MAX_KEPT_LINES`]. A guest cannot grow the
/// shim's memory through it.
#[derive(Debug)]
pub(crate) struct Timeline {
    started: Instant,
    file: Option<Mutex<BufWriter<File>>>,
    keep: bool,
    lines: Mutex<Vec<Line>>,
}

impl Timeline {
    /// A timeline counting from `started`, writing to `path` when given, keeping lines in
    /// memory when `keep` (a plot will be drawn).
    pub(crate) fn new(started: Instant, path: Option<&Path>, keep: bool) -> std::io::Result<Timeline> {
        let file = match path {
            Some(p) => Some(Mutex::new(BufWriter::new(File::create(p)?))),
            None => None,
        };
        Ok(Timeline { started, file, keep, lines: Mutex::new(Vec::new()) })
    }

    /// µs since the start.
    pub(crate) fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Records one event.
    pub(crate) fn record(&self, vm: &str, event: &str, vcpus: u32, memory_bytes: u64, detail: Map<String, Value>) {
        if self.file.is_none() && !self.keep {
            return;
        }
        let line =
            Line { t_us: self.now_us(), vm: vm.to_string(), event: event.to_string(), vcpus, memory_bytes, detail };
        if let Some(f) = &self.file {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            // A full disk must not stop the VM; the summary reports the flush result.
            if let Ok(json) = serde_json::to_string(&line) {
                let _ = writeln!(f, "{json}");
            }
        }
        if self.keep {
            let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            // Beyond the cap, lines go to the file only (a plot of them would be unreadable).
            if lines.len() < MAX_KEPT_LINES {
                lines.push(line);
            }
        }
    }

    /// Every line recorded so far.
    pub(crate) fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Flushes the file.
    pub(crate) fn flush(&self) -> std::io::Result<()> {
        match &self.file {
            Some(f) => f.lock().unwrap_or_else(|p| p.into_inner()).flush(),
            None => Ok(()),
        }
    }
}

/// Builds a detail map from `(key, value)` pairs.
pub(crate) fn detail<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_flattened_detail() {
        let dir = std::env::temp_dir().join(format!("timeline-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        let t = Timeline::new(Instant::now(), Some(&path), true).unwrap();
        t.record("vm0", "vcpu_up", 2, 64 << 20, detail([("vcpu", 1.into())]));
        t.record("vm0", "report", 2, 64 << 20, detail([("runnable", 5.into())]));
        t.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["event"], "vcpu_up");
        assert_eq!(first["vcpu"], 1);
        assert_eq!(first["vcpus"], 2);
        assert!(first["t_us"].is_u64());
        assert_eq!(t.lines().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
