//! Redis RESP2: encoding commands and reading replies incrementally from a byte buffer.
//!
//! [`parse`] looks at the bytes received so far and either returns one complete reply and how
//! many bytes it took, or `None` when more bytes are needed. It never trusts a length the
//! server sent beyond the limits below.

use thiserror::Error;

/// Largest bulk string accepted (the generator's values are at most 1 MiB).
pub const MAX_BULK: usize = 64 << 20;
/// Largest array accepted.
pub const MAX_ARRAY: usize = 1 << 20;
/// Deepest nesting of arrays accepted.
pub const MAX_DEPTH: usize = 8;
/// Longest line (`+...`, `-...`, `:...` or a length header) accepted.
pub const MAX_LINE: usize = 64 << 10;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(Vec<u8>),
    /// `-ERR ...`
    Error(Vec<u8>),
    /// `:42`
    Integer(i64),
    /// `$3\r\nabc` (`None` is the nil bulk `$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...` (`None` is the nil array `*-1`).
    Array(Option<Vec<Reply>>),
}

/// Why bytes are not a RESP2 reply.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RespError {
    /// The first byte is not a RESP2 type.
    #[error("unknown RESP type byte 0x{0:02x}")]
    UnknownType(u8),
    /// A line has no CRLF within [`MAX_LINE`] bytes.
    #[error("a RESP line is longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A length or integer is not a number.
    #[error("'{0}' is not a RESP integer")]
    BadInteger(String),
    /// A length is out of range.
    #[error("RESP length {0} is out of range")]
    BadLength(i64),
    /// A bulk string is not followed by CRLF.
    #[error("a RESP bulk string does not end with CRLF")]
    MissingCrlf,
    /// Arrays nested too deep.
    #[error("RESP arrays nested deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// Appends the command `args` (an array of bulk strings) to `out`.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the start of `buf`: `Ok(Some((reply, bytes_used)))`, or `Ok(None)`
/// if `buf` holds only part of a reply.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    parse_at(buf, 0, 0)
}

/// The line starting at `at` (without CRLF) and the offset after its CRLF.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = &buf[at..];
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(i) if i > MAX_LINE => Err(RespError::LineTooLong),
        Some(i) => Ok(Some((&rest[..i], at + i + 2))),
        None if rest.len() > MAX_LINE => Err(RespError::LineTooLong),
        None => Ok(None),
    }
}

fn integer(text: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| RespError::BadInteger(String::from_utf8_lossy(text).into_owned()))
}

/// A length header: -1 (nil) or `0..=max`.
fn length(text: &[u8], max: usize) -> Result<Option<usize>, RespError> {
    match integer(text)? {
        -1 => Ok(None),
        n if n >= 0 && n as u64 <= max as u64 => Ok(Some(n as usize)),
        n => Err(RespError::BadLength(n)),
    }
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Reply, usize)>, RespError> {
    let Some(&kind) = buf.get(at) else { return Ok(None) };
    let Some((text, next)) = line(buf, at + 1)? else { return Ok(None) };
    let reply = match kind {
        b'+' => (Reply::Simple(text.to_vec()), next),
        b'-' => (Reply::Error(text.to_vec()), next),
        b':' => (Reply::Integer(integer(text)?), next),
        b'$' => match length(text, MAX_BULK)? {
            None => (Reply::Bulk(None), next),
            Some(n) => {
                if buf.len() < next + n + 2 {
                    return Ok(None);
                }
                if &buf[next + n..next + n + 2] != b"\r\n" {
                    return Err(RespError::MissingCrlf);
                }
                (Reply::Bulk(Some(buf[next..next + n].to_vec())), next + n + 2)
            }
        },
        b'*' => match length(text, MAX_ARRAY)? {
            None => (Reply::Array(None), next),
            Some(n) => {
                if depth >= MAX_DEPTH {
                    return Err(RespError::TooDeep);
                }
                let mut items = Vec::with_capacity(n.min(1024));
                let mut pos = next;
                for _ in 0..n {
                    let Some((item, after)) = parse_at(buf, pos, depth + 1)? else { return Ok(None) };
                    items.push(item);
                    pos = after;
                }
                (Reply::Array(Some(items)), pos)
            }
        },
        other => return Err(RespError::UnknownType(other)),
    };
    Ok(Some(reply))
}

