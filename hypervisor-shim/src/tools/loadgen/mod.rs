//! `hypervisor-shim load`: a load generator that drives a service over real TCP connections,
//! verifies every answer, and measures latency with HDR histograms.
//!
//! # The model
//!
//! A run plays a [`Pattern`] (a list of phases: steady, ramp, square, spike; see
//! [`pattern`]) whose level means one of two things:
//!
//! * **Open loop** ([`Mode::Open`], `--rate N`): the level is the request rate. Requests are
//!   due on a fixed schedule ([`pattern::Schedule`]) whatever the service does, and are sent
//!   over a pool of persistent connections, one request in flight per connection. A request's
//!   latency runs from the moment it was *due* when no connection was free to send it then, so
//!   queueing behind a slow service is measured rather than hidden (no coordinated omission).
//!   When a connection was idle and waited for the due time, latency runs from the moment it
//!   actually sent, so the generator's own timer slack is not charged to the service. A request
//!   that is already a whole timeout late when a connection frees up is not sent at all and
//!   counts as `missed`. The pool must be large enough for rate x latency; `missed` and
//!   rising latency say when it is not.
//! * **Closed loop** ([`Mode::Closed`], `--concurrency N`): `N` connections each send their
//!   next request as soon as the previous answer arrived; the level is how many of them are
//!   active at each moment ([`Pattern::active`]: the level rounded up). Latency runs from the
//!   send. A closed loop measures the throughput a fixed population of clients gets; by its
//!   nature it slows down with the service, so its latencies omit the waiting a steady
//!   arrival rate would have caused.
//!
//! Every answer is checked ([`kv`]: `SET` answers `+OK`, `GET` answers exactly the value last
//! written; [`http`]: 2xx with a complete body). A wrong answer, a timeout, a broken
//! connection and a missed request are all errors, counted by kind ([`ErrorCounts`]) with the
//! first few messages kept. Latency percentiles cover correct answers only.
//!
//! # Time and bounds
//!
//! All connections are opened before the run (a refused connection is then a
//! [`LoadError::Connect`]), the `kv` keys are written once, and the measured phase starts.
//! Each second (from its start) is reported through the `on_second` callback shortly after it
//! ends; the last one after the run has drained. A request counts in the second its answer
//! arrived. Connects, sends and answers time out after [`LoadConfig::timeout`]; a broken
//! connection is reopened (after a short pause if that fails), so a dead service ends the run
//! on time with errors rather than hanging it. Connections, rate, duration, keys and value
//! size are capped (the `MAX_*` constants).
//!
//! The library prints nothing; [`command()`] is the command line around it (progress bar on a
//! terminal, per-second lines otherwise, JSON report with `--out`).

pub mod command;
mod conn;
pub mod http;
pub mod kv;
pub mod pattern;
pub mod resp;
mod rng;
pub mod stats;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use thiserror::Error;

pub use command::{LoadArgs, command};
pub use http::HttpOptions;
pub use kv::KvOptions;
pub use pattern::{Pattern, PatternError, Phase, Shape};
pub use stats::{ErrorCounts, Latency, SecondStats};

use conn::{Conn, ConnError};
use http::HttpClient;
use kv::KvClient;
use pattern::Schedule;
use rng::SplitMix64;
use stats::{Aggregator, ErrorKind, Event, Outcome};

use elastic_vmm::exit;

/// Most connections (open-loop pool or closed-loop concurrency).
pub const MAX_CONNECTIONS: usize = 1024;
/// Highest open-loop rate, requests per second.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Longest run.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most `kv` keys.
pub const MAX_KEYS: u32 = 1_000_000;
/// Largest `kv` value, bytes.
pub const MAX_VALUE_SIZE: u32 = 1 << 20;
/// Longest timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `http` path.
pub const MAX_PATH: usize = 2048;
/// Default open-loop pool size.
pub const DEFAULT_CONNECTIONS: usize = 16;

/// How long after its end a second is reported (answers in flight at the boundary arrive).
const REPORT_GRACE: Duration = Duration::from_millis(20);
/// Longest wait of the collecting thread between checks.
const TICK: Duration = Duration::from_millis(100);
/// How often an inactive closed-loop connection checks whether it is needed.
const IDLE_POLL: Duration = Duration::from_millis(2);
/// Pause after a failed reconnection.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Time between the end of setup and the start of the measured phase, for the workers to
/// start.
const START_DELAY: Duration = Duration::from_millis(20);

