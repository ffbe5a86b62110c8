//! `hypervisor-shim load`: the flags, the display while a run goes on (a progress bar on a
//! terminal, one line per second otherwise, on stderr), the summary and the JSON report.
//!
//! Exit codes: 0 when every request was answered correctly; 77 ([`exit::RUN_FAILED`]) when
//! any failed (wrong answer, timeout, broken connection, missed); 64 for a bad flag; 69 when
//! the service refuses the first connection; 74 when `--out` cannot be written; 130 when
//! Ctrl-C ended the run early without errors.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{ArgGroup, Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use super::{
    DEFAULT_CONNECTIONS, HttpOptions, KvOptions, LoadConfig, LoadError, LoadReport, Mode, Pattern, Phase, Protocol,
    SecondStats, Shape, run_until,
};
use elastic_config::parse_duration;
use elastic_vmm::exit;

/// The protocols, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolName {
    /// Redis SET/GET over RESP2, every answer verified.
    Kv,
    /// HTTP/1.1 keep-alive GET of --path, 2xx and a complete body required.
    Http,
}

/// The pattern shapes, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeName {
    /// N throughout.
    Steady,
    /// Linear from 0 to N.
    Ramp,
    /// N and N/10 alternating every half --period.
    Square,
    /// N/10, with N during the middle fifth.
    Spike,
}

/// One or more shapes played in turn (`--pattern ramp,spike`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shapes(pub Vec<ShapeName>);

