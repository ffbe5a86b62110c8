//! `kv`: the protocol and data core of a key-value service that speaks the Redis protocol
//! (RESP2 multibulk and inline requests), so unmodified `redis-cli` and `redis-benchmark` can
//! drive it.
//!
//! Pure logic, no kernel dependencies: the caller owns the sockets, the clock and the lock.
//! Per connection it keeps a [`Session`]; the keyspace is one [`Store`] behind a lock held for
//! one [`Session::handle`] call:
//!
//! ```text
//! let mut session = Session::new();
//! let mut buf = Vec::new();             // unconsumed input
//! loop {
//!     read more bytes onto the end of buf;   (skip the read when the last call said `more`)
//!     let mut out = Vec::new();
//!     let h = session.handle(&mut store.lock(), &buf, now_ms, &figures, &mut out);
//!     session.release();                 // lock dropped: free what FLUSHALL detached
//!     buf.drain(..h.consumed);
//!     write all of out;
//!     if h.close { close the connection }
//! }
//! ```
//!
//! Commands: strings (PING ECHO SET GET GETDEL SETNX SETEX PSETEX MSET MGET APPEND STRLEN
//! INCR DECR INCRBY DECRBY), lists (LPUSH RPUSH LPUSHX RPUSHX LPOP RPOP LLEN LINDEX LRANGE LREM
//! LSET LTRIM), hashes (HSET HMSET HSETNX HGET HMGET HGETALL HKEYS HVALS HDEL HLEN HEXISTS
//! HSTRLEN HINCRBY), sets (SADD SREM SMEMBERS SISMEMBER SMISMEMBER SCARD SPOP), sorted sets
//! (ZADD ZINCRBY ZSCORE ZMSCORE ZREM ZCARD ZCOUNT ZRANK ZREVRANK ZRANGE ZREVRANGE
//! ZRANGEBYSCORE ZREVRANGEBYSCORE ZPOPMIN ZPOPMAX),
//! keys and server (DEL UNLINK EXISTS TYPE TTL PTTL EXPIRE PEXPIRE PERSIST DBSIZE FLUSHALL
//! FLUSHDB KEYS INFO CONFIG COMMAND CLIENT SELECT QUIT) — replies and error texts as Redis
//! 7.0's (the value types are in `types`).
//! Limits: [`MAX_BULK_BYTES`], [`MAX_MULTIBULK_ARGS`], [`MAX_INLINE_BYTES`],
//! [`MAX_REQUEST_BYTES`], [`OUTPUT_SOFT_LIMIT`].

mod commands;
mod glob;
mod info;
mod resp;
mod service;
mod store;
#[cfg(test)]
mod tests;
mod types;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

// The core's public API (documented above); the service uses part of it.
#[allow(unused_imports)]
pub use commands::{COMMANDS, Command};
#[allow(unused_imports)]
pub use info::{Figures, Human, REDIS_VERSION};
#[allow(unused_imports)]
pub use resp::{ARG_OVERHEAD, MAX_BULK_BYTES, MAX_INLINE_BYTES, MAX_MULTIBULK_ARGS, MAX_REQUEST_BYTES, ProtocolError};
pub use service::SERVICE;
#[allow(unused_imports)]
pub use store::{Detached, Stats, Store};

/// Once a call has written this many reply bytes, it stops before the next request and
/// reports [`Handled::more`], so one connection cannot pile up unbounded output (e.g. a
/// pipeline of GETs of large values): 1 MiB. A single reply may still exceed it.
pub const OUTPUT_SOFT_LIMIT: usize = 1 << 20;

/// Expired keys each [`Session::handle`] call removes from the store before its requests
/// (earliest deadline first). [`Store::sweep`] does more on demand.
pub const SWEEP_PER_CALL: usize = 16;

