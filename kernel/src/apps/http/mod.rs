//! `http`: the protocol core of the HTTP/1.1 service — pure logic, no sockets, no kernel state.
//!
//! The caller owns one [`Conn`] per TCP connection and a receive buffer. Whenever bytes
//! arrive it appends them to the buffer and calls [`Conn::feed`] until the answer is
//! [`Action::NeedMore`] (or the connection is to be closed), each time dropping the
//! `consumed` bytes from the front of the buffer and acting on the [`Action`]:
//!
//! - [`Action::Reply`]: send `bytes`; if `close`, close the connection after sending (ideally
//!   a half-close followed by draining what the client still sends, so an error reply is not
//!   lost to a reset).
//! - [`Action::Work`]: do the CPU-bound work the [`WorkOrder`] asks for (repeat [`work_unit`]
//!   until `ms` milliseconds have passed, or let [`WorkOrder::perform`] do it with a clock),
//!   then send [`WorkOrder::reply`]. Replies must go out in request order, so the caller sends
//!   this one before feeding again.
//! - [`Action::NeedMore`]: wait for more bytes.
//! - [`Action::Close`]: the connection already ended (after a closing reply); close it.
//!
//! Routes: `GET /` (a short greeting), `GET /work?ms=N[&kb=M]` (CPU-bound work, `N` ≤
//! [`MAX_WORK_MS`], over an `M` KiB working set held for its duration, `M` ≤ [`MAX_WORK_KB`]), `GET /stats` (JSON built from the caller's [`Figures`]); `HEAD` for all
//! three (`HEAD /work` still asks for the work: the reply's length depends on it). Unknown
//! paths get 404; methods other than `GET`/`HEAD` get 405 with `Allow`.
//!
//! Framing: HTTP/1.1 keeps the connection open unless `Connection: close`; HTTP/1.0 closes it
//! unless `Connection: keep-alive`. Pipelined requests are answered in order. A request body
//! (by `Content-Length`, or `Transfer-Encoding: chunked`, which is supported) of at most
//! [`MAX_BODY`] bytes is read and discarded; `Expect: 100-continue` gets a `100 Continue`
//! first. Errors that break framing close the connection after the reply: malformed request
//! → 400, head over [`MAX_HEAD`] bytes or over [`MAX_HEADERS`] fields → 431, body over
//! [`MAX_BODY`] → 413, a transfer coding other than `chunked` → 501. A bad `ms` on `/work` is
//! a 400 that keeps the connection (the request itself was well framed).
//!
//! Memory: the core never sizes an allocation from a length the client sent; bodies are
//! counted off, not stored. The caller never needs to buffer more than [`MAX_HEAD`] bytes to
//! make progress: with that many bytes available `feed` always consumes some or answers.

mod body;
mod conn;
mod request;
mod response;
mod routes;
mod service;
mod work;

#[cfg(test)]
mod client_tests;
#[cfg(test)]
mod tests;

// The core's public API (documented above); the service uses part of it.
#[allow(unused_imports)]
pub use conn::{Action, Conn};
#[allow(unused_imports)]
pub use response::Reply;
pub use routes::Figures;
pub use service::SERVICE;
#[allow(unused_imports)]
pub use work::{WORK_UNIT_ROUNDS, WorkDone, WorkOrder, work_unit, work_units};

/// Largest request head (request line, header fields and the blank line), in bytes; larger →
/// 431 and close.
pub const MAX_HEAD: usize = 8 * 1024;

/// Most header fields in one request head; more → 431 and close.
pub const MAX_HEADERS: usize = 64;

/// Largest request body that is read and discarded, in bytes; larger → 413 and close.
pub const MAX_BODY: u64 = 64 * 1024;

/// Largest chunk-size line (size, extensions and line end) in a chunked body; longer → 400.
pub const MAX_CHUNK_LINE: usize = 1024;

/// Largest trailer section after the last chunk, in bytes; larger → 431 and close.
pub const MAX_TRAILERS: usize = MAX_HEAD;

/// Most milliseconds of work `GET /work?ms=N` may ask for; more → 400.
pub const MAX_WORK_MS: u64 = 10_000;

/// Largest working set `/work?kb=M` may ask for: 64 MiB.
pub const MAX_WORK_KB: u64 = 64 * 1024;

/// The `Server` header's value.
pub const SERVER: &str = "elastic-unikernel";

/// The index of `status`'s class in [`Figures::requests_by_class`] (`0` for 1xx … `4` for
/// 5xx), or `None` outside 100..=599.
pub fn status_class(status: u16) -> Option<usize> {
    match status {
        100..=599 => Some(usize::from(status / 100 - 1)),
        _ => None,
    }
}