fn parse_shapes(s: &str) -> Result<Shapes, String> {
    let shapes = s
        .split(',')
        .map(|name| match name.trim() {
            "steady" => Ok(ShapeName::Steady),
            "ramp" => Ok(ShapeName::Ramp),
            "square" => Ok(ShapeName::Square),
            "spike" => Ok(ShapeName::Spike),
            other => Err(format!("'{other}' is not a pattern (steady, ramp, square, spike, or several joined by ',')")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if shapes.len() > 16 {
        return Err("at most 16 shapes in one pattern".into());
    }
    Ok(Shapes(shapes))
}

fn parse_target(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    // The one name accepted is localhost: load goes to this machine's services.
    match s.rsplit_once(':') {
        Some(("localhost", port)) => port
            .parse::<u16>()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .map_err(|_| format!("'{s}' has a bad port")),
        _ => Err(format!("'{s}' is not IP:PORT (e.g. 127.0.0.1:6379)")),
    }
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a fraction from 0 to 1")),
    }
}

const EXIT_CODES: &str = "\
Exit codes: 0 every request answered correctly; 77 some failed (wrong answer, timeout, broken
connection, or missed: not sent within a timeout of its due time); 64 bad flag; 69 the service
refused the first connection; 74 cannot write --out; 130 ended early by Ctrl-C.";

/// Flags of `hypervisor-shim load`.
#[derive(Debug, Clone, Args)]
#[command(group(ArgGroup::new("level").required(true).args(["rate", "concurrency"])), after_help = EXIT_CODES)]
pub struct LoadArgs {
    /// The service: IP:PORT (or localhost:PORT).
    #[arg(long, value_name = "IP:PORT", value_parser = parse_target)]
    pub target: SocketAddr,
    /// What to send: kv (Redis SET/GET, answers verified) or http (GET of --path).
    #[arg(long, value_enum)]
    pub protocol: ProtocolName,
    /// Load over time: steady (N throughout), ramp (0 to N), square (N and N/10 alternating
    /// every half --period), spike (N/10 with N in the middle fifth). Several, joined by ',',
    /// play in turn and share --duration equally.
    #[arg(long, value_name = "SHAPE[,SHAPE...]", default_value = "steady", value_parser = parse_shapes)]
    pub pattern: Shapes,
    /// Open loop: peak requests per second, sent on schedule whatever the service's latency.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate: Option<u32>,
    /// Closed loop: peak connections, each sending its next request when the previous
    /// answer arrived.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: Option<u32>,
    /// Open loop: connections in the pool (one request in flight on each).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONNECTIONS as u32, conflicts_with = "concurrency",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub connections: u32,
    /// Length of the run, at least 1s (e.g. 30s; a bare number is milliseconds).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration_arg)]
    pub duration: Duration,
    /// Period of the square pattern.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration_arg)]
    pub period: Duration,
    /// Connect and answer timeout.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration_arg)]
    pub timeout: Duration,
    /// kv: number of keys (each connection owns keys of its own).
    #[arg(long, value_name = "N", default_value = "1000", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub keys: u32,
    /// kv: bytes per value.
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub value_size: u32,
    /// kv: fraction of requests that are SET (the others are GET).
    #[arg(long, value_name = "FRACTION", default_value = "0.5", value_parser = parse_ratio)]
    pub set_ratio: f64,
    /// http: the path to GET.
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub path: String,
    /// Write the report (totals, latency, per-second series, configuration) as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub out: Option<PathBuf>,
}

impl LoadArgs {
    /// The configuration these flags describe.
    pub fn config(&self) -> Result<LoadConfig, LoadError> {
        if self.duration < Duration::from_secs(1) {
            return Err(LoadError::Config(format!(
                "--duration {:?} is too short: at least 1s (e.g. 30s; a bare number is milliseconds)",
                self.duration
            )));
        }
        let (peak, mode) = match (self.rate, self.concurrency) {
            (_, Some(n)) => (f64::from(n), Mode::Closed),
            (Some(r), None) => (f64::from(r), Mode::Open { connections: self.connections as usize }),
            (None, None) => return Err(LoadError::Config("give --rate or --concurrency".into())),
        };
        let each = self.duration / self.pattern.0.len().max(1) as u32;
        let phases = self
            .pattern
            .0
            .iter()
            .map(|s| Phase {
                shape: match s {
                    ShapeName::Steady => Shape::Steady,
                    ShapeName::Ramp => Shape::Ramp,
                    ShapeName::Square => Shape::Square { period: self.period },
                    ShapeName::Spike => Shape::Spike,
                },
                peak,
                duration: each,
            })
            .collect();
        let protocol = match self.protocol {
            ProtocolName::Kv => {
                Protocol::Kv(KvOptions { keys: self.keys, value_size: self.value_size, set_ratio: self.set_ratio })
            }
            ProtocolName::Http => Protocol::Http(HttpOptions { path: self.path.clone() }),
        };
        let config =
            LoadConfig { target: self.target, protocol, mode, pattern: Pattern { phases }, timeout: self.timeout };
        config.validate()?;
        Ok(config)
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eline!("hypervisor-shim: {message}");
    ExitCode::from(code)
}

/// A latency for people: µs below a millisecond, ms below a second.
fn latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

fn maybe_latency(us: Option<f64>) -> String {
    us.map_or_else(|| "-".into(), latency)
}

/// One second as a line.
pub fn second_line(s: &SecondStats, mode: Mode) -> String {
    let offered = match mode {
        Mode::Open { .. } => format!("{:.0} req/s", s.offered),
        Mode::Closed => format!("{:.1} conns", s.offered),
    };
    format!(
        "load: {:>4}s offered {offered:<12} completed {:<8} errors {:<6} p50 {:<9} p99 {}",
        s.second + 1,
        s.completed,
        s.errors,
        maybe_latency(s.p50_us),
        maybe_latency(s.p99_us)
    )
}

/// The final summary, a few lines.
pub fn summary_lines(r: &LoadReport) -> Vec<String> {
    let mut lines = vec![format!(
        "load: {} requests in {:.1}s: {} correct ({:.1} req/s), {} error(s){}",
        r.requests,
        r.duration_s,
        r.completed,
        r.throughput,
        r.errors,
        if r.cancelled { " (cancelled)" } else { "" }
    )];
    if let Some(l) = &r.latency {
        lines.push(format!(
            "load: latency p50 {}  p99 {}  p99.9 {}  max {}",
            latency(l.p50_us),
            latency(l.p99_us),
            latency(l.p999_us),
            latency(l.max_us)
        ));
    }
    if r.errors > 0 {
        let k = &r.error_kinds;
        lines.push(format!("load: errors: {} wrong, {} timeout, {} io, {} missed", k.wrong, k.timeout, k.io, k.missed));
        for sample in &r.error_samples {
            lines.push(format!("load: error: {sample}"));
        }
    }
    lines
}

/// Where the per-second figures go while the run goes on.
enum Display {
    Bar(ProgressBar),
    Lines,
}

impl Display {
    fn new(config: &LoadConfig) -> Display {
        if !std::io::stderr().is_terminal() {
            return Display::Lines;
        }
        let seconds = config.pattern.duration().as_secs_f64().ceil() as u64;
        let bar = ProgressBar::new(seconds);
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len}s {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Display::Bar(bar)
    }

    fn second(&self, s: &SecondStats, mode: Mode) {
        let line = second_line(s, mode);
        match self {
            Display::Bar(bar) => {
                bar.println(line);
                bar.set_position(u64::from(s.second) + 1);
            }
            Display::Lines => eline!("{line}"),
        }
    }

    fn finish(&self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Runs `hypervisor-shim load`; returns the process exit code.
pub fn command(args: &LoadArgs) -> ExitCode {
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => return fail(e.exit_code(), e),
    };
    // Ctrl-C ends the run early; the report still covers the seconds played.
    elastic_vmm::install_signal_handlers();
    let cancel = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let display = Display::new(&config);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if elastic_vmm::interrupts() > 0 {
                    cancel.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let result = run_until(&config, &cancel, &mut |s| display.second(s, config.mode));
        done.store(true, Ordering::Relaxed);
        result
    });
    display.finish();
    let report = match result {
        Ok(r) => r,
        Err(e) => return fail(e.exit_code(), e),
    };
    for line in summary_lines(&report) {
        eline!("{line}");
    }
    if let Some(path) = &args.out {
        if let Err(e) = elastic_vmm::write_json(&report, path) {
            return fail(exit::IO_ERROR, format_args!("cannot write {}: {e}", path.display()));
        }
        eline!("load: wrote {}", path.display());
    }
    ExitCode::from(if !report.passed() {
        exit::RUN_FAILED
    } else if report.cancelled {
        exit::INTERRUPTED
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    fn parse(args: &[&str]) -> Result<LoadArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("load").chain(args.iter().copied())).map(|c| c.load)
    }

    #[test]
    fn open_loop_flags() {
        let a =
            parse(&["--target", "127.0.0.1:6379", "--protocol", "kv", "--rate", "500", "--pattern", "square"]).unwrap();
        let c = a.config().unwrap();
        assert_eq!(c.mode, Mode::Open { connections: DEFAULT_CONNECTIONS });
        assert_eq!(c.pattern, Pattern::square(500.0, Duration::from_secs(10), Duration::from_secs(2)));
        assert_eq!(c.protocol, Protocol::Kv(KvOptions::default()));
        assert_eq!(c.timeout, Duration::from_secs(2));
    }

    #[test]
    fn closed_loop_and_composite_patterns() {
        let a = parse(&[
            "--target",
            "localhost:8080",
            "--protocol",
            "http",
            "--concurrency",
            "8",
            "--pattern",
            "ramp,spike",
            "--duration",
            "20s",
            "--path",
            "/x",
        ])
        .unwrap();
        let c = a.config().unwrap();
        assert_eq!(c.target, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.mode, Mode::Closed);
        assert_eq!(c.connections(), 8);
        assert_eq!(
            c.pattern,
            Pattern::ramp(8.0, Duration::from_secs(10)).then(Pattern::spike(8.0, Duration::from_secs(10)))
        );
        assert_eq!(c.protocol, Protocol::Http(HttpOptions { path: "/x".into() }));
    }

    #[test]
    fn bad_flags_are_refused() {
        let base = ["--target", "127.0.0.1:1", "--protocol", "kv"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        assert!(with(&[]).is_err(), "--rate or --concurrency is required");
        assert!(with(&["--rate", "1", "--concurrency", "1"]).is_err());
        assert!(with(&["--concurrency", "2", "--connections", "4"]).is_err());
        assert!(with(&["--rate", "0"]).is_err());
        assert!(with(&["--concurrency", "5000"]).is_err());
        assert!(with(&["--rate", "1", "--pattern", "sawtooth"]).is_err());
        assert!(with(&["--rate", "1", "--set-ratio", "1.5"]).is_err());
        assert!(with(&["--rate", "1", "--duration", "soon"]).is_err());
        assert!(parse(&["--target", "example.com:80", "--protocol", "kv", "--rate", "1"]).is_err());
        // Accepted by clap, refused by the configuration's bounds.
        let short = with(&["--rate", "1", "--duration", "500ms"]).unwrap();
        assert!(matches!(short.config(), Err(LoadError::Config(m)) if m.contains("--duration")));
        let few_keys = with(&["--rate", "1", "--keys", "4"]).unwrap();
        assert!(matches!(few_keys.config(), Err(LoadError::Config(m)) if m.contains("4 keys")));
        let path = parse(&["--target", "127.0.0.1:1", "--protocol", "http", "--rate", "1", "--path", "a b"]).unwrap();
        assert!(matches!(path.config(), Err(e) if e.exit_code() == exit::USAGE));
    }

    #[test]
    fn lines_for_people() {
        assert_eq!(latency(85.2), "85µs");
        assert_eq!(latency(1500.0), "1.50ms");
        assert_eq!(latency(2_500_000.0), "2.50s");
        let s = SecondStats {
            second: 0,
            offered: 100.0,
            completed: 99,
            errors: 1,
            throughput: 99.0,
            p50_us: Some(50.0),
            p99_us: None,
            max_us: None,
        };
        let line = second_line(&s, Mode::Open { connections: 1 });
        assert!(
            line.contains("1s offered 100 req/s") && line.contains("p50 50µs") && line.ends_with("p99 -"),
            "{line}"
        );
    }
}