/// What one [`Session::handle`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handled {
    /// Bytes of the input taken in; drop them from the front of the buffer. What is left is
    /// an unfinished line (at most [`MAX_INLINE_BYTES`]) or, if `more`, unprocessed requests.
    /// When `close` is set, the whole input counts as consumed.
    pub consumed: usize,
    /// Close the connection once the output is written: after QUIT (`+OK` was written) or a
    /// protocol error (`-ERR Protocol error: …` was written). Further input is ignored.
    pub close: bool,
    /// Stopped early at [`OUTPUT_SOFT_LIMIT`]: write the output, then call again with the
    /// unconsumed rest before waiting for more input.
    pub more: bool,
}

/// A connection's identity, as CLIENT reports and sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Unique per connection, increasing in connection order (CLIENT ID).
    pub id: u64,
    /// Set by CLIENT SETNAME.
    pub name: Option<Vec<u8>>,
}

/// The next connection's CLIENT ID.
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// One client connection's protocol state.
#[derive(Debug)]
pub struct Session {
    parser: resp::Parser,
    closed: bool,
    /// A keyspace FLUSHALL took out of the store, not freed yet.
    detached: Option<Detached>,
    client: Client,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A fresh connection, with the next client id.
    pub fn new() -> Self {
        let id = NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed);
        Self { parser: resp::Parser::new(), closed: false, detached: None, client: Client { id, name: None } }
    }

    /// Runs every complete request in `input` (pipelining) against `store`, appending the
    /// replies to `out`; `now_ms` is the caller's clock (any monotonic ms) and `figures` is
    /// asked only by INFO. Never panics on any input, and never reserves memory for announced
    /// lengths before their bytes arrive.
    pub fn handle(
        &mut self,
        store: &mut Store,
        input: &[u8],
        now_ms: u64,
        figures: &dyn Fn() -> Figures,
        out: &mut Vec<u8>,
    ) -> Handled {
        if self.closed {
            return Handled { consumed: input.len(), close: true, more: false };
        }
        store.sweep(now_ms, SWEEP_PER_CALL);
        let start = out.len();
        let mut pos = 0;
        loop {
            match self.parser.parse(input, &mut pos) {
                Ok(false) => return Handled { consumed: pos, close: false, more: false },
                Ok(true) => {}
                Err(e) => {
                    e.reply(out);
                    return self.close(input);
                }
            }
            if self.parser.out_of_memory() {
                resp::error(out, commands::OOM);
                self.parser.finish();
                continue;
            }
            let mut ctx = commands::Ctx {
                store,
                now: now_ms,
                figures,
                out,
                detached: &mut self.detached,
                client: &mut self.client,
            };
            let flow = commands::execute(&mut ctx, self.parser.args());
            self.parser.finish();
            if flow == commands::Flow::Close {
                return self.close(input);
            }
            if out.len() - start >= OUTPUT_SOFT_LIMIT && pos < input.len() {
                return Handled { consumed: pos, close: false, more: true };
            }
        }
    }

    fn close(&mut self, input: &[u8]) -> Handled {
        self.closed = true;
        self.parser = resp::Parser::new();
        Handled { consumed: input.len(), close: true, more: false }
    }

    /// Frees what FLUSHALL/FLUSHDB took out of the store during the last [`Session::handle`]
    /// (dropping 1M keys takes ~0.2 s): call it after releasing the store's lock. Cheap when
    /// there is nothing to free; if never called, the memory goes at the next FLUSHALL on this
    /// connection or when the session is dropped.
    pub fn release(&mut self) {
        self.detached = None;
    }

    #[cfg_attr(not(test), allow(dead_code))] // part of the core's API; the tests use it
    /// Keys detached by FLUSHALL and not yet freed by [`Session::release`].
    pub fn detached_keys(&self) -> usize {
        self.detached.as_ref().map_or(0, Detached::len)
    }

    #[cfg_attr(not(test), allow(dead_code))] // part of the core's API; the tests use it
    /// Heap bytes this connection holds for a request still arriving.
    pub fn held_bytes(&self) -> usize {
        self.parser.held_bytes()
    }
}
