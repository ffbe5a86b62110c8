//! Routing of a request line to what is answered, and the bodies of the fixed routes.

use alloc::string::String;
use core::fmt::Write;

use super::{MAX_WORK_KB, MAX_WORK_MS};

/// What a request asks for, decided from its method and target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// `/`: a short greeting.
    Root,
    /// `/work?ms=N[&kb=M]`: `N` milliseconds of CPU-bound work over an `M` KiB working set.
    Work {
        /// Milliseconds of work (at most [`MAX_WORK_MS`]).
        ms: u64,
        /// KiB of working set the work touches (at most [`MAX_WORK_KB`]).
        kb: u64,
    },
    /// `/work` with a missing, malformed or too large `ms` (the detail says which).
    BadWork(&'static str),
    /// `/stats`: the caller's [`Figures`] as JSON.
    Stats,
    /// Any other path.
    NotFound,
    /// A method other than `GET` and `HEAD`.
    NotAllowed,
}

/// The body of `GET /`.
pub(super) const GREETING: &str = "Hello from the elastic unikernel!\n";

/// The `Allow` header's value for every route.
pub(super) const ALLOW: &str = "GET, HEAD";

/// Routes `method target`; the flag is `true` for `HEAD` (answer without a body).
pub(super) fn route(method: &str, target: &str) -> (Route, bool) {
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return (Route::NotAllowed, false),
    };
    let (path, query) = match strip_authority(target).split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (strip_authority(target), None),
    };
    let route = match path {
        "/" => Route::Root,
        "/stats" => Route::Stats,
        "/work" => work_route(query),
        _ => Route::NotFound,
    };
    (route, head_only)
}

/// The origin-form part of an absolute-form target (`http://host:port/path?q` → `/path?q`).
fn strip_authority(target: &str) -> &str {
    let lower_prefix = |p: &str| target.as_bytes().get(..p.len()).is_some_and(|t| t.eq_ignore_ascii_case(p.as_bytes()));
    let rest = if lower_prefix("http://") {
        &target[7..]
    } else if lower_prefix("https://") {
        &target[8..]
    } else {
        return target;
    };
    match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
        // `http://host?q` has the empty path, which is `/`.
        Some(_) | None => "/",
    }
}

fn work_route(query: Option<&str>) -> Route {
    let param = |name: &str| query.and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix(name)));
    let number = |v: &str| {
        (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .then(|| v.bytes().fold(0u64, |n, d| n.saturating_mul(10).saturating_add(u64::from(d - b'0'))))
    };
    let Some(value) = param("ms=") else {
        return Route::BadWork("missing ms (use /work?ms=N)");
    };
    let Some(ms) = number(value) else {
        return Route::BadWork("ms must be a decimal number of milliseconds");
    };
    if ms > MAX_WORK_MS {
        return Route::BadWork("ms is over the maximum of 10000");
    }
    let kb = match param("kb=") {
        None => 0,
        Some(v) => match number(v) {
            Some(kb) if kb <= MAX_WORK_KB => kb,
            Some(_) => return Route::BadWork("kb is over the maximum of 65536"),
            None => return Route::BadWork("kb must be a decimal number of KiB"),
        },
    };
    Route::Work { ms, kb }
}

/// The figures `GET /stats` reports, supplied by the caller when it is asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// vCPUs online now.
    pub vcpus_online: u32,
    /// Most vCPUs online since the previous `/stats` (or boot).
    pub vcpus_peak: u32,
    /// The vCPU policy's minimum.
    pub vcpus_min: u32,
    /// The vCPU policy's maximum.
    pub vcpus_max: u32,
    /// The vCPU policy's burst ceiling.
    pub vcpus_burst: u32,
    /// Guest memory held from the host, in bytes.
    pub memory_held: u64,
    /// Heap bytes in use.
    pub heap_used: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Requests answered since start (final replies, not `100 Continue`).
    pub requests_total: u64,
    /// Requests answered per status class: 1xx, 2xx, 3xx, 4xx, 5xx (see
    /// [`status_class`](super::status_class)).
    pub requests_by_class: [u64; 5],
}

impl Figures {
    /// The `/stats` JSON document (one line, with a trailing newline).
    pub fn to_json(self) -> String {
        let mut out = String::with_capacity(320);
        let c = &self.requests_by_class;
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            concat!(
                "{{\"vcpus\":{{\"online\":{},\"peak_since_last_stats\":{},\"min\":{},\"max\":{},\"burst\":{}}},",
                "\"memory\":{{\"held_bytes\":{},\"heap_used_bytes\":{}}},",
                "\"connections\":{{\"open\":{},\"total\":{}}},",
                "\"requests\":{{\"total\":{},\"1xx\":{},\"2xx\":{},\"3xx\":{},\"4xx\":{},\"5xx\":{}}}}}"
            ),
            self.vcpus_online,
            self.vcpus_peak,
            self.vcpus_min,
            self.vcpus_max,
            self.vcpus_burst,
            self.memory_held,
            self.heap_used,
            self.connections_open,
            self.connections_total,
            self.requests_total,
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
        );
        out
    }
}
