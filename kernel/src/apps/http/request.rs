//! Request heads: parsing (with `httparse`), connection persistence and body framing.

use super::routes::{self, Route};
use super::{MAX_BODY, MAX_HEAD, MAX_HEADERS};

/// Whether, and how, the response keeps the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Persist {
    /// HTTP/1.1 default: keep, no `Connection` header needed.
    Keep,
    /// HTTP/1.0 with `Connection: keep-alive`: keep, and say so.
    KeepAlive,
    /// Close after the response (`Connection: close`).
    Close,
}

/// How the request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// `Content-Length` bytes (`0` when absent).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head, owning nothing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    /// What to answer.
    pub route: Route,
    /// `HEAD` rather than `GET`: answer without a body.
    pub head_only: bool,
    /// Connection persistence after the response.
    pub persist: Persist,
    /// How the body is delimited.
    pub framing: Framing,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
}

/// Why a request is refused outright; the connection closes after the error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reject {
    /// 400: the message is malformed (the detail says how).
    Malformed(&'static str),
    /// 431: the head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] fields.
    HeadTooLarge,
    /// 413: the body is larger than [`MAX_BODY`].
    BodyTooLarge,
    /// 501: a transfer coding other than `chunked`.
    UnsupportedCoding,
}

impl Reject {
    /// The status code of the error reply.
    pub fn status(self) -> u16 {
        match self {
            Reject::Malformed(_) => 400,
            Reject::HeadTooLarge => 431,
            Reject::BodyTooLarge => 413,
            Reject::UnsupportedCoding => 501,
        }
    }

    /// The error reply's body text (one line).
    pub fn detail(self) -> &'static str {
        match self {
            Reject::Malformed(why) => why,
            Reject::HeadTooLarge => "request head too large",
            Reject::BodyTooLarge => "request body too large",
            Reject::UnsupportedCoding => "unsupported transfer coding",
        }
    }
}

/// The outcome of looking for a request head at the start of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parsed {
    /// The head is not complete yet (and is still within [`MAX_HEAD`]).
    Partial,
    /// A complete head of `len` bytes.
    Done { len: usize, head: Head },
    /// The request is refused.
    Rejected(Reject),
}

/// Looks for one request head at the start of `input`.
pub(super) fn parse(input: &[u8]) -> Parsed {
    // Only the first MAX_HEAD bytes are ever examined, so the verdict does not depend on how
    // much of a pipelined stream happens to be buffered.
    let window = &input[..input.len().min(MAX_HEAD)];
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD => return Parsed::Rejected(Reject::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Rejected(Reject::HeadTooLarge),
        Err(e) => return Parsed::Rejected(Reject::Malformed(parse_error(e))),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Rejected(Reject::Malformed("incomplete request line"));
    };
    match interpret(method, target, version, req.headers) {
        Ok(head) => Parsed::Done { len, head },
        Err(reject) => Parsed::Rejected(reject),
    }
}

fn parse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid request line",
        httparse::Error::Version => "invalid HTTP version",
        httparse::Error::Status | httparse::Error::TooManyHeaders => "malformed request",
    }
}

/// Applies the header fields' meaning to a syntactically valid head.
fn interpret(method: &str, target: &str, version: u8, fields: &[httparse::Header<'_>]) -> Result<Head, Reject> {
    let mut close = false;
    let mut keep_alive = false;
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut hosts = 0u32;
    let mut expect_continue = false;
    for field in fields {
        let name = field.name;
        let value = trim(field.value);
        if name.eq_ignore_ascii_case("connection") {
            for option in value.split(|&b| b == b',').map(trim) {
                close |= option.eq_ignore_ascii_case(b"close");
                keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = content_length_value(value)?;
            if content_length.is_some_and(|m| m != n) {
                return Err(Reject::Malformed("conflicting Content-Length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // The codings accumulate over repeated fields; only a final `chunked` delimits
            // the body, and `chunked` alone is the only coding understood.
            for coding in value.split(|&b| b == b',').map(trim) {
                if coding.is_empty() {
                    continue;
                }
                if chunked || !coding.eq_ignore_ascii_case(b"chunked") {
                    return Err(Reject::UnsupportedCoding);
                }
                chunked = true;
            }
            transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    if version == 1 && hosts != 1 {
        return Err(Reject::Malformed(if hosts == 0 { "missing Host" } else { "more than one Host" }));
    }
    let framing = if transfer_encoding {
        if version == 0 {
            return Err(Reject::Malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if content_length.is_some() {
            return Err(Reject::Malformed("both Transfer-Encoding and Content-Length"));
        }
        if !chunked {
            return Err(Reject::Malformed("empty Transfer-Encoding"));
        }
        Framing::Chunked
    } else {
        let n = content_length.unwrap_or(0);
        if n > MAX_BODY {
            return Err(Reject::BodyTooLarge);
        }
        Framing::Length(n)
    };
    let persist = match (version, close, keep_alive) {
        (_, true, _) => Persist::Close,
        (1, false, _) => Persist::Keep,
        (_, false, true) => Persist::KeepAlive,
        (_, false, false) => Persist::Close,
    };
    let (route, head_only) = routes::route(method, target);
    Ok(Head { route, head_only, persist, framing, expect_continue: expect_continue && version == 1 })
}

/// A `Content-Length` value: decimal digits only. Values too large for `u64` saturate (they
/// are over [`MAX_BODY`] either way).
fn content_length_value(value: &[u8]) -> Result<u64, Reject> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(Reject::Malformed("invalid Content-Length"));
    }
    Ok(value.iter().fold(0u64, |n, &d| n.saturating_mul(10).saturating_add(u64::from(d - b'0'))))
}

/// `bytes` without leading and trailing spaces and tabs.
pub(super) fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |i| i + 1);
    &bytes[start..end.max(start)]
}