impl Reply {
    /// A short description for error messages (at most about 60 characters of content).
    pub fn describe(&self) -> String {
        fn text(b: &[u8]) -> String {
            let s = String::from_utf8_lossy(b);
            let s: String = s.chars().take(60).collect();
            s.escape_debug().to_string()
        }
        match self {
            Reply::Simple(b) => format!("+{}", text(b)),
            Reply::Error(b) => format!("-{}", text(b)),
            Reply::Integer(n) => format!(":{n}"),
            Reply::Bulk(None) => "nil".to_string(),
            Reply::Bulk(Some(b)) => format!("a {}-byte bulk string \"{}\"", b.len(), text(b)),
            Reply::Array(None) => "a nil array".to_string(),
            Reply::Array(Some(items)) => format!("an array of {}", items.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        command(&mut out, &[b"SET", b"k", b"hello"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n");
    }

    #[test]
    fn parses_each_type() {
        assert_eq!(parse(b"+OK\r\n"), Ok(Some((Reply::Simple(b"OK".to_vec()), 5))));
        assert_eq!(parse(b"-ERR no\r\n"), Ok(Some((Reply::Error(b"ERR no".to_vec()), 9))));
        assert_eq!(parse(b":-42\r\n"), Ok(Some((Reply::Integer(-42), 6))));
        assert_eq!(parse(b"$3\r\nabc\r\n"), Ok(Some((Reply::Bulk(Some(b"abc".to_vec())), 9))));
        assert_eq!(parse(b"$0\r\n\r\n"), Ok(Some((Reply::Bulk(Some(Vec::new())), 6))));
        assert_eq!(parse(b"$-1\r\n"), Ok(Some((Reply::Bulk(None), 5))));
        assert_eq!(parse(b"*-1\r\n"), Ok(Some((Reply::Array(None), 5))));
        let nested = b"*2\r\n:1\r\n*1\r\n$2\r\nhi\r\n";
        assert_eq!(
            parse(nested),
            Ok(Some((
                Reply::Array(Some(vec![
                    Reply::Integer(1),
                    Reply::Array(Some(vec![Reply::Bulk(Some(b"hi".to_vec()))]))
                ])),
                nested.len()
            )))
        );
    }

    #[test]
    fn binary_bulk_strings_may_hold_crlf() {
        assert_eq!(parse(b"$4\r\n\r\n\r\n\r\n"), Ok(Some((Reply::Bulk(Some(b"\r\n\r\n".to_vec())), 10))));
    }

    #[test]
    fn partial_input_asks_for_more() {
        let whole = b"*2\r\n$5\r\nhello\r\n$5\r\nworld\r\n";
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(matches!(parse(whole), Ok(Some((_, n))) if n == whole.len()));
    }

    #[test]
    fn leaves_the_next_reply_in_the_buffer() {
        let two = b"+OK\r\n$1\r\nx\r\n";
        let (first, n) = parse(two).unwrap().unwrap();
        assert_eq!(first, Reply::Simple(b"OK".to_vec()));
        assert_eq!(parse(&two[n..]).unwrap().unwrap().0, Reply::Bulk(Some(b"x".to_vec())));
    }

    #[test]
    fn rejects_malformed_replies() {
        assert_eq!(parse(b"?x\r\n"), Err(RespError::UnknownType(b'?')));
        assert_eq!(parse(b":12a\r\n"), Err(RespError::BadInteger("12a".into())));
        assert_eq!(parse(b"$-2\r\n"), Err(RespError::BadLength(-2)));
        assert_eq!(parse(b"$99999999999\r\n"), Err(RespError::BadLength(99_999_999_999)));
        assert_eq!(parse(b"*2000000\r\n"), Err(RespError::BadLength(2_000_000)));
        assert_eq!(parse(b"$3\r\nabcde"), Err(RespError::MissingCrlf));
        assert_eq!(parse(&[b'+'; MAX_LINE + 10]), Err(RespError::LineTooLong));
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert_eq!(parse(deep.as_bytes()), Err(RespError::TooDeep));
    }

    #[test]
    fn describes_replies_briefly() {
        assert_eq!(Reply::Simple(b"OK".to_vec()).describe(), "+OK");
        assert_eq!(Reply::Bulk(None).describe(), "nil");
        assert!(Reply::Bulk(Some(vec![b'a'; 500])).describe().len() < 100);
    }
}
