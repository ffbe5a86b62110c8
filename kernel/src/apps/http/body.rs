//! Request bodies: counted off and discarded, by `Content-Length` or chunked coding.
//!
//! Everything here is incremental: a body is consumed as its bytes arrive and only a
//! chunk-size or trailer line that has not fully arrived is left in the caller's buffer.

use super::request::Reject;
use super::{MAX_BODY, MAX_CHUNK_LINE, MAX_TRAILERS};

/// Where in a body the reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    /// This many bytes of a `Content-Length` body are still to come.
    Length(u64),
    /// At a chunk-size line; `total` data bytes seen so far.
    ChunkSize { total: u64 },
    /// Inside a chunk's data, `left` bytes to go.
    ChunkData { left: u64, total: u64 },
    /// After a chunk's data, at its line end.
    ChunkEnd { total: u64 },
    /// After the last chunk, in the trailer section; `seen` trailer bytes so far.
    Trailers { seen: usize },
}

/// What one call to [`Body::advance`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Step {
    /// Bytes of the input consumed.
    pub used: usize,
    /// The body is complete.
    pub done: bool,
}

impl Body {
    /// Consumes as much of `input` as belongs to the body and can be consumed now.
    pub fn advance(&mut self, input: &[u8]) -> Result<Step, Reject> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match *self {
                Body::Length(left) => {
                    let take = left.min(rest.len() as u64);
                    used += take as usize;
                    *self = Body::Length(left - take);
                    return Ok(Step { used, done: take == left });
                }
                Body::ChunkSize { total } => {
                    let Some((len, size)) = chunk_size_line(rest)? else {
                        return Ok(Step { used, done: false });
                    };
                    used += len;
                    let total = total.saturating_add(size);
                    if total > MAX_BODY {
                        return Err(Reject::BodyTooLarge);
                    }
                    *self = if size == 0 { Body::Trailers { seen: 0 } } else { Body::ChunkData { left: size, total } };
                }
                Body::ChunkData { left, total } => {
                    let take = left.min(rest.len() as u64);
                    used += take as usize;
                    if take < left {
                        *self = Body::ChunkData { left: left - take, total };
                        return Ok(Step { used, done: false });
                    }
                    *self = Body::ChunkEnd { total };
                }
                Body::ChunkEnd { total } => match rest {
                    [b'\r', b'\n', ..] => {
                        used += 2;
                        *self = Body::ChunkSize { total };
                    }
                    [] | [b'\r'] => return Ok(Step { used, done: false }),
                    _ => return Err(Reject::Malformed("chunk data longer than its size")),
                },
                Body::Trailers { seen } => {
                    // A trailer line is any run of bytes up to LF; they are all discarded.
                    let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                        return if seen + rest.len() >= MAX_TRAILERS {
                            Err(Reject::HeadTooLarge)
                        } else {
                            Ok(Step { used, done: false })
                        };
                    };
                    if seen + lf + 1 > MAX_TRAILERS {
                        return Err(Reject::HeadTooLarge);
                    }
                    used += lf + 1;
                    let line = &rest[..lf];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line.is_empty() {
                        return Ok(Step { used, done: true });
                    }
                    if line.iter().any(|&b| b == b'\r' || b == 0) {
                        return Err(Reject::Malformed("invalid trailer line"));
                    }
                    *self = Body::Trailers { seen: seen + lf + 1 };
                }
            }
        }
    }
}

/// Parses a chunk-size line at the start of `input`: `Some((line length, chunk size))`, or
/// `None` while the line is incomplete and within [`MAX_CHUNK_LINE`].
fn chunk_size_line(input: &[u8]) -> Result<Option<(usize, u64)>, Reject> {
    // A size of more than 15 hex digits is refused by httparse as invalid; it would be over
    // MAX_BODY anyway, so report it as too large.
    let digits = input.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits > 15 {
        return Err(Reject::BodyTooLarge);
    }
    if digits == 0 && !input.is_empty() {
        return Err(Reject::Malformed("invalid chunk size"));
    }
    let window = &input[..input.len().min(MAX_CHUNK_LINE)];
    match httparse::parse_chunk_size(window) {
        Ok(httparse::Status::Complete((len, size))) => {
            // httparse tolerates a bare LF inside an extension; a line must end at its first LF.
            if window[..len - 1].contains(&b'\n') {
                return Err(Reject::Malformed("invalid chunk size line"));
            }
            Ok(Some((len, size)))
        }
        Ok(httparse::Status::Partial) if input.len() >= MAX_CHUNK_LINE => {
            Err(Reject::Malformed("chunk size line too long"))
        }
        Ok(httparse::Status::Partial) => {
            if window.contains(&b'\n') {
                return Err(Reject::Malformed("invalid chunk size line"));
            }
            Ok(None)
        }
        Err(httparse::InvalidChunkSize) => Err(Reject::Malformed("invalid chunk size line")),
    }
}