/// Serializes a duration as seconds (a float).
fn secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The verdict on a well-formed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The answer a correct service gives.
    Ok,
    /// A wrong answer; the text says how.
    Wrong(String),
}

/// What is sent, and how answers are checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Protocol {
    /// Redis `SET`/`GET` over RESP2 ([`kv`]).
    Kv(KvOptions),
    /// HTTP/1.1 `GET` ([`http`]).
    Http(HttpOptions),
}

/// Open or closed loop (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "loop", rename_all = "snake_case")]
pub enum Mode {
    /// The pattern is a rate (requests per second) served by `connections` connections.
    Open {
        /// Pool size.
        connections: usize,
    },
    /// The pattern is a number of active connections.
    Closed,
}

/// A load run's configuration (also recorded in the report).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadConfig {
    /// The service.
    pub target: SocketAddr,
    /// What to send.
    pub protocol: Protocol,
    /// Open or closed loop.
    pub mode: Mode,
    /// The offered level over time.
    pub pattern: Pattern,
    /// Connect and answer timeout.
    #[serde(rename = "timeout_s", serialize_with = "secs")]
    pub timeout: Duration,
}

impl LoadConfig {
    /// How many connections the run opens.
    pub fn connections(&self) -> usize {
        match self.mode {
            Mode::Open { connections } => connections,
            Mode::Closed => self.pattern.peak().ceil() as usize,
        }
    }

