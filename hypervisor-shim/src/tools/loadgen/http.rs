//! The `http` protocol: HTTP/1.1 keep-alive `GET`s, each answer read completely and verified.
//!
//! An answer is correct when its status is 2xx and its body is complete. Bodies are framed by
//! `Content-Length`, by `Transfer-Encoding: chunked` (chunk extensions and trailers are
//! skipped), or, when neither is given, by the service closing the connection. Interim `1xx`
//! answers are skipped. `Connection: close` (or an HTTP/1.0 answer without keep-alive) makes
//! the generator reconnect before its next request; that is not an error. The head is parsed
//! with `httparse`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use super::Verdict;
use super::conn::{Conn, ConnError};

/// Largest response head accepted.
pub const MAX_HEAD: usize = 64 << 10;
/// Largest body accepted.
pub const MAX_BODY: usize = 16 << 20;
/// Most header lines accepted.
const MAX_HEADERS: usize = 64;
/// Longest chunk-size line accepted.
const MAX_CHUNK_LINE: usize = 1024;

/// Options of the `http` protocol.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpOptions {
    /// The path requested (starts with `/`).
    pub path: String,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions { path: "/".into() }
    }
}

/// Why bytes are not a usable HTTP/1.1 response.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HttpError {
    /// `httparse` rejected the head.
    #[error("bad response head: {0}")]
    Head(httparse::Error),
    /// The head is larger than [`MAX_HEAD`].
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// `Content-Length` is not a number, or two of them disagree.
    #[error("bad Content-Length")]
    BadLength,
    /// The body is larger than [`MAX_BODY`].
    #[error("body of {0} bytes is larger than {MAX_BODY}")]
    BodyTooLarge(u64),
    /// A chunk is malformed.
    #[error("bad chunked encoding: {0}")]
    BadChunk(&'static str),
}

/// How a response's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body (1xx, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(usize),
    /// Chunked transfer coding.
    Chunked,
    /// Until the service closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Body framing.
    pub body: Body,
    /// Whether the connection stays open after this response.
    pub keep_alive: bool,
}

fn has_token(value: &[u8], token: &str) -> bool {
    String::from_utf8_lossy(value).split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses a response head at the start of `buf`: the head and its length, or `None` if
/// incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let used = match response.parse(buf).map_err(HttpError::Head)? {
        httparse::Status::Partial if buf.len() > MAX_HEAD => return Err(HttpError::HeadTooLarge),
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(n) => n,
    };
    let status = response.code.unwrap_or(0);
    let http10 = response.version == Some(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = http10;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(HttpError::BadLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::BadLength);
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = String::from_utf8_lossy(h.value).rsplit(',').next().map(|t| t.trim().to_ascii_lowercase());
            chunked = last.as_deref() == Some("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, "close") {
                close = true;
            } else if has_token(h.value, "keep-alive") {
                close = false;
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        Body::Empty
    } else if chunked {
        Body::Chunked
    } else if let Some(n) = length {
        if n > MAX_BODY as u64 {
            return Err(HttpError::BodyTooLarge(n));
        }
        Body::Length(n as usize)
    } else {
        Body::UntilClose
    };
    let keep_alive = !close && body != Body::UntilClose;
    Ok(Some((Head { status, reason: response.reason.unwrap_or("").to_string(), body, keep_alive }, used)))
}

/// The length of a complete chunked body at the start of `buf` (chunks, the last chunk and
/// the trailer section), or `None` if incomplete.
pub fn chunked_len(buf: &[u8]) -> Result<Option<usize>, HttpError> {
    let line = |at: usize| -> Result<Option<(&[u8], usize)>, HttpError> {
        let rest = &buf[at.min(buf.len())..];
        match rest.windows(2).position(|w| w == b"\r\n") {
            Some(i) if i > MAX_CHUNK_LINE => Err(HttpError::BadChunk("line too long")),
            Some(i) => Ok(Some((&rest[..i], at + i + 2))),
            None if rest.len() > MAX_CHUNK_LINE => Err(HttpError::BadChunk("line too long")),
            None => Ok(None),
        }
    };
    let mut pos = 0;
    let mut total: u64 = 0;
    loop {
        let Some((size_line, data)) = line(pos)? else { return Ok(None) };
        let hex = size_line.split(|&b| b == b';').next().unwrap_or_default();
        let hex = std::str::from_utf8(hex).map_err(|_| HttpError::BadChunk("size is not hexadecimal"))?.trim();
        let size = u64::from_str_radix(hex, 16).map_err(|_| HttpError::BadChunk("size is not hexadecimal"))?;
        total = total.saturating_add(size);
        if total > MAX_BODY as u64 {
            return Err(HttpError::BodyTooLarge(total));
        }
        if size == 0 {
            // Trailer lines up to an empty line.
            let mut at = data;
            loop {
                let Some((trailer, next)) = line(at)? else { return Ok(None) };
                if trailer.is_empty() {
                    return Ok(Some(next));
                }
                at = next;
            }
        }
        let end = data + size as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(HttpError::BadChunk("chunk data does not end with CRLF"));
        }
        pos = end + 2;
    }
}

