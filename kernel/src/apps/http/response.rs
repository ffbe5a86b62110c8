//! Responses: the [`Reply`] the core hands its caller, and its formatting (status line, the
//! fixed header set, and the body).

use alloc::vec::Vec;
use core::fmt::{self, Write};

use super::SERVER;
use super::request::Persist;

/// `text/plain` with its charset.
pub(super) const TEXT: &str = "text/plain; charset=utf-8";
/// `application/json`.
pub(super) const JSON: &str = "application/json";

/// The interim response to `Expect: 100-continue`.
pub(super) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The reason phrase for every status this core sends.
pub(super) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

/// Bytes to send, as decided by the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The complete response (status line, headers and body).
    pub bytes: Vec<u8>,
    /// Its status code (`100` for the interim `100 Continue`).
    pub status: u16,
    /// Close the connection once `bytes` are sent.
    pub close: bool,
}

impl Reply {
    /// This is a final response (not `100 Continue`): count it as an answered request.
    pub fn is_final(&self) -> bool {
        self.status >= 200
    }
}

/// A complete response.
#[derive(Debug, Clone, Copy)]
pub(super) struct Response<'a> {
    /// Status code.
    pub status: u16,
    /// `Content-Type` value.
    pub content_type: &'static str,
    /// The body (sent only if `!head_only`; its length is the `Content-Length` either way).
    pub body: &'a [u8],
    /// Answer to `HEAD`: headers only.
    pub head_only: bool,
    /// Connection persistence.
    pub persist: Persist,
    /// An `Allow` header, if any.
    pub allow: Option<&'static str>,
}

impl Response<'_> {
    /// The response's bytes on the wire.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut out = Wire(Vec::with_capacity(160 + if self.head_only { 0 } else { self.body.len() }));
        // Writing to a Vec cannot fail.
        let _ = self.write_head(&mut out);
        if !self.head_only {
            out.0.extend_from_slice(self.body);
        }
        out.0
    }

    fn write_head(&self, out: &mut Wire) -> fmt::Result {
        write!(out, "HTTP/1.1 {} {}\r\nServer: {SERVER}\r\n", self.status, reason(self.status))?;
        write!(out, "Content-Type: {}\r\nContent-Length: {}\r\n", self.content_type, self.body.len())?;
        match self.persist {
            Persist::Keep => {}
            Persist::KeepAlive => out.write_str("Connection: keep-alive\r\n")?,
            Persist::Close => out.write_str("Connection: close\r\n")?,
        }
        if let Some(allow) = self.allow {
            write!(out, "Allow: {allow}\r\n")?;
        }
        out.write_str("\r\n")
    }
}

/// A byte vector as a `fmt::Write` sink.
struct Wire(Vec<u8>);

impl Write for Wire {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