    /// Checks every bound; the error names the problem in one line.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |m: String| Err(LoadError::Config(m));
        self.pattern.validate()?;
        let duration = self.pattern.duration();
        if duration > MAX_DURATION {
            return bad(format!(
                "the load lasts {:.0}s; the limit is {}s",
                duration.as_secs_f64(),
                MAX_DURATION.as_secs()
            ));
        }
        let peak = self.pattern.peak();
        match self.mode {
            Mode::Open { connections } => {
                if peak <= 0.0 || peak > MAX_RATE {
                    return bad(format!("the peak rate {peak} must be above 0 and at most {MAX_RATE} requests/s"));
                }
                if connections == 0 || connections > MAX_CONNECTIONS {
                    return bad(format!("{connections} connections: use 1 to {MAX_CONNECTIONS}"));
                }
            }
            Mode::Closed => {
                let n = peak.ceil();
                if n < 1.0 || n > MAX_CONNECTIONS as f64 {
                    return bad(format!("a concurrency of {peak}: use 1 to {MAX_CONNECTIONS}"));
                }
            }
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > MAX_TIMEOUT {
            return bad(format!("a timeout of {:?}: use 1ms to {}s", self.timeout, MAX_TIMEOUT.as_secs()));
        }
        match &self.protocol {
            Protocol::Kv(kv) => {
                let conns = self.connections();
                if (kv.keys as usize) < conns || kv.keys > MAX_KEYS {
                    return bad(format!(
                        "{} keys for {conns} connections: every connection needs a key of its own (at most {MAX_KEYS})",
                        kv.keys
                    ));
                }
                if kv.value_size == 0 || kv.value_size > MAX_VALUE_SIZE {
                    return bad(format!("a value size of {} bytes: use 1 to {MAX_VALUE_SIZE}", kv.value_size));
                }
                if !(0.0..=1.0).contains(&kv.set_ratio) {
                    return bad(format!("a SET ratio of {}: use a fraction from 0 to 1", kv.set_ratio));
                }
            }
            Protocol::Http(h) => {
                if !h.path.starts_with('/') || h.path.len() > MAX_PATH || !h.path.bytes().all(|b| b.is_ascii_graphic())
                {
                    return bad(format!(
                        "the path '{}' must start with '/', have no spaces or control characters, and be at most {MAX_PATH} bytes",
                        h.path.escape_debug()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The `kv` keys written before the measured phase.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SetupReport {
    /// Keys to write.
    pub keys: u64,
    /// Keys written and acknowledged (the others are written again before they are read).
    pub keys_written: u64,
    /// Failures while writing them: wrong answers, and a broken connection (which ends that
    /// connection's population). They are also counted in the report's errors and in its
    /// first second.
    pub errors: u64,
}

/// The result of a run: what the JSON report (`--out`) holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadReport {
    /// The configuration run.
    pub config: LoadConfig,
    /// When the measured phase started (Unix time, milliseconds).
    pub started_unix_ms: u64,
    /// The same moment on CLOCK_MONOTONIC, in ns (to line the run up with a shim's timeline:
    /// see the shim summary's `started_monotonic_ns`).
    pub started_monotonic_ns: u64,
    /// Length of the measured phase, seconds (shorter than the pattern if cancelled).
    pub duration_s: f64,
    /// Whether the run was cancelled before the end of its pattern.
    pub cancelled: bool,
    /// Requests of the measured phase: answered correctly or failed.
    pub requests: u64,
    /// Requests answered correctly.
    pub completed: u64,
    /// Every failure, setup included: `error_kinds` added up.
    pub errors: u64,
    /// Failures by kind.
    pub error_kinds: ErrorCounts,
    /// The first few distinct failure messages.
    pub error_samples: Vec<String>,
    /// Correct answers per second over the measured phase.
    pub throughput: f64,
    /// Latency of the correct answers over the whole run (`None` if there were none).
    pub latency: Option<Latency>,
    /// The `kv` population before the measured phase.
    pub setup: SetupReport,
    /// One entry per second of the measured phase.
    pub seconds: Vec<SecondStats>,
}

impl LoadReport {
    /// True when nothing failed.
    pub fn passed(&self) -> bool {
        self.errors == 0
    }
}

/// Why a run could not happen. (Failed requests are not errors of the run: they are counted
/// in the [`LoadReport`].)
#[derive(Debug, Error)]
pub enum LoadError {
    /// A configuration value is out of bounds.
    #[error("{0}")]
    Config(String),
    /// The pattern cannot be played.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// The service could not be reached at the start.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// The service.
        target: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start a load thread: {0}")]
    Thread(std::io::Error),
}

impl LoadError {
    /// The process exit code for this error ([`elastic_vmm::exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            LoadError::Config(_) | LoadError::Pattern(_) => exit::USAGE,
            LoadError::Connect { .. } => exit::UNAVAILABLE,
            LoadError::Thread(_) => exit::INTERNAL,
        }
    }
}

/// Runs `config` to the end, calling `on_second` (on this thread) as each second of the
/// measured phase completes.
pub fn run(config: &LoadConfig, on_second: &mut dyn FnMut(&SecondStats)) -> Result<LoadReport, LoadError> {
    run_until(config, &AtomicBool::new(false), on_second)
}

/// As [`run`], but ends early (within about one timeout) once `cancel` becomes true; the
/// report then covers the seconds played and says `cancelled`.
pub fn run_until(
    config: &LoadConfig,
    cancel: &AtomicBool,
    on_second: &mut dyn FnMut(&SecondStats),
) -> Result<LoadReport, LoadError> {
    config.validate()?;
    let n = config.connections();
    let run = run_id();
    let mut workers = Vec::with_capacity(n);
    for index in 0..n {
        let conn = Conn::connect(config.target, config.timeout)
            .map_err(|source| LoadError::Connect { target: config.target, source })?;
        let client = match &config.protocol {
            Protocol::Kv(o) => Client::Kv(KvClient::new(o, run, index, n)),
            Protocol::Http(o) => Client::Http(HttpClient::new(o, config.target)),
        };
        workers.push(Worker { index, conn: Some(conn), client });
    }

    let mut setup = SetupReport::default();
    let mut agg = Aggregator::new(config.pattern.duration().as_secs_f64().ceil() as usize);
    for w in &mut workers {
        w.populate(config.timeout, &mut setup, &mut agg);
    }

    let start = Instant::now() + START_DELAY;
    let started_unix_ms =
        (SystemTime::now() + START_DELAY).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let started_monotonic_ns = crate::tools::bench::now_monotonic_ns() + START_DELAY.as_nanos() as u64;
    let shared = Shared {
        config,
        start,
        end: start + config.pattern.duration(),
        stop: AtomicBool::new(false),
        schedule: Mutex::new(Schedule::new(&config.pattern)),
    };
    let (seconds, measured) = thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for w in workers {
            let tx = tx.clone();
            let shared = &shared;
            let spawned = thread::Builder::new()
                .name(format!("load-{}", w.index))
                .stack_size(256 << 10)
                .spawn_scoped(scope, move || w.run(shared, &tx));
            if let Err(e) = spawned {
                shared.stop.store(true, Ordering::Relaxed);
                return Err(LoadError::Thread(e));
            }
        }
        drop(tx);
        Ok(collect(&shared, rx, &mut agg, cancel, on_second))
    })?;

    let errors = agg.errors().clone();
    let completed = agg.completed();
    let duration_s = measured.as_secs_f64();
    Ok(LoadReport {
        config: config.clone(),
        started_unix_ms,
        started_monotonic_ns,
        duration_s: (duration_s * 1000.0).round() / 1000.0,
        cancelled: measured < config.pattern.duration(),
        requests: completed + errors.total() - setup.errors,
        completed,
        errors: errors.total(),
        error_kinds: errors,
        error_samples: agg.samples().to_vec(),
        throughput: if duration_s > 0.0 { (completed as f64 / duration_s * 10.0).round() / 10.0 } else { 0.0 },
        latency: agg.latency(),
        setup,
        seconds,
    })
}

/// A random id for this run, so keys never collide with another run's.
fn run_id() -> u64 {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ RUNS.fetch_add(1, Ordering::Relaxed).rotate_left(17);
    SplitMix64::new(seed).next_u64()
}

/// What the workers share.
struct Shared<'a> {
    config: &'a LoadConfig,
    start: Instant,
    end: Instant,
    stop: AtomicBool,
    schedule: Mutex<Schedule<'a>>,
}

impl Shared<'_> {
    fn since_start(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }
}