/// The `http` client state of one connection.
#[derive(Debug)]
pub(crate) struct HttpClient {
    request: Vec<u8>,
    path: String,
}

/// A verified answer and whether the connection may carry the next request.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The verdict.
    pub verdict: Verdict,
    /// False when the service closes (or will close) the connection.
    pub keep_alive: bool,
}

impl HttpClient {
    /// The client for `GET path` on `target`.
    pub fn new(options: &HttpOptions, target: SocketAddr) -> Self {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: hypervisor-shim-load\r\nAccept: */*\r\n\r\n",
            options.path
        );
        HttpClient { request: request.into_bytes(), path: options.path.clone() }
    }

    /// Sends one request on `conn` and reads and verifies the whole response.
    pub fn request(&mut self, conn: &mut Conn, timeout: Duration) -> Result<Answer, ConnError> {
        conn.send(&self.request)?;
        let deadline = Instant::now() + timeout;
        loop {
            let head = conn.read_frame(deadline, MAX_HEAD, parse_head)?;
            match head.body {
                Body::Empty if (100..200).contains(&head.status) => continue,
                Body::Empty => {}
                Body::Length(n) => {
                    conn.read_frame(deadline, n, |b| Ok::<_, HttpError>((b.len() >= n).then_some(((), n))))?
                }
                Body::Chunked => conn.read_frame(deadline, MAX_BODY + MAX_HEAD, |b| {
                    Ok::<_, HttpError>(chunked_len(b)?.map(|n| ((), n)))
                })?,
                Body::UntilClose => {
                    conn.read_to_close(deadline, MAX_BODY)?;
                }
            }
            let verdict = if (200..300).contains(&head.status) {
                Verdict::Ok
            } else {
                Verdict::Wrong(format!("GET {} answered {} {}, expected 2xx", self.path, head.status, head.reason))
            };
            return Ok(Answer { verdict, keep_alive: head.keep_alive });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> (Head, usize) {
        parse_head(text.as_bytes()).expect("valid").expect("complete")
    }

    #[test]
    fn content_length_framing() {
        let (h, n) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(h, Head { status: 200, reason: "OK".into(), body: Body::Length(5), keep_alive: true });
        assert_eq!(n, 38);
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Len"), Ok(None));
    }

    #[test]
    fn connection_and_version_decide_keep_alive() {
        assert!(!head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").0.keep_alive);
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").0.keep_alive);
        assert!(head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n").0.keep_alive);
        let (h, _) = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.body, Body::UntilClose);
        assert!(!h.keep_alive);
    }

    #[test]
    fn bodiless_statuses() {
        assert_eq!(head("HTTP/1.1 204 No Content\r\n\r\n").0.body, Body::Empty);
        assert_eq!(head("HTTP/1.1 100 Continue\r\n\r\n").0.body, Body::Empty);
        assert_eq!(head("HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\n").0.status, 404);
    }

    #[test]
    fn bad_heads() {
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"), Err(HttpError::BadLength));
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HttpError::BadLength)
        );
        assert!(matches!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n"), Err(HttpError::Head(_))));
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"),
            Err(HttpError::BodyTooLarge(99_999_999_999))
        );
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(huge.as_bytes()), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn chunked_bodies() {
        let (h, _) = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.body, Body::Chunked);
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(chunked_len(body), Ok(Some(body.len())));
        for cut in 0..body.len() {
            assert_eq!(chunked_len(&body[..cut]), Ok(None), "cut at {cut}");
        }
        let mut two = body.to_vec();
        two.extend_from_slice(b"HTTP/1.1 ...");
        assert_eq!(chunked_len(&two), Ok(Some(body.len())), "stops at the end of the body");
        assert_eq!(chunked_len(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(chunked_len(b"zz\r\n"), Err(HttpError::BadChunk("size is not hexadecimal")));
        assert_eq!(chunked_len(b"2\r\nabcd\r\n"), Err(HttpError::BadChunk("chunk data does not end with CRLF")));
        assert!(matches!(chunked_len(b"ffffffffff\r\n"), Err(HttpError::BodyTooLarge(_))));
    }
}
