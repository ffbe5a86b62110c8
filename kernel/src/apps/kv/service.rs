//! The `kv` service: the Redis-protocol core of this module behind a vsock listener, one task
//! per client connection. The keyspace lives on the elastic heap, so loading data grows the
//! memory the VM holds and FLUSHALL/DEL give it back.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use elastic_rt::net::Stream;
use elastic_rt::prelude::*;
use elastic_rt::println;
use hypercall_abi::exit_code;
use spin::Mutex;

use super::{Figures, Session, Store};
use crate::apps::args;

const NAME: &str = "kv";
const USAGE: &str = "[PORT]";

/// Bytes read from a connection at a time.
const READ_CHUNK: usize = 16 * 1024;

static STORE: Mutex<Store> = Mutex::new(Store::new());
static OPEN: AtomicU64 = AtomicU64::new(0);
static HEAP_PEAK: AtomicU64 = AtomicU64::new(0);
static STARTED_NS: AtomicU64 = AtomicU64::new(0);

/// The `kv` service.
pub const SERVICE: Service =
    Service::new(NAME, USAGE, "key-value store speaking the Redis protocol on vsock PORT (default 6379)", |env| {
        boxed(main(env))
    });

async fn main(env: Env) -> u32 {
    let port = match args::port(&env, NAME, USAGE, 6379) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let server = net::serve(port, move |stream| {
        OPEN.fetch_add(1, Ordering::Relaxed);
        async move {
            client(stream, port).await;
            OPEN.fetch_sub(1, Ordering::Relaxed);
        }
    });
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            println!("kv: {e}");
            return exit_code::FAILURE;
        }
    };
    STARTED_NS.store(time::now_ns(), Ordering::Relaxed);
    println!("kv: listening on vsock port {port}");
    server.await;
    exit_code::FAILURE
}

fn figures(port: u32) -> Figures {
    let heap = memory::stats();
    let used = heap.claimed.saturating_sub(heap.available) as u64;
    let peak = HEAP_PEAK.fetch_max(used, Ordering::Relaxed).max(used);
    let (min, max, burst) = vcpus::limits();
    Figures {
        uptime_ms: time::now_ns().saturating_sub(STARTED_NS.load(Ordering::Relaxed)) / 1_000_000,
        tcp_port: u16::try_from(port).unwrap_or(0),
        connected_clients: OPEN.load(Ordering::Relaxed),
        heap_used_bytes: used,
        heap_peak_bytes: peak,
        memory_held_bytes: memory::held(),
        vcpus_online: vcpus::online() as u32,
        vcpus_max: burst as u32,
        vcpus_policy: (min as u32, max as u32, burst as u32),
    }
}

/// One client connection: requests in, replies out, until the client closes it or QUITs.
async fn client(mut stream: Stream, port: u32) {
    let mut session = Session::new();
    let mut input: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = alloc::vec![0u8; READ_CHUNK];
    let mut more = false;
    loop {
        if !more {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => input.extend_from_slice(&chunk[..n]),
            }
        }
        out.clear();
        let now_ms = time::now_ns() / 1_000_000;
        let handled = session.handle(&mut STORE.lock(), &input, now_ms, &|| figures(port), &mut out);
        // Freed outside the lock: a FLUSHALL of a big keyspace takes a while to drop.
        session.release();
        input.drain(..handled.consumed.min(input.len()));
        if input.capacity() > 4 * READ_CHUNK && input.len() < READ_CHUNK {
            input.shrink_to(READ_CHUNK);
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        if out.capacity() > 4 * READ_CHUNK {
            out = Vec::new();
        }
        if handled.close {
            stream.close();
            return;
        }
        more = handled.more;
        if more {
            yield_now().await;
        }
    }
}