/// Receives the workers' events until they have all ended, reporting each second as it
/// completes. Returns the series and the length of the measured phase.
fn collect(
    shared: &Shared<'_>,
    rx: Receiver<Event>,
    agg: &mut Aggregator,
    cancel: &AtomicBool,
    on_second: &mut dyn FnMut(&SecondStats),
) -> (Vec<SecondStats>, Duration) {
    let pattern = &shared.config.pattern;
    let mut measured = pattern.duration();
    let mut series = Vec::with_capacity(agg.seconds());
    let mut close = |agg: &mut Aggregator, measured: Duration| {
        let s = agg.emitted() as u64;
        let from = Duration::from_secs(s);
        let to = Duration::from_secs(s + 1).min(measured);
        let offered = pattern.mean_level(from, to, shared.config.mode == Mode::Closed);
        let stats = agg.close_next(offered, to.saturating_sub(from).as_secs_f64());
        on_second(&stats);
        series.push(stats);
    };
    let second_over = |s: usize| shared.start + Duration::from_secs(s as u64 + 1) + REPORT_GRACE;
    loop {
        let now = Instant::now();
        // Every second that is over except the last, which waits for the drain.
        while agg.emitted() + 1 < agg.seconds() && now >= second_over(agg.emitted()) {
            close(agg, measured);
        }
        if cancel.load(Ordering::Relaxed) && !shared.stop.swap(true, Ordering::Relaxed) {
            measured = shared.since_start(now).min(measured);
            agg.truncate(measured.as_secs() as usize + 1);
        }
        let wait = second_over(agg.emitted()).saturating_duration_since(now).clamp(Duration::from_millis(1), TICK);
        match rx.recv_timeout(wait) {
            Ok(event) => {
                agg.add(event);
                while let Ok(event) = rx.try_recv() {
                    agg.add(event);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    while agg.emitted() < agg.seconds() {
        close(agg, measured);
    }
    (series, measured)
}

/// The protocol side of a connection.
#[derive(Debug)]
enum Client {
    Kv(KvClient),
    Http(HttpClient),
}

/// One connection and the thread that drives it.
#[derive(Debug)]
struct Worker {
    index: usize,
    conn: Option<Conn>,
    client: Client,
}

impl Worker {
    /// Writes this connection's `kv` keys (nothing for `http`).
    fn populate(&mut self, timeout: Duration, setup: &mut SetupReport, agg: &mut Aggregator) {
        let (Client::Kv(kv), Some(conn)) = (&mut self.client, &mut self.conn) else { return };
        let (written, failures, broken) = kv.populate(conn, timeout);
        setup.keys += kv.key_count() as u64;
        setup.keys_written += written;
        setup.errors += failures.len() as u64;
        for message in failures {
            agg.add(Event { at: Duration::ZERO, outcome: Outcome::Error(ErrorKind::Wrong, message) });
        }
        if let Some(e) = broken {
            // The keys not written stay uncertain: the measured phase writes them first.
            setup.errors += 1;
            let outcome = Outcome::Error(error_kind(&e), format!("while populating: {e}"));
            agg.add(Event { at: Duration::ZERO, outcome });
            self.conn = None;
        }
    }

    fn run(mut self, shared: &Shared<'_>, tx: &Sender<Event>) {
        fine_timer_slack();
        if !sleep_until(shared.start, &shared.stop) {
            return;
        }
        match shared.config.mode {
            Mode::Open { .. } => self.open_loop(shared, tx),
            Mode::Closed => self.closed_loop(shared, tx),
        }
    }

    fn open_loop(&mut self, shared: &Shared<'_>, tx: &Sender<Event>) {
        let timeout = shared.config.timeout;
        while !shared.stop.load(Ordering::Relaxed) {
            let next = shared.schedule.lock().unwrap_or_else(PoisonError::into_inner).next_due();
            let Some(due) = next else { break };
            let due = shared.start + due;
            let now = Instant::now();
            if now > due + timeout {
                let late = now - due;
                let message = format!("a request due {late:.1?} earlier was not sent: every connection was busy");
                let _ =
                    tx.send(Event { at: shared.since_start(now), outcome: Outcome::Error(ErrorKind::Missed, message) });
                continue;
            }
            let reference = if due > now {
                if !sleep_until(due, &shared.stop) {
                    break;
                }
                Instant::now()
            } else {
                due
            };
            self.exchange(reference, shared, tx);
        }
    }

    fn closed_loop(&mut self, shared: &Shared<'_>, tx: &Sender<Event>) {
        loop {
            let now = Instant::now();
            if now >= shared.end || shared.stop.load(Ordering::Relaxed) {
                break;
            }
            if self.index >= shared.config.pattern.active(shared.since_start(now)) {
                thread::sleep(IDLE_POLL.min(shared.end - now));
                continue;
            }
            self.exchange(now, shared, tx);
        }
    }

    /// One request: reconnect if needed, send, verify, report. Latency runs from `reference`.
    fn exchange(&mut self, reference: Instant, shared: &Shared<'_>, tx: &Sender<Event>) {
        let config = shared.config;
        let conn = match &mut self.conn {
            Some(c) => c,
            None => match Conn::connect(config.target, config.timeout) {
                Ok(c) => self.conn.insert(c),
                Err(e) => {
                    let now = Instant::now();
                    let outcome = Outcome::Error(ErrorKind::Io, format!("reconnecting to {}: {e}", config.target));
                    let _ = tx.send(Event { at: shared.since_start(now), outcome });
                    thread::sleep(RECONNECT_PAUSE.min(shared.end.saturating_duration_since(now)));
                    return;
                }
            },
        };
        let result = match &mut self.client {
            Client::Kv(kv) => kv.request(conn, config.timeout).map(|verdict| (verdict, true)),
            Client::Http(http) => http.request(conn, config.timeout).map(|a| (a.verdict, a.keep_alive)),
        };
        let done = Instant::now();
        let outcome = match result {
            Ok((verdict, keep_alive)) => {
                if !keep_alive {
                    self.conn = None;
                }
                match verdict {
                    Verdict::Ok => Outcome::Ok(done.saturating_duration_since(reference)),
                    Verdict::Wrong(message) => Outcome::Error(ErrorKind::Wrong, message),
                }
            }
            Err(e) => {
                self.conn = None;
                Outcome::Error(error_kind(&e), e.to_string())
            }
        };
        let _ = tx.send(Event { at: shared.since_start(done), outcome });
    }
}

/// Sleeps until `deadline`, waking every [`TICK`] to see whether the run was stopped; false
/// if it was.
fn sleep_until(deadline: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        thread::sleep((deadline - now).min(TICK));
    }
}

fn error_kind(e: &ConnError) -> ErrorKind {
    match e {
        ConnError::Timeout => ErrorKind::Timeout,
        ConnError::Closed | ConnError::Io(_) => ErrorKind::Io,
        ConnError::TooLarge(_) | ConnError::Malformed(_) => ErrorKind::Wrong,
    }
}

/// Asks the kernel to wake this thread's sleeps within 1 µs of their deadline (the default
/// slack is 50 µs), so open-loop requests leave on time.
fn fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and changes only this thread's
    // timer slack; no memory is passed. A failure leaves the default slack, which is harmless.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A keep-alive HTTP server on a fresh loopback port answering `200 OK` with "ok".
    fn http_ok_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut writer = stream;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => {
                                if writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                });
            }
        });
        addr
    }

    fn config(target: SocketAddr, pattern: Pattern) -> LoadConfig {
        LoadConfig {
            target,
            protocol: Protocol::Http(HttpOptions::default()),
            mode: Mode::Open { connections: 2 },
            pattern,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_ramp_then_a_spike_in_one_run_reports_each_second() {
        let s = Duration::from_secs(1);
        let cfg = config(http_ok_server(), Pattern::ramp(200.0, s).then(Pattern::spike(200.0, s)));
        let mut seen = Vec::new();
        let report = run(&cfg, &mut |second| seen.push(second.clone())).expect("the run happens");
        assert_eq!(seen, report.seconds, "the callback sees the series the report holds");
        assert_eq!(seen.len(), 2);
        // Ramp to 200 over 1 s: 100 requests; spike: 20 req/s with 200 for the middle 0.2 s.
        assert_eq!(seen[0].offered, 100.0);
        assert!((seen[1].offered - 56.0).abs() < 0.5, "{seen:?}");
        assert_eq!(report.errors, 0, "{report:?}");
        assert!((154..=158).contains(&report.completed), "{report:?}");
        assert_eq!(report.completed, seen.iter().map(|s| s.completed).sum::<u64>());
        assert_eq!(report.requests, report.completed);
        assert!(report.latency.as_ref().is_some_and(|l| l.count == report.completed && l.p50_us > 0.0));
        assert!(!report.cancelled);
        let json = serde_json::to_value(&report).expect("serializable");
        assert_eq!(json["config"]["pattern"][1]["shape"], "spike");
        assert_eq!(json["config"]["protocol"]["name"], "http");
    }

    #[test]
    fn a_cancelled_run_stops_early() {
        let cfg = config(http_ok_server(), Pattern::steady(50.0, Duration::from_secs(30)));
        let cancel = AtomicBool::new(false);
        let started = Instant::now();
        let report = run_until(&cfg, &cancel, &mut |_| cancel.store(true, Ordering::Relaxed)).expect("runs");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(report.cancelled);
        assert!(report.seconds.len() <= 2, "{:?}", report.seconds);
        assert!(report.duration_s < 3.0);
    }

    #[test]
    fn a_refused_first_connection_is_an_error() {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        let err = run(&config(port, Pattern::steady(1.0, Duration::from_secs(1))), &mut |_| {}).unwrap_err();
        assert!(matches!(err, LoadError::Connect { .. }), "{err}");
        assert_eq!(err.exit_code(), exit::UNAVAILABLE);
    }

    #[test]
    fn bounds_are_checked() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let ok = config(addr, Pattern::steady(10.0, Duration::from_secs(1)));
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.pattern = Pattern::steady(10.0, Duration::from_secs(7200));
        assert!(matches!(c.validate(), Err(LoadError::Config(m)) if m.contains("limit is 3600s")));
        let mut c = ok.clone();
        c.mode = Mode::Open { connections: MAX_CONNECTIONS + 1 };
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.mode = Mode::Closed;
        c.pattern = Pattern::steady(0.0, Duration::from_secs(1));
        assert!(c.validate().is_err(), "a closed loop needs at least one connection");
        let mut c = ok.clone();
        c.timeout = Duration::ZERO;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.protocol = Protocol::Kv(KvOptions { keys: 1, ..KvOptions::default() });
        assert!(c.validate().is_err(), "two connections need two keys");
        c.protocol = Protocol::Kv(KvOptions { value_size: 0, ..KvOptions::default() });
        assert!(c.validate().is_err());
        c.protocol = Protocol::Kv(KvOptions { set_ratio: 1.5, ..KvOptions::default() });
        assert!(c.validate().is_err());
        c.protocol = Protocol::Http(HttpOptions { path: "no-slash".into() });
        assert!(c.validate().is_err());
        let mut c = ok;
        c.pattern = Pattern { phases: Vec::new() };
        assert!(matches!(c.validate(), Err(e @ LoadError::Pattern(_)) if e.exit_code() == exit::USAGE));
    }
}
