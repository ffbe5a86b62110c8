//! The `http` service: the HTTP/1.1 core of this module behind a vsock listener, one task per
//! client connection. `GET /work?ms=N` burns CPU (yielding every few units, so other
//! connections keep being served and the vCPU controller sees the runnable tasks).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use elastic_rt::net::Stream;
use elastic_rt::prelude::*;
use elastic_rt::println;
use hypercall_abi::exit_code;

use super::{Action, Conn, Figures, WorkDone, status_class, work_unit};
use crate::apps::args;

const NAME: &str = "http";
const USAGE: &str = "[PORT]";

/// Bytes read from a connection at a time (at least the core's head limit).
const READ_CHUNK: usize = 16 * 1024;
/// Work units between yields (a unit is a few µs).
const UNITS_PER_YIELD: u64 = 64;

static OPEN: AtomicU64 = AtomicU64::new(0);
static TOTAL: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static BY_CLASS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

/// The `http` service.
pub const SERVICE: Service =
    Service::new(NAME, USAGE, "HTTP/1.1 server on vsock PORT (default 80): /, /work?ms=N, /stats", |env| {
        boxed(main(env))
    });

async fn main(env: Env) -> u32 {
    let port = match args::port(&env, NAME, USAGE, 80) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let server = net::serve(port, |stream| {
        OPEN.fetch_add(1, Ordering::Relaxed);
        TOTAL.fetch_add(1, Ordering::Relaxed);
        async move {
            client(stream).await;
            OPEN.fetch_sub(1, Ordering::Relaxed);
        }
    });
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            println!("http: {e}");
            return exit_code::FAILURE;
        }
    };
    println!("http: listening on vsock port {port}");
    server.await;
    exit_code::FAILURE
}

fn figures() -> Figures {
    let heap = memory::stats();
    let (min, max, burst) = vcpus::limits();
    Figures {
        vcpus_online: vcpus::online() as u32,
        vcpus_peak: vcpus::take_peak() as u32,
        vcpus_min: min as u32,
        vcpus_max: max as u32,
        vcpus_burst: burst as u32,
        memory_held: memory::held(),
        heap_used: heap.claimed.saturating_sub(heap.available) as u64,
        connections_open: OPEN.load(Ordering::Relaxed),
        connections_total: TOTAL.load(Ordering::Relaxed),
        requests_total: REQUESTS.load(Ordering::Relaxed),
        requests_by_class: core::array::from_fn(|i| BY_CLASS[i].load(Ordering::Relaxed)),
    }
}

fn count(status: u16) {
    REQUESTS.fetch_add(1, Ordering::Relaxed);
    if let Some(c) = status_class(status) {
        BY_CLASS[c].fetch_add(1, Ordering::Relaxed);
    }
}

/// Work units per millisecond of one vCPU, measured when the service starts.
static UNITS_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Work units per millisecond, measured at the first `/work` request (not at start: a cold
/// start's first request should not wait for it unless it asks for work).
fn units_per_ms() -> u64 {
    match UNITS_PER_MS.load(Ordering::Relaxed) {
        0 => {
            calibrate();
            UNITS_PER_MS.load(Ordering::Relaxed)
        }
        n => n,
    }
}

/// Measures how many work units one vCPU does per millisecond.
fn calibrate() {
    let start = time::now_ns();
    let (mut x, mut units) = (1u64, 0u64);
    while time::now_ns() - start < 5_000_000 {
        x = work_unit(x);
        units += 1;
    }
    let per_ms = (units * 1_000_000 / (time::now_ns() - start).max(1)).max(1);
    UNITS_PER_MS.store(per_ms, Ordering::Relaxed);
    core::hint::black_box(x);
}

/// Does `ms` milliseconds of one vCPU's work (a fixed number of units, so concurrent requests
/// add up to CPU demand) over a `kb` KiB working set (allocated on the heap for the duration:
/// memory held follows the requests in flight), yielding between batches of units.
async fn work(ms: u64, kb: u64, seed: u64) -> WorkDone {
    let mut set = alloc::vec![0u8; (kb as usize) * 1024];
    let start = time::now_ns();
    let total = ms.saturating_mul(units_per_ms()).max(1);
    let mut checksum = seed;
    for units in 0..total {
        checksum = work_unit(checksum);
        if !set.is_empty() {
            // Touch one byte per page of the working set per unit, round robin.
            let pages = set.len() / 4096 + 1;
            let at = ((units as usize) % pages * 4096).min(set.len() - 1);
            set[at] = set[at].wrapping_add(checksum as u8);
        }
        if (units + 1).is_multiple_of(UNITS_PER_YIELD) {
            yield_now().await;
        }
    }
    WorkDone { units: total, checksum, elapsed_us: time::now_ns().saturating_sub(start) / 1000 }
}

/// One client connection: requests answered in order, until the client closes it or a reply
/// closes it.
async fn client(mut stream: Stream) {
    let mut conn = Conn::new();
    let mut input: Vec<u8> = Vec::new();
    let mut chunk = alloc::vec![0u8; READ_CHUNK];
    loop {
        // Answer every complete request in the buffer, in order.
        loop {
            let (consumed, action) = conn.feed(&input, &figures);
            input.drain(..consumed.min(input.len()));
            let (bytes, close) = match action {
                Action::NeedMore => break,
                Action::Close => return stream.close(),
                Action::Reply(r) => {
                    if r.is_final() {
                        count(r.status);
                    }
                    (r.bytes, r.close)
                }
                Action::Work(order) => {
                    let done = work(order.ms, order.kb, order.seed).await;
                    let r = order.reply(&done);
                    count(r.status);
                    (r.bytes, r.close)
                }
            };
            if stream.write_all(&bytes).await.is_err() {
                return;
            }
            if close {
                return stream.close();
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => input.extend_from_slice(&chunk[..n]),
        }
    }
}
