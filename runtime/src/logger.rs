//! A `log` backend over the console: `[seconds.micros] LEVEL target: message`.

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::time;

struct ConsoleLogger;

impl Log for ConsoleLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let us = time::now_ns() / 1000;
        crate::println!(
            "[{:>4}.{:06}] {:<5} {}: {}",
            us / 1_000_000,
            us % 1_000_000,
            record.level(),
            record.target(),
            record.args()
        );
        if record.level() <= Level::Warn {
            crate::console::flush();
        }
    }

    fn flush(&self) {
        crate::console::flush();
    }
}

static LOGGER: ConsoleLogger = ConsoleLogger;

/// Installs the logger with `level` (`off`, `error`, `warn`, `info`, `debug`, `trace`).
/// Returns `false` when `level` is not one of those (the level is then `info`).
pub fn init(level: &str) -> bool {
    let (filter, ok) = match parse_level(level) {
        Some(f) => (f, true),
        None => (LevelFilter::Info, false),
    };
    // Only fails if a logger is already set, which would be this same one.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
    ok
}

fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("loud"), None);
    }
}
